"""`GET /metadata`: the CapabilityStatement, in the FHIR version asked for (R4 or R5)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response

from fedlab.fhir.http import fhir_json, iso, utc_now
from fedlab.fhir.r5 import R4_VERSION, R5_VERSION
from fedlab.fhir.routes.access import asks_r5, site_state, version_header

BULK_BASE = "http://hl7.org/fhir/uv/bulkdata"

metadata = Blueprint("metadata", __name__)


@metadata.get("/metadata")
def capability_statement() -> Response:
    version = R5_VERSION if asks_r5() else R4_VERSION
    return fhir_json(_capability_statement(site_state().base_url or "", version), headers=version_header(version))


def _capability_statement(base: str, version: str = R4_VERSION) -> dict[str, Any]:
    export_op = {"name": "export", "definition": f"{BULK_BASE}/OperationDefinition/export"}
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": iso(utc_now()),
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
