"""A hospital's FHIR endpoint: Bulk Data `$export` (system, Patient, Group) behind SMART Backend Services.

`make_app` builds the Flask app over a site's `bulk/<Type>.ndjson` folder; `SiteServer` serves it
with waitress on 127.0.0.1 and a free port. Export jobs run in background threads and write their
output under a private work folder; every data request needs a valid bearer token.
"""

from __future__ import annotations

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

from fedlab.fhir.smart import (
    SCOPES_SUPPORTED,
    SIGNING_ALGORITHMS,
    AccessGrant,
    ClientRegistry,
    SmartError,
    TokenIssuer,
    readable_types,
)

if TYPE_CHECKING:
    from fedlab.config import Experiment

FHIR_JSON = "application/fhir+json"
NDJSON = "application/fhir+ndjson"
OUTPUT_FORMATS = ("application/fhir+ndjson", "application/ndjson", "ndjson")
KICKOFF_PARAMETERS = ("_type", "_since", "_outputFormat", "_typeFilter", "_elements", "patient")
MANDATORY_ELEMENTS = ("resourceType", "id", "meta")
PATIENT_LINKS = ("subject", "patient", "beneficiary")
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


def generation_time(bulk_dir: Path) -> dt.datetime:
    """When the site's data was generated: its `_SUCCESS.json` marker, else the newest NDJSON file."""
    marker = bulk_dir.parent / "_SUCCESS.json"
    candidates = [marker] if marker.is_file() else list(bulk_dir.glob("*.ndjson"))
    newest = max((p.stat().st_mtime for p in candidates), default=0.0)
    return dt.datetime.fromtimestamp(newest, dt.UTC)


def _patient_of(resource: dict[str, Any]) -> str | None:
    if resource.get("resourceType") == "Patient":
        return resource.get("id")
    for link in PATIENT_LINKS:
        value = resource.get(link)
        reference = value.get("reference") if isinstance(value, dict) else None
        if isinstance(reference, str):
            for prefix in ("Patient/", "urn:uuid:"):
                if reference.startswith(prefix):
                    return reference[len(prefix):]
    return None


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
            patient = _patient_of(resource)
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


class SiteState:
    """Everything one site's app holds: data folder, tokens, jobs and options."""

    def __init__(self, bulk_dir: Path, issuer: TokenIssuer, options: SiteOptions, work_dir: Path,
                 faults: FaultInjector) -> None:
        self.bulk_dir, self.issuer, self.options, self.work_dir = bulk_dir, issuer, options, work_dir
        self.faults = faults
        self.jobs: dict[str, ExportJob] = {}
        self.lock = threading.Lock()
        self.base_url: str | None = None

    def available_types(self) -> list[str]:
        return sorted(p.name[: -len(".ndjson")] for p in self.bulk_dir.glob("*.ndjson"))

    def patient_ids(self) -> set[str]:
        path = self.bulk_dir / "Patient.ndjson"
        ids: set[str] = set()
        if path.is_file():
            for _, resource in _read_ndjson(path):
                ids.add(str(resource.get("id")))
        return ids

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
        for index, resource_type in enumerate(job.types, start=1):
            if job.cancel.is_set():
                return
            job.progress = f"exporting {resource_type} ({index}/{len(job.types)} types)"
            _export_type(state, job, resource_type, default_updated)
        _report_missing_patients(state, job)
        job.progress = "100%"
        job.status = "complete"
    except Exception as err:  # noqa: BLE001 - any failure becomes the job's OperationOutcome
        job.failure = str(err)
        job.status = "failed"
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


def _export_type(state: SiteState, job: ExportJob, resource_type: str, default_updated: dt.datetime) -> None:
    path = state.bulk_dir / f"{resource_type}.ndjson"
    if not path.is_file():
        return
    selector = _Selector(job.export, resource_type, default_updated)
    writer = _OutputWriter(job.folder, resource_type, state.options.max_lines_per_file)
    typed_prefix = f'{{"resourceType":"{resource_type}"'
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if number % 5000 == 0 and job.cancel.is_set():
                    return
                if not line.strip():
                    continue
                line = line if line.endswith("\n") else line + "\n"
                looks_whole = line.startswith(typed_prefix) and line.rstrip().endswith("}")
                decision = selector.decide_unparsed(line) if looks_whole else None
                if decision is None:
                    resource = _parse_line(line, path, number, resource_type)
                    if not selector.keep(resource, f"{path}:{number}"):
                        continue
                    trimmed = selector.trim(resource)
                    line = line if trimmed is None else json.dumps(trimmed, separators=(",", ":")) + "\n"
                elif not decision:
                    continue
                writer.write(line)
    finally:
        writer.close()
    for name, count in writer.files:
        job.outputs.append({"type": resource_type, "url": f"{state.base_url}/files/{job.id}/{name}",
                            "count": count})


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


def _manifest(job: ExportJob) -> dict[str, Any]:
    return {"transactionTime": _iso(job.transaction_time), "request": job.request_url,
            "requiresAccessToken": True, "output": job.outputs, "error": job.errors}


