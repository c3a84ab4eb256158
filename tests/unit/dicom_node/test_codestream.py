"""The codestream header check: dicom_node.codestream on what real encoders write, and DataSetStream's
refusals of compressed pixel data whose header disagrees with the data set or would decode past the
instance's bound, before any decoder sees it."""

from __future__ import annotations

import struct
from pathlib import Path

import openjpeg
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import get_frame
from pydicom.filereader import read_file_meta_info

from dicom_node.codestream import CODESTREAMS, CodestreamError, read_header
from dicom_node.config import ReceiveLimits
from dicom_node.dataset_stream import DataSetStream
from dicom_node.receive import Refused
from tests.compressed import LOSSLESS, LOSSY, compress_file, j2k_header, rewrap
from tests.peers import write_ct_series
from tests.streams import dataset_bytes, feed

J2K = "1.2.840.10008.1.2.4.90"
RLE = "1.2.840.10008.1.2.5"
JPEG_LS = "1.2.840.10008.1.2.4.80"


@pytest.fixture(scope="module")
def slice_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ct_series(tmp_path_factory.mktemp("ct"), slices=1, size=32).paths[0]




def _refusal(data: bytes, syntax: str, **kw: object) -> Refused:
    with pytest.raises(Refused) as info:
        feed(data, syntax, **kw)  # type: ignore[arg-type]
    assert info.value.status == 0xC000
    return info.value


@pytest.mark.parametrize("syntax", LOSSLESS + LOSSY)
def test_what_real_encoders_write_is_read_and_passes(slice_file: Path, tmp_path: Path, syntax: str) -> None:
    """Each encoder's first frame declares the data set's size; the whole data set passes the stream in
    pieces of 1 to 40 bytes (the header split across them)."""
    path = compress_file(slice_file, syntax, tmp_path / "c.dcm")
    ds = dcmread(path)
    header = read_header(CODESTREAMS[syntax], get_frame(ds.PixelData, 0, number_of_frames=1)[:1 << 16])
    assert header is not None
    if syntax == RLE:
        assert header.segments == 2  # one per byte of a 16-bit sample
    else:
        assert (header.rows, header.columns, header.components) == (32, 32, 1)
        assert header.precision is not None and header.precision <= ds.BitsAllocated
    data, sent_syntax = dataset_bytes(path)
    assert sent_syntax == syntax
    for split in (0, 1, 2):
        stream = feed(data, syntax, split=split)
        assert stream.length == len(data)


def test_a_jp2_wrapped_codestream_is_read_in_its_box(slice_file: Path) -> None:
    arr = dcmread(slice_file).pixel_array
    jp2 = openjpeg.encode(arr, codec_format=1)
    assert jp2[4:8] == b"jP  "
    header = read_header("j2k", jp2)
    assert header is not None and (header.rows, header.columns, header.components) == (32, 32, 1)
    assert read_header("j2k", jp2[:40]) is None  # the jp2c box not yet reached: more bytes may tell


@pytest.mark.parametrize(("kind", "data", "needle"), [
    ("jpeg", b"\x00\x01\x02\x03", "does not start with SOI"),
    ("jpeg", bytes.fromhex("ffd8 ffda 0008 0000 0000"), "reaches marker FFDA before its frame header"),
    ("jpeg", bytes.fromhex("ffd8 fff7 000b 10 0020 0020 01 01 11 00"), "frame header FFF7, of another standard"),
    ("jpeg-ls", bytes.fromhex("ffd8 ffc3 000b 10 0020 0020 01 01 11 00"), "frame header FFC3, of another standard"),
    ("jpeg-ls", bytes.fromhex("ffd8 ffe0 0001"), "declares a length of 1"),
    ("j2k", b"\xff\x4f\xff\x90" + bytes(60), "does not start with SOC and SIZ"),
    ("j2k", j2k_header(32, 32)[:4] + struct.pack(">H", 99) + j2k_header(32, 32)[6:], "1 components in 99 bytes"),
    ("rle", struct.pack("<16I", 0, *([0] * 15)), "declares 0 segments"),
    ("rle", struct.pack("<16I", 1, 128, *([0] * 14)), "starts at byte 128"),
])
def test_bytes_that_are_not_the_codestream_are_named(kind: str, data: bytes, needle: str) -> None:
    with pytest.raises(CodestreamError, match=needle):
        read_header(kind, data)


def _hostile(slice_file: Path, frames: list[bytes], syntax: str, **attributes: object) -> bytes:
    ds = dcmread(slice_file)
    rewrap(ds, frames, syntax)
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


@pytest.mark.parametrize("split", [0, 1])
def test_a_j2k_header_declaring_60000_squared_is_refused_as_a_mismatch(slice_file: Path, split: int) -> None:
    """Rows 32, the codestream 60000 x 60000: refused on its header (the decoder would allocate 6.7 GiB)."""
    refusal = _refusal(_hostile(slice_file, [j2k_header(60000, 60000)], J2K), J2K, split=split)
    assert refusal.reason == "codestream_mismatch"
    assert "60000 x 60000" in refusal.detail and "the data set 32 x 32" in refusal.detail


