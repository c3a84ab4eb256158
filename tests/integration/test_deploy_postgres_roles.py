"""The ledger's PostgreSQL roles (``specgate db roles``) on the real server: under ``specgate_app`` the
services' work goes on (studies, jobs and their moves, audit appends, the report views), while an UPDATE,
DELETE or TRUNCATE of the audit table is refused by PostgreSQL's privilege check, even with migration
0001's triggers dropped; under ``specgate_report`` the report views read and the tables do not.

Each test logs in as roles of its own (members of the two group roles, with a password, so the check holds
under scram as under trust) in a database of its own, dropped afterwards.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from ledger import audit, jobs, migrations
from ledger.db import open_engine, session_scope, sessionmaker_for
from ledger.schema import JobState, Study
from specgate._cli_db import APP_ROLE, REPORT_ROLE
from specgate.cli import main
from tests.conftest import PG_ADMIN_URL


def _cli(db_url: str, data_dir: Path, *args: str) -> str:
    result = CliRunner().invoke(main, list(args), env={"SPECGATE_DATABASE_URL": db_url,
                                                       "SPECGATE_DATA_DIR": str(data_dir)})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def logins(pg_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The ledger migrated and granted (twice: the command is idempotent); one login role per group role.
    Yields {"owner", "app", "report"}: database URLs."""
    migrations.upgrade(pg_url)
    assert "roles granted" in _cli(pg_url, tmp_path, "db", "roles")
    assert "roles granted" in _cli(pg_url, tmp_path, "db", "roles")
    suffix = uuid.uuid4().hex[:10]
    names = {"app": f"sg_test_app_{suffix}", "report": f"sg_test_report_{suffix}"}
    groups = {"app": APP_ROLE, "report": REPORT_ROLE}
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for who, login in names.items():
            conn.execute(text(f"CREATE ROLE {login} LOGIN PASSWORD 'pw-{suffix}' IN ROLE {groups[who]}"))
    base = make_url(pg_url)
    urls = {who: base.set(username=login, password=f"pw-{suffix}").render_as_string(hide_password=False)
            for who, login in names.items()}
    try:
        yield {"owner": pg_url, **urls}
    finally:
        with admin.connect() as conn:
            for login in names.values():
                conn.execute(text(f"DROP ROLE IF EXISTS {login}"))
        admin.dispose()


def _refused(engine, sql: str, match: str = "permission denied") -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DBAPIError, match=match), engine.begin() as conn:
        conn.execute(text(sql))


def test_the_app_role_works_the_ledger_but_cannot_change_the_audit_trail(logins: dict[str, str],
                                                                        tmp_path: Path) -> None:
    app = open_engine(logins["app"])
    try:
        with app.connect() as conn:  # really logged in as the member of specgate_app
            assert conn.execute(text("SELECT current_user")).scalar_one().startswith("sg_test_app_")
        sessions = sessionmaker_for(app)
        with session_scope(sessions) as s:
            study = Study(study_instance_uid="1.2.826.0.1.3680043.8.498.77", calling_ae="PACS")
            s.add(study)
            s.flush()
            job = jobs.create_job(s, study, actor="test")
            jobs.transition(s, job.id, JobState.RUNNING, actor="test")
            audit.append(s, actor="test", action="deploy.check", object_type="t", object_id=1)
        with session_scope(sessions) as s:
            assert audit.verify(s).ok and audit.count(s) == 3
        with app.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM v_job_state_counts")).scalar_one() >= 1
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == \
                migrations.head_revision()
        # the CLI under the app role: start-up, the ledger's reads and the chain walk
        assert "audit chain OK: 3 events" in _cli(logins["app"], tmp_path, "audit", "verify")

        for sql in ("UPDATE audit_events SET actor = 'x'", "DELETE FROM audit_events",
                    "TRUNCATE audit_events"):
            _refused(app, sql, match="permission denied for table audit_events")
        _refused(app, "DROP TRIGGER audit_events_no_update ON audit_events", match="must be owner")
        _refused(app, "CREATE TABLE sneaky (id int)")
        # the privilege, not only the trigger: with the owner's triggers gone, still refused
        owner = create_engine(logins["owner"])
        with owner.begin() as conn:
            conn.execute(text("DROP TRIGGER audit_events_no_update ON audit_events"))
            conn.execute(text("DROP TRIGGER audit_events_no_truncate ON audit_events"))
        owner.dispose()
        for sql in ("UPDATE audit_events SET actor = 'x'", "DELETE FROM audit_events", "TRUNCATE audit_events"):
            _refused(app, sql, match="permission denied for table audit_events")
        with session_scope(sessions) as s:
            assert audit.verify(s).ok and audit.count(s) == 3
    finally:
        app.dispose()


