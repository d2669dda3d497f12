"""Generation speed: N patients for one site into a temporary folder; prints JSON, writes reports/bench/.

    python benchmarks/bench_generate.py [N] [--workers W]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedlab.config import experiment_from_dict  # noqa: E402
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


def run(patients: int, workers: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="fedlab-bench-") as tmp:
        exp = experiment_from_dict({
            "name": "bench", "seed": 1,
            "sites": [{"id": "bench", "patients": patients, "seed": 1}],
            "generate": {"workers": workers},
        }, root=Path(tmp))
        started = time.perf_counter()
        folder = generate(exp, progress=False)["bench"]
        seconds = time.perf_counter() - started
        info = read_json(folder / SUCCESS)
        own_rss, child_rss = _peak_rss_mb()
        resources = sum(info["counts"].values())
        return {
            "name": "generate_patients_per_s",
            "value": round(patients / seconds, 1),
            "unit": "patients/s",
            "goal": GOAL_PATIENTS_PER_S,
            "patients": patients,
            "workers": workers,
            "seconds": round(seconds, 2),
            "resources": resources,
            "resources_per_patient": round(resources / patients, 1),
            "output_mb": _folder_mb(folder),
            "peak_rss_mb": own_rss,
            "peak_rss_worker_mb": child_rss,
            "years_of_history": exp.generate.years_of_history,
            "python": platform.python_version(),
            "machine": platform.machine(),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patients", nargs="?", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    result = run(args.patients, args.workers)
    print(json.dumps(result))
    write_json(ROOT / "reports" / "bench" / "generate.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
