"""A hospital's FHIR endpoint: Bulk Data `$export` (system, Patient, Group) behind SMART Backend Services.

`make_app` builds the Flask app over a site's `bulk/<Type>.ndjson` folder; `SiteServer` serves it
with waitress on 127.0.0.1 and a free port. Export jobs run in background threads and write their
output under a private work folder; every data request needs a valid bearer token.

Beyond `$export`:
- de-identification (`deid_policy`): the server applies HIPAA Safe Harbor to every exported line, so
  data leaves the hospital de-identified; pseudonymous patient ids are accepted back (the `patient`
  parameter, write-back) because the hospital holds the pseudonym key;
- write-back: a transaction Bundle of RiskAssessments POSTed to the base (scope `.c`), stored and
  served by later exports (also with `_since`);
- R5: `Accept: application/fhir+json; fhirVersion=5.0` (or `_fhirVersion=5.0`) serves R5-mapped
  NDJSON; `metadata` answers in the version asked for;
- topic-based Subscriptions (R5, and the R4 backport shape) for new Observations, fed by
  `add_resources`;
- an audit log (`audit.jsonl`, JSON lines) of token issuance, kick-off, completion, download,
  DELETE, write-back and subscriptions.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import waitress
from flask import Flask, Response, jsonify, request, send_file
from waitress import wasyncore

from fedlab.fhir.deid import DeidPolicy, deidentify_resource, patient_id_of
from fedlab.fhir.r5 import R4_VERSION, R5_VERSION, R5MappingError, to_r5, wants_r5
from fedlab.fhir.r5 import supports as r5_supports
from fedlab.fhir.smart import (
    SCOPES_SUPPORTED,
    SIGNING_ALGORITHMS,
    AccessGrant,
    ClientRegistry,
    SmartError,
    TokenIssuer,
    readable_types,
)
from fedlab.fhir.subscriptions import SubscriptionError, SubscriptionManager, subscription_topic
from fedlab.fhir.writeback import TransactionError, validate_transaction

if TYPE_CHECKING:
    from fedlab.config import Experiment

FHIR_JSON = "application/fhir+json"
NDJSON = "application/fhir+ndjson"
OUTPUT_FORMATS = ("application/fhir+ndjson", "application/ndjson", "ndjson")
KICKOFF_PARAMETERS = ("_type", "_since", "_outputFormat", "_typeFilter", "_elements", "patient")
VERSION_PARAMETERS = ("_fhirVersion", "fhirVersion")
MANDATORY_ELEMENTS = ("resourceType", "id", "meta")
GROUP_ALL = "all"
_PATIENT_REFERENCE = re.compile(r'"(?:Patient/|urn:uuid:)([^"]+)"')
BULK_BASE = "http://hl7.org/fhir/uv/bulkdata"
# Token search parameters supported inside `_typeFilter`: search parameter -> element (per type).
TOKEN_SEARCH = {
    "code": {"MedicationRequest": "medicationCodeableConcept", "*": "code"},
    "category": {"*": "category"},
    "status": {"*": "status"},
    "clinical-status": {"*": "clinicalStatus"},
    "class": {"*": "class"},
}


class FhirError(Exception):
    """An HTTP error answered with an OperationOutcome."""

    def __init__(self, status: int, code: str, diagnostics: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(diagnostics)
        self.status, self.code, self.diagnostics = status, code, diagnostics
        self.headers = headers or {}


def operation_outcome(code: str, diagnostics: str, severity: str = "error") -> dict[str, Any]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}]}


def _fhir_json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    response = Response(json.dumps(body), status=status, mimetype=FHIR_JSON)
    response.headers.update(headers or {})
    return response


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _utc_now_ms() -> dt.datetime:
    moment = _utc_now()
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_instant(text: str, what: str) -> dt.datetime:
    """A FHIR instant (with time zone); `+` decoded as a space by form decoding is put back."""
    cleaned = text.strip().replace(" ", "+").replace("Z", "+00:00")
    try:
        moment = dt.datetime.fromisoformat(cleaned)
    except ValueError:
        raise FhirError(400, "invalid", f"{what}: {text!r} is not a FHIR instant") from None
    if moment.tzinfo is None:
        raise FhirError(400, "invalid", f"{what}: {text!r} needs a time zone (for example Z)")
    return moment


# ---------------------------------------------------------------- fault injection (tests, demos)
@dataclass
class Fault:
    """An injected answer for the next request of one kind: an error status or a truncated file."""

    status: int = 503
    retry_after: str | None = None
    transient: bool = True
    truncate_lines: int | None = None
    reset_after_lines: int | None = None  # download: send this many lines, then drop the connection


class FaultInjector:
    """Queues of faults per request kind (`token`, `kickoff`, `status`, `download`), consumed in order."""

    def __init__(self) -> None:
        self._queues: dict[str, list[Fault]] = {}
        self._lock = threading.Lock()
        self.served: dict[str, int] = {}

    def add(self, kind: str, fault: Fault, times: int = 1) -> None:
        with self._lock:
            self._queues.setdefault(kind, []).extend([fault] * times)

    def take(self, kind: str) -> Fault | None:
        with self._lock:
            queue = self._queues.get(kind)
            if not queue:
                return None
            self.served[kind] = self.served.get(kind, 0) + 1
            return queue.pop(0)


def _fault_response(fault: Fault) -> Response:
    code = "transient" if fault.transient else "exception"
    headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
    return _fhir_json(operation_outcome(code, f"injected fault: HTTP {fault.status}"), fault.status, headers)


# ---------------------------------------------------------------- export requests
@dataclass(frozen=True)
class TypeFilter:
    resource_type: str
    criteria: tuple[tuple[str, tuple[str, ...]], ...]  # (search parameter, OR-ed token values)

    def matches(self, resource: dict[str, Any]) -> bool:
        return all(_token_match(resource, param, values) for param, values in self.criteria)


def _codings(value: Any) -> Iterator[tuple[str | None, str | None]]:
    if isinstance(value, str):
        yield None, value
    elif isinstance(value, list):
        for item in value:
            yield from _codings(item)
    elif isinstance(value, dict):
        for coding in value.get("coding", []) if "coding" in value else [value]:
            yield coding.get("system"), coding.get("code")


def _token_match(resource: dict[str, Any], param: str, values: tuple[str, ...]) -> bool:
    fields = TOKEN_SEARCH[param]
    element = fields.get(resource.get("resourceType", ""), fields["*"])
    codings = list(_codings(resource.get(element)))
    for value in values:
        system, bar, code = value.rpartition("|") if "|" in value else (None, "", value)
        for have_system, have_code in codings:
            if (not bar or system == (have_system or "")) and (not code or code == have_code):
                return True
    return False


def parse_type_filter(text: str) -> TypeFilter:
    resource_type, question, query = text.partition("?")
    if not question or not re.fullmatch(r"[A-Z][A-Za-z]+", resource_type):
        raise FhirError(400, "invalid", f"_typeFilter {text!r}: expected Type?param=value")
    criteria = []
    for param, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if param not in TOKEN_SEARCH:
            raise FhirError(400, "not-supported", f"_typeFilter {text!r}: search parameter {param!r} is not "
                                                  f"supported (supported: {', '.join(TOKEN_SEARCH)})")
        criteria.append((param, tuple(v for v in value.split(",") if v)))
    if not criteria:
        raise FhirError(400, "invalid", f"_typeFilter {text!r}: no search parameters")
    return TypeFilter(resource_type, tuple(criteria))


def _split_list(values: list[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _split_type_filters(values: list[str]) -> list[str]:
    # Several filters may share one parameter, comma-separated; commas inside a query separate OR-values.
    return [part for value in values for part in re.split(r",(?=[A-Z][A-Za-z]+\?)", value) if part]


@dataclass(frozen=True)
class ExportRequest:
    level: str  # system | patient | group
    types: tuple[str, ...] | None = None
    since: dt.datetime | None = None
    type_filters: tuple[TypeFilter, ...] = ()
    elements: tuple[str, ...] | None = None
    patients: frozenset[str] | None = None
    group_id: str | None = None
    output_format: str = NDJSON

    def elements_for(self, resource_type: str) -> set[str] | None:
        if self.elements is None:
            return None
        kept = set(MANDATORY_ELEMENTS)
        for element in self.elements:
            owner, _, name = element.rpartition(".")
            if not owner or owner == resource_type:
                kept.add(name)
        return kept


def build_export_request(level: str, params: list[tuple[str, str]], patient_refs: list[str], lenient: bool,
                         group_id: str | None = None) -> ExportRequest:
    values: dict[str, list[str]] = {}
    for name, value in params:
        if name not in KICKOFF_PARAMETERS:
            if lenient:
                continue
            raise FhirError(400, "not-supported", f"parameter {name!r} is not supported "
                                                  f"(supported: {', '.join(KICKOFF_PARAMETERS)})")
        values.setdefault(name, []).append(value)
    output_format = (values.get("_outputFormat") or [NDJSON])[-1]
    if output_format not in OUTPUT_FORMATS:
        raise FhirError(400, "not-supported", f"_outputFormat {output_format!r} is not supported "
                                              f"(use one of {', '.join(OUTPUT_FORMATS)})")
    since_values = values.get("_since")
    since = parse_instant(since_values[-1], "_since") if since_values else None
    types = tuple(_split_list(values["_type"])) if "_type" in values else None
    for name in types or ():
        if not re.fullmatch(r"[A-Z][A-Za-z]+", name):
            raise FhirError(400, "invalid", f"_type: {name!r} is not a resource type")
    filters = tuple(parse_type_filter(text) for text in _split_type_filters(values.get("_typeFilter", [])))
    elements = tuple(_split_list(values["_elements"])) if "_elements" in values else None
    for element in elements or ():
        if not re.fullmatch(r"([A-Z][A-Za-z]+\.)?[a-z][A-Za-z0-9]*(\[x\])?", element):
            raise FhirError(400, "invalid", f"_elements: {element!r} is not a root element name")
    if patient_refs and level == "system":
        raise FhirError(400, "invalid", "the patient parameter is only valid for Patient and Group export")
    patients = frozenset(_patient_id(ref) for ref in patient_refs) if patient_refs else None
    return ExportRequest(level, types, since, filters, elements, patients, group_id, output_format)


def _patient_id(reference: str) -> str:
    for prefix in ("Patient/", "urn:uuid:"):
        if reference.startswith(prefix) and len(reference) > len(prefix):
            return reference[len(prefix):]
    raise FhirError(400, "invalid", f"patient reference {reference!r} must look like Patient/<id>")


def parameters_from_body(body: Any) -> tuple[list[tuple[str, str]], list[str]]:
    """Kick-off parameters from a POSTed FHIR Parameters resource: (name, value) pairs and patient refs."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise FhirError(400, "invalid", "POST kick-off body must be a FHIR Parameters resource")
    pairs: list[tuple[str, str]] = []
    patients: list[str] = []
    for index, param in enumerate(body.get("parameter", [])):
        name = param.get("name") if isinstance(param, dict) else None
        if not name:
            raise FhirError(400, "invalid", f"Parameters.parameter[{index}] has no name")
        if name == "patient":
            reference = (param.get("valueReference") or {}).get("reference")
            if not reference:
                raise FhirError(400, "invalid", f"Parameters.parameter[{index}] patient needs valueReference.reference")
            patients.append(reference)
            continue
        value = next((v for k, v in param.items() if k.startswith("value")), None)
        if not isinstance(value, str):
            raise FhirError(400, "invalid", f"Parameters.parameter[{index}] {name} needs a string value")
        pairs.append((name, value))
    return pairs, patients


