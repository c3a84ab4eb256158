"""Sending results: C-STORE a DICOM-SEG to each destination, with retries and back-off; C-ECHO a peer.

A destination is reached the way its kind says (:func:`send`): C-STORE on one association (over TLS 1.2+
when it names a ``tls_ca``: :func:`tls_context`; a handshake that fails ends the attempt with a reason that
names it, ``tls_verify_failed: ...``), or STOW-RS to a DICOMweb server (:mod:`dicom_node.dicomweb`). The
rows, claim, retries, back-off and audit below are the same for both.

The worker calls :func:`deliver` once a result may be sent (released by the gate, or approved)::

    outcomes = deliver(sessions, result_id, settings.destinations, actor="worker",
                       retry_policy=settings.retry_policy())

Every destination has one ``deliveries`` row per result (unique), which records the attempts, the last
status and the state; ``sent`` only when the peer answered 0x0000. A row already ``sent`` is never sent
again (idempotent), and a row another process is sending right now is left to it: its sender refreshes
it while it works, and a ``sending`` row not refreshed for the SCU timeout was left by a process that died
(after the PACS answered and before the answer was written down, say) and is taken over. The resend is
the same object, under the same SOP Instance UID, and a PACS answers success for an object it holds.
A warning status (0x0001, 0xBxxx: stored with coercion, elements discarded...) is recorded and not
counted as sent: a person has to look. A permanent refusal (association rejected permanent, e.g. our AE
not recognised; no presentation context; a 0xA9xx/0xCxxx failure, which the same bytes will get again)
stops at once.
Connection failures, transient rejections, aborts, timeouts and 0xA7xx (out of resources) are retried
with exponential back-off up to the policy's limit, then ``failed``. Every wait of an attempt is bounded
by the policy's ``timeout_s``, the socket's reads and writes included: a destination that accepts the
association and then neither reads nor answers ends the attempt, it does not hang the worker.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.association import Association
from sqlalchemy import Update, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from ledger import audit, shadow
from ledger.db import session_scope
from ledger.leases import LeaseRefresher
from ledger.schema import Delivery, DeliveryState, Result, Retraction, RetractionDelivery, utcnow
from ledger.sql import insert_ignore
from store import Store, as_store

from . import dicomweb
from .attempt import EchoResult, SendResult
from .config import Destination
from .security import client_ssl_context, tls_reason

__all__ = ["AttemptObserver", "DeliveryOutcome", "EchoResult", "RetryPolicy", "SendResult", "deliver",
           "deliver_retraction", "echo", "send", "send_files", "tls_context"]

log = logging.getLogger("specgate.dicom_node.scu")
_VERIFICATION = "1.2.840.10008.1.1"
# A-ASSOCIATE-RJ (source, diagnostic) -> words
_REJECT_REASONS = {(1, 3): "calling AE title not recognised", (1, 7): "called AE title not recognised",
                   (3, 2): "local limit exceeded", (3, 1): "temporary congestion"}

#: Told after every C-STORE attempt, as soon as its answer is known: (destination name, sent, gave up:
#: no attempt follows). The worker counts attempts and failures with it (:mod:`worker.prometheus`).
AttemptObserver = Callable[[str, bool, bool], None]


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts per destination and the waits between them: ``backoff_s * 2**(n-1)``, capped."""

    max_attempts: int = 5
    backoff_s: float = 2.0
    backoff_max_s: float = 300.0
    ae_title: str = "SPECGATE"
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.backoff_s < 0 or self.backoff_max_s < 0:
            raise ValueError(f"back-off must not be negative, got {self.backoff_s}/{self.backoff_max_s}")

    @property
    def sending_stale_s(self) -> float:
        """A row ``sending`` whose ``updated_at`` is older than this was left by a process that died: the
        SCU timeout. A live sender refreshes its row every :attr:`sending_refresh_s` (its attempts and the
        back-off waits between them included), so it never looks this old."""
        return self.timeout_s

    @property
    def sending_refresh_s(self) -> float:
        return self.timeout_s / 3

    def wait_before(self, attempt: int) -> float:
        """Seconds to wait before attempt number ``attempt`` (1-based; 0 before the first)."""
        if attempt <= 1:
            return 0.0
        return min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 2))


@dataclass(frozen=True)
class DeliveryOutcome:
    destination: str
    state: DeliveryState
    attempts: int
    last_status: int | None
    error: str | None = None
    already_sent: bool = False
    busy: bool = False  # another process is sending this delivery now

    @property
    def sent(self) -> bool:
        return self.state == DeliveryState.SENT


