"""Configuration updates: a new plugin configuration delivered to a running Envoy.

The listener comes from LDS on the filesystem (harness: envoy_with_filter(..., lds=True)); the test swaps it
for one whose filter has a changed configuration (harness.update_plugin_config). Envoy updates the filter
chain in place and creates a new root context in the same VM; the filter adopts the outbox by plugin name.

Expected: deliveries queued for webhooks that survive still arrive; those for webhooks that the new
configuration removed or disabled are dropped, each with a log line and a counter
(deliveries_dropped.webhook_removed), and none of them reaches its endpoint any more.
"""

import threading

import harness
import pytest
from harness.checks import check_delivery
from harness.config import PluginConfig, delivery_section, make_hook, new_id
from harness.faults import Reply
from harness.observe import Counters, complete_job, plugin_log_lines, wait_for_log

REMOVED = "reason=the webhook was removed or disabled by a new configuration"


def delivery(**overrides):
    # Circuit breaker off: these tests are about the configuration change, not about the breaker.
    section = delivery_section(retrySchedule=["300ms"] * 30, **overrides)
    section["circuitBreaker"] = {"failures": 0}
    return section


def first_attempt_failed(envoy, hook, event_ids):
    """Whether every one of these events has had an attempt to `hook` that failed and is waiting for a retry."""
    lines = plugin_log_lines(envoy, "attempt failed, will retry: ")
    return all(any(f"event={e} webhook={hook.id} " in line for line in lines) for e in event_ids)


def test_config_update_keeps_queued_deliveries_of_surviving_webhooks_and_drops_the_others(
        job_service, rc, start_envoy, wasm):
    org = new_id()
    kept = make_hook(rc.port, org, name="survives")
    removed = make_hook(rc.port, org, name="removed")
    disabled = make_hook(rc.port, org, name="disabled-later")
    added = make_hook(rc.port, org, name="added")  # only in the new configuration: the positive control
    envoy = start_envoy(PluginConfig(hooks=[kept, removed, disabled], delivery=delivery()), lds=True)
    counters = Counters(envoy)
    # Every webhook answers 503 until after the update, so the deliveries stay queued (waiting for a retry).
    # The two that go away also ask for Retry-After: 60, so at the update none of their attempts is in flight:
    # all are waiting in their lanes (an attempt in flight at the update is the next test's case).
    rc.always(kept.path, 503)
    for hook in (removed, disabled):
        rc.always(hook.path, Reply(503, headers=(("Retry-After", "60"),)))
    jobs = [complete_job(envoy, org) for _ in range(4)]
    event_ids = sorted(harness.wait_until(
        lambda: (lambda ids: ids if len(ids) == len(jobs) else None)(
            {d.event_id for d in rc.requests_to(kept.path) if d.object_id() in jobs}),
        timeout=15, desc="a first attempt of every event to the surviving webhook"))
    for hook in (kept, removed, disabled):
        harness.wait_until(lambda: first_attempt_failed(envoy, hook, event_ids), timeout=15,
                           desc=f"a failed attempt of every event to {hook.name}")

    disabled.status = "disabled"
    new_config = PluginConfig(hooks=[added, disabled, kept], delivery=delivery())  # other order, too
    harness.update_plugin_config(envoy, job_service, rc, new_config, wasm=wasm)
    control = complete_job(envoy, org)
    rc.wait_for(lambda d: d.path == added.path and d.object_id() == control, count=1, timeout=15)
    seen = {h.path: len(rc.requests_to(h.path)) for h in (removed, disabled)}

    rc.always(kept.path, 200)  # the survivor recovers after the update
    harness.wait_until(lambda: {d.object_id() for d in rc.accepted(lambda d: d.path == kept.path)} >= set(jobs),
                       timeout=20, desc="the queued deliveries to the surviving webhook")
    rc.wait_for(lambda d: d.path == kept.path and d.object_id() == control and d.answer == 200, timeout=15)
    counters.wait_delta("deliveries_succeeded", len(jobs) + 2)

    dropped = counters.delta("deliveries_dropped.webhook_removed")
    assert dropped == 2 * len(jobs), f"deliveries_dropped.webhook_removed moved by {dropped}, expected {2 * len(jobs)}"
    for hook in (removed, disabled):
        for event_id in event_ids:
            wait_for_log(envoy, rf"delivery dropped: event={event_id} webhook={hook.id} {REMOVED}$")
    assert counters.delta("deliveries_exhausted") == 0
    for d in rc.accepted(lambda d: d.path == kept.path):
        check_delivery(d, kept, "job.completed", harness.completed_job(d.object_id()))
    assert len(rc.accepted(lambda d: d.path == kept.path)) == len(jobs) + 1
    # They are the very deliveries that were queued before the update (same event ids), not new ones.
    assert sorted(d.event_id for d in rc.accepted(lambda d: d.path == kept.path and d.object_id() in jobs)) \
        == event_ids
    # Nothing more went to the webhooks that are gone (their first attempts were all before the update).
    assert {h.path: len(rc.requests_to(h.path)) for h in (removed, disabled)} == seen == \
        {removed.path: len(jobs), disabled.path: len(jobs)}


