"""The Generic Module Framework interpreter: Synthea's reference modules, and every state,
transition, condition and distribution type on tiny hand-written modules."""

from __future__ import annotations

import datetime as dt
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedlab.synthea.engine import (
    CONDITION_TYPES,
    STATE_TYPES,
    Code,
    GMFRecord,
    ModuleError,
    SimplePerson,
    load_module,
    load_modules,
    run_person,
    to_life_encounters,
    to_millis,
)
from fedlab.synthea.gmf.values import DAY, WEEK, YEAR_AVG, from_millis

BIRTH = dt.date(1960, 3, 15)
START = dt.datetime(2000, 1, 3)
MISSING_IN_REFERENCE = ["anemia/anemia_sub"]  # called by metabolic_syndrome_care, not shipped in the 22 files
TOP_LEVEL = ["chronic_kidney_disease", "hypertension", "metabolic_syndrome_care", "metabolic_syndrome_disease",
             "wellness_encounters"]
DIABETES, PREDIABETES, HYPERTENSION, OBESITY = "44054006", "714628002", "59621000", "162864005"
ANTIHYPERTENSIVES = {"310798", "308136", "314076", "979485"}
SNOMED = {"system": "SNOMED-CT", "code": "1", "display": "x"}


def code(value: str, system: str = "SNOMED-CT") -> dict:
    return {"system": system, "code": value, "display": f"concept {value}"}


def person(**kw) -> SimplePerson:
    kw.setdefault("birth_ms", to_millis(BIRTH))
    return SimplePerson(**kw)


# ---------------------------------------------------------------- tiny-module helpers

def write_module(folder: Path, name: str, states: dict, gmf_version: int = 2) -> Path:
    path = folder / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": name, "gmf_version": gmf_version, "states": states}))
    return path


def chain(*states: dict, **named: dict) -> dict:
    """Initial -> S1 -> S2 ... -> End, adding direct transitions where a state has none."""
    out: dict = {"Initial": {"type": "Initial", "direct_transition": "S1" if states else "End"}}
    for i, state in enumerate(states, start=1):
        state = dict(state)
        if not any(k.endswith("_transition") for k in state) and state["type"] != "Terminal":
            state["direct_transition"] = f"S{i + 1}" if i < len(states) else "End"
        out[f"S{i}"] = state
    out["End"] = {"type": "Terminal"}
    out.update(named)
    return out


def run(tmp_path: Path, states: dict, who: SimplePerson | None = None, years: float = 1.0, seed: int = 0,
        submodules: dict | None = None, start: dt.datetime = START) -> tuple[GMFRecord, SimplePerson]:
    folder = tmp_path / f"m{random.Random(str(states)).getrandbits(32)}"
    write_module(folder, "main", states)
    for key, sub in (submodules or {}).items():
        write_module(folder, key, sub)
    modules = load_modules(folder)
    who = who or person()
    end = to_millis(start) + int(years * YEAR_AVG)
    return run_person(modules, who, start, end, random.Random(seed), top_level=["main"]), who


def obs(value: float = 1.0, loinc: str = "1-1") -> dict:
    return {"type": "Observation", "category": "laboratory", "unit": "1", "codes": [code(loinc, "LOINC")],
            "exact": {"quantity": value}}


# ---------------------------------------------------------------- the reference modules

@pytest.fixture(scope="module")
def reference_modules(reference_dir: Path):
    return load_modules(reference_dir / "synthea-modules", allow_missing_submodules=MISSING_IN_REFERENCE)


def test_all_reference_modules_load_unmodified(reference_dir: Path, reference_modules) -> None:
    files = sorted((reference_dir / "synthea-modules").rglob("*.json"))
    assert len(reference_modules) == len(files) == 20
    assert set(TOP_LEVEL) <= set(reference_modules)
    assert "metabolic_syndrome/medications" in reference_modules
    assert {m.gmf_version for m in reference_modules.values()} == {1, 2}
    used = {s.type for m in reference_modules.values() for s in m.states.values()}
    assert len(used) == 23 and used <= set(STATE_TYPES)
    # The one reference quirk, a Symptom range with low > high, loads with a warning.
    assert any("CKD4_Symptom_1" in w for m in reference_modules.values() for w in m.warnings)
    with pytest.raises(ModuleError, match=r"metabolic_syndrome_care\.json: state 'Anemia_Submodule': "
                                          r"field 'submodule'.*anemia/anemia_sub"):
        load_modules(reference_dir / "synthea-modules")


