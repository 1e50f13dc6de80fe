"""The registry's API against the real binary, on SQLite and on a real Postgres: roles, tokens, validation (the
filter's URL, SSRF and event-type rules), keys shown once and encrypted at rest, the audit table, the proxies' feed."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from harness.registry_service import WRITES_UNLIMITED, RegistryService, b64url, hs256_token
from harness.util import wait_until

GOOD = {"name": "Billing", "url": "https://hooks.example.com/webhooks", "description": "Invoices",
        "status": "enabled", "events": ["job.completed"]}


def hooks(org: str, id_: str = "", action: str = "") -> str:
    path = f"/v1/organisations/{org}/webhooks"
    if id_:
        path += f"/{id_}"
    if action:
        path += f"/{action}"
    return path


def create(reg, org="org-a", token=None, **fields) -> dict:
    answer = reg.request("POST", hooks(org), token=token or reg.token(org=org), body={**GOOD, **fields})
    assert answer.status == 201, answer
    return answer.json()


def error_paths(answer) -> list:
    return [e["path"] for e in answer.json()["errors"]]


# --------------------------------------------------------------------------------------------------------------
# Roles
# --------------------------------------------------------------------------------------------------------------


def every_call(reg, org: str, id_: str, token: str) -> dict:
    """Each endpoint once, as `token`, on `org` and its webhook `id_`."""
    return {
        "list": reg.request("GET", hooks(org), token=token).status,
        "get": reg.request("GET", hooks(org, id_), token=token).status,
        "create": reg.request("POST", hooks(org), token=token, body=GOOD).status,
        "update": reg.request("PATCH", hooks(org, id_), token=token, body={"name": "Renamed"}).status,
        "rotate": reg.request("POST", hooks(org, id_, "rotate-key"), token=token).status,
        "delete": reg.request("DELETE", hooks(org, id_), token=token).status,
    }


def test_organisation_admin_manages_its_own_organisation_only(registry):
    own = create(registry, "org-a")
    other = create(registry, "org-b", token=registry.token(role="super_admin", org="platform"))
    admin_a = registry.token(role="organisation_admin", org="org-a")
    assert every_call(registry, "org-a", own["id"], admin_a) == {
        "list": 200, "get": 200, "create": 201, "update": 200, "rotate": 200, "delete": 204}
    assert set(every_call(registry, "org-b", other["id"], admin_a).values()) == {403}
    # Its own organisation in the path does not reach another organisation's webhook either.
    assert registry.request("GET", hooks("org-a", other["id"]), token=admin_a).status == 404
    assert registry.request("DELETE", hooks("org-a", other["id"]), token=admin_a).status == 404
    assert registry.request("GET", hooks("org-b", other["id"]),
                            token=registry.token(role="super_admin", org="platform")).status == 200


def test_super_admin_manages_every_organisation(registry):
    root = registry.token(role="super_admin", org="platform")
    for org in ("platform", "org-a", "org-b"):
        hook = create(registry, org, token=root)
        assert every_call(registry, org, hook["id"], root) == {
            "list": 200, "get": 200, "create": 201, "update": 200, "rotate": 200, "delete": 204}


@pytest.mark.parametrize("role", ["viewer", "member", "", "Organisation_Admin", "super-admin"])
def test_other_roles_may_do_nothing(make_registry, role):
    reg = make_registry()
    hook = create(reg, "org-a")
    token = reg.token(role=role, org="org-a")
    answers = every_call(reg, "org-a", hook["id"], token)
    # An empty role is no role at all: the token itself is refused.
    assert set(answers.values()) == ({401} if role == "" else {403})


# --------------------------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------------------------


def bad_tokens(reg) -> dict:
    now = int(time.time())
    claims = {"sub": "eve", "role": "super_admin", "organisationId": "org-a", "exp": now + 3600}
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return {
        "expired": reg.token(role="super_admin", ttl=-3600),
        "forged": hs256_token("another-secret-of-the-same-length-xxxxxxx", claims),
        "alg none": f"{header}.{b64url(json.dumps(claims).encode())}.",
        "HS384": hs256_token(reg.jwt_secret, claims, header={"alg": "HS384", "typ": "JWT"}),
        "tampered": (lambda t: t.split(".")[0] + "." + b64url(json.dumps({**claims, "role": "super_admin",
                                                                          "organisationId": "x"}).encode())
                     + "." + t.split(".")[2])(reg.token(role="viewer")),
        "not yet valid": reg.token(role="super_admin", nbf=now + 3600),
        "no exp": hs256_token(reg.jwt_secret, {k: v for k, v in claims.items() if k != "exp"}),
        "no sub": hs256_token(reg.jwt_secret, {k: v for k, v in claims.items() if k != "sub"}),
        "no organisationId": hs256_token(reg.jwt_secret, {k: v for k, v in claims.items() if k != "organisationId"}),
        "no role": hs256_token(reg.jwt_secret, {k: v for k, v in claims.items() if k != "role"}),
        "garbage": "not-a-token",
    }


def test_missing_expired_and_forged_tokens_get_401(registry):
    hook = create(registry, "org-a")
    for name, token in bad_tokens(registry).items():
        for method, path, body in [("GET", hooks("org-a"), None), ("POST", hooks("org-a"), GOOD),
                                   ("PATCH", hooks("org-a", hook["id"]), {"status": "disabled"}),
                                   ("DELETE", hooks("org-a", hook["id"]), None)]:
            answer = registry.request(method, path, token=token, body=body)
            assert answer.status == 401, (name, method, answer)
            assert answer.headers.get("www-authenticate") == "Bearer"
            assert error_paths(answer) == ["authorization"]
    for headers in [{}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer"},
                    {"Authorization": b"Bearer \xff\xfe\xfd"}]:
        assert registry.request("GET", hooks("org-a"), headers=headers).status == 401, headers
    # Nothing changed.
    assert registry.request("GET", hooks("org-a", hook["id"]), token=registry.token()).json()["status"] == "enabled"


def openssl(*args, cwd: Path, input: bytes = None) -> bytes:
    return subprocess.run(["openssl", *args], cwd=cwd, input=input, capture_output=True, check=True).stdout


def der_ecdsa_to_raw(der: bytes) -> bytes:
    """ECDSA signature from DER (SEQUENCE of two INTEGERs) to JWS's r || s, 32 bytes each."""
    assert der[0] == 0x30
    i = 2 if der[1] < 0x80 else 2 + (der[1] & 0x7F)
    out = b""
    for _ in range(2):
        assert der[i] == 0x02
        n = der[i + 1]
        out += der[i + 2:i + 2 + n].lstrip(b"\x00").rjust(32, b"\x00")
        i += 2 + n
    return out


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_identity_provider_public_keys(make_registry, tmp_path, alg):
    """--jwt-public-key: tokens signed by an identity provider's private key (made here with openssl)."""
    if alg == "RS256":
        openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "idp.pem", cwd=tmp_path)
    else:
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "idp.pem", cwd=tmp_path)
    openssl("pkey", "-in", "idp.pem", "-pubout", "-out", "idp.pub", cwd=tmp_path)
    reg = make_registry(extra_args=["--jwt-public-key", str(tmp_path / "idp.pub")], start=False)
    i = reg.args.index("--jwt-secret-env")
    del reg.args[i:i + 2]
    reg.start()

    def sign(claims: dict) -> str:
        head = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
        signing_input = f"{head}.{b64url(json.dumps(claims).encode())}"
        signature = openssl("dgst", "-sha256", "-sign", "idp.pem", cwd=tmp_path, input=signing_input.encode())
        if alg == "ES256":
            signature = der_ecdsa_to_raw(signature)
        return f"{signing_input}.{b64url(signature)}"

    claims = {"sub": "idp-user", "role": "organisation_admin", "organisationId": "org-a",
              "exp": int(time.time()) + 600}
    assert reg.request("GET", hooks("org-a"), token=sign(claims)).status == 200
    assert reg.request("GET", hooks("org-b"), token=sign(claims)).status == 403
    assert reg.request("GET", hooks("org-a"), token=sign({**claims, "exp": int(time.time()) - 600})).status == 401
    # An HS256 token made with the public key as its secret (the classic algorithm confusion) is refused.
    confused = hs256_token((tmp_path / "idp.pub").read_text(), claims)
    assert reg.request("GET", hooks("org-a"), token=confused).status == 401


