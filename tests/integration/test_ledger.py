"""The ledger on both backends: migrations, the job state machine, the audit chain and its triggers."""

from __future__ import annotations

import sqlite3
import threading

import pytest
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import DBAPIError

from ledger import audit, jobs, migrations
from ledger.db import open_engine, session_scope
from ledger.schema import AuditEvent, Base, Job, JobState, Study


def _study(session, uid: str = "1.2.826.0.1.3680043.8.498.1") -> Study:
    study = Study(study_instance_uid=uid, calling_ae="PACS")
    session.add(study)
    session.flush()
    return study


def test_upgrade_downgrade_upgrade_keeps_rows(migrated) -> None:
    settings, engine, sessions = migrated
    with session_scope(sessions) as s:
        job = jobs.create_job(s, _study(s), actor="test")
        job_id = job.id
    with engine.connect() as conn:
        assert conn.execute(text("SELECT jobs FROM v_job_state_counts WHERE state = 'queued'")).scalar() == 1
    migrations.downgrade(settings.db_url, "0001")
    assert migrations.current_revision(engine) == "0001"
    assert "v_job_state_counts" not in inspect(engine).get_view_names()
    migrations.upgrade(settings.db_url)
    assert migrations.current_revision(engine) == migrations.head_revision()
    with session_scope(sessions) as s:
        assert s.get(Job, job_id).state == JobState.QUEUED
        assert audit.verify(s).ok and audit.count(s) == 1
    with engine.connect() as conn:
        assert conn.execute(text("SELECT jobs FROM v_job_state_counts WHERE state = 'queued'")).scalar() == 1
    # downgrading everything and back leaves an empty, working ledger (and the triggers recreated)
    migrations.downgrade(settings.db_url, "base")
    assert "jobs" not in inspect(engine).get_table_names()
    migrations.upgrade(settings.db_url)
    with session_scope(sessions) as s:
        audit.append(s, actor="test", action="x", object_type="t", object_id=1)
    with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_events"))


def test_models_match_the_newest_migration(migrated) -> None:
    """schema.py and the migrations must agree: autogenerate finds nothing to do."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    _, engine, _ = migrated
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_state_machine_allows_the_documented_path_and_refuses_the_rest(migrated) -> None:
    _, _, sessions = migrated
    with session_scope(sessions) as s:
        job_id = jobs.create_job(s, _study(s), actor="scp").id
    path = [JobState.RUNNING, JobState.HELD, JobState.APPROVED, JobState.SENT]
    for to in path:
        with session_scope(sessions) as s:
            assert jobs.transition(s, job_id, to, actor="worker").state == to
    for to in JobState:
        with session_scope(sessions) as s, pytest.raises(jobs.IllegalTransition, match="not allowed"):
            jobs.transition(s, job_id, to, actor="worker")
    with session_scope(sessions) as s:
        job_id2 = jobs.create_job(s, s.get(Job, job_id).study, actor="scp").id
        assert s.get(Job, job_id2).version == 2
        with pytest.raises(jobs.IllegalTransition):
            jobs.transition(s, job_id2, JobState.SENT, actor="worker")  # queued -> sent skips the gate
        with pytest.raises(jobs.StaleTransition):
            jobs.transition(s, job_id2, JobState.RUNNING, actor="worker", expect=JobState.HELD)
        failed = jobs.transition(s, job_id2, JobState.FAILED, actor="worker", reason_code="corrupt_series")
        assert failed.reason_code == "corrupt_series" and failed.finished_at is None
        actions = [e.action for e in s.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars()]
    assert actions == ["job.created", "job.running", "job.held", "job.approved", "job.sent",
                       "job.created", "job.failed"]


def test_two_threads_moving_one_job_exactly_one_wins(migrated) -> None:
    _, engine, sessions = migrated
    with session_scope(sessions) as s:
        job_id = jobs.create_job(s, _study(s), actor="scp").id
    rounds = 8
    for _ in range(rounds):
        barrier = threading.Barrier(2)
        outcomes: list[str] = []

        def move(name: str, barrier: threading.Barrier = barrier, outcomes: list[str] = outcomes) -> None:
            barrier.wait()
            try:
                with session_scope(sessions) as s:
                    jobs.transition(s, job_id, JobState.RUNNING, actor=name)
                outcomes.append("won")
            except jobs.TransitionError:
                outcomes.append("lost")

        threads = [threading.Thread(target=move, args=(f"worker-{i}",)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(outcomes) == ["lost", "won"]
        with session_scope(sessions) as s:
            jobs.transition(s, job_id, JobState.QUEUED, actor="reconciler")
    with session_scope(sessions) as s:
        running = s.execute(select(func.count()).select_from(AuditEvent)
                            .where(AuditEvent.action == "job.running")).scalar()
        assert running == rounds
        assert audit.verify(s).ok


def test_concurrent_appends_keep_one_chain(migrated) -> None:
    _, _, sessions = migrated
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(15):
                with session_scope(sessions) as s:
                    audit.append(s, actor=f"w{n}", action="test.event", object_type="test", object_id=i)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with session_scope(sessions) as s:
        result = audit.verify(s)
        assert result.ok and result.checked == 60


def test_audit_update_and_delete_are_refused(migrated) -> None:
    _, engine, sessions = migrated
    with session_scope(sessions) as s:
        audit.append(s, actor="test", action="test.event", object_type="test", object_id=1, details={"a": 1})
    for stmt in ("UPDATE audit_events SET actor = 'mallory'", "DELETE FROM audit_events"):
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text(stmt))
    if engine.dialect.name == "postgresql":
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text("TRUNCATE audit_events"))
    with session_scope(sessions) as s:
        assert audit.count(s) == 1 and audit.verify(s).ok


def test_audit_refuses_patient_identifiers(migrated) -> None:
    _, _, sessions = migrated
    with session_scope(sessions) as s:
        with pytest.raises(ValueError, match="patient-identifying"):
            audit.append(s, actor="scp", action="x", object_type="t", object_id=1,
                         details={"study": {"PatientName": "DOE^JANE"}})
        with pytest.raises(ValueError):
            audit.append(s, actor="scp", action="x", object_type="t", object_id=1, details={"v": float("nan")})


def _tamper(engine, event_id: int) -> None:
    """Change an audit row behind the application's back, as a superuser / file editor could."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE audit_events DISABLE TRIGGER USER"))
            conn.execute(text("UPDATE audit_events SET actor = 'mallory' WHERE id = :i"), {"i": event_id})
            conn.execute(text("ALTER TABLE audit_events ENABLE TRIGGER USER"))
    else:
        path = engine.url.database
        con = sqlite3.connect(path)
        con.execute("DROP TRIGGER audit_events_no_update")
        con.execute("UPDATE audit_events SET details = '{\"state\":\"sent\"}' WHERE id = ?", (event_id,))
        con.commit()
        con.close()