# ---------------------------------------------------------------- jobs
@dataclass
class ExportJob:
    id: str
    client_id: str
    request_url: str
    export: ExportRequest
    types: list[str]
    folder: Path
    transaction_time: dt.datetime = field(default_factory=_utc_now)
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


# ---------------------------------------------------------------- site state
@dataclass
class SiteOptions:
    job_delay_s: float = 0.0
    retry_after_s: int = 1
    max_concurrent_jobs: int = 4
    max_lines_per_file: int | None = None
    group_id: str = GROUP_ALL


class AuditLog:
    """Append-only JSON-lines audit trail (one record per line, flushed at once; never rewritten)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def record(self, event: str, **fields: Any) -> None:
        entry = {"time": _iso(_utc_now()), "event": event, **fields}
        line = json.dumps(entry, default=str, separators=(",", ":")) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with self._lock:
            return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]


class SiteState:
    """Everything one site's app holds: data folder, tokens, jobs, options, added data and subscriptions."""

    def __init__(self, bulk_dir: Path, issuer: TokenIssuer, options: SiteOptions, work_dir: Path,
                 faults: FaultInjector, deid: DeidPolicy | None = None, audit_path: Path | None = None,
                 owns_work_dir: bool = True) -> None:
        self.bulk_dir, self.issuer, self.options, self.work_dir = bulk_dir, issuer, options, work_dir
        self.faults, self.deid, self.owns_work_dir = faults, deid, owns_work_dir
        self.audit = AuditLog(audit_path or work_dir / "audit.jsonl")
        self.jobs: dict[str, ExportJob] = {}
        self.lock = threading.Lock()
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
                now = max(_utc_now_ms(), self._last_transaction + dt.timedelta(milliseconds=1),
                          self._last_added)
                self._last_added = now
                resource = {**resource, "id": str(resource.get("id") or uuid.uuid4()),
                            "meta": {**(resource.get("meta") or {}), "versionId": "1", "lastUpdated": _iso(now)}}
                line = json.dumps(resource, separators=(",", ":")) + "\n"
                self.added.setdefault(resource["resourceType"], []).append(line)
                stored.append(resource)
            if any(r["resourceType"] == "Patient" for r in stored):
                self._patients = None
        self.subscriptions.resources_added(stored)
        return stored

    def new_transaction_time(self) -> tuple[dt.datetime, dict[str, list[str]]]:
        """A job's transactionTime and the snapshot of added resources it covers (call under `lock`)."""
        moment = max(_utc_now_ms(), self._last_added)
        self._last_transaction = max(moment, self._last_transaction)
        return moment, {t: list(lines) for t, lines in self.added.items()}

    def running_jobs(self) -> int:
        return sum(1 for job in self.jobs.values() if job.status == "running")

    def shutdown(self) -> None:
        with self.lock:
            jobs = list(self.jobs.values())
            self.jobs.clear()
        for job in jobs:
            job.cancel.set()
            if job.thread is not None:
                job.thread.join(timeout=10)
            shutil.rmtree(job.folder, ignore_errors=True)
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