def _cohort(n: int):
    """Half with a high-risk person state (BMI 34, HbA1c 6.0), half low-risk (BMI 23)."""
    for i in range(n):
        r = random.Random(1000 + i)
        risky = i % 2 == 0
        birth = to_millis(dt.date(1940, 1, 1)) + int(r.random() * 10 * YEAR_AVG)
        who = SimplePerson(birth_ms=birth, gender=r.choice("MF"), race=r.choice(["white", "black", "hispanic"]),
                           vitals={"BMI": 34.0 if risky else 23.0, "Blood Glucose": 6.0 if risky else 5.2})
        yield i, risky, who, birth + int(25 * YEAR_AVG)


@pytest.fixture(scope="module")
def population(reference_modules):
    """120 persons x 40 years (age 25 to 65) through all five top-level reference modules."""
    results = []
    for i, risky, who, start in _cohort(120):
        record = run_person(reference_modules, who, start, start + int(40 * YEAR_AVG), random.Random(i))
        results.append((risky, who, record))
    return results


def test_reference_wellness_encounters_happen(population) -> None:
    for _, who, record in population:
        wellness = [e for e in record.encounters if e.wellness]
        if who.death_ms is None:
            # ages 25-65: every 3 years to 39, every 2 to 49, then yearly (about 26 visits)
            assert 22 <= len(wellness) <= 28
        assert all(e.code == "185349003" and e.stop > e.start for e in wellness)
        vitals = {e.code for e in record.entries if e.encounter in wellness and e.kind == "observation"}
        assert {"8302-2", "29463-7", "39156-5", "8867-4"} <= vitals  # height, weight, BMI, heart rate


def test_reference_diabetes_follows_the_person_state(population) -> None:
    diabetic = [r for risky, _, r in population if DIABETES in r.codes("condition")]
    prediabetic = [r for risky, _, r in population if PREDIABETES in r.codes("condition")]
    assert diabetic and prediabetic
    for risky, who, record in population:
        a1c = [e for e in record.entries if e.code == "4548-4"]
        if a1c:  # HbA1c is drawn only once the disease module set (pre)diabetes
            assert who.attributes.get("diabetes") is True or who.attributes.get("prediabetes") is True
        if DIABETES in record.codes("condition"):
            onset = next(e for e in record.entries if e.code == DIABETES)
            assert onset.encounter is not None and onset.encounter.wellness
            metformin = [e for e in record.of_kind("medication") if e.code == "860975"]
            assert metformin and metformin[0].reason is onset
        assert (OBESITY in record.codes("condition")) == risky  # BMI 34 vs 23, read at wellness visits


def test_reference_hypertension_is_treated(population) -> None:
    treated = 0
    for _, who, record in population:
        orders = [e for e in record.of_kind("medication") if e.code in ANTIHYPERTENSIVES]
        if orders:
            treated += 1
            assert who.attributes.get("hypertension") is True
            diagnosis = next(e for e in record.entries if e.code == HYPERTENSION)
            assert all(o.reason is diagnosis and o.start >= diagnosis.start for o in orders)
    assert treated >= 5


def test_reference_ckd_and_lifecycle_conversion(population) -> None:
    assert all(isinstance(who.attributes.get("ckd"), int) for _, who, _ in population)
    _, _, record = population[0]
    encounters, unmapped = to_life_encounters(record)
    assert [e.kind for e in encounters].count("wellness") == sum(e.wellness for e in record.encounters)
    bp = [e.blood_pressure for e in encounters if e.blood_pressure]
    assert bp and all(60 < s < 250 and 30 < d < 150 for s, d, _ in bp)
    assert any(m.lab.code == "39156-5" for e in encounters for m in e.measurements)
    assert all(u.kind != "condition" or u.code not in (DIABETES, HYPERTENSION) for u in unmapped)


@pytest.mark.parametrize("top", TOP_LEVEL)
def test_each_reference_module_runs_alone(reference_modules, top: str) -> None:
    kinds: Counter = Counter()
    for i, _, who, start in _cohort(12):
        record = run_person(reference_modules, who, start, start + int(40 * YEAR_AVG), random.Random(i),
                            top_level=[top])
        kinds.update(e.kind for e in record.entries)
        kinds.update("encounter" for _ in record.encounters)
    if top == "wellness_encounters":
        assert kinds["encounter"] > 12 * 15 and kinds["observation"] > 0
    if top in ("chronic_kidney_disease", "metabolic_syndrome_disease"):
        # Disease modules set attributes and symptoms; the scheduled wellness visits stay empty.
        assert kinds["encounter"] > 0 and not kinds["observation"] and not kinds["medication"]


def test_reference_runs_are_deterministic(reference_modules) -> None:
    def once(seed: int, rng_kind: str) -> list:
        out = []
        for i, _, who, start in _cohort(6):
            rng = random.Random(seed + i) if rng_kind == "random" else np.random.default_rng(seed + i)
            out.append(run_person(reference_modules, who, start, start + int(30 * YEAR_AVG), rng).summary())
        return out

    assert once(5, "random") == once(5, "random")
    assert once(5, "random") != once(6, "random")
    assert once(5, "numpy") == once(5, "numpy")


