"""Notebooks: python3 kernel, one `parameters` cell of plain values, in sync with their
jupytext twins, and the whole pipeline runs under papermill at smoke size."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pandas as pd
import psutil
import pytest

from fedlab.errors import FedlabError
from fedlab.io import read_json, write_json
from fedlab.pipeline import (
    MEMORY_HEADROOM,
    PIPELINE_NOTEBOOKS,
    available_memory_mb,
    parallel_workers,
    plan,
    reproduce,
    run_notebook,
    site_memory_mb,
)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_every_stage_has_a_numbered_notebook() -> None:
    names = {p.name for p in NOTEBOOKS}
    assert "00_quickstart.ipynb" in names
    assert set(PIPELINE_NOTEBOOKS) <= names
    assert len(names) == 7


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_kernel_and_single_parameters_cell(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, f"{path.name}: expected exactly one parameters cell"
    tree = ast.parse(params[0].source)
    for statement in tree.body:
        assert isinstance(statement, ast.Assign), f"{path.name}: parameters cell may only assign values"
        ast.literal_eval(statement.value)  # plain values only
    names = {t.id for s in tree.body for t in s.targets}
    assert {"config", "run", "force"} <= names
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path.name}: outputs not stripped"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_papermill_reads_every_parameter(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """papermill parses the parameters cell (for injection and `--help-notebook`); a comment with
    an `=` in it makes it skip that parameter with a warning."""
    from papermill.translators import PythonTranslator

    cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    with caplog.at_level("WARNING"):
        parsed = {p.name for p in PythonTranslator.inspect(cell)}
    assert not [r.message for r in caplog.records if "Unable to parse" in r.message]
    assert parsed == {t.id for s in ast.parse(cell.source).body for t in s.targets}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_matches_its_jupytext_twin(path: Path) -> None:
    import jupytext

    twin = path.with_suffix(".py")
    assert twin.is_file(), f"{path.name} has no py:percent twin"
    a = [(c.cell_type, c.source.strip()) for c in nbformat.read(path, as_version=4).cells]
    b = [(c.cell_type, c.source.strip()) for c in jupytext.read(twin).cells]
    assert a == b, f"{path.name} and {twin.name} differ: run `jupytext --sync notebooks/*.ipynb`"


def test_failing_notebook_is_named_with_its_cell(tmp_path: Path, smoke_experiment) -> None:
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell("config = ''\nrun = ''\nforce = False\noverrides = ''",
                                          metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("x = 1"),
                nbformat.v4.new_code_cell("raise ValueError('site rural has no patients')")]
    folder = tmp_path / "nbs"
    folder.mkdir()
    nbformat.write(nb, folder / PIPELINE_NOTEBOOKS[0])
    with pytest.raises(FedlabError, match=r"01_synthea_generation\.ipynb failed in cell \[\d+\]: "
                                          r"ValueError: site rural has no patients"):
        reproduce(smoke_experiment.source, notebooks=["01"], notebooks_dir=folder)


MARKER = "FEDLAB_TEST_RUN"


def marked_processes(marker: str, name_part: str = "") -> list[psutil.Process]:
    """Live processes started under `marker` (kernels, their JVMs and TFF workers inherit it)."""
    found = []
    for proc in psutil.process_iter(["name", "status"]):
        if name_part not in (proc.info["name"] or "") or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if proc.pid != os.getpid() and proc.environ().get(MARKER) == marker:
                found.append(proc)
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
    return found


def comparable_results(results: dict) -> dict:
    """results.json without its wall-clock timings and the paths of the feature files it read."""
    sites = {site: {k: v for k, v in entry.items() if k != "path"} for site, entry in results["sites"].items()}
    return {**{k: v for k, v in results.items() if k != "timings"}, "sites": sites}


@dataclass(frozen=True)
class SmokeRun:
    """One uninterrupted `reproduce` of configs/smoke.yaml, and its outputs as they were when it ended."""

    exp: Any
    report: Path
    marker: str
    features: dict[str, pd.DataFrame]
    results: dict


_SMOKE_RUN: list[SmokeRun] = []


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> SmokeRun:
    """Shared by test_interrupt.py (which imports it), so the suite runs the whole pipeline once."""
    if _SMOKE_RUN:
        return _SMOKE_RUN[0]
    from helpers import smoke_experiment_in

    exp = smoke_experiment_in(tmp_path_factory.mktemp("smoke-run"))
    marker = f"{os.getpid()}-{time.time_ns()}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(MARKER, marker)  # inherited by every kernel and TFF worker this run starts
        report = reproduce(exp.source)
    features = {site: pd.read_parquet(exp.data_path("features", None, site) / "features.parquet")
                for site in exp.site_ids}
    _SMOKE_RUN.append(SmokeRun(exp, report, marker, features,
                               comparable_results(read_json(report / "results.json"))))
    return _SMOKE_RUN[0]


@pytest.mark.slow
def test_reproduce_smoke_end_to_end(smoke_run: SmokeRun, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MARKER, smoke_run.marker)
    exp, report = smoke_run.exp, smoke_run.report
    results = read_json(report / "results.json")
    rows = results["rows"]
    assert {r["method"] for r in rows} >= {"local", "pooled", "fedavg"}
    assert {r["test_site"] for r in rows} >= set(exp.site_ids)
    assert set(rows[0]) >= {"method", "seed", "train_sites", "test_site", "metric", "value"}
    local_trained = {r["train_sites"] for r in rows if r["method"] == "local"}
    assert local_trained == set(exp.site_ids)
    for name in PIPELINE_NOTEBOOKS:
        executed = nbformat.read(report / "notebooks" / name, as_version=4)
        assert executed.metadata["papermill"]["parameters"]["run"] == exp.name
    text = (report / "results.md").read_text()
    assert "AUROC" in text and "claims" in text
    assert (report / "figures" / "auroc_by_site.png").is_file()
    assert (report / "figures" / "auroc_by_site.svg").is_file()
    manifest = read_json(report / "manifest.json")
    assert manifest["packages"]["tensorflow-federated"] == "0.87.0"
    assert manifest["seeds"]["train"] == exp.train.seeds
    assert [t["notebook"] for t in manifest["notebook_timings"]] == list(PIPELINE_NOTEBOOKS)
    for stage in ("synthea", "export", "tables", "features"):
        for site in exp.site_ids:
            assert (exp.data_path(stage, None, site) / "_SUCCESS.json").is_file()
    # the quickstart notebook reuses the completed stages and reaches the same results table
    out = exp.report_path() / "notebooks" / "00_quickstart.ipynb"
    run_notebook(ROOT / "notebooks" / "00_quickstart.ipynb", out,
                 {"config": str(exp.source), "run": "", "force": False, "overrides": ""}, ROOT / "notebooks")
    assert json.loads(json.dumps(read_json(report / "results.json")["rows"])) == rows
    # warm rerun: every stage cached; a deleted output is rebuilt, and only that stage reruns
    said: list[str] = []
    reproduce(exp.source, echo=said.append)
    assert sum("cached" in line for line in said) == len(PIPELINE_NOTEBOOKS), said
    shutil.rmtree(exp.data_path("features", None, exp.site_ids[-1]))
    steps = {s["stage"]: s["action"] for s in plan(exp, exp.name, [], None)}
    assert steps == {"generate": "skip", "export": "skip", "flatten": "skip", "features": "resume",
                     "train": "skip", "report": "skip"}
    time.sleep(1)
    leftovers = marked_processes(smoke_run.marker, "worker_binary")
    for proc in leftovers:
        proc.kill()
    assert not leftovers, "a TFF worker_binary outlived its notebook kernel"


@pytest.mark.slow
def test_executed_notebooks_keep_figures_and_leave_harmless_noise_in_the_logs(smoke_run: SmokeRun) -> None:
    from fedlab.logs import is_harmless

    executed = smoke_run.report / "notebooks"
    for name in ("01_synthea_generation.ipynb", "04_spark_features.ipynb", "05_federated_training.ipynb"):
        nb = nbformat.read(executed / name, as_version=4)
        images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
        assert images, f"{name}: the executed notebook lost its figures"
    for name in PIPELINE_NOTEBOOKS:
        nb = nbformat.read(executed / name, as_version=4)
        streams = [line for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "stream"
                   for line in o["text"].splitlines()]
        assert not [line for line in streams if is_harmless(line)], name
    logs = smoke_run.report / "logs"
    kernel_logs = "".join((logs / name.replace(".ipynb", ".log")).read_text() for name in PIPELINE_NOTEBOOKS)
    assert "Kernel is running over TCP without encryption" in kernel_logs
    assert "NativeCodeLoader" in (logs / "spark.log").read_text()
    assert "Unable to register cuDNN factory" in (logs / "noise.log").read_text()


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "_SUCCESS.json"}


@pytest.mark.slow
def test_parallel_generate_matches_serial_run(smoke_run: SmokeRun, tmp_path: Path) -> None:
    from helpers import smoke_experiment_in

    exp = smoke_experiment_in(tmp_path)
    said: list[str] = []
    reproduce(exp.source, notebooks=["generate"], parallel=2, echo=said.append)
    assert any("generate: 3 site(s) on 2 worker(s) (--parallel 2;" in line for line in said), said
    serial, parallel = smoke_run.exp.data_path("synthea", None), exp.data_path("synthea", None)
    assert _digest(parallel) == _digest(serial)
    assert plan(exp, exp.name, [], None)[0]["action"] == "skip"


def test_parallel_workers_are_capped_by_sites_and_memory() -> None:
    one_site = site_memory_mb("flatten", 100)
    budget = 10 * one_site / MEMORY_HEADROOM
    assert parallel_workers(4, "flatten", [100, 100, 100], budget) == 3  # one worker per site at most
    assert parallel_workers(2, "flatten", [100, 100, 100], budget) == 2
    assert parallel_workers(8, "flatten", [100] * 8, 2.5 * one_site / MEMORY_HEADROOM) == 2
    assert parallel_workers(4, "flatten", [100, 100], one_site / 2) == 1  # never fewer than one
    big = site_memory_mb("flatten", 1000)
    assert parallel_workers(3, "flatten", [1000, 100, 100], (big + one_site) / MEMORY_HEADROOM) == 2
    two_processes = site_memory_mb("generate", 100, processes=2)
    assert two_processes > site_memory_mb("generate", 100)
    assert parallel_workers(3, "generate", [100] * 3, 2 * two_processes / MEMORY_HEADROOM, processes=2) == 2
    with pytest.raises(FedlabError, match="--parallel must be at least 1"):
        parallel_workers(0, "flatten", [100], budget)


def test_available_memory_is_positive() -> None:
    assert 0 < available_memory_mb() < psutil.virtual_memory().total / 2**20 + 1


def test_interrupted_redo_does_not_keep_sites_of_the_old_stamp(tmp_path: Path, smoke_experiment) -> None:
    """A redo removes the stage's old site outputs first: killed (here: failing) midway, the
    resumed stage rebuilds every site instead of keeping ones made with the old parameters."""
    exp = smoke_experiment
    for site in exp.site_ids:
        write_json(exp.data_path("synthea", None, site) / "_SUCCESS.json", {"stage": "generate", "old": True})
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell("config = ''\nrun = ''\nforce = False\noverrides = ''",
                                          metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("raise SystemExit('killed')")]
    folder = tmp_path / "nbs"
    folder.mkdir()
    nbformat.write(nb, folder / PIPELINE_NOTEBOOKS[0])
    assert plan(exp, exp.name, [], None, folder)[0]["action"] == "resume"  # first run: would keep them
    with pytest.raises(FedlabError, match="01_synthea_generation"):
        reproduce(exp.source, force=["generate"], notebooks=["generate"], notebooks_dir=folder)
    assert not any(exp.data_path("synthea", None, site).exists() for site in exp.site_ids)
    step = plan(exp, exp.name, [], None, folder)[0]
    assert (step["action"], step["why"]) == ("resume", "outputs incomplete (deleted or interrupted) under the same stamp")


def test_notebook_without_parameters_cell_is_named(tmp_path: Path, smoke_experiment) -> None:
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell("config = ''")]
    folder = tmp_path / "nbs"
    folder.mkdir()
    nbformat.write(nb, folder / PIPELINE_NOTEBOOKS[0])
    with pytest.raises(FedlabError, match=r"01_synthea_generation\.ipynb: expected exactly one cell tagged "
                                          r"`parameters`, found 0"):
        reproduce(smoke_experiment.source, notebooks=["generate"], notebooks_dir=folder)


def test_unknown_stage_name_is_a_clear_error(smoke_experiment) -> None:
    with pytest.raises(FedlabError, match="no stage named 'trian'"):
        reproduce(smoke_experiment.source, force=["trian"])
