"""Turn a simulated `Life` into Synthea-shaped FHIR R4 resources, bundles and bulk NDJSON lines.

Bundle mode: a `transaction` Bundle per patient, `fullUrl: urn:uuid:<id>`, `request {POST, Type}`,
patient-local references as `urn:uuid:<id>`, providers as Synthea's conditional references.
Bulk mode: the same resources one per line, every reference rewritten to `Type/id`.

Why one module: it is one mapping (a `Life` to Synthea's R4 shape), resource by resource in the
order Synthea's own exporter writes them, sharing its id, reference and coding rules.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fedlab.config import SiteConfig
from fedlab.synthea import codes
from fedlab.synthea.gmf.record import Entry
from fedlab.synthea.gmf.values import Code, from_millis
from fedlab.synthea.lifecycle import (
    ConditionEvent,
    Demographics,
    Encounter,
    Life,
    Measurement,
    MedicationEvent,
    exported_encounters,
)

Resource = dict[str, Any]
# All times are written with one fixed offset (US Eastern standard time): no time-zone database,
# so output never depends on the machine.
TZ_SUFFIX = "-05:00"


@dataclass(frozen=True)
class Practitioner:
    resource_id: str
    npi: str
    given: str
    family: str
    gender: str

    @property
    def display(self) -> str:
        return f"Dr. {self.given} {self.family}"

    @property
    def conditional_reference(self) -> str:
        return f"Practitioner?identifier={codes.NPI}|{self.npi}"


@dataclass(frozen=True)
class Providers:
    """The site's hospital and its clinicians (written once per site, referenced conditionally)."""

    organization_id: str
    name: str
    city: codes.City
    phone: str
    practitioners: tuple[Practitioner, ...]

    @property
    def organization_reference(self) -> str:
        return f"Organization?identifier={codes.SYNTHEA_ID}|{self.organization_id}"


# ---------------------------------------------------------------- small builders

def fhir_time(when: dt.datetime) -> str:
    return when.isoformat(timespec="seconds") + TZ_SUFFIX


def _coding(system: str, concept: codes.Concept | codes.Lab) -> dict[str, str]:
    return {"system": system, "code": concept.code, "display": concept.display}


@functools.cache
def _codeable(system: str, concept: codes.Concept | codes.Lab) -> dict[str, Any]:
    """Shared between resources (never mutated): building these dicts is a hot path."""
    return {"coding": [_coding(system, concept)], "text": concept.display}


def _ref(resource_id: str) -> dict[str, str]:
    return {"reference": f"urn:uuid:{resource_id}"}


def _quantity(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": codes.UCUM, "code": unit}


def _identifier_type(code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": codes.IDENTIFIER_TYPE, "code": code, "display": display}], "text": display}


# ---------------------------------------------------------------- Patient

def _omb_extension(kind: str, concept: codes.Concept) -> dict[str, Any]:
    return {
        "url": f"{codes.US_CORE}/us-core-{kind}",
        "extension": [
            {"url": "ombCategory", "valueCoding": {"system": codes.OMB_RACE, "code": concept.code,
                                                   "display": concept.display}},
            {"url": "text", "valueString": concept.display},
        ],
    }


def patient_resource(demo: Demographics, death: dt.datetime | None, mothers_maiden: str) -> Resource:
    ethnicity = codes.HISPANIC if demo.hispanic else codes.NOT_HISPANIC
    resource: Resource = {
        "resourceType": "Patient",
        "id": demo.patient_id,
        "extension": [
            _omb_extension("race", codes.RACES[demo.race]),
            _omb_extension("ethnicity", ethnicity),
            {"url": "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName",
             "valueString": mothers_maiden},
            {"url": f"{codes.US_CORE}/us-core-birthsex", "valueCode": demo.sex},
            {"url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
             "valueAddress": {"city": demo.city.name, "state": codes.STATE, "country": "US"}},
        ],
        "identifier": [
            {"system": codes.SYNTHEA_ID, "value": demo.patient_id},
            {"type": _identifier_type("MR", "Medical Record Number"),
             "system": "http://hospital.smarthealthit.org", "value": demo.patient_id},
            {"type": _identifier_type("SS", "Social Security Number"),
             "system": "http://hl7.org/fhir/sid/us-ssn", "value": demo.ssn},
            {"type": _identifier_type("DL", "Driver's License"),
             "system": "urn:oid:2.16.840.1.113883.4.3.25", "value": demo.drivers_license},
        ],
        "name": [{"use": "official", "family": demo.family, "given": [demo.given], "prefix": [demo.prefix]}],
        "telecom": [{"system": "phone", "value": demo.phone, "use": "home"}],
        "gender": "female" if demo.sex == "F" else "male",
        "birthDate": demo.birth_date.isoformat(),
    }
    if death is not None:
        resource["deceasedDateTime"] = fhir_time(death)
    resource["address"] = [{
        "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/geolocation", "extension": [
            {"url": "latitude", "valueDecimal": demo.latitude},
            {"url": "longitude", "valueDecimal": demo.longitude},
        ]}],
        "line": [demo.street], "city": demo.city.name, "state": codes.STATE,
        "postalCode": demo.city.postal_code, "country": "US",
    }]
    resource["maritalStatus"] = {"coding": [{"system": codes.MARITAL, "code": demo.marital,
                                             "display": demo.marital}], "text": demo.marital}
    resource["multipleBirthBoolean"] = False
    resource["communication"] = [{"language": {
        "coding": [{"system": "urn:ietf:bcp:47", "code": "en-US", "display": "English"}], "text": "English"}}]
    return resource


