"""The DICOM Upper Layer (PS3.8) and DIMSE command sets (PS3.7), as the SCP needs them.

The acceptor side of an association is small: one A-ASSOCIATE-RQ to decode, an A-ASSOCIATE-AC/RJ to
send, then P-DATA-TF PDUs whose presentation data values (PDVs) are either command fragments (a few
hundred bytes, Implicit VR Little Endian, PS3.7 E) or data set fragments (the instance, streamed to disk
by :mod:`dicom_node.scp`), and finally an A-RELEASE or an A-ABORT. This module holds the byte layouts;
it does no I/O except through :class:`Reader`, which reads from a connected socket (plain or TLS).

pynetdicom is still used for what happens once per association (decoding the A-ASSOCIATE-RQ's items,
presentation-context negotiation, encoding the A-ASSOCIATE-AC), where its care for the standard's corners
is worth more than speed; the per-PDU path is here, because pynetdicom's (two threads per association,
a reactor polling queues, every fragment decoded into objects) cost more than the rest of a C-STORE.

    >>> cmd = encode_command([(0x0100, "US", 0x8030), (0x0120, "US", 7), (0x0800, "US", 0x0101),
    ...                       (0x0900, "US", 0)])
    >>> fields = decode_command(cmd)
    >>> us(fields[0x0100]), us(fields[0x0120]), us(fields[0x0900])
    (32816, 7, 0)
    >>> decode_command(cmd[:-1])
    Traceback (most recent call last):
    ...
    dicom_node.ul.ProtocolError: command element (0000,0900) runs past the end of the command set
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterable

__all__ = [
    "A_ABORT",
    "A_ASSOCIATE_RQ",
    "A_RELEASE_RQ",
    "P_DATA_TF",
    "PeerClosed",
    "ProtocolError",
    "Reader",
    "associate_rq_uids",
    "decode_command",
    "encode_abort",
    "encode_command",
    "encode_pdata",
    "encode_reject",
    "RELEASE_RP",
    "ui",
    "us",
]

# PDU types (PS3.8 9.3)
A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

RELEASE_RP = struct.pack(">BBII", A_RELEASE_RP, 0, 4, 0)

# A-ABORT reasons when the source is the service provider (0x02), PS3.8 9.3.8
ABORT_NOT_SPECIFIED = 0x00
ABORT_UNRECOGNISED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PARAMETER = 0x06

_PDU_HEADER = struct.Struct(">BBI")
_PDV_HEADER = struct.Struct(">IBB")
_ELEMENT = struct.Struct("<HHI")


class PeerClosed(Exception):
    """The peer closed the connection (end of stream)."""


class ProtocolError(Exception):
    """The peer broke the protocol, or a bound on what it may send; the association is aborted with
    ``reason`` (PS3.8 9.3.8). ``code``: a short name for audit rows and metrics (a fixed set in our code)."""

    def __init__(self, message: str, reason: int = ABORT_INVALID_PARAMETER, code: str = "protocol_error") -> None:
        super().__init__(message)
        self.reason = reason
        self.code = code


class Reader:
    """Buffered reads from a connected socket: small exact reads for headers, and :meth:`stream` that
    hands large values to a sink in pieces (bounded memory, one copy out of the kernel)."""

    def __init__(self, sock: socket.socket, size: int = 1 << 20) -> None:
        self.sock = sock
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    def _recv(self) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):  # move the unread tail to the front
            n = self._end - self._start
            self._buf[:n] = self._buf[self._start:self._end]
            self._start, self._end = 0, n
        got = self.sock.recv_into(self._view[self._end:])
        if got == 0:
            raise PeerClosed("the peer closed the connection")
        self._end += got

    def exact(self, n: int) -> bytes:
        """Exactly ``n`` bytes (``n`` at most the buffer size)."""
        while self._end - self._start < n:
            self._recv()
        out = bytes(self._view[self._start:self._start + n])
        self._start += n
        return out

    def stream(self, n: int, sink: Callable[[memoryview], None]) -> None:
        """Pass the next ``n`` bytes to ``sink`` in one or more pieces."""
        while n > 0:
            if self._start == self._end:
                self._recv()
            k = min(n, self._end - self._start)
            sink(self._view[self._start:self._start + k])
            self._start += k
            n -= k

    def pdu_header(self) -> tuple[int, int]:
        """(PDU type, length) of the next PDU."""
        pdu_type, _, length = _PDU_HEADER.unpack(self.exact(6))
        return pdu_type, length

    def pdv_header(self) -> tuple[int, int, int]:
        """(item length, presentation context ID, message control header) of the next PDV."""
        length, context_id, control = _PDV_HEADER.unpack(self.exact(6))
        return length, context_id, control

    def skip(self, n: int) -> None:
        self.stream(n, lambda _piece: None)


# ------------------------------------------------------------------------------------ PDUs we send
def encode_reject(result: int, source: int, diagnostic: int) -> bytes:
    """A-ASSOCIATE-RJ (PS3.8 9.3.4)."""
    return struct.pack(">BBIBBBB", A_ASSOCIATE_RJ, 0, 4, 0, result, source, diagnostic)


def encode_abort(source: int = 0x02, reason: int = 0x00) -> bytes:
    """A-ABORT (PS3.8 9.3.8); source 0x00 = service user (reason not significant), 0x02 = provider."""
    return struct.pack(">BBIBBBB", A_ABORT, 0, 4, 0, 0, source, reason if source == 0x02 else 0)


def encode_pdata(context_id: int, command: bool, data: bytes, max_pdu: int) -> bytes:
    """``data`` as P-DATA-TF PDUs of at most ``max_pdu`` bytes each (0: no limit), one PDV per PDU; the
    last fragment carries the 'last' bit (PS3.8 E.2)."""
    chunk = len(data) if max_pdu == 0 else max(1, max_pdu - 6)
    flag = 0x01 if command else 0x00
    out = bytearray()
    pos = 0
    while True:
        piece = data[pos:pos + chunk]
        pos += len(piece)
        last = pos >= len(data)
        out += _PDU_HEADER.pack(P_DATA_TF, 0, len(piece) + 6)
        out += _PDV_HEADER.pack(len(piece) + 2, context_id, flag | (0x02 if last else 0x00))
        out += piece
        if last:
            return bytes(out)


def associate_rq_uids(pdu: bytes) -> list[tuple[str, bytes]]:
    """The UIDs of an A-ASSOCIATE-RQ (the whole PDU) that negotiation acts on, as (what, raw value):
    the application context name, and each presentation context's abstract and transfer syntaxes
    (PS3.8 9.3.2), read from the PDU's own bytes, since pynetdicom's decoder strips whitespace from them.
    The Implementation Class UID and the other user information items are not among them: we never act
    on them. Raises :class:`ProtocolError` when an item runs past the end of the PDU.

        >>> rq = bytes(74) + bytes([0x10, 0, 0, 3]) + b"1.2"
        >>> associate_rq_uids(rq)
        [('application context name', b'1.2')]
    """
    out: list[tuple[str, bytes]] = []

    def items(start: int, end: int) -> Iterable[tuple[int, int, int]]:
        pos = start
        while pos < end:
            if pos + 4 > end:
                raise ProtocolError("A-ASSOCIATE-RQ ends inside an item header")
            item_type, length = pdu[pos], struct.unpack_from(">H", pdu, pos + 2)[0]
            if pos + 4 + length > end:
                raise ProtocolError(f"A-ASSOCIATE-RQ item 0x{item_type:02X} runs past its end")
            yield item_type, pos + 4, pos + 4 + length
            pos += 4 + length

    for item_type, start, end in items(74, len(pdu)):
        if item_type == 0x10:
            out.append(("application context name", pdu[start:end]))
        elif item_type == 0x20:
            for sub_type, sub_start, sub_end in items(start + 4, end):
                if sub_type == 0x30:
                    out.append(("abstract syntax", pdu[sub_start:sub_end]))
                elif sub_type == 0x40:
                    out.append(("transfer syntax", pdu[sub_start:sub_end]))
    return out


# ------------------------------------------------------------------------------- DIMSE commands
def decode_command(data: bytes) -> dict[int, bytes]:
    """A command set (group 0000, Implicit VR Little Endian) as {element number: raw value}.

    Raises :class:`ProtocolError` for an element outside group 0000 or one that runs past the end.
    """
    out: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if pos + 8 > end:
            raise ProtocolError("command set ends inside an element header")
        group, elem, length = _ELEMENT.unpack_from(data, pos)
        if group != 0x0000:
            raise ProtocolError(f"element ({group:04X},{elem:04X}) in a command set")
        pos += 8
        if length > end - pos:
            raise ProtocolError(f"command element (0000,{elem:04X}) runs past the end of the command set")
        out[elem] = data[pos:pos + length]
        pos += length
    return out


def us(value: bytes | None) -> int | None:
    """An US value (None when absent or not two bytes)."""
    return struct.unpack("<H", value)[0] if value is not None and len(value) == 2 else None


def ui(value: bytes | None) -> str:
    """A UI (or other text) value as text, padding removed; bytes that are not ASCII are kept as
    U+FFFD so that the value can be shown and is never a valid UID."""
    if value is None:
        return ""
    return value.decode("ascii", errors="replace").rstrip("\x00 ")


def _value(vr: str, value: int | str | bytes) -> bytes:
    if vr == "US":
        return struct.pack("<H", int(value))  # type: ignore[arg-type]
    if vr == "UL":
        return struct.pack("<I", int(value))  # type: ignore[arg-type]
    raw = value if isinstance(value, bytes) else str(value).encode("ascii", errors="replace")
    if len(raw) % 2:
        raw += b"\x00" if vr == "UI" else b" "
    return raw


def encode_command(elements: Iterable[tuple[int, str, int | str | bytes]]) -> bytes:
    """A command set from (element number, VR, value), sorted, with its Command Group Length first."""
    body = b"".join(_ELEMENT.pack(0x0000, elem, len(v)) + v
                    for elem, v in sorted((elem, _value(vr, value)) for elem, vr, value in elements
                                          if elem != 0x0000))
    return _ELEMENT.pack(0x0000, 0x0000, 4) + struct.pack("<I", len(body)) + body
