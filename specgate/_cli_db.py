"""``specgate db roles``: the PostgreSQL roles of a production ledger, granted after every migration.

Three roles, so that the database itself enforces what the code promises:

- the **owner** (whoever ``database_url`` names when ``specgate db upgrade`` and this command run) owns the
  tables and runs the migrations; no service runs as it;
- ``specgate_app``, the services' role (scp, workers, review): reads and writes the working tables, but on
  the audit table only SELECT and INSERT. UPDATE, DELETE and TRUNCATE are not granted, so PostgreSQL refuses
  them with "permission denied" before any trigger runs (migration 0001's triggers refuse them too, for
  the owner as well; a role that cannot ALTER the table cannot drop those triggers either);
- ``specgate_report``, for reporting tools: SELECT on the report views ``v_*`` and nothing else (a view
  reads its tables with its owner's rights, so the tables themselves stay closed).

The two are group roles (NOLOGIN); the services log in as a role of their own made a member, e.g.
``CREATE ROLE specgate_svc LOGIN PASSWORD '...' IN ROLE specgate_app``. The grants name each table and view
the ledger has now, so the command runs after every ``db upgrade`` (the migration unit, Job and compose
service do both); it is idempotent: it first revokes what the two roles hold, then grants.

    >>> statements = grant_statements(tables=["jobs", "audit_events"], views=["v_failed_jobs"],
    ...                               sequences=["jobs_id_seq"])
    >>> [s for s in statements if "audit_events" in s and s.startswith("GRANT")]
    ['GRANT SELECT, INSERT ON TABLE "audit_events" TO specgate_app']
"""

from __future__ import annotations

from collections.abc import Sequence

import click
from sqlalchemy import Connection, text

from ._context import AppContext, pass_app

__all__ = ["APP_ROLE", "AUDIT_TABLE", "REPORT_ROLE", "apply_roles", "grant_statements", "register"]

APP_ROLE = "specgate_app"
REPORT_ROLE = "specgate_report"
AUDIT_TABLE = "audit_events"
# Alembic's bookkeeping: the services read the revision (start-up checks), only the owner writes it
_VERSION_TABLE = "alembic_version"


def _q(name: str) -> str:
    """A quoted identifier (names come from the catalogue, but a quote in one must not end the statement)."""
    return '"' + name.replace('"', '""') + '"'


def _create_role(role: str) -> str:
    # Two deploys (or two test databases) at once may both see the role missing: the loser's CREATE is
    # answered duplicate_object, which means the role is there, which is all this wants.
    return (f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN "
            f"CREATE ROLE {role} NOLOGIN; END IF; "
            "EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$")


def grant_statements(*, tables: Sequence[str], views: Sequence[str], sequences: Sequence[str],
                     schema: str = "public", database: str | None = None) -> list[str]:
    """The SQL that gives :data:`APP_ROLE` and :data:`REPORT_ROLE` exactly their rights on these objects.

    ``views`` are the report views (``v_*``); the application reads them too (the review app's reports).
    """
    app, report = APP_ROLE, REPORT_ROLE
    out = [_create_role(app), _create_role(report)]
    if database is not None:
        out.append(f"GRANT CONNECT ON DATABASE {_q(database)} TO {app}, {report}")
    out += [
        f"REVOKE ALL ON ALL TABLES IN SCHEMA {_q(schema)} FROM {app}, {report}",
        f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA {_q(schema)} FROM {app}, {report}",
        f"REVOKE CREATE ON SCHEMA {_q(schema)} FROM {app}, {report}",
        f"GRANT USAGE ON SCHEMA {_q(schema)} TO {app}, {report}",
        # nobody but the owner and the grants below: PUBLIC holds nothing on the audit table
        f"REVOKE ALL ON TABLE {_q(AUDIT_TABLE)} FROM PUBLIC",
    ]
    for table in tables:
        if table == AUDIT_TABLE:
            out.append(f"GRANT SELECT, INSERT ON TABLE {_q(table)} TO {app}")
        elif table == _VERSION_TABLE:
            out.append(f"GRANT SELECT ON TABLE {_q(table)} TO {app}")
        else:
            out.append(f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE {_q(table)} TO {app}")
    for view in views:
        out.append(f"GRANT SELECT ON TABLE {_q(view)} TO {app}, {report}")
    for seq in sequences:
        out.append(f"GRANT USAGE, SELECT ON SEQUENCE {_q(seq)} TO {app}")
    return out


def _catalogue(conn: Connection, schema: str) -> tuple[list[str], list[str], list[str]]:
    """The schema's tables, report views (``v_*``) and sequences, by name."""
    def names(sql: str) -> list[str]:
        return [row[0] for row in conn.execute(text(sql), {"s": schema})]

    tables = names("SELECT tablename FROM pg_tables WHERE schemaname = :s ORDER BY 1")
    views = names("SELECT viewname FROM pg_views WHERE schemaname = :s AND viewname LIKE 'v\\_%' ORDER BY 1")
    sequences = names("SELECT sequencename FROM pg_sequences WHERE schemaname = :s ORDER BY 1")
    return tables, views, sequences


def apply_roles(conn: Connection, *, schema: str = "public") -> list[str]:
    """Grant the roles their rights on what the ledger holds now, in the caller's transaction; return the
    statements run. Raises :class:`ValueError` on a ledger without the audit table (not migrated)."""
    tables, views, sequences = _catalogue(conn, schema)
    if AUDIT_TABLE not in tables:
        raise ValueError(f"no {AUDIT_TABLE} table in schema {schema!r}: migrate first (specgate db upgrade)")
    database = conn.execute(text("SELECT current_database()")).scalar_one()
    statements = grant_statements(tables=tables, views=views, sequences=sequences, schema=schema,
                                  database=database)
    for sql in statements:
        conn.execute(text(sql))
    return statements


@click.command("roles")
@click.option("--print", "print_only", is_flag=True, help="Print the SQL for this ledger; change nothing.")
@pass_app
def db_roles(app: AppContext, print_only: bool) -> None:
    """Grant the PostgreSQL roles specgate_app (the services: no UPDATE, DELETE or TRUNCATE on the audit
    table) and specgate_report (the report views only). Run as the ledger's owner after each
    `specgate db upgrade`; idempotent."""
    from sqlalchemy.exc import DBAPIError

    engine = app.engine
    if engine.dialect.name != "postgresql":
        click.echo(f"{engine.dialect.name} has no roles: nothing to grant (the audit table's triggers still "
                   "refuse UPDATE and DELETE)")
        return
    try:
        with engine.begin() as conn:
            if print_only:
                tables, views, sequences = _catalogue(conn, "public")
                database = conn.execute(text("SELECT current_database()")).scalar_one()
                for sql in grant_statements(tables=tables, views=views, sequences=sequences, database=database):
                    click.echo(sql + ";")
                return
            statements = apply_roles(conn)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    except DBAPIError as exc:
        detail = str(exc.orig or exc).splitlines()[0]
        raise click.ClickException(f"granting the roles failed: {detail} (run as the ledger's owner)") from exc
    click.echo(f"roles granted: {APP_ROLE} (audit table: SELECT, INSERT), {REPORT_ROLE} (report views); "
               f"{len(statements)} statements")


def register(main: click.Group) -> None:
    db = main.commands["db"]
    assert isinstance(db, click.Group)
    db.add_command(db_roles)