# ---------------------------------------------------------------- per-encounter resources

# The dosage of fedlab's own drugs: one a day.
_DAILY_DOSAGE: dict[str, Any] = {
    "sequence": 1,
    "timing": {"repeat": {"frequency": 1, "period": 1.0, "periodUnit": "d"}},
    "asNeededBoolean": False,
    "doseAndRate": [{"type": {"coding": [{
        "system": "http://terminology.hl7.org/CodeSystem/dose-rate-type",
        "code": "ordered", "display": "Ordered"}]}, "doseQuantity": {"value": 1.0}}],
}


class _PatientWriter:
    def __init__(self, life: Life, site: SiteConfig, providers: Providers) -> None:
        self.life, self.site, self.providers = life, site, providers
        demo = life.demographics
        self.subject = {**_ref(demo.patient_id), "display": f"{demo.prefix} {demo.given} {demo.family}"}
        self.patient_ref = _ref(demo.patient_id)

    def condition_code(self, concept: str) -> dict[str, Any]:
        snomed, icd10 = codes.CONDITIONS[concept]
        if self.site.condition_system == "icd10":
            return _codeable(codes.ICD10CM, icd10)
        return _codeable(codes.SNOMED, snomed)

    def encounter(self, enc: Encounter) -> Resource:
        act_class, concept = codes.ENCOUNTER_TYPES[enc.kind]
        practitioner = self.providers.practitioners[enc.practitioner]
        period = {"start": fhir_time(enc.start), "end": fhir_time(enc.end)}
        resource: Resource = {
            "resourceType": "Encounter", "id": enc.resource_id, "status": "finished",
            "class": {"system": codes.ACT_CODE, "code": act_class},
            "type": [_module_codeable(enc.type_codes) if enc.type_codes else _codeable(codes.SNOMED, concept)],
            "subject": self.subject,
            "participant": [{
                "type": [{"coding": [{"system": codes.PARTICIPATION, "code": "PPRF",
                                      "display": "primary performer"}], "text": "primary performer"}],
                "period": period,
                "individual": {"reference": practitioner.conditional_reference, "display": practitioner.display},
            }],
            "period": period,
        }
        if enc.reason is not None:
            resource["reasonCode"] = [self.condition_code(enc.reason.concept)]
        elif enc.other_reason is not None:
            resource["reasonCode"] = [_module_codeable(_reason_codes(enc.other_reason))]
        resource["serviceProvider"] = {"reference": self.providers.organization_reference,
                                       "display": self.providers.name}
        return resource

    def condition(self, event: ConditionEvent, enc: Encounter) -> Resource:
        return self.condition_resource(event.resource_id, self.condition_code(event.concept), event.onset,
                                       event.abatement, enc)

    def condition_resource(self, resource_id: str, code: dict[str, Any], onset: dt.datetime,
                           abatement: dt.datetime | None, enc: Encounter) -> Resource:
        resolved = abatement is not None and abatement <= self.life.end
        resource: Resource = {
            "resourceType": "Condition", "id": resource_id,
            "clinicalStatus": {"coding": [{"system": codes.CONDITION_CLINICAL,
                                           "code": "resolved" if resolved else "active"}]},
            "verificationStatus": {"coding": [{"system": codes.CONDITION_VERIFICATION, "code": "confirmed"}]},
            "category": [{"coding": [{"system": codes.CONDITION_CATEGORY, "code": "encounter-diagnosis",
                                      "display": "Encounter Diagnosis"}]}],
            "code": code,
            "subject": self.patient_ref,
            "encounter": _ref(enc.resource_id),
            "onsetDateTime": fhir_time(onset),
        }
        if resolved:
            resource["abatementDateTime"] = fhir_time(abatement)  # type: ignore[arg-type]
        resource["recordedDate"] = fhir_time(onset)
        return resource

    def _observation(self, resource_id: str, category: str | None, code: dict[str, Any], enc: Encounter,
                     when: str | None = None) -> Resource:
        """An Observation without its value; `when` defaults to the encounter's start."""
        when = when or fhir_time(enc.start)
        resource: Resource = {"resourceType": "Observation", "id": resource_id, "status": "final"}
        if category:
            resource["category"] = [{"coding": [{"system": codes.OBS_CATEGORY, "code": category,
                                                 "display": category}]}]
        resource.update({"code": code, "subject": self.patient_ref, "encounter": _ref(enc.resource_id),
                         "effectiveDateTime": when, "issued": when})
        return resource

    def measurement(self, m: Measurement, enc: Encounter) -> Resource:
        lab, value = m.lab, m.value
        if lab == codes.GLUCOSE_MGDL and self.site.glucose_unit == "mmol/L":
            # The site's unit is an export-time choice: modules record glucose in mg/dL.
            lab, value = codes.GLUCOSE_MMOL, value / codes.GLUCOSE_MG_PER_MMOL
        resource = self._observation(m.resource_id, m.category, _codeable(codes.LOINC, lab), enc)
        resource["valueQuantity"] = _quantity(value, lab.unit)
        return resource

    def blood_pressure(self, enc: Encounter) -> Resource:
        systolic, diastolic, resource_id = enc.blood_pressure  # type: ignore[misc]
        resource = self._observation(resource_id, "vital-signs", _codeable(codes.LOINC, codes.BP_PANEL), enc)
        resource["component"] = [
            {"code": _codeable(codes.LOINC, lab), "valueQuantity": _quantity(value, lab.unit)}
            for lab, value in ((codes.DIASTOLIC, diastolic), (codes.SYSTOLIC, systolic))
        ]
        return resource

    def smoking(self, enc: Encounter) -> Resource:
        status, resource_id = enc.smoking  # type: ignore[misc]
        resource = self._observation(resource_id, "survey", _codeable(codes.LOINC, codes.SMOKING), enc)
        resource["valueCodeableConcept"] = _codeable(codes.SNOMED, codes.SMOKING_VALUES[status])
        return resource

    def procedure(self, concept: codes.Concept, resource_id: str, enc: Encounter) -> Resource:
        return self.procedure_resource(resource_id, _codeable(codes.SNOMED, concept), fhir_time(enc.start),
                                       fhir_time(enc.end), enc)

    def procedure_resource(self, resource_id: str, code: dict[str, Any], start: str, end: str,
                           enc: Encounter) -> Resource:
        return {
            "resourceType": "Procedure", "id": resource_id, "status": "completed",
            "code": code, "subject": self.patient_ref, "encounter": _ref(enc.resource_id),
            "performedPeriod": {"start": start, "end": end},
        }

    def medication_request(self, event: MedicationEvent, enc: Encounter, exported: set[str]) -> Resource:
        reason = event.reason.resource_id if event.reason.resource_id in exported else None
        return self.medication_request_resource(
            event.resource_id, _codeable(codes.RXNORM, codes.MEDICATIONS[event.medication]), event.stop is not None,
            fhir_time(event.start), enc, reason, _DAILY_DOSAGE)

    def medication_request_resource(self, resource_id: str, code: dict[str, Any], stopped: bool, authored: str,
                                    enc: Encounter, reason_id: str | None,
                                    dosage: dict[str, Any] | None) -> Resource:
        practitioner = self.providers.practitioners[enc.practitioner]
        resource: Resource = {
            "resourceType": "MedicationRequest", "id": resource_id,
            "status": "stopped" if stopped else "active", "intent": "order",
            "medicationCodeableConcept": code, "subject": self.patient_ref, "encounter": _ref(enc.resource_id),
            "authoredOn": authored,
            "requester": {"reference": practitioner.conditional_reference, "display": practitioner.display},
        }
        if reason_id is not None:  # the reference alone, as Synthea writes it
            resource["reasonReference"] = [_ref(reason_id)]
        if dosage is not None:
            resource["dosageInstruction"] = [dosage]
        return resource

    def immunization(self, enc: Encounter) -> Resource:
        return self.immunization_resource(enc.immunization_id, _codeable(codes.CVX, codes.FLU_VACCINE),  # type: ignore[arg-type]
                                          fhir_time(enc.start), enc)

    def immunization_resource(self, resource_id: str, code: dict[str, Any], when: str, enc: Encounter) -> Resource:
        return {
            "resourceType": "Immunization", "id": resource_id, "status": "completed",
            "vaccineCode": code, "patient": self.patient_ref,
            "encounter": _ref(enc.resource_id), "occurrenceDateTime": when, "primarySource": True,
        }

    def lipid_report(self, enc: Encounter, lipids: list[Measurement]) -> Resource:
        results = [{**_ref(m.resource_id), "display": m.lab.display} for m in lipids]
        return self.report_resource(enc.lipid_report_id, _codeable(codes.LOINC, codes.LIPID_PANEL),  # type: ignore[arg-type]
                                    fhir_time(enc.start), enc, results)

    def report_resource(self, resource_id: str, code: dict[str, Any], when: str, enc: Encounter,
                        results: list[dict[str, str]]) -> Resource:
        """A laboratory DiagnosticReport; `result` only when it lists something."""
        resource: Resource = {
            "resourceType": "DiagnosticReport", "id": resource_id, "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                                      "code": "LAB", "display": "Laboratory"}]}],
            "code": code, "subject": self.patient_ref, "encounter": _ref(enc.resource_id),
            "effectiveDateTime": when, "issued": when,
        }
        if results:
            resource["result"] = results
        return resource

    def careplan(self, enc: Encounter) -> Resource:
        resource_id, addresses = enc.careplan  # type: ignore[misc]
        activities = [{"detail": {"code": _codeable(codes.SNOMED, concept), "status": "in-progress",
                                  "location": {"display": self.providers.name}}}
                      for concept in (codes.DIABETIC_DIET, codes.EXERCISE_THERAPY)]
        return {
            "resourceType": "CarePlan", "id": resource_id,
            "status": "active" if self.life.death is None else "completed", "intent": "order",
            "category": [
                {"coding": [{"system": "http://hl7.org/fhir/us/core/CodeSystem/careplan-category",
                             "code": "assess-plan"}]},
                _codeable(codes.SNOMED, codes.DIABETES_CAREPLAN),
            ],
            "subject": self.patient_ref, "encounter": _ref(enc.resource_id),
            "period": {"start": fhir_time(enc.start)},
            "addresses": [_ref(addresses.resource_id)],
            "activity": activities,
        }

    def encounter_resources(self, enc: Encounter, exported: set[str]) -> list[Resource]:
        """Synthea's order: Encounter, Condition, AllergyIntolerance, Observation, Procedure, Device,
        MedicationRequest, Immunization, DiagnosticReport, CarePlan. Within a type, entries codes.py
        maps come before those written with the module's own codes (`enc.other`, in record order)."""
        extra = _OtherWriter(self, enc, exported).resources if enc.other else _nothing
        out = [self.encounter(enc)]
        out += [self.condition(c, enc) for c in enc.conditions]
        out += extra("condition", "allergy")
        vitals = [m for m in enc.measurements if m.category == "vital-signs"]
        labs = [m for m in enc.measurements if m.category == "laboratory"]
        out += [self.measurement(m, enc) for m in vitals[:3]]
        if enc.blood_pressure is not None:
            out.append(self.blood_pressure(enc))
        out += [self.measurement(m, enc) for m in vitals[3:] + labs]
        if enc.smoking is not None:
            out.append(self.smoking(enc))
        out += extra("observation", "panel")
        out += [self.procedure(concept, rid, enc) for concept, rid in enc.procedures]
        out += extra("procedure", "device")
        out += [self.medication_request(m, enc, exported) for m in enc.medications]
        out += extra("medication")
        if enc.immunization_id is not None:
            out.append(self.immunization(enc))
        out += extra("immunization")
        lipid_codes = {codes.CHOLESTEROL.code, codes.TRIGLYCERIDES.code, codes.LDL.code, codes.HDL.code}
        lipids = [m for m in labs if m.lab.code in lipid_codes]
        if enc.lipid_report_id is not None and lipids:
            out.append(self.lipid_report(enc, lipids))
        out += extra("report")
        if enc.careplan is not None:
            out.append(self.careplan(enc))
        out += extra("careplan")
        return out


