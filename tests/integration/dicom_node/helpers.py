"""Helpers for the DICOM node's integration tests: the ledger handle, a pynetdicom SCU that reports every
status, hostile files, a raw peer that sends any byte sequence (:class:`RawPeer`), and ``specgate scp`` in
a process of its own whose memory a test can measure (:class:`ScpProcess`)."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import generate_uid
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
from tests.peers import free_port, wait_for, write_ct_series

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


def encode_dataset(ds: Dataset, *, implicit_vr: bool = False, little_endian: bool = True) -> bytes:
    """``ds`` encoded (default: Explicit VR Little Endian), without preamble or file meta."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = little_endian, implicit_vr
    write_dataset(buf, ds)
    return buf.getvalue()


def pdata(context_id: int, header: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU with one PDV (header: bit 0 command, bit 1 last fragment)."""
    item = struct.pack(">IBB", len(data) + 2, context_id, header) + data
    return struct.pack(">BBI", 0x04, 0x00, len(item)) + item


def store_command(sop_class: str | bytes, sop_instance: str | bytes, message_id: int = 1) -> bytes:
    """An encoded C-STORE-RQ command set; the UIDs are written as given, valid or not (given as bytes:
    exactly those bytes, no padding added, no whitespace taken away)."""
    if isinstance(sop_class, bytes) or isinstance(sop_instance, bytes):
        def uid(v: str | bytes) -> bytes:
            return v if isinstance(v, bytes) else v.encode() + b"\0" * (len(v) % 2)

        elements = [(0x0002, uid(sop_class)), (0x0100, struct.pack("<H", 0x0001)),
                    (0x0110, struct.pack("<H", message_id)), (0x0700, struct.pack("<H", 2)),
                    (0x0800, struct.pack("<H", 0x0001)), (0x1000, uid(sop_instance))]
        body = b"".join(struct.pack("<HHI", 0, e, len(v)) + v for e, v in elements)
        return struct.pack("<HHII", 0, 0, 4, len(body)) + body
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
                 called: str = "SPECGATE", transfer_syntax: str = "1.2.840.10008.1.2.1",
                 associate_rq: bytes | None = None) -> None:
        """``associate_rq``: the A-ASSOCIATE-RQ's bytes exactly (e.g. from :func:`associate_rq`) instead of
        one encoded by pynetdicom for ``contexts``/``transfer_syntax``."""
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.reader = ul.Reader(self.sock)
        self.aborted: tuple[int, int] | None = None  # (source, reason) of an A-ABORT the SCP sent
        self.sock.sendall(associate_rq if associate_rq is not None else
                          self._associate_rq(contexts, calling, called, transfer_syntax))
        pdu_type, length = self.reader.pdu_header()
        body = self.reader.exact(length)
        if pdu_type != ul.A_ASSOCIATE_AC:
            self.sock.close()
            raise AssociationRefused(pdu_type, body)
        ac = A_ASSOCIATE_AC()
        ac.decode(bytes([pdu_type, 0]) + length.to_bytes(4, "big") + body)
        self.accepted = [int(cx.context_id) for cx in ac.to_primitive().presentation_context_definition_results_list
                         if cx.result == 0x00]
        self.max_pdu = 0
        for item in ac.to_primitive().user_information:
            if isinstance(item, MaximumLengthNotification):
                self.max_pdu = int(item.maximum_length_received or 0)

    @staticmethod
    def _associate_rq(contexts: Sequence[str], calling: str, called: str, transfer_syntax: str) -> bytes:
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
        return bytes(pdu.encode())

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def try_send(self, data: bytes) -> bool:
        """Send ``data``; False when the SCP has closed the connection (it aborted the association)."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def send_store(self, context_id: int, sop_class: str, sop_instance: str, dataset: Iterable[bytes], *,
                   message_id: int = 1, max_pdu: int | None = None) -> bool:
        """A C-STORE-RQ whose data set is the concatenation of ``dataset``'s pieces, sent as they come
        (a generator can stream gigabytes without holding them), in PDVs of at most ``max_pdu`` bytes
        (default: what the SCP announced); the last one carries the 'last fragment' bit. False when the
        SCP closed the connection on the way."""
        limit = (max_pdu or self.max_pdu or 1 << 20) - 6
        if not self.try_send(pdata(context_id, 0x03, store_command(sop_class, sop_instance, message_id))):
            return False
        pending = b""
        for piece in dataset:
            pending += piece
            while len(pending) > limit:
                if not self.try_send(pdata(context_id, 0x00, pending[:limit])):
                    return False
                pending = pending[limit:]
        return self.try_send(pdata(context_id, 0x02, pending))

    def next_pdu(self) -> tuple[int, bytes] | None:
        """The next PDU the SCP sends, (type, body); None when it closed the connection."""
        try:
            pdu_type, length = self.reader.pdu_header()
            return pdu_type, self.reader.exact(length)
        except (ul.PeerClosed, OSError):
            return None

    def abort_received(self) -> tuple[int, int] | None:
        """(source, reason) of the A-ABORT the SCP sent (already read by :meth:`response`) or sends next,
        skipping any other PDU; None when it closed the connection without one (or sent nothing before
        the socket's timeout)."""
        while self.aborted is None and (pdu := self.next_pdu()) is not None:
            if pdu[0] == ul.A_ABORT:
                self.aborted = (pdu[1][2], pdu[1][3])
        return self.aborted

    def response(self) -> int | None:
        """The status of the next DIMSE response; None when the SCP aborted (see :attr:`aborted`) or
        closed instead."""
        command = bytearray()
        try:
            while True:
                pdu_type, length = self.reader.pdu_header()
                if pdu_type != ul.P_DATA_TF:
                    body = self.reader.exact(min(length, 1 << 16))
                    if pdu_type == ul.A_ABORT and len(body) == 4:
                        self.aborted = (body[2], body[3])
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


