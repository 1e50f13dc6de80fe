"""The registry under attack, on SQLite and on a real Postgres: control and invisible characters, duplicate JSON keys,
oversized error answers, framework rejections in the API's error shape, refused requests logged and audited, the
health check and a database that goes away, plaintext keys, and revoking a leaked previous key."""

from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from harness.registry_service import WRITES_UNLIMITED, Postgres, RegistryService, hs256_token
from harness.util import scaled, wait_until

GOOD = {"name": "Billing", "url": "https://hooks.example.com/webhooks", "description": "Invoices",
        "status": "enabled", "events": ["job.completed"]}


def hooks(org: str, id_: str = "", action: str = "") -> str:
    return "/".join(p for p in [f"/v1/organisations/{org}/webhooks", id_, action] if p)


def create(reg, org="org-a", token=None, **fields) -> dict:
    answer = reg.request("POST", hooks(org), token=token or reg.token(org=org), body={**GOOD, **fields})
    assert answer.status == 201, answer
    return answer.json()


def error_paths(answer) -> list:
    return [e["path"] for e in answer.json()["errors"]]


# --------------------------------------------------------------------------------------------------------------
# Control characters
# --------------------------------------------------------------------------------------------------------------

C0 = [chr(c) for c in range(0x20) if c not in (0x09, 0x0A)] + ["\x7f"]


def test_control_characters_are_refused_in_every_text_field(make_registry, backend):
    registry = make_registry(backend, loopback_webhooks=False, extra_args=WRITES_UNLIMITED)
    token = registry.token()
    hook = create(registry)
    for c in C0:
        for field, value in [("description", f"a{c}b"), ("name", f"a{c}b"), ("url", f"https://hooks.example.com/a{c}"),
                             ("events", [f"job.completed{c}"])]:
            path = "events[0]" if field == "events" else field
            for method, target in [("POST", hooks("org-a")), ("PATCH", hooks("org-a", hook["id"]))]:
                body = {**GOOD, field: value} if method == "POST" else {field: value}
                answer = registry.request(method, target, token=token, body=body)
                assert answer.status == 422, (field, repr(c), method, answer)
                assert error_paths(answer) == [path], (field, repr(c), answer)
    # Newline and tab are text in a description.
    kept = create(registry, description="line one\n\tline two")
    assert registry.request("GET", hooks("org-a", kept["id"]), token=token).json()["description"] == \
        "line one\n\tline two"
    assert registry.request("GET", hooks("org-a", hook["id"]), token=token).json()["description"] == "Invoices"


@pytest.mark.parametrize("claim", ["sub", "role", "organisationId"])
def test_a_token_claim_with_a_control_character_is_refused_as_401(registry, claim):
    claims = {"sub": "ann", "role": "organisation_admin", "organisationId": "org-a", "exp": 4102444800}
    for c in ["\x00", "\x1b", "\x7f"]:
        token = hs256_token(registry.jwt_secret, {**claims, claim: f"x{c}y"})
        for method, body in [("GET", None), ("POST", GOOD)]:
            answer = registry.request(method, hooks("org-a"), token=token, body=body)
            assert answer.status == 401, (claim, repr(c), method, answer)
            assert error_paths(answer) == ["authorization"] and claim in answer.json()["errors"][0]["message"]
    assert registry.request("GET", hooks("org-a"), token=registry.token()).json() == {"webhooks": []}


# --------------------------------------------------------------------------------------------------------------
# Invisible names and bidi controls
# --------------------------------------------------------------------------------------------------------------

INVISIBLE_NAMES = ["\u200b", "\ufeff", "\u200b\u200c\u200d", "\u2060\u2061", " \u200b ", "\u00ad", "\u180e",
                   "\u3164", "\u115f\u1160", "\ufe0f", "\u034f", "\U000e0041\U000e0042", "\u2800", "\u3000\u200b"]
