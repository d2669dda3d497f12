"""Topic-based Subscriptions: "a new Observation arrived for a patient", delivered by rest-hook.

Server side (`SubscriptionManager`, used by `fedlab.fhir.server`): one SubscriptionTopic, R5
`Subscription` resources (and the R4 Subscriptions Backport shape when serving R4), a handshake on
creation, heartbeats every `heartbeatPeriod` seconds and event notifications whose event numbers
strictly increase. Each subscription has one delivery thread, so its notifications arrive in order.

Client side: `NotificationReceiver` (a small waitress endpoint collecting notification Bundles),
`parse_notification` (R5 and backport shapes) and `IncrementalExporter`, which answers an event
notification with an incremental `$export` (`_since` = the last `transactionTime`) and appends the
new resources.
"""

from __future__ import annotations

import datetime as dt
import json
import queue
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import waitress
from flask import Flask, Response, request
from waitress import wasyncore

from fedlab.errors import FedlabError
from fedlab.io import atomic_open, read_json, write_json

TOPIC_ID = "new-observation"
BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
BACKPORT_TOPIC = f"{BACKPORT}/backport-topic-canonical"
BACKPORT_PAYLOAD = f"{BACKPORT}/backport-payload-content"
BACKPORT_HEARTBEAT = f"{BACKPORT}/backport-heartbeat-period"
BACKPORT_TIMEOUT = f"{BACKPORT}/backport-timeout"
BACKPORT_FILTER = f"{BACKPORT}/backport-filter-criteria"
BACKPORT_PROFILE = f"{BACKPORT}/backport-subscription"
CONTENTS = ("empty", "id-only", "full-resource")
MAX_HEARTBEAT_S = 3600


class SubscriptionError(FedlabError, ValueError):
    """A Subscription request is invalid; the message names the element."""


def topic_url(base_url: str) -> str:
    return f"{base_url.rstrip('/')}/SubscriptionTopic/{TOPIC_ID}"


def subscription_topic(base_url: str) -> dict[str, Any]:
    """The one topic: an Observation is created for a patient (filter by `patient`)."""
    return {
        "resourceType": "SubscriptionTopic", "id": TOPIC_ID, "url": topic_url(base_url), "status": "active",
        "title": "New Observation for a patient",
        "description": "Triggered when an Observation is added to this site's record.",
        "resourceTrigger": [{"description": "Observation created",
                             "resource": "http://hl7.org/fhir/StructureDefinition/Observation",
                             "supportedInteraction": ["create"]}],
        "canFilterBy": [{"description": "The Observation's subject", "resource": "Observation",
                         "filterParameter": "patient"}],
        "notificationShape": [{"resource": "Observation"}],
    }


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------- parsing a Subscription request
@dataclass
class SubscriptionRecord:
    id: str
    client_id: str
    topic: str
    endpoint: str
    content: str
    heartbeat_s: float | None
    patient: str | None
    backport: bool  # R4 Subscriptions Backport shape (notifications as history Bundles + Parameters)
    headers: dict[str, str]
    resource: dict[str, Any]
    status: str = "requested"
    events: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    outbox: queue.Queue[Any] = field(default_factory=queue.Queue)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    delivery_errors: int = 0


def _patient_filter(value: str, where: str) -> str | None:
    name, _, criterion = value.partition("=")
    if name.strip() not in ("patient", "Observation?patient", "subject"):
        raise SubscriptionError(f"{where}: only the 'patient' filter is supported, not {value!r}")
    criterion = criterion.strip()
    return criterion.split("/", 1)[1] if criterion.startswith("Patient/") else criterion or None


def _check_endpoint(endpoint: Any, where: str) -> str:
    if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
        raise SubscriptionError(f"{where}: an http(s) endpoint is required, got {endpoint!r}")
    return endpoint