def run_export_job(state: SiteState, job: ExportJob) -> None:
    """The job thread: wait the configured delay (reporting progress), then write the output files."""
    try:
        _wait_with_progress(state, job)
        default_updated = generation_time(state.bulk_dir)
        unmappable = []
        for index, resource_type in enumerate(job.types, start=1):
            if job.cancel.is_set():
                return
            job.progress = f"exporting {resource_type} ({index}/{len(job.types)} types)"
            if job.fhir_version == R5_VERSION and not r5_supports(resource_type):
                unmappable.append(resource_type)
                continue
            _export_type(state, job, resource_type, default_updated)
        _report_missing_patients(state, job)
        _report_unmappable(state, job, unmappable)
        job.progress = "100%"
        job.status = "complete"
        state.audit.record("export-complete", client_id=job.client_id, job_id=job.id, level=job.export.level,
                           fhir_version=job.fhir_version, deidentified=state.deid is not None, counts=job.counts,
                           patients=job.counts.get("Patient", 0))
    except Exception as err:  # noqa: BLE001 - any failure becomes the job's OperationOutcome
        job.failure = str(err)
        job.status = "failed"
        state.audit.record("export-failed", client_id=job.client_id, job_id=job.id, error=str(err))
    finally:
        if job.cancel.is_set():
            shutil.rmtree(job.folder, ignore_errors=True)


