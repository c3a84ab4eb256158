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


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server, with three changes made by overriding its documented hooks.

    * ``TCP_NODELAY`` on every accepted socket (small PDUs such as C-STORE responses are not held back
      by Nagle's algorithm);
    * the TLS handshake runs in the association's own thread with the ACSE timeout, not in the accept
      loop: a client that connects and stays silent cannot stop everyone else from connecting;
    * a failed handshake (no or untrusted client certificate) is audited and the connection closed.
    """

    def __init__(self, *args: Any, handshake_timeout: float, on_tls_refused: Callable[[str, str], None],
                 **kwargs: Any) -> None:
        self._handshake_timeout = handshake_timeout
        self._on_tls_refused = on_tls_refused
        super().__init__(*args, **kwargs)
        self.daemon_threads = True

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
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
                 on_stored: Callable[[int, str], None] | None = None) -> None:
        self.settings = settings
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
        ae.maximum_associations = s.scp_max_associations
        ae.acse_timeout = s.scp_acse_timeout
        ae.dimse_timeout = s.scp_dimse_timeout
        ae.network_timeout = s.scp_network_timeout
        ae.maximum_pdu_size = s.scp_max_pdu
        ae.require_called_aet = s.scp_require_called_ae
        ae.require_calling_aet = []  # the allow-list (AE *and* host) is checked in _on_requested
        ae.supported_contexts = storage_contexts()
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        # Built as AE.start_server() builds it, but with the _Server subclass above.
        server = _Server(ae, (s.scp_host, s.scp_port), ae.ae_title, ae.supported_contexts,
                         ssl_context=server_ssl_context(s), evt_handlers=handlers,
                         handshake_timeout=s.scp_acse_timeout, on_tls_refused=self._on_tls_refused)
        self._ae, self._server = ae, server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="specgate-scp-accept", daemon=True)
        self._thread.start()
        log.info("SCP %s listening on %s:%d (TLS %s, max %d associations)", s.scp_ae_title, *self.address,
                 "on" if s.tls_enabled else "off", s.scp_max_associations)
        return self

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
        elif self._ae is not None and sum(1 for a in self._ae.active_associations if a.is_acceptor) \
                > self.settings.scp_max_associations:
            rsd = _RJ_LIMIT
        if rsd is None:
            return
        self._audit_rejection(calling, called, host, rsd)
        event.assoc.acse.send_reject(*rsd)
        event.assoc.kill()

    def _on_rejected(self, event: evt.Event) -> None:
        # pynetdicom's own rejections (its checks stay on behind ours in _on_requested).
        calling, called, host = self._peer(event)
        prim = event.assoc.acceptor.primitive
        rsd = (prim.result, prim.result_source, prim.diagnostic) if prim is not None else (0, 0, 0)
        self._audit_rejection(calling, called, host, rsd)

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
