"""Receiving one instance: check it, make it durable, index it; decide the C-STORE status.

This is the part of the SCP that does not depend on the network: it takes the file that the SCP wrote
while the dataset arrived (preamble, file meta built from the request, then the raw dataset bytes as the
peer sent them, never decoded and re-encoded), what it learnt on the way (:class:`Received`: size,
SHA-256, the data set's first bytes) and the request's UIDs, and answers a :class:`Outcome`.

Order (ARCHITECTURE.md, Durability): disk watermark -> decode the header -> compare with the request ->
validate the UIDs used as path components -> fsync + link into the spool -> insert the ledger rows and
commit -> 0x0000. Any failure after the file got its final name removes it again, so a refusal leaves no
file and no row.

Statuses: 0xA700 out of resources (disk at the watermark, ledger unavailable), 0xA900 the dataset does not
match the request (SOP Class/Instance UID differ, an image without pixel data), 0xC000 cannot understand
(not decodable, a required UID missing or not a UID).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ledger import audit
from ledger.db import DatabaseUnavailable, open_engine, session_scope
from ledger.schema import Instance, Series, Study, utcnow

from ._sql import Prepared, RawConnections, insert_ignore
from .spool import InvalidUID, Spool, validate_uid

__all__ = [
    "CANNOT_UNDERSTAND",
    "DATASET_MISMATCH",
    "OUT_OF_RESOURCES",
    "SUCCESS",
    "InstanceHeader",
    "Outcome",
    "Received",
    "Receiver",
    "Refused",
    "fast_header",
    "read_header",
]

log = logging.getLogger("specgate.dicom_node.receive")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000

_HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
    "BodyPartExamined", "SeriesDescription", "PixelData", "FloatPixelData", "DoubleFloatPixelData",
]
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_STUDIES: Table = Study.__table__  # type: ignore[assignment]
_INSTANCES: Table = Instance.__table__  # type: ignore[assignment]
# The two statements of every instance, built once: Core statements on the tables, not the ORM (its unit
# of work and update synchronisation cost more than the statements, for rows this transaction never reads
# back), and one statement object each, so SQLAlchemy's compiled cache is hit without rebuilding them.
_BUMP_STUDY = (update(_STUDIES).where(_STUDIES.c.study_instance_uid == bindparam("uid"))
               .values(last_received_at=bindparam("now"), received_count=_STUDIES.c.received_count + 1)
               .returning(_STUDIES.c.id))
_INSERT_INSTANCE = insert(_INSTANCES).returning(_INSTANCES.c.id)
# The same two, for the usual instance (its study and series known), run through Prepared on a DBAPI
# connection: see dicom_node._sql.Prepared for why.
_BUMP_STUDY_BY_ID = (update(_STUDIES).where(_STUDIES.c.id == bindparam("study_id"))
                     .values(last_received_at=bindparam("now"), received_count=_STUDIES.c.received_count + 1))
_INSERT_COLUMNS = ("series_id", "sop_instance_uid", "sop_class_uid", "transfer_syntax_uid", "spool_path",
                   "size_bytes", "sha256", "calling_ae", "received_at")
_INSERT_INSTANCE_ROW = (insert(_INSTANCES).values({c: bindparam(c) for c in _INSERT_COLUMNS})
                        .returning(_INSTANCES.c.id))
# On PostgreSQL both in one statement (a data-modifying WITH): one round trip and one implicit transaction
# instead of four round trips (BEGIN, UPDATE, INSERT, COMMIT); atomic all the same.
_BUMP_AND_INSERT = _INSERT_INSTANCE_ROW.add_cte(_BUMP_STUDY_BY_ID.cte("bump"))


class Refused(Exception):
    """An instance is refused with ``status``; ``reason`` is a short code for audit rows and reports."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(f"0x{status:04X} {reason}: {detail}")
        self.status, self.reason, self.detail = status, reason, detail


@dataclass(frozen=True)
class InstanceHeader:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    body_part: str | None
    series_description: str | None
    has_pixel_data: bool