def test_audience_and_issuer_when_required(make_registry):
    reg = make_registry(extra_args=["--jwt-audience", "webhook-registry", "--jwt-issuer", "https://idp.example.com"])
    good = {"aud": "webhook-registry", "iss": "https://idp.example.com"}
    assert reg.request("GET", hooks("org-a"), token=reg.token(**good)).status == 200
    for claims in [{}, {**good, "aud": "another-service"}, {**good, "iss": "https://evil.example.com"},
                   {"aud": "webhook-registry"}, {"iss": "https://idp.example.com"}]:
        assert reg.request("GET", hooks("org-a"), token=reg.token(**claims)).status == 401, claims


# --------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------

SSRF_URLS = [
    "https://127.0.0.1/hook", "https://127.1/hook", "https://0x7f.1/hook", "https://2130706433/hook",
    "https://localhost/hook", "https://api.localhost/hook", "https://[::1]/hook", "https://[::ffff:127.0.0.1]/hook",
    "https://10.1.2.3/hook", "https://172.16.0.1/hook", "https://192.168.1.1/hook", "https://169.254.169.254/latest",
    "https://[fe80::1]/hook", "https://[fd00::1]/hook", "https://0.0.0.0/hook", "https://100.64.0.1/hook",
]

BAD_FIELDS = [
    ("name", "", "name"), ("name", "   ", "name"), ("name", "x" * 201, "name"), ("name", 7, "name"),
    ("name", None, "name"), ("name", "a\nb", "name"),
    ("url", "http://hooks.example.com/", "url"), ("url", "hooks.example.com/x", "url"),
    ("url", "ftp://hooks.example.com/", "url"), ("url", "https://user:pw@hooks.example.com/", "url"),
    ("url", "https://hooks.example.com/a b", "url"), ("url", "https://hooks.example.com/#x", "url"),
    ("url", "https:///nohost", "url"), ("url", "https://hooks.example.com:99999/", "url"),
    ("url", "https://" + "a" * 2050 + ".com/", "url"), ("url", ["https://a.example.com"], "url"),
    ("description", 3, "description"), ("description", "d" * 2001, "description"),
    ("status", "on", "status"), ("status", True, "status"), ("status", "", "status"),
    ("events", [], "events"), ("events", "job.completed", "events"), ("events", ["job.started"], "events[0]"),
    ("events", ["Job.Completed"], "events[0]"), ("events", ["job"], "events[0]"), ("events", [1], "events[0]"),
    ("events", ["job.completed", "job.completed"], "events[1]"),
] + [("url", url, "url") for url in SSRF_URLS]


