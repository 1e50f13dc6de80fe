"""The harness itself, without the filter: Envoy starts on OS-chosen ports, proxies every job-service scenario
unchanged, and several Envoys can run at once. This is the baseline the filter's tests compare against."""

import gzip
import json

import harness
import pytest


@pytest.fixture(scope="module")
def plain_envoys(job_service, receiver, envoys):
    started = [harness.Envoy(harness.build_bootstrap(job_service.port, receiver.port), name=f"plain-{i}")
               for i in range(2)]
    envoys.extend(started)
    for e in started:
        e.start(wait=False)
    for e in started:
        e.wait_ready()
    return started


def test_several_envoys_run_at_once_on_distinct_ports(plain_envoys):
    ports = {p for e in plain_envoys for p in (e.listener_port, e.admin_port)}
    assert len(ports) == 2 * len(plain_envoys) and 0 not in ports
    assert all(e.running for e in plain_envoys)
    assert plain_envoys[0].stats()["cluster.job_service.membership_total"] == 1


@pytest.mark.parametrize("scenario", harness.JobService.SCENARIOS)
def test_envoy_without_filter_passes_every_scenario_through(plain_envoys, job_service, scenario):
    path = f"/jobs/{harness.new_id()}/complete?scenario={scenario}"
    direct = harness.http_request(job_service.port, "POST", path, {"x-organisation-id": "o"})
    proxied = plain_envoys[0].request("POST", path, {"x-organisation-id": "o"})
    assert proxied.status == direct.status
    assert proxied.body == direct.body
    assert proxied.headers.get("content-encoding") == direct.headers.get("content-encoding")
    if scenario == "big":
        assert direct.headers.get("transfer-encoding") == "chunked" and len(direct.body) >= 5 * 1024 * 1024
        assert proxied.headers.get("transfer-encoding") == "chunked"
        json.loads(direct.body)
    if scenario == "gzip":
        assert json.loads(gzip.decompress(direct.body))["status"] == "completed"
    if scenario == "large":
        assert len(direct.body) > harness.DEFAULT_MAX_BODY_BYTES and json.loads(direct.body)["status"] == "completed"
    if scenario == "invalid":
        with pytest.raises(ValueError):
            json.loads(direct.body)


def test_receiver_records_and_follows_its_plan(receiver):
    path = f"/hooks/{harness.new_id()}"
    receiver.plan(path, [503])
    first = harness.http_request(receiver.port, "POST", path, {"content-type": "application/json"}, b'{"a":1}')
    second = harness.http_request(receiver.port, "POST", path, {}, b"x")
    assert (first.status, second.status) == (503, 200)
    got = receiver.wait_for(lambda d: d.path == path, count=2, timeout=5)
    assert [d.body for d in got] == [b'{"a":1}', b"x"] and got[0].headers["content-type"] == "application/json"
    with pytest.raises(harness.WaitTimeout):
        receiver.wait_for(lambda d: d.path == path, count=3, timeout=0.2)


def _signed_delivery(hook, body: dict, key=None, **header_overrides):
    """A delivery as the contract describes it, signed by standardwebhooks itself."""
    import time
    from datetime import datetime, timezone

    from standardwebhooks import Webhook

    raw = json.dumps(body, separators=(",", ":"))
    now = datetime.now(tz=timezone.utc)
    headers = {
        "host": hook.url.split("/")[2], "content-type": "application/json", "user-agent": "webhook-emitter/0.1.0",
        "content-length": str(len(raw.encode())),
        "webhook-id": body.get("id", ""), "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(key or hook.key).sign(body.get("id", ""), now, raw),
    }
    headers.update(header_overrides)
    return harness.Delivery("POST", hook.path, headers, raw.encode(), time.time())


def test_delivery_checker_accepts_the_contract_and_rejects_violations():
    """The checker used by every delivery test can fail: one good delivery passes, each violation is caught."""
    import time

    from harness.checks import check_delivery

    hook = harness.make_hook(1234, harness.new_id())
    other = harness.make_hook(1234, hook.organisation_id)
    job = harness.completed_job(harness.new_id())
    event_id = f"{int(time.time()):08x}" + "0123456789abcdef"
    good = {"id": event_id, "webhookId": hook.id, "organisationId": hook.organisation_id,
            "eventType": "job.completed", "dateTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "data": {"object": dict(job, objectType="job")}, "version": 1}
    check_delivery(_signed_delivery(hook, good), hook, "job.completed", job)

    def bad(**changes):
        body = dict(good)
        for k, v in changes.items():
            if v is None:
                body.pop(k)
            else:
                body[k] = v
        return body

    violations = {
        "extra key": _signed_delivery(hook, bad(extra=1)),
        "missing key": _signed_delivery(hook, bad(version=None)),
        "version as string": _signed_delivery(hook, bad(version="1")),
        "uppercase id": _signed_delivery(hook, bad(id=event_id.upper())),
        "dateTime without Z": _signed_delivery(hook, bad(dateTime=good["dateTime"].replace("Z", "+00:00"))),
        "wrong objectType": _signed_delivery(hook, bad(data={"object": dict(job, objectType="task")})),
        "object changed": _signed_delivery(hook, bad(data={"object": dict(job, status="failed", objectType="job")})),
        "other organisation": _signed_delivery(hook, bad(organisationId=harness.new_id())),
        "other webhook": _signed_delivery(hook, bad(webhookId=other.id)),
        "wrong event type": _signed_delivery(hook, bad(eventType="job.started")),
        "signed with another key": _signed_delivery(hook, good, key=other.key),
        "webhook-id differs": _signed_delivery(hook, good, **{"webhook-id": "0" * 24}),
        "no user-agent": _signed_delivery(hook, good, **{"user-agent": "curl/8"}),
        "wrong content-type": _signed_delivery(hook, good, **{"content-type": "text/plain"}),
        "wrong content-length": _signed_delivery(hook, good, **{"content-length": "1"}),
    }
    not_caught = []
    for name, delivery in violations.items():
        try:
            check_delivery(delivery, hook, "job.completed", job)
        except AssertionError:
            continue
        not_caught.append(name)
    assert not not_caught, f"violations the checker let through: {not_caught}"


def test_secret_scan_finds_keys_in_every_form():
    import base64

    from harness import registry

    key = harness.new_key()
    raw = base64.b64decode(key[len("whsec_"):])
    assert key in registry.secrets()
    for text in (f"x {key} y", f"secret={key[6:]}", f"bytes {raw.hex()}"):
        assert registry.leaks_in(text, [key]), text
    assert not registry.leaks_in("nothing to see " + harness.new_key(), [key])
