"""Find what the broker lost, from the ledger, and enqueue it again (``specgate reconcile``).

The SQL ledger is the source of truth; a broker restart or flush loses messages, never jobs. A pass
(:func:`reconcile`) runs five sweeps, in this order:

1. :func:`recover_stale_running`: ``running`` jobs whose heartbeat is older than ``stale_after_s`` (their
   worker died): back to ``queued`` (``worker_lost``) and enqueue, or ``failed`` (``attempts_exhausted``)
   when no attempt is left.
2. :func:`requeue_unclaimed`: ``queued`` jobs not enqueued for ``queued_deadline_s`` (``heartbeat_at`` holds
   the last enqueue time while a job is queued): enqueue again. A duplicate message is harmless: only one
   attempt can claim.
3. :func:`reclaim_stale_sending`: delivery rows (a result's or a retraction's) left ``sending`` without a
   refresh for ``sending_stale_s`` (the SCU timeout: a live sender refreshes its row more often, see
   :mod:`dicom_node.scu`): their sender died, perhaps after the PACS answered and before the answer was
   written down. Back to ``pending`` (``delivery.reclaimed``) and their delivery enqueued at once; the
   resend is the same object.
4. :func:`redeliver_lost`: ``released``/``approved`` jobs not updated for ``queued_deadline_s`` (a lost
   delivery message): enqueue their delivery again. Deliveries are idempotent per (result, destination).
5. :func:`resend_retractions`: retractions older than ``queued_deadline_s`` whose KOS has not reached every
   destination that received the result (sent or finally failed): enqueue their sending again
   (idempotent per destination too).

Every action is an audit event. Run it periodically (``specgate worker`` and ``specgate scp`` do) or by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from ledger import audit, jobs
from ledger.db import session_scope
from ledger.schema import Delivery, DeliveryState, Job, JobState, Retraction, RetractionDelivery, utcnow

__all__ = ["Reclaimed", "ReconcileReport", "mark_enqueued", "reclaim_stale_sending", "reconcile", "recover_stale_running",
           "redeliver_lost", "requeue_unclaimed", "resend_retractions"]

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


def requeue_unclaimed(sessions: sessionmaker[Session], *, enqueue_segment: Callable[[int], None],
                      queued_deadline_s: float, now: datetime, actor: str) -> list[int]:
    """Sweep 2: ``queued`` jobs not enqueued for ``queued_deadline_s`` (their message was lost): enqueued
    again, ``job.requeued`` audited. Returns their ids."""
    queued_cut = now - timedelta(seconds=queued_deadline_s)
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
    return list(queued)


def recover_stale_running(sessions: sessionmaker[Session], *, enqueue_segment: Callable[[int], None],
                          stale_after_s: float, now: datetime, actor: str) -> tuple[list[int], list[int]]:
    """Sweep 1: ``running`` jobs whose heartbeat is older than ``stale_after_s`` (their worker died): back to
    ``queued`` (``worker_lost``) and enqueued, or ``failed`` (``attempts_exhausted``) when no attempt is
    left. Each move is guarded by the heartbeat it saw: a job whose heartbeat landed meanwhile is left to
    its worker. Returns (recovered, failed)."""
    stale_cut = now - timedelta(seconds=stale_after_s)
    recovered: list[int] = []
    failed: list[int] = []
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
                    failed.append(job_id)
                    continue
                jobs.transition(s, job_id, JobState.QUEUED, actor=actor, expect=JobState.RUNNING,
                                reason_code="worker_lost", guard=guard, heartbeat_at=utcnow())
            enqueue_segment(job_id)
            recovered.append(job_id)
        except jobs.TransitionError:
            continue  # its worker was alive after all (a heartbeat landed), or another reconciler won
    return recovered, failed


@dataclass
class Reclaimed:
    """What :func:`reclaim_stale_sending` took back, and what the later sweeps must not send twice."""
    deliveries: list[int] = field(default_factory=list)  # deliveries rows
    retraction_deliveries: list[int] = field(default_factory=list)  # retraction_deliveries rows
    redelivered: list[int] = field(default_factory=list)  # jobs whose delivery was enqueued again
    retractions: list[int] = field(default_factory=list)  # retractions to enqueue again


def reclaim_stale_sending(sessions: sessionmaker[Session], *, enqueue_delivery: Callable[[int], None],
                          sending_stale_s: float, now: datetime, actor: str) -> Reclaimed:
    """Sweep 3: delivery rows (a result's and a retraction's) left ``sending`` without a refresh for
    ``sending_stale_s``: back to ``pending`` (``delivery.reclaimed``). A reclaimed result's job, if still
    ``released``/``approved``, has its delivery enqueued at once; a reclaimed retraction is returned for
    :func:`resend_retractions` to enqueue (once, with the retractions it finds itself)."""
    sending_cut = now - timedelta(seconds=sending_stale_s)
    done = Reclaimed()
    for row_id, job_id, _ in _reclaim_sending(sessions, Delivery, "result_id", sending_cut, actor=actor,
                                              sending_stale_s=sending_stale_s):
        done.deliveries.append(row_id)
        with session_scope(sessions) as s:
            job = s.get(Job, job_id)
            if (job is not None and job.state in (JobState.RELEASED, JobState.APPROVED)
                    and job_id not in done.redelivered):
                done.redelivered.append(job_id)
    for job_id in done.redelivered:
        enqueue_delivery(job_id)
    for row_id, _, retraction_id in _reclaim_sending(sessions, RetractionDelivery, "retraction_id", sending_cut,
                                                     actor=actor, sending_stale_s=sending_stale_s):
        done.retraction_deliveries.append(row_id)
        if retraction_id not in done.retractions:
            done.retractions.append(retraction_id)
    return done


def redeliver_lost(sessions: sessionmaker[Session], *, enqueue_delivery: Callable[[int], None],
                   queued_deadline_s: float, now: datetime, actor: str, already: Sequence[int] = ()) -> list[int]:
    """Sweep 4: ``released``/``approved`` jobs not updated for ``queued_deadline_s`` (their delivery message
    was lost): delivery enqueued again, ``delivery.requeued`` audited; the jobs in ``already`` (enqueued by
    :func:`reclaim_stale_sending` in this pass) are left out. Returns their ids."""
    queued_cut = now - timedelta(seconds=queued_deadline_s)
    with session_scope(sessions) as s:
        to_send = [j for j in s.execute(select(Job.id).where(
            Job.state.in_([JobState.RELEASED, JobState.APPROVED]), Job.updated_at < queued_cut,
            Job.shadow.is_(False))).scalars()  # a shadow job is never sent (ledger.shadow)
            if j not in already]
        for job_id in to_send:
            s.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow())
                      .execution_options(synchronize_session=False))
            audit.append(s, actor=actor, action="delivery.requeued", object_type="job", object_id=job_id,
                         details={"why": "not sent within the deadline", "deadline_s": queued_deadline_s})
    for job_id in to_send:
        enqueue_delivery(job_id)
    return to_send


def resend_retractions(sessions: sessionmaker[Session], *, enqueue_retraction: Callable[[int], None],
                       queued_deadline_s: float, now: datetime, first: Sequence[int] = ()) -> list[int]:
    """Sweep 5: retractions older than ``queued_deadline_s`` whose KOS has not reached every destination
    that received the result, and those in ``first`` (reclaimed by :func:`reclaim_stale_sending`): their
    sending enqueued again, each once. Returns their ids, ``first`` first."""
    again = list(dict.fromkeys(first))
    again += [r for r in _unsent_retractions(sessions, now - timedelta(seconds=queued_deadline_s))
              if r not in again]
    for retraction_id in again:
        enqueue_retraction(retraction_id)
    return again


def reconcile(sessions: sessionmaker[Session], *, enqueue_segment: Callable[[int], None],
              enqueue_delivery: Callable[[int], None], queued_deadline_s: float, stale_after_s: float,
              sending_stale_s: float, actor: str = "reconciler",
              enqueue_retraction: Callable[[int], None] | None = None) -> ReconcileReport:
    """One pass (see the module docstring): the five sweeps, in an order that matters: a job recovered from
    a dead worker is stamped as just enqueued, so the queued sweep does not enqueue it twice; a job whose
    delivery row was reclaimed is enqueued once, not again by the lost-delivery sweep. ``stale_after_s``:
    a running job's heartbeat this old means its worker died; ``sending_stale_s``: the same for a delivery
    row in ``sending`` (the SCU timeout). Without ``enqueue_retraction`` retractions are left alone (their
    rows are still reclaimed)."""
    report = ReconcileReport()
    now = utcnow()
    report.recovered, report.failed = recover_stale_running(
        sessions, enqueue_segment=enqueue_segment, stale_after_s=stale_after_s, now=now, actor=actor)
    report.requeued = requeue_unclaimed(sessions, enqueue_segment=enqueue_segment,
                                        queued_deadline_s=queued_deadline_s, now=now, actor=actor)
    reclaimed = reclaim_stale_sending(sessions, enqueue_delivery=enqueue_delivery, sending_stale_s=sending_stale_s,
                                      now=now, actor=actor)
    report.reclaimed, report.reclaimed_retractions = reclaimed.deliveries, reclaimed.retraction_deliveries
    report.redelivered = reclaimed.redelivered + redeliver_lost(
        sessions, enqueue_delivery=enqueue_delivery, queued_deadline_s=queued_deadline_s, now=now, actor=actor,
        already=reclaimed.redelivered)
    if enqueue_retraction is not None:
        report.retractions = resend_retractions(sessions, enqueue_retraction=enqueue_retraction,
                                                queued_deadline_s=queued_deadline_s, now=now,
                                                first=reclaimed.retractions)
    if any((report.requeued, report.recovered, report.failed, report.redelivered, report.retractions,
            report.reclaimed, report.reclaimed_retractions)):
        log.info("reconcile: %s", report.describe())
    log.debug("reconcile pass finished (started %s)", now.isoformat())
    return report