@pytest.mark.parametrize("change", ["removed", "disabled"])
def test_an_attempt_in_flight_at_the_update_to_a_webhook_that_goes_away_is_dropped_with_a_trace(
        job_service, rc, start_envoy, wasm, change):
    """An attempt in flight at the update to a webhook that the new configuration removes (or disables), and
    that fails afterwards, is dropped like a queued one: a log line, the counter, and no further attempt."""
    org = new_id()
    kept = make_hook(rc.port, org, name="survives")
    going = make_hook(rc.port, org, name=f"{change}-in-flight")
    # One worker: the positive control below relies on the held answer and the later event being handled by
    # the same worker, in order.
    envoy = start_envoy(PluginConfig(hooks=[kept, going], delivery=delivery()), lds=True, concurrency=1)
    counters = Counters(envoy)
    gate = threading.Event()
    rc.script(going.path, [Reply(503, gate=gate)], then=503)  # the first attempt is held, then answered 503
    job_id = complete_job(envoy, org)
    rc.wait_for(lambda d: d.object_id() == job_id, count=2, timeout=15)
    event_id = rc.requests_to(kept.path)[0].event_id

    if change == "disabled":
        going.status = "disabled"
        new_hooks = [kept, going]
    else:
        new_hooks = [kept]
    harness.update_plugin_config(envoy, job_service, rc, PluginConfig(hooks=new_hooks, delivery=delivery()),
                                 wasm=wasm)
    control = complete_job(envoy, org)
    rc.wait_for(lambda d: d.path == kept.path and d.object_id() == control, count=1, timeout=15)
    answered_503 = rc.answered.get(503, 0)
    gate.set()  # the held attempt fails now, after its webhook went away
    harness.wait_until(lambda: rc.answered.get(503, 0) > answered_503, timeout=10,
                       desc="the receiver to answer the held attempt")
    # Positive control: an event sent after the answer went back; once its delivery has arrived, the filter
    # has handled that answer (one worker thread) and has counted and logged whatever it did with it.
    later = complete_job(envoy, org)
    rc.wait_for(lambda d: d.path == kept.path and d.object_id() == later, count=1, timeout=15)
    counters.wait_delta("deliveries_succeeded", 3)

    deltas = counters.deltas("deliveries_attempted", "deliveries_failed", "deliveries_retried",
                             "deliveries_dropped.webhook_removed")
    problems = []
    if deltas["deliveries_retried"]:
        problems.append(f"deliveries_retried moved by {deltas['deliveries_retried']}: the failed attempt was "
                        f"scheduled for a retry although its webhook is {change}")
        try:  # and show that the retry does reach the endpoint
            rc.wait_for(lambda d: d.path == going.path, count=2, timeout=5)
        except AssertionError:
            pass
    extra = len(rc.requests_to(going.path)) - 1
    if extra:
        problems.append(f"{extra} more attempt(s) reached the {change} webhook after the new configuration")
    if deltas["deliveries_dropped.webhook_removed"] != 1:
        problems.append(f"deliveries_dropped.webhook_removed moved by {deltas['deliveries_dropped.webhook_removed']}"
                        ", expected 1")
    if not any(f"event={event_id} webhook={going.id} {REMOVED}" in line
               for line in plugin_log_lines(envoy, "delivery dropped: ")):
        problems.append(f"no 'delivery dropped: event={event_id} webhook={going.id} {REMOVED}' line")
    assert not problems, "; ".join(problems) + f"\ncounters {deltas}\nthe filter's log lines about the event:\n" + \
        "\n".join(line for line in plugin_log_lines(envoy, event_id))