def test_tampering_is_found_by_audit_verify(migrated, cli) -> None:
    _, engine, sessions = migrated
    with session_scope(sessions) as s:
        for i in range(5):
            audit.append(s, actor="scp", action="test.event", object_type="test", object_id=i, details={"i": i})
        ids = [e.id for e in s.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars()]
    ok = cli("audit", "verify")
    assert "OK: 5 events" in ok.output
    _tamper(engine, ids[2])
    broken = cli("audit", "verify", expect=1)
    assert f"BROKEN at event id {ids[2]}" in broken.output
    assert "changed" in broken.output


def test_deleted_row_is_found_by_audit_verify(migrated, cli) -> None:
    _, engine, sessions = migrated
    with session_scope(sessions) as s:
        for i in range(4):
            audit.append(s, actor="scp", action="test.event", object_type="test", object_id=i)
        ids = [e.id for e in s.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars()]
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(text("SET session_replication_role = replica"))  # superuser bypasses triggers
            conn.execute(text("DELETE FROM audit_events WHERE id = :i"), {"i": ids[1]})
    else:
        con = sqlite3.connect(engine.url.database)
        con.execute("DROP TRIGGER audit_events_no_delete")
        con.execute("DELETE FROM audit_events WHERE id = ?", (ids[1],))
        con.commit()
        con.close()
    broken = cli("audit", "verify", expect=1)
    assert f"BROKEN at event id {ids[2]}" in broken.output and "removed" in broken.output


def test_jobs_list_and_show(migrated, cli) -> None:
    import json

    _, _, sessions = migrated
    with session_scope(sessions) as s:
        study = _study(s, "1.2.3.4")
        j1 = jobs.create_job(s, study, actor="scp").id
        j2 = jobs.create_job(s, study, actor="scp").id
        jobs.transition(s, j2, JobState.RUNNING, actor="worker")
    listed = json.loads(cli("jobs", "list", "--json").output)
    assert [(r["id"], r["state"]) for r in listed] == [(j2, "running"), (j1, "queued")]
    queued = json.loads(cli("jobs", "list", "--state", "queued", "--json").output)
    assert [r["id"] for r in queued] == [j1]
    assert {"id", "state", "study_instance_uid", "oodm", "tau"} <= set(queued[0])
    text_out = cli("jobs", "list").output
    assert "running" in text_out and "1.2.3.4" in text_out
    shown = json.loads(cli("jobs", "show", str(j2), "--json").output)
    assert [h["action"] for h in shown["history"]] == ["job.created", "job.running"]
    assert cli("jobs", "show", "999", expect=1).output.strip().endswith("job 999 does not exist")
    assert cli("jobs", "list", "--state", "bogus", expect=2).exit_code == 2


def test_db_cli_upgrade_downgrade(settings, cli) -> None:
    assert f"ledger at revision {migrations.head_revision()}" in cli("db", "upgrade").output
    out = cli("db", "downgrade", "0001").output
    assert "ledger at revision 0001" in out
    assert "current: 0001" in cli("db", "current").output
    cli("db", "upgrade")
    engine = open_engine(settings.db_url)
    try:
        assert migrations.current_revision(engine) == migrations.head_revision()
    finally:
        engine.dispose()


def test_database_down_is_a_clear_error(tmp_path) -> None:
    from ledger.db import DatabaseUnavailable, sessionmaker_for

    engine = open_engine("postgresql+psycopg://root@127.0.0.1:1/nothing")
    with pytest.raises(DatabaseUnavailable, match="unavailable"), session_scope(sessionmaker_for(engine)) as s:
        s.execute(text("SELECT 1"))
