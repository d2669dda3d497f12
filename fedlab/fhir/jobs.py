"""Export jobs: the job model, the job store of one site, and the job thread that writes the files.

A job's lifecycle: `JobStore.add` registers it (status `running`, progress `queued`) with its
transactionTime and the snapshot of resources added before kick-off; `JobStore.start` runs
`run_export_job` in a thread: it waits the configured delay (progress `0%`...`90%`), writes each
type's NDJSON into the job's folder inside the site's private work folder (`exporting T (i/n
types)`), then ends `complete` (the manifest lists the files) or `failed` (an OperationOutcome).
`JobStore.delete` (DELETE on the status URL) cancels it and removes its files, as
`JobStore.shutdown` does for every job when the server stops.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fedlab.fhir.audit import AuditLog
from fedlab.fhir.deid import DeidPolicy, patient_id_of
from fedlab.fhir.export_request import ExportRequest
from fedlab.fhir.http import FhirError, iso, operation_outcome, parse_instant, utc_now
from fedlab.fhir.r5 import R4_VERSION, R5_VERSION, R5MappingError
from fedlab.fhir.r5 import supports as r5_supports

_PATIENT_REFERENCE = re.compile(r'"(?:Patient/|urn:uuid:)([^"]+)"')


@dataclass
class ExportJob:
    id: str
    client_id: str
    request_url: str
    export: ExportRequest
    types: list[str]
    folder: Path
    transaction_time: dt.datetime = field(default_factory=utc_now)
    status: str = "running"  # running | complete | failed
    progress: str = "queued"
    outputs: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    failure: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    fhir_version: str = R4_VERSION
    added: dict[str, list[str]] = field(default_factory=dict)  # snapshot of added resources at kick-off
    counts: dict[str, int] = field(default_factory=dict)


class JobSite(Protocol):
    """What an export job reads from its site (`fedlab.fhir.state.SiteState` is one)."""

    bulk_dir: Path
    deid: DeidPolicy | None
    audit: AuditLog
    base_url: str | None

    @property
    def job_delay_s(self) -> float: ...

    @property
    def max_lines_per_file(self) -> int | None: ...

    def delivered_form(self, resource: dict[str, Any], r4: bool = True) -> dict[str, Any]: ...

    def patient_ids(self) -> set[str]: ...


class JobStore:
    """One site's export jobs, each in its own folder under the site's private work folder."""

    def __init__(self, work_dir: Path, lock: threading.RLock) -> None:
        self.work_dir, self.lock = work_dir, lock
        self.jobs: dict[str, ExportJob] = {}

    def folder(self, job_id: str) -> Path:
        folder = self.work_dir / job_id
        folder.mkdir(parents=True)
        return folder

    def add(self, job: ExportJob) -> ExportJob:
        with self.lock:
            self.jobs[job.id] = job
        return job

    def start(self, job: ExportJob, site: JobSite) -> None:
        job.thread = threading.Thread(target=run_export_job, args=(site, job), name=f"export-{job.id[:8]}",
                                      daemon=True)
        job.thread.start()

    def owned(self, job_id: str, client_id: str) -> ExportJob | None:
        """The job, when it exists and belongs to `client_id`."""
        with self.lock:
            job = self.jobs.get(job_id)
        return job if job is not None and job.client_id == client_id else None

    def running(self) -> int:
        with self.lock:
            return sum(1 for job in self.jobs.values() if job.status == "running")

    def delete(self, job: ExportJob) -> None:
        with self.lock:
            self.jobs.pop(job.id, None)
        _stop(job)

    def shutdown(self) -> None:
        with self.lock:
            jobs = list(self.jobs.values())
            self.jobs.clear()
        for job in jobs:
            _stop(job)


def _stop(job: ExportJob) -> None:
    job.cancel.set()
    if job.thread is not None:
        job.thread.join(timeout=10)
    shutil.rmtree(job.folder, ignore_errors=True)


def generation_time(bulk_dir: Path) -> dt.datetime:
    """When the site's data was generated: its `_SUCCESS.json` marker, else the newest NDJSON file."""
    marker = bulk_dir.parent / "_SUCCESS.json"
    candidates = [marker] if marker.is_file() else list(bulk_dir.glob("*.ndjson"))
    newest = max((p.stat().st_mtime for p in candidates), default=0.0)
    return dt.datetime.fromtimestamp(newest, dt.UTC)


