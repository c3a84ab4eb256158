"""A radiologist's decision on a held result: approve (then it is sent) or reject (never sent).

One function, used by ``specgate jobs approve|reject`` and the review app alike. A shadow job's result
(:mod:`ledger.shadow`) is refused, and the refusal is committed as an audit event ``review.refused``. The decision row, the
state move and the audit event land in one transaction; two approvals at once: one wins, the other gets a
:class:`ledger.jobs.TransitionError`, so the result is sent once.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from . import audit, jobs, shadow
from .schema import Job, JobState, Review, ReviewDecision

__all__ = ["ReviewError", "decide"]


class ReviewError(ValueError):
    """The decision is refused (no such job, not held, missing reason or user)."""


def decide(session: Session, job_id: int, *, user: str, decision: ReviewDecision | str,
           reason: str | None = None) -> Review:
    decision = ReviewDecision(decision)
    user = (user or "").strip()
    if not user:
        raise ReviewError("a review needs the user who decides")
    reason = (reason or "").strip() or None
    if decision == ReviewDecision.REJECT and not reason:
        raise ReviewError("a rejection needs a reason")
    job = session.get(Job, job_id)
    if job is None:
        raise ReviewError(f"job {job_id} does not exist")
    if job.shadow:  # silent mode: nobody decides on it, and the refusal is kept (committed, then raised)
        error = shadow.refuse(session, job_id, actor=f"user:{user}", action="review.refused",
                              what="approved" if decision == ReviewDecision.APPROVE else "rejected")
        session.commit()
        raise ReviewError(str(error))
    if job.state != JobState.HELD:
        raise ReviewError(f"job {job_id} is {job.state}, not held: only held results are reviewed")
    to = JobState.APPROVED if decision == ReviewDecision.APPROVE else JobState.REJECTED
    try:
        jobs.transition(session, job_id, to, actor=f"user:{user}", expect=JobState.HELD,
                        details={"reason": reason} if reason else None)
    except jobs.TransitionError as exc:
        raise ReviewError(f"job {job_id} was decided by someone else just now ({exc})") from exc
    review = Review(job_id=job_id, username=user, decision=decision, reason=reason)
    session.add(review)
    session.flush()
    audit.append(session, actor=f"user:{user}", action=f"review.{decision}", object_type="job", object_id=job_id,
                 details={"review_id": review.id, "reason": reason})
    return review
