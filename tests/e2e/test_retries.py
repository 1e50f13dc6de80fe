"""Retries: how each kind of failed attempt is retried, and what
happens when a delivery finally fails. A real Envoy runs the built filter; receivers are real loopback servers
that misbehave on purpose (harness.faults); signatures are checked with standardwebhooks.

Each test starts its own Envoy with the schedule it needs (stopped when the test ends), and its webhooks
have their own paths on one scripted receiver, so tests cannot see each other's deliveries.
"""

import calendar
import json
import threading
import time
from email.utils import formatdate

import harness
import pytest
from harness.checks import HEX24, RFC3339_UTC_Z, check_delivery, signature_valid
from harness.config import PluginConfig, delivery_section, key_ref, make_hook, new_id, new_key
from harness.envoy import static_cluster
from harness.faults import LateReceiver, Reply
from harness.observe import Counters, complete_job, plugin_dict, plugin_log_lines, wait_for_log


SHORT = ["200ms", "500ms", "1s"]


def one_hook(rc, name, **delivery):
    org = new_id()
    hook = make_hook(rc.port, org, ["job.completed"], name=name)
    return org, hook, PluginConfig(hooks=[hook], delivery=delivery_section(**delivery))


def test_503_twice_then_200_is_three_attempts_with_one_id_fresh_timestamps_and_valid_signatures(rc, start_envoy):
    # Timestamps are Unix seconds. With ±20% jitter a 1s step can be 0.8s, and two attempts could then share
    # a second; steps of 1300ms are at least 1.04s apart, so the three timestamps must all differ.
    org, hook, config = one_hook(rc, "503-503-200", retrySchedule=["1300ms", "1300ms"])
    envoy = start_envoy(config)
    rc.script(hook.path, [503, 503])  # then 200
    counters = Counters(envoy)
    job_id = complete_job(envoy, org)

    attempts = rc.wait_for(lambda d: d.path == hook.path, count=3, timeout=20)
    counters.wait_delta("deliveries_succeeded", 1)
    assert [d.answer for d in attempts] == [503, 503, 200]
    assert len({d.headers["webhook-id"] for d in attempts}) == 1, [d.headers["webhook-id"] for d in attempts]
    assert attempts[0].headers["webhook-id"] == attempts[0].event_id
    assert len({d.body for d in attempts}) == 1, "the envelope changed between attempts"
    stamps = [int(d.headers["webhook-timestamp"]) for d in attempts]
    assert stamps == sorted(stamps) and len(set(stamps)) == 3, f"timestamps not fresh on each attempt: {stamps}"
    assert len({d.headers["webhook-signature"] for d in attempts}) == 3, "signatures not fresh on each attempt"
    for d in attempts:
        assert signature_valid(d, hook.key), f"attempt at {d.headers['webhook-timestamp']} does not verify"
    check_delivery(attempts[-1], hook, "job.completed", harness.completed_job(job_id))

    deltas = counters.deltas("deliveries_attempted", "deliveries_succeeded", "deliveries_retried",
                             "deliveries_failed", "deliveries_exhausted")
    assert deltas == {"deliveries_attempted": 3, "deliveries_succeeded": 1, "deliveries_retried": 2,
                      "deliveries_failed": 2, "deliveries_exhausted": 0}, deltas
    event_id = attempts[0].event_id
    wait_for_log(envoy, rf"delivered: event={event_id} webhook={hook.id} attempts=3 latency_ms=\d+")
    assert len(rc.requests_to(hook.path)) == 3


