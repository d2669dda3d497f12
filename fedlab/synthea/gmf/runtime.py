"""The interpreter: runs loaded modules for one person on Synthea's weekly time step.

Why one module: it is one interpreter. The state types' semantics share the run's clock, its state
history and the order of its random draws, which reproducibility depends on; they read best beside
the loop that calls them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fedlab.synthea.gmf import logic
from fedlab.synthea.gmf.loader import Module, NamedProbability, ObservationSpec, StateDef, Transition
from fedlab.synthea.gmf.person import PersonState
from fedlab.synthea.gmf.record import Entry, GMFEncounter, GMFRecord
from fedlab.synthea.gmf.values import (
    DAY,
    MINUTE,
    WEEK,
    Code,
    GMFRuntimeError,
    RandomSource,
    age_in,
    duration_ms,
    from_millis,
    to_millis,
)

YEAR = 365 * DAY

NEVER = 2**62  # a wake time for modules that are finished
AT_WELLNESS = NEVER - 1  # a wake time for modules waiting for the next wellness visit
MAX_TRANSITIONS_PER_STEP = 20_000  # a module looping without a Delay or Guard is a module bug
WELLNESS_CODE = Code("SNOMED-CT", "185349003", "Encounter for check up (procedure)")
ENCOUNTER_MINUTES = 15


# ---------------------------------------------------------------- wellness schedule

@dataclass(frozen=True)
class WellnessSchedule:
    """Synthea's recommended time between wellness visits (EncounterModule), optionally scaled.
    Monthly to bi-yearly in infancy, yearly to 19, every 3 years to 39, every 2 to 49, then yearly."""

    scale: float = 1.0

    def interval_ms(self, birth_ms: int, time_ms: int) -> int:
        years = age_in("years", birth_ms, time_ms)
        if years <= 3:
            months = age_in("months", birth_ms, time_ms)
            interval = duration_ms(1 if months <= 1 else 2 if months <= 5 else 3 if months <= 17 else 6, "months")
        elif years <= 19:
            interval = duration_ms(1, "years")
        elif years <= 39:
            interval = duration_ms(3, "years")
        elif years <= 49:
            interval = duration_ms(2, "years")
        else:
            interval = duration_ms(1, "years")
        return int(interval * self.scale)


# ---------------------------------------------------------------- run-time structures

class StateInstance:
    """One visit of a state (Synthea clones the state on every entry)."""

    __slots__ = ("d", "entered", "exited", "next", "sub", "diagnosed")

    def __init__(self, definition: StateDef) -> None:
        self.d = definition
        self.entered: int | None = None
        self.exited: int | None = None
        self.next: int | None = None  # Delay: when it expires
        self.sub: ModuleRun | None = None  # CallSubmodule: the submodule in progress
        self.diagnosed = False  # ConditionOnset/AllergyOnset waiting for its target encounter


# Version 4 and variant bits of a random UUID, applied with one mask.
_UUID4_KEEP = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


class Simulation:
    """Per-person context shared by all module runs."""

    def __init__(self, modules: dict[str, Module], person: PersonState, rng: RandomSource) -> None:
        self.modules, self.person, self.rng = modules, person, rng
        self.record = GMFRecord()
        self.wellness: GMFEncounter | None = None
        self.by_state: dict[tuple[str, str], Entry] = {}
        self._ids = random.Random(rng.bits())

    def new_id(self) -> str:
        h = f"{(self._ids.getrandbits(128) & _UUID4_KEEP) | _UUID4_SET:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def add(self, entry: Entry) -> Entry:
        self.record.entries.append(entry)
        if entry.encounter is not None:
            entry.encounter.entries.append(entry)
        return entry

    def open_wellness(self, time: int) -> GMFEncounter:
        encounter = GMFEncounter(codes=(WELLNESS_CODE,), encounter_class="wellness", start=time,
                                 module="wellness schedule", state="", resource_id=self.new_id(), wellness=True)
        self.record.encounters.append(encounter)
        self.wellness = encounter
        return encounter

    def close_wellness(self, time: int) -> None:
        if self.wellness is not None:
            _finish(self.wellness, time)
            self.wellness = None


def _finish(encounter: GMFEncounter, time: int) -> None:
    latest = max((e.stop for e in encounter.entries if e.kind == "procedure" and e.stop), default=time)
    encounter.stop = max(time, latest, encounter.start + ENCOUNTER_MINUTES * MINUTE)


class ModuleRun:
    """A module's progress for one person: its current state and history (newest last)."""

    def __init__(self, module: Module, sim: Simulation) -> None:
        self.module, self.sim = module, sim
        self.encounter: GMFEncounter | None = None
        self.encounter_state: str | None = None  # the Encounter state that opened `encounter`
        self.wellness_available = False
        self.current = StateInstance(module.states["Initial"])
        self.history: list[StateInstance] = [self.current]

    # ---- processing
    def process(self, time: int) -> bool:
        """Advance as far as possible at `time`; True when the module reached a Terminal state."""
        self.wellness_available = self.sim.wellness is not None
        try:
            return self._process(time)
        finally:
            self.wellness_available = False

    def _process(self, time: int) -> bool:
        person = self.sim.person
        current = self.current
        transitions = 0
        try:  # one handler around the loop (not per call): this is the interpreter's hot path
            while person.alive(time) and self._run(current, time):
                exited = current.exited
                current = self._enter(self._follow(current, time))
                transitions += 1
                if transitions > MAX_TRANSITIONS_PER_STEP:
                    raise GMFRuntimeError(f"{self.module.file}: state '{current.d.name}': more than "
                                          f"{MAX_TRANSITIONS_PER_STEP} transitions in one time step (a loop "
                                          "without Delay or Guard?)")
                if exited is not None and exited < time:
                    # A Delay that expired between time steps: continue at the moment it expired.
                    if self._process(exited):
                        return True
                    current = self.current
        except GMFRuntimeError as exc:
            if exc.args and str(exc.args[0]).startswith(self.module.file):
                raise
            raise GMFRuntimeError(f"{self.module.file}: state '{current.d.name}': {exc}") from None
        return current.d.type == "Terminal"

    def _checked(self, step: Callable[[StateInstance, int], Any], inst: StateInstance, time: int) -> Any:
        try:
            return step(inst, time)
        except GMFRuntimeError as exc:
            if exc.args and str(exc.args[0]).startswith(self.module.file):
                raise
            raise GMFRuntimeError(f"{self.module.file}: state '{inst.d.name}': {exc}") from None

    def _run(self, inst: StateInstance, time: int) -> bool:
        if inst.entered is None:
            inst.entered = time
        kind = inst.d.type
        if not HANDLERS[kind](self, inst, time):
            return False
        inst.exited = inst.next if kind == "Delay" else time
        return True

    def _enter(self, name: str) -> StateInstance:
        inst = StateInstance(self.module.states[name])
        self.history.append(inst)
        self.current = inst
        return inst

    def blocked_at_guard(self, time: int) -> bool:
        """A cheap check for the common case of a Guard that still does not allow passage."""
        inst = self.current
        if inst.d.type != "Guard" or inst.entered is None:
            return False
        return not self._checked(lambda i, t: logic.test(i.d.raw["allow"], self, t), inst, time)

    def wake(self) -> int:
        """The earliest time processing this module can change anything (0: every step)."""
        inst = self.current
        kind = inst.d.type
        if kind == "Terminal":
            return NEVER
        if inst.entered is None:
            return 0
        if kind == "Delay" and inst.next is not None:
            return inst.next
        if kind == "Encounter" and inst.d.raw.get("wellness"):
            return AT_WELLNESS
        if kind == "CallSubmodule" and inst.sub is not None:
            return inst.sub.wake()
        return 0

    # ---- transitions
    def _follow(self, inst: StateInstance, time: int) -> str:
        definition = inst.d
        if definition.type == "Physiology":
            return definition.spec["alt_direct_transition"]
        transition = definition.transition
        assert transition is not None  # only Terminal has none, and Terminal never exits
        return _FOLLOW[transition.kind](self, transition, time)

    def pick(self, options: Iterable[tuple[str, Any]]) -> str:
        """Synthea's pickDistributedTransition: the remainder goes to the last option."""
        options = list(options)
        p = self.sim.rng.random()
        high = 0.0
        for target, probability in options:
            if isinstance(probability, NamedProbability):
                value = self.sim.person.get_attribute(probability.attribute)
                ok = isinstance(value, int | float) and not isinstance(value, bool)
                probability = float(value) if ok else probability.default
            high += probability
            if p < high:
                return target
        return options[-1][0]

    # ---- helpers for state handlers
    def entry(self, kind: str, inst: StateInstance, time: int, codes: tuple[Code, ...], **fields: Any) -> Entry:
        return Entry(kind=kind, codes=codes, start=time, module=self.module.key, state=inst.d.name,
                     resource_id=self.sim.new_id(), encounter=self.encounter, **fields)

    def reason(self, name: str | None) -> Entry | Code | None:
        """`reason` names an attribute holding an entry/code, or a ConditionOnset state."""
        if not name:
            return None
        value = self.sim.person.get_attribute(name)
        if isinstance(value, Entry | Code):
            return value
        return self.sim.by_state.get(("condition", name))


