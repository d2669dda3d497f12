"""Bulk Data export throughput over loopback: one site of N patients, system-level `$export`.

Prints one JSON object and writes `reports/bench/export.json`:
resources/s for the whole export (kick-off to last byte), MB/s, and the time to the first byte
of a Patient-level export of 10 patients.

    python benchmarks/bench_export.py [--patients 1000] [--root PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedlab.config import experiment_from_dict  # noqa: E402
from fedlab.fhir.bulk import BulkDataClient  # noqa: E402
from fedlab.fhir.server import SiteServer  # noqa: E402
from fedlab.fhir.smart import ClientKey, ClientRegistry  # noqa: E402
from fedlab.io import is_complete, mark_complete, write_json  # noqa: E402

SITE = "bench"
CLIENT = "bench-node"


def site_bulk_dir(root: Path, patients: int) -> tuple[Path, str]:
    """Generate (or reuse) the benchmark site; returns its bulk folder and how it was made."""
    exp = experiment_from_dict({"name": f"bench_export_{patients}",
                                "sites": [{"id": SITE, "patients": patients, "seed": 1}]}, root=root)
    site_dir = exp.data_path("synthea", None, SITE)
    try:
        from fedlab.synthea import generate
    except ImportError:
        if not is_complete(site_dir):
            synthesize(site_dir / "bulk", patients)
            mark_complete(site_dir, {"stage": "bench-synthesized", "patients": patients})
        return site_dir / "bulk", "synthesized"
    generate(exp, None, sites=[SITE])
    return site_dir / "bulk", "fedlab.synthea.generate"


def synthesize(bulk: Path, patients: int, observations_per_patient: int = 100) -> None:
    """Plain NDJSON stand-in when the generator is unavailable: Patients plus Observations."""
    bulk.mkdir(parents=True, exist_ok=True)
    with open(bulk / "Patient.ndjson", "w") as pat, open(bulk / "Observation.ndjson", "w") as obs:
        for i in range(patients):
            pat.write(json.dumps({"resourceType": "Patient", "id": f"p{i}", "gender": "female"}) + "\n")
            for k in range(observations_per_patient):
                obs.write(json.dumps({"resourceType": "Observation", "id": f"o{i}-{k}", "status": "final",
                                      "subject": {"reference": f"Patient/p{i}"},
                                      "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
                                      "valueQuantity": {"value": 5.5 + k % 7 / 10, "unit": "%"}}) + "\n")


def first_patients(bulk: Path, n: int) -> list[str]:
    with open(bulk / "Patient.ndjson") as handle:
        return [f"Patient/{json.loads(line)['id']}" for line, _ in zip(handle, range(n), strict=False)]


def measure(bulk: Path) -> dict[str, Any]:
    key = ClientKey.generate("ES384")
    registry = ClientRegistry()
    registry.register(CLIENT, key.jwks(), "system/*.rs")
    with SiteServer(bulk, registry) as server, tempfile.TemporaryDirectory() as out:
        with BulkDataClient(server.base_url, CLIENT, key, progress=False, min_wait_s=0.02,
                            max_retry_after_s=0.1) as client:
            client.access_token()  # discovery + token outside the timed export
            full = client.export(Path(out) / "all")
            small = client.export(Path(out) / "ten", "patient", patients=first_patients(bulk, 10))
    resources = sum(f.lines for f in full.files)
    size = sum(f.bytes for f in full.files)
    seconds = full.timings["total_s"]
    return {"resources": resources, "bytes": size, "seconds": round(seconds, 3),
            "value": round(resources / seconds, 1), "mb_per_s": round(size / 1e6 / seconds, 2),
            "server_job_s": round(full.timings["wait_s"] + full.timings["kickoff_s"], 3),
            "download_s": round(full.timings["download_s"], 3),
            "time_to_first_byte_full_s": round(full.timings["time_to_first_byte_s"], 3),
            "time_to_first_byte_10_patients_s": round(small.timings["time_to_first_byte_s"], 3),
            "resources_10_patients": sum(f.lines for f in small.files), "files": len(full.files)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("FEDLAB_ROOT", ROOT)))
    parser.add_argument("--out", type=Path, default=None, help="default: <root>/reports/bench/export.json")
    args = parser.parse_args()
    started = time.perf_counter()
    bulk, source = site_bulk_dir(args.root, args.patients)
    prepare_s = time.perf_counter() - started
    result = {"name": "export_throughput", "unit": "resources/s", "goal": None, **measure(bulk),
              "patients": args.patients, "data_source": source, "prepare_s": round(prepare_s, 1),
              "python": platform.python_version(), "cpus": os.cpu_count()}
    print(json.dumps(result))
    write_json(args.out or args.root / "reports" / "bench" / "export.json", result)


if __name__ == "__main__":
    main()
