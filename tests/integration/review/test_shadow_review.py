"""Silent mode in the review app (:mod:`ledger.shadow`), over real HTTP (uvicorn in-process, SQLite ledger)
and in a real headless Chromium (tests/browser.py).

A held live result (tests/integration/review/multilabel.py, real SEG) and, beside it, a shadow result of
another model, held by its own gate too: the shadow result is not in the radiologists' queue nor in the
held count; the Shadow tab lists it beside its live job, with the masks' DSC; its study page is read-only
(no approve, reject or retract form); a POST that approves it anyway is refused with a clear message, the
refusal audited with the user, nothing sent; the reports page shows the side-by-side report and its chart.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from sqlalchemy import select

from dicom_series import load_series
from ledger import jobs, migrations
from ledger.db import open_engine, session_scope, sessionmaker_for
from ledger.schema import AuditEvent, Job, JobState, Study
from review.app import ReviewActions
from specgate.settings import Settings
from tests.browser import sign_in, wait
from tests.integration.review.helpers import (
    PASSWORD,
    Client,
    Recorder,
    ReviewServer,
    job_state,
    make_user,
    review_config,
)
from tests.integration.review.multilabel import multilabel_job, write_result
from worker.labels import ModelIdentity
from worker.shadow import compare_ready

SHADOW = ModelIdentity("abdomen-net-v3", "3.0.0", "7f" * 32)


@dataclass
class Site:
    url: str
    sessions: Any
    live: int
    shadow: int
    recorder: Recorder


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("shadow-review")
    settings = Settings.load(data_dir=root / "data", database_url=f"sqlite:///{root / 'ledger.db'}")
    migrations.upgrade(settings.db_url)
    engine = open_engine(settings.db_url)
    sessions = sessionmaker_for(engine)
    live = multilabel_job(sessions, root, settings.results_dir)
    with session_scope(sessions) as s:
        live_job = s.get(Job, live.job_id)
        study = s.get(Study, live_job.study_id) if live_job is not None else None
        assert live_job is not None and study is not None
        beside = jobs.create_job(s, study, actor="test", rule_name="abdomen-v3", model_name=SHADOW.name,
                                 series_instance_uid=live_job.series_instance_uid, shadow=True, shadow_of=live_job)
        jobs.transition(s, beside.id, JobState.RUNNING, actor="test", task_id="t2", attempts=1)
        shadow_id, version = beside.id, beside.version
    volume = load_series(sorted((root / "multilabel-series").iterdir()))
    write_result(sessions, settings.results_dir, shadow_id, version, volume, np.roll(live.label_map, 2, axis=1),
                 is_ood=True, model=SHADOW)
    assert compare_ready(sessions, shadow_id, settings.worker_config().pipeline.files, actor="worker") == 1
    make_user(sessions, "anna", "radiologist")
    make_user(sessions, "root", "admin")
    rec = Recorder()
    try:
        with ReviewServer(review_config(settings), sessions, ReviewActions(deliver=rec.deliver)) as srv:
            yield Site(srv.url, sessions, live.job_id, shadow_id, rec)
    finally:
        engine.dispose()


def _signed_in(site: Site, user: str = "anna") -> Client:
    client = Client(site.url)
    assert client.login(user).status == 303
    return client


def test_the_shadow_result_is_not_in_the_queue_but_in_the_shadow_tab(site: Site) -> None:
    client = _signed_in(site)
    queue = client.get("/queue").text
    assert f'data-job="{site.live}"' in queue and f'data-job="{site.shadow}"' not in queue
    assert "(1) Review queue" in queue  # the held count: the live result only
    page = client.get("/shadow")
    assert page.status == 200
    [row] = re.findall(r'<tr data-job="(\d+)">(.*?)</tr>', page.text, re.S)
    assert row[0] == str(site.shadow)
    assert f'<a href="/studies/{site.live}">{site.live}</a>' in row[1] and SHADOW.name in row[1]
    dsc = re.search(r'class="num dsc">([0-9.]+)<', row[1])
    assert dsc is not None and 0.0 < float(dsc.group(1)) < 1.0


def test_the_shadow_study_page_is_read_only_and_an_approval_is_refused(site: Site) -> None:
    client = _signed_in(site)
    page = client.get(f"/studies/{site.shadow}").text
    assert 'id="shadow-banner"' in page and "never sent, never approved" in page
    assert 'id="approve-form"' not in page and 'id="reject-form"' not in page and 'id="retract-form"' not in page
    live_page = client.get(f"/studies/{site.live}").text
    assert 'id="approve-form"' in live_page  # the live one is decided as ever (and not "superseded" by it)

    token = client.csrf(f"/studies/{site.shadow}")
    reply = client.post(f"/studies/{site.shadow}/approve", {"csrf_token": token, "note": "try"})
    assert reply.status == 303
    shown = client.get(reply.location or "").text
    assert f"not approved: job {site.shadow} is a shadow result (model {SHADOW.name})" in shown
    assert job_state(site.sessions, site.shadow) == "held" and site.recorder.delivered == []
    with site.sessions() as s:
        refused = s.execute(select(AuditEvent).where(AuditEvent.action == "review.refused",
                                                     AuditEvent.object_id == str(site.shadow))).scalars().all()
    assert [(e.actor, e.details["refused"]) for e in refused] == [("user:anna", "approved")]


def test_the_reports_page_shows_the_side_by_side_report(site: Site) -> None:
    page = _signed_in(site, "root").get("/reports").text
    section = page[page.index('id="report-shadow"'):]
    section = section[:section.index("</section>")]
    assert f"<td>{SHADOW.name}</td><td>default</td><td>1</td><td>1</td>" in section  # shadow, live model, studies, compared
    assert "Shadow models: the two gates" in page  # the chart (review/charts.py), drawn with the row


def test_the_shadow_tab_renders_in_chromium(browser: WebDriver, site: Site, tmp_path: Path) -> None:
    sign_in(browser, site.url, "anna", PASSWORD)
    browser.find_element(By.ID, "nav-shadow").click()
    wait(browser).until(lambda d: d.current_url == f"{site.url}/shadow")
    rows = browser.find_elements(By.CSS_SELECTOR, "#shadow tbody tr")
    assert [r.get_attribute("data-job") for r in rows] == [str(site.shadow)]
    cells = rows[0].find_elements(By.TAG_NAME, "td")
    assert rows[0].is_displayed() and cells[2].text == SHADOW.name and cells[5].text == "OOD"
    assert (cells[6].text.split()[0], cells[7].text, cells[8].text) == (str(site.live), "default", "OOD")
    rows[0].find_element(By.CSS_SELECTOR, "a.button").click()
    wait(browser).until(lambda d: d.current_url == f"{site.url}/studies/{site.shadow}")
    assert browser.find_element(By.ID, "shadow-banner").is_displayed()
    assert browser.find_elements(By.ID, "approve-form") == []
    assert browser.save_screenshot(str(tmp_path / "shadow.png"))
