"""The operator's page in a real headless Chromium, against a running relay.

gunicorn, a worker and the Copernica stand-in run for real; Copernica refuses
one delivery, the page shows it, a click on its Requeue button sends it
again, and the page then shows the failed list empty. Screenshots of both
states stay in the test run's temporary folder; the test prints their paths.

Chromium and its driver come from the system packages
(``apt-get install chromium chromium-driver``). Without them the test is
skipped, except in CI (``CI=true``), where a missing browser is a failure.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
import requests
from rq.registry import FailedJobRegistry

from tests.harness import (
    COPERNICA_TOKEN,
    DATABASE_FIELDS,
    shopify_headers,
    started_relay,
    wait_for_job,
    wait_for_writes,
)
from tests.standin.copernica import CopernicaStandIn, Fault

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

#: URL-safe, so it can ride in the address the browser opens.
PASSWORD = "browser-test-admin-password"
QUEUE = "admin-browser"

#: Without these Chromium reaches out to Google's hosts at start.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1500",
)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        message = (
            f"no browser for the admin page test: {', '.join(missing)} missing "
            "(apt-get install chromium chromium-driver)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    folder = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={folder / 'profile'}")
    # A driver path given means Selenium Manager, which would download a
    # driver, is never started.
    service = Service(str(CHROMEDRIVER), log_output=str(folder / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


@pytest.fixture
def standin():
    with CopernicaStandIn(
        access_token=COPERNICA_TOKEN, databases={1234: DATABASE_FIELDS}
    ) as server:
        yield server


@pytest.fixture
def relay(redis_server, standin, tmp_path):
    relay = started_relay(
        redis_server.url,
        standin.base_url,
        tmp_path,
        RELAY_ADMIN_PASSWORD=PASSWORD,
        RELAY_QUEUE=QUEUE,
        WEB_CONCURRENCY="1",
    )
    yield relay
    relay.stop()


def test_operator_requeues_a_failed_delivery_in_the_browser(
    browser, relay, standin, redis_server, tmp_path
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as shown
    from selenium.webdriver.support.ui import WebDriverWait

    connection = redis.Redis.from_url(redis_server.url)
    standin.add_fault(
        Fault(
            method="PUT",
            status=400,
            message="Invalid value for field email: shopper.one@example.com",
        )
    )
    body = b'{"id":71,"email":"shopper.one@example.com","first_name":"Ona"}'
    delivery_id = "browser-test-delivery-1"
    answer = relay.post(
        "shopify", body, shopify_headers(body, "customers/create", delivery_id)
    )
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["job"]
    assert wait_for_job(connection, job_id).get_status() == "failed"

    # The same page refuses a visitor without the password.
    assert requests.get(f"{relay.url}/admin", timeout=5).status_code == 401

    browser.get(f"http://operator:{PASSWORD}@127.0.0.1:{relay.port}/admin")
    wait = WebDriverWait(browser, 15)
    row = wait.until(
        shown.presence_of_element_located(
            (By.CSS_SELECTOR, f'#failed tr[data-job="{job_id}"]')
        )
    )
    assert delivery_id in row.text
    assert "Copernica answered 400" in row.text
    assert "s***@example.com" in row.text
    assert "shopper.one" not in browser.page_source
    assert _figure(browser, "failed-count") == "1"
    assert browser.find_element(By.ID, "chart").is_displayed()
    assert PASSWORD not in browser.find_element(By.ID, "config").text
    before = _screenshot(browser, tmp_path / "admin-failed.png")

    # Another site's page posts to the purge button, even with a token that
    # leaked: the browser says where the post comes from, and it is refused.
    token = browser.find_element(By.NAME, "token").get_attribute("value")
    browser.get("data:text/html," + quote(_forged_purge(relay.url, token)))
    wait.until(
        lambda driver: re.search(
            "Refused|needs the admin password",
            driver.find_element(By.TAG_NAME, "body").text,
        )
    )
    assert job_id in FailedJobRegistry(QUEUE, connection=connection)
    browser.get(f"{relay.url}/admin")
    row = wait.until(
        shown.presence_of_element_located(
            (By.CSS_SELECTOR, f'#failed tr[data-job="{job_id}"]')
        )
    )

    row.find_element(By.CSS_SELECTOR, "button.requeue").click()

    notice = wait.until(shown.presence_of_element_located((By.ID, "notice")))
    assert notice.text == "1 failed delivery requeued."
    assert "done=requeued" in browser.current_url

    # The fault was used up, so the requeued delivery now reaches Copernica.
    wait_for_writes(standin, 2)
    assert wait_for_job(connection, job_id).get_status() == "finished"
    # The chart's counts reach Redis with each process's next flush (2 s).
    _reload_until(
        browser,
        lambda: (
            _figure(browser, "failed-count") == _figure(browser, "in-progress") == "0"
            and _chart_totals(browser) == (1, 1)
        ),
    )
    assert browser.find_element(By.ID, "no-failed").is_displayed()
    after = _screenshot(browser, tmp_path / "admin-requeued.png")
    connection.close()

    print(f"\nadmin page screenshots: {before} and {after}")


def _forged_purge(relay_url: str, token: str) -> str:
    return (
        f'<form method="post" action="{relay_url}/admin/failed/purge">'
        f'<input name="token" value="{token}"><input name="all" value="yes">'
        '<input name="confirm" value="yes"></form>'
        "<script>document.forms[0].submit()</script>"
    )


def _figure(browser, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.CSS_SELECTOR, f"#{element_id} strong").text


def _chart_totals(browser) -> tuple[int, int]:
    """Events received and delivered over the hour, as the chart says."""
    from selenium.webdriver.common.by import By

    label = browser.find_element(By.ID, "chart").get_attribute("aria-label")
    numbers = re.findall(r"(\d+) (received|delivered)", label)
    totals = {kind: int(count) for count, kind in numbers}
    return totals.get("received", 0), totals.get("delivered", 0)


def _reload_until(browser, condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    browser.refresh()
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"page did not change:\n{browser.page_source}")
        time.sleep(0.3)
        browser.refresh()


def _screenshot(browser, path: Path) -> Path:
    assert browser.save_screenshot(str(path)), path
    assert path.stat().st_size > 0
    assert re.match(rb"\x89PNG", path.read_bytes()[:4])
    return path
