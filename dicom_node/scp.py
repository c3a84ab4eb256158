"""The Storage SCP: C-ECHO and C-STORE, with the allow-list, TLS and bounded associations.

::

    scp = StoreSCP(config, sessions)      # no I/O yet
    scp.start()                           # binds the port, serves in background threads
    ...
    scp.stop()

One thread per :class:`dicom_node.association.Association`, blocking sockets. Connections come from the
SCP's own listening socket, or, in a receiver process of ``specgate scp``, from the listener through a
:class:`dicom_node.handoff.HandoffReceiver` (``handoff=``). Either way the SCP owns the set of live
associations, counts them, audits what it refuses at the association level, and stops them all.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from ledger import audit
from ledger.db import DatabaseUnavailable, session_scope

from . import ul
from .association import IMAGE_STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, Association, storage_contexts
from .config import NodeConfig
from .handoff import HandoffReceiver, accept_until, bind_port, close_listening
from .receive import InstanceReceiver
from .security import server_ssl_context
from .sink import IMPLEMENTATION_CLASS_UID
from .spool import Spool

if TYPE_CHECKING:  # prometheus_client is imported only by a process that counts (multiprocess mode)
    from .prometheus import NodeMetrics

__all__ = ["IMAGE_STORAGE_SOP_CLASSES", "IMPLEMENTATION_CLASS_UID", "TRANSFER_SYNTAXES", "StoreSCP",
           "storage_contexts"]

log = logging.getLogger("specgate.dicom_node.scp")


class StoreSCP:
    """specgate's SCP."""

    def __init__(self, config: NodeConfig, sessions: sessionmaker[Session], *, spool: Spool | None = None,
                 on_stored: Callable[[int, str], None] | None = None, handoff: socket.socket | None = None,
                 metrics: NodeMetrics | None = None) -> None:
        """``handoff``: run as a receiver process of :class:`dicom_node.handoff.Listener`, taking
        connections from this socket pair instead of listening on ``config.host:config.port`` itself.
        ``metrics``: count instances received and refused, and associations rejected."""
        self.config = config
        self.sessions = sessions
        self.metrics = metrics
        self.spool = spool or Spool(config.spool_dir, watermark_percent=config.spool_watermark_percent)
        self.receiver = InstanceReceiver(self.spool, sessions, image_sop_classes=IMAGE_STORAGE_SOP_CLASSES,
                                         on_stored=on_stored, metrics=metrics, data_dir=config.data_dir,
                                         remote_store=(config.store is not None and config.store.kind != "fs"))
        self.contexts = storage_contexts(accept_deflated=config.accept_deflated)
        self.ssl_context: ssl.SSLContext | None = None
        self.handoff = None if handoff is None else HandoffReceiver(handoff, self._serve, self._load)
        self._sock: socket.socket | None = None
        self._accept: threading.Thread | None = None
        self._live: set[Association] = set()
        self._lock = threading.Lock()
        self._received = 0  # connections handed over so far (receiver process)
        self._stopping = threading.Event()

    # ----------------------------------------------------------------------------------- control
    @property
    def address(self) -> tuple[str, int]:
        """Where the SCP listens (a receiver process: the node's configured address)."""
        if self.handoff is not None:
            return self.config.host, self.config.port
        if self._sock is None:
            raise RuntimeError("the SCP is not started")
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> StoreSCP:
        c = self.config
        self.spool.open()
        self.ssl_context = server_ssl_context(c.tls)
        if self.handoff is not None:
            self.handoff.start()
        else:
            self._listen()
        log.info("SCP %s %s %s:%d (TLS %s, max %d associations)", c.ae_title,
                 "receiving for" if self.handoff else "listening on", *self.address,
                 "on" if self.ssl_context else "off", c.max_associations)
        return self

    def _listen(self) -> None:
        c = self.config
        sock = self._sock = bind_port(c.host, c.port)
        self._accept = threading.Thread(
            target=accept_until, args=(sock, self._stopping, lambda client, _address: self._serve(client, False)),
            name="specgate-scp-accept", daemon=True)
        self._accept.start()

    def _serve(self, client: socket.socket, over_limit: bool) -> None:
        """A connection to serve, from our accept loop or handed over. It counts as handed over (for the
        listener's arithmetic) even when it is gone before it is served."""
        try:
            address: Any = client.getpeername()
            client.setblocking(True)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # gone already: the accept loop must not end with it
            log.info("a connection closed before it was served: %s", exc)
            client.close()
            with self._lock:
                self._received += 1
            return
        assoc = Association(self, client, address, over_limit=over_limit)
        with self._lock:
            self._live.add(assoc)
            self._received += 1
        assoc.thread.start()

    def _load(self) -> tuple[int, int]:
        with self._lock:
            return len(self._live), self._received

    # ------------------------------------------------------------------- what an association asks
    def ended(self, assoc: Association) -> None:
        with self._lock:
            self._live.discard(assoc)
        if self.handoff is not None:
            self.handoff.report()  # at once, not at the next tick: the listener's count is the limit

    def over_limit(self, assoc: Association) -> bool:
        if self.handoff is not None:  # the listener counts for the node and marked the connection
            return False
        with self._lock:
            others = sum(1 for a in self._live if a is not assoc)
        return others >= self.config.max_associations

    def audit_rejection(self, calling: str, called: str, host: str, reason: str) -> None:
        log.warning("association from %r@%s (called %r) rejected: %s", calling, host, called, reason)
        if self.metrics is not None:
            self.metrics.association_rejected(reason)
        self._audit(actor=calling or "unknown", action="association.rejected", object_id=host,
                    details={"calling_ae": calling, "called_ae": called, "address": host, "reason": reason})

    def audit_tls_refused(self, host: str, why: str) -> None:
        log.warning("TLS handshake from %s refused: %s", host, why)
        if self.metrics is not None:
            self.metrics.association_rejected("tls_handshake")
        self._audit(actor="unknown", action="association.tls_refused", object_id=host,
                    details={"address": host, "reason": why})

    def audit_abort(self, calling: str, host: str, error: ul.ProtocolError, sop_instance: str | None) -> None:
        """An association we abort: a broken protocol or a bound passed (``error.code``), with the C-STORE
        it cut short when there was one."""
        if self.metrics is not None:
            self.metrics.association_aborted(error.code)
        self._audit(actor=calling or "unknown", action="association.aborted", object_id=host,
                    details={"calling_ae": calling, "address": host, "reason": error.code, "detail": str(error),
                             "abort": f"0x02/0x{error.reason:02X}", "sop_instance_uid": sop_instance})

    def _audit(self, *, actor: str, action: str, object_id: str, details: dict[str, Any]) -> None:
        try:
            with session_scope(self.sessions) as s:
                audit.append(s, actor=actor, action=action, object_type="association", object_id=object_id,
                             details=details)
        except DatabaseUnavailable as exc:
            log.error("could not audit %s (ledger unavailable): %s", action, exc)

    # -------------------------------------------------------------------------------------- state
    def established_associations(self) -> int:
        with self._lock:
            return sum(1 for a in self._live if a.established)

    def active_associations(self) -> int:
        with self._lock:
            return len(self._live)

    def wait_parent_gone(self, timeout: float | None = None) -> bool:
        """In a receiver process: block until the listener closed its end (it stopped or died)."""
        assert self.handoff is not None
        return self.handoff.parent_gone.wait(timeout)

    def drain(self, timeout: float) -> int:
        """Stop accepting (the port closes: a new connection is refused) and wait up to ``timeout`` seconds
        for the open associations to end as their peers release them; returns how many are still open.
        ``specgate scp`` does this on SIGTERM before :meth:`stop`, which aborts what is left. A receiver
        process drains through the listener instead (:class:`dicom_node.handoff.Listener`)."""
        self._stopping.set()
        close_listening(self._sock)
        deadline = time.monotonic() + timeout
        while (left := self.active_associations()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return left

    def stop(self) -> None:
        self._stopping.set()
        close_listening(self._sock)
        if self.handoff is not None:
            self.handoff.stop()
        with self._lock:
            live = list(self._live)
        for assoc in live:
            assoc.abort()
        for assoc in live:
            assoc.thread.join(timeout=10)
        if self._accept is not None:
            self._accept.join(timeout=10)
        self.receiver.close()

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
