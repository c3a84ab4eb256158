"""The administrators' reports: how many studies, how fast, how often held, what failed, for which scanner.

Each report reads the SQL views of migration 0006 (their definitions are documented there: UTC days,
turnaround from the last instance received to the first delivery, held time from the ``job.held`` audit
event, superseded results left out of the OOD rate) and returns plain rows: a list of dicts whose keys are
the report's column names, in the same order, with ``str``/``int``/``float``/``bool``/``None`` values and
timezone-aware UTC :class:`~datetime.datetime` objects. ``specgate report`` and the review app's reports
page show the same rows.

``since`` and ``until`` are inclusive UTC days; each report says which day of a row they select on.

Percentiles are computed here, not in SQL (SQLite has none), with one definition everywhere: linear
interpolation between the closest ranks, numpy's default (``method="linear"``, Hyndman and Fan's type 7):

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50)
    2.5
    >>> round(percentile([1.0, 2.0, 3.0, 4.0], 90), 6)
    3.7
    >>> percentile([], 50) is None
    True

Use a report by name::

    rows = REPORTS["turnaround"].run(session, since=date(2026, 12, 1), until=None)
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal

from sqlalchemy import ColumnElement, DateTime, Select, column, select, table
from sqlalchemy.orm import Session

from . import scorecard

__all__ = ["REPORTS", "Column", "Kind", "Report", "csv_cell", "format_value", "percentile", "to_csv"]

Kind = Literal["text", "day", "int", "float", "seconds", "rate", "datetime", "bool"]
Row = dict[str, Any]
Fetch = Callable[[Session, date | None, date | None], list[Row]]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values`` by linear interpolation (numpy's default); None
    for no values.

        >>> percentile([10.0], 99)
        10.0
        >>> percentile([3.0, 1.0, 2.0], 0), percentile([3.0, 1.0, 2.0], 100)
        (1.0, 3.0)
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within 0..100, got {q!r}")
    if not values:
        return None
    xs = sorted(float(v) for v in values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Column:
    """One column of a report: its key in the rows, a header for people, and what kind of value it holds
    (which says how to show it: :func:`format_value`)."""

    name: str
    label: str
    kind: Kind = "text"


@dataclass(frozen=True)
class Report:
    """A named report: ``fetch(session, since, until)`` returns its rows; call :meth:`run`, which checks
    the period first."""

    name: str
    title: str
    description: str
    columns: tuple[Column, ...]
    fetch: Fetch

    def run(self, session: Session, since: date | None = None, until: date | None = None) -> list[Row]:
        if since is not None and until is not None and since > until:
            raise ValueError(f"the period is empty: since {since.isoformat()} is after until {until.isoformat()}")
        return self.fetch(session, since, until)

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


def format_value(value: Any, kind: Kind) -> str:
    """A value as text for a person (the CLI's table, the reports page).

        >>> format_value(12.345, "seconds"), format_value(0.25, "rate"), format_value(None, "int")
        ('12.3', '25.0%', '-')
        >>> format_value(datetime(2026, 12, 1, 8, 30, 5, 123, tzinfo=UTC), "datetime")
        '2026-12-01 08:30:05'
        >>> format_value(True, "bool"), format_value(0.123456, "float")
        ('yes', '0.1235')
    """
    if value is None:
        return "-"
    if kind == "seconds":
        return f"{value:.1f}"
    if kind == "rate":
        return f"{value:.1%}"
    if kind == "float":
        return f"{value:.4f}"
    if kind == "datetime":
        return str(value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"))
    if kind == "bool":
        return "yes" if value else "no"
    return str(value)


#: a text cell starting with one of these is a formula (or becomes one) in Excel, LibreOffice and Sheets
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n", "\uff1d", "\uff0b", "\uff0d", "\uff20")


def csv_cell(value: Any) -> Any:
    """One CSV cell: empty for nothing, true/false, ISO 8601 times, numbers as they are, and text that a
    spreadsheet would run as a formula made inert (OWASP: a leading single quote; the writer quotes every
    text cell). The sender of a study controls StationName, BodyPartExamined, SeriesDescription and the
    AE title, so ``=HYPERLINK("http://evil","x")`` must reach an administrator's spreadsheet as text.

        >>> print(csv_cell('=HYPERLINK("http://evil","x")'))
        '=HYPERLINK("http://evil","x")
        >>> csv_cell("-1+1"), csv_cell(-1.5), csv_cell("CT_1"), csv_cell(None)
        ("'-1+1", -1.5, 'CT_1', '')
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, int | float):
        return value
    text = str(value)
    return "'" + text if text.startswith(FORMULA_START) else text


