"""The administrators' reports (migration 0006's views, ledger.reports, ``specgate report``) on SQLite and
PostgreSQL.

The ledger is seeded from one spec (``STUDIES``: studies, series, instances at known times, jobs, results,
reviews by two reviewers, deliveries sent, retried and failed, ``job.held`` audit events); every expected
figure is computed here from that spec with plain arithmetic and ``numpy.percentile``, never by the code
under test.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select, text

from ledger import audit
from ledger.db import session_scope
from ledger.reports import REPORTS
from ledger.schema import AuditEvent, Delivery, Instance, Job, Result, Review, Series, Study

D1, D2, D3 = date(2026, 12, 1), date(2026, 12, 2), date(2026, 12, 3)


def at(day: date, hms: str) -> datetime:
    h, m, s = (int(x) for x in hms.split(":"))
    return datetime(day.year, day.month, day.day, h, m, s, tzinfo=UTC)


def sent(dest: str, when: datetime, attempts: int = 1) -> dict[str, Any]:
    return {"dest": dest, "state": "sent", "attempts": attempts, "sent_at": when, "updated_at": when,
            "last_status": 0, "last_error": None}


def failed(dest: str, when: datetime, attempts: int, status: int | None, error: str, state: str = "failed",
           cls: str = "") -> dict[str, Any]:
    return {"dest": dest, "state": state, "attempts": attempts, "sent_at": None, "updated_at": when,
            "last_status": status, "last_error": error, "class": cls}


def result(created: datetime, *, ood: bool, model: str = "net:1.0", superseded: bool = False,
           oodm: float = 0.5, tau: float = 1.0) -> dict[str, Any]:
    return {"created": created, "ood": ood, "model": model, "superseded": superseded, "oodm": oodm, "tau": tau}


def job(series: str, created: datetime, state: str, updated: datetime, *, result: dict[str, Any] | None = None,
        held: datetime | None = None, held_event: bool = True, reviews: tuple[tuple[str, str, datetime], ...] = (),
        deliveries: tuple[dict[str, Any], ...] = (), reason: str | None = None) -> dict[str, Any]:
    return {"series": series, "created": created, "state": state, "updated": updated, "result": result,
            "held": held, "held_event": held_event, "reviews": reviews, "deliveries": deliveries, "reason": reason}


def series(uid: str, modality: str, station: str | None, *times: datetime, body_part: str = "ABDOMEN") -> dict[str, Any]:
    return {"uid": uid, "modality": modality, "station": station, "body_part": body_part, "times": times}


def study(uid: str, ae: str, series_: list[dict[str, Any]], jobs_: list[dict[str, Any]]) -> dict[str, Any]:
    return {"uid": uid, "ae": ae, "series": series_, "jobs": jobs_}


REFUSED = "could not connect to 10.0.0.9:104 (refused, unreachable, or no answer to the association request)"

STUDIES: list[dict[str, Any]] = [
    # D1: released and sent to two destinations (turnaround from 08:00:30 to the first, 08:05:30)
    study("1.2.826.0.1.1", "PACS_A",
          [series("1.2.826.0.1.1.1", "CT", "CT_ONE", at(D1, "08:00:00"), at(D1, "08:00:10"), at(D1, "08:00:30")),
           series("1.2.826.0.1.1.2", "CT", "CT_ONE", at(D1, "08:00:20"), body_part="LOCALIZER")],
          [job("1.2.826.0.1.1.1", at(D1, "08:02:00"), "sent", at(D1, "08:06:00"),
               result=result(at(D1, "08:04:00"), ood=False),
               deliveries=(sent("PACS", at(D1, "08:05:30")), sent("ARCHIVE", at(D1, "08:06:00"))))]),
    # D1: held, approved by alice after 600 s, sent
    study("1.2.826.0.1.2", "PACS_A",
          [series("1.2.826.0.1.2.1", "CT", "CT_ONE", at(D1, "09:00:00"), at(D1, "09:00:40"))],
          [job("1.2.826.0.1.2.1", at(D1, "09:02:00"), "sent", at(D1, "09:14:00"),
               result=result(at(D1, "09:02:50"), ood=True, oodm=2.0), held=at(D1, "09:03:00"),
               reviews=(("alice", "approve", at(D1, "09:13:00")),), deliveries=(sent("PACS", at(D1, "09:14:00")),))]),
    # D1: version 1 sent, then superseded by version 2 when a new instance arrived at 10:05
    study("1.2.826.0.1.3", "MOD_B",
          [series("1.2.826.0.1.3.1", "MR", "MR_TWO", at(D1, "10:00:00"), at(D1, "10:05:00"), body_part="BRAIN")],
          [job("1.2.826.0.1.3.1", at(D1, "10:01:00"), "sent", at(D1, "10:03:30"),
               result=result(at(D1, "10:02:00"), ood=True, superseded=True),
               deliveries=(sent("PACS", at(D1, "10:03:30")),)),
           job("1.2.826.0.1.3.1", at(D1, "10:06:00"), "sent", at(D1, "10:08:00"),
               result=result(at(D1, "10:07:00"), ood=False), deliveries=(sent("PACS", at(D1, "10:08:00")),))]),
    # D2: held, rejected by bob after 1800 s
    study("1.2.826.0.1.4", "MOD_B",
          [series("1.2.826.0.1.4.1", "MR", "MR_TWO", at(D2, "11:00:00"), at(D2, "11:00:05"), body_part="BRAIN")],
          [job("1.2.826.0.1.4.1", at(D2, "11:01:00"), "rejected", at(D2, "11:32:00"),
               result=result(at(D2, "11:01:50"), ood=True), held=at(D2, "11:02:00"),
               reviews=(("bob", "reject", at(D2, "11:32:00")),))]),
    # D2: held, approved by bob after 600 s, the destination out of resources: the job failed
    study("1.2.826.0.1.5", "PACS_A",
          [series("1.2.826.0.1.5.1", "CT", None, at(D2, "12:00:00"))],
          [job("1.2.826.0.1.5.1", at(D2, "12:01:00"), "failed", at(D2, "12:20:00"), reason="delivery_failed",
               result=result(at(D2, "12:01:50"), ood=True), held=at(D2, "12:02:00"),
               reviews=(("bob", "approve", at(D2, "12:12:00")),),
               deliveries=(failed("PACS", at(D2, "12:20:00"), 3, 0xA700, "peer out of resources (0xA700)",
                                  cls="out of resources"),))]),
    # D2: sent to PACS on the second attempt; the archive never answered
    study("1.2.826.0.1.6", "PACS_A",
          [series("1.2.826.0.1.6.1", "CT", "CT_ONE", at(D2, "13:00:00"))],
          [job("1.2.826.0.1.6.1", at(D2, "13:01:00"), "sent", at(D2, "13:03:00"),
               result=result(at(D2, "13:02:00"), ood=False),
               deliveries=(sent("PACS", at(D2, "13:03:00"), attempts=2),
                           failed("ARCHIVE", at(D2, "13:10:00"), 3, None, REFUSED, cls="no connection")))]),
    # D3: held now (with its audit event)
    study("1.2.826.0.1.7", "PACS_A",
          [series("1.2.826.0.1.7.1", "CT", "CT_ONE", at(D3, "14:00:00"))],
          [job("1.2.826.0.1.7.1", at(D3, "14:01:00"), "held", at(D3, "14:02:00"),
               result=result(at(D3, "14:01:50"), ood=True, model="net:2.0", oodm=3.25, tau=1.5),
               held=at(D3, "14:02:00"))]),
    # D3: held now, no job.held event (the queue falls back to updated_at)
    study("1.2.826.0.1.8", "MOD_B",
          [series("1.2.826.0.1.8.1", "MR", "MR_TWO", at(D3, "15:00:00"), body_part="BRAIN")],
          [job("1.2.826.0.1.8.1", at(D3, "15:00:30"), "held", at(D3, "15:01:00"),
               result=result(at(D3, "15:00:50"), ood=True, model="net:2.0", oodm=1.75, tau=1.5),
               held=at(D3, "15:01:00"), held_event=False)]),
    # failed jobs without results
    study("1.2.826.0.1.9", "PACS_A",
          [series("1.2.826.0.1.9.1", "CT", "CT_ONE", at(D2, "16:00:00"))],
          [job("1.2.826.0.1.9.1", at(D2, "16:01:00"), "failed", at(D2, "16:02:00"), reason="corrupt_series")]),
    study("1.2.826.0.1.10", "PACS_A",
          [series("1.2.826.0.1.10.1", "CT", "CT_ONE", at(D3, "09:00:00"))],
          [job("1.2.826.0.1.10.1", at(D3, "09:01:00"), "failed", at(D3, "09:30:00"), reason="timeout")]),
    # D2: held, rejected by alice after 1200 s
    study("1.2.826.0.1.11", "PACS_A",
          [series("1.2.826.0.1.11.1", "CT", "CT_ONE", at(D2, "08:00:00"), at(D2, "08:00:02"))],
          [job("1.2.826.0.1.11.1", at(D2, "08:01:00"), "rejected", at(D2, "08:22:00"),
               result=result(at(D2, "08:01:30"), ood=True), held=at(D2, "08:02:00"),
               reviews=(("alice", "reject", at(D2, "08:22:00")),))]),
    # D2: three more released CT studies (turnarounds 100, 400, 1000 s), with the archive struggling
    *[study(f"1.2.826.0.1.{n}", "PACS_A",
            [series(f"1.2.826.0.1.{n}.1", "CT", "CT_ONE", at(D2, f"{h}:00:00"))],
            [job(f"1.2.826.0.1.{n}.1", at(D2, f"{h}:01:00"), "sent", at(D2, f"{h}:30:00"),
                 result=result(at(D2, f"{h}:01:30"), ood=False),
                 deliveries=(sent("PACS", at(D2, f"{h}:00:00") + timedelta(seconds=tat)), *extra))])
      for n, h, tat, extra in (
          (12, 17, 100, ()),
          (13, 18, 400, (failed("ARCHIVE", at(D2, "18:30:00"), 2, None,
                                "association rejected (transient): local limit exceeded", state="pending",
                                cls="association rejected"),)),
          (14, 19, 1000, (failed("ARCHIVE", at(D2, "19:30:00"), 3, 0xA900, "peer refused the object (0xA900)",
                                 cls="refused"),)))],
]


# ------------------------------------------------------------------------------------------------ seeding
def _audit_at(s: Any, ts: datetime, action: str, object_type: str, object_id: int) -> None:
    """An audit event at a known time, chained like ledger.audit.append chains them."""
    prev = s.execute(select(AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1)).scalar() or audit.GENESIS_HASH
    ev = AuditEvent(ts=ts, actor="test", action=action, object_type=object_type, object_id=str(object_id),
                    details={}, prev_hash=prev)
    ev.hash = audit.event_hash(ts=ts, actor="test", action=action, object_type=object_type,
                               object_id=str(object_id), details={}, prev_hash=prev)
    s.add(ev)
    s.flush()


def seed(sessions: Any) -> dict[int, int]:
    """Write STUDIES into the ledger; returns {id(job spec): job id}."""
    ids: dict[int, int] = {}
    n_inst = 0
    with session_scope(sessions) as s:
        for st in STUDIES:
            times = [t for se in st["series"] for t in se["times"]]
            study_row = Study(study_instance_uid=st["uid"], calling_ae=st["ae"], first_received_at=min(times),
                              last_received_at=max(times), received_count=len(times), assembled_count=len(times))
            s.add(study_row)
            s.flush()
            for se in st["series"]:
                series_row = Series(study_id=study_row.id, series_instance_uid=se["uid"], modality=se["modality"],
                                    station_name=se["station"], body_part=se["body_part"])
                s.add(series_row)
                s.flush()
                for t in se["times"]:
                    n_inst += 1
                    s.add(Instance(series_id=series_row.id, sop_instance_uid=f"{se['uid']}.{n_inst}",
                                   sop_class_uid="1.2.840.10008.5.1.4.1.1.2", spool_path=f"/spool/{n_inst}.dcm",
                                   size_bytes=1000 + n_inst, sha256="0" * 64, calling_ae=st["ae"], received_at=t))
            for version, jb in enumerate(st["jobs"], start=1):
                job_row = Job(study_id=study_row.id, version=version, state=jb["state"],
                              series_instance_uid=jb["series"], reason_code=jb["reason"], created_at=jb["created"],
                              updated_at=jb["updated"])
                s.add(job_row)
                s.flush()
                ids[id(jb)] = job_row.id
                _audit_at(s, jb["created"], "job.created", "job", job_row.id)
                # a decoy: another object with the same id, an event named like the job's
                _audit_at(s, jb["created"] - timedelta(days=30), "job.held", "study", job_row.id)
                if jb["held"] is not None and jb["held_event"]:
                    _audit_at(s, jb["held"], "job.held", "job", job_row.id)
                r = jb["result"]
                if r is None:
                    continue
                res = Result(job_id=job_row.id, seg_path="/seg", seg_sop_instance_uid=f"{jb['series']}.9{version}",
                             seg_series_instance_uid=f"{jb['series']}.8{version}", oodm=r["oodm"], tau=r["tau"],
                             is_ood=r["ood"], model_id=r["model"], weights_sha256="1" * 64,
                             superseded=r["superseded"], created_at=r["created"])
                s.add(res)
                s.flush()
                for user, decision, when in jb["reviews"]:
                    s.add(Review(job_id=job_row.id, username=user, decision=decision,
                                 reason="not the organ" if decision == "reject" else None, created_at=when))
                for d in jb["deliveries"]:
                    s.add(Delivery(job_id=job_row.id, result_id=res.id, destination=d["dest"], ae_title=d["dest"],
                                   host="127.0.0.1", port=104, state=d["state"], attempts=d["attempts"],
                                   last_status=d["last_status"], last_error=d["last_error"],
                                   created_at=r["created"], updated_at=d["updated_at"], sent_at=d["sent_at"]))
    return ids


@pytest.fixture
def seeded(migrated) -> Iterator[tuple[Any, Any, dict[int, int]]]:
    settings, engine, sessions = migrated
    ids = seed(sessions)
    yield engine, sessions, ids


# ------------------------------------------------------------------------------- expectations, from STUDIES
def _jobs() -> Iterator[tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]]:
    """(study, job, the job's series) for every job in the spec."""
    for st in STUDIES:
        for jb in st["jobs"]:
            yield st, jb, next((se for se in st["series"] if se["uid"] == jb["series"]), None)


def _in(day: date, since: date | None, until: date | None) -> bool:
    return (since is None or day >= since) and (until is None or day <= until)


def expected_volume(since: date | None = None, until: date | None = None) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    n = 0
    for st in STUDIES:
        for se in st["series"]:
            for t in se["times"]:
                n += 1
                if not _in(t.date(), since, until):
                    continue
                g = groups.setdefault((t.date().isoformat(), se["modality"]),
                                      {"studies": set(), "series": set(), "instances": 0, "bytes": 0})
                g["studies"].add(st["uid"])
                g["series"].add(se["uid"])
                g["instances"] += 1
                g["bytes"] += 1000 + n
    return [{"day": d, "modality": m, "studies": len(g["studies"]), "series": len(g["series"]),
             "instances": g["instances"], "bytes": g["bytes"]} for (d, m), g in sorted(groups.items())]


def expected_turnaround_rows() -> list[dict[str, Any]]:
    """One row per delivered job: the view's figures."""
    out = []
    for st, jb, se in _jobs():
        sends = [d["sent_at"] for d in jb["deliveries"] if d["state"] == "sent"]
        if not sends:
            continue
        seen = [t for s in st["series"] for t in s["times"] if t <= jb["created"]]
        start, delivered = max(seen), min(sends)
        out.append({"day": delivered.date().isoformat(), "modality": se["modality"], "calling_ae": st["ae"],
                    "station_name": se["station"], "model_id": jb["result"]["model"], "held": bool(jb["reviews"]),
                    "last_received_at": start, "delivered_at": delivered,
                    "turnaround_seconds": (delivered - start).total_seconds()})
    return out


def _pcts(xs: list[float]) -> dict[str, float]:
    return {"jobs": len(xs), "p50_s": float(np.percentile(xs, 50)), "p90_s": float(np.percentile(xs, 90)),
            "p99_s": float(np.percentile(xs, 99)), "max_s": max(xs)}


def _sort_none_last(rows: list[dict[str, Any]], *keys: str) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: tuple((r[k] is None, r[k] if r[k] is not None else "") for k in keys))


