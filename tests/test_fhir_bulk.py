"""Bulk Data `$export` end to end on loopback: server behaviour, client conformance, the export stage."""

from __future__ import annotations

import email.utils
import json
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import write_bulk

from fedlab.fhir.bulk import BulkDataClient, BulkDataError, parse_retry_after
from fedlab.fhir.server import Fault, SiteServer
from fedlab.fhir.smart import ClientKey, ClientRegistry, make_client_assertion

CLIENT = "node-test"
LOINC, SNOMED = "http://loinc.org", "http://snomed.info/sct"


def _obs(rid: str, patient: str, code: str, updated: str | None = None) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "Observation", "id": rid, "status": "final",
                                "subject": {"reference": f"Patient/{patient}"},
                                "code": {"coding": [{"system": LOINC, "code": code}]},
                                "valueQuantity": {"value": 6.1, "unit": "%"}}
    if updated:
        resource["meta"] = {"lastUpdated": updated}
    return resource


RESOURCES: dict[str, list[dict[str, Any]]] = {
    "Patient": [
        {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1960-01-01"},
        {"resourceType": "Patient", "id": "p2", "gender": "male", "birthDate": "1970-05-05"},
        {"resourceType": "Patient", "id": "p3", "gender": "male", "birthDate": "1980-09-09",
         "meta": {"lastUpdated": "2020-01-01T00:00:00Z"}},
    ],
    "Encounter": [{"resourceType": "Encounter", "id": f"e{i}", "status": "finished",
                   "subject": {"reference": f"Patient/p{i}"}} for i in (1, 2, 3)],
    "Condition": [
        {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"},
         "code": {"coding": [{"system": SNOMED, "code": "44054006"}]}},
        {"resourceType": "Condition", "id": "c2", "subject": {"reference": "Patient/p2"},
         "code": {"coding": [{"system": SNOMED, "code": "59621000"}]}},
    ],
    "Observation": [_obs("o1", "p1", "4548-4", "2020-01-01T00:00:00Z"), _obs("o2", "p2", "2339-0", "2025-06-01T00:00:00Z"),
                    _obs("o3", "p3", "4548-4"), _obs("o4", "p1", "2339-0")],
    "MedicationRequest": [{"resourceType": "MedicationRequest", "id": "m1", "status": "active", "intent": "order",
                           "subject": {"reference": "Patient/p1"},
                           "medicationCodeableConcept": {"coding": [{"code": "860975"}]}}],
    "Organization": [{"resourceType": "Organization", "id": "org1", "name": "General"}],
}


@pytest.fixture(scope="module")
def key() -> ClientKey:
    return ClientKey.generate("ES384")


@pytest.fixture(scope="module")
def registry(key: ClientKey) -> ClientRegistry:
    registry = ClientRegistry()
    registry.register(CLIENT, key.jwks(), "system/*.rs")
    return registry


@pytest.fixture(scope="module")
def bulk_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bulk(tmp_path_factory.mktemp("site"), RESOURCES)


@pytest.fixture(scope="module")
def site(bulk_dir: Path, registry: ClientRegistry):
    with SiteServer(bulk_dir, registry) as server:
        yield server


def client_for(server: SiteServer, key: ClientKey, **options: Any) -> BulkDataClient:
    options = {"min_wait_s": 0.01, "max_retry_after_s": 0.05, "progress": False, **options}
    return BulkDataClient(server.base_url, CLIENT, key, "system/*.rs", **options)


def read_ids(folder: Path, name: str) -> list[str]:
    return [json.loads(line)["id"] for line in (folder / name).read_text().splitlines()]


def exported_ids(result: Any, folder: Path) -> dict[str, list[str]]:
    return {f.type: read_ids(folder, f.name) for f in result.files}


def raw_token(server: SiteServer, key: ClientKey) -> str:
    token_url = f"{server.base_url}/auth/token"
    form = {"grant_type": "client_credentials", "scope": "system/*.rs",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": make_client_assertion(CLIENT, token_url, key)}
    return requests.post(token_url, data=form, timeout=10).json()["access_token"]


def raw_kickoff(server: SiteServer, token: str, path: str = "/$export", **headers: str) -> requests.Response:
    base = {"Accept": "application/fhir+json", "Prefer": "respond-async", "Authorization": f"Bearer {token}"}
    return requests.get(server.base_url + path, headers={**base, **headers}, timeout=10)


# ---------------------------------------------------------------- the whole flow
def test_end_to_end_system_export(bulk_dir: Path, registry: ClientRegistry, key: ClientKey, tmp_path: Path) -> None:
    with SiteServer(bulk_dir, registry, job_delay_s=0.4) as server, client_for(server, key) as client:
        status_url = client.kickoff("system")
        token = client.access_token()
        first = requests.get(status_url, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert first.status_code == 202 and first.headers["X-Progress"] and first.headers["Retry-After"] == "1"
        manifest = client.wait(status_url)
        assert any(e.startswith("202 in progress") for e in client.events)
        assert manifest["requiresAccessToken"] is True and manifest["error"] == []
        assert manifest["request"].endswith("/$export") and manifest["transactionTime"].endswith("Z")
        assert {o["type"]: o["count"] for o in manifest["output"]} == {k: len(v) for k, v in RESOURCES.items()}
        unauthenticated = requests.get(manifest["output"][0]["url"], timeout=10)
        assert unauthenticated.status_code == 401
        files = client.download(manifest, tmp_path / "out")
        assert all(f.lines == f.count for f in files)
        assert sorted(read_ids(tmp_path / "out", "Observation.ndjson")) == ["o1", "o2", "o3", "o4"]
        assert json.loads((tmp_path / "out" / "Patient.ndjson").read_text().splitlines()[0]) == RESOURCES["Patient"][0]
        assert client.delete(status_url) == 202
        gone = requests.get(status_url, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert gone.status_code == 404 and gone.json()["resourceType"] == "OperationOutcome"
        assert requests.get(manifest["output"][0]["url"], headers={"Authorization": f"Bearer {token}"},
                            timeout=10).status_code == 404


def test_capability_statement(site: SiteServer) -> None:
    cap = requests.get(f"{site.base_url}/metadata", timeout=10).json()
    assert cap["resourceType"] == "CapabilityStatement" and cap["fhirVersion"] == "4.0.1"
    assert cap["rest"][0]["operation"][0]["name"] == "export"
    assert {r["type"] for r in cap["rest"][0]["resource"]} == {"Patient", "Group"}


def test_type_parameter(site: SiteServer, key: ClientKey, tmp_path: Path) -> None:
    with client_for(site, key) as client:
        result = client.export(tmp_path, types=["Patient", "Condition"])
    assert exported_ids(result, tmp_path) == {"Patient": ["p1", "p2", "p3"], "Condition": ["c1", "c2"]}


def test_since_excludes_older_resources(site: SiteServer, key: ClientKey, tmp_path: Path) -> None:
    with client_for(site, key) as client:
        result = client.export(tmp_path, types=["Patient", "Observation"], since="2024-01-01T00:00:00+00:00")
    ids = exported_ids(result, tmp_path)
    # o1 and p3 were last updated in 2020; resources without meta.lastUpdated date from the folder's generation.
    assert ids == {"Patient": ["p1", "p2"], "Observation": ["o2", "o3", "o4"]}
    with client_for(site, key) as client:
        later = client.export(tmp_path / "later", since=result.transaction_time)
    assert later.files == [] and later.manifest["output"] == []


def test_patient_level_post_with_patient_parameter(site: SiteServer, key: ClientKey, tmp_path: Path) -> None:
    with client_for(site, key) as client:
        result = client.export(tmp_path, "patient", patients=["Patient/p1", "Patient/nobody"])
    assert exported_ids(result, tmp_path) == {"Patient": ["p1"], "Encounter": ["e1"], "Condition": ["c1"],
                                              "Observation": ["o1", "o4"], "MedicationRequest": ["m1"]}
    assert len(result.errors) == 1 and "Patient/nobody" in result.errors[0]["issue"][0]["diagnostics"]


def test_patient_parameter_rejected_on_get(site: SiteServer, key: ClientKey) -> None:
    response = raw_kickoff(site, raw_token(site, key), "/Patient/$export?patient=Patient/p1")
    assert response.status_code == 400 and "POST" in response.json()["issue"][0]["diagnostics"]


def test_group_export(site: SiteServer, key: ClientKey, tmp_path: Path) -> None:
    with client_for(site, key) as client:
        result = client.export(tmp_path, "group", group_id="all")
    ids = exported_ids(result, tmp_path)
    assert "Organization" not in ids and ids["Encounter"] == ["e1", "e2", "e3"]
    missing = raw_kickoff(site, raw_token(site, key), "/Group/unknown/$export")
    assert missing.status_code == 404 and missing.json()["resourceType"] == "OperationOutcome"


def test_type_filter_on_code(site: SiteServer, key: ClientKey, tmp_path: Path) -> None:
    with client_for(site, key) as client:
        result = client.export(tmp_path, types=["Observation", "Condition"],
                               type_filters=[f"Observation?code={LOINC}|4548-4,Condition?code=44054006"])
    assert exported_ids(result, tmp_path) == {"Condition": ["c1"], "Observation": ["o1", "o3"]}
    response = raw_kickoff(site, raw_token(site, key), "/$export?_typeFilter=Observation%3Fvalue-quantity%3Dgt5")
    assert response.status_code == 400 and "value-quantity" in response.json()["issue"][0]["diagnostics"]


def test_elements_subsets_resources(site: SiteServer, key: ClientKey, tmp_path: Path) -> None:
    with client_for(site, key) as client:
        result = client.export(tmp_path, types=["Patient"], elements=["Patient.gender"])
    rows = [json.loads(line) for line in (tmp_path / result.files[0].name).read_text().splitlines()]
    assert set(rows[0]) == {"resourceType", "id", "meta", "gender"}
    assert rows[0]["meta"]["tag"][-1]["code"] == "SUBSETTED"


@pytest.mark.parametrize("fmt", ["application/fhir+ndjson", "application/ndjson", "ndjson"])
def test_output_format_spellings_accepted(site: SiteServer, key: ClientKey, fmt: str) -> None:
    response = requests.get(f"{site.base_url}/$export", params={"_outputFormat": fmt, "_type": "Patient"},
                            headers={"Accept": "application/fhir+json", "Prefer": "respond-async",
                                     "Authorization": f"Bearer {raw_token(site, key)}"}, timeout=10)
    assert response.status_code == 202 and response.headers["Content-Location"]


@pytest.mark.parametrize("query,expected", [("_outputFormat=text/csv", "_outputFormat"),
                                             ("_since=yesterday", "_since"),
                                             ("includeAssociatedData=LatestProvenanceResources", "not supported")])
def test_bad_parameters_rejected(site: SiteServer, key: ClientKey, query: str, expected: str) -> None:
    response = raw_kickoff(site, raw_token(site, key), f"/$export?{query}")
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"
    assert expected in response.json()["issue"][0]["diagnostics"]


def test_prefer_respond_async_required(site: SiteServer, key: ClientKey) -> None:
    response = raw_kickoff(site, raw_token(site, key), Prefer="return=representation")
    assert response.status_code == 400 and "respond-async" in response.json()["issue"][0]["diagnostics"]


def test_too_many_concurrent_jobs(bulk_dir: Path, registry: ClientRegistry, key: ClientKey) -> None:
    with SiteServer(bulk_dir, registry, job_delay_s=30, max_concurrent_jobs=1) as server:
        token = raw_token(server, key)
        first = raw_kickoff(server, token)
        assert first.status_code == 202
        second = raw_kickoff(server, token)
        assert second.status_code == 429 and second.headers["Retry-After"]
        assert second.json()["issue"][0]["code"] == "throttled"
        deleted = requests.delete(first.headers["Content-Location"], headers={"Authorization": f"Bearer {token}"},
                                  timeout=10)
        assert deleted.status_code == 202
        assert raw_kickoff(server, token).status_code == 202


def test_split_outputs_per_max_lines(bulk_dir: Path, registry: ClientRegistry, key: ClientKey, tmp_path: Path) -> None:
    with SiteServer(bulk_dir, registry, max_lines_per_file=2) as server, client_for(server, key) as client:
        result = client.export(tmp_path, types=["Observation"])
    assert [(f.name, f.count) for f in result.files] == [("Observation.1.ndjson", 2), ("Observation.2.ndjson", 2)]
    assert read_ids(tmp_path, "Observation.1.ndjson") + read_ids(tmp_path, "Observation.2.ndjson") == \
        ["o1", "o2", "o3", "o4"]


# ---------------------------------------------------------------- client robustness
def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("7", now) == 7
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == pytest.approx(30)
    assert parse_retry_after(str(int(now + 12)), now) == pytest.approx(12)  # absolute epoch seconds
    assert parse_retry_after("soon", now) is None and parse_retry_after(None, now) is None


def test_client_retries_503_429_and_transient(bulk_dir: Path, registry: ClientRegistry, key: ClientKey,
                                              tmp_path: Path) -> None:
    with SiteServer(bulk_dir, registry) as server, client_for(server, key) as client:
        http_date = email.utils.formatdate(time.time() + 1, usegmt=True)
        server.faults.add("token", Fault(503, retry_after="1"))
        server.faults.add("kickoff", Fault(503, retry_after="1"))
        server.faults.add("kickoff", Fault(429, retry_after=http_date))
        server.faults.add("status", Fault(500, transient=True))
        server.faults.add("status", Fault(429, retry_after=str(int(time.time()) + 5)))
        server.faults.add("download", Fault(503, retry_after="1"), times=2)
        result = client.export(tmp_path, types=["Patient", "Condition"])
    assert server.faults.served == {"token": 1, "kickoff": 2, "status": 2, "download": 2}
    assert [f.lines for f in result.files] == [3, 2]
    assert sum("HTTP 429" in e for e in client.events) == 2 and sum("HTTP 503" in e for e in client.events) == 2


def test_client_gives_up_on_persistent_failure(bulk_dir: Path, registry: ClientRegistry, key: ClientKey,
                                               tmp_path: Path) -> None:
    with SiteServer(bulk_dir, registry) as server, client_for(server, key, max_attempts=3) as client:
        server.faults.add("kickoff", Fault(503), times=5)
        with pytest.raises(BulkDataError, match="kick-off refused .*HTTP 503"):
            client.export(tmp_path)


def test_truncated_download_every_time_raises_and_leaves_no_file(bulk_dir: Path, registry: ClientRegistry,
                                                                 key: ClientKey, tmp_path: Path) -> None:
    with SiteServer(bulk_dir, registry) as server, client_for(server, key, max_attempts=3) as client:
        server.faults.add("download", Fault(200, truncate_lines=1), times=3)
        with pytest.raises(BulkDataError, match=r"1 lines for Patient.ndjson .*count=3.*gave up after 3"):
            client.export(tmp_path / "out", types=["Patient"])
    assert list((tmp_path / "out").iterdir()) == []


ABSURD_RETRY_AFTER = "86400000"  # 1,000 days: the client must cap it, not sleep
FAULT_SCHEDULES: dict[str, list[tuple[str, Fault, int]]] = {
    "5xx bursts": [("token", Fault(503), 2), ("kickoff", Fault(502), 3), ("status", Fault(500), 3),
                   ("download", Fault(503), 3)],
    "429 delta-seconds": [("kickoff", Fault(429, retry_after="1"), 2), ("status", Fault(429, retry_after="1"), 2)],
    "429 HTTP-date": [("kickoff", Fault(429, retry_after="HTTPDATE"), 1),
                      ("status", Fault(429, retry_after="HTTPDATE"), 2)],
    "429 absurd Retry-After": [("kickoff", Fault(429, retry_after=ABSURD_RETRY_AFTER), 1),
                               ("status", Fault(429, retry_after=ABSURD_RETRY_AFTER), 2),
                               ("download", Fault(429, retry_after=ABSURD_RETRY_AFTER), 1)],
    "transient OperationOutcome": [("status", Fault(500, transient=True), 2)],
    "connection reset mid-download": [("download", Fault(200, reset_after_lines=1), 2)],
    "truncated file": [("download", Fault(200, truncate_lines=1), 2)],
    "token expiry mid-export": [],
    "everything at once": [("token", Fault(503), 1), ("kickoff", Fault(429, retry_after="1"), 1),
                           ("status", Fault(500, transient=True), 1),
                           ("download", Fault(200, reset_after_lines=2), 1),
                           ("download", Fault(200, truncate_lines=1), 1)],
}


@pytest.mark.parametrize("schedule", list(FAULT_SCHEDULES), ids=list(FAULT_SCHEDULES))
def test_fault_matrix_completes_with_manifest_counts_and_no_partial_files(
        schedule: str, bulk_dir: Path, registry: ClientRegistry, key: ClientKey, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with SiteServer(bulk_dir, registry, job_delay_s=0.1) as server, client_for(server, key) as client:
        for kind, fault, times in FAULT_SCHEDULES[schedule]:
            if fault.retry_after == "HTTPDATE":
                fault = Fault(fault.status, retry_after=email.utils.formatdate(time.time() + 1, usegmt=True))
            server.faults.add(kind, fault, times)
        if schedule == "token expiry mid-export":
            status_url = client.kickoff(types=["Patient", "Condition"])
            server.issuer.revoke_all()  # every token issued so far is now invalid, as if expired
            manifest = client.wait(status_url)
            server.issuer.revoke_all()
            files = client.download(manifest, out)
            client.delete(status_url)
        else:
            result = client.export(out, types=["Patient", "Condition"])
            manifest, files = result.manifest, result.files
        injected = sum(times for _, _, times in FAULT_SCHEDULES[schedule])
        assert sum(server.faults.served.values()) == injected, "every injected fault was met"
        if "reset" in schedule:
            assert any("connection broken mid-download" in e for e in client.events), client.events
    counts = {e["type"]: e["count"] for e in manifest["output"]}
    assert {f.type: f.lines for f in files} == counts == {"Patient": 3, "Condition": 2}
    assert sorted(p.name for p in out.iterdir()) == ["Condition.ndjson", "Patient.ndjson"]
    for f in files:
        assert len((out / f.name).read_text().splitlines()) == counts[f.type]


def test_rerun_skips_complete_files(site: SiteServer, key: ClientKey, tmp_path: Path) -> None:
    with client_for(site, key) as client:
        status_url = client.kickoff(types=["Patient", "Encounter"])
        manifest = client.wait(status_url)
        first = client.download(manifest, tmp_path)
        (tmp_path / "Encounter.ndjson").write_text('{"resourceType": "Encounter", "id": "partial"}\n')
        second = client.download(manifest, tmp_path)
        client.delete(status_url)
    assert [f.skipped for f in first] == [False, False] and [f.skipped for f in second] == [True, False]
    assert read_ids(tmp_path, "Encounter.ndjson") == ["e1", "e2", "e3"]


def test_token_refreshed_after_401_mid_export(bulk_dir: Path, registry: ClientRegistry, key: ClientKey,
                                              tmp_path: Path) -> None:
    with SiteServer(bulk_dir, registry, job_delay_s=0.2) as server, client_for(server, key) as client:
        status_url = client.kickoff(types=["Patient"])
        server.issuer.revoke_all()
        manifest = client.wait(status_url)
        server.issuer.revoke_all()
        files = client.download(manifest, tmp_path)
        client.delete(status_url)
    assert files[0].lines == 3 and sum(e.startswith("401") for e in client.events) == 2


def test_spaced_json_lines_give_same_results(tmp_path: Path, registry: ClientRegistry, key: ClientKey,
                                             site: SiteServer) -> None:
    spaced = write_bulk(tmp_path / "spaced", RESOURCES, compact=False)
    runs = [("system", {}), ("system", {"since": "2024-01-01T00:00:00Z"}), ("patient", {"patients": ["p2"]})]
    with SiteServer(spaced, registry) as spaced_site, client_for(spaced_site, key) as spaced_client, \
            client_for(site, key) as compact_client:
        for index, (level, args) in enumerate(runs):
            a = spaced_client.export(tmp_path / f"a{index}", level, **args)
            b = compact_client.export(tmp_path / f"b{index}", level, **args)
            assert exported_ids(a, tmp_path / f"a{index}") == exported_ids(b, tmp_path / f"b{index}")


@pytest.mark.parametrize("bad_line,message", [("{not json", "not valid JSON"),
                                              ('{"resourceType":"Patient","id":"cut', "not valid JSON"),
                                              ('{"resourceType":"Encounter","id":"e9"}', "expected a Patient resource, found 'Encounter'")])
def test_bad_source_line_fails_job_with_file_and_line(tmp_path: Path, registry: ClientRegistry, key: ClientKey,
                                                      bad_line: str, message: str) -> None:
    bulk = write_bulk(tmp_path / "site", {"Patient": RESOURCES["Patient"]})
    with open(bulk / "Patient.ndjson", "a") as handle:
        handle.write("\n" + bad_line + "\n")
    with SiteServer(bulk, registry) as server, client_for(server, key) as client:
        with pytest.raises(BulkDataError, match=rf"Patient.ndjson:5: {message}"):
            client.export(tmp_path / "out")


# ---------------------------------------------------------------- the export stage
def _tiny_experiment(root: Path):
    from fedlab.config import experiment_from_dict

    data = {"name": "tiny", "sites": [{"id": "alpha", "patients": 3, "seed": 1}, {"id": "beta", "patients": 3, "seed": 2}],
            "export": {"types": ["Patient", "Observation", "Condition"]}}
    return experiment_from_dict(data, root=root)


def test_export_stage(tmp_path: Path) -> None:
    from fedlab.fhir.export import ExportStageError, export
    from fedlab.io import read_json

    exp = _tiny_experiment(tmp_path)
    with pytest.raises(ExportStageError, match=r"site 'alpha'.*fedlab generate"):
        export(exp, progress=False)
    for site in exp.site_ids:
        site_dir = exp.data_path("synthea", None, site)
        write_bulk(site_dir, RESOURCES)
        (site_dir / "_SUCCESS.json").write_text("{}")
    paths = export(exp, progress=False)
    assert set(paths) == {"alpha", "beta"} and paths["alpha"] == tmp_path / "data" / "export" / "tiny" / "alpha"
    folder = paths["alpha"]
    assert sorted(p.name for p in folder.iterdir()) == ["Condition.ndjson", "Observation.ndjson", "Patient.ndjson",
                                                         "_SUCCESS.json", "manifest.json"]
    manifest = read_json(folder / "manifest.json")
    assert manifest["transactionTime"] and manifest["requiresAccessToken"] is True
    assert {f["type"]: (f["count"], f["lines"]) for f in manifest["files"]} == \
        {"Patient": (3, 3), "Observation": (4, 4), "Condition": (2, 2)}
    assert manifest["export_request"]["types"] == ["Patient", "Observation", "Condition"]
    assert read_json(folder / "_SUCCESS.json")["counts"] == {"Patient": 3, "Observation": 4, "Condition": 2}
    assert (tmp_path / "data" / "export" / "tiny" / "_keys" / "alpha" / "jwks.json").is_file()
    before = (folder / "_SUCCESS.json").stat().st_mtime_ns
    export(exp, sites=["alpha"], progress=False)
    assert (folder / "_SUCCESS.json").stat().st_mtime_ns == before
    export(exp, sites=["alpha"], force=True, progress=False)
    assert (folder / "_SUCCESS.json").stat().st_mtime_ns != before
