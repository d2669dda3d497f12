"""fedlab.tffctx: a TFF process exits, closes its pipes and leaves no worker_binary behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

SCRIPT = Path(__file__).resolve().parent / "scripts" / "tff_one_round.py"
ROOT = SCRIPT.parents[2]


def _workers_of(child_pid: int, session_id: int) -> list[psutil.Process]:
    """worker_binary processes descended from the child or sharing its session."""
    found = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            if "worker_binary" not in " ".join(proc.info["cmdline"] or []) + (proc.info["name"] or ""):
                continue
            ancestors = {p.pid for p in proc.parents()}
            if child_pid in ancestors or os.getsid(proc.pid) == session_id:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            continue
    return found


def test_one_round_process_exits_and_closes_its_pipes() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen(
        [sys.executable, str(SCRIPT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=env,
        cwd=ROOT,
    )
    session_id = child.pid  # start_new_session makes the child a session (and group) leader
    try:
        stdout, stderr = child.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        leftovers = _workers_of(child.pid, session_id)
        os.killpg(session_id, signal.SIGKILL)
        for proc in leftovers:
            proc.kill()
        child.communicate()
        pytest.fail("the TFF child did not close its pipes within 180 s (worker_binary kept them open?)")
    assert child.returncode == 0, stderr.decode(errors="replace")[-3000:]
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    assert result["pid"] == child.pid
    assert len(result["loss"]) == 1 and result["loss"][0] > 0
    time.sleep(0.5)
    leftovers = _workers_of(child.pid, session_id)
    for proc in leftovers:
        proc.kill()
    assert not leftovers, f"worker_binary outlived its parent: {[p.pid for p in leftovers]}"


def test_init_tff_registers_the_exit_hook_once() -> None:
    from fedlab import tffctx

    tff = tffctx.init_tff(3)
    tffctx.init_tff(4)
    assert tff.__name__ == "tensorflow_federated"
    assert tffctx._state["context_set"] and tffctx._state["hook_registered"]
    assert tffctx._state["reaper"].poll() is None  # one reaper, watching this process


def test_a_killed_tff_process_leaves_no_worker_behind() -> None:
    """SIGKILL skips exit hooks: the reaper started by init_tff stops the orphaned worker_binary."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, str(SCRIPT), "--linger"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, start_new_session=True, env=env, cwd=ROOT)
    try:
        assert json.loads(child.stdout.readline())["pid"] == child.pid  # the round ran
        workers = [p for p in psutil.Process(child.pid).children(recursive=True) if "worker_binary" in p.name()]
        assert workers, "no worker_binary was running to test with"
        child.kill()
        child.wait(timeout=30)
        _, alive = psutil.wait_procs(workers, timeout=20)
    finally:
        child.stdout.close()
        if _group_alive(child.pid):
            os.killpg(child.pid, signal.SIGKILL)
    for proc in alive:
        proc.kill()
    assert not alive, f"worker_binary outlived its killed parent: {[p.pid for p in alive]}"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
