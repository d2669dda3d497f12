"""One person's adult life as a sequence of encounters, with causal links between risk and disease.

The model (all per person, yearly time steps, encounters at exact dates):
- BMI drifts slowly from a baseline set by sex, race and the site's `bmi_shift`.
- A latent insulin-resistance trait plus BMI and age set the HbA1c of a person without diabetes;
  fasting glucose follows HbA1c. Type 2 diabetes starts with a yearly hazard that grows with
  HbA1c, BMI and smoking (scaled by the site's `diabetes_risk`); HbA1c then jumps above 6.5 %
  and the diagnosis is made at the next encounter that draws labs.
- Blood pressure rises with age and BMI; hypertension starts with a hazard (scaled by
  `hypertension_risk`), raises blood pressure, and is treated with up to three drugs.
- eGFR declines with age, faster with diabetes and hypertension; CKD stages follow eGFR.
- Medications act on the values: metformin, liraglutide and insulin lower HbA1c,
  antihypertensives lower blood pressure.

Nothing here knows FHIR: `export.py` turns a `Life` into resources.

Why one module: it is one causal simulation. The equations above share one person's state and one
order of random draws, which the byte-identical output of a seed depends on.
"""

from __future__ import annotations

import datetime as dt
import math
import random
from dataclasses import dataclass, field

from fedlab.config import SiteConfig
from fedlab.synthea import codes

YEAR = dt.timedelta(days=365.25)
ADULT_AGE = 18
T2D_BASE_RATE = 0.07  # the hazard scale before calibration, below
# The yearly hazard is scaled so that diabetes_risk 1.0 gives CDC-like point prevalence of diagnosed
# diabetes among living adults at the reference date (US: ~3 % at 18-44, ~14.5 % at 45-64, ~24 % at
# 65+, ~11 % overall) and a 3-year incidence of a few percent; sites that need more cases for a
# learnable task raise their `diabetes_risk`.
T2D_HAZARD_CALIBRATION = 0.13
# Incidence stops rising with age in the sixties and falls slowly after 65 (CDC: 9.9 per 1,000 a year
# at 45-64, 8.8 at 65+).
T2D_AGE_PLATEAU = 60.0
T2D_OLD_AGE = 65.0
T2D_OLD_AGE_SLOPE = 0.03
# Adult BMI (NHANES 2017-2020, measured): median about 26 at 18 with a long right tail, rising
# through young adulthood; obesity (BMI >= 30) in about 40 % of 20-39, 44 % of 40-59, 42 % of 60+.
BMI_MEDIAN_AT_ADULT = 26.0
BMI_LOG_SD = 0.19


def bmi_age_trend(age: float) -> float:
    """Yearly change of BMI with age: gain in young adulthood, flat in midlife, loss in old age."""
    return 0.15 if age < 35 else 0.0 if age < 65 else -0.15


def htn_yearly_hazard(sbp: float, age: float, bmi: float, site_risk: float) -> float:
    """Yearly hazard of essential hypertension from systolic pressure, age and BMI."""
    return 0.03 * site_risk * math.exp(0.045 * (sbp - 125.0) + 0.025 * (age - 50.0) + 0.04 * (bmi - 28.0))


def t2d_age_term(age: float) -> float:
    """The age part of the log yearly type 2 diabetes hazard (0 at 50)."""
    return 0.035 * (min(age, T2D_AGE_PLATEAU) - 50.0) - T2D_OLD_AGE_SLOPE * max(0.0, age - T2D_OLD_AGE)


CHRONIC_FOLLOWUP_KINDS = ("wellness", "followup", "inpatient")  # encounters that draw labs


@dataclass
class Demographics:
    patient_id: str
    sex: str  # "M" or "F"
    race: str  # key of codes.RACES
    hispanic: bool
    birth_date: dt.date
    given: str
    family: str
    prefix: str
    phone: str
    ssn: str
    drivers_license: str
    marital: str
    city: codes.City
    street: str
    latitude: float
    longitude: float


