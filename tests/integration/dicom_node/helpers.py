"""Helpers for the DICOM node's integration tests: the ledger handle, a pynetdicom SCU that reports every
status, and hostile files."""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import ul
from ledger.schema import AuditEvent, Instance
from specgate.settings import Settings

CALLER = "TESTSCU"


@dataclass
class Ledger:
    settings: Settings
    sessions: sessionmaker[Session]
    url: str
    data_dir: Path

    def count(self, model: Any = Instance) -> int:
        with self.sessions() as s:
            return int(s.execute(select(func.count()).select_from(model)).scalar_one())

    def audit(self, action: str) -> list[AuditEvent]:
        with self.sessions() as s:
            return list(s.execute(select(AuditEvent).where(AuditEvent.action == action)
                                  .order_by(AuditEvent.id)).scalars())

    def spool_files(self) -> list[Path]:
        """Every file under the data folder except the SQLite ledger and the spool's temporary folder."""
        spool = self.settings.spool_dir
        return sorted(p for p in self.data_dir.rglob("*") if p.is_file() and
                      spool in p.parents and spool / "tmp" not in p.parents)


def scu_ae(calling: str = CALLER, contexts: Sequence[str] = (CTImageStorage, Verification),
           transfer_syntaxes: Sequence[str] | None = None) -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    for cx in contexts:
        if transfer_syntaxes:
            ae.add_requested_context(cx, list(transfer_syntaxes))
        else:
            ae.add_requested_context(cx)
    return ae


def store(port: int, items: Sequence[Path | Dataset], *, calling: str = CALLER, called: str = "SPECGATE",
          raw: bool = False) -> list[int | None]:
    """C-STORE each item on one association; the status of each (None: no response).

    ``raw``: send the file's bytes after its file meta as they are (pynetdicom's chunked send), which is
    how a hostile or broken peer's bytes reach the SCP without being decoded here first.
    """
    ts = None
    if raw:
        ts = sorted({str(read_file_meta_info(p).TransferSyntaxUID) for p in items})
        if len(ts) > 1 or ts[0] != "1.2.840.10008.1.2.1":
            raise ValueError("raw sends use Explicit VR Little Endian files")
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = raw
    try:
        classes = sorted({str(read_file_meta_info(p).MediaStorageSOPClassUID)
                          if isinstance(p, Path) else str(p.SOPClassUID) for p in items}) or [CTImageStorage]
        assoc = scu_ae(calling, classes, ts).associate("127.0.0.1", port, ae_title=called)
        assert assoc.is_established, f"association refused (rejected={assoc.is_rejected})"
        statuses: list[int | None] = []
        try:
            for item in items:
                rsp = assoc.send_c_store(item)
                statuses.append(int(rsp.Status) if rsp is not None and "Status" in rsp else None)
        finally:
            if assoc.is_established:
                assoc.release()
        return statuses
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


def echo(port: int, *, calling: str = CALLER, called: str = "SPECGATE") -> int | None:
    assoc = scu_ae(calling, [Verification]).associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if rsp is not None and "Status" in rsp else None
    finally:
        assoc.release()


def with_payload(valid: Path, payload: bytes, out: Path) -> Path:
    """``valid``'s preamble and file meta, followed by ``payload`` in place of its dataset."""
    meta_end = 132 + 12 + int(dcmread(valid, stop_before_pixels=True).file_meta.FileMetaInformationGroupLength)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(valid.read_bytes()[:meta_end] + payload)
    return out


def encode_dataset(ds: Dataset) -> bytes:
    """``ds`` encoded as Explicit VR Little Endian, without preamble or file meta."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def pdata(context_id: int, header: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU with one PDV (header: bit 0 command, bit 1 last fragment)."""
    item = struct.pack(">IBB", len(data) + 2, context_id, header) + data
    return struct.pack(">BBI", 0x04, 0x00, len(item)) + item


