"""Write-back of predictions as RiskAssessments: transaction POST over loopback with real tokens, audit log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import write_bulk

from fedlab.fhir.bulk import BulkDataClient
from fedlab.fhir.deid import DeidPolicy
from fedlab.fhir.server import SiteServer
from fedlab.fhir.smart import ClientKey, ClientRegistry
from fedlab.fhir.writeback import (
    T2D_CODE,
    WriteBackError,
    build_risk_assessments,
    transaction_bundle,
    write_back,
)

PATIENTS = [{"resourceType": "Patient", "id": f"p{i}", "gender": "female", "birthDate": "1960-01-01",
             "name": [{"family": f"Family{i}"}]} for i in (1, 2, 3)]
OBSERVATIONS = [{"resourceType": "Observation", "id": "o1", "status": "final", "subject": {"reference": "Patient/p1"},
                 "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
                 "effectiveDateTime": "2020-01-01T00:00:00Z", "valueQuantity": {"value": 6.1, "unit": "%"}}]
WRITER, READER, V1_WRITER = "node-writer", "node-reader", "node-v1"


@pytest.fixture(scope="module")
def key() -> ClientKey:
    return ClientKey.generate("ES384")


@pytest.fixture(scope="module")
def registry(key: ClientKey) -> ClientRegistry:
    registry = ClientRegistry()
    registry.register(WRITER, key.jwks(), "system/*.rs system/RiskAssessment.cu")
    registry.register(READER, key.jwks(), "system/*.rs")
    registry.register(V1_WRITER, key.jwks(), "system/*.read system/RiskAssessment.write")
    return registry


@pytest.fixture()
def site(tmp_path: Path, registry: ClientRegistry) -> SiteServer:
    with SiteServer(write_bulk(tmp_path, {"Patient": PATIENTS, "Observation": OBSERVATIONS}), registry, work_dir=tmp_path / "work") as server:
        yield server


def _client(site: SiteServer, key: ClientKey, client_id: str = READER, scope: str = "system/*.rs") -> BulkDataClient:
    return BulkDataClient(site.base_url, client_id, key, scope, progress=False, min_wait_s=0.05,
                          max_retry_after_s=0.2)


def _export(site: SiteServer, key: ClientKey, dest: Path, **kickoff: Any) -> tuple[str, dict[str, list[dict]]]:
    with _client(site, key) as client:
        result = client.export(dest, **kickoff)
    rows = {f.type: [json.loads(line) for line in (dest / f.name).read_text().splitlines()] for f in result.files}
    return result.transaction_time, rows


def _post(site: SiteServer, key: ClientKey, bundle: dict[str, Any], client_id: str, scope: str) -> requests.Response:
    with _client(site, key, client_id, scope) as client:
        token = client.access_token()
    return requests.post(site.base_url + "/", json=bundle, timeout=10,
                         headers={"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"})


PREDICTIONS = [{"patient_id": "p1", "probability": 0.12}, {"patient_id": "p2", "probability": 0.81}]


def test_write_back_then_reexport(site: SiteServer, key: ClientKey, tmp_path: Path) -> None:
    before, _ = _export(site, key, tmp_path / "first")
    response = write_back(site.base_url, WRITER, key, PREDICTIONS, "fedavg", "smoke")
    assert response["type"] == "transaction-response" and len(response["entry"]) == 2
    assert all(e["response"]["status"].startswith("201") and e["response"]["location"].startswith("RiskAssessment/")
               for e in response["entry"])
    _, rows = _export(site, key, tmp_path / "second", types=["RiskAssessment"], since=before)
    stored = sorted(rows["RiskAssessment"], key=lambda r: r["subject"]["reference"])
    assert [r["subject"]["reference"] for r in stored] == ["Patient/p1", "Patient/p2"]
    assert [r["prediction"][0]["probabilityDecimal"] for r in stored] == [0.12, 0.81]
    assert stored[0]["prediction"][0]["outcome"]["coding"][0]["code"] == T2D_CODE
    assert stored[0]["status"] == "final" and "fedavg" in stored[0]["method"]["text"] and stored[0]["meta"]["lastUpdated"]
    ids = {e["response"]["location"].split("/")[1] for e in response["entry"]}
    assert {r["id"] for r in stored} == ids
    _, since_rows = _export(site, key, tmp_path / "third", types=["RiskAssessment", "Observation"], since=before)
    assert set(since_rows) == {"RiskAssessment"}  # nothing else changed since the first export
    later, _ = _export(site, key, tmp_path / "fourth")
    _, empty = _export(site, key, tmp_path / "fifth", types=["RiskAssessment"], since=later)
    assert empty == {}


def test_v1_write_scope_is_accepted(site: SiteServer, key: ClientKey) -> None:
    response = write_back(site.base_url, V1_WRITER, key, PREDICTIONS[:1], "local", "smoke",
                          scope="system/RiskAssessment.write")
    assert response["entry"][0]["response"]["status"].startswith("201")


def test_token_without_create_scope_is_forbidden(site: SiteServer, key: ClientKey, tmp_path: Path) -> None:
    with pytest.raises(WriteBackError, match="HTTP 403") as caught:
        write_back(site.base_url, READER, key, PREDICTIONS, "fedavg", "smoke", scope="system/*.rs")
    assert caught.value.status == 403
    _, rows = _export(site, key, tmp_path / "out", types=["RiskAssessment"])
    assert rows == {}
    assert any(r["event"] == "write-back-denied" and r["client_id"] == READER for r in site.audit_records())


@pytest.mark.parametrize(("mutate", "status", "where"), [
    (lambda b: b["entry"][1]["resource"]["prediction"][0].update(probabilityDecimal=1.5), 422,
     "Bundle.entry[1].resource.prediction[0].probabilityDecimal"),
    (lambda b: b["entry"][2]["resource"].update(subject={"reference": "Patient/nobody"}), 422,
     "Bundle.entry[2].resource.subject.reference"),
    (lambda b: b["entry"][1]["resource"].update(statuz="final"), 400, "Bundle.entry[1].resource.statuz"),
    (lambda b: b["entry"][0]["resource"]["prediction"][0].update(probabilityDecimal="high"), 400,
     "Bundle.entry[0].resource.prediction[0].probabilityDecimal"),
    (lambda b: b["entry"][0]["request"].update(method="PUT"), 400, "Bundle.entry[0].request.method"),
    (lambda b: b.update(type="batch"), 400, "Bundle.type"),
])
def test_invalid_entry_rejects_the_whole_transaction(site: SiteServer, key: ClientKey, tmp_path: Path, mutate: Any,
                                                     status: int, where: str) -> None:
    predictions = [*PREDICTIONS, {"patient_id": "p3", "probability": 0.5}]
    bundle = transaction_bundle(build_risk_assessments(predictions, "fedavg", "smoke"))
    mutate(bundle)
    response = _post(site, key, bundle, WRITER, "system/RiskAssessment.cu")
    assert response.status_code == status
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["expression"] == [where] and where in outcome["issue"][0]["diagnostics"]
    _, rows = _export(site, key, tmp_path / "out", types=["RiskAssessment"])
    assert rows == {}  # nothing stored, not even the valid entries
    rejected = [r for r in site.audit_records() if r["event"] == "write-back-rejected"]
    assert rejected and rejected[-1]["where"] == where


def test_audit_log_records_who_did_what(site: SiteServer, key: ClientKey, tmp_path: Path) -> None:
    write_back(site.base_url, WRITER, key, PREDICTIONS, "fedavg", "smoke")
    _export(site, key, tmp_path / "out", types=["Patient", "RiskAssessment"])
    records = site.audit_records()
    assert (tmp_path / "work" / "audit.jsonl").is_file()
    events = [r["event"] for r in records]
    for expected in ("token-issued", "write-back", "export-kickoff", "export-complete", "download", "export-deleted"):
        assert expected in events, expected
    issued = [r for r in records if r["event"] == "token-issued"]
    assert {r["client_id"] for r in issued} == {WRITER, READER}
    assert any(r["scopes"] == "system/RiskAssessment.cu" for r in issued)
    write = next(r for r in records if r["event"] == "write-back")
    assert write["client_id"] == WRITER and write["patients"] == ["p1", "p2"] and write["entries"] == 2
    kickoff = next(r for r in records if r["event"] == "export-kickoff")
    complete = next(r for r in records if r["event"] == "export-complete" and r["job_id"] == kickoff["job_id"])
    assert kickoff["client_id"] == READER and kickoff["types"] == ["Patient", "RiskAssessment"]
    assert complete["counts"] == {"Patient": 3, "RiskAssessment": 2}
    downloads = [r for r in records if r["event"] == "download" and r["job_id"] == kickoff["job_id"]]
    assert sorted(r["type"] for r in downloads) == ["Patient", "RiskAssessment"]
    assert all(r["time"].endswith("Z") for r in records)


def test_write_back_by_pseudonym_on_a_deidentifying_site(tmp_path: Path, registry: ClientRegistry,
                                                         key: ClientKey) -> None:
    policy = DeidPolicy("hospital-secret")
    with SiteServer(write_bulk(tmp_path, {"Patient": PATIENTS, "Observation": OBSERVATIONS}), registry, deid_policy=policy) as site:
        _, rows = _export(site, key, tmp_path / "first", types=["Patient"])
        pseudonyms = sorted(r["id"] for r in rows["Patient"])
        assert "p1" not in pseudonyms and policy.pseudonym("p1") in pseudonyms
        assert all("name" not in r for r in rows["Patient"])
        write_back(site.base_url, WRITER, key, [{"patient_id": policy.pseudonym("p2"), "probability": 0.4}],
                   "fedavg", "smoke")
        stored_raw = json.loads(site.state.added["RiskAssessment"][0])
        assert stored_raw["subject"]["reference"] == "Patient/p2"  # the hospital relinks its own patient
        _, again = _export(site, key, tmp_path / "second", types=["RiskAssessment"])
        assert again["RiskAssessment"][0]["subject"]["reference"] == f"Patient/{policy.pseudonym('p2')}"
