"""The `fedlab` command line: every verb exists, takes --config, and bad input gives a clear error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedlab.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
VERBS = ["generate", "serve", "export", "flatten", "features", "train", "report", "reproduce"]


def test_every_stage_verb_exists() -> None:
    assert set(VERBS) <= set(COMMANDS)
    parser = build_parser()
    for verb in VERBS:
        args = parser.parse_args([verb, "--config", "configs/smoke.yaml", "--run", "r1"])
        assert args.verb == verb and args.run == "r1"


def test_bad_config_is_a_clear_error_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsites: [{id: a, patients: 3, seed: 1, colour: red}]\n")
    assert main(["generate", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "sites.0.colour: unknown key" in err
    assert "Traceback" not in err


def test_bad_override_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--config", str(ROOT / "configs" / "smoke.yaml"), "--set", "train.rounds=lots"]) == 2
    assert "train.rounds" in capsys.readouterr().err


def test_report_before_train_says_what_to_run(smoke_experiment, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--config", str(smoke_experiment.source)]) == 2
    assert "fedlab train" in capsys.readouterr().err


def test_console_entry_point_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "fedlab.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for verb in VERBS:
        assert verb in done.stdout


def test_views_test_verb_prints_pass_rates(reference_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    suite = reference_dir / "sql-on-fhir-v2-tests"
    assert main(["views", "test", str(suite), "--min-pass-rate", "0.95"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cases"] == 134 and report["pass_rate"] >= 0.95 and report["shareable_pass_rate"] >= 0.95
    assert main(["views", "test", str(suite), "--min-pass-rate", "1.01"]) == 2


def test_reproduce_parallel_is_parsed_and_checked(smoke_experiment, capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["reproduce", "--config", "configs/smoke.yaml", "--parallel", "3"])
    assert args.parallel == 3
    assert build_parser().parse_args(["reproduce", "--config", "configs/smoke.yaml"]).parallel == 1
    assert main(["reproduce", "--config", str(smoke_experiment.source), "--parallel", "0"]) == 2
    assert "--parallel must be at least 1, not 0" in capsys.readouterr().err
    assert not smoke_experiment.report_path().exists(), "nothing may run before the check"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from fedlab import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedlab {__version__}"


@pytest.mark.parametrize("flag", ["--force", "--from"])
def test_dry_run_names_the_stages_for_an_unknown_stage(flag: str, smoke_experiment,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", "--config", str(smoke_experiment.source), "--dry-run", flag, "nosuchstage"]) == 2
    err = capsys.readouterr().err
    assert "no stage named 'nosuchstage'" in err and "generate, export, flatten, features, train, report" in err


@pytest.mark.parametrize(("verb", "first"), [("export", "fedlab generate"), ("flatten", "fedlab export"),
                                             ("features", "fedlab flatten"), ("train", "fedlab features"),
                                             ("report", "fedlab train")])
def test_a_stage_run_out_of_order_says_what_to_run_first(verb: str, first: str, smoke_experiment,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main([verb, "--config", str(smoke_experiment.source)]) == 2
    err = capsys.readouterr().err
    assert f"run `{first}" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
