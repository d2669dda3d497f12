"""A fast evaluator for the small FHIRPath subset that flattening views use most.

Paths such as `subject.getReferenceKey(Patient)`, `value.ofType(Quantity).value` or
`code.coding.where(system = 'http://loinc.org').code.first()` are compiled into plain Python
steps over the resource dict. Anything outside the subset returns None from `compile_fast`, and
the caller uses fhirpathpy instead. At run time a step raises `NeedsFullEngine` when the data
holds something the subset cannot decide alone (a choice element read without `ofType`, a
primitive carrying only an extension), and the caller re-evaluates that path with fhirpathpy, so
results never depend on which evaluator ran.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from fhirpathpy.models import models

Step = Callable[[list[Any], dict[str, Any]], list[Any]]
MODEL = models["r4"]

CHOICE_NAMES: frozenset[str] = frozenset(
    path.rsplit(".", 1)[-1] for version in ("r4", "r5") for path in models[version]["choiceTypePaths"]
)
_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^'\\])*')|(?P<num>\d+)|(?P<ident>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<ext>%[A-Za-z_][A-Za-z0-9_]*)|(?P<this>\$this)|(?P<op>[.()\[\]=]))"
)
_REFERENCE = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")
_URN = re.compile(r"^urn:(?:uuid|oid):(.+)$")


class NeedsFullEngine(Exception):
    """The data holds a case the fast subset does not decide; evaluate with fhirpathpy."""


class _Unsupported(Exception):
    pass


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
    simple = _SIMPLE_REFERENCES.get(text)
    if simple is None:
        simple = _simple_reference(text)
        if simple is not None:
            if len(_SIMPLE_REFERENCES) >= 200_000:  # bounded: a site's patients and encounters fit
                _SIMPLE_REFERENCES.clear()
            _SIMPLE_REFERENCES[text] = simple
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


_SIMPLE_REFERENCES: dict[str, tuple[str | None, str]] = {}
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


def _tokenize(path: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    stripped = path.rstrip()
    while position < len(stripped):
        match = _TOKEN.match(stripped, position)
        if not match or match.end() == position:
            raise _Unsupported(path)
        kind = match.lastgroup
        tokens.append((kind or "", match.group(kind)))
        position = match.end()
    return tokens


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]):
        self.tokens = tokens
        self.position = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self, kind: str, text: str | None = None) -> str:
        token = self.peek()
        if token is None or token[0] != kind or (text is not None and token[1] != text):
            raise _Unsupported(str(token))
        self.position += 1
        return token[1]

    def at(self, kind: str, text: str | None = None) -> bool:
        token = self.peek()
        return token is not None and token[0] == kind and (text is None or token[1] == text)

    def path(self) -> list[Step]:
        steps = [self.term()]
        while self.at("op", ".") or self.at("op", "["):
            if self.at("op", "["):
                self.take("op", "[")
                steps.append(_index(int(self.take("num"))))
                self.take("op", "]")
                continue
            self.take("op", ".")
            steps.append(self.invocation(steps))
        return steps

    def term(self) -> Step:
        if self.at("ext"):
            name = self.take("ext")[1:]
            return _untyped(lambda items, env: list(env[name]) if isinstance(env[name], list) else [env[name]])
        if self.at("this"):
            self.take("this")
            return lambda items, env: items
        if self.at("str"):
            literal = self.take("str")[1:-1]
            return _untyped(lambda items, env: [literal])
        return self.invocation([])

    def invocation(self, previous: list[Step]) -> Step:
        name = self.take("ident")
        if not self.at("op", "("):
            if name[0].isupper():
                raise _Unsupported(name)  # a type name (`Patient.name`) filters on resourceType
            return _member(name)
        self.take("op", "(")
        step = self.function(name, previous)
        self.take("op", ")")
        return step

    def function(self, name: str, previous: list[Step]) -> Step:
        if name in _NO_ARGUMENT:
            step = _NO_ARGUMENT[name]
            return step if name in ("first", "last") else _untyped(step)
        if name == "join":
            separator = self.take("str")[1:-1] if self.at("str") else ""
            return _untyped(lambda items, env: [separator.join(str(item) for item in items)])
        if name == "getReferenceKey":
            wanted = self.take("ident") if self.at("ident") else None
            return _untyped(lambda items, env: [key for item in items for key in reference_key(item, wanted)])
        if name == "ofType" and previous and getattr(previous[-1], "member", None) in CHOICE_NAMES:
            type_name = self.take("ident")
            base = previous.pop().member  # type: ignore[attr-defined]
            return _choice_member(base, type_name)
        if name == "where":
            return _where(self.condition())
        raise _Unsupported(name)

    def condition(self) -> Callable[[Any, dict[str, Any]], bool | None]:
        left = self.path()
        if not self.at("op", "="):
            return lambda item, env: _single_boolean(_run(left, [item], env))
        self.take("op", "=")
        literal = self.take("str")[1:-1]

        def equals(item: Any, env: dict[str, Any]) -> bool | None:
            values = _run(left, [item], env)
            if len(values) > 1:
                raise NeedsFullEngine("collection equality")
            return (values[0] == literal) if values else None

        return equals


def _run(steps: list[Step], items: list[Any], env: dict[str, Any], item_type: str | None = None) -> list[Any]:
    for step in steps:
        if getattr(step, "typed", False):
            items = step(items, env, item_type)  # type: ignore[call-arg]
        else:
            items = step(items, env)
        item_type = getattr(step, "retype", _same)(item_type)
    return items


def _same(path: str | None) -> str | None:
    return path


def _single_boolean(values: list[Any]) -> bool | None:
    if not values:
        return None
    if len(values) == 1 and isinstance(values[0], bool):
        return values[0]
    raise NeedsFullEngine("non-boolean condition")


def _member(name: str) -> Step:
    may_be_choice = name in CHOICE_NAMES
    extension_key = "_" + name

    def member(items: list[Any], env: dict[str, Any]) -> list[Any]:
        found: list[Any] = []
        for item in items:
            if not isinstance(item, dict):
                if name == "extension":
                    raise NeedsFullEngine("extension of a primitive")
                continue
            value = item.get(name)
            if value is None:
                if extension_key in item or (may_be_choice and _has_choice_variant(item, name)):
                    raise NeedsFullEngine(name)
                continue
            if isinstance(value, list):
                found.extend(v for v in value if v is not None)
            else:
                found.append(value)
        return found

    member.member = name  # type: ignore[attr-defined]
    member.retype = lambda path: _child_type(path, name)  # type: ignore[attr-defined]
    return member


def _has_choice_variant(item: dict[str, Any], name: str) -> bool:
    size = len(name)
    return any(key.startswith(name) and len(key) > size and key[size].isupper() for key in item)


def _choice_member(base: str, type_name: str) -> Step:
    key = base + type_name[0].upper() + type_name[1:]

    def choice(items: list[Any], env: dict[str, Any]) -> list[Any]:
        found: list[Any] = []
        for item in items:
            if not isinstance(item, dict):
                continue
            if base in item or "_" + key in item:
                raise NeedsFullEngine(base)  # not a choice element here, or extension-only
            value = item.get(key)
            if value is not None:
                found.extend(value) if isinstance(value, list) else found.append(value)
        return found

    choice.retype = lambda path: type_name  # type: ignore[attr-defined]
    return choice


def _child_type(parent: str | None, name: str) -> str | None:
    """The element type fhirpathpy gives a child node, so typed navigation continues after a step."""
    if parent is None:
        return None
    child = f"{parent}.{name}"
    child = MODEL["pathsDefinedElsewhere"].get(child, child)
    return MODEL["path2Type"].get(child, child)


def _untyped(step: Step) -> Step:
    step.retype = lambda path: None  # type: ignore[attr-defined]
    return step


def _index(position: int) -> Step:
    return lambda items, env: items[position : position + 1]


def _where(condition: Callable[[Any, dict[str, Any]], bool | None]) -> Step:
    return lambda items, env: [item for item in items if condition(item, env) is True]


def _boundary_step(high: bool) -> Step:
    def bound(items: list[Any], env: dict[str, Any], item_type: str | None = None) -> list[Any]:
        return [b for item in items if (b := boundary(item, item_type, high)) is not None]

    bound.typed = True  # type: ignore[attr-defined]
    return bound


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


_NO_ARGUMENT: dict[str, Step] = {
    "lowBoundary": _boundary_step(high=False),
    "highBoundary": _boundary_step(high=True),
    "first": lambda items, env: items[:1],
    "last": lambda items, env: items[-1:],
    "exists": lambda items, env: [bool(items)],
    "empty": lambda items, env: [not items],
    "getResourceKey": lambda items, env: [key for item in items for key in resource_key(item)],
}


class FastPath:
    """A compiled subset path: `evaluate` gives plain values, `result_type` their element type."""

    def __init__(self, steps: list[Step]):
        self.steps = steps
        # Element types are tracked at run time only when a step needs them (the boundaries).
        self.typed = any(getattr(step, "typed", False) for step in steps)
        self._result_types: dict[str | None, str | None] = {}

    def evaluate(self, data: Any, env: dict[str, Any], data_type: str | None = None) -> list[Any]:
        items = [] if data is None else [data]
        if self.typed:
            return _run(self.steps, items, env, data_type)
        for step in self.steps:
            items = step(items, env)
        return items

    def result_type(self, input_type: str | None) -> str | None:
        if input_type not in self._result_types:
            item_type = input_type
            for step in self.steps:
                item_type = getattr(step, "retype", _same)(item_type)
            self._result_types[input_type] = item_type
        return self._result_types[input_type]


def compile_fast(path: str) -> FastPath | None:
    """Compile `path` if it is inside the fast subset, else None."""
    try:
        parser = _Parser(_tokenize(path))
        steps = parser.path()
        if parser.peek() is not None:
            return None
    except _Unsupported:
        return None
    return FastPath(steps)