# ---------------------------------------------------------------- load-time errors

def _bad(tmp_path: Path, states: dict, pattern: str) -> None:
    path = write_module(tmp_path / "bad", "broken", states)
    with pytest.raises(ModuleError, match=pattern) as info:
        load_module(path)
    assert "broken.json" in str(info.value)


def test_error_unknown_state_type(tmp_path: Path) -> None:
    _bad(tmp_path, chain({"type": "Teleport"}), r"broken\.json: state 'S1': field 'type': unknown state type 'Teleport'")


def test_error_transition_to_missing_state(tmp_path: Path) -> None:
    _bad(tmp_path, chain({"type": "Simple", "direct_transition": "Nowhere"}),
         r"state 'S1': field 'direct_transition': transition to missing state 'Nowhere'")
    _bad(tmp_path, chain({"type": "Simple", "conditional_transition": [{"transition": "End"}, {"transition": "Gone"}]}),
         r"state 'S1': field 'conditional_transition': transition to missing state 'Gone'")


@pytest.mark.parametrize("state, pattern", [
    ({"type": "Delay", "distribution": {"kind": "POISSON", "parameters": {"mean": 1}}, "unit": "days"},
     r"field 'distribution': unknown distribution kind 'POISSON'"),
    ({"type": "Delay", "distribution": {"kind": "GAUSSIAN", "parameters": {"mean": 1}}, "unit": "days"},
     r"field 'distribution': GAUSSIAN distribution is missing parameter\(s\) standardDeviation"),
    ({"type": "Delay", "distribution": {"kind": "GAUSSIAN", "parameters": {"mean": 1, "standardDeviation": -2}},
      "unit": "days"}, r"field 'distribution': GAUSSIAN standardDeviation -2.0 is negative"),
    ({"type": "Delay", "distribution": {"kind": "UNIFORM", "parameters": {"low": 5, "high": 1}}, "unit": "days"},
     r"field 'distribution': UNIFORM low 5.0 is greater than high 1.0"),
    ({"type": "Delay", "exact": {"quantity": -3, "unit": "days"}}, r"field 'exact': exact quantity -3.0 is negative"),
    ({"type": "Delay", "range": {"low": 1, "high": 2, "unit": "fortnights"}}, r"field 'range.unit': unknown time unit"),
    ({"type": "Delay", "distribution": {"kind": "EXACT", "parameters": {"value": 1}}, "unit": "days",
      "exponent": 1, "range": None} | {"distribution": {"kind": "TRIANGULAR", "parameters": {"min": 3, "mode": 1, "max": 5}}},
     r"field 'distribution': TRIANGULAR needs min <= mode <= max"),
    ({"type": "Simple", "distributed_transition": [{"transition": "End", "distribution": 0.7},
                                                   {"transition": "S1", "distribution": 0.5}]},
     r"field 'distributed_transition': probabilities sum to 1.2, more than 1"),
    ({"type": "Simple", "distributed_transition": [{"transition": "End", "distribution": -0.1}]},
     r"field 'distributed_transition\[0\].distribution': a probability must be between 0 and 1"),
    ({"type": "Simple", "distributed_transition": [{"transition": "End", "distribution": {"attribute": "p"}}]},
     r"field 'distributed_transition\[0\].distribution.default': a probability must be a number"),
])
def test_error_malformed_distribution(tmp_path: Path, state: dict, pattern: str) -> None:
    state = {k: v for k, v in state.items() if v is not None and k != "exponent"}
    _bad(tmp_path, chain(state), r"state 'S1': " + pattern)


def test_error_missing_submodule(tmp_path: Path) -> None:
    write_module(tmp_path / "set", "caller", chain({"type": "CallSubmodule", "submodule": "sub/absent"}))
    with pytest.raises(ModuleError, match=r"caller\.json: state 'S1': field 'submodule': calls submodule "
                                          r"'sub/absent', which is not among the loaded modules .*allow_missing_submodules"):
        load_modules(tmp_path / "set")
    assert set(load_modules(tmp_path / "set", allow_missing_submodules=["sub/absent"])) == {"caller"}


def test_error_bad_condition_and_missing_lookup_table(tmp_path: Path) -> None:
    _bad(tmp_path, chain({"type": "Guard", "allow": {"condition_type": "Mood"}}),
         r"state 'S1': field 'allow.condition_type': unknown condition type 'Mood'")
    _bad(tmp_path, chain({"type": "Simple", "conditional_transition": [
        {"condition": {"condition_type": "Attribute", "attribute": "a", "operator": "~"}, "transition": "End"}]}),
        r"field 'conditional_transition\[0\].condition.operator': unknown operator '~'")
    _bad(tmp_path, chain({"type": "Simple", "lookup_table_transition": [
        {"transition": "End", "default_probability": 1, "lookup_table_name": "absent.csv"}]}),
        r"state 'S1': field 'lookup_table_transition\[0\].lookup_table_name': lookup table .*absent.csv not found")


