"""receive.fast_header (the walk over a data set's first bytes) against receive.read_header (pydicom):
the same answer whenever it answers, and None (read_header decides) whenever it cannot be sure."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info

from dicom_node.receive import Refused, fast_header, read_header
from tests.peers import write_ct_series

# pydicom's own test files that ship with it (no download): (name, does the walk answer?)
SHIPPED = [
    ("CT_small.dcm", True),  # Explicit VR Little Endian
    ("MR_small.dcm", True),
    ("MR_small_implicit.dcm", True),  # Implicit VR Little Endian
    ("rtplan.dcm", True),  # Implicit VR, nested sequences, no pixel data
    ("SC_rgb_rle.dcm", True),  # RLE: encapsulated pixel data of undefined length
    ("MR_small_bigendian.dcm", False),  # another byte order: pydicom's job
    ("image_dfl.dcm", False),  # deflated: pydicom's job
]


def _dataset_bytes(path: Path) -> tuple[bytes, str]:
    raw = path.read_bytes()
    meta = read_file_meta_info(path)
    start = 132 + 12 + int(meta.FileMetaInformationGroupLength)
    return raw[start:], str(meta.TransferSyntaxUID)


def _fast(path: Path, head_limit: int = 1 << 16):
    data, ts = _dataset_bytes(path)
    return fast_header(data[:head_limit], transfer_syntax=ts, dataset_length=len(data))


@pytest.mark.parametrize(("name", "answers"), SHIPPED)
def test_same_answer_as_pydicom(name: str, answers: bool) -> None:
    path = Path(get_testdata_file(name))
    fast = _fast(path)
    if not answers:
        assert fast is None
        return
    assert fast is not None
    assert fast == read_header(path)


def test_generated_ct_with_sequences(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=1, size=16)
    path = series.paths[0]
    ds = dcmread(path)
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-62000", "SRT", "Liver"
    item.AnatomicRegionSequence = [inner]
    ds.ReferencedImageSequence = [item, item]  # pydicom writes these with undefined lengths
    ds.save_as(path)
    fast = _fast(path)
    assert fast is not None and fast == read_header(path)
    assert (fast.modality, fast.body_part, fast.series_description) == ("CT", "ABDOMEN", "AXIAL 1mm")


def test_truncated_pixel_data_is_refused_like_pydicom(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=1, size=32)
    path = series.paths[0]
    short = tmp_path / "short.dcm"
    short.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(Refused) as fast:
        _fast(short)
    with pytest.raises(Refused) as slow:
        read_header(short)
    assert fast.value.reason == slow.value.reason == "truncated"


def test_gives_up_when_the_header_is_not_in_the_first_bytes(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=1, size=16)
    path = series.paths[0]
    assert _fast(path, head_limit=64) is None  # read_header decides
    assert _fast(path) is not None


def test_gives_up_on_deep_nesting_and_garbage() -> None:
    sq = struct.pack("<HH2sHI", 0x0009, 0x1010, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    close = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    nested = (sq + item) * 50 + close * 50
    assert fast_header(nested, transfer_syntax="1.2.840.10008.1.2.1", dataset_length=len(nested)) is None
    noise = bytes(range(256)) * 8
    assert fast_header(noise, transfer_syntax="1.2.840.10008.1.2.1", dataset_length=len(noise)) is None


def test_missing_uid_is_refused() -> None:
    ds_bytes = struct.pack("<HH2sH", 0x0008, 0x0060, b"CS", 2) + b"CT"
    with pytest.raises(Refused) as exc:
        fast_header(ds_bytes, transfer_syntax="1.2.840.10008.1.2.1", dataset_length=len(ds_bytes))
    assert exc.value.reason == "missing_uid"
