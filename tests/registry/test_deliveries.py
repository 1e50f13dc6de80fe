"""The delivery log against the real registry, on SQLite and on a real Postgres: reports stored and listed with
their attempts, status filters and paging, resend / recover / test queued as sends, claims leased, renewed by
`holding`, claimable again after the lease and completed by a final report, the rights on every new endpoint,
retention, the bound per organisation, auto-disable, and the bounds on requests and answers
(docs/delivery-reports.md)."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time

import pytest

from harness.util import wait_until

ORG = "org-a"
WEBHOOK = {"name": "Billing", "url": "https://hooks.example.com/webhooks", "description": "",
           "status": "enabled", "events": ["job.completed", "job.failed"]}


def hooks(org: str, id_: str = "", *rest: str) -> str:
    path = f"/v1/organisations/{org}/webhooks"
    if id_:
        path += f"/{id_}"
    for part in rest:
        path += f"/{part}"
    return path


def create(reg, org=ORG, **fields) -> dict:
    answer = reg.request("POST", hooks(org), token=reg.token(org=org), body={**WEBHOOK, **fields})
    assert answer.status == 201, answer
    return answer.json()


def new_id() -> str:
    return os.urandom(12).hex()


def now_ms() -> int:
    return int(time.time() * 1000)


def envelope(event_id: str, org: str = ORG, event_type: str = "job.completed", job: str = "j1") -> list:
    head = json.dumps({"id": event_id}, separators=(",", ":"))[:-1] + ',"webhookId":'
    tail = ',' + json.dumps({"organisationId": org, "eventType": event_type, "dateTime": "2026-01-01T00:00:00Z",
                             "data": {"object": {"id": job, "objectType": "job"}}, "version": 1},
                            separators=(",", ":"))[1:]
    return [head, tail]


def event(event_id: str, org: str = ORG, created: int | None = None, **kw) -> dict:
    return {"eventId": event_id, "organisationId": org, "eventType": "job.completed",
            "createdAt": created if created is not None else now_ms(), "envelope": envelope(event_id, org, **kw)}


def attempt(event_id: str, webhook_id: str, n: int, outcome: str, at: int | None = None, org: str = ORG,
            status: int | None = None, error: str | None = None, **extra) -> dict:
    a = {"eventId": event_id, "webhookId": webhook_id, "organisationId": org, "eventType": "job.completed",
         "attempt": n, "at": at if at is not None else now_ms(), "outcome": outcome, **extra}
    if status is not None:
        a["status"], a["latencyMs"] = status, 12
    if error is not None:
        a["error"], a["latencyMs"] = error, 10000
    return a


def report(reg, events=(), attempts=(), holding=(), proxy="envoy-1/worker-0", expect=204):
    answer = reg.request("POST", "/v2/registry/reports", token=reg.proxy_token,
                         body={"proxy": proxy, "events": list(events), "attempts": list(attempts),
                               "holding": list(holding)})
    assert answer.status == expect, answer
    return answer


def claim(reg, proxy="envoy-1/worker-0", most=16) -> list:
    answer = reg.request("POST", "/v2/registry/sends/claim", token=reg.proxy_token,
                         body={"proxy": proxy, "max": most})
    assert answer.status == 200, answer
    assert answer.json()["leaseMs"] > 0
    return answer.json()["sends"]


def deliveries(reg, webhook_id, org=ORG, query="", token=None) -> dict:
    answer = reg.request("GET", hooks(org, webhook_id, "deliveries") + query, token=token or reg.token(org=org))
    assert answer.status == 200, answer
    return answer.json()


def failed_for_good(event_id, webhook_id, at) -> list:
    return [attempt(event_id, webhook_id, 1, "retrying", at=at, status=503),
            attempt(event_id, webhook_id, 2, "failed", at=at + 1, status=503)]


# --------------------------------------------------------------------------------------------------------------
# Reports stored and listed
# --------------------------------------------------------------------------------------------------------------


def test_reports_are_stored_and_listed_with_their_attempts(registry):
    hook = create(registry)
    other = create(registry, name="Other")
    failed, delivered, dropped = new_id(), new_id(), new_id()
    t = now_ms() - 60_000
    report(registry,
           events=[event(failed, created=t), event(delivered, created=t + 1000), event(dropped, created=t + 2000)],
           attempts=[attempt(failed, hook["id"], 1, "retrying", at=t + 5, status=503),
                     attempt(failed, hook["id"], 2, "failed", at=t + 500, error="timeout"),
                     attempt(delivered, hook["id"], 1, "delivered", at=t + 1005, status=204),
                     attempt(delivered, other["id"], 1, "delivered", at=t + 1006, status=200),
                     attempt(dropped, hook["id"], 0, "dropped", at=t + 2001, reason="queue_full")])
    listed = deliveries(registry, hook["id"])
    assert [d["eventId"] for d in listed["deliveries"]] == [dropped, delivered, failed], "newest first"
    assert listed["next"] is None
    by_id = {d["eventId"]: d for d in listed["deliveries"]}
    assert by_id[failed]["status"] == "failed" and by_id[delivered]["status"] == "delivered"
    assert by_id[dropped]["status"] == "failed"
    assert by_id[failed]["attempts"] == [
        {"attempt": 1, "at": by_id[failed]["attempts"][0]["at"], "outcome": "retrying", "status": 503, "latencyMs": 12},
        {"attempt": 2, "at": by_id[failed]["attempts"][1]["at"], "outcome": "failed", "error": "timeout",
         "latencyMs": 10000}]
    assert by_id[failed]["attemptCount"] == 2 and by_id[failed]["lastError"] == "timeout"
    assert by_id[dropped]["attempts"][0]["reason"] == "queue_full" and by_id[dropped]["attemptCount"] == 0
    assert by_id[delivered]["lastStatus"] == 204
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", by_id[failed]["createdAt"])
    assert [d["eventId"] for d in deliveries(registry, other["id"])["deliveries"]] == [delivered]

    detail = registry.request("GET", hooks(ORG, hook["id"], "deliveries", failed), token=registry.token())
    assert detail.status == 200, detail
    head, tail = envelope(failed)
    assert detail.json()["payload"] == head + json.dumps(hook["id"]) + tail, "the payload as sent to this webhook"
    assert len(detail.json()["attempts"]) == 2
    # The same event reported again (another batch) is stored once; its attempts add up.
    report(registry, events=[event(failed, created=t)],
           attempts=[attempt(failed, hook["id"], 3, "retrying", at=t + 100, status=502)])
    again = registry.request("GET", hooks(ORG, hook["id"], "deliveries", failed), token=registry.token()).json()
    assert again["status"] == "failed", "a late retry report does not undo a later final outcome"
    assert [a["attempt"] for a in again["attempts"]] == [1, 3, 2] and again["attemptCount"] == 3
    missing = registry.request("GET", hooks(ORG, hook["id"], "deliveries", new_id()), token=registry.token())
    assert missing.status == 404 and missing.json()["errors"][0]["message"] == "no such delivery"


def test_status_filters_and_paging(registry):
    hook = create(registry)
    t = now_ms() - 3_600_000
    ids, attempts, events = [], [], []
    for i in range(23):
        eid = new_id()
        ids.append(eid)
        events.append(event(eid, created=t + i * 1000))
        outcome, status = [("delivered", 200), ("failed", 410), ("retrying", 503)][i % 3]
        attempts.append(attempt(eid, hook["id"], 1, outcome, at=t + i * 1000 + 10, status=status))
    report(registry, events=events, attempts=attempts)
    seen, cursor, pages = [], "", 0
    while True:
        page = deliveries(registry, hook["id"], query=f"?limit=5&cursor={cursor}")
        seen += [d["eventId"] for d in page["deliveries"]]
        pages += 1
        assert len(page["deliveries"]) <= 5
        if not page["next"]:
            break
        cursor = page["next"]
    assert seen == list(reversed(ids)) and pages == 5, "every delivery once, newest first"
    for status, index in (("delivered", 0), ("failed", 1), ("pending", 2)):
        listed = deliveries(registry, hook["id"], query=f"?status={status}&limit=100")["deliveries"]
        assert [d["eventId"] for d in listed] == [ids[i] for i in reversed(range(23)) if i % 3 == index]
        assert {d["status"] for d in listed} == {status}
    failed_pages = deliveries(registry, hook["id"], query="?status=failed&limit=3")
    second = deliveries(registry, hook["id"], query=f"?status=failed&limit=3&cursor={failed_pages['next']}")
    assert [d["status"] for d in second["deliveries"]] == ["failed"] * 3
    for query, path in (("?status=lost", "status"), ("?cursor=bm9wZQ", "cursor"), ("?limit=101", "limit"),
                        ("?limit=0", "limit"), ("?colour=red", "colour")):
        answer = registry.request("GET", hooks(ORG, hook["id"], "deliveries") + query, token=registry.token())
        assert answer.status == 422 and answer.json()["errors"][0]["path"] == path, (query, answer)


# --------------------------------------------------------------------------------------------------------------
# Sends: resend, recover, test, claims
# --------------------------------------------------------------------------------------------------------------


def test_resend_recover_and_test_are_queued_for_a_proxy(registry):
    hook = create(registry)
    t = now_ms() - 600_000
    failed = [new_id() for _ in range(4)]
    early, delivered = new_id(), new_id()
    events = [event(e, created=t + i * 1000) for i, e in enumerate(failed)]
    events += [event(early, created=t - 100_000), event(delivered, created=t + 10_000)]
    attempts = [a for i, e in enumerate(failed) for a in failed_for_good(e, hook["id"], t + i * 1000 + 5)]
    attempts += failed_for_good(early, hook["id"], t - 99_000)
    attempts += [attempt(delivered, hook["id"], 1, "delivered", at=t + 10_005, status=200)]
    report(registry, events=events, attempts=attempts)
    assert claim(registry) == []

    resend = registry.request("POST", hooks(ORG, hook["id"], "deliveries", delivered, "resend"),
                              token=registry.token())
    assert resend.status == 202 and resend.json()["queued"] == 1, resend
    [sent] = claim(registry)
    head, tail = envelope(delivered)
    assert sent["kind"] == "resend" and sent["eventId"] == delivered and sent["webhookId"] == hook["id"]
    assert sent["organisationId"] == ORG and sent["eventType"] == "job.completed"
    assert sent["body"] == head + json.dumps(hook["id"]) + tail, "the envelope as first sent"
    assert deliveries(registry, hook["id"], query="?status=pending")["deliveries"][0]["eventId"] == delivered

    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime((t - 1000) / 1000))
    recover = registry.request("POST", hooks(ORG, hook["id"], "recover"), token=registry.token(),
                               body={"since": since})
    assert recover.status == 202 and recover.json() == {"queued": 4, "more": False, "notKept": 0}, recover
    sends = claim(registry)
    assert sorted(s["eventId"] for s in sends) == sorted(failed), "every failure since then, not the earlier one"
    assert {s["kind"] for s in sends} == {"recover"}
    # They are pending now: a second recover queues nothing twice.
    again = registry.request("POST", hooks(ORG, hook["id"], "recover"), token=registry.token(), body={"since": since})
    assert again.json()["queued"] == 0
    for body, path in (({"since": "yesterday"}, "since"), ({}, "since"), ({"since": 5}, "since"),
                       ({"since": since, "until": since}, "until")):
        bad = registry.request("POST", hooks(ORG, hook["id"], "recover"), token=registry.token(), body=body)
        assert bad.status == 422 and bad.json()["errors"][0]["path"] == path, (body, bad)

    test = registry.request("POST", hooks(ORG, hook["id"], "test"), token=registry.token(),
                            body={"eventType": "job.failed"})
    assert test.status == 202, test
    [sent] = claim(registry)
    assert sent["kind"] == "test" and sent["eventId"] == test.json()["eventId"]
    body = json.loads(sent["body"])
    assert list(body) == ["id", "webhookId", "organisationId", "eventType", "dateTime", "data", "version"]
    assert re.fullmatch(r"[0-9a-f]{24}", body["id"]) and body["id"] == sent["eventId"]
    assert body["webhookId"] == hook["id"] and body["organisationId"] == ORG and body["eventType"] == "job.failed"
    assert body["data"]["object"]["objectType"] == "job" and body["data"]["object"]["test"] is True
    assert "test" in body["data"]["object"]["description"]
    listed = deliveries(registry, hook["id"])["deliveries"]
    assert listed[0]["eventId"] == body["id"] and listed[0]["status"] == "pending", "the test shows at once"
    # Default type: the webhook's first; an unknown type is refused.
    default = registry.request("POST", hooks(ORG, hook["id"], "test"), token=registry.token())
    assert default.status == 202 and default.json()["eventType"] == "job.completed"
    bad = registry.request("POST", hooks(ORG, hook["id"], "test"), token=registry.token(),
                           body={"eventType": "invoice.paid"})
    assert bad.status == 422 and bad.json()["errors"][0]["path"] == "eventType"
    # A disabled webhook gets no sends.
    assert registry.request("PATCH", hooks(ORG, hook["id"]), token=registry.token(),
                            body={"status": "disabled"}).status == 200
    refused = registry.request("POST", hooks(ORG, hook["id"], "deliveries", delivered, "resend"),
                               token=registry.token())
    assert refused.status == 422 and "disabled" in refused.json()["errors"][0]["message"]


def test_claims_are_leased_renewed_by_holding_reclaimed_after_the_lease_and_completed(make_registry, backend):
    lease_s = 3  # several renewals fit in one lease, even on a loaded machine
    reg = make_registry(backend, extra_args=["--send-lease", f"{lease_s}s"])
    hook = create(reg)
    test = reg.request("POST", hooks(ORG, hook["id"], "test"), token=reg.token())
    assert test.status == 202
    [sent] = claim(reg, proxy="proxy-a")
    assert claim(reg, proxy="proxy-b") == [], "one proxy per send"
    # proxy-a keeps renewing for twice the lease: nobody else gets the send.
    until = time.monotonic() + 2 * lease_s
    while time.monotonic() < until:
        report(reg, proxy="proxy-a", holding=[sent["sendId"]],
               attempts=[attempt(sent["eventId"], hook["id"], 1, "retrying", status=503, sendId=sent["sendId"])])
        assert claim(reg, proxy="proxy-b") == [], "a held send is not claimable"
        time.sleep(0.3)  # the renewal cadence of a proxy, not a wait for a condition
    # Another proxy's `holding` does not renew proxy-a's lease; proxy-a goes quiet (it died): proxy-b gets it.
    again = wait_until(lambda: claim(reg, proxy="proxy-b"), 6 * lease_s, "the send to be claimable again")
    assert [s["sendId"] for s in again] == [sent["sendId"]] and again[0]["body"] == sent["body"]
    report(reg, proxy="proxy-b", attempts=[attempt(sent["eventId"], hook["id"], 2, "delivered", status=204,
                                                   sendId=sent["sendId"])])
    detail = reg.request("GET", hooks(ORG, hook["id"], "deliveries", sent["eventId"]), token=reg.token()).json()
    assert detail["status"] == "delivered" and [a["outcome"] for a in detail["attempts"]][-1] == "delivered"
    assert json.loads(detail["payload"])["id"] == sent["eventId"]
    # Done: never handed out again, even once any lease would have run out.
    until = time.monotonic() + lease_s + 1
    while time.monotonic() < until:
        assert claim(reg, proxy="proxy-c") == []
        time.sleep(0.25)


def test_claim_answers_stay_bounded(registry):
    hook = create(registry)
    t = now_ms() - 60_000
    ids = [new_id() for _ in range(12)]
    big = new_id()
    events = [event(e, created=t + i, job="x" * 9000) for i, e in enumerate(ids)]
    events.append(event(big, created=t + 100, job="y" * 60_000))
    attempts = [a for i, e in enumerate(ids + [big]) for a in failed_for_good(e, hook["id"], t + i + 1)]
    report(registry, events=events, attempts=attempts)
    answer = registry.request("POST", hooks(ORG, hook["id"], "recover"), token=registry.token(),
                              body={"since": "2000-01-01T00:00:00Z"})
    assert answer.json()["queued"] == 13
    got, rounds = [], 0
    while True:
        raw = registry.request("POST", "/v2/registry/sends/claim", token=registry.proxy_token,
                               body={"proxy": "p", "max": 100})
        assert len(raw.body) < 48 * 1024, "a claim's answer stays well under the 64 KiB callout limit"
        sends = raw.json()["sends"]
        if not sends:
            break
        got += [s["eventId"] for s in sends]
        rounds += 1
    assert sorted(got) == sorted(ids) and rounds >= 3, "the room left decides; the rest waits for the next claim"
    assert big not in got, "a body that can never fit is failed, not handed out"
    assert "does not fit in a claim" in registry.log_text()
    gone = registry.request("GET", hooks(ORG, hook["id"], "deliveries", big), token=registry.token()).json()
    assert (gone["status"], gone["lastError"]) == ("failed", "too_large"), "not left pending forever"


# --------------------------------------------------------------------------------------------------------------
# Rights
# --------------------------------------------------------------------------------------------------------------


def admin_calls(reg, org, webhook_id, event_id, token) -> dict:
    return {
        "list": reg.request("GET", hooks(org, webhook_id, "deliveries"), token=token).status,
        "get": reg.request("GET", hooks(org, webhook_id, "deliveries", event_id), token=token).status,
        "resend": reg.request("POST", hooks(org, webhook_id, "deliveries", event_id, "resend"), token=token).status,
        "recover": reg.request("POST", hooks(org, webhook_id, "recover"), token=token,
                               body={"since": "2000-01-01T00:00:00Z"}).status,
        "test": reg.request("POST", hooks(org, webhook_id, "test"), token=token).status,
    }


def test_rights_on_every_new_endpoint(registry):
    hook = create(registry)
    theirs = create(registry, org="org-b")
    eid = new_id()
    report(registry, events=[event(eid)], attempts=failed_for_good(eid, hook["id"], now_ms()))
    other_admin = registry.token(org="org-b")
    assert set(admin_calls(registry, ORG, hook["id"], eid, other_admin).values()) == {403}
    member = registry.token(role="member", org=ORG)
    assert set(admin_calls(registry, ORG, hook["id"], eid, member).values()) == {403}
    # Org-b's admin reaching org-a's webhook through org-b's path: not found.
    assert set(admin_calls(registry, "org-b", hook["id"], eid, other_admin).values()) == {404}
    assert set(admin_calls(registry, ORG, hook["id"], eid, None).values()) == {401}
    assert admin_calls(registry, ORG, hook["id"], eid, registry.token(org=ORG)) == {
        "list": 200, "get": 200, "resend": 202, "recover": 202, "test": 202}
    assert admin_calls(registry, "org-b", theirs["id"], eid, registry.token(role="super_admin", org="root")) == {
        "list": 200, "get": 404, "resend": 404, "recover": 202, "test": 202}
    # The proxies' endpoints want the proxy token; a user's token is not one.
    for token in (None, registry.token(role="super_admin", org="root")):
        for path in ("/v2/registry/reports", "/v2/registry/sends/claim"):
            answer = registry.request("POST", path, token=token, body={"proxy": "p"})
            assert answer.status == 401, (path, answer)
    # Sends and audits: every queueing is audited with who asked.
    assert "resend of event" in registry.log_text() and "test event" in registry.log_text()


def test_the_audit_table_records_sends_and_never_a_key(make_registry, tmp_path):
    reg = make_registry("sqlite")
    hook = create(reg)
    answer = reg.request("POST", hooks(ORG, hook["id"], "test"), token=reg.token(sub="ann"))
    assert answer.status == 202
    db = sqlite3.connect(str(reg.database.removeprefix("sqlite:")))
    rows = db.execute("SELECT actor, action, webhook_id, detail FROM audit WHERE action = 'test'").fetchall()
    db.close()
    assert rows and rows[0][0] == "ann" and rows[0][2] == hook["id"] and answer.json()["eventId"] in rows[0][3]
    raw = open(reg.database.removeprefix("sqlite:"), "rb").read()
    for path in (reg.database.removeprefix("sqlite:") + "-wal",):
        if os.path.exists(path):
            raw += open(path, "rb").read()
    assert reg.proxy_token.encode() not in raw and b"whsec_" not in raw


# --------------------------------------------------------------------------------------------------------------
# Retention, bound, auto-disable
# --------------------------------------------------------------------------------------------------------------


def test_retention_prunes_and_organisations_are_bounded(make_registry, backend):
    reg = make_registry(backend, extra_args=["--delivery-retention", "60s", "--max-deliveries-per-organisation", "4"])
    hook = create(reg)
    other = create(reg, org="org-b")
    old, fresh = new_id(), [new_id() for _ in range(6)]
    t = now_ms()
    report(reg, events=[event(old, created=t - 600_000)] + [event(e, created=t + i) for i, e in enumerate(fresh)],
           attempts=failed_for_good(old, hook["id"], t - 600_000)
           + [attempt(e, hook["id"], 1, "delivered", at=t + i, status=200) for i, e in enumerate(fresh)])
    theirs = new_id()
    report(reg, events=[event(theirs, org="org-b")],
           attempts=[attempt(theirs, other["id"], 1, "delivered", org="org-b", status=200)])

    def pruned():
        listed = [d["eventId"] for d in deliveries(reg, hook["id"], query="?limit=100")["deliveries"]]
        return listed if old not in listed and len(listed) <= 4 else None

    listed = wait_until(pruned, 30, "the old delivery and those beyond the bound to be pruned")
    assert listed == list(reversed(fresh))[:4], "the newest four stay"
    assert [d["eventId"] for d in deliveries(reg, other["id"], org="org-b")["deliveries"]] == [theirs], \
        "another organisation's deliveries are not touched by this one's bound"
    gone = reg.request("GET", hooks(ORG, hook["id"], "deliveries", old), token=reg.token())
    assert gone.status == 404


def test_auto_disable_fires_and_re_enabling_clears_it(make_registry, backend):
    reg = make_registry(backend, extra_args=["--auto-disable-after", "30s"])
    failing = create(reg, name="Failing")
    flaky = create(reg, name="Flaky")
    revision = reg.changes(0).json()["revision"]
    t = now_ms() - 120_000
    attempts = []
    for i in range(4):  # failing: 45 s of failures (0, 15, 30, 45 s), no success
        eid = new_id()
        attempts += [attempt(eid, failing["id"], 1, "retrying", at=t + i * 15_000, status=503)]
    for i, outcome in enumerate(["retrying", "delivered", "retrying", "retrying"]):  # flaky: a success in between
        eid = new_id()
        attempts += [attempt(eid, flaky["id"], 1, outcome, at=t + i * 15_000, status=200 if outcome == "delivered"
                             else 503)]
    report(reg, attempts=attempts)

    def disabled():
        webhook = reg.request("GET", hooks(ORG, failing["id"]), token=reg.token()).json()
        return webhook if webhook["status"] == "disabled" else None

    webhook = wait_until(disabled, 30, "the failing webhook to be disabled")
    assert "disabled automatically" in webhook["disabledReason"] and "30s" in webhook["disabledReason"]
    assert reg.changes(0).json()["revision"] > revision, "a write: the proxies see it"
    listed = {w["id"]: w for w in reg.request("GET", hooks(ORG), token=reg.token()).json()["webhooks"]}
    assert listed[failing["id"]]["disabledReason"] == webhook["disabledReason"]
    assert listed[flaky["id"]]["status"] == "enabled" and "disabledReason" not in listed[flaky["id"]]
    # Logged once the write is done (the API may show the write a moment before the line is written).
    wait_until(lambda: f"auto-disabled webhook {failing['id']}" in reg.log_text(), 10, "the auto-disable line")
    feed = reg.feed().json()
    assert [w["status"] for w in feed["webhooks"] if w["id"] == failing["id"]] == ["disabled"]
    changed = reg.changes(revision).json()["changes"]
    assert [(c["id"], c["status"]) for c in changed] == [(failing["id"], "disabled")], "in the v2 feed's changes"
    enabled = reg.request("PATCH", hooks(ORG, failing["id"]), token=reg.token(), body={"status": "enabled"})
    assert enabled.status == 200
    again = reg.request("GET", hooks(ORG, failing["id"]), token=reg.token()).json()
    assert again["status"] == "enabled" and "disabledReason" not in again
    # The clock starts again: one more failure now does not disable it at once.
    eid = new_id()
    report(reg, attempts=[attempt(eid, failing["id"], 1, "retrying", status=503)])
    health = wait_until(lambda: reg.request("GET", hooks(ORG, failing["id"]), token=reg.token()).json(), 5, "get")
    assert health["status"] == "enabled"


# --------------------------------------------------------------------------------------------------------------
# Bounds and bad reports
# --------------------------------------------------------------------------------------------------------------


def test_bounded_requests_and_bad_reports(registry):
    hook = create(registry)
    huge = registry.request("POST", "/v2/registry/reports", token=registry.proxy_token,
                            body=b'{"proxy": "p", "events": [' + b'"x",' * 300_000 + b'"x"]}')
    assert huge.status == 413, huge
    eid = new_id()
    many = [attempt(eid, hook["id"], 1, "retrying", status=503)] * 4_001
    assert len(json.dumps({"proxy": "p", "attempts": many})) < 1024 * 1024
    too_many = registry.request("POST", "/v2/registry/reports", token=registry.proxy_token,
                                body={"proxy": "p", "attempts": many})
    assert too_many.status == 422 and too_many.json()["errors"][0]["path"] == "attempts"
    good = attempt(eid, hook["id"], 1, "retrying", status=503)
    for change, path in (({"outcome": "maybe"}, "attempts[0].outcome"), ({"webhookId": "W"}, "attempts[0].webhookId"),
                         ({"status": 999}, "attempts[0].status"), ({"error": "Time Out"}, "attempts[0].error"),
                         ({"at": -1}, "attempts[0].at"), ({"colour": 1}, "attempts[0].colour"),
                         ({"error": "timeout"}, "attempts[0].error")):
        bad = registry.request("POST", "/v2/registry/reports", token=registry.proxy_token,
                               body={"proxy": "p", "attempts": [{**good, **change}]})
        assert bad.status == 422 and bad.json()["errors"][0]["path"] == path, (change, bad)
    broken = event(eid)
    broken["envelope"] = ["{\"id\":", "nope"]
    bad = registry.request("POST", "/v2/registry/reports", token=registry.proxy_token,
                           body={"proxy": "p", "events": [broken]})
    assert bad.status == 422 and bad.json()["errors"][0]["path"] == "events[0].envelope"
    for body in (b"\xff\xfe", b"[]", b'{"events": []}'):
        bad = registry.request("POST", "/v2/registry/reports", token=registry.proxy_token, body=body,
                               headers={"Content-Type": "application/json"})
        assert bad.status in (400, 422), (body, bad)
    assert deliveries(registry, hook["id"])["deliveries"] == [], "a refused report stores nothing"
    # A report near the 1 MiB bound is stored; an envelope left out (null) is listed without a payload.
    big = new_id()
    ev = event(big, job="z" * 900_000)
    report(registry, events=[ev], attempts=failed_for_good(big, hook["id"], now_ms()))
    small = new_id()
    report(registry, events=[{**event(small), "envelope": None}], attempts=failed_for_good(small, hook["id"], now_ms()))
    assert registry.request("GET", hooks(ORG, hook["id"], "deliveries", small), token=registry.token()).json()[
        "payload"] is None
    refused = registry.request("POST", hooks(ORG, hook["id"], "deliveries", small, "resend"), token=registry.token())
    assert refused.status == 422 and "not kept" in refused.json()["errors"][0]["message"]
    recovered = registry.request("POST", hooks(ORG, hook["id"], "recover"), token=registry.token(),
                                 body={"since": "2000-01-01T00:00:00Z"})
    assert recovered.json() == {"queued": 1, "more": False, "notKept": 1}
    page = registry.request("GET", hooks(ORG, hook["id"], "deliveries") + "?limit=100", token=registry.token())
    assert len(page.body) < 256 * 1024, "the list carries no payloads"


def test_the_feed_says_when_sends_are_pending(registry):
    hook = create(registry)
    first = registry.feed()
    assert first.status == 200 and "pendingSends" not in first.json()
    etag = first.headers["etag"]
    assert registry.feed(etag).status == 304
    assert registry.request("POST", hooks(ORG, hook["id"], "test"), token=registry.token()).status == 202
    flagged = registry.feed(etag)
    assert flagged.status == 200, "a 304 has no body to carry the flag"
    assert flagged.json()["pendingSends"] is True
    assert flagged.json()["webhooks"] == first.json()["webhooks"], "the document itself is unchanged"
    head = registry.changes(0).json()["revision"]
    for page in (registry.changes(0), registry.changes(head)):
        assert page.status == 200 and page.json()["pendingSends"] is True
        assert page.body.count(b"pendingSends") == 1
    assert registry.changes(head).json()["changes"] == []
    assert len(claim(registry)) == 1
    assert registry.feed(etag).status == 304, "claimed: nothing pending"
    assert "pendingSends" not in registry.feed().json()
    assert "pendingSends" not in registry.changes(head).json()
