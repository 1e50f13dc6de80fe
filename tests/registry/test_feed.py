"""The proxies' feed, version 2 (`GET /v2/registry/changes?since=N`, docs/registry-feed.md), against the real binary
on SQLite and on a real Postgres: listings over several pages, changes since a cursor (updates, disables,
rotations, deletions), pages bounded in bytes, 410 after compaction and for a future cursor, the 4 KiB bound of one
webhook's entry, the per-organisation quota, concurrent polls, the migration of a database from before revisions,
and listings of 100,000 (SQLite) and 10,000 (Postgres) seeded webhooks."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness.registry_service import Postgres, RegistryService
from harness.util import wait_until

GOOD = {"name": "Billing", "url": "https://hooks.example.com/webhooks", "description": "Invoices",
        "status": "enabled", "events": ["job.completed"]}
ENTRY_LIMIT = 4096
KEY = "whsec_" + "A" * 44  # the length of every key the registry makes


def hooks(org: str, id_: str = "", action: str = "") -> str:
    return "/".join(p for p in [f"/v1/organisations/{org}/webhooks", id_, action] if p)


def create(reg, org="org-a", **fields) -> dict:
    answer = reg.request("POST", hooks(org), token=reg.token(org=org), body={**GOOD, **fields})
    assert answer.status == 201, answer
    return answer.json()


def change(reg, org, id_, method="PATCH", action="", body=None) -> dict:
    answer = reg.request(method, hooks(org, id_, action), token=reg.token(org=org), body=body)
    assert answer.status in (200, 204), answer
    return answer.json() if answer.body else {}


def max_revision(reg) -> int:
    answer = reg.changes(0)
    assert answer.status == 200, answer
    return answer.json()["revision"]


def wire(entry: dict) -> int:
    """An entry's size on the wire, as the registry writes it (compact, UTF-8, escapes as serde_json's)."""
    return len(json.dumps(entry, separators=(",", ":"), ensure_ascii=False).encode())


def check_pages(pages: list, page_bytes: int) -> None:
    """Every page within its bound, at least one change in each page that says more follow."""
    for body in pages:
        page = json.loads(body)
        assert list(page) == ["revision", "next", "more", "changes"]
        assert len(body) <= page_bytes or len(page["changes"]) == 1, len(body)
        revisions = [c["revision"] for c in page["changes"]]
        assert revisions == sorted(set(revisions))
        if page["more"]:
            assert revisions and page["next"] == revisions[-1] < page["revision"]
        else:
            assert page["next"] == page["revision"]


# --------------------------------------------------------------------------------------------------------------
# Listing and changes
# --------------------------------------------------------------------------------------------------------------


def test_a_listing_over_several_pages_has_every_webhook_once(make_registry, backend):
    reg = make_registry(backend, loopback_webhooks=False, extra_args=["--feed-page-bytes", "4352"])
    made = {}
    for i in range(40):
        hook = create(reg, f"org-{i % 7}", name=f"hook {i}", description="d" * (i * 20))
        made[hook["id"]] = hook
    changes, pages = reg.list_all()
    assert len(pages) >= 3
    check_pages(pages, 4352)
    assert [c["id"] for c in changes] == list(made)  # creation order is revision order
    first = changes[0]
    hook = made[first["id"]]
    assert first == {"revision": 1, "id": hook["id"], "organisationId": "org-0", "name": "hook 0",
                     "url": GOOD["url"], "description": "", "status": "enabled", "events": ["job.completed"],
                     "apiKeys": [hook["apiKey"]]}
    assert all(c["apiKeys"] == [made[c["id"]]["apiKey"]] for c in changes)
    # Nothing changed: one small answer.
    last = json.loads(pages[-1])["next"]
    answer = reg.changes(last)
    assert answer.status == 200 and answer.headers["cache-control"] == "no-store"
    assert answer.body == b'{"revision":40,"next":40,"more":false,"changes":[]}'


def test_changes_since_a_cursor(registry):
    a, b, c, d = (create(registry, "org-a", name=n) for n in "abcd")
    cursor = max_revision(registry)
    change(registry, "org-a", a["id"], body={"name": "a2"})
    change(registry, "org-a", b["id"], body={"status": "disabled"})
    rotated = change(registry, "org-a", c["id"], "POST", "rotate-key")
    change(registry, "org-a", d["id"], "DELETE")
    changes, pages = registry.list_all(cursor)
    assert len(pages) == 1
    assert [(x["id"], x["revision"]) for x in changes] == [
        (a["id"], cursor + 1), (b["id"], cursor + 2), (c["id"], cursor + 3), (d["id"], cursor + 4)]
    assert changes[0]["name"] == "a2" and changes[0]["apiKeys"] == [a["apiKey"]]
    assert changes[1]["status"] == "disabled"
    assert changes[2]["apiKeys"] == [rotated["apiKey"], c["apiKey"]]
    assert abs(changes[2]["previousKeyExpiresAt"] - (time.time() + 86_400)) < 120
    assert changes[3] == {"revision": cursor + 4, "id": d["id"], "organisationId": "org-a", "deleted": True}
    # Later cursors see only what came after them.
    assert [x["id"] for x in registry.list_all(cursor + 2)[0]] == [c["id"], d["id"]]
    # A listing from 0 has no tombstones: the live webhooks only, the disabled one included.
    listing = registry.list_all(0)[0]
    assert sorted(x["id"] for x in listing) == sorted([a["id"], b["id"], c["id"]])
    assert not any("deleted" in x for x in listing)


def test_a_webhook_changed_many_times_appears_once(registry):
    a = create(registry, "org-a")
    b = create(registry, "org-b")
    cursor = max_revision(registry)
    for i in range(25):
        change(registry, "org-a", a["id"], body={"name": f"name {i}"})
    change(registry, "org-b", b["id"], body={"name": "b once"})
    changes = registry.list_all(cursor)[0]
    assert [(x["id"], x["name"], x["revision"]) for x in changes] == [
        (a["id"], "name 24", cursor + 25), (b["id"], "b once", cursor + 26)]


def test_a_cursor_past_the_compaction_point_or_the_head_is_gone(make_registry, backend):
    reg = make_registry(backend, extra_args=["--tombstone-retention", "1s"])
    a = create(reg, "org-a")
    b = create(reg, "org-b")
    before = max_revision(reg)
    change(reg, "org-a", a["id"], "DELETE")
    deleted_at = max_revision(reg)
    assert reg.changes(before).json()["changes"] == [
        {"revision": deleted_at, "id": a["id"], "organisationId": "org-a", "deleted": True}]

    def gone():
        answer = reg.changes(before)
        return answer if answer.status == 410 else None

    answer = wait_until(gone, 30, "the tombstone to be pruned")
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == {"errors": [{"path": "since", "message":
                                         f"cursor {before} is older than the compaction point {deleted_at}: "
                                         "list again from 0"}]}
    # At the compaction point and after it, and from 0, the feed still answers.
    assert reg.changes(deleted_at).json()["changes"] == []
    assert [x["id"] for x in reg.list_all(0)[0]] == [b["id"]]
    # A cursor the registry never reached (a database restored from an older backup).
    future = reg.changes(deleted_at + 1)
    assert future.status == 410
    assert future.json()["errors"][0]["path"] == "since"
    assert "newer than the head" in future.json()["errors"][0]["message"]
    assert "older than the compaction point" in reg.log_text()


def test_bad_cursors_and_missing_tokens(registry):
    create(registry)
    for query in ["since=-1", "since=abc", "since=1&since=2", "since="]:
        answer = registry.request("GET", f"/v2/registry/changes?{query}", token=registry.proxy_token)
        assert answer.status == 400 and answer.json()["errors"][0]["path"] == "since", (query, answer)
    assert registry.request("GET", "/v2/registry/changes", token=registry.proxy_token).json()["revision"] == 1
    for token in [None, registry.proxy_token + "x", registry.token(role="super_admin")]:
        answer = registry.request("GET", "/v2/registry/changes?since=0", token=token)
        assert answer.status == 401 and answer.json()["errors"][0]["path"] == "authorization"
        assert b"whsec_" not in answer.body


def test_the_version_1_feed_still_works(registry):
    made = [create(registry, f"org-{i % 3}") for i in range(6)]
    change(registry, "org-0", made[0]["id"], "DELETE")
    document = registry.feed().json()
    listing = registry.list_all(0)[0]
    assert document["revision"] == 7 == registry.changes(0).json()["revision"]
    strip = lambda w: {k: v for k, v in w.items() if k != "revision"}  # noqa: E731
    assert sorted(map(json.dumps, document["webhooks"])) == sorted(json.dumps(strip(w)) for w in listing)


# --------------------------------------------------------------------------------------------------------------
# No tenant can hurt another's sync: the entry bound and the quota
# --------------------------------------------------------------------------------------------------------------


def largest_description(org: str, name: str, url: str) -> str:
    """The longest description of three-byte characters whose entry (largest revision, the longer status, two keys,
    an expiry) fits."""
    def size(n):
        return wire({"revision": 2**63 - 1, "id": "0" * 24, "organisationId": org, "name": name, "url": url,
                     "description": "€" * n, "status": "disabled", "events": ["job.completed", "job.failed"],
                     "apiKeys": [KEY, KEY], "previousKeyExpiresAt": 9_999_999_999})
    n = max(i for i in range(2001) if size(i) <= ENTRY_LIMIT)
    return "€" * n


def test_a_webhook_entry_is_at_most_4_kib(make_registry, backend):
    reg = make_registry(backend, loopback_webhooks=False, extra_args=["--feed-page-bytes", "4352"])
    name, url = "N" * 200, "https://hooks.example.com/" + "p" * 300
    most = largest_description("org-big", name, url)
    maximal = dict(name=name, url=url, status="enabled", events=["job.completed", "job.failed"])
    # One character more is refused, naming the limit; nothing is written.
    answer = reg.request("POST", hooks("org-big"), token=reg.token(org="org-big"),
                         body={**GOOD, **maximal, "description": most + "€"})
    assert answer.status == 422
    assert answer.json()["errors"][0]["path"] == ""
    assert "4096 bytes" in answer.json()["errors"][0]["message"]
    assert reg.changes(0).json()["revision"] == 0
    # Newlines take two bytes on the wire: counted too.
    answer = reg.request("POST", hooks("org-big"), token=reg.token(org="org-big"),
                         body={**GOOD, **maximal, "description": "\n" * 2000})
    assert answer.status == 422, answer
    hooks_made = [create(reg, "org-big", **maximal, description=most) for _ in range(5)]
    # An update past the bound is refused as well, and the webhook stays as it was.
    answer = reg.request("PATCH", hooks("org-big", hooks_made[0]["id"]), token=reg.token(org="org-big"),
                         body={"name": "€" * 200})
    assert answer.status == 422 and "4096" in answer.json()["errors"][0]["message"]
    # Disabling one makes its entry a byte longer: the bound counted that already.
    change(reg, "org-big", hooks_made[1]["id"], body={"status": "disabled"})
    # Rotations give every maximal webhook two keys: each entry still fits, every page too.
    for hook in hooks_made:
        change(reg, "org-big", hook["id"], "POST", "rotate-key")
    changes, pages = reg.list_all(0)
    assert len(changes) == 5 and len(pages) == 5
    for entry in changes:
        assert len(entry["apiKeys"]) == 2
        assert ENTRY_LIMIT - 100 < wire(entry) <= ENTRY_LIMIT, wire(entry)
    check_pages(pages, 4352)
    assert all(len(body) <= 4352 for body in pages)


def test_the_quota_of_webhooks_per_organisation(make_registry, backend):
    reg = make_registry(backend, extra_args=["--max-webhooks-per-organisation", "3"])
    made = [create(reg, "org-a") for _ in range(3)]
    answer = reg.request("POST", hooks("org-a"), token=reg.token(org="org-a"), body=GOOD)
    assert answer.status == 422
    message = answer.json()["errors"][0]["message"]
    assert "3 webhooks" in message and "--max-webhooks-per-organisation 3" in message
    # Another organisation is not affected; a deletion frees a place.
    create(reg, "org-b")
    change(reg, "org-a", made[0]["id"], "DELETE")
    create(reg, "org-a")
    # Concurrent creates cannot pass the quota together.
    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda _: reg.request("POST", hooks("org-c"), token=reg.token(org="org-c"),
                                                       body=GOOD).status, range(12)))
    assert sorted(statuses) == [201] * 3 + [422] * 9
    listing = reg.list_all(0)[0]
    counts = {org: sum(1 for w in listing if w["organisationId"] == org) for org in ("org-a", "org-b", "org-c")}
    assert counts == {"org-a": 3, "org-b": 1, "org-c": 3}


# --------------------------------------------------------------------------------------------------------------
# Concurrency, migration, scale
# --------------------------------------------------------------------------------------------------------------


def test_concurrent_identical_polls_get_the_same_page(make_registry, backend):
    reg = make_registry(backend)
    reg.seed(3000, 300)
    cursor = 1500
    start = threading.Barrier(32)

    def poll(_):
        start.wait()
        return reg.changes(cursor)

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(poll, range(32)))
    assert {a.status for a in answers} == {200}
    assert len({a.body for a in answers}) == 1
    page = answers[0].json()
    assert page["revision"] == 3000 and page["more"] is True
    assert page["changes"][0]["revision"] == cursor + 1
    assert len(answers[0].body) <= 49_152
    # Then a write: the next identical polls see the new head.
    create(reg, "org-new")
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda _: reg.changes(3000), range(32)))
    assert {a.body for a in answers} == {answers[0].body}
    assert [c["organisationId"] for c in answers[0].json()["changes"]] == ["org-new"]


# The tables exactly as the registry created them before revisions.
OLD_SCHEMA = [
    "CREATE TABLE registry_state (id INTEGER PRIMARY KEY, revision BIGINT NOT NULL)",
    "INSERT INTO registry_state (id, revision) VALUES (1, 9)",
    """CREATE TABLE webhooks (id TEXT PRIMARY KEY, organisation_id TEXT NOT NULL, name TEXT NOT NULL,
       url TEXT NOT NULL, description TEXT NOT NULL, status TEXT NOT NULL, events TEXT NOT NULL,
       key_sealed TEXT NOT NULL, previous_key_sealed TEXT, previous_key_expires_ms BIGINT, key_rotated_ms BIGINT,
       created_ms BIGINT NOT NULL, updated_ms BIGINT NOT NULL)""",
    "CREATE INDEX webhooks_by_organisation ON webhooks (organisation_id, created_ms)",
    """CREATE TABLE audit (at_ms BIGINT NOT NULL, actor TEXT NOT NULL, role TEXT NOT NULL,
       organisation_id TEXT NOT NULL, action TEXT NOT NULL, webhook_id TEXT NOT NULL, detail TEXT NOT NULL)""",
]


def test_a_database_from_before_revisions_is_migrated(make_registry, backend, tmp_path, request):
    rows = [(f"{i:024x}", f"org-{i % 2}", f"old {i}", f"https://hooks.example.com/{i}", "", "enabled",
             '["job.completed"]', f"plain:whsec_{'B' * 43}{i}", 1_700_000_000_000 + i) for i in range(5)]
    insert = ("INSERT INTO webhooks (id, organisation_id, name, url, description, status, events, key_sealed, "
              "created_ms, updated_ms) VALUES ('{0}', '{1}', '{2}', '{3}', '{4}', '{5}', '{6}', '{7}', {8}, {8})")
    # A webhook stored before the 4 KiB bound: 6,000 bytes of description.
    rows.append((f"{5:024x}", "org-1", "old 5", "https://hooks.example.com/5", "€" * 2000, "enabled",
                 '["job.completed"]', f"plain:whsec_{'B' * 43}5", 1_700_000_000_005))
    statements = OLD_SCHEMA + [insert.format(*row) for row in reversed(rows)]
    if backend == "sqlite":
        path = tmp_path / "old.db"
        with sqlite3.connect(path) as db:
            for statement in statements:
                db.execute(statement)
        database = f"sqlite:{path}"
    else:
        postgres = request.getfixturevalue("postgres")
        database = postgres.new_database()
        for statement in statements:
            postgres.psql(statement, database=database.rsplit("/", 1)[1])
    reg = make_registry(backend, database=database, plaintext=True)
    listing = reg.list_all(0)[0]
    # Every old row has its own revision after the old head, in creation order; the head moved past them.
    assert [(w["id"], w["revision"]) for w in listing] == [(row[0], 10 + i) for i, row in enumerate(rows)]
    assert listing[0]["apiKeys"] == [rows[0][7].removeprefix("plain:")]
    assert wire(listing[5]) > 6000
    assert reg.changes(0).json()["revision"] == 15
    assert reg.feed().json()["revision"] == 15
    hook = create(reg, "org-0")
    change(reg, "org-0", rows[0][0], "DELETE")
    # The oversized one can still be disabled, not made larger.
    change(reg, "org-1", rows[5][0], body={"status": "disabled"})
    answer = reg.request("PATCH", hooks("org-1", rows[5][0]), token=reg.token(org="org-1"), body={"name": "n" * 200})
    assert answer.status == 422 and "4096" in answer.json()["errors"][0]["message"]
    assert [(w["id"], w["revision"]) for w in reg.list_all(15)[0]] == [
        (hook["id"], 16), (rows[0][0], 17), (rows[5][0], 18)]
    # A second start finds everything migrated and changes nothing.
    reg.stop()
    reg.start()
    assert reg.changes(0).json()["revision"] == 18


@pytest.mark.parametrize("backend_, count, organisations", [("sqlite", 100_000, 10_000),
                                                            ("postgres", 10_000, 1_000)])
def test_a_seeded_registry_lists_completely(make_registry, backend_, count, organisations):
    reg = make_registry(backend_)
    started = time.monotonic()
    printed = reg.seed(count, organisations, maximal_every=10)
    seeded = time.monotonic() - started
    started = time.monotonic()
    changes, pages = reg.list_all(0)
    listed = time.monotonic() - started
    print(f"\n{backend_}: {printed}; seed took {seeded:.1f} s; full listing of {len(changes)} webhooks in "
          f"{len(pages)} pages took {listed:.1f} s (largest page {max(map(len, pages))} bytes)")
    assert len(changes) == count == len({c["id"] for c in changes})
    assert [c["revision"] for c in changes] == list(range(1, count + 1))
    assert len({c["organisationId"] for c in changes}) == organisations
    assert all(len(c["apiKeys"]) == 1 and c["apiKeys"][0].startswith("whsec_") for c in changes)
    assert max(wire(c) for c in changes) <= ENTRY_LIMIT
    check_pages(pages, 49_152)
    assert all(len(body) <= 49_152 for body in pages)
    # The steady state after the listing: the small answer.
    assert reg.changes(count).json() == {"revision": count, "next": count, "more": False, "changes": []}


def test_a_database_that_does_not_answer_is_503(make_registry):
    pg = Postgres()
    try:
        reg = make_registry("postgres", database=pg.new_database())
        create(reg, "org-a")
        assert reg.changes(0).status == 200
    finally:
        pg.stop()
    for since in (0, 1, 5):
        answer = reg.changes(since)
        assert answer.status == 503, answer
        assert answer.json() == {"errors": [{"path": "", "message": "the database did not answer; try again"}]}
    assert "registry changes: database error" in reg.log_text() or "within 2 s" in reg.log_text()


@pytest.mark.parametrize("flags, message", [
    (["--feed-page-bytes", "4351"], "--feed-page-bytes 4351 must be from 4352"),
    (["--feed-page-bytes", "lots"], "--feed-page-bytes"),
    (["--tombstone-retention", "48h"], "--tombstone-retention"),
    (["--max-webhooks-per-organisation", "0"], "--max-webhooks-per-organisation"),
])
def test_bad_feed_settings_are_refused(tmp_path, flags, message):
    reg = RegistryService(tmp_path, start=False, extra_args=flags)
    done = subprocess.run(reg.args, env=reg.env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr


def test_a_poller_following_the_cursor_misses_no_concurrent_write(make_registry, postgres):
    """Revisions become visible in order (the counter row is locked until commit): a proxy that follows `next`
    while two replicas write at once never steps past a change that was not visible yet."""
    database = postgres.new_database()
    replicas = [make_registry("postgres", database=database), None]
    first = replicas[0]
    replicas[1] = make_registry("postgres", database=database, jwt_secret=first.jwt_secret,
                                proxy_token=first.proxy_token, main_key=first.main_key)
    created, seen, done = [], {}, threading.Event()

    def write(n):
        reg = replicas[n % 2]
        for i in range(25):
            hook = create(reg, f"org-{n}", name=f"w{n}-{i}")
            created.append(hook["id"])
            if i % 5 == 0:
                change(reg, f"org-{n}", hook["id"], body={"status": "disabled"})

    def follow():
        since = 0
        while True:
            finished = done.is_set()
            page = first.changes(since).json()
            for c in page["changes"]:
                seen[c["id"]] = c
            since = page["next"]
            if finished and not page["more"]:
                return since

    with ThreadPoolExecutor(5) as pool:
        poller = pool.submit(follow)
        list(pool.map(write, range(4)))
        done.set()
        last = poller.result()
    assert len(created) == 100
    assert set(seen) == set(created)
    assert last == 120 == first.changes(0).json()["revision"]
    assert sum(1 for c in seen.values() if c["status"] == "disabled") == 20