# ---------------------------------------------------------------- entries written with the module's own codes

def _module_codings(entry_codes: Iterable[Code]) -> list[dict[str, str]]:
    return [{"system": codes.fhir_system(c.system), "code": c.code, "display": c.display} for c in entry_codes]


def _module_codeable(entry_codes: tuple[Code, ...]) -> dict[str, Any]:
    return {"coding": _module_codings(entry_codes), "text": entry_codes[0].display}


def _reason_codes(reason: object) -> tuple[Code, ...]:
    return reason.codes if isinstance(reason, Entry) else (reason,)  # type: ignore[return-value]


def _time(ms: int) -> str:
    return fhir_time(from_millis(ms))


def _value(value: object, unit: str | None) -> dict[str, Any]:
    """The `value[x]` of an observation or component; empty when the module recorded no value."""
    if isinstance(value, bool):
        return {"valueBoolean": value}
    if isinstance(value, int | float):
        return {"valueQuantity": _quantity(value, unit) if unit else {"value": value}}
    if isinstance(value, Code):
        return {"valueCodeableConcept": _module_codeable((value,))}
    if isinstance(value, str):
        return {"valueString": value}
    return {}


# GMF prescription `dosage.unit` -> UCUM time unit (Synthea's convertUcumCode).
_PERIOD_UNITS = {"seconds": "s", "minutes": "min", "hours": "h", "days": "d", "weeks": "wk", "months": "mo",
                 "years": "a"}
