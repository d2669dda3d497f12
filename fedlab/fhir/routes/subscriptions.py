"""Topic-based Subscriptions (R5, and the R4 backport shape): the topic of new Observations,
`POST /Subscription`, and reading or deleting one's own Subscription. Notifications are sent by
`fedlab.fhir.subscriptions.SubscriptionManager` when resources are added."""

from __future__ import annotations

from flask import Blueprint, Response, request

from fedlab.fhir.http import FhirError, fhir_json
from fedlab.fhir.routes.access import authorize, site_state
from fedlab.fhir.smart import readable_types
from fedlab.fhir.state import SiteState
from fedlab.fhir.subscriptions import SubscriptionError, subscription_topic

subscriptions = Blueprint("subscriptions", __name__)


@subscriptions.get("/SubscriptionTopic")
def topics() -> Response:
    state = site_state()
    authorize(state)
    topic = subscription_topic(state.base_url or "")
    return fhir_json({"resourceType": "Bundle", "type": "searchset", "total": 1,
                      "entry": [{"fullUrl": topic["url"], "resource": topic}]})


@subscriptions.get("/SubscriptionTopic/<topic_id>")
def topic(topic_id: str) -> Response:
    state = site_state()
    authorize(state)
    found = subscription_topic(state.base_url or "")
    if topic_id != found["id"]:
        raise FhirError(404, "not-found", f"SubscriptionTopic/{topic_id} not found")
    return fhir_json(found)


@subscriptions.post("/Subscription")
def create_subscription() -> Response:
    return _create_subscription(site_state())


@subscriptions.route("/Subscription/<sub_id>", methods=["GET", "DELETE"])
def subscription(sub_id: str) -> Response:
    state = site_state()
    grant = authorize(state)
    sub = state.subscriptions.get(sub_id, grant.client_id)
    if sub is None:
        raise FhirError(404, "not-found", f"Subscription/{sub_id} not found")
    if request.method == "DELETE":
        state.subscriptions.delete(sub_id)
        state.audit.record("subscription-deleted", client_id=grant.client_id, subscription=sub_id)
        return Response(status=204)
    return fhir_json({**sub.resource, "status": sub.status})


def _create_subscription(state: SiteState) -> Response:
    grant = authorize(state)
    if not readable_types(grant.scopes, ["Observation"]):
        raise FhirError(403, "forbidden", f"the access token's scopes ({grant.scope_text}) do not allow reading "
                                          "Observation, which the topic notifies about")
    body = request.get_json(force=True, silent=True)
    try:
        sub = state.subscriptions.create(body, grant.client_id)
    except SubscriptionError as err:
        raise FhirError(400, "invalid", str(err)) from None
    state.audit.record("subscription-created", client_id=grant.client_id, subscription=sub.id, status=sub.status,
                       endpoint=sub.endpoint, backport=sub.backport, content=sub.content,
                       heartbeat_s=sub.heartbeat_s, scopes=grant.scope_text)
    location = f"{state.base_url}/Subscription/{sub.id}"
    return fhir_json({**sub.resource, "status": sub.status}, 201, {"Location": location})