def test_a_closed_port_that_opens_after_2s_gets_the_delivery(job_service, rc, start_envoy):
    late = LateReceiver().start()  # the port is reserved now, but refuses connections until open()
    try:
        org = new_id()
        hook = make_hook(late.port, org, ["job.completed"], name="late")
        # Ten retries at 500ms (at least 400ms each, with jitter) cover at least 4s: more than the 2s closed.
        config = PluginConfig(hooks=[hook], delivery=delivery_section(retrySchedule=["500ms"] * 10))
        envoy = start_envoy(plugin_dict(config, clusters={hook.id: "late"}),
                            extra_clusters=[static_cluster("late", late.port, large_circuit_breakers=True)])
        counters = Counters(envoy)
        t0 = time.monotonic()
        job_id = complete_job(envoy, org)
        # Closed for (at least) 2s, and long enough for two attempts to have been refused.
        harness.wait_until(lambda: time.monotonic() - t0 >= 2.0 and counters.delta("deliveries_failed") >= 2,
                           timeout=10, desc="2s to pass with at least two refused attempts")
        refused = counters.delta("deliveries_failed")
        late.open()
        (d,) = late.wait_for(lambda d: d.object_id() == job_id, count=1, timeout=15)
        check_delivery(d, hook, "job.completed", harness.completed_job(job_id))
        counters.wait_delta("deliveries_succeeded", 1)
        assert counters.delta("deliveries_exhausted") == 0
        failures = plugin_log_lines(envoy, f"attempt failed, will retry: event={d.event_id} webhook={hook.id} ")
        assert len(failures) >= refused >= 2, failures
        # Envoy answers a refused connection itself, with 503.
        assert all(" last=status 503 " in line for line in failures), failures
        (done,) = wait_for_log(envoy, rf"delivered: event={d.event_id} webhook={hook.id} attempts=(\d+) ")
        assert int(done.group(1)) == len(failures) + 1
        assert len(late.deliveries()) == 1, "nothing could reach the port before it opened"
    finally:
        late.stop()


def test_an_attempt_slower_than_timeout_ms_is_cut_off_and_retried(rc, start_envoy):
    org, hook, config = one_hook(rc, "slow", timeoutMs=300, retrySchedule=SHORT)
    envoy = start_envoy(config)
    rc.script(hook.path, [Reply(200, delay=2.0)])  # the first answer would come after 2s; then at once
    counters = Counters(envoy)
    job_id = complete_job(envoy, org)
    first, second = rc.wait_for(lambda d: d.path == hook.path, count=2, timeout=15)[:2]
    counters.wait_delta("deliveries_succeeded", 1)
    check_delivery(second, hook, "job.completed", harness.completed_job(job_id))
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    # Cut off at 300ms, then 200ms ±20% of backoff: the retry comes long before the slow answer would have.
    gap = second.received_at - first.received_at
    assert 0.3 <= gap < 1.5, f"the retry came {gap:.3f}s after the first attempt (timeout 300ms, receiver 2s)"
    wait_for_log(envoy, rf"attempt failed, will retry: event={first.event_id} webhook={hook.id} attempts=1 "
                        rf"last=status 504 ")
    wait_for_log(envoy, rf"delivered: event={first.event_id} webhook={hook.id} attempts=2 ")
    assert counters.deltas("deliveries_failed", "deliveries_retried", "deliveries_succeeded") == \
        {"deliveries_failed": 1, "deliveries_retried": 1, "deliveries_succeeded": 1}


def retry_after_seconds(_d, _n):
    return Reply(429, headers=(("Retry-After", "2"),))


def retry_after_http_date(_d, _n):
    # An IMF-fixdate 3s ahead; the date has whole seconds, so it is between 2s and 3s after this answer.
    return Reply(503, headers=(("Retry-After", formatdate(time.time() + 3, usegmt=True)),))


@pytest.mark.parametrize("answer,status", [(retry_after_seconds, 429), (retry_after_http_date, 503)],
                         ids=["429-seconds", "503-http-date"])
def test_retry_after_is_honoured(rc, start_envoy, answer, status):
    org, hook, config = one_hook(rc, f"retry-after-{status}", retrySchedule=SHORT)
    envoy = start_envoy(config)
    rc.script(hook.path, [answer])  # then 200
    counters = Counters(envoy)
    job_id = complete_job(envoy, org)
    first, second = rc.wait_for(lambda d: d.path == hook.path, count=2, timeout=15)[:2]
    counters.wait_delta("deliveries_succeeded", 1)
    check_delivery(second, hook, "job.completed", harness.completed_job(job_id))
    # The schedule alone would retry after 160-240ms; Retry-After asks for 2s (the date: 2s to 3s). The
    # receiver records the first request before it answers, so the gap is at least what the filter waited.
    gap = second.received_at - first.received_at
    assert gap >= 2.0, f"retried {gap:.3f}s after a {status} with Retry-After {first.answer}"
    assert gap < 2.0 + 3.0 + 1.0, f"retried only after {gap:.3f}s"
    (line,) = wait_for_log(envoy, rf"attempt failed, will retry: event={first.event_id} webhook={hook.id} "
                                  rf"attempts=1 last=status {status} retry_in_ms=(\d+)")
    if status == 429:  # max(backoff 160-240ms, Retry-After 2s)
        assert int(line.group(1)) == 2000, line.group(0)
    else:  # the date, less the time the answer took to reach the filter
        assert 1000 <= int(line.group(1)) <= 3000, line.group(0)
    assert len(rc.requests_to(hook.path)) == 2


