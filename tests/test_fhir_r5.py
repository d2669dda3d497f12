"""R4 -> R5 mapping, validated with the `fhir.resources` R5 models; R5 served by `$export` on request."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests
from pydantic import ValidationError

from fedlab.fhir.bulk import BulkDataClient
from fedlab.fhir.r5 import R5MappingError, to_r5, validate_r5, wants_r5
from fedlab.fhir.server import SiteServer
from fedlab.fhir.smart import ClientKey, ClientRegistry
from fedlab.fhir.writeback import risk_assessment

MAPPED_TYPES = ("Patient", "Encounter", "Condition", "Observation", "MedicationRequest", "Procedure",
                "Immunization", "DiagnosticReport", "Organization", "Practitioner")


@pytest.fixture(scope="module")
def bulk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedlab.config import experiment_from_dict
    from fedlab.synthea import generate

    # diabetes risk raised so that the few patients have care plans (the one type R5 does not serve)
    site = {"id": "h1", "patients": 8, "seed": 9, "diabetes_risk": 8.0}
    exp = experiment_from_dict({"name": "r5", "sites": [site],
                                "generate": {"years_of_history": 5}}, root=tmp_path_factory.mktemp("r5"))
    return generate(exp)["h1"] / "bulk"


def _rows(folder: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / f"{name}.ndjson").read_text().splitlines()]


@pytest.mark.parametrize("resource_type", MAPPED_TYPES)
def test_generated_resources_validate_as_r5_after_mapping(bulk: Path, resource_type: str) -> None:
    rows = _rows(bulk, resource_type)
    assert rows
    for row in rows:
        validate_r5(to_r5(row))


def test_unmapped_r4_fails_r5_validation(bulk: Path) -> None:
    for resource_type in ("Encounter", "MedicationRequest"):
        with pytest.raises(ValidationError):
            validate_r5(_rows(bulk, resource_type)[0])


def test_encounter_mapping(bulk: Path) -> None:
    r4 = next(e for e in _rows(bulk, "Encounter") if "reasonCode" in e) if any(
        "reasonCode" in e for e in _rows(bulk, "Encounter")) else _rows(bulk, "Encounter")[0]
    r5 = to_r5(r4)
    assert r5["status"] == "completed" and r4["status"] == "finished"
    assert r5["class"] == [{"coding": [r4["class"]]}]
    assert r5["actualPeriod"] == r4["period"] and "period" not in r5
    assert r5["participant"][0]["actor"] == r4["participant"][0]["individual"]
    if "reasonCode" in r4:
        assert r5["reason"][0]["value"][0]["concept"] == r4["reasonCode"][0]
    with_refs = to_r5({"resourceType": "Encounter", "status": "finished",
                       "reasonReference": [{"reference": "Condition/c1"}]})
    assert with_refs["reason"] == [{"value": [{"reference": {"reference": "Condition/c1"}}]}]
    validate_r5(with_refs)


def test_medication_request_and_condition_mapping(bulk: Path) -> None:
    r4 = _rows(bulk, "MedicationRequest")[0]
    r5 = to_r5(r4)
    assert r5["medication"] == {"concept": r4["medicationCodeableConcept"]}
    if "reasonReference" in r4:
        assert r5["reason"][0] == {"reference": r4["reasonReference"][0]}
    condition = to_r5({"resourceType": "Condition", "subject": {"reference": "Patient/p"},
                       "abatementDateTime": "2020-01-01"})
    assert condition["clinicalStatus"]["coding"][0]["code"] == "resolved"
    validate_r5(condition)
    validate_r5(to_r5(risk_assessment("p", 0.3, "fedavg", "run")))


def test_unsupported_type_is_refused() -> None:
    with pytest.raises(R5MappingError, match="CarePlan/x: no R4 -> R5 mapping"):
        to_r5({"resourceType": "CarePlan", "id": "x"})


@pytest.mark.parametrize(("value", "expected"), [("application/fhir+json; fhirVersion=5.0", True),
                                                 ("application/fhir+json", False), ("5.0", True), ("4.0", False),
                                                 (None, False)])
def test_version_negotiation_values(value: str | None, expected: bool) -> None:
    assert wants_r5(value) is expected


@pytest.fixture(scope="module")
def key() -> ClientKey:
    return ClientKey.generate("ES384")


@pytest.fixture(scope="module")
def site(bulk: Path, key: ClientKey) -> SiteServer:
    registry = ClientRegistry()
    registry.register("node", key.jwks(), "system/*.rs")
    with SiteServer(bulk, registry) as server:
        yield server


def test_server_serves_r5_when_asked(site: SiteServer, bulk: Path, key: ClientKey, tmp_path: Path) -> None:
    assert _rows(bulk, "CarePlan"), "the fixture site needs a CarePlan for this test"
    types = ["Patient", "Encounter", "MedicationRequest", "CarePlan"]
    with BulkDataClient(site.base_url, "node", key, progress=False, min_wait_s=0.05, fhir_version="5.0") as client:
        result = client.export(tmp_path / "r5", types=types)
    assert result.fhir_version == "5.0.0" and result.manifest["fhirVersion"] == "5.0.0"
    assert {f.type for f in result.files} == {"Patient", "Encounter", "MedicationRequest"}
    for downloaded in result.files:
        for line in (tmp_path / "r5" / downloaded.name).read_text().splitlines():
            validate_r5(json.loads(line))
    assert result.errors and "CarePlan is not served as FHIR R5" in result.errors[0]["issue"][0]["diagnostics"]
    with BulkDataClient(site.base_url, "node", key, progress=False, min_wait_s=0.05) as client:
        r4 = client.export(tmp_path / "r4", types=["Encounter"])
    assert r4.fhir_version == "4.0.1" and "fhirVersion" not in r4.manifest
    first = json.loads((tmp_path / "r4" / "Encounter.ndjson").read_text().splitlines()[0])
    assert first["status"] == "finished"


def test_fhir_version_parameter_and_metadata(site: SiteServer, key: ClientKey) -> None:
    with BulkDataClient(site.base_url, "node", key, progress=False, min_wait_s=0.05) as client:
        token = client.access_token()
        auth = {"Authorization": f"Bearer {token}", "Prefer": "respond-async", "Accept": "application/fhir+json"}
        kicked = requests.get(f"{site.base_url}/$export", params={"_type": "Encounter", "_fhirVersion": "5.0"},
                              headers=auth, timeout=10)
        assert kicked.status_code == 202
        manifest = client.wait(kicked.headers["Content-Location"])
        assert manifest["fhirVersion"] == "5.0.0"
        client.delete(kicked.headers["Content-Location"])
        bad = requests.get(f"{site.base_url}/$export", params={"_fhirVersion": "3.0"}, headers=auth, timeout=10)
        assert bad.status_code == 400 and "3.0" in bad.json()["issue"][0]["diagnostics"]
    r5 = requests.get(f"{site.base_url}/metadata", headers={"Accept": "application/fhir+json; fhirVersion=5.0"},
                      timeout=10)
    assert r5.json()["fhirVersion"] == "5.0.0" and "fhirVersion=5.0" in r5.headers["Content-Type"]
    assert {"Subscription", "SubscriptionTopic", "RiskAssessment"} <= {r["type"] for r in r5.json()["rest"][0]["resource"]}
    assert requests.get(f"{site.base_url}/metadata", timeout=10).json()["fhirVersion"] == "4.0.1"
