"""A completion whose answer is cut short through the real Envoy (--concurrency 2): a client that hangs up after the
response headers (HTTP/1.1 close, HTTP/2 RST_STREAM CANCEL), or an upstream that cuts its own body. With the rule's
`refetch`, the proxy reads the job again (GET /jobs/{id}) and its event is delivered exactly once; without it, the
loss is counted and logged; a refetch the upstream keeps failing is retried along the schedule, then counted."""

from __future__ import annotations

import socket

import harness
import pytest
from harness.config import PluginConfig, delivery_section, job_completed_rule, job_started_rule, make_hook, new_id
from harness.hangup import h2_cancel_after_headers, http1_hang_up_after_headers, http1_read_cut_answer
from harness.observe import Counters, wait_for_log
from harness.util import scaled, wait_until

REFETCH = {"path": "/jobs/{jobId}"}


def config_for(rc, refetch, **delivery):
    org = new_id()
    hook = make_hook(rc.port, org)
    rule = job_completed_rule(refetch=refetch)
    return org, hook, PluginConfig(hooks=[hook], events=[rule, job_started_rule()],
                                   delivery=delivery_section(**delivery))


CUTS = {
    "http1-close": lambda port, job, org: http1_hang_up_after_headers(port, f"/jobs/{job}/complete?scenario=hold", org),
    "h2-rst-stream": lambda port, job, org: h2_cancel_after_headers(port, f"/jobs/{job}/complete?scenario=hold", org),
    "upstream-cut": lambda port, job, org: http1_read_cut_answer(port, f"/jobs/{job}/complete?scenario=cut", org),
}


@pytest.mark.parametrize("cut,gated", [(cut, False) for cut in CUTS] + [("h2-rst-stream", True)])
def test_a_cut_completion_is_read_again_and_delivered_exactly_once(cut, gated, rc, job_service, start_envoy):
    org, hook, config = config_for(rc, REFETCH)
    # Gated: inside the shipped gate's composite filter, as envoy/envoy.yaml runs it.
    envoy = start_envoy(config, gate=gated)
    counters = Counters(envoy)
    job = new_id()
    CUTS[cut](envoy.listener_port, job, org)
    delivery = rc.wait_for(lambda d: d.object_id() == job, timeout=30)[0]
    assert delivery.json()["data"]["object"] == {**harness.completed_job(job), "objectType": "job"}
    assert delivery.json()["organisationId"] == org
    # One refetch, one event: nothing more is queued that could deliver it again.
    assert counters.wait_delta("events_refetched", 1) == 1
    d = counters.deltas("refetches_sent", "refetches_retried", "events_emitted", "events_lost.stream_reset",
                        "events_lost.refetch_failed")
    assert d == {"refetches_sent": 1, "refetches_retried": 0, "events_emitted": 1, "events_lost.stream_reset": 0,
                 "events_lost.refetch_failed": 0}, d
    assert [x.event_id for x in rc.deliveries(lambda x: x.object_id() == job)] == [delivery.event_id]
    reads = [r for r in job_service.requests_for(f"/jobs/{job}") if r["method"] == "GET"]
    assert len(reads) == 1 and reads[0]["path"] == f"/jobs/{job}"
    # The organisation header went along (the rule takes the organisation from it), to the original authority.
    assert reads[0]["headers"]["x-organisation-id"] == org
    assert reads[0]["headers"]["host"] == "jobs"
    wait_for_log(envoy, rf"job\.completed for \"/jobs/{job}/complete\" read again after its "
                        rf"stream ended early \(.+\): event={delivery.event_id}")


@pytest.mark.parametrize("cut", ["http1-close", "h2-rst-stream", "upstream-cut"])
def test_without_refetch_the_loss_is_counted_and_logged(cut, rc, job_service, start_envoy):
    org, hook, config = config_for(rc, None)
    envoy = start_envoy(config)
    counters = Counters(envoy)
    job = new_id()
    CUTS[cut](envoy.listener_port, job, org)
    assert counters.wait_delta("events_lost.stream_reset", 1) == 1
    wait_for_log(envoy, rf"event lost: job\.completed for \"/jobs/{job}/complete\": the stream ended before its "
                        rf"body was complete \(.+\) and the rule has no refetch \(reason=stream_reset\)")
    assert counters.delta("events_emitted") == 0 and counters.delta("refetches_sent") == 0
    assert not [r for r in job_service.requests_for(f"/jobs/{job}") if r["method"] == "GET"]
    # The next completion is delivered as usual.
    ok = new_id()
    r = envoy.request("POST", f"/jobs/{ok}/complete", {"x-organisation-id": org}, b"{}")
    assert r.status == 200
    rc.wait_for(lambda d: d.object_id() == ok, timeout=30)
    assert not rc.deliveries(lambda d: d.object_id() == job)


