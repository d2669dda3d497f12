"""Killed with SIGKILL mid-stage, a rerun finishes with outputs identical to an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CONFIG = {
    "name": "killed", "seed": 3,
    "sites": [{"id": "one", "patients": 150, "seed": 1}, {"id": "two", "patients": 150, "seed": 2}],
    "generate": {"years_of_history": 8},
}


def _project(root: Path) -> Path:
    (root / "configs").mkdir(parents=True)
    config = root / "configs" / "killed.yaml"
    config.write_text(json.dumps(CONFIG))  # JSON is YAML
    return config


def _fedlab(config: Path, *verb: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedlab.cli", *verb, "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "_SUCCESS.json"}


@pytest.mark.slow
def test_generate_killed_midway_then_rerun_matches_clean_run(tmp_path: Path) -> None:
    clean = _project(tmp_path / "clean")
    assert _fedlab(clean, "generate").wait(timeout=600) == 0

    killed = _project(tmp_path / "killed")
    proc = _fedlab(killed, "generate")
    site_one = tmp_path / "killed" / "data" / "synthea" / "killed" / "one"
    deadline = time.time() + 300
    while not (site_one / "_SUCCESS.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)  # kill while the second site is being written
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    site_two = site_one.parent / "two"
    assert not (site_two / "_SUCCESS.json").exists(), "the kill came too late to interrupt site two"

    assert _fedlab(killed, "generate").wait(timeout=600) == 0
    a = tmp_path / "clean" / "data" / "synthea" / "killed"
    b = tmp_path / "killed" / "data" / "synthea" / "killed"
    assert _digest(a) == _digest(b)
    leftovers = [p.name for p in b.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"staging folders left behind: {leftovers}"
