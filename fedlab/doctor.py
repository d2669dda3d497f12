"""`fedlab doctor`: check the machine and environment, and say how to fix what is wrong."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

Check = tuple[str, Callable[[], str]]


def check_python() -> str:
    if sys.version_info[:2] != (3, 11):
        raise RuntimeError(f"Python {sys.version.split()[0]}; TensorFlow Federated 0.87 needs 3.11: `make setup`")
    return sys.version.split()[0]


def check_java() -> str:
    java = shutil.which("java")
    if not java:
        raise RuntimeError("java not found; install Java 17 (Debian: apt-get install openjdk-17-jre-headless)")
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    first = out.splitlines()[0] if out else "unknown"
    if '"17' not in first and '"21' not in first:
        raise RuntimeError(f"{first}: Spark 3.5 here is tested with Java 17")
    return first


def check_spark() -> str:
    from fedlab.spark import get_spark

    spark = get_spark(app_name="fedlab-doctor")
    try:
        total = spark.range(1000).selectExpr("sum(id) as s").collect()[0]["s"]
    finally:
        spark.stop()
    if total != 499500:
        raise RuntimeError(f"Spark computed {total}, expected 499500")
    return f"Spark {spark.version} ran a job"


def check_tff() -> str:
    import numpy as np

    from fedlab.tffctx import init_tff

    tff = init_tff(0)

    @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
    def total(values):
        return tff.federated_sum(values)

    result = total([1.0, 2.0, 3.5])
    if abs(float(result) - 6.5) > 1e-6:
        raise RuntimeError(f"TFF federated_sum gave {result}, expected 6.5")
    return f"TFF {tff.__version__} ran a federated sum"


def check_kernel() -> str:
    from jupyter_client.kernelspec import KernelSpecManager

    specs = KernelSpecManager().find_kernel_specs()
    if "python3" not in specs:
        raise RuntimeError("no `python3` Jupyter kernel: run `make setup`")
    return specs["python3"]


def check_disk() -> str:
    free = shutil.disk_usage(Path.cwd()).free / 2**30
    if free < 5:
        raise RuntimeError(f"only {free:.1f} GiB free here; the paper configuration needs ~5 GiB")
    return f"{free:.0f} GiB free"


def check_memory() -> str:
    import psutil

    total = psutil.virtual_memory().total / 2**30
    if total < 4:
        raise RuntimeError(f"{total:.1f} GiB of memory; Spark + TensorFlow need at least 4 GiB")
    return f"{total:.0f} GiB"


CHECKS: list[Check] = [("python", check_python), ("java", check_java), ("memory", check_memory),
                       ("disk", check_disk), ("jupyter kernel", check_kernel), ("spark", check_spark),
                       ("tff", check_tff)]


def run_doctor(checks: list[Check] | None = None) -> bool:
    ok = True
    for name, check in checks or CHECKS:
        try:
            print(f"  ok   {name}: {check()}")
        except Exception as err:  # noqa: BLE001 - every failure is reported, none stops the others
            ok = False
            print(f"  FAIL {name}: {err}")
    return ok