# ---------------------------------------------------------------- states (all 31)

def test_states_initial_simple_terminal_setattribute_counter(tmp_path: Path) -> None:
    states = chain(
        {"type": "Simple"},
        {"type": "SetAttribute", "attribute": "plain", "value": "yes"},
        {"type": "SetAttribute", "attribute": "coded", "value_code": code("42")},
        {"type": "SetAttribute", "attribute": "drawn", "distribution": {"kind": "UNIFORM", "parameters": {"low": 2, "high": 3}}},
        {"type": "SetAttribute", "attribute": "rounded", "distribution": {"kind": "GAUSSIAN", "round": True,
                                                                           "parameters": {"mean": 10, "standardDeviation": 3}}},
        {"type": "Counter", "attribute": "n", "action": "increment", "amount": 5},
        {"type": "Counter", "attribute": "n", "action": "decrement"},
        {"type": "SetAttribute", "attribute": "done", "value": True},
    )
    _, who = run(tmp_path, states)
    a = who.attributes
    assert a["plain"] == "yes" and a["coded"] == Code("SNOMED-CT", "42", "concept 42")
    assert 2 <= a["drawn"] <= 3 and a["rounded"] == int(a["rounded"]) and a["n"] == 4 and a["done"] is True


def test_state_guard_waits_for_its_condition(tmp_path: Path) -> None:
    states = chain({"type": "Guard", "allow": {"condition_type": "Age", "operator": ">=", "quantity": 40, "unit": "years"}},
                   obs())
    record, _ = run(tmp_path, states, years=2)
    fortieth = to_millis(dt.date(2000, 3, 15))
    assert fortieth <= record.entries[0].start < fortieth + WEEK


@pytest.mark.parametrize("delay, days", [
    ({"exact": {"quantity": 2, "unit": "months"}}, (60, 60)),
    ({"range": {"low": 10, "high": 20, "unit": "days"}}, (10, 20)),
    ({"distribution": {"kind": "EXACT", "parameters": {"value": 3}}, "unit": "weeks"}, (21, 21)),
    ({"distribution": {"kind": "EXPONENTIAL", "parameters": {"mean": 5}}, "unit": "days"}, (0, 200)),
    ({"distribution": {"kind": "TRIANGULAR", "parameters": {"min": 1, "mode": 2, "max": 9}}, "unit": "days"}, (1, 9)),
])
def test_state_delay_continues_when_it_expires(tmp_path: Path, delay: dict, days: tuple) -> None:
    record, _ = run(tmp_path, chain({"type": "Delay", **delay}, obs()))
    waited = (record.entries[0].start - to_millis(START)) / DAY
    # A delay that expires between weekly steps resumes at its exact expiry time, as in Synthea.
    assert days[0] <= waited <= days[1] and waited == int(waited)


def test_states_encounter_and_end_with_entries(tmp_path: Path) -> None:
    states = chain(
        {"type": "ConditionOnset", "codes": [code("111")], "assign_to_attribute": "dx", "target_encounter": "S3"},
        {"type": "Delay", "exact": {"quantity": 10, "unit": "days"}},
        {"type": "Encounter", "encounter_class": "emergency", "codes": [code("50849002")], "reason": "dx"},
        {"type": "Procedure", "codes": [code("222")], "duration": {"low": 30, "high": 40, "unit": "minutes"}},
        {"type": "EncounterEnd"},
        obs(),
    )
    record, who = run(tmp_path, states)
    (encounter,) = [e for e in record.encounters if not e.wellness]
    onset = record.entries[0]
    assert onset.code == "111" and onset.encounter is encounter and onset.start == encounter.start  # diagnosed there
    assert encounter.encounter_class == "emergency" and encounter.reason is onset and who.attributes["dx"] is onset
    procedure = record.of_kind("procedure")[0]
    assert 30 * 60_000 <= procedure.stop - procedure.start <= 40 * 60_000 and procedure.encounter is encounter
    assert encounter.stop >= procedure.stop and record.of_kind("observation")[0].encounter is None


def test_state_wellness_encounter_waits_for_the_schedule(tmp_path: Path) -> None:
    states = chain({"type": "Encounter", "wellness": True}, obs(), {"type": "EncounterEnd",
                                                                    "direct_transition": "S1"})
    # Age 39.8 to 45.8: a visit at the start (none before), then every 2 years once 40: the interval
    # is the one for the age at each weekly check.
    record, _ = run(tmp_path, states, years=6)
    starts = [e.start for e in record.encounters]
    assert all(e.wellness for e in record.encounters) and len(starts) == 3
    assert starts[0] == to_millis(START)
    assert [round((b - a) / YEAR_AVG) for a, b in zip(starts, starts[1:], strict=False)] == [2, 2]
    assert [e.start for e in record.entries] == starts


