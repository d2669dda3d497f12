"""Killed with SIGKILL mid-stage, a rerun finishes with outputs identical to an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from helpers import smoke_experiment_in
from test_notebooks import MARKER, comparable_results, marked_processes, smoke_run  # noqa: F401 (fixture)

from fedlab.io import read_json, write_json
from fedlab.pipeline import STAGES, plan

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


def _copy_cached_stages(source_exp, target_exp, stages: tuple[str, ...], data_dirs: tuple[str, ...]) -> None:
    """Give the target run the finished early stages of the source run: their data, executed
    notebooks and stamps (stamps hash config and code, not paths), so `reproduce` starts later."""
    for data_dir in data_dirs:
        shutil.copytree(source_exp.data_path(data_dir, None), target_exp.data_path(data_dir, None))
    book = read_json(source_exp.report_path() / "stamps.json")
    notebooks = target_exp.report_path() / "notebooks"
    notebooks.mkdir(parents=True)
    for stage in STAGES:
        if stage.name in stages:
            shutil.copy(source_exp.report_path() / "notebooks" / stage.notebook, notebooks / stage.notebook)
    write_json(target_exp.report_path() / "stamps.json", {s: book[s] for s in stages})


def _wait_until_gone(marker: str, seconds: float) -> list[psutil.Process]:
    """Processes of the killed run still alive after `seconds` (kernels run in their own session;
    they exit when their parent dies, and their JVM when its stdin closes)."""
    deadline = time.time() + seconds
    alive = marked_processes(marker)
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = marked_processes(marker)
    return alive


def _stage_started(exp, stage: str) -> bool:
    try:
        return stage in read_json(exp.report_path() / "stamps.json")
    except (OSError, ValueError):
        return False


# stage killed -> (stages taken from the shared clean run, their data folders, the process whose
# presence says the stage is busy, the file the stage writes last)
KILL_POINTS = {
    "features": (("generate", "export", "flatten"), ("synthea", "export", "tables"), "java",
                 lambda exp: exp.data_path("features", None, exp.site_ids[-1]) / "_SUCCESS.json"),
    "train": (("generate", "export", "flatten", "features"), ("synthea", "export", "tables", "features"),
              "worker_binary", lambda exp: exp.report_path() / "results.json"),
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(KILL_POINTS))
def test_reproduce_killed_mid_stage_then_rerun_matches_clean_run(smoke_run, tmp_path: Path, stage: str) -> None:  # noqa: F811
    """SIGKILL the whole `fedlab reproduce` process group while Spark builds features, or while TFF
    trains (the earlier stages are taken from the shared uninterrupted run), rerun, compare outputs;
    no kernel, JVM or TFF worker may outlive the kill."""
    copied, data_dirs, busy_process, last_output = KILL_POINTS[stage]
    exp = smoke_experiment_in(tmp_path)
    _copy_cached_stages(smoke_run.exp, exp, copied, data_dirs)
    assert plan(exp, exp.name, [], None)[0]["action"] == "skip", "the copied stages are not reused"
    marker = f"killed-{os.getpid()}-{time.time_ns()}"
    env = {**os.environ, MARKER: marker}
    command = [sys.executable, "-m", "fedlab.cli", "reproduce", "--config", str(exp.source)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (
            _stage_started(exp, stage) and marked_processes(marker, busy_process)):
        time.sleep(0.1)
    time.sleep(2)  # let the stage get going on the sites' data
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not last_output(exp).exists(), f"the kill did not land inside the {stage} stage"
    assert read_json(exp.report_path() / "stamps.json")[stage].keys() == {"started"}
    leftovers = _wait_until_gone(marker, 30)
    for process in leftovers:
        process.kill()
    assert not leftovers, f"processes outlived the killed run: {[p.info['name'] for p in leftovers]}"

    said = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert said.returncode == 0, said.stderr[-2000:]
    assert f"{stage}: resume" in said.stdout and f"{copied[-1]}: cached" in said.stdout
    for site in exp.site_ids:
        rebuilt = pd.read_parquet(exp.data_path("features", None, site) / "features.parquet")
        pd.testing.assert_frame_equal(rebuilt, smoke_run.features[site])
    assert comparable_results(read_json(exp.report_path() / "results.json")) == smoke_run.results
    assert all(s["action"] == "skip" for s in plan(exp, exp.name, [], None))
    staging = [p.name for p in exp.data_path("features", None).iterdir() if p.name.startswith(".")]
    assert not staging, f"staging folders left behind: {staging}"
    leftovers = _wait_until_gone(marker, 10)
    for process in leftovers:
        process.kill()
    assert not leftovers, f"processes outlived the rerun: {[p.info['name'] for p in leftovers]}"
