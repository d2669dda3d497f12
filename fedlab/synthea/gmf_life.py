"""`generate.engine: gmf`: Generic Module Framework modules on top of the lifecycle physiology.

The modules (fedlab's own in `modules/`, or any Synthea modules folder) decide what happens:
disease onsets, diagnoses, encounters, orders, what is measured. The lifecycle model answers
what a module reads about the body, through the engine's `PersonState` interface:

- vital signs and labs by Synthea's names (BMI, blood pressure, "Blood Glucose" = HbA1c %,
  "Glucose" mg/dL, lipids, "EGFR", "Creatinine", ...). Readings at one time step share one
  measurement draw, so a recorded value and a diagnosis made from it agree.
- the body ages yearly (BMI trend and drift, kidney decline, smoking cessation, albuminuria);
  the `diabetes` and `hypertension` attributes a module sets change HbA1c and blood pressure,
  active diabetes drugs lower HbA1c, antihypertensives lower blood pressure, `ckd` caps eGFR.
- computed attributes modules use as named probabilities: `t2d_annual_risk` and
  `hypertension_annual_risk` (scaled by the site's `diabetes_risk` / `hypertension_risk`),
  `mortality_annual_risk` (0 before the history window), and `albuminuria`, `smoking_status`.
- plain attributes set once: `diabetes_risk`, `hypertension_risk`, `lab_recorded`
  (1 − the site's `lab_missingness`), `visits_per_year`.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import math
import random
from pathlib import Path
from typing import Any

from fedlab.config import SiteConfig
from fedlab.synthea import codes
from fedlab.synthea.engine import (
    DEFAULT_VITALS,
    Code,
    Entry,
    Module,
    RandomSource,
    WellnessSchedule,
    load_modules,
    run_person,
    to_life,
    to_millis,
)
from fedlab.synthea.gmf.person import DEFAULT_NOISE, DIABETES_DRUGS, RecordsInDicts
from fedlab.synthea.gmf.values import YEAR_AVG
from fedlab.synthea.lifecycle import (
    ADULT_AGE,
    T2D_BASE_RATE,
    T2D_HAZARD_CALIBRATION,
    Life,
    Rng,
    _Body,
    _creatinine,
    _demographics,
    _traits,
    bmi_age_trend,
    htn_yearly_hazard,
    t2d_age_term,
)

BUILTIN_MODULES = Path(__file__).resolve().parent / "modules"
# Before the history window the yearly type 2 diabetes hazard is lower (incidence has risen over
# calendar time); this keeps prevalent cases at record start near real-world levels without
# changing the incidence inside the window, which the prediction task measures.
PRE_WINDOW_T2D_FACTOR = 0.25
# Diagnosis waits for a wellness visit (not any lab-drawing encounter, as in the python engine):
# a slightly higher hazard keeps the 3-year incidence the prediction task sees the same.
GMF_T2D_FACTOR = 1.25
T2D_CODES = frozenset({"44054006"})
HYPERTENSION_CODES = frozenset({"59621000", "38341003"})
ANTIHYPERTENSIVE_CODES = frozenset({"314076", "308136", "310798", "979485"})
METFORMIN = codes.MEDICATIONS["metformin"].code
LIRAGLUTIDE = codes.MEDICATIONS["liraglutide"].code
_SMOKING_CODES = {k: Code("SNOMED-CT", c.code, c.display) for k, c in codes.SMOKING_VALUES.items()}
_EGFR_CAP_BY_CKD = {3: 59.0, 4: 29.0, 5: 14.0}
_MS_PER_YEAR = 365.25 * 86_400_000


def _code_of(value: Any) -> str | None:
    if isinstance(value, Entry):
        return value.code
    if isinstance(value, Code):
        return value.code
    return None


class LifecyclePerson(RecordsInDicts):
    """The lifecycle physiology behind the engine's PersonState contract (see the module docstring)."""

    def __init__(self, rng: Rng, site: SiteConfig, body: _Body, window_start_ms: int, adult_ms: int) -> None:
        demo = body.demo
        self.body, self.site, self.s, self.t = body, site, body.s, body.t
        self.birth_ms = to_millis(demo.birth_date)
        self.gender, self.race = demo.sex, demo.race
        self.death_ms: int | None = None
        self.window_start_ms = window_start_ms
        self.ticks = random.Random(rng.r.getrandbits(64))  # the body's own stream (ageing)
        self.now = adult_ms
        self.next_tick = adult_ms
        self.attributes: dict[str, Any] = {
            "gender": demo.sex, "race": demo.race, "birthdate": demo.birth_date,
            "diabetes_risk": site.diabetes_risk, "hypertension_risk": site.hypertension_risk,
            "lab_recorded": 1.0 - site.lab_missingness, "visits_per_year": site.visits_per_year,
        }
        self.set_by_module: dict[str, float] = {}
        self.symptoms: dict[str, dict[str, float]] = {}
        self.observations: dict[str, Any] = {}
        self.actives: dict[str, dict[str, Any]] = {k: {} for k in ("condition", "medication", "careplan",
                                                                    "allergy", "device")}
        self.a1c_effect: dict[str, float] = {}  # active diabetes drug code -> HbA1c lowering
        self.antihypertensives: set[str] = set()
        self.readings: dict[str, float] = {}
        self.readings_time = -1

    # ---- time
    def age(self, time_ms: int) -> float:
        return (time_ms - self.birth_ms) / _MS_PER_YEAR

    def advance(self, time_ms: int) -> None:
        self.now = time_ms
        while self.next_tick <= time_ms:
            self._yearly_tick(self.next_tick)
            self.next_tick += YEAR_AVG

    def _yearly_tick(self, time_ms: int) -> None:
        """BMI, kidney function, smoking and albuminuria age by one year (lifecycle's rules)."""
        s, r = self.s, self.ticks
        age = self.age(time_ms)
        s.bmi = min(65.0, max(15.0, s.bmi + bmi_age_trend(age) + self.t.bmi_drift + r.gauss(0.0, 0.45)))
        if s.smoker == "current" and r.random() < 0.05:
            s.smoker = "former"
        diabetic, hypertensive = s.t2d_onset is not None, s.htn_onset is not None
        decline = (0.25 if age < 40 else 0.7) + (0.6 if diabetic else 0.0) + (0.3 if hypertensive else 0.0)
        s.egfr = min(140.0, max(5.0, s.egfr - decline + r.gauss(0.0, 0.8)))
        if not s.albuminuria and ((diabetic and r.random() < 0.04) or (hypertensive and r.random() < 0.015)):
            s.albuminuria = True

    # ---- physiology
    def a1c(self, time_ms: int) -> float:
        s = self.s
        base = self.body.a1c_without_diabetes(self.age(time_ms))
        if s.t2d_onset is None:
            return base
        years = (time_ms - to_millis(s.t2d_onset)) / _MS_PER_YEAR
        return max(5.8, max(base, s.t2d_a1c_at_onset) + 0.08 * years - sum(self.a1c_effect.values()))

    def blood_pressure(self, time_ms: int) -> tuple[float, float]:
        age, s, t = self.age(time_ms), self.s, self.t
        sbp = t.sbp_offset + 0.45 * (age - ADULT_AGE) + 0.8 * (s.bmi - 25.0)
        dbp = t.dbp_offset + 0.15 * (min(age, 60.0) - ADULT_AGE) + 0.4 * (s.bmi - 25.0)
        if s.htn_onset is not None:
            sbp, dbp = sbp + 16.0, dbp + 8.0
        drugs = len(self.antihypertensives)
        return sbp - 11.0 * drugs, dbp - 5.0 * drugs

    def egfr(self) -> float:
        ckd = self.attributes.get("ckd")
        cap = _EGFR_CAP_BY_CKD.get(ckd, math.inf) if isinstance(ckd, int) and not isinstance(ckd, bool) else math.inf
        return min(self.s.egfr, cap)

    def _measure(self, time_ms: int, r: RandomSource) -> dict[str, float]:
        """One visit's readings, drawn together (noise as in the lifecycle clinic)."""
        s, t = self.s, self.t
        height = t.height + 0.4 * r.gauss()
        weight = s.bmi * (t.height / 100.0) ** 2 + 0.8 * r.gauss()
        sbp, dbp = self.blood_pressure(time_ms)
        a1c_true = self.a1c(time_ms)
        age = self.age(time_ms)
        egfr = max(4.0, self.egfr() + 4.0 * r.gauss())
        cholesterol = t.cholesterol_offset + 0.7 * (min(age, 65.0) - ADULT_AGE) + 1.5 * (s.bmi - 25.0) \
            + 10.0 * r.gauss()
        hdl = min(110.0, max(20.0, t.hdl_offset - 0.9 * (s.bmi - 25.0) + 4.0 * r.gauss()))
        triglycerides = math.exp(math.log(100.0) + 0.03 * (s.bmi - 25.0) + 0.35 * (a1c_true - 5.4) + 0.3 * r.gauss())
        return {
            "Height": height, "Weight": weight, "BMI": weight / (height / 100.0) ** 2,
            "Systolic Blood Pressure": sbp + 7.0 * r.gauss(), "Diastolic Blood Pressure": dbp + 5.0 * r.gauss(),
            "Heart Rate": t.heart_rate + 0.6 * (s.bmi - 27.0) + 6.0 * r.gauss(),
            "Respiration Rate": 15.0 + 1.5 * r.gauss(),
            "Blood Glucose": max(4.0, a1c_true + 0.12 * r.gauss()),
            "Glucose": max(55.0, 85.0 + 25.0 * (a1c_true - 5.2) + 9.0 * r.gauss()),
            "EGFR": egfr, "Creatinine": _creatinine(egfr, age, self.gender),
            "Total Cholesterol": cholesterol, "HDL": hdl, "Triglycerides": triglycerides,
            "LDL": max(30.0, cholesterol - hdl - triglycerides / 5.0),
        }

    # ---- PersonState
    def vital_sign(self, name: str, time_ms: int, rng: RandomSource) -> float | None:
        if name in self.set_by_module:
            return self.set_by_module[name]
        if time_ms != self.readings_time:
            self.readings, self.readings_time = self._measure(time_ms, rng), time_ms
        value = self.readings.get(name)
        if value is not None:
            return value
        base = DEFAULT_VITALS.get(name)
        if base is None:
            return None
        sd = DEFAULT_NOISE.get(name, 0.0)
        value = base + sd * rng.gauss() if sd else base
        self.readings[name] = value
        return value

    def set_vital_sign(self, name: str, value: float) -> None:
        self.set_by_module[name] = value

    def get_attribute(self, name: str) -> Any:
        computed = _COMPUTED.get(name)
        return computed(self) if computed is not None else self.attributes.get(name)

    def set_attribute(self, name: str, value: Any) -> None:
        self.attributes[name] = value
        if value is True and name == "diabetes" and self.s.t2d_onset is None:
            self.s.t2d_onset = _datetime(self.now)
            self.s.t2d_a1c_at_onset = 6.5 + self.ticks.expovariate(1 / 0.7)
        elif value is True and name == "hypertension" and self.s.htn_onset is None:
            self.s.htn_onset = _datetime(self.now)

    def socioeconomic_category(self) -> str:
        return "Middle"

    def activate(self, kind: str, code: str, entry: Any) -> None:
        super().activate(kind, code, entry)
        if kind != "medication":
            return
        reason = _code_of(getattr(entry, "reason", None))
        if code in DIABETES_DRUGS or reason in T2D_CODES:
            low, high = (0.5, 1.3) if code == METFORMIN else (0.6, 1.4)
            self.a1c_effect[code] = self.ticks.uniform(low, high)
            if code == LIRAGLUTIDE:
                self.s.bmi -= self.ticks.uniform(0.5, 2.5)
        elif code in ANTIHYPERTENSIVE_CODES or reason in HYPERTENSION_CODES:
            self.antihypertensives.add(code)

    def deactivate(self, kind: str, code: str) -> Any:
        if kind == "medication":
            self.a1c_effect.pop(code, None)
            self.antihypertensives.discard(code)
        return super().deactivate(kind, code)