_ALLERGY_CLINICAL = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
_ALLERGY_VERIFICATION = "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification"
_ALLERGY_CATEGORIES = ("food", "medication", "environment", "biologic")


class _OtherWriter:
    """Synthea's FHIR shape for the entries of `enc.other` (codes.py does not map their codes)."""

    def __init__(self, patient: _PatientWriter, enc: Encounter, exported: set[str]) -> None:
        self.patient, self.enc, self.exported = patient, enc, exported
        self.writers = {
            "condition": self.condition, "allergy": self.allergy, "observation": self.observation,
            "panel": self.panel, "procedure": self.procedure, "device": self.device,
            "medication": self.medication_request, "immunization": self.immunization,
            "report": self.report, "careplan": self.careplan,
        }

    def resources(self, *kinds: str) -> list[Resource]:
        entries: list[Entry] = self.enc.other  # type: ignore[assignment]
        return [self.writers[e.kind](e) for e in entries if e.kind in kinds]

    def _stopped(self, entry: Entry) -> bool:
        return entry.stop is not None and from_millis(entry.stop) <= self.patient.life.end

    def _exported_reason(self, entry: Entry) -> Entry | None:
        """The entry's reason when it is a condition this export writes (what a reference may name)."""
        reason = entry.reason
        if isinstance(reason, Entry) and reason.kind == "condition" and reason.resource_id in self.exported:
            return reason
        return None

    def _base(self, entry: Entry, resource_type: str) -> Resource:
        return {"resourceType": resource_type, "id": entry.resource_id}

    def condition(self, entry: Entry) -> Resource:
        abatement = None if entry.stop is None else from_millis(entry.stop)
        return self.patient.condition_resource(entry.resource_id, _module_codeable(entry.codes),
                                               from_millis(entry.start), abatement, self.enc)

    def allergy(self, entry: Entry) -> Resource:
        resource = self._base(entry, "AllergyIntolerance")
        resource["clinicalStatus"] = {"coding": [{"system": _ALLERGY_CLINICAL,
                                                  "code": "inactive" if self._stopped(entry) else "active"}]}
        resource["verificationStatus"] = {"coding": [{"system": _ALLERGY_VERIFICATION, "code": "confirmed"}]}
        if entry.details.get("allergy_type") in ("allergy", "intolerance"):
            resource["type"] = entry.details["allergy_type"]
        if entry.details.get("category") in _ALLERGY_CATEGORIES:
            resource["category"] = [entry.details["category"]]
        resource["criticality"] = "low"
        resource["code"] = _module_codeable(entry.codes)
        resource["patient"] = self.patient.patient_ref
        resource["recordedDate"] = _time(entry.start)
        return resource

    def _observation(self, entry: Entry) -> Resource:
        return self.patient._observation(entry.resource_id, entry.category, _module_codeable(entry.codes),
                                         self.enc, _time(entry.start))

    def observation(self, entry: Entry) -> Resource:
        resource = self._observation(entry)
        resource.update(_value(entry.value, entry.unit))
        return resource

    def panel(self, entry: Entry) -> Resource:
        resource = self._observation(entry)
        resource["component"] = [{"code": _module_codeable(part.codes), **_value(part.value, part.unit)}
                                 for part in entry.parts if part.codes]
        return resource

    def procedure(self, entry: Entry) -> Resource:
        resource = self.patient.procedure_resource(entry.resource_id, _module_codeable(entry.codes),
                                                   _time(entry.start), _time(entry.stop or entry.start), self.enc)
        reason = self._exported_reason(entry)
        if reason is not None:
            resource["reasonReference"] = [{**_ref(reason.resource_id), "display": reason.codes[0].display}]
        elif entry.reason is not None:
            resource["reasonCode"] = [_module_codeable(_reason_codes(entry.reason))]
        return resource

    def device(self, entry: Entry) -> Resource:
        resource = self._base(entry, "Device")
        resource["status"] = "inactive" if self._stopped(entry) else "active"
        if isinstance(entry.details.get("manufacturer"), str):
            resource["manufacturer"] = entry.details["manufacturer"]
        resource["deviceName"] = [{"name": entry.codes[0].display, "type": "user-friendly-name"}]
        if isinstance(entry.details.get("model"), str):
            resource["modelNumber"] = entry.details["model"]
        resource["type"] = _module_codeable(entry.codes)
        resource["patient"] = self.patient.patient_ref
        return resource

    def medication_request(self, entry: Entry) -> Resource:
        reason = self._exported_reason(entry)
        return self.patient.medication_request_resource(
            entry.resource_id, _module_codeable(entry.codes), entry.stop is not None, _time(entry.start), self.enc,
            None if reason is None else reason.resource_id, _dosage(entry.details.get("prescription")))

    def immunization(self, entry: Entry) -> Resource:
        return self.patient.immunization_resource(entry.resource_id, _module_codeable(entry.codes),
                                                  _time(entry.start), self.enc)

    def report(self, entry: Entry) -> Resource:
        results = [{**_ref(p.resource_id), "display": p.codes[0].display}
                   for p in entry.parts if p.resource_id in self.exported]
        return self.patient.report_resource(entry.resource_id, _module_codeable(entry.codes), _time(entry.start),
                                            self.enc, results)

    def careplan(self, entry: Entry) -> Resource:
        stopped = self._stopped(entry) or self.patient.life.death is not None
        resource = self._base(entry, "CarePlan")
        resource.update({
            "status": "completed" if stopped else "active", "intent": "order",
            "category": [{"coding": [{"system": "http://hl7.org/fhir/us/core/CodeSystem/careplan-category",
                                      "code": "assess-plan"}]}, _module_codeable(entry.codes)],
            "subject": self.patient.patient_ref, "encounter": _ref(self.enc.resource_id),
            "period": {"start": _time(entry.start)},
        })
        if entry.stop is not None and self._stopped(entry):
            resource["period"]["end"] = _time(entry.stop)
        reason = self._exported_reason(entry)
        if reason is not None:
            resource["addresses"] = [_ref(reason.resource_id)]
        activities = [Code.parse(a) for a in entry.details.get("activities", []) if isinstance(a, dict)]
        if activities:
            resource["activity"] = [{"detail": {
                "code": _module_codeable((a,)), "status": "completed" if stopped else "in-progress",
                "location": {"display": self.patient.providers.name}}} for a in activities]
        return resource


