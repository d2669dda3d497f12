"""Discovery and token: `/.well-known/smart-configuration` and `POST /auth/token` (SMART Backend
Services: a client credentials grant with a signed JWT assertion)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request

from fedlab.fhir.faults import fault_response
from fedlab.fhir.routes.access import site_state
from fedlab.fhir.smart import SCOPES_SUPPORTED, SIGNING_ALGORITHMS, SmartError

discovery = Blueprint("discovery", __name__)


@discovery.get("/.well-known/smart-configuration")
def smart_configuration() -> Response:
    return jsonify(_smart_configuration(site_state().base_url or ""))


@discovery.post("/auth/token")
def token() -> Response:
    state = site_state()
    fault = state.faults.take("token")
    if fault is not None:
        return fault_response(fault)
    try:
        body = state.issuer.issue(request.form, f"{state.base_url}/auth/token")
    except SmartError as err:
        state.audit.record("token-denied", client_id=_claimed_client(), error=err.error,
                           scopes=request.form.get("scope", ""), detail=err.description)
        return jsonify(err.as_json()), err.status, {"Cache-Control": "no-store"}
    state.audit.record("token-issued", client_id=_claimed_client(), scopes=body["scope"],
                       expires_in=body["expires_in"])
    return jsonify(body), 200, {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _claimed_client() -> str | None:
    """The client id a token request claims (for the audit log; the issuer verifies it)."""
    import jwt

    try:
        return str(jwt.decode(request.form.get("client_assertion", ""), options={"verify_signature": False})["iss"])
    except (jwt.PyJWTError, KeyError):
        return None


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
