"""SQL-on-FHIR v2 ViewDefinition runner on plain Python dicts: fedlab's FHIRPath subset compiler
(`fedlab.views.fhirpath`) for the paths inside it, fhirpathpy for the rest and as its fallback.

`run_view(view, resources)` validates the view, compiles every FHIRPath expression once, then
turns each resource of the view's type into rows (dicts with the columns in declared order).
Selects follow the specification's algorithm: a select's focus comes from `forEach`,
`forEachOrNull` or `repeat` (else the current node); for each focus item its columns, nested
selects and `unionAll` branches each yield a list of partial rows, whose cartesian product is
the select's rows. `%rowIndex` is the index of the innermost `forEach`/`repeat` item (0 outside).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import fhirpathpy
from antlr4 import CommonTokenStream, InputStream, Token
from antlr4.error.ErrorListener import ErrorListener
from fhirpathpy.engine.nodes import ResourceNode
from fhirpathpy.models import models
from fhirpathpy.parser import parse as fhirpathpy_parse
from fhirpathpy.parser.generated.FHIRPathLexer import FHIRPathLexer
from fhirpathpy.parser.generated.FHIRPathParser import FHIRPathParser

from fedlab.errors import FedlabError
from fedlab.views.fhirpath import FastPath, NeedsFullEngine, compile_fast
from fedlab.views.functions import boundary, reference_key, resource_key

NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
VIEW_KEYS = {
    "resourceType", "id", "meta", "implicitRules", "language", "text", "contained", "extension",
    "modifierExtension", "url", "identifier", "version", "versionAlgorithmString", "versionAlgorithmCoding",
    "name", "title", "status", "experimental", "date", "publisher", "contact", "description",
    "useContext", "jurisdiction", "purpose", "copyright", "copyrightLabel", "resource",
    "resourceVersion", "fhirVersion", "profile", "constant", "select", "where",
}  # fmt: skip
SELECT_KEYS = {"id", "extension", "modifierExtension", "column", "select", "forEach", "forEachOrNull",
               "repeat", "unionAll"}  # fmt: skip
COLUMN_KEYS = {"id", "extension", "modifierExtension", "name", "path", "description", "collection", "type", "tag"}
CONSTANT_KEYS = {"id", "extension", "modifierExtension", "name"}
WHERE_KEYS = {"id", "extension", "modifierExtension", "path", "description"}
# Environment variables FHIRPath defines itself; any other `%name` must be a declared constant.
BUILTIN_VARIABLES = {"rowIndex", "resource", "rootResource", "context", "ucum", "sct", "loinc"}
INTEGER_TYPES = {"integer", "positiveInt", "unsignedInt", "integer64"}
MODEL = models["r4"]
USER_FUNCTIONS = {
    "getResourceKey": {"fn": lambda inputs: [k for item in inputs for k in resource_key(item)]},
    "getReferenceKey": {
        "fn": lambda inputs, wanted=None: [
            k for item in inputs for k in reference_key(item, getattr(wanted, "name", None))
        ],
        "arity": {0: [], 1: ["TypeSpecifier"]},
    },
    # fhirpathpy's join() returns empty for an empty input; FHIRPath (and the suite) want "".
    "join": {"fn": lambda inputs, sep="": ["".join([]) if not inputs else (sep or "").join(map(str, inputs))],
             "arity": {0: [], 1: ["String"]}},
    "lowBoundary": {"fn": lambda inputs: [b for v in inputs if (b := boundary(v, None, False)) is not None]},
    "highBoundary": {"fn": lambda inputs: [b for v in inputs if (b := boundary(v, None, True)) is not None]},
}
OPTIONS = {"userInvocationTable": USER_FUNCTIONS}


class ViewDefinitionError(FedlabError, ValueError):
    """An invalid ViewDefinition, or data the view cannot represent (e.g. a non-collection column
    meeting several values); the message names the view and the offending field."""


Evaluator = Callable[[Any, dict[str, Any]], list[Any]]


@dataclass
class Column:
    location: str
    name: str
    path: str
    evaluate: Evaluator
    collection: bool
    type: str | None


@dataclass
class Select:
    where: str  # a JSON-pointer-like location, used in messages
    columns: list[Column] = field(default_factory=list)
    selects: list[Select] = field(default_factory=list)
    union_all: list[Select] = field(default_factory=list)
    for_each: Evaluator | None = None
    or_null: bool = False
    repeat: list[Evaluator] = field(default_factory=list)

    def column_names(self) -> list[str]:
        names = [column.name for column in self.columns]
        for child in self.selects:
            names += child.column_names()
        if self.union_all:
            names += self.union_all[0].column_names()
        return names


@dataclass
class CompiledView:
    label: str
    resource: str
    constants: dict[str, Any]
    root: Select
    filters: list[tuple[str, Evaluator]]
    columns: list[str]
    column_types: dict[str, tuple[str | None, bool]]
    uses_row_index: bool = True


def run_view(view: dict[str, Any], resources: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of `view` over `resources` (resources of other types are skipped)."""
    compiled = compile_view(view)
    return [row for resource in resources for row in rows_for_resource(compiled, resource)]


