"""Provenance never fails or slows a run, and `dirty` means a tracked file really differs."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import nbformat
import pytest

from fedlab import provenance
from fedlab.config import experiment_from_dict
from fedlab.io import read_json, write_json
from fedlab.provenance import blob_id, git_state
from fedlab.report import write_report

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("print('hi')", id="cell-a")]
    nbformat.write(notebook, repo / "nb.ipynb")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", "one")
    return repo


def test_blob_id_matches_git(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"some bytes\n\0binary")
    assert blob_id(path.read_bytes()) == subprocess.run(["git", "hash-object", "--no-filters", str(path)],
                                                        capture_output=True, text=True, check=True).stdout.strip()


def test_clean_then_dirty_only_when_content_differs(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    head = _git(repo, "rev-parse", "HEAD").strip()
    assert git_state(repo) == {"commit": head, "dirty": False}
    (repo / "code.py").touch()  # a new mtime is not a change
    notebook = nbformat.read(repo / "nb.ipynb", as_version=4)
    notebook.cells[0].outputs = [nbformat.v4.new_output("stream", text="hi\n")]
    notebook.cells[0].execution_count = 1
    nbformat.write(notebook, repo / "nb.ipynb")  # executed in place: the filter strips it again
    assert git_state(repo)["dirty"] is False
    (repo / "code.py").write_text("x = 2\n")
    state = git_state(repo)
    assert state["dirty"] is True and state["changed"] == ["code.py"] and state["n_changed"] == 1
    (repo / "code.py").unlink()
    assert git_state(repo)["changed"] == ["code.py"]
    notebook.cells[0].source = "print('bye')"
    nbformat.write(notebook, repo / "nb.ipynb")
    assert git_state(tmp_path / "repo")["changed"] == ["code.py", "nb.ipynb"]


def test_not_a_repository_is_unknown_with_a_reason(tmp_path: Path) -> None:
    state = git_state(tmp_path)
    assert state["commit"] is None and state["dirty"] is None
    assert "not a git repository" in state["reason"]


def _hanging_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `git` that never answers, and whose child keeps the pipes open."""
    folder = tmp_path / "bin"
    folder.mkdir()
    fake = folder / "git"
    fake.write_text("#!/bin/sh\nsleep 120 &\nsleep 120\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:{__import__('os').environ['PATH']}")
    monkeypatch.setattr(provenance, "GIT_TIMEOUT_SECONDS", 1.0)


def test_a_hanging_git_is_recorded_as_unknown_within_the_bound(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    _hanging_git(tmp_path, monkeypatch)
    started = time.monotonic()
    state = git_state(tmp_path)
    assert time.monotonic() - started < 10
    assert state == {"commit": None, "dirty": None, "reason": "`git rev-parse --verify HEAD` did not answer within 1 s"}


def test_report_completes_with_a_hanging_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exp = experiment_from_dict({"name": "t", "sites": [{"id": "a", "patients": 5, "seed": 1}],
                                "train": {"seeds": [0]}}, root=tmp_path)
    rows = [{"method": m, "seed": 0, "train_sites": "a", "test_site": "a", "metric": "auroc", "value": 0.7}
            for m in ("local", "pooled")]
    write_json(exp.report_path() / "results.json", {"rows": rows})
    _hanging_git(tmp_path, monkeypatch)
    write_report(exp)
    manifest = read_json(exp.report_path() / "manifest.json")
    assert manifest["git"]["dirty"] is None and "did not answer" in manifest["git"]["reason"]
    assert (exp.report_path() / "report.html").is_file()
    assert json.loads((exp.report_path() / "manifest.json").read_text())["run"] == "t"
