"""Flatten FHIR R4 or R5 resources into tidy, harmonized Parquet tables.

Resources come from a site's Bulk Data export (`<Type>.ndjson[.gz]`, references `Type/id`) or from
Synthea transaction bundles (`*.json[.gz]`, references `urn:uuid:id`). Every input line (or bundle
entry) is checked first; a bad one goes to quarantine with its file, line and reason, and the
rest is flattened by one of two engines (`flatten.engine`):

- `views` (default): fedlab's SQL-on-FHIR v2 ViewDefinitions (`fedlab/views/definitions/`), one
  per table, each compiled once into one generated Python function over the resource dicts (paths
  inlined as straight-line code; a path met twice is walked once). The views cover both R4 and R5
  shapes (Encounter `period`/`actualPeriod`, `class` Coding/CodeableConcepts, MedicationRequest
  `medicationCodeableConcept`/`medication.concept`). A resource the compiled
  subset cannot decide alone is handed to the reference runner (`fedlab.views.runner`).
- `fhiry`: `fhiry.Fhiry.process_bundle_dict` over chunks of synthetic collection bundles (fhiry's
  NDJSON reader is quadratic and its folder mode blanks code columns, so neither is used); the
  tables are then derived from fhiry's wide columns.

The views engine runs in this process (`flatten.runner: pandas`) or on a Spark session
(`flatten.runner: spark`, `flatten_ndjson_spark`): executors parse, check and flatten the lines, the
driver does the file-order accounting and everything after, so both runners write the same files.
With `flatten.runner: spark-distributed` (`flatten_ndjson_spark_distributed`) the rows never reach
the driver: executors also apply the duplicate-id rule, derive, harmonize and write each table as a
Parquet dataset; only line counts, quarantined lines and report counts are collected.

Both engines then share the same derivations (OMB race/ethnicity labels, condition concepts,
drug classes), unit harmonization with the maps in `fedlab/harmonization/`, quarantine and
`harmonization.json`; `tests/test_flatten_parity.py` checks that they produce the same rows.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import gc
import gzip
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fedlab import harmonization as hz
from fedlab.errors import FedlabError
from fedlab.io import SUCCESS, atomic_open, is_complete, read_json, staging_dir, write_json
from fedlab.stages import record_written
from fedlab.views.plan import ViewRows

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from fedlab.config import Experiment

Engine = Literal["views", "fhiry"]
ENGINES: tuple[str, ...] = ("views", "fhiry")
CHUNK_SIZE = 2000
UTC_TS = pa.timestamp("us", tz="UTC")

TABLE_OF_TYPE = {
    "Patient": "patient",
    "Encounter": "encounter",
    "Condition": "condition",
    "Observation": "observation",
    "MedicationRequest": "medication_request",
}

SCHEMAS: dict[str, pa.Schema] = {
    "patient": pa.schema([("patient_id", pa.string()), ("birth_date", pa.date32()), ("gender", pa.string()),
                          ("race", pa.string()), ("ethnicity", pa.string()), ("deceased", UTC_TS)]),
    "encounter": pa.schema([("encounter_id", pa.string()), ("patient_id", pa.string()),
                            ("class_code", pa.string()), ("type_code", pa.string()),
                            ("start", UTC_TS), ("end", UTC_TS)]),
    "condition": pa.schema([("condition_id", pa.string()), ("patient_id", pa.string()),
                            ("encounter_id", pa.string()), ("system", pa.string()), ("code", pa.string()),
                            ("onset", UTC_TS), ("abatement", UTC_TS), ("concept", pa.string()),
                            ("flag", pa.string())]),
    "observation": pa.schema([("observation_id", pa.string()), ("patient_id", pa.string()),
                              ("encounter_id", pa.string()), ("effective", UTC_TS), ("loinc", pa.string()),
                              ("value", pa.float64()), ("unit", pa.string()), ("concept", pa.string()),
                              ("value_canonical", pa.float64()), ("unit_canonical", pa.string()),
                              ("flag", pa.string())]),
    "medication_request": pa.schema([("medication_request_id", pa.string()), ("patient_id", pa.string()),
                                     ("encounter_id", pa.string()), ("authored_on", UTC_TS),
                                     ("rxnorm", pa.string()), ("status", pa.string()), ("concept", pa.string())]),
}

# Fields a resource must have for its row to mean anything; alternatives separated by "|"
# (R4 and R5 names of the same element are alternatives).
REQUIRED: dict[str, list[str]] = {
    "Patient": ["id", "birthDate"],
    "Encounter": ["id", "subject.reference", "period.start|actualPeriod.start"],
    "Condition": ["id", "subject.reference", "code.coding", "onsetDateTime|onsetPeriod.start|recordedDate"],
    "Observation": ["id", "subject.reference", "code.coding",
                    "effectiveDateTime|effectivePeriod.start|effectiveInstant|issued"],
    "MedicationRequest": ["id", "subject.reference", "medicationCodeableConcept.coding|medication.concept.coding",
                          "authoredOn"],
}
DATETIME_FIELDS: dict[str, list[str]] = {
    "Patient": ["birthDate", "deceasedDateTime"],
    "Encounter": ["period.start", "period.end", "actualPeriod.start", "actualPeriod.end"],
    "Condition": ["onsetDateTime", "onsetPeriod.start", "recordedDate", "abatementDateTime", "abatementPeriod.start"],
    "Observation": ["effectiveDateTime", "effectivePeriod.start", "effectiveInstant", "issued"],
    "MedicationRequest": ["authoredOn"],
}
_REQUIRED_KEYS = {rtype: [[alt.split(".") for alt in spec.split("|")] for spec in specs]
                  for rtype, specs in REQUIRED.items()}
_DATETIME_KEYS = {rtype: [(name, name.split(".")) for name in names] for rtype, names in DATETIME_FIELDS.items()}
_DATETIME = re.compile(r"^\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$")

RACE_OMB = {"2106-3": "white", "2054-5": "black", "2028-9": "asian", "1002-5": "native",
            "2076-8": "pacific", "2131-1": "other"}
ETHNICITY_OMB = {"2135-2": "hispanic", "2186-5": "nonhispanic"}
US_CORE_RACE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
US_CORE_ETHNICITY = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOINC = "http://loinc.org"


class FlattenError(FedlabError, ValueError):
    """Input that cannot be flattened at all (missing folder, unreadable manifest, unknown engine)."""


@dataclass
class FlattenResult:
    tables: dict[str, pd.DataFrame]
    quarantine: list[dict[str, Any]]
    files: list[dict[str, Any]]
    units: dict[str, dict[str, int]] = field(default_factory=dict)

    def harmonization(self) -> dict[str, Any]:
        """Counts per table of each flag, file-level line accounting and the reconciliation."""
        tables: dict[str, Any] = {}
        for name, frame in self.tables.items():
            entry: dict[str, Any] = {"rows": len(frame)}
            if "flag" in frame:
                flags = Counter(frame["flag"])
            elif name == "medication_request":
                flags = Counter(np.where(frame["concept"].notna(), "ok", "unknown_code"))
            else:
                flags = None
            if flags is not None:
                entry["flags"] = {flag: int(flags.get(flag, 0)) for flag in hz.FLAGS}
            tables[name] = entry
        lines = sum(f["lines"] for f in self.files)
        accepted = sum(f["resources"] for f in self.files)
        return {
            "tables": tables,
            "files": self.files,
            "units_seen": self.units,
            "reconciliation": {"lines": lines, "resources": accepted, "quarantined": len(self.quarantine),
                               "balanced": lines == accepted + len(self.quarantine)},
        }


# ---- input checks -------------------------------------------------------------------------

def _get(resource: dict[str, Any], dotted: str) -> Any:
    return _get_keys(resource, dotted.split("."))


def _get_keys(node: Any, keys: list[str]) -> Any:
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def check_resource(resource: Any, expected_type: str | None) -> str | None:
    """The reason a resource cannot be used, or None if it is fine."""
    if type(resource) is dict:
        rtype = resource.get("resourceType")
        if type(rtype) is str and (rtype == expected_type or not expected_type):
            fine = _FINE.get(rtype)
            if fine is not None and fine(resource):
                return None
    return _reason(resource, expected_type)


def _reason(resource: Any, expected_type: str | None) -> str | None:
    """`check_resource` field by field, which also words the reason."""
    if not isinstance(resource, dict):
        return f"not a JSON object (got {type(resource).__name__})"
    rtype = resource.get("resourceType")
    if expected_type and rtype != expected_type:
        return f"resourceType {rtype!r} in a {expected_type} file"
    if rtype not in REQUIRED:
        return None
    for spec, alternatives in zip(REQUIRED[rtype], _REQUIRED_KEYS[rtype], strict=True):
        if not _present(resource, alternatives):
            return f"{rtype} {resource.get('id', '?')}: missing required field {spec}"
    quantity = resource.get("valueQuantity")
    value = quantity.get("value") if isinstance(quantity, dict) else None
    if value is not None and type(value) is not float and (isinstance(value, bool) or not isinstance(value, int)):
        return f"{rtype} {resource.get('id', '?')}: valueQuantity.value is not a number: {value!r}"
    match = _DATETIME.match
    for name, keys in _DATETIME_KEYS[rtype]:
        value = resource.get(keys[0]) if len(keys) == 1 else _get_keys(resource, keys)
        if value is not None and not (type(value) is str and match(value)):
            return f"{rtype} {resource.get('id', '?')}: invalid dateTime in {name}: {value!r}"
    return None


def _fine_source(rtype: str) -> str:
    """A function `_fine_<rtype>(resource)` that is True exactly when `_reason` finds nothing wrong with
    a dict of that type: the same tests, unrolled into straight-line code for the common, valid case."""
    lines = [f"def _fine_{rtype}(r):"]

    def fetch(keys: list[str], indent: str) -> list[str]:
        out = [f"{indent}v = r.get({keys[0]!r})"]
        out += [f"{indent}v = v.get({key!r}) if isinstance(v, dict) else None" for key in keys[1:]]
        return out

    for alternatives in _REQUIRED_KEYS[rtype]:
        indent = "    "
        for keys in alternatives:  # a later alternative is read only when the earlier ones are absent
            lines += fetch(keys, indent)
            lines.append(f'{indent}if v is None or v == "" or v == []:')
            indent += "    "
        lines.append(f"{indent}return False")
    lines += ['    q = r.get("valueQuantity")',
              "    v = q.get('value') if isinstance(q, dict) else None",
              "    if v is not None and type(v) is not float and (isinstance(v, bool) or not isinstance(v, int)):",
              "        return False"]
    for _name, keys in _DATETIME_KEYS[rtype]:
        lines += fetch(keys, "    ")
        lines += ["    if v is not None and not (type(v) is str and _match(v)):", "        return False"]
    lines.append("    return True")
    return "\n".join(lines)


def _fine_checks() -> dict[str, Callable[[dict[str, Any]], bool]]:
    namespace: dict[str, Any] = {"_match": _DATETIME.match}
    for rtype in REQUIRED:
        exec(compile(_fine_source(rtype), "<fedlab.flatten check>", "exec"), namespace)  # noqa: S102
    return {rtype: namespace[f"_fine_{rtype}"] for rtype in REQUIRED}


def _present(resource: dict[str, Any], alternatives: list[list[str]]) -> bool:
    for keys in alternatives:
        node: Any = resource
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None and node != "" and node != []:
            return True
    return False


_FINE = _fine_checks()


# ---- derivations shared by both engines -----------------------------------------------------

def ref_id(ref: Any) -> str | None:
    """`Patient/123`, `urn:uuid:123`, `http://x/fhir/Patient/123` -> `123`."""
    if not isinstance(ref, str) or not ref:
        return None
    ref = ref.removeprefix("urn:uuid:")
    parts = ref.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    return parts[-1] or None


def _timestamps(series: pd.Series) -> pd.Series:
    return pd.to_datetime(series, format="ISO8601", utc=True).astype("datetime64[us, UTC]")


def _text(series: pd.Series) -> pd.Series:
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


def _condition_concepts(systems: pd.Series, codes: pd.Series) -> tuple[list[Any], list[str]]:
    cmap = hz.condition_map()
    mapped = [cmap.lookup(s, c) for s, c in zip(systems, codes, strict=True)]
    return [m[0] for m in mapped], [m[1] for m in mapped]


def _drug_classes(rxnorm: pd.Series) -> pd.Series:
    meds = hz.medication_map()
    return rxnorm.map(lambda code: meds.get(code) if code else None)


def component_row_id(observation_id: str, loinc: str | None, index: int) -> str:
    """The id of the row of one component of a split Observation (`o3-8480-6`)."""
    return f"{observation_id}-{loinc if loinc else index}"


# ---- engine `fhiry` -----------------------------------------------------------------------

def run_fhiry(resources: list[dict[str, Any]]) -> pd.DataFrame:
    """One fhiry pass over resources wrapped in a synthetic collection bundle."""
    import fhiry

    flattener = fhiry.Fhiry()
    # Keep raw `coding` lists beside fhiry's "a, b" code strings: the system of each code is needed.
    flattener.delete_col_raw_coding = False
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}
    frame = flattener.process_bundle_dict(bundle)
    return frame.reset_index(drop=True)


def _col(frame: pd.DataFrame, *names: str) -> pd.Series:
    """First present column among `names` (later ones fill gaps), else an all-null Series."""
    out = pd.Series([None] * len(frame), index=frame.index, dtype="object")
    for name in names:
        if name in frame:
            out = out.where(out.notna(), frame[name])
    return out.where(out.notna(), None)


def _first_coding(codings: Any, system: str | None = None) -> tuple[str | None, str | None]:
    """(system, code) of the first coding that has a code (and is in `system`, when given)."""
    if not isinstance(codings, list):
        return None, None
    for coding in codings:
        if isinstance(coding, dict) and coding.get("code") and (system is None or coding.get("system") == system):
            return coding.get("system"), str(coding["code"])
    return None, None


def _first_concept_code(concepts: Any) -> str | None:
    """First code of a list of CodeableConcepts (Encounter.type, R5 Encounter.class)."""
    if not isinstance(concepts, list):
        return None
    for concept in concepts:
        code = _first_coding(concept.get("coding") if isinstance(concept, dict) else None)[1]
        if code:
            return code
    return None


def _omb_code(extensions: Any, url: str) -> str | None:
    if not isinstance(extensions, list):
        return None
    for ext in extensions:
        if isinstance(ext, dict) and ext.get("url") == url:
            for sub in ext.get("extension", []):
                if sub.get("url") == "ombCategory" and isinstance(sub.get("valueCoding"), dict):
                    code = sub["valueCoding"].get("code")
                    if code:
                        return code
    return None


def _fhiry_patients(frame: pd.DataFrame) -> pd.DataFrame:
    extensions = _col(frame, "extension")
    return pd.DataFrame({
        "patient_id": _col(frame, "id"),
        "birth_date": _timestamps(_col(frame, "birthDate")).dt.date,
        "gender": _col(frame, "gender"),
        "race": extensions.map(lambda e: race_label(_omb_code(e, US_CORE_RACE))),
        "ethnicity": extensions.map(lambda e: ethnicity_label(_omb_code(e, US_CORE_ETHNICITY))),
        "deceased": _timestamps(_col(frame, "deceasedDateTime")),
    })


def _fhiry_encounters(frame: pd.DataFrame) -> pd.DataFrame:
    # R4 `class` is a Coding (fhiry: `class.code`); R5 `class` is a list of CodeableConcepts.
    class_code = _col(frame, "class.code")
    if "class" in frame:
        class_code = class_code.where(class_code.notna(), frame["class"].map(_first_concept_code))
    return pd.DataFrame({
        "encounter_id": _col(frame, "id"),
        "patient_id": _col(frame, "patientId").map(ref_id),
        "class_code": class_code.where(class_code.notna(), None),
        "type_code": _col(frame, "type").map(_first_concept_code),
        "start": _timestamps(_col(frame, "period.start", "actualPeriod.start")),
        "end": _timestamps(_col(frame, "period.end", "actualPeriod.end")),
    })


def _fhiry_conditions(frame: pd.DataFrame) -> pd.DataFrame:
    picked = _col(frame, "code.coding").map(_first_coding)
    systems, codes = picked.map(lambda p: p[0]), picked.map(lambda p: p[1])
    concepts, flags = _condition_concepts(systems, codes)
    return pd.DataFrame({
        "condition_id": _col(frame, "id"),
        "patient_id": _col(frame, "patientId").map(ref_id),
        "encounter_id": _col(frame, "encounter.reference").map(ref_id),
        "system": systems,
        "code": codes,
        "onset": _timestamps(_col(frame, "onsetDateTime", "onsetPeriod.start", "recordedDate")),
        "abatement": _timestamps(_col(frame, "abatementDateTime", "abatementPeriod.start")),
        "concept": concepts,
        "flag": flags,
    })


def _fhiry_observations(frame: pd.DataFrame) -> pd.DataFrame:
    base = pd.DataFrame({
        "observation_id": _col(frame, "id"),
        "patient_id": _col(frame, "patientId").map(ref_id),
        "encounter_id": _col(frame, "encounter.reference").map(ref_id),
        "effective": _timestamps(_col(frame, "effectiveDateTime", "effectivePeriod.start",
                                      "effectiveInstant", "issued")),
        "loinc": _col(frame, "code.coding").map(lambda c: _first_coding(c, LOINC)[1]),
        "value": pd.to_numeric(_col(frame, "valueQuantity.value"), errors="coerce"),
        "unit": _col(frame, "valueQuantity.code", "valueQuantity.unit"),
    })
    components = _col(frame, "component")
    split = components.map(lambda c: isinstance(c, list) and bool(c)).astype(bool)
    parts = [base[~split]]
    if split.any():
        parts.append(_component_rows(base[split], components[split]))
    return pd.concat(parts, ignore_index=True)


def _component_rows(panels: pd.DataFrame, components: pd.Series) -> pd.DataFrame:
    """One row per component of an Observation (BP 85354-9 -> 8480-6 systolic, 8462-4 diastolic)."""
    rows = []
    for panel, comps in zip(panels.to_dict("records"), components, strict=True):
        for index, comp in enumerate(c for c in comps if c is not None):
            code = _first_coding(_get(comp, "code.coding"), LOINC)[1]
            quantity = comp.get("valueQuantity") if isinstance(comp.get("valueQuantity"), dict) else {}
            rows.append({**panel, "observation_id": component_row_id(panel["observation_id"], code, index),
                         "loinc": code, "value": quantity.get("value"),
                         "unit": quantity.get("code") or quantity.get("unit")})
    out = pd.DataFrame(rows, columns=panels.columns)
    out["value"] = pd.to_numeric(out["value"], errors="coerce")
    return out


def _fhiry_medication_requests(frame: pd.DataFrame) -> pd.DataFrame:
    rxnorm = _col(frame, "medicationCodeableConcept.coding", "medication.concept.coding").map(
        lambda c: _first_coding(c, RXNORM)[1])
    return pd.DataFrame({
        "medication_request_id": _col(frame, "id"),
        "patient_id": _col(frame, "patientId").map(ref_id),
        "encounter_id": _col(frame, "encounter.reference").map(ref_id),
        "authored_on": _timestamps(_col(frame, "authoredOn")),
        "rxnorm": rxnorm,
        "status": _col(frame, "status"),
        "concept": _drug_classes(rxnorm),
    })


FHIRY_DERIVE = {"Patient": _fhiry_patients, "Encounter": _fhiry_encounters, "Condition": _fhiry_conditions,
                "Observation": _fhiry_observations, "MedicationRequest": _fhiry_medication_requests}


class FhiryEngine:
    """Resources in, tidy (not yet harmonized) frames out, through fhiry in chunks."""

    name = "fhiry"

    def __init__(self, chunk_size: int = CHUNK_SIZE) -> None:
        self.chunk_size = chunk_size
        self.chunk: list[dict[str, Any]] = []
        self.parts: dict[str, list[pd.DataFrame]] = {t: [] for t in TABLE_OF_TYPE}

    def add(self, rtype: str, resource: dict[str, Any]) -> None:
        self.chunk.append(resource)
        if len(self.chunk) >= self.chunk_size:
            self._flush()

    def _flush(self) -> None:
        if self.chunk:
            frame = run_fhiry(self.chunk)
            for rtype, sub in frame.groupby("resourceType", sort=False):
                self.parts[str(rtype)].append(FHIRY_DERIVE[str(rtype)](sub.reset_index(drop=True)))
            self.chunk.clear()

    def frames(self) -> dict[str, pd.DataFrame | None]:
        self._flush()
        out: dict[str, pd.DataFrame | None] = {}
        for rtype, parts in self.parts.items():
            frames = [p for p in parts if len(p)]
            out[rtype] = pd.concat(frames, ignore_index=True) if frames else None
        return out


# ---- engine `views`: ViewDefinitions compiled to generated code (`fedlab.views.plan`) ----------

def _view_patients(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "patient_id": frame["patient_id"],
        "birth_date": _timestamps(frame["birth_date"]).dt.date,
        "gender": frame["gender"],
        "race": frame["race"].map(race_label, na_action=None),
        "ethnicity": frame["ethnicity"].map(ethnicity_label, na_action=None),
        "deceased": _timestamps(frame["deceased"]),
    })


def _view_encounters(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "encounter_id": frame["encounter_id"], "patient_id": frame["patient_id"],
        "class_code": _text(frame["class_code"]), "type_code": _text(frame["type_code"]),
        "start": _timestamps(frame["start"]), "end": _timestamps(frame["end"]),
    })


def _view_conditions(frame: pd.DataFrame) -> pd.DataFrame:
    codes = _text(frame["code"])
    concepts, flags = _condition_concepts(frame["system"], codes)
    return pd.DataFrame({
        "condition_id": frame["condition_id"], "patient_id": frame["patient_id"],
        "encounter_id": frame["encounter_id"], "system": frame["system"], "code": codes,
        "onset": _timestamps(frame["onset"]), "abatement": _timestamps(frame["abatement"]),
        "concept": concepts, "flag": flags,
    })


def _view_observations(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame[["observation_id", "patient_id", "encounter_id"]].copy()
    out["effective"] = _timestamps(frame["effective"])
    out["loinc"] = _text(frame["loinc"])
    out["value"] = pd.to_numeric(frame["value"], errors="coerce").astype("float64")
    out["unit"] = _text(frame["unit"])
    return out


def _view_medication_requests(frame: pd.DataFrame) -> pd.DataFrame:
    rxnorm = _text(frame["rxnorm"])
    return pd.DataFrame({
        "medication_request_id": frame["medication_request_id"], "patient_id": frame["patient_id"],
        "encounter_id": frame["encounter_id"], "authored_on": _timestamps(frame["authored_on"]),
        "rxnorm": rxnorm, "status": frame["status"], "concept": _drug_classes(rxnorm),
    })


VIEW_DERIVE = {"Patient": _view_patients, "Encounter": _view_encounters, "Condition": _view_conditions,
               "Observation": _view_observations, "MedicationRequest": _view_medication_requests}


class ViewsEngine:
    """Resources in, tidy (not yet harmonized) frames out, through fedlab's ViewDefinitions."""

    name = "views"

    def __init__(self, definitions: dict[str, dict[str, Any]] | None = None) -> None:
        from fedlab.views import load_definitions

        self.definitions = definitions or load_definitions()
        # Compiled on first use: a typed NDJSON file needs only its own view.
        self.views: dict[str, ViewRows] = {}
        self.rows: dict[str, list[tuple]] = {rtype: [] for rtype in TABLE_OF_TYPE}

    def view(self, rtype: str) -> ViewRows:
        compiled = self.views.get(rtype)
        if compiled is None:
            compiled = self.views[rtype] = ViewRows(self.definitions[TABLE_OF_TYPE[rtype]])
            if rtype == "Observation":
                self._obs_id = compiled.columns.index("observation_id")
                self._obs_loinc = compiled.columns.index("loinc")
        return compiled

    def add(self, rtype: str, resource: dict[str, Any]) -> None:
        self.rows[rtype].extend(self.rows_of(rtype, resource))

    def add_rows(self, rtype: str, rows: list[tuple]) -> None:
        """Rows computed elsewhere by `rows_of` (on Spark executors)."""
        self.rows[rtype].extend(rows)

    def rows_of(self, rtype: str, resource: dict[str, Any]) -> list[tuple]:
        view = self.views.get(rtype) or self.view(rtype)
        rows = view.rows(resource)
        if rtype == "Observation" and resource.get("component"):
            # The view gives one row per component; each needs its own id in the table.
            rows = [row[:self._obs_id] + (component_row_id(row[self._obs_id], row[self._obs_loinc], index),)
                    + row[self._obs_id + 1:] for index, row in enumerate(rows)]
        return rows

    def frames(self) -> dict[str, pd.DataFrame | None]:
        out: dict[str, pd.DataFrame | None] = {}
        for rtype, rows in self.rows.items():
            if not rows:
                out[rtype] = None
                continue
            frame = pd.DataFrame.from_records(rows, columns=self.view(rtype).columns)
            out[rtype] = VIEW_DERIVE[rtype](frame.astype("object").where(frame.notna(), None))
        return out

    @property
    def fallbacks(self) -> int:
        return sum(view.fallbacks for view in self.views.values())


