"""The review app in a real headless Chromium (tests/browser.py), served in-process by uvicorn on a SQLite
ledger, with one held result made by the real pipeline (a tiny model): signing in, the queue, the study
page's slice viewer driven by the keyboard, escaping of a patient name that is a script, redirects to
login, CSRF refusal, and the pages a radiologist may not open.

Decisions that must reach a PACS (approve, reject, two browsers approving at once) run on the real
services in tests/e2e/test_review_browser.py. One server, one held study and one browser serve every test
of this module; each test starts signed out.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from sqlalchemy import select

from ledger import migrations
from ledger.db import open_engine, session_scope, sessionmaker_for
from ledger.schema import AuditEvent
from review.app import ReviewActions
from specgate.settings import Settings
from tests.browser import chromium, image_loaded, sign_in, statuses, wait
from tests.integration.review.helpers import (
    PASSWORD,
    Recorder,
    ReviewServer,
    held_job,
    job_state,
    make_user,
    review_config,
)

SCRIPT = "<script>alert(1)</script>"
SERIES_MARKUP = "<img src=x onerror=alert(2)>"


@dataclass
class Site:
    url: str
    sessions: Any
    job_id: int
    recorder: Recorder


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, tiny_model: Any) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("review-browser")
    settings = Settings.load(data_dir=root / "data", database_url=f"sqlite:///{root / 'ledger.db'}")
    migrations.upgrade(settings.db_url)
    engine = open_engine(settings.db_url)
    sessions = sessionmaker_for(engine)
    job_id = held_job((settings, engine, sessions), root, tiny_model, patient_name=SCRIPT, calling_ae="CT_ROOM_2",
                      series_description=SERIES_MARKUP, station_name="SOMATOM-7")
    make_user(sessions, "anna", "radiologist")
    make_user(sessions, "root", "admin")
    rec = Recorder()
    try:
        with ReviewServer(review_config(settings), sessions, ReviewActions(deliver=rec.deliver,
                                                                           retract=rec.retract)) as srv:
            yield Site(srv.url, sessions, job_id, rec)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def _driver() -> Iterator[WebDriver]:
    driver = chromium()
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser(_driver: WebDriver, site: Site) -> WebDriver:
    """The module's browser, signed out (no cookies for the site) and with an empty performance log."""
    _driver.get(site.url + "/healthz")
    _driver.delete_all_cookies()
    _driver.get_log("performance")
    return _driver


def _study_path(site: Site) -> str:
    return f"/studies/{site.job_id}"


def test_a_request_without_a_session_is_sent_to_login_and_back_after_signing_in(browser: WebDriver,
                                                                                 site: Site) -> None:
    for path in ("/queue", _study_path(site)):
        browser.get(site.url + path)
        wait(browser).until(lambda d: "/login" in d.current_url)
        assert browser.current_url == f"{site.url}/login?next={path}"
        assert statuses(browser, path) == [303]
        assert browser.find_element(By.ID, "login-form").is_displayed()
        assert not browser.find_elements(By.ID, "patient-name")  # nothing of the study leaked
    sign_in(browser, site.url, "anna", PASSWORD, path=None)  # the form of the study's redirect
    assert browser.current_url == site.url + _study_path(site)
    assert browser.find_element(By.ID, "whoami").text.startswith("anna")