def test_every_invalid_field_is_named(make_registry, backend):
    registry = make_registry(backend, loopback_webhooks=False, extra_args=WRITES_UNLIMITED)
    token = registry.token()
    hook = create(registry)
    for field, value, path in BAD_FIELDS:
        answer = registry.request("POST", hooks("org-a"), token=token, body={**GOOD, field: value})
        assert answer.status == 422, (field, value, answer)
        assert error_paths(answer) == [path], (field, value, answer)
        answer = registry.request("PATCH", hooks("org-a", hook["id"]), token=token, body={field: value})
        assert answer.status == 422, (field, value, answer)
        assert error_paths(answer) == [path], (field, value, answer)
    # All at once: every field named, in one answer.
    answer = registry.request("POST", hooks("org-a"), token=token,
                              body={"name": "", "url": "https://10.0.0.1/", "description": 1, "status": "x",
                                    "events": ["nope.nope"], "apiKey": "whsec_AAAA"})
    assert sorted(error_paths(answer)) == ["apiKey", "description", "events[0]", "name", "status", "url"]
    for body in [b"", b"{", b"[]", b"\"text\"", b"\xff\xfe{}", b"null"]:
        answer = registry.request("POST", hooks("org-a"), token=token, body=body)
        assert answer.status == 422 and error_paths(answer) == [""], (body, answer)
    assert sorted(error_paths(registry.request("POST", hooks("org-a"), token=token, body={}))) == [
        "events", "name", "url"]
    assert error_paths(registry.request("PATCH", hooks("org-a", hook["id"]), token=token, body={})) == [""]
    # Nothing invalid was stored, and the webhook is as it was.
    listed = registry.request("GET", hooks("org-a"), token=token).json()["webhooks"]
    assert [w["id"] for w in listed] == [hook["id"]]
    assert {k: listed[0][k] for k in GOOD} == GOOD
    assert registry.request("POST", hooks("org-a"), token=token, body=b"{" * 70_000).status == 413


