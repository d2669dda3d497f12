"""A ViewDefinition's selects compiled into one generated Python function over resource dicts.

`ViewRows(view).rows(resource)` gives the rows `fedlab.views.run_view` gives, as tuples in column
order, several times faster: `SelectPlan` holds the view's selects with every path compiled by
`fedlab.views.codegen` (its `rows` is the reference semantics), and `PlanCode` unrolls its control
flow for each select into one function, with the paths and `where(...)` guards inlined as
`PathSource` code, so a resource costs no generic dispatch and few calls. A view outside the
compiled subset (`repeat`, `where`, `constant`) runs in the reference runner; so does a resource
the subset cannot decide alone (`NeedsFullEngine`: it is evaluated with fhirpathpy there).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedlab.views.codegen import Emitter, compile_guards, compile_path
from fedlab.views.fhirpath import NeedsFullEngine, Unsupported
from fedlab.views.runner import INTEGER_TYPES, compile_view, rows_for_resource


def _converter(column_type: str | None) -> Callable[[Any], Any]:
    """The runner's value typing: decimals as floats, integers as ints, everything else as parsed."""
    if column_type == "decimal":
        return lambda v: float(v) if type(v) is int else v
    if column_type in INTEGER_TYPES:
        return lambda v: int(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
    return _identity


def _identity(value: Any) -> Any:
    return value


_identity.identity = True  # type: ignore[attr-defined]


@dataclass
class SelectPlan:
    columns: list[tuple[Callable[[Any], list[Any]], bool, Callable[[Any], Any]]]
    children: list[SelectPlan]
    union: list[SelectPlan]
    for_each: Callable[[Any], list[Any]] | None = None
    or_null: bool = False
    guards: list[Callable[[Any], bool | None]] | None = None  # forEach is `where(a).where(b)...`
    leaf_guards: list[Callable[[Any], bool | None]] | None = None  # the same, for a select without children

    def rows(self, node: Any) -> list[tuple]:
        if self.guards is not None:
            holds = node is not None and all(guard(node) is True for guard in self.guards)
            focus = [node] if holds else ([None] if self.or_null else [])
        elif self.for_each is not None:
            focus = self.for_each(node) if node is not None else []
            if self.or_null and not focus:
                focus = [None]
        else:
            focus = [node]
        out: list[tuple] = []
        for item in focus:
            row = tuple([self._value(path, collection, convert, item) for path, collection, convert in self.columns])
            if not self.children and not self.union:
                out.append(row)
                continue
            rows = [row]
            for child in self.children:
                part = child.rows(item)
                rows = [left + right for left in rows for right in part]
            if self.union:
                part = []
                for branch in self.union:
                    if branch.leaf_guards is None:
                        part += branch.rows(item)
                    elif item is not None and all(guard(item) is True for guard in branch.leaf_guards):
                        part.append(branch.values(item))  # the common `where(...)` branch, inlined
                rows = [left + right for left in rows for right in part]
            out += rows
        return out

    def values(self, item: Any) -> tuple:
        return tuple([self._value(path, collection, convert, item) for path, collection, convert in self.columns])

    @staticmethod
    def _value(path: Callable[[Any], list[Any]], collection: bool, convert: Callable[[Any], Any], item: Any) -> Any:
        values = path(item) if item is not None else []
        if collection:
            return [convert(v) for v in values]
        if len(values) > 1:
            raise NeedsFullEngine("several values in a one-value column")
        return convert(values[0]) if values else None


class PlanCode:
    """Generates one Python function for a whole plan: the control flow of `SelectPlan.rows`
    unrolled for each select (which guards, columns, children and unions it has), and the paths and
    `where(...exists())` guards inlined as `PathSource` code, so a resource costs no generic
    dispatch and few calls. Paths outside the generated subset are called as compiled closures.
    `SelectPlan.rows` remains the reference semantics."""

    def __init__(self) -> None:
        self.out = Emitter()
        self.known: dict[tuple, str] = {}  # chain values computed so far in the current block

    def build(self, plan: SelectPlan) -> Callable[[Any], list[tuple]]:
        self.out.lines = ["def _plan_rows(node):", "    _rows = []"]
        self.select(plan, "node", "_rows", "    ", may_be_none=False)
        self.out.lines.append("    return _rows")
        return self.out.run("<fedlab.views view plan>", "_plan_rows")

    def path(self, path: Callable[[Any], list[Any]], item: str, target: str, indent: str) -> None:
        source = getattr(path, "source", None)
        if source is None:
            self.out.lines.append(f"{indent}{target} = {self.out.bind(path, '_path')}({item})")
        else:
            fallback = self.out.bind(path.fallback, "_fallback")  # type: ignore[attr-defined]
            source.inline(self.out, item, target, fallback, indent, known=self.known)

    def test(self, guard: Callable[[Any], bool | None], item: str, indent: str) -> str:
        """Lines computing `guard(item) is True` into a name, which is returned."""
        held = self.out.name("_held")
        source = getattr(guard, "source", None)
        if source is None:
            self.out.lines.append(f"{indent}{held} = {self.out.bind(guard, '_guard')}({item}) is True")
        else:
            fallback = self.out.bind(guard.fallback, "_holds")  # type: ignore[attr-defined]
            source.inline(self.out, item, held, fallback, indent, test=True, known=self.known, as_bool=True)
        return held

    def guarded(self, guards: list[Callable[[Any], bool | None]], item: str, indent: str,
                may_be_none: bool) -> str:
        """Lines that evaluate the guards in order, stopping at the first that fails; returns the name
        holding whether all held."""
        held = self.out.name("_all")
        self.out.lines.append(f"{indent}{held} = False")
        inner = indent
        outside = None  # what is known after the block: the first test, if it runs unconditionally
        if may_be_none:
            outside = dict(self.known)
            self.out.lines.append(f"{inner}if {item} is not None:")
            inner += "    "
        for guard in guards:
            name = self.test(guard, item, inner)
            if outside is None:
                outside = dict(self.known)
            self.out.lines.append(f"{inner}if {name}:")
            inner += "    "
        self.out.lines.append(f"{inner}{held} = True")
        self.known = outside if outside is not None else self.known
        return held

    def columns(self, plan: SelectPlan, item: str, indent: str, may_be_none: bool) -> list[str]:
        """Lines that compute the plan's columns of `item`; returns the names holding them."""
        lines, names = self.out.lines, []
        for path, collection, convert in plan.columns:
            value, values = self.out.name("_c"), self.out.name("_v")
            identity = getattr(convert, "identity", False)
            conv = "" if identity else self.out.bind(convert, "_conv")
            inner, outside = indent, self.known
            if may_be_none:
                lines += [f"{indent}{value} = {'[]' if collection else 'None'}", f"{indent}if {item} is not None:"]
                inner += "    "
                self.known = dict(outside)
            self.path(path, item, values, inner)
            self.known = outside if may_be_none else self.known
            if collection:  # a new list per row, as the closures give
                lines.append(f"{inner}{value} = list({values})" if identity
                             else f"{inner}{value} = [{conv}(_x) for _x in {values}]")
            else:
                first = f"{values}[0]" if identity else f"{conv}({values}[0])"
                lines += [f"{inner}if len({values}) > 1:",
                          f"{inner}    raise NeedsFullEngine('several values in a one-value column')",
                          f"{inner}{value} = {first} if {values} else None"]
            names.append(value)
        return names

    @staticmethod
    def row(names: list[str]) -> str:
        return "(" + "".join(f"{n}, " for n in names) + ")"

    def select(self, plan: SelectPlan, node: str, rows: str, indent: str, may_be_none: bool) -> None:
        """Lines that append the rows of `plan` over `node` to the list `rows`."""
        lines = self.out.lines
        item = self.out.name("_item")
        outside = self.known  # restored when this select's block ends
        self.known = dict(outside)
        if plan.guards is not None:
            held = self.guarded(plan.guards, node, indent, may_be_none)
            outside = dict(self.known)  # the first guard ran in the enclosing block
            if plan.or_null:
                lines.append(f"{indent}{item} = {node} if {held} else None")
            else:
                lines.append(f"{indent}if {held}:")
                indent += "    "
                item = node  # the same object: chain values known for `node` hold for it
            item_may_be_none = plan.or_null
        elif plan.for_each is not None:
            focus = self.out.name("_focus")
            if may_be_none:
                lines += [f"{indent}{focus} = []", f"{indent}if {node} is not None:"]
                self.known = dict(outside)
                self.path(plan.for_each, node, focus, indent + "    ")
                self.known = dict(outside)
            else:
                self.path(plan.for_each, node, focus, indent)
                outside = dict(self.known)  # the path ran in the enclosing block
            if plan.or_null:
                lines += [f"{indent}if not {focus}:", f"{indent}    {focus} = [None]"]
            lines.append(f"{indent}for {item} in {focus}:")
            indent += "    "
            item_may_be_none = True  # an ofType() step keeps nulls
        else:
            item = node
            item_may_be_none = may_be_none
        if plan.guards is None and plan.for_each is None:
            outside = self.known  # no block of its own: what it computes stays known after it
        names = self.columns(plan, item, indent, item_may_be_none)
        if not plan.children and not plan.union:
            lines.append(f"{indent}{rows}.append({self.row(names)})")
            self.known = outside
            return
        # The rows are the product of this select's row with the rows of each child and of the union,
        # in that order: every part is computed first (in the reference order), then nested loops
        # append the products. A plain child with columns only gives exactly one row, kept as a tuple.
        terms, parts = [self.row(names)], []  # parts: (list of rows, loop variable)
        for child in plan.children:
            if child.guards is None and child.for_each is None and not child.children and not child.union:
                terms.append(self.row(self.columns(child, item, indent, item_may_be_none)))
                continue
            parts.append((self.out.name("_part"), self.out.name("_r")))
            terms.append(parts[-1][1])
            lines.append(f"{indent}{parts[-1][0]} = []")
            self.select(child, item, parts[-1][0], indent, item_may_be_none)
        if plan.union:
            parts.append((self.out.name("_part"), self.out.name("_r")))
            terms.append(parts[-1][1])
            lines.append(f"{indent}{parts[-1][0]} = []")
            for branch in plan.union:
                self.select(branch, item, parts[-1][0], indent, item_may_be_none)
        loops = indent
        for part, each in parts:
            lines.append(f"{loops}for {each} in {part}:")
            loops += "    "
        lines.append(f"{loops}{rows}.append({' + '.join(terms)})")
        self.known = outside


def plan_select(node: dict[str, Any]) -> SelectPlan:
    if "repeat" in node:
        raise Unsupported("repeat")
    plan = SelectPlan(
        columns=[(compile_path(c["path"]), bool(c.get("collection", False)), _converter(c.get("type")))
                 for c in node.get("column", [])],
        children=[plan_select(s) for s in node.get("select", [])],
        union=[plan_select(u) for u in node.get("unionAll", [])],
    )
    key = "forEach" if "forEach" in node else "forEachOrNull" if "forEachOrNull" in node else None
    if key:
        plan.for_each = compile_path(node[key])
        plan.guards = compile_guards(node[key])
        plan.or_null = key == "forEachOrNull"
        if not (plan.children or plan.union or plan.or_null):
            plan.leaf_guards = plan.guards
    return plan


class ViewRows:
    """One ViewDefinition, validated by the reference runner and compiled for speed.

    `rows(resource)` gives the same rows as `fedlab.views.run_view`, as tuples in column order.
    """

    def __init__(self, view: dict[str, Any]) -> None:
        self.reference = compile_view(view)  # validates; raises ViewDefinitionError naming the field
        self.columns = list(self.reference.columns)
        self.resource_type = self.reference.resource
        self.fallbacks = 0
        self.plan, self._plan_rows = _compiled_plan(view)

    def rows(self, resource: dict[str, Any]) -> list[tuple]:
        if self.plan is not None and resource.get("resourceType") == self.resource_type:
            try:
                return self._plan_rows(resource)  # type: ignore[misc]
            except NeedsFullEngine:
                self.fallbacks += 1
        return [tuple(row[c] for c in self.columns) for row in rows_for_resource(self.reference, resource)]


_PLANS: dict[str, tuple[SelectPlan | None, Callable[[Any], list[tuple]] | None]] = {}


def _compiled_plan(view: dict[str, Any]) -> tuple[SelectPlan | None, Callable[[Any], list[tuple]] | None]:
    """A view's plan and its generated function, built once per process (generating and compiling
    the code costs more than flattening a small site)."""
    key = json.dumps(view, sort_keys=True)
    if key not in _PLANS:
        try:
            if view.get("where") or view.get("constant"):
                raise Unsupported("where/constant")
            plan: SelectPlan | None = plan_select({"select": view["select"]})
        except Unsupported:
            plan = None
        if len(_PLANS) >= 64:  # bounded: the suite runner compiles many one-off views
            _PLANS.clear()
        _PLANS[key] = (plan, PlanCode().build(plan) if plan is not None else None)
    return _PLANS[key]