BIDI_NAMES = ["Billing\u202e", "\u202aBilling", "Bill\u202bing", "a\u202cb", "\u202dx", "x\u2066y\u2069",
              "\u2067RTL\u2069", "\u2068x"]


def test_invisible_names_and_bidi_controls_are_refused(registry):
    token = registry.token()
    hook = create(registry)
    for name in INVISIBLE_NAMES + BIDI_NAMES:
        for method, target, body in [("POST", hooks("org-a"), {**GOOD, "name": name}),
                                     ("PATCH", hooks("org-a", hook["id"]), {"name": name})]:
            answer = registry.request(method, target, token=token, body=body)
            assert answer.status == 422, (ascii(name), method, answer)
            assert error_paths(answer) == ["name"], (ascii(name), answer)
    # Names in any script, with emoji (a ZWJ sequence included) and right-to-left letters, are fine.
    for name in ["Café ☕", "請求書", "فواتير", "👩\u200d💻 team", "Billing\u00a0EU"]:
        assert create(registry, name=name)["name"] == name
    assert registry.request("GET", hooks("org-a", hook["id"]), token=token).json()["name"] == "Billing"


# --------------------------------------------------------------------------------------------------------------
# Duplicate keys, bounded error answers
# --------------------------------------------------------------------------------------------------------------


def test_duplicate_json_keys_are_refused(registry):
    token = registry.token()
    hook = create(registry)
    rest = '"url": "https://hooks.example.com/x", "events": ["job.completed"]'
    for body, path in [(f'{{"name": "a", "name": "b", {rest}}}', "name"),
                       (f'{{"name": "a", {rest}, "events": ["job.failed"]}}', "events"),
                       (f'{{"name": "a", "n\\u0061me": "b", {rest}}}', "name"),
                       (f'{{"name": "a", {rest}, "x": {{"k": 1, "k": 2}}}}', "x.k")]:
        answer = registry.request("POST", hooks("org-a"), token=token, body=body.encode())
        assert answer.status == 422, (body, answer)
        assert error_paths(answer) == [path], (body, answer)
        assert "more than once" in answer.json()["errors"][0]["message"]
    answer = registry.request("PATCH", hooks("org-a", hook["id"]), token=token,
                              body=b'{"status": "disabled", "status": "enabled"}')
    assert answer.status == 422 and error_paths(answer) == ["status"], answer
    assert [w["id"] for w in registry.request("GET", hooks("org-a"), token=token).json()["webhooks"]] == [hook["id"]]
    assert registry.request("GET", hooks("org-a", hook["id"]), token=token).json()["status"] == "enabled"


def test_error_answers_are_bounded(make_registry):
    catalogue = [f"resource{i:02d}.event_with_a_long_name_{i:02d}" for i in range(40)]
    registry = make_registry(extra_args=["--event-types", ",".join(catalogue)])
    token = registry.token()
    events = [f"job.unknown_{i:04d}" for i in range(1000)]
    body = json.dumps({**GOOD, "events": events}).encode()
    assert 20_000 <= len(body) <= 30_000
    answer = registry.request("POST", hooks("org-a"), token=token, body=body)
    assert answer.status == 422
    errors = answer.json()["errors"]
    assert len(answer.body) <= 4096, len(answer.body)
    assert 2 <= len(errors) <= 21 and errors[0]["path"] == "events[0]"
    assert "/v1/event-types" in errors[0]["message"]
    assert answer.body.count(catalogue[7].encode()) <= 1
    assert "more" in errors[-1]["message"] and "980" in errors[-1]["message"], errors[-1]
    # A huge unknown key, a huge bad value: neither is echoed in full.
    for body in [{**GOOD, "k" * 30_000: 1}, {**GOOD, "events": ["x" * 30_000]}, {**GOOD, "status": "s" * 30_000},
                 {**GOOD, "url": "https://" + "h" * 30_000}]:
        answer = registry.request("POST", hooks("org-a"), token=token, body=body)
        assert answer.status == 422 and len(answer.body) <= 1024, (len(answer.body), answer)


