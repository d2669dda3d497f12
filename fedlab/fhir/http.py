"""The site server's vocabulary: FHIR media types, errors answered as OperationOutcomes, instants."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from flask import Response

FHIR_JSON = "application/fhir+json"
NDJSON = "application/fhir+ndjson"


class FhirError(Exception):
    """An HTTP error answered with an OperationOutcome."""

    def __init__(self, status: int, code: str, diagnostics: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(diagnostics)
        self.status, self.code, self.diagnostics = status, code, diagnostics
        self.headers = headers or {}


def operation_outcome(code: str, diagnostics: str, severity: str = "error") -> dict[str, Any]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}]}


def fhir_json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    response = Response(json.dumps(body), status=status, mimetype=FHIR_JSON)
    response.headers.update(headers or {})
    return response


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def utc_now_ms() -> dt.datetime:
    moment = utc_now()
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def http_date(moment: dt.datetime) -> str:
    return moment.strftime("%a, %d %b %Y %H:%M:%S GMT")


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