def test_loopback_urls_only_with_the_flags(make_registry):
    strict = make_registry(loopback_webhooks=False)
    answer = strict.request("POST", hooks("org-a"), token=strict.token(),
                            body={**GOOD, "url": "http://127.0.0.1:8080/hook"})
    assert answer.status == 422
    assert [e["message"] for e in answer.json()["errors"]] == ["must be an https URL"]
    relaxed = make_registry()
    assert relaxed.request("POST", hooks("org-a"), token=relaxed.token(),
                           body={**GOOD, "url": "http://127.0.0.1:8080/hook"}).status == 201


def test_unknown_ids_are_404(registry):
    token = registry.token(role="super_admin", org="platform")
    hook = create(registry, "org-a")
    for id_ in ["0" * 24, "nothex", hook["id"].upper(), hook["id"] + "0"]:
        assert registry.request("GET", hooks("org-a", id_), token=token).status == 404
        assert registry.request("PATCH", hooks("org-a", id_), token=token, body={"name": "x"}).status == 404
        assert registry.request("POST", hooks("org-a", id_, "rotate-key"), token=token).status == 404
        assert registry.request("DELETE", hooks("org-a", id_), token=token).status == 404
    # Another organisation's id.
    assert registry.request("GET", hooks("org-b", hook["id"]), token=token).status == 404
    assert registry.request("DELETE", hooks("org-a", hook["id"]), token=token).status == 204
    assert registry.request("DELETE", hooks("org-a", hook["id"]), token=token).status == 404
    assert registry.request("GET", "/v1/nothing", token=token).status == 404


# --------------------------------------------------------------------------------------------------------------
# The key: shown once, encrypted at rest, never logged
# --------------------------------------------------------------------------------------------------------------


def key_forms(key: str) -> list:
    secret = base64.b64decode(key.removeprefix("whsec_"))
    return [key.encode(), key.removeprefix("whsec_").encode(), secret, secret.hex().encode()]


