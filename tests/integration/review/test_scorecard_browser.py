"""The gate's scorecard on the reports page, in a real headless Chromium (tests/browser.py): the ledger seeded
as in tests/integration/test_gate_scorecard.py (SQLite), an admin signs in, the page shows the scorecard's
three reports with their figures and the chart over time with its intervals; a radiologist cannot open it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By

from ledger import migrations
from ledger.db import open_engine, sessionmaker_for
from review.app import ReviewActions
from specgate.settings import Settings
from tests.browser import sign_in, statuses
from tests.integration.review.helpers import PASSWORD, Recorder, ReviewServer, make_user, review_config
from tests.integration.test_gate_scorecard import _seed

CHART = "The gate's scorecard over time"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("scorecard-browser")
    settings = Settings.load(data_dir=root / "data", database_url=f"sqlite:///{root / 'ledger.db'}")
    migrations.upgrade(settings.db_url)
    engine = open_engine(settings.db_url)
    sessions = sessionmaker_for(engine)
    _seed(sessions)
    make_user(sessions, "root", "admin")
    make_user(sessions, "anna", "radiologist")
    rec = Recorder()
    try:
        with ReviewServer(review_config(settings), sessions, ReviewActions(deliver=rec.deliver)) as srv:
            yield srv.url
    finally:
        engine.dispose()


def _cells(section: Any) -> list[list[str]]:
    return [[td.text for td in tr.find_elements(By.TAG_NAME, "td")] for tr in section.find_elements(By.TAG_NAME, "tr")
            if tr.find_elements(By.TAG_NAME, "td")]


def test_the_scorecard_renders_on_the_reports_page(browser: WebDriver, site: str, tmp_path: Path) -> None:
    sign_in(browser, site, "root", PASSWORD)
    browser.get_log("performance")
    browser.get(site + "/reports")
    assert statuses(browser, "/reports") == [200]
    section = browser.find_element(By.ID, "report-gate")
    assert section.is_displayed()
    assert section.find_element(By.TAG_NAME, "h2").text.startswith("The gate's scorecard by model and source")
    headers = [th.text for th in section.find_elements(By.TAG_NAME, "th")]
    assert headers[:5] == ["model", "calling AE", "station", "held", "approved (too strict)"]
    rows = {tuple(r[:3]): r for r in _cells(section)}
    # liver on CT_A / SOMATOM: 5 held, 1 approved, 3 rejected, 1 undecided, 75% right; 4 released, 1 retracted
    a = rows[("liver:1.0", "CT_A", "SOMATOM")]
    assert a[3:8] == ["5", "1", "3", "1", "75.0%"] and a[10:12] == ["4", "1"]
    assert rows[("liver:1.0", "CT_B", "-")][15:19] == ["3", "1", "1", "50.0%"]
    for name in ("gate-weekly", "gate-monthly"):
        weekly = browser.find_element(By.ID, f"report-{name}")
        assert _cells(weekly), name
    chart = browser.find_element(By.CSS_SELECTOR, f'svg[aria-label="{CHART}"]')
    assert chart.is_displayed() and chart.size["width"] > 300
    legend = chart.get_attribute("innerHTML")
    for label in ("held, rejected by a radiologist (gate right)", "released, retracted for quality",
                  "blind audit: released, rejected", "share, with 95% Wilson interval"):
        assert label in legend, label
    shot = tmp_path / "review-gate-scorecard.png"
    browser.find_element(By.CSS_SELECTOR, f'figure:has(svg[aria-label="{CHART}"])').screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_radiologist_sees_the_blind_audit_but_not_the_scorecard(browser: WebDriver, site: str) -> None:
    browser.delete_all_cookies()
    sign_in(browser, site, "anna", PASSWORD)
    browser.get(site + "/reports")
    assert browser.find_element(By.ID, "error-title").text == "this page is for administrators"
    assert not browser.find_elements(By.ID, "report-gate")
    browser.find_element(By.ID, "nav-audit").click()
    # the seeded ledger's one pending blind review (liver on CT_B), listed without the gate's verdict
    [row] = browser.find_elements(By.CSS_SELECTOR, "#audit-queue tbody tr")
    assert "CT_B" in row.text and "OODM" not in browser.page_source
