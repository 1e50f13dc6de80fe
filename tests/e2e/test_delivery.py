"""Delivery: a completed job becomes exactly one signed delivery per enabled, subscribed webhook of
its organisation, and nothing else is delivered. One Envoy with the filter serves the whole module.

Organisations and webhooks (two rules: job.completed on /jobs/{id}/complete, job.started on /jobs/{id}/start):
  A: a1 completed | a2 completed+started | a3 completed but disabled | a4 started only
  B: b1 completed | b2 started only
  C: c1 completed, apiKey given as {"env": "WH_KEY_C1"} through vm_config.environment_variables
"""

import socket
import struct

import harness
import pytest
from harness.checks import check_delivery, signature_valid
from harness.config import PluginConfig, delivery_section, make_hook, new_id

EVENT_WAIT_S = 20


@pytest.fixture(scope="module")
def setup(job_service, receiver, envoys, wasm):
    org_a, org_b, org_c = new_id(), new_id(), new_id()
    port = receiver.port
    hooks = {
        "a1": make_hook(port, org_a, ["job.completed"], name="a1"),
        "a2": make_hook(port, org_a, ["job.completed", "job.started"], name="a2"),
        "a3": make_hook(port, org_a, ["job.completed"], status="disabled", name="a3"),
        "a4": make_hook(port, org_a, ["job.started"], name="a4"),
        "b1": make_hook(port, org_b, ["job.completed"], name="b1"),
        "b2": make_hook(port, org_b, ["job.started"], name="b2"),
        "c1": make_hook(port, org_c, ["job.completed"], env_var="WH_KEY_C1", name="c1"),
    }
    config = PluginConfig(hooks=list(hooks.values()), delivery=delivery_section())
    # One worker: control_event() relies on events being handled in order.
    envoy = harness.envoy_with_filter(job_service, receiver, config, wasm=wasm, name="delivery", concurrency=1)
    envoys.append(envoy)
    return {"envoy": envoy, "hooks": hooks, "config": config, "orgs": {"A": org_a, "B": org_b, "C": org_c}}


def complete(envoy, org, job_id=None, method="POST", scenario=None, path=None):
    job_id = job_id or new_id()
    path = path or f"/jobs/{job_id}/complete" + (f"?scenario={scenario}" if scenario else "")
    headers = {"x-organisation-id": org} if org else {}
    body = b'{"result":"ok"}' if method != "GET" else None
    return job_id, envoy.request(method, path, headers, body)


def deliveries_of(receiver, job_id):
    return receiver.deliveries(lambda d: d.object_id() == job_id)


def control_event(setup, receiver):
    """A job completion for org A that must reach a1 and a2. Once both have it, every delivery of anything sent
    before it has had its chance to arrive (one worker; events are handled in order)."""
    hooks = setup["hooks"]
    job_id, resp = complete(setup["envoy"], setup["orgs"]["A"])
    assert resp.status == 200
    got = receiver.wait_for(lambda d: d.object_id() == job_id, count=2, timeout=EVENT_WAIT_S)
    assert sorted(d.webhook_id for d in got) == sorted([hooks["a1"].id, hooks["a2"].id])
    return job_id


def test_completed_job_delivers_one_signed_envelope_per_subscribed_webhook(setup, receiver):
    hooks, envoy = setup["hooks"], setup["envoy"]
    job_id, resp = complete(envoy, setup["orgs"]["A"])
    assert resp.status == 200
    assert resp.json() == harness.completed_job(job_id)

    got = receiver.wait_for(lambda d: d.object_id() == job_id, count=2, timeout=EVENT_WAIT_S)
    control_event(setup, receiver)
    got = deliveries_of(receiver, job_id)
    by_hook = {}
    for d in got:
        by_hook.setdefault(d.webhook_id, []).append(d)
    assert sorted(by_hook) == sorted([hooks["a1"].id, hooks["a2"].id]), \
        f"deliveries went to {[setup['config'].hook(h).name for h in by_hook]}, expected a1 and a2"
    assert all(len(v) == 1 for v in by_hook.values()), {k: len(v) for k, v in by_hook.items()}

    bodies = []
    for name in ("a1", "a2"):
        d = by_hook[hooks[name].id][0]
        bodies.append(check_delivery(d, hooks[name], "job.completed", harness.completed_job(job_id)))
    assert bodies[0]["id"] == bodies[1]["id"], "one event must carry the same id to every webhook"
    assert bodies[0]["dateTime"] == bodies[1]["dateTime"]


