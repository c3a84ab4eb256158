"""What a compressed frame says it is, read from its first bytes before anything decodes it.

A decoder allocates what a codestream's header declares: a JPEG 2000 SIZ marker that declares
65535 x 65535 pixels asks for 8 GiB before one byte of image data is read. The SCP reads the header of
the first frame of an encapsulated data set as it arrives (:class:`dicom_node.dataset_stream.DataSetStream`)
and refuses it when the header disagrees with the data set's Rows, Columns, Samples per Pixel and Bits
Allocated, which bound what pydicom's decoders allocate. This module only reads markers: a scan of the
first kilobytes, never a decode (decoding is the libraries', in the worker).

Read per transfer syntax (:data:`CODESTREAMS`):

* ``jpeg`` (ISO 10918-1, JPEG Baseline, Extended, Lossless): SOI, then marker segments up to the first
  SOFn (C0-C3, C5-C7, C9-CB, CD-CF): precision, lines, samples per line, components;
* ``jpeg-ls`` (ISO 14495-1): the same layout, marker SOF55 (FFF7);
* ``j2k`` (ISO 15444-1 and -15, JPEG 2000 and HTJ2K): SOC then SIZ: the image area (Xsiz - XOsiz,
  Ysiz - YOsiz), components (Csiz) and each component's bit depth (Ssiz); inside a JP2 file's boxes when
  the codestream is wrapped (its ``jp2c`` box);
* ``rle`` (PS3.5 G.3): the 64-byte RLE header: the number of segments (1 to 15), the first at offset 64.

    >>> read_header("jpeg-ls", bytes.fromhex("ffd8 fff7 000b 10 0020 0040 01 01 11 00"))
    CodestreamHeader(kind='jpeg-ls', rows=32, columns=64, components=1, precision=16, segments=None)
    >>> read_header("jpeg", bytes.fromhex("ffd8 ffe0 0004 0000"))  # SOF not yet in these bytes
    >>> read_header("jpeg", b"GIF89a")
    Traceback (most recent call last):
    ...
    dicom_node.codestream.CodestreamError: the jpeg codestream does not start with SOI (FFD8) but 47494638
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["CODESTREAMS", "CodestreamError", "CodestreamHeader", "read_header"]

#: transfer syntax -> the kind of codestream its fragments hold
CODESTREAMS: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "jpeg",  # JPEG Baseline (Process 1), lossy
    "1.2.840.10008.1.2.4.51": "jpeg",  # JPEG Extended (Process 2 & 4), lossy
    "1.2.840.10008.1.2.4.57": "jpeg",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70": "jpeg",  # JPEG Lossless, First-Order Prediction (Process 14, SV1)
    "1.2.840.10008.1.2.4.80": "jpeg-ls",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "jpeg-ls",  # JPEG-LS Lossy (Near-Lossless)
    "1.2.840.10008.1.2.4.90": "j2k",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.91": "j2k",  # JPEG 2000, lossy or lossless
    "1.2.840.10008.1.2.4.201": "j2k",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": "j2k",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": "j2k",  # HTJ2K, lossy or lossless
    "1.2.840.10008.1.2.5": "rle",  # RLE Lossless
}

_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_SOF55 = 0xF7
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RSTn: no length follows
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


class CodestreamError(ValueError):
    """The first bytes of a frame are not the codestream its transfer syntax names."""


@dataclass(frozen=True)
class CodestreamHeader:
    """What a frame's codestream declares. ``precision``: bits per sample (the largest over J2K's
    components); ``segments``: RLE only (rows, columns and components are not in an RLE header: None)."""

    kind: str
    rows: int | None
    columns: int | None
    components: int | None
    precision: int | None
    segments: int | None = None


def read_header(kind: str, data: bytes) -> CodestreamHeader | None:
    """The header of the codestream of ``kind`` (a value of :data:`CODESTREAMS`) that starts ``data``;
    None when ``data`` ends before the header does (more bytes may tell). Raises
    :class:`CodestreamError` naming what is wrong when the bytes are not such a codestream."""
    if kind == "jpeg":
        return _jpeg(data, kind, _SOF)
    if kind == "jpeg-ls":
        return _jpeg(data, kind, frozenset({_SOF55}))
    if kind == "j2k":
        return _j2k_or_jp2(data)
    if kind == "rle":
        return _rle(data)
    raise ValueError(f"unknown codestream kind {kind!r}; expected one of {sorted(set(CODESTREAMS.values()))}")


def _jpeg(data: bytes, kind: str, sof: frozenset[int]) -> CodestreamHeader | None:
    """ISO 10918-1 B.2 / ISO 14495-1 C.2: SOI, then segments (FFxx, a 2-byte length that counts itself)."""
    if len(data) < 2:
        return None
    if data[:2] != b"\xff\xd8":
        raise CodestreamError(f"the {kind} codestream does not start with SOI (FFD8) but {data[:4].hex()}")
    pos = 2
    while True:
        while pos < len(data) and data[pos] == 0xFF and pos + 1 < len(data) and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes before a marker (B.1.1.2)
        if pos + 2 > len(data):
            return None
        if data[pos] != 0xFF:
            raise CodestreamError(f"the {kind} codestream has {data[pos]:02X} at byte {pos} where a marker belongs")
        marker = data[pos + 1]
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in (0xD8, 0xD9, 0xDA):
            raise CodestreamError(f"the {kind} codestream reaches marker FF{marker:02X} before its frame header")
        if pos + 4 > len(data):
            return None
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2:
            raise CodestreamError(f"the {kind} codestream's marker FF{marker:02X} declares a length of {length}")
        if marker in sof:
            if length < 8:
                raise CodestreamError(f"the {kind} frame header FF{marker:02X} is {length} bytes, under 8")
            if pos + 10 > len(data):
                return None
            precision, rows, columns, components = struct.unpack_from(">BHHB", data, pos + 4)
            return CodestreamHeader(kind, rows, columns, components, precision)
        if marker in _SOF or marker == _SOF55:  # the other standard's frame header
            raise CodestreamError(f"the {kind} codestream has frame header FF{marker:02X}, of another "
                                  f"standard than its transfer syntax's")
        pos += 2 + length


def _j2k_or_jp2(data: bytes) -> CodestreamHeader | None:
    if len(data) < 12:
        return None
    if data[:12] == _JP2_SIGNATURE:
        return _jp2(data)
    return _j2k(data, 0)


def _jp2(data: bytes) -> CodestreamHeader | None:
    """ISO 15444-1 I.4: boxes (LBox, TBox[, XLBox]) up to the contiguous codestream box ``jp2c``."""
    pos = 0
    while True:
        if pos + 8 > len(data):
            return None
        length, box = struct.unpack_from(">I4s", data, pos)
        header = 8
        if length == 1:
            if pos + 16 > len(data):
                return None
            (length,) = struct.unpack_from(">Q", data, pos + 8)
            header = 16
        if box == b"jp2c":
            return _j2k(data, pos + header)
        if length == 0:  # the last box, to the end of the file, and not the codestream
            raise CodestreamError(f"the JP2 file's last box is {box!r}, no codestream box (jp2c) before it")
        if length < header:
            raise CodestreamError(f"the JP2 box {box!r} at byte {pos} declares {length} bytes, under its header")
        pos += length


def _j2k(data: bytes, start: int) -> CodestreamHeader | None:
    """ISO 15444-1 A.5.1: SOC (FF4F) then SIZ (FF51): Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz,
    XTOsiz, YTOsiz, Csiz, then Ssiz, XRsiz, YRsiz per component."""
    if start + 4 > len(data):
        return None
    if data[start:start + 4] != b"\xff\x4f\xff\x51":
        raise CodestreamError(f"the JPEG 2000 codestream does not start with SOC and SIZ (FF4FFF51) but "
                              f"{data[start:start + 4].hex()}")
    if start + 42 > len(data):
        return None
    lsiz, _rsiz, xsiz, ysiz, xo, yo, _xt, _yt, _xto, _yto, csiz = struct.unpack_from(">HHIIIIIIIIH", data, start + 4)
    if csiz < 1 or lsiz != 38 + 3 * csiz:
        raise CodestreamError(f"the JPEG 2000 SIZ marker declares {csiz} components in {lsiz} bytes")
    if xo >= xsiz or yo >= ysiz:
        raise CodestreamError(f"the JPEG 2000 SIZ marker declares an empty image ({xsiz}x{ysiz} from {xo},{yo})")
    end = start + 42 + 3 * csiz
    if end > len(data):
        return None
    depth = max((data[start + 42 + 3 * i] & 0x7F) + 1 for i in range(csiz))
    return CodestreamHeader("j2k", ysiz - yo, xsiz - xo, csiz, depth)


def _rle(data: bytes) -> CodestreamHeader | None:
    """PS3.5 G.5: 16 unsigned 32-bit little-endian values: the number of segments, then their offsets."""
    if len(data) < 64:
        return None
    segments, first = struct.unpack_from("<II", data)
    if not 1 <= segments <= 15:
        raise CodestreamError(f"the RLE header declares {segments} segments (1 to 15 allowed)")
    if first != 64:
        raise CodestreamError(f"the RLE header's first segment starts at byte {first}, not 64")
    return CodestreamHeader("rle", None, None, None, None, segments)
