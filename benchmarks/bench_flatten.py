"""Flattening throughput of both engines on a generated 1,000-patient site, against fhiry's own readers.

Generates (or reuses, when complete and made from the same settings) `data/synthea/bench_flatten_1000/`
with `fedlab.synthea.generate`, then measures in one run:

- each engine (`views`, `fhiry`) flattening the site's whole `bulk/Observation.ndjson` with
  `fedlab.flatten.flatten_ndjson` (read + check + flatten + derive + pint harmonization, no Parquet write);
- fhiry's `Fhirndjson.process_file` on the first `--anchor-lines` lines of the same file;
- fhiry's bundle path, `Fhiry().process_file`, on the first `--anchor-bundle-lines` lines of the same file
  grouped into per-patient collection bundles (and, for reference only, on the site's first
  `--anchor-bundles` per-patient bundles, which hold every resource type).

Rates are table rows per second (fhiry: rows of its DataFrame, one per resource), all measured, nothing
extrapolated. Beside them, the cost of flattening against the cost of parsing alone: the views engine
over every NDJSON file of the quickstart's largest site (`configs/quickstart.yaml`, site `general`,
generated when missing), as a multiple of the time `orjson.loads` takes to parse the same lines (goal:
3x or less). Prints one JSON object with a `comparisons` list and writes `reports/bench/flatten.json`.

    python benchmarks/bench_flatten.py [--patients 1000] [--anchor-lines 1000] [--anchor-bundle-lines 10000]
        [--repeat 3]

Every measurement (engines and anchors alike) runs `--repeat` times, interleaved, and the best run
counts (as `timeit` does): on a shared machine the best run is the one least disturbed; `runs`
lists every rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

from fedlab.config import experiment_from_dict  # noqa: E402
from fedlab.flatten import flatten_ndjson  # noqa: E402
from fedlab.io import write_json  # noqa: E402

SITE = "bench"


def site_folder(patients: int) -> Path:
    from fedlab.synthea import generate

    exp = experiment_from_dict({"name": f"bench_flatten_{patients}",
                                "sites": [{"id": SITE, "patients": patients, "seed": 1}]}, root=ROOT)
    return generate(exp, None, sites=[SITE], progress=False)[SITE]  # skipped when already complete


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest run, with every run's rate alongside."""
    fastest = max(runs, key=lambda run: run["rows_per_s"])
    return {**fastest, "runs": [round(run["rows_per_s"], 1) for run in runs]}


def engine_rate(path: Path, engine: str) -> dict[str, Any]:
    started = time.perf_counter()
    result = flatten_ndjson([path], engine=engine)
    seconds = time.perf_counter() - started
    rows = len(result.tables["observation"])
    lines = result.harmonization()["reconciliation"]["lines"]
    return {"rows": rows, "lines": lines, "seconds": round(seconds, 3), "rows_per_s": rows / seconds}


def fhirndjson_rate(path: Path, lines: int, workdir: Path) -> dict[str, Any]:
    from fhiry.fhirndjson import Fhirndjson

    folder = workdir / "ndjson_slice"
    folder.mkdir(exist_ok=True)
    with path.open(encoding="utf-8") as source:
        (folder / path.name).write_text("".join(source.readline() for _ in range(lines)), encoding="utf-8")
    reader = Fhirndjson()
    reader.folder = str(folder)
    started = time.perf_counter()
    frame = reader.process_file(path.name)
    seconds = time.perf_counter() - started
    return {"rows": len(frame), "lines": lines, "seconds": round(seconds, 3), "rows_per_s": len(frame) / seconds}


def fhiry_bundle_rate(bundles: list[Path]) -> dict[str, Any]:
    import fhiry

    rows = 0
    started = time.perf_counter()
    for bundle in bundles:
        rows += len(fhiry.Fhiry().process_file(str(bundle)))
    seconds = time.perf_counter() - started
    return {"rows": rows, "bundles": len(bundles), "seconds": round(seconds, 3), "rows_per_s": rows / seconds}


def observation_bundles(path: Path, lines: int, workdir: Path) -> list[Path]:
    """The first `lines` Observations of the same NDJSON file as per-patient collection bundles, so
    fhiry's bundle path reads the same resources as the engines (not other resource types)."""
    by_patient: dict[str, list[dict[str, Any]]] = {}
    with path.open(encoding="utf-8") as source:
        for _, line in zip(range(lines), source, strict=False):
            resource = json.loads(line)
            by_patient.setdefault(resource["subject"]["reference"], []).append(resource)
    folder = workdir / "observation_bundles"
    folder.mkdir()
    paths = []
    for index, resources in enumerate(by_patient.values()):
        bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}
        paths.append(folder / f"bundle{index:05d}.json")
        paths[-1].write_text(json.dumps(bundle), encoding="utf-8")
    return paths


def quickstart_site() -> Path:
    """The quickstart's largest site (`general`), generated as `fedlab generate` would."""
    from fedlab.config import load_experiment
    from fedlab.synthea import generate

    exp = load_experiment(ROOT / "configs" / "quickstart.yaml")
    return generate(exp, None, sites=["general"], progress=False)["general"]  # skipped when already complete


