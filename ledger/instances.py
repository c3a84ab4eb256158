"""Indexing received instances: the rows behind every file in the spool.

One object, :class:`InstanceIndex`, owns the SQL of a received instance: :meth:`InstanceIndex.add`
inserts the instance row and bumps its study's counters (creating the study and series rows the first
time), :meth:`InstanceIndex.find` reads an instance back by SOP Instance UID. The DICOM node calls these
two and writes no SQL of its own.

Two paths, the same rows and the same types:

* the first instance of a study or series goes through the ORM session (``INSERT ... ON CONFLICT DO
  NOTHING`` for the study and series, the ``study.receiving`` audit event for a new study);
* every later one (its study and series ids known, remembered only after their transaction committed)
  costs two compiled statements on a DBAPI connection kept for this purpose, or one on PostgreSQL (a
  data-modifying ``WITH``). SQLAlchemy's session machinery was over half of the SCP's Python time for
  these two tiny statements (see :class:`ledger.sql.Prepared`).

Errors: a second row for one SOP Instance UID raises SQLAlchemy's ``IntegrityError`` (the caller decides
what a duplicate means); a database that cannot be reached raises :class:`ledger.db.DatabaseUnavailable`.
A pooled connection cut while idle (a database restart) is replaced once, silently.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from . import audit
from .db import SQLITE_BEGIN, DatabaseUnavailable, open_engine, session_scope
from .schema import Instance, Series, Study, utcnow
from .sql import Prepared, RawConnections, insert_ignore

__all__ = ["ExistingInstance", "InstanceIndex", "NewInstance"]

log = logging.getLogger("specgate.ledger.instances")

_STUDIES: Table = Study.__table__  # type: ignore[assignment]
_INSTANCES: Table = Instance.__table__  # type: ignore[assignment]
_ROW_COLUMNS = ("series_id", "sop_instance_uid", "sop_class_uid", "transfer_syntax_uid", "spool_path",
                "store_key", "size_bytes", "sha256", "calling_ae", "received_at")
# Built once: one statement object each, so SQLAlchemy's compiled cache is hit without rebuilding them.
_BUMP_STUDY_BY_UID = (update(_STUDIES).where(_STUDIES.c.study_instance_uid == bindparam("uid"))
                      .values(last_received_at=bindparam("now"), received_count=_STUDIES.c.received_count + 1)
                      .returning(_STUDIES.c.id))
_BUMP_STUDY_BY_ID = (update(_STUDIES).where(_STUDIES.c.id == bindparam("study_id"))
                     .values(last_received_at=bindparam("now"), received_count=_STUDIES.c.received_count + 1))
_INSERT_INSTANCE = (insert(_INSTANCES).values({c: bindparam(c) for c in _ROW_COLUMNS})
                    .returning(_INSTANCES.c.id))
# On PostgreSQL both in one statement: one round trip and one implicit transaction instead of four
# (BEGIN, UPDATE, INSERT, COMMIT); atomic all the same.
_BUMP_AND_INSERT = _INSERT_INSTANCE.add_cte(_BUMP_STUDY_BY_ID.cte("bump"))
_CACHE_LIMIT = 10_000  # remembered study/series ids before the memo is cleared


@dataclass(frozen=True)
class NewInstance:
    """A received instance, its UIDs already validated, its file already durable at ``spool_path``."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    spool_path: str
    size_bytes: int
    sha256: str
    calling_ae: str
    modality: str | None = None
    body_part: str | None = None
    series_description: str | None = None
    station_name: str | None = None
    #: True with an object store: the row has no store key until the uploader has put the file there;
    #: False (fs): the spool path is the key
    pending_upload: bool = False

    def row(self, series_id: int, now: Any) -> dict[str, Any]:
        return {"series_id": series_id, "sop_instance_uid": self.sop_instance_uid,
                "sop_class_uid": self.sop_class_uid, "transfer_syntax_uid": self.transfer_syntax_uid,
                "spool_path": self.spool_path, "store_key": None if self.pending_upload else self.spool_path, "size_bytes": self.size_bytes, "sha256": self.sha256,
                "calling_ae": self.calling_ae[:16], "received_at": now}


class ExistingInstance(NamedTuple):
    """An instance row already in the ledger, with the series and study it was filed under."""

    id: int
    sha256: str
    spool_path: str
    series_instance_uid: str
    study_instance_uid: str