# ---- unit harmonization ------------------------------------------------------------------

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


# ---- reading inputs -----------------------------------------------------------------------

@dataclass
class _Source:
    path: Path
    expected_type: str | None  # None for bundles (mixed types)


def _open_text(path: Path):
    # utf-8-sig: a byte-order mark at the start of a file (Windows tools write one) is not JSON.
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _ndjson_items(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed resource or None, parse error) for each non-blank line."""
    fast_loads, loads = orjson.loads, json.loads
    with _open_text(path) as handle:
        for lineno, raw in enumerate(handle, start=1):
            if raw.isspace() or not raw:
                continue
            # orjson parses a line several times faster than json. It is stricter (no NaN, no
            # integers beyond 64 bits, no lone surrogates): whatever it refuses goes through
            # json.loads, which decides, so values and error messages stay those of the standard library.
            try:
                yield lineno, fast_loads(raw), None
                continue
            except orjson.JSONDecodeError:
                pass
            try:
                yield lineno, loads(raw), None
            except json.JSONDecodeError as err:
                yield lineno, None, f"malformed JSON: {err.msg} at column {err.colno}"


def _bundle_items(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(entry number, resource, error) for each entry of a bundle; a broken file is one bad item."""
    try:
        with _open_text(path) as handle:
            bundle = json.load(handle)
    except json.JSONDecodeError as err:
        yield err.lineno, None, f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}"
        return
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        yield 0, None, "not a FHIR Bundle"
        return
    for number, entry in enumerate(bundle.get("entry") or [], start=1):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        yield number, resource, None if resource is not None else "bundle entry without resource"


