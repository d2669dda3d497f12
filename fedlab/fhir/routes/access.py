"""What every route needs: the site's state, the caller's access grant, the FHIR version asked for."""

from __future__ import annotations

from flask import current_app, request

from fedlab.fhir.http import FHIR_JSON, FhirError
from fedlab.fhir.r5 import wants_r5
from fedlab.fhir.smart import AccessGrant, SmartError
from fedlab.fhir.state import SiteState

VERSION_PARAMETERS = ("_fhirVersion", "fhirVersion")


def site_state() -> SiteState:
    """The state of the site whose app serves the current request."""
    return current_app.extensions["fedlab_site"]


def authorize(state: SiteState) -> AccessGrant:
    """The grant of the request's bearer token; 401 with `WWW-Authenticate` otherwise."""
    try:
        return state.issuer.check(request.headers.get("Authorization"))
    except SmartError as err:
        raise FhirError(401, "login", err.description,
                        {"WWW-Authenticate": f'Bearer error="{err.error}", error_description="{err.description}"'}
                        ) from None


def can_create(grant: AccessGrant, resource_type: str) -> bool:
    return any(s.resource_type in ("*", resource_type) and "c" in s.permissions for s in grant.scopes)


def asks_r5(params: list[tuple[str, str]] | None = None) -> bool:
    requested = [v for k, v in (params if params is not None else request.args.items(multi=True))
                 if k in VERSION_PARAMETERS]
    return wants_r5(request.headers.get("Accept")) or any(wants_r5(v) for v in requested)


def version_header(version: str) -> dict[str, str]:
    return {"Content-Type": f"{FHIR_JSON}; fhirVersion={version[:3]}"}