def expected_turnaround(by: tuple[str, ...], since: date | None = None,
                        until: date | None = None) -> list[dict[str, Any]]:
    groups: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    for r in expected_turnaround_rows():
        if _in(date.fromisoformat(r["day"]), since, until):
            groups[tuple(r[k] for k in by)].append(r["turnaround_seconds"])
    return _sort_none_last([{**dict(zip(by, k, strict=True)), **_pcts(xs)} for k, xs in groups.items()], *by)


def expected_ood_rate(since: date | None = None, until: date | None = None) -> list[dict[str, Any]]:
    groups: dict[tuple[Any, ...], list[bool]] = defaultdict(list)
    for st, jb, se in _jobs():
        r = jb["result"]
        if r is None or r["superseded"] or not _in(r["created"].date(), since, until):
            continue
        groups[(r["created"].date().isoformat(), se["modality"], st["ae"], se["station"], r["model"])].append(r["ood"])
    keys = ("day", "modality", "calling_ae", "station_name", "model_id")
    rows = [{**dict(zip(keys, k, strict=True)), "results": len(v), "ood": sum(v), "ood_rate": sum(v) / len(v)}
            for k, v in groups.items()]
    return _sort_none_last(rows, *keys)


def expected_queue() -> list[dict[str, Any]]:
    rows = [{"held_at": jb["held"], "modality": se["modality"], "body_part": se["body_part"], "calling_ae": st["ae"],
             "station_name": se["station"], "model_id": jb["result"]["model"], "oodm": jb["result"]["oodm"],
             "tau": jb["result"]["tau"], "spec": jb}
            for st, jb, se in _jobs() if jb["state"] == "held"]
    return sorted(rows, key=lambda r: r["held_at"])


