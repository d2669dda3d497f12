"""Load and validate Synthea module JSON (gmf_version 1 and 2) into `Module` objects.

Everything that can be checked without a person is checked here, so a bad module fails at load
time with a `ModuleError` naming the file, the state and the field.

Why one module: it is one validator over one schema (Synthea's module language: its state types,
transitions, conditions and distributions, which refer to one another), a few lines per rule;
split by state type, the rules that cross types would be scattered.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from fedlab.synthea.gmf.values import (
    Code,
    Distribution,
    ModuleError,
    parse_codes,
    parse_distribution,
    parse_exact,
    parse_range,
    parse_unit,
)

STATE_TYPES = (
    "Initial", "Terminal", "Simple", "Guard", "Delay", "SetAttribute", "Counter", "CallSubmodule",
    "Encounter", "EncounterEnd", "ConditionOnset", "ConditionEnd", "AllergyOnset", "AllergyEnd",
    "MedicationOrder", "MedicationEnd", "CarePlanStart", "CarePlanEnd", "Procedure", "VitalSign",
    "Observation", "MultiObservation", "DiagnosticReport", "Symptom", "Death", "Device", "DeviceEnd",
    "SupplyList", "ImagingStudy", "Vaccine", "Physiology",
)
TRANSITION_KEYS = (
    "direct_transition", "distributed_transition", "conditional_transition", "complex_transition",
    "lookup_table_transition", "type_of_care_transition",
)
CONDITION_TYPES = (
    "Gender", "Age", "Date", "Socioeconomic Status", "Race", "Symptom", "Observation", "Vital Sign",
    "Active Condition", "Active Medication", "Active CarePlan", "Active Allergy", "Attribute",
    "PriorState", "And", "Or", "Not", "At Least", "At Most", "True", "False",
)
OPERATORS = frozenset({"<", "<=", "==", ">=", ">", "!=", "is nil", "is not nil"})
NIL_OPERATORS = frozenset({"is nil", "is not nil"})
ENCOUNTER_CLASSES = frozenset({
    "ambulatory", "emergency", "inpatient", "wellness", "urgentcare", "outpatient", "virtual", "home",
    "hospice", "snf",
})
TYPES_OF_CARE = frozenset({"ambulatory", "emergency", "telemedicine"})
PROBABILITY_SLACK = 1e-9  # float sums such as 0.9971 + 0.0029


# ---------------------------------------------------------------- compiled structures

@dataclass(frozen=True)
class NamedProbability:
    """A distributed-transition probability read from a person attribute, with a default."""

    attribute: str
    default: float


Probability = float | NamedProbability


@dataclass(frozen=True)
class LookupTable:
    """A CSV lookup table: attribute columns (maybe `age` "lo-hi", `time` "lo-hi"), then one
    probability column per transition, in the order of the transition options."""

    file: str
    attributes: tuple[str, ...]
    rows: tuple[tuple[tuple[str, ...], tuple[int, int] | None, tuple[int, int] | None, tuple[float, ...]], ...]


@dataclass(frozen=True)
class Transition:
    kind: str  # direct | distributed | conditional | complex | lookup_table | type_of_care
    target: str | None = None
    distributed: tuple[tuple[str, Probability], ...] = ()
    conditional: tuple[tuple[dict | None, str], ...] = ()
    complex: tuple[tuple[dict | None, str | None, tuple[tuple[str, Probability], ...]], ...] = ()
    lookup: LookupTable | None = None
    defaults: tuple[tuple[str, Probability], ...] = ()  # lookup_table fallbacks
    care: tuple[tuple[str, str], ...] = ()

    def targets(self) -> list[str]:
        names = [self.target] if self.target else []
        names += [t for t, _ in self.distributed] + [t for _, t in self.conditional]
        for _, target, options in self.complex:
            names += ([target] if target else []) + [t for t, _ in options]
        names += [t for t, _ in self.defaults] + [t for _, t in self.care]
        return names


@dataclass(frozen=True)
class ObservationSpec:
    codes: tuple[Code, ...]
    category: str | None
    unit: str | None
    source: str | None  # distribution | vital_sign | attribute | value_code | None (no value)
    distribution: Distribution | None = None
    name: str | None = None  # vital sign or attribute name
    value_code: Code | None = None


@dataclass
class StateDef:
    name: str
    type: str
    raw: dict[str, Any]
    transition: Transition | None
    spec: dict[str, Any] = field(default_factory=dict)


@dataclass
class Module:
    name: str
    key: str  # path relative to the modules folder without ".json", e.g. "metabolic_syndrome/medications"
    file: str
    gmf_version: int
    states: dict[str, StateDef]
    submodules: frozenset[str]
    targeted_encounters: frozenset[str] = frozenset()  # Encounter states named by a target_encounter
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- entry points

def load_module(path: str | Path, key: str | None = None, lookup_tables: str | Path | None = None) -> Module:
    """Load one module file. `lookup_tables` is the folder CSV lookup tables are resolved against
    (default: `lookup_tables/` beside the file)."""
    path = Path(path)
    file = str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModuleError(file, None, None, "file not found") from None
    except json.JSONDecodeError as exc:
        raise ModuleError(file, None, None, f"not valid JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    tables = Path(lookup_tables) if lookup_tables is not None else path.parent / "lookup_tables"
    return parse_module(data, file, key or path.stem, tables)


def load_modules(folder: str | Path, lookup_tables: str | Path | None = None,
                 allow_missing_submodules: Iterable[str] = ()) -> dict[str, Module]:
    """Load every `*.json` under `folder` (recursively), keyed by relative path without `.json`.

    Every CallSubmodule must name a loaded module; `allow_missing_submodules` lists the ones that
    may be absent (calling them then does nothing, as a module with only Initial -> Terminal)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModuleError(str(folder), None, None, "modules folder not found")
    tables = Path(lookup_tables) if lookup_tables is not None else folder / "lookup_tables"
    modules: dict[str, Module] = {}
    for path in sorted(folder.rglob("*.json")):
        if tables in path.parents:
            continue
        key = path.relative_to(folder).with_suffix("").as_posix()
        modules[key] = load_module(path, key, tables)
    check_submodules(modules, allow_missing_submodules)
    return modules