def test_first_wellness_and_advance_hook(tmp_path: Path) -> None:
    class Ageing(SimplePerson):
        def advance(self, time_ms: int) -> None:
            self.attributes.setdefault("steps", []).append(time_ms)

    states = chain({"type": "Encounter", "wellness": True}, obs(), {"type": "EncounterEnd",
                                                                    "direct_transition": "S1"})
    folder = tmp_path / "first"
    write_module(folder, "main", states)
    who = Ageing(birth_ms=to_millis(BIRTH))
    joined = to_millis(START) + int(3.5 * YEAR_AVG)
    record = run_person(load_modules(folder), who, START, to_millis(START) + int(6 * YEAR_AVG), random.Random(0),
                        top_level=["main"], first_wellness=joined)
    starts = [e.start for e in record.encounters]
    assert starts and joined <= starts[0] < joined + WEEK  # none before joining, then the schedule
    steps = who.attributes["steps"]
    assert steps == sorted(steps) and steps[0] == to_millis(START) and set(starts) <= set(steps)


def test_states_condition_allergy_medication_careplan_device_ends(tmp_path: Path) -> None:
    states = chain(
        {"type": "Encounter", "encounter_class": "ambulatory", "codes": [code("390906007")]},
        {"type": "ConditionOnset", "codes": [code("10")], "assign_to_attribute": "c10"},
        {"type": "ConditionOnset", "codes": [code("11")]},
        {"type": "ConditionOnset", "codes": [code("12")], "assign_to_attribute": "c12"},
        {"type": "AllergyOnset", "codes": [code("20")], "allergy_type": "allergy", "category": "food"},
        {"type": "MedicationOrder", "codes": [code("30", "RxNorm")], "reason": "c10", "chronic": True,
         "assign_to_attribute": "m30"},
        {"type": "CarePlanStart", "codes": [code("40")], "activities": [code("41")], "reason": "c10"},
        {"type": "Device", "code": code("50")},
        {"type": "Delay", "exact": {"quantity": 1, "unit": "days"}},
        {"type": "ConditionEnd", "condition_onset": "S3"},
        {"type": "ConditionEnd", "referenced_by_attribute": "c12"},
        {"type": "ConditionEnd", "codes": [code("10")]},
        {"type": "AllergyEnd", "allergy_onset": "S5"},
        {"type": "MedicationEnd", "medication_order": "S6"},
        {"type": "CarePlanEnd", "careplan": "S7"},
        {"type": "DeviceEnd", "device": "S8"},
        {"type": "EncounterEnd"},
    )
    record, who = run(tmp_path, states)
    started = to_millis(START)
    kinds = [(e.kind, e.code) for e in record.entries]
    assert kinds == [("condition", "10"), ("condition", "11"), ("condition", "12"), ("allergy", "20"),
                     ("medication", "30"), ("careplan", "40"), ("device", "50")]
    assert all(e.start == started and e.stop == started + DAY for e in record.entries)
    medication = record.of_kind("medication")[0]
    assert medication.reason is record.entries[0] and medication.details["chronic"] is True
    assert all(not who.actives[k] for k in who.actives)


def test_states_observations_reports_and_vitals(tmp_path: Path) -> None:
    states = chain(
        {"type": "VitalSign", "vital_sign": "Weight", "unit": "kg", "exact": {"quantity": 81.5}},
        {"type": "SetAttribute", "attribute": "score", "value": 7},
        {"type": "Encounter", "encounter_class": "ambulatory", "codes": [code("1")]},
        {"type": "Observation", "category": "vital-signs", "unit": "kg", "codes": [code("29463-7", "LOINC")],
         "vital_sign": "Weight"},
        {"type": "Observation", "category": "survey", "unit": "{score}", "codes": [code("s", "LOINC")], "attribute": "score"},
        {"type": "Observation", "category": "laboratory", "unit": "%", "codes": [code("r", "LOINC")],
         "range": {"low": 1, "high": 2, "decimals": 1}},
        {"type": "Observation", "category": "social-history", "unit": "", "codes": [code("72166-2", "LOINC")],
         "value_code": code("266919005")},
        {"type": "MultiObservation", "category": "vital-signs", "codes": [code("85354-9", "LOINC")], "observations": [
            {"category": "vital-signs", "codes": [code("8480-6", "LOINC")], "unit": "mm[Hg]", "exact": {"quantity": 130}},
            {"category": "vital-signs", "codes": [code("8462-4", "LOINC")], "unit": "mm[Hg]", "exact": {"quantity": 85}}]},
        {"type": "DiagnosticReport", "codes": [code("57698-3", "LOINC")], "observations": [
            {"category": "laboratory", "codes": [code("2093-3", "LOINC")], "unit": "mg/dL", "vital_sign": "Total Cholesterol"}]},
        {"type": "DiagnosticReport", "codes": [code("old", "LOINC")], "number_of_observations": 2},
        {"type": "EncounterEnd"},
    )
    record, who = run(tmp_path, states)
    values = {e.code: e.value for e in record.of_kind("observation")}
    assert values["29463-7"] == 81.5 and values["s"] == 7 and 1 <= values["r"] <= 2 and round(values["r"], 1) == values["r"]
    assert values["72166-2"] == Code("SNOMED-CT", "266919005", "concept 266919005")
    (panel,) = record.of_kind("panel")
    assert [(p.code, p.value) for p in panel.parts] == [("8480-6", 130.0), ("8462-4", 85.0)]
    lipid, old = record.of_kind("report")
    assert [p.code for p in lipid.parts] == ["2093-3"] and [p.code for p in old.parts] == ["72166-2", "2093-3"]
    assert who.latest_observation("8480-6") == 130.0
    (visit,) = [e for e in to_life_encounters(record)[0] if e.kind != "wellness"]
    assert visit.blood_pressure[:2] == (130.0, 85.0) and visit.smoking[0] == "never"
    assert visit.lipid_report_id == lipid.resource_id and visit.measurements[0].value == 81.5


