"""Declared concept maps (the CSV files beside this module) and UCUM unit conversion with pint.

- `conditions.csv`: (system, code) -> concept; a code ending in `*` matches by prefix. The `flag`
  column says whether a match is in the reference system (`ok`, SNOMED CT) or a cross-walk
  (`mapped`, ICD-10-CM).
- `observations.csv`: LOINC -> concept and canonical UCUM unit; `split_components=1` marks panels
  (blood pressure) that are split into one row per component; `molar_mass_g_per_mol` enables
  amount-of-substance <-> mass conversion (glucose mmol/L <-> mg/dL) for that concept only.
- `medications.csv`: RxNorm -> drug class.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pint

HERE = Path(__file__).resolve().parent
FLAGS = ("ok", "converted", "mapped", "unknown_code", "unknown_unit")


@dataclass(frozen=True)
class ConditionMap:
    exact: dict[tuple[str, str], tuple[str, str]]
    prefix: list[tuple[str, str, str, str]]  # (system, prefix, concept, flag), longest prefix first

    def lookup(self, system: str | None, code: str | None) -> tuple[str | None, str]:
        """(concept, flag) for a coded condition; unknown codes give (None, 'unknown_code')."""
        if not code:
            return None, "unknown_code"
        hit = self.exact.get((system or "", code))
        if hit:
            return hit
        for sys_uri, prefix, concept, flag in self.prefix:
            if sys_uri == system and code.startswith(prefix):
                return concept, flag
        return None, "unknown_code"


@dataclass(frozen=True)
class LabConcept:
    loinc: str
    concept: str
    unit_canonical: str
    flag: str
    molar_mass_g_per_mol: float | None


@dataclass(frozen=True)
class ObservationMap:
    concepts: dict[str, LabConcept]
    split_panels: frozenset[str]


def _rows(name: str) -> list[dict[str, str]]:
    with open(HERE / name, newline="", encoding="utf-8") as handle:
        return [{k: (v or "").strip() for k, v in row.items()} for row in csv.DictReader(handle)]


@cache
def condition_map() -> ConditionMap:
    exact: dict[tuple[str, str], tuple[str, str]] = {}
    prefix: list[tuple[str, str, str, str]] = []
    for row in _rows("conditions.csv"):
        if row["code"].endswith("*"):
            prefix.append((row["system"], row["code"][:-1], row["concept"], row["flag"]))
        else:
            exact[(row["system"], row["code"])] = (row["concept"], row["flag"])
    prefix.sort(key=lambda item: -len(item[1]))
    return ConditionMap(exact, prefix)


@cache
def observation_map() -> ObservationMap:
    concepts: dict[str, LabConcept] = {}
    panels: set[str] = set()
    for row in _rows("observations.csv"):
        if row["split_components"] == "1":
            panels.add(row["loinc"])
            continue
        mass = float(row["molar_mass_g_per_mol"]) if row["molar_mass_g_per_mol"] else None
        concepts[row["loinc"]] = LabConcept(row["loinc"], row["concept"], row["unit_canonical"], row["flag"], mass)
    return ObservationMap(concepts, frozenset(panels))


@cache
def medication_map() -> dict[str, str]:
    return {row["rxnorm"]: row["concept"] for row in _rows("medications.csv")}


def concept_codes() -> dict[str, list[str]]:
    """Every source code per concept (conditions, labs, drug classes), for data dictionaries."""
    codes: dict[str, list[str]] = {}
    for row in _rows("conditions.csv"):
        codes.setdefault(row["concept"], []).append(f"{row['system']}|{row['code']}")
    for row in _rows("observations.csv"):
        if row["concept"]:
            codes.setdefault(row["concept"], []).append(f"http://loinc.org|{row['loinc']}")
    for row in _rows("medications.csv"):
        codes.setdefault(row["concept"], []).append(f"http://www.nlm.nih.gov/research/umls/rxnorm|{row['rxnorm']}")
    return codes


# ---- UCUM -> pint -------------------------------------------------------------------------

_UCUM_ATOMS = {"mm[Hg]": "mmHg", "[in_i]": "inch", "[lb_av]": "lb", "[degF]": "degF", "Cel": "degC", "%": "percent"}
_ANNOTATION = re.compile(r"\{[^}]*\}")
_EXPONENT = re.compile(r"(?<=[A-Za-z])(-?\d+)")


def ucum_to_pint(unit: str) -> str:
    """Rewrite a UCUM unit string in pint's syntax.

    UCUM curly-brace annotations (`{1.73_m2}`, `{score}`) carry no dimension: they become `1`.
    Exponents are written without an operator in UCUM (`m2`), with `**` in pint.
    """
    text = _ANNOTATION.sub("1", unit.strip())
    for ucum, pint_name in _UCUM_ATOMS.items():
        text = text.replace(ucum, pint_name)
    text = _EXPONENT.sub(r"**\1", text)
    if text.startswith("/"):
        text = "1" + text
    return text or "1"


@cache
def _registry() -> pint.UnitRegistry:
    return pint.UnitRegistry()


@cache
def _molar_context(molar_mass_g_per_mol: float) -> pint.Context:
    ureg = _registry()
    ctx = pint.Context(f"molar_mass_{molar_mass_g_per_mol:g}")
    molar_mass = ureg.Quantity(molar_mass_g_per_mol, "g/mol")
    ctx.add_transformation("[substance] / [length] ** 3", "[mass] / [length] ** 3",
                           lambda _ureg, value: value * molar_mass)
    ctx.add_transformation("[mass] / [length] ** 3", "[substance] / [length] ** 3",
                           lambda _ureg, value: value / molar_mass)
    return ctx


def convert(values: np.ndarray, unit: str, target: str, molar_mass_g_per_mol: float | None = None) -> np.ndarray:
    """Convert `values` from UCUM `unit` to UCUM `target`; raises ValueError if impossible."""
    ureg = _registry()
    try:
        quantity = ureg.Quantity(np.asarray(values, dtype="float64"), ucum_to_pint(unit))
        if molar_mass_g_per_mol:
            with ureg.context(_molar_context(molar_mass_g_per_mol)):
                return np.asarray(quantity.to(ucum_to_pint(target)).magnitude, dtype="float64")
        return np.asarray(quantity.to(ucum_to_pint(target)).magnitude, dtype="float64")
    except (pint.errors.PintError, AttributeError, TypeError, ValueError, SyntaxError) as err:
        raise ValueError(f"cannot convert {unit!r} to {target!r}: {err}") from None