def check_submodules(modules: dict[str, Module], allow_missing: Iterable[str] = ()) -> None:
    allowed = set(allow_missing)
    for module in modules.values():
        for state in module.states.values():
            if state.type == "CallSubmodule":
                target = state.spec["submodule"]
                if target not in modules and target not in allowed:
                    raise ModuleError(module.file, state.name, "submodule",
                                      f"calls submodule '{target}', which is not among the loaded modules "
                                      f"(add the module file, or list '{target}' in "
                                      f"generate.allow_missing_submodules to skip the call)")


# ---------------------------------------------------------------- parsing

class _Ctx:
    """Where we are in a module, so every error names file, state and field."""

    def __init__(self, file: str, state: str | None, tables: Path) -> None:
        self.file, self.state, self.tables = file, state, tables

    def fail(self, fld: str | None, message: str) -> NoReturn:
        raise ModuleError(self.file, self.state, fld, message)

    def failer(self, fld: str) -> Callable[[str], NoReturn]:
        return lambda message: self.fail(fld, message)


def parse_module(data: Any, file: str, key: str, tables: Path) -> Module:
    top = _Ctx(file, None, tables)
    if not isinstance(data, dict):
        top.fail(None, "a module must be a JSON object")
    version = data.get("gmf_version", 1)
    if version not in (1, 2):
        top.fail("gmf_version", f"unsupported gmf_version {version!r} (1 and 2 are supported)")
    states_raw = data.get("states")
    if not isinstance(states_raw, dict) or not states_raw:
        top.fail("states", "a module needs a non-empty 'states' object")
    if "Initial" not in states_raw:
        top.fail("states", "a module needs a state named 'Initial'")
    states: dict[str, StateDef] = {}
    warnings: list[str] = []
    for name, raw in states_raw.items():
        states[name] = _parse_state(_Ctx(file, name, tables), name, raw, warnings)
    for state in states.values():
        _check_references(_Ctx(file, state.name, tables), state, states)
    # The state named "Initial" starts the module whatever its type (Synthea's own
    # encounter/vitals.json starts with an Observation).
    submodules = frozenset(s.spec["submodule"] for s in states.values() if s.type == "CallSubmodule")
    targeted = frozenset(s.raw["target_encounter"] for s in states.values() if s.raw.get("target_encounter"))
    return Module(name=str(data.get("name", key)), key=key, file=file, gmf_version=int(version),
                  states=states, submodules=submodules, targeted_encounters=targeted, warnings=warnings)