@dataclass(frozen=True)
class Outcome:
    status: int
    reason: str = "stored"
    detail: str = ""
    instance_id: int | None = None
    duplicate: bool = False

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


def _text(value: Any, limit: int) -> str | None:
    if value is None:
        return None
    s = str(value).strip()
    return s[:limit] or None


def read_header(path: Path) -> InstanceHeader:
    """Decode only the elements the node needs; large values (pixel data) are not read, only seen.

    Raises :class:`Refused` (0xC000) when the file cannot be decoded or a required UID is missing.
    """
    try:
        size = os.path.getsize(path)
        ds = dcmread(path, defer_size=256, specific_tags=_HEADER_TAGS)
        values = {kw: ds.get(kw) for kw in _HEADER_TAGS[:7]}
        has_pixels = False
        for kw in _PIXEL_KEYWORDS:
            if kw not in ds:
                continue
            has_pixels = True
            elem = ds.get_item(kw, keep_deferred=True)
            # pydicom does not notice a value cut short by the end of the file: check the deferred one.
            tell, length = getattr(elem, "value_tell", None), getattr(elem, "length", None)
            if tell is not None and length is not None and length != 0xFFFFFFFF and tell + length > size:
                raise Refused(CANNOT_UNDERSTAND, "truncated",
                              f"{kw} needs {length} bytes at offset {tell}, the dataset ends at {size}")
    except (InvalidDicomError, ValueError, KeyError, TypeError, OSError, EOFError, RecursionError,
            OverflowError, MemoryError, NotImplementedError, AttributeError, IndexError) as exc:
        raise Refused(CANNOT_UNDERSTAND, "undecodable", f"dataset cannot be decoded: {type(exc).__name__}") from exc
    missing = [kw for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
               if not values[kw]]
    if missing:
        raise Refused(CANNOT_UNDERSTAND, "missing_uid", f"dataset lacks {', '.join(missing)}")
    return InstanceHeader(
        sop_class_uid=str(values["SOPClassUID"]).rstrip("\x00 "),
        sop_instance_uid=str(values["SOPInstanceUID"]).rstrip("\x00 "),
        study_instance_uid=str(values["StudyInstanceUID"]).rstrip("\x00 "),
        series_instance_uid=str(values["SeriesInstanceUID"]).rstrip("\x00 "),
        modality=_text(values["Modality"], 16),
        body_part=_text(values["BodyPartExamined"], 64),
        series_description=_text(values["SeriesDescription"], 64),
        has_pixel_data=has_pixels,
    )


@dataclass(frozen=True)
class Received:
    """What the network layer learnt while it wrote an instance to its temporary file: the file's size
    and SHA-256 (hashed as the bytes arrived, so the file is not read again), and the data set's length
    and first bytes (for :func:`fast_header`)."""

    size: int
    sha256: str
    dataset_length: int
    head: bytes


# --- the header without pydicom -------------------------------------------------------------------
# pydicom's dcmread builds a Dataset and a DataElement per element it reads: 0.7 ms of every C-STORE.
# fast_header walks the data set's first bytes instead, for the two little-endian encodings that nearly
# every modality sends; it gives up (None) on anything unusual, and read_header, pydicom, decides then.
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV",
                       b"UV"})
_SHORT_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
                        b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"})
_WANTED = {0x00080016: "SOPClassUID", 0x00080018: "SOPInstanceUID", 0x0020000D: "StudyInstanceUID",
           0x0020000E: "SeriesInstanceUID", 0x00080060: "Modality", 0x00180015: "BodyPartExamined",
           0x0008103E: "SeriesDescription"}
