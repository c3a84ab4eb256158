"""Send a released or approved result to every destination, then move its job to ``sent`` or ``failed``.

The per-destination work (one ``deliveries`` row each, retries with back-off, idempotence: a destination
already ``sent`` is never sent again, one sender at a time) is :func:`dicom_node.scu.deliver`. This module
owns the job's side: ``sent`` only when every destination answered 0x0000, ``failed``
(``delivery_failed``) when one gave up, untouched while another process is still sending. A shadow job
(:mod:`ledger.shadow`) is refused (``delivery.refused``, audited): nothing of it is sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import scu
from ledger import audit, jobs, shadow
from ledger.db import session_scope
from ledger.schema import Delivery, Job, JobState, Result

from .config import DeliveryConfig
from .objects import rewrite_approved
from .retraction import retract_superseded

if TYPE_CHECKING:
    from .prometheus import WorkerMetrics

__all__ = ["deliver_job"]

log = logging.getLogger("specgate.worker")


def _any_delivery(sessions: sessionmaker[Session], result_id: int) -> bool:
    with session_scope(sessions) as s:
        return s.execute(select(Delivery.id).where(Delivery.result_id == result_id).limit(1)).first() is not None


def deliver_job(sessions: sessionmaker[Session], job_id: int, config: DeliveryConfig, *, actor: str,
                sleep: Callable[[float], None] = time.sleep, metrics: WorkerMetrics | None = None) -> str:
    """Send job ``job_id``'s result and move the job to ``sent`` or ``failed``; ``metrics`` counts the
    attempts, the deliveries given up and the job's failure."""
    with session_scope(sessions) as s:
        job = s.get(Job, job_id)
        if job is not None and job.shadow:  # silent mode (ledger.shadow): never sent, and the ask is recorded
            shadow.refuse(s, job_id, actor=actor, action="delivery.refused", what="sent")
            return "refused (shadow job)"
        if job is None or job.state not in (JobState.RELEASED, JobState.APPROVED):
            return f"skipped ({job.state if job else 'no such job'})"
        state = job.state
        result = s.execute(select(Result).where(Result.job_id == job_id)).scalar_one_or_none()
        if result is None:
            raise LookupError(f"job {job_id} is {state} but has no result")
        result_id = result.id
        if not config.destinations:
            audit.append(s, actor=actor, action="delivery.skipped", object_type="job", object_id=job_id,
                         details={"why": "no destinations configured (SPECGATE_DESTINATIONS)"})
            return "no destinations"
    if state == JobState.APPROVED and not _any_delivery(sessions, result_id):
        # the approver's name and the time go into the SEG and the SR before they first leave specgate
        if rewrite_approved(sessions, job_id, config.files):
            with session_scope(sessions) as s:
                audit.append(s, actor=actor, action="result.approved_objects_written", object_type="result",
                             object_id=result_id, details={"job_id": job_id})
    outcomes = scu.deliver(sessions, result_id, config.destinations, actor=actor, retry_policy=config.retry,
                           sleep=sleep, on_attempt=None if metrics is None else metrics.delivery_observer("result"),
                           files=config.files)
    if any(o.busy for o in outcomes):
        return "busy"
    failed = [o for o in outcomes if not o.sent]
    try:
        with session_scope(sessions) as s:
            if failed:
                detail = "; ".join(f"{o.destination}: {o.error or 'status 0x%04X' % (o.last_status or 0)}"
                                   for o in failed)
                jobs.transition(s, job_id, JobState.FAILED, actor=actor, expect=state,
                                reason_code="delivery_failed", reason_detail=detail[:2000],
                                details={"destinations": [o.destination for o in failed]})
            else:
                jobs.transition(s, job_id, JobState.SENT, actor=actor, expect=state,
                                details={"destinations": [o.destination for o in outcomes]})
    except jobs.TransitionError as exc:  # another delivery task finished the job first
        log.info("job %s: %s", job_id, exc)
        return "done elsewhere"
    if failed:
        if metrics is not None:
            metrics.job_failed("delivery_failed")
        return "failed"
    # a newer version of the study reached the PACS: the results it supersedes are taken back there
    retracted = retract_superseded(sessions, job_id, config, actor=actor, metrics=metrics)
    return "sent" + (f"; retracted {len(retracted)} superseded result(s)" if retracted else "")