# ---------------------------------------------------------------- transitions

def _direct(run: ModuleRun, t: Transition, time: int) -> str:
    return t.target  # type: ignore[return-value]


def _distributed(run: ModuleRun, t: Transition, time: int) -> str:
    return run.pick(t.distributed)


def _conditional(run: ModuleRun, t: Transition, time: int) -> str:
    for condition, target in t.conditional:
        if condition is None or logic.test(condition, run, time):
            return target
    return t.conditional[-1][1]


def _complex(run: ModuleRun, t: Transition, time: int) -> str:
    chosen = t.complex[-1]
    for option in t.complex:
        if option[0] is None or logic.test(option[0], run, time):
            chosen = option
            break
    _, target, options = chosen
    return target if target is not None else run.pick(options)


def _lookup_table(run: ModuleRun, t: Transition, time: int) -> str:
    table, person = t.lookup, run.sim.person
    assert table is not None
    keys = []
    for name in table.attributes:
        if name in ("age", "time"):
            continue
        value = person.get_attribute(name)
        if value is None:
            raise GMFRuntimeError(f"{run.module.file}: state '{run.current.d.name}': lookup table {table.file} "
                                  f"needs attribute '{name}', which this person does not have")
        keys.append(str(value.code if isinstance(value, Code) else value))
    age = int(age_in("years", person.birth_ms, time))
    for row_keys, age_range, time_range, probabilities in table.rows:
        if row_keys != tuple(keys):
            continue
        if age_range is not None and not age_range[0] <= age <= age_range[1]:
            continue
        if time_range is not None and not time_range[0] <= time <= time_range[1]:
            continue
        return run.pick(zip([target for target, _ in t.defaults], probabilities, strict=True))
    return run.pick(t.defaults)


