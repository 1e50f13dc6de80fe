"""The dashboard in a real browser: Debian's headless Chromium driven by Selenium, keyboard only (Tab, Enter,
Space), at desktop width and at 360 px. Sign in, create (a bad URL first), read the key once, reload and see it
gone, disable, edit, rotate, delete. A screenshot of each step goes to target/registry-dashboard/."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from harness.registry_service import REPO
from harness.util import scaled

os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not try to download a browser or driver

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

SHOTS = REPO / "target" / "registry-dashboard"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path, request):
    width = request.param
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={max(width, 500)},900"]:
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "driver.log")),
                              options=options)
    # The viewport itself is set exactly: a window cannot be made narrower than Chromium's minimum.
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": 800, "deviceScaleFactor": 1, "mobile": width < 600})
    driver.width = width
    yield driver
    driver.quit()


class Steps:
    def __init__(self, driver, prefix: str = ""):
        self.driver = driver
        self.prefix = prefix
        self.n = 0
        SHOTS.mkdir(parents=True, exist_ok=True)
        for old in SHOTS.glob(f"{prefix}{driver.width}px-*.png"):
            old.unlink()  # only this run's steps stay

    def wait(self, predicate, desc: str, timeout: float = 20):
        # The list is redrawn after each change: an element read mid-redraw is simply read again.
        return WebDriverWait(self.driver, scaled(timeout), poll_frequency=0.05,
                             ignored_exceptions=[StaleElementReferenceException]).until(
            lambda d: predicate(d), message=desc)

    def shot(self, name: str) -> Path:
        self.n += 1
        path = SHOTS / f"{self.prefix}{self.driver.width}px-{self.n:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        # Usable at this width: nothing sticks out sideways.
        overflow = self.driver.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"{name}: the page is {overflow}px wider than the {self.driver.width}px viewport"
        return path

    def active(self):
        return self.driver.switch_to.active_element

    def keys(self, *keys):
        self.active().send_keys(*keys)

    def tab_to(self, describe: str, predicate, limit: int = 60):
        """Presses Tab until the focused element satisfies `predicate` (so it is reachable by keyboard)."""
        for _ in range(limit):
            self.keys(Keys.TAB)
            if predicate(self.active()):
                return self.active()
        raise AssertionError(f"Tab never reached {describe}")

    def tab_to_button(self, text: str, within_row: str = ""):
        def match(el):
            if el.tag_name != "button" or el.text.strip() != text:
                return False
            return not within_row or el.find_element(By.XPATH, "ancestor::tr").get_attribute("data-id") == within_row
        return self.tab_to(f"the {text!r} button", match)

    def accept_alert(self):
        alert = self.wait(lambda d: _alert(d), "a confirmation")
        alert.accept()


def _alert(driver):
    try:
        return driver.switch_to.alert
    except NoAlertPresentException:
        return None


def visible(driver, element_id: str) -> bool:
    return driver.find_element(By.ID, element_id).is_displayed()


@pytest.mark.parametrize("browser", [1280, 360], indirect=True, ids=["desktop", "360px"])
def test_dashboard_flow_with_the_keyboard(browser, make_registry):
    registry = make_registry()
    d, s = browser, Steps(browser)
    token = registry.token(role="organisation_admin", org="org-a", sub="ann@example.com")
    d.get(registry.base_url + "/")
    s.wait(lambda d: visible(d, "sign-in"), "the sign-in form")
    s.shot("sign-in")

    # Sign in: paste the token; the organisation is read from it.
    d.find_element(By.TAG_NAME, "body").click()
    s.tab_to("the token field", lambda el: el.get_attribute("id") == "token")
    s.keys(token)
    assert d.find_element(By.ID, "organisation").get_attribute("value") == "org-a"
    s.tab_to_button("Sign in")
    s.keys(Keys.ENTER)
    s.wait(lambda d: visible(d, "webhooks"), "the webhook list")
    assert s.active().get_attribute("id") == "create", "focus moves to Create after signing in"
    assert "ann@example.com" in d.find_element(By.ID, "who").text
    assert visible(d, "empty")
    # Create sits at the top right: right of the title, or on its own row on a narrow screen.
    create = d.find_element(By.ID, "create").rect
    title = d.find_element(By.ID, "webhooks-title").rect
    assert create["x"] + create["width"] > d.execute_script("return window.innerWidth") * 0.6
    assert create["y"] <= title["y"] + title["height"] + 60
    s.shot("signed-in")

    # Create: first with a URL the registry refuses; the error shows under the field and focus returns to it.
    s.keys(Keys.ENTER)
    s.wait(lambda d: d.find_element(By.ID, "editor").get_attribute("open") is not None, "the form")
    assert s.active().get_attribute("id") == "f-name"
    s.keys("Billing")
    s.keys(Keys.TAB)
    s.keys("https://user@hooks.example.com/webhooks")
    s.keys(Keys.TAB)
    s.keys("Invoices and credit notes")
    s.tab_to("the job.failed box", lambda el: el.get_attribute("value") == "job.failed")
    s.keys(Keys.SPACE)
    s.tab_to_button("Create")
    s.keys(Keys.ENTER)
    s.wait(lambda d: d.find_element(By.ID, "e-url").text, "the URL error")
    assert "credentials" in d.find_element(By.ID, "e-url").text
    assert s.active().get_attribute("id") == "f-url" and s.active().get_attribute("aria-invalid") == "true"
    s.shot("invalid-url")
    s.active().send_keys(Keys.CONTROL, "a")
    s.keys("https://hooks.example.com/webhooks")
    s.tab_to_button("Create")
    s.keys(Keys.ENTER)

    # The key, once.
    s.wait(lambda d: visible(d, "new-key"), "the new key")
    key = d.find_element(By.ID, "new-key-value").get_attribute("value")
    assert key.startswith("whsec_")
    assert s.active().get_attribute("id") == "new-key", "focus moves to the key"
    assert "shown only once" in d.find_element(By.ID, "new-key").text
    feed = registry.feed().json()["webhooks"]
    assert [w["apiKeys"] for w in feed] == [[key]]
    assert feed[0]["events"] == ["job.completed", "job.failed"] and feed[0]["name"] == "Billing"
    webhook_id = feed[0]["id"]
    s.tab_to_button("Copy")
    s.keys(Keys.ENTER)
    s.wait(lambda d: d.find_element(By.ID, "status").text, "the copy message")
    s.shot("key-shown-once")

    # Reload: still signed in (this tab), the webhook is listed, the key is gone for good.
    d.refresh()
    s.wait(lambda d: d.find_elements(By.CSS_SELECTOR, f'tr[data-id="{webhook_id}"]'), "the list after reload")
    assert not visible(d, "new-key")
    assert key not in d.page_source and key[6:] not in d.page_source
    assert d.execute_script("return JSON.stringify(sessionStorage) + JSON.stringify(localStorage)").find(key) < 0
    s.shot("reloaded-key-gone")

    # Disable.
    s.tab_to_button("Disable", webhook_id)
    s.keys(Keys.ENTER)
    s.wait(lambda d: "Disabled" in d.find_element(By.CSS_SELECTOR, f'tr[data-id="{webhook_id}"] .badge').text,
           "the disabled badge")
    assert registry.feed().json()["webhooks"][0]["status"] == "disabled"
    assert s.active().text == "Enable", "focus stays on the toggle"
    s.shot("disabled")

    # Edit: the form comes back filled in; only what changed is saved.
    s.tab_to_button("Edit", webhook_id)
    s.keys(Keys.ENTER)
    s.wait(lambda d: d.find_element(By.ID, "editor").get_attribute("open") is not None, "the edit form")
    assert s.active().get_attribute("value") == "Billing"
    assert d.find_element(By.ID, "f-disabled").is_selected()
    s.active().send_keys(Keys.CONTROL, "a")
    s.keys("Billing EU")
    s.tab_to_button("Save")
    s.keys(Keys.ENTER)
    s.wait(lambda d: "Billing EU" in d.find_element(By.CSS_SELECTOR, f'tr[data-id="{webhook_id}"]').text,
           "the new name")
    saved = registry.feed().json()["webhooks"][0]
    assert (saved["name"], saved["status"], saved["events"], saved["apiKeys"]) == (
        "Billing EU", "disabled", ["job.completed", "job.failed"], [key])
    s.shot("edited")

    # Rotate: a new key, shown once; the old one still served during the grace period.
    s.tab_to_button("Rotate key", webhook_id)
    s.keys(Keys.ENTER)
    s.accept_alert()
    s.wait(lambda d: visible(d, "new-key"), "the rotated key")
    new_key = d.find_element(By.ID, "new-key-value").get_attribute("value")
    assert new_key.startswith("whsec_") and new_key != key
    assert registry.feed().json()["webhooks"][0]["apiKeys"] == [new_key, key]
    s.shot("rotated")
    s.tab_to_button("I have stored the key")
    s.keys(Keys.ENTER)
    s.wait(lambda d: not visible(d, "new-key"), "the key to be dismissed")
    assert d.find_element(By.ID, "new-key-value").get_attribute("value") == ""

    # Delete.
    s.tab_to_button("Delete", webhook_id)
    s.keys(Keys.ENTER)
    s.accept_alert()
    s.wait(lambda d: not d.find_elements(By.CSS_SELECTOR, f'tr[data-id="{webhook_id}"]'), "the row to go")
    assert visible(d, "empty")
    assert registry.feed().json()["webhooks"] == []
    s.shot("deleted")

    # Sign out.
    s.tab_to_button("Sign out")
    s.keys(Keys.ENTER)
    s.wait(lambda d: visible(d, "sign-in"), "the sign-in form")
    assert d.execute_script("return sessionStorage.length") == 0


@pytest.mark.parametrize("browser", [1280], indirect=True, ids=["desktop"])
def test_a_token_for_another_organisation_is_refused_on_the_page(browser, make_registry):
    registry = make_registry()
    d, s = browser, Steps(browser, prefix="refused-")
    d.get(registry.base_url + "/")
    s.wait(lambda d: visible(d, "sign-in"), "the sign-in form")
    d.find_element(By.ID, "token").send_keys(registry.token(role="organisation_admin", org="org-a"))
    field = d.find_element(By.ID, "organisation")
    field.clear()
    field.send_keys("org-b")
    d.find_element(By.CSS_SELECTOR, "#sign-in-form button[type=submit]").send_keys(Keys.ENTER)
    s.wait(lambda d: d.find_element(By.ID, "token-error").text, "the refusal")
    assert "may not manage" in d.find_element(By.ID, "token-error").text
    assert visible(d, "sign-in") and not visible(d, "webhooks")
    s.shot("refused")


@pytest.mark.parametrize("browser", [1280, 360], indirect=True, ids=["desktop", "360px"])
def test_rotation_says_the_configured_grace_and_a_leaked_previous_key_is_revoked(browser, make_registry):
    registry = make_registry(extra_args=["--rotation-grace", "90m"])
    webhook, key = registry.register("org-a", "https://hooks.example.com/webhooks", name="Billing")
    d, s = browser, Steps(browser, prefix="revoke-")
    d.get(registry.base_url + "/")
    s.wait(lambda d: visible(d, "sign-in"), "the sign-in form")
    d.find_element(By.TAG_NAME, "body").click()
    s.tab_to("the token field", lambda el: el.get_attribute("id") == "token")
    s.keys(registry.token(role="organisation_admin", org="org-a"))
    s.tab_to_button("Sign in")
    s.keys(Keys.ENTER)
    s.wait(lambda d: d.find_elements(By.CSS_SELECTOR, f'tr[data-id="{webhook["id"]}"]'), "the webhook's row")
    assert not [b for b in d.find_elements(By.TAG_NAME, "button") if b.text == "Revoke previous key"]

    # Rotate: the confirmation says the grace the registry runs with, not a fixed 24 hours.
    s.tab_to_button("Rotate key", webhook["id"])
    s.keys(Keys.ENTER)
    alert = s.wait(lambda d: _alert(d), "the rotation's confirmation")
    assert "90 minutes" in alert.text and "24 hours" not in alert.text, alert.text
    alert.accept()
    s.wait(lambda d: visible(d, "new-key"), "the rotated key")
    new_key = d.find_element(By.ID, "new-key-value").get_attribute("value")
    assert registry.feed().json()["webhooks"][0]["apiKeys"] == [new_key, key]
    row = lambda d: d.find_element(By.CSS_SELECTOR, f'tr[data-id="{webhook["id"]}"]')  # noqa: E731
    s.wait(lambda d: "previous key also works until" in row(d).text, "the previous key's note")
    s.shot("rotated-previous-key-listed")

    # Revoke the previous key: it leaves the feed at once, the button and the note go.
    s.tab_to_button("Revoke previous key", webhook["id"])
    s.keys(Keys.ENTER)
    alert = s.wait(lambda d: _alert(d), "the revocation's confirmation")
    assert "Revoke the previous key of Billing" in alert.text
    alert.accept()
    s.wait(lambda d: "previous key also works" not in row(d).text, "the previous key's note to go")
    assert registry.feed().json()["webhooks"][0]["apiKeys"] == [new_key]
    assert "no longer works" in d.find_element(By.ID, "status").text
    assert s.active().text == "Rotate key", "focus moves to the row's Rotate key"
    assert not [b for b in d.find_elements(By.TAG_NAME, "button") if b.text == "Revoke previous key"]
    s.shot("previous-key-revoked")