def store_command(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    """An encoded C-STORE-RQ command set; the UIDs are written as given, valid or not."""
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    req = C_STORE()
    req.MessageID = message_id
    req.AffectedSOPClassUID = "1.2.3"  # placeholders: pynetdicom refuses invalid UIDs here
    req.AffectedSOPInstanceUID = "1.2.3"
    req.Priority = 2
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    cs = msg.command_set
    cs.AffectedSOPClassUID = sop_class
    cs.AffectedSOPInstanceUID = sop_instance
    cs.CommandDataSetType = 0x0001  # a data set follows
    del cs.CommandGroupLength
    body = encode(cs, True, True)
    from pydicom.dataset import Dataset as _D

    glen = _D()
    glen.CommandGroupLength = len(body)
    return encode(glen, True, True) + body


def raw_store(port: int, sop_class: str, sop_instance: str, dataset: bytes, *, calling: str = CALLER) -> int | None:
    """A C-STORE whose PDUs are written by hand (any UID, any bytes); its response read by pynetdicom."""
    return raw_request(port, sop_class if len(sop_class) <= 64 else "1.2.840.10008.5.1.4.1.1.2",
                       lambda cx: pdata(cx, 0x03, store_command(sop_class, sop_instance)) + pdata(cx, 0x02, dataset),
                       calling=calling)


class RawPeer:
    """A requestor written on :mod:`dicom_node.ul`: PDUs built and read by hand (the A-ASSOCIATE-RQ/AC
    encoded and decoded by pynetdicom's public PDU classes), so that a test decides exactly which bytes
    go out and when, and reads the SCP's answers itself."""

    def __init__(self, port: int, contexts: Sequence[str] = (CTImageStorage,), *, calling: str = CALLER,
                 called: str = "SPECGATE", transfer_syntax: str = "1.2.840.10008.1.2.1") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.reader = ul.Reader(self.sock)
        rq = A_ASSOCIATE()
        rq.application_context_name = "1.2.840.10008.3.1.1.1"
        rq.calling_ae_title = calling
        rq.called_ae_title = called
        offered = []
        for i, uid in enumerate(contexts):
            cx = build_context(uid, [transfer_syntax])
            cx.context_id = 2 * i + 1
            offered.append(cx)
        rq.presentation_context_definition_list = offered
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = 0
        impl = ImplementationClassUIDNotification()
        impl.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.1"
        rq.user_information = [max_length, impl]
        pdu = A_ASSOCIATE_RQ()
        pdu.from_primitive(rq)
        self.sock.sendall(pdu.encode())
        pdu_type, length = self.reader.pdu_header()
        body = self.reader.exact(length)
        if pdu_type != ul.A_ASSOCIATE_AC:
            raise AssertionError(f"association not accepted: PDU type 0x{pdu_type:02X}")
        ac = A_ASSOCIATE_AC()
        ac.decode(bytes([pdu_type, 0]) + length.to_bytes(4, "big") + body)
        self.accepted = [int(cx.context_id) for cx in ac.to_primitive().presentation_context_definition_results_list
                         if cx.result == 0x00]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> int | None:
        """The status of the next DIMSE response; None when the SCP aborted or closed instead."""
        command = bytearray()
        try:
            while True:
                pdu_type, length = self.reader.pdu_header()
                if pdu_type != ul.P_DATA_TF:
                    self.reader.skip(length)
                    return None
                end_of_command = False
                while length > 0:
                    item_length, _cx, control = self.reader.pdv_header()
                    command += self.reader.exact(item_length - 2)
                    length -= item_length + 4
                    end_of_command = bool(control & 0x02)
                if end_of_command:
                    return ul.us(ul.decode_command(bytes(command)).get(0x0900))
        except (ul.PeerClosed, OSError):
            return None

    def release(self) -> None:
        try:
            self.send(bytes([ul.A_RELEASE_RQ, 0]) + (4).to_bytes(4, "big") + b"\0\0\0\0")
            self.reader.pdu_header()
        except (ul.PeerClosed, OSError):
            pass
        finally:
            self.sock.close()

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def raw_request(port: int, context_class: str, pdus: Any, *, calling: str = CALLER) -> int | None:
    """Send ``pdus(context_id)`` (bytes written by hand) on an association that negotiated
    ``context_class``; the status of the response (None: no response)."""
    with RawPeer(port, [context_class], calling=calling) as peer:
        assert peer.accepted, "the presentation context was not accepted"
        peer.send(pdus(peer.accepted[0]))
        return peer.response()