def test_states_symptom_death_and_others(tmp_path: Path) -> None:
    states = chain(
        {"type": "Symptom", "symptom": "Fatigue", "range": {"low": 30, "high": 40}},
        {"type": "Symptom", "symptom": "Thirst", "cause": "x", "range": {"low": 50, "high": 10}},
        {"type": "Symptom", "symptom": "Never", "probability": 0.0, "exact": {"quantity": 9}},
        {"type": "Encounter", "encounter_class": "ambulatory", "codes": [code("1")]},
        {"type": "SupplyList", "supplies": [{"quantity": 50, "code": code("337388004")}]},
        {"type": "ImagingStudy", "procedure_code": code("77"), "series": [
            {"body_site": code("8"), "modality": {"system": "DICOM-DCM", "code": "US"},
             "instances": [{"title": "img", "sop_class": {"system": "DICOM-SOP", "code": "1.2"}}]}]},
        {"type": "Vaccine", "codes": [code("140", "CVX")], "series": 1},
        {"type": "Physiology", "alt_direct_transition": "S9", "model": "x.xml"},
        {"type": "EncounterEnd"},
        {"type": "Death", "range": {"low": 2, "high": 2, "unit": "years"}, "codes": [code("46177005")]},
        {"type": "Delay", "exact": {"quantity": 3, "unit": "years"}},
        obs(),
    )
    record, who = run(tmp_path, states, years=5)
    assert 30 <= who.symptom("Fatigue") <= 40 and 10 <= who.symptom("Thirst") <= 50 and who.symptom("Never") == 0
    assert [e.kind for e in record.entries] == ["supply", "procedure", "imaging", "immunization", "death"]
    assert record.entries[0].value == 50
    death = to_millis(START) + 2 * 365 * DAY
    assert record.death_ms == who.death_ms == death and record.entries[-1].start == death
    assert not record.of_kind("observation")  # the person died before the 3-year delay ended


def test_state_call_submodule_merges_history(tmp_path: Path) -> None:
    sub = chain({"type": "Delay", "exact": {"quantity": 2, "unit": "weeks"}},
                {"type": "SetAttribute", "attribute": "from_sub", "value": 1})
    main = chain({"type": "CallSubmodule", "submodule": "nested/sub"},
                 {"type": "Simple", "conditional_transition": [
                     {"condition": {"condition_type": "PriorState", "name": "S2"}, "transition": "S3"},
                     {"transition": "End"}]},
                 obs())
    record, who = run(tmp_path, main, submodules={"nested/sub": sub})
    assert who.attributes["from_sub"] == 1
    assert record.entries[0].start == to_millis(START) + 14 * DAY  # the sub's S2 is in the caller's history


# ---------------------------------------------------------------- transitions (all 6)

def _choices(tmp_path: Path, transition: dict, n: int = 400, who_factory=person) -> Counter:
    states = chain({"type": "Simple", **transition},
                   A={"type": "SetAttribute", "attribute": "went", "value": "A", "direct_transition": "End"},
                   B={"type": "SetAttribute", "attribute": "went", "value": "B", "direct_transition": "End"},
                   C={"type": "SetAttribute", "attribute": "went", "value": "C", "direct_transition": "End"})
    write_module(tmp_path / "t", "main", states)
    modules = load_modules(tmp_path / "t")
    seen: Counter = Counter()
    for seed in range(n):
        who = who_factory()
        run_person(modules, who, START, to_millis(START) + WEEK, random.Random(seed), top_level=["main"])
        seen[who.attributes["went"]] += 1
    return seen


