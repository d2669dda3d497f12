"""Run Synthea's own Generic Module Framework modules for a person, in pure Python.

    modules = load_modules("path/to/synthea/src/main/resources/modules")
    person = SimplePerson(birth_ms=to_millis(dt.date(1960, 5, 1)), gender="F", race="white")
    record = run_person(modules, person, dt.date(1980, 1, 1), dt.date(2020, 1, 1), random.Random(7))
    encounters, unmapped = to_life_encounters(record)

`run_person` returns a `GMFRecord` (encounters and coded entries with module/state provenance);
`to_life_encounters` / `to_life` turn it into the lifecycle record model the FHIR exporter reads,
entries whose codes `codes.py` does not map in `Encounter.other` (exported with the module's own
codes) and the kinds the exporter does not write in the `unmapped` list. See GMF.md for coverage.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from fedlab.synthea import codes
from fedlab.synthea.gmf.loader import (
    CONDITION_TYPES,
    STATE_TYPES,
    TRANSITION_KEYS,
    Module,
    check_submodules,
    load_module,
    load_modules,
)
from fedlab.synthea.gmf.person import DEFAULT_VITALS, PersonState, SimplePerson, reference_physiology
from fedlab.synthea.gmf.record import Entry, GMFEncounter, GMFRecord
from fedlab.synthea.gmf.runtime import WellnessSchedule, top_level_keys
from fedlab.synthea.gmf.runtime import run_person as _run_person
from fedlab.synthea.gmf.values import (
    DISTRIBUTION_KINDS,
    WEEK,
    Code,
    GMFRuntimeError,
    ModuleError,
    RandomSource,
    from_millis,
    to_millis,
)
from fedlab.synthea.lifecycle import (
    ConditionEvent,
    Demographics,
    Encounter,
    Life,
    Measurement,
    MedicationEvent,
)

__all__ = [
    "CONDITION_TYPES", "DEFAULT_VITALS", "DISTRIBUTION_KINDS", "EXPORTED_KINDS", "STATE_TYPES",
    "TRANSITION_KEYS", "Code", "Entry", "GMFEncounter", "GMFRecord", "GMFRuntimeError", "Module", "ModuleError",
    "PersonState", "RandomSource", "SimplePerson", "WellnessSchedule", "check_submodules", "from_millis",
    "load_module", "load_modules", "reference_physiology", "run_person", "to_life", "to_life_encounters",
    "to_millis", "top_level_keys",
]

Moment = dt.datetime | dt.date | int


def _millis(moment: Moment) -> int:
    return moment if isinstance(moment, int) else to_millis(moment)


def run_person(modules: dict[str, Module], person: PersonState, start: Moment, end: Moment, rng: Any, *,
               top_level: list[str] | None = None, wellness: WellnessSchedule | None = None,
               step: int = WEEK, first_wellness: Moment | None = None) -> GMFRecord:
    """Run the top-level modules (default: those not in a sub-folder) for one person between
    `start` and `end` (dates, datetimes or epoch milliseconds) with `rng` as the only randomness
    (`random.Random` or `numpy.random.Generator`): same seed, same record. No wellness visit
    happens before `first_wellness` (default: the schedule from birth)."""
    first = None if first_wellness is None else _millis(first_wellness)
    return _run_person(modules, person, _millis(start), _millis(end), rng, top_level=top_level,
                       wellness=wellness, step=step, first_wellness=first)


# ---------------------------------------------------------------- into the lifecycle record model

_CONDITION_BY_CODE = {snomed.code: key for key, (snomed, _icd) in codes.CONDITIONS.items()}
_MEDICATION_BY_CODE = {concept.code: key for key, concept in codes.MEDICATIONS.items()}
_LAB_BY_CODE = {lab.code: lab for lab in vars(codes).values() if isinstance(lab, codes.Lab)}
_SMOKING_BY_CODE = {concept.code: key for key, concept in codes.SMOKING_VALUES.items()}
_FOLLOWUP_CODE = codes.ENCOUNTER_TYPES["followup"][1].code
_PROCEDURE_CODES = {codes.MED_RECONCILIATION.code, codes.A1C_MEASUREMENT.code}


def _encounter_kind(encounter: GMFEncounter) -> str:
    if encounter.wellness or encounter.encounter_class == "wellness":
        return "wellness"
    if encounter.encounter_class in ("emergency", "inpatient"):
        return encounter.encounter_class
    if encounter.code == _FOLLOWUP_CODE or isinstance(encounter.reason, Entry):
        return "followup"
    return "symptom"


# Entry kinds the exporter writes with the module's own codes when codes.py does not map them.
# Not exported (left in `unmapped`): symptom, supply, imaging, death.
EXPORTED_KINDS = frozenset({
    "condition", "allergy", "observation", "panel", "procedure", "device", "medication", "immunization",
    "report", "careplan",
})


def _has_codes(reason: Entry | Code | None) -> bool:
    return isinstance(reason, Code) or (isinstance(reason, Entry) and bool(reason.codes))


class _Converter:
    def __init__(self) -> None:
        self.conditions: dict[int, ConditionEvent] = {}
        self.unmapped: list[Entry] = []

    def condition(self, entry: Any) -> ConditionEvent | None:
        if not isinstance(entry, Entry) or entry.kind != "condition" or not entry.resource_id:
            return None
        concept = _CONDITION_BY_CODE.get(entry.code)
        if concept is None:
            return None
        event = self.conditions.get(id(entry))
        if event is None:
            event = ConditionEvent(concept=concept, onset=from_millis(entry.start), resource_id=entry.resource_id,
                                   abatement=from_millis(entry.stop) if entry.stop is not None else None)
            self.conditions[id(entry)] = event
        return event

    def encounter(self, source: GMFEncounter) -> Encounter:
        reason = self.condition(source.reason)
        target = Encounter(kind=_encounter_kind(source), start=from_millis(source.start),
                           end=from_millis(source.stop if source.stop is not None else source.start),
                           resource_id=source.resource_id, practitioner=0, reason=reason)
        if reason is None and _has_codes(source.reason):
            target.other_reason = source.reason
        if source.codes and source.code != codes.ENCOUNTER_TYPES[target.kind][1].code:
            target.type_codes = source.codes  # e.g. Synthea's own check-up or screening encounter codes
        for entry in source.entries:
            if self.place(target, entry):
                continue
            if entry.kind in EXPORTED_KINDS and entry.codes and entry.resource_id:
                target.other.append(entry)  # written with the module's own codes
            else:
                self.unmapped.append(entry)
        return target

    def place(self, target: Encounter, entry: Entry) -> bool:
        kind = entry.kind
        if kind == "condition":
            event = self.condition(entry)
            if event is not None:
                target.conditions.append(event)
            return event is not None
        if kind == "medication":
            return self.medication(target, entry)
        if kind == "observation":
            return self.observation(target, entry)
        if kind in ("panel", "report"):
            return self.panel(target, entry)
        if kind == "procedure" and entry.code in _PROCEDURE_CODES and entry.reason is None:
            target.procedures.append((codes.Concept(entry.code, entry.codes[0].display), entry.resource_id))
            return True
        if kind == "immunization" and entry.code == codes.FLU_VACCINE.code and target.immunization_id is None:
            target.immunization_id = entry.resource_id
            return True
        if kind == "careplan" and target.careplan is None and entry.code == codes.DIABETES_CAREPLAN.code:
            reason = self.condition(entry.reason)
            if reason is not None:
                target.careplan = (entry.resource_id, reason)
                return True
        return False

    def medication(self, target: Encounter, entry: Entry) -> bool:
        medication, reason = _MEDICATION_BY_CODE.get(entry.code), self.condition(entry.reason)
        if medication is None or reason is None:
            return False
        target.medications.append(MedicationEvent(
            medication=medication, start=from_millis(entry.start), reason=reason, resource_id=entry.resource_id,
            stop=from_millis(entry.stop) if entry.stop is not None else None))
        return True

    def observation(self, target: Encounter, entry: Entry) -> bool:
        if entry.code == codes.SMOKING.code and isinstance(entry.value, Code):
            status = _SMOKING_BY_CODE.get(entry.value.code)
            if status is not None:
                target.smoking = (status, entry.resource_id)
            return status is not None
        lab = _LAB_BY_CODE.get(entry.code)
        numeric = isinstance(entry.value, int | float) and not isinstance(entry.value, bool)
        if lab is None or not numeric or entry.category not in ("vital-signs", "laboratory"):
            return False
        target.measurements.append(Measurement(lab, float(entry.value), entry.category, entry.resource_id))
        return True

    def panel(self, target: Encounter, entry: Entry) -> bool:
        if entry.code == codes.BP_PANEL.code:
            values = {p.code: p.value for p in entry.parts}
            systolic, diastolic = values.get(codes.SYSTOLIC.code), values.get(codes.DIASTOLIC.code)
            if isinstance(systolic, float) and isinstance(diastolic, float):
                target.blood_pressure = (systolic, diastolic, entry.resource_id)
                return True
            return False
        if entry.code == codes.LIPID_PANEL.code and entry.kind == "report":
            target.lipid_report_id = entry.resource_id
            return True
        return False


def to_life_encounters(record: GMFRecord) -> tuple[list[Encounter], list[Entry]]:
    """The record as lifecycle `Encounter`s (in start order), plus the entries no encounter carries:
    kinds outside `EXPORTED_KINDS` (supplies, imaging, ...) and entries recorded outside any
    encounter. Entries of exported kinds whose codes `codes.py` does not map go to `Encounter.other`."""
    converter = _Converter()
    encounters = [converter.encounter(e) for e in sorted(record.encounters, key=lambda e: e.start)]
    outside = [e for e in record.entries if e.encounter is None and e.kind != "death"]
    return encounters, converter.unmapped + outside


def to_life(record: GMFRecord, demographics: Demographics, window_start: Moment, end: Moment) -> Life:
    encounters, _ = to_life_encounters(record)
    death = from_millis(record.death_ms) if record.death_ms is not None and record.death_ms < _millis(end) else None
    return Life(demographics=demographics, encounters=encounters, death=death,
                window_start=from_millis(_millis(window_start)), end=death or from_millis(_millis(end)))
