"""Alembic environment. It shares the application's Settings (STYLE.md habit 10).

``specgate db upgrade`` passes the database URL of its Settings in ``config.attributes["database_url"]``; a
bare ``alembic`` command run from the repository builds the Settings the same way the CLI does (environment,
then defaults).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from ledger.db import open_engine
from ledger.schema import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("database_url")
    if url is None:
        from specgate.settings import Settings

        url = Settings.load().db_url
    return str(url)


def _run(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite and not connection.in_transaction():
        # A batch copy of a table that others reference (0014 rebuilds jobs) needs SQLite's foreign keys off,
        # which only takes effect outside a transaction; a migration that copies checks them itself
        # (PRAGMA foreign_key_check) before the commit.
        connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=sqlite, compare_type=True)
    try:
        with context.begin_transaction():
            context.run_migrations()
    finally:
        if sqlite and not connection.in_transaction():
            connection.connection.driver_connection.execute("PRAGMA foreign_keys=ON")  # type: ignore[union-attr]


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=_url().startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = open_engine(_url())
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