def make_engine(engine: str) -> FhiryEngine | ViewsEngine:
    if engine == "views":
        return ViewsEngine()
    if engine == "fhiry":
        return FhiryEngine()
    raise FlattenError(f"unknown flatten engine {engine!r} (choose one of: {', '.join(ENGINES)})")


def flatten_sources(sources: list[_Source], bundles: bool = False, engine: str = "views") -> FlattenResult:
    """Check every item, flatten the valid ones with `engine`, derive and harmonize the tables."""
    flattener = make_engine(engine)
    ledger = _Ledger()
    with _no_cyclic_gc():
        for source in sources:
            stats = ledger.open(source)
            items = _bundle_items(source.path) if bundles else _ndjson_items(source.path)
            for lineno, resource, error in items:
                reason = error or check_resource(resource, source.expected_type)
                rtype = resource.get("resourceType") if isinstance(resource, dict) else None
                rid = resource.get("id") if reason is None else None
                if ledger.admit(stats, lineno, reason, rtype, rid):
                    flattener.add(rtype, resource)  # type: ignore[arg-type]
    return _finish(flattener, ledger)


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while reading: the loop allocates millions of containers
    (parsed JSON, row tuples) that form no cycles, and the collections it would trigger mostly
    re-scan the growing list of rows. Reference counting still frees everything as usual."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Ledger:
    """Line accounting shared by both runners: every line is a resource or quarantined, ids are
    unique per type (the first occurrence, in file and line order, wins), other types are ignored."""

    def __init__(self) -> None:
        self.quarantine: list[dict[str, Any]] = []
        self.files: list[dict[str, Any]] = []
        self.seen_ids: dict[str, set[str]] = {t: set() for t in TABLE_OF_TYPE}

    def open(self, source: _Source) -> dict[str, Any]:
        stats = {"file": source.path.name, "type": source.expected_type, "lines": 0, "resources": 0,
                 "quarantined": 0, "ignored_types": 0}
        self.files.append(stats)
        return stats

    def admit(self, stats: dict[str, Any], lineno: int, reason: str | None, rtype: str | None,
              rid: Any) -> bool:
        """Count one line; True when its resource belongs in a table."""
        stats["lines"] += 1
        seen = self.seen_ids.get(rtype)  # type: ignore[arg-type]
        if reason is None and seen is not None and rid in seen:
            reason = f"duplicate {rtype} id {rid}"
        if reason:
            self.quarantine.append({"file": stats["file"], "line": lineno, "reason": reason})
            stats["quarantined"] += 1
            return False
        stats["resources"] += 1
        if seen is None:
            stats["ignored_types"] += 1  # counted as read; not part of the tidy tables
            return False
        seen.add(rid)
        return True