def run_view_frame(view: dict[str, Any], resources: Iterable[dict[str, Any]]):
    """`run_view` as a pandas DataFrame with the declared columns, also when there are no rows."""
    import pandas as pd

    compiled = compile_view(view)
    rows = [row for resource in resources for row in rows_for_resource(compiled, resource)]
    return pd.DataFrame.from_records(rows, columns=compiled.columns)


def rows_for_resource(compiled: CompiledView, resource: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if not isinstance(resource, dict) or resource.get("resourceType") != compiled.resource:
        return
    env = dict(compiled.constants, rowIndex=0, resource=resource, rootResource=resource)
    for location, evaluate in compiled.filters:
        if not _passes(compiled, location, evaluate(resource, env)):
            return
    for partial in _select_rows(compiled, compiled.root, resource, env):
        yield {name: partial.get(name) for name in compiled.columns}


def _passes(compiled: CompiledView, location: str, result: list[Any]) -> bool:
    if not result:
        return False
    if len(result) != 1 or not isinstance(result[0], bool):
        raise ViewDefinitionError(
            f"view {compiled.label}: {location} must evaluate to a boolean, got {_show(result)}"
        )
    return result[0]


def _select_rows(compiled: CompiledView, select: Select, node: Any, env: dict[str, Any]) -> list[dict]:
    focus: list[Any]
    if select.for_each is not None:
        focus = select.for_each(node, env) if node is not None else []
        if select.or_null and not focus:
            focus = [None]
    elif select.repeat:
        focus = _repeat(select.repeat, node, env) if node is not None else []
    else:
        focus = [node]
    nested = compiled.uses_row_index and (select.for_each is not None or bool(select.repeat))
    rows: list[dict] = []
    for index, item in enumerate(focus):
        item_env = dict(env, rowIndex=index) if nested else env
        row = _column_values(compiled, select, item, item_env)
        if not select.selects and not select.union_all:
            rows.append(row)
            continue
        parts = [[row]]
        parts += [_select_rows(compiled, child, item, item_env) for child in select.selects]
        if select.union_all:
            parts.append([row for b in select.union_all for row in _select_rows(compiled, b, item, item_env)])
        rows += _product(parts)
    return rows


def _repeat(paths: list[Evaluator], node: Any, env: dict[str, Any]) -> list[Any]:
    found: list[Any] = []

    def visit(current: Any) -> None:
        for path in paths:
            for child in path(current, env):
                found.append(child)
                visit(child)

    visit(node)
    return found


def _product(parts: list[list[dict]]) -> list[dict]:
    rows: list[dict] = parts[0]
    for part in parts[1:]:
        rows = [{**left, **right} for left in rows for right in part]
        if not rows:
            break
    return rows


def _column_values(compiled: CompiledView, select: Select, node: Any, env: dict[str, Any]) -> dict:
    row: dict[str, Any] = {}
    for column in select.columns:
        values = [_plain(v, column.type) for v in column.evaluate(node, env)]
        if column.collection:
            row[column.name] = values
        elif len(values) > 1:
            raise ViewDefinitionError(
                f"view {compiled.label}: {column.location} {column.name!r} (path {column.path!r}) returned "
                f"{len(values)} values for resource {_resource_id(env)}; set 'collection': true "
                "or narrow the path (e.g. first())"
            )
        else:
            row[column.name] = values[0] if values else None
    return row


def _plain(value: Any, column_type: str | None) -> Any:
    """fhirpathpy values (Decimal, FP_* date/time/quantity types, nodes) as plain JSON values."""
    if isinstance(value, ResourceNode):
        value = value.data
    if isinstance(value, bool) or value is None:
        return value
    if column_type in INTEGER_TYPES and isinstance(value, int | float | Decimal):
        return int(value)
    if isinstance(value, Decimal) or (column_type == "decimal" and isinstance(value, int)):
        return float(value)
    if isinstance(value, str | int | float | dict | list):
        return value
    return str(value)


def _resource_id(env: dict[str, Any]) -> str:
    resource = env.get("rootResource") or {}
    return f"{resource.get('resourceType')}/{resource.get('id')}"


def _show(values: list[Any]) -> str:
    return json.dumps([_plain(v, None) for v in values], default=str)[:200]


# ---------------------------------------------------------------- compilation and validation


class _RaisingListener(ErrorListener):
    def syntaxError(self, recognizer, offendingSymbol, line, column, msg, e):  # noqa: N802 (antlr API)
        raise SyntaxError(f"column {column + 1}: {msg}")


def check_syntax(expression: str) -> None:
    """Parse strictly: fhirpathpy's parser recovers from syntax errors silently (`name.(`)."""
    lexer = FHIRPathLexer(InputStream(expression))
    lexer.removeErrorListeners()
    lexer.addErrorListener(_RaisingListener())
    parser = FHIRPathParser(CommonTokenStream(lexer))
    parser.removeErrorListeners()
    parser.addErrorListener(_RaisingListener())
    parser.expression()
    if parser.getCurrentToken().type != Token.EOF:
        raise SyntaxError(f"unexpected {parser.getCurrentToken().text!r} after a complete expression")
    fhirpathpy_parse(expression)


_COMPILED: dict[str, CompiledView] = {}


def compile_view(view: Any) -> CompiledView:
    """Validate `view` and compile its paths; raises ViewDefinitionError naming the field.

    Compiling parses every FHIRPath twice (strictly, then with fhirpathpy), about 0.3 s a view, so
    a valid view is compiled once per process and reused (keyed by its canonical JSON)."""
    try:
        key = json.dumps(view, sort_keys=True)
    except (TypeError, ValueError):
        return _compile_view(view)
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = _compile_view(view)
        if len(_COMPILED) >= 512:  # bounded: a test-suite run compiles hundreds of one-off views
            _COMPILED.clear()
        _COMPILED[key] = compiled
    return compiled


def _compile_view(view: Any) -> CompiledView:
    label = _label(view)
    if not isinstance(view, dict):
        raise ViewDefinitionError(f"view {label}: a ViewDefinition must be a JSON object")
    _check_keys(label, "", view, VIEW_KEYS)
    resource = view.get("resource")
    if not isinstance(resource, str) or not NAME_PATTERN.match(resource):
        raise ViewDefinitionError(f"view {label}: field 'resource' must name a FHIR resource type, got {resource!r}")
    constants = _constants(label, view.get("constant", []))
    selects = view.get("select")
    if not isinstance(selects, list) or not selects:
        raise ViewDefinitionError(f"view {label}: field 'select' must be a non-empty list")
    context = _Context(label, set(constants))
    root = context.select({"select": selects}, "")
    filters = [context.where(item, f"where[{i}]") for i, item in enumerate(_as_list(label, view, "where"))]
    columns = root.column_names()
    duplicates = sorted({name for name in columns if columns.count(name) > 1})
    if duplicates:
        raise ViewDefinitionError(f"view {label}: column names must be unique, repeated: {duplicates}")
    uses_row_index = "rowIndex" in json.dumps(view)
    return CompiledView(label, resource, constants, root, filters, columns, context.column_types, uses_row_index)


def _label(view: Any) -> str:
    if isinstance(view, dict):
        for key in ("name", "title", "id", "url"):
            if isinstance(view.get(key), str):
                return repr(view[key])
        if isinstance(view.get("resource"), str):
            return f"(unnamed, resource {view['resource']})"
    return "(unnamed)"


def _check_keys(label: str, where: str, node: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(node) - allowed)
    if unknown:
        raise ViewDefinitionError(f"view {label}: unknown field(s) {unknown} at {where or 'top level'}")


def _as_list(label: str, node: dict[str, Any], key: str, where: str = "") -> list[Any]:
    value = node.get(key, [])
    if not isinstance(value, list):
        raise ViewDefinitionError(f"view {label}: field '{where}{key}' must be a list")
    return value


def _constants(label: str, items: Any) -> dict[str, Any]:
    if not isinstance(items, list):
        raise ViewDefinitionError(f"view {label}: field 'constant' must be a list")
    constants: dict[str, Any] = {}
    for index, item in enumerate(items):
        where = f"constant[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ViewDefinitionError(f"view {label}: {where} needs a string 'name'")
        if not NAME_PATTERN.match(item["name"]):
            raise ViewDefinitionError(f"view {label}: {where}.name {item['name']!r} is not a valid name")
        values = [key for key in item if key.startswith("value") and len(key) > 5 and key[5].isupper()]
        _check_keys(label, where, item, CONSTANT_KEYS | set(values))
        if len(values) != 1:
            raise ViewDefinitionError(
                f"view {label}: {where} ({item['name']!r}) needs exactly one value[x] (e.g. valueString)"
            )
        constants[item["name"]] = item[values[0]]
    return constants


_EXTERNAL = re.compile(r"%(?:`([^`]*)`|([A-Za-z_][A-Za-z0-9_]*))")
_STRING = re.compile(r"'(?:[^'\\]|\\.)*'")


class _Context:
    def __init__(self, label: str, constants: set[str]):
        self.label = label
        self.constants = constants
        self.column_types: dict[str, tuple[str | None, bool]] = {}

    def fail(self, message: str) -> ViewDefinitionError:
        return ViewDefinitionError(f"view {self.label}: {message}")

    def path(self, expression: Any, where: str, focus: bool = False) -> Evaluator:
        if not isinstance(expression, str) or not expression.strip():
            raise self.fail(f"field '{where}' must be a FHIRPath string, got {expression!r}")
        for match in _EXTERNAL.finditer(_STRING.sub("''", expression)):
            name = match.group(1) or match.group(2)
            if name not in self.constants and name not in BUILTIN_VARIABLES and not name.startswith("vs-"):
                raise self.fail(f"field '{where}' uses undefined constant %{name}")
        try:
            check_syntax(expression)
        except Exception as error:  # antlr raises several unrelated types for syntax errors
            raise self.fail(f"field '{where}' is not valid FHIRPath ({expression!r}): {error}") from None
        return _evaluator(expression, compile_fast(expression), self.label, where, focus=focus)

    def where(self, item: Any, where: str) -> tuple[str, Evaluator]:
        if not isinstance(item, dict):
            raise self.fail(f"{where} must be an object with a 'path'")
        _check_keys(self.label, where, item, WHERE_KEYS)
        return f"{where}.path {item.get('path')!r}", self.path(item.get("path"), f"{where}.path")

    def select(self, node: Any, where: str) -> Select:
        if not isinstance(node, dict):
            raise self.fail(f"{where or 'select'} must be an object")
        _check_keys(self.label, where, node, SELECT_KEYS)
        iterators = [key for key in ("forEach", "forEachOrNull", "repeat") if key in node]
        if len(iterators) > 1:
            raise self.fail(f"{where} has {iterators}; use only one of forEach, forEachOrNull, repeat")
        select = Select(where=where)
        if "forEach" in node or "forEachOrNull" in node:
            key = iterators[0]
            select.for_each = self.path(node[key], f"{where}.{key}", focus=True)
            select.or_null = key == "forEachOrNull"
        if "repeat" in node:
            paths = node["repeat"]
            if not isinstance(paths, list) or not paths:
                raise self.fail(f"field '{where}.repeat' must be a non-empty list of paths")
            select.repeat = [self.path(p, f"{where}.repeat[{i}]", focus=True) for i, p in enumerate(paths)]
        prefix = f"{where}." if where else ""
        select.columns = [
            self.column(c, f"{prefix}column[{i}]") for i, c in enumerate(_as_list(self.label, node, "column", prefix))
        ]
        select.selects = [
            self.select(s, f"{prefix}select[{i}]") for i, s in enumerate(_as_list(self.label, node, "select", prefix))
        ]
        select.union_all = [
            self.select(u, f"{prefix}unionAll[{i}]")
            for i, u in enumerate(_as_list(self.label, node, "unionAll", prefix))
        ]
        self._check_union(select, prefix)
        return select

    def _check_union(self, select: Select, prefix: str) -> None:
        if not select.union_all:
            return
        expected = select.union_all[0].column_names()
        for index, branch in enumerate(select.union_all[1:], start=1):
            if branch.column_names() != expected:
                raise self.fail(
                    f"{prefix}unionAll[{index}] has columns {branch.column_names()}, but unionAll[0] has "
                    f"{expected}; every branch needs the same columns in the same order"
                )

    def column(self, node: Any, where: str) -> Column:
        if not isinstance(node, dict):
            raise self.fail(f"{where} must be an object")
        _check_keys(self.label, where, node, COLUMN_KEYS)
        name = node.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise self.fail(f"{where}.name {name!r} is not a valid column name (letters, digits, _; starts with a letter)")
        collection = node.get("collection", False)
        if not isinstance(collection, bool):
            raise self.fail(f"{where}.collection must be true or false")
        column_type = node.get("type")
        if column_type is not None and not isinstance(column_type, str):
            raise self.fail(f"{where}.type must be a FHIR type name")
        self.column_types.setdefault(name, (column_type, collection))
        return Column(where, name, node.get("path"), self.path(node.get("path"), f"{where}.path"), collection, column_type)


def _evaluator(
    expression: str, fast: FastPath | None, label: str, where: str, *, focus: bool = False
) -> Evaluator:
    """An evaluator over a node (resource dict, typed ResourceNode or None for "no focus").

    Column and where paths return plain values. Focus paths (forEach, repeat) return typed
    ResourceNodes, so that choice elements such as `value.ofType(Quantity)` still resolve on the
    items when fhirpathpy evaluates the nested paths.
    """
    options = dict(OPTIONS, returnRawData=True) if focus else OPTIONS
    # fhirpathpy binds `$this` only inside function arguments; at the top level it is the focus,
    # which select() over the (single) focus item provides.
    wrapped = f"select({expression})" if "$this" in expression else expression
    slow = fhirpathpy.compile(wrapped, model=MODEL, options=options)

    def full(node: Any, env: dict[str, Any]) -> list[Any]:
        try:
            return slow([] if node is None else node, env)
        except Exception as error:
            raise ViewDefinitionError(
                f"view {label}: evaluating '{where}' ({expression!r}) on {_resource_id(env)} failed: {error}"
            ) from None

    if fast is None:
        return full

    def quick(node: Any, env: dict[str, Any]) -> list[Any]:
        if isinstance(node, ResourceNode):
            data, node_type = node.data, node.path
        else:
            data, node_type = node, node.get("resourceType") if isinstance(node, dict) else None
        try:
            values = fast.evaluate(data, env, node_type)
        except NeedsFullEngine:
            return full(node, env)
        if not focus:
            return values
        item_type = fast.result_type(node_type)
        if item_type is None:
            return full(node, env)
        return [ResourceNode.create_node(value, item_type) for value in values]

    return quick
