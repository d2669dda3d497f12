"""What a Bulk Data `$export` kick-off asks for, parsed and checked: the export request model.

`build_export_request` turns kick-off parameters (from the query, or a POSTed `Parameters`
resource via `parameters_from_body`) into an `ExportRequest`: level (system, Patient, Group),
`_type`, `_since`, `_typeFilter` (token search parameters), `_elements`, `patient` and
`_outputFormat`. Anything unsupported or malformed is a `FhirError` (400) that names the parameter,
unless the client asked for lenient handling.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from fedlab.fhir.http import NDJSON, FhirError, parse_instant

OUTPUT_FORMATS = ("application/fhir+ndjson", "application/ndjson", "ndjson")
KICKOFF_PARAMETERS = ("_type", "_since", "_outputFormat", "_typeFilter", "_elements", "patient")
MANDATORY_ELEMENTS = ("resourceType", "id", "meta")
# Token search parameters supported inside `_typeFilter`: search parameter -> element (per type).
TOKEN_SEARCH = {
    "code": {"MedicationRequest": "medicationCodeableConcept", "*": "code"},
    "category": {"*": "category"},
    "status": {"*": "status"},
    "clinical-status": {"*": "clinicalStatus"},
    "class": {"*": "class"},
}


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
