"""A fresh clone is clean after `make setup`: the committed notebooks are exactly what the
project's git filter produces, so `git status` shows nothing and the filter never has to run
again for provenance."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def filter_arguments() -> list[str]:
    """The nbstripout arguments of the clean filter that `make git-filters` installs."""
    makefile = (ROOT / "Makefile").read_text()
    match = re.search(r"filter\.nbstripout\.clean '\"\$\(abspath \$\(PY\)\)\" -m nbstripout([^']*)'", makefile)
    assert match, "Makefile: git-filters no longer sets filter.nbstripout.clean"
    return shlex.split(match.group(1))


def test_clean_filter_keeps_cell_ids() -> None:
    assert "--keep-id" in filter_arguments()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_is_in_its_filtered_form(path: Path) -> None:
    """Runs the filter itself (no git filter needs to be installed) and compares bytes."""
    original = path.read_bytes()
    filtered = subprocess.run([sys.executable, "-m", "nbstripout", "-t", *filter_arguments()], input=original,
                              capture_output=True, check=True, timeout=120).stdout
    assert filtered == original, (f"{path.name} differs from its filtered form: run "
                                  f"`.venv/bin/python -m nbstripout {' '.join(filter_arguments())} {path}`")


def test_fresh_clone_is_clean_after_the_setup_filter_step(tmp_path: Path) -> None:
    if not (ROOT / ".git").exists() or shutil.which("git") is None or shutil.which("make") is None:
        pytest.skip("not a git checkout (or no git/make): nothing to clone")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(clone)], check=True, timeout=300)
    subprocess.run(["make", "-s", "git-filters", f"PY={sys.executable}"], cwd=clone, check=True, timeout=600)
    config = subprocess.run(["git", "config", "filter.nbstripout.clean"], cwd=clone, capture_output=True,
                            text=True, check=True).stdout
    assert "--keep-id" in config
    for notebook in (clone / "notebooks").glob("*.ipynb"):
        notebook.touch()  # racily clean again: git must run the filter on every notebook
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True,
                            check=True, timeout=600).stdout
    assert status == "", f"a fresh clone is not clean after `make git-filters`:\n{status}"
