"""The one TensorFlow Federated execution-context helper of fedlab.

TFF's local C++ runtime starts a `worker_binary` subprocess that outlives the Python process
unless its execution context is torn down, and it inherits stdout/stderr: anything reading the
pipes of a fedlab process (pytest, papermill, a CI runner) would then wait forever. `init_tff`
therefore registers, once per process, an exit hook that replaces the context and collects the
old one, which stops the worker.

An exit hook does not run when the process is killed (SIGKILL), or when a Jupyter kernel leaves
with `os._exit` because its parent died. For those cases `init_tff` also starts a small reaper
process (`python -m fedlab.tffctx PID`) that watches this process and, once it is gone, kills the
`worker_binary` processes it had started. The reaper holds none of the parent's pipes.
"""

from __future__ import annotations

import atexit
import gc
import os
import random
import subprocess
import sys
import time
from types import ModuleType

_state = {"context_set": False, "hook_registered": False, "reaper": None}
WORKER_NAME = "worker_binary"


def init_tff(seed: int) -> ModuleType:
    """Import TFF, seed Python/NumPy/TensorFlow with `seed`, set the local execution context.

    Safe to call once per training seed: the context is created on the first call only, the
    seeds are reset on every call. Returns the `tensorflow_federated` module.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np

    from fedlab.logs import native_stderr_filtered

    with native_stderr_filtered():  # TensorFlow's CUDA/TensorRT start-up lines on a CPU-only machine
        import tensorflow as tf
        import tensorflow_federated as tff

    random.seed(seed)
    np.random.seed(seed)
    tf.keras.utils.set_random_seed(seed)
    if not _state["context_set"]:
        tf.config.experimental.enable_op_determinism()
        with native_stderr_filtered():
            tff.backends.native.set_sync_local_cpp_execution_context()
        _state["context_set"] = True
    if not _state["hook_registered"]:
        atexit.register(_stop_worker)
        _state["hook_registered"] = True
    if _state["reaper"] is None:
        _state["reaper"] = _start_reaper()
    return tff


def _start_reaper() -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fedlab.tffctx", str(os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
    )


def reap_workers_after(parent_pid: int, poll_seconds: float = 0.5) -> int:
    """Wait for `parent_pid` to end, then kill the TFF workers it started; returns how many."""
    import psutil

    try:
        parent = psutil.Process(parent_pid)
    except psutil.NoSuchProcess:
        return 0
    workers: dict[int, psutil.Process] = {}
    while _alive(parent):
        try:
            for child in parent.children(recursive=True):
                if child.pid not in workers and WORKER_NAME in child.name():
                    workers[child.pid] = child
        except psutil.Error:
            pass
        time.sleep(poll_seconds)
    killed = 0
    for worker in workers.values():
        try:
            if worker.is_running():  # is_running compares start times, so a reused pid is safe
                worker.kill()
                killed += 1
        except psutil.Error:
            continue
    return killed


def _alive(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _stop_worker() -> None:
    """Swap in a fresh (not yet started) context so the running worker's owner is collected."""
    try:
        import tensorflow_federated as tff

        tff.backends.native.set_sync_local_cpp_execution_context()
    finally:
        gc.collect()


if __name__ == "__main__":
    reap_workers_after(int(sys.argv[1]))
