"""Topic-based Subscriptions over loopback: handshake, heartbeats, event notifications, incremental export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests

from fedlab.fhir.bulk import BulkDataClient
from fedlab.fhir.server import SiteServer
from fedlab.fhir.smart import ClientKey, ClientRegistry
from fedlab.fhir.subscriptions import (
    IncrementalExporter,
    Notification,
    NotificationReceiver,
    backport_subscription,
    r5_subscription,
    topic_url,
)

PATIENTS = [{"resourceType": "Patient", "id": p, "gender": "male", "birthDate": "1970-01-01"} for p in ("p1", "p2")]


def _obs(rid: str, patient: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": rid, "status": "final", "subject": {"reference": f"Patient/{patient}"},
            "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
            "effectiveDateTime": "2026-01-01T10:00:00Z", "valueQuantity": {"value": 101.0, "unit": "mg/dL"}}


@pytest.fixture(scope="module")
def key() -> ClientKey:
    return ClientKey.generate("ES384")


@pytest.fixture()
def site(tmp_path: Path, key: ClientKey) -> SiteServer:
    bulk = tmp_path / "bulk"
    bulk.mkdir()
    (bulk / "Patient.ndjson").write_text("".join(json.dumps(p) + "\n" for p in PATIENTS))
    (bulk / "Observation.ndjson").write_text(json.dumps(_obs("old-1", "p1")) + "\n")
    registry = ClientRegistry()
    registry.register("node", key.jwks(), "system/*.rs")
    registry.register("patients-only", key.jwks(), "system/Patient.rs")
    with SiteServer(bulk, registry) as server:
        yield server


@pytest.fixture()
def receiver() -> NotificationReceiver:
    with NotificationReceiver() as endpoint:
        yield endpoint


def _client(site: SiteServer, key: ClientKey, client_id: str = "node", scope: str = "system/*.rs") -> BulkDataClient:
    return BulkDataClient(site.base_url, client_id, key, scope, progress=False, min_wait_s=0.05,
                          max_retry_after_s=0.2)


def _subscribe(site: SiteServer, key: ClientKey, body: dict[str, Any], client_id: str = "node",
               scope: str = "system/*.rs") -> requests.Response:
    with _client(site, key, client_id, scope) as client:
        token = client.access_token()
    return requests.post(f"{site.base_url}/Subscription", json=body, timeout=10,
                         headers={"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"})


def _events(notifications: list[Notification]) -> list[tuple[int, str | None]]:
    return [event for n in notifications if n.type == "event-notification" for event in n.events]


def _has_events(count: int):
    return lambda notifications: len(_events(notifications)) >= count


def test_r5_subscription_drives_incremental_export(site: SiteServer, key: ClientKey, receiver: NotificationReceiver,
                                                   tmp_path: Path) -> None:
    from fhir.resources.bundle import Bundle

    created = _subscribe(site, key, r5_subscription(site.base_url, receiver.endpoint, heartbeat_s=1,
                                                     content="full-resource"))
    assert created.status_code == 201 and created.json()["status"] == "active"
    assert created.headers["Location"].endswith(f"/Subscription/{created.json()['id']}")
    handshake = receiver.wait_for(lambda ns: any(n.type == "handshake" for n in ns))[0]
    assert handshake.type == "handshake" and handshake.topic == topic_url(site.base_url)
    receiver.wait_for(lambda ns: any(n.type == "heartbeat" for n in ns), timeout_s=10)

    with _client(site, key) as client:
        exporter = IncrementalExporter(client, tmp_path / "node", types=["Observation"])
        first = exporter.sync()
        assert [r["id"] for r in first] == ["old-1"]
        added = site.add_resources([_obs("new-1", "p1"), _obs("new-2", "p2"), _obs("new-3", "p1")])
        assert all(r["meta"]["lastUpdated"] for r in added)
        notifications = receiver.wait_for(_has_events(3))
        assert [number for number, _ in _events(notifications)] == [1, 2, 3]
        assert [focus for _, focus in _events(notifications)] == [f"Observation/new-{i}" for i in (1, 2, 3)]
        event = next(n for n in notifications if n.type == "event-notification")
        Bundle.model_validate(event.bundle)  # R5 structure, incl. the SubscriptionStatus entry
        assert event.bundle["type"] == "subscription-notification"
        assert event.bundle["entry"][0]["resource"]["resourceType"] == "SubscriptionStatus"
        assert event.bundle["entry"][1]["resource"]["id"] == "new-1"
        assert event.events_since_start >= event.events[-1][0]
        new = exporter.on_notification(event)
        assert sorted(r["id"] for r in new) == ["new-1", "new-2", "new-3"]

        site.add_resources([_obs("new-4", "p2"), _obs("new-5", "p2")])
        notifications = receiver.wait_for(_has_events(5))
        numbers = [number for number, _ in _events(notifications)]
        assert numbers == sorted(set(numbers)) == [1, 2, 3, 4, 5]
        latest = [n for n in notifications if n.type == "event-notification"][-1]
        assert sorted(r["id"] for r in exporter.on_notification(latest)) == ["new-4", "new-5"]
        assert exporter.on_notification(handshake) == []
    cumulative = [json.loads(line)["id"] for line in (tmp_path / "node" / "Observation.ndjson").read_text().splitlines()]
    assert sorted(cumulative) == ["new-1", "new-2", "new-3", "new-4", "new-5", "old-1"]
    state = json.loads((tmp_path / "node" / "state.json").read_text())
    assert len(state["batches"]) == 3 and state["batches"][1]["since"] == state["batches"][0]["transactionTime"]
    heartbeats = [n for n in receiver.notifications if n.type == "heartbeat"]
    assert heartbeats and all(not n.events for n in heartbeats)
    assert any(r["event"] == "subscription-created" for r in site.audit_records())


def test_backport_subscription_with_patient_filter(site: SiteServer, key: ClientKey,
                                                   receiver: NotificationReceiver) -> None:
    from fhir.resources.R4B.bundle import Bundle

    body = backport_subscription(site.base_url, receiver.endpoint, content="id-only")
    body["_criteria"] = {"extension": [{"url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
                                               "backport-filter-criteria", "valueString": "Observation?patient=Patient/p2"}]}
    created = _subscribe(site, key, body)
    assert created.status_code == 201 and created.json()["status"] == "active"
    receiver.wait_for(lambda ns: any(n.type == "handshake" for n in ns))
    site.add_resources([_obs("a", "p1"), _obs("b", "p2"), _obs("c", "p1"), _obs("d", "p2")])
    notifications = receiver.wait_for(_has_events(2))
    assert _events(notifications) == [(1, "Observation/b"), (2, "Observation/d")]
    event = next(n for n in notifications if n.type == "event-notification")
    Bundle.model_validate(event.bundle)
    assert event.bundle["type"] == "history" and event.bundle["entry"][0]["resource"]["resourceType"] == "Parameters"
    assert "resource" not in event.bundle["entry"][1]  # id-only
    sub_id = created.json()["id"]
    with _client(site, key) as client:
        auth = {"Authorization": f"Bearer {client.access_token()}"}
        assert requests.get(f"{site.base_url}/Subscription/{sub_id}", headers=auth, timeout=10).json()["status"] == \
            "active"
        assert requests.delete(f"{site.base_url}/Subscription/{sub_id}", headers=auth, timeout=10).status_code == 204
        assert requests.get(f"{site.base_url}/Subscription/{sub_id}", headers=auth, timeout=10).status_code == 404
        topic = requests.get(topic_url(site.base_url), headers=auth, timeout=10).json()
    assert topic["resourceType"] == "SubscriptionTopic" and topic["resourceTrigger"][0]["supportedInteraction"] == \
        ["create"]


@pytest.mark.parametrize(("change", "message"), [
    (lambda b: b.update(topic="http://elsewhere/SubscriptionTopic/x"), "unknown topic"),
    (lambda b: b["channelType"].update(code="email"), "only rest-hook"),
    (lambda b: b.update(endpoint="ftp://x"), "endpoint"),
    (lambda b: b.update(heartbeatPeriod=0), "heartbeatPeriod"),
    (lambda b: b.update(filterBy=[{"filterParameter": "code", "value": "x"}]), "only 'patient'"),
])
def test_invalid_subscriptions_are_refused(site: SiteServer, key: ClientKey, receiver: NotificationReceiver,
                                           change: Any, message: str) -> None:
    body = r5_subscription(site.base_url, receiver.endpoint)
    change(body)
    response = _subscribe(site, key, body)
    assert response.status_code == 400 and message in response.json()["issue"][0]["diagnostics"]


def test_subscription_needs_observation_read_scope(site: SiteServer, key: ClientKey,
                                                   receiver: NotificationReceiver) -> None:
    body = r5_subscription(site.base_url, receiver.endpoint)
    assert _subscribe(site, key, body, "patients-only", "system/Patient.rs").status_code == 403
    assert requests.post(f"{site.base_url}/Subscription", json=body, timeout=10).status_code == 401


def test_unreachable_endpoint_leaves_subscription_in_error(site: SiteServer, key: ClientKey,
                                                           receiver: NotificationReceiver) -> None:
    body = r5_subscription(site.base_url, receiver.endpoint.replace("/notify", "/nowhere"))
    created = _subscribe(site, key, body)
    assert created.status_code == 201 and created.json()["status"] == "error"
