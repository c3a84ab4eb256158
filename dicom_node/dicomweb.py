"""Sending results by DICOMweb STOW-RS (PS3.18 10.5), through ``dicomweb-client`` on a ``requests`` session.

A destination of kind ``dicomweb`` (:class:`dicom_node.config.Destination`) is a base URL; one attempt
POSTs every object of a shipment (a result's SEG and SR, a retraction's KOS) in one multipart request to
``<url>/studies``. :func:`dicom_node.scu.deliver` claims, retries, backs off and audits it exactly like a
C-STORE; this module makes one attempt and says what it got (:class:`SendResult`, its status the HTTP one):

=========================================  ===========================================================
response                                   attempt
=========================================  ===========================================================
200, every instance referenced             sent
202 or 200 with a FailedSOPSequence, 409   failed, not retried: the FailureReason of each instance named
                                           (retried when every reason is 0xA7xx, out of resources)
202 with warnings only                     not sent and not retried, as a DIMSE warning: a person looks
401, 403, 407                              failed, not retried: "authentication refused"
408, 429, 5xx; no connection, timeout      retried
a certificate that does not verify         retried; the reason starts ``tls_verify_failed:``
any other 4xx                              failed, not retried
=========================================  ===========================================================

The credentials (a bearer token, or basic credentials) are read from their file when the session is
built (each attempt: a rotated token is picked up) or come from the environment through the settings;
they go into the request's Authorization header only, never into a log, the ledger or the audit trail.

:func:`session` and :func:`client` are the reusable parts (a query/retrieve source over DICOMweb needs the
same TLS and credentials)::

    >>> s = session(token="abc")
    >>> s.headers["Authorization"], s.verify
    ('Bearer abc', True)
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from pydantic import SecretStr
from pydicom import Dataset, dcmread
from requests.adapters import HTTPAdapter

from .attempt import EchoResult, SendResult
from .config import Destination
from .security import tls_reason

__all__ = ["client", "echo", "failure_reasons", "session", "session_for", "store"]

log = logging.getLogger("specgate.dicom_node.dicomweb")

#: STOW-RS FailureReason / WarningReason codes (PS3.18 Table 10.5.3-1 and the C-STORE statuses they reuse)
REASONS = {0xA700: "out of resources", 0xA900: "data set does not match SOP class",
           0xC000: "cannot understand", 0xC122: "transfer syntax not supported",
           0x0110: "processing failure", 0x0122: "SOP class not supported", 0x0124: "not authorized",
           0xB000: "coercion of data elements", 0xB006: "elements discarded",
           0xB007: "data set does not match SOP class (warning)"}
_AUTH = (401, 403, 407)
_TRANSIENT = (408, 425, 429)


class _Pinned(HTTPAdapter):
    """The destination's own TLS settings on every request, whatever the environment says: requests lets
    ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` replace a session's ``verify`` (its
    ``merge_environment_settings``), so a CA bundle set for the host's other programs would silently
    replace the destination's ``tls_ca``. Without a host name check (``tls_verify_hostname=false``) urllib3
    is told ``assert_hostname=False`` (its context's ``check_hostname`` is off; urllib3 matches the name
    itself)."""

    def __init__(self, verify: str | bool, cert: str | tuple[str, str] | None, check_hostname: bool) -> None:
        self._verify, self._cert, self._check_hostname = verify, cert, check_hostname
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        if not self._check_hostname:
            kwargs["assert_hostname"] = False
        super().init_poolmanager(*args, **kwargs)

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs["verify"], kwargs["cert"] = self._verify, self._cert
        return super().send(request, *args, **kwargs)


def session(*, ca: Path | None = None, cert: Path | None = None, key: Path | None = None,
            verify_hostname: bool = True, token: str | None = None, username: str | None = None,
            password: str | None = None) -> requests.Session:
    """A ``requests`` session for a DICOMweb server: trusting ``ca`` (else the system's CAs), presenting
    ``cert``/``key`` for mutual TLS, with a bearer ``token`` or basic ``username``/``password``. TLS is
    1.2 or newer (urllib3's floor)."""
    s = requests.Session()
    s.verify = str(ca) if ca is not None else True
    if cert is not None:
        s.cert = (str(cert), str(key)) if key is not None else str(cert)
    if ca is not None or cert is not None or not verify_hostname:
        s.mount("https://", _Pinned(s.verify, s.cert, verify_hostname))
    if token is not None:
        s.headers["Authorization"] = f"Bearer {token}"
    elif username is not None:
        s.auth = (username, password or "")
    return s


def _secret(value: SecretStr | None, path: Path | None) -> str | None:
    """The secret from the settings (an environment variable's, read at start), or read from ``path`` now."""
    if value is not None:
        return value.get_secret_value()
    if path is None:
        return None
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise ValueError(f"{path} is empty")
    return text


def session_for(dest: Destination) -> requests.Session:
    """:func:`session` with ``dest``'s TLS files and credentials (its token or password file read now)."""
    return session(ca=dest.tls_ca, cert=dest.tls_cert, key=dest.tls_key, verify_hostname=dest.tls_verify_hostname,
                   token=_secret(dest.token, dest.token_file), username=dest.username,
                   password=_secret(dest.password, dest.password_file))


def client(url: str, sess: requests.Session, *, timeout_s: float) -> DICOMwebClient:
    """A ``DICOMwebClient`` on ``sess`` that makes one request per call (the caller owns retries)."""
    c = DICOMwebClient(url, session=sess, timeout=timeout_s)
    c.set_http_retry_params(retry=False)
    return c


def failure_reasons(body: Dataset) -> tuple[list[str], list[int]]:
    """The FailedSOPSequence of a STOW-RS response as words (``1.2.3: 0xC000 cannot understand``) and
    codes."""
    words, codes = [], []
    for item in body.get("FailedSOPSequence", []):
        code = int(item.get("FailureReason", 0))
        codes.append(code)
        words.append(f"{item.get('ReferencedSOPInstanceUID', '?')}: 0x{code:04X} {REASONS.get(code, '')}".rstrip())
    return words, codes


def _warnings(body: Dataset) -> list[str]:
    out = []
    for item in body.get("ReferencedSOPSequence", []):
        if "WarningReason" in item:
            code = int(item.WarningReason)
            out.append(f"{item.get('ReferencedSOPInstanceUID', '?')}: 0x{code:04X} {REASONS.get(code, '')}".rstrip())
    return out


def _body(rsp: requests.Response) -> Dataset:
    """The response's DICOM JSON data set (empty when it has none, or none that parses)."""
    if not rsp.content:
        return Dataset()
    try:
        return Dataset.from_json(rsp.json())
    except (ValueError, TypeError):  # json.JSONDecodeError is a ValueError
        return Dataset()


def _tls_reason(exc: requests.exceptions.SSLError) -> str:
    """The reason of the ``ssl`` error that requests wraps (urllib3's ``SSLError`` and ``MaxRetryError``
    carry it as an argument or a cause)."""
    seen: list[BaseException] = [exc]
    while seen:
        cur = seen.pop()
        if isinstance(cur, ssl.SSLError):
            return tls_reason(cur)
        seen.extend(x for x in (cur.__cause__, cur.__context__, getattr(cur, "reason", None), *cur.args)
                     if isinstance(x, BaseException) and x is not cur)
    return f"tls_failed: {exc}"


def classify(status: int, body: Dataset, uids: Sequence[str]) -> SendResult:
    """What a STOW-RS response with HTTP ``status`` and ``body`` means for an attempt that sent ``uids``."""
    words, codes = failure_reasons(body)
    if status in _AUTH:
        return SendResult(status, f"STOW-RS authentication refused (HTTP {status}): check the destination's "
                                  "credentials", True, http=True)
    if status >= 500 or status in _TRANSIENT:
        named = f": {'; '.join(words)}" if words else ""
        return SendResult(status, f"DICOMweb server unavailable (HTTP {status}){named}", False, http=True)
    if status in (200, 202, 409) and words:
        transient = all(0xA700 <= c <= 0xA7FF for c in codes)
        return SendResult(status, f"STOW-RS failed (HTTP {status}): {'; '.join(words)}", not transient, http=True)
    if status == 409:
        return SendResult(status, "STOW-RS failed (HTTP 409) with no FailedSOPSequence", True, http=True)
    if status == 202:
        warned = _warnings(body)
        why = "; ".join(warned) if warned else "no reason given"
        return SendResult(status, f"STOW-RS answered HTTP 202 (stored with warnings: {why}); check it", True, http=True)
    if status == 200:
        referenced = {str(i.get("ReferencedSOPInstanceUID", "")) for i in body.get("ReferencedSOPSequence", [])}
        missing = sorted(set(uids) - referenced) if "ReferencedSOPSequence" in body else []
        if missing:
            return SendResult(status, f"STOW-RS answered HTTP 200 without referencing {', '.join(missing)}", True,
                              http=True)
        return SendResult(status, None, False, http=True)
    return SendResult(status, f"STOW-RS refused (HTTP {status})", True, http=True)


class _LastResponse:
    """A ``requests`` response hook: keeps the last response (dicomweb-client returns only its body)."""

    def __init__(self) -> None:
        self.response: requests.Response | None = None

    def __call__(self, rsp: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        self.response = rsp
        return rsp


def store(paths: Sequence[Path], dest: Destination, *, timeout_s: float = 30.0) -> SendResult:
    """One STOW-RS attempt: POST the DICOM files ``paths`` to ``dest`` in one request."""
    datasets = [dcmread(p) for p in paths]
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    try:
        sess = session_for(dest)
    except (OSError, ValueError) as exc:
        return SendResult(None, f"cannot read the destination's credentials: {type(exc).__name__}: "
                                f"{getattr(exc, 'strerror', None) or exc}", True, http=True)
    last = _LastResponse()
    sess.hooks["response"].append(last)
    try:
        client(str(dest.url), sess, timeout_s=timeout_s).store_instances(datasets)
    except requests.HTTPError:
        pass  # raise_for_status on a 4xx/5xx: the response says what happened
    except requests.exceptions.SSLError as exc:
        return SendResult(None, _tls_reason(exc), False, http=True)
    except requests.Timeout:
        return SendResult(None, f"no STOW-RS response from {dest.url} within {timeout_s:g} s", False, http=True)
    except requests.ConnectionError as exc:
        return SendResult(None, f"could not connect to {dest.url} ({type(exc).__name__})", False, http=True)
    finally:
        sess.close()
    if last.response is None:  # pragma: no cover - requests either answers or raises
        return SendResult(None, "no STOW-RS response", False, http=True)
    return classify(last.response.status_code, _body(last.response), uids)


def echo(dest: Destination, *, timeout_s: float = 10.0) -> EchoResult:
    """Whether ``dest`` answers a QIDO-RS query (``GET <url>/studies?limit=1``) with these credentials."""
    t0 = time.monotonic()
    try:
        sess = session_for(dest)
    except (OSError, ValueError) as exc:
        return EchoResult(False, None, 0.0, f"cannot read the credentials: {getattr(exc, 'strerror', None) or exc}",
                          http=True)
    last = _LastResponse()
    sess.hooks["response"].append(last)
    try:
        client(str(dest.url), sess, timeout_s=timeout_s).search_for_studies(limit=1)
    except requests.HTTPError:
        pass
    except requests.exceptions.SSLError as exc:
        return EchoResult(False, None, time.monotonic() - t0, _tls_reason(exc), http=True)
    except requests.RequestException as exc:
        return EchoResult(False, None, time.monotonic() - t0, f"could not connect ({type(exc).__name__})", http=True)
    finally:
        sess.close()
    dt = time.monotonic() - t0
    status = last.response.status_code if last.response is not None else None
    if status == 200 or status == 204:
        return EchoResult(True, status, dt, http=True)
    why = "authentication refused" if status in _AUTH else "not a QIDO-RS answer"
    return EchoResult(False, status, dt, f"HTTP {status}: {why}", http=True)
