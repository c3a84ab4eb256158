"""Receiving one instance: check it, make it durable, index it; decide the C-STORE status.

This is the part of the SCP that does not depend on the network: it takes the file that the SCP wrote
while the dataset arrived (preamble, file meta built from the request, then the raw dataset bytes as the
peer sent them, never decoded and re-encoded), what it learnt on the way (:class:`Received`: size,
SHA-256, the data set's first bytes) and the request's UIDs, and answers a :class:`Outcome`.

Order (ARCHITECTURE.md, Durability): disk watermark -> decode the header -> compare with the request ->
validate the UIDs used as path components -> fsync + link into the spool -> insert the ledger rows and
commit -> 0x0000. Any failure after the file got its final name removes it again, so a refusal leaves no
file and no row.

Statuses: 0xA700 out of resources (disk at the watermark or refusing a write, ledger unavailable), 0xA900 the dataset does not
match the request (SOP Class/Instance UID differ, an image without pixel data; for STOW-RS, a Study Instance
UID other than the study the request names: ``study_mismatch``), 0xC000 cannot understand
(not decodable, a required UID missing or not a UID), 0xC409 the SOP Instance UID is stored already under
another series or study. A UID is checked by :func:`dicom_node.spool.validate_uid` from the bytes the
peer sent (one NUL pad allowed, nothing else taken away), the request's and the data set's before they
are compared: a value that is not a UID is 0xC000 wherever it comes from, two UIDs that differ 0xA900.

Duplicates. A SOP Instance UID names one image, once. Received again under the *same* series it is a resend
(a peer that did not see our answer, a PACS sending a study twice): answered 0x0000 and nothing changes;
if the bytes differ, the first copy is kept and ``instance.duplicate_differs`` audited. Received under
*another* series or study it is a conflict, not a copy: a modality or PACS that reuses UIDs, or a study
split or merged elsewhere. It is refused with 0xC409 (``uid_conflict``, the status dcm4chee answers for a
SOP Instance UID stored before in another study) and audited, the first copy kept. Answering 0x0000 would
tell the sender an image is stored in a study that does not hold it: that study would be assembled and
segmented without it, and nobody told. The refusal shows in the sender's log and in ours, where a person can
decide which copy is right.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ledger import audit
from ledger.db import DatabaseUnavailable, session_scope
from ledger.instances import ExistingInstance, InstanceIndex, NewInstance
from ledger.paths import from_ledger, to_ledger

from .elements import DEFLATED, HEADER_TAGS, PIXEL_TAGS
from .spool import InvalidUID, Spool, validate_uid

__all__ = [
    "CANNOT_UNDERSTAND",
    "DATASET_MISMATCH",
    "OUT_OF_RESOURCES",
    "SUCCESS",
    "UID_CONFLICT",
    "InstanceCounters",
    "InstanceHeader",
    "Outcome",
    "InstanceReceiver",
    "Received",
    "Refused",
    "HeaderValues",
    "read_header",
]

log = logging.getLogger("specgate.dicom_node.receive")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
UID_CONFLICT = 0xC409  # "cannot understand" class (0xCxxx): the same SOP Instance UID under another series

_PIXEL_KEYWORDS = tuple(PIXEL_TAGS.values())
_HEADER_TAGS = [*HEADER_TAGS.values(), *_PIXEL_KEYWORDS]  # the four UIDs first, then the texts


class InstanceCounters(Protocol):
    """What a receiver counts (:class:`dicom_node.prometheus.NodeMetrics` for C-STORE,
    :class:`dicom_node.prometheus.StowMetrics` for STOW-RS)."""

    def instance_received(self, modality: str | None) -> None: ...

    def instance_refused(self, reason: str, status: int) -> None: ...


class Refused(Exception):
    """An instance is refused with ``status``; ``reason`` is a short code for audit rows and reports."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(f"0x{status:04X} {reason}: {detail}")
        self.status, self.reason, self.detail = status, reason, detail