def _type_of_care(run: ModuleRun, t: Transition, time: int) -> str:
    cls = run.encounter.encounter_class if run.encounter is not None else "ambulatory"
    care = {"emergency": "emergency", "virtual": "telemedicine"}.get(cls, "ambulatory")
    mapping = dict(t.care)
    return mapping.get(care, mapping.get("ambulatory", t.care[0][1]))


_FOLLOW: dict[str, Callable[[ModuleRun, Transition, int], str]] = {
    "direct": _direct, "distributed": _distributed, "conditional": _conditional, "complex": _complex,
    "lookup_table": _lookup_table, "type_of_care": _type_of_care,
}


# ---------------------------------------------------------------- states

def _sample_duration(run: ModuleRun, dist: Any, unit: str) -> int:
    return max(0, duration_ms(dist.sample(run.sim.rng), unit))


def _pass(run: ModuleRun, inst: StateInstance, time: int) -> bool:
    return True


def _terminal(run: ModuleRun, inst: StateInstance, time: int) -> bool:
    return False


def _guard(run: ModuleRun, inst: StateInstance, time: int) -> bool:
    return logic.test(inst.d.raw["allow"], run, time)


def _delay(run: ModuleRun, inst: StateInstance, time: int) -> bool:
    if inst.next is None:
        assert inst.entered is not None
        inst.next = inst.entered + _sample_duration(run, inst.d.spec["duration"], inst.d.spec["unit"])
    return time >= inst.next


def _set_attribute(run: ModuleRun, inst: StateInstance, time: int) -> bool:
    raw, spec = inst.d.raw, inst.d.spec
    if "value_code" in spec:
        value: Any = spec["value_code"]
    elif spec.get("distribution") is not None:
        value = spec["distribution"].sample(run.sim.rng)
    elif "value_attribute" in raw:
        value = run.sim.person.get_attribute(raw["value_attribute"])
    else:
        value = raw.get("value")
    run.sim.person.set_attribute(raw["attribute"], value)
    return True


