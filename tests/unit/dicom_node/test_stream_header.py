"""The header the data set's walk collects (DataSetStream.header) against receive.read_header (pydicom):
the same answer whenever the walk answers, and None (read_header decides) whenever it cannot be sure."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from dicom_node.config import ReceiveLimits
from dicom_node.receive import InstanceHeader, Refused, read_header
from tests.peers import write_ct_series
from tests.streams import dataset_bytes, feed

EXPLICIT_LE = "1.2.840.10008.1.2.1"

# pydicom's own test files that ship with it (no download)
SHIPPED = [
    "CT_small.dcm",  # Explicit VR Little Endian
    "MR_small.dcm",
    "MR_small_implicit.dcm",  # Implicit VR Little Endian
    "rtplan.dcm",  # Implicit VR, nested sequences, no pixel data
    "SC_rgb_rle.dcm",  # RLE: encapsulated pixel data of undefined length
    "MR_small_bigendian.dcm",  # Explicit VR Big Endian
    "image_dfl.dcm",  # deflated: collected from the inflated bytes
]




def _header(path: Path, split: int = 0) -> InstanceHeader | None:
    data, syntax = dataset_bytes(path)
    found = feed(data, syntax, split=split).header()
    return None if found is None else InstanceHeader.of(found)


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("split", [0, 1])
def test_same_answer_as_pydicom_in_any_split(name: str, split: int) -> None:
    path = Path(get_testdata_file(name))
    header = _header(path, split)
    assert header is not None
    assert header == read_header(path)


def test_generated_ct_with_sequences(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=1, size=16)
    path = series.paths[0]
    ds = dcmread(path)
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID  # a SOP Instance UID inside a sequence: not the header's
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-62000", "SRT", "Liver"
    item.AnatomicRegionSequence = [inner]
    item.SOPInstanceUID = "1.2.3.4"
    ds.ReferencedImageSequence = [item, item]  # pydicom writes these with undefined lengths
    ds.save_as(path)
    header = _header(path, split=3)
    assert header is not None and header == read_header(path)
    assert header.sop_instance_uid.rstrip("\x00") == ds.SOPInstanceUID  # as sent: an odd-length UID has its NUL pad
    assert (header.modality, header.body_part, header.series_description) == ("CT", "ABDOMEN", "AXIAL 1mm")


def test_truncated_pixel_data_is_refused_like_pydicom(tmp_path: Path) -> None:
    path = write_ct_series(tmp_path / "in", slices=1, size=32).paths[0]
    short = tmp_path / "short.dcm"
    short.write_bytes(path.read_bytes()[:-100])
    data, syntax = dataset_bytes(short)
    with pytest.raises(Refused) as walked:
        feed(data, syntax)
    with pytest.raises(Refused) as slow:
        read_header(short)
    assert walked.value.reason == slow.value.reason == "truncated"


@pytest.mark.parametrize("value", ["CT\\MR", "Ünfall"])
def test_leaves_several_values_and_non_ascii_to_pydicom(tmp_path: Path, value: str) -> None:
    path = write_ct_series(tmp_path / "in", slices=1, size=16).paths[0]
    ds = dcmread(path)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SeriesDescription = value
    ds.save_as(path)
    assert _header(path) is None
    assert read_header(path).series_description  # pydicom decodes it by the character set


def test_leaves_a_repeated_or_oversized_header_element_to_pydicom() -> None:
    uid = b"1.2.3\x00"
    el = struct.pack("<HH2sH", 0x0008, 0x0018, b"UI", len(uid)) + uid
    assert feed(el + el, EXPLICIT_LE).header() is None  # twice, out of order
    long = b"1" * 300
    big = struct.pack("<HH2sH", 0x0008, 0x103E, b"LO", len(long)) + long
    assert feed(big, EXPLICIT_LE).header() is None
    sq = struct.pack("<HH2sHI", 0x0008, 0x0018, b"SQ", 0, 0)  # a UID sent as a sequence
    assert feed(sq, EXPLICIT_LE).header() is None


def test_missing_uid_is_refused() -> None:
    data = struct.pack("<HH2sH", 0x0008, 0x0060, b"CS", 2) + b"CT"
    found = feed(data, EXPLICIT_LE).header()
    assert found is not None and found.values == {"Modality": "CT"} and not found.has_pixel_data
    with pytest.raises(Refused) as exc:
        InstanceHeader.of(found)
    assert exc.value.reason == "missing_uid"


def test_a_whole_file_is_walked_under_the_same_limits(tmp_path: Path) -> None:
    """A C-GET sub-operation's or a WADO-RS part's file: the same header and the same bounds as a
    C-STORE's data set, and its digest the whole file's."""
    import hashlib

    from dicom_node.dataset_stream import received_from_file

    path = write_ct_series(tmp_path / "in", slices=1, size=16).paths[0]
    received = received_from_file(path, EXPLICIT_LE, ReceiveLimits())
    assert received.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert received.size == path.stat().st_size
    assert received.header is not None and InstanceHeader.of(received.header) == read_header(path)
    with pytest.raises(Refused) as exc:
        received_from_file(path, EXPLICIT_LE, ReceiveLimits(instance_bytes=100))
    assert exc.value.reason == "element_too_long"
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\0" * 200)
    with pytest.raises(Refused) as exc:
        received_from_file(junk, EXPLICIT_LE, ReceiveLimits())
    assert exc.value.reason == "undecodable"
