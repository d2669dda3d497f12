"""Paths of the subset (`fedlab.views.fhirpath`) as generated Python, for flatten's speed.

`compile_path(path)` gives a function of one node: member, `ofType` and `where` chains (plus one
final function) become nested loops over the dicts and lists, with `where(system = '...')` tests
inlined; other chains are walked dict by dict, or run step by step. It gives exactly what the
steps give (`apply(steps, [node])`): wherever a step could raise `NeedsFullEngine` (an
extension-only primitive, a choice variant, a list compared with a literal) the generated code
raises `Generic` first, and the node goes through the steps instead, which then decide.

`Emitter` and `PathSource` are also the building blocks of the view plans' code
(`fedlab.views.plan`), which inline these paths into one function per view.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedlab.views.fhirpath import (
    CHOICE_NAMES,
    Condition,
    NeedsFullEngine,
    Step,
    Unsupported,
    apply,
    has_variant,
    parse,
    where,
)
from fedlab.views.functions import SIMPLE_REFERENCES, reference_key, resource_key

TERMINALS = ("first", "last", "exists", "empty", "getResourceKey", "getReferenceKey")
TESTS = {"exists": "bool({o})", "empty": "not {o}"}


class Generic(Exception):
    """Inside generated path code: this node needs the step-by-step evaluation (`apply`)."""


def compile_path(path: str) -> Callable[[Any], list[Any]]:
    """A path of the subset as a function of one node; `Unsupported` outside it (and for paths that
    need an environment or element types: `%constants`, the boundaries)."""
    steps = optimize(parse(path))
    if any(hasattr(step, "external") or getattr(step, "typed", False) for step in steps):
        raise Unsupported(path)
    walk = generated_path(steps) or scalar_walk(steps)
    if walk is not None:
        return walk
    if len(steps) == 1:
        only = steps[0]
        return lambda node: only([node])
    return lambda node: apply(steps, [node])


def compile_guards(path: str) -> list[Condition] | None:
    """The conditions of a path made only of `where(...)` steps (a filter on the focus), else None."""
    steps = optimize(parse(path))
    if not steps or not all(hasattr(step, "condition") for step in steps):
        return None
    return [step.condition for step in steps]  # type: ignore[attr-defined]


def optimize(steps: list[Step]) -> list[Step]:
    """The same steps, with every `where(...)` condition evaluated by generated code (recursively)."""
    return [where(fast_condition(step.condition)) if hasattr(step, "condition") else step  # type: ignore[attr-defined]
            for step in steps]


def fast_condition(condition: Condition) -> Condition:
    chain = optimize(condition.chain)  # type: ignore[attr-defined]
    literal = getattr(condition, "literal", None)
    evaluate = ((generated_path(chain) or scalar_walk(chain)) if chain else None) or (
        lambda item: apply(chain, [item]))
    if literal is None:
        def holds(item: Any) -> bool | None:
            values = evaluate(item)
            if not values:
                return None
            if len(values) == 1 and isinstance(values[0], bool):
                return values[0]
            raise NeedsFullEngine("non-boolean condition")
        holds.chain = chain  # type: ignore[attr-defined]
        return generated_test(chain, holds) or holds

    def equals(item: Any) -> bool | None:
        values = evaluate(item)
        if len(values) > 1:
            raise NeedsFullEngine("collection equality")
        return (values[0] == literal) if values else None
    equals.chain, equals.literal = chain, literal  # type: ignore[attr-defined]
    return equals


def scalar_walk(steps: list[Step]) -> Callable[[Any], list[Any]] | None:
    """Member/choice chains (plus one final function) walked dict by dict without building lists;
    the first list or doubtful case met on the way hands the node to the steps."""
    terminal = steps[-1] if steps and getattr(steps[-1], "terminal", False) else None
    chain = steps[:-1] if terminal else steps
    keys: list[tuple[str, str | None]] = []  # (key, choice base or None)
    for step in chain:
        if hasattr(step, "member"):
            keys.append((step.member, None))  # type: ignore[attr-defined]
        elif hasattr(step, "choice"):
            base, key = step.choice  # type: ignore[attr-defined]
            keys.append((key, base))
        else:
            return None
    if not keys:
        return None

    def walk(node: Any) -> list[Any]:
        current = node
        for key, base in keys:
            if type(current) is not dict:
                return apply(steps, [node])
            if base is not None and base in current:
                if key in current:
                    return apply(steps, [node])  # the steps decide (they raise NeedsFullEngine)
                return terminal([]) if terminal else []
            value = current.get(key)
            if value is None:
                if "_" + key in current or (base is None and key in CHOICE_NAMES):
                    return apply(steps, [node])
                return terminal([]) if terminal else []
            if type(value) is list:
                return apply(steps, [node])
            current = value
        return terminal([current]) if terminal else [current]

    return walk


class Emitter:
    """Lines of generated Python and the namespace they run in; names are unique per emitter."""

    def __init__(self) -> None:
        self.namespace: dict[str, Any] = {"_Undecided": NeedsFullEngine, "_Generic": Generic,
                                          "_has_variant": has_variant, "_resource_key": resource_key,
                                          "_reference_key": reference_key, "_simple_references": SIMPLE_REFERENCES}
        self.lines: list[str] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def bind(self, value: Any, prefix: str) -> str:
        name = self.name(prefix)
        self.namespace[name] = value
        return name

    def run(self, filename: str, function: str) -> Callable[..., Any]:
        exec(compile("\n".join(self.lines), filename, "exec"), self.namespace)  # noqa: S102
        return self.namespace[function]


class PathSource:
    """A path of member, `ofType` and `where` steps (plus one final function) as generated Python:
    nested loops over the dicts and lists, with the `where(system = '...')` test inlined. Wherever
    the steps could raise `NeedsFullEngine` the code raises `Generic`, and the caller hands the node
    to the steps instead."""

    def __init__(self, steps: list[Step]) -> None:
        last = getattr(steps[-1], "terminal", None) if steps else None
        self.steps = steps
        self.chain = steps[:-1] if last else steps
        self.terminal = last
        self.wanted = getattr(steps[-1], "wanted", None) if last == "getReferenceKey" else None
        for step in self.chain:
            if getattr(step, "terminal", None) or not (
                    getattr(step, "member", "extension") != "extension" or hasattr(step, "choice")
                    or hasattr(step, "condition")):
                raise Unsupported("step outside the generated subset")
        if not steps or (last is not None and last not in TERMINALS):
            raise Unsupported("no steps, or an unknown function")
        self.signature = tuple(signature(step) for step in self.chain)

    def body(self, out: Emitter, var: str, found: str, indent: str) -> None:
        """Lines that append the chain's values for item `var` to the list `found`."""
        self.item(out, self.chain, var, found, indent)

    def result(self, out: Emitter, found: str, target: str, indent: str) -> None:
        """Lines that set `target` to the path's value from the chain's values `found`."""
        kind = self.terminal
        if kind == "getResourceKey":  # `resource_key`, inlined for a dict
            out.lines += [f"{indent}{target} = []", f"{indent}for _i in {found}:",
                          f"{indent}    if type(_i) is not dict:",
                          f"{indent}        {target} += _resource_key(_i)",
                          f"{indent}    elif 'resourceType' in _i and _i.get('id') is not None:",
                          f"{indent}        {target}.append(_i['id'])"]
            return
        if kind == "getReferenceKey":  # `reference_key`, inlined for a typed reference it has seen before
            accept = "True" if self.wanted is None else f"_s[0] == {self.wanted!r}"
            out.lines += [f"{indent}{target} = []", f"{indent}for _i in {found}:",
                          f"{indent}    _t = _i.get('reference') if type(_i) is dict else None",
                          f"{indent}    _s = _simple_references.get(_t) if type(_t) is str else None",
                          f"{indent}    if _s is not None and _s[0] is not None:",
                          f"{indent}        if {accept}:",
                          f"{indent}            {target}.append(_s[1])",
                          f"{indent}    else:",
                          f"{indent}        {target} += _reference_key(_i, {self.wanted!r})"]
            return
        expression = {None: "{o}", "first": "{o}[:1]", "last": "{o}[-1:]", "exists": "[bool({o})]",
                      "empty": "[not {o}]"}[kind]
        out.lines.append(f"{indent}{target} = {expression.format(o=found)}")

    def inline(self, out: Emitter, var: str, target: str, fallback: str, indent: str,
               test: bool = False, known: dict[tuple, str] | None = None, as_bool: bool = False) -> None:
        """Lines that set `target` to the path's value of `var` (with `test`: the where() result of an
        exists()/empty() path; with `as_bool` too: whether it is True), calling `fallback(var)` when
        the node needs the steps.

        `known` maps (chain, item) to the list that already holds the chain's values of that item in
        the code before (None after a fallback); the chain is then not walked again."""
        key = (self.signature, var)
        found = known.get(key) if known is not None else None
        call = f"{fallback}({var}) is True" if as_bool else f"{fallback}({var})"
        if found is not None:
            out.lines += [f"{indent}if {found} is None:", f"{indent}    {target} = {call}", f"{indent}else:"]
        else:
            found = out.name("_o")
            out.lines += [f"{indent}{found} = []", f"{indent}try:"]
            self.body(out, var, found, indent + "    ")
            out.lines += [f"{indent}except _Generic:", f"{indent}    {found} = None",
                          f"{indent}    {target} = {call}", f"{indent}else:"]
            if known is not None:
                known[key] = found
        if test:
            out.lines.append(f"{indent}    {target} = {TESTS[self.terminal].format(o=found)}")  # type: ignore[index]
        else:
            self.result(out, found, target, indent + "    ")

    def item(self, out: Emitter, steps: list[Step], var: str, found: str, indent: str) -> None:
        """Code for one item `var` reaching `steps`."""
        if not steps:
            out.lines.append(f"{indent}{found}.append({var})")
            return
        step, rest = steps[0], steps[1:]
        if hasattr(step, "member"):
            name = step.member  # type: ignore[attr-defined]
            out.lines.append(f"{indent}if type({var}) is dict:")
            self.children(out, var, name, self.missing(var, name), rest, found, indent + "    ", skip_none=True)
        elif hasattr(step, "choice"):
            base, key = step.choice  # type: ignore[attr-defined]
            out.lines += [f"{indent}if type({var}) is dict:", f"{indent}    if {base!r} not in {var}:"]
            self.children(out, var, key, f"{'_' + key!r} in {var}", rest, found, indent + "        ",
                          skip_none=False)
            out.lines += [f"{indent}    elif {key!r} in {var}:", f"{indent}        raise _Generic"]
        else:
            self.where(out, step.condition, var, rest, found, indent)  # type: ignore[attr-defined]

    @staticmethod
    def missing(var: str, name: str) -> str:
        """When a member step raises for an absent element: an extension-only value or a choice variant."""
        test = f"{'_' + name!r} in {var}"
        return f"{test} or _has_variant({var}, {name!r})" if name in CHOICE_NAMES else test

    def children(self, out: Emitter, var: str, key: str, undecided: str, rest: list[Step], found: str,
                 indent: str, skip_none: bool) -> None:
        value, each = out.name("_v"), out.name("_x")
        out.lines += [f"{indent}{value} = {var}.get({key!r})",
                      f"{indent}if {value} is None:",
                      f"{indent}    if {undecided}:",
                      f"{indent}        raise _Generic",
                      f"{indent}elif type({value}) is list:",
                      f"{indent}    for {each} in {value}:"]
        if skip_none:  # a member step drops nulls inside lists; an ofType() step keeps them
            out.lines.append(f"{indent}        if {each} is not None:")
            self.item(out, rest, each, found, indent + "            ")
        else:
            self.item(out, rest, each, found, indent + "        ")
        out.lines.append(f"{indent}else:")
        self.item(out, rest, value, found, indent + "    ")

    def where(self, out: Emitter, condition: Callable[[Any], Any], var: str, rest: list[Step], found: str,
              indent: str) -> None:
        chain = getattr(condition, "chain", None)
        literal = getattr(condition, "literal", None)
        name = getattr(chain[0], "member", None) if chain and len(chain) == 1 else None
        if literal is None or name is None or name == "extension":
            out.lines.append(f"{indent}if {out.bind(condition, '_cond')}({var}) is True:")
            self.item(out, rest, var, found, indent + "    ")
            return
        # `where(name = 'literal')`: the equality over a one-member path, inlined.
        value = out.name("_v")
        out.lines += [f"{indent}if type({var}) is dict:",
                      f"{indent}    {value} = {var}.get({name!r})",
                      f"{indent}    if {value} is None:",
                      f"{indent}        if {self.missing(var, name)}:",
                      f"{indent}            raise _Generic",
                      f"{indent}    elif type({value}) is list:",
                      f"{indent}        raise _Generic",
                      f"{indent}    elif {value} == {literal!r}:"]
        self.item(out, rest, var, found, indent + "        ")