def _counter(run: ModuleRun, inst: StateInstance, time: int) -> bool:
    raw, person = inst.d.raw, run.sim.person
    current = person.get_attribute(raw["attribute"])
    if not isinstance(current, int | float) or isinstance(current, bool):
        current = 0
    amount = raw.get("amount", 1)
    person.set_attribute(raw["attribute"], current + amount if raw["action"] == "increment" else current - amount)
    return True


def _call_submodule(run: ModuleRun, inst: StateInstance, time: int) -> bool:
    key = inst.d.spec["submodule"]
    module = run.sim.modules.get(key)
    if module is None:  # allowed to be missing at load time: behaves as an empty submodule
        run.sim.record.skipped_submodules.append(key)
        return True
    if inst.sub is None:
        inst.sub = ModuleRun(module, run.sim)
    sub = inst.sub
    if run.encounter is not None:
        sub.encounter, sub.encounter_state = run.encounter, run.encounter_state
    if not sub.process(time):
        return False
    run.history.extend(sub.history)  # the submodule's states become part of the caller's history
    run.encounter, run.encounter_state = sub.encounter, sub.encounter_state
    inst.sub = None
    return True


def _encounter(run: ModuleRun, inst: StateInstance, time: int) -> bool:
    raw, spec, sim = inst.d.raw, inst.d.spec, run.sim
    if raw.get("wellness"):
        if not run.wellness_available or sim.wellness is None:
            return False  # wait for the next scheduled wellness visit
        run.wellness_available = False
        encounter = sim.wellness
    else:
        cls = "virtual" if raw.get("telemedicine_possibility") == "always" else raw["encounter_class"]
        encounter = GMFEncounter(codes=spec["codes"], encounter_class=cls, start=time, module=run.module.key,
                                 state=inst.d.name, resource_id=sim.new_id())
        sim.record.encounters.append(encounter)
    run.encounter, run.encounter_state = encounter, inst.d.name
    _diagnose_past(run, inst.d.name, time)  # first, so a reason waiting for this encounter is recorded
    if encounter.reason is None:
        encounter.reason = run.reason(raw.get("reason"))
    return True


def _diagnose_past(run: ModuleRun, encounter_state: str, time: int) -> None:
    if encounter_state not in run.module.targeted_encounters:
        return
    for past in run.history:
        if past.d.type in ("ConditionOnset", "AllergyOnset") and not past.diagnosed \
                and past.d.raw.get("target_encounter") == encounter_state:
            _diagnose(run, past, time)


def _encounter_end(run: ModuleRun, inst: StateInstance, time: int) -> bool:
    encounter = run.encounter
    if encounter is not None:
        if not encounter.wellness:
            _finish(encounter, time)
        run.encounter = run.encounter_state = None
    return True


_ONSET_KIND = {"ConditionOnset": "condition", "AllergyOnset": "allergy"}


def _onset(run: ModuleRun, inst: StateInstance, time: int) -> bool:
    target = inst.d.raw.get("target_encounter")
    if not target or (run.encounter is not None and run.encounter_state == target):
        _diagnose(run, inst, time)
    elif inst.d.raw.get("assign_to_attribute"):
        # Not yet diagnosed: a placeholder lets later states (e.g. a MedicationOrder reason) refer to it.
        placeholder = Entry(kind=_ONSET_KIND[inst.d.type], codes=inst.d.spec["codes"], start=time,
                            module=run.module.key, state=inst.d.name, resource_id="")
        run.sim.person.set_attribute(inst.d.raw["assign_to_attribute"], placeholder)
    return True


def _diagnose(run: ModuleRun, inst: StateInstance, time: int) -> None:
    kind, person, raw = _ONSET_KIND[inst.d.type], run.sim.person, inst.d.raw
    codes = inst.d.spec["codes"]
    entry = person.active(kind, codes[0].code)
    if entry is None:  # an active condition is recorded once, as Synthea's conditionStart
        details = {k: raw[k] for k in ("allergy_type", "category", "reactions") if k in raw}
        entry = run.sim.add(run.entry(kind, inst, time, codes, details=details))
        person.activate(kind, codes[0].code, entry)
    if raw.get("assign_to_attribute"):
        person.set_attribute(raw["assign_to_attribute"], entry)
    run.sim.by_state[(kind, inst.d.name)] = entry
    inst.diagnosed = True


