r"""A received C-STORE on its way to the spool: the Part 10 file meta we write in front of the data set,
and the temporary file the data set is streamed into.

The file is a DICOM Part 10 file: a preamble and file meta information written by us from the request
(SOP Class/Instance UID, the negotiated transfer syntax, the calling AE), then the data set's bytes
exactly as the peer sent them (never decoded and re-encoded), written fragment by fragment as they arrive
to ``<spool>/tmp`` (the spool's own file system: making it durable is an fsync and a link, never a
copy), hashed on the way.
Memory stays bounded for a 500 MB multi-frame.

    >>> meta = file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1", "CT01")
    >>> meta[128:132], len(meta) % 2
    (b'DICM', 0)
    >>> file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3\n", "1.2.840.10008.1.2.1", "CT01")
    Traceback (most recent call last):
    ...
    dicom_node.spool.InvalidUID: Media Storage SOP Instance UID '1.2.3\n' is not a UID (digits and dots, no empty component or leading zero, at most 64 characters, one NUL pad at most)
"""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path

from .receive import Received
from .spool import validate_uid

__all__ = ["IMPLEMENTATION_CLASS_UID", "IMPLEMENTATION_VERSION", "TempSink", "file_meta"]

#: specgate's Implementation Class UID (a 2.25 UUID-derived UID) and version name, in the A-ASSOCIATE-AC
#: and in the file meta of every received file.
IMPLEMENTATION_CLASS_UID = "2.25.251427363747103947605429287917103215998"
IMPLEMENTATION_VERSION = "SPECGATE_01"
_temp_names = itertools.count()


def _explicit_le(elements: list[tuple[int, int, bytes, bytes]]) -> bytes:
    out = bytearray()
    for group, elem, vr, value in elements:
        if vr in (b"OB", b"UN"):
            out += group.to_bytes(2, "little") + elem.to_bytes(2, "little") + vr + b"\0\0" \
                + len(value).to_bytes(4, "little") + value
        else:
            out += group.to_bytes(2, "little") + elem.to_bytes(2, "little") + vr \
                + len(value).to_bytes(2, "little") + value
    return bytes(out)


def _pad(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, calling_ae: str) -> bytes:
    """Preamble, 'DICM' and the file meta group for a received data set (PS3.10 7.1), from the request's
    UIDs, which must be UIDs (:func:`dicom_node.spool.validate_uid`, the rule every entry uses; raises
    :class:`dicom_node.spool.InvalidUID`)."""
    sop_class = validate_uid(sop_class, what="Media Storage SOP Class UID")
    sop_instance = validate_uid(sop_instance, what="Media Storage SOP Instance UID")
    body = _explicit_le([
        (0x0002, 0x0001, b"OB", b"\x00\x01"),
        (0x0002, 0x0002, b"UI", _pad(sop_class.encode("ascii"), b"\0")),
        (0x0002, 0x0003, b"UI", _pad(sop_instance.encode("ascii"), b"\0")),
        (0x0002, 0x0010, b"UI", _pad(transfer_syntax.encode("ascii"), b"\0")),
        (0x0002, 0x0012, b"UI", _pad(IMPLEMENTATION_CLASS_UID.encode("ascii"), b"\0")),
        (0x0002, 0x0013, b"SH", _pad(IMPLEMENTATION_VERSION.encode("ascii"), b" ")),
        (0x0002, 0x0016, b"AE", _pad(calling_ae.encode("ascii", errors="replace")[:16], b" ")),
    ])
    group_length = _explicit_le([(0x0002, 0x0000, b"UL", len(body).to_bytes(4, "little"))])
    return b"\0" * 128 + b"DICM" + group_length + body


class TempSink:
    """A C-STORE's data set on its way to disk: a temporary file in the spool, hashed while written.

    Storage failures never raise: a file that cannot be created (the folder is read-only, no inodes
    left) or a write that fails (the disk is full) sets :attr:`error`, removes the file at once and
    swallows the rest of the data set, so that the association can still answer this message (0xA700)
    and go on with the next."""

    def __init__(self, tmp_dir: Path, prefix: bytes) -> None:
        self.fd: int | None = None
        self.error: OSError | None = None
        self.hash = hashlib.sha256(prefix)  # the digest is the whole file's
        self.offset = len(prefix)
        self.length = 0
        while True:
            self.path = tmp_dir / f"{os.getpid()}.{next(_temp_names)}.part"
            try:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                break
            except FileExistsError:  # left by an earlier process with the same pid
                continue
            except OSError as exc:
                self.error = exc
                return
        self._write(memoryview(prefix))

    def _write(self, piece: memoryview) -> None:
        if self.fd is None:
            return
        try:
            while piece:
                piece = piece[os.write(self.fd, piece):]
        except OSError as exc:
            self.error = exc
            self.discard()

    def write(self, piece: memoryview) -> None:
        self.length += len(piece)
        self.hash.update(piece)
        self._write(piece)

    def finish(self) -> Received:
        assert self.fd is not None
        os.close(self.fd)
        self.fd = None
        return Received(size=self.offset + self.length, sha256=self.hash.hexdigest(), dataset_length=self.length)

    def discard(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