def _parse_state(ctx: _Ctx, name: str, raw: Any, warnings: list[str]) -> StateDef:
    if not isinstance(raw, dict):
        ctx.fail(None, "a state must be a JSON object")
    kind = raw.get("type")
    if kind not in STATE_TYPES:
        ctx.fail("type", f"unknown state type {kind!r}")
    transition = _parse_transition(ctx, kind, raw)
    state = StateDef(name=name, type=kind, raw=raw, transition=transition)
    parser = _STATE_PARSERS.get(kind)
    if parser is not None:
        parser(ctx, raw, state.spec, warnings)
    return state


def _check_references(ctx: _Ctx, state: StateDef, states: dict[str, StateDef]) -> None:
    if state.transition is not None:
        for target in state.transition.targets():
            if target not in states:
                ctx.fail(_TRANSITION_FIELD[state.transition.kind], f"transition to missing state '{target}'")
    alt = state.spec.get("alt_direct_transition")
    if alt is not None and alt not in states:
        ctx.fail("alt_direct_transition", f"transition to missing state '{alt}'")
    for fld, wanted in _STATE_REFERENCES.items():
        ref = state.raw.get(fld)
        if ref is None or state.type not in wanted[0]:
            continue
        if ref not in states or states[ref].type not in wanted[1]:
            ctx.fail(fld, f"'{ref}' is not a {' or '.join(wanted[1])} state of this module")


_TRANSITION_FIELD = {k.removesuffix("_transition"): k for k in TRANSITION_KEYS}
_STATE_REFERENCES = {  # field -> (state types having it, state types it must name)
    "condition_onset": (("ConditionEnd", "Death"), ("ConditionOnset",)),
    "allergy_onset": (("AllergyEnd",), ("AllergyOnset",)),
    "medication_order": (("MedicationEnd",), ("MedicationOrder",)),
    "careplan": (("CarePlanEnd",), ("CarePlanStart",)),
    "device": (("DeviceEnd",), ("Device",)),
    "target_encounter": (("ConditionOnset", "AllergyOnset"), ("Encounter",)),
}


# ---- transitions

def _parse_transition(ctx: _Ctx, kind: str, raw: dict) -> Transition | None:
    present = [k for k in TRANSITION_KEYS if k in raw]
    if kind == "Terminal":
        if present:
            ctx.fail(present[0], "a Terminal state cannot have a transition")
        return None
    if len(present) > 1:
        ctx.fail(present[1], f"a state has one transition, found {', '.join(present)}")
    if not present:
        if kind == "Physiology":
            return None
        ctx.fail("direct_transition", "the state has no transition")
    key = present[0]
    value = raw[key]
    if key == "direct_transition":
        if not isinstance(value, str):
            ctx.fail(key, f"must be a state name, got {value!r}")
        return Transition("direct", target=value)
    if key == "distributed_transition":
        return Transition("distributed", distributed=_distributed_options(ctx, key, value))
    if key == "conditional_transition":
        return Transition("conditional", conditional=_conditional_options(ctx, key, value))
    if key == "complex_transition":
        return Transition("complex", complex=_complex_options(ctx, key, value))
    if key == "lookup_table_transition":
        return _lookup_table_transition(ctx, key, value)
    return _type_of_care_transition(ctx, key, value)


def _non_empty_list(ctx: _Ctx, fld: str, value: Any) -> list:
    if not isinstance(value, list) or not value:
        ctx.fail(fld, f"must be a non-empty list, got {value!r}")
    return value


def _target(ctx: _Ctx, fld: str, option: Any) -> str:
    if not isinstance(option, dict) or not isinstance(option.get("transition"), str):
        ctx.fail(fld, f"each option needs a 'transition' state name, got {option!r}")
    return option["transition"]


def _probability(ctx: _Ctx, fld: str, raw: Any) -> Probability:
    if isinstance(raw, dict):
        attribute, default = raw.get("attribute"), raw.get("default")
        if not isinstance(attribute, str):
            ctx.fail(fld, "a named distribution needs an 'attribute'")
        return NamedProbability(attribute, _probability_number(ctx, f"{fld}.default", default))
    return _probability_number(ctx, fld, raw)