def test_the_report_role_reads_the_report_views_only(logins: dict[str, str]) -> None:
    app = open_engine(logins["app"])
    with session_scope(sessionmaker_for(app)) as s:
        study = Study(study_instance_uid="1.2.826.0.1.3680043.8.498.78", calling_ae="PACS")
        s.add(study)
        s.flush()
        jobs.create_job(s, study, actor="test")
    app.dispose()
    report = create_engine(logins["report"])
    try:
        with report.connect() as conn:
            views = [r[0] for r in conn.execute(text(
                "SELECT viewname FROM pg_views WHERE schemaname = 'public' AND viewname LIKE 'v\\_%'"))]
            assert "v_job_state_counts" in views and "v_failed_jobs" in views
            for view in views:
                conn.execute(text(f"SELECT * FROM {view}")).all()
            assert conn.execute(text("SELECT jobs FROM v_job_state_counts WHERE state = 'queued'")).scalar() == 1
        for table in ("jobs", "studies", "audit_events", "users", "review_sessions"):
            _refused(report, f"SELECT * FROM {table}", match=f"permission denied for table {table}")
        _refused(report, "INSERT INTO audit_events (id) VALUES (1)")
    finally:
        report.dispose()


def test_the_compose_init_script_makes_login_roles_the_services_use(pg_url: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy/postgres/initdb/10-specgate-roles.sh, as the PostgreSQL image runs it on first start (here
    with the secrets in a temporary folder and login names of the test's own), twice: the login role then
    works the ledger with its password from PGPASSWORD, as the Compose services do."""
    script = Path(__file__).resolve().parents[2] / "deploy" / "postgres" / "initdb" / "10-specgate-roles.sh"
    suffix = uuid.uuid4().hex[:10]
    (tmp_path / "pg_app_password").write_text(f"app-{suffix}\n")
    (tmp_path / "pg_report_password").write_text(f"report-{suffix}\n")
    admin = make_url(PG_ADMIN_URL)
    env = {"PATH": "/usr/bin:/bin", "SECRETS_DIR": str(tmp_path), "APP_LOGIN": f"sg_test_svc_{suffix}",
           "REPORT_LOGIN": f"sg_test_rep_{suffix}", "POSTGRES_USER": str(admin.username),
           "POSTGRES_DB": str(make_url(pg_url).database), "PGHOST": str(admin.host), "PGPORT": str(admin.port)}
    try:
        for _ in range(2):
            done = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
        migrations.upgrade(pg_url)
        _cli(pg_url, tmp_path, "db", "roles")
        svc = make_url(pg_url).set(username=env["APP_LOGIN"]).render_as_string(hide_password=False)
        monkeypatch.setenv("PGPASSWORD", f"app-{suffix}")  # libpq reads it, as in the containers
        engine = open_engine(svc)
        with session_scope(sessionmaker_for(engine)) as s:
            audit.append(s, actor="test", action="deploy.check", object_type="t", object_id=1)
        _refused(engine, "DELETE FROM audit_events", match="permission denied for table audit_events")
        engine.dispose()
    finally:
        admin_engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin_engine.connect() as conn:
            for login in (env["APP_LOGIN"], env["REPORT_LOGIN"]):
                conn.execute(text(f"DROP ROLE IF EXISTS {login}"))
        admin_engine.dispose()


def test_db_roles_on_sqlite_says_there_is_nothing_to_grant(tmp_path: Path) -> None:
    out = _cli(f"sqlite:///{tmp_path / 'ledger.db'}", tmp_path, "db", "roles")
    assert "sqlite has no roles" in out


def test_db_roles_refuses_an_unmigrated_ledger(pg_url: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["db", "roles"], env={"SPECGATE_DATABASE_URL": pg_url,
                                                            "SPECGATE_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 1 and "migrate first (specgate db upgrade)" in result.output