def _finish(flattener: FhiryEngine | ViewsEngine, ledger: _Ledger) -> FlattenResult:
    tables = {}
    for rtype, frame in flattener.frames().items():
        table = TABLE_OF_TYPE[rtype]
        tables[table] = frame if frame is not None else pd.DataFrame(
            {c: pd.Series(dtype="object") for c in SCHEMAS[table].names})
    tables["observation"], units = harmonize_observations(tables["observation"])
    for table in tables:
        tables[table] = _conform(tables[table], SCHEMAS[table])
    return FlattenResult(tables, ledger.quarantine, ledger.files, units)


# ---- runner `spark`: the views engine on a Spark session ---------------------------------
#
# Executors read the NDJSON (`textFile`, gzip by extension, lines split as Python splits them),
# parse, check and run the compiled ViewDefinitions per line, so malformed lines are quarantined
# there too. What needs the whole site in file order, the duplicate-id rule and the accounting,
# runs on the driver over the collected per-line records (a few fields and the flat rows, far
# smaller than the JSON), followed by the same derivation, harmonization and Parquet writing as
# the pandas runner, so both runners write identical tables.

def _ndjson_sources(paths: list[Path], types: dict[str, str] | None) -> list[_Source]:
    """Each NDJSON input with its expected resource type; a missing file is an error."""
    types = types or {}
    sources = [_Source(Path(p), types.get(Path(p).name) or _type_from_name(Path(p).name)) for p in paths]
    for source in sources:
        if not source.path.is_file():
            raise FlattenError(f"NDJSON input not found: {source.path}")
    return sources