def test_410_disables_the_webhook_and_drops_its_queue_other_webhooks_unaffected(rc, start_envoy):
    org = new_id()
    gone = make_hook(rc.port, org, ["job.completed"], name="gone")
    kept = make_hook(rc.port, org, ["job.completed"], name="kept")
    dead_path = f"/dead-letters/{new_id()}"
    config = PluginConfig(hooks=[gone, kept], delivery=delivery_section(retrySchedule=SHORT))
    # One attempt in flight per webhook, so the events behind the first one queue in `gone`'s lane; one
    # worker, so that "in flight" is one lane's (a 410 across workers: test_limits.py).
    envoy = start_envoy(plugin_dict(config, maxInFlightPerWebhook=1,
                                    deadLetter={"url": rc.url(dead_path), "cluster": "webhooks"}), concurrency=1)
    gate = threading.Event()
    rc.script(gone.path, [Reply(410, gate=gate)])  # anything after the 410 would be answered 200
    counters = Counters(envoy)

    jobs = [complete_job(envoy, org)]
    rc.wait_for(lambda d: d.path == gone.path, count=1, timeout=15)  # the first attempt is held
    jobs += [complete_job(envoy, org) for _ in range(2)]
    by_job = {d.object_id(): d for d in rc.wait_for(
        lambda d: d.path == kept.path and d.object_id() in jobs, count=3, timeout=15)}
    before_410 = [by_job[j].event_id for j in jobs]
    assert len(rc.requests_to(gone.path)) == 1, "maxInFlightPerWebhook=1: the other two must wait in the lane"
    gate.set()

    wait_for_log(envoy, rf"webhook {gone.id} answered 410 Gone")
    counters.wait_delta("webhooks_disabled_gone", 1)
    assert counters.wait_delta("deliveries_dropped.webhook_gone", 3) == 3
    for event_id in before_410:  # the answered one and the two that were queued behind it
        wait_for_log(envoy, rf"delivery dropped: event={event_id} webhook={gone.id} "
                            rf"reason=the webhook answered 410 Gone")
    letters = {d.json()["eventId"]: d for d in rc.wait_for(lambda d: d.path == dead_path, count=3, timeout=15)}
    assert sorted(letters) == sorted(before_410)
    for event_id, letter in letters.items():
        facts = letter.json()
        assert facts["reason"] == "webhook_gone" and facts["webhookId"] == gone.id, facts
        assert facts["envelope"]["webhookId"] == gone.id and facts["envelope"]["id"] == event_id, facts
    assert letters[before_410[0]].json()["attempts"] == 1
    assert letters[before_410[0]].json()["lastFailure"] == "status 410"

    # After the 410: more events. `kept` gets them (the positive control); `gone` gets nothing: each is
    # dropped with its log line and dead-lettered like the ones queued at the 410. deliveries_attempted
    # counts every dispatch, so 2 to `kept` + 2 dead letters means no attempt to `gone` was even made.
    attempted = counters.delta("deliveries_attempted")
    later = [complete_job(envoy, org) for _ in range(2)]
    got = rc.wait_for(lambda d: d.path == kept.path and d.object_id() in later, count=2, timeout=15)
    after_410 = [d.event_id for d in got]
    later_letters = rc.wait_for(lambda d: d.path == dead_path and d.json()["eventId"] in after_410, count=2,
                                timeout=15)
    assert all(d.json()["reason"] == "webhook_gone" for d in later_letters)
    counters.wait_delta("deliveries_succeeded", 5)
    counters.wait_delta("dead_letters_delivered", 5)
    assert counters.delta("deliveries_attempted") - attempted == 4, "an attempt went to the webhook that is gone"
    assert counters.wait_delta("deliveries_dropped.webhook_gone", 5) == 5
    for event_id in after_410:
        wait_for_log(envoy, rf"delivery dropped: event={event_id} webhook={gone.id} reason=the webhook answered 410")
    assert len(rc.requests_to(gone.path)) == 1, "a delivery reached the webhook after its 410"

    kept_got = rc.requests_to(kept.path)
    assert sorted(d.object_id() for d in kept_got) == sorted(jobs + later), "the other webhook missed events"
    for d in kept_got:
        check_delivery(d, kept, "job.completed", harness.completed_job(d.object_id()))
    assert counters.delta("deliveries_failed") == 1 and counters.delta("deliveries_exhausted") == 0


