"""The registry feed (version 2) through the real Envoy (two workers) and the real `registry serve`: 2,000 webhooks,
a tenth of them maximal, listed page by page under the shipped 64 KiB answer limit and applied by every VM; a new
registration, a disable and a delete take effect within pollMs + 1 s; an organisation at its quota hammering the API
does not delay another's new webhook; and an answer over the limit is logged with its true reason and counted, its
events counted as waiting for the registry, not as without subscribers."""

from __future__ import annotations

import base64
import http.server
import json
import os
import threading
import time
from pathlib import Path

import harness
import pytest
from harness.config import new_id
from harness.observe import Counters, wait_for_log
from harness.registry_service import WRITES_UNLIMITED, RegistryService, free_port

from registry_feed import PULLING_VMS, applied_by_every_vm, complete, envoy_pulling

POLL_MS = 500
BOUND_S = POLL_MS / 1000 + 1
ANSWER_LIMIT = 65536


def seed_org(i: int) -> str:
    return f"657bf08c2029{i:012x}"


@pytest.fixture
def registry(cli_built, tmp_path):
    service = RegistryService(tmp_path / "registry", port=free_port())
    yield service
    service.stop()


@pytest.fixture
def unlimited_registry(cli_built, tmp_path):
    """Without the organisations' write limit, for a test that writes as fast as it can on purpose."""
    service = RegistryService(tmp_path / "registry", port=free_port(), extra_args=WRITES_UNLIMITED)
    yield service
    service.stop()


def wait_listed(envoy, count: int):
    harness.wait_until(lambda: applied_by_every_vm(envoy, rf"applied \(first\): {count} registry webhooks in force"),
                       timeout=60, desc=f"every VM's first listing of {count} webhooks", interval=0.1)
    counters = Counters(envoy)
    harness.wait_until(lambda: counters.gauge("registry_webhooks") == PULLING_VMS * count, timeout=10,
                       desc="registry_webhooks to count every VM's webhooks")


def first_delivery(envoy, job_service, rc, org, path, since: float) -> float:
    """Completes jobs of `org` until one reaches `path`; returns the seconds from `since` to that delivery."""
    while time.time() < since + BOUND_S + 10:
        job_id = complete(envoy, job_service, org)
        try:
            (got,) = rc.wait_for(lambda d, j=job_id: d.object_id() == j and d.path == path, timeout=0.2)
            return got.received_at - since
        except harness.WaitTimeout:
            pass
    raise AssertionError(f"nothing reached {path} within pollMs + 10 s")


def test_2000_webhooks_a_tenth_maximal_applied_in_every_worker_and_changes_within_the_bound(
        registry, job_service, rc, envoys, wasm):
    print("\n" + registry.seed(2000, 200, maximal_every=10, url_prefix=rc.url("/seed/")))
    changes, pages = registry.list_all()
    assert len(changes) == 2000
    largest = max(len(p) for p in pages)
    print(f"the listing: {len(pages)} pages, the largest {largest} bytes")
    assert largest < ANSWER_LIMIT
    envoy = envoy_pulling(job_service, rc, registry, envoys, wasm, "feed-2000", POLL_MS)
    wait_listed(envoy, 2000)
    # The last seeded webhook (a maximal one is every tenth: 1999 is not; 1990 is) gets events from both workers.
    for n in (1999, 1990):
        jobs = [complete(envoy, job_service, seed_org(n % 200)) for _ in range(6)]
        rc.wait_for(lambda d: d.object_id() in jobs and d.path == f"/seed/{n}", count=6, timeout=15)

    org = new_id()
    marker_path, off_path, gone_path, new_path = (f"/hooks/{new_id()}" for _ in range(4))
    registry.register(org, rc.url(marker_path), name="marker")
    off, _ = registry.register(org, rc.url(off_path), name="to be disabled")
    gone, _ = registry.register(org, rc.url(gone_path), name="to be deleted")
    registered_at = time.time()
    new, _ = registry.register(org, rc.url(new_path), name="new")
    took = first_delivery(envoy, job_service, rc, org, new_path, registered_at)
    print(f"a new registration delivered {took * 1000:.0f} ms after it (pollMs {POLL_MS})")
    assert took <= BOUND_S

    token = registry.token(org=org)
    changed_at = time.time()
    answer = registry.request("PATCH", f"/v1/organisations/{org}/webhooks/{off['id']}", token=token,
                              body={"status": "disabled"})
    assert answer.status == 200, answer
    answer = registry.request("DELETE", f"/v1/organisations/{org}/webhooks/{gone['id']}", token=token)
    assert answer.status in (200, 204), answer
    done_at = time.time()
    in_force = applied_by_every_vm(envoy, r"applied: 2002 registry webhooks in force", since=changed_at - 0.01)
    applied_at = harness.wait_until(
        lambda: applied_by_every_vm(envoy, r"applied: 2002 registry webhooks in force", since=changed_at - 0.01),
        timeout=15, desc="every VM to apply the disable and the delete", interval=0.05)
    assert in_force is None or in_force == applied_at
    took = applied_at - done_at
    print(f"a disable and a delete in force in every VM {max(took, 0) * 1000:.0f} ms after them (pollMs {POLL_MS})")
    assert took <= BOUND_S
    jobs = [complete(envoy, job_service, org) for _ in range(6)]
    rc.wait_for(lambda d: d.object_id() in jobs and d.path == marker_path, count=6, timeout=15)
    rc.wait_for(lambda d: d.object_id() in jobs and d.path == new_path, count=6, timeout=15)
    late = [d.path for d in rc.requests_to(off_path) + rc.requests_to(gone_path) if d.object_id() in jobs]
    assert not late, f"a disabled or deleted webhook got a delivery: {late}"


