"""fedlab's one FHIRPath subset compiler: paths parsed into steps over plain JSON values.

The subset is what views use most: member navigation, `ofType(T)` on a choice element,
`where(path)` and `where(path = 'literal')`, `extension('url')`, `first()`, `last()`, `exists()`,
`empty()`, `join(['sep'])`, `[n]`, `lowBoundary()`, `highBoundary()`, `getResourceKey()`,
`getReferenceKey([Type])`, `$this`, string literals and `%constant`s. A path outside it raises
`Unsupported` at compile time, and the caller uses fhirpathpy for that path.

Each step is a function from a list of values to a list of values, carrying what it is as
attributes (`member`, `choice`, `condition`, `terminal`, ...), which the code generator
(`fedlab.views.codegen`) reads to turn whole paths and views into straight-line Python. At run
time a step raises `NeedsFullEngine` when the data holds a case the subset does not decide alone
(a choice element read without `ofType`, a primitive carrying an extension, a list compared with a
literal, a non-boolean condition); the caller then evaluates with fhirpathpy, so results never
depend on which evaluator ran.

Two evaluators use these steps: `FastPath` (the ViewDefinition runner's, with `%constants` and the
element types fhirpathpy needs for nested selects) and `fedlab.views.codegen.compile_path`
(flatten's, generated code with the steps as its fallback).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from fhirpathpy.models import models

from fedlab.views.functions import boundary, reference_key, resource_key

Step = Callable[[list[Any]], list[Any]]
Condition = Callable[[Any], "bool | None"]
MODEL = models["r4"]

CHOICE_NAMES: frozenset[str] = frozenset(
    path.rsplit(".", 1)[-1] for version in ("r4", "r5") for path in models[version]["choiceTypePaths"]
)
_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^'\\])*')|(?P<num>\d+)|(?P<ident>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<ext>%[A-Za-z_][A-Za-z0-9_]*)|(?P<this>\$this)|(?P<op>[.()\[\]=]))"
)


class NeedsFullEngine(Exception):
    """The data holds a case the subset does not decide; evaluate with fhirpathpy."""


class Unsupported(Exception):
    """A path outside the compiled subset."""


def tokenize(path: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    stripped = path.rstrip()
    while position < len(stripped):
        match = _TOKEN.match(stripped, position)
        if not match or match.end() == position:
            raise Unsupported(path)
        kind = match.lastgroup or ""
        tokens.append((kind, match.group(kind)))
        position = match.end()
    return tokens


def parse(path: str) -> list[Step]:
    """The steps of `path`; `Unsupported` when it leaves the subset."""
    parser = _Parser(tokenize(path))
    steps = parser.path()
    if parser.peek() is not None:
        raise Unsupported(path)
    return steps


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens = tokens
        self.position = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def at(self, kind: str, text: str | None = None) -> bool:
        token = self.peek()
        return token is not None and token[0] == kind and (text is None or token[1] == text)

    def take(self, kind: str, text: str | None = None) -> str:
        if not self.at(kind, text):
            raise Unsupported(str(self.peek()))
        self.position += 1
        return self.tokens[self.position - 1][1]

    def path(self, nested: bool = False) -> list[Step]:
        steps: list[Step] = []
        if self.at("this"):
            self.take("this")  # the focus itself: no step
        elif self.at("ext"):
            if nested:
                raise Unsupported("%constant inside a condition")
            steps.append(external(self.take("ext")[1:]))
        elif self.at("str"):
            steps.append(literal(self.take("str")[1:-1]))
        else:
            steps.append(self.invocation(steps))
        while self.at("op", ".") or self.at("op", "["):
            if self.at("op", "["):
                self.take("op", "[")
                steps.append(index(int(self.take("num"))))
                self.take("op", "]")
                continue
            self.take("op", ".")
            steps.append(self.invocation(steps))
        return steps

    def invocation(self, previous: list[Step]) -> Step:
        name = self.take("ident")
        if not self.at("op", "("):
            if name[0].isupper():
                raise Unsupported(name)  # a type name (`Patient.name`) filters on resourceType
            return member(name)
        self.take("op", "(")
        step = self.function(name, previous)
        self.take("op", ")")
        return step

    def function(self, name: str, previous: list[Step]) -> Step:
        if name in _NO_ARGUMENT:
            return _NO_ARGUMENT[name]()
        if name == "getReferenceKey":
            return reference_keys(self.take("ident") if self.at("ident") else None)
        if name == "join":
            return join(self.take("str")[1:-1] if self.at("str") else "")
        if name == "ofType" and previous and getattr(previous[-1], "member", None) in CHOICE_NAMES:
            return choice(previous.pop().member, self.take("ident"))  # type: ignore[attr-defined]
        if name == "extension" and self.at("str"):
            return extension(self.take("str")[1:-1])
        if name == "where":
            return where(self.condition())
        raise Unsupported(name)

    def condition(self) -> Condition:
        chain = self.path(nested=True)
        if not self.at("op", "="):
            return holds(chain)
        self.take("op", "=")
        return equals(chain, self.take("str")[1:-1])


# ---- steps ------------------------------------------------------------------------------------

def apply(steps: list[Step], items: list[Any]) -> list[Any]:
    for step in steps:
        items = step(items)
    return items


def _same(item_type: str | None) -> str | None:
    return item_type


def _untyped(item_type: str | None) -> None:
    return None


def member(name: str) -> Step:
    """`name`: the element's values (lists flattened, nulls dropped). Undecided when it is absent but
    present as an extension-only primitive (`_name`) or as a choice variant (`nameString`)."""
    may_be_choice = name in CHOICE_NAMES
    extension_key = "_" + name

    def step(items: list[Any]) -> list[Any]:
        found: list[Any] = []
        for item in items:
            if type(item) is not dict:
                if name == "extension":
                    raise NeedsFullEngine("extension of a primitive")
                continue
            value = item.get(name)
            if value is None:
                if extension_key in item or (may_be_choice and has_variant(item, name)):
                    raise NeedsFullEngine(name)
                continue
            if type(value) is list:
                found.extend(v for v in value if v is not None)
            else:
                found.append(value)
        return found

    step.member = name  # type: ignore[attr-defined]
    step.retype = lambda parent: _child_type(parent, name)  # type: ignore[attr-defined]
    return step


def has_variant(item: dict[str, Any], name: str) -> bool:
    size = len(name)
    return any(key.startswith(name) and len(key) > size and key[size].isupper() for key in item)


def choice(base: str, type_name: str) -> Step:
    """`base.ofType(Type)`: the `baseType` element. Where `base` itself is present the element is not
    the choice (R5 `MedicationRequest.medication`): nothing, unless `baseType` is there as well
    (undecided). Undecided too when `baseType` is absent but `_baseType` (an extension-only
    primitive) is present."""
    key = base + type_name[0].upper() + type_name[1:]
    extension_key = "_" + key

    def step(items: list[Any]) -> list[Any]:
        found: list[Any] = []
        for item in items:
            if type(item) is not dict:
                continue
            if base in item:
                if key in item:
                    raise NeedsFullEngine(key)
                continue
            value = item.get(key)
            if value is None:
                if extension_key in item:
                    raise NeedsFullEngine(key)
                continue
            found.extend(value) if type(value) is list else found.append(value)
        return found

    step.choice = (base, key)  # type: ignore[attr-defined]
    step.retype = lambda parent: type_name  # type: ignore[attr-defined]
    return step


def holds(chain: list[Step]) -> Condition:
    """`where(chain)`: the chain's single boolean (None when empty); undecided for anything else."""
    def condition(item: Any) -> bool | None:
        values = apply(chain, [item])
        if not values:
            return None
        if len(values) == 1 and isinstance(values[0], bool):
            return values[0]
        raise NeedsFullEngine("non-boolean condition")

    condition.chain = chain  # type: ignore[attr-defined]
    return condition


