"""Synthea's own modules through `generate`: every fact recorded inside an encounter is exported
with the module's own codes (system names mapped to FHIR URIs), references resolve, the output
validates and the flatten stage still reconciles."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fedlab.config import experiment_from_dict
from fedlab.synthea import codes, generate
from fedlab.synthea.engine import EXPORTED_KINDS, Entry, GMFRecord, to_life_encounters

RESOURCE_TYPE = {
    "condition": "Condition", "allergy": "AllergyIntolerance", "observation": "Observation", "panel": "Observation",
    "report": "DiagnosticReport", "procedure": "Procedure", "device": "Device", "medication": "MedicationRequest",
    "immunization": "Immunization", "careplan": "CarePlan",
}
CODE_FIELD = {"MedicationRequest": "medicationCodeableConcept", "Immunization": "vaccineCode", "Device": "type",
              "CarePlan": "category"}  # Synthea writes a care plan's code as its second category


# ---------------------------------------------------------------- the system table

def test_gmf_system_names_map_to_fhir_uris_and_unknown_names_are_kept_and_flagged() -> None:
    assert codes.fhir_system("SNOMED-CT") == "http://snomed.info/sct"
    assert codes.fhir_system("LOINC") == "http://loinc.org"
    assert codes.fhir_system("RxNorm") == "http://www.nlm.nih.gov/research/umls/rxnorm"
    assert codes.fhir_system("CVX") == "http://hl7.org/fhir/sid/cvx"
    assert codes.fhir_system("ICD-10-CM") == codes.fhir_system("ICD-10") == "http://hl7.org/fhir/sid/icd-10-cm"
    assert codes.fhir_system("DICOM-DCM") == "http://dicom.nema.org/resources/ontology/DCM"
    assert codes.fhir_system("DICOM-SOP") == "urn:ietf:rfc:3986"
    assert all(uri.startswith(("http://", "https://", "urn:")) for uri in codes.GMF_SYSTEMS.values())
    for uri in ("http://example.org/local-codes", "https://example.org/x", "urn:oid:2.16.840.1.113883.6.96"):
        assert codes.fhir_system(uri) == uri and not codes.is_unknown_system(uri)
    assert codes.fhir_system("HospitalLocal") == "HospitalLocal"
    assert codes.is_unknown_system("HospitalLocal") and not codes.is_unknown_system("SNOMED-CT")


# ---------------------------------------------------------------- builtin modules: nothing extra

def test_builtin_modules_leave_nothing_for_the_module_code_path() -> None:
    """fedlab's own modules record only codes.py codes: their FHIR output does not change."""
    from fedlab.synthea.gmf_life import BUILTIN_MODULES, cached_modules, simulate_life_gmf

    exp = experiment_from_dict({"name": "t", "sites": [{"id": "a", "patients": 1, "seed": 1, "diabetes_risk": 3,
                                                        "age_mean": 60}]}, root=Path("."))
    modules = cached_modules(str(BUILTIN_MODULES), (), "")
    lives = [simulate_life_gmf(900 + i, exp.sites[0], dt.date(2026, 1, 1), 8, 5, modules) for i in range(25)]
    encounters = [enc for life in lives for enc in life.encounters]
    assert sum(len(enc.conditions) + len(enc.measurements) for enc in encounters) > 100
    assert not any(enc.other or enc.other_reason is not None or enc.type_codes for enc in encounters)


# ---------------------------------------------------------------- Synthea's reference modules

class ReferenceSite:
    def __init__(self, folder: Path, records: list[GMFRecord]) -> None:
        self.folder, self.records = folder, records
        self.bulk: dict[str, list[dict[str, Any]]] = {
            path.stem: [json.loads(line) for line in path.read_text().splitlines()]
            for path in sorted((folder / "bulk").glob("*.ndjson"))}
        self.by_id = {r["id"]: r for rows in self.bulk.values() for r in rows}


