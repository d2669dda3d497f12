"""Notebooks: python3 kernel, one `parameters` cell of plain values, in sync with their
jupytext twins, and the whole pipeline runs under papermill at smoke size."""

from __future__ import annotations

import ast
import json
import os
import shutil
import time
from pathlib import Path

import nbformat
import psutil
import pytest

from fedlab.errors import FedlabError
from fedlab.io import read_json
from fedlab.pipeline import PIPELINE_NOTEBOOKS, plan, reproduce, run_notebook

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


def _orphan_workers(marker: str) -> list[psutil.Process]:
    """Live worker_binary processes started by this test's kernels (they inherit its marker)."""
    found = []
    for proc in psutil.process_iter(["name", "status"]):
        if "worker_binary" not in (proc.info["name"] or "") or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if proc.environ().get(MARKER) == marker:
                found.append(proc)
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
    return found


@pytest.mark.slow
def test_reproduce_smoke_end_to_end(smoke_experiment, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = f"{os.getpid()}-{time.time_ns()}"
    monkeypatch.setenv(MARKER, marker)  # inherited by every kernel and TFF worker this test starts
    exp = smoke_experiment
    report = reproduce(exp.source)
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
    leftovers = _orphan_workers(marker)
    for proc in leftovers:
        proc.kill()
    assert not leftovers, "a TFF worker_binary outlived its notebook kernel"


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
