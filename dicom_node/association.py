"""One association, from its first byte to its close, in its own thread: TLS handshake, A-ASSOCIATE
negotiation (allow-list, called AE, association limit), P-DATA, and the DIMSE messages C-ECHO and
C-STORE. The upper-layer protocol is :mod:`dicom_node.ul`; a C-STORE's data set is streamed to a
:class:`dicom_node.sink.TempSink`; what it becomes is decided by
:class:`dicom_node.receive.InstanceReceiver`.

Timeouts: ``acse_timeout`` for the TLS handshake and the A-ASSOCIATE-RQ after a connection opens;
``network_timeout`` for any silence once the association is established (idle, or in the middle of a
data set), after which the association is aborted (A-ABORT) and a partial file removed.

What ends an association and what does not:

* one message's failure does not: the spool refusing answers that message 0xA700, an unexpected error
  0xC000, both audited (``instance.refused``), and the next message is served (see ``_attempt``);
* a protocol error or a timeout ends it with an A-ABORT; a transport failure (the peer vanished, a TLS
  error) closes the socket.

Bounds (``NodeConfig.max_pdu`` and ``NodeConfig.limits``), each checked on a header before what it
declares is read, and each refusal audited:

* what cannot be answered without reading what the bound is there to refuse ends the association with
  an A-ABORT from the service provider (``association.aborted``): a PDU longer than the ``max_pdu`` we
  announced, or an A-ASSOCIATE-RQ over 1 MiB (reason 0x06, invalid PDU parameter value: the PDU's length
  is the bad parameter); a command set over ``command_bytes`` (0x06: it is held whole, and a command
  cannot be answered before it is whole); a data set over ``instance_bytes`` or an association over
  ``association_bytes`` (0x00, reason not specified: PS3.8 has no reason for a size we will not take, and
  a peer that sends a data set that never ends can only be stopped by closing). The partial file goes
  with the association;
* what is wrong with a data set's content is that message's refusal, 0xC000, answered once the rest of
  its data set has been read and dropped (never written), so that the association goes on: an element
  that declares more than ``element_bytes`` or than the instance cap, sequences deeper than
  ``sequence_depth``, a deflated data set that inflates past ``inflated_bytes``
  (:class:`dicom_node.dataset_stream.DataSetStream`, fed each fragment as it arrives). 0xC000 and not
  0xA700: the same instance will be refused whenever it is sent, and 0xA7xx tells a sender to try again.

UIDs: every UID the node acts on goes through :func:`dicom_node.spool.validate_uid`, from the bytes the
peer sent: the A-ASSOCIATE-RQ's application context and syntaxes (rejected, 1-1-1, audited), a C-STORE's
Affected SOP Class and Instance UID (0xC000 ``invalid_uid`` when its command arrives; its data set is read
and dropped), the data set's (in :mod:`dicom_node.receive`), and so the file meta written from them.

Nothing about a data set is logged: no patient names or IDs.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any, NamedTuple, Protocol

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

from . import ul
from .config import NodeConfig
from .dataset_stream import DEFLATED, DataSetStream
from .receive import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS, InstanceReceiver, Refused
from .security import caller_allowed, normalise_host
from .sink import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION, TempSink, file_meta
from .spool import InvalidUID, Spool, validate_uid

__all__ = ["IMAGE_STORAGE_SOP_CLASSES", "TRANSFER_SYNTAXES", "Association", "Node", "storage_contexts"]

log = logging.getLogger("specgate.dicom_node.association")

#: Every "... Image Storage" SOP class pynetdicom knows (CT, MR, Enhanced CT/MR, PET, XA, ...).
IMAGE_STORAGE_SOP_CLASSES: frozenset[str] = frozenset(
    str(getattr(_sop_class, name)) for name in dir(_sop_class) if "ImageStorage" in name
)
#: Transfer syntaxes accepted, in our order of preference: uncompressed, deflated (only with
#: ``NodeConfig.accept_deflated``), then the compressed ones the worker decodes through pydicom's handlers
#: (pylibjpeg with its libjpeg and openjpeg plugins, pyjpegls; RLE by pydicom itself), lossless before
#: lossy. Every compressed frame is stored as sent; its codestream header is checked as it arrives
#: (:mod:`dicom_node.codestream`). pynetdicom's ``negotiate_as_acceptor`` picks, for each proposed
#: context, the first of *these* that the context offers, so a sender that offers Explicit VR Little
#: Endian beside JPEG-LS gets Explicit VR Little Endian.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    DEFLATED,  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction (Process 14, SV1)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Lossy (Near-Lossless)
    "1.2.840.10008.1.2.4.91",  # JPEG 2000 (lossy or lossless)
    "1.2.840.10008.1.2.4.203",  # HTJ2K (lossy or lossless)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1), lossy
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4), lossy
)
_VERIFICATION = "1.2.840.10008.1.1"
_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

# A-ASSOCIATE-RJ (result, source, diagnostic)
_RJ_CALLING_AE = (0x01, 0x01, 0x03)
_RJ_CALLED_AE = (0x01, 0x01, 0x07)
_RJ_CONTEXT_NAME = (0x01, 0x01, 0x02)
_RJ_PROTOCOL = (0x01, 0x02, 0x02)
_RJ_LIMIT = (0x02, 0x03, 0x02)
_RJ_INVALID_UID = (0x01, 0x01, 0x01)
_RJ_REASONS = {
    _RJ_INVALID_UID: "a UID in the A-ASSOCIATE-RQ is not a UID",
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
_MAX_ASSOCIATE_RQ = 1 << 20  # bytes; a few kilobytes with every storage class offered


def storage_contexts(*, accept_deflated: bool = False) -> list[PresentationContext]:
    """What we accept: Verification, and every image storage class in :data:`TRANSFER_SYNTAXES` (the
    deflated one only when ``accept_deflated``)."""
    syntaxes = [ts for ts in TRANSFER_SYNTAXES if accept_deflated or ts != DEFLATED]
    contexts = [build_context(_VERIFICATION)]
    for uid in sorted(IMAGE_STORAGE_SOP_CLASSES):
        contexts.append(build_context(uid, syntaxes))
    return contexts


class Node(Protocol):
    """What an association needs of the SCP that serves it."""

    config: NodeConfig
    ssl_context: ssl.SSLContext | None
    contexts: list[PresentationContext]
    spool: Spool
    receiver: InstanceReceiver

    def over_limit(self, assoc: Association) -> bool:
        """Whether accepting ``assoc`` would exceed the association limit."""

    def ended(self, assoc: Association) -> None:
        """``assoc``'s socket is closed."""

    def audit_rejection(self, calling: str, called: str, host: str, reason: str) -> None: ...

    def audit_tls_refused(self, host: str, why: str) -> None: ...

    def audit_abort(self, calling: str, host: str, error: ul.ProtocolError, sop_instance: str | None) -> None:
        """We abort an association for ``error`` (while receiving ``sop_instance``, when one was)."""