def test_the_key_is_shown_only_on_creation_and_rotation(registry):
    token = registry.token()
    created = create(registry)
    key = created["apiKey"]
    assert key.startswith("whsec_") and len(base64.b64decode(key[6:])) >= 24
    assert len(created["id"]) == 24 and all(c in "0123456789abcdef" for c in created["id"])
    assert {k: created[k] for k in GOOD} == GOOD
    answers = [
        registry.request("GET", hooks("org-a"), token=token),
        registry.request("GET", hooks("org-a", created["id"]), token=token),
        registry.request("PATCH", hooks("org-a", created["id"]), token=token, body={"description": "new"}),
    ]
    for answer in answers:
        assert answer.status == 200
        assert b"apiKey" not in answer.body and key.encode() not in answer.body
        assert answer.headers["cache-control"] == "no-store"
    rotated = registry.request("POST", hooks("org-a", created["id"], "rotate-key"), token=token)
    assert rotated.status == 200
    new_key = rotated.json()["apiKey"]
    assert new_key != key and new_key.startswith("whsec_")
    for answer in [registry.request("GET", hooks("org-a"), token=token),
                   registry.request("GET", hooks("org-a", created["id"]), token=token)]:
        assert b"apiKey" not in answer.body and new_key.encode() not in answer.body and key.encode() not in answer.body
    # A second create gets a different key and id.
    second = create(registry)
    assert second["apiKey"] not in (key, new_key) and second["id"] != created["id"]


def test_keys_are_encrypted_at_rest_and_never_logged(registry, postgres_if_used):
    token = registry.token()
    keys = []
    for i in range(3):
        hook = create(registry, name=f"hook {i}")
        keys.append(hook["apiKey"])
        rotated = registry.request("POST", hooks("org-a", hook["id"], "rotate-key"), token=token).json()
        keys.append(rotated["apiKey"])
    feed = registry.feed().json()
    assert sorted(k for w in feed["webhooks"] for k in w["apiKeys"]) == sorted(keys)
    stored = stored_bytes(registry, postgres_if_used)
    assert sum(map(len, stored)) > 10_000
    # The sealed keys are there (so the scan looks at the right files), the keys themselves are not.
    assert any(b"aes256gcm:" in data for data in stored)
    for key in keys:
        for form in key_forms(key):
            assert not any(form in data for data in stored), "a key is in the database in the clear"
            assert form.decode(errors="replace") not in registry.log_text()
    audit = audit_rows(registry, postgres_if_used)
    assert [row[0] for row in audit] == ["create", "rotate-key"] * 3
    assert all(row[1] == "tester" for row in audit)


@pytest.fixture
def postgres_if_used(registry, request):
    return request.getfixturevalue("postgres") if registry.database.startswith("postgres") else None


def stored_bytes(registry, pg) -> list:
    """Every byte the database keeps on disk, file by file: the SQLite file with its WAL, or every file of the
    Postgres data directory after a checkpoint (tables, WAL, everything)."""
    if pg is None:
        path = Path(registry.database.removeprefix("sqlite:"))
        return [p.read_bytes() for p in path.parent.glob(path.name + "*")]
    pg.psql("CHECKPOINT")
    files = []
    for p in pg.data.rglob("*"):
        if p.is_file():
            try:
                files.append(p.read_bytes())
            except OSError:
                pass
    return files


def audit_rows(registry, pg) -> list:
    sql = "SELECT action, actor, role, organisation_id, webhook_id, detail FROM audit ORDER BY at_ms"
    if pg is None:
        with sqlite3.connect(registry.database.removeprefix("sqlite:")) as db:
            return db.execute(sql).fetchall()
    database = registry.database.rsplit("/", 1)[1]
    lines = pg.psql(sql, database=database).stdout.splitlines()
    return [tuple(line.split("|", 5)) for line in lines]


def test_every_change_is_audited(registry, postgres_if_used):
    root = registry.token(role="super_admin", org="platform", sub="root@example.com")
    hook = create(registry, "org-b", token=root)
    registry.request("PATCH", hooks("org-b", hook["id"]), token=root, body={"status": "disabled"})
    registry.request("POST", hooks("org-b", hook["id"], "rotate-key"), token=root)
    registry.request("DELETE", hooks("org-b", hook["id"]), token=root)
    # Refused and invalid requests change nothing and are not audited as changes (but as refusals).
    registry.request("DELETE", hooks("org-b", hook["id"]), token=registry.token(org="org-a"))
    registry.request("POST", hooks("org-b"), token=root, body={**GOOD, "url": "nope"})
    rows = [r for r in audit_rows(registry, postgres_if_used) if not r[0].startswith("refused-")]
    assert [r[0] for r in rows] == ["create", "update", "rotate-key", "delete"]
    assert all(r[1:5] == ("root@example.com", "super_admin", "org-b", hook["id"]) for r in rows)
    assert json.loads(rows[1][5]) == {"status": "disabled"}
    assert "whsec_" not in "".join(r[5] for r in rows)
    log = registry.log_text()
    for verb in ["created", "updated", "rotated the key of", "deleted"]:
        assert f'{verb} webhook {hook["id"]} of organisation "org-b" by "root@example.com" (super_admin)' in log


