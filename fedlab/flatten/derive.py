"""From the raw columns an engine gives to the tables of the contract, the same for every engine.

Per table: FHIR dates and times parsed to UTC timestamps, codes as text, OMB race and ethnicity
labels, condition concepts and flags (`fedlab/harmonization/conditions.csv`), drug classes; for
observations the unit harmonization (pint, per LOINC and unit). `derive_tables` does it all for one
site (or one chunk of it) and builds each table once, its columns in schema order with the schema's
types and every null as None (what `contract.conform` would make of it).
"""

from __future__ import annotations

import re
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


def timestamps(series: pd.Series | np.ndarray) -> pd.Series:
    """FHIR dates and date-times as UTC timestamps (microseconds): what
    `pd.to_datetime(series, format="ISO8601", utc=True)` gives, a date or a time without zone taken
    as UTC. When every distinct text has a common shape (`YYYY-MM-DD`, or
    `YYYY-MM-DDThh:mm:ss[.ffffff]` with a zone on all of them or on none, years 1678 to 2261), numpy
    parses each once, several times faster; otherwise pandas parses the column as it is."""
    values = np.asarray(series, dtype=object)
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    micros = _common_micros(uniques)
    if micros is None:
        parsed = pd.to_datetime(pd.Series(values, dtype=object), format="ISO8601", utc=True)
        return parsed.astype("datetime64[us, UTC]")
    result = np.where(codes >= 0, micros[codes] if len(micros) else 0, np.iinfo("int64").min)
    return pd.Series(pd.DatetimeIndex(result.view("datetime64[us]")).tz_localize("UTC"))


_ISO_COMMON = re.compile(r"(\d{4})-\d{2}-\d{2}(?:T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(Z|[+-]\d{2}:\d{2})?)?")


def _common_micros(texts: np.ndarray) -> np.ndarray | None:
    """Microseconds since the epoch (UTC) of distinct texts of the common shapes, or None when one
    is not (pandas then decides, mixed zones and errors included)."""
    local, zones = [], []
    for text in texts:
        match = _ISO_COMMON.fullmatch(text) if type(text) is str else None
        if match is None or not 1678 <= int(match[1]) <= 2261:
            return None
        zone = match[2]
        local.append(text[:-len(zone)] if zone else text)
        zones.append(zone)
    if None in zones and any(zones):
        return None
    try:
        parsed = np.array(local, dtype="datetime64[us]").view("int64")
    except ValueError:  # e.g. February 30th: pandas words the error
        return None
    offsets = {zone: _offset_micros(zone) for zone in set(zones)}
    return parsed - np.array([offsets[zone] for zone in zones], dtype="int64")


def _offset_micros(zone: str | None) -> int:
    if not zone or zone == "Z":
        return 0
    sign = -1 if zone[0] == "-" else 1
    return sign * (int(zone[1:3]) * 60 + int(zone[4:6])) * 60_000_000


def as_text(values: pd.Series | np.ndarray) -> np.ndarray:
    """Codes as strings (a JSON number in a code field becomes its text), nulls as None."""
    values = np.asarray(values, dtype=object)
    if all(type(v) is str or v is None for v in values):
        return values
    return np.array([None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in values],
                    dtype=object)


def normalized(column: pd.Series) -> np.ndarray:
    """A raw column as Python objects, every null (None, NaN, NaT) as None."""
    values = column.to_numpy(dtype=object, copy=True)
    nulls = pd.isna(values)
    if nulls.any():
        values[nulls] = None
    return values


def race_label(code: str | None) -> str:
    return RACE_OMB.get(code, "other") if code else "unknown"


def ethnicity_label(code: str | None) -> str:
    return ETHNICITY_OMB.get(code, "unknown") if code else "unknown"


def condition_concepts(systems: Any, codes: Any) -> tuple[list[Any], list[str]]:
    cmap = hz.condition_map()
    mapped = [cmap.lookup(s, c) for s, c in zip(systems, codes, strict=True)]
    return [m[0] for m in mapped], [m[1] for m in mapped]


def drug_classes(rxnorm: Any) -> list[Any]:
    meds = hz.medication_map()
    return [meds.get(code) if code else None for code in rxnorm]


def component_row_id(observation_id: str, loinc: str | None, index: int) -> str:
    """The id of the row of one component of a split Observation (`o3-8480-6`)."""
    return f"{observation_id}-{loinc if loinc else index}"


Columns = dict[str, Any]  # column name -> values (an object array, a list, a Series of timestamps)


def _patients(raw: Columns) -> Columns:
    return {"patient_id": raw["patient_id"], "birth_date": timestamps(raw["birth_date"]).dt.date,
            "gender": raw["gender"], "race": [race_label(code) for code in raw["race"]],
            "ethnicity": [ethnicity_label(code) for code in raw["ethnicity"]],
            "deceased": timestamps(raw["deceased"])}