def test_always_500_is_exhausted_after_the_schedule_and_dead_lettered(rc, start_envoy):
    org, hook, config = one_hook(rc, "always-500", retrySchedule=SHORT)
    dead_path = f"/dead-letters/{new_id()}"
    dead_key = new_key()
    envoy = start_envoy(plugin_dict(config, deadLetter={"url": rc.url(dead_path), "cluster": "webhooks",
                                                        "apiKey": key_ref(dead_key)}))
    rc.always(hook.path, 500)
    rc.script(dead_path, [503])  # the dead letter is retried like a delivery: its first attempt fails
    counters = Counters(envoy)
    t0 = time.time()
    job_id = complete_job(envoy, org)

    letter = rc.wait_for(lambda d: d.path == dead_path and d.answer == 200, count=1, timeout=20)[0]
    attempts = rc.requests_to(hook.path)
    assert len(attempts) == len(SHORT) + 1, f"{len(attempts)} attempts for a schedule of {len(SHORT)} retries"
    event_id = attempts[0].event_id
    assert {d.headers["webhook-id"] for d in attempts} == {event_id}
    assert len({d.body for d in attempts}) == 1
    for d in attempts:
        assert signature_valid(d, hook.key)
    check_delivery(attempts[-1], hook, "job.completed", harness.completed_job(job_id))

    wait_for_log(envoy, rf"delivery failed for good: event={event_id} webhook={hook.id} attempts=4 "
                        rf"last=status 500$")
    counters.wait_delta("dead_letters_delivered", 1)
    deltas = counters.deltas("deliveries_exhausted", "deliveries_succeeded", "deliveries_retried",
                             "dead_letters_delivered", "dead_letters_failed", "deliveries_attempted")
    # Attempted: 4 to the webhook, 2 of the dead letter.
    assert deltas == {"deliveries_exhausted": 1, "deliveries_succeeded": 0, "deliveries_retried": 4,
                      "dead_letters_delivered": 1, "dead_letters_failed": 0, "deliveries_attempted": 6}, deltas
    wait_for_log(envoy, rf"dead letter stored: event={event_id} attempts=2")

    # The dead letter: the failure facts and the envelope exactly as the webhook received it, signed with the
    # dead letter's own key (checked by standardwebhooks).
    assert len(rc.requests_to(dead_path)) == 2
    assert letter.headers.get("content-type", "").startswith("application/json")
    assert signature_valid(letter, dead_key), "the dead letter does not verify under deadLetter.apiKey"
    assert not signature_valid(letter, hook.key)
    facts = json.loads(letter.body)
    assert set(facts) == {"reason", "eventId", "webhookId", "attempts", "lastFailure", "createdAt", "failedAt",
                          "envelope"}, sorted(facts)
    assert facts["reason"] == "exhausted"
    assert facts["eventId"] == event_id and HEX24.match(event_id)
    assert facts["webhookId"] == hook.id
    assert facts["attempts"] == 4
    assert facts["lastFailure"] == "status 500"
    assert facts["envelope"] == json.loads(attempts[0].body)
    assert letter.body.endswith(b'"envelope":' + attempts[0].body + b"}"), "the envelope is not embedded verbatim"
    for field in ("createdAt", "failedAt"):
        assert RFC3339_UTC_Z.match(facts[field]), facts[field]
    created, failed = (calendar.timegm(time.strptime(facts[f][:19], "%Y-%m-%dT%H:%M:%S"))
                       for f in ("createdAt", "failedAt"))
    assert abs(created - t0) <= 2, (facts["createdAt"], t0)
    # failedAt is after the last attempt: at least 80% of 200+500+1000ms after createdAt (whole seconds).
    assert failed - created >= 1, (facts["createdAt"], facts["failedAt"])
    assert failed <= letter.received_at + 1