# --------------------------------------------------------------------------------------------------------------
# The proxies' feed
# --------------------------------------------------------------------------------------------------------------


def test_the_feed_needs_the_proxy_token(registry):
    create(registry)
    assert registry.request("GET", "/v1/registry").status == 401
    assert registry.request("GET", "/v1/registry", token=registry.proxy_token + "x").status == 401
    assert registry.request("GET", "/v1/registry", token=registry.token(role="super_admin")).status == 401
    answer = registry.feed()
    assert answer.status == 200 and len(answer.json()["webhooks"]) == 1


def test_the_feed_has_every_webhook_with_its_keys_and_an_etag(registry):
    root = registry.token(role="super_admin", org="platform")
    first = registry.feed()
    assert first.json() == {"revision": 0, "webhooks": []}
    etag = first.headers["etag"]
    assert registry.feed(etag).status == 304
    a = create(registry, "org-a", events=["job.completed", "job.failed"])
    b = create(registry, "org-b", token=root, status="disabled", description="")
    answer = registry.feed(etag)
    assert answer.status == 200 and answer.headers["etag"] != etag
    document = answer.json()
    assert document["revision"] == 2
    by_id = {w["id"]: w for w in document["webhooks"]}
    assert by_id[a["id"]] == {"id": a["id"], "organisationId": "org-a", "name": "Billing", "url": GOOD["url"],
                              "description": "Invoices", "status": "enabled",
                              "events": ["job.completed", "job.failed"], "apiKeys": [a["apiKey"]]}
    assert by_id[b["id"]]["status"] == "disabled" and by_id[b["id"]]["apiKeys"] == [b["apiKey"]]
    etag = answer.headers["etag"]
    assert registry.feed(etag).status == 304
    assert registry.feed(f'"other", {etag}').status == 304
    assert registry.feed(f"W/{etag}").status == 304
    assert registry.feed('"0-0000"').status == 200
    # Rotation: both keys, the new one first, until the previous key expires (24 h by default).
    rotated = registry.request("POST", hooks("org-a", a["id"], "rotate-key"), token=root).json()
    answer = registry.feed(etag)
    assert answer.status == 200
    entry = {w["id"]: w for w in answer.json()["webhooks"]}[a["id"]]
    assert entry["apiKeys"] == [rotated["apiKey"], a["apiKey"]]
    assert abs(entry["previousKeyExpiresAt"] - (time.time() + 86_400)) < 120
    # A second rotation keeps only the key it replaces.
    again = registry.request("POST", hooks("org-a", a["id"], "rotate-key"), token=root).json()
    entry = {w["id"]: w for w in registry.feed().json()["webhooks"]}[a["id"]]
    assert entry["apiKeys"] == [again["apiKey"], rotated["apiKey"]]
    # Disable and delete reach the feed.
    registry.request("PATCH", hooks("org-a", a["id"]), token=root, body={"status": "disabled"})
    assert {w["id"]: w for w in registry.feed().json()["webhooks"]}[a["id"]]["status"] == "disabled"
    registry.request("DELETE", hooks("org-b", b["id"]), token=root)
    document = registry.feed().json()
    assert [w["id"] for w in document["webhooks"]] == [a["id"]] and document["revision"] == 6