class AssociationRefused(AssertionError):
    """The SCP answered an A-ASSOCIATE-RQ with something other than an A-ASSOCIATE-AC."""

    def __init__(self, pdu_type: int, body: bytes) -> None:
        super().__init__(f"association not accepted: PDU type 0x{pdu_type:02X}")
        self.pdu_type = pdu_type
        self.body = body

    @property
    def rejection(self) -> tuple[int, int, int] | None:
        """(result, source, reason) of an A-ASSOCIATE-RJ."""
        return (self.body[1], self.body[2], self.body[3]) if self.pdu_type == ul.A_ASSOCIATE_RJ else None


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def associate_rq(contexts: Sequence[tuple[bytes, Sequence[bytes]]], *, calling: str = CALLER,
                 called: str = "SPECGATE", application_context: bytes = b"1.2.840.10008.3.1.1.1",
                 implementation_class: bytes = b"1.2.826.0.1.3680043.9.3811.1") -> bytes:
    """An A-ASSOCIATE-RQ written byte by byte (PS3.8 9.3.2): every UID exactly as given, padding and
    all, which pynetdicom's encoder would not let through. Context IDs 1, 3, 5, ..."""
    items = _item(0x10, application_context)
    for i, (abstract, syntaxes) in enumerate(contexts):
        body = bytes([2 * i + 1, 0, 0, 0]) + _item(0x30, abstract) + b"".join(_item(0x40, ts) for ts in syntaxes)
        items += _item(0x20, body)
    items += _item(0x50, _item(0x51, struct.pack(">I", 0)) + _item(0x52, implementation_class))
    fixed = struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16) + bytes(32)
    return struct.pack(">BBI", ul.A_ASSOCIATE_RQ, 0, len(fixed) + len(items)) + fixed + items


# ------------------------------------------------------------------------ specgate scp in its own process
def _vm_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


@dataclass
class Memory:
    """What the SCP process's resident memory did while a block ran (kibibytes, from /proc)."""

    baseline_kib: int
    peak_kib: int = 0

    @property
    def grown_mib(self) -> float:
        """How far the peak resident set rose above the resident set when the block started."""
        return (self.peak_kib - self.baseline_kib) / 1024


