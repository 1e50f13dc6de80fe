"""The delivery log end to end: real Envoys (two workers each) pulling and reporting to the real `registry
serve`, a receiver that fails a webhook's first 20 events for good and then recovers. The organisation admin's
deliveries API lists what happened; recover, resend and test reach the receiver through the proxies, signed with
the webhook's key and with the original webhook-id; a proxy killed while it holds claimed sends leaves them to
another; the registry down for 10 s costs reports, never deliveries."""

from __future__ import annotations

import datetime
import os
import signal
import time

import harness
import pytest
from harness.checks import signature_valid
from harness.config import new_id
from harness.observe import Counters, wait_for_log
from harness.registry_service import RegistryService, free_port
from registry_feed import complete, envoy_pulling

POLL_MS = 300
FLUSH_MS = 200
SEND_LEASE_S = 3
OUTAGE = 20


@pytest.fixture
def registry(cli_built, tmp_path):
    service = RegistryService(tmp_path / "registry", port=free_port(), extra_args=["--send-lease", f"{SEND_LEASE_S}s"])
    yield service
    service.stop()


def envoy_reporting(job_service, rc, registry, envoys, wasm, name, **delivery):
    settings = {"retrySchedule": ["100ms", "200ms"], "circuitBreaker": {"failures": 0}, **delivery}
    return envoy_pulling(job_service, rc, registry, envoys, wasm, name, POLL_MS,
                         registry_settings={"reportFlushMs": FLUSH_MS}, **settings)


def webhooks_applied(counters):
    """Every root context (two workers and the main thread) applied a registry listing with the webhook."""
    counters.wait_delta("registry_updates", 3, timeout=15)


def deliveries(registry, org, webhook_id, status=None) -> list:
    """Every delivery the admin's API lists (all pages), newest first."""
    listed, cursor = [], None
    while True:
        query = [f"status={status}"] if status else []
        query += [f"cursor={cursor}"] if cursor else []
        path = f"/v1/organisations/{org}/webhooks/{webhook_id}/deliveries" + ("?" + "&".join(query) if query else "")
        answer = registry.request("GET", path, token=registry.token(org=org))
        assert answer.status == 200, answer
        page = answer.json()
        listed += page["deliveries"]
        cursor = page.get("next")
        if not cursor:
            return listed


def wait_listed(registry, org, webhook_id, status, count, timeout=20.0) -> list:
    def enough():
        listed = deliveries(registry, org, webhook_id, status)
        return listed if len(listed) >= count else None
    return harness.wait_until(enough, timeout, f"{count} {status} deliveries listed")


def admin_post(registry, org, path, body=None):
    answer = registry.request("POST", f"/v1/organisations/{org}{path}", token=registry.token(org=org), body=body)
    assert answer.status == 202, answer
    return answer.json()


def sigkill(envoy):
    os.kill(envoy.proc.pid, signal.SIGKILL)
    envoy.proc.wait(30)
    envoy.stop()


