"""Who may talk to the SCP: the calling-AE/host allow-list, and TLS contexts.

    >>> from dicom_node.config import AllowedCaller
    >>> callers = [AllowedCaller.parse("PACS@10.0.0.5"), AllowedCaller.parse("CT1@*")]
    >>> caller_allowed(callers, "PACS", "10.0.0.5"), caller_allowed(callers, "PACS", "10.0.0.6")
    (True, False)
    >>> caller_allowed(callers, "CT1", "192.168.1.9")
    True
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Sequence
from pathlib import Path

from .config import AllowedCaller, TLSConfig

__all__ = ["caller_allowed", "client_ssl_context", "normalise_host", "server_ssl_context", "tls_reason"]


def normalise_host(host: str) -> str:
    """An IPv4-mapped IPv6 peer address (``::ffff:10.0.0.5``) as its IPv4 form; others unchanged."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def caller_allowed(callers: Sequence[AllowedCaller], calling_ae: str, host: str) -> bool:
    """True if (calling AE title, peer address) is on the allow-list. An empty list allows nobody."""
    host = normalise_host(host)
    return any(c.matches(calling_ae, host) for c in callers)


def server_ssl_context(tls: TLSConfig | None) -> ssl.SSLContext | None:
    """The SCP's TLS context (TLS 1.2+), or None when TLS is off. Mutual TLS when asked for."""
    if tls is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key))
    if tls.ca is not None:
        ctx.load_verify_locations(cafile=str(tls.ca))
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_ssl_context(ca: Path | None, cert: Path | None = None, key: Path | None = None,
                       *, check_hostname: bool = True) -> ssl.SSLContext:
    """A TLS 1.2+ client context that trusts ``ca`` (None: the system's CAs) and, for mutual TLS, presents
    ``cert``/``key``. Raises ``OSError`` (``ssl.SSLError``) when a file is missing or does not load."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    if ca is None:
        ctx.load_default_certs()
    else:
        ctx.load_verify_locations(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key) if key else None)
    return ctx


def tls_reason(exc: ssl.SSLError) -> str:
    """Why a TLS connection failed, for a delivery attempt's reason: ``tls_verify_failed: certificate verify
    failed: <why>`` (the peer's certificate did not verify against our CA, or names another host), or
    ``tls_failed: <OpenSSL's reason>`` (an alert: the peer refused ours)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"tls_verify_failed: certificate verify failed: {exc.verify_message}"
    reason = str(exc.reason or exc)
    if "ALERT" in reason or isinstance(exc, ssl.SSLEOFError):
        return f"tls_failed: {reason} (the peer refused the connection: our client certificate, tls_cert, " \
               "missing or not trusted by it?)"
    return f"tls_failed: {reason}"