# --------------------------------------------------------------------------------------------------------------
# Every rejection in the error shape
# --------------------------------------------------------------------------------------------------------------


def assert_error_shape(answer, status: int, path: str = None):
    assert answer.status == status, answer
    assert answer.headers["content-type"] == "application/json", answer.headers
    errors = answer.json()["errors"]
    assert len(errors) == 1 and set(errors[0]) == {"path", "message"} and errors[0]["message"], answer
    if path is not None:
        assert errors[0]["path"] == path, answer


def test_framework_rejections_answer_in_the_error_shape(registry):
    token = registry.token()
    hook = create(registry)
    answer = registry.request("DELETE", hooks("org-a"), token=token)
    assert_error_shape(answer, 405)
    assert set(answer.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}
    assert "DELETE" in answer.json()["errors"][0]["message"]
    assert_error_shape(registry.request("PUT", hooks("org-a", hook["id"]), token=token, body=GOOD), 405)
    assert_error_shape(registry.request("POST", "/v1/registry", token=registry.proxy_token), 405)
    answer = registry.request("POST", hooks("org-a"), token=token, body={**GOOD, "description": "d" * 70_000})
    assert_error_shape(answer, 413)
    assert "65536" in answer.json()["errors"][0]["message"]
    assert_error_shape(registry.request("GET", "/v1/nothing/here", token=token), 404)
    assert_error_shape(registry.request("GET", "/v1/organisations/%ff%fe/webhooks", token=token), 400)
    assert_error_shape(registry.request("POST", hooks("org-a"), token=token, body=b"{", ), 422, "")
    for content_type in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                         "application/jsonx"]:
        answer = registry.request("POST", hooks("org-a"), token=token, body=GOOD,
                                  headers={"Content-Type": content_type})
        assert_error_shape(answer, 415, "content-type")
        answer = registry.request("PATCH", hooks("org-a", hook["id"]), token=token, body={"name": "x"},
                                  headers={"Content-Type": content_type})
        assert_error_shape(answer, 415, "content-type")
    # JSON with parameters is JSON; a POST without a body needs no content type.
    assert registry.request("POST", hooks("org-a"), token=token, body=GOOD,
                            headers={"Content-Type": "application/json; charset=utf-8"}).status == 201
    assert registry.request("POST", hooks("org-a", hook["id"], "rotate-key"), token=token).status == 200
    assert len(registry.request("GET", hooks("org-a"), token=token).json()["webhooks"]) == 2


# --------------------------------------------------------------------------------------------------------------
# The health check, and a database that goes away
# --------------------------------------------------------------------------------------------------------------


def timed(reg, method, path, **kwargs):
    started = time.monotonic()
    answer = reg.request(method, path, **kwargs)
    return answer, time.monotonic() - started


def assert_unavailable_within_2s(reg, hook_id: str):
    token = reg.token()
    for method, path, kwargs in [("GET", "/healthz", {}), ("POST", hooks("org-a"), {"token": token, "body": GOOD}),
                                 ("GET", hooks("org-a"), {"token": token}),
                                 ("PATCH", hooks("org-a", hook_id), {"token": token, "body": {"name": "x"}}),
                                 ("GET", "/v1/registry", {"token": reg.proxy_token}), ("GET", "/healthz", {})]:
        answer, took = timed(reg, method, path, **kwargs)
        print(f"{method} {path}: {answer.status} in {took * 1000:.0f} ms")
        assert answer.status == 503, (method, path, answer)
        assert took < scaled(2.0), (method, path, took)
        if path == "/healthz":
            assert answer.json() == {"status": "unavailable"}
        else:
            assert_error_shape(answer, 503, "")


def test_healthz_says_ok_and_nothing_more(registry):
    create(registry)
    answer = registry.request("GET", "/healthz")
    assert answer.status == 200 and answer.json() == {"status": "ok"}, answer


