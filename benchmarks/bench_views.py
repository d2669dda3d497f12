"""Throughput of the observation ViewDefinition vs fhiry's Fhirndjson, measured in the same run.

Synthesizes N realistic Observations (vital signs, labs, blood-pressure panels with systolic and
diastolic components, some coded values) as NDJSON, times the pure-Python runner over all N lines
(JSON parsing included) and fhiry's `Fhirndjson` over a 1,000-line slice of the same file, and
reports both measured rates and their ratio (nothing is extrapolated).

    python benchmarks/bench_views.py [--n 20000] [--fhiry-lines 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedlab.io import write_json  # noqa: E402
from fedlab.views import load_definitions, run_view  # noqa: E402

QUANTITIES = [  # (loinc, display, unit, low, high)
    ("8302-2", "Body Height", "cm", 150, 195),
    ("29463-7", "Body Weight", "kg", 45, 120),
    ("39156-5", "Body Mass Index", "kg/m2", 18, 40),
    ("8867-4", "Heart rate", "/min", 50, 110),
    ("9279-1", "Respiratory rate", "/min", 12, 22),
    ("2339-0", "Glucose", "mg/dL", 65, 250),
    ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", 4.5, 11),
    ("2093-3", "Total Cholesterol", "mg/dL", 140, 280),
    ("38483-4", "Creatinine", "mg/dL", 0.5, 2.0),
]


def synthesize(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    patients = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(max(1, n // 50))]
    resources = []
    for index in range(n):
        patient = rng.choice(patients)
        observation = {
            "resourceType": "Observation",
            "id": str(uuid.UUID(int=rng.getrandbits(128))),
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "vital-signs"}]}],  # fmt: skip
            "subject": {"reference": f"Patient/{patient}"},
            "encounter": {"reference": f"Encounter/{uuid.UUID(int=rng.getrandbits(128))}"},
            "effectiveDateTime": f"20{rng.randint(10, 23)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}T08:30:00-05:00",
            "issued": "2020-01-01T08:30:00.000-05:00",
        }
        kind = index % 10
        if kind == 0:
            observation["code"] = _code("85354-9", "Blood pressure panel")
            observation["component"] = [
                {"code": _code("8480-6", "Systolic Blood Pressure"), "valueQuantity": _quantity(rng.uniform(95, 170), "mm[Hg]")},
                {"code": _code("8462-4", "Diastolic Blood Pressure"), "valueQuantity": _quantity(rng.uniform(55, 105), "mm[Hg]")},
            ]  # fmt: skip
        elif kind == 1:
            observation["code"] = _code("72166-2", "Tobacco smoking status")
            observation["valueCodeableConcept"] = {"coding": [{"system": "http://snomed.info/sct",
                                                              "code": "266919005", "display": "Never smoker"}]}  # fmt: skip
        else:
            loinc, display, unit, low, high = rng.choice(QUANTITIES)
            observation["code"] = _code(loinc, display)
            observation["valueQuantity"] = _quantity(rng.uniform(low, high), unit)
        resources.append(observation)
    return resources


def _code(loinc: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": "http://loinc.org", "code": loinc, "display": display}], "text": display}


def _quantity(value: float, unit: str) -> dict[str, Any]:
    return {"value": round(value, 2), "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}


def time_views(path: Path) -> tuple[int, float]:
    view = load_definitions()["observation"]
    started = time.perf_counter()
    with path.open(encoding="utf-8") as handle:
        rows = run_view(view, (json.loads(line) for line in handle if line.strip()))
    return len(rows), time.perf_counter() - started


def time_fhiry(path: Path, lines: int, workdir: Path) -> tuple[int, float]:
    os.environ.setdefault("TQDM_DISABLE", "1")
    from fhiry.fhirndjson import Fhirndjson

    folder = workdir / "fhiry_slice"
    folder.mkdir()
    with path.open(encoding="utf-8") as source:
        (folder / "Observation.ndjson").write_text("".join(source.readline() for _ in range(lines)), encoding="utf-8")
    reader = Fhirndjson()
    reader.folder = str(folder)
    started = time.perf_counter()
    reader.process_source()
    elapsed = time.perf_counter() - started
    return len(reader.df), elapsed


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--fhiry-lines", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "views.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_views_") as tmp:
        workdir = Path(tmp)
        ndjson = workdir / "Observation.ndjson"
        ndjson.write_text("".join(json.dumps(r) + "\n" for r in synthesize(args.n, args.seed)), encoding="utf-8")
        view_rows, view_seconds = time_views(ndjson)
        fhiry_rows, fhiry_seconds = time_fhiry(ndjson, min(args.fhiry_lines, args.n), workdir)
    views_rate = view_rows / view_seconds
    fhiry_rate = fhiry_rows / fhiry_seconds
    result = {
        "name": "views_rows_per_s",
        "value": round(views_rate, 1),
        "unit": "rows/s",
        "goal": "ratio >= 300 vs Fhirndjson",
        "anchor": "fhiry_Fhirndjson",
        "anchor_value": round(fhiry_rate, 1),
        "ratio": round(views_rate / fhiry_rate, 2),
        "details": {
            "resources": args.n, "view_rows": view_rows, "view_seconds": round(view_seconds, 3),
            "fhiry_lines": min(args.fhiry_lines, args.n), "fhiry_rows": fhiry_rows,
            "fhiry_seconds": round(fhiry_seconds, 3), "seed": args.seed,
        },  # fmt: skip
    }
    print(json.dumps(result))
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