def timed(work: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


def orjson_parse(paths: list[Path]) -> int:
    count = 0
    for path in paths:
        with path.open("rb") as handle:
            for line in handle:
                orjson.loads(line)
                count += 1
    return count


def parse_ratio(paths: list[Path], repeat: int) -> dict[str, Any]:
    """Flattening (views engine) vs parsing alone, on the same lines: best of `repeat` interleaved runs."""
    lines = orjson_parse(paths)
    runs: dict[str, list[tuple[float, float]]] = {"orjson": [], "flatten": []}
    for _ in range(repeat):
        runs["orjson"].append(timed(lambda: orjson_parse(paths)))
        runs["flatten"].append(timed(lambda: flatten_ndjson(paths, engine="views")))
    best = {name: (min(w for w, _ in values), min(c for _, c in values)) for name, values in runs.items()}
    return {"lines": lines, "files": [p.name for p in paths],
            "orjson_seconds": round(best["orjson"][0], 4), "flatten_seconds": round(best["flatten"][0], 4),
            "ratio": round(best["flatten"][0] / best["orjson"][0], 2),
            "cpu": {"orjson_seconds": round(best["orjson"][1], 4), "flatten_seconds": round(best["flatten"][1], 4),
                    "ratio": round(best["flatten"][1] / best["orjson"][1], 2)},
            "runs": {name: [round(w, 4) for w, _ in values] for name, values in runs.items()}}


def comparison(name: str, value: dict[str, Any], goal: float, anchor: str, anchor_value: dict[str, Any]) -> dict:
    return {"name": name, "value": round(value["rows_per_s"], 1), "unit": "rows/s", "goal": f"ratio >= {goal:g}",
            "anchor": anchor, "anchor_value": round(anchor_value["rows_per_s"], 2),
            "ratio": round(value["rows_per_s"] / anchor_value["rows_per_s"], 1),
            "met": value["rows_per_s"] / anchor_value["rows_per_s"] >= goal}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--anchor-lines", type=int, default=1000)
    parser.add_argument("--anchor-bundles", type=int, default=20)
    parser.add_argument("--anchor-bundle-lines", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "flatten.json")
    args = parser.parse_args(argv)
    folder = site_folder(args.patients)
    observations = folder / "bulk" / "Observation.ndjson"
    with tempfile.TemporaryDirectory(prefix="bench_flatten_") as tmp:
        bundles = observation_bundles(observations, args.anchor_bundle_lines, Path(tmp))
        measures = {"views": lambda: engine_rate(observations, "views"),
                    "fhiry": lambda: engine_rate(observations, "fhiry"),
                    "fhirndjson": lambda: fhirndjson_rate(observations, args.anchor_lines, Path(tmp)),
                    "fhiry_bundles": lambda: fhiry_bundle_rate(bundles)}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in measures}
        for _ in range(args.repeat):
            for name, measure in measures.items():
                runs[name].append(measure())
    views, fhiry_engine, ndjson_anchor, bundle_anchor = (best(runs[name]) for name in measures)
    quickstart = sorted((quickstart_site() / "bulk").glob("*.ndjson"))
    parsing = parse_ratio(quickstart, args.repeat)
    site_bundles = fhiry_bundle_rate(sorted((folder / "fhir").glob("*.json"))[:args.anchor_bundles])
    ndjson_name = (f"fhiry.Fhirndjson.process_file, first {ndjson_anchor['lines']} lines of the same file "
                   "(a prefix: its reader is quadratic, so the full file would give it a lower rate)")
    bundle_name = (f"fhiry.Fhiry().process_file over the first {args.anchor_bundle_lines} lines of the same file, "
                   f"as {bundle_anchor['bundles']} per-patient collection bundles")
    result = {
        "name": "flatten_observation_ndjson",
        "comparisons": [
            comparison("flatten_views_vs_fhirndjson", views, 300, ndjson_name, ndjson_anchor),
            comparison("flatten_views_vs_fhiry_bundles", views, 5, bundle_name, bundle_anchor),
            comparison("flatten_fhiry_vs_fhirndjson", fhiry_engine, 20, ndjson_name, ndjson_anchor),
            comparison("flatten_fhiry_vs_fhiry_bundles", fhiry_engine, 5, bundle_name, bundle_anchor),
            {"name": "flatten_views_vs_orjson_parse", "value": parsing["flatten_seconds"], "unit": "s",
             "goal": "ratio <= 3", "anchor": f"orjson.loads of the same {parsing['lines']} lines "
                                             "(the quickstart's largest site, every NDJSON file)",
             "anchor_value": parsing["orjson_seconds"], "ratio": parsing["ratio"], "met": parsing["ratio"] <= 3},
        ],
        "details": {"site": str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else str(folder),
                    "patients": args.patients, "views": views, "fhiry": fhiry_engine,
                    "fhirndjson": ndjson_anchor, "fhiry_bundles": bundle_anchor, "parse_ratio": parsing,
                    "fhiry_site_bundles": {**site_bundles, "what": "fhiry.Fhiry().process_file over the first "
                                           f"{site_bundles['bundles']} per-patient bundles of the site "
                                           "(all resource types; for reference, not a goal anchor)"},
                    "includes": "read + check + flatten + derive + pint harmonization (no Parquet write)",
                    "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                "load_average": list(os.getloadavg())}},
    }
    print(json.dumps(result, indent=2))
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