def test_a_deleted_sqlite_file_makes_every_request_503_and_fails_the_health_check(make_registry):
    registry = make_registry()
    hook = create(registry)
    path = Path(registry.database.removeprefix("sqlite:"))
    for p in path.parent.glob(path.name + "*"):
        p.unlink()
    assert_unavailable_within_2s(registry, hook["id"])
    assert f"the database file {path} was deleted or replaced" in registry.log_text()
    # Replaced by another file (a restore from a backup while running, say): the same.
    path.write_bytes(b"")
    assert_unavailable_within_2s(registry, hook["id"])
    assert registry.proc.poll() is None


def test_a_stopped_postgres_answers_503_within_2s_and_recovers(make_registry):
    pg = Postgres()
    try:
        registry = make_registry("postgres", database=pg.new_database())
        hook = create(registry)
        pg.stop_server()
        assert_unavailable_within_2s(registry, hook["id"])
        assert "database unavailable" in registry.log_text()
        pg.start_server()
        wait_until(lambda: registry.request("GET", "/healthz").status == 200, 30, "the health check to recover")
        create(registry, name="after the outage")
        assert len(registry.feed().json()["webhooks"]) == 2
    finally:
        pg.stop()


# --------------------------------------------------------------------------------------------------------------
# Keys stored in the clear
# --------------------------------------------------------------------------------------------------------------


def run_sql(registry, request, sql: str) -> list:
    if registry.database.startswith("postgres"):
        out = request.getfixturevalue("postgres").psql(sql, database=registry.database.rsplit("/", 1)[1]).stdout
        return [tuple(line.split("|")) for line in out.splitlines()]
    with sqlite3.connect(registry.database.removeprefix("sqlite:")) as db:
        return db.execute(sql).fetchall()


def test_a_row_rewritten_to_a_plaintext_key_is_not_served_with_a_main_key(registry, request):
    kept = create(registry, name="kept")
    hook = create(registry, name="rewritten")
    planted = "whsec_" + base64.b64encode(b"k" * 32).decode()
    run_sql(registry, request, f"UPDATE webhooks SET key_sealed = 'plain:{planted}' WHERE id = '{hook['id']}'")
    feed = registry.feed().json()["webhooks"]
    assert [(w["id"], w["apiKeys"]) for w in feed] == [(kept["id"], [kept["apiKey"]])]
    log = registry.log_text()
    assert f"webhook {hook['id']}: the stored key is in the clear" in log and planted not in log
    # A previous key rewritten to plaintext is left out the same way (the webhook stays, with its current key).
    rotated = registry.request("POST", hooks("org-a", kept["id"], "rotate-key"), token=registry.token()).json()
    run_sql(registry, request, f"UPDATE webhooks SET previous_key_sealed = 'plain:{planted}' "
                               f"WHERE id = '{kept['id']}'")
    registry.request("PATCH", hooks("org-a", kept["id"]), token=registry.token(), body={"description": "bump"})
    assert [w["apiKeys"] for w in registry.feed().json()["webhooks"]] == [[rotated["apiKey"]]]