def _encounters(raw: Columns) -> Columns:
    return {"encounter_id": raw["encounter_id"], "patient_id": raw["patient_id"],
            "class_code": as_text(raw["class_code"]), "type_code": as_text(raw["type_code"]),
            "start": timestamps(raw["start"]), "end": timestamps(raw["end"])}


def _conditions(raw: Columns) -> Columns:
    codes = as_text(raw["code"])
    concepts, flags = condition_concepts(raw["system"], codes)
    return {"condition_id": raw["condition_id"], "patient_id": raw["patient_id"],
            "encounter_id": raw["encounter_id"], "system": raw["system"], "code": codes,
            "onset": timestamps(raw["onset"]), "abatement": timestamps(raw["abatement"]),
            "concept": concepts, "flag": flags}


def _observations(raw: Columns) -> Columns:
    return {"observation_id": raw["observation_id"], "patient_id": raw["patient_id"],
            "encounter_id": raw["encounter_id"], "effective": timestamps(raw["effective"]),
            "loinc": as_text(raw["loinc"]),
            "value": pd.to_numeric(pd.Series(raw["value"], dtype=object), errors="coerce").astype("float64"),
            "unit": as_text(raw["unit"])}


def _medication_requests(raw: Columns) -> Columns:
    rxnorm = as_text(raw["rxnorm"])
    return {"medication_request_id": raw["medication_request_id"], "patient_id": raw["patient_id"],
            "encounter_id": raw["encounter_id"], "authored_on": timestamps(raw["authored_on"]),
            "rxnorm": rxnorm, "status": raw["status"], "concept": drug_classes(rxnorm)}


DERIVE: dict[str, Callable[[Columns], Columns]] = {
    "Patient": _patients, "Encounter": _encounters, "Condition": _conditions, "Observation": _observations,
    "MedicationRequest": _medication_requests}


def derive_tables(frames: dict[str, pd.DataFrame | None]) -> tuple[dict[str, pd.DataFrame], dict[str, dict[str, int]]]:
    """The five tables (conformed to their schemas) from an engine's raw frames by resource type,
    and the units seen per observation concept."""
    tables, units = {}, {}
    for rtype, table in TABLE_OF_TYPE.items():
        frame = frames.get(rtype)
        if frame is None or not len(frame):
            empty = empty_table(table)
            if table == "observation":
                empty, units = harmonize_observations(empty)
            tables[table] = conform(empty, SCHEMAS[table])
            continue
        missing = [column for column in RAW_COLUMNS[rtype] if column not in frame]
        if missing:
            raise FlattenError(f"the flatten engine gave {rtype} rows without the column(s) {missing} "
                               f"(an engine gives the columns {RAW_COLUMNS[rtype]})")
        columns = DERIVE[rtype]({name: normalized(frame[name]) for name in RAW_COLUMNS[rtype]})
        if table == "observation":
            columns, units = _harmonized(columns)
        # Each derivation gives its schema's types, nulls as None: the table is already conformed.
        tables[table] = pd.DataFrame({name: _unindexed(columns[name]) for name in SCHEMAS[table].names},
                                     index=pd.RangeIndex(len(frame)))
    return tables, units


def _unindexed(values: Any) -> Any:
    return values.array if isinstance(values, pd.Series) else values


def harmonize_observations(obs: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, dict[str, int]]]:
    """Add concept, value_canonical, unit_canonical and flag; convert with pint per (LOINC, unit)."""
    columns, units = _harmonized({name: obs[name].to_numpy(dtype=object) if obs[name].dtype == object
                                  else obs[name] for name in obs.columns})
    return pd.DataFrame({name: _unindexed(values) for name, values in columns.items()}, index=obs.index), units


def _harmonized(columns: Columns) -> tuple[Columns, dict[str, dict[str, int]]]:
    """The observation columns with concept, unit_canonical, value_canonical and flag added, and the
    units seen per concept. Concepts come from dict lookups; each (LOINC, unit) group is converted as
    one array, so pint runs once per group, not once per value."""
    concepts = hz.observation_map().concepts
    loinc = columns["loinc"]
    labs = [concepts.get(code) if code is not None else None for code in loinc]
    values = np.asarray(columns["value"], dtype="float64")
    value_canonical = np.full(len(labs), np.nan)
    flag = np.full(len(labs), "unknown_code", dtype=object)
    groups: dict[tuple[str, str], list[int]] = {}
    for position, (lab, code, unit) in enumerate(zip(labs, loinc, columns["unit"], strict=True)):
        if lab is not None:
            groups.setdefault((code, unit if unit is not None else ""), []).append(position)
    units_seen: dict[str, dict[str, int]] = {}
    for (code, unit), members in sorted(groups.items()):
        positions = np.array(members, dtype="int64")
        lab = concepts[code]
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
    return {**columns, "concept": np.array([lab.concept if lab is not None else None for lab in labs], dtype=object),
            "unit_canonical": np.array([lab.unit_canonical if lab is not None else None for lab in labs], dtype=object),
            "value_canonical": value_canonical, "flag": flag}, units_seen