class _Selector:
    """Decides which resources of one type a job exports, and trims them to `_elements`."""

    def __init__(self, export: ExportRequest, resource_type: str, default_updated: dt.datetime) -> None:
        self.export, self.resource_type = export, resource_type
        self.filters = [f for f in export.type_filters if f.resource_type == resource_type]
        self.elements = export.elements_for(resource_type)
        self.default_updated = default_updated

    def decide_unparsed(self, line: str) -> bool | None:
        """Keep (True) / drop (False) a raw line when that needs no parsing; None means parse it."""
        export = self.export
        if export.patients and not self._may_belong_to_patients(line, export.patients):
            return False
        if export.level != "system" or self.filters or self.elements is not None:
            return None
        if export.since is not None:
            return None if '"lastUpdated"' in line else self.default_updated > export.since
        return True

    def _may_belong_to_patients(self, line: str, patients: frozenset[str]) -> bool:
        # Cheap superset test: a resource linked to patient X holds the text `Patient/X` (or `urn:uuid:X`).
        if self.resource_type == "Patient":
            return any(patient in line for patient in patients)
        return not patients.isdisjoint(_PATIENT_REFERENCE.findall(line))

    def keep(self, resource: dict[str, Any], where: str) -> bool:
        export = self.export
        if export.level != "system":
            patient = patient_id_of(resource)
            if patient is None or (export.patients is not None and patient not in export.patients):
                return False
        if export.since is not None and self._last_updated(resource, where) <= export.since:
            return False
        return not self.filters or any(f.matches(resource) for f in self.filters)

    def _last_updated(self, resource: dict[str, Any], where: str) -> dt.datetime:
        text = (resource.get("meta") or {}).get("lastUpdated")
        if not text:
            return self.default_updated
        try:
            return parse_instant(text, "meta.lastUpdated")
        except FhirError as err:
            raise ValueError(f"{where}: {err.diagnostics}") from None

    def trim(self, resource: dict[str, Any]) -> dict[str, Any] | None:
        if self.elements is None:
            return None
        trimmed = {k: v for k, v in resource.items() if k in self.elements}
        meta = dict(trimmed.get("meta") or {})
        meta["tag"] = [*meta.get("tag", []), {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
                                              "code": "SUBSETTED"}]
        trimmed["meta"] = meta
        return trimmed


