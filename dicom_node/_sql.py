"""SQL helpers shared by the DICOM node (portable between SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

__all__ = ["insert_ignore"]


def insert_ignore(session: Session, model: Any, values: dict[str, Any]) -> int:
    """INSERT ... ON CONFLICT DO NOTHING on either backend; returns the number of rows inserted (0 or 1)."""
    stmt: Any
    if session.get_bind().dialect.name == "postgresql":
        stmt = postgresql.insert(model).values(**values).on_conflict_do_nothing()
    else:
        stmt = sqlite.insert(model).values(**values).on_conflict_do_nothing()
    # RETURNING tells reliably whether a row was inserted (rowcount is -1 on psycopg for this statement).
    return len(session.execute(stmt.returning(model.id)).all())
