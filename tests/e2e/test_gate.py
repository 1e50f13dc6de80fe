"""The Envoy-side gate of the shipped configurations (harness.gate, envoy/envoy.yaml): an ExtensionWithMatcher
whose composite filter runs the wasm filter only for requests whose method and path some rule can match.

- With the predicate `webhook-emitter envoy-matcher` prints, every request a rule matches still becomes a delivery:
  several rules, several methods, captures, query strings.
- A request the gate refuses never reaches the VM: with a gate narrower than the rules (on purpose), a request the
  filter would have turned into an event, or counted as a body that is not JSON, leaves no trace in the VM's
  metrics and makes no delivery, while the same request with an admitted method does both.

One Envoy worker per test: the control request sent last is handled after the ones before it, so once its delivery
is in, the earlier requests have had their chance."""

import harness
from harness.config import PluginConfig, delivery_section, job_completed_rule, job_started_rule, make_hook, new_id
from harness.gate import predicate

NOT_JSON = "wasmcustom.webhook_emitter.bodies_not_json"
EMITTED = "wasmcustom.webhook_emitter.events_emitted"


def _setup(job_service, receiver, envoys, wasm, name, gate):
    org = new_id()
    hook = make_hook(receiver.port, org, ["job.completed", "job.started"], name=name)
    config = PluginConfig(hooks=[hook], events=[job_completed_rule(), job_started_rule()],
                          delivery=delivery_section())
    envoy = harness.envoy_with_filter(job_service, receiver, config, wasm=wasm, name=name, concurrency=1, gate=gate)
    envoys.append(envoy)
    return envoy, hook, org


def _send(envoy, org, method, path):
    r = envoy.request(method, path, {"x-organisation-id": org, "content-type": "application/json"}, b"{}")
    assert r.status == 200, (method, path, r.status, r.body[:200])


def test_every_request_a_rule_matches_passes_the_printed_gate(job_service, receiver, envoys, wasm):
    envoy, hook, org = _setup(job_service, receiver, envoys, wasm, "gate-printed", gate=True)
    sent = []
    for method, path in [
        ("POST", "/jobs/{id}/complete"),
        ("PUT", "/jobs/{id}/complete?attempt=2&next=/jobs/x"),
        ("PATCH", "/jobs/{id}/complete?"),
        ("POST", "/jobs/{id}/start?trace=1"),
    ]:
        job_id = new_id()
        _send(envoy, org, method, path.format(id=job_id))
        sent.append(job_id)
    got = receiver.wait_for(lambda d: d.webhook_id == hook.id and d.object_id() in sent, count=len(sent))
    assert sorted(d.object_id() for d in got) == sorted(sent)
    assert {d.json()["eventType"] for d in got} == {"job.completed", "job.started"}


def test_a_request_the_gate_refuses_never_reaches_the_vm(job_service, receiver, envoys, wasm):
    # The gate of a configuration whose only method is PUT, in front of a filter whose rules also take POST.
    narrow = PluginConfig(hooks=[make_hook(receiver.port, new_id())],
                          events=[{**job_completed_rule(), "match": {**job_completed_rule()["match"],
                                                                     "methods": ["PUT"]}}],
                          delivery=delivery_section())
    envoy, hook, org = _setup(job_service, receiver, envoys, wasm, "gate-narrow", gate=predicate(narrow.to_dict()))

    refused_job, admitted_job = new_id(), new_id()
    # Through the gate, these two would each reach the filter: a body that is not JSON is counted, a completed job
    # is an event.
    _send(envoy, org, "POST", f"/jobs/{new_id()}/complete?scenario=invalid")
    _send(envoy, org, "POST", f"/jobs/{refused_job}/complete")
    _send(envoy, org, "PUT", f"/jobs/{new_id()}/complete?scenario=invalid")
    _send(envoy, org, "PUT", f"/jobs/{admitted_job}/complete")
    receiver.wait_for(lambda d: d.object_id() == admitted_job, count=1)
    harness.wait_until(lambda: envoy.custom_stats().get(EMITTED, 0) >= 1, timeout=10,
                       desc="the admitted event is counted")
    stats = envoy.custom_stats()
    assert stats.get(NOT_JSON, 0) == 1, stats  # the PUT only
    assert stats.get(EMITTED, 0) == 1, stats
    assert not receiver.deliveries(lambda d: d.object_id() == refused_job)
    # The refused requests were served all the same.
    assert len(job_service.requests_for("/jobs/")) >= 4


def test_requests_no_rule_matches_are_served_through_the_gate_and_make_no_event(job_service, receiver, envoys,
                                                                               wasm):
    envoy, hook, org = _setup(job_service, receiver, envoys, wasm, "gate-pass", gate=True)
    for method, path in [("GET", "/jobs/{id}/complete"), ("POST", "/jobs/{id}/complete/x"),
                         ("POST", "/v1/jobs/{id}/complete"), ("DELETE", "/jobs/{id}/start")]:
        _send(envoy, org, method, path.format(id=new_id()))
    control = new_id()
    _send(envoy, org, "POST", f"/jobs/{control}/complete")
    receiver.wait_for(lambda d: d.object_id() == control, count=1)
    harness.wait_until(lambda: envoy.custom_stats().get(EMITTED, 0) >= 1, timeout=10, desc="the control event")
    assert envoy.custom_stats().get(EMITTED, 0) == 1