def _wait_with_progress(state: SiteState, job: ExportJob) -> None:
    delay = state.options.job_delay_s
    steps = 10
    for step in range(steps):
        job.progress = f"{step * 100 // steps}%"
        if job.cancel.wait(delay / steps):
            return


def _source_lines(state: SiteState, job: ExportJob, resource_type: str) -> Iterator[tuple[str, int, str]]:
    """(where, line number, line) over the generated file, then the resources added before kick-off."""
    path = state.bulk_dir / f"{resource_type}.ndjson"
    if path.is_file():
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                yield str(path), number, line
    for number, line in enumerate(job.added.get(resource_type, []), start=1):
        yield f"<added {resource_type}>", number, line


def _export_type(state: SiteState, job: ExportJob, resource_type: str, default_updated: dt.datetime) -> None:
    selector = _Selector(job.export, resource_type, default_updated)
    writer = _OutputWriter(job.folder, resource_type, state.options.max_lines_per_file)
    typed_prefix = f'{{"resourceType":"{resource_type}"'
    transform = state.deid is not None or job.fhir_version != R4_VERSION
    try:
        for where, number, line in _source_lines(state, job, resource_type):
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
                    resource = _delivered(state, job, resource, f"{where}:{number}")
                line = json.dumps(resource, separators=(",", ":")) + "\n"
            elif not decision:
                continue
            writer.write(line)
    finally:
        writer.close()
    for name, count in writer.files:
        job.outputs.append({"type": resource_type, "url": f"{state.base_url}/files/{job.id}/{name}",
                            "count": count})
        job.counts[resource_type] = job.counts.get(resource_type, 0) + count


