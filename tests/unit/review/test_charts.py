"""review.charts: each chart is one inline-able, parseable SVG with its title; empty data is a chart too."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime

import pytest

from review.charts import ood_rate_chart, queue_age_chart, turnaround_chart

SVG = "{http://www.w3.org/2000/svg}"

OOD_ROWS = [
    {"day": "2026-12-01", "modality": "CT", "calling_ae": "PACS_A", "station_name": "CT_ONE", "model_id": "net:1.0",
     "results": 4, "ood": 1, "ood_rate": 0.25},
    {"day": "2026-12-02", "modality": "MR", "calling_ae": "MOD<B>", "station_name": "a$b$ <script>", "model_id": "net:1.0",
     "results": 2, "ood": 2, "ood_rate": 1.0},
    {"day": "2026-12-03", "modality": None, "calling_ae": "PACS_A", "station_name": None, "model_id": "net:2.0",
     "results": 1, "ood": 0, "ood_rate": 0.0},
]
TURNAROUND_ROWS = [
    {"day": "2026-12-01", "held": False, "jobs": 3, "p50_s": 300.0, "p90_s": 700.0, "p99_s": 790.0, "max_s": 800.0},
    {"day": "2026-12-01", "held": True, "jobs": 1, "p50_s": 800.0, "p90_s": 800.0, "p99_s": 800.0, "max_s": 800.0},
    {"day": "2026-12-02", "held": False, "jobs": 2, "p50_s": 150.0, "p90_s": 190.0, "p99_s": 199.0, "max_s": 200.0},
]
QUEUE_ROWS = [
    {"job_id": 7, "held_at": datetime(2026, 12, 3, 14, 2, tzinfo=UTC), "age_s": 7200.0, "modality": "CT",
     "body_part": "ABDOMEN", "calling_ae": "PACS_A", "station_name": "CT_ONE", "model_id": "net:2.0", "oodm": 3.2,
     "tau": 1.5},
    {"job_id": 8, "held_at": datetime(2026, 12, 3, 15, 1, tzinfo=UTC), "age_s": 3660.0, "modality": "<MR & $x$>",
     "body_part": None, "calling_ae": "MOD_B", "station_name": None, "model_id": "net:2.0", "oodm": 1.7, "tau": 1.5},
]


def _texts(svg: str) -> tuple[ET.Element, str]:
    assert svg.startswith("<svg") and "<?xml" not in svg and "<!DOCTYPE" not in svg
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    assert root.find(f".//{SVG}script") is None
    return root, " ".join("".join(t.itertext()) for t in root.iter(f"{SVG}text"))


@pytest.mark.parametrize(("chart", "rows", "title", "also"), [
    (ood_rate_chart, OOD_ROWS, "Out-of-distribution rate per day", ["all results", "CT", "MR", "no modality",
                                                                     "results out of distribution", "day (UTC)"]),
    (turnaround_chart, TURNAROUND_ROWS, "Turnaround: last instance received to delivery",
     ["sent straight away, p50", "reviewed, p99", "last instance to delivery (min)"]),
    (queue_age_chart, QUEUE_ROWS, "Review queue: age of held results",
     ["2 waiting, oldest 2.0 h", "<MR & $x$>", "time in the queue (h)", "held results"]),
])
def test_chart_is_svg_with_title_labels_and_legend(chart, rows, title, also) -> None:
    root, texts = _texts(chart(rows))
    assert title in texts
    for label in also:
        assert label in texts, label
    assert float(root.get("width", "0").removesuffix("pt")) > 300


@pytest.mark.parametrize("chart", [ood_rate_chart, turnaround_chart, queue_age_chart])
def test_no_rows_is_a_small_chart_that_says_so(chart) -> None:
    root, texts = _texts(chart([]))
    assert "no data in this period" in texts
    assert float(root.get("height", "0").removesuffix("pt")) < 200


def test_one_day_and_a_zero_age_still_draw() -> None:
    _texts(ood_rate_chart(OOD_ROWS[:1]))
    _texts(turnaround_chart(TURNAROUND_ROWS[2:]))
    _, texts = _texts(queue_age_chart([{**QUEUE_ROWS[0], "age_s": 0.0}]))
    assert "(s)" in texts


def test_two_charts_on_one_page_share_no_ids() -> None:
    ids = [{e.get("id") for e in ET.fromstring(svg).iter() if e.get("id")}
           for svg in (ood_rate_chart(OOD_ROWS), ood_rate_chart(OOD_ROWS))]
    assert ids[0] and not ids[0] & ids[1]
