"""The Storage SCP: C-ECHO and C-STORE, with the allow-list, TLS and bounded associations.

::

    scp = StoreSCP(settings, sessions)      # no I/O yet
    scp.start()                             # binds the port, serves in background threads
    ...
    scp.stop()

One thread per association, blocking sockets. The upper-layer protocol is :mod:`dicom_node.ul`; what a
received instance becomes is decided by :class:`dicom_node.receive.Receiver`. A C-STORE's data set is
written, fragment by fragment as it arrives, to a temporary file in ``<spool>/tmp`` (the spool's own
file system: making it durable is an fsync and a link, never a copy), hashed on the way, and its first
bytes are kept for the header; memory stays bounded for a 500 MB multi-frame and the bytes are stored
exactly as sent (no decode/re-encode). Nothing about the data set is logged: no patient names or IDs.

The file is a DICOM Part 10 file: a preamble and file meta information written by us from the request
(SOP Class/Instance UID, the negotiated transfer syntax, the calling AE), then the data set's bytes.

Timeouts: ``scp_acse_timeout`` for the TLS handshake and the A-ASSOCIATE-RQ after a connection opens;
``scp_network_timeout`` for any silence once the association is established (idle, or in the middle of
a data set), after which the association is aborted (A-ABORT) and a partial file removed.
``scp_dimse_timeout`` is the SCU's (how long :mod:`dicom_node.scu` waits for a response).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pynetdicom import sop_class as _sop_class
from pynetdicom.pdu import A_ASSOCIATE_AC as _AcPDU
from pynetdicom.pdu import A_ASSOCIATE_RQ as _RqPDU
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, build_context, negotiate_as_acceptor
from sqlalchemy.orm import Session, sessionmaker

from ledger import audit
from ledger.db import DatabaseUnavailable, session_scope
from specgate.settings import Settings

from . import ul
from .listener import HANDOFF_OVER_LIMIT, accept_until
from .receive import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS, Received, Receiver
from .security import caller_allowed, normalise_host, server_ssl_context
from .spool import InvalidUID, Spool, validate_uid

__all__ = ["IMAGE_STORAGE_SOP_CLASSES", "IMPLEMENTATION_CLASS_UID", "TRANSFER_SYNTAXES", "StoreSCP",
           "storage_contexts"]

log = logging.getLogger("specgate.dicom_node.scp")

#: Every "... Image Storage" SOP class pynetdicom knows (CT, MR, Enhanced CT/MR, PET, XA, ...).
IMAGE_STORAGE_SOP_CLASSES: frozenset[str] = frozenset(
    str(getattr(_sop_class, name)) for name in dir(_sop_class) if "ImageStorage" in name
)
#: Transfer syntaxes accepted: uncompressed, deflated, and RLE lossless that pydicom decodes.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
_VERIFICATION = "1.2.840.10008.1.1"
_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
#: specgate's Implementation Class UID (a 2.25 UUID-derived UID) and version name, in the A-ASSOCIATE-AC
#: and in the file meta of every received file.
IMPLEMENTATION_CLASS_UID = "2.25.251427363747103947605429287917103215998"
IMPLEMENTATION_VERSION = "SPECGATE_01"

# A-ASSOCIATE-RJ (result, source, diagnostic)
_RJ_CALLING_AE = (0x01, 0x01, 0x03)
_RJ_CALLED_AE = (0x01, 0x01, 0x07)
_RJ_CONTEXT_NAME = (0x01, 0x01, 0x02)
_RJ_PROTOCOL = (0x01, 0x02, 0x02)
_RJ_LIMIT = (0x02, 0x03, 0x02)
_RJ_REASONS = {
    _RJ_CALLING_AE: "calling AE title not recognised",
    _RJ_CALLED_AE: "called AE title not recognised",
    _RJ_CONTEXT_NAME: "application context name not supported",
    _RJ_PROTOCOL: "protocol version not supported",
    _RJ_LIMIT: "local limit exceeded (too many associations)",
}

# DIMSE command fields and values (PS3.7 E.1)
_C_STORE_RQ, _C_STORE_RSP = 0x0001, 0x8001
_C_ECHO_RQ, _C_ECHO_RSP = 0x0030, 0x8030
_C_CANCEL_RQ = 0x0FFF
_NO_DATA_SET = 0x0101
_UNRECOGNISED_OPERATION = 0x0211
_MAX_COMMAND = 1 << 16  # bytes; a command set is a few hundred
_MAX_ASSOCIATE_RQ = 1 << 20
_HEAD = 1 << 16  # data set bytes kept in memory for receive.fast_header
_temp_names = itertools.count()


def storage_contexts() -> list[PresentationContext]:
    contexts = [build_context(_VERIFICATION)]
    for uid in sorted(IMAGE_STORAGE_SOP_CLASSES):
        contexts.append(build_context(uid, list(TRANSFER_SYNTAXES)))
    return contexts


def _explicit_le(elements: list[tuple[int, int, bytes, bytes]]) -> bytes:
    out = bytearray()
    for group, elem, vr, value in elements:
        if vr in (b"OB", b"UN"):
            out += group.to_bytes(2, "little") + elem.to_bytes(2, "little") + vr + b"\0\0" \
                + len(value).to_bytes(4, "little") + value
        else:
            out += group.to_bytes(2, "little") + elem.to_bytes(2, "little") + vr \
                + len(value).to_bytes(2, "little") + value
    return bytes(out)


def _pad(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def file_meta(sop_class: bytes, sop_instance: bytes, transfer_syntax: str, calling_ae: str) -> bytes:
    """Preamble, 'DICM' and the file meta group for a received data set (PS3.10 7.1), from the request's
    raw UID values (written as they came: the file is ours, its name never comes from them)."""
    body = _explicit_le([
        (0x0002, 0x0001, b"OB", b"\x00\x01"),
        (0x0002, 0x0002, b"UI", _pad(sop_class.rstrip(b"\0 ")[:64], b"\0")),
        (0x0002, 0x0003, b"UI", _pad(sop_instance.rstrip(b"\0 ")[:64], b"\0")),
        (0x0002, 0x0010, b"UI", _pad(transfer_syntax.encode("ascii"), b"\0")),
        (0x0002, 0x0012, b"UI", _pad(IMPLEMENTATION_CLASS_UID.encode("ascii"), b"\0")),
        (0x0002, 0x0013, b"SH", _pad(IMPLEMENTATION_VERSION.encode("ascii"), b" ")),
        (0x0002, 0x0016, b"AE", _pad(calling_ae.encode("ascii", errors="replace")[:16], b" ")),
    ])
    group_length = _explicit_le([(0x0002, 0x0000, b"UL", len(body).to_bytes(4, "little"))])
    return b"\0" * 128 + b"DICM" + group_length + body


class _Sink:
    """A C-STORE's data set on its way to disk: a temporary file in the spool, hashed while written.

    A write that fails (the disk is full) removes the file at once and swallows the rest of the data
    set, so that the association can still be answered (0xA700) and go on."""

    def __init__(self, tmp_dir: Path, prefix: bytes) -> None:
        while True:
            path = tmp_dir / f"{os.getpid()}.{next(_temp_names)}.part"
            try:
                self.fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                break
            except FileExistsError:  # left by an earlier process with the same pid
                continue
        self.path = path
        self.hash = hashlib.sha256(prefix)  # the digest is the whole file's
        self.offset = len(prefix)
        self.length = 0
        self.head = bytearray()
        self.error: OSError | None = None
        self._write(memoryview(prefix))

    def _write(self, piece: memoryview) -> None:
        if self.fd is None:
            return
        try:
            while piece:
                piece = piece[os.write(self.fd, piece):]
        except OSError as exc:
            self.error = exc
            self.discard()

    def write(self, piece: memoryview) -> None:
        if len(self.head) < _HEAD:
            self.head += piece[:_HEAD - len(self.head)]
        self.length += len(piece)
        self.hash.update(piece)
        self._write(piece)

    def finish(self) -> Received:
        assert self.fd is not None
        os.close(self.fd)
        self.fd = None
        return Received(size=self.offset + self.length, sha256=self.hash.hexdigest(),
                        dataset_length=self.length, head=bytes(self.head))

    def discard(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class _Message:
    """A DIMSE request whose data set is still arriving."""

    def __init__(self, context: PresentationContext, command: dict[int, bytes], sink: _Sink | None) -> None:
        self.context = context
        self.command = command
        self.sink = sink  # None: the data set is read and dropped (an operation we do not perform)


class _Association:
    """One connection, from its first byte to its close, in its own thread."""

    def __init__(self, scp: StoreSCP, sock: socket.socket, address: tuple[str, int], *, over_limit: bool) -> None:
        self.scp = scp
        self.sock = sock
        self.host = normalise_host(str(address[0]))
        self.port = int(address[1])
        self.over_limit = over_limit
        self.established = False
        self.calling = ""
        self._send_lock = threading.Lock()
        self._closed = False
        self._contexts: dict[int, PresentationContext] = {}
        self._peer_max_pdu = 0
        self._command = bytearray()
        self._message: _Message | None = None
        self.thread = threading.Thread(target=self.run, name=f"specgate-assoc-{self.host}:{self.port}",
                                       daemon=True)

    # ------------------------------------------------------------------------------------ control
    def run(self) -> None:
        try:
            self._serve()
        except ul.PeerClosed:
            log.debug("association from %s: connection closed by the peer", self.host)
        except TimeoutError:
            log.warning("association from %r@%s aborted: no data for %.0f s", self.calling, self.host,
                        self.sock.gettimeout() or 0)
            self.abort(0x02, 0x00)
        except ul.ProtocolError as exc:
            log.warning("association from %r@%s aborted: %s", self.calling, self.host, exc)
            self.abort(0x02, exc.reason)
        except (OSError, ssl.SSLError) as exc:
            if not self._closed:
                log.warning("association from %r@%s ended: %s", self.calling, self.host, exc)
        except Exception:
            log.exception("association from %r@%s: unexpected error; aborting", self.calling, self.host)
            self.abort(0x02, 0x00)
        finally:
            if self._message is not None and self._message.sink is not None:
                self._message.sink.discard()
            self._close()
            self.scp._ended(self)

    def send(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def abort(self, source: int = 0x00, reason: int = 0x00) -> None:
        """Send an A-ABORT (best effort) and close; safe from any thread."""
        if self._closed:
            return
        try:
            self.sock.settimeout(2.0)
            self.send(ul.encode_abort(source, reason))
        except OSError:
            pass
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes this association's thread if it is reading
        except OSError:
            pass
        self.sock.close()

    # ---------------------------------------------------------------------------------- protocol
    def _serve(self) -> None:
        s = self.scp.settings
        if self.scp.ssl_context is not None:
            if not self._handshake(s.scp_acse_timeout):
                return
        self.sock.settimeout(s.scp_acse_timeout)
        reader = ul.Reader(self.sock)
        try:
            pdu_type, length = reader.pdu_header()
        except (ul.PeerClosed, TimeoutError, OSError):
            return  # a port probe, a health check, or a peer that said nothing: close quietly
        if pdu_type != ul.A_ASSOCIATE_RQ:
            raise ul.ProtocolError(f"PDU type 0x{pdu_type:02X} before A-ASSOCIATE-RQ", ul.ABORT_UNEXPECTED_PDU)
        if length > _MAX_ASSOCIATE_RQ:
            raise ul.ProtocolError(f"A-ASSOCIATE-RQ of {length} bytes")
        body = reader.exact(length)
        if not self._negotiate(bytes([pdu_type, 0]) + length.to_bytes(4, "big") + body):
            return
        self.established = True
        self.sock.settimeout(s.scp_network_timeout)
        while True:
            pdu_type, length = reader.pdu_header()
            if pdu_type == ul.P_DATA_TF:
                self._p_data(reader, length)
            elif pdu_type == ul.A_RELEASE_RQ and length == 4:
                reader.skip(4)
                if self._message is not None:  # released in the middle of a message: it is dropped
                    log.warning("association from %r@%s released with a data set unfinished", self.calling,
                                self.host)
                self.send(ul.RELEASE_RP)
                return
            elif pdu_type == ul.A_ABORT and length == 4:
                reader.skip(4)
                log.info("association from %r@%s aborted by the peer", self.calling, self.host)
                return
            else:
                raise ul.ProtocolError(f"unexpected PDU type 0x{pdu_type:02X} ({length} bytes)",
                                       ul.ABORT_UNEXPECTED_PDU)

    def _handshake(self, timeout: float) -> bool:
        ctx = self.scp.ssl_context
        assert ctx is not None
        try:
            self.sock = ctx.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
            self.sock.settimeout(timeout)
            self.sock.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            self.scp._on_tls_refused(self.host, type(exc).__name__ + ": " + str(exc)[:200])
            return False
        return True

    def _negotiate(self, raw: bytes) -> bool:
        """Decode the A-ASSOCIATE-RQ, decide, answer with -AC or -RJ. True when the association is up."""
        try:
            pdu = _RqPDU()
            pdu.decode(raw)
            rq = pdu.to_primitive()
            called = str(rq.called_ae_title).strip()
            self.calling = str(rq.calling_ae_title).strip()
        except Exception as exc:  # noqa: BLE001 - any decoding failure of a hostile PDU is the same answer
            raise ul.ProtocolError(f"A-ASSOCIATE-RQ cannot be decoded ({type(exc).__name__})") from exc
        s = self.scp.settings
        rsd: tuple[int, int, int] | None = None
        if not caller_allowed(s.allowed_callers, self.calling, self.host):
            rsd = _RJ_CALLING_AE
        elif s.scp_require_called_ae and called != s.scp_ae_title:
            rsd = _RJ_CALLED_AE
        elif str(rq.application_context_name) != _APPLICATION_CONTEXT:
            rsd = _RJ_CONTEXT_NAME
        elif not (int(getattr(pdu, "protocol_version", 1)) & 0x0001):
            rsd = _RJ_PROTOCOL
        elif self.over_limit or self.scp._over_limit(self):
            rsd = _RJ_LIMIT
        if rsd is not None:
            self.scp._audit_rejection(self.calling, called, self.host, rsd)  # audited before the peer knows
            self.send(ul.encode_reject(*rsd))
            return False

        roles: dict[Any, tuple[bool | None, bool | None]] = {}
        for item in rq.user_information:
            if isinstance(item, MaximumLengthNotification):
                self._peer_max_pdu = int(item.maximum_length_received or 0)
            elif isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid is not None:
                roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
        results, role_items = negotiate_as_acceptor(rq.presentation_context_definition_list,
                                                    self.scp.contexts, roles or None)
        self._contexts = {int(cx.context_id): cx for cx in results if cx.result == 0x00}  # type: ignore[arg-type]
        ac = A_ASSOCIATE()
        ac.application_context_name = _APPLICATION_CONTEXT
        ac.calling_ae_title = rq.calling_ae_title
        ac.called_ae_title = rq.called_ae_title
        ac.result = 0x00
        ac.result_source = 0x01
        ac.presentation_context_definition_results_list = results
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = s.scp_max_pdu
        impl_uid = ImplementationClassUIDNotification()
        impl_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        impl_version = ImplementationVersionNameNotification()
        impl_version.implementation_version_name = IMPLEMENTATION_VERSION
        ac.user_information = [max_length, impl_uid, impl_version, *role_items]
        out = _AcPDU()
        out.from_primitive(ac)
        self.send(out.encode())
        log.info("association from %r@%s accepted (%d of %d presentation contexts)", self.calling, self.host,
                 len(self._contexts), len(results))
        return True

    def _p_data(self, reader: ul.Reader, length: int) -> None:
        remaining = length
        while remaining > 0:
            if remaining < 6:
                raise ul.ProtocolError("P-DATA-TF ends inside a presentation data value header")
            item_length, context_id, control = reader.pdv_header()
            if item_length < 2 or item_length + 4 > remaining:
                raise ul.ProtocolError(f"presentation data value of {item_length} bytes in a {length}-byte PDU")
            remaining -= item_length + 4
            n = item_length - 2
            context = self._contexts.get(context_id)
            if context is None:
                raise ul.ProtocolError(f"presentation context {context_id} was not accepted")
            if control & 0x01:  # a command fragment
                if self._message is not None:
                    raise ul.ProtocolError("a command while a data set was still arriving", ul.ABORT_UNEXPECTED_PDU)
                if len(self._command) + n > _MAX_COMMAND:
                    raise ul.ProtocolError(f"command set over {_MAX_COMMAND} bytes")
                self._command += reader.exact(n)
                if control & 0x02:
                    command = ul.decode_command(bytes(self._command))
                    self._command.clear()
                    self._on_command(context, command)
            else:  # a data set fragment
                message = self._message
                if message is None or message.context.context_id != context_id:
                    raise ul.ProtocolError("a data set fragment without its command", ul.ABORT_UNEXPECTED_PDU)
                if message.sink is not None:
                    reader.stream(n, message.sink.write)
                else:
                    reader.skip(n)
                if control & 0x02:
                    self._message = None
                    self._on_data_set(message)

    # ----------------------------------------------------------------------------------- messages
    def _on_command(self, context: PresentationContext, command: dict[int, bytes]) -> None:
        field = ul.us(command.get(0x0100))
        has_data = ul.us(command.get(0x0800)) != _NO_DATA_SET
        if field == _C_STORE_RQ and has_data:
            prefix = file_meta(command.get(0x0002, b""), command.get(0x1000, b""), str(context.transfer_syntax[0]),
                               self.calling)
            self._message = _Message(context, command, _Sink(self.scp.spool.tmp_dir, prefix))
        elif field == _C_ECHO_RQ and not has_data:
            self._respond(context, _C_ECHO_RSP, command, SUCCESS, class_uid=_VERIFICATION)
        elif field == _C_STORE_RQ:
            self._respond(context, _C_STORE_RSP, command, CANNOT_UNDERSTAND, comment="no data set")
        elif field is None or field & 0x8000 or field == _C_CANCEL_RQ:
            log.info("association from %r@%s: DIMSE command 0x%04X ignored", self.calling, self.host, field or 0)
            if has_data:
                self._message = _Message(context, command, None)
        else:
            if has_data:
                self._message = _Message(context, command, None)
            else:
                self._respond(context, field | 0x8000, command, _UNRECOGNISED_OPERATION)

    def _on_data_set(self, message: _Message) -> None:
        command = message.command
        field = ul.us(command.get(0x0100)) or 0
        if message.sink is None:
            if not field & 0x8000 and field != _C_CANCEL_RQ:
                self._respond(message.context, field | 0x8000, command, _UNRECOGNISED_OPERATION)
            return
        sink = message.sink
        rq_class, rq_instance = ul.ui(command.get(0x0002)), ul.ui(command.get(0x1000))
        if sink.error is not None:
            outcome = self.scp.receiver.refuse(OUT_OF_RESOURCES, "disk_write_failed",
                                               f"cannot write the data set: {sink.error.strerror}",
                                               request_sop_class=rq_class, request_sop_instance=rq_instance,
                                               calling_ae=self.calling, address=self.host)
        else:
            received = sink.finish()
            outcome = self.scp.receiver.receive(
                sink.path, request_sop_class=rq_class, request_sop_instance=rq_instance,
                transfer_syntax=str(message.context.transfer_syntax[0]), calling_ae=self.calling,
                address=self.host, received=received)
        comment = "" if outcome.ok else f"{outcome.reason}: {outcome.detail}"
        self._respond(message.context, _C_STORE_RSP, command, outcome.status, comment=comment)

    def _respond(self, context: PresentationContext, field: int, command: dict[int, bytes], status: int, *,
                 comment: str = "", class_uid: str | None = None) -> None:
        elements: list[tuple[int, str, int | str | bytes]] = [
            (0x0100, "US", field), (0x0120, "US", ul.us(command.get(0x0110)) or 0),
            (0x0800, "US", _NO_DATA_SET), (0x0900, "US", status)]
        # The affected UIDs are echoed when they are UIDs (a response may leave them out, PS3.7 9.3.1.2)
        for elem, value in ((0x0002, class_uid or ul.ui(command.get(0x0002))), (0x1000, ul.ui(command.get(0x1000)))):
            try:
                elements.append((elem, "UI", validate_uid(value, what="UID")))
            except InvalidUID:
                pass
        if comment:
            text = comment.encode("ascii", errors="replace").replace(b"\\", b"/")[:64]
            elements.append((0x0902, "LO", text))
        self.send(ul.encode_pdata(int(context.context_id), True, ul.encode_command(elements),  # type: ignore[arg-type]
                                  self._peer_max_pdu))


class StoreSCP:
    """specgate's SCP."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], *, spool: Spool | None = None,
                 on_stored: Callable[[int, str], None] | None = None, handoff: socket.socket | None = None) -> None:
        """``handoff``: run as a receiver process of :class:`dicom_node.listener.Listener`, taking
        connections from this socket pair instead of listening on ``scp_host:scp_port`` itself."""
        self.settings = settings
        self.handoff = handoff
        self.sessions = sessions
        self.spool = spool or Spool(settings.spool_dir, watermark_percent=settings.spool_disk_watermark_percent)
        self.receiver = Receiver(self.spool, sessions, image_sop_classes=IMAGE_STORAGE_SOP_CLASSES,
                                 on_stored=on_stored)
        self.contexts = storage_contexts()
        self.ssl_context: ssl.SSLContext | None = None
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._live: set[_Association] = set()
        self._lock = threading.Lock()
        self._received = 0  # connections handed over so far (receiver process)
        self._stopping = threading.Event()
        self.parent_gone = threading.Event()

    # ----------------------------------------------------------------------------------- control
    @property
    def address(self) -> tuple[str, int]:
        """Where the SCP listens (a receiver process: the node's configured address)."""
        if self.handoff is not None:
            return self.settings.scp_host, self.settings.scp_port
        if self._sock is None:
            raise RuntimeError("the SCP is not started")
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> StoreSCP:
        s = self.settings
        self.spool.open()
        self.ssl_context = server_ssl_context(s)
        if self.handoff is None:
            family = socket.AF_INET6 if ":" in s.scp_host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((s.scp_host, s.scp_port))
                sock.listen(128)
            except BaseException:
                sock.close()
                raise
            self._sock = sock
            self._spawn(self._accept_loop, "specgate-scp-accept")
        else:
            self._spawn(self._handoff_loop, "specgate-scp-handoff")
            self._spawn(self._report_loop, "specgate-scp-load")
        log.info("SCP %s %s %s:%d (TLS %s, max %d associations)", s.scp_ae_title,
                 "receiving for" if self.handoff else "listening on", *self.address,
                 "on" if self.ssl_context else "off", s.scp_max_associations)
        return self

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept_loop(self) -> None:
        assert self._sock is not None
        accept_until(self._sock, self._stopping, lambda client, address: self._serve(client, address,
                                                                                     over_limit=False))

    def _handoff_loop(self) -> None:
        assert self.handoff is not None
        while not self._stopping.is_set():
            try:
                msg, fds, _flags, _addr = socket.recv_fds(self.handoff, 16, 1)
            except OSError:
                msg, fds = b"", []
            if not fds:
                self.parent_gone.set()
                return
            client = socket.socket(fileno=fds[0])
            try:
                address = client.getpeername()
            except OSError:  # the peer is gone already
                client.close()
                with self._lock:
                    self._received += 1
                continue
            self._serve(client, address, over_limit=msg == HANDOFF_OVER_LIMIT)

    def _serve(self, client: socket.socket, address: Any, *, over_limit: bool) -> None:
        try:
            client.setblocking(True)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # gone already: the accept loop must not end with it
            log.info("connection from %s closed before it was served: %s", address, exc)
            client.close()
            if self.handoff is not None:
                with self._lock:
                    self._received += 1
            return
        assoc = _Association(self, client, address, over_limit=over_limit)
        with self._lock:
            self._live.add(assoc)
            if self.handoff is not None:
                self._received += 1
        assoc.thread.start()

    def _ended(self, assoc: _Association) -> None:
        with self._lock:
            self._live.discard(assoc)
        if self.handoff is not None:
            self.report_load()  # at once, not at the next tick: the listener's count is the limit

    def _over_limit(self, assoc: _Association) -> bool:
        if self.handoff is not None:  # the listener counts for the node and marked the connection
            return False
        with self._lock:
            others = sum(1 for a in self._live if a is not assoc)
        return others >= self.settings.scp_max_associations

    def report_load(self) -> None:
        """Tell the listener how many connections this process has open, and how many it was given so
        far (absolute numbers: a lost message cannot make the listener's count drift). A connection
        counts from the moment it was handed over until its socket is closed."""
        assert self.handoff is not None
        with self._lock:
            line = f"{len(self._live)} {self._received}\n".encode()
        try:
            self.handoff.send(line)
        except OSError:
            pass

    def _report_loop(self) -> None:
        while not self.parent_gone.wait(0.05) and not self._stopping.is_set():
            self.report_load()

    def established_associations(self) -> int:
        with self._lock:
            return sum(1 for a in self._live if a.established)

    def active_associations(self) -> int:
        with self._lock:
            return len(self._live)

    def wait_parent_gone(self, timeout: float | None = None) -> bool:
        """In a receiver process: block until the listener closed its end (it stopped or died)."""
        return self.parent_gone.wait(timeout)

    def stop(self) -> None:
        self._stopping.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            except OSError:
                pass
            self._sock.close()
        with self._lock:
            live = list(self._live)
        for assoc in live:
            assoc.abort()
        for assoc in live:
            assoc.thread.join(timeout=10)
        for t in self._threads:
            if t is not threading.current_thread() and t.name != "specgate-scp-handoff":
                t.join(timeout=10)
        self._threads.clear()
        self.receiver.close()

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------------------------- auditing
    def _audit_rejection(self, calling: str, called: str, host: str, rsd: tuple[int, int, int]) -> None:
        reason = _RJ_REASONS.get(rsd, f"rejected {rsd}")
        log.warning("association from %r@%s (called %r) rejected: %s", calling, host, called, reason)
        self._audit(actor=calling or "unknown", action="association.rejected", object_id=host,
                    details={"calling_ae": calling, "called_ae": called, "address": host, "reason": reason})

    def _on_tls_refused(self, host: str, why: str) -> None:
        log.warning("TLS handshake from %s refused: %s", host, why)
        self._audit(actor="unknown", action="association.tls_refused", object_id=host,
                    details={"address": host, "reason": why})

    def _audit(self, *, actor: str, action: str, object_id: str, details: dict[str, Any]) -> None:
        try:
            with session_scope(self.sessions) as s:
                audit.append(s, actor=actor, action=action, object_type="association", object_id=object_id,
                             details=details)
        except DatabaseUnavailable as exc:
            log.error("could not audit %s (ledger unavailable): %s", action, exc)
