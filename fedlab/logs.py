"""Quiet by default, loud in the log.

TensorFlow, Spark and the Jupyter kernel print start-up lines that look alarming and mean
nothing on a CPU-only laptop (no CUDA, no TensorRT, no native Hadoop library, a loopback
hostname, a kernel on local TCP). They are known and harmless: fedlab keeps them out of the
terminal and the executed notebooks and writes them to the run's log folder instead
(`reports/<run>/logs/`, or `$FEDLAB_LOG_DIR`). Anything not on the list below is shown as usual.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

LOG_DIR_ENV = "FEDLAB_LOG_DIR"
NOISE_LOG = "noise.log"

# Each pattern names a line that is expected on a CPU-only machine and says nothing about the run.
HARMLESS = tuple(re.compile(pattern) for pattern in (
    r"Unable to register cu(DNN|FFT|BLAS) factory: Attempting to register factory",
    r"cudart_stub\.cc.*Could not find cuda drivers on your machine",
    r"cpu_feature_guard\.cc.*This TensorFlow binary is optimized to use available CPU instructions",
    r"^To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags",
    r"TF-TRT Warning: Could not find TensorRT",
    r"oneDNN custom operations are on\. You may see slightly different numerical results",
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"WARN Utils: Your hostname, .* resolves to a loopback address",
    r"WARN Utils: Set SPARK_LOCAL_IP if you need to bind to another address",
    r"WARN NativeCodeLoader: Unable to load native-hadoop library for your platform",
    r'^Setting default log level to "WARN"\.',
    r"^To adjust logging level use sc\.setLogLevel\(newLevel\)",
    r"Kernel is running over TCP without encryption",
))


def is_harmless(line: str) -> bool:
    return any(pattern.search(line) for pattern in HARMLESS)


def split_harmless(text: str) -> tuple[str, str]:
    """(the text without the known-harmless lines, those lines), both keeping their newlines."""
    kept, harmless = [], []
    for line in text.splitlines(keepends=True):
        (harmless if is_harmless(line) else kept).append(line)
    return "".join(kept), "".join(harmless)


def log_dir() -> Path:
    """The current run's log folder (`$FEDLAB_LOG_DIR`), else one in the temporary directory."""
    folder = os.environ.get(LOG_DIR_ENV)
    path = Path(folder) if folder else Path(tempfile.gettempdir()) / f"fedlab-logs-{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def append(path: Path, text: str) -> None:
    if text:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(text if text.endswith("\n") else text + "\n")


@contextlib.contextmanager
def native_stderr_filtered() -> Iterator[None]:
    """Route what native code writes to stderr inside the block (TensorFlow's C++ start-up lines)
    through the filter: harmless lines to the log folder, the rest back to stderr."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2: nothing to filter
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept, harmless = split_harmless(capture.read().decode("utf-8", errors="replace"))
            append(log_dir() / NOISE_LOG, harmless)
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def spark_java_options() -> str:
    """JVM options that give Spark fedlab's logging: warnings to `spark.log`, errors to the console."""
    config = Path(__file__).resolve().parent / "resources" / "spark-log4j2.properties"
    return f'-Dlog4j2.configurationFile="file:{config}" -Dfedlab.logdir="{log_dir()}"'