@dataclass
class ConditionEvent:
    concept: str  # key of codes.CONDITIONS
    onset: dt.datetime
    resource_id: str
    abatement: dt.datetime | None = None


@dataclass
class MedicationEvent:
    medication: str  # key of codes.MEDICATIONS
    start: dt.datetime
    reason: ConditionEvent
    resource_id: str
    stop: dt.datetime | None = None


@dataclass
class Measurement:
    lab: codes.Lab
    value: float
    category: str  # "vital-signs" or "laboratory"
    resource_id: str


@dataclass
class Encounter:
    kind: str  # key of codes.ENCOUNTER_TYPES
    start: dt.datetime
    end: dt.datetime
    resource_id: str
    practitioner: int
    reason: ConditionEvent | None = None
    measurements: list[Measurement] = field(default_factory=list)
    blood_pressure: tuple[float, float, str] | None = None  # systolic, diastolic, resource id
    smoking: tuple[str, str] | None = None  # status key, resource id
    conditions: list[ConditionEvent] = field(default_factory=list)
    medications: list[MedicationEvent] = field(default_factory=list)
    procedures: list[tuple[codes.Concept, str]] = field(default_factory=list)
    immunization_id: str | None = None
    lipid_report_id: str | None = None
    careplan: tuple[str, ConditionEvent] | None = None  # resource id, addressed condition
    # GMF engine only: entries (gmf.record.Entry) whose codes codes.py does not map, exported with
    # the module's own codes, and the unmapped condition entry or code the encounter is for.
    other: list[object] = field(default_factory=list)
    other_reason: object | None = None
    type_codes: tuple[object, ...] = ()  # GMF engine: the module's own encounter codes, if not the kind's


@dataclass
class Life:
    demographics: Demographics
    encounters: list[Encounter]
    death: dt.datetime | None
    window_start: dt.datetime
    end: dt.datetime  # reference date (or death)


@dataclass
class _Traits:
    """Fixed per-person values drawn once."""

    height: float
    insulin_resistance: float
    a1c_offset: float
    bmi_drift: float
    sbp_offset: float
    dbp_offset: float
    cholesterol_offset: float
    hdl_offset: float
    heart_rate: float
    practitioner: int


@dataclass
class _State:
    """What changes over a life; updated at yearly ticks and at encounters."""

    bmi: float
    egfr: float
    smoker: str
    t2d_onset: dt.datetime | None = None
    t2d_a1c_at_onset: float = 0.0
    htn_onset: dt.datetime | None = None
    albuminuria: bool = False
    active: dict[str, ConditionEvent] = field(default_factory=dict)
    meds: dict[str, MedicationEvent] = field(default_factory=dict)
    a1c_lowering: float = 0.0
    last_med_change: dt.datetime | None = None


