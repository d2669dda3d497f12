"""What a module may read about a person, and a small default implementation.

`PersonState` is the contract: the engine reads demographics, attributes, vital signs, symptoms,
latest observations and the active conditions/medications/care plans/allergies/devices through it,
and writes attributes, vital signs, symptoms, observations and the active sets back. A richer
physiology (the lifecycle model) only has to implement these methods.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedlab.synthea.gmf.values import RandomSource, from_millis

ACTIVE_KINDS = ("condition", "medication", "careplan", "allergy", "device")


class PersonState(abc.ABC):
    """The person a module runs against. Codes are plain code strings (e.g. "44054006")."""

    birth_ms: int  # birth time, milliseconds since 1970-01-01
    gender: str  # "M" or "F"
    race: str  # Synthea's lower-case race: white, black, asian, hispanic, native, other
    death_ms: int | None = None

    @abc.abstractmethod
    def get_attribute(self, name: str) -> Any: ...

    @abc.abstractmethod
    def set_attribute(self, name: str, value: Any) -> None: ...

    @abc.abstractmethod
    def vital_sign(self, name: str, time_ms: int, rng: RandomSource) -> float | None:
        """The current value of a vital sign or lab that modules read by name (e.g. "BMI",
        "Systolic Blood Pressure", "Blood Glucose" = HbA1c %, "EGFR"); None if unknown."""

    @abc.abstractmethod
    def set_vital_sign(self, name: str, value: float) -> None: ...

    @abc.abstractmethod
    def symptom(self, name: str) -> float:
        """The highest severity of a symptom over its causes (0 when absent)."""

    @abc.abstractmethod
    def set_symptom(self, cause: str, name: str, severity: float, time_ms: int) -> None: ...

    @abc.abstractmethod
    def socioeconomic_category(self) -> str:
        """"High", "Middle" or "Low"."""

    @abc.abstractmethod
    def latest_observation(self, code: str) -> Any:
        """The value (number, code string or None) of the newest observation with this code."""

    @abc.abstractmethod
    def has_observation(self, code: str) -> bool: ...

    @abc.abstractmethod
    def record_observation(self, code: str, value: Any, time_ms: int) -> None: ...

    @abc.abstractmethod
    def active(self, kind: str, code: str) -> Any:
        """The active entry of this kind (see ACTIVE_KINDS) and code, or None."""

    @abc.abstractmethod
    def activate(self, kind: str, code: str, entry: Any) -> None: ...

    @abc.abstractmethod
    def deactivate(self, kind: str, code: str) -> Any:
        """Remove and return the active entry (None if it was not active)."""

    def advance(self, time_ms: int) -> None:
        """Called by the engine before each time step it processes (times never decrease); a
        physiology that changes with time (ageing, weight drift) catches up here. Default: nothing."""
        return None

    def record_death(self, time_ms: int, cause: Any) -> None:
        if self.death_ms is None or time_ms < self.death_ms:
            self.death_ms = time_ms
            self.set_attribute("death_cause", cause)

    def alive(self, time_ms: int) -> bool:
        return self.death_ms is None or time_ms < self.death_ms


# ---------------------------------------------------------------- default implementation

class RecordsInDicts(PersonState):
    """Symptoms, observations and active entries kept in plain dicts: `symptoms` (name -> cause ->
    severity), `observations` (code -> newest value) and `actives` (kind -> code -> entry), which
    the subclass creates."""

    symptoms: dict[str, dict[str, float]]
    observations: dict[str, Any]
    actives: dict[str, dict[str, Any]]

    def symptom(self, name: str) -> float:
        causes = self.symptoms.get(name)
        return max(causes.values()) if causes else 0.0

    def set_symptom(self, cause: str, name: str, severity: float, time_ms: int) -> None:
        self.symptoms.setdefault(name, {})[cause] = severity

    def latest_observation(self, code: str) -> Any:
        return self.observations.get(code)

    def has_observation(self, code: str) -> bool:
        return code in self.observations

    def record_observation(self, code: str, value: Any, time_ms: int) -> None:
        self.observations[code] = value

    def active(self, kind: str, code: str) -> Any:
        return self.actives[kind].get(code)

    def activate(self, kind: str, code: str, entry: Any) -> None:
        self.actives[kind][code] = entry

    def deactivate(self, kind: str, code: str) -> Any:
        return self.actives[kind].pop(code, None)

# Typical adult values for the vital signs and labs the reference modules read.
DEFAULT_VITALS: dict[str, float] = {
    "Height": 170.0, "Weight": 78.0, "BMI": 27.0, "Systolic Blood Pressure": 122.0,
    "Diastolic Blood Pressure": 78.0, "Heart Rate": 72.0, "Respiration Rate": 15.0,
    "Oxygen Saturation": 97.5, "Blood Glucose": 5.4, "Glucose": 92.0, "Urea Nitrogen": 14.0,
    "Creatinine": 0.95, "Calcium": 9.5, "Sodium": 140.0, "Potassium": 4.2, "Chloride": 103.0,
    "Carbon Dioxide": 25.0, "Total Cholesterol": 190.0, "Triglycerides": 120.0, "LDL": 110.0,
    "HDL": 52.0, "EGFR": 95.0, "Microalbumin Creatinine Ratio": 12.0, "Head Circumference": 56.0,
    "Head Circumference Percentile": 50.0, "Pain Severity - 0-10 verbal numeric rating [Score] - Reported": 1.0,
}
# Measurement noise (standard deviation) per vital sign, so repeated readings differ.
DEFAULT_NOISE: dict[str, float] = {
    "Systolic Blood Pressure": 6.0, "Diastolic Blood Pressure": 4.0, "Heart Rate": 5.0, "Glucose": 6.0,
    "Blood Glucose": 0.1, "Weight": 0.8, "Triglycerides": 12.0, "Total Cholesterol": 10.0, "LDL": 8.0,
    "HDL": 3.0, "EGFR": 3.0,
}
_EGFR_BY_CKD = {0: 95.0, 1: 95.0, 2: 75.0, 3: 45.0, 4: 22.0, 5: 10.0}


def reference_physiology(person: SimplePerson, name: str, base: float) -> float:
    """Ties the readings the reference modules test to the attributes the modules set:
    hypertension raises blood pressure until `blood_pressure_controlled`; `prediabetes` /
    `diabetes` raise HbA1c ("Blood Glucose") and glucose, and each active diabetes drug lowers
    HbA1c; `ckd` sets eGFR and creatinine. Replace it (SimplePerson.physiology) to model more."""
    attr = person.attributes
    if name in ("Systolic Blood Pressure", "Diastolic Blood Pressure"):
        if attr.get("hypertension") is True and attr.get("blood_pressure_controlled") is not True:
            return base + (28.0 if name.startswith("Systolic") else 12.0)
        return base
    if name in ("Blood Glucose", "Glucose"):
        a1c = person.vitals.get("Blood Glucose", DEFAULT_VITALS["Blood Glucose"])
        if attr.get("diabetes") is True:
            a1c = max(a1c, person.diabetic_a1c) - 0.5 * person.active_count("medication", person.diabetes_drugs)
        elif attr.get("prediabetes") is True:
            a1c = max(a1c, 6.1)
        return a1c if name == "Blood Glucose" else 28.7 * a1c - 46.7
    if name in ("EGFR", "Creatinine"):
        ckd = attr.get("ckd")
        egfr = _EGFR_BY_CKD.get(ckd, base) if isinstance(ckd, int) and not isinstance(ckd, bool) else base
        return egfr if name == "EGFR" else max(0.5, 0.95 * 95.0 / max(egfr, 5.0))
    if name == "Triglycerides" and attr.get("diabetes") is True:
        return base + 60.0
    return base


# RxNorm codes of the diabetes drugs in the reference metabolic_syndrome/medications module.
DIABETES_DRUGS = frozenset({"860975", "897122", "1373463", "106892", "865098", "1361493"})


@dataclass
class SimplePerson(RecordsInDicts):
    """A person backed by plain values: attributes and vital signs in dicts, readings from
    `physiology(person, name, base)` plus Gaussian measurement noise."""

    birth_ms: int
    gender: str = "F"
    race: str = "white"
    attributes: dict[str, Any] = field(default_factory=dict)
    vitals: dict[str, float] = field(default_factory=dict)
    socioeconomic: str = "Middle"
    diabetic_a1c: float = 7.8
    noise: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_NOISE))
    physiology: Callable[[SimplePerson, str, float], float] = reference_physiology
    diabetes_drugs: frozenset[str] = DIABETES_DRUGS
    death_ms: int | None = None
    set_by_module: dict[str, float] = field(default_factory=dict)
    symptoms: dict[str, dict[str, float]] = field(default_factory=dict)
    observations: dict[str, Any] = field(default_factory=dict)
    actives: dict[str, dict[str, Any]] = field(default_factory=lambda: {k: {} for k in ACTIVE_KINDS})

    def __post_init__(self) -> None:
        if self.gender not in ("M", "F"):
            raise ValueError(f"gender must be 'M' or 'F', got {self.gender!r}")
        self.race = self.race.lower()
        self.attributes.setdefault("gender", self.gender)
        self.attributes.setdefault("race", self.race)
        self.attributes.setdefault("birthdate", from_millis(self.birth_ms))

    def get_attribute(self, name: str) -> Any:
        return self.attributes.get(name)

    def set_attribute(self, name: str, value: Any) -> None:
        self.attributes[name] = value

    def vital_sign(self, name: str, time_ms: int, rng: RandomSource) -> float | None:
        if name in self.set_by_module:  # a VitalSign state's value is read back as set
            return self.set_by_module[name]
        base = self.vitals.get(name, DEFAULT_VITALS.get(name))
        if base is None:
            return None
        value = self.physiology(self, name, base)
        sd = self.noise.get(name, 0.0)
        return value + sd * rng.gauss() if sd else value

    def set_vital_sign(self, name: str, value: float) -> None:
        self.set_by_module[name] = value

    def socioeconomic_category(self) -> str:
        return self.socioeconomic

    def active_count(self, kind: str, codes: frozenset[str]) -> int:
        return sum(1 for code in self.actives[kind] if code in codes)
