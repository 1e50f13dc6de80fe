"""Checks of a delivered webhook against the contract (the README's "Delivery contract").

Signatures are checked with the `standardwebhooks` package, never with the filter's own code."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from .config import Hook
from .servers import Delivery

ENVELOPE_KEYS = {"id", "webhookId", "organisationId", "eventType", "dateTime", "data", "version"}
HEX24 = re.compile(r"^[0-9a-f]{24}$")
RFC3339_UTC_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")
CLOCK_SLACK_S = 300


def signature_valid(delivery: Delivery, key: str) -> bool:
    """standardwebhooks' verdict on this delivery under this key."""
    try:
        Webhook(key).verify(delivery.body, delivery.headers)
        return True
    except WebhookVerificationError:
        return False


def check_delivery(delivery: Delivery, hook: Hook, event_type: str, expected_object: dict,
                   object_type: str = "job") -> dict:
    """Assert everything the contract says about one delivery to `hook`; return the parsed envelope."""
    where = f"delivery to {hook.path}"
    assert delivery.method == "POST", f"{where}: method {delivery.method}"
    assert delivery.path == hook.path, f"{where}: path {delivery.path}"
    h = delivery.headers
    assert h.get("host") == hook.url.split("/")[2], f"{where}: host header {h.get('host')!r}, URL host {hook.url.split('/')[2]!r}"
    assert h.get("content-type", "").split(";")[0].strip() == "application/json", f"{where}: content-type {h.get('content-type')!r}"
    assert h.get("user-agent", "").startswith("webhook-emitter/"), f"{where}: user-agent {h.get('user-agent')!r}"
    # The filter leaves content-length to Envoy, which sets it from the body: never chunked.
    assert h.get("content-length") == str(len(delivery.body)) and "transfer-encoding" not in h, \
        f"{where}: content-length {h.get('content-length')!r}, transfer-encoding {h.get('transfer-encoding')!r}"
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        assert name in h, f"{where}: header {name} missing; headers: {sorted(h)}"
    assert re.fullmatch(r"\d+", h["webhook-timestamp"]), f"{where}: webhook-timestamp {h['webhook-timestamp']!r}"
    assert abs(int(h["webhook-timestamp"]) - delivery.received_at) <= CLOCK_SLACK_S, "webhook-timestamp far from now"
    assert all(s.startswith("v1,") for s in h["webhook-signature"].split(" ")), f"{where}: {h['webhook-signature']!r}"

    try:
        body = json.loads(delivery.body)
    except ValueError as e:
        raise AssertionError(f"{where}: body is not JSON ({e}): {delivery.body[:200]!r}")
    assert isinstance(body, dict) and set(body) == ENVELOPE_KEYS, f"{where}: envelope keys {sorted(body)}"
    assert HEX24.match(body["id"]), f"{where}: id {body['id']!r} is not 24 lowercase hex digits"
    assert abs(int(body["id"][:8], 16) - delivery.received_at) <= CLOCK_SLACK_S, \
        f"{where}: id {body['id']} does not start with the current Unix time (design: 4 bytes big-endian seconds)"
    assert h["webhook-id"] == body["id"], f"{where}: webhook-id {h['webhook-id']!r} != body id {body['id']!r}"
    assert body["webhookId"] == hook.id, f"{where}: webhookId {body['webhookId']!r}"
    assert body["organisationId"] == hook.organisation_id, f"{where}: organisationId {body['organisationId']!r}"
    assert body["eventType"] == event_type, f"{where}: eventType {body['eventType']!r}"
    assert type(body["version"]) is int and body["version"] == 1, f"{where}: version {body['version']!r}"
    assert isinstance(body["dateTime"], str) and RFC3339_UTC_Z.match(body["dateTime"]), \
        f"{where}: dateTime {body['dateTime']!r} is not RFC 3339 UTC with Z"
    stamp = datetime.fromisoformat(body["dateTime"].replace("Z", "+00:00")).astimezone(timezone.utc).timestamp()
    assert abs(stamp - delivery.received_at) <= CLOCK_SLACK_S, f"{where}: dateTime {body['dateTime']} far from now"
    expected = dict(expected_object)
    expected["objectType"] = object_type
    assert body["data"] == {"object": expected}, f"{where}: data {body['data']!r}, expected {{'object': {expected!r}}}"
    # The upstream's key order is kept; objectType comes last unless the upstream had one.
    order = list(expected_object) if "objectType" in expected_object else [*expected_object, "objectType"]
    assert list(body["data"]["object"]) == order, f"{where}: object keys {list(body['data']['object'])}, want {order}"

    assert signature_valid(delivery, hook.key), f"{where}: signature does not verify under the webhook's key"
    return body
