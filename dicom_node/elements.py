"""What the node knows of the DICOM data element encoding (PS3.5 7): the one copy of the tables that
:mod:`dicom_node.dataset_stream` (the only walk over a received data set) and anything that reads its
bytes without pydicom rely on.

    >>> tag_str(0x7FE00010), dictionary_vr(0x00081115), dictionary_vr(0x00091010)
    ('(7FE0,0010)', 'SQ', None)
"""

from __future__ import annotations

from pydicom.datadict import DicomDictionary

__all__ = [
    "DEFLATED", "EXPLICIT_BE", "EXPLICIT_LE", "HEADER_TAGS", "IMPLICIT_LE", "ITEM", "ITEM_END", "LONG_VRS",
    "PIXEL_TAGS", "SEQUENCE_END", "UNDEFINED", "dictionary_vr", "tag_str",
]

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"

#: Explicit VRs whose header has two reserved bytes and a 32-bit length (PS3.5 7.1.2).
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT",
                      b"UV"})

#: The pixel data elements: their length is bounded by the instance, not by the per-element bound.
PIXEL_TAGS: dict[int, str] = {0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData",
                              0x7FE00010: "PixelData"}

#: The top-level elements the node indexes an instance by (:class:`dicom_node.receive.InstanceHeader`).
HEADER_TAGS: dict[int, str] = {
    0x00080016: "SOPClassUID", 0x00080018: "SOPInstanceUID", 0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID", 0x00080060: "Modality", 0x00180015: "BodyPartExamined",
    0x0008103E: "SeriesDescription", 0x00081010: "StationName",
}

ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF


def tag_str(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def dictionary_vr(tag: int) -> str | None:
    """The VR the DICOM dictionary gives ``tag``; None for a tag it does not know (a private one)."""
    entry = DicomDictionary.get(tag)
    return None if entry is None else str(entry[0])
