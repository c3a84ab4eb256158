"""A multi-label result in a real headless Chromium (tests/browser.py): the review app served in-process by
uvicorn on a SQLite ledger, with a held four-label job written straight into the ledger and its result
folder (tests/integration/review/multilabel.py), as test_browser_pages.py serves its pipeline-made job.

The radiologist sees the label list (name, colour swatch as rendered by the browser, volume) and, in the
slice the browser shows, each label's outline in its colour (read from the decoded image through a canvas);
switching the overlay off leaves the grey slice."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By

from ledger import migrations
from ledger.db import open_engine, sessionmaker_for
from review.app import ReviewActions
from specgate.settings import Settings
from tests.browser import image_loaded, sign_in, wait
from tests.integration.review.helpers import PASSWORD, Recorder, ReviewServer, make_user, review_config
from tests.integration.review.multilabel import SLICE, MultiLabelJob, multilabel_job

_PIXEL = """
var img = document.getElementById('slice');
var c = document.createElement('canvas');
c.width = img.naturalWidth; c.height = img.naturalHeight;
var ctx = c.getContext('2d');
ctx.drawImage(img, 0, 0);
var d = ctx.getImageData(arguments[1], arguments[0], 1, 1).data;
return [d[0], d[1], d[2]];
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, MultiLabelJob]]:
    root = tmp_path_factory.mktemp("multilabel-browser")
    settings = Settings.load(data_dir=root / "data", database_url=f"sqlite:///{root / 'ledger.db'}")
    migrations.upgrade(settings.db_url)
    engine = open_engine(settings.db_url)
    sessions = sessionmaker_for(engine)
    job = multilabel_job(sessions, root, settings.results_dir)
    make_user(sessions, "anna", "radiologist")
    rec = Recorder()
    try:
        with ReviewServer(review_config(settings), sessions, ReviewActions(deliver=rec.deliver)) as srv:
            yield srv.url, job
    finally:
        engine.dispose()


def _pixel(driver: WebDriver, y: int, x: int) -> list[int]:
    return [int(v) for v in driver.execute_script(_PIXEL, y, x)]


def test_the_radiologist_sees_each_label_listed_and_drawn_in_its_colour(browser: WebDriver, site: Any) -> None:
    base, job = site
    sign_in(browser, base, "anna", PASSWORD)
    browser.find_element(By.CSS_SELECTOR, f"#queue tr[data-job='{job.job_id}'] a.button").click()
    wait(browser).until(lambda d: d.current_url == f"{base}/studies/{job.job_id}")

    rows = browser.find_elements(By.CSS_SELECTOR, "#labels tr.label")
    names = [r.find_element(By.CLASS_NAME, "label-name").text for r in rows]
    assert names == ["liver", "kidney_left", "kidney_right", "lesion <b>"]  # the text, escaped in the page
    voxel_ml = float(np.prod(job.spacing)) / 1000
    for row, segment in zip(rows, job.segments, strict=True):
        swatch = row.find_element(By.CLASS_NAME, "swatch")
        assert swatch.is_displayed() and swatch.size["width"] >= 10
        assert swatch.value_of_css_property("background-color") == "rgba({}, {}, {}, 1)".format(*segment.color)
        volume = f"{(job.label_map == segment.value).sum() * voxel_ml:.1f} mL"
        assert row.find_element(By.CLASS_NAME, "label-volume").text == volume
    assert "spleen" not in browser.find_element(By.ID, "labels").text  # the rule does not send it

    img = browser.find_element(By.ID, "slice")
    assert img.get_attribute("data-z") == str(SLICE)
    wait(browser).until(lambda d: image_loaded(d, "slice", f"/slices/{SLICE}.png"))
    overlay = browser.find_element(By.CSS_SELECTOR, "button.ov[data-overlay='mask']")
    assert overlay.text == "labels" and "on" in (overlay.get_attribute("class") or "")
    for segment, (y, x) in zip(job.segments[:3], [(8, 6), (36, 8), (36, 44)], strict=True):
        assert _pixel(browser, y, x) == list(segment.color), segment.label  # each outline in its colour
    lesion_y, lesion_x = 50, 28
    assert _pixel(browser, lesion_y, lesion_x) == list(job.segments[3].color)

    # a click on a label shows the slice where it is largest
    rows[1].click()
    wait(browser).until(lambda d: img.get_attribute("data-z") == "4")
    wait(browser).until(lambda d: image_loaded(d, "slice", "/slices/4.png"))
    assert browser.find_element(By.ID, "slice-label").text == f"slice 5 / {job.label_map.shape[0]}"
    assert _pixel(browser, 36, 8) == list(job.segments[1].color)
    rows[3].click()
    wait(browser).until(lambda d: img.get_attribute("data-z") == str(SLICE))
    wait(browser).until(lambda d: image_loaded(d, "slice", f"/slices/{SLICE}.png"))

    browser.find_element(By.CSS_SELECTOR, "button.ov[data-overlay='none']").click()
    wait(browser).until(lambda d: image_loaded(d, "slice", "overlay=none"))
    r, g, b = _pixel(browser, 8, 6)
    assert r == g == b  # the overlay is off: the grey slice