def _heartbeat(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= MAX_HEARTBEAT_S:
        raise SubscriptionError(f"{where}: must be a number of seconds in (0, {MAX_HEARTBEAT_S}]")
    return float(value)


def parse_r5_subscription(body: dict[str, Any], expected_topic: str) -> dict[str, Any]:
    from fhir.resources.subscription import Subscription
    from pydantic import ValidationError

    try:
        Subscription.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        raise SubscriptionError(f"Subscription.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    if body["topic"] != expected_topic:
        raise SubscriptionError(f"Subscription.topic: unknown topic {body['topic']!r} (this server has {expected_topic})")
    channel = (body.get("channelType") or {}).get("code")
    if channel != "rest-hook":
        raise SubscriptionError(f"Subscription.channelType: only rest-hook is supported, not {channel!r}")
    content = body.get("content", "id-only")
    if content not in CONTENTS:
        raise SubscriptionError(f"Subscription.content: {content!r} is not one of {', '.join(CONTENTS)}")
    filters = body.get("filterBy", [])
    patient = None
    for index, item in enumerate(filters):
        if item.get("filterParameter") != "patient":
            raise SubscriptionError(f"Subscription.filterBy[{index}].filterParameter: only 'patient' is supported")
        patient = _patient_filter(f"patient={item.get('value', '')}", f"Subscription.filterBy[{index}]")
    headers = {p["name"]: p["value"] for p in body.get("parameter", []) if "name" in p and "value" in p}
    return {"topic": body["topic"], "endpoint": _check_endpoint(body.get("endpoint"), "Subscription.endpoint"),
            "content": content, "heartbeat_s": _heartbeat(body.get("heartbeatPeriod"), "Subscription.heartbeatPeriod"),
            "patient": patient, "backport": False, "headers": headers}


def _extension_value(element: dict[str, Any], url: str) -> Any:
    for ext in element.get("extension", []):
        if ext.get("url") == url:
            return next((v for k, v in ext.items() if k.startswith("value")), None)
    return None


def parse_backport_subscription(body: dict[str, Any], expected_topic: str) -> dict[str, Any]:
    from fhir.resources.R4B.subscription import Subscription
    from pydantic import ValidationError

    try:
        Subscription.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        raise SubscriptionError(f"Subscription.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    if body.get("criteria") != expected_topic:
        raise SubscriptionError(f"Subscription.criteria: must be the topic canonical {expected_topic}, "
                                f"not {body.get('criteria')!r}")
    channel = body.get("channel") or {}
    if channel.get("type") != "rest-hook":
        raise SubscriptionError(f"Subscription.channel.type: only rest-hook is supported, not {channel.get('type')!r}")
    content = _extension_value(channel.get("_payload") or {}, BACKPORT_PAYLOAD) or "id-only"
    if content not in CONTENTS:
        raise SubscriptionError(f"Subscription.channel.payload backport-payload-content: {content!r} is not one of "
                                f"{', '.join(CONTENTS)}")
    criteria = body.get("_criteria") or {}
    filter_value = _extension_value(criteria, BACKPORT_FILTER)
    patient = _patient_filter(filter_value.split("?", 1)[-1], "Subscription._criteria backport-filter-criteria") \
        if filter_value else None
    headers = dict(h.split(":", 1) for h in channel.get("header", []) if ":" in h)
    return {"topic": expected_topic, "endpoint": _check_endpoint(channel.get("endpoint"), "Subscription.channel.endpoint"),
            "content": content, "patient": patient, "backport": True,
            "heartbeat_s": _heartbeat(_extension_value(channel, BACKPORT_HEARTBEAT),
                                      "Subscription.channel backport-heartbeat-period"),
            "headers": {k.strip(): v.strip() for k, v in headers.items()}}


def parse_subscription(body: Any, base_url: str) -> dict[str, Any]:
    """The delivery settings of a POSTed Subscription (R5 shape, or the R4 backport shape)."""
    if not isinstance(body, dict) or body.get("resourceType") != "Subscription":
        raise SubscriptionError("the body must be a FHIR Subscription resource")
    if "topic" in body:
        return parse_r5_subscription(body, topic_url(base_url))
    if "criteria" in body:
        return parse_backport_subscription(body, topic_url(base_url))
    raise SubscriptionError("Subscription: needs topic (R5) or criteria (R4 backport)")


# ---------------------------------------------------------------- notifications
def _status_r5(sub: SubscriptionRecord, kind: str, events: list[tuple[int, str]], timestamp: str) -> dict[str, Any]:
    status: dict[str, Any] = {"resourceType": "SubscriptionStatus", "status": sub.status, "type": kind,
                              "eventsSinceSubscriptionStart": str(sub.events),
                              "subscription": {"reference": f"Subscription/{sub.id}"}, "topic": sub.topic}
    if events:
        status["notificationEvent"] = [
            {"eventNumber": str(number), "timestamp": timestamp,
             **({"focus": {"reference": focus}} if sub.content != "empty" else {})} for number, focus in events]
    return status


def _status_backport(sub: SubscriptionRecord, kind: str, events: list[tuple[int, str]],
                     timestamp: str) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"name": "subscription", "valueReference": {"reference": f"Subscription/{sub.id}"}},
        {"name": "topic", "valueCanonical": sub.topic},
        {"name": "status", "valueCode": sub.status},
        {"name": "type", "valueCode": kind},
        {"name": "events-since-subscription-start", "valueString": str(sub.events)},
    ]
    for number, focus in events:
        part: list[dict[str, Any]] = [{"name": "event-number", "valueString": str(number)},
                                      {"name": "timestamp", "valueInstant": timestamp}]
        if sub.content != "empty":
            part.append({"name": "focus", "valueReference": {"reference": focus}})
        parameters.append({"name": "notification-event", "part": part})
    return {"resourceType": "Parameters", "id": uuid.uuid4().hex,
            "meta": {"profile": [f"{BACKPORT}/backport-subscription-status-r4"]}, "parameter": parameters}


def notification_bundle(sub: SubscriptionRecord, kind: str, base_url: str,
                        events: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """A notification Bundle (`subscription-notification`, or `history` for the R4 backport)."""
    timestamp = _now_iso()
    refs = [(number, f"Observation/{resource['id']}") for number, resource in events]
    status = (_status_backport if sub.backport else _status_r5)(sub, kind, refs, timestamp)
    first: dict[str, Any] = {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": status}
    if sub.backport:
        first["request"] = {"method": "GET", "url": f"Subscription/{sub.id}/$status"}
        first["response"] = {"status": "200"}
    entries = [first]
    for _, resource in events if sub.content != "empty" else []:
        entry: dict[str, Any] = {"fullUrl": f"{base_url}/Observation/{resource['id']}"}
        if sub.content == "full-resource":
            entry["resource"] = resource
        if sub.backport:
            entry["request"] = {"method": "POST", "url": "Observation"}
            entry["response"] = {"status": "201"}
        entries.append(entry)
    return {"resourceType": "Bundle", "id": uuid.uuid4().hex,
            "type": "history" if sub.backport else "subscription-notification", "timestamp": timestamp,
            "entry": entries}


# ---------------------------------------------------------------- the server-side manager
class SubscriptionManager:
    """Holds a site's subscriptions and delivers their notifications (one thread per subscription)."""

    def __init__(self, base_url: Callable[[], str], transform: Callable[[dict[str, Any], bool], dict[str, Any]],
                 audit: Callable[..., None] | None = None, timeout_s: float = 5.0) -> None:
        self._base_url = base_url
        self._transform = transform  # (resource, backport) -> resource as delivered (de-identified, R5, ...)
        self._audit = audit or (lambda *a, **k: None)
        self.timeout_s = timeout_s
        self.subscriptions: dict[str, SubscriptionRecord] = {}
        self.lock = threading.Lock()

    def create(self, body: Any, client_id: str) -> SubscriptionRecord:
        settings = parse_subscription(body, self._base_url())
        sub = SubscriptionRecord(id=uuid.uuid4().hex, client_id=client_id, resource=dict(body), **settings)
        sub.resource["id"] = sub.id
        with self.lock:
            self.subscriptions[sub.id] = sub
        delivered = self._send(sub, "handshake", [])
        sub.status = "active" if delivered else "error"
        sub.resource["status"] = sub.status
        if delivered:
            sub.thread = threading.Thread(target=self._deliver_loop, args=(sub,), name=f"subscription-{sub.id[:8]}",
                                          daemon=True)
            sub.thread.start()
        return sub

    def get(self, sub_id: str, client_id: str) -> SubscriptionRecord | None:
        with self.lock:
            sub = self.subscriptions.get(sub_id)
        return sub if sub is not None and sub.client_id == client_id else None

    def delete(self, sub_id: str) -> None:
        with self.lock:
            sub = self.subscriptions.pop(sub_id, None)
        if sub is not None:
            self._stop(sub)

    def resources_added(self, resources: Iterable[dict[str, Any]]) -> int:
        """Queue an event for every matching active subscription; returns the number of events queued."""
        observations = [r for r in resources if r.get("resourceType") == "Observation"]
        queued = 0
        with self.lock:
            subs = [s for s in self.subscriptions.values() if s.status == "active"]
        for sub in subs:
            for resource in observations:
                if sub.patient and (resource.get("subject") or {}).get("reference") != f"Patient/{sub.patient}":
                    continue
                with sub.lock:  # numbers are taken in order under the lock, so they strictly increase
                    sub.events += 1
                    number = sub.events
                sub.outbox.put((number, resource))
                queued += 1
        return queued

    def shutdown(self) -> None:
        with self.lock:
            subs = list(self.subscriptions.values())
            self.subscriptions.clear()
        for sub in subs:
            self._stop(sub)

    def _stop(self, sub: SubscriptionRecord) -> None:
        sub.stop.set()
        sub.outbox.put(None)
        if sub.thread is not None and sub.thread is not threading.current_thread():
            sub.thread.join(timeout=self.timeout_s + 1)

    def _deliver_loop(self, sub: SubscriptionRecord) -> None:
        while not sub.stop.is_set():
            try:
                item = sub.outbox.get(timeout=sub.heartbeat_s) if sub.heartbeat_s else sub.outbox.get()
            except queue.Empty:
                self._send(sub, "heartbeat", [])
                continue
            if item is None or sub.stop.is_set():
                return
            batch = [item]
            while not sub.outbox.empty():  # events that queued meanwhile travel in one notification
                extra = sub.outbox.get_nowait()
                if extra is None:
                    sub.stop.set()
                    break
                batch.append(extra)
            self._send(sub, "event-notification", batch)

    def _send(self, sub: SubscriptionRecord, kind: str, events: list[tuple[int, dict[str, Any]]]) -> bool:
        shown = [(number, self._transform(resource, sub.backport)) for number, resource in events]
        bundle = notification_bundle(sub, kind, self._base_url(), shown)
        try:
            response = requests.post(sub.endpoint, data=json.dumps(bundle), timeout=self.timeout_s,
                                     headers={"Content-Type": "application/fhir+json", **sub.headers})
            delivered = 200 <= response.status_code < 300
        except requests.RequestException:
            delivered = False
        if not delivered:
            sub.delivery_errors += 1
        self._audit("subscription-notification", client_id=sub.client_id, subscription=sub.id, type=kind,
                    events=[number for number, _ in events], delivered=delivered)
        return delivered


# ---------------------------------------------------------------- client side
@dataclass(frozen=True)
class Notification:
    type: str
    subscription: str
    topic: str | None
    events_since_start: int
    events: tuple[tuple[int, str | None], ...]  # (event number, focus reference)
    bundle: dict[str, Any]


def _params(parameters: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [p for p in parameters if p.get("name") == name]


def _value(param: dict[str, Any] | None) -> Any:
    if param is None:
        return None
    return next((v for k, v in param.items() if k.startswith("value")), None)


def parse_notification(bundle: dict[str, Any]) -> Notification:
    """Read an R5 `subscription-notification` or an R4 backport `history` notification Bundle."""
    entries = bundle.get("entry") or []
    status = entries[0].get("resource") if entries else None
    if not isinstance(status, dict):
        raise SubscriptionError("notification Bundle: the first entry has no status resource")
    if status.get("resourceType") == "SubscriptionStatus":
        events = tuple((int(e["eventNumber"]), (e.get("focus") or {}).get("reference"))
                       for e in status.get("notificationEvent", []))
        return Notification(status["type"], status["subscription"]["reference"], status.get("topic"),
                            int(status.get("eventsSinceSubscriptionStart", 0)), events, bundle)
    if status.get("resourceType") == "Parameters":
        params = status.get("parameter", [])
        events = []
        for event in _params(params, "notification-event"):
            parts = event.get("part", [])
            focus = _value(next(iter(_params(parts, "focus")), None))
            events.append((int(_value(_params(parts, "event-number")[0])), (focus or {}).get("reference")))
        first = {name: _value(next(iter(_params(params, name)), None))
                 for name in ("type", "subscription", "topic", "events-since-subscription-start")}
        return Notification(first["type"], (first["subscription"] or {}).get("reference", ""), first["topic"],
                            int(first["events-since-subscription-start"] or 0), tuple(events), bundle)
    raise SubscriptionError(f"notification Bundle: unexpected first resource {status.get('resourceType')!r}")


class NotificationReceiver:
    """A rest-hook endpoint on 127.0.0.1 that records notification Bundles (and calls `on_notification`)."""

    def __init__(self, on_notification: Callable[[Notification], None] | None = None, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.notifications: list[Notification] = []
        self.errors: list[str] = []
        self._on_notification = on_notification
        self._changed = threading.Condition()
        self.host, self.port = host, port
        self.app = self._make_app()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def _make_app(self) -> Flask:
        app = Flask("fedlab.fhir.subscriptions.receiver")

        @app.post("/notify")
        def notify() -> Response:
            try:
                notification = parse_notification(json.loads(request.get_data(as_text=True)))
            except (ValueError, KeyError, TypeError) as err:
                self.errors.append(str(err))
                return Response(str(err), status=400)
            with self._changed:
                self.notifications.append(notification)
                self._changed.notify_all()
            if self._on_notification is not None:
                self._on_notification(notification)
            return Response(status=200)

        return app

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self._server.effective_port}/notify"

    def of_type(self, kind: str) -> list[Notification]:
        with self._changed:
            return [n for n in self.notifications if n.type == kind]

    def wait_for(self, predicate: Callable[[list[Notification]], bool], timeout_s: float = 20.0) -> list[Notification]:
        """Block until `predicate(notifications)` holds; raises TimeoutError with what arrived."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(list(self.notifications)), timeout=timeout_s):
                kinds = [n.type for n in self.notifications]
                raise TimeoutError(f"notifications so far {kinds}; condition not met after {timeout_s} s")
            return list(self.notifications)

    def start(self) -> NotificationReceiver:
        self._server = waitress.create_server(self.app, host=self.host, port=self.port, threads=2,
                                              asyncore_loop_timeout=0.2)
        self._thread = threading.Thread(target=self._server.run, name="notification-receiver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        server_map = self._server._map
        self._server.trigger.pull_trigger(lambda: wasyncore.close_all(server_map, ignore_all=True))
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server.task_dispatcher.shutdown()
        self._server = None

    def __enter__(self) -> NotificationReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def r5_subscription(base_url: str, endpoint: str, *, heartbeat_s: int | None = None, content: str = "id-only",
                    patient: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"resourceType": "Subscription", "status": "requested", "topic": topic_url(base_url),
                            "channelType": {"system": "http://terminology.hl7.org/CodeSystem/subscription-channel-type",
                                            "code": "rest-hook"},
                            "endpoint": endpoint, "content": content, "contentType": "application/fhir+json"}
    if heartbeat_s is not None:
        body["heartbeatPeriod"] = heartbeat_s
    if patient is not None:
        body["filterBy"] = [{"filterParameter": "patient", "value": f"Patient/{patient}"}]
    return body


def backport_subscription(base_url: str, endpoint: str, *, heartbeat_s: int | None = None,
                          content: str = "id-only") -> dict[str, Any]:
    channel: dict[str, Any] = {"type": "rest-hook", "endpoint": endpoint, "payload": "application/fhir+json",
                               "_payload": {"extension": [{"url": BACKPORT_PAYLOAD, "valueCode": content}]}}
    if heartbeat_s is not None:
        channel["extension"] = [{"url": BACKPORT_HEARTBEAT, "valueUnsignedInt": heartbeat_s}]
    return {"resourceType": "Subscription", "meta": {"profile": [BACKPORT_PROFILE]}, "status": "requested",
            "reason": "incremental export of new observations", "criteria": topic_url(base_url), "channel": channel}


class IncrementalExporter:
    """Keeps `dest_dir/<Type>.ndjson` current: a first export, then `_since`-exports on event notifications.

    Each export's files go to `dest_dir/batches/<k>/`; their lines are appended to the cumulative files
    and `state.json` keeps the last `transactionTime` (the next `_since`).
    """

    def __init__(self, client: Any, dest_dir: str | Path, types: Iterable[str] | None = None) -> None:
        self.client = client
        self.dest = Path(dest_dir)
        self.types = list(types) if types is not None else None
        self._lock = threading.Lock()
        self.state_path = self.dest / "state.json"
        self.state: dict[str, Any] = read_json(self.state_path) if self.state_path.is_file() \
            else {"transactionTime": None, "batches": []}

    @property
    def since(self) -> str | None:
        return self.state["transactionTime"]

    def sync(self) -> list[dict[str, Any]]:
        """Export what is new since the last transactionTime (everything the first time); returns new resources."""
        with self._lock:
            batch = self.dest / "batches" / f"{len(self.state['batches']):04d}"
            kwargs: dict[str, Any] = {"types": self.types} if self.types is not None else {}
            if self.since is not None:
                kwargs["since"] = self.since
            result = self.client.export(batch, "system", **kwargs)
            added = self._append(batch, result.files)
            self.state["batches"].append({"folder": batch.name, "since": self.since,
                                          "transactionTime": result.transaction_time,
                                          "counts": {f.name: f.lines for f in result.files}})
            self.state["transactionTime"] = result.transaction_time
            write_json(self.state_path, self.state)
            return added

    def on_notification(self, notification: Notification) -> list[dict[str, Any]]:
        return self.sync() if notification.type == "event-notification" else []

    def _append(self, batch: Path, files: Iterable[Any]) -> list[dict[str, Any]]:
        added: list[dict[str, Any]] = []
        for downloaded in files:
            lines = (batch / downloaded.name).read_text(encoding="utf-8").splitlines(keepends=True)
            target = self.dest / f"{downloaded.type}.ndjson"
            previous = target.read_text(encoding="utf-8") if target.is_file() else ""
            with atomic_open(target, "w", encoding="utf-8") as handle:
                handle.write(previous + "".join(lines))
            added.extend(json.loads(line) for line in lines if line.strip())
        return added