_END_KIND = {
    "ConditionEnd": ("condition", "condition_onset"), "AllergyEnd": ("allergy", "allergy_onset"),
    "MedicationEnd": ("medication", "medication_order"), "CarePlanEnd": ("careplan", "careplan"),
    "DeviceEnd": ("device", "device"),
}


def _end(run: ModuleRun, inst: StateInstance, time: int) -> bool:
    kind, reference = _END_KIND[inst.d.type]
    raw, person = inst.d.raw, run.sim.person
    targets: list[Entry] = []
    if raw.get(reference):
        found = run.sim.by_state.get((kind, raw[reference]))
        targets = [found] if found is not None else []
    elif raw.get("referenced_by_attribute"):
        value = person.get_attribute(raw["referenced_by_attribute"])
        targets = [value] if isinstance(value, Entry) else []
    else:
        targets = [e for c in inst.d.spec["codes"] if (e := person.active(kind, c.code)) is not None]
    for entry in targets:
        if person.active(kind, entry.code) is entry:
            person.deactivate(kind, entry.code)
        if entry.stop is None and entry.resource_id:
            entry.stop = time
    return True


def _start_active(kind: str) -> Callable[[ModuleRun, StateInstance, int], bool]:
    """MedicationOrder / CarePlanStart / Device: recorded once while active, like a condition."""

    def handler(run: ModuleRun, inst: StateInstance, time: int) -> bool:
        raw, person = inst.d.raw, run.sim.person
        codes = (inst.d.spec["code"],) if kind == "device" else inst.d.spec["codes"]
        entry = person.active(kind, codes[0].code)
        if entry is None:
            keep = ("chronic", "prescription", "administration", "activities", "goals", "manufacturer", "model")
            entry = run.entry(kind, inst, time, codes, reason=run.reason(raw.get("reason")),
                              details={k: raw[k] for k in keep if k in raw})
            run.sim.add(entry)
            person.activate(kind, codes[0].code, entry)
        if raw.get("assign_to_attribute"):
            person.set_attribute(raw["assign_to_attribute"], entry)
        run.sim.by_state[(kind, inst.d.name)] = entry
        return True

    return handler


def _procedure(run: ModuleRun, inst: StateInstance, time: int) -> bool:
    raw, spec = inst.d.raw, inst.d.spec
    stop = time + _sample_duration(run, spec["duration"], spec["unit"]) if "duration" in spec else time
    entry = run.sim.add(run.entry("procedure", inst, time, spec["codes"], stop=stop,
                                  reason=run.reason(raw.get("reason"))))
    if raw.get("assign_to_attribute"):
        run.sim.person.set_attribute(raw["assign_to_attribute"], entry)
    run.sim.by_state[("procedure", inst.d.name)] = entry
    return True


def _vital_sign(run: ModuleRun, inst: StateInstance, time: int) -> bool:
    run.sim.person.set_vital_sign(inst.d.raw["vital_sign"], inst.d.spec["value"].sample(run.sim.rng))
    return True


def observe(run: ModuleRun, inst: StateInstance, spec: ObservationSpec, time: int, kind: str = "observation") -> Entry:
    sim = run.sim
    if spec.source == "distribution":
        value: Any = spec.distribution.sample(sim.rng)  # type: ignore[union-attr]
    elif spec.source == "vital_sign":
        value = sim.person.vital_sign(spec.name, time, sim.rng)  # type: ignore[arg-type]
    elif spec.source == "attribute":
        value = sim.person.get_attribute(spec.name)  # type: ignore[arg-type]
        value = value.codes[0] if isinstance(value, Entry) and value.codes else value
    elif spec.source == "value_code":
        value = spec.value_code
    else:
        value = None
    entry = run.entry(kind, inst, time, spec.codes, value=value, unit=spec.unit, category=spec.category)
    for code in spec.codes[:1]:
        sim.person.record_observation(code.code, value.code if isinstance(value, Code) else value, time)
    return entry


def _observation(run: ModuleRun, inst: StateInstance, time: int) -> bool:
    entry = run.sim.add(observe(run, inst, inst.d.spec["observation"], time))
    if inst.d.raw.get("assign_to_attribute"):
        run.sim.person.set_attribute(inst.d.raw["assign_to_attribute"], entry)
    return True


