"""From the raw columns an engine gives to the tables of the contract, the same for every engine.

Per table: FHIR dates and times parsed to UTC timestamps, codes as text, OMB race and ethnicity
labels, condition concepts and flags (`fedlab/harmonization/conditions.csv`), drug classes; for
observations the unit harmonization (pint, per LOINC and unit); then `conform` to the Arrow schema.
`derive_tables` does it all for one site (or one chunk of it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from fedlab import harmonization as hz
from fedlab.flatten.contract import RAW_COLUMNS, SCHEMAS, TABLE_OF_TYPE, FlattenError, conform, empty_table

RACE_OMB = {"2106-3": "white", "2054-5": "black", "2028-9": "asian", "1002-5": "native",
            "2076-8": "pacific", "2131-1": "other"}
ETHNICITY_OMB = {"2135-2": "hispanic", "2186-5": "nonhispanic"}
US_CORE_RACE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
US_CORE_ETHNICITY = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOINC = "http://loinc.org"


def ref_id(ref: Any) -> str | None:
    """`Patient/123`, `urn:uuid:123`, `http://x/fhir/Patient/123` -> `123`."""
    if not isinstance(ref, str) or not ref:
        return None
    ref = ref.removeprefix("urn:uuid:")
    parts = ref.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    return parts[-1] or None


def timestamps(series: pd.Series) -> pd.Series:
    return pd.to_datetime(series, format="ISO8601", utc=True).astype("datetime64[us, UTC]")


def as_text(series: pd.Series) -> pd.Series:
    """Codes as strings (a JSON number in a code field becomes its text), nulls as None."""
    if pd.api.types.infer_dtype(series, skipna=True) in ("string", "empty"):
        series = series.astype("object")  # already text: only the nulls need normalizing
        return series.where(series.notna(), None)
    return series.map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v),
                      na_action=None).astype("object")


def race_label(code: str | None) -> str:
    return RACE_OMB.get(code, "other") if code else "unknown"


def ethnicity_label(code: str | None) -> str:
    return ETHNICITY_OMB.get(code, "unknown") if code else "unknown"


def condition_concepts(systems: pd.Series, codes: pd.Series) -> tuple[list[Any], list[str]]:
    cmap = hz.condition_map()
    mapped = [cmap.lookup(s, c) for s, c in zip(systems, codes, strict=True)]
    return [m[0] for m in mapped], [m[1] for m in mapped]


def drug_classes(rxnorm: pd.Series) -> pd.Series:
    meds = hz.medication_map()
    return rxnorm.map(lambda code: meds.get(code) if code else None)


def component_row_id(observation_id: str, loinc: str | None, index: int) -> str:
    """The id of the row of one component of a split Observation (`o3-8480-6`)."""
    return f"{observation_id}-{loinc if loinc else index}"


def _patients(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "patient_id": frame["patient_id"],
        "birth_date": timestamps(frame["birth_date"]).dt.date,
        "gender": frame["gender"],
        "race": frame["race"].map(race_label, na_action=None),
        "ethnicity": frame["ethnicity"].map(ethnicity_label, na_action=None),
        "deceased": timestamps(frame["deceased"]),
    })


def _encounters(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "encounter_id": frame["encounter_id"], "patient_id": frame["patient_id"],
        "class_code": as_text(frame["class_code"]), "type_code": as_text(frame["type_code"]),
        "start": timestamps(frame["start"]), "end": timestamps(frame["end"]),
    })


def _conditions(frame: pd.DataFrame) -> pd.DataFrame:
    codes = as_text(frame["code"])
    concepts, flags = condition_concepts(frame["system"], codes)
    return pd.DataFrame({
        "condition_id": frame["condition_id"], "patient_id": frame["patient_id"],
        "encounter_id": frame["encounter_id"], "system": frame["system"], "code": codes,
        "onset": timestamps(frame["onset"]), "abatement": timestamps(frame["abatement"]),
        "concept": concepts, "flag": flags,
    })


def _observations(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame[["observation_id", "patient_id", "encounter_id"]].copy()
    out["effective"] = timestamps(frame["effective"])
    out["loinc"] = as_text(frame["loinc"])
    out["value"] = pd.to_numeric(frame["value"], errors="coerce").astype("float64")
    out["unit"] = as_text(frame["unit"])
    return out


def _medication_requests(frame: pd.DataFrame) -> pd.DataFrame:
    rxnorm = as_text(frame["rxnorm"])
    return pd.DataFrame({
        "medication_request_id": frame["medication_request_id"], "patient_id": frame["patient_id"],
        "encounter_id": frame["encounter_id"], "authored_on": timestamps(frame["authored_on"]),
        "rxnorm": rxnorm, "status": frame["status"], "concept": drug_classes(rxnorm),
    })


DERIVE: dict[str, Callable[[pd.DataFrame], pd.DataFrame]] = {
    "Patient": _patients, "Encounter": _encounters, "Condition": _conditions, "Observation": _observations,
    "MedicationRequest": _medication_requests}


def derive_tables(frames: dict[str, pd.DataFrame | None]) -> tuple[dict[str, pd.DataFrame], dict[str, dict[str, int]]]:
    """The five tables (conformed to their schemas) from an engine's raw frames by resource type,
    and the units seen per observation concept."""
    tables = {}
    for rtype, table in TABLE_OF_TYPE.items():
        frame = frames.get(rtype)
        if frame is None or not len(frame):
            tables[table] = empty_table(table)
            continue
        missing = [column for column in RAW_COLUMNS[rtype] if column not in frame]
        if missing:
            raise FlattenError(f"the flatten engine gave {rtype} rows without the column(s) {missing} "
                               f"(an engine gives the columns {RAW_COLUMNS[rtype]})")
        frame = frame[RAW_COLUMNS[rtype]]
        tables[table] = DERIVE[rtype](frame.astype("object").where(frame.notna(), None))
    tables["observation"], units = harmonize_observations(tables["observation"])
    return {name: conform(frame, SCHEMAS[name]) for name, frame in tables.items()}, units


def harmonize_observations(obs: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, dict[str, int]]]:
    """Add concept, value_canonical, unit_canonical and flag; convert with pint per (LOINC, unit).

    The concept columns come from dict lookups over the whole column; each (LOINC, unit) group is
    then converted as one array, so pint runs once per group, not once per value."""
    concepts = hz.observation_map().concepts
    obs = obs.copy()
    concept = obs["loinc"].map({code: lab.concept for code, lab in concepts.items()}).astype("object")
    obs["concept"] = concept.where(concept.notna(), None)
    canonical = obs["loinc"].map({code: lab.unit_canonical for code, lab in concepts.items()}).astype("object")
    obs["unit_canonical"] = canonical.where(canonical.notna(), None)
    value_canonical = np.full(len(obs), np.nan)
    flag = np.full(len(obs), "unknown_code", dtype=object)
    values = obs["value"].to_numpy(dtype="float64")
    units_seen: dict[str, dict[str, int]] = {}
    known = np.flatnonzero(concept.notna().to_numpy())
    keys = pd.DataFrame({"loinc": obs["loinc"].to_numpy()[known],
                         "unit": obs["unit"].fillna("").to_numpy()[known]})
    for (loinc, unit), members in sorted(keys.groupby(["loinc", "unit"], sort=True).indices.items()):
        positions = known[members]
        lab = concepts[loinc]
        seen = units_seen.setdefault(lab.concept, {})
        seen[unit or "(none)"] = seen.get(unit or "(none)", 0) + len(positions)
        if unit == lab.unit_canonical:
            value_canonical[positions], flag[positions] = values[positions], lab.flag
            continue
        try:
            if not unit:
                raise ValueError("no unit")
            value_canonical[positions] = hz.convert(values[positions], unit, lab.unit_canonical,
                                                    lab.molar_mass_g_per_mol)
            flag[positions] = "converted"
        except ValueError:
            flag[positions] = "unknown_unit"
    obs["value_canonical"] = value_canonical
    obs["flag"] = flag
    return obs, units_seen