def flatten_ndjson_spark(spark: SparkSession, paths: list[Path], types: dict[str, str] | None = None
                         ) -> FlattenResult:
    """`flatten_ndjson` with the views engine, the per-line work done by Spark executors."""
    from fedlab.views import load_definitions
    from fedlab.views.spark import use_driver_python_locally

    sources = _ndjson_sources(paths, types)
    definitions = load_definitions()
    engine = ViewsEngine(definitions)
    ledger = _Ledger()
    if not sources:
        return _finish(engine, ledger)
    use_driver_python_locally(spark)
    context = spark.sparkContext
    parts = [context.textFile(str(source.path.resolve())).mapPartitionsWithIndex(
        functools.partial(_spark_lines, index, source.expected_type, definitions))
        for index, source in enumerate(sources)]
    try:
        records = context.union(parts).collect()
    except Exception as error:  # py4j / PythonException: name the input instead of a JVM trace
        message = str(error).strip().splitlines()
        raise FlattenError(f"Spark could not flatten {', '.join(str(s.path) for s in sources)}: "
                           f"{message[-1] if message else type(error).__name__}") from None
    records, last_line = _number_lines(records)
    stats = [ledger.open(source) for source in sources]
    for file_index, lineno, reason, rtype, rid, rows in records:
        if isinstance(reason, tuple):  # malformed JSON: the message depends on a final newline
            reason = reason[1] if lineno == last_line[file_index] and not _ends_with_newline(
                sources[file_index].path) else reason[0]
        if ledger.admit(stats[file_index], lineno, reason, rtype, rid):
            engine.add_rows(rtype, rows)
    return _finish(engine, ledger)


def _spark_lines(file_index: int, expected_type: str | None, definitions: dict[str, dict[str, Any]],
                 partition: int, lines: Iterable[str]) -> Iterator[tuple]:
    """On an executor: (file, partition, line in partition, reason, resourceType, id, rows) per
    non-blank line, then (file, partition, None, line count) so the driver can number the lines
    (`zipWithIndex` would cost one extra Spark job per file)."""
    engine = ViewsEngine(definitions)  # views compile once per Python worker (compile_view caches)
    count = 0
    for local, text in enumerate(lines):
        count += 1
        if partition == 0 and local == 0:
            text = text.removeprefix("\ufeff")  # a byte-order mark, as the pandas runner's utf-8-sig
        if not text or text.isspace():
            continue
        try:
            resource = _loads_line(text)
        except json.JSONDecodeError:
            # The pandas runner reads lines with their newline, which moves some error positions:
            # keep both messages; the driver knows which line is the file's last.
            yield file_index, partition, local, (_json_error(text + "\n"), _json_error(text)), None, None, None
            continue
        reason = check_resource(resource, expected_type)
        if reason:
            yield file_index, partition, local, reason, None, None, None
            continue
        rtype = resource.get("resourceType")
        rows = engine.rows_of(rtype, resource) if rtype in TABLE_OF_TYPE else None
        yield file_index, partition, local, None, rtype, resource.get("id"), rows
    yield file_index, partition, None, count, None, None, None


def _number_lines(records: list[tuple]) -> tuple[list[tuple], dict[int, int]]:
    """(file, line number, reason, resourceType, id, rows) in file and line order, and the number
    of lines of each file."""
    counts = {(r[0], r[1]): r[3] for r in records if r[2] is None}
    offsets: dict[tuple[int, int], int] = {}
    running: dict[int, int] = {}
    for file_index, partition in sorted(counts):
        offsets[(file_index, partition)] = running.get(file_index, 0)
        running[file_index] = running.get(file_index, 0) + counts[(file_index, partition)]
    numbered = [(r[0], offsets[(r[0], r[1])] + r[2] + 1, *r[3:]) for r in records if r[2] is not None]
    numbered.sort(key=lambda record: (record[0], record[1]))
    return numbered, running