def equals(chain: list[Step], text: str) -> Condition:
    """`where(chain = 'text')`: None when the chain is empty; undecided for several values."""
    def condition(item: Any) -> bool | None:
        values = apply(chain, [item])
        if len(values) > 1:
            raise NeedsFullEngine("collection equality")
        return (values[0] == text) if values else None

    condition.chain, condition.literal = chain, text  # type: ignore[attr-defined]
    return condition


def where(condition: Condition) -> Step:
    step = lambda items: [item for item in items if condition(item) is True]  # noqa: E731
    step.condition = condition  # type: ignore[attr-defined]
    step.retype = _same  # type: ignore[attr-defined]
    return step


def extension(url: str) -> Step:
    extensions = member("extension")

    def step(items: list[Any]) -> list[Any]:
        return [e for e in extensions(items) if isinstance(e, dict) and e.get("url") == url]

    step.retype = _untyped  # type: ignore[attr-defined]
    return step


def _terminal(name: str, step: Step, keeps_type: bool = False) -> Step:
    step.terminal = name  # type: ignore[attr-defined]
    step.retype = _same if keeps_type else _untyped  # type: ignore[attr-defined]
    return step


def reference_keys(wanted: str | None) -> Step:
    step = _terminal("getReferenceKey", lambda items: [k for item in items for k in reference_key(item, wanted)])
    step.wanted = wanted  # type: ignore[attr-defined]
    return step