class _Reply(NamedTuple):
    """A response to send: command field, status, an Error Comment, the Affected SOP Class to echo."""

    field: int
    status: int
    comment: str = ""
    class_uid: str | None = None

    @classmethod
    def none(cls) -> _Reply:
        """No response (to a response or a C-CANCEL, which are not answered)."""
        return cls(0, 0)


class _Message:
    """A DIMSE request whose data set is still arriving: checked by ``stream`` and written to ``sink``,
    or read and dropped once its reply is decided (when its command came: an operation we do not
    perform, a refusal; or on the way: the data set's content was refused). ``received``: data set bytes
    so far, as sent."""

    def __init__(self, context: PresentationContext, command: dict[int, bytes], sink: TempSink | None,
                 reply: _Reply | None = None) -> None:
        self.context = context
        self.command = command
        self.sink = sink
        self.reply = reply
        self.stream: DataSetStream | None = None
        self.received = 0


class Association:
    """One connection, from its first byte to its close, in its own thread."""

    def __init__(self, node: Node, sock: socket.socket, address: tuple[str, int], *, over_limit: bool) -> None:
        self.node = node
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
        self._received = 0  # bytes of commands and data sets so far
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
            sop_instance = None
            if self._message is not None:
                try:
                    sop_instance = validate_uid(self._message.command.get(0x1000), what="UID")
                except InvalidUID:
                    pass
            self.node.audit_abort(self.calling, self.host, exc, sop_instance)  # audited before the peer knows
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
            self.node.ended(self)

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
        s = self.node.config
        if self.node.ssl_context is not None:
            if not self._handshake(s.acse_timeout):
                return
        self.sock.settimeout(s.acse_timeout)
        reader = ul.Reader(self.sock)
        try:
            pdu_type, length = reader.pdu_header()
        except (ul.PeerClosed, TimeoutError, OSError):
            return  # a port probe, a health check, or a peer that said nothing: close quietly
        if pdu_type != ul.A_ASSOCIATE_RQ:
            raise ul.ProtocolError(f"PDU type 0x{pdu_type:02X} before A-ASSOCIATE-RQ", ul.ABORT_UNEXPECTED_PDU)
        if length > _MAX_ASSOCIATE_RQ:
            raise ul.ProtocolError(f"A-ASSOCIATE-RQ of {length} bytes, over {_MAX_ASSOCIATE_RQ}",
                                   code="pdu_too_long")
        body = reader.exact(length)
        if not self._negotiate(bytes([pdu_type, 0]) + length.to_bytes(4, "big") + body):
            return
        self.established = True
        self.sock.settimeout(s.network_timeout)
        while True:
            pdu_type, length = reader.pdu_header()
            if pdu_type == ul.P_DATA_TF:
                if length > s.max_pdu:
                    raise ul.ProtocolError(f"P-DATA-TF of {length} bytes, over the {s.max_pdu} we announced",
                                           code="pdu_too_long")
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
        ctx = self.node.ssl_context
        assert ctx is not None
        try:
            self.sock = ctx.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
            self.sock.settimeout(timeout)
            self.sock.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            self.node.audit_tls_refused(self.host, type(exc).__name__ + ": " + str(exc)[:200])
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
        s = self.node.config
        rsd: tuple[int, int, int] | None = None
        if not caller_allowed(s.allowed_callers, self.calling, self.host):
            rsd = _RJ_CALLING_AE
        elif s.require_called_ae and called != s.ae_title:
            rsd = _RJ_CALLED_AE
        elif not self._uids_valid(raw):
            rsd = _RJ_INVALID_UID
        elif str(rq.application_context_name) != _APPLICATION_CONTEXT:
            rsd = _RJ_CONTEXT_NAME
        elif not (int(getattr(pdu, "protocol_version", 1)) & 0x0001):
            rsd = _RJ_PROTOCOL
        elif self.over_limit or self.node.over_limit(self):
            rsd = _RJ_LIMIT
        if rsd is not None:
            self.node.audit_rejection(self.calling, called, self.host, _RJ_REASONS[rsd])  # audited before the peer knows
            self.send(ul.encode_reject(*rsd))
            return False

        roles: dict[Any, tuple[bool | None, bool | None]] = {}
        for item in rq.user_information:
            if isinstance(item, MaximumLengthNotification):
                self._peer_max_pdu = int(item.maximum_length_received or 0)
            elif isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid is not None:
                roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
        results, role_items = negotiate_as_acceptor(rq.presentation_context_definition_list,
                                                    self.node.contexts, roles or None)
        self._contexts = {int(cx.context_id): cx for cx in results if cx.result == 0x00}  # type: ignore[arg-type]
        ac = A_ASSOCIATE()
        ac.application_context_name = _APPLICATION_CONTEXT
        ac.calling_ae_title = rq.calling_ae_title
        ac.called_ae_title = rq.called_ae_title
        ac.result = 0x00
        ac.result_source = 0x01
        ac.presentation_context_definition_results_list = results
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = s.max_pdu
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

    def _uids_valid(self, raw: bytes) -> bool:
        """Whether every UID negotiation acts on is a UID, read from the A-ASSOCIATE-RQ's own bytes."""
        for what, value in ul.associate_rq_uids(raw):
            try:
                validate_uid(value, what=what)
            except InvalidUID as exc:
                log.warning("association from %r@%s rejected: %s", self.calling, self.host, exc)
                return False
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
            limits = self.node.config.limits
            self._received += n
            if self._received > limits.association_bytes:
                raise ul.ProtocolError(f"the association carries more than {limits.association_bytes} bytes",
                                       ul.ABORT_NOT_SPECIFIED, code="association_too_large")
            if control & 0x01:  # a command fragment
                if self._message is not None:
                    raise ul.ProtocolError("a command while a data set was still arriving", ul.ABORT_UNEXPECTED_PDU)
                if len(self._command) + n > limits.command_bytes:
                    raise ul.ProtocolError(f"command set over {limits.command_bytes} bytes", code="command_too_long")
                self._command += reader.exact(n)
                if control & 0x02:
                    command = ul.decode_command(bytes(self._command))
                    self._command.clear()
                    reply = self._attempt(context, command, partial(self._on_command, context, command))
                    if reply is not None:
                        self._respond(context, command, reply)
            else:  # a data set fragment
                message = self._message
                if message is None or message.context.context_id != context_id:
                    raise ul.ProtocolError("a data set fragment without its command", ul.ABORT_UNEXPECTED_PDU)
                message.received += n
                if message.received > limits.instance_bytes:
                    raise ul.ProtocolError(f"a data set of more than {limits.instance_bytes} bytes",
                                           ul.ABORT_NOT_SPECIFIED, code="instance_too_large")
                if message.sink is not None:
                    reader.stream(n, partial(self._data, message))
                else:
                    reader.skip(n)
                if control & 0x02:
                    self._message = None
                    reply = self._attempt(message.context, message.command, partial(self._on_data_set, message))
                    if reply is not None:
                        self._respond(message.context, message.command, reply)

    def _data(self, message: _Message, piece: memoryview) -> None:
        """A piece of a data set: checked, then written. A refusal of its content drops the rest."""
        if message.stream is not None:
            try:
                message.stream.feed(piece)
            except Refused as refusal:
                self._refuse_data_set(message, refusal)
                return
            except Exception as exc:  # noqa: BLE001 - the boundary: a bug refuses this message, not the peer
                log.exception("association from %r@%s: unexpected error checking a data set; answered 0xC000",
                              self.calling, self.host)
                self._refuse_data_set(message, Refused(CANNOT_UNDERSTAND, "internal_error",
                                                       f"unexpected error ({type(exc).__name__})"))
                return
        if message.sink is not None:
            message.sink.write(piece)

    def _refuse_data_set(self, message: _Message, refusal: Refused) -> None:
        """Refuse ``message`` on the way (audited now); the rest of its data set is read and dropped."""
        if message.sink is not None:
            message.sink.discard()
        message.sink = message.stream = None
        self.node.receiver.refuse(refusal.status, refusal.reason, refusal.detail,
                                  request_sop_class=ul.ui(message.command.get(0x0002)),
                                  request_sop_instance=ul.ui(message.command.get(0x1000)),
                                  calling_ae=self.calling, address=self.host)
        message.reply = _Reply(_C_STORE_RSP, refusal.status, f"{refusal.reason}: {refusal.detail}")

    # ----------------------------------------------------------------------------------- messages
    # Each DIMSE message is handled behind one boundary (as pynetdicom's ``service_class.attempt``):
    # handlers only decide a reply, they never touch the socket, so an exception in one is this
    # message's failure and not the association's. The spool refusing (full, read-only, no permission,
    # an I/O error) answers 0xA700, anything else 0xC000; both are audited and the association goes on.
    # Only transport failures (reading or sending on the socket) and protocol errors end it.
    def _attempt(self, context: PresentationContext, command: dict[int, bytes],
                 handler: Callable[[], _Reply | None]) -> _Reply | None:
        try:
            return handler()
        except OSError as exc:
            status, reason = OUT_OF_RESOURCES, "storage_refused"
            detail = f"the spool cannot store the instance: {exc.strerror or type(exc).__name__}"
            log.error("association from %r@%s: storage refused a message (%s)", self.calling, self.host, detail)
        except Exception as exc:  # noqa: BLE001 - the boundary: any bug answers this message, not the peer's
            status, reason = CANNOT_UNDERSTAND, "internal_error"
            detail = f"unexpected error ({type(exc).__name__})"
            log.exception("association from %r@%s: unexpected error handling a message; answered 0xC000",
                          self.calling, self.host)
        self.node.receiver.refuse(status, reason, detail, request_sop_class=ul.ui(command.get(0x0002)),
                                  request_sop_instance=ul.ui(command.get(0x1000)), calling_ae=self.calling,
                                  address=self.host)
        field = ul.us(command.get(0x0100)) or 0
        reply = _Reply(field | 0x8000, status, f"{reason}: {detail}")
        if self._message is not None and self._message.command is command:  # its data set is still to come
            if self._message.sink is not None:
                self._message.sink.discard()
            self._message = _Message(context, command, None, reply)
            return None
        return reply

    def _on_command(self, context: PresentationContext, command: dict[int, bytes]) -> _Reply | None:
        field = ul.us(command.get(0x0100))
        has_data = ul.us(command.get(0x0800)) != _NO_DATA_SET
        if field == _C_STORE_RQ and has_data:
            try:
                rq_class = validate_uid(command.get(0x0002), what="Affected SOP Class UID")
                rq_instance = validate_uid(command.get(0x1000), what="Affected SOP Instance UID")
            except InvalidUID as exc:  # refused now; its data set is read and dropped, then answered
                self._message = _Message(context, command, None)
                self._refuse_data_set(self._message, Refused(CANNOT_UNDERSTAND, "invalid_uid", str(exc)))
                return None
            syntax = str(context.transfer_syntax[0])
            prefix = file_meta(rq_class, rq_instance, syntax, self.calling)
            self._message = _Message(context, command, None)  # set first: the boundary sees a data set coming
            self._message.stream = DataSetStream(syntax, self.node.config.limits)
            self._message.sink = TempSink(self.node.spool.tmp_dir, prefix)
            return None
        if field == _C_ECHO_RQ and not has_data:
            return _Reply(_C_ECHO_RSP, SUCCESS, class_uid=_VERIFICATION)
        if field == _C_STORE_RQ:
            return _Reply(_C_STORE_RSP, CANNOT_UNDERSTAND, "no data set")
        if field is None or field & 0x8000 or field == _C_CANCEL_RQ:
            log.info("association from %r@%s: DIMSE command 0x%04X ignored", self.calling, self.host, field or 0)
            if has_data:
                self._message = _Message(context, command, None, _Reply.none())
            return None
        if has_data:  # an operation we do not perform: its data set is read and dropped, then answered
            self._message = _Message(context, command, None, _Reply(field | 0x8000, _UNRECOGNISED_OPERATION))
            return None
        return _Reply(field | 0x8000, _UNRECOGNISED_OPERATION)

    def _on_data_set(self, message: _Message) -> _Reply | None:
        if message.reply is not None:  # decided when its command came
            return None if message.reply.field == 0 else message.reply
        sink = message.sink
        assert sink is not None
        command = message.command
        # checked when the command came (validate_uid): here only to be passed on
        rq_class = validate_uid(command.get(0x0002), what="Affected SOP Class UID")
        rq_instance = validate_uid(command.get(0x1000), what="Affected SOP Instance UID")
        stream = message.stream
        assert stream is not None
        try:
            stream.finish()
        except Refused as refusal:
            self._refuse_data_set(message, refusal)
            return message.reply
        if sink.error is not None:
            outcome = self.node.receiver.refuse(OUT_OF_RESOURCES, "disk_write_failed",
                                                f"cannot write the data set: {sink.error.strerror}",
                                                request_sop_class=rq_class, request_sop_instance=rq_instance,
                                                calling_ae=self.calling, address=self.host)
        else:
            received = replace(sink.finish(), dataset_length=stream.length, header=stream.header())
            outcome = self.node.receiver.receive(
                sink.path, request_sop_class=rq_class, request_sop_instance=rq_instance,
                transfer_syntax=str(message.context.transfer_syntax[0]), calling_ae=self.calling,
                address=self.host, received=received)
        return _Reply(_C_STORE_RSP, outcome.status, "" if outcome.ok else f"{outcome.reason}: {outcome.detail}")

    def _respond(self, context: PresentationContext, command: dict[int, bytes], reply: _Reply) -> None:
        elements: list[tuple[int, str, int | str | bytes]] = [
            (0x0100, "US", reply.field), (0x0120, "US", ul.us(command.get(0x0110)) or 0),
            (0x0800, "US", _NO_DATA_SET), (0x0900, "US", reply.status)]
        # The affected UIDs are echoed when they are UIDs (a response may leave them out, PS3.7 9.3.1.2)
        for elem, value in ((0x0002, reply.class_uid or command.get(0x0002)), (0x1000, command.get(0x1000))):
            try:
                elements.append((elem, "UI", validate_uid(value, what="UID")))
            except InvalidUID:
                pass
        if reply.comment:
            text = reply.comment.encode("ascii", errors="replace").replace(b"\\", b"/")[:64]
            elements.append((0x0902, "LO", text))
        self.send(ul.encode_pdata(int(context.context_id), True, ul.encode_command(elements),  # type: ignore[arg-type]
                                  self._peer_max_pdu))
