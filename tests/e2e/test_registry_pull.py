"""The filter pulls the registry, through the real Envoy (two workers) and the real `registry serve`: a webhook
registered through the API is delivered to and verified with the key the API returned once; disabling it stops
its deliveries; after a key rotation each delivery verifies under the old and the new key; with the registry
down, deliveries go on from the copy in force; events emitted before the first complete listing of the feed
(version 2, `GET /v2/registry/changes`) wait for it."""

from __future__ import annotations

import time

import harness
import pytest
from harness.checks import signature_valid
from harness.config import new_id
from harness.observe import Counters, wait_for_log
from harness.registry_service import RegistryService, free_port
from registry_feed import applied_by_every_vm, complete, envoy_pulling

POLL_MS = 500


@pytest.fixture
def registry(cli_built, tmp_path):
    service = RegistryService(tmp_path / "registry", port=free_port())
    yield service
    service.stop()


def applied_everywhere(counters, before: int):
    """Every root context of the proxy (two workers and the main thread) applied one more document."""
    counters.wait_delta("registry_updates", before + 3, timeout=15)


def test_registered_through_the_api_delivered_and_verified_with_the_key_shown_once(
        job_service, rc, registry, envoys, wasm):
    envoy = envoy_pulling(job_service, rc, registry, envoys, wasm, "registry-pull", POLL_MS)
    counters = Counters(envoy)
    applied_everywhere(counters, 0)
    org = new_id()
    path = f"/hooks/{new_id()}"
    registered_at = time.time()
    webhook, key = registry.register(org, rc.url(path))
    # Jobs complete until one is delivered: the time from registration to the first delivery.
    first = None
    while first is None and time.time() < registered_at + POLL_MS / 1000 + 10:
        job_id = complete(envoy, job_service, org)
        try:
            (first,) = rc.wait_for(lambda d, j=job_id: d.object_id() == j, timeout=0.3)
        except harness.WaitTimeout:
            pass
    assert first is not None, "no delivery within pollMs + 10 s of the registration"
    print(f"\nregistration to first delivery: {(first.received_at - registered_at) * 1000:.0f} ms (pollMs {POLL_MS})")
    assert first.path == path and first.json()["webhookId"] == webhook["id"]
    assert signature_valid(first, key)


def test_disable_stops_deliveries_and_rotation_signs_with_both_keys(job_service, rc, registry, envoys, wasm):
    envoy = envoy_pulling(job_service, rc, registry, envoys, wasm, "registry-lifecycle", POLL_MS)
    counters = Counters(envoy)
    org = new_id()
    kept_path, off_path = f"/hooks/{new_id()}", f"/hooks/{new_id()}"
    kept, kept_key = registry.register(org, rc.url(kept_path), name="kept")
    off, _ = registry.register(org, rc.url(off_path), name="to be disabled")
    applied_everywhere(counters, 0)
    job = complete(envoy, job_service, org)
    rc.wait_for(lambda d: d.object_id() == job, count=2, timeout=15)

    before = counters.delta("registry_updates")
    token = registry.token(org=org)
    answer = registry.request("PATCH", f"/v1/organisations/{org}/webhooks/{off['id']}", token=token,
                              body={"status": "disabled"})
    assert answer.status == 200, answer
    rotated = registry.request("POST", f"/v1/organisations/{org}/webhooks/{kept['id']}/rotate-key", token=token)
    assert rotated.status == 200, rotated
    new_key = harness.registry.register_secret(rotated.json()["apiKey"])
    # Both changes reached every root context (one document may carry both).
    counters.wait_delta("registry_updates", before + 3, timeout=15)
    # Every VM has applied the registry's head (both changes; they may come in one catch-up or two).
    head = registry.changes(0).json()["revision"]
    harness.wait_until(lambda: applied_by_every_vm(envoy, rf"registry revision {head} applied: 1 registry webhooks"),
                       timeout=15, desc=f"every VM to apply revision {head}")

    jobs = [complete(envoy, job_service, org) for _ in range(5)]
    got = rc.wait_for(lambda d: d.object_id() in jobs and d.path == kept_path, count=5, timeout=15)
    for d in got:
        # standardwebhooks accepts a delivery when one of its signatures verifies: each key alone must.
        assert signature_valid(d, kept_key), "the old key no longer verifies during the grace period"
        assert signature_valid(d, new_key), "the new key does not verify"
        assert len(d.headers["webhook-signature"].split(" ")) == 2
    assert not [d for d in rc.requests_to(off_path) if d.object_id() in jobs], "a disabled webhook got a delivery"


def test_with_the_registry_down_deliveries_go_on_from_the_last_good_copy(job_service, rc, registry, envoys, wasm):
    envoy = envoy_pulling(job_service, rc, registry, envoys, wasm, "registry-down", POLL_MS)
    counters = Counters(envoy)
    org = new_id()
    path = f"/hooks/{new_id()}"
    registry.register(org, rc.url(path))
    applied_everywhere(counters, 0)
    registry.stop()
    stopped = time.monotonic()
    delivered = 0
    while time.monotonic() - stopped < 10:  # the scenario: 10 s without the registry
        job = complete(envoy, job_service, org)
        rc.wait_for(lambda d, j=job: d.object_id() == j and d.path == path, timeout=15)
        delivered += 1
        time.sleep(0.5)
    assert counters.delta("registry_fetch_failed") >= 3
    wait_for_log(envoy, r"registry poll failed \(.*\): the copy complete at revision \d+ stays in force")
    registry.start()
    wait_for_log(envoy, r"registry reachable again")
    print(f"\nregistry down 10 s: {delivered} events delivered meanwhile")


def test_events_before_the_first_listing_wait_for_it(job_service, rc, registry, envoys, wasm):
    org = new_id()
    path = f"/hooks/{new_id()}"
    registry.register(org, rc.url(path))
    registry.stop()
    envoy = envoy_pulling(job_service, rc, registry, envoys, wasm, "registry-late", POLL_MS)
    counters = Counters(envoy)
    jobs = [complete(envoy, job_service, org) for _ in range(4)]
    wait_for_log(envoy, r"registry poll failed \(.*\): events for the registry's webhooks wait for its first complete listing")
    assert not [d for d in rc.requests_to(path) if d.object_id() in jobs]
    registry.start()
    rc.wait_for(lambda d: d.object_id() in jobs and d.path == path, count=4, timeout=15)
    assert counters.delta("events_without_subscribers") == 0
    assert counters.delta("events_registry_not_loaded") >= 4
