"""SQL helpers for hot paths and portable upserts (SQLite and PostgreSQL alike)."""

from __future__ import annotations

import threading
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

__all__ = ["Prepared", "RawConnections", "day_start", "insert_ignore", "past_day"]


def day_start(day: date) -> datetime:
    """The first instant of a UTC day, for ``column >= day_start(since)``."""
    return datetime.combine(day, time(), UTC)


def past_day(day: date) -> datetime | None:
    """The first instant after a UTC day, for ``column < past_day(until)`` (both ends of a period of days
    included); None for the last day a date can name (9999-12-31), after which no instant can be::

        >>> past_day(date(2026, 12, 31)).isoformat(), past_day(date.max)
        ('2027-01-01T00:00:00+00:00', None)
    """
    return None if day == date.max else datetime.combine(day + timedelta(days=1), time(), UTC)


def insert_ignore(session: Session, model: Any, values: dict[str, Any]) -> int:
    """INSERT ... ON CONFLICT DO NOTHING on either backend; returns the number of rows inserted (0 or 1)."""
    stmt: Any
    if session.get_bind().dialect.name == "postgresql":
        stmt = postgresql.insert(model).values(**values).on_conflict_do_nothing()
    else:
        stmt = sqlite.insert(model).values(**values).on_conflict_do_nothing()
    # RETURNING tells reliably whether a row was inserted (rowcount is -1 on psycopg for this statement).
    return len(session.execute(stmt.returning(model.id)).all())


class Prepared:
    """A Core statement compiled once for a dialect, executed on a DBAPI cursor.

    SQLAlchemy's Session/Connection machinery costs more than the statement itself for the two tiny
    statements of every received instance (profiled: over half of the SCP's Python time). This keeps
    SQLAlchemy's SQL generation and its type conversions (bind processors: datetimes on SQLite, JSON)
    and drops the rest.
    """

    def __init__(self, stmt: Any, dialect: Any) -> None:
        self._compiled = stmt.compile(dialect=dialect)
        self.sql = self._compiled.string
        self._positional = bool(self._compiled.positional)
        self._order = list(self._compiled.positiontup or ()) if self._positional else []
        self._processors: dict[str, Any] = {}
        for name, bind in self._compiled.binds.items():
            proc = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if proc is not None:
                self._processors[name] = proc

    def params(self, values: dict[str, Any]) -> Any:
        params = self._compiled.construct_params(values)
        for name, proc in self._processors.items():
            if name in params:
                params[name] = proc(params[name])
        return tuple(params[name] for name in self._order) if self._positional else params

    def execute(self, cursor: Any, values: dict[str, Any]) -> Any:
        cursor.execute(self.sql, self.params(values))
        return cursor


class RawConnections:
    """DBAPI connections for a hot path, outside the engine's pool (which the rest of the process
    shares), created through a pool-less engine for the same URL so that its connect hooks (SQLite's
    PRAGMAs) run. Idle connections are kept on a stack; one that failed is closed, not reused."""

    def __init__(self, url: Any, opener: Any) -> None:
        self.engine = opener(url, poolclass=NullPool)
        self.dialect = self.engine.dialect
        self.dbapi = self.engine.dialect.loaded_dbapi
        self._idle: list[Any] = []
        self._lock = threading.Lock()

    def take(self) -> tuple[Any, bool]:
        """(a connection, whether it was used before: it may have been cut since, e.g. by a database
        restart, and a failure on it deserves one more try on a new one)."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        conn = self.engine.raw_connection()
        if self.dialect.name == "postgresql":  # one statement, one transaction (see ledger.instances)
            conn.driver_connection.autocommit = True
        return conn, False

    def give_back(self, conn: Any) -> None:
        with self._lock:
            self._idle.append(conn)

    def discard(self, conn: Any) -> None:
        try:
            conn.invalidate()
        except Exception:  # noqa: BLE001 - it is broken already; nothing else to do with it
            pass

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass
        self.engine.dispose()
