"""The dashboard's Deliveries view in headless Chromium through Selenium, keyboard only, at desktop width and at
360 px: a webhook's deliveries listed (time, event, type, status, attempts, last status), filtered by status and
paged, one delivery's payload and attempts, Resend, Recover failed since… and Send test event (each checked by
claiming the queued send as a proxy would), and an auto-disabled webhook's reason. Screenshots go to
target/registry-dashboard/deliveries-*."""

from __future__ import annotations

import json

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from test_dashboard import Steps, browser, visible  # noqa: F401  (browser is a fixture)
from test_deliveries import ORG, attempt, claim, create, event, failed_for_good, new_id, now_ms, report


def rows(d):
    return d.find_elements(By.CSS_SELECTOR, "#d-rows tr")


@pytest.mark.parametrize("browser", [1280, 360], indirect=True, ids=["desktop", "360px"])
def test_deliveries_view_with_the_keyboard(browser, make_registry):
    registry = make_registry(extra_args=["--auto-disable-after", "30s"])
    hook = create(registry, name="Billing")
    broken = create(registry, name="Broken")
    t = now_ms() - 3_600_000
    failed, delivered = [], []
    events, attempts = [], []
    for i in range(30):
        eid = new_id()
        events.append(event(eid, created=t + i * 60_000))
        if i % 5 == 0:
            failed.append(eid)
            attempts += failed_for_good(eid, hook["id"], t + i * 60_000 + 10)
        else:
            delivered.append(eid)
            attempts.append(attempt(eid, hook["id"], 1, "delivered", at=t + i * 60_000 + 10, status=200))
    for i in range(4):  # 45 s of failures with no success: auto-disabled
        eid = new_id()
        attempts.append(attempt(eid, broken["id"], 1, "retrying", at=t + i * 15_000, status=500))
    report(registry, events=events, attempts=attempts)

    d, s = browser, Steps(browser, prefix="deliveries-")
    d.get(registry.base_url + "/")
    s.wait(lambda d: visible(d, "sign-in"), "the sign-in form")
    d.find_element(By.TAG_NAME, "body").click()
    s.tab_to("the token field", lambda el: el.get_attribute("id") == "token")
    s.keys(registry.token(org=ORG, sub="ann@example.com"))
    s.tab_to_button("Sign in")
    s.keys(Keys.ENTER)
    s.wait(lambda d: visible(d, "webhooks"), "the webhook list")

    # The auto-disabled webhook says why.
    def reason(d):
        d.refresh()
        s.wait(lambda d: visible(d, "webhooks"), "the list after reload")
        found = d.find_elements(By.CSS_SELECTOR, f'tr[data-id="{broken["id"]}"] .reason')
        return found[0].text if found else None

    text = s.wait(reason, "the auto-disable reason", timeout=40)
    assert "disabled automatically" in text and "every delivery failed" in text
    s.shot("auto-disabled")

    # Open Billing's deliveries (the page was just loaded: Tab starts from its top; no click that could land on a
    # button of the list).
    s.tab_to_button("Deliveries", hook["id"])
    s.keys(Keys.ENTER)
    s.wait(lambda d: visible(d, "deliveries") and len(rows(d)) == 25, "the first page")
    assert s.active().get_attribute("id") == "d-title", "focus moves to the view's title"
    first = rows(d)[0]
    assert first.get_attribute("data-event") == events[-1]["eventId"], "newest first"
    assert "Delivered" in first.text and "HTTP 200" in first.text and "job.completed" in first.text
    s.shot("list")

    # Older, then the filter: failed only.
    s.tab_to_button("Older")
    s.keys(Keys.ENTER)
    s.wait(lambda d: len(rows(d)) == 5 and "Page 2" in d.find_element(By.ID, "d-page").text, "the second page")
    assert [r.get_attribute("data-event") for r in rows(d)] == [e["eventId"] for e in events[:5]][::-1]
    s.shot("older")
    s.tab_to("the status filter", lambda el: el.get_attribute("id") == "d-status")
    s.keys("Failed")
    s.wait(lambda d: len(rows(d)) == len(failed) and all("Failed" in r.text for r in rows(d)), "failed only")
    assert "HTTP 503" in rows(d)[0].text and "Page 1" in d.find_element(By.ID, "d-page").text
    s.shot("failed-only")

    # A failed delivery's details: every attempt and the payload as sent; Resend queues it.
    target = failed[-1]
    s.tab_to("the details of the newest failure",
             lambda el: el.tag_name == "button" and el.get_attribute("aria-label") == f"Details of event {target}")
    s.keys(Keys.ENTER)
    s.wait(lambda d: d.find_element(By.ID, "delivery").get_attribute("open") is not None, "the detail pane")
    pane = d.find_element(By.ID, "delivery")
    payload = json.loads(d.find_element(By.ID, "dd-payload").text)
    assert payload["id"] == target and payload["webhookId"] == hook["id"]
    assert len(pane.find_elements(By.CSS_SELECTOR, "#dd-attempts tr")) == 2 and "HTTP 503" in pane.text
    s.shot("details")
    s.tab_to_button("Resend")
    s.keys(Keys.ENTER)
    s.wait(lambda d: "queued to be sent again" in d.find_element(By.ID, "status").text, "the resend message")
    [sent] = claim(registry)
    assert sent["kind"] == "resend" and sent["eventId"] == target
    s.shot("resent")

    # Recover failed since… (the picker starts 24 hours back, which covers this hour's failures).
    s.tab_to_button("Recover failed since…")
    s.keys(Keys.ENTER)
    s.wait(lambda d: d.find_element(By.ID, "recover").get_attribute("open") is not None, "the recover dialog")
    assert s.active().get_attribute("id") == "r-since" and s.active().get_attribute("type") == "datetime-local"
    s.shot("recover-picker")
    s.tab_to_button("Recover")
    s.keys(Keys.ENTER)
    s.wait(lambda d: "are queued to be sent again" in d.find_element(By.ID, "status").text, "the recover message")
    assert f"{len(failed) - 1} failed deliveries" in d.find_element(By.ID, "status").text, "the resent one is pending"
    assert sorted(x["eventId"] for x in claim(registry)) == sorted(failed[:-1])
    s.shot("recovered")

    # Send test event.
    s.tab_to_button("Send test event")
    s.keys(Keys.ENTER)
    s.wait(lambda d: "Test event" in d.find_element(By.ID, "status").text, "the test message")
    [test] = claim(registry)
    assert test["kind"] == "test" and test["eventId"] in d.find_element(By.ID, "status").text
    assert json.loads(test["body"])["data"]["object"]["test"] is True
    s.shot("test-sent")

    # Back to the webhooks, focus on the row's Deliveries button.
    s.tab_to_button("Back to webhooks")
    s.keys(Keys.ENTER)
    s.wait(lambda d: visible(d, "webhooks") and not visible(d, "deliveries"), "the webhook list")
    assert s.active().text == "Deliveries"