def test_signature_fails_under_another_webhooks_key(setup, receiver):
    hooks = setup["hooks"]
    job_id = control_event(setup, receiver)
    for d in deliveries_of(receiver, job_id):
        own = setup["config"].hook(d.webhook_id)
        assert signature_valid(d, own.key)
        for other in hooks.values():
            if other.id != own.id:
                assert not signature_valid(d, other.key), f"delivery to {own.name} verifies under {other.name}'s key"


def test_no_delivery_for_responses_that_are_not_events(setup, receiver):
    envoy, org_a = setup["envoy"], setup["orgs"]["A"]
    mark = len(receiver.deliveries())
    negatives = {
        "failed": complete(envoy, org_a, scenario="failed"),
        "404": complete(envoy, org_a, scenario="notfound"),
        "GET": complete(envoy, org_a, method="GET"),
        "DELETE": complete(envoy, org_a, method="DELETE"),
        "extra segment": complete(envoy, org_a, path=f"/jobs/{new_id()}/complete/now"),
        "two id segments": complete(envoy, org_a, path=f"/jobs/{new_id()}/x/complete"),
        "other resource": complete(envoy, org_a, path=f"/v2/jobs/{new_id()}/complete"),
        "other verb": complete(envoy, org_a, path=f"/jobs/{new_id()}/completed"),
        "root": complete(envoy, org_a, path="/"),
        "unknown organisation": complete(envoy, new_id()),
        "no organisation header": complete(envoy, None),
    }
    expected_status = {"404": 404}
    for name, (_, resp) in negatives.items():
        assert resp.status == expected_status.get(name, 200), f"{name}: client got {resp.status}"
    control = control_event(setup, receiver)
    stray = [d for d in receiver.deliveries()[mark:] if d.object_id() != control]
    assert not stray, "deliveries for non-events: " + "; ".join(
        f"{d.path} data.object={d.json().get('data')}" for d in stray)


def test_only_the_organisations_enabled_subscribed_webhooks_receive(setup, receiver):
    envoy, hooks, orgs = setup["envoy"], setup["hooks"], setup["orgs"]
    mark = len(receiver.deliveries())
    job_b, r1 = complete(envoy, orgs["B"])
    job_c, r2 = complete(envoy, orgs["C"])
    job_a_start = new_id()
    r3 = envoy.request("POST", f"/jobs/{job_a_start}/start", {"x-organisation-id": orgs["A"]}, b"{}")
    job_b_start = new_id()
    r4 = envoy.request("POST", f"/jobs/{job_b_start}/start", {"x-organisation-id": orgs["B"]}, b"{}")
    assert [r.status for r in (r1, r2, r3, r4)] == [200] * 4

    expected = {
        (hooks["b1"].id, job_b), (hooks["c1"].id, job_c),
        (hooks["a2"].id, job_a_start), (hooks["a4"].id, job_a_start),
        (hooks["b2"].id, job_b_start),
    }
    receiver.wait_for(lambda d: (d.webhook_id, d.object_id()) in expected, count=len(expected), timeout=EVENT_WAIT_S)
    control = control_event(setup, receiver)
    names = {h.id: n for n, h in hooks.items()}
    got = [(d.webhook_id, d.object_id()) for d in receiver.deliveries()[mark:] if d.object_id() != control]
    assert sorted(got) == sorted(expected), \
        f"got {sorted((names.get(w, w), j) for w, j in got)}, expected {sorted((names[w], j) for w, j in expected)}"

    for d in receiver.deliveries()[mark:]:
        if d.object_id() == job_b:
            check_delivery(d, hooks["b1"], "job.completed", harness.completed_job(job_b))
        elif d.object_id() == job_a_start:
            hook = hooks["a2"] if d.webhook_id == hooks["a2"].id else hooks["a4"]
            check_delivery(d, hook, "job.started", harness.started_job(job_a_start))
        elif d.object_id() == job_b_start:
            check_delivery(d, hooks["b2"], "job.started", harness.started_job(job_b_start))