def test_the_previous_key_leaves_the_feed_when_it_expires(make_registry, backend):
    registry = make_registry(backend, extra_args=["--rotation-grace", "2s"])
    hook = create(registry)
    rotated = registry.request("POST", hooks("org-a", hook["id"], "rotate-key"), token=registry.token()).json()
    answer = registry.feed()
    assert answer.json()["webhooks"][0]["apiKeys"] == [rotated["apiKey"], hook["apiKey"]]
    etag, revision = answer.headers["etag"], answer.json()["revision"]

    def expired():
        a = registry.feed(etag)
        return a if a.status == 200 else None

    answer = wait_until(expired, 15, "the previous key to expire", interval=0.2)
    entry = answer.json()["webhooks"][0]
    assert entry["apiKeys"] == [rotated["apiKey"]] and "previousKeyExpiresAt" not in entry
    # No write happened: same revision, new ETag.
    assert answer.json()["revision"] == revision and answer.headers["etag"] != etag


# --------------------------------------------------------------------------------------------------------------
# Restarts, replicas, start-up checks
# --------------------------------------------------------------------------------------------------------------


def test_a_restart_keeps_webhooks_and_keys(make_registry, backend):
    first = make_registry(backend)
    hook = create(first)
    first.stop()
    second = make_registry(database=first.database, main_key=first.main_key, jwt_secret=first.jwt_secret,
                           proxy_token=first.proxy_token)
    assert second.feed().json()["webhooks"][0]["apiKeys"] == [hook["apiKey"]]
    second.stop()
    # Another main key cannot open the keys: the webhook is left out of the feed, and the log says why.
    third = make_registry(database=first.database, proxy_token=first.proxy_token)
    assert third.feed().json()["webhooks"] == []
    assert "does not open with this main key" in third.log_text()
    assert hook["apiKey"] not in third.log_text()


def test_two_replicas_share_one_postgres(make_registry, postgres):
    database = postgres.new_database()
    a = make_registry("postgres", database=database)
    b = make_registry("postgres", database=database, main_key=a.main_key, jwt_secret=a.jwt_secret,
                      proxy_token=a.proxy_token)
    hook = create(a)
    assert b.request("GET", hooks("org-a", hook["id"]), token=b.token()).status == 200
    assert b.feed().json() == a.feed().json()
    assert b.feed().headers["etag"] == a.feed().headers["etag"]
    rotated = b.request("POST", hooks("org-a", hook["id"], "rotate-key"), token=b.token()).json()
    assert a.feed().json()["webhooks"][0]["apiKeys"] == [rotated["apiKey"], hook["apiKey"]]


