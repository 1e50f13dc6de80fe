"""Load: many job completions at once.

- 200 job completions at once, 3 subscribed webhooks: exactly 600 deliveries, no (webhookId, id) pair twice,
every signature valid (checked by standardwebhooks), one event id per job shared by its three deliveries.

- Nothing is lost under load with a flaky receiver.

5,000 job completions, sent by 32 concurrent clients, for an organisation with 3 webhooks; the receiver fails
20% of all requests at random with 503. Eventually there are exactly 15,000 distinct successful deliveries
(webhookId, id), none is lost, none is exhausted, and every signature verifies (standardwebhooks).

Odds that the test could fail by design: a delivery is lost only if all 13 attempts of its schedule
(12 retries of 100ms) fail, with probability 0.2**13 = 8.2e-10; over 15,000 deliveries that is 1.2e-5.
The circuit breaker stays at its default (10 failures in a row): about 18,750 attempts per webhook, of which
a run of 10 failures starts at a given attempt with probability 0.8 * 0.2**10 = 8e-8, so a circuit opens in a
run with odds of about 3 * 18,750 * 8e-8 = 0.5%. When it does, the lane only pauses (one probe per 80-120ms,
80% of them succeed), and the probe uses attempts of one delivery only, so the odds of a loss stay as above.
"""

import json
from collections import Counter
import re
import time

import harness
import pytest
from harness.burst import complete_jobs_at_once
from harness.checks import check_delivery
from harness.config import PluginConfig, delivery_section, make_hook, new_id
from harness.checks import signature_valid
from harness.faults import ScriptedReceiver, random_failures
from harness.observe import Counters, complete_jobs_concurrently


# Each test has a count of its own name: a test reads module constants when it runs, so a second assignment
# to the same name further down would change this test too.
JOBS = 200  # one client per job, released together


@pytest.fixture(scope="module")
def setup(job_service, receiver, envoys, wasm):
    org = new_id()
    hooks = [make_hook(receiver.port, org, ["job.completed"], name=f"load-{i}") for i in range(3)]
    # A receiver's realistic timeout (as in the test below): 600 answers from one Python process on a busy
    # 2-core machine can take longer than 5 s, and an answer that comes after the timeout is delivered twice.
    config = PluginConfig(hooks=hooks, delivery=delivery_section(timeoutMs=30000))
    envoy = harness.envoy_with_filter(job_service, receiver, config, wasm=wasm, name="load")
    envoys.append(envoy)
    return {"envoy": envoy, "org": org, "hooks": hooks, "config": config}


def test_200_concurrent_completions_give_exactly_600_valid_deliveries(setup, receiver):
    envoy, org, hooks = setup["envoy"], setup["org"], setup["hooks"]
    jobs = [new_id() for _ in range(JOBS)]
    # The clients run in a process of their own: in this one they would compete with the job service and the
    # receiver for the interpreter lock, and hold the receiver's answers back (harness.burst).
    answers, errors = complete_jobs_at_once(envoy.listener_port, org, jobs)
    assert not errors, errors[:5]
    statuses = {}
    for job_id, (status, body) in answers.items():
        try:
            ok = status == 200 and json.loads(body) == harness.completed_job(job_id)
        except ValueError:
            ok = False
        statuses[job_id] = status if ok else f"{status} {body[:80]!r}"
    bad = {j: s for j, s in statuses.items() if s != 200}
    assert len(statuses) == JOBS and not bad, f"{len(bad)} bad responses, e.g. {list(bad.items())[:3]}"

    job_set = set(jobs)
    receiver.wait_for(lambda d: d.object_id() in job_set, count=3 * JOBS, timeout=90)
    # Positive control: sent after all 200, it arrives after anything they could still produce.
    control = new_id()
    assert envoy.request("POST", f"/jobs/{control}/complete", {"x-organisation-id": org}, b"{}").status == 200
    receiver.wait_for(lambda d: d.object_id() == control, count=3, timeout=30)

    got = receiver.deliveries(lambda d: d.object_id() in job_set)
    pairs = Counter((d.webhook_id, d.event_id) for d in got)
    dupes = {p: n for p, n in pairs.items() if n > 1}
    assert not dupes, f"{len(dupes)} (webhookId, id) pairs delivered more than once, e.g. {list(dupes.items())[:3]}"
    assert len(got) == 3 * JOBS, f"{len(got)} deliveries, expected {3 * JOBS}"

    per_job = {}
    for d in got:
        per_job.setdefault(d.object_id(), []).append(d)
    hook_ids = sorted(h.id for h in hooks)
    for job_id, ds in per_job.items():
        assert sorted(d.webhook_id for d in ds) == hook_ids, f"job {job_id}: {sorted(d.webhook_id for d in ds)}"
        assert len({d.event_id for d in ds}) == 1, f"job {job_id}: event ids {[d.event_id for d in ds]}"
    assert len({ds[0].event_id for ds in per_job.values()}) == JOBS, "two jobs share an event id"
    for d in got:
        check_delivery(d, setup["config"].hook(d.webhook_id), "job.completed", harness.completed_job(d.object_id()))

    harness.wait_until(
        lambda: envoy.custom_stats().get("wasmcustom.webhook_emitter.deliveries_succeeded", 0) >= 3 * JOBS + 3,
        timeout=15, desc="deliveries_succeeded to count every delivery")


