"""Every notebook works with one site and with twelve (grids of per-site plots, legends, tables)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import yaml

from fedlab.pipeline import PIPELINE_NOTEBOOKS, reproduce, run_notebook

ROOT = Path(__file__).resolve().parents[1]


def _config(n_sites: int) -> dict:
    sites = [{"id": f"site_{k:02d}", "patients": 60 if n_sites == 1 else 25, "seed": 100 + k,
              "diabetes_risk": 10.0, "age_mean": 58.0,
              "glucose_unit": "mmol/L" if k % 3 == 2 else "mg/dL",
              "condition_system": "icd10" if k % 4 == 3 else "snomed"} for k in range(n_sites)]
    methods = ["local", "pooled"] if n_sites == 1 else ["local", "pooled", "fedavg"]
    return {"name": f"sites{n_sites}", "description": f"{n_sites} tiny site(s) for the notebook test", "seed": 5,
            "sites": sites, "generate": {"years_of_history": 10},
            "task": {"horizon_years": 5, "on_site_error": "skip"},
            "train": {"methods": methods, "rounds": 2, "local_steps": 2, "seeds": [0], "bootstrap": 5}}


def _images(path: Path) -> int:
    nb = nbformat.read(path, as_version=4)
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.slow
@pytest.mark.parametrize("n_sites", [1, 12])
def test_every_notebook_runs_with_one_to_twelve_sites(n_sites: int, tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / f"sites{n_sites}.yaml"
    config.write_text(yaml.safe_dump(_config(n_sites), sort_keys=False))
    report = reproduce(config, echo=lambda _: None)
    executed = report / "notebooks"
    assert all((executed / name).is_file() for name in PIPELINE_NOTEBOOKS)
    for name in ("01_synthea_generation.ipynb", "04_spark_features.ipynb"):
        assert _images(executed / name) >= 1, name
    quickstart = executed / "00_quickstart.ipynb"
    run_notebook(ROOT / "notebooks" / "00_quickstart.ipynb", quickstart,
                 {"config": str(config), "run": "", "force": False, "overrides": []}, ROOT / "notebooks",
                 progress=False)
    assert _images(quickstart) >= 1
    assert "## What to look at next" in (report / "results.md").read_text()