def test_api_key_from_vm_environment_variable(setup, receiver):
    hook = setup["hooks"]["c1"]
    config_json = setup["envoy"].config_path.read_text()
    assert '"env": "WH_KEY_C1"' in config_json.replace('\\"', '"'), "c1's apiKey must be given as {\"env\": ...}"
    job_id, resp = complete(setup["envoy"], setup["orgs"]["C"])
    assert resp.status == 200
    (d,) = receiver.wait_for(lambda d: d.object_id() == job_id, count=1, timeout=EVENT_WAIT_S)
    check_delivery(d, hook, "job.completed", harness.completed_job(job_id))
    assert not signature_valid(d, setup["hooks"]["b1"].key)


def test_delivery_survives_client_closing_right_after_response_headers(setup, receiver):
    envoy, org_a = setup["envoy"], setup["orgs"]["A"]
    job_id = new_id()
    body = b'{"result":"ok"}'
    request = (
        f"POST /jobs/{job_id}/complete HTTP/1.1\r\nHost: jobs.local\r\nx-organisation-id: {org_a}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", envoy.listener_port), timeout=harness.scaled(10)) as sock:
        sock.sendall(request)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(1)  # byte by byte: read the headers and not one byte more
            assert chunk, f"connection closed before the headers were complete: {received!r}"
            received += chunk
        assert received.startswith(b"HTTP/1.1 200"), received
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close at once, with RST
    hooks = setup["hooks"]
    got = receiver.wait_for(lambda d: d.object_id() == job_id, count=2, timeout=EVENT_WAIT_S)
    assert sorted(d.webhook_id for d in got) == sorted([hooks["a1"].id, hooks["a2"].id])
    check_delivery(got[0], setup["config"].hook(got[0].webhook_id), "job.completed", harness.completed_job(job_id))


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_other_methods_of_the_rule_deliver_too(setup, receiver, method):
    hooks = setup["hooks"]
    job_id, resp = complete(setup["envoy"], setup["orgs"]["A"], method=method)
    assert resp.status == 200
    got = receiver.wait_for(lambda d: d.object_id() == job_id, count=2, timeout=EVENT_WAIT_S)
    assert sorted(d.webhook_id for d in got) == sorted([hooks["a1"].id, hooks["a2"].id])


METRICS = ("events_emitted", "deliveries_succeeded", "deliveries_failed", "deliveries_retried",
           "deliveries_exhausted", "bodies_too_large", "bodies_not_json", "bodies_undecodable")


def test_metrics_after_delivery(setup, receiver):
    envoy = setup["envoy"]
    control_event(setup, receiver)
    stats = envoy.custom_stats()
    missing = [m for m in METRICS if f"wasmcustom.webhook_emitter.{m}" not in stats]
    assert not missing, f"metrics not defined: {missing}; wasmcustom stats: {stats}"
    harness.wait_until(
        lambda: envoy.custom_stats().get("wasmcustom.webhook_emitter.deliveries_succeeded", 0) > 0,
        timeout=10, desc="wasmcustom.webhook_emitter.deliveries_succeeded > 0")
    stats = envoy.custom_stats()
    assert stats.get("wasmcustom.webhook_emitter.events_emitted", 0) > 0, stats
    assert stats.get("wasmcustom.webhook_emitter.deliveries_succeeded", 0) > 0, stats