def signature(step: Step) -> tuple:
    """What a chain step does, so equal chains can share their values in generated code."""
    if hasattr(step, "member"):
        return ("member", step.member)  # type: ignore[attr-defined]
    if hasattr(step, "choice"):
        return ("choice", *step.choice)  # type: ignore[attr-defined]
    condition = step.condition  # type: ignore[attr-defined]
    chain, literal = getattr(condition, "chain", None), getattr(condition, "literal", None)
    if literal is not None and chain and len(chain) == 1 and hasattr(chain[0], "member"):
        return ("equals", chain[0].member, literal)
    return ("where", id(condition))  # the condition object stays alive in the generated namespace


def generated_path(steps: list[Step]) -> Callable[[Any], list[Any]] | None:
    """`apply(steps, [node])` as one generated function, or None outside its subset."""
    try:
        source = PathSource(steps)
    except Unsupported:
        return None
    out = Emitter()
    fallback = out.bind(lambda node: apply(steps, [node]), "_fallback")
    out.lines = ["def _path(node):"]
    source.inline(out, "node", "_values", fallback, "    ")
    out.lines.append("    return _values")
    path = out.run("<fedlab.views path>", "_path")
    path.source, path.fallback = source, out.namespace[fallback]  # type: ignore[attr-defined]
    return path


def generated_test(steps: list[Step], holds: Condition) -> Condition | None:
    """`holds` of a `where(path.exists())` / `where(path.empty())` as one generated function: the
    path always gives one boolean, which is the test's result."""
    try:
        source = PathSource(steps)
    except Unsupported:
        return None
    if source.terminal not in TESTS:
        return None
    out = Emitter()
    fallback = out.bind(holds, "_holds")
    out.lines = ["def _test(node):"]
    source.inline(out, "node", "_holds_now", fallback, "    ", test=True)
    out.lines.append("    return _holds_now")
    test = out.run("<fedlab.views path>", "_test")
    test.chain, test.source, test.fallback = steps, source, holds  # type: ignore[attr-defined]
    return test