def _loads_line(text: str) -> Any:
    """orjson where it accepts the line, else json (which then decides what the value or error is)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _json_error(text: str) -> str:
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        return f"malformed JSON: {err.msg} at column {err.colno}"
    return "malformed JSON"


def _ends_with_newline(path: Path) -> bool:
    if path.suffix == ".gz":
        tail = b""
        with gzip.open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                tail = block[-1:]
        return tail in (b"\n", b"\r")
    with path.open("rb") as handle:
        handle.seek(0, 2)
        if handle.tell() == 0:
            return False
        handle.seek(-1, 2)
        return handle.read(1) in (b"\n", b"\r")


def _conform(frame: pd.DataFrame, schema: pa.Schema) -> pd.DataFrame:
    """Exactly the contract's columns, in order, timestamps as UTC microseconds, nulls as None."""
    frame = frame[schema.names].copy()
    for fld in schema:
        if pa.types.is_timestamp(fld.type):
            if str(frame[fld.name].dtype) != "datetime64[us, UTC]":  # else already what this gives
                frame[fld.name] = pd.to_datetime(frame[fld.name], utc=True).astype("datetime64[us, UTC]")
        elif pa.types.is_floating(fld.type):
            frame[fld.name] = pd.to_numeric(frame[fld.name], errors="coerce").astype("float64")
        elif pa.types.is_string(fld.type):
            column = frame[fld.name].astype("object")
            frame[fld.name] = column.where(column.notna(), None)
    return frame.reset_index(drop=True)


def flatten_ndjson(paths: list[Path], types: dict[str, str] | None = None, engine: str = "views") -> FlattenResult:
    """Flatten typed NDJSON files; `types` maps a file name to its resource type (from the manifest)."""
    types = types or {}
    sources = [_Source(Path(p), types.get(Path(p).name) or _type_from_name(Path(p).name)) for p in paths]
    return flatten_sources(sources, engine=engine)


def flatten_bundles(paths: Iterable[str | Path], engine: str = "views") -> dict[str, pd.DataFrame]:
    """Flatten FHIR bundles (Synthea transaction bundles, `urn:uuid:` references; `.json[.gz]`)."""
    return flatten_bundles_result(paths, engine).tables


def flatten_bundles_result(paths: Iterable[str | Path], engine: str = "views") -> FlattenResult:
    sources = [_Source(Path(p), None) for p in sorted(Path(p) for p in paths)]
    return flatten_sources(sources, bundles=True, engine=engine)


def _type_from_name(name: str) -> str:
    return name.split(".", 1)[0]