def _multi_observation(run: ModuleRun, inst: StateInstance, time: int) -> bool:
    raw = inst.d.raw
    parts = [observe(run, inst, spec, time) for spec in inst.d.spec["observations"]]
    panel = run.entry("panel", inst, time, inst.d.spec["codes"], category=raw.get("category"), parts=parts)
    for part in parts:
        part.encounter = None  # components live inside the panel, not as separate observations
    run.sim.add(panel)
    run.sim.person.record_observation(panel.code, None, time)
    return True


def _diagnostic_report(run: ModuleRun, inst: StateInstance, time: int) -> bool:
    specs = inst.d.spec["observations"]
    if specs:
        parts = [run.sim.add(observe(run, inst, spec, time)) for spec in specs]
    else:  # older form: the report gathers the last N observations of the encounter
        n = int(inst.d.raw.get("number_of_observations", 0))
        pool = run.encounter.entries if run.encounter is not None else run.sim.record.entries
        parts = [e for e in pool if e.kind == "observation"][-n:] if n else []
    run.sim.add(run.entry("report", inst, time, inst.d.spec["codes"], parts=parts))
    return True


def _symptom(run: ModuleRun, inst: StateInstance, time: int) -> bool:
    raw, spec, sim = inst.d.raw, inst.d.spec, run.sim
    if spec["probability"] >= 1.0 or sim.rng.random() <= spec["probability"]:
        severity = spec["severity"]
        low, high = severity.params.get("low"), severity.params.get("high")
        if severity.kind == "UNIFORM" and low is not None and high is not None and low > high:
            value = sim.rng.uniform(low, high)  # reversed bounds: between the two, as Synthea
        else:
            value = severity.sample(sim.rng)
        sim.person.set_symptom(raw.get("cause") or run.module.name, raw["symptom"], value, time)
    return True


def _death(run: ModuleRun, inst: StateInstance, time: int) -> bool:
    spec, raw, sim = inst.d.spec, inst.d.raw, run.sim
    when = time + _sample_duration(run, spec["delay"], spec["unit"]) if "delay" in spec else time
    cause: Any = spec["codes"][0] if spec["codes"] else None
    for key in ("condition_onset", "referenced_by_attribute"):
        if raw.get(key):
            cause = sim.by_state.get(("condition", raw[key])) or sim.person.get_attribute(raw[key]) or cause
    sim.person.record_death(when, cause)
    if sim.record.death_ms is None or when < sim.record.death_ms:
        sim.record.death_ms = when
    sim.add(run.entry("death", inst, when, spec["codes"], reason=cause if isinstance(cause, Entry | Code) else None))
    return True


def _supply_list(run: ModuleRun, inst: StateInstance, time: int) -> bool:
    for code, quantity in inst.d.spec["supplies"]:
        run.sim.add(run.entry("supply", inst, time, (code,), value=quantity))
    return True


def _imaging(run: ModuleRun, inst: StateInstance, time: int) -> bool:
    spec = inst.d.spec
    procedure = run.sim.add(run.entry("procedure", inst, time, (spec["procedure_code"],), stop=time))
    run.sim.add(run.entry("imaging", inst, time, (spec["procedure_code"],), parts=[procedure],
                          details={"series": spec["series"]}))
    return True


def _vaccine(run: ModuleRun, inst: StateInstance, time: int) -> bool:
    raw = inst.d.raw
    run.sim.add(run.entry("immunization", inst, time, inst.d.spec["codes"],
                          details={k: raw[k] for k in ("series",) if k in raw}))
    return True


HANDLERS: dict[str, Callable[[ModuleRun, StateInstance, int], bool]] = {
    "Initial": _pass, "Terminal": _terminal, "Simple": _pass, "Guard": _guard, "Delay": _delay,
    "SetAttribute": _set_attribute, "Counter": _counter, "CallSubmodule": _call_submodule,
    "Encounter": _encounter, "EncounterEnd": _encounter_end, "ConditionOnset": _onset, "ConditionEnd": _end,
    "AllergyOnset": _onset, "AllergyEnd": _end, "MedicationOrder": _start_active("medication"),
    "MedicationEnd": _end, "CarePlanStart": _start_active("careplan"), "CarePlanEnd": _end,
    "Procedure": _procedure, "VitalSign": _vital_sign, "Observation": _observation,
    "MultiObservation": _multi_observation, "DiagnosticReport": _diagnostic_report, "Symptom": _symptom,
    "Death": _death, "Device": _start_active("device"), "DeviceEnd": _end, "SupplyList": _supply_list,
    "ImagingStudy": _imaging, "Vaccine": _vaccine, "Physiology": _pass,
}


