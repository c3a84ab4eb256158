"""STOW-RS on the node (PS3.18 10.5): ``POST /studies`` and ``POST /studies/{study}`` over HTTPS, with the
promises of C-STORE.

::

    server = StowServer(config, limits, receiver, sessions)   # no I/O yet
    server.start()                                          # binds the port, serves in a thread
    ...
    server.stop()

A request is ``multipart/related; type="application/dicom"``; each part is one DICOM Part 10 file. The body
is never held: python-multipart's streaming parser cuts it into parts as it arrives, and each part goes the
way a C-STORE's data set goes (:mod:`dicom_node.association`): its file meta is read (at most 64 KiB), its
Media Storage SOP Class and Instance UIDs play the request's Affected SOP Class and Instance UIDs, the data
set after it is checked element by element (:class:`dicom_node.dataset_stream.DataSetStream`, the node's
:class:`dicom_node.config.ReceiveLimits`) and written to a temporary file in the spool behind file meta that
we write (:class:`dicom_node.sink.TempSink`); when the part ends, :class:`dicom_node.receive.InstanceReceiver`
decides it exactly as for C-STORE (watermark, UID checks, fsync, ledger row, duplicates and
``uid_conflict``, the audit row of a refusal). An instance is on disk and in the ledger before the response
is sent, and its study is assembled with whatever arrived by C-STORE (the ledger is the one place both
write).

Who may store: TLS 1.2+ always (:func:`dicom_node.security.server_ssl_context`). A client certificate that
verifies against ``tls.ca`` names the caller by its subject's common name (an AE title's rules); otherwise
``Authorization: Bearer TOKEN``, whose SHA-256 is compared (constant time, with every configured hash) with
the configured ``NAME:SHA256`` entries. The caller's name is recorded where C-STORE records the calling AE
title (the instance's ``calling_ae``, audit rows' actor). No credential: 401. A token no entry has, or a
certificate whose common name is not a name: 403, audited. A certificate from another CA fails the TLS
handshake.

Answers (the response body is a PS3.18 Store Instances Response, ``application/dicom+json``):

* 200 every part stored, 202 some refused, 409 every part refused: ReferencedSOPSequence (0008,1199) for
  each stored instance, FailedSOPSequence (0008,1198) with FailureReason (0008,1197) for each refused part
  (:data:`FAILURE_REASONS`: the C-STORE status, 0x0122 for a SOP class we do not store, 0xC122 for a
  transfer syntax we do not accept, 0x0110 for an error of ours);
* 400 a body that is not a multipart body (no parts, a part cut short, no closing boundary), or a study in
  the URL that is not a UID; 415 another content type; 413 a body longer than ``association_bytes``
  (declared, or once that many bytes arrived): nothing more is read; 408 a body silent for
  ``idle_timeout_s`` (the association's network timeout); 503 more than ``max_connections`` at once. Parts stored before a 400 or 413 stay
  stored (each was durable and answered nowhere else; sending them again is answered as a duplicate).

Nothing about a data set is logged: no patient names or IDs.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import socket
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, replace
from io import BytesIO
from typing import TYPE_CHECKING, Any

import uvicorn
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from ledger import audit
from ledger.db import DatabaseUnavailable, session_scope

from .association import IMAGE_STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from .config import NodeConfig, ReceiveLimits, StowConfig, validate_ae_title
from .dataset_stream import DEFLATED, DataSetStream
from .handoff import bind_port
from .receive import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS, InstanceReceiver, Outcome, Refused
from .security import normalise_host, server_ssl_context
from .sink import TempSink, file_meta
from .spool import InvalidUID, Spool, validate_uid

if TYPE_CHECKING:
    from .prometheus import StowMetrics

__all__ = ["FAILURE_REASONS", "PROCESSING_FAILURE", "SOP_CLASS_NOT_SUPPORTED", "TRANSFER_SYNTAX_NOT_SUPPORTED",
           "StowServer", "stow_app", "store_response"]

log = logging.getLogger("specgate.dicom_node.stow")

PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
#: FailureReason (0008,1197) by the reason codes of :class:`dicom_node.receive.Refused` that do not keep
#: their C-STORE status (which already is the STOW-RS one: 0xA700, 0xA900, 0xC000, 0xC409).
FAILURE_REASONS = {"internal_error": PROCESSING_FAILURE}
_META_MAX = 1 << 16  # a part's file meta information; a few hundred bytes in practice
_MAX_WAITING = 16  # ended parts waiting to be decided before reading pauses
_PREFIX = 132 + 12  # preamble, "DICM", the (0002,0000) element
_DICOM_TYPES = frozenset({"application/dicom"})
_TLS_SCOPE = "specgate.tls"  # our ASGI scope extension: the verified client certificate's common name


def store_response(stored: list[tuple[str, str]], failed: list[tuple[str | None, str | None, int]]) -> dict[str, Any]:
    """The Store Instances Response (PS3.18 10.5.3) as DICOM JSON: ``stored`` (SOP Class, SOP Instance UID)
    pairs and ``failed`` (SOP Class, SOP Instance UID or None when the part did not say, FailureReason).

        >>> r = store_response([("1.2.840.10008.5.1.4.1.1.2", "1.2.3")], [(None, None, 0xC000)])
        >>> r["00081199"]["Value"][0]["00081155"], r["00081198"]["Value"][0]["00081197"]
        ({'vr': 'UI', 'Value': ['1.2.3']}, {'vr': 'US', 'Value': [49152]})
    """
    ds = Dataset()
    if failed:
        items = []
        for sop_class, sop_instance, reason in failed:
            item = Dataset()
            if sop_class is not None:
                item.ReferencedSOPClassUID = sop_class
            if sop_instance is not None:
                item.ReferencedSOPInstanceUID = sop_instance
            item.FailureReason = reason
            items.append(item)
        ds.FailedSOPSequence = items
    if stored:
        items = []
        for sop_class, sop_instance in stored:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_instance
            items.append(item)
        ds.ReferencedSOPSequence = items
    return ds.to_json_dict()


class _DicomJSON(JSONResponse):
    media_type = "application/dicom+json"


@dataclass
class _PartResult:
    sop_class: str | None
    sop_instance: str | None
    outcome: Outcome


class _Part:
    """One part on its way: its file meta gathered, then its data set checked and written as it arrives.
    A refusal (:attr:`refusal`) drops the rest of the part unread into memory and unwritten."""

    def __init__(self, upload: _Upload) -> None:
        self.upload = upload
        self.headers: dict[str, str] = {}
        self.head = bytearray()
        self.size = 0
        self.meta_length: int | None = None
        self.sop_class: str | None = None
        self.sop_instance: str | None = None
        self.syntax = ""
        self.sink: TempSink | None = None
        self.stream: DataSetStream | None = None
        self.refusal: Refused | None = None

    def begin_data(self) -> None:
        kind = parse_options_header(self.headers.get("content-type", "application/dicom"))[0].decode("latin-1")
        if kind.lower() not in _DICOM_TYPES:
            self.refuse(Refused(CANNOT_UNDERSTAND, "unsupported_media_type",
                                "a part of a STOW-RS request that is not application/dicom"))

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        if self.refusal is not None:
            return
        limits = self.upload.limits
        if self.size > limits.instance_bytes + _PREFIX + _META_MAX:
            self.refuse(Refused(CANNOT_UNDERSTAND, "instance_too_large",
                                f"a part of more than {limits.instance_bytes} bytes"))
            return
        try:
            if self.sink is None:
                self.head += data
                if not self._meta():
                    return
                data, self.head = bytes(self.head[_PREFIX + (self.meta_length or 0):]), bytearray()
            self._data(data)
        except Refused as refusal:
            self.refuse(refusal)

    def _meta(self) -> bool:
        """True once the file meta is read and the data set's sink is open."""
        if len(self.head) < _PREFIX:
            return False
        if self.head[128:132] != b"DICM" or self.head[132:138] != b"\x02\x00\x00\x00UL":
            raise Refused(CANNOT_UNDERSTAND, "not_part10", "a part that is not a DICOM Part 10 file (no preamble, "
                                                            "'DICM' and file meta group length)")
        self.meta_length = int.from_bytes(self.head[140:144], "little")
        if self.meta_length > _META_MAX:
            raise Refused(CANNOT_UNDERSTAND, "element_too_long",
                          f"file meta information of {self.meta_length} bytes, over {_META_MAX}")
        if len(self.head) < _PREFIX + self.meta_length:
            return False
        try:
            meta = dcmread(BytesIO(bytes(self.head[:_PREFIX + self.meta_length])), stop_before_pixels=True).file_meta
            sop_class, sop_instance = meta.get("MediaStorageSOPClassUID"), meta.get("MediaStorageSOPInstanceUID")
            syntax = meta.get("TransferSyntaxUID")
        except (InvalidDicomError, ValueError, KeyError, TypeError, EOFError, OverflowError, IndexError,
                AttributeError, NotImplementedError) as exc:
            raise Refused(CANNOT_UNDERSTAND, "undecodable",
                          f"file meta information cannot be decoded: {type(exc).__name__}") from exc
        try:
            self.sop_class = validate_uid(str(sop_class or ""), what="Media Storage SOP Class UID")
            self.sop_instance = validate_uid(str(sop_instance or ""), what="Media Storage SOP Instance UID")
            self.syntax = validate_uid(str(syntax or ""), what="Transfer Syntax UID")
        except InvalidUID as exc:
            raise Refused(CANNOT_UNDERSTAND, "invalid_uid", str(exc)) from exc
        upload = self.upload
        if self.sop_class not in upload.sop_classes:
            raise Refused(SOP_CLASS_NOT_SUPPORTED, "sop_class_not_supported",
                          "a SOP class the node does not store (image storage classes only)")
        if self.syntax not in upload.transfer_syntaxes:
            raise Refused(TRANSFER_SYNTAX_NOT_SUPPORTED, "transfer_syntax_not_supported",
                          f"transfer syntax {self.syntax} is not accepted")
        self.stream = DataSetStream(self.syntax, upload.limits)
        self.sink = TempSink(upload.receiver.spool.tmp_dir,
                             file_meta(self.sop_class, self.sop_instance, self.syntax, upload.caller))
        return True

    def _data(self, piece: bytes) -> None:
        assert self.stream is not None and self.sink is not None
        if not piece:
            return
        self.stream.feed(piece)
        self.sink.write(memoryview(piece))

    def refuse(self, refusal: Refused) -> None:
        if self.sink is not None:
            self.sink.discard()
        self.sink = self.stream = None
        self.head = bytearray()
        self.refusal = refusal

    def discard(self) -> None:
        if self.sink is not None:
            self.sink.discard()
            self.sink = None