@pytest.fixture(scope="module")
def reference_site(tmp_path_factory: pytest.TempPathFactory, reference_dir: Path) -> ReferenceSite:
    import fedlab.synthea.gmf_life as gmf_life

    modules = reference_dir / "synthea-modules"
    if not modules.is_dir():
        pytest.skip(f"Synthea reference modules not found at {modules}")
    records: list[GMFRecord] = []
    real_to_life = gmf_life.to_life

    def keeping_records(record: GMFRecord, *args: Any) -> Any:
        records.append(record)
        return real_to_life(record, *args)

    root = tmp_path_factory.mktemp("gmf_export")
    exp = experiment_from_dict({
        "name": "t", "seed": 7,
        "sites": [{"id": "ref", "patients": 16, "seed": 5, "age_mean": 62, "bmi_shift": 4, "diabetes_risk": 3}],
        "generate": {"years_of_history": 10, "workers": 1, "engine": "gmf", "modules_dir": str(modules),
                     "allow_missing_submodules": ["anemia/anemia_sub"]}}, root=root)
    with pytest.MonkeyPatch.context() as patch:  # one process (workers: 1): keep each person's GMF record
        patch.setattr(gmf_life, "to_life", keeping_records)
        folder = generate(exp, progress=False)["ref"]
    assert len(records) == 16
    return ReferenceSite(folder, records)


def _codings(node: Any) -> list[dict[str, Any]]:
    """Every Coding anywhere in a resource."""
    if isinstance(node, list):
        return [c for item in node for c in _codings(item)]
    if not isinstance(node, dict):
        return []
    own = [node] if "code" in node and "system" in node and isinstance(node["code"], str) else []
    return own + [c for value in node.values() for c in _codings(value)]


def _references(node: Any, keys: tuple[str, ...]) -> list[str]:
    if isinstance(node, list):
        return [r for item in node for r in _references(item, keys)]
    if not isinstance(node, dict):
        return []
    found = []
    for key, value in node.items():
        if key in keys:
            items = value if isinstance(value, list) else [value]
            found += [item["reference"] for item in items if isinstance(item, dict) and "reference" in item]
        found += _references(value, keys)
    return found


def _exported_encounter_entries(site: ReferenceSite) -> list[Entry]:
    exported = {r["id"] for r in site.bulk["Encounter"]}
    return [entry for record in site.records for enc in record.encounters if enc.resource_id in exported
            for entry in enc.entries]


def test_every_coded_entry_inside_an_exported_encounter_is_written_with_its_code(
        reference_site: ReferenceSite) -> None:
    entries = [e for e in _exported_encounter_entries(reference_site)
               if e.kind in EXPORTED_KINDS and e.codes and e.resource_id]
    assert len(entries) > 500
    kinds = Counter()
    for entry in entries:
        resource = reference_site.by_id.get(entry.resource_id)
        assert resource is not None, (entry.kind, entry.code, entry.module, entry.state)
        assert resource["resourceType"] == RESOURCE_TYPE[entry.kind]
        concept = resource[CODE_FIELD.get(resource["resourceType"], "code")]
        first = entry.codes[0]
        assert {"system": codes.fhir_system(first.system), "code": first.code} in [
            {"system": c["system"], "code": c["code"]} for c in _codings(concept)], (entry.kind, concept)
        kinds[entry.kind] += 1
    assert {"condition", "observation", "panel", "report", "procedure", "medication", "careplan", "device"} <= set(
        kinds)


def test_entries_left_unmapped_are_only_the_kinds_not_exported(reference_site: ReferenceSite) -> None:
    left = Counter(e.kind for record in reference_site.records for e in to_life_encounters(record)[1]
                   if e.encounter is not None)
    assert set(left) <= {"symptom", "supply", "imaging", "death"}
    assert left["supply"] > 0  # the diabetes modules hand out test strips and lancets: still not exported


def test_no_coding_keeps_a_plain_gmf_system_name(reference_site: ReferenceSite) -> None:
    systems = Counter(c["system"] for rows in reference_site.bulk.values() for r in rows for c in _codings(r))
    assert systems[codes.LOINC] > 1000 and systems[codes.SNOMED] > 100 and systems[codes.RXNORM] > 0
    plain = {s for s in systems if not s.startswith(("http://", "https://", "urn:"))}
    assert not plain
    assert json.loads((reference_site.folder / "_SUCCESS.json").read_text())["unknown_code_systems"] == []