class InstanceIndex:
    """The instance rows of one receiving process; safe to call from many threads."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        with sessions() as s:  # no connection is opened: only the engine is looked up
            bind = s.get_bind()
        self._url = bind.engine.url
        self._study_ids: dict[str, int] = {}
        self._series_ids: dict[str, int] = {}
        self._raw: RawConnections | None = None
        self._statements: tuple[Prepared | None, Prepared] | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the fast path's connections (the process stops receiving)."""
        with self._lock:
            raw, self._raw = self._raw, None
        if raw is not None:
            raw.close()

    def find(self, sop_instance_uid: str) -> ExistingInstance | None:
        with session_scope(self.sessions) as s:
            row = s.execute(select(Instance.id, Instance.sha256, Instance.spool_path, Series.series_instance_uid,
                                   Study.study_instance_uid)
                            .join(Series, Series.id == Instance.series_id).join(Study, Study.id == Series.study_id)
                            .where(Instance.sop_instance_uid == sop_instance_uid)).first()
        return None if row is None else ExistingInstance(int(row[0]), str(row[1]), str(row[2]), str(row[3]),
                                                         str(row[4]))

    def add(self, new: NewInstance) -> int:
        """Insert ``new``'s row; its study's counters move in the same transaction. Returns the row id."""
        now = utcnow()
        study_id = self._study_ids.get(new.study_instance_uid)
        series_id = self._series_ids.get(new.series_instance_uid)
        if study_id is not None and series_id is not None:
            return self._add_known(study_id, new.row(series_id, now))
        study_id, series_id, instance_id = self._add_first(new, now)
        if len(self._study_ids) > _CACHE_LIMIT:
            self._study_ids.clear()
            self._series_ids.clear()
        self._study_ids[new.study_instance_uid] = study_id
        self._series_ids[new.series_instance_uid] = series_id
        return instance_id

    # ----------------------------------------------------------------------------------- private
    def _add_first(self, new: NewInstance, now: Any) -> tuple[int, int, int]:
        """Through the ORM session: the study and series rows when they are new, then the instance."""
        new_study = False
        with session_scope(self.sessions) as s:
            if new.study_instance_uid not in self._study_ids:
                new_study = insert_ignore(s, Study, {
                    "study_instance_uid": new.study_instance_uid, "calling_ae": new.calling_ae[:16],
                    "first_received_at": now, "last_received_at": now}) == 1
            study_id = int(s.execute(_BUMP_STUDY_BY_UID, {"uid": new.study_instance_uid, "now": now}).scalar_one())
            series_id = self._series_ids.get(new.series_instance_uid)
            if series_id is None:
                insert_ignore(s, Series, {
                    "study_id": study_id, "series_instance_uid": new.series_instance_uid,
                    "modality": new.modality, "body_part": new.body_part,
                    "series_description": new.series_description, "station_name": new.station_name})
                series_id = int(s.execute(select(Series.id).where(
                    Series.series_instance_uid == new.series_instance_uid)).scalar_one())
            instance_id = int(s.execute(_INSERT_INSTANCE, new.row(series_id, now)).scalar_one())
            if new_study:
                audit.append(s, actor=new.calling_ae or "unknown", action="study.receiving", object_type="study",
                             object_id=study_id, details={"study_instance_uid": new.study_instance_uid})
        return study_id, series_id, instance_id

    def _fast_path(self) -> tuple[RawConnections, Prepared | None, Prepared]:
        with self._lock:
            if self._raw is None:
                raw = RawConnections(self._url, open_engine)
                if raw.dialect.name == "postgresql":
                    self._statements = (None, Prepared(_BUMP_AND_INSERT, raw.dialect))
                else:
                    self._statements = (Prepared(_BUMP_STUDY_BY_ID, raw.dialect),
                                        Prepared(_INSERT_INSTANCE, raw.dialect))
                self._raw = raw
            assert self._statements is not None
            return self._raw, *self._statements

    def _add_known(self, study_id: int, row: dict[str, Any]) -> int:
        """The usual instance: its study's counter bump and its row in one transaction on a DBAPI
        connection (PostgreSQL: one statement in autocommit)."""
        raw, bump, insert_row = self._fast_path()
        while True:
            try:
                conn, reused = raw.take()
            except (DBAPIError, raw.dbapi.Error) as exc:  # a new connection's errors come unwrapped
                raise DatabaseUnavailable(f"ledger database unavailable: {exc!s}".splitlines()[0]) from exc
            try:
                cur = conn.cursor()
                try:
                    if bump is None:  # PostgreSQL, autocommit: the statement is the transaction
                        insert_row.execute(cur, {**row, "study_id": study_id, "now": row["received_at"]})
                        instance_id = int(cur.fetchone()[0])
                    else:
                        cur.execute(SQLITE_BEGIN)
                        bump.execute(cur, {"study_id": study_id, "now": row["received_at"]})
                        insert_row.execute(cur, row)
                        instance_id = int(cur.fetchone()[0])
                        conn.commit()
                finally:
                    cur.close()
            except raw.dbapi.IntegrityError as exc:
                try:
                    conn.rollback()
                    raw.give_back(conn)
                except raw.dbapi.Error:
                    raw.discard(conn)
                raise IntegrityError(insert_row.sql, None, exc) from exc
            except raw.dbapi.Error as exc:
                raw.discard(conn)
                if reused:  # cut while idle (a database restart): once more, on a new connection
                    log.info("ledger connection lost (%s); reconnecting", type(exc).__name__)
                    continue
                raise DatabaseUnavailable(f"ledger database unavailable: {exc!s}".splitlines()[0]) from exc
            except BaseException:
                raw.discard(conn)
                raise
            raw.give_back(conn)
            return instance_id
