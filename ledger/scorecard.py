"""The gate's scorecard: the radiologists' decisions and the retractions as labels of the gate's verdicts.

Every result the gate made is one verdict, held (out of distribution) or released; a person's judgement
later labels it:

- **held** (``results.is_ood``): the radiologist's decision on it. *Approved*: the gate was too strict
  (the result was fine); *rejected*: the gate was right. *Undecided*: still held, or superseded before a
  decision. ``held_right`` = rejected / (approved + rejected).
- **released** (not out of distribution, and never held for another reason: a result held under a rule's
  ``when_incomplete = "hold"`` and decided by a radiologist is a label of that rule, not of the gate, and is
  counted on neither side): *retracted* when a person later retracted it for quality (IHE IOCM, reason
  ``quality``; the automatic retraction of a superseded version, by the user ``specgate``, is no judgement
  of the result and is not counted). ``retracted_rate`` = retracted / released. It counts only the failures
  somebody noticed, so it is a lower bound of the gate's miss rate.
- **blind audit** (:mod:`ledger.audit_sample`): the released results drawn for a blind review, and the
  reviewer's verdict. ``audit_miss`` = rejected / (agreed + rejected): an unbiased estimate of the share of
  released results a radiologist would reject (a rejected one is also retracted, so it counts in
  ``retracted`` too).

Every proportion comes with its 95% **Wilson score interval** (:func:`wilson`; no continuity correction):
unlike the normal approximation it stays within [0, 1] and keeps its coverage for the small counts a
month of one scanner gives. A proportion of nothing is None (shown as "-").

A result counts in the period of the day it was made (the gate's verdict), with the decisions and
retractions that came later. Superseded results (an older version of a study) are left out, as in the OOD
rate, unless a person labelled them (a decision, a quality retraction or a blind verdict): each study
counts once for its current version, plus once for every earlier version somebody judged.

    >>> [round(x, 4) for x in wilson(8, 10)]
    [0.4902, 0.9433]
    >>> wilson(0, 0)
    (None, None)
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, date, timedelta
from statistics import NormalDist
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .schema import (
    AuditSample,
    AuditSampleState,
    Job,
    JobState,
    Result,
    Retraction,
    RetractionReason,
    Review,
    ReviewDecision,
    Series,
    Study,
)
from .sql import day_start, past_day

__all__ = ["CONFIDENCE", "FIGURES", "PROPORTIONS", "SYSTEM_USER", "by_month", "by_source", "by_week", "proportion", "wilson"]

#: the intervals' confidence level
CONFIDENCE = 0.95
_Z = NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)
#: who retracts a superseded version automatically (worker.retraction.retract_superseded)
SYSTEM_USER = "specgate"
#: each proportion of a row: (its key, numerator, denominator)
PROPORTIONS = (("held_right", "rejected", ("approved", "rejected")),
               ("retracted_rate", "retracted", ("released",)),
               ("audit_miss", "audit_rejected", ("audit_agreed", "audit_rejected")))

Row = dict[str, Any]


def wilson(k: int, n: int, z: float = _Z) -> tuple[float | None, float | None]:
    """The Wilson score interval of ``k`` successes in ``n`` trials (None, None for no trials)."""
    if n <= 0:
        return None, None
    if not 0 <= k <= n:
        raise ValueError(f"{k} successes in {n} trials")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(k: int, n: int) -> tuple[float | None, float | None, float | None]:
    """``k / n`` and its interval; all None for ``n == 0``."""
    lo, hi = wilson(k, n)
    return (k / n if n else None), lo, hi


_COUNTS = ("held", "approved", "rejected", "undecided", "released", "retracted", "audited", "audit_agreed",
           "audit_rejected")
#: a row's figures after its keys, in this order (the report's columns)
FIGURES = ("held", "approved", "rejected", "undecided", "held_right", "held_right_lo", "held_right_hi",
           "released", "retracted", "retracted_rate", "retracted_rate_lo", "retracted_rate_hi",
           "audited", "audit_agreed", "audit_rejected", "audit_miss", "audit_miss_lo", "audit_miss_hi")


def _labelled_results(session: Session, since: date | None, until: date | None) -> list[Row]:
    """One row per result of the period: its model, source, day, and the labels people gave it."""
    period = []
    end = past_day(until) if until is not None else None
    if since is not None:
        period.append(Result.created_at >= day_start(since))
    if end is not None:
        period.append(Result.created_at < end)
    in_period = select(Result.id).where(*period)
    results = session.execute(
        select(Result.id, Result.job_id, Result.model_id, Result.is_ood, Result.superseded, Result.created_at,
               Job.state, Study.calling_ae, Series.station_name)
        .join(Job, Job.id == Result.job_id).join(Study, Study.id == Job.study_id)
        .outerjoin(Series, Series.series_instance_uid == Job.series_instance_uid)
        .where(*period, Job.shadow.is_(False))).all()  # a shadow model's verdicts are never acted on
    decisions: dict[int, ReviewDecision] = {}
    for job_id, decided in session.execute(
            select(Review.job_id, Review.decision).join(Result, Result.job_id == Review.job_id)
            .where(Result.id.in_(in_period)).order_by(Review.id)):
        decisions[job_id] = ReviewDecision(decided)  # the latest decision on the job
    retracted = set(session.execute(
        select(Retraction.result_id).where(Retraction.result_id.in_(in_period),
                                           Retraction.reason == RetractionReason.QUALITY,
                                           Retraction.username != SYSTEM_USER)).scalars())
    audits = {rid: AuditSampleState(state) for rid, state in session.execute(
        select(AuditSample.result_id, AuditSample.state).where(AuditSample.result_id.in_(in_period)))}
    rows = []
    for r in results:
        decision: ReviewDecision | None = decisions.get(r.job_id)
        verdict = audits.get(r.id)
        if r.is_ood:
            side = "held"
        elif decision is None and r.state != JobState.HELD:
            side = "released"
        else:
            continue  # held for another reason than the gate's (a rule's when_incomplete): not the gate's label
        labelled = ((side == "held" and decision is not None)
                    or (side == "released" and (r.id in retracted or verdict not in (None, AuditSampleState.PENDING))))
        if r.superseded and not labelled:
            continue
        created = r.created_at if r.created_at.tzinfo else r.created_at.replace(tzinfo=UTC)
        rows.append({"model_id": r.model_id, "calling_ae": r.calling_ae, "station_name": r.station_name,
                     "day": created.astimezone(UTC).date(), "side": side, "decision": decision,
                     "retracted": side == "released" and r.id in retracted,
                     "audit": verdict if side == "released" else None})
    return rows


def _tally(rows: Sequence[Row], key: Callable[[Row], tuple[Any, ...]], names: Sequence[str]) -> list[Row]:
    groups: dict[tuple[Any, ...], dict[str, int]] = defaultdict(lambda: dict.fromkeys(_COUNTS, 0))
    for r in rows:
        g = groups[key(r)]
        if r["side"] == "held":
            g["held"] += 1
            d = r["decision"]
            g["approved" if d == ReviewDecision.APPROVE else "rejected" if d == ReviewDecision.REJECT
              else "undecided"] += 1
        else:
            g["released"] += 1
            g["retracted"] += r["retracted"]
            if r["audit"] is not None:
                g["audited"] += 1
                g["audit_agreed"] += r["audit"] == AuditSampleState.AGREED
                g["audit_rejected"] += r["audit"] == AuditSampleState.REJECTED
    out = []
    for k, counts in groups.items():
        shares: Row = {}
        for name, num, den in PROPORTIONS:
            shares[name], shares[f"{name}_lo"], shares[f"{name}_hi"] = proportion(counts[num],
                                                                                 sum(counts[d] for d in den))
        figures = {**counts, **shares}
        out.append({**dict(zip(names, k, strict=True)), **{f: figures[f] for f in FIGURES}})
    return sorted(out, key=lambda r: tuple((r[n] is None, "" if r[n] is None else r[n]) for n in names))


def by_source(session: Session, since: date | None, until: date | None) -> list[Row]:
    """The scorecard per model and source (calling AE and station name) over the period."""
    names = ("model_id", "calling_ae", "station_name")
    return _tally(_labelled_results(session, since, until), lambda r: tuple(r[n] for n in names), names)


def _over_time(start: Callable[[date], date]) -> Callable[[Session, date | None, date | None], list[Row]]:
    def fetch(session: Session, since: date | None, until: date | None) -> list[Row]:
        rows = _labelled_results(session, since, until)
        return _tally(rows, lambda r: (start(r["day"]).isoformat(), r["model_id"]), ("period", "model_id"))
    return fetch


#: the scorecard per ISO week (from its Monday) and model
by_week = _over_time(lambda d: d - timedelta(days=d.weekday()))
#: the scorecard per calendar month and model
by_month = _over_time(lambda d: d.replace(day=1))
