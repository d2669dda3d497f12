"""`fedlab compare`: agreement within CIs between a run and a reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlab.cli import main
from fedlab.compare import compare
from fedlab.io import write_json


def _summary(mean: float, low: float, high: float, test_site: str = "a") -> dict:
    return {"method": "fedavg", "train_sites": "a+b", "test_site": test_site, "metric": "auroc", "mean": mean,
            "ci_low": low, "ci_high": high, "n_seeds": 5}


def _write(folder: Path, entries: list[dict]) -> Path:
    write_json(folder / "results.json", {"rows": [], "summary": entries})
    return folder


def test_verdicts(tmp_path: Path) -> None:
    run = _write(tmp_path / "run", [_summary(0.80, 0.75, 0.85, "a"), _summary(0.70, 0.68, 0.79, "b"),
                                    _summary(0.60, 0.55, 0.65, "c"), _summary(0.9, float("nan"), float("nan"), "d")])
    ref = _write(tmp_path / "ref", [_summary(0.81, 0.76, 0.86, "a"), _summary(0.80, 0.78, 0.82, "b"),
                                    _summary(0.80, 0.75, 0.85, "c"), _summary(0.9, 0.8, 1.0, "d")])
    result = compare(run, ref)
    verdicts = {r["test_site"]: r["verdict"] for r in result["rows"]}
    assert verdicts == {"a": "agree", "b": "overlap", "c": "differs", "d": "no-ci"}
    assert result["verdicts"] == {"agree": 1, "overlap": 1, "differs": 1, "no-ci": 1}


def test_cli_strict_fails_on_a_difference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _write(tmp_path / "run", [_summary(0.60, 0.55, 0.65)])
    ref = _write(tmp_path / "ref", [_summary(0.80, 0.75, 0.85)])
    assert main(["compare", str(run), str(ref)]) == 0
    assert "| fedavg | a+b | a | 0.600 | 0.800 [0.750, 0.850] | differs |" in capsys.readouterr().out
    assert main(["compare", str(run), str(ref), "--strict"]) == 2
    assert main(["compare", str(run), str(tmp_path / "missing")]) == 2
    assert "results.json not found" in capsys.readouterr().err
