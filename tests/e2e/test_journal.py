"""The write-ahead journal in a real etcd (Debian's etcd-server, on loopback): deliveries survive the proxy.

Each test queues deliveries to a receiver that answers 503, takes the proxy away (SIGKILL, a VM rebuild, a hot
restart, a peer killed for good), then lets the receiver answer 200: every event must arrive at every webhook
(counted by distinct webhook-id per webhook, signatures checked by `standardwebhooks`) and the journal's records
must be gone from etcd afterwards. Further tests: etcd down for 10 s (degraded, never silent), the records'
writes travelling in batches (txns) as etcd counts them, etcd requests per event under a burst, a record too
large for etcd, a 410 seen by one proxy turning the webhook off in another, and a 3-member etcd losing a member
under load.

The lease is 2 s (etcd's minimum), so a dead owner's records are claimed about 2-3 s after it died.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import harness
import pytest
from harness.checks import signature_valid
from harness.config import PluginConfig, delivery_section, make_hook, new_id
from harness.etcd import Etcd, journal_section, wait_journal_live
from harness.faults import random_failures
from harness.observe import Counters, complete_job, complete_jobs_concurrently, plugin_log_lines, wait_for_log
from harness.util import wait_until

LEASE_SECONDS = 2
METRIC = "wasmcustom.webhook_emitter."


@pytest.fixture(scope="module")
def etcd():
    with Etcd(1, name="etcd-journal") as e:
        yield e


def journal_config(rc, prefix, hooks=2, lease=LEASE_SECONDS, **delivery):
    org = new_id()
    made = [make_hook(rc.port, org) for _ in range(hooks)]
    section = delivery_section(**{"retrySchedule": ["500ms"] * 100, **delivery})
    # Circuit breaker off: the tests are about the journal, not about the breaker.
    section["circuitBreaker"] = {"failures": 0}
    section["journal"] = journal_section(prefix, lease)
    return PluginConfig(hooks=made, delivery=section), org


def new_prefix() -> str:
    return f"e2e-{new_id()[:8]}/"


def failing(rc, config):
    for h in config.hooks:
        rc.always(h.path, 503)


def succeeding(rc, config):
    for h in config.hooks:
        rc.always(h.path, 200)


def attempted_ids(rc, hook) -> set:
    return {d.headers.get("webhook-id") for d in rc.requests_to(hook.path)}


def queue_failing_events(envoy, etcd, rc, config, org, prefix, events):
    """Completes `events` jobs through `envoy` while the receiver answers 503, and waits until each event was
    attempted at every webhook and its record is in etcd. Returns {hook id: set of webhook-ids}."""
    failing(rc, config)
    for _ in range(events):
        complete_job(envoy, org)
    wait_until(lambda: all(len(attempted_ids(rc, h)) >= events for h in config.hooks), 30,
               desc="a first (failed) attempt of every event at every webhook")
    wait_until(lambda: len(etcd.keys(prefix + "records/")) >= events, 30, desc=f"{events} records in etcd")
    ids = {h.id: attempted_ids(rc, h) for h in config.hooks}
    for h in config.hooks:
        assert len(ids[h.id]) == events, f"{h.path}: {len(ids[h.id])} webhook-ids for {events} events"
    return ids


def wait_all_delivered(rc, config, ids, timeout=60.0):
    """Until every (webhook, webhook-id) queued was accepted (2xx) once at least; each accepted delivery's
    signature is checked with standardwebhooks."""

    def done():
        for h in config.hooks:
            got = {d.headers.get("webhook-id") for d in rc.accepted(lambda d, p=h.path: d.path == p)}
            if not ids[h.id] <= got:
                return None
        return True

    wait_until(done, timeout, desc="every queued delivery accepted")
    for h in config.hooks:
        accepted = rc.accepted(lambda d, p=h.path: d.path == p)
        for d in accepted:
            assert signature_valid(d, h.key), f"{h.path}: bad signature on {d.headers.get('webhook-id')}"
        assert {d.headers.get("webhook-id") for d in accepted} == ids[h.id], "an event nobody emitted arrived"


def sigkill(envoy):
    os.kill(envoy.proc.pid, signal.SIGKILL)
    envoy.proc.wait(30)
    envoy.stop()


def records_gone(etcd, prefix, timeout=30.0):
    wait_until(lambda: etcd.keys(prefix + "records/") == [], timeout, desc="no record left in etcd")


def test_sigkill_then_a_new_envoy_delivers_every_queued_event(job_service, rc, envoys, wasm, etcd):
    prefix = new_prefix()
    config, org = journal_config(rc, prefix)
    clusters = [etcd.envoy_cluster()]
    first = harness.envoy_with_filter(job_service, rc, config, wasm=wasm, name="journal-kill-a",
                                      extra_clusters=clusters)
    envoys.append(first)
    ids = queue_failing_events(first, etcd, rc, config, org, prefix, events=10)
    records = etcd.values(prefix + "records/")
    assert not any(b"whsec_" in v for v in records.values()), "an API key in a journal record"
    sigkill(first)
    killed_at = time.monotonic()

    second = harness.envoy_with_filter(job_service, rc, config, wasm=wasm, name="journal-kill-b",
                                       extra_clusters=clusters)
    envoys.append(second)
    succeeding(rc, config)
    wait_all_delivered(rc, config, ids)
    recovery = time.monotonic() - killed_at
    print(f"\nrecovery after SIGKILL (new Envoy started at once, lease {LEASE_SECONDS}s): {recovery:.1f}s")
    records_gone(etcd, prefix)
    stats = second.custom_stats()
    assert stats.get(METRIC + "journal_records_claimed", 0) == 10
    assert stats.get(METRIC + "journal_records", 0) == 0
    assert plugin_log_lines(second, "claimed event=")
    # Once the last Envoy is gone and its lease expired, nothing is left under the prefix.
    second.stop()
    wait_until(lambda: etcd.keys(prefix) == [], LEASE_SECONDS + 10, desc="the journal prefix empty")


def test_a_live_peer_delivers_a_dead_envoys_queue_within_the_lease(job_service, rc, envoys, wasm, etcd):
    prefix = new_prefix()
    config, org = journal_config(rc, prefix)
    clusters = [etcd.envoy_cluster()]
    peer = harness.envoy_with_filter(job_service, rc, config, wasm=wasm, name="journal-peer",
                                     extra_clusters=clusters)
    envoys.append(peer)
    doomed = harness.envoy_with_filter(job_service, rc, config, wasm=wasm, name="journal-doomed",
                                       extra_clusters=clusters)
    envoys.append(doomed)
    # 200 events: more than one batch of records (16) is claimed from the dead owner.
    ids = queue_failing_events(doomed, etcd, rc, config, org, prefix, events=200)
    succeeding(rc, config)
    sigkill(doomed)
    killed_at = time.monotonic()
    wait_all_delivered(rc, config, ids, timeout=LEASE_SECONDS + 15)
    took = time.monotonic() - killed_at
    print(f"\npeer delivered a dead Envoy's queue of 200 events x 2 webhooks {took:.1f}s after SIGKILL "
          f"(lease {LEASE_SECONDS}s)")
    records_gone(etcd, prefix)
    assert peer.custom_stats().get(METRIC + "journal_records_claimed", 0) == 200


def test_a_vm_rebuild_through_lds_loses_nothing(job_service, rc, envoys, wasm, etcd):
    prefix = new_prefix()
    config, org = journal_config(rc, prefix)
    clusters = [etcd.envoy_cluster()]
    envoy = harness.envoy_with_filter(job_service, rc, config, wasm=wasm, name="journal-vm", lds=True,
                                      extra_clusters=clusters, extra_args=["--drain-time-s", "1"])
    envoys.append(envoy)
    ids = queue_failing_events(envoy, etcd, rc, config, org, prefix, events=10)
    starts = Counters(envoy).now().get(METRIC + "vm_starts", 0)
    # One more host environment variable is a changed vm_config: Envoy builds a new VM.
    keys = [*(envoy.host_env_keys or []), "WEBHOOK_EMITTER_REBUILD"]
    envoy.set_listeners(harness.plugin_listeners(job_service, rc, config, wasm=wasm, host_env_keys=keys,
                                                 extra_clusters=clusters))
    wait_until(lambda: envoy.custom_stats().get(METRIC + "vm_starts", 0) > starts, 30, desc="a new VM")
    succeeding(rc, config)
    wait_all_delivered(rc, config, ids)
    records_gone(etcd, prefix)


def test_a_hot_restart_loses_nothing(job_service, rc, envoys, wasm, etcd):
    prefix = new_prefix()
    config, org = journal_config(rc, prefix)
    clusters = [etcd.envoy_cluster()]
    base_id = 1000 + int(new_id()[:4], 16)
    parent = harness.envoy_with_filter(job_service, rc, config, wasm=wasm, name="journal-hot-0",
                                       extra_clusters=clusters, hot_restart=(base_id, 0))
    envoys.append(parent)
    ids = queue_failing_events(parent, etcd, rc, config, org, prefix, events=10)
    child = harness.envoy_with_filter(job_service, rc, config, wasm=wasm, name="journal-hot-1",
                                      extra_clusters=clusters, hot_restart=(base_id, 1))
    envoys.append(child)
    # The parent drains and exits (--parent-shutdown-time-s); its VM and queue go with it.
    parent.wait_exit(30)
    succeeding(rc, config)
    wait_all_delivered(rc, config, ids)
    records_gone(etcd, prefix)
    assert child.custom_stats().get(METRIC + "journal_records_claimed", 0) == 10


def test_etcd_down_for_10s_degrades_loudly_and_catches_up(job_service, rc, envoys, wasm):
    with Etcd(1, name="etcd-outage") as etcd:
        prefix = new_prefix()
        config, org = journal_config(rc, prefix, hooks=1)
        envoy = harness.envoy_with_filter(job_service, rc, config, wasm=wasm, name="journal-outage",
                                          extra_clusters=[etcd.envoy_cluster()])
        envoys.append(envoy)
        hook = config.hooks[0]
        rc.always(hook.path, 200)
        wait_journal_live(envoy)
        before = {complete_job(envoy, org) for _ in range(5)}
        etcd.kill_member(0)
        down_at = time.monotonic()
        during = set()
        while time.monotonic() - down_at < 10:
            during.add(complete_job(envoy, org))
            time.sleep(0.2)
        # Deliveries went on from memory while etcd was down.
        wait_until(lambda: len(rc.accepted(lambda d: d.path == hook.path)) >= len(before) + len(during), 30,
                   desc="every event delivered during the outage")
        stats = envoy.custom_stats()
        assert stats.get(METRIC + "journal_unavailable", 0) >= 1
        assert stats.get(METRIC + "journal_writes_failed", 0) >= 1
        assert plugin_log_lines(envoy, "journal unavailable (")
        etcd.restart_member(0)
        wait_for_log(envoy, "journal available again")
        # The journal catches up: every record of a delivered event is deleted again.
        records_gone(etcd, prefix)
        wait_until(lambda: envoy.custom_stats().get(METRIC + "journal_records", 0) == 0, 30,
                   desc="journal_records back to 0")
        envoy.stop()


def first_attempt_fails(lock):
    """An answer for the receiver: 503 to the first request of each webhook-id at a path, 200 to the next ones."""
    seen = set()

    def answer(d, _n):
        key = (d.path, d.headers.get("webhook-id"))
        with lock:
            if key in seen:
                return 200
            seen.add(key)
            return 503

    return answer


def all_accepted_once(rc, config, events):
    def done():
        for h in config.hooks:
            if len({d.headers.get("webhook-id") for d in rc.accepted(lambda d, p=h.path: d.path == p)}) < events:
                return None
        return True

    return done


def journal_empty(envoy):
    """The proxy holds no record in etcd any more, by its own gauge (which reads nothing from etcd)."""
    return lambda: envoy.custom_stats().get(METRIC + "journal_records", 0) == 0


def test_records_travel_in_batches_counted_by_etcd(job_service, rc, envoys, wasm):
    """Every event's first attempts fail, so every event's record is written ahead and deleted after its retry: the
    puts and deletes travel as txns of many writes each. Counted by etcd itself: the requests it handled by method
    (gRPC metrics) and the key writes it applied (etcd_mvcc_put_total / delete_total, inside txns too)."""
    events = 400
    with Etcd(1, name="etcd-count") as etcd:
        prefix = new_prefix()
        config, org = journal_config(rc, prefix, hooks=2)
        lock = threading.Lock()
        for h in config.hooks:
            rc.always(h.path, first_attempt_fails(lock))
        envoy = harness.envoy_with_filter(job_service, rc, config, wasm=wasm, name="journal-count",
                                          extra_clusters=[etcd.envoy_cluster()])
        envoys.append(envoy)
        wait_journal_live(envoy)
        before, writes_before = etcd.rpc_counts(), etcd.key_writes()
        statuses, errors = complete_jobs_concurrently(envoy.listener_port, org, [new_id() for _ in range(events)],
                                                      clients=8)
        assert not errors
        wait_until(all_accepted_once(rc, config, events), 60, desc="every delivery accepted on its retry")
        wait_until(journal_empty(envoy), 30, desc="journal_records back to 0")
        after, writes_after = etcd.rpc_counts(), etcd.key_writes()
        delta = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
        written = {k: v - writes_before.get(k, 0) for k, v in writes_after.items()}
        print(f"\netcd requests for {events} events x 2 webhooks, every first attempt failed: {delta}; "
              f"key writes: {written}; writes per txn: {(written['put'] + written['delete']) / delta['Txn']:.1f}")
        # Every record was written ahead and deleted after.
        assert written["put"] >= events, written
        assert written["delete"] >= events, written
        # Records are never written alone: plain puts are the owners' lease keys only (each worker's and the main
        # thread's, at most one each while counting), and there is no plain delete.
        owners = len(plugin_log_lines(envoy, " on cluster "))
        assert delta.get("Put", 0) <= owners, (delta, owners)
        assert delta.get("DeleteRange", 0) == 0, delta
        # Several writes per txn on average (unbatched, each write would be a request of its own).
        assert delta["Txn"] * 2 <= written["put"] + written["delete"], (delta, written)
        records_gone(etcd, prefix)
        envoy.stop()


def test_a_burst_of_2000_events_costs_at_most_a_quarter_etcd_request_each(job_service, rc, envoys, wasm):
    """2,000 events x 2 webhooks that answer at once (JOURNAL_BURST_EVENTS sets another count). Every request etcd
    handled meanwhile counts, whatever its method: record batches, lease keepalives, scans. The lease is the
    README's 15 s (the other tests' 2 s makes every owner scan every second, a cost per second, not per event)."""
    events = int(os.environ.get("JOURNAL_BURST_EVENTS", "2000"))
    with Etcd(1, name="etcd-burst") as etcd:
        prefix = new_prefix()
        config, org = journal_config(rc, prefix, hooks=2, lease=15)
        succeeding(rc, config)
        envoy = harness.envoy_with_filter(job_service, rc, config, wasm=wasm, name="journal-burst",
                                          extra_clusters=[etcd.envoy_cluster()])
        envoys.append(envoy)
        wait_journal_live(envoy)
        before, writes_before = etcd.rpc_counts(), etcd.key_writes()
        started = time.monotonic()
        statuses, errors = complete_jobs_concurrently(envoy.listener_port, org, [new_id() for _ in range(events)],
                                                      clients=16)
        assert not errors and all(s == 200 for s in statuses.values()), errors[:5]
        elapsed = time.monotonic() - started
        wait_until(all_accepted_once(rc, config, events), 120, desc=f"{events} events accepted at both webhooks")
        wait_until(journal_empty(envoy), 30, desc="journal_records back to 0")
        after, writes_after = etcd.rpc_counts(), etcd.key_writes()
        delta = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
        written = {k: v - writes_before.get(k, 0) for k, v in writes_after.items()}
        per_event = sum(delta.values()) / events
        print(f"\netcd requests for a burst of {events} events x 2 webhooks ({events / elapsed:.0f} events/s): "
              f"{delta}, {per_event:.3f} per event; key writes: {written}")
        assert per_event <= 0.25, delta
        records_gone(etcd, prefix)
        envoy.stop()


def test_a_record_too_large_for_etcd_is_delivered_from_memory(job_service, rc, envoys, wasm, etcd):
    prefix = new_prefix()
    config, org = journal_config(rc, prefix, hooks=1, maxBodyBytes=4 << 20)
    envoy = harness.envoy_with_filter(job_service, rc, config, wasm=wasm, name="journal-large",
                                      extra_clusters=[etcd.envoy_cluster()])
    envoys.append(envoy)
    hook = config.hooks[0]
    # The first attempt fails, so the record must be written (an event delivered at once never is).
    rc.always(hook.path, first_attempt_fails(threading.Lock()))
    wait_journal_live(envoy)
    job = new_id()
    r = envoy.request("POST", f"/jobs/{job}/complete?scenario=large&bytes={2 << 20}",
                      {"x-organisation-id": org}, b"{}")
    assert r.status == 200
    wait_until(lambda: rc.accepted(lambda d: d.path == hook.path), 30, desc="the retry accepted")
    got = rc.accepted(lambda d: d.path == hook.path)
    assert signature_valid(got[0], hook.key)
    assert len(got[0].body) > 2 << 20
    wait_for_log(envoy, "too large for etcd: not journaled, delivered from memory")
    assert envoy.custom_stats().get(METRIC + "journal_records_too_large", 0) == 1
    assert etcd.keys(prefix + "records/") == []


def test_a_410_seen_by_one_proxy_turns_the_webhook_off_in_another(job_service, rc, envoys, wasm, etcd):
    prefix = new_prefix()
    config, org = journal_config(rc, prefix, hooks=1)
    clusters = [etcd.envoy_cluster()]
    a = harness.envoy_with_filter(job_service, rc, config, wasm=wasm, name="journal-gone-a",
                                  extra_clusters=clusters)
    envoys.append(a)
    # B retries late, so that only A meets the 410 itself.
    b_config = PluginConfig(hooks=config.hooks, delivery={**config.delivery, "retrySchedule": ["60s"]})
    b = harness.envoy_with_filter(job_service, rc, b_config, wasm=wasm, name="journal-gone-b",
                                  extra_clusters=clusters)
    envoys.append(b)
    hook = config.hooks[0]
    # B holds a delivery for a retry; then A gets 410 Gone.
    rc.always(hook.path, 503)
    complete_job(b, org)
    wait_until(lambda: len(etcd.keys(prefix + "records/")) == 1, 30, desc="B's record in etcd")
    rc.always(hook.path, 410)
    complete_job(a, org)
    wait_for_log(a, f"webhook {hook.id} answered 410 Gone")
    wait_until(lambda: etcd.keys(prefix + "endpoints/gone/") == [prefix + "endpoints/gone/" + hook.id], 30,
               desc="the 410 published in etcd")
    wait_for_log(b, f"webhook {hook.id} answered 410 Gone to another proxy of the journal", timeout=30)
    wait_for_log(b, f"delivery dropped: event=\\w+ webhook={hook.id} reason=the webhook answered 410 Gone")
    assert b.custom_stats().get(METRIC + "deliveries_dropped.webhook_gone", 0) == 1
    assert len(rc.requests_to(hook.path)) == 2, "B sent nothing more after the 410"
    records_gone(etcd, prefix)


def test_a_circuit_opened_by_one_proxy_opens_in_another(job_service, rc, envoys, wasm, etcd):
    prefix = new_prefix()
    config, org = journal_config(rc, prefix, hooks=1)
    config.delivery["circuitBreaker"] = {"failures": 3}
    # An open circuit probes once per step of the schedule, and B's first probe is due one step after B opened
    # its circuit, whatever B holds by then. A step of 5 s (4-6 s with jitter) gives the test that long to see
    # B hold its event; with 500 ms, B's probe (B's event itself) could go out before a busy machine looked.
    config.delivery["retrySchedule"] = ["5s"] * 20
    clusters = [etcd.envoy_cluster()]
    a = harness.envoy_with_filter(job_service, rc, config, wasm=wasm, name="journal-circuit-a",
                                  extra_clusters=clusters)
    envoys.append(a)
    b = harness.envoy_with_filter(job_service, rc, config, wasm=wasm, name="journal-circuit-b",
                                  extra_clusters=clusters)
    envoys.append(b)
    hook = config.hooks[0]
    rc.always(hook.path, 503)
    # Each root context of B (one per worker, one on the main thread) is an owner of its own in the journal and
    # learns of the circuit on its own scan: B holds an event only once every one of them has opened it.
    wait_journal_live(b)
    roots = b.concurrency + 1
    for _ in range(3):
        complete_job(a, org)
    wait_for_log(a, f"circuit opened for webhook {hook.id}: its queue waits")
    a_events = attempted_ids(rc, hook)
    assert len(a_events) == 3, f"A's 3 events, attempted once each: {a_events}"
    wait_until(lambda: etcd.keys(prefix + "endpoints/circuit/") == [prefix + "endpoints/circuit/" + hook.id], 30,
               desc="the open circuit published in etcd")
    wait_for_log(b, f"circuit opened for webhook {hook.id}: another proxy of the journal found it failing",
                 count=roots, timeout=30)
    # B holds its new event behind the circuit instead of sending it at once. A may probe meanwhile (with one of
    # its own events): what went out since is A's, never B's event.
    sent_before = len(rc.requests_to(hook.path))
    complete_job(b, org)
    wait_until(lambda: b.custom_stats().get(METRIC + "outbox_depth", 0) >= 1, 10, desc="B holds the event")
    sent_since = rc.requests_to(hook.path)[sent_before:]
    assert {d.headers.get("webhook-id") for d in sent_since} <= a_events, "B sent its event at once"
    assert len(sent_since) <= 1, "more than A's probe went out"
    # The circuit closes at A once the endpoint answers again; its key goes.
    rc.always(hook.path, 200)
    wait_for_log(a, f"circuit closed for webhook {hook.id}", timeout=30)
    wait_until(lambda: etcd.keys(prefix + "endpoints/circuit/") == [], 30, desc="the closed circuit's key deleted")


def test_a_three_member_etcd_loses_a_member_under_load_and_nothing_is_lost(job_service, rc, envoys, wasm):
    """2,000 events x 2 webhooks (JOURNAL_LOAD_EVENTS sets another count)."""
    events = int(os.environ.get("JOURNAL_LOAD_EVENTS", "2000"))
    with Etcd(3, name="etcd-trio") as etcd:
        prefix = new_prefix()
        config, org = journal_config(rc, prefix, retrySchedule=["200ms"] * 100, maxQueued=100_000)
        envoy = harness.envoy_with_filter(job_service, rc, config, wasm=wasm, name="journal-trio",
                                          extra_clusters=[etcd.envoy_cluster()])
        envoys.append(envoy)
        for h in config.hooks:
            rc.always(h.path, random_failures(0.2, seed=7))
        wait_journal_live(envoy)
        jobs = [new_id() for _ in range(events)]
        killer_done = []

        def kill_when_half_sent():
            wait_until(lambda: len(rc.requests_to(config.hooks[0].path)) >= events // 2, 120,
                       desc="half the load sent")
            etcd.kill_member(1)
            killer_done.append(time.monotonic())

        killer = threading.Thread(target=kill_when_half_sent, daemon=True)
        killer.start()
        statuses, errors = complete_jobs_concurrently(envoy.listener_port, org, jobs, clients=16)
        assert not errors and all(s == 200 for s in statuses.values()), errors[:5]
        killer.join(120)
        assert killer_done, "the etcd member was not killed during the load"

        def all_accepted():
            for h in config.hooks:
                got = {d.headers.get("webhook-id") for d in rc.accepted(lambda d, p=h.path: d.path == p)}
                if len(got) < events:
                    return None
            return True

        wait_until(all_accepted, 180, desc=f"{events} events accepted at both webhooks")
        for h in config.hooks:
            accepted = rc.accepted(lambda d, p=h.path: d.path == p)
            assert len({d.headers.get("webhook-id") for d in accepted}) == events
            for d in accepted[:50]:
                assert signature_valid(d, h.key)
        records_gone(etcd, prefix, timeout=60)
        stats = envoy.custom_stats()
        assert stats.get(METRIC + "deliveries_dropped.queue_full", 0) == 0
        print(f"\n3-member etcd, member killed under load: {events} events x 2 webhooks, all delivered; "
              f"journal_writes_failed={stats.get(METRIC + 'journal_writes_failed', 0)}")
        envoy.stop()