def export_files(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """Files to read from an export folder: the manifest's `files` list, else every *.ndjson(.gz)."""
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        try:
            manifest = read_json(manifest_path)
        except json.JSONDecodeError as err:
            raise FlattenError(f"{manifest_path}: not valid JSON: {err}") from None
        entries = manifest.get("files")
        if not isinstance(entries, list):
            raise FlattenError(f"{manifest_path}: no 'files' list")
        paths, types = [], {}
        for entry in entries:
            name = entry.get("name") or entry.get("file") or entry.get("path")
            if not name:
                raise FlattenError(f"{manifest_path}: a 'files' entry has no name: {entry}")
            path = folder / Path(name).name
            if not path.is_file():
                raise FlattenError(f"{manifest_path}: lists {name}, which is not in {folder}")
            paths.append(path)
            if entry.get("type"):
                types[path.name] = entry["type"]
        return paths, types
    paths = sorted(p for p in folder.iterdir() if p.name.endswith((".ndjson", ".ndjson.gz")))
    if not paths:
        raise FlattenError(f"{folder}: no manifest.json and no *.ndjson files")
    return paths, {}


# ---- runner `spark-distributed`: the rows stay on the executors --------------------------------
#
# The same `_spark_lines` records as runner `spark`, kept (persisted) on the executors. The driver
# collects only one summary per (file, partition): its line count, its quarantined lines and its
# count of ignored types; line numbers are then partition offsets plus the line's place in its
# partition. The duplicate-id rule (first occurrence in file and line order wins among lines that
# pass the checks) is a combineByKey over (resourceType, id) -> (file, partition, line in partition),
# which orders exactly as (file, line) does; only the losers reach the driver and come back as a
# broadcast set. Each table's admitted rows then go, in pickled chunks, through `mapInPandas` running
# the pandas runner's own `_finish` (derivation, harmonization, `_conform`), and Spark writes the
# result as a Parquet dataset. The report counts are aggregated by Spark from the written datasets.

ROWS_PER_CHUNK = 20_000


@dataclass
class DistributedResult:
    """What the driver holds after `flatten_ndjson_spark_distributed`: no table rows."""

    report: dict[str, Any]  # the content of harmonization.json
    quarantine: list[dict[str, Any]]
    counts: dict[str, int]  # rows per table


def flatten_ndjson_spark_distributed(spark: SparkSession, paths: list[Path], types: dict[str, str] | None,
                                     folder: Path) -> DistributedResult:
    """Flatten typed NDJSON files on Spark executors into `folder/<table>.parquet/` (Parquet datasets,
    one part file per non-empty partition; `folder` should be a staging folder that is renamed into
    place when complete). Same rows, harmonization report and quarantine as `flatten_ndjson`."""
    from pyspark import StorageLevel

    from fedlab.views import load_definitions
    from fedlab.views.spark import use_driver_python_locally

    sources = _ndjson_sources(paths, types)
    definitions = load_definitions()
    use_driver_python_locally(spark)
    context = spark.sparkContext
    # One persisted RDD per file: the accounting jobs read them all, each table only its own files.
    per_file = [context.textFile(str(source.path.resolve())).mapPartitionsWithIndex(
        functools.partial(_spark_lines, index, source.expected_type, definitions)).persist(
        StorageLevel.MEMORY_AND_DISK) for index, source in enumerate(sources)]
    excluded = None
    try:
        records = context.union(per_file) if per_file else context.emptyRDD()
        collected = _spark_job(sources, lambda: _accounting(records, context.defaultParallelism).collect())
        summaries = [value for kind, value in collected if kind == "summary"]
        duplicates = [value for kind, value in collected if kind == "duplicate"]
        quarantine, files = _distributed_accounting(sources, summaries, duplicates)
        excluded = context.broadcast({position for position, _ in duplicates})
        counts, tables = {}, {}
        for rtype, table in TABLE_OF_TYPE.items():
            # A typed file's admitted lines all have its type (other types are quarantined).
            own = [rdd for rdd, source in zip(per_file, sources, strict=True)
                   if source.expected_type in (rtype, "", None)]
            rows = context.union(own) if own else context.emptyRDD()
            path = folder / f"{table}.parquet"
            _spark_job(sources, lambda rtype=rtype, rows=rows, path=path: _write_dataset(
                spark, rows, rtype, definitions, excluded, path))
            tables[table] = _spark_job(sources, lambda table=table, path=path: _table_counts(spark, table, path))
            counts[table] = tables[table]["rows"]
    finally:
        for rdd in per_file:
            rdd.unpersist()
        if excluded is not None:
            excluded.unpersist()
    units = tables["observation"].pop("units_seen")
    report = _report(tables, files, units, len(quarantine))
    return DistributedResult(report, quarantine, counts)


def _spark_job(sources: list[_Source], job: Callable[[], Any]) -> Any:
    try:
        return job()
    except Exception as error:  # py4j / PythonException: name the input instead of a JVM trace
        message = str(error).strip().splitlines()
        raise FlattenError(f"Spark could not flatten {', '.join(str(s.path) for s in sources)}: "
                           f"{message[-1] if message else type(error).__name__}") from None


def _accounting(records: Any, partitions: int) -> Any:
    """One job over the persisted records: ("summary", (file, partition, lines incl. blank, non-blank
    lines, ignored types, [(line in partition, reason)] of the lines that failed the checks)) per
    partition, and ("duplicate", ((file, partition, line in partition), reason)) for every checked
    line whose (type, id) an earlier line already took. Summaries ride the same shuffle under keys
    no resource has (None instead of a type), so the records are read once."""
    keyed = records.mapPartitions(_keyed_lines)
    merged = keyed.combineByKey(_first_seen, _add_seen, _merge_seen, partitions)
    return merged.flatMap(_accounting_output)


def _keyed_lines(records: Iterable[tuple]) -> Iterator[tuple]:
    """On an executor: ((type, id key), (position, id)) per line that passed the checks
    and belongs in a table, then (None, (file, partition)) -> this partition's summary."""
    key, count, non_blank, ignored, failed = None, 0, 0, 0, []
    for file_index, partition, local, reason, rtype, rid, _rows in records:
        if local is None:
            key, count = (file_index, partition), reason
            continue
        non_blank += 1
        if reason is not None:
            failed.append((local, reason))
        elif rtype not in TABLE_OF_TYPE:
            ignored += 1
        else:
            yield (rtype, _id_key(rid)), ((file_index, partition, local), rid)
    if key is not None:
        yield (None, key), ((*key, count, non_blank, ignored, failed), None)


def _accounting_output(item: tuple) -> list[tuple]:
    (rtype, _), (first, later) = item
    if rtype is None:
        return [("summary", first[0])]
    return [("duplicate", (position, f"duplicate {rtype} id {rid}")) for position, rid in later]


def _id_key(rid: Any) -> Any:
    # The ledger compares ids with Python equality; ids are strings in practice, anything else is
    # compared by its JSON text (type-tagged so that 1 and "1" stay different ids).
    return rid if type(rid) is str else ("json", json.dumps(rid, sort_keys=True))


def _first_seen(entry: tuple) -> tuple:
    return entry, []


def _add_seen(seen: tuple, entry: tuple) -> tuple:
    first, later = seen
    return (entry, [*later, first]) if entry[0] < first[0] else (first, [*later, entry])


def _merge_seen(left: tuple, right: tuple) -> tuple:
    first, later = left if left[0][0] < right[0][0] else right
    other = right if first is left[0] else left
    return first, [*later, other[0], *other[1]]


def _distributed_accounting(sources: list[_Source], summaries: list[tuple], duplicates: list[tuple]
                            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The quarantine records in file and line order, and the per-file line accounting, exactly as
    `_Ledger` gives them."""
    offsets: dict[tuple[int, int], int] = {}
    last_line: dict[int, int] = {}
    for file_index, partition, count, *_ in sorted(summaries, key=lambda s: (s[0], s[1])):
        offsets[(file_index, partition)] = last_line.get(file_index, 0)
        last_line[file_index] = last_line.get(file_index, 0) + count
    bad = [(f, offsets[(f, p)] + local + 1, reason) for f, p, *_, failed in summaries for local, reason in failed]
    bad += [(f, offsets[(f, p)] + local + 1, reason) for (f, p, local), reason in duplicates]
    quarantine = []
    for file_index, lineno, reason in sorted(bad, key=lambda b: (b[0], b[1])):
        if isinstance(reason, tuple):  # malformed JSON: the message depends on a final newline
            reason = reason[1] if lineno == last_line[file_index] and not _ends_with_newline(
                sources[file_index].path) else reason[0]
        quarantine.append({"file": sources[file_index].path.name, "line": lineno, "reason": reason})
    files = []
    for index, source in enumerate(sources):
        lines = sum(s[3] for s in summaries if s[0] == index)
        quarantined = sum(len(s[5]) for s in summaries if s[0] == index) + sum(
            1 for (f, _, _), _ in duplicates if f == index)
        files.append({"file": source.path.name, "type": source.expected_type, "lines": lines,
                      "resources": lines - quarantined, "quarantined": quarantined,
                      "ignored_types": sum(s[4] for s in summaries if s[0] == index)})
    return quarantine, files


def spark_schema(schema: pa.Schema) -> Any:
    """The Spark schema of a table contract (strings, dates, UTC timestamps, doubles)."""
    from pyspark.sql.types import DateType, DoubleType, StringType, StructField, StructType, TimestampType

    def spark_type(arrow_type: pa.DataType) -> Any:
        if pa.types.is_string(arrow_type):
            return StringType()
        if pa.types.is_date32(arrow_type):
            return DateType()
        if pa.types.is_timestamp(arrow_type):
            return TimestampType()
        if pa.types.is_float64(arrow_type):
            return DoubleType()
        raise FlattenError(f"no Spark type for {arrow_type} in the table contract")

    return StructType([StructField(f.name, spark_type(f.type), nullable=True) for f in schema])


def _write_dataset(spark: SparkSession, records: Any, rtype: str, definitions: dict[str, dict[str, Any]],
                   excluded: Any, path: Path) -> None:
    from pyspark.sql.types import BinaryType, StructField, StructType

    chunks = records.mapPartitions(functools.partial(_admitted_chunks, rtype, excluded))
    frame = spark.createDataFrame(chunks, StructType([StructField("chunk", BinaryType(), False)]))
    table = frame.mapInPandas(functools.partial(_derive_chunks, rtype, definitions),
                              schema=spark_schema(SCHEMAS[TABLE_OF_TYPE[rtype]]))
    table.write.parquet(str(path))


def _admitted_chunks(rtype: str, excluded: Any, records: Iterable[tuple]) -> Iterator[tuple[bytes]]:
    """On an executor: the view rows of this partition's admitted `rtype` lines, pickled in chunks."""
    import pickle

    skip = excluded.value
    rows: list[tuple] = []
    for file_index, partition, local, reason, line_type, _rid, line_rows in records:
        if local is None or reason is not None or line_type != rtype or (file_index, partition, local) in skip:
            continue
        rows.extend(line_rows)
        if len(rows) >= ROWS_PER_CHUNK:
            yield (pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL),)
            rows = []
    if rows:
        yield (pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL),)


def _derive_chunks(rtype: str, definitions: dict[str, dict[str, Any]], batches: Iterable[pd.DataFrame]
                   ) -> Iterator[pd.DataFrame]:
    """On an executor: each chunk of view rows through the pandas runner's derivation, harmonization
    and `_conform` (`_finish` over an engine holding only this chunk)."""
    import pickle

    engine = ViewsEngine(definitions)
    for batch in batches:
        for chunk in batch["chunk"]:
            engine.rows = {name: [] for name in TABLE_OF_TYPE}
            engine.add_rows(rtype, pickle.loads(chunk))
            yield _finish(engine, _Ledger()).tables[TABLE_OF_TYPE[rtype]]