def test_a_sample_of_every_resource_type_validates_as_r4(reference_site: ReferenceSite) -> None:
    from fhir.resources.R4B import get_fhir_model_class

    assert {"CarePlan", "Condition", "Device", "DiagnosticReport", "MedicationRequest", "Observation",
            "Procedure"} <= set(reference_site.bulk)
    for resource_type, rows in reference_site.bulk.items():
        model = get_fhir_model_class(resource_type)
        step = max(1, len(rows) // 40)
        for resource in rows[::step]:
            model.model_validate(resource)


def test_references_point_to_exported_resources(reference_site: ReferenceSite) -> None:
    present = {f"{r['resourceType']}/{r['id']}" for rows in reference_site.bulk.values() for r in rows}
    keys = ("reasonReference", "result", "addresses", "encounter")
    references = Counter()
    for rows in reference_site.bulk.values():
        for resource in rows:
            for reference in _references(resource, keys):
                assert reference in present, (resource["resourceType"], reference)
                references[reference.split("/")[0]] += 1
    results = [r for report in reference_site.bulk["DiagnosticReport"] for r in report.get("result", [])]
    assert len(results) > len(reference_site.bulk["DiagnosticReport"])  # reports list their observations
    assert any("addresses" in plan for plan in reference_site.bulk["CarePlan"])
    assert any("reasonReference" in m for m in reference_site.bulk["MedicationRequest"])


def test_encounter_reasons_and_care_plan_activities_follow_the_module(reference_site: ReferenceSite) -> None:
    encounters = {r["id"]: r for r in reference_site.bulk["Encounter"]}
    reasoned = [enc for record in reference_site.records for enc in record.encounters
                if enc.resource_id in encounters and isinstance(enc.reason, Entry) and enc.reason.codes]
    assert reasoned
    for enc in reasoned:
        coded = {c["code"] for c in encounters[enc.resource_id]["reasonCode"][0]["coding"]}
        assert enc.reason.codes[0].code in coded  # the site codes conditions in SNOMED CT, as the modules
    plans = {e.resource_id: e for e in _exported_encounter_entries(reference_site) if e.kind == "careplan"}
    for plan in reference_site.bulk["CarePlan"]:
        entry = plans[plan["id"]]
        if entry.code == codes.DIABETES_CAREPLAN.code:
            continue  # written by the codes.py path
        activity = [a["detail"]["code"]["coding"][0]["code"] for a in plan.get("activity", [])]
        assert activity == [a["code"] for a in entry.details.get("activities", [])]
        assert plan["category"][1]["coding"][0]["code"] == entry.code


def test_panels_are_one_observation_with_components(reference_site: ReferenceSite) -> None:
    panels = {e.resource_id: e for e in _exported_encounter_entries(reference_site)
              if e.kind == "panel" and e.code != codes.BP_PANEL.code}  # the codes.py path writes blood pressure
    written = [r for r in reference_site.bulk["Observation"] if r["id"] in panels]
    assert written
    for resource in written:
        parts = panels[resource["id"]].parts
        assert [c["code"]["coding"][0]["code"] for c in resource["component"]] == [p.code for p in parts]
        assert not any(p.resource_id in reference_site.by_id for p in parts)


def test_flatten_reconciles_and_quarantines_none_of_the_new_resources(reference_site: ReferenceSite) -> None:
    from fedlab.flatten import flatten_ndjson

    paths = sorted((reference_site.folder / "bulk").glob("*.ndjson"))
    result = flatten_ndjson(paths)
    reconciliation = result.harmonization()["reconciliation"]
    lines = sum(len(rows) for rows in reference_site.bulk.values())
    assert reconciliation["lines"] == lines and reconciliation["balanced"]
    assert result.quarantine == []
    conditions = result.tables["condition"]
    assert len(conditions) == len(reference_site.bulk["Condition"])


# ---------------------------------------------------------------- a small module of every exported kind

def _code(system: str, code: str, display: str) -> dict[str, str]:
    return {"system": system, "code": code, "display": display}


LOCAL_CONDITION = _code("SNOMED-CT", "73211009", "Diabetes mellitus (disorder)")
EVERY_KIND_MODULE = {
    "name": "every kind", "gmf_version": 2,
    "states": {
        "Initial": {"type": "Initial", "direct_transition": "Visit"},
        "Visit": {"type": "Encounter", "wellness": True, "direct_transition": "Diagnose"},
        "Diagnose": {"type": "ConditionOnset", "codes": [LOCAL_CONDITION, _code("ICD-10-CM", "E14", "Diabetes")],
                     "assign_to_attribute": "local_dm", "direct_transition": "Allergy"},
        "Allergy": {"type": "AllergyOnset", "allergy_type": "allergy", "category": "food",
                    "codes": [_code("SNOMED-CT", "91935009", "Allergy to peanuts")], "direct_transition": "Cut"},
        "Cut": {"type": "Procedure", "reason": "local_dm", "direct_transition": "Shot",
                "codes": [_code("SNOMED-CT", "180030006", "Amputation of the foot")]},
        "Shot": {"type": "Vaccine", "codes": [_code("CVX", "08", "Hep B, adolescent or pediatric")],
                 "direct_transition": "Drug"},
        "Drug": {"type": "MedicationOrder", "reason": "local_dm", "direct_transition": "Meter",
                 "codes": [_code("RxNorm", "1373463", "canagliflozin 100 MG Oral Tablet")],
                 "prescription": {"dosage": {"amount": 2, "frequency": 1, "period": 12, "unit": "hours"},
                                  "duration": {"quantity": 30, "unit": "days"}}},
        "Meter": {"type": "Device", "code": _code("SNOMED-CT", "337414009", "Blood glucose meter"),
                  "direct_transition": "Plan"},
        "Plan": {"type": "CarePlanStart", "reason": "local_dm", "direct_transition": "Mood",
                 "codes": [_code("SNOMED-CT", "735985000", "Diabetes self management plan")],
                 "activities": [_code("SNOMED-CT", "160670007", "Diabetic diet")]},
        "Mood": {"type": "Observation", "category": "survey", "direct_transition": "Local_Code",
                 "codes": [_code("LOINC", "44261-6", "PHQ-9 total")], "exact": {"quantity": 4}, "unit": "{score}"},
        "Local_Code": {"type": "Observation", "category": "exam", "direct_transition": "Done",
                       "codes": [_code("HospitalLocal", "X1", "Local exam")],
                       "value_code": _code("SNOMED-CT", "17621005", "Normal")},
        "Done": {"type": "EncounterEnd", "direct_transition": "Recheck"},
        "Recheck": {"type": "Encounter", "encounter_class": "ambulatory", "reason": "local_dm",
                    "codes": [_code("SNOMED-CT", "390906007", "Follow-up encounter")],
                    "direct_transition": "Recheck_End"},
        "Recheck_End": {"type": "EncounterEnd", "direct_transition": "Terminal"},
        "Terminal": {"type": "Terminal"},
    },
}


def _generate_with(tmp_path: Path, module: dict[str, Any], **site: Any) -> Path:
    """Generate two patients of one site with `module` as the only module; the site's bulk folder."""
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "every_kind.json").write_text(json.dumps(module))
    exp = experiment_from_dict({"name": "t", "seed": 3, "sites": [{"id": "a", "patients": 2, "seed": 1, **site}],
                                "generate": {"years_of_history": 40, "workers": 1, "modules_dir": str(modules)}},
                               root=tmp_path)
    with pytest.warns(UserWarning, match="no known FHIR URI, written as named: HospitalLocal"):
        return generate(exp, progress=False)["a"] / "bulk"


