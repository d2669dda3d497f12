"""Generation speed and memory per engine; prints JSON lines, writes reports/bench/generate.json.

    python benchmarks/bench_generate.py [--patients 1000] [--large 10000] [--workers 2] [--engines gmf python]

Each run is a fresh process (so peak RSS belongs to that run alone) that generates one site into a
temporary folder: bundles plus bulk NDJSON, as `fedlab generate` does. Reported per engine:
patients/s for `--patients`; for the default engine also peak RSS for `--large` patients.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedlab.config import GenerateConfig, experiment_from_dict  # noqa: E402
from fedlab.io import SUCCESS, read_json, write_json  # noqa: E402
from fedlab.synthea import generate  # noqa: E402

GOAL_PATIENTS_PER_S = 50


def _peak_rss_mb() -> tuple[float, float]:
    """(this process, largest finished child) peak resident set size in MiB (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return round(own, 1), round(children, 1)


def _folder_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20, 1)


def run(patients: int, workers: int, engine: str) -> dict[str, object]:
    """One generation run in this process."""
    with tempfile.TemporaryDirectory(prefix="fedlab-bench-") as tmp:
        exp = experiment_from_dict({
            "name": "bench", "seed": 1,
            "sites": [{"id": "bench", "patients": patients, "seed": 1}],
            "generate": {"workers": workers, "engine": engine},
        }, root=Path(tmp))
        started = time.perf_counter()
        folder = generate(exp, progress=False)["bench"]
        seconds = time.perf_counter() - started
        info = read_json(folder / SUCCESS)
        own_rss, child_rss = _peak_rss_mb()
        resources = sum(info["counts"].values())
        return {
            "name": "generate_patients_per_s", "engine": engine,
            "value": round(patients / seconds, 1), "unit": "patients/s", "goal": GOAL_PATIENTS_PER_S,
            "patients": patients, "workers": workers, "seconds": round(seconds, 2),
            "resources": resources, "resources_per_patient": round(resources / patients, 1),
            "output_mb": _folder_mb(folder), "peak_rss_mb": own_rss, "peak_rss_worker_mb": child_rss,
            "years_of_history": exp.generate.years_of_history,
            "python": platform.python_version(), "machine": platform.machine(),
        }


def _in_child(patients: int, workers: int, engine: str) -> dict[str, object]:
    command = [sys.executable, __file__, "--single", "--patients", str(patients), "--workers", str(workers),
               "--engines", engine]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--large", type=int, default=10_000, help="patients for the memory run (0: skip)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--engines", nargs="+", default=["gmf", "python"])
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)  # one run, this process
    args = parser.parse_args(argv)
    if args.single:
        print(json.dumps(run(args.patients, args.workers, args.engines[0])))
        return 0
    default_engine = GenerateConfig().engine
    results = []
    for engine in args.engines:
        results.append(_in_child(args.patients, args.workers, engine))
        print(json.dumps(results[-1]), flush=True)
    if args.large:
        results.append(_in_child(args.large, args.workers, default_engine))
        print(json.dumps(results[-1]), flush=True)
    write_json(ROOT / "reports" / "bench" / "generate.json",
               {"default_engine": default_engine, "goal_patients_per_s": GOAL_PATIENTS_PER_S, "runs": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