@dataclass(frozen=True)
class HeaderValues:
    """The header elements (:data:`dicom_node.elements.HEADER_TAGS`) by keyword, UIDs as text exactly as
    sent, as the data set's walk or pydicom found them; and whether the data set has pixel data."""

    values: Mapping[str, Any]
    has_pixel_data: bool


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
    station_name: str | None = None

    @classmethod
    def of(cls, found: HeaderValues) -> InstanceHeader:
        """The header from the values found; raises :class:`Refused` (``missing_uid``) as
        :func:`read_header` does. UIDs stay as sent: :func:`dicom_node.spool.validate_uid` decides what
        padding is."""
        values = found.values
        uids = {kw: values.get(kw, "") for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                                                  "SeriesInstanceUID")}
        missing = [kw for kw, v in uids.items() if v in ("", "\x00")]
        if missing:
            raise Refused(CANNOT_UNDERSTAND, "missing_uid", f"dataset lacks {', '.join(missing)}")
        return cls(sop_class_uid=uids["SOPClassUID"], sop_instance_uid=uids["SOPInstanceUID"],
                   study_instance_uid=uids["StudyInstanceUID"], series_instance_uid=uids["SeriesInstanceUID"],
                   modality=_text(values.get("Modality"), 16), body_part=_text(values.get("BodyPartExamined"), 64),
                   series_description=_text(values.get("SeriesDescription"), 64), has_pixel_data=found.has_pixel_data,
                   station_name=_text(values.get("StationName"), 64))


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
        values: dict[str, Any] = {kw: _raw_uid(ds, kw) for kw in _HEADER_TAGS[:4]}
        values.update({kw: ds.get(kw) for kw in _HEADER_TAGS[4:8]})
        has_pixels = False
        for kw in _PIXEL_KEYWORDS:
            if kw not in ds:
                continue
            has_pixels = True
            elem = ds.get_item(kw, keep_deferred=True)
            # pydicom does not notice a value cut short by the end of the file: check the deferred one
            # (in a deflated file its offset is the inflated data set's: the stream checked that one).
            tell, length = getattr(elem, "value_tell", None), getattr(elem, "length", None)
            if (tell is not None and length is not None and length != 0xFFFFFFFF and tell + length > size
                    and ds.file_meta.get("TransferSyntaxUID") != DEFLATED):
                raise Refused(CANNOT_UNDERSTAND, "truncated",
                              f"{kw} needs {length} bytes at offset {tell}, the dataset ends at {size}")
    except (InvalidDicomError, ValueError, KeyError, TypeError, OSError, EOFError, RecursionError,
            OverflowError, MemoryError, NotImplementedError, AttributeError, IndexError) as exc:
        raise Refused(CANNOT_UNDERSTAND, "undecodable", f"dataset cannot be decoded: {type(exc).__name__}") from exc
    return InstanceHeader.of(HeaderValues(values, has_pixels))


def _raw_uid(ds: Any, keyword: str) -> str:
    """A UI element's value as the peer sent it (pydicom's own value has trailing spaces and NULs taken
    away, which would make ``1.2.3 `` a UID), "" when absent. A value longer than any UID is not read."""
    if keyword not in ds:
        return ""
    length = getattr(ds.get_item(keyword, keep_deferred=True), "length", 0) or 0
    if length > 65:
        return f"<{length} bytes>"
    value = ds.get_item(keyword).value
    return value.decode("ascii", errors="replace") if isinstance(value, bytes) else str(value or "")


@dataclass(frozen=True)
class Received:
    """What the network layer learnt while it wrote an instance to its temporary file: the file's size
    and SHA-256 (hashed as the bytes arrived, so the file is not read again), the data set's length (for a
    deflated data set, inflated) and its header values (:meth:`dicom_node.dataset_stream.DataSetStream.header`)."""

    size: int
    sha256: str
    dataset_length: int
    header: HeaderValues | None = None  # as the data set's walk collected them; None: read_header decides