def _dosage(prescription: object) -> dict[str, Any] | None:
    """Synthea's dosageInstruction from a MedicationOrder's `prescription` (None without one)."""
    if not isinstance(prescription, dict):
        return None
    as_needed = bool(prescription.get("as_needed", False))
    dosage: dict[str, Any] = {"sequence": 1}
    instructions = [Code.parse(i) for i in prescription.get("instructions", []) if isinstance(i, dict)]
    if instructions:
        dosage["additionalInstruction"] = [_module_codeable((i,)) for i in instructions]
    dosage["asNeededBoolean"] = as_needed
    amount = prescription.get("dosage")
    if not as_needed and isinstance(amount, dict):
        unit = _PERIOD_UNITS.get(str(amount.get("unit")))
        repeat: dict[str, Any] = {"frequency": amount.get("frequency"), "period": amount.get("period")}
        if unit is not None:
            repeat["periodUnit"] = unit
        dosage["timing"] = {"repeat": {k: v for k, v in repeat.items() if v is not None}}
        if isinstance(amount.get("amount"), int | float):
            dosage["doseAndRate"] = [{"type": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/dose-rate-type",
                "code": "ordered", "display": "Ordered"}]}, "doseQuantity": {"value": amount["amount"]}}]
    return dosage


def _exported_encounters(life: Life) -> list[Encounter]:
    """`exported_encounters`, plus older encounters whose `other` conditions, allergies, drugs,
    devices or care plans are still active at the window start (kept as Synthea keeps them)."""
    kept = {id(enc) for enc in exported_encounters(life)}
    start = life.window_start

    def still_active(enc: Encounter) -> bool:
        return any(isinstance(e, Entry) and e.kind in _LASTING_KINDS
                   and (e.stop is None or from_millis(e.stop) >= start) for e in enc.other)

    return [enc for enc in life.encounters if id(enc) in kept or (enc.other and still_active(enc))]


