"""The gate's scorecard (ledger.scorecard: ``specgate report gate``, ``gate-weekly``, ``gate-monthly``) on a
seeded ledger, SQLite and PostgreSQL.

Every seeded result (``CASES``) carries, written by hand, what it must count as (``expect``: approved,
rejected, undecided, released, retracted, or None for a result the scorecard leaves out, and the blind
audit's verdict); the expected figures are tallied here from those annotations, and each interval is
scipy's Wilson score interval (``binomtest(...).proportion_ci(method="wilson")``), never the code under test.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from scipy.stats import binomtest

from ledger.db import session_scope
from ledger.reports import REPORTS
from ledger.schema import (
    AuditSample,
    Job,
    Result,
    Retraction,
    Review,
    Series,
    Study,
)

D1, D2, D3, D4 = date(2026, 11, 30), date(2026, 12, 2), date(2026, 12, 8), date(2026, 10, 28)
WEEK = {D1: "2026-11-30", D2: "2026-11-30", D3: "2026-12-07", D4: "2026-10-26"}
MONTH = {D1: "2026-11-01", D2: "2026-12-01", D3: "2026-12-01", D4: "2026-10-01"}
A, B, C = ("CT_A", "SOMATOM"), ("CT_B", None), ("MR_C", "AVANTO")
LIVER, KIDNEY = "liver:1.0", "kidney:2.0"


def case(model: str, source: tuple[str, str | None], day: date, *, ood: bool, state: str, expect: str | None,
         review: str | None = None, retraction: tuple[str, str] | None = None, audit: str | None = None,
         superseded: bool = False, shadow: bool = False) -> dict[str, Any]:
    return {"model": model, "ae": source[0], "station": source[1], "day": day, "ood": ood, "state": state,
            "expect": expect, "review": review, "retraction": retraction, "audit": audit, "superseded": superseded,
            "shadow": shadow}


CASES = [
    # held by the gate (OODM > tau), and what the radiologist said
    case(LIVER, A, D1, ood=True, state="sent", review="approve", expect="approved"),
    case(LIVER, A, D1, ood=True, state="rejected", review="reject", expect="rejected"),
    case(LIVER, A, D2, ood=True, state="rejected", review="reject", expect="rejected"),
    case(LIVER, A, D2, ood=True, state="held", expect="undecided"),
    case(LIVER, B, D3, ood=True, state="sent", review="approve", expect="approved"),
    case(KIDNEY, C, D1, ood=True, state="rejected", review="reject", expect="rejected"),
    # superseded before anyone decided: left out; rejected, then superseded: the label counts
    case(LIVER, A, D1, ood=True, state="superseded", superseded=True, expect=None),
    case(LIVER, A, D2, ood=True, state="rejected", review="reject", superseded=True, expect="rejected"),
    # approved and sent, then retracted for quality: a label of the radiologist, not of the gate's release
    case(LIVER, B, D3, ood=True, state="sent", review="approve", retraction=("quality", "carol"), expect="approved"),
    # released by the gate
    case(LIVER, A, D1, ood=False, state="sent", expect="released"),
    case(LIVER, A, D1, ood=False, state="sent", retraction=("quality", "anna"), expect="retracted"),
    case(LIVER, A, D2, ood=False, state="sent", retraction=("patient_safety", "anna"), expect="released"),
    # the automatic retraction of a superseded version is no judgement: unlabelled and superseded, left out
    case(LIVER, A, D2, ood=False, state="superseded", retraction=("quality", "specgate"), superseded=True,
         expect=None),
    # ... and a current version whose earlier one was withdrawn by specgate counts as a plain release
    case(LIVER, A, D2, ood=False, state="sent", retraction=("quality", "specgate"), expect="released"),
    case(LIVER, B, D3, ood=False, state="sent", audit="agreed", expect="released"),
    case(LIVER, B, D3, ood=False, state="sent", audit="rejected", retraction=("quality", "bob"), expect="retracted"),
    case(LIVER, B, D3, ood=False, state="sent", audit="pending", expect="released"),
    case(LIVER, B, D3, ood=False, state="released", expect="released"),
    case(KIDNEY, C, D4, ood=False, state="sent", expect="released"),
    case(LIVER, C, D2, ood=False, state="superseded", superseded=True, audit="agreed", expect="released"),
    # held for another reason than the gate (a rule's when_incomplete): neither side
    case(LIVER, A, D1, ood=False, state="sent", review="approve", expect=None),
    case(LIVER, A, D2, ood=False, state="held", expect=None),
    # a shadow model's results (ledger.shadow: never sent, never reviewed) are no verdicts of a live gate
    case(LIVER, A, D1, ood=False, state="released", shadow=True, expect=None),
    case(LIVER, A, D2, ood=True, state="held", shadow=True, expect=None),
]


def _seed(sessions: Any) -> None:
    with session_scope(sessions) as s:
        for i, c in enumerate(CASES, start=1):
            made = datetime(c["day"].year, c["day"].month, c["day"].day, 9, i, 0, tzinfo=UTC)
            study = Study(study_instance_uid=f"1.2.826.0.1.9.{i}", calling_ae=c["ae"], first_received_at=made,
                          last_received_at=made)
            s.add(study)
            s.flush()
            s.add(Series(study_id=study.id, series_instance_uid=f"1.2.826.0.1.9.{i}.1", modality="CT",
                         station_name=c["station"]))
            live = None
            if c["shadow"]:  # the live job it ran beside (its own result is not seeded)
                live = Job(study_id=study.id, state="queued", series_instance_uid=f"1.2.826.0.1.9.{i}.1",
                           rule_name="r", created_at=made, updated_at=made)
                s.add(live)
                s.flush()
            job = Job(study_id=study.id, state=c["state"], series_instance_uid=f"1.2.826.0.1.9.{i}.1",
                      rule_name="silent" if c["shadow"] else "r", created_at=made, updated_at=made,
                      shadow=c["shadow"], shadow_of_id=live.id if live is not None else None)
            s.add(job)
            s.flush()
            res = Result(job_id=job.id, seg_path=f"r/{i}/seg.dcm", seg_sop_instance_uid=f"2.25.{i}",
                         seg_series_instance_uid=f"2.25.{i}.1", oodm=0.9 if c["ood"] else 0.1, tau=0.5,
                         is_ood=c["ood"], model_id=c["model"], weights_sha256="0" * 64, superseded=c["superseded"],
                         created_at=made)
            s.add(res)
            s.flush()
            if c["review"]:
                s.add(Review(job_id=job.id, username="rad", decision=c["review"],
                             reason="segmentation_wrong" if c["review"] == "reject" else None,
                             created_at=made + timedelta(hours=2)))
            if c["retraction"]:
                reason, user = c["retraction"]
                s.add(Retraction(job_id=job.id, result_id=res.id, kos_path=f"r/{i}/kos.dcm",
                                 kos_sop_instance_uid=f"2.25.{i}.9", kos_series_instance_uid=f"2.25.{i}.8",
                                 reason=reason, username=user, created_at=made + timedelta(days=3)))
            if c["audit"]:
                s.add(AuditSample(job_id=job.id, result_id=res.id, share=0.05, draw=0.01, state=c["audit"],
                                  created_at=made, reviewed_by=None if c["audit"] == "pending" else "dora"))


@pytest.fixture
def seeded(migrated) -> Iterator[Any]:
    _seed(migrated[2])
    yield migrated


def _wilson(k: int, n: int) -> tuple[float | None, float | None, float | None]:
    if n == 0:
        return None, None, None
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return k / n, float(ci.low), float(ci.high)


def expected(key: Callable[[dict[str, Any]], tuple[Any, ...]], names: tuple[str, ...],
             keep: Callable[[dict[str, Any]], bool] = lambda c: True) -> list[dict[str, Any]]:
    """The scorecard's rows tallied from the hand-written annotations."""
    groups: dict[tuple[Any, ...], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for c in CASES:
        if c["expect"] is None or not keep(c):
            continue
        g = groups[key(c)]
        if c["expect"] in ("approved", "rejected", "undecided"):
            g["held"] += 1
            g[c["expect"]] += 1
        else:
            g["released"] += 1
            g["retracted"] += c["expect"] == "retracted"
            if c["audit"]:
                g["audited"] += 1
                g["audit_agreed"] += c["audit"] == "agreed"
                g["audit_rejected"] += c["audit"] == "rejected"
    rows = []
    for k, g in groups.items():
        row = dict(zip(names, k, strict=True))
        for n in ("held", "approved", "rejected", "undecided", "released", "retracted", "audited", "audit_agreed",
                  "audit_rejected"):
            row[n] = g[n]
        for name, (num, den) in {"held_right": (g["rejected"], g["approved"] + g["rejected"]),
                                 "retracted_rate": (g["retracted"], g["released"]),
                                 "audit_miss": (g["audit_rejected"], g["audit_agreed"] + g["audit_rejected"])}.items():
            row[name], row[f"{name}_lo"], row[f"{name}_hi"] = _wilson(num, den)
        rows.append(row)
    return rows


def _assert_rows(got: list[dict[str, Any]], want: list[dict[str, Any]], names: tuple[str, ...]) -> None:
    by = {tuple(r[n] for n in names): r for r in got}
    assert set(by) == {tuple(r[n] for n in names) for r in want}
    for w in want:
        g = by[tuple(w[n] for n in names)]
        for k, v in w.items():
            assert g[k] == (pytest.approx(v, abs=1e-12) if isinstance(v, float) else v), (k, w, g)


def test_scorecard_per_model_and_source(seeded) -> None:
    _, _, sessions = seeded
    names = ("model_id", "calling_ae", "station_name")
    with session_scope(sessions) as s:
        got = REPORTS["gate"].run(s)
    want = expected(lambda c: (c["model"], c["ae"], c["station"]), names)
    _assert_rows(got, want, names)
    assert list(got[0]) == list(REPORTS["gate"].column_names)
    # the figures a committee would read, stated by hand for one source: liver on CT_A / SOMATOM
    a = next(r for r in got if r["model_id"] == LIVER and r["calling_ae"] == "CT_A")
    assert (a["held"], a["approved"], a["rejected"], a["undecided"]) == (5, 1, 3, 1)
    assert (a["released"], a["retracted"]) == (4, 1) and a["held_right"] == 0.75
    b = next(r for r in got if r["model_id"] == LIVER and r["calling_ae"] == "CT_B")
    assert (b["audited"], b["audit_agreed"], b["audit_rejected"], b["audit_miss"]) == (3, 1, 1, 0.5)
    assert b["audit_miss_lo"] == pytest.approx(0.0945, abs=1e-4) and b["audit_miss_hi"] == pytest.approx(0.9055, abs=1e-4)


def test_scorecard_per_week_and_month(seeded) -> None:
    _, _, sessions = seeded
    names = ("period", "model_id")
    with session_scope(sessions) as s:
        weekly, monthly = REPORTS["gate-weekly"].run(s), REPORTS["gate-monthly"].run(s)
    _assert_rows(weekly, expected(lambda c: (WEEK[c["day"]], c["model"]), names), names)
    _assert_rows(monthly, expected(lambda c: (MONTH[c["day"]], c["model"]), names), names)
    assert [r["period"] for r in weekly] == sorted(r["period"] for r in weekly)


def test_scorecard_period_selects_the_day_the_gate_decided(seeded) -> None:
    _, _, sessions = seeded
    names = ("model_id", "calling_ae", "station_name")
    with session_scope(sessions) as s:
        got = REPORTS["gate"].run(s, since=D2, until=D3)
    want = expected(lambda c: (c["model"], c["ae"], c["station"]), names, keep=lambda c: D2 <= c["day"] <= D3)
    _assert_rows(got, want, names)
    assert not any(r["model_id"] == KIDNEY for r in got)  # kidney's results are of D1 and D4


def test_specgate_report_gate_as_table_csv_and_json(seeded, cli) -> None:
    rows = json.loads(cli("report", "gate", "--format", "json").output)
    names = ("model_id", "calling_ae", "station_name")
    _assert_rows(rows, expected(lambda c: (c["model"], c["ae"], c["station"]), names), names)
    out = cli("report", "gate", "--format", "csv").output.splitlines()
    assert out[0].split(",")[:6] == ['"model_id"', '"calling_ae"', '"station_name"', '"held"', '"approved"',
                                     '"rejected"']
    assert len(out) == 1 + len(rows)
    table = cli("report", "gate").output
    assert table.startswith("The gate's scorecard by model and source, all days")
    assert "HELD RIGHT" in table and "AUDIT MISSED" in table and "75.0%" in table
    assert "gate-weekly" in cli("report", "--list").output