class Rng:
    """A seeded `random.Random` plus the helpers the model needs (ids are drawn from it too)."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def uuid(self) -> str:
        bits = self.r.getrandbits(128)
        # Set version 4 and the RFC 4122 variant, as uuid.UUID(int=..., version=4) does.
        bits &= ~(0xF000 << 64)
        bits |= 0x4000 << 64
        bits &= ~(0xC000 << 48)
        bits |= 0x8000 << 48
        h = f"{bits:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def normal(self, mean: float, sd: float) -> float:
        return self.r.gauss(mean, sd)

    def chance(self, p: float) -> bool:
        return self.r.random() < p

    def weighted(self, options: dict[str, float]) -> str:
        keys = list(options)
        return self.r.choices(keys, weights=[options[k] for k in keys])[0]

    def exponential_gap(self, rate_per_year: float) -> dt.timedelta:
        return dt.timedelta(days=self.r.expovariate(rate_per_year) * 365.25)


def _age(birth: dt.date, when: dt.datetime) -> float:
    return (when.date() - birth).days / 365.25


def _clip(value: float, low: float, high: float) -> float:
    return low if value < low else high if value > high else value


# ---------------------------------------------------------------- demographics

def _demographics(rng: Rng, site: SiteConfig, reference: dt.date) -> Demographics:
    sex = "F" if rng.chance(site.female_fraction) else "M"
    race = rng.weighted(dict(site.race_mix))
    age = _clip(rng.normal(site.age_mean, site.age_sd), ADULT_AGE, 95)
    birth = reference - dt.timedelta(days=int(age * 365.25))
    given_names = codes.GIVEN_FEMALE if sex == "F" else codes.GIVEN_MALE
    given = f"{rng.r.choice(given_names)}{rng.r.randint(10, 999)}"
    family = f"{rng.r.choice(codes.FAMILY)}{rng.r.randint(10, 999)}"
    married_p = 0.15 if age < 25 else 0.55 if age < 65 else 0.5
    marital = "M" if rng.chance(married_p) else rng.weighted({"S": 0.6, "D": 0.25, "W": 0.15 if age > 55 else 0.0})
    city = rng.r.choice(codes.CITIES)
    street = f"{rng.r.randint(1, 999)} {rng.r.choice(codes.FAMILY)} {rng.r.choice(codes.STREET_SUFFIX)}"
    prefix = "Mr." if sex == "M" else ("Mrs." if marital in ("M", "W", "D") else "Ms.")
    return Demographics(
        patient_id=rng.uuid(), sex=sex, race=race, hispanic=race == "hispanic", birth_date=birth,
        given=given, family=family, prefix=prefix,
        phone=f"555-{rng.r.randint(100, 999)}-{rng.r.randint(1000, 9999)}",
        ssn=f"999-{rng.r.randint(10, 99)}-{rng.r.randint(1000, 9999)}",
        drivers_license=f"S999{rng.r.randint(10000, 99999)}",
        marital=marital, city=city, street=street,
        latitude=city.latitude + rng.r.uniform(-0.05, 0.05),
        longitude=city.longitude + rng.r.uniform(-0.05, 0.05),
    )


_BMI_BY_RACE = {"white": 0.0, "black": 1.6, "asian": -2.5, "hispanic": 1.0, "other": 0.0}
_A1C_BY_RACE = {"white": 0.0, "black": 0.15, "asian": 0.1, "hispanic": 0.1, "other": 0.05}


def _traits(rng: Rng, demo: Demographics, practitioners: int) -> _Traits:
    male = demo.sex == "M"
    return _Traits(
        height=rng.normal(176.0 if male else 162.5, 7.0 if male else 6.5),
        insulin_resistance=rng.normal(0.0, 1.0),
        a1c_offset=rng.normal(_A1C_BY_RACE[demo.race], 0.12),
        bmi_drift=rng.normal(0.0, 0.06),
        sbp_offset=rng.normal(108.0 + (4.0 if male else 0.0), 9.0),
        dbp_offset=rng.normal(68.0 + (2.0 if male else 0.0), 6.0),
        cholesterol_offset=rng.normal(165.0, 28.0),
        hdl_offset=rng.normal(52.0 + (0.0 if male else 9.0), 9.0),
        heart_rate=rng.normal(72.0, 8.0),
        practitioner=rng.r.randrange(practitioners),
    )


# ---------------------------------------------------------------- physiology (functions of state)

class _Body:
    def __init__(self, rng: Rng, site: SiteConfig, demo: Demographics, traits: _Traits) -> None:
        self.rng, self.site, self.demo, self.t = rng, site, demo, traits
        median = BMI_MEDIAN_AT_ADULT + _BMI_BY_RACE[demo.race] + site.bmi_shift + 0.6 * traits.insulin_resistance
        self.s = _State(
            bmi=_clip(median * math.exp(rng.normal(0.0, BMI_LOG_SD)), 16.0, 55.0),
            egfr=rng.normal(112.0, 10.0),
            smoker="current" if rng.chance(0.2) else "never",
        )

    def a1c_without_diabetes(self, age: float) -> float:
        t, s = self.t, self.s
        value = 5.15 + 0.03 * (s.bmi - 25.0) + 0.009 * (age - 30.0) + 0.22 * t.insulin_resistance + t.a1c_offset
        return _clip(value, 4.3, 6.4)

    def a1c(self, when: dt.datetime) -> float:
        age = _age(self.demo.birth_date, when)
        base = self.a1c_without_diabetes(age)
        s = self.s
        if s.t2d_onset is None or when < s.t2d_onset:
            return base
        years = (when - s.t2d_onset).days / 365.25
        return max(5.8, max(base, s.t2d_a1c_at_onset) + 0.08 * years - s.a1c_lowering)

    def blood_pressure(self, when: dt.datetime) -> tuple[float, float]:
        age = _age(self.demo.birth_date, when)
        s, t = self.s, self.t
        sbp = t.sbp_offset + 0.45 * (age - ADULT_AGE) + 0.8 * (s.bmi - 25.0)
        dbp = t.dbp_offset + 0.15 * (min(age, 60.0) - ADULT_AGE) + 0.4 * (s.bmi - 25.0)
        if s.htn_onset is not None and when >= s.htn_onset:
            sbp, dbp = sbp + 16.0, dbp + 8.0
        drugs = sum(1 for m in s.meds if m in codes.ANTIHYPERTENSIVES)
        return sbp - 11.0 * drugs, dbp - 5.0 * drugs

    def yearly_tick(self, when: dt.datetime) -> None:
        """Advance BMI, kidney function and smoking by a year; draw new disease onsets."""
        s, rng = self.s, self.rng
        age = _age(self.demo.birth_date, when)
        s.bmi = _clip(s.bmi + bmi_age_trend(age) + self.t.bmi_drift + rng.normal(0.0, 0.45), 15.0, 65.0)
        if s.smoker == "current" and rng.chance(0.05):
            s.smoker = "former"
        diabetic = s.t2d_onset is not None
        hypertensive = s.htn_onset is not None
        decline = (0.25 if age < 40 else 0.7) + (0.6 if diabetic else 0.0) + (0.3 if hypertensive else 0.0)
        s.egfr = _clip(s.egfr - decline + rng.normal(0.0, 0.8), 5.0, 140.0)
        if diabetic and not s.albuminuria and rng.chance(0.04):
            s.albuminuria = True
        if hypertensive and not s.albuminuria and rng.chance(0.015):
            s.albuminuria = True
        self._draw_t2d_onset(when, age)
        self._draw_htn_onset(when, age)

    def _draw_t2d_onset(self, when: dt.datetime, age: float) -> None:
        s = self.s
        if s.t2d_onset is not None:
            return
        a1c = self.a1c_without_diabetes(age)
        log_rate = (3.0 * (a1c - 5.7) + 0.06 * (s.bmi - 30.0) + t2d_age_term(age)
                    + (0.25 if s.smoker == "current" else 0.0))
        rate = T2D_HAZARD_CALIBRATION * T2D_BASE_RATE * self.site.diabetes_risk * math.exp(log_rate)
        if self.rng.chance(1.0 - math.exp(-rate)):
            s.t2d_onset = when + dt.timedelta(days=self.rng.r.uniform(0, 365))
            s.t2d_a1c_at_onset = 6.5 + self.rng.r.expovariate(1 / 0.7)

    def _draw_htn_onset(self, when: dt.datetime, age: float) -> None:
        s = self.s
        if s.htn_onset is not None:
            return
        sbp, _ = self.blood_pressure(when)
        rate = htn_yearly_hazard(sbp, age, s.bmi, self.site.hypertension_risk)
        if self.rng.chance(1.0 - math.exp(-rate)):
            s.htn_onset = when + dt.timedelta(days=self.rng.r.uniform(0, 365))

    def mortality_rate(self, age: float) -> float:
        s = self.s
        multiplier = 1.0 + (0.6 if s.t2d_onset else 0.0) + (0.3 if s.htn_onset else 0.0)
        multiplier += 0.8 if s.egfr < 60 else 0.0
        multiplier *= 1.6 if s.smoker == "current" else 1.0
        return math.exp(-10.2 + 0.085 * age) * multiplier


# ---------------------------------------------------------------- encounters

@dataclass
class _Measured:
    a1c: float
    glucose: float
    sbp: float
    dbp: float
    bmi: float
    ldl: float
    cholesterol: float
    egfr: float


class _Clinic:
    """Runs encounters: measures, records (with the site's missingness), diagnoses, treats."""

    def __init__(self, body: _Body, rng: Rng, site: SiteConfig, practitioners: int) -> None:
        self.body, self.rng, self.site, self.practitioners = body, rng, site, practitioners

    def open(self, kind: str, when: dt.datetime) -> Encounter:
        minutes = {"wellness": 15 + self.rng.r.randint(0, 30), "followup": 15, "symptom": 20,
                   "emergency": 60 + self.rng.r.randint(0, 240),
                   "inpatient": 60 * 24 * self.rng.r.randint(1, 5)}[kind]
        own = self.body.t.practitioner
        practitioner = own if kind in ("wellness", "followup") else self.rng.r.randrange(self.practitioners)
        reason = None
        if kind == "followup":
            active = self.body.s.active
            reason = active.get("t2d") or active.get("hypertension")
        return Encounter(kind=kind, start=when, end=when + dt.timedelta(minutes=minutes),
                         resource_id=self.rng.uuid(), practitioner=practitioner, reason=reason)

    def visit(self, enc: Encounter) -> None:
        if enc.kind == "symptom":
            return
        measured = self._vitals(enc)
        if enc.kind in CHRONIC_FOLLOWUP_KINDS:
            measured = self._labs(enc, measured)
            self._diagnose(enc, measured)
            self._treat(enc, measured)
        if enc.kind == "wellness":
            if self.rng.chance(0.5):
                enc.immunization_id = self.rng.uuid()
            if self.body.s.meds:
                enc.procedures.append((codes.MED_RECONCILIATION, self.rng.uuid()))

    def _record(self, enc: Encounter, lab: codes.Lab, value: float, category: str) -> None:
        enc.measurements.append(Measurement(lab, value, category, self.rng.uuid()))

    def _lab_recorded(self) -> bool:
        return not self.rng.chance(self.site.lab_missingness)

    def _vitals(self, enc: Encounter) -> _Measured:
        body, rng, when = self.body, self.rng, enc.start
        height = body.t.height + rng.normal(0.0, 0.4)
        weight = body.s.bmi * (body.t.height / 100.0) ** 2 + rng.normal(0.0, 0.8)
        bmi = weight / (height / 100.0) ** 2
        sbp, dbp = body.blood_pressure(when)
        sbp, dbp = sbp + rng.normal(0.0, 7.0), dbp + rng.normal(0.0, 5.0)
        heart_rate = body.t.heart_rate + 0.6 * (body.s.bmi - 27.0) + rng.normal(0.0, 6.0)
        if enc.kind in ("wellness", "followup"):
            self._record(enc, codes.HEIGHT, height, "vital-signs")
            self._record(enc, codes.WEIGHT, weight, "vital-signs")
            self._record(enc, codes.BMI, bmi, "vital-signs")
        enc.blood_pressure = (sbp, dbp, rng.uuid())
        self._record(enc, codes.HEART_RATE, heart_rate, "vital-signs")
        self._record(enc, codes.RESP_RATE, rng.normal(15.0, 1.5), "vital-signs")
        if enc.kind == "wellness":
            enc.smoking = (body.s.smoker, rng.uuid())
        return _Measured(a1c=math.nan, glucose=math.nan, sbp=sbp, dbp=dbp, bmi=bmi,
                         ldl=math.nan, cholesterol=math.nan, egfr=math.nan)

    def _labs(self, enc: Encounter, m: _Measured) -> _Measured:
        body, rng, when = self.body, self.rng, enc.start
        age = _age(body.demo.birth_date, when)
        a1c_true = body.a1c(when)
        m.a1c = max(4.0, a1c_true + rng.normal(0.0, 0.12))
        m.glucose = max(55.0, 85.0 + 25.0 * (a1c_true - 5.2) + rng.normal(0.0, 9.0))
        m.egfr = max(4.0, body.s.egfr + rng.normal(0.0, 4.0))
        diabetic_followup = enc.kind == "followup" and "t2d" in body.s.active
        if enc.kind == "wellness" or diabetic_followup or enc.kind == "inpatient":
            self._record_glucose(enc, m.glucose)
        if enc.kind == "wellness" or diabetic_followup:
            if self._lab_recorded():
                self._record(enc, codes.HBA1C, m.a1c, "laboratory")
        if enc.kind in ("wellness", "inpatient") or self.rng.chance(0.3):
            if self._lab_recorded():
                self._record(enc, codes.CREATININE, _creatinine(m.egfr, age, body.demo.sex), "laboratory")
            if self._lab_recorded():
                self._record(enc, codes.EGFR, m.egfr, "laboratory")
        if enc.kind == "wellness":
            m.cholesterol, m.ldl = self._lipids(enc, a1c_true)
        return m

    def _record_glucose(self, enc: Encounter, glucose_mg_dl: float) -> None:
        if not self._lab_recorded():
            return
        if self.site.glucose_unit == "mmol/L":
            self._record(enc, codes.GLUCOSE_MMOL, glucose_mg_dl / codes.GLUCOSE_MG_PER_MMOL, "laboratory")
        else:
            self._record(enc, codes.GLUCOSE_MGDL, glucose_mg_dl, "laboratory")

    def _lipids(self, enc: Encounter, a1c_true: float) -> tuple[float, float]:
        body, rng = self.body, self.rng
        age = _age(body.demo.birth_date, enc.start)
        cholesterol = (body.t.cholesterol_offset + 0.7 * (min(age, 65.0) - ADULT_AGE)
                       + 1.5 * (body.s.bmi - 25.0) + rng.normal(0.0, 10.0))
        hdl = _clip(body.t.hdl_offset - 0.9 * (body.s.bmi - 25.0) + rng.normal(0.0, 4.0), 20.0, 110.0)
        triglycerides = math.exp(math.log(100.0) + 0.03 * (body.s.bmi - 25.0) + 0.35 * (a1c_true - 5.4)
                                 + rng.normal(0.0, 0.3))
        ldl = max(30.0, cholesterol - hdl - triglycerides / 5.0)
        recorded = [(lab, value) for lab, value in ((codes.CHOLESTEROL, cholesterol),
                                                    (codes.TRIGLYCERIDES, triglycerides),
                                                    (codes.LDL, ldl), (codes.HDL, hdl))
                    if self._lab_recorded()]
        for lab, value in recorded:
            self._record(enc, lab, value, "laboratory")
        if recorded:
            enc.lipid_report_id = rng.uuid()
        return cholesterol, ldl

    # ---- diagnoses
    def _onset(self, enc: Encounter, concept: str) -> ConditionEvent:
        event = ConditionEvent(concept=concept, onset=enc.start, resource_id=self.rng.uuid())
        enc.conditions.append(event)
        self.body.s.active[concept] = event
        return event

    def _resolve(self, concept: str, when: dt.datetime) -> None:
        event = self.body.s.active.pop(concept, None)
        if event is not None:
            event.abatement = when

    def _diagnose(self, enc: Encounter, m: _Measured) -> None:
        s, when = self.body.s, enc.start
        if "t2d" not in s.active and s.t2d_onset is not None and s.t2d_onset <= when:
            self._resolve("prediabetes", when)
            diabetes = self._onset(enc, "t2d")
            enc.careplan = (self.rng.uuid(), diabetes)
        elif "t2d" not in s.active and "prediabetes" not in s.active and enc.kind == "wellness" and m.a1c >= 5.7:
            self._onset(enc, "prediabetes")
        if "hypertension" not in s.active and s.htn_onset is not None and s.htn_onset <= when:
            self._onset(enc, "hypertension")
        if enc.kind == "wellness":
            self._diagnose_from_measurements(enc, m)
        self._stage_ckd(enc, m)

    def _diagnose_from_measurements(self, enc: Encounter, m: _Measured) -> None:
        active = self.body.s.active
        if "hyperlipidemia" not in active and (m.ldl >= 160.0 or m.cholesterol >= 240.0):
            self._onset(enc, "hyperlipidemia")
        if "obesity" not in active and m.bmi >= 30.0:
            self._onset(enc, "obesity")
        elif "obesity" in active and m.bmi < 29.0:
            self._resolve("obesity", enc.start)

    def _stage_ckd(self, enc: Encounter, m: _Measured) -> None:
        s = self.body.s
        at_risk = "t2d" in s.active or "hypertension" in s.active
        if m.egfr < 30:
            stage = "ckd4"
        elif m.egfr < 60:
            stage = "ckd3"
        elif at_risk and s.albuminuria:
            stage = "ckd2" if m.egfr < 90 else "ckd1"
        else:
            return
        current = next((c for c in ("ckd4", "ckd3", "ckd2", "ckd1") if c in s.active), None)
        if current is None or stage > current:  # "ckd1" < ... < "ckd4": stages only progress
            if current is not None:
                self._resolve(current, enc.start)
            self._onset(enc, stage)

    # ---- treatment
    def _start(self, enc: Encounter, medication: str, reason: ConditionEvent) -> None:
        event = MedicationEvent(medication=medication, start=enc.start, reason=reason, resource_id=self.rng.uuid())
        enc.medications.append(event)
        self.body.s.meds[medication] = event
        self.body.s.last_med_change = enc.start

    def _stop(self, medication: str, when: dt.datetime) -> None:
        event = self.body.s.meds.pop(medication, None)
        if event is not None:
            event.stop = when

    def _settled(self, when: dt.datetime) -> bool:
        last = self.body.s.last_med_change
        return last is None or when - last > dt.timedelta(days=180)

    def _treat(self, enc: Encounter, m: _Measured) -> None:
        s, rng = self.body.s, self.rng
        diabetes = s.active.get("t2d")
        if diabetes is not None:
            if "metformin" not in s.meds and "insulin" not in s.meds:
                self._start(enc, "metformin", diabetes)
                s.a1c_lowering += rng.r.uniform(0.5, 1.3)
            elif m.a1c >= 7.5 and self._settled(enc.start) and rng.chance(0.6):
                second = "liraglutide" if "liraglutide" not in s.meds and rng.chance(0.5) else "insulin"
                if second not in s.meds:
                    self._start(enc, second, diabetes)
                    s.a1c_lowering += rng.r.uniform(0.6, 1.4)
                    if second == "liraglutide":
                        s.bmi -= rng.r.uniform(0.5, 2.5)
        hypertension = s.active.get("hypertension")
        if hypertension is not None:
            on = [d for d in codes.ANTIHYPERTENSIVES if d in s.meds]
            if not on:
                first = rng.weighted({"lisinopril": 0.5, "hydrochlorothiazide": 0.25, "amlodipine": 0.25})
                self._start(enc, first, hypertension)
            elif m.sbp >= 145.0 and self._settled(enc.start) and rng.chance(0.6):
                if len(on) < len(codes.ANTIHYPERTENSIVES):
                    if rng.chance(0.2):  # switch instead of adding: the first drug is stopped
                        self._stop(on[0], enc.start)
                    self._start(enc, next(d for d in codes.ANTIHYPERTENSIVES if d not in s.meds), hypertension)


def _creatinine(egfr: float, age: float, sex: str) -> float:
    """Serum creatinine (mg/dL) that gives this eGFR under CKD-EPI 2009 (race term omitted)."""
    kappa, alpha, factor = (0.7, -0.329, 1.018) if sex == "F" else (0.9, -0.411, 1.0)
    ratio = egfr / (141.0 * factor * 0.993 ** age)
    low = kappa * ratio ** (1.0 / alpha)  # valid when creatinine <= kappa
    return low if low <= kappa else kappa * ratio ** (-1.0 / 1.209)


# ---------------------------------------------------------------- the schedule

def wellness_interval_years(age: float, visits_per_year: float) -> float:
    """Synthea's adult schedule (every 3 years to 39, every 2 to 49, then yearly) over the site's rate."""
    base = 3.0 if age < 40 else 2.0 if age < 50 else 1.0
    return base / visits_per_year


def _clock(rng: Rng, day: dt.datetime) -> dt.datetime:
    return day.replace(hour=rng.r.randint(7, 17), minute=rng.r.randint(0, 59), second=rng.r.randint(0, 59),
                       microsecond=0)


def simulate_life(seed: int, site: SiteConfig, reference: dt.date, years_of_history: int,
                  practitioners: int) -> Life:
    """Simulate one person from age 18 to the reference date (or death)."""
    rng = Rng(seed)
    demo = _demographics(rng, site, reference)
    traits = _traits(rng, demo, practitioners)
    body = _Body(rng, site, demo, traits)
    clinic = _Clinic(body, rng, site, practitioners)
    end = dt.datetime.combine(reference, dt.time())
    window_start = end - dt.timedelta(days=round(years_of_history * 365.25))
    adult = dt.datetime.combine(demo.birth_date, dt.time()) + ADULT_AGE * YEAR
    # Records start when the person joins the practice (at 18, or up to 10 years before the window).
    first = max(adult, window_start - dt.timedelta(days=rng.r.uniform(0, 3650)))
    encounters, death = _run_schedule(rng, site, body, clinic, adult, first, window_start, end)
    return Life(demographics=demo, encounters=encounters, death=death,
                window_start=window_start, end=death or end)


def _run_schedule(rng: Rng, site: SiteConfig, body: _Body, clinic: _Clinic, adult: dt.datetime,
                  first: dt.datetime, window_start: dt.datetime, end: dt.datetime
                  ) -> tuple[list[Encounter], dt.datetime | None]:
    encounters: list[Encounter] = []
    death: dt.datetime | None = None
    tick = adult
    next_wellness = first + dt.timedelta(days=rng.r.uniform(0, 365))
    next_followup: dt.datetime | None = None
    other_rates = {"symptom": 0.35 * site.visits_per_year, "emergency": 0.08, "inpatient": 0.03}
    next_other = {k: window_start + rng.exponential_gap(r) for k, r in other_rates.items()}
    while True:
        candidates = {"tick": tick, "wellness": next_wellness, **next_other}
        if next_followup is not None:
            candidates["followup"] = next_followup
        kind = min(candidates, key=lambda k: (candidates[k], k))
        when = candidates[kind]
        if when >= end:
            break
        if kind == "tick":
            age = _age(body.demo.birth_date, when)
            if when >= window_start and rng.chance(1.0 - math.exp(-body.mortality_rate(age))):
                death = (when + dt.timedelta(days=rng.r.uniform(0, 364))).replace(microsecond=0)
                end = min(end, death)
            body.yearly_tick(when)
            tick = when + YEAR
            continue
        enc = clinic.open(kind, _clock(rng, when))
        clinic.visit(enc)
        encounters.append(enc)
        age = _age(body.demo.birth_date, when)
        if kind == "wellness":
            gap = wellness_interval_years(age, site.visits_per_year) * rng.r.uniform(0.85, 1.15)
            next_wellness = when + dt.timedelta(days=gap * 365.25)
        elif kind == "followup":
            next_followup = None
        else:
            next_other[kind] = when + rng.exponential_gap(other_rates[kind])
        if next_followup is None and ("t2d" in body.s.active or "hypertension" in body.s.active):
            interval = (0.5 if "t2d" in body.s.active else 1.0) / site.visits_per_year
            next_followup = when + dt.timedelta(days=interval * 365.25 * rng.r.uniform(0.8, 1.2))
    return encounters, death


def exported_encounters(life: Life) -> list[Encounter]:
    """Encounters inside the history window, plus older ones that started what is still active
    at the window start (Synthea's `years_of_history` keeps those too)."""
    start = life.window_start
    kept = []
    for enc in life.encounters:
        if enc.start >= start:
            kept.append(enc)
            continue
        still_active = any(c.abatement is None or c.abatement >= start for c in enc.conditions)
        still_taken = any(m.stop is None or m.stop >= start for m in enc.medications)
        if still_active or still_taken:
            kept.append(enc)
    return kept