def test_a_data_set_that_decodes_past_the_instance_bound_is_refused_before_its_fragments(slice_file: Path) -> None:
    """Rows and Columns 65535, 1000 frames, and a codestream that agrees: 8 TB decoded, refused when the
    pixel data element opens (the stream has read none of its fragments)."""
    data = _hostile(slice_file, [j2k_header(65535, 65535)], J2K, Rows=65535, Columns=65535, NumberOfFrames="1000")
    stream = DataSetStream(J2K, ReceiveLimits())
    opens = data.index(b"\xe0\x7f\x10\x00OB")
    with pytest.raises(Refused) as info:
        stream.feed(data[:opens + 12])
    assert info.value.reason == "codestream_too_large"
    assert str(65535 * 65535 * 1000 * 2) in info.value.detail and str(ReceiveLimits().instance_bytes) in info.value.detail


@pytest.mark.parametrize(("frames", "syntax", "attributes", "reason", "needle"), [
    ([j2k_header(32, 32, depth=16)], J2K, {"BitsAllocated": 8, "BitsStored": 8, "HighBit": 7}, "codestream_mismatch",
     "1 components of 16 bits"),
    ([j2k_header(32, 32, components=3)], J2K, {}, "codestream_mismatch", "3 components"),
    ([struct.pack("<16I", 4, 64, 70, 80, 90, *([0] * 11)) + bytes(40)], RLE, {}, "codestream_mismatch",
     "4 segments"),
    ([b"GIF89a" + bytes(100)], JPEG_LS, {}, "codestream_invalid", "does not start with SOI"),
    ([b"\xff\xd8\xff\xe0\xff\xff" + bytes(70000)], JPEG_LS, {}, "codestream_invalid", "end before its jpeg-ls header"),
    ([j2k_header(32, 32)[:30]], J2K, {}, "codestream_invalid", "the first frame's 30 bytes"),
    ([j2k_header(32, 32)], J2K, {"Rows": None}, "codestream_mismatch", "Rows is missing"),
])
def test_compressed_pixel_data_the_header_disagrees_with_is_refused(slice_file: Path, frames: list[bytes], syntax: str,
                                                                     attributes: dict[str, object], reason: str,
                                                                     needle: str) -> None:
    for split in (0, 3):
        refusal = _refusal(_hostile(slice_file, frames, syntax, **attributes), syntax, split=split)
        assert (refusal.reason, needle in refusal.detail) == (reason, True), refusal.detail


def test_the_header_may_span_fragments(slice_file: Path, tmp_path: Path) -> None:
    """A frame split into fragments of 7 bytes: its header is read across them, and it passes."""
    path = compress_file(slice_file, J2K, tmp_path / "j2k.dcm")
    frame = get_frame(dcmread(path).PixelData, 0, number_of_frames=1)
    from pydicom.encaps import encapsulate

    ds = dcmread(path)
    ds.PixelData = encapsulate([frame], fragments_per_frame=(len(frame) + 6) // 7)
    ds["PixelData"].is_undefined_length = True
    data = _hostile_bytes(ds)
    assert feed(data, J2K, split=5).length == len(data)
    bad = dcmread(path)
    bad.PixelData = encapsulate([j2k_header(60000, 32)], fragments_per_frame=9)
    bad["PixelData"].is_undefined_length = True
    assert _refusal(_hostile_bytes(bad), J2K).reason == "codestream_mismatch"


def _hostile_bytes(ds: object) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)  # type: ignore[arg-type]
    return buf.getvalue()


def test_pydicoms_hostile_j2k_file_is_refused() -> None:
    """pydicom's JPEG2000-embedded-sequence-delimiter.dcm: its SIZ declares 1024 x 3722445056 pixels
    (Pillow calls it a decompression bomb, openjpeg cannot read it): refused on its header."""
    data, syntax = dataset_bytes(Path(get_testdata_file("JPEG2000-embedded-sequence-delimiter.dcm")))
    refusal = _refusal(data, syntax)
    assert refusal.reason == "codestream_mismatch" and "3722445056" in refusal.detail


def _shipped_compressed() -> list[Path]:
    """The compressed files pydicom ships (written by GDCM, dcmtk, CharLS, OpenJPEG, Kakadu, ...) that the
    installed decoders read."""
    import warnings

    import pydicom.data

    out = []
    for path in sorted((Path(pydicom.data.__file__).parent / "test_files").rglob("*.dcm")):
        try:
            if str(read_file_meta_info(path).get("TransferSyntaxUID", "")) not in CODESTREAMS:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _ = dcmread(path).pixel_array
        except Exception:  # noqa: BLE001 - files no decoder reads (pydicom ships broken ones on purpose)
            continue
        out.append(path)
    return out


SHIPPED_COMPRESSED = _shipped_compressed()


def test_the_shipped_compressed_files_are_found() -> None:
    assert len(SHIPPED_COMPRESSED) >= 30 and {str(read_file_meta_info(p).TransferSyntaxUID)
                                              for p in SHIPPED_COMPRESSED} >= set(LOSSLESS + LOSSY) - {
        "1.2.840.10008.1.2.4.57"}


@pytest.mark.parametrize("path", SHIPPED_COMPRESSED, ids=lambda p: p.name)
def test_no_compressed_file_a_decoder_reads_is_refused(path: Path) -> None:
    """Every compressed file pydicom ships that its decoders read (colour, 8 to 32 bits, multi-frame, JPEG
    Baseline to JPEG 2000, from half a dozen encoders) passes the stream whole and in pieces: the header
    check refuses no real image."""
    data, syntax = dataset_bytes(path)
    for split in (0, 4):
        assert feed(data, syntax, split=split).length == len(data)