def test_transition_direct(tmp_path: Path) -> None:
    assert _choices(tmp_path, {"direct_transition": "B"}, n=3) == {"B": 3}


def test_transition_distributed_with_remainder_and_named(tmp_path: Path) -> None:
    seen = _choices(tmp_path, {"distributed_transition": [{"transition": "A", "distribution": 0.2},
                                                         {"transition": "B", "distribution": 0.3}]})
    assert 50 <= seen["A"] <= 115 and seen["C"] == 0 and seen["A"] + seen["B"] == 400  # remainder -> last (B)
    named = [{"transition": "A", "distribution": {"attribute": "p", "default": 0.0}}, {"transition": "C", "distribution": 1.0}]
    assert _choices(tmp_path, {"distributed_transition": named}, n=50)["A"] == 0
    assert _choices(tmp_path, {"distributed_transition": named}, n=50,
                    who_factory=lambda: person(attributes={"p": 1.0}))["A"] == 50


def test_transition_conditional_and_complex(tmp_path: Path) -> None:
    male = {"condition_type": "Gender", "gender": "M"}
    conditional = {"conditional_transition": [{"condition": male, "transition": "A"}, {"transition": "B"}]}
    assert _choices(tmp_path, conditional, n=5, who_factory=lambda: person(gender="M")) == {"A": 5}
    assert _choices(tmp_path, conditional, n=5, who_factory=lambda: person(gender="F")) == {"B": 5}
    no_match = {"conditional_transition": [{"condition": male, "transition": "A"}, {"condition": male, "transition": "C"}]}
    assert _choices(tmp_path, no_match, n=3, who_factory=lambda: person(gender="F")) == {"C": 3}  # falls back to last
    complex_ = {"complex_transition": [
        {"condition": male, "distributions": [{"transition": "A", "distribution": 0.5}, {"transition": "B", "distribution": 0.5}]},
        {"transition": "C"}]}
    men = _choices(tmp_path, complex_, n=200, who_factory=lambda: person(gender="M"))
    assert set(men) == {"A", "B"} and 70 <= men["A"] <= 130
    assert _choices(tmp_path, complex_, n=5, who_factory=lambda: person(gender="F")) == {"C": 5}


def test_transition_lookup_table(tmp_path: Path) -> None:
    tables = tmp_path / "t" / "lookup_tables"
    tables.mkdir(parents=True)
    (tables / "risk.csv").write_text("age,gender,A,B\n0-39,F,1.0,0.0\n40-120,F,0.0,1.0\n0-120,M,0.0,0.0\n")
    transition = {"lookup_table_transition": [
        {"transition": "A", "default_probability": 0.0, "lookup_table_name": "risk.csv"},
        {"transition": "B", "default_probability": 1.0, "lookup_table_name": "risk.csv"}]}
    young = lambda: person(gender="F", birth_ms=to_millis(dt.date(1980, 1, 1)))  # noqa: E731
    assert _choices(tmp_path, transition, n=5, who_factory=young) == {"A": 5}
    old = lambda: person(gender="F", birth_ms=to_millis(dt.date(1950, 1, 1)))  # noqa: E731
    assert _choices(tmp_path, transition, n=5, who_factory=old) == {"B": 5}
    assert _choices(tmp_path, transition, n=5, who_factory=lambda: person(gender="M")) == {"B": 5}  # all 0 -> last


def test_transition_type_of_care(tmp_path: Path) -> None:
    def with_class(cls: str, possibility: str = "none") -> str:
        states = chain({"type": "Encounter", "encounter_class": cls, "codes": [code("1")],
                        "telemedicine_possibility": possibility,
                        "type_of_care_transition": {"ambulatory": "A", "emergency": "B", "telemedicine": "C"}},
                       A={"type": "SetAttribute", "attribute": "went", "value": "A", "direct_transition": "End"},
                       B={"type": "SetAttribute", "attribute": "went", "value": "B", "direct_transition": "End"},
                       C={"type": "SetAttribute", "attribute": "went", "value": "C", "direct_transition": "End"})
        _, who = run(tmp_path, states)
        return who.attributes["went"]

    assert [with_class("ambulatory"), with_class("emergency"), with_class("ambulatory", "always")] == ["A", "B", "C"]


# ---------------------------------------------------------------- conditions (all 21)

def _prepared() -> SimplePerson:
    who = person(gender="F", race="Hispanic", socioeconomic="Low",
                 attributes={"flag": True, "count": 3, "label": "x"}, vitals={"BMI": 31.0})
    who.activate("condition", "c1", object())
    who.activate("medication", "m1", object())
    who.activate("careplan", "p1", object())
    who.activate("allergy", "a1", object())
    who.record_observation("4548-4", 7.2, 0)
    who.set_symptom("cause", "Fatigue", 60, 0)
    return who


