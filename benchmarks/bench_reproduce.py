"""Time `fedlab reproduce` on the quickstart config, cold (nothing cached) and warm (all cached).

Goal: warm under 15 s on 2 cores. Prints JSON and writes reports/bench/reproduce.json.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from fedlab.config import load_experiment
from fedlab.io import write_json
from fedlab.pipeline import reproduce

ROOT = Path(__file__).resolve().parents[1]
RUN = "bench-reproduce"


def main(config: str = "configs/quickstart.yaml") -> dict:
    exp = load_experiment(ROOT / config)
    for stage in ("synthea", "export", "tables", "features"):
        shutil.rmtree(exp.data_path(stage, RUN), ignore_errors=True)
    shutil.rmtree(exp.report_path(RUN), ignore_errors=True)
    started = time.perf_counter()
    reproduce(ROOT / config, run=RUN, echo=lambda _: None)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    reproduce(ROOT / config, run=RUN, echo=lambda _: None)
    warm = time.perf_counter() - started
    result = {"name": "reproduce_warm_seconds", "value": round(warm, 2), "unit": "s", "goal": 15,
              "anchor": "reproduce_cold_seconds", "anchor_value": round(cold, 2), "ratio": round(warm / cold, 4),
              "config": config, "patients": sum(s.patients for s in exp.sites)}
    write_json(ROOT / "reports" / "bench" / "reproduce.json", result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(*sys.argv[1:])