def test_failures_listed_then_recovered_resent_and_tested(job_service, rc, registry, envoys, wasm):
    envoy = envoy_reporting(job_service, rc, registry, envoys, wasm, "delivery-log")
    counters = Counters(envoy)
    org = new_id()
    path = f"/hooks/{new_id()}"
    before_outage = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)
    webhook, key = registry.register(org, rc.url(path))
    webhooks_applied(counters)

    # The outage: every attempt of the first 20 events is answered 503 (3 attempts each), then the endpoint works.
    rc.script(path, [503] * (OUTAGE * 3))
    outage_jobs = [complete(envoy, job_service, org) for _ in range(OUTAGE)]
    counters.wait_delta("deliveries_exhausted", OUTAGE, timeout=30)
    failed_ids = {d.event_id for d in rc.requests_to(path)}
    assert len(failed_ids) == OUTAGE and len(rc.requests_to(path)) == OUTAGE * 3
    later_jobs = [complete(envoy, job_service, org) for _ in range(3)]
    later = rc.wait_for(lambda d: d.path == path and d.object_id() in later_jobs, count=3, timeout=15)
    later_ids = {d.event_id for d in later}

    # The admin's view: the 20 failed for good with their three 503s, the later ones delivered.
    failed = wait_listed(registry, org, webhook["id"], "failed", OUTAGE)
    assert {d["eventId"] for d in failed} == failed_ids
    for d in failed:
        assert [a["status"] for a in d["attempts"]] == [503, 503, 503], d
        assert [a["outcome"] for a in d["attempts"]] == ["retrying", "retrying", "failed"], d
        assert all(a["latencyMs"] >= 0 for a in d["attempts"])
    delivered = wait_listed(registry, org, webhook["id"], "delivered", 3)
    assert {d["eventId"] for d in delivered} == later_ids
    assert all(d["attempts"][0]["status"] == 200 and d["attempts"][0]["outcome"] == "delivered" for d in delivered)
    detail = registry.request("GET", f"/v1/organisations/{org}/webhooks/{webhook['id']}/deliveries/{later[0].event_id}",
                              token=registry.token(org=org))
    assert detail.status == 200 and detail.json()["payload"].encode() == later[0].body, "the payload as sent"

    # Recover since before the outage: all 20 again, each verified with the key, each with its original webhook-id.
    seen = len(rc.requests_to(path))
    first_sent = {d.event_id: d for d in rc.requests_to(path)}
    queued = admin_post(registry, org, f"/webhooks/{webhook['id']}/recover",
                        {"since": before_outage.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"})
    assert queued["queued"] == OUTAGE, queued
    rc.wait_for(lambda d: d.path == path and d.event_id in failed_ids and d.answer == 200, count=OUTAGE, timeout=20)
    recovered = rc.requests_to(path)[seen:]
    assert sorted(d.headers["webhook-id"] for d in recovered) == sorted(failed_ids), "each once, none other"
    for d in recovered:
        assert signature_valid(d, key)
        assert d.event_id == d.headers["webhook-id"]
        assert d.body == first_sent[d.event_id].body, "the envelope as first sent"
    assert len(outage_jobs) == OUTAGE
    counters.wait_delta("sends_delivered", OUTAGE, timeout=10)
    recovered_listed = wait_listed(registry, org, webhook["id"], "delivered", 3 + OUTAGE)
    assert {d["eventId"] for d in recovered_listed} == failed_ids | later_ids

    # Resend one delivered event: the same webhook-id again, a fresh signature.
    resent_id = later[0].event_id
    since = time.time()
    admin_post(registry, org, f"/webhooks/{webhook['id']}/deliveries/{resent_id}/resend")
    (again,) = rc.wait_for(lambda d: d.path == path and d.received_at >= since, count=1, timeout=15)
    assert again.headers["webhook-id"] == resent_id and again.body == later[0].body
    assert signature_valid(again, key)

    # A test event: one, signed, built like a real one and saying it is a test.
    test = admin_post(registry, org, f"/webhooks/{webhook['id']}/test")
    (arrived,) = rc.wait_for(lambda d: d.path == path and d.headers.get("webhook-id") == test["eventId"], count=1,
                             timeout=15)
    assert signature_valid(arrived, key)
    body = arrived.json()
    assert body["webhookId"] == webhook["id"] and body["organisationId"] == org
    assert body["eventType"] == "job.completed" and body["data"]["object"]["test"] is True
    assert counters.delta("reports_dropped") == 0
    assert counters.delta("reports_sent") > 0


def test_a_proxy_killed_while_it_holds_claimed_sends_leaves_them_to_another(job_service, rc, registry, envoys, wasm):
    # Proxy A retries an hour later: it holds what it claimed until it dies.
    a = envoy_reporting(job_service, rc, registry, envoys, wasm, "delivery-log-a", retrySchedule=["1h"])
    counters_a = Counters(a)
    org = new_id()
    path = f"/hooks/{new_id()}"
    webhook, key = registry.register(org, rc.url(path))
    webhooks_applied(counters_a)
    jobs = [complete(a, job_service, org) for _ in range(3)]
    first = rc.wait_for(lambda d: d.path == path and d.object_id() in jobs, count=3, timeout=15)
    ids = {d.event_id for d in first}
    wait_listed(registry, org, webhook["id"], "delivered", 3)

    # Resends: A claims them, its attempts fail, and it holds them.
    rc.script(path, [503] * 3)
    since = time.time()
    for event_id in ids:
        admin_post(registry, org, f"/webhooks/{webhook['id']}/deliveries/{event_id}/resend")
    rc.wait_for(lambda d: d.path == path and d.received_at >= since, count=3, timeout=15)
    counters_a.wait_delta("sends_claimed", 3, timeout=5)
    sigkill(a)
    killed = time.monotonic()

    b = envoy_reporting(job_service, rc, registry, envoys, wasm, "delivery-log-b")
    counters_b = Counters(b)
    rc.wait_for(lambda d: d.path == path and d.answer == 200 and d.received_at >= since, count=3, timeout=30)
    took = time.monotonic() - killed
    after = [d for d in rc.requests_to(path) if d.received_at >= since]
    # Each send: once by A (503), once by B (200), nothing more.
    assert sorted(d.headers["webhook-id"] for d in after if d.answer == 200) == sorted(ids), "none lost"
    assert sorted(d.headers["webhook-id"] for d in after) == sorted(list(ids) * 2), "none sent twice"
    assert all(signature_valid(d, key) for d in after)
    counters_b.wait_delta("sends_delivered", 3, timeout=10)
    print(f"\nsends held by a killed proxy delivered by another {took:.1f}s after SIGKILL (lease {SEND_LEASE_S}s)")


def test_with_the_registry_down_deliveries_go_on_and_reports_are_dropped_and_counted(
        job_service, rc, registry, envoys, wasm):
    envoy = envoy_reporting(job_service, rc, registry, envoys, wasm, "delivery-log-down")
    counters = Counters(envoy)
    org = new_id()
    path = f"/hooks/{new_id()}"
    webhook, _ = registry.register(org, rc.url(path))
    webhooks_applied(counters)
    registry.stop()
    stopped = time.monotonic()
    delivered = 0
    while time.monotonic() - stopped < 10:  # the scenario: 10 s without the registry
        job = complete(envoy, job_service, org)
        rc.wait_for(lambda d, j=job: d.object_id() == j and d.path == path, timeout=15)
        delivered += 1
        time.sleep(0.3)
    counters.wait_delta("reports_dropped", 2, timeout=10)
    wait_for_log(envoy, r"delivery report dropped \(.*\): \d+ records lost")
    assert len(harness.observe.plugin_log_lines(envoy, "delivery report dropped")) <= 2, "logged once per worker"
    registry.start()
    job = complete(envoy, job_service, org)
    (d,) = rc.wait_for(lambda d: d.object_id() == job and d.path == path, timeout=15)
    wait_for_log(envoy, r"delivery reports reach the registry again")
    listed = wait_listed(registry, org, webhook["id"], "delivered", 1)
    assert d.event_id in {x["eventId"] for x in listed}, "the log resumes"
    print(f"\nregistry down 10 s: {delivered} events delivered meanwhile, "
          f"{counters.delta('reports_dropped')} report batches dropped")
