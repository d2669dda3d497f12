"""The health record the interpreter writes: encounters and the coded entries inside them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedlab.synthea.gmf.values import Code, from_millis

# Entry kinds, one per kind of clinical fact a state records.
ENTRY_KINDS = (
    "condition", "allergy", "medication", "careplan", "procedure", "observation", "panel", "report",
    "symptom", "death", "device", "supply", "imaging", "immunization",
)


@dataclass(eq=False)
class Entry:
    """One recorded fact. `stop` is set when it ends (ConditionEnd, MedicationEnd, ...)."""

    kind: str
    codes: tuple[Code, ...]
    start: int  # milliseconds since 1970-01-01
    module: str
    state: str
    resource_id: str
    encounter: GMFEncounter | None = None
    stop: int | None = None
    value: Any = None  # observation: float, Code or None; symptom: severity; supply: quantity
    unit: str | None = None
    category: str | None = None
    reason: Entry | Code | None = None
    parts: list[Entry] = field(default_factory=list)  # panel components / report observations
    details: dict[str, Any] = field(default_factory=dict)  # state fields kept as written

    @property
    def code(self) -> str:
        return self.codes[0].code if self.codes else ""

    @property
    def start_time(self):
        return from_millis(self.start)

    def summary(self) -> tuple:
        """A comparable, id-free view (used to check determinism and in tests)."""
        value = self.value.code if isinstance(self.value, Code) else self.value
        return (self.kind, self.code, self.start, self.stop, self.module, self.state, value,
                tuple(p.summary() for p in self.parts))


@dataclass(eq=False)
class GMFEncounter:
    codes: tuple[Code, ...]
    encounter_class: str
    start: int
    module: str
    state: str
    resource_id: str
    wellness: bool = False
    stop: int | None = None
    reason: Entry | Code | None = None
    entries: list[Entry] = field(default_factory=list)

    @property
    def code(self) -> str:
        return self.codes[0].code if self.codes else ""


@dataclass
class GMFRecord:
    """Everything one run produced for one person, in time order."""

    encounters: list[GMFEncounter] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    death_ms: int | None = None
    skipped_submodules: list[str] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[Entry]:
        return [e for e in self.entries if e.kind == kind]

    def codes(self, kind: str) -> set[str]:
        return {e.code for e in self.entries if e.kind == kind}

    def summary(self) -> list[tuple]:
        encounters = [("encounter", e.code, e.start, e.stop, e.module, e.state, e.encounter_class, ())
                      for e in self.encounters]
        return encounters + [e.summary() for e in self.entries] + [("death", self.death_ms)]