def test_sign_in_queue_study_and_step_through_slices_with_the_keyboard(browser: WebDriver, site: Site) -> None:
    sign_in(browser, site.url, "anna", PASSWORD)
    assert browser.current_url == site.url + "/queue"
    assert browser.title.startswith("(1) Review queue")
    row = browser.find_element(By.CSS_SELECTOR, f"#queue tr[data-job='{site.job_id}']")
    assert "CT_ROOM_2" in row.text and "SOMATOM-7" in row.text and "ABDOMEN" in row.text
    row.find_element(By.LINK_TEXT, "Open").click()
    wait(browser).until(lambda d: d.current_url == site.url + _study_path(site))
    assert browser.find_element(By.ID, "job-state").text == "held"
    img = browser.find_element(By.ID, "slice")
    n = int(img.get_attribute("data-slices") or 0)
    z0 = int(img.get_attribute("data-z") or 0)
    assert n > 3 and 0 <= z0 < n
    wait(browser).until(lambda d: image_loaded(d, "slice", f"/slices/{z0}.png"))
    label = browser.find_element(By.ID, "slice-label")
    assert label.text == f"slice {z0 + 1} / {n}"

    def step(key: str, expect: int) -> None:
        ActionChains(browser).send_keys(key).perform()
        wait(browser).until(lambda d: img.get_attribute("data-z") == str(expect))
        assert f"/slices/{expect}.png" in (img.get_attribute("src") or "")
        assert label.text == f"slice {expect + 1} / {n}"
        wait(browser).until(lambda d: image_loaded(d, "slice", f"/slices/{expect}.png"))  # it really loads

    # up from the start slice, or down when it is the last one
    up = z0 + 1 if z0 < n - 1 else z0 - 1
    step(Keys.ARROW_UP if up > z0 else Keys.ARROW_DOWN, up)
    step(Keys.ARROW_DOWN if up > z0 else Keys.ARROW_UP, z0)
    step(Keys.ARROW_DOWN if z0 > 0 else Keys.ARROW_UP, z0 - 1 if z0 > 0 else z0 + 1)
    # the study was viewed by anna: an audit row carrying the user
    with session_scope(site.sessions) as s:
        actors = s.execute(select(AuditEvent.actor).where(AuditEvent.action == "review.viewed",
                                                          AuditEvent.object_id == str(site.job_id))).scalars()
        assert "user:anna" in set(actors)


def test_a_script_as_patient_name_is_shown_as_text_and_never_runs(browser: WebDriver, site: Site) -> None:
    sign_in(browser, site.url, "anna", PASSWORD)
    browser.get(site.url + _study_path(site))
    banner = browser.find_element(By.ID, "patient")
    assert browser.find_element(By.ID, "patient-name").text == SCRIPT
    assert SCRIPT in banner.text and SERIES_MARKUP in browser.find_element(By.ID, "series-desc").text
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert  # noqa: B018 - the property raises when no dialog is open
    # neither value became an element: no script in the banner, no <img src=x> anywhere
    assert not banner.find_elements(By.TAG_NAME, "script")
    assert not browser.find_elements(By.CSS_SELECTOR, "img[src='x']")
    browser.get(site.url + "/queue")  # the series description in the queue, too
    assert SERIES_MARKUP in browser.find_element(By.ID, "queue").text
    assert not browser.find_elements(By.CSS_SELECTOR, "img[src='x']")
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert  # noqa: B018


def test_a_form_posted_without_its_csrf_token_is_refused(browser: WebDriver, site: Site) -> None:
    sign_in(browser, site.url, "anna", PASSWORD)
    browser.get(site.url + _study_path(site))
    browser.execute_script("document.querySelector('#approve-form input[name=csrf_token]').remove();")
    assert not browser.find_elements(By.CSS_SELECTOR, "#approve-form input[name=csrf_token]")
    browser.get_log("performance")
    browser.find_element(By.ID, "approve").click()
    wait(browser).until(lambda d: d.current_url.endswith("/approve"))
    title = wait(browser).until(lambda d: d.find_element(By.ID, "error-title"))
    assert "security token is missing or wrong" in title.text
    assert statuses(browser, f"{_study_path(site)}/approve") == [403]
    assert job_state(site.sessions, site.job_id) == "held" and site.recorder.delivered == []
    with session_scope(site.sessions) as s:
        refused = s.execute(select(AuditEvent).where(AuditEvent.action == "auth.csrf_refused")).scalars().all()
        assert [e.actor for e in refused][-1:] == ["user:anna"]
    browser.get(site.url + _study_path(site))  # the page again, with its token: the job still waits
    assert browser.find_element(By.ID, "job-state").text == "held"


def test_a_radiologist_cannot_open_reports_or_users_and_an_admin_can(browser: WebDriver, site: Site) -> None:
    sign_in(browser, site.url, "anna", PASSWORD)
    assert not browser.find_elements(By.ID, "nav-reports") and not browser.find_elements(By.ID, "nav-users")
    for path in ("/reports", "/users"):
        browser.get_log("performance")
        browser.get(site.url + path)
        assert browser.find_element(By.ID, "error-title").text == "this page is for administrators"
        assert statuses(browser, path) == [403]
        assert not browser.find_elements(By.CSS_SELECTOR, "section.report, #users")
    browser.delete_all_cookies()
    sign_in(browser, site.url, "root", PASSWORD)
    for path, marker in (("/reports", "section.report"), ("/users", "#users")):
        browser.get_log("performance")
        browser.get(site.url + path)
        assert browser.find_elements(By.CSS_SELECTOR, marker), path
        assert statuses(browser, path) == [200]
