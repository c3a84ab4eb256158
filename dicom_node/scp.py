"""The Storage SCP: C-ECHO and C-STORE over pynetdicom, with the allow-list, TLS and bounded associations.

::

    scp = StoreSCP(settings, sessions)      # no I/O yet
    scp.start()                             # binds the port, serves in a background thread
    ...
    scp.stop()

The network glue only: what a received instance becomes is decided by :class:`dicom_node.receive.Receiver`.

pynetdicom keeps some configuration in its module ``pynetdicom._config`` and the temporary-file folder is
the module-level ``tempfile.tempdir``; both are process-global. :func:`configure_pynetdicom` sets them once,
when an SCP starts, and one ``specgate scp`` process runs one SCP. What it sets, and why:

* ``STORE_RECV_CHUNKED_DATASET = True``: a dataset is written to a file while it arrives, fragment by
  fragment, so memory stays bounded for a 500 MB multi-frame and the bytes are stored exactly as sent
  (no decode/re-encode);
* ``tempfile.tempdir = <spool>/tmp``: that file is created in the spool's file system, so making it
  durable is an fsync and a link, never a copy, and nothing is written outside the spool;
* ``LOG_HANDLER_LEVEL = "none"``, ``LOG_REQUEST_IDENTIFIERS = LOG_RESPONSE_IDENTIFIERS = False``:
  pynetdicom otherwise logs every PDU and the identifiers of queries, which can carry patient names/IDs.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom import sop_class as _sop_class
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from ledger import audit
from ledger.db import DatabaseUnavailable, session_scope
from specgate.settings import Settings

from .receive import CANNOT_UNDERSTAND, SUCCESS, Receiver
from .security import caller_allowed, normalise_host, server_ssl_context
from .spool import Spool

__all__ = ["IMAGE_STORAGE_SOP_CLASSES", "TRANSFER_SYNTAXES", "StoreSCP", "configure_pynetdicom"]

log = logging.getLogger("specgate.dicom_node.scp")

#: Every "... Image Storage" SOP class pynetdicom knows (CT, MR, Enhanced CT/MR, PET, XA, ...).
IMAGE_STORAGE_SOP_CLASSES: frozenset[str] = frozenset(
    str(getattr(_sop_class, name)) for name in dir(_sop_class) if "ImageStorage" in name
)
#: Transfer syntaxes accepted: uncompressed, deflated, and RLE/JPEG lossless that pydicom decodes.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
_VERIFICATION = "1.2.840.10008.1.1"

# A-ASSOCIATE-RJ (result, source, diagnostic)
_RJ_CALLING_AE = (0x01, 0x01, 0x03)
_RJ_CALLED_AE = (0x01, 0x01, 0x07)
_RJ_LIMIT = (0x02, 0x03, 0x02)
_RJ_REASONS = {
    (0x01, 0x01, 0x03): "calling AE title not recognised",
    (0x01, 0x01, 0x07): "called AE title not recognised",
    (0x02, 0x03, 0x02): "local limit exceeded (too many associations)",
}


_GLOBALS = ("LOG_HANDLER_LEVEL", "LOG_REQUEST_IDENTIFIERS", "LOG_RESPONSE_IDENTIFIERS",
            "STORE_RECV_CHUNKED_DATASET")


def configure_pynetdicom(spool: Spool) -> dict[str, Any]:
    """Set pynetdicom's process-global configuration for an SCP (see the module docstring).

    Returns the previous values, for :func:`restore_pynetdicom`.
    """
    previous: dict[str, Any] = {name: getattr(_config, name) for name in _GLOBALS}
    previous["tempfile.tempdir"] = tempfile.tempdir
    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.STORE_RECV_CHUNKED_DATASET = True
    tempfile.tempdir = str(spool.tmp_dir)
    # pynetdicom's own logger: warnings and errors only; its INFO/DEBUG lines describe every message.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    return previous


def restore_pynetdicom(previous: dict[str, Any]) -> None:
    tempfile.tempdir = previous.pop("tempfile.tempdir")
    for name, value in previous.items():
        setattr(_config, name, value)


def storage_contexts() -> list[PresentationContext]:
    contexts = [build_context(_VERIFICATION)]
    for uid in sorted(IMAGE_STORAGE_SOP_CLASSES):
        contexts.append(build_context(uid, list(TRANSFER_SYNTAXES)))
    return contexts


def _is_open(assoc: Any) -> bool:
    """Does this association thread still hold a connection? pynetdicom keeps the thread of a connection
    that closed before its A-ASSOCIATE-RQ (a port probe, a health check) alive until the ACSE timeout;
    its DUL state machine is back in Sta1 (idle) by then, and it must not count against the limit."""
    if not assoc.is_alive() or assoc.is_released or assoc.is_aborted or assoc.is_rejected:
        return False
    return getattr(getattr(assoc.dul, "state_machine", None), "current_state", "") != "Sta1"


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server, with three changes made by overriding its documented hooks.

    * ``TCP_NODELAY`` on every accepted socket (small PDUs such as C-STORE responses are not held back
      by Nagle's algorithm);
    * the TLS handshake runs in the association's own thread with the ACSE timeout, not in the accept
      loop: a client that connects and stays silent cannot stop everyone else from connecting;
    * a failed handshake (no or untrusted client certificate) is audited and the connection closed.
    """

    def __init__(self, *args: Any, handshake_timeout: float, on_tls_refused: Callable[[str, str], None],
                 handoff: socket.socket | None = None, **kwargs: Any) -> None:
        self._handshake_timeout = handshake_timeout
        self._on_tls_refused = on_tls_refused
        self._handoff = handoff
        self._handoff_lock = threading.Lock()
        self.over_limit: set[tuple[str, int]] = set()
        self.parent_gone = threading.Event()
        self.received = 0  # connections handed over so far
        self._inflight = 0  # received, association thread not started yet
        super().__init__(*args, **kwargs)
        self.daemon_threads = True

    # In a receiver process (see dicom_node.listener) connections arrive over a socket pair from the
    # parent instead of from accept(): the server "listens" on that socket pair.
    def server_bind(self) -> None:
        if self._handoff is None:
            super().server_bind()
            return
        assert self.socket is not None
        self.socket.close()
        self.socket = self._handoff

    def server_activate(self) -> None:
        if self._handoff is None:
            super().server_activate()

    def _receive_handoff(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self._handoff is not None
        msg, fds, _flags, _addr = socket.recv_fds(self._handoff, 16, 1)
        if not fds:
            self.parent_gone.set()
            raise OSError("the listener process closed its end")  # socketserver ignores OSError here
        client = socket.socket(fileno=fds[0])
        with self._handoff_lock:
            self.received += 1
            self._inflight += 1
        client.setblocking(True)
        host, port = client.getpeername()[:2]
        if msg == b"L":  # dicom_node.listener.HANDOFF_OVER_LIMIT
            self.over_limit.add((normalise_host(str(host)), int(port)))
        return client, (str(host), int(port))

    def report_load(self) -> None:
        """Tell the listener how many connections this process has open, and how many it was given so
        far (absolute numbers: a lost message or a connection pynetdicom forgets to close cannot make the
        listener's count drift)."""
        assert self._handoff is not None
        open_now = self._inflight + sum(1 for a in self.active_associations if _is_open(a))
        try:
            self._handoff.send(f"{open_now} {self.received}\n".encode())
        except OSError:
            pass

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        if self._handoff is not None:
            client, address = self._receive_handoff()
        else:
            client, address = self.socket.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            self._process(request, client_address)
        finally:
            if self._handoff is not None:
                with self._handoff_lock:
                    self._inflight -= 1

    def _process(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(self._handshake_timeout)
                request.do_handshake()
                request.settimeout(None)
            except (ssl.SSLError, OSError) as exc:
                self._on_tls_refused(str(client_address[0]), type(exc).__name__ + ": " + str(exc)[:200])
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)

    def shutdown(self) -> None:  # not registered with the AE (see StoreSCP.start); close our own socket
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class StoreSCP:
    """specgate's SCP. One per process (pynetdicom's configuration is global, see the module docstring)."""

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
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._ae: AE | None = None
        self._previous_config: dict[str, Any] | None = None

    # ----------------------------------------------------------------------------------- control
    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("the SCP is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> StoreSCP:
        s = self.settings
        self.spool.open()
        self._previous_config = configure_pynetdicom(self.spool)
        ae = AE(ae_title=s.scp_ae_title)
        # The limit is enforced in _on_requested (open associations only, see _is_open; the listener's
        # count across processes). pynetdicom's own check also counts threads of connections that are
        # already gone, so it stays on only as a looser safety net.
        ae.maximum_associations = 2 * s.scp_max_associations + 16
        ae.acse_timeout = s.scp_acse_timeout
        ae.dimse_timeout = s.scp_dimse_timeout
        ae.network_timeout = s.scp_network_timeout
        ae.maximum_pdu_size = s.scp_max_pdu
        ae.require_called_aet = s.scp_require_called_ae
        ae.require_calling_aet = []  # the allow-list (AE *and* host) is checked in _on_requested
        ae.supported_contexts = storage_contexts()
        handlers = [
            (evt.EVT_RELEASED, self._on_ended),
            (evt.EVT_ABORTED, self._on_ended),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        # Built as AE.start_server() builds it, but with the _Server subclass above.
        server = _Server(ae, (s.scp_host, s.scp_port), ae.ae_title, ae.supported_contexts,
                         ssl_context=server_ssl_context(s), evt_handlers=handlers,
                         handshake_timeout=s.scp_acse_timeout, on_tls_refused=self._on_tls_refused,
                         handoff=self.handoff)
        self._ae, self._server = ae, server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="specgate-scp-accept", daemon=True)
        self._thread.start()
        if self.handoff is not None:
            self._reporter = threading.Thread(target=self._report_loop, name="specgate-scp-load", daemon=True)
            self._reporter.start()
        log.info("SCP %s %s %s:%d (TLS %s, max %d associations)", s.scp_ae_title,
                 "receiving for" if self.handoff else "listening on", *self.address,
                 "on" if s.tls_enabled else "off", s.scp_max_associations)
        return self

    def _report_loop(self) -> None:
        server = self._server
        while server is not None and not server.parent_gone.wait(0.05):
            server.report_load()

    def established_associations(self) -> int:
        return sum(1 for a in self._ae.active_associations if a.is_established) if self._ae is not None else 0

    def wait_parent_gone(self, timeout: float | None = None) -> bool:
        """In a receiver process: block until the listener closed its end (it stopped or died)."""
        assert self._server is not None
        return self._server.parent_gone.wait(timeout)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._ae is not None:
            for assoc in self._ae.active_associations:
                assoc.abort()
            self._ae = None
        if self._previous_config is not None:
            restore_pynetdicom(self._previous_config)
            self._previous_config = None

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def active_associations(self) -> int:
        return len(self._ae.active_associations) if self._ae is not None else 0

    # ---------------------------------------------------------------------------------- handlers
    def _peer(self, event: evt.Event) -> tuple[str, str, str]:
        rq = event.assoc.requestor
        prim = rq.primitive
        # The A-ASSOCIATE-RQ's titles: rq.ae_title is only filled in once negotiation has begun.
        calling = str(prim.calling_ae_title).strip() if prim is not None else str(rq.ae_title).strip()
        called = str(prim.called_ae_title).strip() if prim is not None else ""
        return calling, called, normalise_host(str(rq.address))

    def _on_requested(self, event: evt.Event) -> None:
        """Decide on an A-ASSOCIATE-RQ before pynetdicom negotiates it: the allow-list (calling AE *and*
        address), the called AE title, and the association limit. The audit row is written before the
        rejection is sent, so it exists by the time the peer knows."""
        calling, called, host = self._peer(event)
        rsd: tuple[int, int, int] | None = None
        if not caller_allowed(self.settings.allowed_callers, calling, host):
            rsd = _RJ_CALLING_AE
        elif self.settings.scp_require_called_ae and called != self.settings.scp_ae_title:
            rsd = _RJ_CALLED_AE
        elif self._over_limit(event):
            rsd = _RJ_LIMIT
        if rsd is None:
            return
        self._audit_rejection(calling, called, host, rsd)
        event.assoc.acse.send_reject(*rsd)
        event.assoc.kill()
        self._on_ended(event)

    def _over_limit(self, event: evt.Event) -> bool:
        if self.handoff is not None and self._server is not None:  # the listener counts for the node
            key = (normalise_host(str(event.assoc.requestor.address)), int(event.assoc.requestor.port))
            if key in self._server.over_limit:
                self._server.over_limit.discard(key)
                return True
            return False
        return self._ae is not None and sum(1 for a in self._ae.active_associations
                                            if a.is_acceptor and _is_open(a)) > self.settings.scp_max_associations

    def _on_ended(self, event: evt.Event) -> None:
        if self.handoff is not None and self._server is not None:
            self._server.report_load()  # at once, not at the next tick: the listener's count is the limit

    def _on_rejected(self, event: evt.Event) -> None:
        # pynetdicom's own rejections (its checks stay on behind ours in _on_requested).
        calling, called, host = self._peer(event)
        prim = event.assoc.acceptor.primitive
        rsd = (prim.result, prim.result_source, prim.diagnostic) if prim is not None else (0, 0, 0)
        self._audit_rejection(calling, called, host, rsd)
        self._on_ended(event)

    def _audit_rejection(self, calling: str, called: str, host: str, rsd: tuple[Any, ...]) -> None:
        key = (int(rsd[0]), int(rsd[1]), int(rsd[2]))
        reason = _RJ_REASONS.get(key, f"rejected {key}")
        log.warning("association from %r@%s (called %r) rejected: %s", calling, host, called, reason)
        self._audit(actor=calling or "unknown", action="association.rejected", object_id=host,
                    details={"calling_ae": calling, "called_ae": called, "address": host, "reason": reason})

    def _on_tls_refused(self, host: str, why: str) -> None:
        host = normalise_host(host)
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

    def _on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _on_store(self, event: evt.Event) -> Dataset:
        req = cast(C_STORE, event.request)
        calling, _, host = self._peer(event)
        rsp = Dataset()
        if event.dataset_path is None:  # a C-STORE-RQ that said it carries no data set
            rsp.Status = CANNOT_UNDERSTAND
            rsp.ErrorComment = "no data set"
            return rsp
        outcome = self.receiver.receive(
            Path(event.dataset_path), request_sop_class=str(req.AffectedSOPClassUID),
            request_sop_instance=str(req.AffectedSOPInstanceUID),
            transfer_syntax=str(event.context.transfer_syntax), calling_ae=calling, address=host)
        rsp.Status = outcome.status
        if not outcome.ok:
            rsp.ErrorComment = f"{outcome.reason}: {outcome.detail}"[:64]
        return rsp
