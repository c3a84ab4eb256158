"""The blind audit sample: a share of the *released* results also goes to a radiologist, blind to the gate.

The gate's held results all get a label (a radiologist approves or rejects each); its released results get
one only when somebody notices a failure and retracts it, which says nothing about the failures nobody
noticed. With ``audit_sample_share`` above 0 (setting; default 0, off), that share of the released results
is also queued for a **blind review**: the result is delivered as usual (the sample never delays it), and
the review app shows it on a page without the gate's verdict (``/audit``), so the reviewer judges the
segmentation alone. The verdict is the release side's label: ``agreed`` (a good release) or ``rejected``
(the gate let a failure through). A rejected result has already reached the PACS, so what follows is what a
clinician expects of a wrong result there: it is retracted, reason *quality*, through the same path as
``specgate jobs retract`` (an IHE IOCM rejection note to every destination that received it), by the
reviewer; the review app does that right after recording the verdict.

The draw is reproducible and unbiased: a study is drawn when its :func:`draw`, the SHA-256 of its Study
Instance UID read as a number in [0, 1), is below the share. The UID is fixed before the study reaches
specgate and says nothing about its images or the gate's verdict, and SHA-256 spreads even sequential UIDs
evenly over [0, 1), so the sampled releases are a uniform random share of all releases; anyone can redo the
draw from the UID. Every draw (drawn or not) is an audit event (``audit_sample.drawn``, with the share and
the draw), written in the transaction that releases the job; a drawn result gets an ``audit_samples`` row
(migration 0015). A newer version of the same study draws the same number, so a study stays in or out of
the sample.

    >>> round(draw("1.2.826.0.1.3680043.8.498.1"), 6)
    0.428433
    >>> is_drawn(draw("1.2.826.0.1.3680043.8.498.1"), 0.05), is_drawn(draw("1.2.826.0.1.3680043.8.498.1"), 0.5)
    (False, True)
    >>> is_drawn(0.0, 0.0)
    False
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session

from . import audit
from .schema import AuditSample, AuditSampleState, Job, JobState, Result, Series, Study, utcnow

__all__ = ["METHOD", "AuditSampleError", "PendingSample", "consider", "decide", "draw", "is_drawn", "pending",
           "pending_count", "record_retraction"]

#: how the draw is made, as the audit trail records it
METHOD = "sha256(StudyInstanceUID)[:8] / 2**64 < share"


class AuditSampleError(ValueError):
    """A blind review's verdict is refused (no such sample, decided already, no user, no reason)."""