FLAKY_JOBS = 5000
CLIENTS = 32
HOOKS = 3
FAILURE_RATE = 0.2
SCHEDULE = ["100ms"] * 12


@pytest.fixture(scope="module")
def rc():
    with ScriptedReceiver() as r:
        yield r


def test_5000_events_3_webhooks_flaky_receiver_exactly_15000_distinct_deliveries(job_service, rc, envoys, wasm):
    org = new_id()
    hooks = [make_hook(rc.port, org, name=f"load-{i}") for i in range(HOOKS)]
    config = PluginConfig(hooks=hooks, delivery=delivery_section(retrySchedule=SCHEDULE, timeoutMs=30000))
    envoy = harness.envoy_with_filter(job_service, rc, config, wasm=wasm, name="reliability-load")
    envoys.append(envoy)
    try:
        rc.default(random_failures(FAILURE_RATE, 503))
        counters = Counters(envoy)
        jobs = [new_id() for _ in range(FLAKY_JOBS)]
        expected = FLAKY_JOBS * HOOKS

        t0 = time.monotonic()
        statuses, errors = complete_jobs_concurrently(envoy.listener_port, org, jobs, CLIENTS)
        t_sent = time.monotonic() - t0
        assert not errors, errors[:5]
        bad = {j: s for j, s in statuses.items() if s != 200}
        assert len(statuses) == FLAKY_JOBS and not bad, \
            f"{len(bad)} bad answers to the client, e.g. {list(bad.items())[:3]}"

        def successes():
            ok = rc.accepted(lambda d: d.path.startswith("/hooks/"))
            if len(ok) < expected:  # cheap: parse bodies only once enough answers went out
                return set()
            return {(d.webhook_id, d.event_id) for d in ok}

        harness.wait_until(lambda: len(successes()) >= expected, timeout=90, interval=0.2,
                           desc=f"{expected} distinct successful deliveries")
        counters.wait_delta("deliveries_succeeded", expected, timeout=20)
        harness.wait_until(lambda: counters.gauge("outbox_depth") == 0, timeout=20, desc="an empty outbox")
        t_done = time.monotonic() - t0

        requests = rc.deliveries(lambda d: d.path.startswith("/hooks/"))
        ok = [d for d in requests if d.answer == 200]
        pairs = Counter((d.webhook_id, d.event_id) for d in ok)
        stats = counters.deltas("events_emitted", "deliveries_attempted", "deliveries_succeeded", "deliveries_failed",
                                "deliveries_retried", "deliveries_exhausted", "deliveries_dropped.queue_full",
                                "circuits_opened")
        print(f"\nload: {FLAKY_JOBS} events x {HOOKS} webhooks from {CLIENTS} clients, {FAILURE_RATE:.0%} random 503: "
              f"sent in {t_sent:.1f}s, all delivered after {t_done:.1f}s; {len(requests)} requests, "
              f"{len(ok)} answered 200; counters {stats}")

        assert len(pairs) == expected, f"{len(pairs)} distinct successful deliveries, expected {expected}"
        dupes = {p: n for p, n in pairs.items() if n > 1}
        # timeoutMs is 30s, so no 2xx can be lost on the way back: a second success would be a real duplicate.
        assert not dupes, f"{len(dupes)} deliveries succeeded more than once, e.g. {list(dupes.items())[:3]}"
        assert stats["events_emitted"] == FLAKY_JOBS
        assert stats["deliveries_succeeded"] == expected
        assert stats["deliveries_exhausted"] == 0 and stats["deliveries_dropped.queue_full"] == 0
        assert stats["deliveries_attempted"] == len(requests), "every attempt reached the receiver"
        assert stats["deliveries_failed"] == stats["deliveries_retried"] == len(requests) - len(ok)

        # Each job: one event id, delivered to each of the 3 webhooks; distinct ids across jobs.
        per_job = {}
        for d in ok:
            per_job.setdefault(d.object_id(), set()).add((d.webhook_id, d.event_id))
        assert set(per_job) == set(jobs)
        hook_ids = {h.id for h in hooks}
        for job_id, got in per_job.items():
            assert {w for w, _ in got} == hook_ids and len({e for _, e in got}) == 1, (job_id, got)
        assert len({e for got in per_job.values() for _, e in got}) == FLAKY_JOBS

        # Every attempt (not only the successful ones) verifies under its own webhook's key.
        keys = {h.id: h.key for h in hooks}
        bad_sigs = [d for d in requests if not signature_valid(d, keys[d.webhook_id])]
        assert not bad_sigs, f"{len(bad_sigs)} of {len(requests)} signatures do not verify"
        print(f"load: {len(requests)} signatures verified; the whole test took {time.monotonic() - t0:.1f}s")

        # The latency histogram has the deliveries (Envoy publishes histograms at its 5s stats flush).
        def latency_quantiles():
            text = envoy.admin("/stats?filter=delivery_latency_ms").body.decode()
            found = dict(re.findall(r"(P50|P99|P100)\([^,]*,([0-9.]+)\)", text))
            return found if len(found) == 3 else None

        q = harness.wait_until(latency_quantiles, timeout=15, interval=0.5, desc="delivery_latency_ms quantiles")
        print(f"load: delivery_latency_ms (cumulative) P50 {q['P50']} P99 {q['P99']} max {q['P100']}")
    finally:
        rc.default(None)
        envoy.stop()