def test_a_module_of_every_exported_kind_is_written_in_synthea_shape(tmp_path: Path) -> None:
    from fhir.resources.R4B import get_fhir_model_class

    folder = _generate_with(tmp_path, EVERY_KIND_MODULE, condition_system="icd10").parent
    assert json.loads((folder / "_SUCCESS.json").read_text())["unknown_code_systems"] == ["HospitalLocal"]
    bulk = {p.stem: [json.loads(line) for line in p.read_text().splitlines()]
            for p in (folder / "bulk").glob("*.ndjson")}
    for resource_type, rows in bulk.items():
        for resource in rows:
            get_fhir_model_class(resource_type).model_validate(resource)
    condition = bulk["Condition"][0]
    # Not a codes.py condition: the ICD-10 site keeps the module's codings, both of them, systems mapped.
    assert [(c["system"], c["code"]) for c in condition["code"]["coding"]] == [
        (codes.SNOMED, "73211009"), (codes.ICD10CM, "E14")]
    assert condition["clinicalStatus"]["coding"][0]["code"] == "active"
    allergy = bulk["AllergyIntolerance"][0]
    assert (allergy["type"], allergy["category"], allergy["clinicalStatus"]["coding"][0]["code"]) == (
        "allergy", ["food"], "active")
    condition_ref = f"Condition/{condition['id']}"
    assert bulk["Procedure"][0]["reasonReference"][0]["reference"] == condition_ref
    assert bulk["MedicationRequest"][0]["reasonReference"][0]["reference"] == condition_ref
    dosage = bulk["MedicationRequest"][0]["dosageInstruction"][0]
    assert dosage["timing"]["repeat"] == {"frequency": 1, "period": 12, "periodUnit": "h"}
    assert dosage["doseAndRate"][0]["doseQuantity"] == {"value": 2}
    assert bulk["Immunization"][0]["vaccineCode"]["coding"][0] == {"system": codes.CVX, "code": "08",
                                                                  "display": "Hep B, adolescent or pediatric"}
    plan = bulk["CarePlan"][0]
    assert plan["addresses"] == [{"reference": condition_ref}]
    assert plan["activity"][0]["detail"]["code"]["coding"][0]["code"] == "160670007"
    assert bulk["Device"][0]["type"]["coding"][0]["system"] == codes.SNOMED
    observations = {o["code"]["coding"][0]["code"]: o for o in bulk["Observation"]}
    assert observations["44261-6"]["valueQuantity"] == {"value": 4, "unit": "{score}", "system": codes.UCUM,
                                                         "code": "{score}"}
    assert observations["X1"]["code"]["coding"][0]["system"] == "HospitalLocal"  # unknown name kept as written
    assert observations["X1"]["valueCodeableConcept"]["coding"][0]["system"] == codes.SNOMED
    rechecks = [e for e in bulk["Encounter"] if "reasonCode" in e]
    assert rechecks and all(e["reasonCode"][0]["coding"][0] == {
        "system": codes.SNOMED, "code": "73211009", "display": "Diabetes mellitus (disorder)"} for e in rechecks)
    # Synthea's order within an encounter.
    order = [r["resourceType"] for r in json.loads(next((folder / "fhir").glob("*_*.json")).read_text())["entry"]
             for r in [r["resource"]]]
    assert order[order.index("Encounter"):order.index("Encounter") + 10] == [
        "Encounter", "Condition", "AllergyIntolerance", "Observation", "Observation", "Procedure", "Device",
        "MedicationRequest", "Immunization", "CarePlan"]