class _Upload:
    """One request's parts: fed by the multipart parser's callbacks (synchronous, in the event loop: no
    disk sync and no ledger here), and decided by :meth:`settle` (in the thread pool)."""

    def __init__(self, *, limits: ReceiveLimits, receiver: InstanceReceiver, caller: str, address: str,
                 study: str | None, sop_classes: frozenset[str], transfer_syntaxes: frozenset[str]) -> None:
        self.limits, self.receiver = limits, receiver
        self.caller, self.address, self.study = caller, address, study
        self.sop_classes, self.transfer_syntaxes = sop_classes, transfer_syntaxes
        self.part: _Part | None = None
        self.finished: list[_Part] = []  # parts ended, to be decided
        self.results: list[_PartResult] = []
        self.ended = False  # the closing boundary arrived
        self._field = bytearray()
        self._value = bytearray()

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {"on_part_begin": self._part_begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                "on_part_end": self._part_end, "on_end": self._end}

    def _part_begin(self) -> None:
        self.part = _Part(self)

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        assert self.part is not None
        self.part.headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        assert self.part is not None
        self.part.begin_data()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        assert self.part is not None
        self.part.feed(data[start:end])

    def _part_end(self) -> None:
        assert self.part is not None
        self.finished.append(self.part)
        self.part = None

    def _end(self) -> None:
        self.ended = True

    def abandon(self) -> None:
        """The request ends without its closing boundary: the part on its way, and parts not yet
        decided, are dropped (their temporary files removed)."""
        for part in [*self.finished, *([self.part] if self.part is not None else [])]:
            part.discard()
        self.finished.clear()
        self.part = None

    def take(self) -> list[_Part]:
        """The parts that ended, handed over to :meth:`settle` (no longer this upload's to abandon)."""
        parts, self.finished = self.finished, []
        return parts

    def settle(self, parts: list[_Part]) -> None:
        """Decide ``parts`` in order (blocking: fsync, the ledger; run in the thread pool)."""
        for part in parts:
            try:
                outcome = self._decide(part)
            except Exception as exc:  # noqa: BLE001 - the boundary: a bug fails this part, not the request
                part.discard()
                log.exception("STOW-RS from %s@%s: unexpected error storing a part; answered 0x0110",
                              self.caller, self.address)
                outcome = self._refuse(part, Refused(CANNOT_UNDERSTAND, "internal_error",
                                                     f"unexpected error ({type(exc).__name__})"))
            self.results.append(_PartResult(part.sop_class, part.sop_instance, outcome))

    def _decide(self, part: _Part) -> Outcome:
        if part.refusal is None and part.sink is None:
            part.refusal = Refused(CANNOT_UNDERSTAND, "not_part10" if part.size < _PREFIX else "truncated",
                                   f"a part of {part.size} bytes ends inside its file meta information")
        if part.refusal is None:
            assert part.stream is not None and part.sink is not None
            try:
                part.stream.finish()
            except Refused as refusal:
                part.refuse(refusal)
        if part.refusal is not None:
            return self._refuse(part, part.refusal)
        sink, stream = part.sink, part.stream
        assert sink is not None and stream is not None and part.sop_class and part.sop_instance
        if sink.error is not None:
            return self._refuse(part, Refused(OUT_OF_RESOURCES, "disk_write_failed",
                                              f"cannot write the data set: {sink.error.strerror}"))
        received = replace(sink.finish(), dataset_length=stream.length, header=stream.header())
        return self.receiver.receive(sink.path, request_sop_class=part.sop_class,
                                     request_sop_instance=part.sop_instance, transfer_syntax=part.syntax,
                                     calling_ae=self.caller, address=self.address, received=received,
                                     study_instance_uid=self.study)

    def _refuse(self, part: _Part, refusal: Refused) -> Outcome:
        return self.receiver.refuse(refusal.status, refusal.reason, refusal.detail,
                                    request_sop_class=part.sop_class or "",
                                    request_sop_instance=part.sop_instance or "",
                                    calling_ae=self.caller, address=self.address)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", errors="surrogateescape")).hexdigest()


