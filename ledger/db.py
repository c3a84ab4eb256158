"""Engines and sessions for the ledger, for SQLite (embedded default) and PostgreSQL.

One engine per process, made by :func:`open_engine` and passed down; never one per request.

SQLite notes: WAL journal, foreign keys on, a busy timeout, and every transaction begins with
``BEGIN IMMEDIATE`` so that a read-then-write (a state transition, the audit chain's head) cannot
interleave with another writer: SQLite's deferred transactions would otherwise fail such a race with
``SQLITE_BUSY`` instead of waiting.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["SQLITE_BEGIN", "DatabaseUnavailable", "is_postgres", "is_sqlite", "open_engine", "session_scope",
           "sessionmaker_for"]

#: How every SQLite transaction of ours begins (see the module's notes), also on raw DBAPI connections.
SQLITE_BEGIN = "BEGIN IMMEDIATE"


class DatabaseUnavailable(RuntimeError):
    """The ledger database cannot be reached (server down, file locked too long, disk full)."""


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def open_engine(url: str, *, busy_timeout_s: float = 30.0, **kwargs: Any) -> Engine:
    """Create the process's engine for ``url`` (``sqlite:///...`` or ``postgresql+psycopg://...``)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": busy_timeout_s, "check_same_thread": False},
                               **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy, not pysqlite, emit BEGIN (pysqlite's own handling is broken for this).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            conn.exec_driver_sql(SQLITE_BEGIN)

        return engine
    if parsed.get_backend_name() == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
        connect_args = kwargs.pop("connect_args", {})
        connect_args.setdefault("connect_timeout", 10)
        return create_engine(url, connect_args=connect_args, **kwargs)
    raise ValueError(f"unsupported database backend {parsed.get_backend_name()!r} in URL")


def sessionmaker_for(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A transaction: commit on success, roll back on error; connection failures become DatabaseUnavailable."""
    session = factory()
    try:
        yield session
        session.commit()
    except (OperationalError, DBAPIError) as exc:
        session.rollback()
        if isinstance(exc, OperationalError) or exc.connection_invalidated:
            raise DatabaseUnavailable(f"ledger database unavailable: {exc.orig!s}".splitlines()[0]) from exc
        raise
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
