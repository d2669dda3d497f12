"""What one site's server holds while it runs: its data folder, token issuer, options, export
jobs, audit log, the resources added while serving (write-back, new arrivals) and Subscriptions.

The app factory (`fedlab.fhir.app.make_app`) builds one `SiteState` and keeps it in
`app.extensions["fedlab_site"]`; every route reads it from there.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlab.fhir.audit import AuditLog
from fedlab.fhir.deid import DeidPolicy, deidentify_resource
from fedlab.fhir.faults import FaultInjector
from fedlab.fhir.http import iso, utc_now_ms
from fedlab.fhir.jobs import JobStore
from fedlab.fhir.r5 import to_r5
from fedlab.fhir.smart import TokenIssuer
from fedlab.fhir.subscriptions import SubscriptionManager

GROUP_ALL = "all"


@dataclass
class SiteOptions:
    job_delay_s: float = 0.0
    retry_after_s: int = 1
    max_concurrent_jobs: int = 4
    max_lines_per_file: int | None = None
    group_id: str = GROUP_ALL


class SiteState:
    """Everything one site's app holds: data folder, tokens, jobs, options, added data and subscriptions."""

    def __init__(self, bulk_dir: Path, issuer: TokenIssuer, options: SiteOptions, work_dir: Path,
                 faults: FaultInjector, deid: DeidPolicy | None = None, audit_path: Path | None = None,
                 owns_work_dir: bool = True) -> None:
        self.bulk_dir, self.issuer, self.options, self.work_dir = bulk_dir, issuer, options, work_dir
        self.faults, self.deid, self.owns_work_dir = faults, deid, owns_work_dir
        self.audit = AuditLog(audit_path or work_dir / "audit.jsonl")
        # One lock for the added resources and the jobs: a kick-off takes its transactionTime, its
        # snapshot of added resources and its place among the running jobs atomically.
        self.lock = threading.RLock()
        self.jobs = JobStore(work_dir, self.lock)
        self.base_url: str | None = None
        # Resources added while serving (write-back, new data): raw NDJSON lines per type, in memory.
        self.added: dict[str, list[str]] = {}
        self._last_added = self._last_transaction = dt.datetime.min.replace(tzinfo=dt.UTC)
        self._patients: set[str] | None = None
        self._pseudonyms: dict[str, str] | None = None
        self.subscriptions = SubscriptionManager(lambda: self.base_url or "", self.delivered_form, self.audit.record)

    def available_types(self) -> list[str]:
        on_disk = {p.name[: -len(".ndjson")] for p in self.bulk_dir.glob("*.ndjson")}
        with self.lock:
            return sorted(on_disk | {t for t, lines in self.added.items() if lines})

    def patient_ids(self) -> set[str]:
        if self._patients is None:
            path = self.bulk_dir / "Patient.ndjson"
            ids: set[str] = set()
            if path.is_file():
                for _, resource in _read_ndjson(path):
                    ids.add(str(resource.get("id")))
            with self.lock:
                ids |= {str(json.loads(line).get("id")) for line in self.added.get("Patient", [])}
            self._patients = ids
        return set(self._patients)

    def resolve_patient(self, patient_id: str) -> str | None:
        """The site's own id for a patient id or (with de-identification) its pseudonym; None if unknown."""
        ids = self.patient_ids()
        if patient_id in ids:
            return patient_id
        if self.deid is None:
            return None
        if self._pseudonyms is None or len(self._pseudonyms) != len(ids):
            self._pseudonyms = {self.deid.pseudonym(raw): raw for raw in ids}
        return self._pseudonyms.get(patient_id)

    def delivered_form(self, resource: dict[str, Any], r4: bool = True) -> dict[str, Any]:
        """A resource as it leaves the site: de-identified when configured, mapped to R5 unless `r4`."""
        shown = deidentify_resource(resource, self.deid) if self.deid is not None else resource
        return shown if r4 else to_r5(shown)

    def add_resources(self, resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Store new resources (simulated arrivals, write-back): new id when missing, meta.lastUpdated = now.

        Every added resource is stamped later than any transactionTime already handed out, and each job
        snapshots the added resources at kick-off, so a `_since` chain sees each resource exactly once.
        """
        stored = []
        with self.lock:
            for resource in resources:
                if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
                    raise ValueError("add_resources: every item must be a FHIR resource with a resourceType")
                now = max(utc_now_ms(), self._last_transaction + dt.timedelta(milliseconds=1),
                          self._last_added)
                self._last_added = now
                resource = {**resource, "id": str(resource.get("id") or uuid.uuid4()),
                            "meta": {**(resource.get("meta") or {}), "versionId": "1", "lastUpdated": iso(now)}}
                line = json.dumps(resource, separators=(",", ":")) + "\n"
                self.added.setdefault(resource["resourceType"], []).append(line)
                stored.append(resource)
            if any(r["resourceType"] == "Patient" for r in stored):
                self._patients = None
        self.subscriptions.resources_added(stored)
        return stored

    def new_transaction_time(self) -> tuple[dt.datetime, dict[str, list[str]]]:
        """A job's transactionTime and the snapshot of added resources it covers (call under `lock`)."""
        moment = max(utc_now_ms(), self._last_added)
        self._last_transaction = max(moment, self._last_transaction)
        return moment, {t: list(lines) for t, lines in self.added.items()}

    @property
    def job_delay_s(self) -> float:
        return self.options.job_delay_s

    @property
    def max_lines_per_file(self) -> int | None:
        return self.options.max_lines_per_file

    def shutdown(self) -> None:
        self.jobs.shutdown()
        self.subscriptions.shutdown()
        if self.owns_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)


def _read_ndjson(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(raw line, resource) for each non-blank line; malformed JSON names the file and line."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                resource = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(resource, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object")
            yield line if line.endswith("\n") else line + "\n", resource