def expected_decisions(since: date | None = None, until: date | None = None) -> list[dict[str, Any]]:
    return [{"username": user, "decision": decision, "day": when.date().isoformat(), "held_at": jb["held"],
             "decided_at": when, "decision_seconds": (when - jb["held"]).total_seconds(), "modality": se["modality"],
             "spec": jb}
            for st, jb, se in _jobs() for user, decision, when in jb["reviews"] if _in(when.date(), since, until)]


def expected_reviewers(since: date | None = None, until: date | None = None) -> list[dict[str, Any]]:
    per: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for d in expected_decisions(since, until):
        per[d["username"]].append(d)
    out = []
    for user, ds in sorted(per.items()):
        times = [d["decision_seconds"] for d in ds]
        out.append({"reviewer": user, "decisions": len(ds), "approved": sum(d["decision"] == "approve" for d in ds),
                    "rejected": sum(d["decision"] == "reject" for d in ds),
                    "median_s": float(np.percentile(times, 50)), "p90_s": float(np.percentile(times, 90))})
    return out


def expected_delivery_failure_rows() -> list[dict[str, Any]]:
    return [{**d, "spec": jb, "cls": d.get("class") or ("sent after retries" if d["state"] == "sent" else "")}
            for _, jb, _ in _jobs() for d in jb["deliveries"] if d["state"] == "failed" or d["attempts"] > 1]