def _delivered(state: SiteState, job: ExportJob, resource: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        return state.delivered_form(resource, r4=job.fhir_version == R4_VERSION)
    except (R5MappingError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


def _report_unmappable(state: SiteState, job: ExportJob, resource_types: list[str]) -> None:
    if not resource_types:
        return
    name = "OperationOutcome.r5.ndjson"
    with open(job.folder / name, "w", encoding="utf-8") as handle:
        for resource_type in resource_types:
            handle.write(json.dumps(operation_outcome(
                "not-supported", f"{resource_type} is not served as FHIR R5 (no R4 -> R5 mapping)")) + "\n")
    job.errors.append({"type": "OperationOutcome", "url": f"{state.base_url}/files/{job.id}/{name}",
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


def _report_missing_patients(state: SiteState, job: ExportJob) -> None:
    if not job.export.patients:
        return
    missing = sorted(job.export.patients - state.patient_ids())
    if not missing:
        return
    name = "OperationOutcome.errors.ndjson"
    with open(job.folder / name, "w", encoding="utf-8") as handle:
        for patient in missing:
            handle.write(json.dumps(operation_outcome("not-found", f"Patient/{patient} is not on this server")) + "\n")
    job.errors.append({"type": "OperationOutcome", "url": f"{state.base_url}/files/{job.id}/{name}",
                       "count": len(missing)})


def _manifest(job: ExportJob, deidentified: bool = False) -> dict[str, Any]:
    manifest: dict[str, Any] = {"transactionTime": _iso(job.transaction_time), "request": job.request_url,
                                "requiresAccessToken": True, "output": job.outputs, "error": job.errors}
    if job.fhir_version != R4_VERSION:
        manifest["fhirVersion"] = job.fhir_version  # not in the Bulk Data spec: tells the client what it gets
    if deidentified:
        manifest["deidentified"] = "HIPAA Safe Harbor"
    return manifest


# ---------------------------------------------------------------- the app
def make_app(bulk_dir: str | Path, registry: ClientRegistry, *, issuer: TokenIssuer | None = None,
             job_delay_s: float = 0.0, retry_after_s: int = 1, max_concurrent_jobs: int = 4,
             max_lines_per_file: int | None = None, work_dir: str | Path | None = None,
             faults: FaultInjector | None = None, base_url: str | None = None,
             deid_policy: DeidPolicy | None = None, audit_path: str | Path | None = None) -> Flask:
    """The site's Flask app. `app.extensions["fedlab_site"]` holds its SiteState (tokens, jobs, faults).

    `deid_policy` de-identifies everything served; `audit_path` defaults to `<work_dir>/audit.jsonl`
    (a temporary work folder, and its audit log, are removed when the server stops).
    """
    bulk_dir = Path(bulk_dir)
    if not bulk_dir.is_dir():
        raise FileNotFoundError(f"{bulk_dir}: bulk data folder not found")
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="fedlab-export-jobs-"))
    options = SiteOptions(job_delay_s, retry_after_s, max_concurrent_jobs, max_lines_per_file)
    state = SiteState(bulk_dir, issuer or TokenIssuer(registry), options, work, faults or FaultInjector(),
                      deid=deid_policy, audit_path=Path(audit_path) if audit_path else None,
                      owns_work_dir=work_dir is None)
    state.base_url = base_url.rstrip("/") if base_url else None
    app = Flask("fedlab.fhir.server")
    app.extensions["fedlab_site"] = state
    _add_routes(app, state)
    return app


def _base(state: SiteState) -> str:
    return state.base_url or request.host_url.rstrip("/")


def _authorize(state: SiteState) -> AccessGrant:
    try:
        return state.issuer.check(request.headers.get("Authorization"))
    except SmartError as err:
        raise FhirError(401, "login", err.description,
                        {"WWW-Authenticate": f'Bearer error="{err.error}", error_description="{err.description}"'}
                        ) from None


def _add_routes(app: Flask, state: SiteState) -> None:
    @app.errorhandler(FhirError)
    def _fhir_error(err: FhirError) -> Response:
        return _fhir_json(operation_outcome(err.code, err.diagnostics), err.status, err.headers)

    @app.before_request
    def _remember_base() -> None:
        state.base_url = _base(state)

    @app.get("/.well-known/smart-configuration")
    def smart_configuration() -> Response:
        return jsonify(_smart_configuration(state.base_url or ""))

    @app.get("/metadata")
    def metadata() -> Response:
        version = R5_VERSION if _asks_r5() else R4_VERSION
        return _fhir_json(_capability_statement(state.base_url or "", version), headers=_version_header(version))

    @app.post("/auth/token")
    def token() -> Response:
        fault = state.faults.take("token")
        if fault is not None:
            return _fault_response(fault)
        try:
            body = state.issuer.issue(request.form, f"{state.base_url}/auth/token")
        except SmartError as err:
            state.audit.record("token-denied", client_id=_claimed_client(), error=err.error,
                               scopes=request.form.get("scope", ""), detail=err.description)
            return jsonify(err.as_json()), err.status, {"Cache-Control": "no-store"}
        state.audit.record("token-issued", client_id=_claimed_client(), scopes=body["scope"],
                           expires_in=body["expires_in"])
        return jsonify(body), 200, {"Cache-Control": "no-store", "Pragma": "no-cache"}

    @app.post("/")
    def transaction() -> Response:
        return _transaction(state)

    @app.get("/SubscriptionTopic")
    def topics() -> Response:
        _authorize(state)
        topic = subscription_topic(state.base_url or "")
        return _fhir_json({"resourceType": "Bundle", "type": "searchset", "total": 1,
                           "entry": [{"fullUrl": topic["url"], "resource": topic}]})

    @app.get("/SubscriptionTopic/<topic_id>")
    def topic(topic_id: str) -> Response:
        _authorize(state)
        found = subscription_topic(state.base_url or "")
        if topic_id != found["id"]:
            raise FhirError(404, "not-found", f"SubscriptionTopic/{topic_id} not found")
        return _fhir_json(found)

    @app.post("/Subscription")
    def create_subscription() -> Response:
        return _create_subscription(state)

    @app.route("/Subscription/<sub_id>", methods=["GET", "DELETE"])
    def subscription(sub_id: str) -> Response:
        grant = _authorize(state)
        sub = state.subscriptions.get(sub_id, grant.client_id)
        if sub is None:
            raise FhirError(404, "not-found", f"Subscription/{sub_id} not found")
        if request.method == "DELETE":
            state.subscriptions.delete(sub_id)
            state.audit.record("subscription-deleted", client_id=grant.client_id, subscription=sub_id)
            return Response(status=204)
        return _fhir_json({**sub.resource, "status": sub.status})

    @app.route("/$export", methods=["GET", "POST"])
    def system_export() -> Response:
        return _kickoff(state, "system")

    @app.route("/Patient/$export", methods=["GET", "POST"])
    def patient_export() -> Response:
        return _kickoff(state, "patient")

    @app.route("/Group/<group_id>/$export", methods=["GET", "POST"])
    def group_export(group_id: str) -> Response:
        return _kickoff(state, "group", group_id)

    @app.route("/jobs/<job_id>", methods=["GET", "DELETE"])
    def job_status(job_id: str) -> Response:
        fault = state.faults.take("status") if request.method == "GET" else None
        if fault is not None:
            return _fault_response(fault)
        grant = _authorize(state)
        job = _owned_job(state, job_id, grant)
        if request.method == "DELETE":
            state.audit.record("export-deleted", client_id=grant.client_id, job_id=job.id,
                               scopes=grant.scope_text)
            return _delete_job(state, job)
        return _status_response(state, job)

    @app.get("/files/<job_id>/<name>")
    def download(job_id: str, name: str) -> Response:
        fault = state.faults.take("download")
        if fault is not None and fault.truncate_lines is None and fault.reset_after_lines is None:
            return _fault_response(fault)
        grant = _authorize(state)
        job = _owned_job(state, job_id, grant)
        listed = {entry["url"].rsplit("/", 1)[-1] for entry in job.outputs + job.errors}
        if job.status != "complete" or name not in listed:
            raise FhirError(404, "not-found", f"no output file {name!r} in job {job_id}")
        path = job.folder / name
        entry = next(e for e in job.outputs + job.errors if e["url"].endswith(f"/{name}"))
        state.audit.record("download", client_id=grant.client_id, job_id=job.id, file=name, type=entry["type"],
                           count=entry.get("count"), scopes=grant.scope_text)
        mimetype = NDJSON if job.fhir_version == R4_VERSION else f"{NDJSON}; fhirVersion={job.fhir_version[:3]}"
        if fault is not None and fault.reset_after_lines is not None:
            # announce the whole file, send part of it, then abort: the client sees a broken connection
            return Response(_lines_then_reset(path, fault.reset_after_lines), mimetype=mimetype,
                            headers={"Content-Length": str(path.stat().st_size)})
        if fault is not None:
            return Response(_first_lines(path, fault.truncate_lines or 0), mimetype=mimetype)
        return send_file(path, mimetype=mimetype, conditional=False, max_age=0)


def _claimed_client() -> str | None:
    """The client id a token request claims (for the audit log; the issuer verifies it)."""
    import jwt

    try:
        return str(jwt.decode(request.form.get("client_assertion", ""), options={"verify_signature": False})["iss"])
    except (jwt.PyJWTError, KeyError):
        return None


def _can_create(grant: AccessGrant, resource_type: str) -> bool:
    return any(s.resource_type in ("*", resource_type) and "c" in s.permissions for s in grant.scopes)


def _transaction(state: SiteState) -> Response:
    """Write-back: validate the whole transaction first, then store every entry (all or nothing)."""
    grant = _authorize(state)
    body = request.get_json(force=True, silent=True)
    entries = body.get("entry") if isinstance(body, dict) and isinstance(body.get("entry"), list) else []
    if not _can_create(grant, "RiskAssessment"):
        state.audit.record("write-back-denied", client_id=grant.client_id, scopes=grant.scope_text,
                           entries=len(entries), reason="scope")
        raise FhirError(403, "forbidden", f"the access token's scopes ({grant.scope_text}) do not allow creating "
                                          "RiskAssessment (needs system/RiskAssessment.c or .cu / .write)")
    try:
        checked = validate_transaction(body, lambda patient: state.resolve_patient(patient) is not None)
    except TransactionError as err:
        state.audit.record("write-back-rejected", client_id=grant.client_id, scopes=grant.scope_text,
                           entries=len(entries), status=err.status, where=err.where, error=str(err))
        return _fhir_json({"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "invalid" if err.status == 400 else "processing",
             "diagnostics": str(err), "expression": [err.where]}]}, err.status)
    to_store = []
    for resource, patient in checked:
        site_patient = state.resolve_patient(patient)
        to_store.append({**resource, "id": uuid.uuid4().hex, "subject": {"reference": f"Patient/{site_patient}"}})
    stored = state.add_resources(to_store)
    response_entries = [{"response": {"status": "201 Created",
                                      "location": f"RiskAssessment/{r['id']}/_history/1",
                                      "etag": 'W/"1"', "lastModified": r["meta"]["lastUpdated"]}}
                        for r in stored]
    state.audit.record("write-back", client_id=grant.client_id, scopes=grant.scope_text, entries=len(stored),
                       types=["RiskAssessment"], patients=sorted({p for _, p in checked}),
                       ids=[r["id"] for r in stored])
    return _fhir_json({"resourceType": "Bundle", "id": uuid.uuid4().hex, "type": "transaction-response",
                       "entry": response_entries})