def _table_counts(spark: SparkSession, table: str, path: Path) -> dict[str, Any]:
    """Rows, flags (and for observations the units seen per concept) of a written dataset, counted
    as `FlattenResult.harmonization` counts them."""
    from pyspark.sql import functions as F

    frame = spark.read.schema(spark_schema(SCHEMAS[table])).parquet(str(path))
    if table == "observation":
        unit_seen = F.when(F.col("concept").isNotNull(),
                           F.coalesce(F.when(F.col("unit") != "", F.col("unit")), F.lit("(none)")))
        groups = frame.groupBy("flag", "concept", unit_seen.alias("unit_seen")).count().collect()
    elif table == "condition":
        groups = frame.groupBy("flag").count().collect()
    elif table == "medication_request":
        flag = F.when(F.col("concept").isNotNull(), "ok").otherwise("unknown_code")
        groups = frame.groupBy(flag.alias("flag")).count().collect()
    else:
        return {"rows": frame.count()}
    entry: dict[str, Any] = {"rows": sum(g["count"] for g in groups)}
    flags = Counter()
    for group in groups:
        flags[group["flag"]] += group["count"]
    entry["flags"] = {flag: int(flags.get(flag, 0)) for flag in hz.FLAGS}
    if table == "observation":
        units: dict[str, dict[str, int]] = {}
        for group in groups:
            if group["concept"] is not None:
                seen = units.setdefault(group["concept"], {})
                seen[group["unit_seen"]] = seen.get(group["unit_seen"], 0) + group["count"]
        entry["units_seen"] = units
    return entry


def _report(tables: dict[str, Any], files: list[dict[str, Any]], units: dict[str, dict[str, int]],
            quarantined: int) -> dict[str, Any]:
    """harmonization.json, shaped as `FlattenResult.harmonization` shapes it."""
    lines = sum(f["lines"] for f in files)
    accepted = sum(f["resources"] for f in files)
    return {"tables": tables, "files": files, "units_seen": units,
            "reconciliation": {"lines": lines, "resources": accepted, "quarantined": quarantined,
                               "balanced": lines == accepted + quarantined}}


# ---- writing ------------------------------------------------------------------------------

def _to_arrow(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pandas(frame, schema=schema, preserve_index=False)


def write_tables(result: FlattenResult, out: Path, info: dict[str, Any]) -> Path:
    """Write the tables, harmonization.json and quarantine.ndjson atomically, `_SUCCESS.json` last."""
    started = time.perf_counter()
    with staging_dir(out) as tmp:
        for table, frame in result.tables.items():
            pq.write_table(_to_arrow(frame, SCHEMAS[table]), tmp / f"{table}.parquet")
        counts = {table: len(frame) for table, frame in result.tables.items()}
        _write_reports(tmp, result.harmonization(), result.quarantine, counts, info, started)
    return out


def _write_reports(folder: Path, report: dict[str, Any], quarantine: list[dict[str, Any]],
                   counts: dict[str, int], info: dict[str, Any], started: float) -> None:
    write_json(folder / "harmonization.json", report)
    with atomic_open(folder / "quarantine.ndjson", "w", encoding="utf-8") as handle:
        for row in quarantine:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
    write_json(folder / SUCCESS, {"stage": "flatten", **info, "counts": counts, "quarantined": len(quarantine),
                                  "write_seconds": round(time.perf_counter() - started, 3),
                                  "finished": dt.datetime.now(dt.UTC).isoformat()})


Runner = Literal["pandas", "spark", "spark-distributed"]
SPARK_RUNNERS: tuple[str, ...] = ("spark", "spark-distributed")


def flatten_site(folder: Path, out: Path, site: str | None = None, engine: str = "views",
                 spark: SparkSession | None = None, runner: Runner | None = None) -> Path:
    """Flatten one export folder into `out`; with `spark`, the views engine runs on that session
    (`runner` "spark", the default then, or "spark-distributed")."""
    runner = runner or ("spark" if spark is not None else "pandas")
    if not folder.is_dir():
        raise FlattenError(f"export folder not found: {folder}" + (f" (site {site})" if site else "")
                           + "; run `fedlab export` first")
    if runner in SPARK_RUNNERS and engine != "views":
        raise FlattenError(f"flatten.runner {runner!r} runs the views engine only, not {engine!r}")
    if runner in SPARK_RUNNERS and spark is None:
        raise FlattenError(f"flatten.runner {runner!r} needs a Spark session")
    started = time.perf_counter()
    paths, types = export_files(folder)
    info = {"site": site, "engine": engine, "runner": runner, "source": str(folder)}
    if runner == "spark-distributed":
        with staging_dir(out) as tmp:
            result = flatten_ndjson_spark_distributed(spark, paths, types, tmp)  # type: ignore[arg-type]
            info["seconds"] = round(time.perf_counter() - started, 3)
            _write_reports(tmp, result.report, result.quarantine, result.counts, info, time.perf_counter())
        return out
    result = flatten_ndjson_spark(spark, paths, types) if runner == "spark" else flatten_ndjson(paths, types, engine)
    info["seconds"] = round(time.perf_counter() - started, 3)
    return write_tables(result, out, info)


def flatten(exp: Experiment, run: str | None = None, sites: list[str] | None = None, force: bool = False,
            progress: bool = True) -> dict[str, Path]:
    """Flatten each site's export into `data/tables/<run>/<site>/` with `exp.flatten.engine`;
    complete folders are kept unless force."""
    site_ids = sites or exp.site_ids
    for site in site_ids:
        exp.site(site)  # unknown site -> ConfigError naming the config
    engine, runner = exp.flatten.engine, exp.flatten.runner
    if runner in SPARK_RUNNERS and engine != "views":
        raise FlattenError(f"flatten.runner {runner!r} runs the views engine only; flatten.engine is {engine!r}")
    missing = [s for s in site_ids if not exp.data_path("export", run, s).is_dir()]
    if missing:
        raise FlattenError(f"no export of site(s) {', '.join(missing)} in {exp.data_path('export', run)}; "
                           f"run `fedlab export --config {exp.source or 'CONFIG'}` first")
    spark = None
    outputs: dict[str, Path] = {}
    iterator: Iterable[str] = site_ids
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(site_ids, desc=f"flatten ({engine})", unit="site")
    for site in iterator:
        out = exp.data_path("tables", run, site)
        if is_complete(out) and not force and _made_by(out, engine):
            outputs[site] = out
            continue
        if runner in SPARK_RUNNERS and spark is None:
            from fedlab.spark import get_spark

            spark = get_spark(exp)  # one session for every site
        outputs[site] = flatten_site(exp.data_path("export", run, site), out, site, engine, spark, runner)
    record_written(exp, run, "flatten")
    return outputs


def _made_by(out: Path, engine: str) -> bool:
    """Whether a complete tables folder was written by `engine` (older folders name none: fhiry)."""
    try:
        return read_json(out / SUCCESS).get("engine", "fhiry") == engine
    except (OSError, ValueError):
        return False