def test_retry_after_is_capped_at_one_hour_and_3xx_is_a_failure_not_followed(rc, start_envoy):
    org = new_id()
    capped = make_hook(rc.port, org, name="retry-after-huge")
    moved = make_hook(rc.port, org, name="redirects")
    config = PluginConfig(hooks=[capped, moved], delivery=delivery_section(retrySchedule=SHORT))
    envoy = start_envoy(config)
    elsewhere = f"/elsewhere/{new_id()}"
    rc.script(capped.path, [Reply(503, headers=(("Retry-After", "999999"),))])
    rc.script(moved.path, [Reply(302, headers=(("Location", rc.url(elsewhere)),))])  # then 200
    counters = Counters(envoy)
    job_id = complete_job(envoy, org)
    first, second = rc.wait_for(lambda d: d.path == moved.path, count=2, timeout=15)[:2]
    check_delivery(second, moved, "job.completed", harness.completed_job(job_id))
    wait_for_log(envoy, rf"attempt failed, will retry: event={first.event_id} webhook={moved.id} attempts=1 "
                        rf"last=status 302 ")
    assert not rc.deliveries(lambda d: d.path == elsewhere), "the redirect was followed"
    # Retry-After 999999s is honoured up to 1h.
    wait_for_log(envoy, rf"attempt failed, will retry: event={first.event_id} webhook={capped.id} attempts=1 "
                        rf"last=status 503 retry_in_ms=3600000$")
    counters.wait_delta("deliveries_succeeded", 1)
    assert len(rc.requests_to(capped.path)) == 1


def test_a_dead_letter_that_cannot_be_stored_is_logged_critical_and_counted(rc, start_envoy):
    org, hook, config = one_hook(rc, "dead-letter-fails", retrySchedule=["100ms", "100ms"])
    dead_path = f"/dead-letters/{new_id()}"
    envoy = start_envoy(plugin_dict(config, deadLetter={"url": rc.url(dead_path), "cluster": "webhooks"}))
    rc.always(hook.path, 500)
    rc.always(dead_path, 500)
    counters = Counters(envoy)
    complete_job(envoy, org)
    letters = rc.wait_for(lambda d: d.path == dead_path, count=3, timeout=15)  # retried on the same schedule
    event_id = letters[0].json()["eventId"]
    assert counters.wait_delta("dead_letters_failed", 1) == 1
    (line,) = wait_for_log(envoy, rf"dead letter could not be stored: event={event_id} attempts=3 last=status 500$")
    critical = [l for l in envoy.wasm_log_lines() if f"dead letter could not be stored: event={event_id}" in l]
    assert critical and all("[critical]" in l for l in critical), critical
    assert counters.deltas("deliveries_exhausted", "dead_letters_delivered") == \
        {"deliveries_exhausted": 1, "dead_letters_delivered": 0}
    assert len(rc.requests_to(dead_path)) == 3


METRIC = "wasmcustom.webhook_emitter."


@pytest.fixture(scope="module")
def plain_receiver_setup(job_service, receiver, envoys, wasm):
    org = new_id()
    hook = make_hook(receiver.port, org, ["job.completed"], name="retry")
    config = PluginConfig(hooks=[hook], delivery=delivery_section(retrySchedule=["1s", "1s", "1s"]))
    envoy = harness.envoy_with_filter(job_service, receiver, config, wasm=wasm, name="retry")
    envoys.append(envoy)
    return {"envoy": envoy, "org": org, "hook": hook}


