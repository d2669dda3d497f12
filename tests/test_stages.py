"""The stage graph's bookkeeping: a stage run outside `reproduce` (a notebook run by hand) makes
what follows it stale, and `reproduce --dry-run` says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlab.cli import main
from fedlab.io import write_json
from fedlab.pipeline import plan
from fedlab.stages import PACKAGE, STAGES, StampBook, output_fingerprint, record_written, stamps


def test_every_stamped_code_path_exists() -> None:
    for stage in STAGES:
        for path in stage.code:
            assert (PACKAGE / path).exists(), f"stage {stage.name}: {path} is hashed into its stamp but missing"


def _fake_outputs(exp, results: str = '{"rows": []}') -> None:
    """What a finished `reproduce` leaves: markers, result files, executed notebooks, stamps."""
    run = exp.name
    for stage in STAGES:
        if stage.site_dir:
            for site in exp.site_ids:
                write_json(exp.data_path(stage.site_dir, run, site) / "_SUCCESS.json",
                           {"stage": stage.name, "counts": {"rows": 3}, "seconds": 1.0})
        (exp.report_path(run) / "notebooks").mkdir(parents=True, exist_ok=True)
        (exp.report_path(run) / "notebooks" / stage.notebook).write_text("{}")
    (exp.report_path(run) / "results.json").write_text(results)
    (exp.report_path(run) / "results.md").write_text("# results\n")
    book = StampBook(exp.report_path(run) / "stamps.json")
    for index, stage in enumerate(STAGES):
        record_written(exp, run, stage.name)
        previous = STAGES[index - 1] if index else None
        book.record(stage.name, done=stamps(exp)[stage.name], outputs=output_fingerprint(stage, exp, run),
                    inputs=output_fingerprint(previous, exp, run) if previous else None)


def _actions(exp) -> dict[str, tuple[str, str]]:
    return {s["stage"]: (s["action"], s["why"]) for s in plan(exp, exp.name, [], None)}


def test_a_finished_run_is_current(smoke_experiment) -> None:
    _fake_outputs(smoke_experiment)
    assert {a for a, _ in _actions(smoke_experiment).values()} == {"skip"}


def test_train_rerun_by_hand_with_other_parameters(smoke_experiment) -> None:
    exp = smoke_experiment
    _fake_outputs(exp)
    by_hand = exp.model_copy(update={"train": exp.train.model_copy(update={"rounds": exp.train.rounds + 5})})
    (exp.report_path() / "results.json").write_text('{"rows": [], "rounds": "more"}')
    record_written(by_hand, None, "train")  # what notebook 05 run with overrides records
    actions = _actions(exp)
    assert actions["features"][0] == "skip"
    assert actions["train"] == ("redo", "its outputs were rewritten with other parameters or code "
                                        "(a notebook or command run by hand)")
    assert actions["report"] == ("redo", "after train is redone")


def test_train_rerun_by_hand_with_the_same_parameters_makes_the_report_stale(smoke_experiment) -> None:
    exp = smoke_experiment
    _fake_outputs(exp)
    (exp.report_path() / "results.json").write_text('{"rows": [], "timings": 2}')
    record_written(exp, None, "train")
    actions = _actions(exp)
    assert actions["train"][0] == "skip"
    assert actions["report"] == ("redo", "stale: the train outputs changed since it ran")


def test_results_edited_outside_fedlab(smoke_experiment) -> None:
    exp = smoke_experiment
    _fake_outputs(exp)
    (exp.report_path() / "results.json").write_text('{"rows": [1]}')
    assert _actions(exp)["train"] == ("redo", "its outputs changed since it ran")


def test_a_site_rebuilt_the_same_keeps_what_follows_current(smoke_experiment) -> None:
    exp = smoke_experiment
    _fake_outputs(exp)
    marker = exp.data_path("features", None, exp.site_ids[0]) / "_SUCCESS.json"
    write_json(marker, {"stage": "features", "counts": {"rows": 3}, "seconds": 99.0})  # only the timing differs
    assert _actions(exp)["train"][0] == "skip"
    write_json(marker, {"stage": "features", "counts": {"rows": 4}, "seconds": 99.0})
    assert _actions(exp)["features"] == ("redo", "its outputs changed since it ran")
    record_written(exp, None, "features")  # notebook 04 run by hand, same parameters, other rows
    actions = _actions(exp)
    assert actions["features"][0] == "skip"
    assert actions["train"] == ("redo", "stale: the features outputs changed since it ran")


def test_dry_run_reports_stale_outputs(smoke_experiment, capsys: pytest.CaptureFixture[str]) -> None:
    exp = smoke_experiment
    _fake_outputs(exp)
    (exp.report_path() / "results.json").write_text('{"rows": [], "timings": 2}')
    record_written(exp, None, "train")
    assert main(["reproduce", "--config", str(exp.source), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "report    redo    stale: the train outputs changed since it ran" in out


def test_forcing_a_stage_redoes_what_it_feeds(smoke_experiment) -> None:
    exp = smoke_experiment
    _fake_outputs(exp)
    steps = {s["stage"]: (s["action"], s["why"]) for s in plan(exp, exp.name, ["train"], None)}
    assert steps["train"] == ("redo", "asked for") and steps["report"] == ("redo", "after train is redone")
    assert steps["features"][0] == "skip"


def test_report_records_the_hash_of_the_results_it_came_from(tmp_path: Path) -> None:
    import hashlib

    from fedlab.config import experiment_from_dict
    from fedlab.io import read_json
    from fedlab.report import write_report

    exp = experiment_from_dict({"name": "t", "sites": [{"id": "a", "patients": 5, "seed": 1}],
                                "train": {"seeds": [0]}}, root=tmp_path)
    rows = [{"method": m, "seed": 0, "train_sites": "a", "test_site": "a", "metric": "auroc", "value": 0.7}
            for m in ("local", "pooled")]
    write_json(exp.report_path() / "results.json", {"rows": rows})
    write_report(exp)
    digest = hashlib.sha256((exp.report_path() / "results.json").read_bytes()).hexdigest()
    assert read_json(exp.report_path() / "manifest.json")["results_sha256"] == digest
    assert digest in (exp.report_path() / "results.md").read_text()
    assert digest in (exp.report_path() / "report.html").read_text()
