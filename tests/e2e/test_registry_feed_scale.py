"""The registry feed at the size of a real SaaS, through the real Envoy (two workers) and the real `registry serve`:
100,000 webhooks in 10,000 organisations, written straight into SQLite (`registry seed`). An Envoy that knows
nothing lists them page by page (each page under the shipped 64 KiB answer limit) within 60 s, holds them within
200 MiB of the same Envoy with no webhooks, delivers a new registration within pollMs + 1 s, and costs at most 2%
of a core while nothing changes. The same feed against Postgres at 10,000 webhooks. The numbers are printed."""

from __future__ import annotations

import time

import harness
import pytest
from harness.config import new_id
from harness.observe import Counters
from harness.registry_service import Postgres, RegistryService, free_port

from registry_feed import (PULLING_VMS, applied_by_every_vm, complete, cpu_seconds, envoy_pulling,
                           rss_kib)

POLL_MS = 1000
INITIAL_SYNC_S = 60
RSS_GROWTH_MIB = 200
STEADY_CPU_SHARE = 0.02
CPU_WINDOW_S = 10


def seed_org(i: int) -> str:
    """The organisation id `registry seed` gives its organisation number i."""
    return f"657bf08c2029{i:012x}"


def settled_rss(envoy) -> int:
    """Envoy's RSS once it stops moving (two readings 1 s apart within 2 MiB), in KiB."""
    readings = [rss_kib(envoy.proc.pid)]

    def steady():
        time.sleep(1)  # the interval between two readings, not a synchronisation
        readings.append(rss_kib(envoy.proc.pid))
        return abs(readings[-1] - readings[-2]) < 2048 or None

    harness.wait_until(steady, timeout=20, desc="Envoy's RSS to settle", interval=0)
    return readings[-1]


def new_registration_delivered(envoy, job_service, rc, registry, org) -> float:
    """Registers a webhook through the API and completes jobs until one reaches it; returns the seconds from the
    registration to the first delivery."""
    path = f"/hooks/{new_id()}"
    registered_at = time.time()
    webhook, _ = registry.register(org, rc.url(path))
    first = None
    while first is None and time.time() < registered_at + POLL_MS / 1000 + 10:
        job_id = complete(envoy, job_service, org)
        try:
            (first,) = rc.wait_for(lambda d, j=job_id: d.object_id() == j and d.path == path, timeout=0.2)
        except harness.WaitTimeout:
            pass
    assert first is not None, "no delivery within pollMs + 10 s of the registration"
    assert first.json()["webhookId"] == webhook["id"]
    return first.received_at - registered_at


def run_scale(job_service, rc, envoys, wasm, registry, count, organisations, label):
    # The same Envoy with no webhooks: its RSS is the base.
    empty = envoy_pulling(job_service, rc, registry, envoys, wasm, f"{label}-empty", POLL_MS)
    Counters(empty).wait_delta("registry_updates", PULLING_VMS, timeout=30)
    base_kib = settled_rss(empty)
    empty.stop()

    seeded = time.monotonic()
    print(f"\n{label}: {registry.seed(count, organisations, url_prefix=rc.url('/seed/'))} "
          f"({time.monotonic() - seeded:.1f} s)")

    started = time.time()
    envoy = envoy_pulling(job_service, rc, registry, envoys, wasm, label, POLL_MS)
    synced_at = harness.wait_until(
        lambda: applied_by_every_vm(envoy, rf"applied \(first\): {count} registry webhooks in force"),
        timeout=INITIAL_SYNC_S + 60, desc="every VM's first complete listing", interval=0.2)
    sync_s = synced_at - started
    gauge = Counters(envoy).gauge("registry_webhooks")
    rss = settled_rss(envoy)
    growth_mib = (rss - base_kib) / 1024
    print(f"{label}: initial sync of {count} webhooks in {organisations} organisations: {sync_s:.1f} s "
          f"(every VM; Envoy started to the last VM's first complete listing); registry_webhooks {gauge}")
    print(f"{label}: RSS {base_kib / 1024:.1f} MiB with no webhooks, {rss / 1024:.1f} MiB with them: "
          f"+{growth_mib:.1f} MiB, {(rss - base_kib) * 1024 / count:.0f} bytes per webhook "
          f"({(rss - base_kib) * 1024 / count / PULLING_VMS:.0f} per pulling VM)")
    assert gauge == PULLING_VMS * count, "every VM holds every webhook"

    # Steady polling: nothing changes; Envoy's CPU time over a window.
    before_cpu, before_at = cpu_seconds(envoy.proc.pid), time.monotonic()
    time.sleep(CPU_WINDOW_S)  # the measurement window
    share = (cpu_seconds(envoy.proc.pid) - before_cpu) / (time.monotonic() - before_at)
    print(f"{label}: steady polling (pollMs {POLL_MS}, nothing changed): {share * 100:.2f}% of a core "
          f"over {CPU_WINDOW_S} s")

    took = new_registration_delivered(envoy, job_service, rc, registry, seed_org(organisations // 2))
    print(f"{label}: a new registration delivered {took * 1000:.0f} ms after it (pollMs {POLL_MS})")
    return sync_s, growth_mib, share, took


def test_100000_webhooks_in_10000_organisations_on_sqlite(cli_built, job_service, rc, envoys, wasm, tmp_path):
    registry = RegistryService(tmp_path / "registry", port=free_port())
    try:
        sync_s, growth_mib, share, took = run_scale(job_service, rc, envoys, wasm, registry, 100_000, 10_000,
                                                    "sqlite-100k")
    finally:
        registry.stop()
    assert sync_s <= INITIAL_SYNC_S
    assert growth_mib <= RSS_GROWTH_MIB
    assert took <= POLL_MS / 1000 + 1
    assert share <= STEADY_CPU_SHARE


def test_10000_webhooks_on_postgres(cli_built, job_service, rc, envoys, wasm, tmp_path):
    pg = Postgres()
    try:
        registry = RegistryService(tmp_path / "registry", database=pg.new_database(), port=free_port())
        try:
            sync_s, _, share, took = run_scale(job_service, rc, envoys, wasm, registry, 10_000, 1_000, "postgres-10k")
        finally:
            registry.stop()
    finally:
        pg.stop()
    assert sync_s <= INITIAL_SYNC_S
    assert took <= POLL_MS / 1000 + 1
    assert share <= STEADY_CPU_SHARE
