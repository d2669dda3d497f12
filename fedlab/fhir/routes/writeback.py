"""Write-back: `POST /` with a transaction Bundle of RiskAssessments (scope `.c`), validated as a
whole, then stored all or nothing; later exports serve them (also with `_since`)."""

from __future__ import annotations

import uuid

from flask import Blueprint, Response, request

from fedlab.fhir.http import FhirError, fhir_json
from fedlab.fhir.routes.access import authorize, can_create, site_state
from fedlab.fhir.state import SiteState
from fedlab.fhir.writeback import TransactionError, validate_transaction

writeback = Blueprint("writeback", __name__)


@writeback.post("/")
def transaction() -> Response:
    return _transaction(site_state())


def _transaction(state: SiteState) -> Response:
    """Write-back: validate the whole transaction first, then store every entry (all or nothing)."""
    grant = authorize(state)
    body = request.get_json(force=True, silent=True)
    entries = body.get("entry") if isinstance(body, dict) and isinstance(body.get("entry"), list) else []
    if not can_create(grant, "RiskAssessment"):
        state.audit.record("write-back-denied", client_id=grant.client_id, scopes=grant.scope_text,
                           entries=len(entries), reason="scope")
        raise FhirError(403, "forbidden", f"the access token's scopes ({grant.scope_text}) do not allow creating "
                                          "RiskAssessment (needs system/RiskAssessment.c or .cu / .write)")
    try:
        checked = validate_transaction(body, lambda patient: state.resolve_patient(patient) is not None)
    except TransactionError as err:
        state.audit.record("write-back-rejected", client_id=grant.client_id, scopes=grant.scope_text,
                           entries=len(entries), status=err.status, where=err.where, error=str(err))
        return fhir_json({"resourceType": "OperationOutcome", "issue": [
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
    return fhir_json({"resourceType": "Bundle", "id": uuid.uuid4().hex, "type": "transaction-response",
                      "entry": response_entries})