def join(separator: str) -> Step:
    step = lambda items: [separator.join(str(item) for item in items)]  # noqa: E731
    step.retype = _untyped  # type: ignore[attr-defined]
    return step


def index(position: int) -> Step:
    step = lambda items: items[position : position + 1]  # noqa: E731
    step.retype = _same  # type: ignore[attr-defined]
    return step


def literal(text: str) -> Step:
    step = lambda items: [text]  # noqa: E731
    step.retype = _untyped  # type: ignore[attr-defined]
    return step


def external(name: str) -> Step:
    """`%name`: a constant or environment variable; only `FastPath` (which has the environment) runs it."""
    def step(items: list[Any]) -> list[Any]:
        raise Unsupported(f"%{name} needs an environment")

    step.external = name  # type: ignore[attr-defined]
    step.retype = _untyped  # type: ignore[attr-defined]
    return step


def _boundary(high: bool) -> Step:
    def step(items: list[Any], item_type: str | None = None) -> list[Any]:
        return [b for item in items if (b := boundary(item, item_type, high)) is not None]

    step.typed = True  # type: ignore[attr-defined]
    step.retype = _untyped  # type: ignore[attr-defined]
    return step


_NO_ARGUMENT: dict[str, Callable[[], Step]] = {
    "first": lambda: _terminal("first", lambda items: items[:1], keeps_type=True),
    "last": lambda: _terminal("last", lambda items: items[-1:], keeps_type=True),
    "exists": lambda: _terminal("exists", lambda items: [bool(items)]),
    "empty": lambda: _terminal("empty", lambda items: [not items]),
    "getResourceKey": lambda: _terminal("getResourceKey",
                                        lambda items: [k for item in items for k in resource_key(item)]),
    "lowBoundary": lambda: _boundary(high=False),
    "highBoundary": lambda: _boundary(high=True),
}


def _child_type(parent: str | None, name: str) -> str | None:
    """The element type fhirpathpy gives a child node, so typed navigation continues after a step."""
    if parent is None:
        return None
    child = f"{parent}.{name}"
    child = MODEL["pathsDefinedElsewhere"].get(child, child)
    return MODEL["path2Type"].get(child, child)


# ---- the ViewDefinition runner's evaluator ----------------------------------------------------

class FastPath:
    """A compiled subset path: `evaluate` gives plain values, `result_type` their element type."""

    def __init__(self, steps: list[Step]) -> None:
        self.external = getattr(steps[0], "external", None) if steps else None
        self.steps = steps[1:] if self.external is not None else steps
        # Element types are tracked at run time only when a step needs them (the boundaries).
        self.typed = any(getattr(step, "typed", False) for step in self.steps)
        self._result_types: dict[str | None, str | None] = {}

    def evaluate(self, data: Any, env: dict[str, Any], data_type: str | None = None) -> list[Any]:
        if self.external is not None:
            value = env[self.external]
            items = list(value) if isinstance(value, list) else [value]
            data_type = None
        else:
            items = [] if data is None else [data]
        if self.typed:
            for step in self.steps:
                items = step(items, data_type) if getattr(step, "typed", False) else step(items)  # type: ignore[call-arg]
                data_type = step.retype(data_type)  # type: ignore[attr-defined]
            return items
        for step in self.steps:
            items = step(items)
        return items

    def result_type(self, input_type: str | None) -> str | None:
        if input_type not in self._result_types:
            item_type = None if self.external is not None else input_type
            for step in self.steps:
                item_type = step.retype(item_type)  # type: ignore[attr-defined]
            self._result_types[input_type] = item_type
        return self._result_types[input_type]


def compile_fast(path: str) -> FastPath | None:
    """Compile `path` if it is inside the subset, else None."""
    try:
        return FastPath(parse(path))
    except Unsupported:
        return None
