"""The status page in a real browser: Debian's headless chromium, driven by chromedriver.

A person logs in with the token, sees the right numbers (members, backlog), a chart per
audience, and looks a user up. With SYNCER_SCREENSHOT=1 the page is saved to
docs/status-page.png (the README shows it).

Skipped when chromium is not installed, except under CI (CI set): there it must run, and
.ci/run installs chromium and chromium-driver when they are missing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from syncer.store import Store
from syncer.testing.tray_standin import Reply, TrayStandin
from tests.conftest import REPO_ROOT, Upstream
from tests.integration.test_http_server import serving

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TOKEN = "browser-token-0123456789abcdef"
WAIT_SECONDS = 15


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """A headless chromium under WebDriver (skipped without chromium, but not under CI)."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        message = f"{', '.join(missing)} not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {message}")
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where chromium's sandbox cannot start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


# (audience, members) at each run: the chart of Order Completed grows, with one dip.
BUYER_SIZES = (3, 5, 4, 7, 9)


# The page's reads run on both databases in test_http_server; a browser costs seconds, so it
# looks at the page once, over SQLite.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_person_logs_in_reads_the_numbers_and_charts_and_looks_a_user_up(
    browser: Any, store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    upstream.add_audience("aud_orders30", "Order Completed Last 30 Days")
    upstream.add_audience("aud_vip", "VIP Customers")
    upstream.add("aud_vip", "user-001", "user-002")
    upstream.add_trait("trait_ltv", "Lifetime Value")
    upstream.set_values("trait_ltv", {"user-001": "120.5", "user-002": "88"})
    crm, warehouse = standin.url("/crm"), standin.url("/warehouse")
    with serving(store, [crm, warehouse], token=TOKEN) as served:
        for run, size in enumerate(BUYER_SIZES, start=1):
            if run == len(BUYER_SIZES):
                # The last run finds two new buyers, which the warehouse does not take.
                standin.respond("/warehouse", Reply(status=503))
            upstream.set_members("aud_orders30", {f"user-{n:03d}" for n in range(1, size + 1)})
            served.sync()

        wait = WebDriverWait(browser, WAIT_SECONDS)
        base = f"http://127.0.0.1:{served.port}"
        browser.get(f"{base}/")
        # Sent to the login form; the token brings the browser back to the page.
        wait.until(seen.url_contains("/login"))
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
        wait.until(seen.presence_of_element_located((By.ID, "subjects")))
        assert browser.current_url == f"{base}/"

        def cell(row: str, field: str) -> str:
            text: str = browser.find_element(By.CSS_SELECTOR, f'{row} [data-field="{field}"]').text
            return text

        buyers = 'tr[data-subject="audience:aud_orders30"]'
        assert cell(buyers, "members") == str(BUYER_SIZES[-1])
        assert cell('tr[data-subject="audience:aud_vip"]', "members") == "2"
        assert cell('tr[data-subject="trait:trait_ltv"]', "members") == "2"
        assert cell(f'tr[data-url="{crm}"]', "pending") == "0"
        assert cell(f'tr[data-url="{warehouse}"]', "pending") == "2"
        assert "order_completed_last_30_days" in browser.find_element(By.CSS_SELECTOR, buyers).text

        chart = browser.find_element(By.CSS_SELECTOR, f"{buyers} svg.chart")
        dots = chart.find_elements(By.TAG_NAME, "circle")
        assert len(dots) == len(BUYER_SIZES)
        line = chart.find_element(By.TAG_NAME, "polyline").get_attribute("points") or ""
        assert len(line.split()) == len(BUYER_SIZES)
        heights = [float(dot.get_attribute("cy") or "nan") for dot in dots]
        # Larger is higher (a smaller y): the dip of the third run shows.
        assert heights[1] < heights[0] and heights[2] > heights[1] and heights[4] == min(heights)
        runs = browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr")
        assert len(runs) == len(BUYER_SIZES)

        if os.environ.get("SYNCER_SCREENSHOT") == "1":
            # The whole page, not the window's first screenful.
            height = browser.find_element(By.TAG_NAME, "body").size["height"]
            browser.execute_cdp_cmd(
                "Emulation.setDeviceMetricsOverride",
                {"width": 1400, "height": height, "deviceScaleFactor": 1, "mobile": False},
            )
            target = REPO_ROOT / "docs" / "status-page.png"
            target.parent.mkdir(exist_ok=True)
            assert browser.save_screenshot(str(target))

        # The lookup: a user id typed into the form, and their timeline.
        lookup = browser.find_element(By.CSS_SELECTOR, "header input[name=user]")
        lookup.send_keys("user-008")
        lookup.submit()
        wait.until(seen.presence_of_element_located((By.ID, "timeline")))
        assert browser.find_element(By.ID, "timeline-user").text == "user-008"
        events: dict[str, list[str]] = {}
        for row in browser.find_elements(By.CSS_SELECTOR, "#events tr.event"):
            events.setdefault(row.get_attribute("data-event") or "", []).append(row.text)
        assert {"detected", "attempt", "pending"} <= set(events), events
        # Delivered to the CRM; tried at the warehouse (503) and still owed to it.
        assert any(crm in text and "delivered" in text for text in events["attempt"]), events
        assert any(warehouse in text and "503" in text for text in events["attempt"]), events
        assert [warehouse in text for text in events["pending"]] == [True], events
        assert "order_completed_last_30_days" in browser.find_element(By.ID, "timeline").text