_LASTING_KINDS = ("condition", "allergy", "medication", "device", "careplan")


def _exported_other_ids(encounters: list[Encounter]) -> set[str]:
    """Ids of the conditions and observations written from `other` (what references may point to),
    and of the mapped measurements a report of `other` may list."""
    ids: set[str] = set()
    for enc in encounters:
        if not enc.other:
            continue
        ids.update(e.resource_id for e in enc.other if isinstance(e, Entry))
        ids.update(m.resource_id for m in enc.measurements)
        if enc.blood_pressure is not None:
            ids.add(enc.blood_pressure[2])
        if enc.smoking is not None:
            ids.add(enc.smoking[1])
    return ids


def _nothing(*kinds: str) -> list[Resource]:
    return []


def patient_resources(life: Life, site: SiteConfig, providers: Providers, mothers_maiden: str) -> list[Resource]:
    """All of one patient's resources in bundle order (Patient first)."""
    writer = _PatientWriter(life, site, providers)
    encounters = _exported_encounters(life)
    exported = {c.resource_id for enc in encounters for c in enc.conditions}
    exported |= _exported_other_ids(encounters)
    resources = [patient_resource(life.demographics, life.death, mothers_maiden)]
    for enc in encounters:
        resources += writer.encounter_resources(enc, exported)
    return resources


