"""What one attempt to send (or to reach) a destination got: :class:`SendResult` and :class:`EchoResult`, the
same for a C-STORE peer (:mod:`dicom_node.scu`) and a DICOMweb server (:mod:`dicom_node.dicomweb`).

    >>> SendResult(0x0000, None, False).ok, SendResult(200, None, False, http=True).ok
    (True, True)
    >>> SendResult(409, "STOW-RS refused (HTTP 409)", True, http=True).status_text
    'HTTP 409'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Destination

__all__ = ["EchoResult", "SendResult"]


@dataclass(frozen=True)
class SendResult:
    """What one attempt got: the DIMSE status of the last C-STORE (``http``: the HTTP status of the STOW-RS
    request), why it was not a success, and whether retrying can help."""

    status: int | None  # None when no response came
    error: str | None  # why there was no (successful) response
    permanent: bool  # True: retrying cannot help
    http: bool = False  # ``status`` is an HTTP status code

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == (200 if self.http else 0x0000)

    @property
    def warning(self) -> bool:
        return not self.http and self.status is not None and (self.status == 0x0001 or 0xB000 <= self.status <= 0xBFFF)

    @property
    def status_text(self) -> str | None:
        """``0x0000`` (DIMSE) or ``HTTP 200``; None when no response came."""
        if self.status is None:
            return None
        return f"HTTP {self.status}" if self.http else f"0x{self.status:04X}"


@dataclass(frozen=True)
class EchoResult:
    """Whether a destination answers: C-ECHO for a DICOM peer, a QIDO-RS query for a DICOMweb server."""

    ok: bool
    status: int | None
    seconds: float
    error: str | None = None
    http: bool = False

    def describe(self, dest: Destination) -> str:
        where = f"{dest.name} ({dest.describe()})"
        what = "QIDO-RS" if self.http else "C-ECHO"
        if self.ok:
            shown = f"HTTP {self.status}" if self.http else f"status 0x{self.status or 0:04X}"
            return f"{where} answered {what} with {shown} in {self.seconds * 1000:.0f} ms"
        if self.status is not None and not self.error:
            shown = f"HTTP {self.status}" if self.http else f"failure status 0x{self.status:04X}"
            return f"{where} answered {what} with {shown}"
        return f"{where} did NOT answer {what}: {self.error}"