def test_replicas_starting_together_on_a_fresh_postgres(make_registry, postgres):
    """Each creates the tables if they are missing; started at once, none fails on the others' work."""
    import threading
    database = postgres.new_database()
    first = make_registry("postgres", database=database, start=False)
    replicas = [first] + [make_registry("postgres", database=database, main_key=first.main_key, start=False,
                                        jwt_secret=first.jwt_secret, proxy_token=first.proxy_token)
                          for _ in range(3)]
    errors = []

    def start(r):
        try:
            r.start()
        except AssertionError as e:
            errors.append(e)

    threads = [threading.Thread(target=start, args=(r,)) for r in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    hook = create(replicas[0])
    assert all(r.feed().json()["webhooks"][0]["id"] == hook["id"] for r in replicas)


@pytest.mark.parametrize("change, message", [
    (lambda r: r.env.__setitem__("REGISTRY_TEST_MAIN_KEY", base64.b64encode(b"short").decode()),
     "the main key must be base64 of 32 bytes (it decodes to 5 bytes)"),
    (lambda r: r.env.pop("REGISTRY_TEST_MAIN_KEY"),
     "--main-key-env: environment variable REGISTRY_TEST_MAIN_KEY is not set"),
    (lambda r: r.env.__setitem__("REGISTRY_TEST_JWT_SECRET", "too-short"),
     "the HS256 secret must be at least 32 bytes"),
    (lambda r: r.env.__setitem__("REGISTRY_TEST_PROXY_TOKEN", "short"),
     "the proxy token must be at least 16 characters"),
    (lambda r: r.args.extend(["--insecure-plaintext-keys"]), "not both"),
    (lambda r: r.args.extend(["--event-types", "job.completed,Job"]), "--event-types"),
    (lambda r: r.args.__setitem__(r.args.index("--database") + 1, "sqlite::memory:"), "in-memory"),
    (lambda r: r.args.__setitem__(r.args.index("--database") + 1, "mysql://x"), "must be sqlite:PATH or postgres://"),
    (lambda r: r.args.extend(["--rotation-grace", "48h"]), "--rotation-grace"),
])
def test_bad_start_up_settings_are_refused(tmp_path, change, message):
    reg = RegistryService(tmp_path, start=False)
    change(reg)
    done = subprocess.run(reg.args, env=reg.env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr
    assert reg.main_key not in done.stderr


def test_without_a_main_key_the_registry_refuses_to_start(tmp_path):
    reg = RegistryService(tmp_path, start=False)
    i = reg.args.index("--main-key-env")
    del reg.args[i:i + 2]
    done = subprocess.run(reg.args, env=reg.env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "--main-key-env NAME is required" in done.stderr


def test_plaintext_keys_are_an_explicit_demo_mode(make_registry):
    reg = make_registry(plaintext=True)
    hook = create(reg)
    assert "WARNING: --insecure-plaintext-keys" in reg.log_text()
    assert "keys NOT encrypted" in reg.log_text()
    assert hook["apiKey"].encode() in Path(reg.database.removeprefix("sqlite:")).read_bytes() + b"".join(
        p.read_bytes() for p in Path(reg.database.removeprefix("sqlite:")).parent.glob("registry.db-wal"))
    assert reg.feed().json()["webhooks"][0]["apiKeys"] == [hook["apiKey"]]


def test_token_command(tmp_path, binary):
    env = {**os.environ, "DEMO_SECRET": "0123456789abcdef0123456789abcdef"}
    done = subprocess.run([str(binary), "registry", "token", "--jwt-secret-env", "DEMO_SECRET",
                           "--role", "organisation_admin", "--org", "org-a", "--sub", "ann", "--ttl", "15m"],
                          env=env, capture_output=True, text=True, check=True)
    token = done.stdout.strip()
    head, body, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    assert claims["sub"] == "ann" and claims["role"] == "organisation_admin" and claims["organisationId"] == "org-a"
    assert abs(claims["exp"] - (time.time() + 900)) < 60
    assert json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))["alg"] == "HS256" and signature
    reg = RegistryService(tmp_path, jwt_secret="0123456789abcdef0123456789abcdef")
    try:
        assert reg.request("GET", hooks("org-a"), token=token).status == 200
        assert reg.request("GET", hooks("org-b"), token=token).status == 403
    finally:
        reg.stop()
    bad = subprocess.run([str(binary), "registry", "token", "--jwt-secret-env", "UNSET_SECRET_VAR", "--role", "x",
                          "--org", "o"], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "UNSET_SECRET_VAR is not set" in bad.stderr


def test_dashboard_is_served_with_a_strict_policy(registry):
    for path, kind in [("/", "text/html"), ("/dashboard.js", "text/javascript"), ("/dashboard.css", "text/css")]:
        answer = registry.request("GET", path)
        assert answer.status == 200 and answer.headers["content-type"].startswith(kind)
        assert "script-src 'self'" in answer.headers["content-security-policy"]
        assert answer.headers["x-content-type-options"] == "nosniff"
    page = registry.request("GET", "/").body.decode()
    assert '<label for="token">' in page and 'id="create"' in page
    assert registry.request("GET", "/v1/event-types").json() == {"eventTypes": ["job.completed", "job.failed"]}
    assert registry.request("GET", "/healthz").json()["status"] == "ok"
