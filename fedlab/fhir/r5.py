"""Map the FHIR R4 resources fedlab emits to FHIR R5 (5.0.0).

Covered: Patient, Condition, Observation, RiskAssessment, Practitioner, DiagnosticReport (unchanged
apart from the R5 rules below), Encounter, MedicationRequest, Procedure, Immunization,
Organization, AllergyIntolerance and Device (renamed or restructured elements). CarePlan is not: R5 removed `activity.detail`
and has no faithful home for Synthea's planned activities. Anything else raises `R5MappingError`, so a server never serves R4
content labelled as R5.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fedlab.errors import FedlabError

R5_VERSION = "5.0.0"
R4_VERSION = "4.0.1"
ENCOUNTER_STATUS = {"planned": "planned", "arrived": "in-progress", "triaged": "in-progress",
                    "in-progress": "in-progress", "onleave": "on-hold", "finished": "completed",
                    "cancelled": "cancelled", "entered-in-error": "entered-in-error", "unknown": "unknown"}
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
ALLERGY_TYPE = "http://hl7.org/fhir/allergy-intolerance-type"
# R5 Device has no `patient`; HL7's cross-version extension keeps the R4 element's value.
DEVICE_PATIENT_EXTENSION = "http://hl7.org/fhir/4.0/StructureDefinition/extension-Device.patient"

Resource = dict[str, Any]


class R5MappingError(FedlabError, ValueError):
    """A resource cannot be mapped to R5; the message names the resource and element."""


def wants_r5(value: str | None) -> bool:
    """Whether an Accept header or `_fhirVersion` value asks for R5 (`5.0`, `5.0.0`, `fhirVersion=5.0`)."""
    if not value:
        return False
    for part in value.replace(",", ";").split(";"):
        name, _, version = part.strip().rpartition("=")
        if name.strip().lower() in ("fhirversion", "") and version.strip().startswith("5."):
            return True
        if not name and part.strip().startswith("5."):
            return True
    return False


def _reasons(resource: Resource) -> list[dict[str, Any]]:
    """R4 `reasonCode` + `reasonReference` as R5 CodeableReferences."""
    reasons = [{"concept": code} for code in resource.pop("reasonCode", [])]
    reasons += [{"reference": ref} for ref in resource.pop("reasonReference", [])]
    return reasons


def _encounter(resource: Resource) -> Resource:
    status = resource.get("status")
    if status is not None:
        if status not in ENCOUNTER_STATUS:
            raise R5MappingError(f"Encounter/{resource.get('id')}: status {status!r} has no R5 equivalent")
        resource["status"] = ENCOUNTER_STATUS[status]
    if isinstance(resource.get("class"), dict):
        resource["class"] = [{"coding": [resource["class"]]}]
    if "period" in resource:
        resource["actualPeriod"] = resource.pop("period")
    reasons = _reasons(resource)
    if reasons:
        resource["reason"] = [{"value": [reason]} for reason in reasons]
    for participant in resource.get("participant", []):
        if "individual" in participant:
            participant["actor"] = participant.pop("individual")
    if "serviceType" in resource and isinstance(resource["serviceType"], dict):
        resource["serviceType"] = [{"concept": resource["serviceType"]}]
    diagnoses = resource.get("diagnosis", [])
    for diagnosis in diagnoses:
        if isinstance(diagnosis.get("condition"), dict):
            diagnosis["condition"] = [{"reference": diagnosis["condition"]}]
        if isinstance(diagnosis.get("use"), dict):
            diagnosis["use"] = [diagnosis["use"]]
        diagnosis.pop("rank", None)
    if "hospitalization" in resource:
        resource["admission"] = resource.pop("hospitalization")
    for removed in ("classHistory", "statusHistory"):
        resource.pop(removed, None)
    return resource


def _dosage(dosage: dict[str, Any]) -> dict[str, Any]:
    if "asNeededBoolean" in dosage:
        dosage["asNeeded"] = dosage.pop("asNeededBoolean")
    if "asNeededCodeableConcept" in dosage:
        dosage["asNeededFor"] = [dosage.pop("asNeededCodeableConcept")]
    return dosage


def _medication_request(resource: Resource) -> Resource:
    if "medicationCodeableConcept" in resource:
        resource["medication"] = {"concept": resource.pop("medicationCodeableConcept")}
    elif "medicationReference" in resource:
        resource["medication"] = {"reference": resource.pop("medicationReference")}
    else:
        raise R5MappingError(f"MedicationRequest/{resource.get('id')}: medication[x] is missing")
    reasons = _reasons(resource)
    if reasons:
        resource["reason"] = reasons
    if "reportedBoolean" in resource:
        resource["reported"] = resource.pop("reportedBoolean")
    if "reportedReference" in resource:
        resource["informationSource"] = [resource.pop("reportedReference")]
    if isinstance(resource.get("performer"), dict):
        resource["performer"] = [resource["performer"]]
    resource["dosageInstruction"] = [_dosage(d) for d in resource.get("dosageInstruction", [])]
    if not resource["dosageInstruction"]:
        del resource["dosageInstruction"]
    return resource


def _condition(resource: Resource) -> Resource:
    if "clinicalStatus" not in resource:  # required in R5; R4 allowed it absent (e.g. entered-in-error)
        code = "resolved" if any(k.startswith("abatement") for k in resource) else "active"
        resource["clinicalStatus"] = {"coding": [{"system": CONDITION_CLINICAL, "code": code}]}
    return resource


def _procedure(resource: Resource) -> Resource:
    for suffix in ("DateTime", "Period", "String", "Age", "Range"):
        if f"performed{suffix}" in resource:
            resource[f"occurrence{suffix}"] = resource.pop(f"performed{suffix}")
    reasons = _reasons(resource)
    if reasons:
        resource["reason"] = reasons
    return resource


def _immunization(resource: Resource) -> Resource:
    reasons = _reasons(resource)
    if reasons:
        resource["reason"] = reasons
    resource.pop("education", None)
    return resource


def _organization(resource: Resource) -> Resource:
    # R5 folds telecom and address into ExtendedContactDetail entries (one address each).
    telecom = resource.pop("telecom", [])
    addresses = resource.pop("address", [])
    contacts = [{"address": address} for address in addresses] or ([{}] if telecom else [])
    if telecom:
        contacts[0]["telecom"] = telecom
    if contacts:
        resource["contact"] = [*contacts, *resource.get("contact", [])]
    return resource


def _allergy_intolerance(resource: Resource) -> Resource:
    kind = resource.get("type")
    if isinstance(kind, str):  # R4 code -> R5 CodeableConcept
        resource["type"] = {"coding": [{"system": ALLERGY_TYPE, "code": kind}]}
    return resource


def _device(resource: Resource) -> Resource:
    names = resource.pop("deviceName", [])
    if names:
        resource["name"] = [{"value": n.get("name"), "type": n.get("type")} for n in names]
    if isinstance(resource.get("type"), dict):
        resource["type"] = [resource["type"]]
    patient = resource.pop("patient", None)
    if patient is not None:
        extension = {"url": DEVICE_PATIENT_EXTENSION, "valueReference": patient}
        resource["extension"] = [*resource.get("extension", []), extension]
    return resource


def _unchanged(resource: Resource) -> Resource:
    return resource


MAPPERS: dict[str, Callable[[Resource], Resource]] = {
    "Patient": _unchanged, "Observation": _unchanged, "RiskAssessment": _unchanged,
    "Organization": _organization, "Practitioner": _unchanged, "DiagnosticReport": _unchanged, "Condition": _condition,
    "Encounter": _encounter, "MedicationRequest": _medication_request, "Procedure": _procedure,
    "Immunization": _immunization, "AllergyIntolerance": _allergy_intolerance, "Device": _device,
}


def supports(resource_type: str) -> bool:
    return resource_type in MAPPERS


def to_r5(resource: Resource) -> Resource:
    """An R5 copy of an R4 resource (the input is not modified)."""
    resource_type = resource.get("resourceType") if isinstance(resource, dict) else None
    mapper = MAPPERS.get(str(resource_type))
    if mapper is None:
        raise R5MappingError(f"{resource_type}/{resource.get('id') if isinstance(resource, dict) else '?'}: "
                             f"no R4 -> R5 mapping for this resource type "
                             f"(supported: {', '.join(sorted(MAPPERS))})")
    return mapper(copy.deepcopy(resource))


def validate_r5(resource: Resource) -> Any:
    """Validate with the `fhir.resources` R5 model of the resource's type; returns the model instance."""
    import importlib

    resource_type = str(resource.get("resourceType"))
    module = importlib.import_module(f"fhir.resources.{resource_type.lower()}")
    return getattr(module, resource_type).model_validate(resource)
