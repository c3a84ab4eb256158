"""dataset_stream.DataSetStream: every data set pydicom writes or ships passes, fed in any split, and each
bound refuses at the header that breaks it, with the reason the SCP audits."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from dicom_node.config import ReceiveLimits
from dicom_node.dataset_stream import DEFLATED, DataSetStream
from dicom_node.receive import Refused
from tests.peers import write_ct_series
from tests.streams import dataset_bytes, feed

EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
# pydicom's own test files (shipped with it, nothing downloaded): every encoding we accept, and the oddities
# pydicom reads (a private sequence, sequences in UN, a bad VR, a delimiter inside JPEG 2000 fragments)
SHIPPED = ["CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
           "MR_small_padded.dcm", "rtplan.dcm", "rtdose.dcm", "reportsi.dcm", "SC_rgb_rle.dcm",
           "SC_rgb_rle_2frame.dcm", "image_dfl.dcm", "JPEG2000.dcm", "JPEG2000-embedded-sequence-delimiter.dcm",
           "UN_sequence.dcm", "badVR.dcm", "priv_SQ.dcm", "nested_priv_SQ.dcm", "examples_overlay.dcm",
           "liver_1frame.dcm"]




@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("split", [0, 1, 2])
def test_pydicoms_own_files_pass_in_any_split(name: str, split: int) -> None:
    data, syntax = dataset_bytes(Path(get_testdata_file(name)))
    if name == "JPEG2000-embedded-sequence-delimiter.dcm":
        # its codestream's header is refused (tests/unit/dicom_node/test_codestream.py); its structure (a
        # sequence delimiter's bytes inside a fragment) is walked as encapsulated data of another syntax
        syntax = "1.2.840.10008.1.2.1"
    stream = feed(data, syntax, split=split)
    assert stream.deflated == (syntax == DEFLATED)
    if not stream.deflated:
        assert stream.length == len(data)


def test_a_deflated_data_set_gives_its_header_from_the_inflated_bytes() -> None:
    path = Path(get_testdata_file("image_dfl.dcm"))
    data, syntax = dataset_bytes(path)
    stream = feed(data, syntax, split=3)
    inflated = zlib.decompress(data, -zlib.MAX_WBITS)
    assert stream.length == len(inflated)
    found = stream.header()
    assert found is not None and found.values["SOPInstanceUID"].rstrip("\0") == dcmread(path).SOPInstanceUID


def test_a_generated_ct_with_nested_sequences_passes(tmp_path: Path) -> None:
    path = write_ct_series(tmp_path / "in", slices=1, size=32).paths[0]
    ds = dcmread(path)
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-D4000", "SRT", "Abdomen"
    item = Dataset()
    item.AnatomicRegionSequence = [inner]
    ds.ReferencedImageSequence = [item, Dataset()]
    ds.save_as(path, enforce_file_format=True)
    data, syntax = dataset_bytes(path)
    assert feed(data, syntax, split=4).length == len(data)
    ds.file_meta.TransferSyntaxUID = IMPLICIT
    ds.save_as(path, enforce_file_format=True)
    data, syntax = dataset_bytes(path)
    assert syntax == IMPLICIT and feed(data, syntax, split=5).length == len(data)


def _element(tag: int, vr: bytes, value: bytes = b"", length: int | None = None) -> bytes:
    n = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, n) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, n) + value


def _refusal(data: bytes, syntax: str = EXPLICIT, **limits: int) -> Refused:
    with pytest.raises(Refused) as refused:
        feed(data, syntax, ReceiveLimits(**limits), split=7)
    assert refused.value.status == 0xC000
    return refused.value


def test_an_element_over_the_element_bound_is_refused_at_its_header() -> None:
    stream = DataSetStream(EXPLICIT, ReceiveLimits(element_bytes=1000))
    with pytest.raises(Refused, match="element_too_long: element \\(0009,1001\\) declares 1001 bytes"):
        stream.feed(_element(0x00091001, b"OB", length=1001))  # the header alone: no value sent yet
    feed(_element(0x00091001, b"OB", bytes(1000)), EXPLICIT, ReceiveLimits(element_bytes=1000))


def test_pixel_data_is_bounded_by_the_instance_not_the_element_bound() -> None:
    pixels = _element(0x7FE00010, b"OW", bytes(4096))
    feed(pixels, EXPLICIT, ReceiveLimits(element_bytes=1024, instance_bytes=1 << 20))
    refusal = _refusal(_element(0x00080060, b"CS", b"CT") + _element(0x7FE00010, b"OW", length=1 << 20),
                       element_bytes=1024, instance_bytes=1 << 20)
    assert refusal.reason == "element_too_long" and "left of the instance's 1048576" in refusal.detail


def test_implicit_vr_lengths_are_checked_too() -> None:
    data = struct.pack("<HHI", 0x0020, 0x000D, 1 << 30)
    refusal = _refusal(data, IMPLICIT)
    assert refusal.reason == "element_too_long" and "(0020,000D)" in refusal.detail


def _nested(depth: int, *, implicit: bool = False) -> bytes:
    if implicit:
        sq = struct.pack("<HHI", 0x0040, 0xA730, 0xFFFFFFFF)  # Content Sequence: SQ by the dictionary
    else:
        sq = _element(0x00091010, b"SQ", length=0xFFFFFFFF)
    item, item_end = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF), struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    sq_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return (sq + item) * depth + (item_end + sq_end) * depth


@pytest.mark.parametrize("implicit", [False, True])
def test_sequences_are_refused_one_level_past_the_bound(implicit: bool) -> None:
    syntax = IMPLICIT if implicit else EXPLICIT
    feed(_nested(8, implicit=implicit), syntax, ReceiveLimits(sequence_depth=8))
    refusal = _refusal(_nested(9, implicit=implicit), syntax, sequence_depth=8)
    assert refusal.reason == "sequence_too_deep" and "deeper than 8" in refusal.detail


def test_defined_length_sequences_count_too() -> None:
    inner = b""
    for _ in range(5):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
        inner = _element(0x00091010, b"SQ", item)
    feed(inner, EXPLICIT, ReceiveLimits(sequence_depth=5))
    assert _refusal(inner, sequence_depth=4).reason == "sequence_too_deep"


def test_a_deflate_bomb_is_refused_once_the_inflated_bytes_pass_the_cap() -> None:
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = b"".join(_element(0x00091000 | i, b"OB", bytes(1 << 16)) for i in range(64))  # 4 MiB, no big element
    bomb = z.compress(body) + z.flush()
    assert len(bomb) < 1 << 15
    refusal = _refusal(bomb, DEFLATED, inflated_bytes=1 << 20)
    assert refusal.reason == "inflated_too_large" and "1048576" in refusal.detail
    feed(bomb, DEFLATED, ReceiveLimits(inflated_bytes=5 << 20))


@pytest.mark.parametrize(("data", "reason"), [
    (struct.pack("<HHI", 0xFFFE, 0xE000, 0), "undecodable"),  # an item where an element belongs
    (_element(0x00020010, b"UI", b"1.2.840.10008.1.2\0"), "file_meta_in_dataset"),
    (_element(0x7FE00010, b"OW", bytes(10), length=20), "truncated"),  # ends inside a value
    (_element(0x00091010, b"SQ", length=0xFFFFFFFF), "truncated"),  # a sequence never closed
    (_element(0x00091010, b"SQ", struct.pack("<HHI", 0xFFFE, 0xE000, 100) + bytes(16)), "undecodable"),
])
def test_broken_structure(data: bytes, reason: str) -> None:
    assert _refusal(data).reason == reason


def test_a_deflated_stream_that_does_not_inflate_is_undecodable() -> None:
    assert _refusal(b"\xff" * 64, DEFLATED).reason == "undecodable"


def test_a_deflated_stream_that_stops_early_is_truncated() -> None:
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    data = z.compress(_element(0x00080060, b"CS", b"CT")) + z.flush()
    assert _refusal(data[:-2], DEFLATED).reason == "truncated"
