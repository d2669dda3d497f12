"""The FHIRPath functions SQL-on-FHIR v2 adds or relies on, as plain Python over JSON values.

`getResourceKey()` and `getReferenceKey([Type])` give the keys views join on; `lowBoundary()` and
`highBoundary()` the bounds of a decimal, date, dateTime or time. The subset compiler
(`fedlab.views.fhirpath`) calls them directly, and fhirpathpy receives them as user functions
(`fedlab.views.runner`), so both evaluators give the same values.
"""

from __future__ import annotations

import calendar
import re
from decimal import Decimal
from typing import Any

_REFERENCE = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")
_URN = re.compile(r"^urn:(?:uuid|oid):(.+)$")


def resource_key(resource: Any) -> list[Any]:
    if isinstance(resource, dict) and "resourceType" in resource and resource.get("id") is not None:
        return [resource["id"]]
    return []


def reference_key(reference: Any, wanted_type: str | None) -> list[Any]:
    """The key of the resource a Reference points to: `Type/id`, an absolute URL or `urn:uuid:id`.

    A `urn:uuid:` reference (a Bundle-internal link) carries no type; its `type` element is
    checked when present, else the key is returned, since the id alone identifies the target.
    """
    if not isinstance(reference, dict) or not isinstance(reference.get("reference"), str):
        return []
    text = reference["reference"]
    simple = SIMPLE_REFERENCES.get(text)
    if simple is None:
        simple = _simple_reference(text)
        if simple is not None:
            if len(SIMPLE_REFERENCES) >= 200_000:  # bounded: a site's patients and encounters fit
                SIMPLE_REFERENCES.clear()
            SIMPLE_REFERENCES[text] = simple
    declared_type = reference.get("type")
    if simple is not None:
        ref_type, key = simple
        ref_type = ref_type or declared_type  # a `urn:uuid:` reference is typed by its `type` element
        if wanted_type is not None and ref_type is not None and ref_type != wanted_type:
            return []
        return [key]
    match = _REFERENCE.search(text)
    if match:
        ref_type, key = match.group(1), match.group(2)
    else:
        urn = _URN.match(text)
        if not urn:
            return []
        ref_type, key = declared_type, urn.group(1)
    if wanted_type is not None and ref_type is not None and ref_type != wanted_type:
        return []
    return [key]


# Reference text -> (type or None, id), for the simple forms (`Type/id`, `urn:uuid:id`) met so far.
SIMPLE_REFERENCES: dict[str, tuple[str | None, str]] = {}
_ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-."


def _simple_reference(text: str) -> tuple[str, str] | None:
    """(type, id) of `Type/id`, or (None, id) of a slash-free `urn:uuid:id`, checked without regex;
    None for every other shape, which the regular expressions then decide."""
    if "/" not in text:
        if text.startswith("urn:uuid:") and len(text) > 9 and "\n" not in text and "\r" not in text:
            return None, text[9:]
        return None
    ref_type, _, key = text.partition("/")
    if (0 < len(key) <= 64 and not key.strip(_ID_CHARS) and len(ref_type) > 1 and ref_type.isascii()
            and ref_type.isalpha() and "A" <= ref_type[0] <= "Z"):
        return ref_type, key  # `key` has no `/`: it is made of _ID_CHARS only
    return None


_DATE = re.compile(r"^(\d{4})(?:-(\d{2}))?(?:-(\d{2}))?$")
_DATETIME = re.compile(r"^(\d{4}(?:-\d{2}(?:-\d{2})?)?)(?:T([\d:.]+)?(Z|[+-]\d{2}:\d{2})?)?$")
_TIME = re.compile(r"^(\d{2})(?::(\d{2}))?(?::(\d{2}))?(?:\.(\d+))?$")


def boundary(value: Any, value_type: str | None, high: bool) -> Any:
    """FHIRPath lowBoundary()/highBoundary() of a decimal, date, dateTime or time value.

    `value_type` disambiguates `2010-10-10` (a date, or a dateTime without time); when unknown the
    value's shape decides (no `T` means a date).
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float | Decimal):
        return _decimal_boundary(Decimal(str(value)), high)
    if not isinstance(value, str):
        return None
    if value_type == "time" or (value_type is None and _TIME.match(value) and ":" in value):
        return _time_boundary(value, high)
    if value_type in ("dateTime", "instant") or (value_type is None and "T" in value):
        return _datetime_boundary(value, high)
    if _DATE.match(value):
        return _date_boundary(value, high)
    return None


def _decimal_boundary(number: Decimal, high: bool) -> float:
    exponent = number.as_tuple().exponent
    places = -exponent if isinstance(exponent, int) and exponent < 0 else 0
    half = Decimal(5).scaleb(-(places + 1))
    return float(number + half if high else number - half)


def _date_boundary(value: str, high: bool) -> str:
    year, month, day = _DATE.match(value).groups()  # type: ignore[union-attr]
    month = month or ("12" if high else "01")
    if day is None:
        day = f"{calendar.monthrange(int(year), int(month))[1]:02d}" if high else "01"
    return f"{year}-{month}-{day}"


def _time_boundary(value: str, high: bool) -> str | None:
    match = _TIME.match(value)
    if not match:
        return None
    hour, minute, second, fraction = match.groups()
    fill = "59" if high else "00"
    millis = (fraction or "").ljust(3, "9" if high else "0")[:3]
    return f"{hour}:{minute or fill}:{second or fill}.{millis}"


def _datetime_boundary(value: str, high: bool) -> str | None:
    match = _DATETIME.match(value)
    if not match:
        return None
    date, time, zone = match.groups()
    day = _date_boundary(date, high)
    clock = _time_boundary(time, high) if time else ("23:59:59.999" if high else "00:00:00.000")
    # Without a zone the instant could be anywhere from UTC+14 to UTC-12.
    return f"{day}T{clock}{zone or ('-12:00' if high else '+14:00')}"
