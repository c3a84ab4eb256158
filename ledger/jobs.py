"""Job state transitions, allowed or refused in one place.

A move is one conditional UPDATE (``... WHERE id = :id AND state = :from``) plus its audit event, in the
caller's transaction. Two processes moving the same job at once: the database lets exactly one UPDATE
match; the other gets :class:`StaleTransition` (or :class:`IllegalTransition` if it reads the new state
first). Both are :class:`TransitionError`.

A ``job.failed`` audit event is always final: nothing moves a job out of ``failed`` but an operator's
retry, and an attempt that will be retried is ``job.queued`` (reason ``attempt_failed`` or
``worker_lost``) instead. It carries ``reason_code``, ``attempts`` and ``max_attempts`` (``attempts_exhausted``,
or ``error`` on the last attempt, when the attempts ran out): the event an operator's tools alert on.

Each attempt has a ``job_attempts`` row (where it ran, on which device): the claim opens it
(:func:`start_attempt`) and :func:`transition` closes it when the job leaves ``running``, whoever moves it
(the attempt finishing or failing, the reconciler or the next claim finding its worker dead), so no path
out of ``running`` can forget it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import ColumnElement, CursorResult, func, select, update
from sqlalchemy.orm import Session

from . import audit
from .schema import Job, JobAttempt, JobState, Study, utcnow

__all__ = [
    "ALLOWED",
    "SHADOW_NEVER",
    "TERMINAL",
    "IllegalTransition",
    "ShadowRefused",
    "StaleTransition",
    "TransitionError",
    "create_job",
    "is_allowed",
    "start_attempt",
    "transition",
]

S = JobState
ALLOWED: Mapping[JobState, frozenset[JobState]] = {
    S.RECEIVING: frozenset({S.QUEUED, S.SUPERSEDED, S.FAILED}),
    S.QUEUED: frozenset({S.RUNNING, S.FAILED, S.SUPERSEDED}),
    # running -> queued: the attempt died (worker killed, time limit) and is retried within max_attempts.
    S.RUNNING: frozenset({S.RELEASED, S.HELD, S.FAILED, S.QUEUED, S.SUPERSEDED}),
    S.RELEASED: frozenset({S.SENT, S.FAILED, S.SUPERSEDED}),
    S.HELD: frozenset({S.APPROVED, S.REJECTED, S.SUPERSEDED}),
    S.APPROVED: frozenset({S.SENT, S.FAILED}),
    # failed -> queued only by an operator's explicit retry (audited), never automatically.
    S.FAILED: frozenset({S.QUEUED}),
    S.REJECTED: frozenset(),
    S.SENT: frozenset(),
    S.SUPERSEDED: frozenset(),
}
TERMINAL = frozenset(s for s, nxt in ALLOWED.items() if not nxt)


class TransitionError(RuntimeError):
    """A job could not be moved to the state asked for."""


class IllegalTransition(TransitionError):
    def __init__(self, job_id: int, current: JobState, to: JobState) -> None:
        allowed = ", ".join(sorted(ALLOWED[current])) or "none (terminal state)"
        super().__init__(f"job {job_id}: {current} -> {to} is not allowed (from {current}: {allowed})")
        self.job_id, self.current, self.to = job_id, current, to


class StaleTransition(TransitionError):
    def __init__(self, job_id: int, expected: JobState, to: JobState) -> None:
        super().__init__(f"job {job_id}: was no longer {expected} when moving it to {to} (another process moved it)")
        self.job_id, self.expected, self.to = job_id, expected, to


class ShadowRefused(TransitionError):
    """A shadow job (:mod:`ledger.shadow`) is never approved or sent, whoever asks."""

    def __init__(self, job_id: int, to: JobState) -> None:
        super().__init__(f"job {job_id} is a shadow job: its result is never approved or sent (refused: -> {to})")
        self.job_id, self.to = job_id, to


#: what a shadow job never reaches
SHADOW_NEVER = frozenset({S.APPROVED, S.SENT})


def is_allowed(current: JobState | str, to: JobState | str) -> bool:
    return JobState(to) in ALLOWED[JobState(current)]


def create_job(session: Session, study: Study, *, actor: str, state: JobState = JobState.QUEUED,
               series_instance_uid: str | None = None, rule_name: str | None = None,
               model_name: str | None = None, max_attempts: int = 3,
               details: Mapping[str, Any] | None = None, shadow: bool = False,
               shadow_of: Job | None = None, version: int | None = None) -> Job:
    """Create the next version of ``study``'s job, audited. ``model_name``: the model it is for (its rule's
    ``model``), which decides its queue (:func:`worker.celery_app.segment_queue_of`). ``shadow``: a shadow
    job (:mod:`ledger.shadow`), of the same version as ``shadow_of``, the live job it runs beside (or of
    ``version``: shadow jobs of one assembly that no live job matched)."""
    if state not in (JobState.RECEIVING, JobState.QUEUED):
        raise ValueError(f"a new job starts as receiving or queued, not {state}")
    if (shadow_of is not None or version is not None) and not shadow:
        raise ValueError("only a shadow job runs beside another job or takes a given version")
    if shadow_of is not None:
        version = shadow_of.version
    elif version is None:
        last = session.execute(select(func.max(Job.version)).where(Job.study_id == study.id)).scalar()
        version = (last or 0) + 1
    job = Job(study_id=study.id, version=version, state=state, series_instance_uid=series_instance_uid,
              rule_name=rule_name, model_name=model_name, max_attempts=max_attempts, shadow=shadow,
              shadow_of_id=None if shadow_of is None else shadow_of.id)
    session.add(job)
    session.flush()
    audit.append(session, actor=actor, action="job.created", object_type="job", object_id=job.id,
                 details={"study_id": study.id, "version": job.version, "state": str(state),
                          "series_instance_uid": series_instance_uid, "rule": rule_name,
                          **({"shadow": True, "shadow_of": job.shadow_of_id} if shadow else {}), **(details or {})})
    return job


def transition(session: Session, job_id: int, to: JobState | str, *, actor: str,
               expect: JobState | str | None = None, reason_code: str | None = None,
               reason_detail: str | None = None, details: Mapping[str, Any] | None = None,
               guard: Sequence[ColumnElement[bool]] = (), **fields: Any) -> Job:
    """Move job ``job_id`` to ``to`` if that is allowed from its current state; audit the move.

    ``expect`` pins the state the caller believes the job is in (refused if it is not). ``guard`` adds
    conditions to the UPDATE (e.g. ``Job.task_id == mine``: only the attempt that owns the job may finish
    it); when a guard does not hold the move is a :class:`StaleTransition`. ``fields`` are extra columns to
    set in the same UPDATE (``attempts``, ``worker_id``...). Raises :class:`TransitionError`.
    """
    to = JobState(to)
    current = session.execute(select(Job.state).where(Job.id == job_id)).scalar()
    if current is None:
        raise LookupError(f"job {job_id} does not exist")
    current = JobState(current)
    if expect is not None and JobState(expect) != current:
        raise StaleTransition(job_id, JobState(expect), to)
    if to not in ALLOWED[current]:
        raise IllegalTransition(job_id, current, to)
    if to in SHADOW_NEVER and session.execute(select(Job.shadow).where(Job.id == job_id)).scalar():
        raise ShadowRefused(job_id, to)
    now = utcnow()
    values: dict[str, Any] = {"state": to, "updated_at": now, **fields}
    if reason_code is not None or to == JobState.FAILED:
        values["reason_code"] = reason_code or "unspecified"
        values["reason_detail"] = reason_detail
    if to in TERMINAL:
        values["finished_at"] = now
    res: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        update(Job).where(Job.id == job_id, Job.state == current, *guard).values(**values)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        raise StaleTransition(job_id, current, to)
    if current == JobState.RUNNING:  # the attempt that ran it has ended, however it ended
        session.execute(update(JobAttempt).where(JobAttempt.job_id == job_id, JobAttempt.ended_at.is_(None))
                        .values(ended_at=now, outcome=str(to), reason_code=values.get("reason_code"))
                        .execution_options(synchronize_session=False))
    body: dict[str, Any] = {"from": str(current), "to": str(to)}
    if reason_code is not None or to == JobState.FAILED:
        body["reason_code"] = values["reason_code"]
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    if to == JobState.FAILED:  # what an operator's alert on job.failed needs, without a second query
        body.update(attempts=job.attempts, max_attempts=job.max_attempts)
    if details:
        body.update(details)
    audit.append(session, actor=actor, action=f"job.{to}", object_type="job", object_id=job_id, details=body)
    return job


def start_attempt(session: Session, job: Job, *, task_id: str | None, host: str, pid: int,
                  device: str) -> JobAttempt:
    """Record that attempt ``job.attempts`` of ``job`` (just moved to ``running`` by its claim, in this
    transaction) runs on ``host`` in process ``pid`` on ``device``. :func:`transition` closes it."""
    row = JobAttempt(job_id=job.id, attempt=job.attempts, task_id=None if task_id is None else task_id[:64],
                     host=host[:255], pid=pid, device=device[:128], started_at=utcnow())
    session.add(row)
    session.flush()
    return row