class InstanceReceiver:
    """Turns a received file into an :class:`Outcome`. One per SCP; safe to call from many threads.

    Everything that can go wrong with one instance ends here as an audited refusal: the data set (0xC000,
    0xA900), the disk (0xA700: at the watermark, or refusing a write, a link or a folder) and the
    ledger (0xA700). Anything else is a bug; it propagates, the file removed, and the association's
    per-message boundary answers it (0xC000, through :meth:`refuse`).

    ``metrics``: counts every instance answered success and every refusal by its reason code."""

    def __init__(self, spool: Spool, sessions: sessionmaker[Session], *, actor: str = "dicom_node.scp",
                 image_sop_classes: frozenset[str] | None = None,
                 on_stored: Callable[[int, str], None] | None = None, metrics: InstanceCounters | None = None,
                 data_dir: Path | None = None, remote_store: bool = False, protocol: str = "C-STORE") -> None:
        """``protocol``: how instances arrive, ``C-STORE`` (a refusal's audit row is about the association,
        ``object_type`` "association") or ``STOW-RS`` (about the HTTP request, "http_request").
        ``remote_store``: instances go on to an object store (:class:`dicom_node.uploader.Uploader`):
        their row is written without a store key, which the upload sets."""
        self.spool = spool
        self.data_dir = data_dir
        # the spool folder as the ledger names it, worked out once: a spool file's ledger path is this and
        # the file's own three names (no path resolved per instance)
        self._spool_key = to_ledger(spool.root, data_dir)
        self.remote_store = remote_store
        self.sessions = sessions
        self.actor = actor
        self.protocol = protocol
        self.image_sop_classes = image_sop_classes
        self.on_stored = on_stored
        self.metrics = metrics
        self.index = InstanceIndex(sessions)

    def close(self) -> None:
        """Close the ledger's fast-path connections (the SCP stops)."""
        self.index.close()

    # ------------------------------------------------------------------------------------ public
    def receive(self, temp: Path, *, request_sop_class: str, request_sop_instance: str,
                transfer_syntax: str, calling_ae: str, address: str, received: Received,
                study_instance_uid: str | None = None) -> Outcome:
        """Decide the status for the file ``temp`` received under a C-STORE request.

        ``temp`` is consumed: on success it has become the spool file, otherwise it is removed.
        ``received``: what the network layer learnt of the file (its digest, the data set's first bytes).
        ``study_instance_uid``: the study the request names (STOW-RS ``POST /studies/{study}``); an
        instance of another study is refused 0xA900 ``study_mismatch``.
        """
        try:
            outcome = self._receive(temp, request_sop_class, request_sop_instance, transfer_syntax, calling_ae,
                                    received, study_instance_uid)
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
                 calling_ae: str, received: Received, study: str | None = None) -> Outcome:
        try:
            if not self.spool.has_room():
                raise Refused(OUT_OF_RESOURCES, "disk_watermark",
                              f"spool disk above {self.spool.watermark_percent:g}% used")
            header = self._header(temp, received)
            new = self._checked(header, rq_class, rq_instance, transfer_syntax, calling_ae, received)
            if study is not None and new.study_instance_uid != study:
                raise Refused(DATASET_MISMATCH, "study_mismatch",
                              "dataset Study Instance UID differs from the study the request names")
            outcome = self._store(temp, new)
        except OSError as exc:  # the spool's disk refused: full, read-only, no permission, I/O error
            log.error("spool refused an instance (%s); C-STORE answered 0xA700", exc.strerror or exc)
            raise Refused(OUT_OF_RESOURCES, "storage_refused",
                          f"the spool cannot store the instance: {exc.strerror or type(exc).__name__}") from exc
        if self.metrics is not None:
            self.metrics.instance_received(new.modality)
        return outcome

    def _header(self, temp: Path, received: Received) -> InstanceHeader:
        if received.header is not None:
            return InstanceHeader.of(received.header)
        return read_header(temp)

    def _checked(self, header: InstanceHeader, rq_class: str, rq_instance: str, transfer_syntax: str,
                 calling_ae: str, received: Received) -> NewInstance:
        """The instance as the ledger will index it, once its UIDs and the request's are UIDs (0xC000
        otherwise) and they match (0xA900 otherwise)."""
        try:
            rq_class = validate_uid(rq_class, what="Affected SOP Class UID")
            rq_instance = validate_uid(rq_instance, what="Affected SOP Instance UID")
            new = NewInstance(
                study_instance_uid=validate_uid(header.study_instance_uid, what="Study Instance UID"),
                series_instance_uid=validate_uid(header.series_instance_uid, what="Series Instance UID"),
                sop_instance_uid=validate_uid(header.sop_instance_uid, what="SOP Instance UID"),
                sop_class_uid=validate_uid(header.sop_class_uid, what="SOP Class UID"),
                transfer_syntax_uid=validate_uid(transfer_syntax, what="Transfer Syntax UID"),
                spool_path="", size_bytes=received.size, sha256=received.sha256, calling_ae=calling_ae,
                modality=header.modality, body_part=header.body_part,
                series_description=header.series_description, station_name=header.station_name)
        except InvalidUID as exc:
            raise Refused(CANNOT_UNDERSTAND, "invalid_uid", str(exc)) from exc
        if new.sop_class_uid != rq_class:
            raise Refused(DATASET_MISMATCH, "sop_class_mismatch",
                          "dataset SOP Class UID differs from the request's Affected SOP Class UID")
        if new.sop_instance_uid != rq_instance:
            raise Refused(DATASET_MISMATCH, "sop_instance_mismatch",
                          "dataset SOP Instance UID differs from the request's Affected SOP Instance UID")
        is_image = self.image_sop_classes is None or new.sop_class_uid in self.image_sop_classes
        if is_image and not header.has_pixel_data:
            raise Refused(DATASET_MISMATCH, "no_pixel_data", "image storage dataset without pixel data")
        return new

    def _store(self, temp: Path, new: NewInstance) -> Outcome:
        """Durable file first, then its row; a row that cannot be written takes the file away again."""
        spooled = self.spool.commit(temp, new.study_instance_uid, new.series_instance_uid, new.sop_instance_uid,
                                    digest=(new.size_bytes, new.sha256))
        if not spooled.created:
            existing = self._find(new.sop_instance_uid)
            if existing is not None:
                self.spool.discard_temp(temp)
                return self._duplicate(existing, new, new.sha256)
            # A file without a row was never acknowledged (a crash between link and commit): ours wins.
            spooled = self.spool.replace(temp, spooled.path)
        try:
            instance_id = self.index.add(replace(new, spool_path=self._ledger_path(spooled.path),
                                                 pending_upload=self.remote_store,
                                                 size_bytes=spooled.size_bytes,
                                                 sha256=spooled.sha256))
        except IntegrityError:
            # Another association indexed the same SOP Instance at the same moment: its row names this
            # very path, so the file stays.
            existing = self._find(new.sop_instance_uid)
            if existing is None:
                raise
            # same SOP Instance UID under another study/series: another file
            if from_ledger(existing.spool_path, self.data_dir).resolve() != spooled.path.resolve():
                self.spool.remove(spooled.path)
            return self._duplicate(existing, new, spooled.sha256)
        except DatabaseUnavailable as exc:
            self.spool.remove(spooled.path)
            log.error("ledger unavailable, C-STORE refused with 0xA700: %s", exc)
            raise Refused(OUT_OF_RESOURCES, "ledger_unavailable", "ledger database unavailable") from exc
        except BaseException:
            self.spool.remove(spooled.path)
            raise
        if self.on_stored is not None:
            self.on_stored(instance_id, new.study_instance_uid)
        return Outcome(SUCCESS, instance_id=instance_id)

    def _ledger_path(self, path: Path) -> str:
        """A spool file's path as the ledger stores it (:func:`ledger.paths.to_ledger`)."""
        return f"{self._spool_key}/{path.relative_to(self.spool.root).as_posix()}"

    def _find(self, sop_uid: str) -> ExistingInstance | None:
        try:
            return self.index.find(sop_uid)
        except DatabaseUnavailable as exc:
            log.error("ledger unavailable, C-STORE refused with 0xA700: %s", exc)
            raise Refused(OUT_OF_RESOURCES, "ledger_unavailable", "ledger database unavailable") from exc

    def _duplicate(self, existing: ExistingInstance, new: NewInstance, digest: str) -> Outcome:
        """The answer for ``new`` whose SOP Instance UID is ``existing``'s (see the module's "Duplicates")."""
        sop_uid, calling_ae = new.sop_instance_uid, new.calling_ae
        if existing.study_instance_uid != new.study_instance_uid:
            raise Refused(UID_CONFLICT, "uid_conflict", "SOP Instance UID stored already in another study")
        if existing.series_instance_uid != new.series_instance_uid:
            raise Refused(UID_CONFLICT, "uid_conflict", "SOP Instance UID stored already in another series")
        if digest == existing.sha256:
            return Outcome(SUCCESS, "duplicate", "same instance received before", instance_id=existing.id,
                           duplicate=True)
        try:
            with session_scope(self.sessions) as s:
                audit.append(s, actor=calling_ae or "unknown", action="instance.duplicate_differs",
                             object_type="instance", object_id=existing.id,
                             details={"sop_instance_uid": sop_uid, "kept_sha256": existing.sha256,
                                      "discarded_sha256": digest})
        except DatabaseUnavailable as exc:
            raise Refused(OUT_OF_RESOURCES, "ledger_unavailable", "ledger database unavailable") from exc
        log.warning("instance %s received again with different content; first copy kept", sop_uid)
        return Outcome(SUCCESS, "duplicate_differs", "instance received before with other content; first kept",
                       instance_id=existing.id, duplicate=True)

    def _audit_refusal(self, refusal: Refused, rq_class: str, rq_instance: str, calling_ae: str,
                       address: str) -> None:
        log.warning("%s from %s@%s refused: 0x%04X %s (%s)", self.protocol, calling_ae, address, refusal.status,
                    refusal.reason, refusal.detail)
        if self.metrics is not None:
            self.metrics.instance_refused(refusal.reason, refusal.status)
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
                             object_type="association" if self.protocol == "C-STORE" else "http_request",
                             object_id=address, details=details)
        except DatabaseUnavailable as exc:
            log.error("could not audit a refused %s (ledger unavailable): %s", self.protocol, exc)
