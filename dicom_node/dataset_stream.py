"""A data set checked while it arrives: its element structure (PS3.5 7) read fragment by fragment,
before anything it declares is allocated, written or decoded.

Why here, on the stream: the rest of the node trusts sizes that a peer declares. pydicom, asked for one
element of a data set, reads whatever length that element declares (an Implicit VR Study Instance UID that
declares 160 MiB is 160 MiB in memory, several times over); it recurses once per nested sequence; and it
inflates a deflated data set whole in memory (half a megabyte on the wire inflated to 512 MiB drove the
SCP from 120 MiB to 1.1 GiB). Read here, every element header is seen once as it passes, and a data set
is refused (:class:`dicom_node.receive.Refused`, 0xC000) as soon as it

* has an element that declares more than ``element_bytes`` (pixel data excepted) or more than is left of
  the instance's cap ``instance_bytes``: ``element_too_long``;
* nests sequences deeper than ``sequence_depth``: ``sequence_too_deep``;
* inflates (deflated transfer syntax) past ``inflated_bytes``, or has an element that declares more than
  is left of it: ``inflated_too_large``; inflation runs with a hard output cap per call (``zlib``
  ``max_length``), so no more than 256 KiB is ever inflated at once;
* holds compressed pixel data (an encapsulated transfer syntax of :data:`dicom_node.codestream.CODESTREAMS`)
  whose frames would decode past ``instance_bytes`` (Rows x Columns x Number of Frames x Samples per Pixel
  x Bits Allocated / 8, the values collected as they pass at the top level): ``codestream_too_large``, when
  the pixel data element opens; or whose first frame's codestream header (read from its first 64 KiB,
  after the Basic Offset Table) declares another size, component count or a precision over Bits Allocated:
  ``codestream_mismatch``; or is not the syntax's codestream at all: ``codestream_invalid``;
* is broken where its structure matters (an item where an element belongs, an element running past the
  item or sequence that holds it, file meta information inside it, a deflate stream that does not
  inflate): ``undecodable``; or ends inside an element or an open sequence: ``truncated``.

Values are skipped, never held, except those of the few top-level elements the ledger indexes an instance
by (:data:`dicom_node.elements.HEADER_TAGS`: the UIDs, modality, body part, series description, station
name; a few dozen bytes each) and, for a compressed image, the five Image Pixel values above and its first
frame's first 64 KiB at most, which are collected as they pass: :meth:`DataSetStream.header` gives them
to :class:`dicom_node.receive.InstanceReceiver` once the data set has ended, so the file is not read again
and pydicom is asked only when the walk cannot be sure (a value not in ASCII or with several values, an
element out of order or twice, a value longer than any of these can be). For a deflated data set they
are collected from the inflated bytes. Where the encoding leaves room the rules are pydicom's, so that
what it reads is what is checked: an explicit VR that is not two capital letters is read as implicit,
Explicit VR "UN" of undefined length holds Implicit VR Little Endian items (PS3.5 6.2.2), and an Implicit VR
element is a sequence when its length is undefined (pixel data excepted) or the dictionary says SQ.
Checking costs one small header parse per element: nothing for the megabytes of pixel data, which are
skipped by their length.

    >>> from dicom_node.config import ReceiveLimits
    >>> s = DataSetStream("1.2.840.10008.1.2.1", ReceiveLimits(sequence_depth=2))
    >>> sq = bytes.fromhex("09001010 5351 0000 ffffffff") + bytes.fromhex("feff00e0 ffffffff")
    >>> s.feed(sq * 2)
    >>> s.feed(sq)
    Traceback (most recent call last):
    ...
    dicom_node.receive.Refused: 0xC000 sequence_too_deep: sequences nested deeper than 2 levels (element (0009,1010) opens level 3)
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .codestream import CODESTREAMS, CodestreamError, read_header
from .config import ReceiveLimits
from .elements import (
    DEFLATED,
    EXPLICIT_BE,
    HEADER_TAGS,
    IMPLICIT_LE,
    ITEM,
    ITEM_END,
    LONG_VRS,
    PIXEL_TAGS,
    SEQUENCE_END,
    UNDEFINED,
    dictionary_vr,
    tag_str,
)
from .receive import CANNOT_UNDERSTAND, HeaderValues, Received, Refused

__all__ = ["DEFLATED", "DataSetStream", "received_from_file"]

_INFLATE_CHUNK = 1 << 18
_VALUE_CAP = 256  # longer than any header value can be (a UID: 64): pydicom reads such a header
_CODESTREAM_HEAD = 1 << 16  # bytes of the first frame read for its codestream's header
# the Image Pixel attributes that bound a compressed frame's decoded size (read from the top level)
_ROWS, _COLUMNS, _SAMPLES, _BITS_ALLOCATED, _FRAMES = 0x00280010, 0x00280011, 0x00280002, 0x00280100, 0x00280008
_IMAGE_TAGS = frozenset({_ROWS, _COLUMNS, _SAMPLES, _BITS_ALLOCATED, _FRAMES})

# what a level of the data set holds
_ELEMENTS, _ITEMS, _FRAGMENTS = 0, 1, 2


@dataclass
class _Level:
    kind: int  # _ELEMENTS (the data set, an item), _ITEMS (a sequence), _FRAGMENTS (encapsulated)
    end: int | None  # offset where it ends; None: undefined length, ends at its delimiter
    implicit: bool
    little: bool
    pixel: bool = False  # _FRAGMENTS of pixel data (bounded by the instance, not by element_bytes)


@dataclass
class _Encapsulated:
    """The top-level encapsulated pixel data of a compressed transfer syntax, while its fragments pass:
    the first bytes of its first frame are kept (after the Basic Offset Table) until their codestream
    header is read and checked."""

    kind: str  # a value of dicom_node.codestream.CODESTREAMS
    fragments: int = 0
    head: bytearray = field(default_factory=bytearray)
    capturing: bool = False
    checked: bool = False


def _undecodable(detail: str) -> Refused:
    return Refused(CANNOT_UNDERSTAND, "undecodable", detail)


class DataSetStream:
    """Feed it a data set's bytes as they arrive (:meth:`feed`), then :meth:`finish`; either raises
    :class:`dicom_node.receive.Refused` the moment the data set is refused. ``transfer_syntax``: the
    presentation context's."""

    def __init__(self, transfer_syntax: str, limits: ReceiveLimits) -> None:
        self.limits = limits
        self.deflated = transfer_syntax == DEFLATED
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS) if self.deflated else None
        self._cap = limits.inflated_bytes if self.deflated else limits.instance_bytes
        implicit, little = transfer_syntax == IMPLICIT_LE, transfer_syntax != EXPLICIT_BE
        self._levels = [_Level(_ELEMENTS, None, implicit, little)]
        self._depth = 0  # sequences open
        self._pos = 0  # bytes of the (inflated) data set walked so far
        self._skip = 0  # bytes of the current value still to pass
        self._header = b""  # an element or item header split between two pieces
        self._values: dict[int, bytes] = {}  # top-level HEADER_TAGS and _IMAGE_TAGS values, as sent
        self._little = little  # the top level's byte order (for the Image Pixel values)
        self._codestream = CODESTREAMS.get(transfer_syntax)  # the kind of codestream its fragments hold
        self._encapsulated: _Encapsulated | None = None
        self._capture: tuple[int, bytearray] | None = None  # the collected value now passing
        self._previous = -1  # the last top-level tag
        self._sure = True  # False: the collected values may not be what pydicom would read
        self.has_pixel_data = False

    @property
    def length(self) -> int:
        """The data set's length so far (inflated, for a deflated one)."""
        return self._pos

    def header(self) -> HeaderValues | None:
        """The indexed header values as sent (after :meth:`finish`), or None when pydicom must read them
        (see the module's docstring)."""
        if not self._sure:
            return None
        values = {}
        for tag, keyword in HEADER_TAGS.items():
            raw = self._values.get(tag)
            if raw is None:
                continue
            if not raw.isascii() or b"\\" in raw:
                return None
            values[keyword] = raw.decode("ascii")
        return HeaderValues(values, self.has_pixel_data)

    # ------------------------------------------------------------------------------------ public
    def feed(self, piece: bytes | memoryview) -> None:
        if self._inflater is None:
            self._walk(piece)
            return
        data: bytes | memoryview = piece
        try:
            while True:
                out = self._inflater.decompress(data, _INFLATE_CHUNK)
                if out:
                    if self._pos + len(out) > self._cap:
                        raise Refused(CANNOT_UNDERSTAND, "inflated_too_large",
                                      f"the deflated data set inflates to more than {self._cap} bytes")
                    self._walk(out)
                data = self._inflater.unconsumed_tail
                if self._inflater.eof or (not data and len(out) < _INFLATE_CHUNK):
                    return  # (bytes after the end of the deflate stream, a pad, are ignored)
        except zlib.error as exc:
            raise _undecodable(f"the deflated data set cannot be inflated ({exc})") from exc

    def finish(self) -> None:
        """The data set has ended: raises ``truncated`` when it ended inside something."""
        if self._inflater is not None and not self._inflater.eof:
            raise Refused(CANNOT_UNDERSTAND, "truncated", "the deflated data set ends before its deflate stream")
        if self._skip or self._header:
            raise Refused(CANNOT_UNDERSTAND, "truncated",
                          f"the data set ends at byte {self._pos} inside an element "
                          f"({self._skip or len(self._header)} bytes missing)")
        if len(self._levels) > 1:
            raise Refused(CANNOT_UNDERSTAND, "truncated",
                          f"the data set ends at byte {self._pos} with {len(self._levels) - 1} sequences or items "
                          "still open")

    # ----------------------------------------------------------------------------------- walking
    def _walk(self, data: bytes | memoryview) -> None:
        n, i = len(data), 0
        while i < n:
            if self._skip:
                k = min(self._skip, n - i)
                encapsulated = self._encapsulated
                if self._capture is not None:
                    self._capture[1].extend(data[i:i + k])
                elif encapsulated is not None and encapsulated.capturing:
                    room = _CODESTREAM_HEAD - len(encapsulated.head)
                    encapsulated.head += data[i:i + min(k, room)]
                    if k >= room or k == self._skip:  # its header's bytes are here, or all there will be
                        self._check_codestream(encapsulated, final=False)
                self._skip -= k
                self._pos += k
                i += k
                if not self._skip:
                    if self._capture is not None:
                        self._values[self._capture[0]] = bytes(self._capture[1])
                        self._capture = None
                    self._close()
                continue
            need = 12 if len(self._header) >= 8 else 8
            k = min(need - len(self._header), n - i)
            self._header += bytes(data[i:i + k])
            self._pos += k
            i += k
            if len(self._header) == need and not self._element(self._header):
                self._header = b""
                self._close()

    def _close(self) -> None:
        """Close the items and sequences of defined length that end here."""
        levels = self._levels
        while len(levels) > 1 and levels[-1].end == self._pos:
            if levels.pop().kind == _ITEMS:
                self._depth -= 1

    def _element(self, h: bytes) -> bool:
        """Act on one header ``h`` (8 bytes, or 12 once more were asked for); True: it needs 12."""
        level = self._levels[-1]
        e = "<" if level.little else ">"
        group, elem = struct.unpack_from(e + "HH", h)
        tag = group << 16 | elem
        if level.end is not None and self._pos > level.end:
            raise _undecodable(f"{tag_str(tag)} at byte {self._pos - len(h)} runs past the item or sequence holding it")
        if level.kind != _ELEMENTS:
            self._item(level, tag, struct.unpack_from(e + "I", h, 4)[0])
            return False
        if tag == ITEM_END and level.end is None and len(self._levels) > 1:
            self._levels.pop()
            return False
        if group == 0xFFFE:
            raise _undecodable(f"{tag_str(tag)} at byte {self._pos - 8} where a data element belongs")
        if group == 0x0002 and len(self._levels) == 1:
            raise Refused(CANNOT_UNDERSTAND, "file_meta_in_dataset",
                          f"file meta information {tag_str(tag)} inside the data set")
        vr: bytes | None = None
        if level.implicit:
            length = struct.unpack_from(e + "I", h, 4)[0]
        else:
            vr = h[4:6]
            if vr in LONG_VRS:
                if len(h) < 12:
                    return True
                length = struct.unpack_from(e + "I", h, 8)[0]
            elif b"AA" <= vr <= b"ZZ":  # a short VR (or one pydicom also reads with a 2-byte length)
                length = struct.unpack_from(e + "H", h, 6)[0]
            else:  # not a VR: pydicom reads this element as Implicit VR
                vr = None
                length = struct.unpack_from(e + "I", h, 4)[0]
        top = len(self._levels) == 1
        if length == UNDEFINED:
            if top:
                self._seen(tag, None)
            self._undefined(level, tag, vr)
            return False
        self._check_length(tag, length, pixel=tag in PIXEL_TAGS)
        if vr == b"SQ" or (vr is None and dictionary_vr(tag) == "SQ"):
            if top:
                self._seen(tag, None)
            self._open(_Level(_ITEMS, self._pos + length, level.implicit, level.little), tag)
        else:
            self._skip = length
            if top:
                self._seen(tag, length)
        return False

    def _seen(self, tag: int, length: int | None) -> None:
        """A top-level element: note pixel data, collect a header value (``length``: of a plain value whose
        bytes come next; None: a sequence or encapsulated data)."""
        if tag <= self._previous:
            self._sure = False  # out of order or twice: which one pydicom keeps is its business
        self._previous = tag
        if tag in PIXEL_TAGS:
            self.has_pixel_data = True
        if tag not in HEADER_TAGS and tag not in _IMAGE_TAGS:
            return
        if length is None or length > _VALUE_CAP:
            if tag in HEADER_TAGS:
                self._sure = False
        elif length == 0:
            self._values[tag] = b""
        else:
            self._capture = (tag, bytearray())

    def _undefined(self, level: _Level, tag: int, vr: bytes | None) -> None:
        """An element of undefined length: a sequence, or encapsulated fragments."""
        pixel = tag in PIXEL_TAGS
        if vr == b"UN":  # PS3.5 6.2.2: a sequence in Implicit VR Little Endian
            self._open(_Level(_ITEMS, None, True, True), tag)
        elif vr == b"SQ" or (vr is None and not pixel and dictionary_vr(tag) in ("SQ", None)):
            self._open(_Level(_ITEMS, None, level.implicit, level.little), tag)
        elif pixel or vr in (b"OB", b"OW") or vr is None:
            if pixel and len(self._levels) == 1 and self._codestream is not None:
                self._encapsulated = _Encapsulated(self._codestream)
                self._check_decoded_size()
            self._levels.append(_Level(_FRAGMENTS, None, level.implicit, level.little, pixel=pixel))
        else:
            raise _undecodable(f"{tag_str(tag)} {vr.decode('ascii', 'replace')} of undefined length")

    def _item(self, level: _Level, tag: int, length: int) -> None:
        """A header inside a sequence (an item or its end) or inside encapsulated data (a fragment)."""
        if tag == SEQUENCE_END and level.end is None:
            encapsulated = self._encapsulated
            if level.pixel and len(self._levels) == 2 and encapsulated is not None and not encapsulated.checked:
                self._check_codestream(encapsulated, final=True)
            if self._levels.pop().kind == _ITEMS:
                self._depth -= 1
            return
        if tag != ITEM:
            raise _undecodable(f"{tag_str(tag)} at byte {self._pos - 8} where an item belongs")
        if level.kind == _FRAGMENTS:
            if length == UNDEFINED:
                raise _undecodable(f"a fragment of undefined length at byte {self._pos - 8}")
            self._check_length(tag, length, pixel=level.pixel, what="a fragment")
            self._skip = length
            encapsulated = self._encapsulated
            if level.pixel and len(self._levels) == 2 and encapsulated is not None:
                encapsulated.fragments += 1  # the first is the Basic Offset Table
                encapsulated.capturing = encapsulated.fragments > 1 and not encapsulated.checked and length > 0
            return
        if length == UNDEFINED:
            self._levels.append(_Level(_ELEMENTS, None, level.implicit, level.little))
            return
        self._check_length(tag, length, pixel=True, what="an item")  # an item's bound is its sequence's
        self._levels.append(_Level(_ELEMENTS, self._pos + length, level.implicit, level.little))
        self._close()

    def _open(self, level: _Level, tag: int) -> None:
        self._depth += 1
        if self._depth > self.limits.sequence_depth:
            raise Refused(CANNOT_UNDERSTAND, "sequence_too_deep",
                          f"sequences nested deeper than {self.limits.sequence_depth} levels (element {tag_str(tag)} "
                          f"opens level {self._depth})")
        self._levels.append(level)
        self._close()

    def _check_length(self, tag: int, length: int, *, pixel: bool, what: str = "") -> None:
        name = what or f"element {tag_str(tag)}"
        if not pixel and length > self.limits.element_bytes:
            raise Refused(CANNOT_UNDERSTAND, "element_too_long",
                          f"{name} declares {length} bytes, over the {self.limits.element_bytes} bytes an element "
                          "may have")
        left = self._cap - self._pos
        if length > left:
            if self.deflated:  # the cap it would pass is the inflated size's
                raise Refused(CANNOT_UNDERSTAND, "inflated_too_large",
                              f"{name} declares {length} bytes, more than the {left} bytes left of the {self._cap} "
                              "a deflated data set may inflate to")
            raise Refused(CANNOT_UNDERSTAND, "element_too_long",
                          f"{name} declares {length} bytes, more than the {left} bytes left of the instance's "
                          f"{self._cap}")
        end = self._levels[-1].end
        if end is not None and self._pos + length > end:
            raise _undecodable(f"{name} of {length} bytes runs past the item or sequence holding it")

    # ---------------------------------------------------------------------------- compressed frames
    def _image_value(self, tag: int, name: str) -> int:
        """A top-level Image Pixel value (US, or IS for Number of Frames); ``codestream_mismatch`` when it
        is missing or not a number, since the codestream cannot be checked without it."""
        raw = self._values.get(tag)
        try:
            if raw is None or not raw:
                raise ValueError("missing")
            if tag == _FRAMES:
                return int(raw.strip(b" \0").decode("ascii"))
            if len(raw) != 2:
                raise ValueError(f"{len(raw)} bytes")
            return int.from_bytes(raw, "little" if self._little else "big")
        except (ValueError, UnicodeDecodeError) as exc:
            raise Refused(CANNOT_UNDERSTAND, "codestream_mismatch",
                          f"{name} is {'missing' if not raw else 'not a number'}: compressed pixel data cannot be "
                          "checked without it") from exc

    def _check_decoded_size(self) -> None:
        """Before any fragment: what the frames decode to, Rows x Columns x Frames x Samples per Pixel x
        Bits Allocated / 8, must be within the instance's bound (``codestream_too_large``)."""
        rows, columns = self._image_value(_ROWS, "Rows"), self._image_value(_COLUMNS, "Columns")
        samples = self._image_value(_SAMPLES, "Samples per Pixel")
        bits = self._image_value(_BITS_ALLOCATED, "Bits Allocated")
        frames = self._image_value(_FRAMES, "Number of Frames") if _FRAMES in self._values else 1
        if min(rows, columns, samples, bits, frames) < 1:
            raise Refused(CANNOT_UNDERSTAND, "codestream_mismatch",
                          f"the data set declares an empty image ({rows} x {columns} x {frames} frames, "
                          f"{samples} samples of {bits} bits)")
        decoded = rows * columns * frames * samples * ((bits + 7) // 8)
        if decoded > self.limits.instance_bytes:
            raise Refused(CANNOT_UNDERSTAND, "codestream_too_large",
                          f"the pixel data decodes to {decoded} bytes ({rows} x {columns} x {frames} frames x "
                          f"{samples} samples x {bits} bits), over the {self.limits.instance_bytes} an instance "
                          "may have")

    def _check_codestream(self, encapsulated: _Encapsulated, *, final: bool) -> None:
        """The first frame's codestream header, read from ``encapsulated.head``, against the data set:
        ``codestream_invalid`` when it is not the syntax's codestream (or not complete within its first
        64 KiB), ``codestream_mismatch`` when it declares another size, component count or a precision
        over Bits Allocated. ``final``: no more bytes will come."""
        kind, head = encapsulated.kind, encapsulated.head
        try:
            header = read_header(kind, bytes(head))
        except CodestreamError as exc:
            raise Refused(CANNOT_UNDERSTAND, "codestream_invalid", str(exc)) from exc
        if header is None:
            if final or len(head) >= _CODESTREAM_HEAD:
                raise Refused(CANNOT_UNDERSTAND, "codestream_invalid",
                              f"the first frame's {len(head)} bytes end before its {kind} header does")
            return
        encapsulated.checked, encapsulated.capturing = True, False
        rows, columns = self._image_value(_ROWS, "Rows"), self._image_value(_COLUMNS, "Columns")
        samples = self._image_value(_SAMPLES, "Samples per Pixel")
        bits = self._image_value(_BITS_ALLOCATED, "Bits Allocated")
        if header.segments is not None:  # RLE: one segment per byte of each sample
            if header.segments != samples * ((bits + 7) // 8):
                raise Refused(CANNOT_UNDERSTAND, "codestream_mismatch",
                              f"the RLE header declares {header.segments} segments, the data set "
                              f"{samples} samples of {bits} bits ({samples * ((bits + 7) // 8)} segments)")
            return
        declared = (header.rows, header.columns, header.components)
        if declared != (rows, columns, samples) or header.precision is None or not 1 <= header.precision <= bits:
            raise Refused(CANNOT_UNDERSTAND, "codestream_mismatch",
                          f"the {kind} codestream declares {header.rows} x {header.columns} pixels, "
                          f"{header.components} components of {header.precision} bits; the data set {rows} x "
                          f"{columns}, {samples} samples, {bits} bits allocated")


_READ_CHUNK = 1 << 20


def received_from_file(path: Path, transfer_syntax: str, limits: ReceiveLimits) -> Received:
    """What the network layer learns of a data set as it arrives, for a Part 10 file written whole by
    someone else (a C-GET sub-operation, a WADO-RS part): its size and SHA-256, and its data set walked by
    :class:`DataSetStream` under the same ``limits``, read in chunks. Raises :class:`Refused` as the
    stream does, and ``undecodable`` when the file does not start with a preamble and (0002,0000)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(144)
        if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
            raise _undecodable("not a DICOM file with a preamble and a file meta group length")
        digest.update(head)
        meta_rest = f.read(struct.unpack_from("<I", head, 140)[0])
        digest.update(meta_rest)
        size = len(head) + len(meta_rest)
        stream = DataSetStream(transfer_syntax, limits)
        while chunk := f.read(_READ_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            stream.feed(chunk)
    stream.finish()
    return Received(size=size, sha256=digest.hexdigest(), dataset_length=stream.length, header=stream.header())
