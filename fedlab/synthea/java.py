"""`generate.engine: synthea-jar`: run a user's own Synthea jar per site.

The jar is not shipped with fedlab (Synthea is published as a jar on GitHub releases); set
`SYNTHEA_JAR` to its path. fedlab runs it once per site with the site's seed, clinician seed,
reference date, population and location, asks for FHIR R4 transaction bundles, and then writes
the same bundles as bulk NDJSON (`Type/id` references), so every later stage consumes real
Synthea output exactly as it consumes fedlab's own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from fedlab.config import Experiment, SiteConfig
from fedlab.errors import FedlabError
from fedlab.io import mark_complete, staging_dir

PROVIDER_FILE_PREFIXES = ("hospitalInformation", "practitionerInformation")


def synthea_jar() -> Path:
    jar = os.environ.get("SYNTHEA_JAR")
    if not jar:
        raise FedlabError("generate.engine is synthea-jar but SYNTHEA_JAR is not set; point it at a Synthea "
                          "jar (synthea-with-dependencies.jar from Synthea's GitHub releases)")
    path = Path(jar)
    if not path.is_file():
        raise FedlabError(f"SYNTHEA_JAR={jar}: no such file")
    if not shutil.which("java"):
        raise FedlabError("java not found; Synthea needs Java 11 or newer")
    return path


def synthea_command(exp: Experiment, site: SiteConfig, jar: Path, out_dir: Path) -> list[str]:
    """The command line that makes Synthea write this site's population into `out_dir`."""
    gen = exp.generate
    command = [
        "java", "-jar", str(jar),
        "-s", str(site.seed), "-cs", str(site.seed + exp.seed),
        "-r", gen.reference_date.strftime("%Y%m%d"),
        "-p", str(site.patients),
        "-a", f"{max(0, int(site.age_mean - 2 * site.age_sd))}-{min(110, int(site.age_mean + 2 * site.age_sd))}",
        f"--exporter.baseDirectory={out_dir}",
        "--exporter.fhir.export=true",
        "--exporter.fhir.bulk_data=false",
        "--exporter.hospital.fhir.export=true",
        "--exporter.practitioner.fhir.export=true",
        "--exporter.ccda.export=false",
        "--exporter.csv.export=false",
        f"--exporter.years_of_history={gen.years_of_history}",
        "--generate.append_numbers_to_person_names=true",
        site.state,
    ]
    if site.city:
        command.append(site.city)
    return command


def _bulk_reference(reference: str, ids: dict[str, str]) -> str:
    if reference.startswith("urn:uuid:"):
        return ids.get(reference, reference)
    return reference


def _rewrite_references(node: Any, ids: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: (_bulk_reference(v, ids) if k == "reference" and isinstance(v, str) else _rewrite_references(v, ids))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite_references(v, ids) for v in node]
    return node


def bundles_to_bulk(fhir_dir: Path, bulk_dir: Path) -> Counter[str]:
    """Write Synthea transaction bundles as one NDJSON per resource type, references `Type/id`."""
    bulk_dir.mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()
    handles: dict[str, Any] = {}
    try:
        for bundle_path in sorted(fhir_dir.glob("*.json")):
            try:
                bundle = json.loads(bundle_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise FedlabError(f"{bundle_path}: line {err.lineno}: not valid JSON ({err.msg})") from None
            entries = bundle.get("entry", [])
            ids = {e["fullUrl"]: f"{e['resource']['resourceType']}/{e['resource']['id']}"
                   for e in entries if "fullUrl" in e and "resource" in e}
            for entry in entries:
                resource = _rewrite_references(entry["resource"], ids)
                kind = resource["resourceType"]
                if kind not in handles:
                    handles[kind] = open(bulk_dir / f"{kind}.ndjson", "w", encoding="utf-8")  # noqa: SIM115
                handles[kind].write(json.dumps(resource, separators=(",", ":")) + "\n")
                counts[kind] += 1
    finally:
        for handle in handles.values():
            handle.close()
    return counts


def generate_with_jar(exp: Experiment, run: str, site: SiteConfig) -> Path:
    """Run the jar for one site and lay its output out as fedlab's generation contract."""
    jar = synthea_jar()
    final = exp.data_path("synthea", run, site.id)
    started = time.perf_counter()
    with staging_dir(final) as staging:
        raw = staging / "_synthea_output"
        command = synthea_command(exp, site, jar, raw)
        done = subprocess.run(command, cwd=staging, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
            raise FedlabError(f"site {site.id}: Synthea exited with {done.returncode}: {' '.join(command)}\n{tail}")
        source = raw / "fhir"
        if not source.is_dir() or not any(source.glob("*.json")):
            raise FedlabError(f"site {site.id}: Synthea wrote no FHIR bundles under {source}")
        (staging / "fhir").mkdir()
        for bundle in sorted(source.glob("*.json")):
            shutil.move(str(bundle), staging / "fhir" / bundle.name)
        shutil.rmtree(raw)
        counts = bundles_to_bulk(staging / "fhir", staging / "bulk")
        mark_complete(staging, {"engine": "synthea-jar", "jar": str(jar), "command": command,
                                "counts": dict(sorted(counts.items())), "site": site.model_dump(mode="json"),
                                "seconds": round(time.perf_counter() - started, 2)})
    return final
