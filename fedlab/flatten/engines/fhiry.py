"""Engine `fhiry`: fhiry's DataFrame path, the raw columns read from fhiry's wide frame.

Resources go to `fhiry.Fhiry.process_bundle_dict` in chunks, wrapped in synthetic collection
bundles (fhiry's NDJSON reader is quadratic and its folder mode blanks code columns, so neither is
used). fhiry keeps the raw `coding` lists beside its "a, b" code strings, so each code keeps its
system. Observations with components become one row per component.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from fedlab.flatten.checks import get_keys
from fedlab.flatten.contract import TABLE_OF_TYPE
from fedlab.flatten.derive import LOINC, RXNORM, US_CORE_ETHNICITY, US_CORE_RACE, component_row_id, ref_id
from fedlab.flatten.engines import Engine

CHUNK_SIZE = 2000


def run_fhiry(resources: list[dict[str, Any]]) -> pd.DataFrame:
    """One fhiry pass over resources wrapped in a synthetic collection bundle."""
    import fhiry

    flattener = fhiry.Fhiry()
    # Keep raw `coding` lists beside fhiry's "a, b" code strings: the system of each code is needed.
    flattener.delete_col_raw_coding = False
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}
    frame = flattener.process_bundle_dict(bundle)
    return frame.reset_index(drop=True)


class FhiryEngine(Engine):
    """Resources in, raw frames out, through fhiry in chunks."""

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
                self.parts[str(rtype)].append(RAW[str(rtype)](sub.reset_index(drop=True)))
            self.chunk.clear()

    def frames(self) -> dict[str, pd.DataFrame | None]:
        self._flush()
        out: dict[str, pd.DataFrame | None] = {}
        for rtype, parts in self.parts.items():
            frames = [p for p in parts if len(p)]
            out[rtype] = pd.concat(frames, ignore_index=True) if frames else None
        return out


# ---- fhiry's wide columns -> the raw columns ---------------------------------------------------

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


def _patients(frame: pd.DataFrame) -> pd.DataFrame:
    extensions = _col(frame, "extension")
    return pd.DataFrame({
        "patient_id": _col(frame, "id"),
        "birth_date": _col(frame, "birthDate"),
        "gender": _col(frame, "gender"),
        "race": extensions.map(lambda e: _omb_code(e, US_CORE_RACE)),
        "ethnicity": extensions.map(lambda e: _omb_code(e, US_CORE_ETHNICITY)),
        "deceased": _col(frame, "deceasedDateTime"),
    })


def _encounters(frame: pd.DataFrame) -> pd.DataFrame:
    # R4 `class` is a Coding (fhiry: `class.code`); R5 `class` is a list of CodeableConcepts.
    class_code = _col(frame, "class.code")
    if "class" in frame:
        class_code = class_code.where(class_code.notna(), frame["class"].map(_first_concept_code))
    return pd.DataFrame({
        "encounter_id": _col(frame, "id"),
        "patient_id": _col(frame, "patientId").map(ref_id),
        "class_code": class_code.where(class_code.notna(), None),
        "type_code": _col(frame, "type").map(_first_concept_code),
        "start": _col(frame, "period.start", "actualPeriod.start"),
        "end": _col(frame, "period.end", "actualPeriod.end"),
    })


def _conditions(frame: pd.DataFrame) -> pd.DataFrame:
    picked = _col(frame, "code.coding").map(_first_coding)
    return pd.DataFrame({
        "condition_id": _col(frame, "id"),
        "patient_id": _col(frame, "patientId").map(ref_id),
        "encounter_id": _col(frame, "encounter.reference").map(ref_id),
        "system": picked.map(lambda p: p[0]),
        "code": picked.map(lambda p: p[1]),
        "onset": _col(frame, "onsetDateTime", "onsetPeriod.start", "recordedDate"),
        "abatement": _col(frame, "abatementDateTime", "abatementPeriod.start"),
    })


def _observations(frame: pd.DataFrame) -> pd.DataFrame:
    base = pd.DataFrame({
        "observation_id": _col(frame, "id"),
        "patient_id": _col(frame, "patientId").map(ref_id),
        "encounter_id": _col(frame, "encounter.reference").map(ref_id),
        "effective": _col(frame, "effectiveDateTime", "effectivePeriod.start", "effectiveInstant", "issued"),
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
            code = _first_coding(get_keys(comp, ["code", "coding"]), LOINC)[1]
            quantity = comp.get("valueQuantity") if isinstance(comp.get("valueQuantity"), dict) else {}
            rows.append({**panel, "observation_id": component_row_id(panel["observation_id"], code, index),
                         "loinc": code, "value": quantity.get("value"),
                         "unit": quantity.get("code") or quantity.get("unit")})
    out = pd.DataFrame(rows, columns=panels.columns)
    out["value"] = pd.to_numeric(out["value"], errors="coerce")
    return out


def _medication_requests(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "medication_request_id": _col(frame, "id"),
        "patient_id": _col(frame, "patientId").map(ref_id),
        "encounter_id": _col(frame, "encounter.reference").map(ref_id),
        "authored_on": _col(frame, "authoredOn"),
        "rxnorm": _col(frame, "medicationCodeableConcept.coding", "medication.concept.coding").map(
            lambda c: _first_coding(c, RXNORM)[1]),
        "status": _col(frame, "status"),
    })


RAW = {"Patient": _patients, "Encounter": _encounters, "Condition": _conditions, "Observation": _observations,
       "MedicationRequest": _medication_requests}