def test_a_client_that_hangs_up_before_any_response_is_read_again_too(rc, job_service, start_envoy):
    """The upstream completed the job but had sent nothing when the client left: the refetch finds it completed.
    A job the upstream does not know (404) is no completion and no loss."""
    org, hook, config = config_for(rc, REFETCH)
    envoy = start_envoy(config)
    counters = Counters(envoy)
    job, undone = new_id(), new_id()
    for j, scenario in ((job, "stall"), (undone, "stall-undone")):
        with socket.create_connection(("127.0.0.1", envoy.listener_port), timeout=scaled(20)) as s:
            s.sendall(b"POST /jobs/%s/complete?scenario=%s HTTP/1.1\r\nHost: jobs\r\nContent-Length: 2\r\n"
                      b"x-organisation-id: %s\r\n\r\n{}" % (j.encode(), scenario.encode(), org.encode()))
            # Hang up once the upstream has the request (and has completed the job, or not), before any answer.
            if scenario == "stall":
                wait_until(lambda: j in job_service.jobs, 20, desc="the job completed upstream")
            else:
                wait_until(lambda: job_service.requests_for(f"/jobs/{j}/complete"), 20, desc="the request upstream")
    delivery = rc.wait_for(lambda d: d.object_id() == job, timeout=30)[0]
    assert counters.wait_delta("events_refetched", 1) == 1
    wait_for_log(envoy, rf"job\.completed for \"/jobs/{job}/complete\" read again after its stream ended early "
                        rf"\(.+\): event={delivery.event_id}")
    # The job the upstream did not complete: its refetch answers 404, which is no completion and no loss.
    assert counters.wait_delta("events_skipped.status", 1) == 1
    assert counters.deltas("events_lost.stream_reset", "events_lost.refetch_failed", "refetches_sent") == {
        "events_lost.stream_reset": 0, "events_lost.refetch_failed": 0, "refetches_sent": 2}
    assert [x.event_id for x in rc.deliveries(lambda x: x.object_id() == job)] == [delivery.event_id]
    assert not rc.deliveries(lambda x: x.object_id() == undone)


def test_a_refetch_the_upstream_keeps_failing_is_retried_then_counted(rc, job_service, start_envoy):
    org, hook, config = config_for(rc, REFETCH, retrySchedule=["200ms", "400ms"])
    envoy = start_envoy(config)
    counters = Counters(envoy)
    job = job_service.fail_reads(new_id())
    CUTS["http1-close"](envoy.listener_port, job, org)
    assert counters.wait_delta("events_lost.refetch_failed", 1) == 1
    wait_for_log(envoy, rf"event lost: job\.completed for \"/jobs/{job}/complete\": the stream ended "
                        rf"early \(.+\) and the refetch GET /jobs/{job} failed: the upstream answered 503, after 3 "
                        rf"attempts \(reason=refetch_failed\)")
    d = counters.deltas("refetches_sent", "refetches_retried", "events_emitted", "events_lost.stream_reset")
    assert d == {"refetches_sent": 3, "refetches_retried": 2, "events_emitted": 0, "events_lost.stream_reset": 0}, d
    assert len([r for r in job_service.requests_for(f"/jobs/{job}") if r["method"] == "GET"]) == 3
    assert not rc.deliveries(lambda x: x.object_id() == job)


def test_a_refetch_that_fails_once_is_delivered_on_the_retry(rc, job_service, start_envoy):
    org, hook, config = config_for(rc, REFETCH, retrySchedule=["200ms", "400ms"])
    envoy = start_envoy(config)
    counters = Counters(envoy)
    job = job_service.fail_reads(new_id(), times=1)
    CUTS["h2-rst-stream"](envoy.listener_port, job, org)
    delivery = rc.wait_for(lambda d: d.object_id() == job, timeout=30)[0]
    assert counters.wait_delta("events_refetched", 1) == 1
    d = counters.deltas("refetches_sent", "refetches_retried", "events_emitted", "events_lost.refetch_failed")
    assert d == {"refetches_sent": 2, "refetches_retried": 1, "events_emitted": 1, "events_lost.refetch_failed": 0}, d
    assert [x.event_id for x in rc.deliveries(lambda x: x.object_id() == job)] == [delivery.event_id]