# ---------------------------------------------------------------- the app
def make_app(bulk_dir: str | Path, registry: ClientRegistry, *, issuer: TokenIssuer | None = None,
             job_delay_s: float = 0.0, retry_after_s: int = 1, max_concurrent_jobs: int = 4,
             max_lines_per_file: int | None = None, work_dir: str | Path | None = None,
             faults: FaultInjector | None = None, base_url: str | None = None) -> Flask:
    """The site's Flask app. `app.extensions["fedlab_site"]` holds its SiteState (tokens, jobs, faults)."""
    bulk_dir = Path(bulk_dir)
    if not bulk_dir.is_dir():
        raise FileNotFoundError(f"{bulk_dir}: bulk data folder not found")
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="fedlab-export-jobs-"))
    options = SiteOptions(job_delay_s, retry_after_s, max_concurrent_jobs, max_lines_per_file)
    state = SiteState(bulk_dir, issuer or TokenIssuer(registry), options, work, faults or FaultInjector())
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
        return _fhir_json(_capability_statement(state.base_url or ""))

    @app.post("/auth/token")
    def token() -> Response:
        fault = state.faults.take("token")
        if fault is not None:
            return _fault_response(fault)
        try:
            body = state.issuer.issue(request.form, f"{state.base_url}/auth/token")
        except SmartError as err:
            return jsonify(err.as_json()), err.status, {"Cache-Control": "no-store"}
        return jsonify(body), 200, {"Cache-Control": "no-store", "Pragma": "no-cache"}

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
            return _delete_job(state, job)
        return _status_response(state, job)

    @app.get("/files/<job_id>/<name>")
    def download(job_id: str, name: str) -> Response:
        fault = state.faults.take("download")
        if fault is not None and fault.truncate_lines is None:
            return _fault_response(fault)
        grant = _authorize(state)
        job = _owned_job(state, job_id, grant)
        listed = {entry["url"].rsplit("/", 1)[-1] for entry in job.outputs + job.errors}
        if job.status != "complete" or name not in listed:
            raise FhirError(404, "not-found", f"no output file {name!r} in job {job_id}")
        path = job.folder / name
        if fault is not None:
            return Response(_first_lines(path, fault.truncate_lines or 0), mimetype=NDJSON)
        return send_file(path, mimetype=NDJSON, conditional=False, max_age=0)


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
    export = _parse_kickoff(level, group_id, "handling=lenient" in prefer_tokens)
    types = _job_types(state, export, grant)
    return _start_job(state, grant, export, types)


def _parse_kickoff(level: str, group_id: str | None, lenient: bool) -> ExportRequest:
    if request.method == "POST":
        body = request.get_json(force=True, silent=True)
        params, patients = parameters_from_body(body)
    else:
        params = list(request.args.items(multi=True))
        if any(name == "patient" for name, _ in params):
            raise FhirError(400, "invalid", "the patient parameter is only accepted in a POST kick-off")
        patients = []
    return build_export_request(level, params, patients, lenient, group_id)


def _job_types(state: SiteState, export: ExportRequest, grant: AccessGrant) -> list[str]:
    available = state.available_types()
    if export.types is not None:
        denied = [t for t in export.types if t not in readable_types(grant.scopes, [t])]
        if denied:
            raise FhirError(403, "forbidden", f"the access token's scopes ({grant.scope_text}) do not allow "
                                              f"reading {', '.join(denied)}")
        return [t for t in export.types if t in available]
    return readable_types(grant.scopes, available)


def _start_job(state: SiteState, grant: AccessGrant, export: ExportRequest, types: list[str]) -> Response:
    job_id = uuid.uuid4().hex
    with state.lock:
        if state.running_jobs() >= state.options.max_concurrent_jobs:
            raise FhirError(429, "throttled", f"too many concurrent export jobs "
                                              f"(limit {state.options.max_concurrent_jobs}); retry later",
                            {"Retry-After": str(state.options.retry_after_s)})
        folder = state.work_dir / job_id
        folder.mkdir(parents=True)
        job = ExportJob(job_id, grant.client_id, request.url, export, types, folder)
        state.jobs[job_id] = job
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
    response = jsonify(_manifest(job))
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


def _capability_statement(base: str) -> dict[str, Any]:
    export_op = {"name": "export", "definition": f"{BULK_BASE}/OperationDefinition/export"}
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": _iso(_utc_now()),
        "kind": "instance",
        "fhirVersion": "4.0.1",
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
            ],
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
        self._server.trigger.pull_trigger(lambda: wasyncore.close_all(server_map, ignore_all=True))
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
    """Serve one site's generated data with its node's client registered (`fedlab serve`)."""
    from fedlab.fhir.export import node_credentials, site_bulk_dir

    bulk_dir = site_bulk_dir(exp, run, site_id)
    client_id, key = node_credentials(exp, run, site_id)
    registry = ClientRegistry()
    registry.register(client_id, key.jwks(), exp.export.scope)
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