def _create_subscription(state: SiteState) -> Response:
    grant = _authorize(state)
    if not readable_types(grant.scopes, ["Observation"]):
        raise FhirError(403, "forbidden", f"the access token's scopes ({grant.scope_text}) do not allow reading "
                                          "Observation, which the topic notifies about")
    body = request.get_json(force=True, silent=True)
    try:
        sub = state.subscriptions.create(body, grant.client_id)
    except SubscriptionError as err:
        raise FhirError(400, "invalid", str(err)) from None
    state.audit.record("subscription-created", client_id=grant.client_id, subscription=sub.id, status=sub.status,
                       endpoint=sub.endpoint, backport=sub.backport, content=sub.content,
                       heartbeat_s=sub.heartbeat_s, scopes=grant.scope_text)
    location = f"{state.base_url}/Subscription/{sub.id}"
    return _fhir_json({**sub.resource, "status": sub.status}, 201, {"Location": location})


def _lines_then_reset(path: Path, limit: int) -> Iterator[bytes]:
    yield from _first_lines(path, limit)
    raise ConnectionResetError("injected fault: connection reset mid-download")


def _first_lines(path: Path, limit: int) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        for index, line in enumerate(handle):
            if index >= limit:
                return
            yield line


def _owned_job(state: SiteState, job_id: str, grant: AccessGrant) -> ExportJob:
    with state.lock:
        job = state.jobs.get(job_id)
    if job is None or job.client_id != grant.client_id:
        raise FhirError(404, "not-found", f"export job {job_id} not found (never existed or was deleted)")
    return job


