"""Flatten runners on Spark: `spark` (rows collected to the driver) against `spark-distributed` (rows
stay on the executors), on the generated 1,000-patient site of `bench_flatten.py`
(`data/synthea/bench_flatten_1000/bench/bulk/`, which must exist: run that benchmark first).

Measures, with `fedlab.flatten.flatten_site` (read + check + flatten + derive + harmonize + write):

- wall time of both runners back-to-back on one Spark session (`spark` first, then
  `spark-distributed`; the anchor is `spark`);
- the driver's peak memory for each runner, each in its own process (a fresh interpreter and Spark
  session): the Python driver's `ru_maxrss` and the peak RSS of the JVM (sampled every 0.2 s; in
  local mode the JVM also runs the executors, so only the Python figure is the driver's alone).

Prints one JSON object and writes `reports/bench/flatten_spark.json`.

    python benchmarks/bench_flatten_spark.py [--bulk PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

from fedlab.io import write_json  # noqa: E402

RUNNERS = ("spark", "spark-distributed")
DEFAULT_BULK = ROOT / "data" / "synthea" / "bench_flatten_1000" / "bench" / "bulk"


def _flatten(spark: Any, bulk: Path, runner: str, work: Path) -> dict[str, Any]:
    from fedlab.flatten import flatten_site
    from fedlab.io import read_json

    out = work / runner
    started = time.perf_counter()
    flatten_site(bulk, out, "bench", "views", spark, runner)  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    success = read_json(out / "_SUCCESS.json")
    shutil.rmtree(out)
    return {"runner": runner, "seconds": round(seconds, 2), "counts": success["counts"],
            "quarantined": success["quarantined"]}


def _jvm_sampler(stop: threading.Event, peak: dict[str, int]) -> None:
    import psutil

    me = psutil.Process()
    while not stop.wait(0.2):
        for child in me.children(recursive=True):
            try:
                if "java" in child.name():
                    peak["jvm"] = max(peak.get("jvm", 0), child.memory_info().rss)
            except psutil.Error:
                pass


def child(bulk: Path, runners: list[str]) -> dict[str, Any]:
    """One process, one session: run `runners` in order; report times and this process's peaks."""
    from fedlab.spark import get_spark

    stop, peak = threading.Event(), {}
    sampler = threading.Thread(target=_jvm_sampler, args=(stop, peak), daemon=True)
    sampler.start()
    spark = get_spark(app_name="bench-flatten-spark")
    with tempfile.TemporaryDirectory(prefix="bench-flatten-spark-") as work:
        runs = [_flatten(spark, bulk, runner, Path(work)) for runner in runners]
    stop.set()
    spark.stop()
    return {"runs": runs, "driver_python_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "jvm_peak_rss_mb": round(peak.get("jvm", 0) / 2**20)}


def _in_process(bulk: Path, runners: list[str]) -> dict[str, Any]:
    command = [sys.executable, __file__, "--bulk", str(bulk), "--child", ",".join(runners)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bulk", type=Path, default=DEFAULT_BULK)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.bulk, args.child.split(","))))
        return
    if not args.bulk.is_dir():
        sys.exit(f"{args.bulk} not found: run benchmarks/bench_flatten.py first")
    observation_lines = sum(1 for _ in (args.bulk / "Observation.ndjson").open("rb"))
    memory = {runner: _in_process(args.bulk, [runner]) for runner in RUNNERS}
    pair = _in_process(args.bulk, list(RUNNERS))
    anchor, value = (run["seconds"] for run in pair["runs"])
    result = {
        "name": "flatten_spark", "unit": "seconds", "value": value, "anchor": "runner spark, same session",
        "anchor_value": anchor, "ratio": round(value / anchor, 2),
        "goal": "spark-distributed keeps table rows off the driver (driver memory flat in the data size)",
        "observation_lines": observation_lines, "same_session": pair["runs"],
        "separate_processes": {runner: {"seconds": m["runs"][0]["seconds"],
                                        "driver_python_peak_rss_mb": m["driver_python_peak_rss_mb"],
                                        "jvm_peak_rss_mb": m["jvm_peak_rss_mb"]} for runner, m in memory.items()},
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }
    write_json(ROOT / "reports" / "bench" / "flatten_spark.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
