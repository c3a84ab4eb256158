"""The ledger side of the worker on both backends: claims, attempts, the reconciler, review decisions."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from ledger import jobs
from ledger.db import session_scope
from ledger.reviews import ReviewError, decide
from ledger.schema import AuditEvent, Job, JobState, Review, Study, utcnow
from worker.pipeline import claim, retry_or_fail
from worker.reconcile import (
    Reclaimed,
    reclaim_stale_sending,
    reconcile,
    recover_stale_running,
    redeliver_lost,
    requeue_unclaimed,
    resend_retractions,
)


def _job(sessions, uid: str = "1.2.3", max_attempts: int = 3) -> int:
    with session_scope(sessions) as s:
        study = Study(study_instance_uid=uid, calling_ae="PACS")
        s.add(study)
        s.flush()
        return jobs.create_job(s, study, actor="scp", max_attempts=max_attempts).id


def _state(sessions, job_id: int) -> Job:
    with session_scope(sessions) as s:
        return s.get(Job, job_id)


def _age_heartbeat(sessions, job_id: int, seconds: float) -> None:
    with session_scope(sessions) as s:
        s.execute(update(Job).where(Job.id == job_id)
                  .values(heartbeat_at=utcnow() - timedelta(seconds=seconds), updated_at=utcnow() - timedelta(seconds=seconds)))


def test_claim_counts_attempts_and_only_one_attempt_runs(migrated) -> None:
    _, _, sessions = migrated
    job_id = _job(sessions)
    c = claim(sessions, job_id, task_id="t1", worker_id="w1", stale_after_s=60)
    assert c is not None and c.attempt == 1
    job = _state(sessions, job_id)
    assert job.state == JobState.RUNNING and job.attempts == 1 and job.task_id == "t1"
    # a duplicate message (another task id) while the first attempt is alive: skipped
    assert claim(sessions, job_id, task_id="t2", worker_id="w2", stale_after_s=60) is None
    assert _state(sessions, job_id).task_id == "t1"


def test_a_running_job_with_a_fresh_heartbeat_is_never_taken_over_redelivered_or_not(migrated) -> None:
    """The broker hands the same message out again (a lost connection, a visibility timeout, a worker
    restart) while its first attempt still runs: the claim skips it as it skips any duplicate. Only a
    heartbeat older than ``stale_after_s`` (the attempt's worker died) lets a message take the job over."""
    _, _, sessions = migrated
    job_id = _job(sessions)
    assert claim(sessions, job_id, task_id="t1", worker_id="w1", stale_after_s=60) is not None
    assert claim(sessions, job_id, task_id="t1", worker_id="w9", stale_after_s=60) is None  # redelivered
    assert claim(sessions, job_id, task_id="t2", worker_id="w2", stale_after_s=60) is None  # a duplicate
    job = _state(sessions, job_id)
    assert (job.state, job.attempts, job.task_id, job.worker_id) == (JobState.RUNNING, 1, "t1", "w1")
    _age_heartbeat(sessions, job_id, 120)  # the first attempt's worker died: no heartbeat for 2 minutes
    c = claim(sessions, job_id, task_id="t1", worker_id="w9", stale_after_s=60)
    assert c is not None and c.attempt == 2
    with session_scope(sessions) as s:
        events = [(e.action, e.details.get("reason_code")) for e in s.execute(
            select(AuditEvent).where(AuditEvent.object_id == str(job_id)).order_by(AuditEvent.id)).scalars()]
    assert events == [("job.created", None), ("job.running", None), ("job.queued", "worker_lost"),
                      ("job.running", None)]


def test_stale_running_job_is_taken_back_and_attempts_are_bounded(migrated) -> None:
    _, _, sessions = migrated
    job_id = _job(sessions, max_attempts=2)
    assert claim(sessions, job_id, task_id="t1", worker_id="w1", stale_after_s=60) is not None
    _age_heartbeat(sessions, job_id, 120)
    assert claim(sessions, job_id, task_id="t2", worker_id="w2", stale_after_s=60).attempt == 2
    _age_heartbeat(sessions, job_id, 120)
    assert claim(sessions, job_id, task_id="t3", worker_id="w3", stale_after_s=60) is None
    job = _state(sessions, job_id)
    assert job.state == JobState.FAILED and job.reason_code == "attempts_exhausted"
    # no loop: nothing claims a failed job
    assert claim(sessions, job_id, task_id="t4", worker_id="w4", stale_after_s=60) is None


def test_error_retries_then_fails(migrated) -> None:
    _, _, sessions = migrated
    job_id = _job(sessions, max_attempts=2)
    c = claim(sessions, job_id, task_id="t1", worker_id="w1", stale_after_s=60)
    assert retry_or_fail(sessions, c, RuntimeError("boom"), actor="worker") is True
    assert _state(sessions, job_id).state == JobState.QUEUED
    c = claim(sessions, job_id, task_id="t2", worker_id="w1", stale_after_s=60)
    assert retry_or_fail(sessions, c, RuntimeError("boom again"), actor="worker") is False
    job = _state(sessions, job_id)
    assert job.state == JobState.FAILED and job.reason_code == "error" and "boom again" in job.reason_detail


def test_reconciler_recovers_lost_jobs(migrated) -> None:
    _, _, sessions = migrated
    lost_queued = _job(sessions, "1.1")
    fresh_queued = _job(sessions, "1.2")
    dead_running = _job(sessions, "1.3")
    live_running = _job(sessions, "1.4")
    exhausted = _job(sessions, "1.5", max_attempts=1)
    for j in (dead_running, live_running, exhausted):
        claim(sessions, j, task_id=f"t{j}", worker_id="w", stale_after_s=60)
    _age_heartbeat(sessions, lost_queued, 1000)
    _age_heartbeat(sessions, dead_running, 1000)
    _age_heartbeat(sessions, exhausted, 1000)
    with session_scope(sessions) as s:
        from worker.reconcile import mark_enqueued

        mark_enqueued(s, fresh_queued)
    segs: list[int] = []
    dels: list[int] = []
    report = reconcile(sessions, enqueue_segment=segs.append, enqueue_delivery=dels.append,
                       queued_deadline_s=300, stale_after_s=60, sending_stale_s=30)
    assert sorted(segs) == sorted([lost_queued, dead_running])
    assert report.recovered == [dead_running] and report.requeued == [lost_queued]
    assert report.failed == [exhausted] and _state(sessions, exhausted).reason_code == "attempts_exhausted"
    assert _state(sessions, dead_running).state == JobState.QUEUED
    assert _state(sessions, live_running).state == JobState.RUNNING
    # a second pass right away finds nothing more to do
    again = reconcile(sessions, enqueue_segment=segs.append, enqueue_delivery=dels.append,
                      queued_deadline_s=300, stale_after_s=60, sending_stale_s=30)
    assert again.requeued == again.recovered == again.failed == again.redelivered == []



def test_each_sweep_of_a_pass_runs_alone_and_returns_what_it_did(migrated) -> None:
    """The five named sweeps behind reconcile(), one at a time: each acts on its own rows only, audits
    what it did and returns the ids; a sweep with nothing to do returns nothing."""
    _, _, sessions = migrated
    lost_queued, dead_running = _job(sessions, "3.1"), _job(sessions, "3.2")
    claim(sessions, dead_running, task_id="t", worker_id="w", stale_after_s=60)
    _age_heartbeat(sessions, lost_queued, 1000)
    _age_heartbeat(sessions, dead_running, 1000)
    now, segs, sent = utcnow(), [], []
    assert requeue_unclaimed(sessions, enqueue_segment=segs.append, queued_deadline_s=300, now=now,
                             actor="r") == [lost_queued]
    assert _state(sessions, dead_running).state == JobState.RUNNING  # not this sweep's business
    assert recover_stale_running(sessions, enqueue_segment=segs.append, stale_after_s=60, now=now,
                                 actor="r") == ([dead_running], [])
    assert segs == [lost_queued, dead_running]
    assert _state(sessions, dead_running).reason_code == "worker_lost"
    with session_scope(sessions) as s:
        actions = s.execute(select(AuditEvent.action).where(
            AuditEvent.actor == "r", AuditEvent.object_id.in_([str(lost_queued), str(dead_running)]))).scalars().all()
    assert sorted(actions) == ["job.queued", "job.requeued"]
    assert reclaim_stale_sending(sessions, enqueue_delivery=sent.append, sending_stale_s=30, now=now,
                                 actor="r") == Reclaimed()
    assert redeliver_lost(sessions, enqueue_delivery=sent.append, queued_deadline_s=300, now=now, actor="r") == []
    assert resend_retractions(sessions, enqueue_retraction=sent.append, queued_deadline_s=300, now=now) == []
    assert sent == []

def _held_job(sessions, uid: str) -> int:
    job_id = _job(sessions, uid)
    with session_scope(sessions) as s:
        jobs.transition(s, job_id, JobState.RUNNING, actor="w")
        jobs.transition(s, job_id, JobState.HELD, actor="w")
    return job_id


def test_two_approvals_at_once_one_wins(migrated) -> None:
    _, _, sessions = migrated
    job_id = _held_job(sessions, "2.1")
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def approve(user: str) -> None:
        barrier.wait()
        try:
            with session_scope(sessions) as s:
                decide(s, job_id, user=user, decision="approve")
            outcomes.append("approved")
        except ReviewError:
            outcomes.append("refused")

    threads = [threading.Thread(target=approve, args=(u,)) for u in ("alice", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["approved", "refused"]
    with session_scope(sessions) as s:
        assert len(s.execute(select(Review).where(Review.job_id == job_id)).scalars().all()) == 1
        assert s.get(Job, job_id).state == JobState.APPROVED


def test_review_rules(migrated) -> None:
    _, _, sessions = migrated
    job_id = _held_job(sessions, "3.1")
    with session_scope(sessions) as s:
        with pytest.raises(ReviewError, match="needs a reason"):
            decide(s, job_id, user="alice", decision="reject")
        with pytest.raises(ReviewError, match="needs the user"):
            decide(s, job_id, user=" ", decision="approve")
    with session_scope(sessions) as s:
        decide(s, job_id, user="alice", decision="reject", reason="motion artefact")
    with session_scope(sessions) as s, pytest.raises(ReviewError, match="not held"):
        decide(s, job_id, user="bob", decision="approve")
    assert _state(sessions, job_id).state == JobState.REJECTED


def test_cli_approve_reject_retry(migrated, cli) -> None:
    _, _, sessions = migrated
    held = _held_job(sessions, "4.1")
    out = cli("jobs", "reject", str(held), "--user", "alice", expect=2)  # --reason missing
    assert "reason" in out.output.lower()
    assert "rejected by alice" in cli("jobs", "reject", str(held), "--user", "alice", "--reason", "wrong organ").output
    assert "not held" in cli("jobs", "approve", str(held), "--user", "bob", expect=1).output
    failed = _job(sessions, "4.2")
    with session_scope(sessions) as s:
        jobs.transition(s, failed, JobState.FAILED, actor="w", reason_code="unreadable")
    assert "queued again" in cli("jobs", "retry", str(failed), "--user", "admin").output
    assert _state(sessions, failed).state == JobState.QUEUED