def _kickoff(state: SiteState, level: str, group_id: str | None = None) -> Response:
    fault = state.faults.take("kickoff")
    if fault is not None:
        return _fault_response(fault)
    grant = _authorize(state)
    prefer = request.headers.get("Prefer", "")
    prefer_tokens = {token.strip().lower() for token in prefer.split(",")}
    if "respond-async" not in prefer_tokens:
        raise FhirError(400, "invalid", "the Prefer: respond-async header is required for $export")
    accept = request.headers.get("Accept", "*/*")
    if not any(kind in accept for kind in (FHIR_JSON, "application/json", "*/*")):
        raise FhirError(400, "not-supported", f"Accept {accept!r}: only application/fhir+json is supported")
    if group_id is not None and group_id != state.options.group_id:
        raise FhirError(404, "not-found", f"Group/{group_id} not found (this server has Group/{state.options.group_id})")
    export, version = _parse_kickoff(level, group_id, "handling=lenient" in prefer_tokens)
    export = _resolve_patients(state, export)
    types = _job_types(state, export, grant)
    return _start_job(state, grant, export, types, version)


def _asks_r5(params: list[tuple[str, str]] | None = None) -> bool:
    requested = [v for k, v in (params if params is not None else request.args.items(multi=True))
                 if k in VERSION_PARAMETERS]
    return wants_r5(request.headers.get("Accept")) or any(wants_r5(v) for v in requested)


def _version_header(version: str) -> dict[str, str]:
    return {"Content-Type": f"{FHIR_JSON}; fhirVersion={version[:3]}"}


def _parse_kickoff(level: str, group_id: str | None, lenient: bool) -> tuple[ExportRequest, str]:
    if request.method == "POST":
        body = request.get_json(force=True, silent=True)
        params, patients = parameters_from_body(body)
    else:
        params = list(request.args.items(multi=True))
        if any(name == "patient" for name, _ in params):
            raise FhirError(400, "invalid", "the patient parameter is only accepted in a POST kick-off")
        patients = []
    for name, value in params:
        if name in VERSION_PARAMETERS and not (wants_r5(value) or value.startswith("4.0")):
            raise FhirError(400, "not-supported", f"{name}={value!r}: this server serves FHIR 4.0 and 5.0")
    version = R5_VERSION if _asks_r5(params) else R4_VERSION
    params = [(k, v) for k, v in params if k not in VERSION_PARAMETERS]
    return build_export_request(level, params, patients, lenient, group_id), version


def _resolve_patients(state: SiteState, export: ExportRequest) -> ExportRequest:
    """With de-identification, clients know patients by pseudonym: map them back to the site's ids."""
    if not export.patients or state.deid is None:
        return export
    resolved = frozenset(state.resolve_patient(p) or p for p in export.patients)
    return dataclasses.replace(export, patients=resolved)


def _job_types(state: SiteState, export: ExportRequest, grant: AccessGrant) -> list[str]:
    available = state.available_types()
    if export.types is not None:
        denied = [t for t in export.types if t not in readable_types(grant.scopes, [t])]
        if denied:
            raise FhirError(403, "forbidden", f"the access token's scopes ({grant.scope_text}) do not allow "
                                              f"reading {', '.join(denied)}")
        return [t for t in export.types if t in available]
    return readable_types(grant.scopes, available)


def _start_job(state: SiteState, grant: AccessGrant, export: ExportRequest, types: list[str],
               version: str = R4_VERSION) -> Response:
    job_id = uuid.uuid4().hex
    with state.lock:
        if state.running_jobs() >= state.options.max_concurrent_jobs:
            raise FhirError(429, "throttled", f"too many concurrent export jobs "
                                              f"(limit {state.options.max_concurrent_jobs}); retry later",
                            {"Retry-After": str(state.options.retry_after_s)})
        folder = state.work_dir / job_id
        folder.mkdir(parents=True)
        transaction_time, added = state.new_transaction_time()
        job = ExportJob(job_id, grant.client_id, request.url, export, types, folder,
                        transaction_time=transaction_time, fhir_version=version, added=added)
        state.jobs[job_id] = job
    state.audit.record("export-kickoff", client_id=grant.client_id, job_id=job_id, scopes=grant.scope_text,
                       level=export.level, types=types, since=_iso(export.since) if export.since else None,
                       patients=sorted(export.patients) if export.patients else "all",
                       fhir_version=version, deidentified=state.deid is not None)
    job.thread = threading.Thread(target=run_export_job, args=(state, job), name=f"export-{job_id[:8]}",
                                  daemon=True)
    job.thread.start()
    status_url = f"{state.base_url}/jobs/{job_id}"
    body = operation_outcome("informational", f"export job accepted; poll {status_url}", "information")
    return _fhir_json(body, 202, {"Content-Location": status_url})


def _status_response(state: SiteState, job: ExportJob) -> Response:
    if job.status == "running":
        return Response(status=202, headers={"X-Progress": job.progress, "Retry-After": str(state.options.retry_after_s)})
    if job.status == "failed":
        return _fhir_json(operation_outcome("exception", f"export failed: {job.failure}"), 500)
    response = jsonify(_manifest(job, state.deid is not None))
    response.headers["Expires"] = _http_date(_utc_now() + dt.timedelta(hours=1))
    return response


def _http_date(moment: dt.datetime) -> str:
    return moment.strftime("%a, %d %b %Y %H:%M:%S GMT")


def _delete_job(state: SiteState, job: ExportJob) -> Response:
    with state.lock:
        state.jobs.pop(job.id, None)
    job.cancel.set()
    if job.thread is not None:
        job.thread.join(timeout=10)
    shutil.rmtree(job.folder, ignore_errors=True)
    return Response(status=202)


