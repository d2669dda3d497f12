"""Conditions (Synthea's "Logic"): the 21 condition types, evaluated for one module run."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, Protocol

from fedlab.synthea.gmf.person import PersonState
from fedlab.synthea.gmf.values import (
    Code,
    GMFRuntimeError,
    RandomSource,
    age_in,
    duration_ms,
    from_millis,
    to_millis,
)


class _Simulation(Protocol):
    person: PersonState
    rng: RandomSource


class _StateDef(Protocol):
    name: str


class _StateVisit(Protocol):
    d: _StateDef
    exited: int | None


class RunContext(Protocol):
    """What a condition reads from the module run it is tested in (`runtime.ModuleRun` is one)."""

    sim: _Simulation
    history: Sequence[_StateVisit]

_ACTIVE_KIND = {
    "Active Condition": "condition", "Active Medication": "medication", "Active CarePlan": "careplan",
    "Active Allergy": "allergy",
}


def compare(lhs: Any, rhs: Any, operator: str) -> bool:
    """Synthea's Utilities.compare: numbers with all operators, booleans and strings with ==/!=."""
    if operator == "is nil":
        return lhs is None
    if operator == "is not nil":
        return lhs is not None
    if lhs is None:
        return False
    if isinstance(lhs, Code):
        lhs = lhs.code
    if isinstance(rhs, dict) and "code" in rhs:
        rhs = str(rhs["code"])
    lhs_bool, rhs_bool = isinstance(lhs, bool), isinstance(rhs, bool)
    if lhs_bool or rhs_bool:
        if not (lhs_bool and rhs_bool):
            raise GMFRuntimeError(f"cannot compare {lhs!r} with {rhs!r}")
        if operator in ("==", "!="):
            return (lhs == rhs) == (operator == "==")
        raise GMFRuntimeError(f"operator {operator!r} does not apply to booleans")
    if isinstance(lhs, int | float) and isinstance(rhs, int | float):
        return _ordered(lhs, rhs, operator)
    if isinstance(lhs, str) and isinstance(rhs, str):
        return _ordered(lhs, rhs, operator)
    if operator in ("==", "!="):  # e.g. an attribute holding a recorded entry
        return (lhs == rhs) == (operator == "==")
    raise GMFRuntimeError(f"cannot compare {type(lhs).__name__} {lhs!r} with {rhs!r} using {operator!r}")


def _ordered(lhs: Any, rhs: Any, operator: str) -> bool:
    if operator == "<":
        return lhs < rhs
    if operator == "<=":
        return lhs <= rhs
    if operator == "==":
        return lhs == rhs
    if operator == ">=":
        return lhs >= rhs
    if operator == ">":
        return lhs > rhs
    return lhs != rhs


def test(cond: dict, run: RunContext, time: int) -> bool:
    return _TESTS[cond["condition_type"]](cond, run, time)


def _gender(cond: dict, run: RunContext, time: int) -> bool:
    return run.sim.person.gender == cond["gender"]


def _age(cond: dict, run: RunContext, time: int) -> bool:
    age = age_in(cond["unit"], run.sim.person.birth_ms, time)
    return compare(age, cond["quantity"], cond["operator"])


def _date(cond: dict, run: RunContext, time: int) -> bool:
    now = from_millis(time)
    if "year" in cond:
        return compare(now.year, cond["year"], cond["operator"])
    if "month" in cond:
        return compare(now.month, cond["month"], cond["operator"])
    d = cond["date"]
    moment = dt.datetime(d["year"], d.get("month", 1), d.get("day", 1), d.get("hour", 0), d.get("minute", 0),
                         d.get("second", 0), d.get("millisecond", 0) * 1000)
    return compare(time, to_millis(moment), cond["operator"])


def _ses(cond: dict, run: RunContext, time: int) -> bool:
    return run.sim.person.socioeconomic_category() == cond["category"]


def _race(cond: dict, run: RunContext, time: int) -> bool:
    return str(cond["race"]).lower() == run.sim.person.race.lower()


def _symptom(cond: dict, run: RunContext, time: int) -> bool:
    return compare(run.sim.person.symptom(cond["symptom"]), cond["value"], cond["operator"])


def _observation(cond: dict, run: RunContext, time: int) -> bool:
    person, found, value = run.sim.person, False, None
    if cond.get("codes"):
        for code in cond["codes"]:
            if person.has_observation(str(code["code"])):
                found, value = True, person.latest_observation(str(code["code"]))
                break
    else:
        entry = person.get_attribute(cond["referenced_by_attribute"])
        if entry is not None and getattr(entry, "kind", None) in ("observation", "panel"):
            found, value = True, entry.value
    op = cond["operator"]
    if op in ("is nil", "is not nil"):
        return found == (op == "is not nil")
    if not found:
        return False
    target = cond["value_code"] if "value_code" in cond else cond.get("value")
    return compare(value, target, op)


def _vital_sign(cond: dict, run: RunContext, time: int) -> bool:
    sim = run.sim
    value = sim.person.vital_sign(cond["vital_sign"], time, sim.rng)
    return compare(value, cond["value"], cond["operator"])


def _active(cond: dict, run: RunContext, time: int) -> bool:
    kind, person = _ACTIVE_KIND[cond["condition_type"]], run.sim.person
    if cond.get("codes"):
        return any(person.active(kind, str(c["code"])) is not None for c in cond["codes"])
    entry = person.get_attribute(cond["referenced_by_attribute"])
    code = getattr(entry, "code", None)
    return code is not None and person.active(kind, code) is not None


def _attribute(cond: dict, run: RunContext, time: int) -> bool:
    value = run.sim.person.get_attribute(cond["attribute"])
    return compare(value, cond.get("value"), cond["operator"])


def _prior_state(cond: dict, run: RunContext, time: int) -> bool:
    """Synthea's Person.hadPriorState: walk the module's history from the newest state."""
    name, since = cond["name"], cond.get("since")
    within = cond.get("within")
    cutoff = time - duration_ms(within["quantity"], within["unit"]) if within else None
    for inst in reversed(run.history):
        if cutoff is not None and inst.exited is not None and inst.exited <= cutoff:
            return False
        if inst.d.name == name:
            return True
        if since is not None and inst.d.name == since:
            return False
    return False


def _and(cond: dict, run: RunContext, time: int) -> bool:
    return all(test(c, run, time) for c in cond["conditions"])


def _or(cond: dict, run: RunContext, time: int) -> bool:
    return any(test(c, run, time) for c in cond["conditions"])


def _not(cond: dict, run: RunContext, time: int) -> bool:
    return not test(cond["condition"], run, time)


def _at_least(cond: dict, run: RunContext, time: int) -> bool:
    return sum(1 for c in cond["conditions"] if test(c, run, time)) >= cond["minimum"]


def _at_most(cond: dict, run: RunContext, time: int) -> bool:
    return sum(1 for c in cond["conditions"] if test(c, run, time)) <= cond["maximum"]


_TESTS = {
    "Gender": _gender, "Age": _age, "Date": _date, "Socioeconomic Status": _ses, "Race": _race,
    "Symptom": _symptom, "Observation": _observation, "Vital Sign": _vital_sign,
    "Active Condition": _active, "Active Medication": _active, "Active CarePlan": _active,
    "Active Allergy": _active, "Attribute": _attribute, "PriorState": _prior_state, "And": _and,
    "Or": _or, "Not": _not, "At Least": _at_least, "At Most": _at_most,
    "True": lambda cond, run, time: True, "False": lambda cond, run, time: False,
}
