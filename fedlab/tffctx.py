"""The one TensorFlow Federated execution-context helper of fedlab.

TFF's local C++ runtime starts a `worker_binary` subprocess that outlives the Python process
unless its execution context is torn down, and it inherits stdout/stderr: anything reading the
pipes of a fedlab process (pytest, papermill, a CI runner) would then wait forever. `init_tff`
therefore registers, once per process, an exit hook that replaces the context and collects the
old one, which stops the worker.
"""

from __future__ import annotations

import atexit
import gc
import os
import random
from types import ModuleType

_state = {"context_set": False, "hook_registered": False}


def init_tff(seed: int) -> ModuleType:
    """Import TFF, seed Python/NumPy/TensorFlow with `seed`, set the local execution context.

    Safe to call once per training seed: the context is created on the first call only, the
    seeds are reset on every call. Returns the `tensorflow_federated` module.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf
    import tensorflow_federated as tff

    random.seed(seed)
    np.random.seed(seed)
    tf.keras.utils.set_random_seed(seed)
    if not _state["context_set"]:
        tf.config.experimental.enable_op_determinism()
        tff.backends.native.set_sync_local_cpp_execution_context()
        _state["context_set"] = True
    if not _state["hook_registered"]:
        atexit.register(_stop_worker)
        _state["hook_registered"] = True
    return tff


def _stop_worker() -> None:
    """Swap in a fresh (not yet started) context so the running worker's owner is collected."""
    try:
        import tensorflow_federated as tff

        tff.backends.native.set_sync_local_cpp_execution_context()
    finally:
        gc.collect()
