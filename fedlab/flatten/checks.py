"""Line checks: whether a parsed NDJSON line or bundle entry can become a table row.

A resource of a table's type needs its id, its subject and the fields its row is about (the R4 and
R5 names of an element are alternatives), a numeric `valueQuantity.value` and FHIR-shaped dates.
`check_resource` answers None for a usable resource and a reason (naming the resource and the
field) otherwise; the reason goes to quarantine with the file and line.

The common, valid case is decided by one generated function per type (`_fine_<Type>`: the same
tests unrolled into straight-line code); only a resource that fails it is examined field by field
to word the reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

# Fields a resource must have for its row to mean anything; alternatives separated by "|"
# (R4 and R5 names of the same element are alternatives).
REQUIRED: dict[str, list[str]] = {
    "Patient": ["id", "birthDate"],
    "Encounter": ["id", "subject.reference", "period.start|actualPeriod.start"],
    "Condition": ["id", "subject.reference", "code.coding", "onsetDateTime|onsetPeriod.start|recordedDate"],
    "Observation": ["id", "subject.reference", "code.coding",
                    "effectiveDateTime|effectivePeriod.start|effectiveInstant|issued"],
    "MedicationRequest": ["id", "subject.reference", "medicationCodeableConcept.coding|medication.concept.coding",
                          "authoredOn"],
}
DATETIME_FIELDS: dict[str, list[str]] = {
    "Patient": ["birthDate", "deceasedDateTime"],
    "Encounter": ["period.start", "period.end", "actualPeriod.start", "actualPeriod.end"],
    "Condition": ["onsetDateTime", "onsetPeriod.start", "recordedDate", "abatementDateTime", "abatementPeriod.start"],
    "Observation": ["effectiveDateTime", "effectivePeriod.start", "effectiveInstant", "issued"],
    "MedicationRequest": ["authoredOn"],
}
_REQUIRED_KEYS = {rtype: [[alt.split(".") for alt in spec.split("|")] for spec in specs]
                  for rtype, specs in REQUIRED.items()}
_DATETIME_KEYS = {rtype: [(name, name.split(".")) for name in names] for rtype, names in DATETIME_FIELDS.items()}
_DATETIME = re.compile(r"^\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$")

def get_keys(node: Any, keys: list[str]) -> Any:
    """`node[keys[0]][keys[1]]...`, None where a step is not an object or the key is absent."""
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def check_resource(resource: Any, expected_type: str | None) -> str | None:
    """The reason a resource cannot be used, or None if it is fine."""
    if type(resource) is dict:
        rtype = resource.get("resourceType")
        if type(rtype) is str and (rtype == expected_type or not expected_type):
            fine = _FINE.get(rtype)
            if fine is not None and fine(resource):
                return None
    return _reason(resource, expected_type)


def _reason(resource: Any, expected_type: str | None) -> str | None:
    """`check_resource` field by field, which also words the reason."""
    if not isinstance(resource, dict):
        return f"not a JSON object (got {type(resource).__name__})"
    rtype = resource.get("resourceType")
    if expected_type and rtype != expected_type:
        return f"resourceType {rtype!r} in a {expected_type} file"
    if rtype not in REQUIRED:
        return None
    for spec, alternatives in zip(REQUIRED[rtype], _REQUIRED_KEYS[rtype], strict=True):
        if not _present(resource, alternatives):
            return f"{rtype} {resource.get('id', '?')}: missing required field {spec}"
    quantity = resource.get("valueQuantity")
    value = quantity.get("value") if isinstance(quantity, dict) else None
    if value is not None and type(value) is not float and (isinstance(value, bool) or not isinstance(value, int)):
        return f"{rtype} {resource.get('id', '?')}: valueQuantity.value is not a number: {value!r}"
    match = _DATETIME.match
    for name, keys in _DATETIME_KEYS[rtype]:
        value = resource.get(keys[0]) if len(keys) == 1 else get_keys(resource, keys)
        if value is not None and not (type(value) is str and match(value)):
            return f"{rtype} {resource.get('id', '?')}: invalid dateTime in {name}: {value!r}"
    return None


def _fine_source(rtype: str) -> str:
    """A function `_fine_<rtype>(resource)` that is True exactly when `_reason` finds nothing wrong with
    a dict of that type: the same tests, unrolled into straight-line code for the common, valid case."""
    lines = [f"def _fine_{rtype}(r):"]

    def fetch(keys: list[str], indent: str) -> list[str]:
        out = [f"{indent}v = r.get({keys[0]!r})"]
        out += [f"{indent}v = v.get({key!r}) if isinstance(v, dict) else None" for key in keys[1:]]
        return out

    for alternatives in _REQUIRED_KEYS[rtype]:
        indent = "    "
        for keys in alternatives:  # a later alternative is read only when the earlier ones are absent
            lines += fetch(keys, indent)
            lines.append(f'{indent}if v is None or v == "" or v == []:')
            indent += "    "
        lines.append(f"{indent}return False")
    lines += ['    q = r.get("valueQuantity")',
              "    v = q.get('value') if isinstance(q, dict) else None",
              "    if v is not None and type(v) is not float and (isinstance(v, bool) or not isinstance(v, int)):",
              "        return False"]
    for _name, keys in _DATETIME_KEYS[rtype]:
        lines += fetch(keys, "    ")
        lines += ["    if v is not None and not (type(v) is str and (v in _valid or _valid_date(v))):",
                  "        return False"]
    lines.append("    return True")
    return "\n".join(lines)


def _fine_checks() -> dict[str, Callable[[dict[str, Any]], bool]]:
    namespace: dict[str, Any] = {"_valid": _VALID_DATES, "_valid_date": _valid_date}
    for rtype in REQUIRED:
        exec(compile(_fine_source(rtype), "<fedlab.flatten.checks>", "exec"), namespace)  # noqa: S102
    return {rtype: namespace[f"_fine_{rtype}"] for rtype in REQUIRED}


_VALID_DATES: set[str] = set()  # date-times that matched `_DATETIME` (they repeat across a site)


def _valid_date(text: str) -> bool:
    if _DATETIME.match(text) is None:
        return False
    if len(_VALID_DATES) >= 100_000:  # bounded
        _VALID_DATES.clear()
    _VALID_DATES.add(text)
    return True


def _present(resource: dict[str, Any], alternatives: list[list[str]]) -> bool:
    for keys in alternatives:
        node: Any = resource
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None and node != "" and node != []:
            return True
    return False


_FINE = _fine_checks()