def expected_delivery_failures(since: date | None = None, until: date | None = None) -> list[dict[str, Any]]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for d in expected_delivery_failure_rows():
        if _in(d["updated_at"].date(), since, until):
            status = None if d["last_status"] is None else f"0x{d['last_status']:04X}"
            groups[(d["dest"], status, d["cls"])].append(d)
    rows = []
    for (dest, status, cls), ds in groups.items():
        last = max(ds, key=lambda d: d["updated_at"])
        rows.append({"destination": dest, "status": status, "error_class": cls, "deliveries": len(ds),
                     "failed": sum(d["state"] == "failed" for d in ds), "attempts": sum(d["attempts"] for d in ds),
                     "last_at": last["updated_at"], "last_error": last["last_error"]})
    return _sort_none_last(rows, "destination", "status", "error_class")


def expected_failed_jobs(since: date | None = None, until: date | None = None) -> list[dict[str, Any]]:
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for _, jb, _ in _jobs():
        if jb["state"] == "failed" and _in(jb["updated"].date(), since, until):
            counts[(jb["updated"].date().isoformat(), jb["reason"])] += 1
    return [{"day": d, "reason_code": r, "jobs": n} for (d, r), n in sorted(counts.items())]


def test_the_spec_covers_what_the_reports_must_tell_apart() -> None:
    """Guards the seed itself, so the checks below cannot pass on degenerate data."""
    rows = expected_turnaround_rows()
    assert len(rows) == 8 and {r["held"] for r in rows} == {True, False}
    assert len({r["turnaround_seconds"] for r in rows}) >= 6
    superseded_v1 = next(r for r in rows if r["turnaround_seconds"] == 210.0)  # not -90: a later instance
    assert superseded_v1["modality"] == "MR"
    assert {d["cls"] for d in expected_delivery_failure_rows()} == {
        "out of resources", "no connection", "association rejected", "refused", "sent after retries"}
    assert [r["reviewer"] for r in expected_reviewers()] == ["alice", "bob"]
    assert len(expected_queue()) == 2 and len(expected_failed_jobs()) == 3


