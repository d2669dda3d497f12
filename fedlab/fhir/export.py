"""The export stage: each site's node pulls its hospital's data through Bulk Data `$export`.

For every site: start the site's FHIR server over `data/synthea/<run>/<site>/bulk/` with the node's
client registered, export at system level with a signed-assertion token, and write
`data/export/<run>/<site>/` (NDJSON per output, `manifest.json`, then `_SUCCESS.json`).

With `exp.export.deidentify`, the *server* de-identifies (HIPAA Safe Harbor) every line before it
serves it, so identifiable data never leaves the hospital; the site's pseudonym/date-shift secret
lives in `data/export/<run>/_site_secrets/<site>/` (standing in for the hospital's own vault) and
never travels with the export. Each site server's audit log is appended to
`data/export/<run>/_audit/<site>.jsonl`. These paths and policies are `fedlab.fhir.site`'s.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

from fedlab.config import Experiment
from fedlab.fhir.bulk import BulkDataClient, ExportResult
from fedlab.fhir.server import SiteServer
from fedlab.fhir.site import (
    KEY_ALGORITHM,
    ExportStageError,
    audit_log_path,
    node_client_id,
    node_credentials,
    site_bulk_dir,
    site_deid_policy,
)
from fedlab.fhir.smart import ClientRegistry
from fedlab.io import is_complete, mark_complete, read_json, staging_dir, write_json
from fedlab.stages import record_written

# The site's paths and policies live in `fedlab.fhir.site` (the server uses them too); they are
# part of this stage's API as well.
__all__ = ["KEY_ALGORITHM", "ExportStageError", "audit_log_path", "export", "export_site", "node_client_id",
           "node_credentials", "site_bulk_dir", "site_deid_policy"]

def export(exp: Experiment, run: str | None = None, sites: list[str] | None = None, force: bool = False,
           progress: bool = True, deid_date_mode: str | None = None) -> dict[str, Path]:
    """Export every (or the named) site; returns site id -> `data/export/<run>/<site>/`.

    `deid_date_mode` ("year" or "shift") applies when `exp.export.deidentify` is on.
    """
    site_ids = sites if sites is not None else exp.site_ids
    bulk_dirs = {site: site_bulk_dir(exp, run, site) for site in site_ids}  # fail before any work
    results: dict[str, Path] = {}
    for site in site_ids:
        final = exp.data_path("export", run, site)
        if is_complete(final) and not force and _same_deidentification(final, exp.export.deidentify):
            results[site] = final
            continue
        results[site] = export_site(exp, run, site, bulk_dirs[site], progress,
                                    deid_date_mode or exp.export.deid_date_mode)
    record_written(exp, run, "export")
    return results


def export_site(exp: Experiment, run: str | None, site: str, bulk_dir: Path, progress: bool = True,
                deid_date_mode: str = "year") -> Path:
    client_id, key = node_credentials(exp, run, site)
    registry = ClientRegistry()
    registry.register(client_id, key.jwks(), exp.export.scope)
    final = exp.data_path("export", run, site)
    started = time.perf_counter()
    started_at = dt.datetime.now(dt.UTC).isoformat()
    policy = site_deid_policy(exp, run, site, deid_date_mode) if exp.export.deidentify else None
    with SiteServer(bulk_dir, registry, host=exp.export.host, deid_policy=policy,
                    audit_path=audit_log_path(exp, run, site)) as server, staging_dir(final) as staging:
        with BulkDataClient(server.base_url, client_id, key, exp.export.scope, progress=progress,
                            min_wait_s=0.05, max_retry_after_s=0.5) as client:
            result = client.export(staging, "system", types=list(exp.export.types))
        local = _local_manifest(result, server.base_url, exp.export.scope)
        if policy is not None:
            local["deidentification"] = {"standard": "HIPAA Safe Harbor", "applied_by": "site server",
                                         "date_mode": policy.date_mode}
        write_json(staging / "manifest.json", local)
        mark_complete(staging, _success_info(site, run or exp.name, result, started_at,
                                             time.perf_counter() - started))
    return final


def _same_deidentification(folder: Path, deidentify: bool) -> bool:
    """A finished export is reused only if it was made with the same de-identification setting."""
    try:
        manifest = read_json(folder / "manifest.json")
    except (OSError, ValueError):
        return False
    return ("deidentification" in manifest) == deidentify


def _local_manifest(result: ExportResult, base_url: str, scope: str) -> dict[str, Any]:
    return {**result.manifest,
            "files": [f.as_json() for f in result.files],
            "export_request": {**result.kickoff, "base_url": base_url, "scope": scope},
            "errors": result.errors,
            "deleted": result.deleted}


def _success_info(site: str, run: str, result: ExportResult, started_at: str, seconds: float) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for downloaded in result.files:
        counts[downloaded.type] = counts.get(downloaded.type, 0) + downloaded.lines
    return {"stage": "export", "run": run, "site": site, "started": started_at,
            "finished": dt.datetime.now(dt.UTC).isoformat(), "seconds": round(seconds, 3),
            "timings": {k: round(v, 4) for k, v in result.timings.items()}, "counts": counts,
            "files": len(result.files), "errors": len(result.errors),
            "transactionTime": result.transaction_time}
