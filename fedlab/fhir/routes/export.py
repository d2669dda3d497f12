"""Bulk Data `$export`: kick-off (system, `Patient/`, `Group/<id>/`), status (poll, DELETE) and files.

A kick-off is checked (Prefer: respond-async, Accept, scopes, the request model of
`fedlab.fhir.export_request`), gets a job in the site's `JobStore` (429 past the concurrency limit)
and answers 202 with the status URL; the status answers 202 with `X-Progress` while the job runs,
then the manifest; the files are served to the job's own client only.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path

from flask import Blueprint, Response, jsonify, request, send_file

from fedlab.fhir.export_request import ExportRequest, build_export_request, parameters_from_body
from fedlab.fhir.faults import fault_response
from fedlab.fhir.http import (
    FHIR_JSON,
    NDJSON,
    FhirError,
    fhir_json,
    http_date,
    iso,
    operation_outcome,
    utc_now,
)
from fedlab.fhir.jobs import ExportJob, manifest
from fedlab.fhir.r5 import R4_VERSION, R5_VERSION, wants_r5
from fedlab.fhir.routes.access import VERSION_PARAMETERS, asks_r5, authorize, site_state
from fedlab.fhir.smart import AccessGrant, readable_types
from fedlab.fhir.state import SiteState

export = Blueprint("export", __name__)


@export.route("/$export", methods=["GET", "POST"])
def system_export() -> Response:
    return _kickoff(site_state(), "system")


@export.route("/Patient/$export", methods=["GET", "POST"])
def patient_export() -> Response:
    return _kickoff(site_state(), "patient")


@export.route("/Group/<group_id>/$export", methods=["GET", "POST"])
def group_export(group_id: str) -> Response:
    return _kickoff(site_state(), "group", group_id)


@export.route("/jobs/<job_id>", methods=["GET", "DELETE"])
def job_status(job_id: str) -> Response:
    state = site_state()
    fault = state.faults.take("status") if request.method == "GET" else None
    if fault is not None:
        return fault_response(fault)
    grant = authorize(state)
    job = _owned_job(state, job_id, grant)
    if request.method == "DELETE":
        state.audit.record("export-deleted", client_id=grant.client_id, job_id=job.id,
                           scopes=grant.scope_text)
        return _delete_job(state, job)
    return _status_response(state, job)


@export.get("/files/<job_id>/<name>")
def download(job_id: str, name: str) -> Response:
    state = site_state()
    fault = state.faults.take("download")
    if fault is not None and fault.truncate_lines is None and fault.reset_after_lines is None:
        return fault_response(fault)
    grant = authorize(state)
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
    job = state.jobs.owned(job_id, grant.client_id)
    if job is None:
        raise FhirError(404, "not-found", f"export job {job_id} not found (never existed or was deleted)")
    return job


def _kickoff(state: SiteState, level: str, group_id: str | None = None) -> Response:
    fault = state.faults.take("kickoff")
    if fault is not None:
        return fault_response(fault)
    grant = authorize(state)
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
    version = R5_VERSION if asks_r5(params) else R4_VERSION
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
        if state.jobs.running() >= state.options.max_concurrent_jobs:
            raise FhirError(429, "throttled", f"too many concurrent export jobs "
                                              f"(limit {state.options.max_concurrent_jobs}); retry later",
                            {"Retry-After": str(state.options.retry_after_s)})
        transaction_time, added = state.new_transaction_time()
        job = state.jobs.add(ExportJob(job_id, grant.client_id, request.url, export, types, state.jobs.folder(job_id),
                                       transaction_time=transaction_time, fhir_version=version, added=added))
    state.audit.record("export-kickoff", client_id=grant.client_id, job_id=job_id, scopes=grant.scope_text,
                       level=export.level, types=types, since=iso(export.since) if export.since else None,
                       patients=sorted(export.patients) if export.patients else "all",
                       fhir_version=version, deidentified=state.deid is not None)
    state.jobs.start(job, state)
    status_url = f"{state.base_url}/jobs/{job_id}"
    body = operation_outcome("informational", f"export job accepted; poll {status_url}", "information")
    return fhir_json(body, 202, {"Content-Location": status_url})


def _status_response(state: SiteState, job: ExportJob) -> Response:
    if job.status == "running":
        return Response(status=202, headers={"X-Progress": job.progress, "Retry-After": str(state.options.retry_after_s)})
    if job.status == "failed":
        return fhir_json(operation_outcome("exception", f"export failed: {job.failure}"), 500)
    response = jsonify(manifest(job, state.deid is not None))
    response.headers["Expires"] = http_date(utc_now() + dt.timedelta(hours=1))
    return response


def _delete_job(state: SiteState, job: ExportJob) -> Response:
    state.jobs.delete(job)
    return Response(status=202)