class _Refusal(Exception):
    """A whole request refused: HTTP ``status``, a reason code (:data:`dicom_node.prometheus.STOW_REQUEST_REFUSALS`)."""

    def __init__(self, status: int, reason: str, detail: str, *, audited: bool = True,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail, self.audited, self.headers = status, reason, detail, audited, headers


class _Endpoint:
    """The route's state: who may call, the bounds, the receiver."""

    def __init__(self, config: StowConfig, limits: ReceiveLimits, receiver: InstanceReceiver,
                 sessions: sessionmaker[Session], *, sop_classes: frozenset[str], transfer_syntaxes: frozenset[str],
                 metrics: StowMetrics | None) -> None:
        self.config, self.limits, self.receiver, self.sessions = config, limits, receiver, sessions
        self.sop_classes, self.transfer_syntaxes, self.metrics = sop_classes, transfer_syntaxes, metrics

    def caller(self, request: Request) -> str:
        """The caller's name, from a verified client certificate or a bearer token (see the module)."""
        tls = request.scope.get("extensions", {}).get(_TLS_SCOPE) or {}
        common_name = tls.get("client_common_name")
        if common_name is not None:
            try:
                name = validate_ae_title(common_name, what="client certificate common name")
            except ValueError as exc:
                raise _Refusal(403, "forbidden", str(exc)) from exc
            if name not in self.config.certificate_callers:
                raise _Refusal(403, "forbidden", f"a client certificate for {name!r}, not an allowed caller "
                                                 "(stow_tls_callers)")
            return name
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _Refusal(401, "unauthenticated", "no client certificate and no bearer token", audited=False,
                           headers={"WWW-Authenticate": 'Bearer realm="specgate STOW-RS"'})
        digest = _digest(token.strip())
        token_name: str | None = None
        for entry in self.config.tokens:  # every entry compared: the time does not tell which one matched
            if hmac.compare_digest(digest, entry.sha256):
                token_name = entry.name
        if token_name is None:
            raise _Refusal(403, "forbidden", "a bearer token that no allowed caller has")
        return token_name

    async def store(self, request: Request) -> Response:
        address = normalise_host(request.client.host if request.client else "unknown")
        caller = "unknown"
        try:
            caller = self.caller(request)
            return await self._store(request, caller, address)
        except _Refusal as refusal:
            log.warning("STOW-RS request from %s@%s refused: %d %s (%s)", caller, address, refusal.status,
                        refusal.reason, refusal.detail)
            if self.metrics is not None:
                self.metrics.request_refused(refusal.reason)
            if refusal.audited:
                await run_in_threadpool(self._audit, caller, address, refusal)
            return JSONResponse({"error": refusal.reason, "detail": refusal.detail}, status_code=refusal.status,
                                headers=refusal.headers)

    async def _store(self, request: Request, caller: str, address: str) -> Response:
        kind, params = parse_options_header(request.headers.get("content-type", ""))
        root_type = params.get(b"type", b"").decode("latin-1").lower()
        if kind.lower() != b"multipart/related" or root_type not in _DICOM_TYPES:
            raise _Refusal(415, "unsupported_media_type",
                           'the body must be multipart/related; type="application/dicom"')
        boundary = params.get(b"boundary")
        if not boundary:
            raise _Refusal(400, "malformed", "multipart/related without a boundary")
        study = request.path_params.get("study")
        if study is not None:
            try:
                study = validate_uid(study, what="Study Instance UID")
            except InvalidUID as exc:
                raise _Refusal(400, "malformed", str(exc)) from exc
        bound = self.limits.association_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > bound:
            raise _Refusal(413, "too_large", f"a body of {declared} bytes, over {bound}")
        upload = _Upload(limits=self.limits, receiver=self.receiver, caller=caller, address=address, study=study,
                         sop_classes=self.sop_classes, transfer_syntaxes=self.transfer_syntaxes)
        # Parts are decided in the thread pool while the body goes on arriving (one batch at a time, in
        # order; at most _MAX_WAITING ended parts wait, each holding a temporary file's descriptor).
        settling: asyncio.Future[None] | None = None
        try:
            parser = MultipartParser(boundary, upload.callbacks())  # type: ignore[arg-type]
            total = 0
            body = request.stream()
            while True:
                try:
                    chunk = await asyncio.wait_for(anext(body), self.config.idle_timeout_s)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise _Refusal(408, "timeout", f"no part of the body for {self.config.idle_timeout_s:g} s",
                                   headers={"Connection": "close"}) from None
                total += len(chunk)
                if total > bound:
                    raise _Refusal(413, "too_large", f"a body of more than {bound} bytes")
                parser.write(chunk)
                if upload.finished and (settling is None or settling.done()
                                        or len(upload.finished) >= _MAX_WAITING):
                    if settling is not None:
                        await settling
                    settling = asyncio.ensure_future(run_in_threadpool(upload.settle, upload.take()))
            parser.finalize()
        except MultipartParseError as exc:
            upload.abandon()
            raise _Refusal(400, "malformed", f"not a multipart body: {exc}") from exc
        except ClientDisconnect:
            upload.abandon()
            log.warning("STOW-RS from %s@%s: the client went away before its body ended (the parts that "
                        "ended before are decided and stay stored)", caller, address)
            return Response(status_code=400)  # nobody reads it
        except BaseException:
            upload.abandon()
            raise
        finally:  # what was handed over is decided before any answer
            if settling is not None:
                await settling
        if not upload.ended:
            upload.abandon()
            raise _Refusal(400, "malformed", "the body ends before the multipart closing boundary")
        await run_in_threadpool(upload.settle, upload.take())
        if not upload.results:
            raise _Refusal(400, "malformed", "a multipart body without a part")
        stored = [(r.sop_class or "", r.sop_instance or "") for r in upload.results if r.outcome.status == SUCCESS]
        failed = [(r.sop_class, r.sop_instance, FAILURE_REASONS.get(r.outcome.reason, r.outcome.status))
                  for r in upload.results if r.outcome.status != SUCCESS]
        status = 200 if not failed else 409 if not stored else 202
        log.info("STOW-RS from %s@%s: %d stored, %d refused", caller, address, len(stored), len(failed))
        return _DicomJSON(store_response(stored, failed), status_code=status)

    def _audit(self, caller: str, address: str, refusal: _Refusal) -> None:
        try:
            with session_scope(self.sessions) as s:
                audit.append(s, actor=caller, action="stow.request_refused", object_type="http_request",
                             object_id=address, details={"status": refusal.status, "reason": refusal.reason,
                                                         "detail": refusal.detail, "address": address})
        except DatabaseUnavailable as exc:
            log.error("could not audit a refused STOW-RS request (ledger unavailable): %s", exc)


def stow_app(config: StowConfig, limits: ReceiveLimits, receiver: InstanceReceiver, sessions: sessionmaker[Session],
             *, sop_classes: frozenset[str], transfer_syntaxes: frozenset[str],
             metrics: StowMetrics | None = None) -> Starlette:
    """The ASGI application: ``POST /studies`` and ``POST /studies/{study}``."""
    endpoint = _Endpoint(config, limits, receiver, sessions, sop_classes=sop_classes,
                         transfer_syntaxes=transfer_syntaxes, metrics=metrics)
    return Starlette(routes=[Route("/studies", endpoint.store, methods=["POST"]),
                             Route("/studies/{study}", endpoint.store, methods=["POST"])])


def _common_name(cert: dict[str, Any] | None) -> str | None:
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""  # verified, but without a common name: not a caller's name (403)


class _WithClientCertificate:
    """The application, with the connection's verified client certificate in each request's scope
    (``scope["extensions"]["specgate.tls"]``): uvicorn does not put it there itself."""

    def __init__(self, app: Any, common_name: str | None) -> None:
        self.app, self.common_name = app, common_name

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        scope.setdefault("extensions", {})[_TLS_SCOPE] = {"client_common_name": self.common_name}
        await self.app(scope, receive, send)


class _ClientCertificateH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, passing the TLS peer's verified certificate to the application
    (asyncio calls ``connection_made`` once the handshake is done)."""

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        cert = ssl_object.getpeercert() if ssl_object is not None else None
        self.app = _WithClientCertificate(self.app, _common_name(cert))


class StowServer:
    """The endpoint in a thread of its own (uvicorn, one event loop); ``start()`` binds, ``stop()`` ends."""

    def __init__(self, config: StowConfig, limits: ReceiveLimits, receiver: InstanceReceiver,
                 sessions: sessionmaker[Session], *, sop_classes: frozenset[str], transfer_syntaxes: frozenset[str],
                 metrics: StowMetrics | None = None) -> None:
        self.config = config
        self.receiver = receiver
        self.app = stow_app(config, limits, receiver, sessions, sop_classes=sop_classes,
                            transfer_syntaxes=transfer_syntaxes, metrics=metrics)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @classmethod
    def for_node(cls, config: StowConfig, node: NodeConfig, sessions: sessionmaker[Session], *,
                 spool: Spool | None = None, metrics: StowMetrics | None = None) -> StowServer:
        """The endpoint that stores as ``node``'s SCP does: its spool, ledger, store, bounds, the SOP
        classes and transfer syntaxes its C-STORE accepts (the deflated one only when it is negotiated)."""
        spool = spool or Spool(node.spool_dir, watermark_percent=node.spool_watermark_percent).open()
        receiver = InstanceReceiver(spool, sessions, actor="dicom_node.stow", protocol="STOW-RS",
                                    image_sop_classes=IMAGE_STORAGE_SOP_CLASSES, metrics=metrics,
                                    data_dir=node.data_dir,
                                    remote_store=(node.store is not None and node.store.kind != "fs"))
        syntaxes = frozenset(ts for ts in TRANSFER_SYNTAXES if node.accept_deflated or ts != DEFLATED)
        return cls(config, node.limits, receiver, sessions, sop_classes=IMAGE_STORAGE_SOP_CLASSES,
                   transfer_syntaxes=syntaxes, metrics=metrics)

    @property
    def address(self) -> tuple[str, int]:
        if self._sock is None:
            raise RuntimeError("the STOW-RS server is not started")
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def start(self, ready_timeout: float = 30.0) -> StowServer:
        c = self.config
        tls_context = server_ssl_context(c.tls)
        assert tls_context is not None
        config = uvicorn.Config(self.app, host=c.host, port=c.port, http=_ClientCertificateH11, lifespan="off",
                                log_config=None, access_log=False, ssl_certfile=str(c.tls.cert),
                                ssl_keyfile=str(c.tls.key), timeout_graceful_shutdown=10,
                                # (uvicorn counts the connection asking: N + 1 serves N at once)
                                limit_concurrency=c.max_connections + 1)
        config.load()
        config.ssl = tls_context  # the node's own context: TLS 1.2+, client certificates against tls.ca
        sock = self._sock = bind_port(c.host, c.port)
        server = self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])),
                                        name="specgate-stow", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + ready_timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the STOW-RS server did not start")
            time.sleep(0.01)
        log.info("STOW-RS listening on https://%s:%d (client certificates %s, %d token callers)", *self.address,
                 "verified" if c.tls.ca is not None else "not asked for", len(c.tokens))
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._sock is not None:
            self._sock.close()
        self.receiver.close()