def draw(study_instance_uid: str) -> float:
    """The study's draw in [0, 1): the first 8 bytes of the SHA-256 of its UID over 2**64."""
    digest = hashlib.sha256(study_instance_uid.strip().encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_drawn(value: float, share: float) -> bool:
    """Whether a draw falls in the sample of ``share`` (0: nothing is drawn; 1: everything is)."""
    return value < share


def consider(session: Session, *, job_id: int, result_id: int, study_instance_uid: str, share: float,
             actor: str) -> AuditSample | None:
    """Draw a just-released result for the blind audit sample (in the caller's transaction, which
    releases it): an ``audit_sample.drawn`` event either way, and a pending ``audit_samples`` row when it
    is drawn (returned). Nothing at all when the share is 0."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"audit_sample_share must be within 0..1, got {share!r}")
    if share == 0.0:
        return None
    value = draw(study_instance_uid)
    drawn = is_drawn(value, share)
    audit.append(session, actor=actor, action="audit_sample.drawn", object_type="job", object_id=job_id,
                 details={"result_id": result_id, "share": share, "draw": value, "drawn": drawn, "method": METHOD})
    if not drawn:
        return None
    row = session.execute(select(AuditSample).where(AuditSample.job_id == job_id)).scalar_one_or_none()
    if row is None:
        row = AuditSample(job_id=job_id, result_id=result_id, share=share, draw=value)
        session.add(row)
        session.flush()
    return row


@dataclass(frozen=True)
class PendingSample:
    """One blind review waiting (what the audit queue shows: nothing of the gate's verdict)."""

    sample_id: int
    job_id: int
    queued_at: datetime
    modality: str | None
    body_part: str | None
    series_description: str | None
    calling_ae: str
    station_name: str | None


def _pending() -> tuple[ColumnElement[bool], ...]:
    # a sample whose result was superseded by a newer version of the study is not shown: the newer one is
    return (AuditSample.state == AuditSampleState.PENDING, Result.superseded.is_(False),
            Job.state != JobState.SUPERSEDED)


def pending(session: Session, limit: int = 500) -> list[PendingSample]:
    """Blind reviews waiting, oldest first."""
    q = (select(AuditSample.id, AuditSample.job_id, AuditSample.created_at, Series.modality, Series.body_part,
                Series.series_description, Study.calling_ae, Series.station_name)
         .join(Result, Result.id == AuditSample.result_id).join(Job, Job.id == AuditSample.job_id)
         .join(Study, Study.id == Job.study_id)
         .outerjoin(Series, Series.series_instance_uid == Job.series_instance_uid)
         .where(*_pending()).order_by(AuditSample.created_at, AuditSample.id).limit(limit))
    return [PendingSample(r.id, r.job_id, r.created_at, r.modality, r.body_part, r.series_description, r.calling_ae,
                          r.station_name) for r in session.execute(q)]


def pending_count(session: Session) -> int:
    q = (select(func.count()).select_from(AuditSample).join(Result, Result.id == AuditSample.result_id)
         .join(Job, Job.id == AuditSample.job_id).where(*_pending()))
    return int(session.execute(q).scalar_one())


def decide(session: Session, sample_id: int, *, user: str, verdict: str, reason: str | None = None) -> AuditSample:
    """Record a blind review's verdict: ``agree`` (a good release) or ``reject`` (a missed failure; needs a
    reason). Two reviewers at once: one wins, the other is told who decided. The caller retracts a rejected
    result (:func:`record_retraction` notes how that went)."""
    user = (user or "").strip()
    if not user:
        raise AuditSampleError("a blind review needs the user who decides")
    states = {"agree": AuditSampleState.AGREED, "reject": AuditSampleState.REJECTED}
    if verdict not in states:
        raise AuditSampleError(f"a blind review's verdict is agree or reject, not {verdict!r}")
    reason = (reason or "").strip() or None
    if verdict == "reject" and not reason:
        raise AuditSampleError("a rejection needs a reason")
    row = session.get(AuditSample, sample_id)
    if row is None:
        raise AuditSampleError(f"audit sample {sample_id} does not exist")
    now = utcnow()
    done = session.execute(update(AuditSample).where(AuditSample.id == sample_id,
                                                     AuditSample.state == AuditSampleState.PENDING)
                           .values(state=states[verdict], reviewed_by=user, reviewed_at=now, reason=reason)
                           .execution_options(synchronize_session=False))
    if done.rowcount != 1:  # type: ignore[attr-defined]
        session.refresh(row)
        raise AuditSampleError(f"audit sample {sample_id} was decided already ({row.state}) by {row.reviewed_by}")
    session.refresh(row)
    audit.append(session, actor=f"user:{user}", action=f"audit_sample.{row.state}", object_type="job",
                 object_id=row.job_id, details={"sample_id": sample_id, "result_id": row.result_id, "reason": reason})
    return row


def record_retraction(session: Session, sample_id: int, *, user: str, retraction_id: int | None,
                      refused: str | None = None) -> None:
    """After a rejection: the retraction it led to, or why none was made (the result was never sent, or
    somebody retracted it already), as an audit event; the label stands either way."""
    row = session.get(AuditSample, sample_id)
    if row is None:
        raise AuditSampleError(f"audit sample {sample_id} does not exist")
    if retraction_id is not None:
        row.retraction_id = retraction_id
        audit.append(session, actor=f"user:{user}", action="audit_sample.retracted", object_type="job",
                     object_id=row.job_id, details={"sample_id": sample_id, "retraction_id": retraction_id})
    else:
        audit.append(session, actor=f"user:{user}", action="audit_sample.retraction_refused", object_type="job",
                     object_id=row.job_id, details={"sample_id": sample_id, "why": refused})