def _probability_number(ctx: _Ctx, fld: str, raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        ctx.fail(fld, f"a probability must be a number, got {raw!r}")
    if not 0.0 <= raw <= 1.0:
        ctx.fail(fld, f"a probability must be between 0 and 1, got {raw}")
    return float(raw)


def _distributed_options(ctx: _Ctx, fld: str, value: Any) -> tuple[tuple[str, Probability], ...]:
    options = []
    for i, option in enumerate(_non_empty_list(ctx, fld, value)):
        target = _target(ctx, f"{fld}[{i}]", option)
        if "distribution" not in option:
            ctx.fail(f"{fld}[{i}].distribution", "missing")
        options.append((target, _probability(ctx, f"{fld}[{i}].distribution", option["distribution"])))
    total = sum(p if isinstance(p, float) else p.default for _, p in options)
    if total > 1.0 + PROBABILITY_SLACK:
        ctx.fail(fld, f"probabilities sum to {total:.6g}, more than 1")
    return tuple(options)


def _conditional_options(ctx: _Ctx, fld: str, value: Any) -> tuple[tuple[dict | None, str], ...]:
    options = []
    for i, option in enumerate(_non_empty_list(ctx, fld, value)):
        target = _target(ctx, f"{fld}[{i}]", option)
        condition = option.get("condition")
        if condition is not None:
            validate_condition(ctx, f"{fld}[{i}].condition", condition)
        options.append((condition, target))
    return tuple(options)


def _complex_options(ctx: _Ctx, fld: str, value: Any) -> tuple:
    options = []
    for i, option in enumerate(_non_empty_list(ctx, fld, value)):
        where = f"{fld}[{i}]"
        if not isinstance(option, dict):
            ctx.fail(where, "each option must be an object")
        condition = option.get("condition")
        if condition is not None:
            validate_condition(ctx, f"{where}.condition", condition)
        target = option.get("transition")
        distributions = option.get("distributions") or []
        if target is not None and not isinstance(target, str):
            ctx.fail(f"{where}.transition", f"must be a state name, got {target!r}")
        if target is None and not distributions:
            ctx.fail(where, "a complex option needs 'transition' or 'distributions'")
        dist = _distributed_options(ctx, f"{where}.distributions", distributions) if target is None else ()
        options.append((condition, target, dist))
    return tuple(options)


def _type_of_care_transition(ctx: _Ctx, fld: str, value: Any) -> Transition:
    if not isinstance(value, dict) or not value:
        ctx.fail(fld, "must be an object mapping ambulatory/emergency/telemedicine to states")
    for care, target in value.items():
        if care not in TYPES_OF_CARE:
            ctx.fail(f"{fld}.{care}", f"unknown type of care (known: {', '.join(sorted(TYPES_OF_CARE))})")
        if not isinstance(target, str):
            ctx.fail(f"{fld}.{care}", f"must be a state name, got {target!r}")
    return Transition("type_of_care", care=tuple(value.items()))


def _lookup_table_transition(ctx: _Ctx, fld: str, value: Any) -> Transition:
    options = _non_empty_list(ctx, fld, value)
    targets, defaults, names = [], [], set()
    for i, option in enumerate(options):
        targets.append(_target(ctx, f"{fld}[{i}]", option))
        defaults.append((targets[-1], _probability_number(ctx, f"{fld}[{i}].default_probability",
                                                           option.get("default_probability"))))
        names.add(option.get("lookup_table_name"))
    if len(names) != 1 or not isinstance(next(iter(names)), str):
        ctx.fail(f"{fld}[0].lookup_table_name", f"every option must name the same CSV table, got {sorted(map(str, names))}")
    total = sum(p for _, p in defaults)
    if total > 1.0 + PROBABILITY_SLACK:
        ctx.fail(fld, f"default probabilities sum to {total:.6g}, more than 1")
    table = _read_lookup_table(ctx, f"{fld}[0].lookup_table_name", ctx.tables / next(iter(names)), targets)
    return Transition("lookup_table", lookup=table, defaults=tuple(defaults))


def _range_cell(ctx: _Ctx, fld: str, file: Path, line: int, value: str) -> tuple[int, int]:
    low, sep, high = value.partition("-")
    try:
        if not sep:
            raise ValueError
        return int(low), int(high)
    except ValueError:
        ctx.fail(fld, f"{file}:{line}: a range cell must be 'low-high', got {value!r}")


def _read_lookup_table(ctx: _Ctx, fld: str, file: Path, targets: list[str]) -> LookupTable:
    if not file.is_file():
        ctx.fail(fld, f"lookup table {file} not found")
    with file.open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        ctx.fail(fld, f"lookup table {file} is empty")
    header = [h.strip() for h in rows[0]]
    n_attr = len(header) - len(targets)
    if n_attr < 0 or header[n_attr:] != targets:
        ctx.fail(fld, f"{file}: the last columns must be the transition states {targets}, got {header}")
    attributes = tuple(h.lower() for h in header[:n_attr])
    parsed = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            ctx.fail(fld, f"{file}:{line}: expected {len(header)} cells, got {len(row)}")
        age = time = None
        keys = []
        for name, cell in zip(attributes, row[:n_attr], strict=True):
            if name == "age":
                age = _range_cell(ctx, fld, file, line, cell.strip())
            elif name == "time":
                time = _range_cell(ctx, fld, file, line, cell.strip())
            else:
                keys.append(cell.strip())
        try:
            probabilities = tuple(float(cell) for cell in row[n_attr:])
        except ValueError:
            ctx.fail(fld, f"{file}:{line}: probabilities must be numbers, got {row[n_attr:]}")
        if any(not 0 <= p <= 1 for p in probabilities) or sum(probabilities) > 1 + PROBABILITY_SLACK:
            ctx.fail(fld, f"{file}:{line}: probabilities must be in [0, 1] and sum to at most 1")
        parsed.append((tuple(keys), age, time, probabilities))
    return LookupTable(str(file), attributes, tuple(parsed))


# ---- conditions

def _need(ctx: _Ctx, fld: str, cond: dict, key: str) -> Any:
    if key not in cond:
        ctx.fail(f"{fld}.{key}", f"a '{cond.get('condition_type')}' condition needs '{key}'")
    return cond[key]


def _operator(ctx: _Ctx, fld: str, cond: dict, needs_value: bool = True) -> None:
    op = _need(ctx, fld, cond, "operator")
    if op not in OPERATORS:
        ctx.fail(f"{fld}.operator", f"unknown operator {op!r} (known: {', '.join(sorted(OPERATORS))})")
    if needs_value and op not in NIL_OPERATORS and "value" not in cond and "value_code" not in cond:
        ctx.fail(f"{fld}.value", f"operator '{op}' needs a 'value'")


def _codes_or_reference(ctx: _Ctx, fld: str, cond: dict) -> None:
    if not cond.get("codes") and not cond.get("referenced_by_attribute"):
        ctx.fail(f"{fld}.codes", "needs 'codes' or 'referenced_by_attribute'")


def validate_condition(ctx: _Ctx, fld: str, cond: Any) -> None:
    if not isinstance(cond, dict):
        ctx.fail(fld, f"a condition must be an object, got {cond!r}")
    kind = cond.get("condition_type")
    if kind not in CONDITION_TYPES:
        ctx.fail(f"{fld}.condition_type", f"unknown condition type {kind!r}")
    if kind in ("And", "Or", "At Least", "At Most"):
        for i, sub in enumerate(_non_empty_list(ctx, f"{fld}.conditions", cond.get("conditions"))):
            validate_condition(ctx, f"{fld}.conditions[{i}]", sub)
        bound = {"At Least": "minimum", "At Most": "maximum"}.get(kind)
        if bound is not None:
            n = _need(ctx, fld, cond, bound)
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                ctx.fail(f"{fld}.{bound}", f"must be a non-negative integer, got {n!r}")
    elif kind == "Not":
        validate_condition(ctx, f"{fld}.condition", _need(ctx, fld, cond, "condition"))
    elif kind == "Gender":
        if _need(ctx, fld, cond, "gender") not in ("M", "F"):
            ctx.fail(f"{fld}.gender", f"must be 'M' or 'F', got {cond['gender']!r}")
    elif kind == "Age":
        _operator(ctx, fld, cond, needs_value=False)
        _need(ctx, fld, cond, "quantity")
        parse_unit(_need(ctx, fld, cond, "unit"), ctx.failer(f"{fld}.unit"))
    elif kind == "Date":
        _operator(ctx, fld, cond, needs_value=False)
        if not any(k in cond for k in ("year", "month", "date")):
            ctx.fail(f"{fld}.year", "a Date condition needs 'year', 'month' or 'date'")
    elif kind == "Socioeconomic Status":
        if _need(ctx, fld, cond, "category") not in ("High", "Middle", "Low"):
            ctx.fail(f"{fld}.category", f"must be High, Middle or Low, got {cond['category']!r}")
    elif kind == "Race":
        _need(ctx, fld, cond, "race")
    elif kind in ("Symptom", "Vital Sign"):
        _need(ctx, fld, cond, "symptom" if kind == "Symptom" else "vital_sign")
        _operator(ctx, fld, cond)
    elif kind == "Observation":
        _codes_or_reference(ctx, fld, cond)
        _operator(ctx, fld, cond)
    elif kind.startswith("Active "):
        _codes_or_reference(ctx, fld, cond)
    elif kind == "Attribute":
        _need(ctx, fld, cond, "attribute")
        _operator(ctx, fld, cond)
    elif kind == "PriorState":
        _need(ctx, fld, cond, "name")
        within = cond.get("within")
        if within is not None:
            if not isinstance(within, dict) or "quantity" not in within:
                ctx.fail(f"{fld}.within", "needs 'quantity' and 'unit'")
            parse_unit(within.get("unit"), ctx.failer(f"{fld}.within.unit"))


# ---- per-state fields

def _codes(ctx: _Ctx, raw: dict, spec: dict, key: str = "codes", required: bool = True) -> None:
    value = raw.get(key)
    if value is None and not required:
        spec[key] = ()
        return
    if not isinstance(value, list) or not value or not all(isinstance(c, dict) and "code" in c for c in value):
        ctx.fail(key, "needs a non-empty list of {system, code, display}")
    spec[key] = parse_codes(value)


def _single_code(ctx: _Ctx, raw: dict, key: str) -> Code:
    value = raw.get(key)
    if not isinstance(value, dict) or "code" not in value:
        ctx.fail(key, "needs one {system, code, display}")
    return Code.parse(value)


def _random_value(ctx: _Ctx, raw: dict, non_negative: bool = False, allow_reversed: bool = False,
                  prefix: str = "") -> Distribution | None:
    """The value of a state given as `distribution`, `exact` or `range` (whichever is present)."""
    if "distribution" in raw:
        return parse_distribution(raw["distribution"], ctx.failer(prefix + "distribution"), non_negative)
    if "exact" in raw:
        return parse_exact(raw["exact"], ctx.failer(prefix + "exact"), non_negative)
    if "range" in raw:
        return parse_range(raw["range"], ctx.failer(prefix + "range"), non_negative, allow_reversed)
    return None


def _time_unit(ctx: _Ctx, raw: dict, inner: str | None) -> str:
    """Units sit beside `distribution` or inside `exact`/`range` (older files)."""
    if inner is not None and isinstance(raw.get(inner), dict) and "unit" in raw[inner]:
        return parse_unit(raw[inner]["unit"], ctx.failer(f"{inner}.unit"))
    return parse_unit(raw.get("unit"), ctx.failer("unit"))


def _p_initial(ctx: _Ctx, raw: dict, spec: dict, warnings: list[str]) -> None:
    pass


def _p_guard(ctx: _Ctx, raw: dict, spec: dict, warnings: list[str]) -> None:
    validate_condition(ctx, "allow", _need(ctx, "allow", {"condition_type": "Guard", **raw}, "allow"))


def _p_delay(ctx: _Ctx, raw: dict, spec: dict, warnings: list[str]) -> None:
    dist = _random_value(ctx, raw, non_negative=True)
    if dist is None:
        ctx.fail("distribution", "a Delay needs 'distribution' + 'unit', 'exact' or 'range'")
    inner = "exact" if "exact" in raw else "range" if "range" in raw else None
    spec["duration"], spec["unit"] = dist, _time_unit(ctx, raw, inner)


def _p_set_attribute(ctx: _Ctx, raw: dict, spec: dict, warnings: list[str]) -> None:
    if not isinstance(raw.get("attribute"), str):
        ctx.fail("attribute", "a SetAttribute needs an 'attribute' name")
    if "expression" in raw:
        ctx.fail("expression", "expressions (CQL-like) are not supported by this engine")
    if "value_code" in raw:
        spec["value_code"] = _single_code(ctx, raw, "value_code")
    spec["distribution"] = _random_value(ctx, raw)


def _p_counter(ctx: _Ctx, raw: dict, spec: dict, warnings: list[str]) -> None:
    if not isinstance(raw.get("attribute"), str):
        ctx.fail("attribute", "a Counter needs an 'attribute' name")
    if raw.get("action") not in ("increment", "decrement"):
        ctx.fail("action", f"must be 'increment' or 'decrement', got {raw.get('action')!r}")
    amount = raw.get("amount", 1)
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        ctx.fail("amount", f"must be a number, got {amount!r}")


def _p_call_submodule(ctx: _Ctx, raw: dict, spec: dict, warnings: list[str]) -> None:
    if not isinstance(raw.get("submodule"), str) or not raw["submodule"]:
        ctx.fail("submodule", "a CallSubmodule needs a 'submodule' path")
    spec["submodule"] = raw["submodule"].removesuffix(".json")


def _p_encounter(ctx: _Ctx, raw: dict, spec: dict, warnings: list[str]) -> None:
    if raw.get("wellness"):
        _codes(ctx, raw, spec, required=False)
        return
    if raw.get("encounter_class") not in ENCOUNTER_CLASSES:
        ctx.fail("encounter_class", f"unknown encounter class {raw.get('encounter_class')!r} "
                                    f"(known: {', '.join(sorted(ENCOUNTER_CLASSES))})")
    _codes(ctx, raw, spec)
    if raw.get("telemedicine_possibility", "none") not in ("none", "possible", "always"):
        ctx.fail("telemedicine_possibility", "must be none, possible or always")


def _p_coded(ctx: _Ctx, raw: dict, spec: dict, warnings: list[str]) -> None:
    _codes(ctx, raw, spec)


def _p_ender(reference: str) -> Callable[[_Ctx, dict, dict, list[str]], None]:
    def parse(ctx: _Ctx, raw: dict, spec: dict, warnings: list[str]) -> None:
        if not any(raw.get(k) for k in (reference, "referenced_by_attribute", "codes")):
            ctx.fail(reference, f"needs '{reference}', 'referenced_by_attribute' or 'codes'")
        _codes(ctx, raw, spec, required=False)
    return parse


def _p_procedure(ctx: _Ctx, raw: dict, spec: dict, warnings: list[str]) -> None:
    _codes(ctx, raw, spec)
    if "duration" in raw:
        spec["duration"] = parse_range(raw["duration"], ctx.failer("duration"), non_negative=True)
        spec["unit"] = parse_unit(raw["duration"].get("unit"), ctx.failer("duration.unit"))
    elif "distribution" in raw:
        spec["duration"] = parse_distribution(raw["distribution"], ctx.failer("distribution"), True)
        spec["unit"] = parse_unit(raw.get("unit"), ctx.failer("unit"))


def parse_observation(ctx: _Ctx, raw: Any, prefix: str = "") -> ObservationSpec:
    if not isinstance(raw, dict):
        ctx.fail(prefix.rstrip(".") or None, "an observation must be an object")
    if "expression" in raw:
        ctx.fail(prefix + "expression", "expressions (CQL-like) are not supported by this engine")
    codes = raw.get("codes")
    if not isinstance(codes, list) or not codes:
        ctx.fail(prefix + "codes", "needs a non-empty list of {system, code, display}")
    common = dict(codes=parse_codes(codes), category=raw.get("category"), unit=raw.get("unit"))
    dist = _random_value(ctx, raw, prefix=prefix)
    if dist is not None:
        return ObservationSpec(source="distribution", distribution=dist, **common)
    for source in ("vital_sign", "attribute"):
        if source in raw:
            if not isinstance(raw[source], str):
                ctx.fail(prefix + source, "must be a name")
            return ObservationSpec(source=source, name=raw[source], **common)
    if "value_code" in raw:
        return ObservationSpec(source="value_code", value_code=_single_code(ctx, raw, "value_code"), **common)
    return ObservationSpec(source=None, **common)


def _p_observation(ctx: _Ctx, raw: dict, spec: dict, warnings: list[str]) -> None:
    spec["observation"] = parse_observation(ctx, raw)


def _p_panel(ctx: _Ctx, raw: dict, spec: dict, warnings: list[str]) -> None:
    _codes(ctx, raw, spec)
    observations = raw.get("observations")
    if observations is None and raw.get("type") == "DiagnosticReport" and "number_of_observations" in raw:
        spec["observations"] = ()
        return
    spec["observations"] = tuple(parse_observation(ctx, o, f"observations[{i}].")
                                 for i, o in enumerate(_non_empty_list(ctx, "observations", observations)))


def _p_vital_sign(ctx: _Ctx, raw: dict, spec: dict, warnings: list[str]) -> None:
    if not isinstance(raw.get("vital_sign"), str):
        ctx.fail("vital_sign", "a VitalSign needs a 'vital_sign' name")
    if "expression" in raw:
        ctx.fail("expression", "expressions (CQL-like) are not supported by this engine")
    spec["value"] = _random_value(ctx, raw)
    if spec["value"] is None:
        ctx.fail("exact", "a VitalSign needs 'exact', 'range' or 'distribution'")


def _p_symptom(ctx: _Ctx, raw: dict, spec: dict, warnings: list[str]) -> None:
    if not isinstance(raw.get("symptom"), str):
        ctx.fail("symptom", "a Symptom needs a 'symptom' name")
    rng = raw.get("range")
    if isinstance(rng, dict) and isinstance(rng.get("low"), int | float) and isinstance(rng.get("high"), int | float) \
            and rng["low"] > rng["high"]:
        warnings.append(f"{ctx.file}: state '{ctx.state}': field 'range': low {rng['low']} > high {rng['high']}; "
                        "severity is drawn between the two bounds, as Synthea does")
    spec["severity"] = _random_value(ctx, raw, allow_reversed=True)
    if spec["severity"] is None:
        ctx.fail("range", "a Symptom needs 'exact', 'range' or 'distribution'")
    probability = raw.get("probability", 1.0)
    spec["probability"] = _probability_number(ctx, "probability", probability)


def _p_death(ctx: _Ctx, raw: dict, spec: dict, warnings: list[str]) -> None:
    _codes(ctx, raw, spec, required=False)
    dist = _random_value(ctx, raw, non_negative=True)
    if dist is not None:
        inner = "exact" if "exact" in raw else "range" if "range" in raw else None
        spec["delay"], spec["unit"] = dist, _time_unit(ctx, raw, inner)


def _p_device(ctx: _Ctx, raw: dict, spec: dict, warnings: list[str]) -> None:
    spec["code"] = _single_code(ctx, raw, "code")


def _p_supply_list(ctx: _Ctx, raw: dict, spec: dict, warnings: list[str]) -> None:
    supplies = []
    for i, item in enumerate(_non_empty_list(ctx, "supplies", raw.get("supplies"))):
        if not isinstance(item, dict) or not isinstance(item.get("quantity"), int | float):
            ctx.fail(f"supplies[{i}].quantity", "each supply needs a numeric 'quantity'")
        supplies.append((_single_code(ctx, item, "code") if "code" in item else ctx.fail(f"supplies[{i}].code", "missing"),
                         item["quantity"]))
    spec["supplies"] = tuple(supplies)


def _p_imaging(ctx: _Ctx, raw: dict, spec: dict, warnings: list[str]) -> None:
    spec["procedure_code"] = _single_code(ctx, raw, "procedure_code")
    series = _non_empty_list(ctx, "series", raw.get("series"))
    for i, item in enumerate(series):
        if not isinstance(item, dict) or not item.get("instances"):
            ctx.fail(f"series[{i}].instances", "each series needs a non-empty 'instances' list")
    spec["series"] = series


def _p_physiology(ctx: _Ctx, raw: dict, spec: dict, warnings: list[str]) -> None:
    alt = raw.get("alt_direct_transition")
    if not isinstance(alt, str):
        ctx.fail("alt_direct_transition", "a Physiology state needs 'alt_direct_transition' "
                                          "(physiology simulation is off in this engine)")
    spec["alt_direct_transition"] = alt


_STATE_PARSERS: dict[str, Callable[[_Ctx, dict, dict, list[str]], None]] = {
    "Guard": _p_guard, "Delay": _p_delay, "SetAttribute": _p_set_attribute, "Counter": _p_counter,
    "CallSubmodule": _p_call_submodule, "Encounter": _p_encounter,
    "ConditionOnset": _p_coded, "AllergyOnset": _p_coded, "MedicationOrder": _p_coded,
    "CarePlanStart": _p_coded, "Vaccine": _p_coded,
    "ConditionEnd": _p_ender("condition_onset"), "AllergyEnd": _p_ender("allergy_onset"),
    "MedicationEnd": _p_ender("medication_order"), "CarePlanEnd": _p_ender("careplan"),
    "DeviceEnd": _p_ender("device"),
    "Procedure": _p_procedure, "VitalSign": _p_vital_sign, "Observation": _p_observation,
    "MultiObservation": _p_panel, "DiagnosticReport": _p_panel, "Symptom": _p_symptom, "Death": _p_death,
    "Device": _p_device, "SupplyList": _p_supply_list, "ImagingStudy": _p_imaging, "Physiology": _p_physiology,
}