def _classify_status(status: int) -> SendResult:
    if status == 0x0000:
        return SendResult(status, None, False)
    if status == 0x0001 or 0xB000 <= status <= 0xBFFF:
        return SendResult(status, f"peer answered warning 0x{status:04X}; stored with changes, check it", True)
    if 0xA700 <= status <= 0xA7FF:
        return SendResult(status, f"peer out of resources (0x{status:04X})", False)
    return SendResult(status, f"peer refused the object (0x{status:04X})", True)


def _bound_socket(event: evt.Event) -> None:
    """Give the connected socket the network timeout back. pynetdicom connects with a timeout and then
    clears it (``AssociationSocket.connect``), so a peer that accepts the association and then stops
    reading (or stops in the middle of a PDU) would block the sending thread in ``socket.send``/``recv``
    for ever: the DIMSE and ACSE timeouts only bound waits for a *whole* message. With the timeout, a
    write or read that makes no progress for ``timeout_s`` closes the transport (pynetdicom's Evt17),
    the attempt fails and is retried like any other."""
    transport = event.assoc.dul.socket
    if transport is not None and transport.socket is not None:
        transport.socket.settimeout(event.assoc.network_timeout)


def tls_context(dest: Destination) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for ``dest``: a TLS 1.2+ client context trusting its ``tls_ca`` (with its
    client certificate for mutual TLS) that checks the peer's certificate names ``dest.host`` (unless
    ``tls_verify_hostname`` is off), and that host name; None for a destination without TLS."""
    if not dest.tls or dest.tls_ca is None:
        return None
    ctx = client_ssl_context(dest.tls_ca, dest.tls_cert, dest.tls_key, check_hostname=dest.tls_verify_hostname)
    return ctx, dest.host


def _recording_handshake(ctx: ssl.SSLContext) -> list[ssl.SSLError]:
    """The TLS errors of connections made with ``ctx``, kept for the attempt's reason: pynetdicom catches
    the handshake's ``ssl.SSLError`` in ``AssociationSocket.connect`` (and a TLS alert that arrives later,
    in its reader thread) and only logs it. The hook is the standard library's own
    (``SSLContext.sslsocket_class``: the class ``wrap_socket`` makes)."""
    errors: list[ssl.SSLError] = []

    class _Recording(ssl.SSLSocket):
        def connect(self, addr: Any) -> None:
            try:
                super().connect(addr)
            except ssl.SSLError as exc:
                errors.append(exc)
                raise

        def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
            # TLS 1.3: a server that refuses our client certificate says so after the client's handshake
            # ended, in an alert that the first read raises
            try:
                return super().recv(buflen, flags)
            except ssl.SSLError as exc:
                errors.append(exc)
                raise

    ctx.sslsocket_class = _Recording
    return errors


def _associate(ae_title: str, dest: Destination, contexts: Sequence[tuple[str, Sequence[str]]],
               timeout_s: float) -> tuple[Association | None, SendResult | None]:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, list(syntaxes))
    try:
        tls = tls_context(dest)
    except OSError as exc:  # ssl.SSLError too: checked at start-up, gone or broken since
        return None, SendResult(None, f"tls_failed: the destination's TLS files do not load: {exc}", False)
    tls_errors = _recording_handshake(tls[0]) if tls is not None else []
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls,
                         evt_handlers=[(evt.EVT_CONN_OPEN, _bound_socket)])
    if assoc.is_established:
        return assoc, None
    if tls_errors:  # the TLS handshake failed: the peer's certificate, or ours
        return None, SendResult(None, tls_reason(tls_errors[0]), False)
    if assoc.is_rejected:
        prim = assoc.acceptor.primitive
        result, source, diag = (int(prim.result or 0), int(prim.result_source or 0), int(prim.diagnostic or 0)) \
            if prim else (0, 0, 0)
        permanent = result == 0x01
        why = _REJECT_REASONS.get((source, diag), "no reason given")
        return None, SendResult(None, f"association rejected ({'permanent' if permanent else 'transient'}): "
                                      f"{why}", permanent)
    if assoc.acceptor.primitive is None:  # no A-ASSOCIATE response at all
        return None, SendResult(None, f"could not connect to {dest.host}:{dest.port} "
                                      "(refused, unreachable, or no answer to the association request)", False)
    return None, SendResult(None, "association aborted by the peer or the network", False)


def send_files(paths: Sequence[Path], dest: Destination, *, ae_title: str = "SPECGATE",
               timeout_s: float = 30.0) -> SendResult:
    """One attempt to C-STORE the DICOM files ``paths`` (a result's SEG and SR, a retraction's KOS) to
    ``dest`` on one association, in order. Success only when every one was answered 0x0000; otherwise
    the first failure (the files after it are not sent: the next attempt sends them all again, and a
    PACS answers success for an object it already holds)."""
    metas = [dcmread(p, stop_before_pixels=True, specific_tags=["SOPClassUID"]) for p in paths]
    wanted: dict[str, set[str]] = {}
    for meta in metas:
        wanted.setdefault(str(meta.SOPClassUID), set()).add(str(meta.file_meta.TransferSyntaxUID))
    assoc, failure = _associate(ae_title, dest, [(c, sorted(ts)) for c, ts in wanted.items()], timeout_s)
    if failure is not None:
        return failure
    assert assoc is not None
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        missing = sorted(set(wanted) - accepted)
        if missing:
            return SendResult(None, f"peer accepts no presentation context for {', '.join(missing)}", True)
        last = SendResult(0x0000, None, False)
        for path in paths:
            rsp = assoc.send_c_store(dcmread(path))
            if rsp is None or "Status" not in rsp:
                return SendResult(None, "no C-STORE response (timeout or abort)", False)
            last = _classify_status(int(rsp.Status))
            if not last.ok:
                return last
        return last
    finally:
        if assoc.is_established:
            assoc.release()


def send(paths: Sequence[Path], dest: Destination, *, ae_title: str = "SPECGATE",
         timeout_s: float = 30.0) -> SendResult:
    """One attempt to send ``paths`` to ``dest``, by the protocol its kind names: C-STORE
    (:func:`send_files`) or STOW-RS (:func:`dicom_node.dicomweb.store`)."""
    if dest.kind == "dicomweb":
        return dicomweb.store(paths, dest, timeout_s=timeout_s)
    return send_files(paths, dest, ae_title=ae_title, timeout_s=timeout_s)


def echo(dest: Destination, *, ae_title: str = "SPECGATE", timeout_s: float = 10.0) -> EchoResult:
    """C-ECHO ``dest`` once (a DICOMweb destination: one QIDO-RS query, :func:`dicom_node.dicomweb.echo`)."""
    if dest.kind == "dicomweb":
        return dicomweb.echo(dest, timeout_s=timeout_s)
    t0 = time.monotonic()
    assoc, failure = _associate(ae_title, dest, [(_VERIFICATION, ["1.2.840.10008.1.2"])], timeout_s)
    if failure is not None:
        return EchoResult(False, None, time.monotonic() - t0, failure.error)
    assert assoc is not None
    try:
        rsp = assoc.send_c_echo()
        status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
    finally:
        if assoc.is_established:
            assoc.release()
    dt = time.monotonic() - t0
    if status is None:
        return EchoResult(False, None, dt, "no C-ECHO response (timeout or abort)")
    return EchoResult(status == 0, status, dt)


# ------------------------------------------------------------------------------------------- deliver
@dataclass(frozen=True)
class _Shipment:
    """What is sent and where it is recorded: a result's SEG and SR (``deliveries``), or a retraction's
    KOS (``retraction_deliveries``)."""

    table: Any  # Delivery or RetractionDelivery: the same columns
    owner: str  # its column naming what is sent: result_id or retraction_id
    owner_id: int
    job_id: int
    files: tuple[Path, ...]
    what: str  # for logs: "result 12", "retraction 3"
    object_type: str  # of its rows in the audit trail: delivery, retraction_delivery

    def row_filter(self, dest: Destination) -> Any:
        return (getattr(self.table, self.owner) == self.owner_id, self.table.destination == dest.name)


def deliver(sessions: sessionmaker[Session], result_id: int, destinations: Sequence[Destination], *,
            actor: str, retry_policy: RetryPolicy | None = None,
            sleep: Callable[[float], None] = time.sleep,
            on_attempt: AttemptObserver | None = None, files: Store | Path | None = None) -> list[DeliveryOutcome]:
    """Send result ``result_id``'s objects (its SEG, and the SR with the gate's evidence) to every
    destination, on one association each; return one outcome per destination.

    Idempotent: a destination whose delivery is already ``sent`` is not sent again. Blocks for the
    retries (the worker runs it in its task). ``sleep`` is injectable so a test can count the waits.
    ``on_attempt`` is told of every attempt (:data:`AttemptObserver`). ``files``: where the objects are
    read from (a :class:`store.Store`; a data directory or None: ``fs``); fetched fresh, not from a cache
    (an approval rewrites them under the same keys). A shadow job's result (:mod:`ledger.shadow`) is
    refused before any delivery row exists: :class:`ledger.shadow.ShadowError`, ``delivery.refused`` audited.
    """
    with session_scope(sessions) as s:
        result = s.get(Result, result_id)
        if result is None:
            raise LookupError(f"result {result_id} does not exist")
        keys = [p for p in (result.seg_path, result.sr_path) if p]
        job_id = result.job_id
        refused = shadow.refuse(s, job_id, actor=actor, action="delivery.refused", what="sent") \
            if shadow.is_shadow_job(s, job_id) else None
    if refused is not None:  # silent mode: no delivery row is ever made for a shadow result (audited above)
        raise refused
    store = as_store(files)
    shipment = _Shipment(Delivery, "result_id", result_id, job_id, tuple(store.path(k, fresh=True) for k in keys),
                         f"result {result_id}", "delivery")
    return _ship(sessions, shipment, destinations, actor=actor, policy=retry_policy or RetryPolicy(), sleep=sleep,
                 on_attempt=on_attempt)


def deliver_retraction(sessions: sessionmaker[Session], retraction_id: int, destinations: Sequence[Destination],
                       *, actor: str, retry_policy: RetryPolicy | None = None,
                       sleep: Callable[[float], None] = time.sleep,
                       on_attempt: AttemptObserver | None = None,
                       files: Store | Path | None = None) -> list[DeliveryOutcome]:
    """Send retraction ``retraction_id``'s Key Object Selection document to ``destinations`` (those that
    received the result), with the same rows, retries and idempotence as :func:`deliver`."""
    with session_scope(sessions) as s:
        retraction = s.get(Retraction, retraction_id)
        if retraction is None:
            raise LookupError(f"retraction {retraction_id} does not exist")
        kos_key, job_id = retraction.kos_path, retraction.job_id
    shipment = _Shipment(RetractionDelivery, "retraction_id", retraction_id, job_id,
                         (as_store(files).path(kos_key, fresh=True),), f"retraction {retraction_id}",
                         "retraction_delivery")
    return _ship(sessions, shipment, destinations, actor=actor, policy=retry_policy or RetryPolicy(), sleep=sleep,
                 on_attempt=on_attempt)


def _ship(sessions: sessionmaker[Session], shipment: _Shipment, destinations: Sequence[Destination], *,
          actor: str, policy: RetryPolicy, sleep: Callable[[float], None],
          on_attempt: AttemptObserver | None) -> list[DeliveryOutcome]:
    return [_deliver_one(sessions, shipment, d, actor=actor, policy=policy, sleep=sleep, on_attempt=on_attempt)
            for d in destinations]


def _sending_lease(sessions: sessionmaker[Session], table: Any, row_id: int, every_s: float) -> LeaseRefresher:
    """Keep a ``sending`` row's ``updated_at`` fresh while this process works on it (the attempts and the
    waits between them), every :attr:`RetryPolicy.sending_refresh_s`: a row that goes a whole SCU timeout
    without a refresh was abandoned by a process that died, and is taken over (:func:`_claim`, and the
    worker's reconciler). A missed refresh (the database away for a moment) is logged, not fatal
    (:mod:`ledger.leases`)."""

    def refresh() -> Update:
        return (update(table).where(table.id == row_id, table.state == DeliveryState.SENDING)
                .values(updated_at=utcnow()))

    return LeaseRefresher(sessions, f"{table.__tablename__} {row_id}", refresh, every_s=every_s)


def _claim(sessions: sessionmaker[Session], shipment: _Shipment, dest: Destination,
           policy: RetryPolicy) -> tuple[int, DeliveryOutcome | None]:
    """Make sure the row exists and take it for sending; an outcome instead if there is nothing to do."""
    table = shipment.table
    with session_scope(sessions) as s:
        insert_ignore(s, table, {"job_id": shipment.job_id, shipment.owner: shipment.owner_id,
                                 "destination": dest.name, "ae_title": dest.ae_title, "host": dest.host,
                                 "port": dest.port, "state": DeliveryState.PENDING.value, "attempts": 0})
        row = s.execute(select(table).where(*shipment.row_filter(dest))).scalar_one()
        if row.state == DeliveryState.SENT:
            return row.id, DeliveryOutcome(dest.name, row.state, row.attempts, row.last_status, already_sent=True)
        stale = utcnow() - timedelta(seconds=policy.sending_stale_s)
        took = s.execute(
            update(table).where(table.id == row.id,
                                or_(table.state != DeliveryState.SENDING, table.updated_at < stale),
                                table.state != DeliveryState.SENT)
            .values(state=DeliveryState.SENDING, updated_at=utcnow(), ae_title=dest.ae_title, host=dest.host,
                    port=dest.port)
            .execution_options(synchronize_session=False))
        if took.rowcount != 1:  # type: ignore[attr-defined]
            return row.id, DeliveryOutcome(dest.name, DeliveryState.SENDING, row.attempts, row.last_status,
                                           busy=True)
        return row.id, None


def _deliver_one(sessions: sessionmaker[Session], shipment: _Shipment, dest: Destination, *, actor: str,
                 policy: RetryPolicy, sleep: Callable[[float], None],
                 on_attempt: AttemptObserver | None = None) -> DeliveryOutcome:
    delivery_id, early = _claim(sessions, shipment, dest, policy)
    if early is not None:
        return early
    with _sending_lease(sessions, shipment.table, delivery_id, policy.sending_refresh_s):
        return _attempts(sessions, shipment, dest, delivery_id, actor=actor, policy=policy, sleep=sleep,
                         on_attempt=on_attempt)


def _attempts(sessions: sessionmaker[Session], shipment: _Shipment, dest: Destination, delivery_id: int, *,
              actor: str, policy: RetryPolicy, sleep: Callable[[float], None],
              on_attempt: AttemptObserver | None) -> DeliveryOutcome:
    object_type = shipment.object_type
    last: SendResult = SendResult(None, "not attempted", False)
    for n in range(1, policy.max_attempts + 1):
        wait = policy.wait_before(n)
        if wait:
            sleep(wait)
        try:
            last = send(shipment.files, dest, ae_title=policy.ae_title, timeout_s=policy.timeout_s)
        except (OSError, ValueError) as exc:  # a file is missing or unreadable: cannot get better
            last = SendResult(None, f"cannot read the files to send: {type(exc).__name__}: {exc}", True)
        final = not last.ok and (last.permanent or n == policy.max_attempts)
        if on_attempt is not None:
            on_attempt(dest.name, last.ok, final)
        with session_scope(sessions) as s:
            row = s.get(shipment.table, delivery_id, with_for_update=True)
            assert row is not None
            if row.state == DeliveryState.SENT and not last.ok:
                # this sender was taken for dead and another one sent it meanwhile: never undo that
                log.info("%s to %s: sent by another process meanwhile", shipment.what, dest.name)
                return DeliveryOutcome(dest.name, row.state, row.attempts, row.last_status, already_sent=True)
            row.attempts += 1
            row.last_status = last.status
            row.last_error = last.error
            row.updated_at = utcnow()
            details = {"destination": dest.name, "ae_title": dest.ae_title, "host": dest.host, "port": dest.port,
                       "attempt": row.attempts, "status": last.status_text, "error": last.error,
                       shipment.owner: shipment.owner_id}
            if dest.kind == "dicomweb":
                details |= {"protocol": "STOW-RS", "url": dest.url}
            elif dest.tls:
                details["tls"] = True
            if last.ok:
                row.state, row.sent_at = DeliveryState.SENT, utcnow()
                audit.append(s, actor=actor, action=f"{object_type}.sent", object_type=object_type,
                             object_id=delivery_id, details=details)
                log.info("%s sent to %s (attempt %d)", shipment.what, dest.name, n)
                return DeliveryOutcome(dest.name, DeliveryState.SENT, row.attempts, last.status)
            if final:
                row.state = DeliveryState.FAILED
            audit.append(s, actor=actor, action=f"{object_type}.failed" if final else f"{object_type}.attempt_failed",
                         object_type=object_type, object_id=delivery_id,
                         details={**details, "permanent": last.permanent})
            total = row.attempts
        log.warning("%s to %s: attempt %d failed: %s%s", shipment.what, dest.name, n, last.error,
                    " (final)" if final else "")
        if final:
            return DeliveryOutcome(dest.name, DeliveryState.FAILED, total, last.status, last.error)
    raise AssertionError("unreachable")  # pragma: no cover