class _OutputWriter:
    """Writes one type's NDJSON output, starting a new numbered file every `max_lines` lines."""

    def __init__(self, folder: Path, resource_type: str, max_lines: int | None) -> None:
        self.folder, self.resource_type, self.max_lines = folder, resource_type, max_lines
        self.files: list[tuple[str, int]] = []
        self._handle: Any = None

    def write(self, line: str) -> None:
        if self._handle is None or (self.max_lines and self.files[-1][1] >= self.max_lines):
            self._open_next()
        self._handle.write(line)
        name, count = self.files[-1]
        self.files[-1] = (name, count + 1)

    def _open_next(self) -> None:
        self.close()
        name = f"{self.resource_type}.{len(self.files) + 1}.ndjson"
        self._handle = open(self.folder / name, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.files.append((name, 0))

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def run_export_job(site: JobSite, job: ExportJob) -> None:
    """The job thread: wait the configured delay (reporting progress), then write the output files."""
    try:
        _wait_with_progress(site, job)
        default_updated = generation_time(site.bulk_dir)
        unmappable = []
        for index, resource_type in enumerate(job.types, start=1):
            if job.cancel.is_set():
                return
            job.progress = f"exporting {resource_type} ({index}/{len(job.types)} types)"
            if job.fhir_version == R5_VERSION and not r5_supports(resource_type):
                unmappable.append(resource_type)
                continue
            _export_type(site, job, resource_type, default_updated)
        _report_missing_patients(site, job)
        _report_unmappable(site, job, unmappable)
        job.progress = "100%"
        job.status = "complete"
        site.audit.record("export-complete", client_id=job.client_id, job_id=job.id, level=job.export.level,
                          fhir_version=job.fhir_version, deidentified=site.deid is not None, counts=job.counts,
                          patients=job.counts.get("Patient", 0))
    except Exception as err:  # noqa: BLE001 - any failure becomes the job's OperationOutcome
        job.failure = str(err)
        job.status = "failed"
        site.audit.record("export-failed", client_id=job.client_id, job_id=job.id, error=str(err))
    finally:
        if job.cancel.is_set():
            shutil.rmtree(job.folder, ignore_errors=True)


def _wait_with_progress(site: JobSite, job: ExportJob) -> None:
    delay = site.job_delay_s
    steps = 10
    for step in range(steps):
        job.progress = f"{step * 100 // steps}%"
        if job.cancel.wait(delay / steps):
            return


def _source_lines(site: JobSite, job: ExportJob, resource_type: str) -> Iterator[tuple[str, int, str]]:
    """(where, line number, line) over the generated file, then the resources added before kick-off."""
    path = site.bulk_dir / f"{resource_type}.ndjson"
    if path.is_file():
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                yield str(path), number, line
    for number, line in enumerate(job.added.get(resource_type, []), start=1):
        yield f"<added {resource_type}>", number, line


def _export_type(site: JobSite, job: ExportJob, resource_type: str, default_updated: dt.datetime) -> None:
    selector = _Selector(job.export, resource_type, default_updated)
    writer = _OutputWriter(job.folder, resource_type, site.max_lines_per_file)
    typed_prefix = f'{{"resourceType":"{resource_type}"'
    transform = site.deid is not None or job.fhir_version != R4_VERSION
    try:
        for where, number, line in _source_lines(site, job, resource_type):
            if number % 5000 == 0 and job.cancel.is_set():
                return
            if not line.strip():
                continue
            line = line if line.endswith("\n") else line + "\n"
            looks_whole = line.startswith(typed_prefix) and line.rstrip().endswith("}")
            decision = selector.decide_unparsed(line) if looks_whole else None
            if decision is None or (decision and transform):
                resource = _parse_line(line, Path(where), number, resource_type)
                if decision is None and not selector.keep(resource, f"{where}:{number}"):
                    continue
                resource = selector.trim(resource) or resource
                if transform:
                    resource = _delivered(site, job, resource, f"{where}:{number}")
                line = json.dumps(resource, separators=(",", ":")) + "\n"
            elif not decision:
                continue
            writer.write(line)
    finally:
        writer.close()
    for name, count in writer.files:
        job.outputs.append({"type": resource_type, "url": f"{site.base_url}/files/{job.id}/{name}",
                            "count": count})
        job.counts[resource_type] = job.counts.get(resource_type, 0) + count


def _delivered(site: JobSite, job: ExportJob, resource: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        return site.delivered_form(resource, r4=job.fhir_version == R4_VERSION)
    except (R5MappingError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


def _report_unmappable(site: JobSite, job: ExportJob, resource_types: list[str]) -> None:
    if not resource_types:
        return
    name = "OperationOutcome.r5.ndjson"
    with open(job.folder / name, "w", encoding="utf-8") as handle:
        for resource_type in resource_types:
            handle.write(json.dumps(operation_outcome(
                "not-supported", f"{resource_type} is not served as FHIR R5 (no R4 -> R5 mapping)")) + "\n")
    job.errors.append({"type": "OperationOutcome", "url": f"{site.base_url}/files/{job.id}/{name}",
                       "count": len(resource_types)})


def _parse_line(line: str, path: Path, number: int, resource_type: str) -> dict[str, Any]:
    try:
        resource = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    if not isinstance(resource, dict) or resource.get("resourceType") != resource_type:
        found = resource.get("resourceType") if isinstance(resource, dict) else type(resource).__name__
        raise ValueError(f"{path}:{number}: expected a {resource_type} resource, found {found!r}")
    return resource


def _report_missing_patients(site: JobSite, job: ExportJob) -> None:
    if not job.export.patients:
        return
    missing = sorted(job.export.patients - site.patient_ids())
    if not missing:
        return
    name = "OperationOutcome.errors.ndjson"
    with open(job.folder / name, "w", encoding="utf-8") as handle:
        for patient in missing:
            handle.write(json.dumps(operation_outcome("not-found", f"Patient/{patient} is not on this server")) + "\n")
    job.errors.append({"type": "OperationOutcome", "url": f"{site.base_url}/files/{job.id}/{name}",
                       "count": len(missing)})


def manifest(job: ExportJob, deidentified: bool = False) -> dict[str, Any]:
    manifest: dict[str, Any] = {"transactionTime": iso(job.transaction_time), "request": job.request_url,
                                "requiresAccessToken": True, "output": job.outputs, "error": job.errors}
    if job.fhir_version != R4_VERSION:
        manifest["fhirVersion"] = job.fhir_version  # not in the Bulk Data spec: tells the client what it gets
    if deidentified:
        manifest["deidentified"] = "HIPAA Safe Harbor"
    return manifest