def _smart_configuration(base: str) -> dict[str, Any]:
    return {
        "issuer": base,
        "token_endpoint": f"{base}/auth/token",
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": list(SIGNING_ALGORITHMS),
        "scopes_supported": list(SCOPES_SUPPORTED),
        "capabilities": ["client-confidential-asymmetric", "permission-v2", "permission-v1"],
    }


def _capability_statement(base: str, version: str = R4_VERSION) -> dict[str, Any]:
    export_op = {"name": "export", "definition": f"{BULK_BASE}/OperationDefinition/export"}
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": _iso(_utc_now()),
        "kind": "instance",
        "fhirVersion": version,
        "format": ["json"],
        "instantiates": [f"{BULK_BASE}/CapabilityStatement/bulk-data"],
        "implementation": {"description": "fedlab simulated hospital (Bulk Data $export)", "url": base},
        "rest": [{
            "mode": "server",
            "security": {
                "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                         "code": "SMART-on-FHIR"}]}],
                "extension": [{"url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                               "extension": [{"url": "token", "valueUri": f"{base}/auth/token"}]}],
            },
            "resource": [
                {"type": "Patient", "operation": [
                    {"name": "export", "definition": f"{BULK_BASE}/OperationDefinition/patient-export"}]},
                {"type": "Group", "operation": [
                    {"name": "export", "definition": f"{BULK_BASE}/OperationDefinition/group-export"}]},
                # The R4 statement lists only the export resources (kept stable for R4 clients); the R5
                # one also declares write-back and Subscriptions.
                *([] if version == R4_VERSION else [
                    {"type": "RiskAssessment", "interaction": [{"code": "create"}]},
                    {"type": "Subscription", "interaction": [{"code": "create"}, {"code": "read"},
                                                             {"code": "delete"}]},
                    {"type": "SubscriptionTopic", "interaction": [{"code": "read"}, {"code": "search-type"}]}]),
            ],
            "interaction": [{"code": "transaction"}],
            "operation": [export_op],
        }],
    }


# ---------------------------------------------------------------- serving
class SiteServer:
    """Serve a site's app with waitress on a free loopback port: `with SiteServer(...) as srv: srv.base_url`."""

    def __init__(self, bulk_dir: str | Path, registry: ClientRegistry, host: str = "127.0.0.1", port: int = 0,
                 threads: int = 4, **app_options: Any) -> None:
        self.app = make_app(bulk_dir, registry, **app_options)
        self.state: SiteState = self.app.extensions["fedlab_site"]
        self.host, self.port, self.threads = host, port, threads
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("SiteServer is not running (use it as a context manager or call start())")
        return f"http://{self.host}:{self._server.effective_port}"

    @property
    def issuer(self) -> TokenIssuer:
        return self.state.issuer

    @property
    def faults(self) -> FaultInjector:
        return self.state.faults

    def add_resources(self, resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Simulate new data arriving at the hospital (stamped `meta.lastUpdated` = now; notifies subscribers)."""
        return self.state.add_resources(resources)

    def audit_records(self) -> list[dict[str, Any]]:
        return self.state.audit.records()

    def start(self) -> SiteServer:
        self._server = waitress.create_server(self.app, host=self.host, port=self.port, threads=self.threads,
                                              asyncore_loop_timeout=0.2, clear_untrusted_proxy_headers=True)
        self.state.base_url = self.base_url
        self._thread = threading.Thread(target=self._server.run, name=f"site-server-{self.base_url}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self.state.shutdown()
        server_map = self._server._map
        # Close every socket from inside the server's own loop thread (closing them from here races
        # with its select()); with an empty map the loop returns.
        try:
            self._server.trigger.pull_trigger(lambda: wasyncore.close_all(server_map, ignore_all=True))
        except OSError:  # the loop already closed its trigger (it was exiting): close from here
            wasyncore.close_all(server_map, ignore_all=True)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server.task_dispatcher.shutdown()
        self._server = None

    def __enter__(self) -> SiteServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_site(exp: Experiment, run: str | None, site_id: str, port: int = 0, block: bool = True,
               **app_options: Any) -> SiteServer:
    """Serve one site's generated data with its node's client registered (`fedlab serve`).

    The node may also write predictions back (`system/RiskAssessment.cu`); with
    `exp.export.deidentify` everything served is de-identified; the audit log goes to
    `data/export/<run>/_audit/<site>.jsonl`.
    """
    from fedlab.fhir.site import audit_log_path, node_credentials, site_bulk_dir, site_deid_policy
    from fedlab.fhir.writeback import WRITE_SCOPE

    bulk_dir = site_bulk_dir(exp, run, site_id)
    client_id, key = node_credentials(exp, run, site_id)
    registry = ClientRegistry()
    registry.register(client_id, key.jwks(), f"{exp.export.scope} {WRITE_SCOPE}")
    if exp.export.deidentify:
        app_options.setdefault("deid_policy", site_deid_policy(exp, run, site_id))
    app_options.setdefault("audit_path", audit_log_path(exp, run, site_id))
    server = SiteServer(bulk_dir, registry, host=exp.export.host, port=port, **app_options).start()
    print(f"site {site_id}: FHIR Bulk Data server at {server.base_url} (client_id {client_id})", flush=True)
    if not block:
        return server
    try:
        while server._thread is not None and server._thread.is_alive():
            server._thread.join(timeout=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return server