def test_an_organisation_at_its_quota_hammering_the_api_does_not_delay_another(unlimited_registry, job_service, rc,
                                                                                envoys, wasm):
    # Every write reaches the database: the hammer is not slowed down by the write limit.
    registry = unlimited_registry
    busy = seed_org(0)
    print("\n" + registry.seed(100, 1, maximal_every=1, url_prefix=rc.url("/busy/")))
    token = registry.token(org=busy)
    listed = registry.request("GET", f"/v1/organisations/{busy}/webhooks", token=token)
    assert listed.status == 200, listed
    body = listed.json()
    ids = [w["id"] for w in (body["webhooks"] if isinstance(body, dict) else body)]
    assert len(ids) == 100
    refused = registry.request("POST", f"/v1/organisations/{busy}/webhooks", token=token,
                               body={"name": "one more", "url": rc.url("/busy/more"), "events": ["job.completed"]})
    assert refused.status in (409, 422), refused
    envoy = envoy_pulling(job_service, rc, registry, envoys, wasm, "feed-quota", POLL_MS)
    wait_listed(envoy, 100)

    stop, writes = threading.Event(), []

    def hammer():
        n = 0
        while not stop.is_set():
            n += 1
            answer = registry.request("PATCH", f"/v1/organisations/{busy}/webhooks/{ids[n % len(ids)]}",
                                      token=token, body={"description": f"rewrite {n}"})
            writes.append(answer.status)

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    try:
        harness.wait_until(lambda: len(writes) >= 20 or None, timeout=30, desc="the hammer to write")
        org = new_id()
        path = f"/hooks/{new_id()}"
        registered_at = time.time()
        registry.register(org, rc.url(path))
        took = first_delivery(envoy, job_service, rc, org, path, registered_at)
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    print(f"{len(writes)} updates by the organisation at its quota; another organisation's new webhook delivered "
          f"{took * 1000:.0f} ms after its registration (pollMs {POLL_MS})")
    assert writes.count(200) >= 20, writes[:20]
    assert took <= BOUND_S


# The page's webhooks carry a real key: it must not reach a log line either.
BIG_PAGE_KEY = harness.registry.register_secret("whsec_" + base64.b64encode(os.urandom(32)).decode())


class _BigPage(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the standard library's name)
        entry = {"revision": 1, "id": "0" * 24, "organisationId": "o", "name": "n", "url": "https://x.example.com/",
                 "description": "d" * 3000, "status": "enabled", "events": ["job.completed"],
                 "apiKeys": [BIG_PAGE_KEY]}
        changes = [dict(entry, revision=i + 1, id=f"{i:024x}") for i in range(40)]
        body = json.dumps({"revision": 40, "next": 40, "more": False, "changes": changes}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:  # Envoy reset the callout at its limit
            pass

    def log_message(self, *args):
        pass


def test_an_answer_over_the_callout_limit_is_logged_with_its_reason_and_counted(job_service, rc, envoys, wasm):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BigPage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        class Fake:
            port = server.server_address[1]
            proxy_token = "t" * 24

        envoy = envoy_pulling(job_service, rc, Fake, envoys, wasm, "feed-over-limit", POLL_MS)
        counters = Counters(envoy)
        lines = wait_for_log(envoy, r"registry poll failed \((.*?)\): events for the registry's webhooks wait")
        reason = lines[0].group(1)
        print(f"\nthe warn line's reason: {reason}")
        assert "answer limit" in reason and "connection reset or timeout" not in reason
        counters.wait_delta("registry_fetch_failed", 3)
        job = complete(envoy, job_service, new_id())
        harness.wait_until(lambda: counters.delta("events_registry_not_loaded") >= 1, timeout=10,
                           desc="the event counted as waiting for the registry")
        assert counters.delta("events_without_subscribers") == 0
        assert counters.gauge("registry_sync_age_ms") >= 0
        assert job
    finally:
        server.shutdown()
        server.server_close()


def test_a_registry_restored_from_an_older_backup_is_listed_again_and_what_it_lacks_is_forgotten(
        registry, job_service, rc, envoys, wasm):
    org = new_id()
    kept_path, lost_path = f"/hooks/{new_id()}", f"/hooks/{new_id()}"
    registry.register(org, rc.url(kept_path), name="in the backup")
    # The backup: the database files while the registry is stopped.
    registry.stop()
    db = Path(registry.database.removeprefix("sqlite:"))
    backup = {p: p.read_bytes() for p in db.parent.glob(db.name + "*")}
    registry.start()
    registry.register(org, rc.url(lost_path), name="after the backup")
    envoy = envoy_pulling(job_service, rc, registry, envoys, wasm, "feed-restored", POLL_MS)
    wait_listed(envoy, 2)
    job = complete(envoy, job_service, org)
    rc.wait_for(lambda d: d.object_id() == job, count=2, timeout=15)

    registry.stop()
    for p in db.parent.glob(db.name + "*"):
        p.unlink()
    for p, data in backup.items():
        p.write_bytes(data)
    registry.start()
    counters = Counters(envoy)
    wait_for_log(envoy, r"registry cursor \d+ is gone \(410\): listing again from 0", count=PULLING_VMS)
    harness.wait_until(lambda: applied_by_every_vm(envoy, r"applied: 1 registry webhooks in force, 1 forgotten"),
                       timeout=15, desc="every VM to forget the webhook the backup lacks")
    assert counters.delta("registry_relists") >= PULLING_VMS
    jobs = [complete(envoy, job_service, org) for _ in range(4)]
    rc.wait_for(lambda d: d.object_id() in jobs and d.path == kept_path, count=4, timeout=15)
    assert not [d for d in rc.requests_to(lost_path) if d.object_id() in jobs]