_PIXEL_TAGS = {0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData", 0x7FE00010: "PixelData"}
_UNDEFINED = 0xFFFFFFFF
_EXPLICIT_LE = frozenset({"1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5"})  # + encapsulated: RLE
_IMPLICIT_LE = "1.2.840.10008.1.2"
_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class _GiveUp(Exception):
    pass


def _element(buf: bytes, pos: int, explicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, value length, header length) of the element at ``pos``."""
    if pos + 8 > len(buf):
        raise _GiveUp
    group, elem = _TAG.unpack_from(buf, pos)
    tag = group << 16 | elem
    if not explicit or group == 0xFFFE:
        return tag, None, _U32.unpack_from(buf, pos + 4)[0], 8
    vr = buf[pos + 4:pos + 6]
    if vr in _SHORT_VRS:
        return tag, vr, _U16.unpack_from(buf, pos + 6)[0], 8
    if vr in _LONG_VRS and pos + 12 <= len(buf):
        return tag, vr, _U32.unpack_from(buf, pos + 8)[0], 12
    raise _GiveUp


def _after_sequence(buf: bytes, pos: int, explicit: bool, depth: int) -> int:
    """The position after an undefined-length sequence whose first item starts at ``pos``."""
    if depth > 8:
        raise _GiveUp
    while True:
        tag, _, length, _ = _element(buf, pos, False)
        pos += 8
        if tag == 0xFFFEE0DD:
            return pos
        if tag != 0xFFFEE000:
            raise _GiveUp
        if length != _UNDEFINED:
            pos += length
            continue
        while True:
            tag, vr, length, hl = _element(buf, pos, explicit)
            pos += hl
            if tag == 0xFFFEE00D:
                break
            if length == _UNDEFINED:
                if explicit and vr != b"SQ":
                    raise _GiveUp
                pos = _after_sequence(buf, pos, explicit, depth + 1)
            else:
                pos += length


def fast_header(head: bytes, *, transfer_syntax: str, dataset_length: int) -> InstanceHeader | None:
    """The header from the data set's first bytes ``head`` (of ``dataset_length`` in all), or None when
    this walk cannot be sure (another encoding, a value not in ``head``, anything unusual): the caller
    then uses :func:`read_header`. Raises :class:`Refused` as read_header does, for the same reasons."""
    if transfer_syntax in _EXPLICIT_LE:
        explicit = True
    elif transfer_syntax == _IMPLICIT_LE:
        explicit = False
    else:
        return None
    values: dict[str, str] = {}
    has_pixels = False
    pos, previous = 0, -1
    try:
        while pos < dataset_length:
            tag, vr, length, hl = _element(head, pos, explicit)
            if tag <= previous or tag >> 16 == 0xFFFE:
                raise _GiveUp
            previous = tag
            start = pos + hl
            if tag in _PIXEL_TAGS:
                has_pixels = True
                if length != _UNDEFINED and start + length > dataset_length:
                    raise Refused(CANNOT_UNDERSTAND, "truncated",
                                  f"{_PIXEL_TAGS[tag]} needs {length} bytes at offset {start}, "
                                  f"the data set ends at {dataset_length}")
                break
            if tag > 0x7FE00010:
                raise _GiveUp
            if length == _UNDEFINED:
                if explicit and vr != b"SQ":
                    raise _GiveUp
                pos = _after_sequence(head, start, explicit, 0)
                continue
            if tag in _WANTED:
                raw = head[start:start + length]
                if len(raw) != length or not raw.isascii() or b"\\" in raw:
                    raise _GiveUp
                values[_WANTED[tag]] = raw.decode("ascii")
            pos = start + length
        if pos > dataset_length:
            raise _GiveUp
    except _GiveUp:
        return None
    uids = {}
    for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        uids[kw] = values.get(kw, "").rstrip("\x00 ")
    missing = [kw for kw, v in uids.items() if not v]
    if missing:
        raise Refused(CANNOT_UNDERSTAND, "missing_uid", f"dataset lacks {', '.join(missing)}")
    return InstanceHeader(
        sop_class_uid=uids["SOPClassUID"], sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"], series_instance_uid=uids["SeriesInstanceUID"],
        modality=_text(values.get("Modality"), 16), body_part=_text(values.get("BodyPartExamined"), 64),
        series_description=_text(values.get("SeriesDescription"), 64), has_pixel_data=has_pixels)


class Receiver:
    """Turns a received file into an :class:`Outcome`. One per SCP; safe to call from many threads."""

    def __init__(self, spool: Spool, sessions: sessionmaker[Session], *, actor: str = "dicom_node.scp",
                 image_sop_classes: frozenset[str] | None = None,
                 on_stored: Callable[[int, str], None] | None = None) -> None:
        self.spool = spool
        self.sessions = sessions
        self.actor = actor
        self.image_sop_classes = image_sop_classes
        self.on_stored = on_stored
        # uid -> row id, filled only after a commit (rows are never deleted while the SCP runs)
        self._study_ids: dict[str, int] = {}
        self._series_ids: dict[str, int] = {}
        self._raw: RawConnections | None = None
        self._raw_statements: tuple[Prepared | None, Prepared] | None = None

    def close(self) -> None:
        """Close the connections of the fast path (the SCP stops)."""
        if self._raw is not None:
            self._raw.close()
            self._raw = None

    # ------------------------------------------------------------------------------------ public
    def receive(self, temp: Path, *, request_sop_class: str, request_sop_instance: str,
                transfer_syntax: str, calling_ae: str, address: str, received: Received | None = None) -> Outcome:
        """Decide the status for the file ``temp`` received under a C-STORE request.

        ``temp`` is consumed: on success it has become the spool file, otherwise it is removed.
        ``received``: what the network layer already knows of the file (its digest, the data set's first
        bytes); without it the file is read to learn the same.
        """
        try:
            outcome = self._receive(temp, request_sop_class, request_sop_instance, transfer_syntax, calling_ae,
                                    received)
        except Refused as refusal:
            self.spool.discard_temp(temp)
            self._audit_refusal(refusal, request_sop_class, request_sop_instance, calling_ae, address)
            return Outcome(refusal.status, refusal.reason, refusal.detail)
        except BaseException:
            self.spool.discard_temp(temp)
            raise
        return outcome

    def refuse(self, status: int, reason: str, detail: str, *, request_sop_class: str, request_sop_instance: str,
               calling_ae: str, address: str) -> Outcome:
        """Refuse an instance the network layer could not take (it could not write it): audited like
        any other refusal."""
        refusal = Refused(status, reason, detail)
        self._audit_refusal(refusal, request_sop_class, request_sop_instance, calling_ae, address)
        return Outcome(status, reason, detail)

    # ----------------------------------------------------------------------------------- private
    def _receive(self, temp: Path, rq_class: str, rq_instance: str, transfer_syntax: str,
                 calling_ae: str, received: Received | None) -> Outcome:
        if not self.spool.has_room():
            raise Refused(OUT_OF_RESOURCES, "disk_watermark",
                          f"spool disk above {self.spool.watermark_percent:g}% used")
        header = None
        if received is not None:
            header = fast_header(received.head, transfer_syntax=str(transfer_syntax).rstrip("\x00 "),
                                 dataset_length=received.dataset_length)
        if header is None:
            header = read_header(temp)
        rq_class = str(rq_class).rstrip("\x00 ")
        rq_instance = str(rq_instance).rstrip("\x00 ")
        if header.sop_class_uid != rq_class:
            raise Refused(DATASET_MISMATCH, "sop_class_mismatch",
                          "dataset SOP Class UID differs from the request's Affected SOP Class UID")
        if header.sop_instance_uid != rq_instance:
            raise Refused(DATASET_MISMATCH, "sop_instance_mismatch",
                          "dataset SOP Instance UID differs from the request's Affected SOP Instance UID")
        try:
            study_uid = validate_uid(header.study_instance_uid, what="Study Instance UID")
            series_uid = validate_uid(header.series_instance_uid, what="Series Instance UID")
            sop_uid = validate_uid(header.sop_instance_uid, what="SOP Instance UID")
            sop_class = validate_uid(header.sop_class_uid, what="SOP Class UID")
            ts_uid = validate_uid(transfer_syntax, what="Transfer Syntax UID")
        except InvalidUID as exc:
            raise Refused(CANNOT_UNDERSTAND, "invalid_uid", str(exc)) from exc
        if (self.image_sop_classes is None or sop_class in self.image_sop_classes) and not header.has_pixel_data:
            raise Refused(DATASET_MISMATCH, "no_pixel_data", "image storage dataset without pixel data")

        known = (received.size, received.sha256) if received is not None else None
        spooled = self.spool.commit(temp, study_uid, series_uid, sop_uid, digest=known)
        if not spooled.created:
            existing = self._existing(sop_uid)
            if existing is not None:
                return self._duplicate(temp, existing, sop_uid, calling_ae, known)
            # A file without a row was never acknowledged (a crash between link and commit): ours wins.
            spooled = self.spool.replace(temp, spooled.path)
        try:
            instance_id = self._index(header, spooled.path, spooled.size_bytes, spooled.sha256, ts_uid,
                                      calling_ae, study_uid, series_uid, sop_uid, sop_class)
        except IntegrityError:
            # Another association indexed the same SOP Instance at the same moment: its row names this
            # very path, so the file stays.
            existing = self._existing(sop_uid)
            if existing is None:
                raise
            if existing[2] != str(spooled.path):  # same SOP Instance UID under another study/series
                self.spool.remove(spooled.path)
            if existing[1] != spooled.sha256:
                self._audit_differs(existing, sop_uid, calling_ae, spooled.sha256)
            return Outcome(SUCCESS, "duplicate", "instance received before; first copy kept",
                           instance_id=existing[0], duplicate=True)
        except DatabaseUnavailable as exc:
            self.spool.remove(spooled.path)
            log.error("ledger unavailable, C-STORE refused with 0xA700: %s", exc)
            raise Refused(OUT_OF_RESOURCES, "ledger_unavailable", "ledger database unavailable") from exc
        except BaseException:
            self.spool.remove(spooled.path)
            raise
        if self.on_stored is not None:
            self.on_stored(instance_id, study_uid)
        return Outcome(SUCCESS, instance_id=instance_id)

    def _existing(self, sop_uid: str) -> tuple[int, str, str] | None:
        try:
            with session_scope(self.sessions) as s:
                row = s.execute(select(Instance.id, Instance.sha256, Instance.spool_path)
                                .where(Instance.sop_instance_uid == sop_uid)).first()
        except DatabaseUnavailable as exc:
            log.error("ledger unavailable, C-STORE refused with 0xA700: %s", exc)
            raise Refused(OUT_OF_RESOURCES, "ledger_unavailable", "ledger database unavailable") from exc
        return None if row is None else (int(row[0]), str(row[1]), str(row[2]))

    def _duplicate(self, temp: Path, existing: tuple[int, str, str], sop_uid: str, calling_ae: str,
                   known: tuple[int, str] | None) -> Outcome:
        instance_id, old_sha, _ = existing
        _, digest = known if known is not None else self.spool.digest(temp)
        self.spool.discard_temp(temp)
        if digest == old_sha:
            return Outcome(SUCCESS, "duplicate", "same instance received before", instance_id=instance_id,
                           duplicate=True)
        self._audit_differs(existing, sop_uid, calling_ae, digest)
        return Outcome(SUCCESS, "duplicate_differs", "instance received before with other content; first kept",
                       instance_id=instance_id, duplicate=True)

    def _audit_differs(self, existing: tuple[int, str, str], sop_uid: str, calling_ae: str, digest: str) -> None:
        instance_id, old_sha, _ = existing
        try:
            with session_scope(self.sessions) as s:
                audit.append(s, actor=calling_ae or "unknown", action="instance.duplicate_differs",
                             object_type="instance", object_id=instance_id,
                             details={"sop_instance_uid": sop_uid, "kept_sha256": old_sha,
                                      "discarded_sha256": digest})
        except DatabaseUnavailable as exc:
            raise Refused(OUT_OF_RESOURCES, "ledger_unavailable", "ledger database unavailable") from exc
        log.warning("instance %s received again with different content; first copy kept", sop_uid)

    def _index(self, header: InstanceHeader, path: Path, size: int, sha: str, ts_uid: str, calling_ae: str,
               study_uid: str, series_uid: str, sop_uid: str, sop_class: str) -> int:
        """Insert the instance row (and its study/series rows the first time) in one transaction.

        Study and series ids are remembered after their transaction committed, so the usual instance costs
        two statements: the study's counter bump and the instance insert.
        """
        now = utcnow()
        study_id, series_id = self._study_ids.get(study_uid), self._series_ids.get(series_uid)
        if study_id is not None and series_id is not None:
            return self._index_known(study_id, {
                "series_id": series_id, "sop_instance_uid": sop_uid, "sop_class_uid": sop_class,
                "transfer_syntax_uid": ts_uid, "spool_path": str(path), "size_bytes": size, "sha256": sha,
                "calling_ae": calling_ae[:16], "received_at": now})
        new_study = False
        with session_scope(self.sessions) as s:
            if study_uid not in self._study_ids:
                new_study = insert_ignore(s, Study, {
                    "study_instance_uid": study_uid, "calling_ae": calling_ae[:16], "first_received_at": now,
                    "last_received_at": now}) == 1
            study_id = s.execute(_BUMP_STUDY, {"uid": study_uid, "now": now}).scalar_one()
            series_id = self._series_ids.get(series_uid)
            if series_id is None:
                insert_ignore(s, Series, {
                    "study_id": study_id, "series_instance_uid": series_uid, "modality": header.modality,
                    "body_part": header.body_part, "series_description": header.series_description})
                series_id = s.execute(select(Series.id).where(Series.series_instance_uid == series_uid)).scalar_one()
            instance_id = int(s.execute(_INSERT_INSTANCE, {
                "series_id": series_id, "sop_instance_uid": sop_uid, "sop_class_uid": sop_class,
                "transfer_syntax_uid": ts_uid, "spool_path": str(path), "size_bytes": size, "sha256": sha,
                "calling_ae": calling_ae[:16], "received_at": now}).scalar_one())
            if new_study:
                audit.append(s, actor=calling_ae or "unknown", action="study.receiving", object_type="study",
                             object_id=study_id, details={"study_instance_uid": study_uid})
        if len(self._study_ids) > 10_000:
            self._study_ids.clear()
            self._series_ids.clear()
        self._study_ids[study_uid] = study_id
        self._series_ids[series_uid] = series_id
        return instance_id

    def _index_known(self, study_id: int, row: dict[str, Any]) -> int:
        """The usual instance: its study's counter bump and its row, in one transaction on a DBAPI
        connection (same statements, same types as the ORM path; a fraction of the Python time)."""
        if self._raw is None:
            bind = self.sessions.kw["bind"]
            self._raw = RawConnections(bind.url, open_engine)
            if self._raw.dialect.name == "postgresql":
                self._raw_statements = (None, Prepared(_BUMP_AND_INSERT, self._raw.dialect))
            else:
                self._raw_statements = (Prepared(_BUMP_STUDY_BY_ID, self._raw.dialect),
                                        Prepared(_INSERT_INSTANCE_ROW, self._raw.dialect))
        raw = self._raw
        assert self._raw_statements is not None
        bump, insert_row = self._raw_statements
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
                        cur.execute("BEGIN IMMEDIATE")
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

    def _audit_refusal(self, refusal: Refused, rq_class: str, rq_instance: str, calling_ae: str,
                       address: str) -> None:
        log.warning("C-STORE from %s@%s refused: 0x%04X %s (%s)", calling_ae, address, refusal.status,
                    refusal.reason, refusal.detail)
        if refusal.reason == "ledger_unavailable":
            return
        details: dict[str, Any] = {"status": f"0x{refusal.status:04X}", "reason": refusal.reason,
                                   "detail": refusal.detail, "address": address}
        for key, value in (("sop_class_uid", rq_class), ("sop_instance_uid", rq_instance)):
            try:
                details[key] = validate_uid(value, what=key)
            except InvalidUID:
                details[key] = None
        try:
            with session_scope(self.sessions) as s:
                audit.append(s, actor=calling_ae or "unknown", action="instance.refused",
                             object_type="association", object_id=address, details=details)
        except DatabaseUnavailable as exc:
            log.error("could not audit a refused C-STORE (ledger unavailable): %s", exc)
