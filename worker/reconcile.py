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
- delivery rows (a result's or a retraction's) left ``sending`` without a refresh for ``sending_stale_s``
  (the SCU timeout: a live sender refreshes its row more often, see :mod:`dicom_node.scu`): their sender
  died, perhaps after the PACS answered and before the answer was written down. Back to ``pending``
  (``delivery.reclaimed``) and their delivery enqueued at once; the resend is the same object.

Every action is an audit event. Run it periodically (``specgate worker`` and ``specgate scp`` do) or by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

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
    reclaimed: list[int] = field(default_factory=list)  # deliveries rows taken back from a dead sender
    reclaimed_retractions: list[int] = field(default_factory=list)  # retraction_deliveries rows

    def describe(self) -> str:
        return (f"re-enqueued {len(self.requeued)} queued, recovered {len(self.recovered)} running "
                f"(worker lost), failed {len(self.failed)} out of attempts, re-sent {len(self.redelivered)} "
                f"deliveries and {len(self.retractions)} retractions, took back "
                f"{len(self.reclaimed) + len(self.reclaimed_retractions)} deliveries abandoned while sending")


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


def _reclaim_sending(sessions: sessionmaker[Session], table: Any, owner: str, stale_cut: datetime, *,
                     actor: str, sending_stale_s: float) -> list[tuple[int, int, int]]:
    """Rows of ``table`` (deliveries or retraction_deliveries) left ``sending`` since before ``stale_cut``,
    moved back to ``pending`` (one guarded UPDATE each: a row its sender refreshed meanwhile is left
    alone), audited. Returns (row id, job id, ``owner`` id) of those taken back."""
    object_type = "delivery" if table is Delivery else "retraction_delivery"
    with session_scope(sessions) as s:
        stale = s.execute(select(table.id, table.job_id, getattr(table, owner), table.destination, table.attempts,
                                 table.updated_at)
                          .where(table.state == DeliveryState.SENDING, table.updated_at < stale_cut)
                          .order_by(table.id).limit(500)).all()
    taken = []
    for row_id, job_id, owner_id, destination, attempts, updated_at in stale:
        with session_scope(sessions) as s:
            res = s.execute(update(table).where(table.id == row_id, table.state == DeliveryState.SENDING,
                                                table.updated_at == updated_at)
                            .values(state=DeliveryState.PENDING, updated_at=utcnow())
                            .execution_options(synchronize_session=False))
            if res.rowcount != 1:  # type: ignore[attr-defined]
                continue  # its sender was alive after all, or another reconciler took it
            audit.append(s, actor=actor, action=f"{object_type}.reclaimed", object_type=object_type,
                         object_id=row_id,
                         details={"why": "left sending without a refresh for the SCU timeout (its sender died)",
                                  "destination": destination, "attempts": attempts, owner: owner_id,
                                  "job_id": job_id, "last_refresh": updated_at.isoformat(),
                                  "sending_stale_s": sending_stale_s})
        log.warning("%s %d to %s: its sender died while sending; taken back", object_type, row_id, destination)
        taken.append((row_id, job_id, owner_id))
    return taken


def mark_enqueued(session: Session, job_id: int) -> None:
    """Record that a message for queued job ``job_id`` was just sent to the broker."""
    session.execute(update(Job).where(Job.id == job_id, Job.state == JobState.QUEUED)
                    .values(heartbeat_at=utcnow()).execution_options(synchronize_session=False))


def reconcile(sessions: sessionmaker[Session], *, enqueue_segment: Callable[[int], None],
              enqueue_delivery: Callable[[int], None], queued_deadline_s: float, stale_after_s: float,
              sending_stale_s: float, actor: str = "reconciler",
              enqueue_retraction: Callable[[int], None] | None = None) -> ReconcileReport:
    """One pass (see the module docstring). ``stale_after_s``: a running job's heartbeat this old means its
    worker died; ``sending_stale_s``: the same for a delivery row in ``sending`` (the SCU timeout)."""
    report = ReconcileReport()
    now = utcnow()
    queued_cut = now - timedelta(seconds=queued_deadline_s)
    stale_cut = now - timedelta(seconds=stale_after_s)
    sending_cut = now - timedelta(seconds=sending_stale_s)

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

    resend: list[int] = []
    for row_id, job_id, _ in _reclaim_sending(sessions, Delivery, "result_id", sending_cut, actor=actor,
                                              sending_stale_s=sending_stale_s):
        report.reclaimed.append(row_id)
        with session_scope(sessions) as s:
            job = s.get(Job, job_id)
            if job is not None and job.state in (JobState.RELEASED, JobState.APPROVED) and job_id not in resend:
                resend.append(job_id)
    for job_id in resend:
        enqueue_delivery(job_id)
        report.redelivered.append(job_id)
    retract_again: list[int] = []
    for row_id, _, retraction_id in _reclaim_sending(sessions, RetractionDelivery, "retraction_id", sending_cut,
                                                     actor=actor, sending_stale_s=sending_stale_s):
        report.reclaimed_retractions.append(row_id)
        if retraction_id not in retract_again:
            retract_again.append(retraction_id)

    with session_scope(sessions) as s:
        to_send = [j for j in s.execute(select(Job.id).where(
            Job.state.in_([JobState.RELEASED, JobState.APPROVED]), Job.updated_at < queued_cut)).scalars()
            if j not in resend]
        for job_id in to_send:
            s.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow())
                      .execution_options(synchronize_session=False))
            audit.append(s, actor=actor, action="delivery.requeued", object_type="job", object_id=job_id,
                         details={"why": "not sent within the deadline", "deadline_s": queued_deadline_s})
    for job_id in to_send:
        enqueue_delivery(job_id)
        report.redelivered.append(job_id)
    if enqueue_retraction is not None:
        for retraction_id in retract_again + [r for r in _unsent_retractions(sessions, queued_cut)
                                              if r not in retract_again]:
            enqueue_retraction(retraction_id)
            report.retractions.append(retraction_id)
    if any((report.requeued, report.recovered, report.failed, report.redelivered, report.retractions,
            report.reclaimed, report.reclaimed_retractions)):
        log.info("reconcile: %s", report.describe())
    log.debug("reconcile pass finished (started %s)", now.isoformat())  # tests wait on this line
    return report