@dataclass
class ScpProcess:
    """``specgate scp`` with one receiver (SPECGATE_SCP_PROCESSES=1: the associations are served in this
    very process, so its /proc/<pid>/status is the receiving side's memory)."""

    proc: subprocess.Popen[bytes]
    port: int
    ledger: Ledger
    log: Path
    env: dict[str, str] = field(repr=False)
    warm_up: list[Path] = field(default_factory=list)  # what was stored to warm the process up

    @property
    def stored_at_start(self) -> int:
        return len(self.warm_up)

    @property
    def tmp_dir(self) -> Path:
        return self.ledger.settings.spool_dir / "tmp"

    @contextmanager
    def memory(self) -> Iterator[Memory]:
        """Measure the peak resident set while the block runs: VmHWM is reset to the current resident
        set first (``echo 5 > /proc/<pid>/clear_refs``), then read when the block ends.

        What a bound on this can mean: a new association's thread touches its read buffer and its
        allocator arena again after earlier ones ended and gave theirs back, which shows as up to ~20 MiB
        on the first association measured; a steady stream of stores shows none (measured while these
        tests were written). A bound of 32 MiB for one association therefore says "nothing in proportion
        to what the peer sent or declared" (the attacks here declare 160 MiB to 4 GiB)."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        m = Memory(baseline_kib=_vm_kib(self.proc.pid, "VmRSS"))
        yield m
        m.peak_kib = _vm_kib(self.proc.pid, "VmHWM")
        print(f"[SCP memory] peak resident set {m.peak_kib / 1024:.1f} MiB, grew by {m.grown_mib:.1f} MiB "
              f"over {m.baseline_kib / 1024:.1f} MiB")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_scp_process(ledger: Ledger, log: Path, **settings: str) -> ScpProcess:
    """``specgate scp`` on a free port for ``ledger`` (already migrated), serving in one process;
    ``settings``: more SPECGATE_* variables, by field name (``scp_max_instance_bytes="1048576"``)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECGATE_")}
    env.update({"SPECGATE_DATA_DIR": str(ledger.data_dir), "SPECGATE_DATABASE_URL": ledger.url,
                "SPECGATE_SCP_PORT": str(port), "SPECGATE_ALLOWED_CALLERS": f"{CALLER}@127.0.0.1",
                "SPECGATE_SCP_PROCESSES": "1", "SPECGATE_SCP_NETWORK_TIMEOUT": "10",
                "SPECGATE_SCP_ACSE_TIMEOUT": "5", "SPECGATE_STUDY_QUIET_SECONDS": "3600"})
    env.update({"SPECGATE_" + k.upper(): str(v) for k, v in settings.items()})
    proc = subprocess.Popen([str(Path(sys.executable).with_name("specgate")), "scp"], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(log, "ab"))
    scp = ScpProcess(proc, port, ledger, log, env)
    try:
        wait_for(lambda: proc.poll() is not None or echo(port) == 0, timeout=60, what="specgate scp to answer")
        assert proc.poll() is None, log.read_text()[-3000:]
        # One instance stored before anything is measured: the first C-STORE of a process imports and
        # caches what every later one uses (about 20 MiB), which is not what a test measures.
        series = write_ct_series(log.parent / f"warm-up-{port}", slices=1, seed=port)
        assert store(port, series.paths) == [SUCCESS]
        scp.warm_up = [ledger.settings.spool_dir / series.study_instance_uid / series.series_instance_uid
                       / f"{series.sop_instance_uids[0]}.dcm"]
    except BaseException:
        scp.stop()
        raise
    return scp


# ---------------------------------------------------------------------------------- data sets for bounds
MiB = 1 << 20
SUCCESS, C000 = 0x0000, 0xC000


def image_header(*, sop_class: str = CTImageStorage, sop: str | None = None, rows: int = 512, columns: int = 512,
                 frames: int | None = None) -> Dataset:
    """An image's data set up to its pixel data (which the caller appends, streamed)."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop or generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CT" if sop_class == CTImageStorage else "OT"
    ds.PatientName, ds.PatientID = "Bounds^Test", "BOUNDS-1"
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    return ds


def explicit_long(tag: int, vr: bytes, length: int) -> bytes:
    """The header of an Explicit VR Little Endian element with a 4-byte length (OB, OW, SQ, UN ...)."""
    return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, length)


def repeated(total: int, block: bytes) -> Iterator[bytes]:
    """``total`` bytes of pixel data, ``block`` repeated (nothing of that size is ever held)."""
    while total > 0:
        piece = block[:total]
        total -= len(piece)
        yield piece


PIXEL_BLOCK = np.random.default_rng(5).integers(0, 4096, MiB // 2, dtype=np.uint16).tobytes()  # 1 MiB


def nothing_left(scp: ScpProcess, stored: int = 0) -> None:
    """No partial file in the temporary folder (once the association has ended), and no instance stored
    but the warm-up and ``stored`` more."""
    wait_for(lambda: list(scp.tmp_dir.iterdir()) == [], timeout=10, what="the temporary folder to be empty")
    assert scp.ledger.count() == scp.stored_at_start + stored
    assert len(scp.ledger.spool_files()) == scp.stored_at_start + stored


def stored_files(scp: ScpProcess) -> list[Path]:
    """The spool's files other than the warm-up's."""
    return [f for f in scp.ledger.spool_files() if f not in scp.warm_up]


def still_serving(scp: ScpProcess, tmp_path: Path) -> None:
    good = write_ct_series(tmp_path / "good", slices=1, seed=9)
    before = scp.ledger.count()
    assert store(scp.port, good.paths) == [SUCCESS]
    assert scp.ledger.count() == before + 1
