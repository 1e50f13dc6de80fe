"""Each organisation's writes through the admin API are limited (`--org-write-rate`, `--org-write-burst`), against
the real binary: the burst, then 429 with Retry-After in the error shape (code `rate_limited`); another
organisation, reads and the proxies' routes unaffected; writes again once tokens are back; every write route
limited, none of the callers who may not write costing the organisation anything; 0 turns it off; bad flags
refused; refusals logged once per organisation per 10 s and never audited row by row; the dashboard's message."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import time

import pytest
from selenium.webdriver.common.by import By

from harness.registry_service import RegistryService
from harness.util import wait_until
from test_dashboard import Steps, browser, visible  # noqa: F401  (browser is a fixture)
from test_deliveries import WEBHOOK, event, failed_for_good, hooks, new_id, now_ms, report


def create(reg, org: str, token=None):
    return reg.request("POST", hooks(org), token=token or reg.token(org=org), body=WEBHOOK)


def assert_rate_limited(answer, org: str):
    assert answer.status == 429, answer
    assert answer.headers["content-type"] == "application/json"
    retry_after = answer.headers["retry-after"]
    assert re.fullmatch(r"[1-9][0-9]*", retry_after), retry_after
    errors = answer.json()["errors"]
    assert len(errors) == 1 and errors[0]["path"] == "" and errors[0]["code"] == "rate_limited", errors
    assert f'too many writes for organisation "{org}"' in errors[0]["message"], errors
    assert f"retry in {retry_after} s" in errors[0]["message"], errors
    return int(retry_after)


def rate_limited_lines(reg, org: str) -> list:
    return re.findall(rf'rate limited: (\d+) writes? of organisation "{org}" refused \(429\)', reg.log_text())


def test_a_burst_then_429_until_tokens_are_back(make_registry, backend):
    reg = make_registry(backend, loopback_webhooks=False,
                        extra_args=["--org-write-rate", "2", "--org-write-burst", "5"])
    started = time.monotonic()
    statuses = [create(reg, "org-a").status for _ in range(5)]
    assert statuses == [201] * 5, "the burst"
    # The bucket refills at 2 a second: on a slow machine a write or two more may have a token by now.
    refused = None
    for _ in range(20):
        answer = create(reg, "org-a")
        if answer.status != 201:
            refused = answer
            break
        statuses.append(answer.status)
    elapsed = time.monotonic() - started
    assert refused is not None, "never refused"
    assert len(statuses) <= 5 + 2 * elapsed + 1, (len(statuses), elapsed)
    assert assert_rate_limited(refused, "org-a") == 1, "a token is at most 500 ms away"

    # At the same time: another organisation writes, reads are not limited, nor are the proxies' routes.
    assert create(reg, "org-b").status == 201
    listed = reg.request("GET", hooks("org-a"), token=reg.token(org="org-a"))
    assert listed.status == 200 and len(listed.json()["webhooks"]) == len(statuses)
    assert reg.changes(0).status == 200
    report(reg, events=[event(new_id(), org="org-a")])

    # Once a token is back, writes go through again.
    refused_at = time.monotonic()
    wait_until(lambda: create(reg, "org-a").status == 201, timeout=10, desc="a write to go through again")
    assert time.monotonic() - refused_at < 10

    # Logged once for the first refusal (further ones within 10 s are counted for the next line); no token.
    lines = rate_limited_lines(reg, "org-a")
    assert 1 <= len(lines) <= 1 + (time.monotonic() - started) / 10, lines
    assert lines[0] == "1"
    for token in (reg.token(org="org-a"), reg.proxy_token, reg.jwt_secret):
        assert token not in reg.log_text()


def test_every_write_route_is_limited_and_no_refused_caller_drains_the_bucket(make_registry):
    # One write per 100 s: the first write takes the only token, every later one is refused.
    reg = make_registry("sqlite", loopback_webhooks=False,
                        extra_args=["--org-write-rate", "0.01", "--org-write-burst", "1"])
    org = "org-a"
    # Callers who may not write to org-a: no token, a bad one, another organisation's admin, a member. They are
    # refused as before (401, 403) and leave org-a's bucket full.
    others = [None, "not-a-token", reg.token(org="org-b"), reg.token(role="member", org=org)]
    for token in others * 5:
        answer = reg.request("POST", hooks(org), body=WEBHOOK, headers={} if token is None else {
            "Authorization": f"Bearer {token}"})
        assert answer.status in (401, 403), answer
    hook = create(reg, org)
    assert hook.status == 201, "the flood of refused callers did not take org-a's token"
    hook_id = hook.json()["id"]
    eid = new_id()
    report(reg, events=[event(eid, org=org)], attempts=failed_for_good(eid, hook_id, now_ms()))

    token = reg.token(org=org)
    writes = {
        "create": ("POST", hooks(org), WEBHOOK),
        "update": ("PATCH", hooks(org, hook_id), {"name": "Renamed"}),
        "delete": ("DELETE", hooks(org, hook_id), None),
        "rotate-key": ("POST", hooks(org, hook_id, "rotate-key"), None),
        "revoke-previous-key": ("POST", hooks(org, hook_id, "revoke-previous-key"), None),
        "resend": ("POST", hooks(org, hook_id, "deliveries", eid, "resend"), None),
        "recover": ("POST", hooks(org, hook_id, "recover"), {"since": "2000-01-01T00:00:00Z"}),
        "test": ("POST", hooks(org, hook_id, "test"), None),
    }
    for name, (method, path, body) in writes.items():
        answer = reg.request(method, path, token=token, body=body)
        retry_after = assert_rate_limited(answer, org)
        assert 60 <= retry_after <= 100, (name, retry_after)
    # The organisation as the handler reads it: percent-encoded in the path, the same bucket.
    assert_rate_limited(reg.request("POST", "/v1/organisations/org%2Da/webhooks", token=token, body=WEBHOOK), org)
    # A super admin writing to org-a draws on org-a's bucket too; on org-c, on org-c's.
    root = reg.token(role="super_admin", org="platform")
    assert_rate_limited(create(reg, org, token=root), org)
    assert create(reg, "org-c", token=root).status == 201
    # Reads are not limited.
    for path in (hooks(org), hooks(org, hook_id), hooks(org, hook_id, "deliveries"),
                 hooks(org, hook_id, "deliveries", eid)):
        assert reg.request("GET", path, token=token).status == 200, path
    # The proxies' routes are not limited.
    assert reg.changes(0).status == 200 and reg.feed().status == 200
    report(reg, events=[event(new_id(), org=org)])
    assert reg.request("POST", "/v2/registry/sends/claim", token=reg.proxy_token,
                       body={"proxy": "p/0", "max": 4}).status == 200
    # Nothing was written by the refused writes: the webhook is as created, and no audit row per 429.
    got = reg.request("GET", hooks(org, hook_id), token=token).json()
    assert got["name"] == WEBHOOK["name"] and got["keyRotatedAt"] is None
    with sqlite3.connect(reg.database.removeprefix("sqlite:")) as db:
        details = [row[0] for row in db.execute("SELECT detail FROM audit")]
    assert not [d for d in details if '"status":429' in d.replace(" ", "")], details
    # Refusals are logged as one line per organisation per 10 s, not a line each; the rest when it stops.
    assert rate_limited_lines(reg, org) == ["1"]
    assert 'refused POST "/v1/organisations/org-a/webhooks": 429' not in reg.log_text()
    reg.stop()
    refusals = len(writes) + 2  # the routes, the percent-encoded create, the super admin's
    assert rate_limited_lines(reg, org) == ["1", str(refusals - 1)], "each refusal counted once"


def test_rate_zero_turns_the_limit_off(make_registry):
    reg = make_registry("sqlite", loopback_webhooks=False,
                        extra_args=["--org-write-rate", "0", "--org-write-burst", "1"])
    statuses = [create(reg, "org-a").status for _ in range(30)]
    assert statuses == [201] * 30
    assert "rate limited" not in reg.log_text()


def test_the_flags_can_come_from_the_environment(make_registry):
    reg = make_registry("sqlite", loopback_webhooks=False,
                        env={"REGISTRY_ORG_WRITE_RATE": "0.05", "REGISTRY_ORG_WRITE_BURST": "2"})
    assert [create(reg, "org-a").status for _ in range(2)] == [201, 201]
    # One write every 20 s.
    assert 10 <= assert_rate_limited(create(reg, "org-a"), "org-a") <= 20


@pytest.mark.parametrize("flags, env, message", [
    (["--org-write-rate", "-1"], {}, "--org-write-rate: -1 is not a rate"),
    (["--org-write-rate", "NaN"], {}, "--org-write-rate: NaN is not a rate"),
    (["--org-write-rate", "inf"], {}, "--org-write-rate: inf is not a rate"),
    (["--org-write-rate", "0.0001"], {}, "--org-write-rate: 0.0001 is less than 0.001"),
    (["--org-write-rate", "lots"], {}, "--org-write-rate"),
    (["--org-write-rate", "2", "--org-write-burst", "0"], {}, "--org-write-burst: must be at least 1"),
    (["--org-write-burst", "-3"], {}, "--org-write-burst"),
    ([], {"REGISTRY_ORG_WRITE_RATE": "-0.5"}, "--org-write-rate: -0.5 is not a rate"),
])
def test_bad_rate_flags_are_refused(tmp_path, flags, env, message):
    reg = RegistryService(tmp_path, start=False, extra_args=flags, env=env)
    done = subprocess.run(reg.args, env=reg.env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr


@pytest.mark.parametrize("browser", [1280], indirect=True, ids=["desktop"])
def test_the_dashboard_shows_the_limit_like_any_refusal(browser, make_registry):
    """In a real browser: a write over the limit on the dashboard says why and when to retry."""
    reg = make_registry("sqlite", loopback_webhooks=False,
                        extra_args=["--org-write-rate", "0.01", "--org-write-burst", "1"])
    webhook, _ = reg.register("org-a", "https://hooks.example.com/webhooks", name="Billing")
    d, s = browser, Steps(browser, prefix="rate-limited-")
    d.get(reg.base_url + "/")
    s.wait(lambda d: visible(d, "sign-in"), "the sign-in form")
    d.find_element(By.ID, "token").send_keys(reg.token(org="org-a"))
    d.find_element(By.CSS_SELECTOR, "#sign-in-form button[type=submit]").click()
    row = f'tr[data-id="{webhook["id"]}"]'
    s.wait(lambda d: d.find_elements(By.CSS_SELECTOR, row), "the webhook's row")
    disable = [b for b in d.find_elements(By.CSS_SELECTOR, f"{row} button") if b.text == "Disable"]
    disable[0].click()
    s.wait(lambda d: "too many writes" in d.find_element(By.ID, "status").text, "the refusal's message")
    text = d.find_element(By.ID, "status").text
    assert re.search(r'too many writes for organisation "org-a": .*retry in \d+ s', text), text
    assert "Enabled" in d.find_element(By.CSS_SELECTOR, row).text, "nothing changed"
    s.shot("refused")
