"""A flatten engine of your own: plain dictionary lookups over FHIR R4 resources.

Name it in the YAML config (a path relative to the project root, then the class):

    flatten:
      engine: docs/examples/plain_engine.py:PlainEngine

fedlab hands it every resource that passed the line checks and is not a duplicate, one at a time;
it answers with the rows of that resource, as tuples in the raw columns of
`fedlab.flatten.contract.RAW_COLUMNS`. fedlab then does the rest, as for its own engines: dates,
race and ethnicity labels, condition concepts, drug classes, unit harmonization, quarantine,
`harmonization.json` and the Parquet files. Being a `RowEngine` (one resource at a time), it also
runs on the Spark runners.

It reads the shapes Synthea writes (R4); fedlab's `views` engine reads many more.
"""

from __future__ import annotations

from typing import Any

from fedlab.flatten.engines import RowEngine

LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-"


def reference_id(reference: dict[str, Any] | None) -> str | None:
    """`Patient/123` or `urn:uuid:123` -> `123`."""
    text = (reference or {}).get("reference") or ""
    return text.rsplit("/", 1)[-1].removeprefix("urn:uuid:") or None


def first_coding(concept: dict[str, Any] | None, system: str | None = None) -> dict[str, Any]:
    """The first coding with a code (in `system`, when given), or {}."""
    for coding in (concept or {}).get("coding", []):
        if coding.get("code") and (system is None or coding.get("system") == system):
            return coding
    return {}


def omb_category(patient: dict[str, Any], kind: str) -> str | None:
    """The OMB category code of US Core's race or ethnicity extension."""
    for extension in patient.get("extension", []):
        if extension.get("url") == US_CORE + kind:
            for part in extension.get("extension", []):
                if part.get("url") == "ombCategory":
                    return part["valueCoding"]["code"]
    return None


def quantity(element: dict[str, Any]) -> tuple[Any, Any]:
    value = element.get("valueQuantity") or {}
    return value.get("value"), value.get("code") or value.get("unit")


class PlainEngine(RowEngine):
    name = "plain"

    def rows_of(self, resource_type: str, r: dict[str, Any]) -> list[tuple]:
        patient, encounter = reference_id(r.get("subject")), reference_id(r.get("encounter"))
        if resource_type == "Patient":
            return [(r["id"], r.get("birthDate"), r.get("gender"), omb_category(r, "race"),
                     omb_category(r, "ethnicity"), r.get("deceasedDateTime"))]
        if resource_type == "Encounter":
            period = r.get("period") or {}
            return [(r["id"], patient, (r.get("class") or {}).get("code"),
                     first_coding((r.get("type") or [{}])[0]).get("code"), period.get("start"), period.get("end"))]
        if resource_type == "Condition":
            coding = first_coding(r.get("code"))
            return [(r["id"], patient, encounter, coding.get("system"), coding.get("code"),
                     r.get("onsetDateTime") or r.get("recordedDate"), r.get("abatementDateTime"))]
        if resource_type == "Observation":
            effective = r.get("effectiveDateTime") or r.get("issued")
            parts = r.get("component") or [r]  # a panel gives one row per component
            rows = []
            for part in parts:
                loinc = first_coding(part.get("code"), LOINC).get("code")
                row_id = f"{r['id']}-{loinc}" if part is not r else r["id"]
                rows.append((row_id, patient, encounter, effective, loinc, *quantity(part)))
            return rows
        if resource_type == "MedicationRequest":
            rxnorm = first_coding(r.get("medicationCodeableConcept"), RXNORM).get("code")
            return [(r["id"], patient, encounter, r.get("authoredOn"), rxnorm, r.get("status"))]
        return []