def test_allergies_and_devices_map_to_r5(tmp_path: Path) -> None:
    from fedlab.fhir.r5 import DEVICE_PATIENT_EXTENSION, to_r5, validate_r5

    bulk = _generate_with(tmp_path, EVERY_KIND_MODULE)
    allergy = json.loads((bulk / "AllergyIntolerance.ndjson").read_text().splitlines()[0])
    device = json.loads((bulk / "Device.ndjson").read_text().splitlines()[0])
    r5_allergy, r5_device = to_r5(allergy), to_r5(device)
    validate_r5(r5_allergy)
    validate_r5(r5_device)
    assert r5_allergy["type"]["coding"][0]["code"] == allergy["type"]
    assert r5_device["name"][0]["value"] == device["deviceName"][0]["name"]
    assert r5_device["type"] == [device["type"]] and "patient" not in r5_device
    assert {"url": DEVICE_PATIENT_EXTENSION, "valueReference": device["patient"]} in r5_device["extension"]


def test_encounters_keep_the_module_encounter_codes(tmp_path: Path) -> None:
    """A module's own encounter code (not one of fedlab's encounter types) becomes Encounter.type;
    an encounter without codes (a `wellness: true` visit) keeps fedlab's type for its kind."""
    module = json.loads(json.dumps(EVERY_KIND_MODULE))
    module["states"]["Recheck"]["codes"] = [_code("SNOMED-CT", "185347001", "Encounter for problem")]
    bulk = _generate_with(tmp_path, module)
    types = [json.loads(line)["type"][0]["coding"][0]
             for line in (bulk / "Encounter.ndjson").read_text().splitlines()]
    assert {(c["system"], c["code"]) for c in types} == {
        (codes.SNOMED, codes.ENCOUNTER_TYPES["wellness"][1].code), (codes.SNOMED, "185347001")}