def to_csv(report: Report, rows: Sequence[Mapping[str, Any]]) -> str:
    """A report as CSV (``specgate report --format csv`` and the reports page's downloads): the column
    names as header, every text cell quoted and made inert by :func:`csv_cell`.

        >>> r = Report("x", "X", "", (Column("station", "Station", "text"), Column("n", "N", "int")), lambda *a: [])
        >>> print(to_csv(r, [{"station": "=1+2", "n": 3}]), end="")
        "station","n"
        "'=1+2",3
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
    writer.writerow(report.column_names)
    for row in rows:
        writer.writerow([csv_cell(row.get(name)) for name in report.column_names])
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- helpers
def _view(name: str, *names: str, timestamps: Iterable[str] = ()) -> Any:
    """A lightweight table for a view; ``timestamps`` are read as datetimes (SQLite returns text)."""
    ts = set(timestamps)
    return table(name, *(column(n, DateTime(timezone=True)) if n in ts else column(n) for n in names))


def _period(q: Select[Any], day: ColumnElement[Any], since: date | None, until: date | None) -> Select[Any]:
    if since is not None:
        q = q.where(day >= since.isoformat())
    if until is not None:
        q = q.where(day <= until.isoformat())
    return q


def _rows(session: Session, q: Select[Any]) -> list[Mapping[str, Any]]:
    return [dict(r) for r in session.execute(q).mappings()]


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _key(*values: Any) -> tuple[Any, ...]:
    """A sort key where None sorts last (PostgreSQL and SQLite disagree on where NULLs go)."""
    return tuple((v is None, "" if v is None else v) for v in values)


def _percentiles(xs: Sequence[float], qs: Sequence[int]) -> Row:
    return {f"p{q}_s": percentile(xs, q) for q in qs}


# --------------------------------------------------------------------------------------------- reports
def _volume(session: Session, since: date | None, until: date | None) -> list[Row]:
    v = _view("v_daily_volume", "day", "modality", "studies", "series", "instances", "bytes")
    rows = [{"day": r["day"], "modality": r["modality"], "studies": int(r["studies"]), "series": int(r["series"]),
             "instances": int(r["instances"]), "bytes": int(r["bytes"] or 0)}
            for r in _rows(session, _period(select(v), v.c.day, since, until))]
    return sorted(rows, key=lambda r: _key(r["day"], r["modality"]))


_TURNAROUND = ("day", "modality", "station_name", "held", "turnaround_seconds")


def _turnaround_groups(session: Session, since: date | None, until: date | None,
                       by: Sequence[str]) -> dict[tuple[Any, ...], list[float]]:
    v = _view("v_turnaround", *_TURNAROUND)
    groups: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    for r in _rows(session, _period(select(v), v.c.day, since, until)):
        if r["turnaround_seconds"] is None:
            continue
        key = tuple(bool(r[k]) if k == "held" else r[k] for k in by)
        groups[key].append(float(r["turnaround_seconds"]))
    return groups


def _turnaround(session: Session, since: date | None, until: date | None) -> list[Row]:
    by = ("modality", "station_name", "held")
    rows = [{**dict(zip(by, key, strict=True)), "jobs": len(xs), **_percentiles(xs, (50, 90, 99)),
             "max_s": max(xs)}
            for key, xs in _turnaround_groups(session, since, until, by).items()]
    return sorted(rows, key=lambda r: _key(r["modality"], r["station_name"], r["held"]))


def _turnaround_daily(session: Session, since: date | None, until: date | None) -> list[Row]:
    by = ("day", "held")
    rows = [{**dict(zip(by, key, strict=True)), "jobs": len(xs), **_percentiles(xs, (50, 90, 99)),
             "max_s": max(xs)}
            for key, xs in _turnaround_groups(session, since, until, by).items()]
    return sorted(rows, key=lambda r: _key(r["day"], r["held"]))


def _ood_rate(session: Session, since: date | None, until: date | None) -> list[Row]:
    v = _view("v_ood_rate", "day", "modality", "calling_ae", "station_name", "model_id", "results", "ood",
              "ood_rate")
    rows = [{"day": r["day"], "modality": r["modality"], "calling_ae": r["calling_ae"],
             "station_name": r["station_name"], "model_id": r["model_id"], "results": int(r["results"]),
             "ood": int(r["ood"]), "ood_rate": float(r["ood_rate"])}
            for r in _rows(session, _period(select(v), v.c.day, since, until))]
    return sorted(rows, key=lambda r: _key(r["day"], r["modality"], r["calling_ae"], r["station_name"],
                                           r["model_id"]))


#: shadow jobs (ledger.shadow): held for good, reviewed by nobody, so never in the review queue
_SHADOW_JOBS = select(table("jobs", column("id")).c.id).where(column("shadow"))


def _queue(session: Session, since: date | None, until: date | None) -> list[Row]:
    v = _view("v_review_queue", "job_id", "day", "held_at", "age_seconds", "modality", "body_part",
              "calling_ae", "station_name", "model_id", "oodm", "tau", timestamps=("held_at",))
    rows = [{"job_id": int(r["job_id"]), "held_at": _utc(r["held_at"]), "age_s": _float(r["age_seconds"]),
             "modality": r["modality"], "body_part": r["body_part"], "calling_ae": r["calling_ae"],
             "station_name": r["station_name"], "model_id": r["model_id"], "oodm": _float(r["oodm"]),
             "tau": _float(r["tau"])}
            for r in _rows(session, _period(select(v).where(v.c.job_id.not_in(_SHADOW_JOBS)), v.c.day, since, until))]
    return sorted(rows, key=lambda r: (r["held_at"], r["job_id"]))


def _reviewers(session: Session, since: date | None, until: date | None) -> list[Row]:
    v = _view("v_review_decisions", "username", "decision", "day", "decision_seconds")
    per: dict[str, dict[str, Any]] = {}
    for r in _rows(session, _period(select(v), v.c.day, since, until)):
        p = per.setdefault(r["username"], {"approved": 0, "rejected": 0, "times": []})
        p["approved" if r["decision"] == "approve" else "rejected"] += 1
        if r["decision_seconds"] is not None:
            p["times"].append(float(r["decision_seconds"]))
    return [{"reviewer": user, "decisions": p["approved"] + p["rejected"], "approved": p["approved"],
             "rejected": p["rejected"], "median_s": percentile(p["times"], 50), "p90_s": percentile(p["times"], 90)}
            for user, p in sorted(per.items())]


def _delivery_failures(session: Session, since: date | None, until: date | None) -> list[Row]:
    v = _view("v_delivery_failures", "destination", "state", "attempts", "status_hex", "error_class", "day",
              "updated_at", "last_error", timestamps=("updated_at",))
    groups: dict[tuple[Any, ...], Row] = {}
    for r in _rows(session, _period(select(v), v.c.day, since, until)):
        key = (r["destination"], r["status_hex"], r["error_class"])
        g = groups.setdefault(key, {"destination": key[0], "status": key[1], "error_class": key[2],
                                    "deliveries": 0, "failed": 0, "attempts": 0, "last_at": None,
                                    "last_error": None})
        g["deliveries"] += 1
        g["failed"] += r["state"] == "failed"
        g["attempts"] += int(r["attempts"])
        at = _utc(r["updated_at"])
        if g["last_at"] is None or (at is not None and at >= g["last_at"]):
            g["last_at"], g["last_error"] = at, r["last_error"]
    return sorted(groups.values(), key=lambda g: _key(g["destination"], g["status"], g["error_class"]))


def _failed_jobs(session: Session, since: date | None, until: date | None) -> list[Row]:
    v = _view("v_failed_jobs", "day", "reason_code", "jobs")
    rows = [{"day": r["day"], "reason_code": r["reason_code"], "jobs": int(r["jobs"])}
            for r in _rows(session, _period(select(v), v.c.day, since, until))]
    return sorted(rows, key=lambda r: _key(r["day"], r["reason_code"]))


def _gate_columns(*keys: Column) -> tuple[Column, ...]:
    """The scorecard's columns (:mod:`ledger.scorecard`) after the row's keys."""
    ci = int(scorecard.CONFIDENCE * 100)

    def share(name: str, label: str) -> tuple[Column, ...]:
        return (Column(name, label, "rate"), Column(f"{name}_lo", f"{ci}% low", "rate"),
                Column(f"{name}_hi", f"{ci}% high", "rate"))

    return (*keys, Column("held", "held", "int"), Column("approved", "approved (too strict)", "int"),
            Column("rejected", "rejected (right)", "int"), Column("undecided", "undecided", "int"),
            *share("held_right", "held right"), Column("released", "released", "int"),
            Column("retracted", "retracted (quality)", "int"), *share("retracted_rate", "retracted"),
            Column("audited", "blind audit", "int"), Column("audit_agreed", "audit agreed", "int"),
            Column("audit_rejected", "audit rejected", "int"), *share("audit_miss", "audit missed"))


_GATE = ("Held results approved (the gate was too strict) and rejected (it was right) by a radiologist; "
         "released results later retracted for quality by a person, and the blind audit sample's verdicts "
         "on released results; each share with its 95% Wilson score interval. Period: the day the gate "
         "decided (the result was made); later decisions and retractions count with it.")

_PCT = (Column("jobs", "jobs", "int"), Column("p50_s", "p50 (s)", "seconds"), Column("p90_s", "p90 (s)", "seconds"),
        Column("p99_s", "p99 (s)", "seconds"), Column("max_s", "max (s)", "seconds"))

REPORTS: dict[str, Report] = {r.name: r for r in (
    Report("volume", "Daily volume by modality",
           "Studies, series and instances received per UTC day and modality (a study counts on each day it "
           "received instances). Period: the day received.",
           (Column("day", "day", "day"), Column("modality", "modality"), Column("studies", "studies", "int"),
            Column("series", "series", "int"), Column("instances", "instances", "int"),
            Column("bytes", "bytes", "int")),
           _volume),
    Report("turnaround", "Turnaround by modality and scanner",
           "Seconds from the last instance received to the result's first delivery, per modality, station "
           "name and whether a radiologist reviewed it (held); percentiles by linear interpolation. "
           "Period: the day delivered.",
           (Column("modality", "modality"), Column("station_name", "station"), Column("held", "held", "bool"),
            *_PCT),
           _turnaround),
    Report("turnaround-daily", "Turnaround per day",
           "Turnaround percentiles per UTC day of delivery, for results sent straight away and for results "
           "held for review. Period: the day delivered.",
           (Column("day", "day", "day"), Column("held", "held", "bool"), *_PCT),
           _turnaround_daily),
    Report("ood-rate", "Out-of-distribution rate",
           "Results and how many the gate found out of distribution, per UTC day, modality, calling AE, "
           "station name and model (superseded results left out). Period: the day the result was made.",
           (Column("day", "day", "day"), Column("modality", "modality"), Column("calling_ae", "calling AE"),
            Column("station_name", "station"), Column("model_id", "model"),
            Column("results", "results", "int"), Column("ood", "OOD", "int"),
            Column("ood_rate", "OOD rate", "rate")),
           _ood_rate),
    Report("queue", "Review queue",
           "Results held for review now, oldest first, with their age in the queue (from the time they "
           "became held). Period: the day they became held.",
           (Column("job_id", "job", "int"), Column("held_at", "held since (UTC)", "datetime"),
            Column("age_s", "age (s)", "seconds"), Column("modality", "modality"),
            Column("body_part", "body part"), Column("calling_ae", "calling AE"),
            Column("station_name", "station"), Column("model_id", "model"),
            Column("oodm", "OODM", "float"), Column("tau", "tau", "float")),
           _queue),
    Report("reviewers", "Review decisions per reviewer",
           "Approvals and rejections per reviewer, and the time from a result becoming held to the decision "
           "(median and p90, linear interpolation). Period: the day decided.",
           (Column("reviewer", "reviewer"), Column("decisions", "decisions", "int"),
            Column("approved", "approved", "int"), Column("rejected", "rejected", "int"),
            Column("median_s", "median (s)", "seconds"), Column("p90_s", "p90 (s)", "seconds")),
           _reviewers),
    Report("delivery-failures", "Delivery failures by destination and reason",
           "Deliveries that failed or needed more than one attempt, per destination, last DIMSE status and "
           "class of failure, with the latest error. Period: the day of the last attempt.",
           (Column("destination", "destination"), Column("status", "status"),
            Column("error_class", "reason"), Column("deliveries", "deliveries", "int"),
            Column("failed", "failed", "int"), Column("attempts", "attempts", "int"),
            Column("last_at", "last (UTC)", "datetime"), Column("last_error", "last error")),
           _delivery_failures),
    Report("failed-jobs", "Failed jobs by reason",
           "Jobs now failed, per UTC day they failed and reason code. Period: the day failed.",
           (Column("day", "day", "day"), Column("reason_code", "reason"), Column("jobs", "jobs", "int")),
           _failed_jobs),
    Report("gate", "The gate's scorecard by model and source",
           f"{_GATE} Per model, calling AE and station name.",
           _gate_columns(Column("model_id", "model"), Column("calling_ae", "calling AE"),
                         Column("station_name", "station")),
           scorecard.by_source),
    Report("gate-weekly", "The gate's scorecard per week",
           f"{_GATE} Per ISO week (from its Monday, UTC) and model.",
           _gate_columns(Column("period", "week of", "day"), Column("model_id", "model")),
           scorecard.by_week),
    Report("gate-monthly", "The gate's scorecard per month",
           f"{_GATE} Per calendar month (UTC) and model.",
           _gate_columns(Column("period", "month", "day"), Column("model_id", "model")),
           scorecard.by_month),
    Report("shadow", "Shadow models beside the live ones",
           "Per shadow model and the live model it ran beside, on the same studies (neither result superseded): "
           "the Dice similarity of the two masks, the two gates' OOD decisions (2x2), and where the live result "
           "was held, what the radiologists decided against what the shadow gate said. Nothing of a shadow "
           "model is ever sent. Period: the day the shadow result was made.",
           (Column("shadow_model", "shadow model"), Column("live_model", "live model"),
            Column("studies", "studies", "int"), Column("compared", "compared", "int"),
            Column("dsc_mean", "DSC mean", "float"), Column("dsc_median", "DSC median", "float"),
            Column("dsc_min", "DSC min", "float"), Column("both_in", "both in", "int"),
            Column("live_in_shadow_ood", "live in, shadow OOD", "int"),
            Column("live_ood_shadow_in", "live OOD, shadow in", "int"), Column("both_ood", "both OOD", "int"),
            Column("held", "live held", "int"), Column("held_approved", "approved", "int"),
            Column("held_rejected", "rejected", "int"), Column("held_pending", "undecided", "int"),
            Column("held_approved_shadow_in", "approved, shadow in", "int"),
            Column("held_rejected_shadow_in", "rejected, shadow in", "int")),
           lambda session, since, until: _shadow_side_by_side(session, since, until)),
)}


def _shadow_side_by_side(session: Session, since: date | None, until: date | None) -> list[Row]:
    from .shadow import side_by_side  # it reads the tables, not the views of 0006

    return side_by_side(session, since, until)