def _attr(name: str, op: str, value=None) -> dict:
    return {"condition_type": "Attribute", "attribute": name, "operator": op, "value": value}


CONDITION_CASES = [
    ({"condition_type": "Gender", "gender": "F"}, {"condition_type": "Gender", "gender": "M"}),
    ({"condition_type": "Age", "operator": ">=", "quantity": 39, "unit": "years"},
     {"condition_type": "Age", "operator": ">", "quantity": 479, "unit": "months"}),
    ({"condition_type": "Date", "operator": "==", "year": 2000}, {"condition_type": "Date", "operator": ">", "month": 1}),
    ({"condition_type": "Socioeconomic Status", "category": "Low"},
     {"condition_type": "Socioeconomic Status", "category": "High"}),
    ({"condition_type": "Race", "race": "Hispanic"}, {"condition_type": "Race", "race": "White"}),
    ({"condition_type": "Symptom", "symptom": "Fatigue", "operator": ">=", "value": 50},
     {"condition_type": "Symptom", "symptom": "Thirst", "operator": ">", "value": 0}),
    ({"condition_type": "Observation", "codes": [code("4548-4", "LOINC")], "operator": ">", "value": 6.5},
     {"condition_type": "Observation", "codes": [code("2339-0", "LOINC")], "operator": "is not nil"}),
    ({"condition_type": "Vital Sign", "vital_sign": "BMI", "operator": ">=", "value": 30},
     {"condition_type": "Vital Sign", "vital_sign": "BMI", "operator": "<", "value": 30}),
    ({"condition_type": "Active Condition", "codes": [code("c1")]}, {"condition_type": "Active Condition", "codes": [code("c2")]}),
    ({"condition_type": "Active Medication", "codes": [code("m1")]}, {"condition_type": "Active Medication", "codes": [code("c1")]}),
    ({"condition_type": "Active CarePlan", "codes": [code("p1")]}, {"condition_type": "Active CarePlan", "codes": [code("p2")]}),
    ({"condition_type": "Active Allergy", "codes": [code("a1")]}, {"condition_type": "Active Allergy", "codes": [code("a2")]}),
    (_attr("count", ">", 2), _attr("label", "is nil")),
    ({"condition_type": "PriorState", "name": "Initial"}, {"condition_type": "PriorState", "name": "Never_Visited"}),
    ({"condition_type": "And", "conditions": [_attr("flag", "==", True), _attr("count", "==", 3)]},
     {"condition_type": "And", "conditions": [_attr("flag", "==", True), _attr("count", "==", 4)]}),
    ({"condition_type": "Or", "conditions": [_attr("flag", "==", False), _attr("count", "==", 3)]},
     {"condition_type": "Or", "conditions": [_attr("flag", "==", False), _attr("count", "!=", 3)]}),
    ({"condition_type": "Not", "condition": _attr("flag", "==", False)}, {"condition_type": "Not", "condition": _attr("flag", "==", True)}),
    ({"condition_type": "At Least", "minimum": 2, "conditions": [_attr("flag", "==", True), _attr("count", "<", 9), {"condition_type": "False"}]},
     {"condition_type": "At Least", "minimum": 3, "conditions": [_attr("flag", "==", True), _attr("count", "<", 9), {"condition_type": "False"}]}),
    ({"condition_type": "At Most", "minimum": 0, "maximum": 1, "conditions": [_attr("flag", "==", True), {"condition_type": "False"}]},
     {"condition_type": "At Most", "maximum": 1, "conditions": [_attr("flag", "==", True), {"condition_type": "True"}]}),
    ({"condition_type": "True"}, {"condition_type": "False"}),
]


@pytest.mark.parametrize("holds, fails", CONDITION_CASES, ids=lambda c: c["condition_type"] if isinstance(c, dict) else "")
def test_conditions(tmp_path: Path, holds: dict, fails: dict) -> None:
    for condition, expected in ((holds, True), (fails, False)):
        states = chain({"type": "Simple", "conditional_transition": [
            {"condition": condition, "transition": "Yes"}, {"transition": "No"}]},
            Yes={"type": "SetAttribute", "attribute": "result", "value": True, "direct_transition": "End"},
            No={"type": "SetAttribute", "attribute": "result", "value": False, "direct_transition": "End"})
        _, who = run(tmp_path, states, who=_prepared(), years=0.01)
        assert who.attributes["result"] is expected, condition


def test_every_type_is_covered() -> None:
    assert len(STATE_TYPES) == 31 and len(CONDITION_TYPES) == 21
    tested = {c["condition_type"] for pair in CONDITION_CASES for c in pair}
    assert tested == set(CONDITION_TYPES)


def test_start_dates_convert_exactly() -> None:
    assert from_millis(to_millis(START)) == START
