"""Overload spills to the journal, in a real etcd (Debian's etcd-server, on loopback) and a real Envoy at --concurrency 2.

The outbox holds 100 deliveries (`maxQueued`), a burst of 2,000 events x 3 webhooks arrives while the receiver holds
its answers, then it answers each delivery slowly (20 ms, at most 2 attempts out per webhook and worker): however fast
or slow the machine, most deliveries cannot wait in memory.
With a journal they wait in etcd only and are paged back in as the outbox frees room: every delivery arrives (by
distinct webhook-id per webhook, signatures checked by `standardwebhooks`) and none is counted as dropped. The same run
without a journal drops, and counts every delivery it drops; with a tiny `journal.maxSpilledBytes` the drops name that
bound (deliveries_dropped.journal_full and their log lines) and every delivery is still accounted for. Spilled records are ordinary records: a proxy killed with
deliveries spilled leaves them to the next one.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import harness
from harness.checks import signature_valid
from harness.config import PluginConfig, delivery_section, make_hook, new_id
from harness.etcd import Etcd, journal_section, wait_journal_live
from harness.faults import Reply
from harness.observe import Counters, complete_jobs_concurrently, wait_for_log
from harness.util import wait_until

EVENTS = int(os.environ.get("JOURNAL_SPILL_EVENTS", "2000"))
HOOKS = 3


def slow_after(gate: threading.Event) -> Reply:
    """Holds every answer until `gate` is set, then answers 200 after 20 ms."""
    return Reply(status=200, delay=0.02, gate=gate)
DROPS = ("deliveries_dropped.queue_full", "deliveries_dropped.over_share", "deliveries_dropped.journal_full",
         "deliveries_dropped.journal_behind")


def overload_config(rc, journal_prefix=None, hooks=HOOKS, lease=2, max_spilled_bytes=None):
    org = new_id()
    made = [make_hook(rc.port, org) for _ in range(hooks)]
    section = delivery_section(maxQueued=100, maxInFlightPerWebhook=2, retrySchedule=["500ms"] * 20)
    section["circuitBreaker"] = {"failures": 0}
    if journal_prefix is not None:
        section["journal"] = journal_section(journal_prefix, lease)
        if max_spilled_bytes is not None:
            section["journal"]["maxSpilledBytes"] = max_spilled_bytes
    return PluginConfig(hooks=made, delivery=section), org


def accepted_ids(rc, hook) -> set:
    return {d.headers.get("webhook-id") for d in rc.accepted(lambda d, p=hook.path: d.path == p)}


def burst(envoy, org, events):
    statuses, errors = complete_jobs_concurrently(envoy.listener_port, org, [new_id() for _ in range(events)],
                                                  clients=16)
    # The filter never changes a client's answer, whatever happens to its deliveries.
    assert not errors and all(s == 200 for s in statuses.values()), errors[:5]


def test_with_a_journal_an_overload_spills_to_etcd_and_nothing_is_dropped(job_service, rc, envoys, wasm):
    with Etcd(1, name="etcd-spill") as etcd:
        prefix = f"e2e-{new_id()[:8]}/"
        config, org = overload_config(rc, prefix, lease=15)
        gate = threading.Event()
        for h in config.hooks:
            rc.always(h.path, slow_after(gate))
        envoy = harness.envoy_with_filter(job_service, rc, config, wasm=wasm, name="journal-spill",
                                          extra_clusters=[etcd.envoy_cluster()])
        envoys.append(envoy)
        wait_journal_live(envoy)
        counters = Counters(envoy)
        started = time.monotonic()
        burst(envoy, org, EVENTS)
        burst_s = time.monotonic() - started
        gate.set()

        def all_arrived():
            return all(len(accepted_ids(rc, h)) >= EVENTS for h in config.hooks) or None

        try:
            wait_until(all_arrived, 100, desc=f"{EVENTS} events accepted at each of {HOOKS} webhooks", interval=0.5)
        except Exception as e:
            stats = {k: v for k, v in envoy.custom_stats().items() if "deliver" in k or "journal" in k or "outbox" in k}
            raise AssertionError(f"{e}: accepted {[len(accepted_ids(rc, h)) for h in config.hooks]}; {stats}") from e
        drained_s = time.monotonic() - started
        moved = counters.deltas(*DROPS, "deliveries_spilled", "deliveries_paged_in", "deliveries_succeeded")
        print(f"\n{EVENTS} events x {HOOKS} webhooks, maxQueued 100, with the journal: burst {burst_s:.1f}s, "
              f"all delivered after {drained_s:.1f}s; {moved}")
        for d in DROPS:
            assert moved[d] == 0, moved
        # The overload did spill: nearly every delivery waited in etcd only (the outbox holds 100).
        assert moved["deliveries_spilled"] >= EVENTS * HOOKS - 1000, moved
        for h in config.hooks:
            accepted = rc.accepted(lambda d, p=h.path: d.path == p)
            assert len(accepted_ids(rc, h)) == EVENTS, h.path
            for d in accepted:
                assert signature_valid(d, h.key), f"{h.path}: bad signature on {d.headers.get('webhook-id')}"
        # Each spilled delivery came back once it had room, and the journal is empty again.
        wait_until(lambda: counters.delta("deliveries_spilled") == counters.delta("deliveries_paged_in") or None,
                   20, desc="every spilled delivery paged back in")
        wait_until(lambda: envoy.custom_stats().get("wasmcustom.webhook_emitter.journal_records", 0) == 0, 30,
                   desc="journal_records back to 0")
        wait_until(lambda: etcd.keys(prefix + "records/") == [], 30, desc="no record left in etcd")
        envoy.stop()


def test_without_a_journal_the_same_overload_drops_and_counts_every_drop(job_service, rc, envoys, wasm):
    config, org = overload_config(rc)
    gate = threading.Event()
    for h in config.hooks:
        rc.always(h.path, slow_after(gate))
    envoy = harness.envoy_with_filter(job_service, rc, config, wasm=wasm, name="memory-overload")
    envoys.append(envoy)
    counters = Counters(envoy)
    burst(envoy, org, EVENTS)
    gate.set()

    def settled():
        moved = counters.deltas(*DROPS, "deliveries_succeeded")
        done = sum(moved.values()) >= EVENTS * HOOKS and envoy.custom_stats().get(
            "wasmcustom.webhook_emitter.outbox_depth", 0) == 0
        return moved if done else None

    moved = wait_until(settled, 100, desc="every delivery delivered or dropped", interval=0.5)
    arrived = sum(len(accepted_ids(rc, h)) for h in config.hooks)
    print(f"\n{EVENTS} events x {HOOKS} webhooks, maxQueued 100, memory only: {arrived} delivered; {moved}")
    dropped = sum(moved[d] for d in DROPS)
    assert dropped > 0, moved
    # Every delivery is accounted for: delivered once, or dropped and counted.
    assert moved["deliveries_succeeded"] == arrived, (moved, arrived)
    assert arrived + dropped == EVENTS * HOOKS, (moved, arrived)
    envoy.stop()


def test_past_max_spilled_bytes_the_drops_name_the_journal_and_every_delivery_is_accounted_for(job_service, rc,
                                                                                               envoys, wasm):
    """The same overload with `journal.maxSpilledBytes` 20,000 (about a dozen records a worker): what the outbox and
    the journal cannot hold is dropped, counted in deliveries_dropped.journal_full and logged naming that bound, not
    as an outbox full; every delivery is delivered or counted as dropped."""
    events, max_spilled = 600, 20_000
    with Etcd(1, name="etcd-spill-full") as etcd:
        prefix = f"e2e-{new_id()[:8]}/"
        config, org = overload_config(rc, prefix, lease=15, max_spilled_bytes=max_spilled)
        gate = threading.Event()
        for h in config.hooks:
            rc.always(h.path, slow_after(gate))
        envoy = harness.envoy_with_filter(job_service, rc, config, wasm=wasm, name="journal-spill-full",
                                          extra_clusters=[etcd.envoy_cluster()])
        envoys.append(envoy)
        wait_journal_live(envoy)
        counters = Counters(envoy)
        burst(envoy, org, events)
        gate.set()

        def settled():
            moved = counters.deltas(*DROPS, "deliveries_succeeded", "deliveries_spilled", "deliveries_paged_in")
            done = (moved["deliveries_succeeded"] + sum(moved[d] for d in DROPS) >= events * HOOKS
                    and envoy.custom_stats().get("wasmcustom.webhook_emitter.outbox_depth", 0) == 0
                    and moved["deliveries_spilled"] == moved["deliveries_paged_in"])
            return moved if done else None

        moved = wait_until(settled, 100, desc="every delivery delivered or dropped", interval=0.5)
        arrived = sum(len(accepted_ids(rc, h)) for h in config.hooks)
        print(f"\n{events} events x {HOOKS} webhooks, maxQueued 100, maxSpilledBytes {max_spilled}: "
              f"{arrived} delivered; {moved}")
        full = moved["deliveries_dropped.journal_full"]
        assert full > 0, moved
        assert moved["deliveries_spilled"] > 0, moved
        # Every delivery is accounted for: delivered once, or dropped and counted.
        assert moved["deliveries_succeeded"] == arrived, (moved, arrived)
        assert arrived + sum(moved[d] for d in DROPS) == events * HOOKS, (moved, arrived)
        # Each of those drops is logged with its event id, naming the journal's bound.
        lines = wait_for_log(envoy, r"^delivery dropped: event=[0-9a-f]{24} webhook=[0-9a-f]{24} reason=the outbox is "
                                    r"full.* and the journal holds journal\.maxSpilledBytes \(20000 bytes\) of spilled "
                                    r"deliveries", count=full, timeout=30)
        assert len(lines) == full, (len(lines), moved)
        wait_until(lambda: etcd.keys(prefix + "records/") == [], 30, desc="no record left in etcd")
        envoy.stop()


def test_spilled_deliveries_of_a_killed_proxy_are_delivered_by_the_next(job_service, rc, envoys, wasm):
    """The receiver holds every answer (a gate) while 600 events arrive for one webhook: 100 wait in memory, the rest
    in etcd only. SIGKILL; a new Envoy claims every record of the dead owner, spilled or not, and delivers it."""
    events = 600
    with Etcd(1, name="etcd-spill-kill") as etcd:
        prefix = f"e2e-{new_id()[:8]}/"
        config, org = overload_config(rc, prefix, hooks=1)
        gate = threading.Event()
        hook = config.hooks[0]
        rc.always(hook.path, Reply(status=200, gate=gate))
        clusters = [etcd.envoy_cluster()]
        first = harness.envoy_with_filter(job_service, rc, config, wasm=wasm, name="spill-kill-a",
                                          extra_clusters=clusters)
        envoys.append(first)
        wait_journal_live(first)
        counters = Counters(first)
        burst(first, org, events)
        counters.wait_delta("deliveries_spilled", events - 100, timeout=30)
        wait_until(lambda: len(etcd.keys(prefix + "records/")) >= events or None, 30,
                   desc=f"{events} records in etcd")
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(30)
        first.stop()
        # Answers to the dead proxy's attempts out are 200s that nobody reads: they count as accepted here but the
        # record stays, so the next proxy may send those few again (at least once).
        gate.set()
        rc.always(hook.path, 200)
        second = harness.envoy_with_filter(job_service, rc, config, wasm=wasm, name="spill-kill-b",
                                           extra_clusters=clusters)
        envoys.append(second)
        started = time.monotonic()
        wait_until(lambda: len(accepted_ids(rc, hook)) >= events or None, 90,
                   desc=f"{events} events accepted after the kill", interval=0.5)
        print(f"\n{events} events (most spilled) delivered by the next proxy {time.monotonic() - started:.1f}s "
              f"after it started")
        for d in rc.accepted(lambda d: d.path == hook.path):
            assert signature_valid(d, hook.key), d.headers.get("webhook-id")
        wait_until(lambda: etcd.keys(prefix + "records/") == [], 30, desc="no record left in etcd")
        second.stop()