def test_failed_attempts_are_retried_with_the_same_id_and_body(plain_receiver_setup, receiver):
    envoy, hook = plain_receiver_setup["envoy"], plain_receiver_setup["hook"]
    before = envoy.custom_stats()
    receiver.plan(hook.path, [503, 500])
    job_id = new_id()
    assert envoy.request("POST", f"/jobs/{job_id}/complete", {"x-organisation-id": plain_receiver_setup["org"]}, b"{}").status == 200
    attempts = receiver.wait_for(lambda d: d.object_id() == job_id, count=3, timeout=30)
    harness.wait_until(
        lambda: envoy.custom_stats().get(METRIC + "deliveries_succeeded", 0) >= before.get(METRIC + "deliveries_succeeded", 0) + 1,
        timeout=10, desc="deliveries_succeeded to go up")

    assert len({d.headers["webhook-id"] for d in attempts}) == 1, [d.headers["webhook-id"] for d in attempts]
    assert len({d.body for d in attempts}) == 1, "the body changed between attempts"
    for d in attempts:
        assert signature_valid(d, hook.key)
    check_delivery(attempts[-1], hook, "job.completed", harness.completed_job(job_id))
    gaps = [b.received_at - a.received_at for a, b in zip(attempts, attempts[1:])]
    assert all(g >= 0.5 for g in gaps), f"retries came too fast for a 1s (±20%) schedule: {gaps}"

    after = envoy.custom_stats()
    assert after.get(METRIC + "deliveries_failed", 0) - before.get(METRIC + "deliveries_failed", 0) == 2, after
    assert after.get(METRIC + "deliveries_retried", 0) - before.get(METRIC + "deliveries_retried", 0) == 2, after
    assert after.get(METRIC + "deliveries_exhausted", 0) == before.get(METRIC + "deliveries_exhausted", 0), after


def test_dead_letters_waiting_when_a_new_configuration_removes_the_store_are_lost_loudly(job_service, rc,
                                                                                         start_envoy):
    org, hook, config = one_hook(rc, "dead-letter-removed", retrySchedule=["100ms"])
    dead_path = f"/dead-letters/{new_id()}"
    with_store = plugin_dict(config, deadLetter={"url": rc.url(dead_path), "cluster": "webhooks"})
    envoy = start_envoy(with_store, lds=True)
    rc.always(hook.path, 500)
    # The store asks to come back in a minute: the dead letters wait in their lane.
    rc.always(dead_path, Reply(503, headers=(("Retry-After", "60"),)))
    counters = Counters(envoy)
    jobs = [complete_job(envoy, org) for _ in range(3)]
    letters = rc.wait_for(lambda d: d.path == dead_path, count=3, timeout=15)
    event_ids = {d.json()["eventId"] for d in letters}
    harness.wait_until(lambda: len([l for l in plugin_log_lines(envoy, "webhook=dead-letter attempts=1 ")]) >= 3,
                       timeout=10, desc="three dead letters waiting for their retry")
    harness.update_plugin_config(envoy, job_service, rc, plugin_dict(config))  # deadLetter removed
    assert counters.wait_delta("dead_letters_failed", 3) == 3
    lost = wait_for_log(envoy, r"dead letter could not be stored: event=([0-9a-f]{24}) attempts=1 "
                               r"reason=delivery\.deadLetter was removed by a new configuration$", count=3)
    assert {m.group(1) for m in lost} == event_ids
    critical = [l for l in envoy.wasm_log_lines() if "dead letter could not be stored" in l]
    assert len(critical) == 3 and all("[critical]" in l for l in critical), critical
    assert len(rc.requests_to(dead_path)) == 3, "a dead letter was sent after its store was removed"
    assert len(jobs) == 3


def test_a_dead_letter_store_that_answers_410_keeps_getting_dead_letters(rc, start_envoy):
    org, hook, config = one_hook(rc, "dead-letter-410", retrySchedule=["100ms"])
    dead_path = f"/dead-letters/{new_id()}"
    envoy = start_envoy(plugin_dict(config, deadLetter={"url": rc.url(dead_path), "cluster": "webhooks"}))
    rc.always(hook.path, 500)
    rc.always(dead_path, 410)
    counters = Counters(envoy)
    complete_job(envoy, org)
    assert counters.wait_delta("dead_letters_failed", 1) == 1, "the first dead letter, answered 410 twice"
    wait_for_log(envoy, r"dead letter could not be stored: event=[0-9a-f]{24} attempts=2 last=status 410$")
    # The store is ours, not a receiver: a 410 does not turn it off. The next dead letter is sent too.
    complete_job(envoy, org)
    assert counters.wait_delta("dead_letters_failed", 2) == 2
    assert len(rc.requests_to(dead_path)) == 4
    assert counters.deltas("webhooks_disabled_gone", "deliveries_dropped.webhook_gone") == \
        {"webhooks_disabled_gone": 0, "deliveries_dropped.webhook_gone": 0}