def test_moving_from_plaintext_keys_to_a_main_key_needs_the_sealing_flag(make_registry):
    demo = make_registry(plaintext=True)
    hook = create(demo)
    demo.stop()
    shared = dict(database=demo.database, jwt_secret=demo.jwt_secret, proxy_token=demo.proxy_token)
    refusing = make_registry(**shared)
    assert refusing.feed().json()["webhooks"] == []
    assert "--seal-plaintext-keys" in refusing.log_text()
    refusing.stop()
    sealing = make_registry(**shared, main_key=refusing.main_key, extra_args=["--seal-plaintext-keys"])
    assert [w["apiKeys"] for w in sealing.feed().json()["webhooks"]] == [[hook["apiKey"]]]
    assert f"sealed the plaintext key(s) of webhook {hook['id']}" in sealing.log_text()
    with sqlite3.connect(demo.database.removeprefix("sqlite:")) as db:
        (stored,) = db.execute("SELECT key_sealed FROM webhooks").fetchone()
        actions = [a for (a,) in db.execute("SELECT action FROM audit ORDER BY at_ms")]
    assert stored.startswith("aes256gcm:") and hook["apiKey"] not in stored
    assert actions == ["create", "seal-key"]
    sealing.stop()
    # Sealed once: a later start without the flag serves it too.
    after = make_registry(**shared, main_key=refusing.main_key)
    assert [w["apiKeys"] for w in after.feed().json()["webhooks"]] == [[hook["apiKey"]]]
    # The flag needs a main key.
    bad = RegistryService(demo.work_dir / "x", plaintext=True, start=False, extra_args=["--seal-plaintext-keys"])
    done = subprocess.run(bad.args, env=bad.env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "--seal-plaintext-keys needs --main-key-env" in done.stderr, done.stderr


# --------------------------------------------------------------------------------------------------------------
# Revoking a leaked previous key; the grace period, as configured
# --------------------------------------------------------------------------------------------------------------


def test_revoking_the_previous_key_ends_its_grace_at_once(registry, request):
    token = registry.token(sub="ann@example.com")
    hook = create(registry)
    assert registry.request("GET", hooks("org-a", hook["id"]), token=token).json()["previousKeyExpiresAt"] is None
    rotated = registry.request("POST", hooks("org-a", hook["id"], "rotate-key"), token=token).json()
    assert registry.request("GET", hooks("org-a", hook["id"]), token=token).json()["previousKeyExpiresAt"] == \
        rotated["previousKeyExpiresAt"]
    before = registry.feed().json()
    assert before["webhooks"][0]["apiKeys"] == [rotated["apiKey"], hook["apiKey"]]
    revoke = hooks("org-a", hook["id"], "revoke-previous-key")
    # Nobody else may.
    assert registry.request("POST", revoke).status == 401
    assert registry.request("POST", revoke, token=registry.token(org="org-b")).status == 403
    assert registry.request("POST", revoke, token=registry.token(role="viewer")).status == 403
    assert registry.request("POST", hooks("org-a", "0" * 24, "revoke-previous-key"), token=token).status == 404
    assert registry.request("GET", revoke, token=token).status == 405
    answer = registry.request("POST", revoke, token=token)
    assert answer.status == 200, answer
    assert answer.json()["previousKeyExpiresAt"] is None and b"whsec_" not in answer.body
    after = registry.feed().json()
    assert after["webhooks"][0]["apiKeys"] == [rotated["apiKey"]]
    assert "previousKeyExpiresAt" not in after["webhooks"][0]
    assert after["revision"] == before["revision"] + 1
    # Nothing left to revoke.
    assert_error_shape(registry.request("POST", revoke, token=token), 409, "")
    actions = [row[0] for row in run_sql(registry, request, "SELECT action, actor FROM audit ORDER BY at_ms")
               if not row[0].startswith("refused")]
    assert actions == ["create", "rotate-key", "revoke-previous-key"]
    assert (f'revoked the previous key of webhook {hook["id"]} of organisation "org-a" by "ann@example.com" '
            f'(organisation_admin)') in registry.log_text()


def test_settings_say_the_configured_grace(make_registry):
    registry = make_registry(extra_args=["--rotation-grace", "90m"])
    assert registry.request("GET", "/v1/settings").json() == {
        "eventTypes": ["job.completed", "job.failed"], "rotationGraceSeconds": 5400}


# --------------------------------------------------------------------------------------------------------------
# Refused requests and feed pulls leave a trace
# --------------------------------------------------------------------------------------------------------------


def test_refused_requests_are_logged_and_refused_writes_audited(registry, request):
    ann = registry.token(sub="ann@example.com")
    bob = registry.token(org="org-b", sub="bob@example.com")
    expired = registry.token(sub="eve", role="super_admin", ttl=-3600)
    hook = create(registry, token=ann)
    revision = registry.feed().json()["revision"]
    calls = [
        ("POST", hooks("org-a"), expired, GOOD, 401),
        ("DELETE", hooks("org-a", hook["id"]), bob, None, 403),
        ("GET", hooks("org-a"), bob, None, 403),
        ("POST", hooks("org-a"), ann, {**GOOD, "url": "https://10.0.0.1/", "name": ""}, 422),
        ("PATCH", hooks("org-a", hook["id"]), ann, {"status": "on"}, 422),
        ("POST", hooks("org-a", hook["id"], "revoke-previous-key"), ann, None, 409),
        ("DELETE", hooks("org-a", "0" * 24), ann, None, 404),
        ("POST", hooks("org-a"), ann, {**GOOD, "description": "d" * 70_000}, 413),
    ]
    for method, path, token, body, status in calls:
        assert registry.request(method, path, token=token, body=body).status == status, (method, path)
    log = registry.log_text()
    assert f'refused POST "/v1/organisations/org-a/webhooks": 401 "the token has expired"' in log
    assert (f'refused DELETE "/v1/organisations/org-a/webhooks/{hook["id"]}": 403 ') in log
    assert 'by "bob@example.com" (organisation_admin)' in log
    assert 'refused GET "/v1/organisations/org-a/webhooks": 403' in log
    assert 'refused POST "/v1/organisations/org-a/webhooks": 422 "invalid: name, url" by "ann@example.com"' in log
    assert 'refused POST "/v1/organisations/org-a/webhooks": 413' in log
    for secret in [ann, bob, expired, registry.proxy_token, registry.jwt_secret, hook["apiKey"]]:
        assert secret not in log
    # Refused writes by a known caller are audited (unauthenticated ones only logged); nothing changed.
    rows = run_sql(registry, request, "SELECT action, actor, organisation_id, webhook_id, detail FROM audit "
                                      "ORDER BY at_ms")
    refused = [(a, actor, org, id_, json.loads(detail)["status"]) for a, actor, org, id_, detail in rows
               if a.startswith("refused")]
    assert refused == [
        ("refused-delete", "bob@example.com", "org-a", hook["id"], 403),
        ("refused-create", "ann@example.com", "org-a", "", 422),
        ("refused-update", "ann@example.com", "org-a", hook["id"], 422),
        ("refused-revoke-previous-key", "ann@example.com", "org-a", hook["id"], 409),
        ("refused-delete", "ann@example.com", "org-a", "0" * 24, 404),
        ("refused-create", "ann@example.com", "org-a", "", 413),
    ], refused
    assert "eve" not in [row[1] for row in rows]
    assert registry.feed().json()["revision"] == revision


def test_feed_pulls_are_logged_once_per_revision(registry):
    def pulls():
        return registry.log_text().count("feed pulled at revision")

    first = registry.feed()
    assert pulls() == 1 and "feed pulled at revision 0: 200" in registry.log_text()
    for _ in range(5):
        assert registry.feed(first.headers["etag"]).status == 304
        assert registry.feed().status == 200
    assert pulls() == 1
    create(registry)
    assert registry.feed(first.headers["etag"]).status == 200
    assert registry.feed().status == 200
    assert pulls() == 2 and "feed pulled at revision 1: 200" in registry.log_text()
    assert registry.request("GET", "/v1/registry", token="wrong-token-0123456789").status == 401
    assert 'refused GET "/v1/registry": 401' in registry.log_text()
    assert registry.proxy_token not in registry.log_text() and "wrong-token" not in registry.log_text()


def test_a_frozen_postgres_answers_503_within_2s(make_registry):
    """A host that stops answering without closing its connections (SIGSTOP on this test's own cluster)."""
    pg = Postgres()
    frozen = []
    try:
        registry = make_registry("postgres", database=pg.new_database())
        hook = create(registry)
        postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(postmaster)], capture_output=True, text=True,
                                  check=True).stdout.split()
        for pid in [postmaster, *map(int, children)]:
            os.kill(pid, signal.SIGSTOP)
            frozen.append(pid)
        assert_unavailable_within_2s(registry, hook["id"])
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        pg.stop()