# ---------------------------------------------------------------- one person's run

def top_level_keys(modules: dict[str, Module]) -> list[str]:
    """Synthea runs the modules at the top of the folder; those in sub-folders are submodules."""
    return sorted(key for key in modules if "/" not in key)


def run_person(modules: dict[str, Module], person: PersonState, start: int, end: int, rng: Any, *,
               top_level: Iterable[str] | None = None, wellness: WellnessSchedule | None = None,
               step: int = WEEK, last_wellness: int | None = None,
               first_wellness: int | None = None) -> GMFRecord:
    """Run the modules for one person from `start` to `end` (milliseconds) and return the record.

    `rng` (random.Random or numpy.random.Generator) is the only source of randomness, so the
    same seed gives the same record. Steps are weekly; a module that can only change at a known
    time (a running Delay, a wait for the next wellness visit, a Terminal) is not polled in
    between, which gives exactly the result of polling it every week. `first_wellness`: no
    wellness visit before this time (e.g. when the person joins the practice); the first one is
    at the first step at or after it. `person.advance(time)` is called before every step."""
    source = RandomSource(rng)
    sim = Simulation(modules, person, source)
    keys = list(top_level) if top_level is not None else top_level_keys(modules)
    missing = [k for k in keys if k not in modules]
    if missing:
        raise GMFRuntimeError(f"top-level module(s) not loaded: {', '.join(missing)}")
    runs = [ModuleRun(modules[k], sim) for k in keys]
    schedule = wellness or WellnessSchedule()
    last_visit = person.birth_ms if last_wellness is None else last_wellness
    if first_wellness is not None and first_wellness > start:
        next_visit = start + -(-(first_wellness - start) // step) * step
    else:
        next_visit = _next_visit(schedule, person.birth_ms, last_visit, start, step)
    wakes = [run.wake() for run in runs]
    time = start
    while time < end and person.alive(time):
        person.advance(time)
        visit = time >= next_visit
        if visit:
            sim.open_wellness(time)
            next_visit = _next_visit(schedule, person.birth_ms, time, time + step, step)
        for i, run in enumerate(runs):
            wake = wakes[i]
            if wake <= time or (visit and wake == AT_WELLNESS):
                if run.blocked_at_guard(time):
                    continue
                run.process(time)
                wakes[i] = run.wake()
                if not person.alive(time):
                    break
        sim.close_wellness(time)
        time = _next_time(wakes, next_visit, time, step)
    _close_open_encounters(sim.record, min(end, person.death_ms or end))
    return sim.record


def _next_time(wakes: list[int], next_visit: int, time: int, step: int) -> int:
    """The next weekly step at which some module can change (polling modules: the next week)."""
    target = next_visit if AT_WELLNESS in wakes else NEVER
    for wake in wakes:
        if wake < target and wake != AT_WELLNESS:
            target = wake
    if target <= time + step:
        return time + step
    if target >= NEVER:
        return NEVER
    return time + -(-(target - time) // step) * step  # the first step at or after `target`


def _next_visit(schedule: WellnessSchedule, birth: int, last_visit: int, earliest: int, step: int) -> int:
    """The first step time (earliest + k*step) at which a wellness visit is due."""
    candidate = earliest
    while True:
        interval = schedule.interval_ms(birth, candidate)
        due = last_visit + interval
        if candidate >= due:
            return candidate
        # The interval depends on age only, so it is constant until the next birthday (weekly
        # checks in infancy, where it changes by month).
        target = min(due, _next_birthday(birth, candidate)) if candidate - birth > 4 * YEAR else candidate + step
        candidate += max(1, -(-(target - candidate) // step)) * step


def _next_birthday(birth: int, time: int) -> int:
    born, now = from_millis(birth), from_millis(time)
    for year in (now.year, now.year + 1):
        try:
            anniversary = born.replace(year=year)
        except ValueError:  # 29 February in a common year
            anniversary = born.replace(year=year, month=3, day=1)
        if anniversary > now:
            return to_millis(anniversary)
    raise AssertionError("unreachable")


def _close_open_encounters(record: GMFRecord, end: int) -> None:
    for encounter in record.encounters:
        if encounter.stop is None:
            _finish(encounter, max(encounter.start, min(end, encounter.start + ENCOUNTER_MINUTES * MINUTE)))
