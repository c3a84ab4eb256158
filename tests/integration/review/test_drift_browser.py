"""The drift alarms on the reports page in a real headless Chromium (tests/browser.py), served by uvicorn
on a SQLite ledger seeded through :func:`ledger.drift.observe`: the banner names the stopped source, the
control chart is drawn, an admin clears the alarm with a reason from the page's form (audited with who
and why) and the banner goes; without the CSRF token, or as a radiologist, the POST is refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from sqlalchemy import select

from ledger import migrations
from ledger.db import open_engine, session_scope, sessionmaker_for
from ledger.schema import AuditEvent, DriftAlarm
from review.app import ReviewActions
from specgate.settings import Settings
from tests.browser import chromium, sign_in, wait
from tests.integration.review.drift_seed import seed_drift
from tests.integration.review.helpers import (
    PASSWORD,
    Client,
    Recorder,
    ReviewServer,
    make_user,
    review_config,
)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[str, Any, int]]:
    settings = Settings.load(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'ledger.db'}")
    migrations.upgrade(settings.db_url)
    engine = open_engine(settings.db_url)
    sessions = sessionmaker_for(engine)
    stop_id = seed_drift(sessions)
    make_user(sessions, "root", "admin")
    make_user(sessions, "anna", "radiologist")
    rec = Recorder()
    try:
        with ReviewServer(review_config(settings), sessions, ReviewActions(deliver=rec.deliver,
                                                                           retract=rec.retract)) as srv:
            yield srv.url, sessions, stop_id
    finally:
        engine.dispose()


def _state(sessions: Any, alarm_id: int) -> str:
    with session_scope(sessions) as s:
        return str(s.execute(select(DriftAlarm.state).where(DriftAlarm.id == alarm_id)).scalar_one())


def test_banner_and_chart_render_and_an_admin_clears_the_stop(site: tuple[str, Any, int]) -> None:
    url, sessions, stop_id = site
    # refused: a radiologist, and an admin's POST without the form's token
    anna = Client(url)
    anna.login("anna")
    assert anna.post(f"/drift/{stop_id}/clear", {"csrf_token": anna.csrf(), "reason": "x"}).status == 403
    root = Client(url)
    root.login("root")
    assert root.post(f"/drift/{stop_id}/clear", {"reason": "no token"}).status == 403
    assert _state(sessions, stop_id) == "open"

    driver: WebDriver = chromium()
    try:
        sign_in(driver, url, "root", PASSWORD)
        driver.get(url + "/reports")
        banner = driver.find_element(By.ID, f"drift-alarm-{stop_id}")
        assert "STOPPED" in banner.text and "CT_EAST" in banner.text and "CT-EAST-1" in banner.text
        assert "CT_WEST" not in driver.find_element(By.ID, "drift").text  # only the drifting source
        chart = driver.find_element(By.CSS_SELECTOR, "figure.drift-chart svg")
        box = driver.execute_script("var r = arguments[0].getBoundingClientRect(); return [r.width, r.height];", chart)
        assert box[0] > 300 and box[1] > 150, box  # drawn, at a readable size
        assert "CT_EAST" in driver.find_element(By.CSS_SELECTOR, "figure.drift-chart figcaption").text
        assert chart.get_attribute("aria-label").startswith("CT_EAST")
        banner.find_element(By.NAME, "reason").send_keys("detector recalibrated, phantom QA passed")
        banner.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait(driver).until(lambda d: d.find_elements(By.ID, "flash"))
        assert f"drift alarm {stop_id} (stop) cleared" in driver.find_element(By.ID, "flash").text
        assert not driver.find_elements(By.ID, f"drift-alarm-{stop_id}")
    finally:
        driver.quit()
    assert _state(sessions, stop_id) == "cleared"
    with session_scope(sessions) as s:
        ev = s.execute(select(AuditEvent).where(AuditEvent.action == "drift.alarm_cleared")).scalar_one()
        assert (ev.actor, ev.details["reason"]) == ("user:root", "detector recalibrated, phantom QA passed")