# ---------------------------------------------------------------- bundles and bulk lines

def transaction_bundle(resources: Iterable[Resource]) -> Resource:
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r,
                   "request": {"method": "POST", "url": r["resourceType"]}} for r in resources],
    }


def transaction_bundle_json(resources: list[Resource], resource_json: list[str]) -> str:
    """`dumps(transaction_bundle(resources))`, assembled from already-serialized resources."""
    entries = ",".join(
        f'{{"fullUrl":"urn:uuid:{r["id"]}","resource":{text},'
        f'"request":{{"method":"POST","url":"{r["resourceType"]}"}}}}'
        for r, text in zip(resources, resource_json, strict=True)
    )
    return f'{{"resourceType":"Bundle","type":"transaction","entry":[{entries}]}}'


# One encoder for all calls: `json.dumps` with options builds a new encoder per call (a hot path).
# check_circular=False: built resources are trees; the output is the same as with the check.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)


def dumps(data: Any) -> str:
    """Compact, deterministic JSON (keys in the order they were built, as Synthea's exporter does)."""
    return _ENCODER.encode(data)


_URN = re.compile(r'"urn:uuid:([0-9a-f-]{36})"')
_CONDITIONAL = re.compile(r'"(Organization|Practitioner)\?identifier=[^|"]+\|([^"]+)"')


