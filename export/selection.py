"""Which studies an export takes, read from the ledger: held results, and held results a radiologist has
since rejected or approved, in a period, optionally of one model.

A job is taken in the state it is in now: ``held`` (no decision yet), ``rejected`` (held, then rejected),
``approved`` (held, then approved; ``sent`` once its delivery went out). Superseded versions of a study
are never taken (a newer version of the study replaced them), nor results without a SEG, nor a shadow
model's results (:mod:`ledger.shadow`: never reviewed, and the study's images go with its live job). The period is on
the day the job was made (UTC, both ends included, as the reports count days).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import date

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ledger.schema import Instance, Job, JobState, Result, Review, ReviewDecision, Series
from ledger.sql import day_start, past_day

__all__ = ["KINDS", "Criteria", "Selected", "select_jobs"]

#: what ``--held``, ``--rejected`` and ``--approved`` select
KINDS = ("held", "rejected", "approved")


@dataclass(frozen=True)
class Criteria:
    kinds: frozenset[str]
    since: date
    until: date | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(KINDS)
        if not self.kinds or unknown:
            raise ValueError(f"choose at least one of {', '.join(KINDS)}; got {sorted(self.kinds)}")
        if self.until is not None and self.until < self.since:
            raise ValueError(f"since {self.since.isoformat()} is after until {self.until.isoformat()}: the "
                             "period is empty")


@dataclass(frozen=True)
class Reviewed:
    decision: str
    reason: str | None


@dataclass(frozen=True)
class Selected:
    """One job to export: ledger ids, where its files are (store keys and SHA-256), what the gate and the
    radiologists said. Holds no patient data."""

    job_id: int
    study_id: int
    version: int
    kind: str  # held / rejected / approved
    state: str
    model: str
    series_instance_uid: str
    instances: tuple[tuple[str, str], ...]  # (store key, sha256) of each instance of the series
    seg_key: str
    oodm: float
    tau: float
    is_ood: bool
    bank_percentile: float | None
    model_id: str
    weights_sha256: str
    reviews: tuple[Reviewed, ...]


def _kind(state: JobState, decisions: Collection[str]) -> str | None:
    if state == JobState.HELD:
        return "held"
    if state == JobState.REJECTED:
        return "rejected"
    if state in (JobState.APPROVED, JobState.SENT) and ReviewDecision.APPROVE.value in decisions:
        return "approved"
    return None


def select_jobs(session: Session, criteria: Criteria) -> list[Selected]:
    """The jobs ``criteria`` select, oldest first."""
    start = day_start(criteria.since)
    q = (select(Job, Result).join(Result, Result.job_id == Job.id)
         .where(Job.state.in_([JobState.HELD, JobState.REJECTED, JobState.APPROVED, JobState.SENT]),
                Job.created_at >= start, Result.superseded.is_(False), Job.shadow.is_(False))
         .order_by(Job.created_at, Job.id))
    end = past_day(criteria.until) if criteria.until is not None else None
    if end is not None:
        q = q.where(Job.created_at < end)
    if criteria.model is not None:
        q = q.where(func.coalesce(Job.model_name, "default") == criteria.model)
    out = []
    for job, result in session.execute(q).all():
        reviews = session.execute(select(Review.decision, Review.reason).where(Review.job_id == job.id)
                                  .order_by(Review.id)).all()
        kind = _kind(job.state, {str(r.decision) for r in reviews})
        if kind is None or kind not in criteria.kinds or not job.series_instance_uid:
            continue
        instances = session.execute(
            select(Instance.store_key, Instance.spool_path, Instance.sha256).join(Series)
            .where(Series.series_instance_uid == job.series_instance_uid).order_by(Instance.id)).all()
        out.append(Selected(
            job_id=job.id, study_id=job.study_id, version=job.version, kind=kind, state=str(job.state),
            model=job.model_name or "default", series_instance_uid=job.series_instance_uid,
            instances=tuple((key or spool, sha) for key, spool, sha in instances), seg_key=result.seg_path,
            oodm=float(result.oodm), tau=float(result.tau), is_ood=bool(result.is_ood),
            bank_percentile=result.bank_percentile, model_id=result.model_id,
            weights_sha256=result.weights_sha256,
            reviews=tuple(Reviewed(str(r.decision), r.reason) for r in reviews)))
    return out
