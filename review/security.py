"""What the review app does for every request before and after its routes: the security headers on every
response, the cap on the request body, and the checks that turn bad input into a 4xx with its reason.

Both middlewares are plain ASGI, so they see every response the app sends: routed pages, Starlette's own
404/405/400, the app's error pages, ``/static`` files, slice images, CSV and ``/metrics``.

- :class:`SecurityHeaders`: Content-Security-Policy (scripts only from this app), ``X-Frame-Options: DENY``,
  ``nosniff``, ``Referrer-Policy: no-referrer``, cross-origin isolation of the app's resources, a
  Permissions-Policy that turns off what a review page never uses, ``Cache-Control: no-store`` unless the
  response says otherwise (pages, images and CSVs carry patient data; nothing of it may stay in a browser
  cache after logout), and HSTS when the app is reached over TLS.
- :class:`BodyLimit`: a request body longer than ``max_bytes`` is refused with 413 before it is read: at
  once when its Content-Length says so, or as soon as the bytes received pass the cap (chunked uploads).
  Measured before the cap: an anonymous 50 MB ``POST /login`` of ``&&&...`` cost the server 8-10 s of CPU
  in the form parser.

>>> parse_float("2.5", "min_age_h", 0, 10), parse_float("", "min_age_h", 0, 10)
(2.5, None)
>>> parse_float("nan", "min_age_h", 0, 10)
Traceback (most recent call last):
...
review.security.BadInput: 400: min_age_h must be a number from 0 to 10, got 'nan'
>>> tokens_equal("abc", "abc"), tokens_equal("abc", "\\xe9"), tokens_equal("abc", None)
(True, False, False)
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Mapping
from datetime import date

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["DB_INT_MAX", "SECURITY_HEADERS", "BadInput", "BodyLimit", "SecurityHeaders", "parse_date", "parse_float",
           "parse_id", "parse_text", "tokens_equal"]

#: the largest id SQLite's and PostgreSQL's 64-bit integer keys hold
DB_INT_MAX = 2**63 - 1

SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                "img-src 'self' data:; object-src 'none'; frame-ancestors 'none'; "
                                "form-action 'self'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}
HSTS = "max-age=31536000"


class BadInput(HTTPException):
    """A query, path or form value the app cannot use: 400 with the reason (404 for an id out of range)."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(status_code=status_code, detail=message)


def parse_float(value: str | None, name: str, lo: float, hi: float) -> float | None:
    """A finite number in ``[lo, hi]``, or None when empty; :class:`BadInput` otherwise."""
    if value is None or value.strip() == "":
        return None
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    if not (math.isfinite(x) and lo <= x <= hi):
        raise BadInput(f"{name} must be a number from {lo:g} to {hi:g}, got {value[:40]!r}")
    return x


def parse_id(value: object, name: str = "id") -> int:
    """A database id from a path: 1 to 2^63-1; anything else names no row (404)."""
    try:
        n = int(str(value))
    except ValueError:
        n = 0
    if not 1 <= n <= DB_INT_MAX:
        raise BadInput(f"no {name} {str(value)[:40]}", status_code=404)
    return n


def parse_text(value: str | None, name: str, max_len: int = 256) -> str | None:
    """Free text from a query or a form: at most ``max_len`` characters, no control characters (PostgreSQL
    refuses NUL in text; nothing of ours needs the others)."""
    if value is None or value == "":
        return None
    if len(value) > max_len or any(ord(ch) < 32 and ch not in "\t\r\n" or ord(ch) == 127 for ch in value):
        raise BadInput(f"{name} must be at most {max_len} printable characters")
    return value


def parse_date(value: str | None, name: str) -> date | None:
    """An ISO day (``YYYY-MM-DD``), or None when empty."""
    if value is None or value.strip() == "":
        return None
    try:
        return date.fromisoformat(value.strip())
    except ValueError:
        raise BadInput(f"{name} must be a day as YYYY-MM-DD, got {value[:40]!r}") from None


def tokens_equal(expected: str, posted: object) -> bool:
    """Compare a secret token in constant time, as bytes: a posted value that is missing, not text or not
    ASCII is simply unequal (``hmac.compare_digest`` raises on non-ASCII ``str``)."""
    if not isinstance(posted, str) or not posted or not posted.isascii():
        return False
    return hmac.compare_digest(expected.encode("ascii"), posted.encode("ascii"))


class SecurityHeaders:
    """Add :data:`SECURITY_HEADERS` (and ``Cache-Control: no-store``, and HSTS when ``hsts``) to every
    response that does not set its own value."""

    def __init__(self, app: ASGIApp, *, hsts: bool = False) -> None:
        self.app = app
        extra = {"Cache-Control": "no-store", **({"Strict-Transport-Security": HSTS} if hsts else {})}
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in {**SECURITY_HEADERS, **extra}.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *((k, v) for k, v in self.headers if k not in have)]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyLimit:
    """Refuse a request body longer than ``max_bytes`` with 413 (:class:`starlette.exceptions.HTTPException`
    raised where the app reads the body, so the app's own error page answers)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    declared = self.max_bytes + 1  # a Content-Length that is not a number is not believed
        limit = self.max_bytes
        seen = 0

        async def bounded_receive() -> Message:
            nonlocal seen
            if declared is not None and declared > limit:
                raise HTTPException(413, f"the request body is larger than this server accepts ({limit} bytes)")
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, f"the request body is larger than this server accepts ({limit} bytes)")
            return message

        await self.app(scope, bounded_receive, send)
