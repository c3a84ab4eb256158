"""ledger.leases.LeaseRefresher on both backends: it moves the timestamp, outlives a database that is away
(and refreshes again once it is back), tells its holder when the row is no longer theirs, stops on exit."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import pytest
from sqlalchemy import Update, create_engine, update
from sqlalchemy.orm import Session, sessionmaker

from ledger import jobs
from ledger.db import session_scope
from ledger.leases import LeaseRefresher
from ledger.schema import Job, JobState, Study, utcnow
from tests.peers import free_port, wait_for


def _running_job(sessions: sessionmaker[Session], task_id: str = "t1") -> int:
    with session_scope(sessions) as s:
        study = Study(study_instance_uid="1.2.3", calling_ae="PACS")
        s.add(study)
        s.flush()
        job = jobs.create_job(s, study, actor="test")
        jobs.transition(s, job.id, JobState.RUNNING, actor="test", expect=JobState.QUEUED, task_id=task_id,
                        heartbeat_at=utcnow() - timedelta(hours=1))
        return job.id


def _beat(job_id: int, task_id: str = "t1") -> Update:
    return (update(Job).where(Job.id == job_id, Job.task_id == task_id, Job.state == JobState.RUNNING)
            .values(heartbeat_at=utcnow()))


def _heartbeat_at(sessions: sessionmaker[Session], job_id: int) -> datetime:
    with session_scope(sessions) as s:
        job = s.get(Job, job_id)
        assert job is not None and job.heartbeat_at is not None
        return job.heartbeat_at.replace(tzinfo=None)


def test_the_refresher_moves_the_timestamp_while_held_and_stops_on_exit(migrated) -> None:
    _, _, sessions = migrated
    job_id = _running_job(sessions)
    before = _heartbeat_at(sessions, job_id)
    with LeaseRefresher(sessions, f"job {job_id}", lambda: _beat(job_id), every_s=0.05) as lease:
        wait_for(lambda: lease.refreshes >= 2, timeout=30, what="two refreshes")
        assert _heartbeat_at(sessions, job_id) > before
        assert lease.held and lease.failures == 0
    # stopped: its thread is gone, and the row no longer moves
    assert not any(t.name == f"lease-job {job_id}" for t in threading.enumerate())
    stamped, count = _heartbeat_at(sessions, job_id), lease.refreshes
    threading.Event().wait(0.3)  # six refresh periods
    assert _heartbeat_at(sessions, job_id) == stamped and lease.refreshes == count

def test_a_lost_lease_is_reported_and_its_refreshes_stop(migrated) -> None:
    """Another task took the job over: the refresh matches no row, ``held`` turns False, and the
    refresher never stamps the new holder's row."""
    _, _, sessions = migrated
    job_id = _running_job(sessions)
    with LeaseRefresher(sessions, f"job {job_id}", lambda: _beat(job_id), every_s=0.05) as lease:
        wait_for(lambda: lease.refreshes >= 1, timeout=30, what="a first refresh")
        with session_scope(sessions) as s:  # taken over: another task id, and an old heartbeat of its own
            s.execute(update(Job).where(Job.id == job_id)
                      .values(task_id="t2", heartbeat_at=datetime(2000, 1, 1)))
        wait_for(lambda: not lease.held, timeout=30, what="the lease reported lost")
        count = lease.refreshes
        threading.Event().wait(0.3)  # six refresh periods
        assert lease.refreshes == count
    assert _heartbeat_at(sessions, job_id) == datetime(2000, 1, 1)


def _dead_engine_url(db_url: str, tmp_path) -> str:
    """The same backend, unreachable: a port nothing listens on, a file in a folder that does not exist."""
    if db_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path / 'no-such-folder' / 'ledger.db'}"
    return f"postgresql+psycopg://root@127.0.0.1:{free_port()}/test"


def test_a_database_that_is_away_does_not_kill_the_refresher(migrated, db_url: str, tmp_path) -> None:
    """The sessionmaker first points at a database nobody can reach (every refresh fails and is logged),
    then at the real one again: the same refresher, still running, moves the timestamp."""
    _, engine, sessions = migrated
    job_id = _running_job(sessions)
    before = _heartbeat_at(sessions, job_id)
    dead = create_engine(_dead_engine_url(db_url, tmp_path))
    flaky: sessionmaker[Session] = sessionmaker(dead, expire_on_commit=False)
    try:
        with LeaseRefresher(flaky, f"job {job_id}", lambda: _beat(job_id), every_s=0.05) as lease:
            wait_for(lambda: lease.failures >= 3, timeout=30, what="three failed refreshes")
            assert lease.refreshes == 0 and lease.held
            assert _heartbeat_at(sessions, job_id) == before
            flaky.configure(bind=engine)  # the database is back
            wait_for(lambda: lease.refreshes >= 1, timeout=30, what="a refresh once the database is back")
            assert lease.held
        assert _heartbeat_at(sessions, job_id) > before
    finally:
        dead.dispose()


def test_every_s_must_be_positive() -> None:
    with pytest.raises(ValueError, match="every_s must be positive, got -1"):
        LeaseRefresher(sessionmaker(), "job 1", lambda: _beat(1), every_s=-1)
