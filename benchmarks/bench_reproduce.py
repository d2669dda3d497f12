"""Time `fedlab reproduce` on the quickstart config, cold (nothing cached) and warm (all cached).

Goal: warm under 15 s on 2 cores. With `--parallel N`, also a second cold run with the sites of
generate, export and flatten in N processes, reported as a ratio to the serial cold run (same
machine, same moment). Each run uses its own run name, so nothing of one is reused by another.
Prints JSON and writes reports/bench/reproduce.json.

    python benchmarks/bench_reproduce.py [--config configs/quickstart.yaml] [--parallel 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from fedlab.config import Experiment, load_experiment
from fedlab.io import write_json
from fedlab.pipeline import reproduce

ROOT = Path(__file__).resolve().parents[1]
RUN = "bench-reproduce"


def _clear(exp: Experiment, run: str) -> None:
    for stage in ("synthea", "export", "tables", "features"):
        shutil.rmtree(exp.data_path(stage, run), ignore_errors=True)
    shutil.rmtree(exp.report_path(run), ignore_errors=True)


def _timed(config: Path, run: str, parallel: int = 1) -> tuple[float, dict[str, float]]:
    """Seconds of one `reproduce`, and the seconds of each stage it ran (from its own log)."""
    stages: dict[str, float] = {}

    def note(line: str) -> None:
        if ": done in " in line:
            name, seconds = line.removeprefix("[fedlab reproduce] ").split(": done in ")
            stages[name] = float(seconds.removesuffix(" s"))

    started = time.perf_counter()
    reproduce(config, run=run, echo=note, parallel=parallel)
    return round(time.perf_counter() - started, 2), stages


def main(config: str = "configs/quickstart.yaml", parallel: int = 0) -> dict[str, Any]:
    path = ROOT / config
    exp = load_experiment(path)
    _clear(exp, RUN)
    load_before = os.getloadavg()
    cold, cold_stages = _timed(path, RUN)
    warm, _ = _timed(path, RUN)
    result: dict[str, Any] = {
        "name": "reproduce_warm_seconds", "value": warm, "unit": "s", "goal": 15,
        "anchor": "reproduce_cold_seconds", "anchor_value": cold, "ratio": round(warm / cold, 4),
        "cold_stage_seconds": cold_stages, "config": config, "patients": sum(s.patients for s in exp.sites),
    }
    if parallel > 1:
        run = f"{RUN}-parallel{parallel}"
        _clear(exp, run)
        parallel_cold, parallel_stages = _timed(path, run, parallel)
        result["parallel"] = {
            "workers_requested": parallel, "cold_seconds": parallel_cold, "serial_cold_seconds": cold,
            "ratio_parallel_to_serial": round(parallel_cold / cold, 4), "cold_stage_seconds": parallel_stages,
            "stage_ratios": {s: round(parallel_stages[s] / cold_stages[s], 4)
                             for s in ("generate", "export", "flatten") if s in parallel_stages},
        }
        _clear(exp, run)
    result["load_average"] = {"before": [round(x, 2) for x in load_before],
                              "after": [round(x, 2) for x in os.getloadavg()]}
    write_json(ROOT / "reports" / "bench" / "reproduce.json", result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--parallel", type=int, default=0, metavar="N",
                        help="also time a cold run with --parallel N and report its ratio to the serial one")
    args = parser.parse_args()
    main(args.config, args.parallel)
