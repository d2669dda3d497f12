"""Flattening throughput: fedlab's chunked fhiry path vs fhiry's own NDJSON reader.

Synthesizes an Observation NDJSON of N resources (vitals, BP panels, glucose in mmol/L, HbA1c,
an unmapped LOINC), flattens all of it with `fedlab.flatten.flatten_ndjson` (fhiry
`process_bundle_dict` over 2,000-resource chunks + harmonization) and, as the anchor, the first
`--anchor-lines` lines with `fhiry.Fhirndjson` (one `json_normalize` + concat per line). Both rates
are measured; nothing is extrapolated. Prints one JSON object and writes `reports/bench/flatten.json`.

    python benchmarks/bench_flatten.py [--resources 20000] [--anchor-lines 1000]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedlab.flatten import flatten_ndjson  # noqa: E402
from fedlab.io import write_json  # noqa: E402

LOINC = "http://loinc.org"


def _quantity(value: float, unit: str) -> dict:
    return {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}


def observation(i: int, rng: random.Random) -> dict:
    kind = i % 5
    res = {"resourceType": "Observation", "id": f"obs-{i}", "status": "final",
           "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                     "code": "vital-signs"}]}],
           "subject": {"reference": f"Patient/p{i // 50}"}, "encounter": {"reference": f"Encounter/e{i // 10}"},
           "effectiveDateTime": f"20{10 + i % 14:02d}-0{1 + i % 9}-1{i % 10}T08:30:00-05:00"}
    if kind == 0:
        res["code"] = {"coding": [{"system": LOINC, "code": "85354-9", "display": "Blood pressure panel"}]}
        res["component"] = [
            {"code": {"coding": [{"system": LOINC, "code": "8480-6"}]}, "valueQuantity": _quantity(rng.gauss(125, 15), "mm[Hg]")},
            {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]}, "valueQuantity": _quantity(rng.gauss(80, 10), "mm[Hg]")},
        ]
        return res
    code, value, unit = [("39156-5", rng.gauss(28, 5), "kg/m2"), ("15074-8", rng.gauss(5.5, 1), "mmol/L"),
                         ("4548-4", rng.gauss(5.6, 0.6), "%"), ("72514-3", rng.uniform(0, 10), "{score}")][kind - 1]
    res["code"] = {"coding": [{"system": LOINC, "code": code}]}
    res["valueQuantity"] = _quantity(value, unit)
    return res


def synthesize(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            handle.write(json.dumps(observation(i, rng)) + "\n")


def fedlab_rate(path: Path) -> tuple[float, int, int]:
    started = time.perf_counter()
    result = flatten_ndjson([path])
    seconds = time.perf_counter() - started
    lines = result.harmonization()["reconciliation"]["lines"]
    return seconds, lines, len(result.tables["observation"])


def fhirndjson_rate(folder: Path, name: str) -> tuple[float, int]:
    import fhiry

    reader = fhiry.Fhirndjson()
    reader.folder = str(folder)
    started = time.perf_counter()
    frame = reader.process_file(name)
    return time.perf_counter() - started, len(frame)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resources", type=int, default=20000)
    parser.add_argument("--anchor-lines", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        full = folder / "Observation.ndjson"
        synthesize(full, args.resources)
        anchor_dir = folder / "anchor"
        anchor_dir.mkdir()
        with open(full, encoding="utf-8") as src:
            head = [next(src) for _ in range(min(args.anchor_lines, args.resources))]
        (anchor_dir / "Observation.ndjson").write_text("".join(head), encoding="utf-8")
        seconds, lines, rows = fedlab_rate(full)
        anchor_seconds, anchor_rows = fhirndjson_rate(anchor_dir, "Observation.ndjson")
    value = lines / seconds
    anchor_value = len(head) / anchor_seconds
    result = {
        "name": "flatten",
        "value": round(value, 1),
        "unit": "resources/s",
        "goal": "fedlab's fhiry path at least 20x fhiry.Fhirndjson on the same lines",
        "anchor": f"fhiry.Fhirndjson.process_file on the first {len(head)} lines of the same file",
        "anchor_value": round(anchor_value, 1),
        "ratio": round(value / anchor_value, 1),
        "resources": lines,
        "table_rows": rows,
        "seconds": round(seconds, 3),
        "anchor_lines": len(head),
        "anchor_rows": anchor_rows,
        "anchor_seconds": round(anchor_seconds, 3),
        "includes": "read + check + fhiry + table derivation + pint harmonization (no Parquet write)",
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
    }
    print(json.dumps(result, indent=2))
    write_json(ROOT / "reports" / "bench" / "flatten.json", result)


if __name__ == "__main__":
    main()