# ------------------------------------------------------------------------------------------------- views
def _view(engine: Any, sql: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(text(sql)).mappings()]


def _ts(value: Any) -> datetime:
    """A timestamp read from a view: PostgreSQL gives datetimes, SQLite gives UTC text."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def test_view_daily_volume(seeded) -> None:
    engine, _, _ = seeded
    got = _view(engine, "SELECT day, modality, studies, series, instances, bytes FROM v_daily_volume "
                        "ORDER BY day, modality")
    assert got == expected_volume()


def test_view_turnaround(seeded) -> None:
    engine, _, ids = seeded
    got = _view(engine, "SELECT * FROM v_turnaround")
    want = expected_turnaround_rows()
    assert len(got) == len(want)
    key = lambda r: (_ts(r["delivered_at"]), r["turnaround_seconds"])  # noqa: E731
    for g, w in zip(sorted(got, key=key), sorted(want, key=key), strict=True):
        assert (g["day"], g["modality"], g["calling_ae"], g["station_name"], g["model_id"], bool(g["held"])) == \
            (w["day"], w["modality"], w["calling_ae"], w["station_name"], w["model_id"], w["held"])
        assert _ts(g["last_received_at"]) == w["last_received_at"]
        assert _ts(g["delivered_at"]) == w["delivered_at"]
        assert g["turnaround_seconds"] == w["turnaround_seconds"]  # to the millisecond, exactly
    delivered = {ids[id(jb)] for _, jb, _ in _jobs() if any(d["state"] == "sent" for d in jb["deliveries"])}
    assert {r["job_id"] for r in got} == delivered


def test_view_ood_rate(seeded) -> None:
    engine, _, _ = seeded
    got = _view(engine, "SELECT day, modality, calling_ae, station_name, model_id, results, ood, ood_rate "
                        "FROM v_ood_rate")
    got = _sort_none_last(got, "day", "modality", "calling_ae", "station_name", "model_id")
    want = expected_ood_rate()
    assert [{**g, "ood_rate": pytest.approx(g["ood_rate"])} for g in got] == want


def test_view_review_queue(seeded) -> None:
    engine, _, ids = seeded
    before = datetime.now(UTC)
    got = _view(engine, "SELECT * FROM v_review_queue")
    after = datetime.now(UTC)
    want = expected_queue()
    got.sort(key=lambda r: _ts(r["held_at"]))
    assert [r["job_id"] for r in got] == [ids[id(w["spec"])] for w in want]
    for g, w in zip(got, want, strict=True):
        assert _ts(g["held_at"]) == w["held_at"] and g["day"] == w["held_at"].date().isoformat()
        assert (g["modality"], g["body_part"], g["calling_ae"], g["station_name"], g["model_id"], g["oodm"],
                g["tau"]) == (w["modality"], w["body_part"], w["calling_ae"], w["station_name"], w["model_id"],
                              w["oodm"], w["tau"])
        # the database's clock between the two readings of ours (SQLite: milliseconds)
        assert (before - w["held_at"]).total_seconds() - 0.01 <= g["age_seconds"] <= \
            (after - w["held_at"]).total_seconds() + 0.01


def test_view_review_decisions(seeded) -> None:
    engine, _, ids = seeded
    got = _view(engine, "SELECT * FROM v_review_decisions ORDER BY review_id")
    want = sorted(expected_decisions(), key=lambda d: d["decided_at"])
    got.sort(key=lambda r: _ts(r["decided_at"]))
    assert len(got) == len(want) == 4
    for g, w in zip(got, want, strict=True):
        assert (g["job_id"], g["username"], g["decision"], g["day"], g["modality"]) == \
            (ids[id(w["spec"])], w["username"], w["decision"], w["day"], w["modality"])
        assert _ts(g["held_at"]) == w["held_at"]
        assert g["decision_seconds"] == w["decision_seconds"]


def test_view_delivery_failures(seeded) -> None:
    engine, _, ids = seeded
    got = _view(engine, "SELECT * FROM v_delivery_failures")
    want = expected_delivery_failure_rows()
    key = lambda r: (r["destination"] if "destination" in r else r["dest"], _ts(r["updated_at"]))  # noqa: E731
    assert len(got) == len(want) == 5
    for g, w in zip(sorted(got, key=key), sorted(want, key=key), strict=True):
        assert g["job_id"] == ids[id(w["spec"])]
        assert (g["state"], g["attempts"], g["last_status"], g["last_error"], g["error_class"]) == \
            (w["state"], w["attempts"], w["last_status"], w["last_error"], w["cls"])
        assert g["status_hex"] == (None if w["last_status"] is None else f"0x{w['last_status']:04X}")
        assert g["day"] == w["updated_at"].date().isoformat()
    assert {g["status_hex"] for g in got} == {"0xA700", "0xA900", "0x0000", None}


def test_view_failed_jobs(seeded) -> None:
    engine, _, _ = seeded
    assert _view(engine, "SELECT day, reason_code, jobs FROM v_failed_jobs ORDER BY day, reason_code") == \
        expected_failed_jobs()


# ----------------------------------------------------------------------------------------------- reports
def _approx(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: pytest.approx(v, rel=1e-9, abs=1e-9) if isinstance(v, float) else v for k, v in r.items()}
            for r in rows]


def _run(sessions: Any, name: str, since: date | None = None, until: date | None = None) -> list[dict[str, Any]]:
    with sessions() as s:
        return REPORTS[name].run(s, since, until)


PERIODS = [(None, None), (D2, None), (None, D1), (D2, D2), (D3, D3)]


@pytest.mark.parametrize(("since", "until"), PERIODS)
def test_reports_match_the_spec(seeded, since, until) -> None:
    _, sessions, ids = seeded
    assert _run(sessions, "volume", since, until) == expected_volume(since, until)
    assert _run(sessions, "turnaround", since, until) == \
        _approx(expected_turnaround(("modality", "station_name", "held"), since, until))
    assert _run(sessions, "turnaround-daily", since, until) == \
        _approx(expected_turnaround(("day", "held"), since, until))
    assert _run(sessions, "ood-rate", since, until) == _approx(expected_ood_rate(since, until))
    assert _run(sessions, "reviewers", since, until) == _approx(expected_reviewers(since, until))
    assert _run(sessions, "delivery-failures", since, until) == expected_delivery_failures(since, until)
    assert _run(sessions, "failed-jobs", since, until) == expected_failed_jobs(since, until)
    queue = _run(sessions, "queue", since, until)
    want = [w for w in expected_queue() if _in(w["held_at"].date(), since, until)]
    assert [r["job_id"] for r in queue] == [ids[id(w["spec"])] for w in want]
    assert [r["held_at"] for r in queue] == [w["held_at"] for w in want]


def test_reports_rows_have_their_columns(seeded) -> None:
    _, sessions, _ = seeded
    from ledger.schema import JobState
    from tests.integration.test_shadow import _pair

    # one shadow model's result beside a live one, for the shadow report (its figures: tests/integration/test_shadow.py)
    _pair(sessions, live_state=JobState.SENT, shadow_state=JobState.RELEASED, live_ood=False, shadow_ood=True)
    for name, report in REPORTS.items():
        rows = _run(sessions, name)
        assert rows, name
        for row in rows:
            assert tuple(row) == report.column_names, name


def test_turnaround_figures_by_hand(seeded) -> None:
    """The same numbers once more, written out: CT at CT_ONE sent without review took 300 s (D1), 180, 100,
    400 and 1000 s (D2)."""
    _, sessions, _ = seeded
    ct = next(r for r in _run(sessions, "turnaround") if (r["modality"], r["station_name"], r["held"]) ==
              ("CT", "CT_ONE", False))
    xs = [100.0, 180.0, 300.0, 400.0, 1000.0]
    assert ct["jobs"] == 5
    assert ct["p50_s"] == pytest.approx(300.0)
    assert ct["p90_s"] == pytest.approx(400.0 + 0.6 * 600.0)  # rank 3.6 between 400 and 1000
    assert ct["p99_s"] == pytest.approx(400.0 + 0.96 * 600.0)
    assert ct["max_s"] == pytest.approx(max(xs))
    alice = _run(sessions, "reviewers")[0]
    assert (alice["reviewer"], alice["approved"], alice["rejected"]) == ("alice", 1, 1)
    assert alice["median_s"] == pytest.approx(900.0) and alice["p90_s"] == pytest.approx(600.0 + 0.9 * 600.0)


def test_queue_age_against_our_clock(seeded) -> None:
    _, sessions, _ = seeded
    before = datetime.now(UTC)
    rows = _run(sessions, "queue")
    after = datetime.now(UTC)
    for row in rows:
        assert (before - row["held_at"]).total_seconds() - 0.01 <= row["age_s"] <= \
            (after - row["held_at"]).total_seconds() + 0.01
    assert rows[0]["held_at"].tzinfo is not None


def test_an_empty_period_is_refused(seeded) -> None:
    _, sessions, _ = seeded
    with pytest.raises(ValueError, match="since 2026-12-03 is after until 2026-12-01"):
        _run(sessions, "volume", D3, D1)


# ------------------------------------------------------------------------------------------------- CLI
def _table(output: str) -> tuple[str, list[str], list[list[str]]]:
    lines = output.rstrip("\n").split("\n")
    title, header, rule, *body = lines
    assert set(rule.replace(" ", "")) == {"-"}
    split = lambda line: re.split(r"\s{2,}", line.strip())  # noqa: E731
    return title, split(header), [split(line) for line in body]


def test_cli_table(seeded, cli) -> None:
    title, header, body = _table(cli("report", "volume").output)
    assert title == "Daily volume by modality, all days"
    assert header == ["DAY", "MODALITY", "STUDIES", "SERIES", "INSTANCES", "BYTES"]
    assert body == [[r["day"], r["modality"], str(r["studies"]), str(r["series"]), str(r["instances"]),
                     str(r["bytes"])] for r in expected_volume()]
    title, header, body = _table(cli("report", "turnaround", "--since", "2026-12-02", "--until", "2026-12-02").output)
    assert title == "Turnaround by modality and scanner, 2026-12-02 to 2026-12-02 (UTC)"
    assert header == ["MODALITY", "STATION", "HELD", "JOBS", "P50 (S)", "P90 (S)", "P99 (S)", "MAX (S)"]
    want = expected_turnaround(("modality", "station_name", "held"), D2, D2)
    assert body == [[r["modality"], r["station_name"] or "-", "yes" if r["held"] else "no", str(r["jobs"]),
                     f"{r['p50_s']:.1f}", f"{r['p90_s']:.1f}", f"{r['p99_s']:.1f}", f"{r['max_s']:.1f}"]
                    for r in want]
    # numbers are right-aligned: the columns' right edges line up
    lines = cli("report", "ood-rate").output.splitlines()[1:]
    edges = {len(line) for line in lines}
    assert len(edges) == 1
    _, _, body = _table(cli("report", "ood-rate").output)
    assert [row[-1] for row in body] == [f"{r['ood_rate']:.1%}" for r in expected_ood_rate()]


def test_cli_csv(seeded, cli) -> None:
    out = cli("report", "delivery-failures", "--format", "csv").output
    rows = list(csv.DictReader(io.StringIO(out)))
    want = expected_delivery_failures()
    assert list(rows[0]) == list(REPORTS["delivery-failures"].column_names)
    assert [(r["destination"], r["status"], r["error_class"], int(r["deliveries"]), int(r["failed"]),
             int(r["attempts"]), datetime.fromisoformat(r["last_at"]), r["last_error"]) for r in rows] == \
        [(w["destination"], w["status"] or "", w["error_class"], w["deliveries"], w["failed"], w["attempts"],
          w["last_at"], w["last_error"] or "") for w in want]
    rows = list(csv.DictReader(io.StringIO(cli("report", "turnaround-daily", "--format", "csv").output)))
    want = expected_turnaround(("day", "held"))
    assert [(r["day"], r["held"], int(r["jobs"])) for r in rows] == \
        [(w["day"], "true" if w["held"] else "false", w["jobs"]) for w in want]
    assert [float(r["p90_s"]) for r in rows] == pytest.approx([w["p90_s"] for w in want], abs=1e-3)


def test_cli_json_and_period(seeded, cli) -> None:
    for name, expect in (("volume", expected_volume), ("failed-jobs", expected_failed_jobs),
                         ("reviewers", expected_reviewers), ("ood-rate", expected_ood_rate)):
        for since, until in PERIODS:
            args = ["report", name, "--format", "json"]
            args += ["--since", since.isoformat()] if since else []
            args += ["--until", until.isoformat()] if until else []
            assert json.loads(cli(*args).output) == _approx(expect(since, until)), (name, since, until)
    queue = json.loads(cli("report", "queue", "--format", "json").output)
    assert [datetime.fromisoformat(r["held_at"]) for r in queue] == [w["held_at"] for w in expected_queue()]


def test_cli_lists_and_refuses(seeded, cli) -> None:
    listed = cli("report").output
    assert all(name in listed for name in REPORTS)
    assert cli("report", "--list").output == listed
    meta = json.loads(cli("report", "--list", "--format", "json").output)
    assert [m["name"] for m in meta] == list(REPORTS)
    assert [c["name"] for c in meta[0]["columns"]] == list(REPORTS["volume"].column_names)
    bad = cli("report", "nonsense", expect=2)
    assert "no report 'nonsense'" in bad.output and "volume" in bad.output
    empty = cli("report", "volume", "--since", "2026-12-03", "--until", "2026-12-01", expect=2)
    assert "--since 2026-12-03 is after --until 2026-12-01" in empty.output
    assert cli("report", "volume", "--since", "1 Dec", expect=2).exit_code == 2
    assert "no rows in this period" in cli("report", "volume", "--since", "2030-01-01").output


def test_cli_on_an_unmigrated_ledger(settings, cli) -> None:
    out = cli("report", "volume", expect=1).output
    assert "could not be read from the ledger" in out and "specgate db upgrade" in out