class BulkRewriter:
    """Rewrites bundle-mode references (`urn:uuid:`, conditional) into bulk-mode `Type/id`."""

    def __init__(self, providers: Providers) -> None:
        self.practitioner_ids = {p.npi: p.resource_id for p in providers.practitioners}
        self.organization_id = providers.organization_id

    def _conditional(self, match: re.Match[str]) -> str:
        kind, value = match.group(1), match.group(2)
        if kind == "Organization":
            return f'"Organization/{value}"'
        return f'"Practitioner/{self.practitioner_ids[value]}"'

    def lines(self, resources: list[Resource], resource_json: list[str]) -> list[tuple[str, str]]:
        """(resource type, NDJSON line) for each resource, given each resource's bundle-mode JSON."""
        types = {r["id"]: r["resourceType"] for r in resources}

        def local(match: re.Match[str]) -> str:
            return f'"{types[match.group(1)]}/{match.group(1)}"'

        # One pass over all lines joined by newlines (serialized JSON never holds a raw newline).
        joined = _CONDITIONAL.sub(self._conditional, _URN.sub(local, "\n".join(resource_json)))
        return list(zip((r["resourceType"] for r in resources), joined.split("\n"), strict=True))


# ---------------------------------------------------------------- providers

def organization_resource(providers: Providers) -> Resource:
    city = providers.city
    return {
        "resourceType": "Organization", "id": providers.organization_id,
        "identifier": [{"system": codes.SYNTHEA_ID, "value": providers.organization_id}],
        "active": True,
        "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/organization-type",
                              "code": "prov", "display": "Healthcare Provider"}], "text": "Healthcare Provider"}],
        "name": providers.name,
        "telecom": [{"system": "phone", "value": providers.phone}],
        "address": [{"line": ["1 HOSPITAL DRIVE"], "city": city.name.upper(), "state": "MA",
                     "postalCode": city.postal_code, "country": "US"}],
    }


def practitioner_resource(p: Practitioner, providers: Providers) -> Resource:
    city = providers.city
    return {
        "resourceType": "Practitioner", "id": p.resource_id,
        "identifier": [{"system": codes.NPI, "value": p.npi}],
        "active": True,
        "name": [{"family": p.family, "given": [p.given], "prefix": ["Dr."]}],
        "telecom": [{"system": "email", "value": f"{p.given}.{p.family}@example.com", "use": "work"}],
        "address": [{"line": ["1 HOSPITAL DRIVE"], "city": city.name.upper(), "state": "MA",
                     "postalCode": city.postal_code, "country": "US"}],
        "gender": p.gender,
    }


def provider_bundles(providers: Providers) -> tuple[Resource, Resource]:
    """(hospitalInformation bundle, practitionerInformation bundle) as Synthea writes them."""
    organization = organization_resource(providers)
    practitioners = [practitioner_resource(p, providers) for p in providers.practitioners]
    return _conditional_bundle([organization]), _conditional_bundle(practitioners)


def _conditional_bundle(resources: list[Resource]) -> Resource:
    """Synthea's provider bundles create each provider only if absent (conditional create)."""
    entries = []
    for r in resources:
        system, value = r["identifier"][0]["system"], r["identifier"][0]["value"]
        entries.append({"fullUrl": f"urn:uuid:{r['id']}", "resource": r,
                        "request": {"method": "POST", "url": r["resourceType"],
                                    "ifNoneExist": f"identifier={system}|{value}"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}