def _datetime(time_ms: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=time_ms)


def _t2d_annual_risk(p: LifecyclePerson) -> float:
    s = p.s
    if s.t2d_onset is not None:
        return 0.0
    age = p.age(p.now)
    a1c = p.body.a1c_without_diabetes(age)
    log_rate = (3.0 * (a1c - 5.7) + 0.06 * (s.bmi - 30.0) + t2d_age_term(age)
                + (0.25 if s.smoker == "current" else 0.0))
    rate = GMF_T2D_FACTOR * T2D_HAZARD_CALIBRATION * T2D_BASE_RATE * p.site.diabetes_risk * math.exp(log_rate)
    if p.now < p.window_start_ms:
        rate *= PRE_WINDOW_T2D_FACTOR
    return 1.0 - math.exp(-rate)


def _hypertension_annual_risk(p: LifecyclePerson) -> float:
    if p.s.htn_onset is not None:
        return 0.0
    age = p.age(p.now)
    sbp, _ = p.blood_pressure(p.now)
    return 1.0 - math.exp(-htn_yearly_hazard(sbp, age, p.s.bmi, p.site.hypertension_risk))


def _mortality_annual_risk(p: LifecyclePerson) -> float:
    if p.now < p.window_start_ms:
        return 0.0  # people are sampled alive at the reference date's age structure
    return 1.0 - math.exp(-p.body.mortality_rate(p.age(p.now)))


