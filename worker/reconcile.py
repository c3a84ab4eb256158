"""Find what the broker lost, from the ledger, and enqueue it again (``specgate reconcile``).

The SQL ledger is the source of truth; a broker restart or flush loses messages, never jobs. A pass:

- ``queued`` jobs not enqueued for ``queued_deadline_s`` (``heartbeat_at`` holds the last enqueue time
  while a job is queued): enqueue again. A duplicate message is harmless: only one attempt can claim.
- ``running`` jobs whose heartbeat is older than ``stale_after_s`` (their worker died): back to ``queued``
  (``worker_lost``) and enqueue, or ``failed`` (``attempts_exhausted``) when no attempt is left.
- ``released``/``approved`` jobs not updated for ``queued_deadline_s`` (a lost delivery message): enqueue
  their delivery again. Deliveries are idempotent per (result, destination).
- retractions older than ``queued_deadline_s`` whose KOS has not reached every destination that received
  the result (sent or finally failed): enqueue their sending again (idempotent per destination too).

Every action is an audit event. Run it periodically (``specgate worker`` and ``specgate scp`` do) or by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from ledger import audit, jobs
from ledger.db import session_scope
from ledger.schema import Delivery, DeliveryState, Job, JobState, Retraction, RetractionDelivery, utcnow

__all__ = ["ReconcileReport", "mark_enqueued", "reconcile"]

log = logging.getLogger("specgate.reconcile")


@dataclass
class ReconcileReport:
    requeued: list[int] = field(default_factory=list)
    recovered: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    redelivered: list[int] = field(default_factory=list)
    retractions: list[int] = field(default_factory=list)

    def describe(self) -> str:
        return (f"re-enqueued {len(self.requeued)} queued, recovered {len(self.recovered)} running "
                f"(worker lost), failed {len(self.failed)} out of attempts, re-sent {len(self.redelivered)} "
                f"deliveries and {len(self.retractions)} retractions")


def _unsent_retractions(sessions: sessionmaker[Session], older_than: datetime) -> list[int]:
    """Retractions made before ``older_than`` whose KOS has not reached (or finally failed at) every
    destination that received the result: their task was lost (a broker restart) or is still retrying."""
    done = (select(func.count()).select_from(RetractionDelivery)
            .where(RetractionDelivery.retraction_id == Retraction.id,
                   RetractionDelivery.state.in_([DeliveryState.SENT, DeliveryState.FAILED]))
            .scalar_subquery())
    received = (select(func.count()).select_from(Delivery)
                .where(Delivery.result_id == Retraction.result_id, Delivery.state == DeliveryState.SENT)
                .scalar_subquery())
    with session_scope(sessions) as s:
        return list(s.execute(select(Retraction.id).where(Retraction.created_at < older_than, done < received)
                              .order_by(Retraction.id).limit(500)).scalars())


def mark_enqueued(session: Session, job_id: int) -> None:
    """Record that a message for queued job ``job_id`` was just sent to the broker."""
    session.execute(update(Job).where(Job.id == job_id, Job.state == JobState.QUEUED)
                    .values(heartbeat_at=utcnow()).execution_options(synchronize_session=False))


def reconcile(sessions: sessionmaker[Session], *, enqueue_segment: Callable[[int], None],
              enqueue_delivery: Callable[[int], None], queued_deadline_s: float, stale_after_s: float,
              actor: str = "reconciler", enqueue_retraction: Callable[[int], None] | None = None) -> ReconcileReport:
    report = ReconcileReport()
    now = utcnow()
    queued_cut = now - timedelta(seconds=queued_deadline_s)
    stale_cut = now - timedelta(seconds=stale_after_s)

    with session_scope(sessions) as s:
        running = s.execute(select(Job.id, Job.attempts, Job.max_attempts, Job.heartbeat_at).where(
            Job.state == JobState.RUNNING, or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_cut))
        ).all()
    for job_id, attempts, max_attempts, beat in running:
        try:
            with session_scope(sessions) as s:
                guard = [Job.heartbeat_at.is_(None)] if beat is None else [Job.heartbeat_at == beat]
                if attempts >= max_attempts:
                    jobs.transition(s, job_id, JobState.FAILED, actor=actor, expect=JobState.RUNNING,
                                    reason_code="attempts_exhausted", guard=guard,
                                    reason_detail=f"worker lost on attempt {attempts} of {max_attempts}")
                    report.failed.append(job_id)
                    continue
                jobs.transition(s, job_id, JobState.QUEUED, actor=actor, expect=JobState.RUNNING,
                                reason_code="worker_lost", guard=guard, heartbeat_at=utcnow())
            enqueue_segment(job_id)
            report.recovered.append(job_id)
        except jobs.TransitionError:
            continue  # its worker was alive after all (a heartbeat landed), or another reconciler won

    with session_scope(sessions) as s:
        queued = s.execute(select(Job.id).where(
            Job.state == JobState.QUEUED, or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < queued_cut))
        ).scalars().all()
        for job_id in queued:
            mark_enqueued(s, job_id)
            audit.append(s, actor=actor, action="job.requeued", object_type="job", object_id=job_id,
                         details={"why": "no claim within the deadline", "deadline_s": queued_deadline_s})
    for job_id in queued:
        enqueue_segment(job_id)
        report.requeued.append(job_id)

    with session_scope(sessions) as s:
        to_send = s.execute(select(Job.id).where(
            Job.state.in_([JobState.RELEASED, JobState.APPROVED]), Job.updated_at < queued_cut)).scalars().all()
        for job_id in to_send:
            s.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow())
                      .execution_options(synchronize_session=False))
            audit.append(s, actor=actor, action="delivery.requeued", object_type="job", object_id=job_id,
                         details={"why": "not sent within the deadline", "deadline_s": queued_deadline_s})
    for job_id in to_send:
        enqueue_delivery(job_id)
        report.redelivered.append(job_id)
    if enqueue_retraction is not None:
        for retraction_id in _unsent_retractions(sessions, queued_cut):
            enqueue_retraction(retraction_id)
            report.retractions.append(retraction_id)
    if any((report.requeued, report.recovered, report.failed, report.redelivered, report.retractions)):
        log.info("reconcile: %s", report.describe())
    log.debug("reconcile pass finished (started %s)", now.isoformat())  # tests wait on this line
    return report
