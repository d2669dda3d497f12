"""Write the trained model's per-patient risk back to the hospital as FHIR R4 `RiskAssessment`s.

Client side: `build_risk_assessments` and `write_back` (one transaction Bundle POSTed to the
server base with a `system/RiskAssessment.cu` token). Server side: `validate_transaction`, which
checks every entry before anything is stored (all or nothing) and names the entry and field of
the first problem.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import requests

from fedlab.errors import FedlabError
from fedlab.fhir.bulk import BulkDataClient
from fedlab.fhir.smart import ClientKey

FHIR_JSON = "application/fhir+json"
WRITE_SCOPE = "system/RiskAssessment.cu"
SNOMED = "http://snomed.info/sct"
T2D_CODE, T2D_DISPLAY = "44054006", "Diabetes mellitus type 2 (disorder)"
MODEL_SYSTEM = "https://fedlab.example.org/fhir/CodeSystem/models"


class WriteBackError(FedlabError):
    """The server refused the write-back; `status` and `outcome` carry its answer."""

    def __init__(self, message: str, status: int | None = None, outcome: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.outcome = status, outcome


class TransactionError(ValueError):
    """An invalid transaction entry: HTTP status, entry index and the FHIRPath-like field."""

    def __init__(self, status: int, index: int | None, field: str, message: str) -> None:
        where = f"Bundle.entry[{index}].{field}" if index is not None else f"Bundle.{field}" if field else "Bundle"
        super().__init__(f"{where}: {message}")
        self.status, self.index, self.field, self.where = status, index, field, where


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def risk_assessment(patient_id: str, probability: float, model_name: str, run: str,
                    occurrence: str | None = None) -> dict[str, Any]:
    """One R4 RiskAssessment for the T2D outcome of a patient."""
    return {
        "resourceType": "RiskAssessment",
        "status": "final",
        "subject": {"reference": f"Patient/{patient_id}"},
        "occurrenceDateTime": occurrence or _now(),
        "method": {"coding": [{"system": MODEL_SYSTEM, "code": model_name, "display": f"{model_name} ({run})"}],
                   "text": f"fedlab model {model_name}, run {run}"},
        "basis": [{"display": f"fedlab run {run}, model {model_name}"}],
        "prediction": [{"outcome": {"coding": [{"system": SNOMED, "code": T2D_CODE, "display": T2D_DISPLAY}],
                                    "text": "Type 2 diabetes"},
                        "probabilityDecimal": probability}],
    }


def build_risk_assessments(predictions: Iterable[Mapping[str, Any]], model_name: str, run: str,
                           occurrence: str | None = None) -> list[dict[str, Any]]:
    """RiskAssessments from `[{patient_id, probability}]`; the probability must lie in [0, 1]."""
    resources = []
    for index, row in enumerate(predictions):
        if "patient_id" not in row or "probability" not in row:
            raise ValueError(f"predictions[{index}]: needs patient_id and probability (got {sorted(row)})")
        probability = float(row["probability"])
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"predictions[{index}]: probability {probability} is outside [0, 1]")
        resources.append(risk_assessment(str(row["patient_id"]), probability, model_name, run, occurrence))
    return resources


def transaction_bundle(resources: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """A transaction Bundle creating each resource (POST to its type)."""
    return {"resourceType": "Bundle", "type": "transaction",
            "entry": [{"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": resource,
                       "request": {"method": "POST", "url": resource["resourceType"]}} for resource in resources]}


def write_back(base_url: str, client_id: str, key: ClientKey, predictions: list[dict[str, Any]], model_name: str,
               run: str, *, scope: str = WRITE_SCOPE, occurrence: str | None = None,
               timeout_s: float = 60.0) -> dict[str, Any]:
    """POST the predictions as one transaction; returns the transaction-response Bundle."""
    bundle = transaction_bundle(build_risk_assessments(predictions, model_name, run, occurrence))
    with BulkDataClient(base_url, client_id, key, scope, progress=False, timeout_s=timeout_s) as client:
        token = client.access_token()
        response = client.control.post(client.base_url + "/", json=bundle, timeout=timeout_s,
                                       headers={"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON,
                                                "Accept": FHIR_JSON})
    return _checked_response(response, base_url)


def _checked_response(response: requests.Response, base_url: str) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200:
        diagnostics = "; ".join(str(i.get("diagnostics")) for i in (body or {}).get("issue", [])) \
            if isinstance(body, dict) else response.text[:300]
        raise WriteBackError(f"{base_url}: write-back refused (HTTP {response.status_code}): {diagnostics}",
                             response.status_code, body if isinstance(body, dict) else None)
    if not isinstance(body, dict) or body.get("type") != "transaction-response":
        raise WriteBackError(f"{base_url}: expected a transaction-response Bundle", response.status_code)
    return body


# ---------------------------------------------------------------- server side
def _field_of(error: Mapping[str, Any]) -> str:
    parts: list[str] = []
    for item in error.get("loc", ()):
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        elif item != "__root__":
            parts.append(str(item))
    return ".".join(parts)


def _validate_structure(resource: dict[str, Any], index: int) -> None:
    from fhir.resources.R4B.riskassessment import RiskAssessment
    from pydantic import ValidationError

    try:
        RiskAssessment.model_validate(resource)
    except ValidationError as err:
        first = err.errors()[0]
        field = _field_of(first)
        raise TransactionError(400, index, f"resource.{field}" if field else "resource",
                               f"{first.get('msg')} ({len(err.errors())} problem(s))") from None


def _validate_content(resource: dict[str, Any], index: int, patient_exists: Callable[[str], bool]) -> str:
    if resource.get("status") != "final":
        raise TransactionError(422, index, "resource.status", f"must be 'final', not {resource.get('status')!r}")
    reference = (resource.get("subject") or {}).get("reference", "")
    if not isinstance(reference, str) or not reference.startswith("Patient/"):
        raise TransactionError(422, index, "resource.subject.reference", f"{reference!r} is not Patient/<id>")
    patient = reference[len("Patient/"):]
    if not patient_exists(patient):
        raise TransactionError(422, index, "resource.subject.reference", f"Patient/{patient} does not exist")
    predictions = resource.get("prediction") or []
    if not predictions or "probabilityDecimal" not in predictions[0]:
        raise TransactionError(422, index, "resource.prediction[0].probabilityDecimal", "is required")
    probability = predictions[0]["probabilityDecimal"]
    if not 0 <= float(probability) <= 1:
        raise TransactionError(422, index, "resource.prediction[0].probabilityDecimal",
                               f"{probability} is outside [0, 1]")
    return patient


def validate_transaction(bundle: Any, patient_exists: Callable[[str], bool],
                         allowed_types: Iterable[str] = ("RiskAssessment",)) -> list[tuple[dict[str, Any], str]]:
    """Check a whole transaction; returns (resource, subject patient id) per entry or raises TransactionError."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise TransactionError(400, None, "", "the body must be a FHIR Bundle")
    if bundle.get("type") != "transaction":
        raise TransactionError(400, None, "type", f"must be 'transaction', not {bundle.get('type')!r}")
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not entries:
        raise TransactionError(400, None, "entry", "a transaction needs at least one entry")
    allowed = set(allowed_types)
    checked = []
    for index, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        request = entry.get("request") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            raise TransactionError(400, index, "resource", "is missing")
        if not isinstance(request, dict) or request.get("method") != "POST":
            raise TransactionError(400, index, "request.method", "only POST (create) is supported")
        kind = resource.get("resourceType")
        if kind not in allowed or request.get("url") != kind:
            raise TransactionError(422, index, "request.url",
                                   f"{request.get('url')!r}: only {', '.join(sorted(allowed))} can be created here")
        _validate_structure(resource, index)
        checked.append((resource, _validate_content(resource, index, patient_exists)))
    return checked