_COMPUTED = {
    "t2d_annual_risk": _t2d_annual_risk,
    "hypertension_annual_risk": _hypertension_annual_risk,
    "mortality_annual_risk": _mortality_annual_risk,
    "albuminuria": lambda p: p.s.albuminuria,
    "smoking_status": lambda p: _SMOKING_CODES[p.s.smoker],
}


# ---------------------------------------------------------------- modules and one life

def modules_folder(modules_dir: str | Path | None) -> Path:
    return BUILTIN_MODULES if modules_dir is None else Path(modules_dir)


@functools.lru_cache(maxsize=8)
def cached_modules(folder: str, allow_missing: tuple[str, ...], digest: str = "") -> dict[str, Module]:
    """Loaded once per process (workers included) per folder and content `digest` (modules_digest)."""
    return load_modules(folder, allow_missing_submodules=allow_missing)


def unknown_code_systems(modules: dict[str, Module]) -> list[str]:
    """Code-system names the modules use that have no FHIR URI in `codes.GMF_SYSTEMS` (their codes
    are exported with the name as written; the generate stage lists them in `_SUCCESS.json`)."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            system = node.get("system")
            if isinstance(system, str) and isinstance(node.get("code"), str) and codes.is_unknown_system(system):
                found.add(system)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for module in modules.values():
        for state in module.states.values():
            walk(state.raw)
    return sorted(found)


def modules_digest(folder: str | Path) -> str:
    """A hash of every module and lookup-table file, so edited modules trigger a rebuild."""
    digest = hashlib.sha256()
    root = Path(folder)
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in (".json", ".csv"):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def simulate_life_gmf(seed: int, site: SiteConfig, reference: dt.date, years_of_history: int,
                      practitioners: int, modules: dict[str, Module]) -> Life:
    """One person from age 18 to the reference date (or death), with the modules deciding events."""
    rng = Rng(seed)
    demo = _demographics(rng, site, reference)
    traits = _traits(rng, demo, practitioners)
    body = _Body(rng, site, demo, traits)
    end = dt.datetime.combine(reference, dt.time())
    window_start = end - dt.timedelta(days=round(years_of_history * 365.25))
    adult = dt.datetime.combine(demo.birth_date, dt.time(hour=rng.r.randint(7, 16), minute=rng.r.randint(0, 59)))
    adult += dt.timedelta(days=365 * ADULT_AGE + ADULT_AGE // 4)
    joined = max(adult, window_start - dt.timedelta(days=rng.r.uniform(0, 3650)))
    first_visit = joined + dt.timedelta(days=rng.r.uniform(0, 365))
    person = LifecyclePerson(rng, site, body, to_millis(window_start), to_millis(adult))
    record = run_person(modules, person, adult, end, random.Random(rng.r.getrandbits(64)),
                        wellness=WellnessSchedule(scale=1.0 / site.visits_per_year), first_wellness=first_visit)
    life = to_life(record, demo, window_start, end)
    for enc in life.encounters:
        own = enc.kind in ("wellness", "followup")
        enc.practitioner = traits.practitioner if own else rng.r.randrange(practitioners)
    return life
