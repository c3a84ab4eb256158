"""dicom_series.load_series on small generated series: order, geometry, rescale, multi-frame, refusals."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.uid import MPEG2MPML, JPEGLSLossless, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dicom_factory import (  # noqa: E402
    SeriesSpec,
    classic_datasets,
    clone,
    enhanced_dataset,
    expected_volume,
    slice_positions,
    stored_values,
    write_datasets,
)

from dicom_series import REASON_CODES, SeriesError, load_series  # noqa: E402

PATIENT_WORDS = ("Factory", "Phantom", "PHANTOM-001")


def _rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def test_shuffled_files_load_in_position_order(tmp_path: Path) -> None:
    spec = SeriesSpec(slices=20)
    datasets = classic_datasets(spec)
    # InstanceNumber runs against the positions: a loader that sorts by it gets the order reversed.
    for k, ds in enumerate(datasets):
        ds.InstanceNumber = spec.slices - k
    paths = write_datasets(datasets, tmp_path, rng=np.random.default_rng(7))
    assert [p.name for p in paths] != sorted(p.name for p in paths)

    volume = load_series(paths)

    np.testing.assert_array_equal(volume.array, expected_volume(spec))
    assert volume.array.dtype == np.float32 and volume.shape == (20, 32, 32)
    assert [ref.sop_instance_uid for ref in volume.slices] == [ds.SOPInstanceUID for ds in datasets]
    assert all(ref.frame_number is None for ref in volume.slices)
    assert all(ref.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2" for ref in volume.slices)
    assert volume.spacing == pytest.approx((2.5, 0.8, 0.7))
    assert volume.origin == pytest.approx(spec.origin)
    np.testing.assert_allclose(volume.direction, np.eye(3), atol=1e-12)
    assert volume.modality == "CT"
    assert volume.series_instance_uid == spec.series_instance_uid
    assert volume.study_instance_uid == spec.study_instance_uid
    assert volume.frame_of_reference_uid == spec.frame_of_reference_uid
    # headers: one per slice, in z order, without pixel data
    assert [h.SOPInstanceUID for h in volume.headers] == [ds.SOPInstanceUID for ds in datasets]
    assert all("PixelData" not in h for h in volume.headers)
    assert not volume.array.flags.writeable


@pytest.mark.parametrize(
    ("row", "col"),
    [
        pytest.param((1.0, 0.0, 0.0), (0.0, -1.0, 0.0), id="normal-points-feet"),
        pytest.param(tuple(_rotation((1, 2, 3), 30)[:, 0]), tuple(_rotation((1, 2, 3), 30)[:, 1]), id="oblique"),
        pytest.param((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), id="sagittal"),
    ],
)
def test_orientation_geometry(tmp_path: Path, row: tuple[float, ...], col: tuple[float, ...]) -> None:
    spec = SeriesSpec(slices=12, rows=16, cols=24, row_cosine=row, col_cosine=col, slice_spacing=3.0,
                      pixel_spacing=(1.25, 0.5))
    volume = load_series(write_datasets(classic_datasets(spec), tmp_path))

    np.testing.assert_array_equal(volume.array, expected_volume(spec))
    np.testing.assert_allclose(volume.direction, np.stack([row, col, np.cross(row, col)]), atol=1e-6)
    assert volume.spacing == pytest.approx((3.0, 1.25, 0.5), rel=1e-6)
    positions = slice_positions(spec)
    affine = volume.affine
    for z in range(spec.slices):
        np.testing.assert_allclose(affine @ [z, 0, 0, 1], [*positions[z], 1], atol=1e-6)
    # a voxel inside the slice: x along the row cosine (column index), y along the column cosine
    np.testing.assert_allclose(
        affine @ [2, 3, 5, 1],
        [*(positions[2] + 5 * 0.5 * np.asarray(row) + 3 * 1.25 * np.asarray(col)), 1],
        atol=1e-6,
    )


def test_rescale_per_slice(tmp_path: Path) -> None:
    spec = SeriesSpec(slices=8, rescale_slope=0.5, rescale_intercept=-1000.0)
    datasets = classic_datasets(spec)
    for k, ds in enumerate(datasets):
        ds.RescaleSlope = str(0.5 + 0.25 * k)
        ds.RescaleIntercept = str(-1000 + 10 * k)
    volume = load_series(write_datasets(datasets, tmp_path))
    stored = stored_values(spec).astype(np.float64)
    expected = np.stack([stored[k] * (0.5 + 0.25 * k) + (-1000 + 10 * k) for k in range(8)])
    np.testing.assert_allclose(volume.array, expected, rtol=1e-6)


@pytest.mark.parametrize("enhanced", [False, True])
def test_compact_load_is_int16_with_the_same_values(tmp_path: Path, enhanced: bool) -> None:
    """``compact``: a CT's integer rescale as int16, equal to the float32 load value for value."""
    spec = SeriesSpec(slices=10, rescale_slope=1.0, rescale_intercept=-1024.0)
    datasets = [enhanced_dataset(spec)] if enhanced else classic_datasets(spec)
    paths = write_datasets(datasets, tmp_path)
    full, compact = load_series(paths), load_series(paths, compact=True)
    assert full.array.dtype == np.float32 and compact.array.dtype == np.int16
    assert not compact.array.flags.writeable
    np.testing.assert_array_equal(compact.array.astype(np.float32), full.array)
    np.testing.assert_array_equal(compact.array, expected_volume(spec))


@pytest.mark.parametrize(("slopes", "intercepts", "what"), [
    ([0.5] * 8, [-1000.0] * 8, "a fractional slope"),
    ([1.0] * 7 + [20.0], [-1024.0] * 8, "the last slice's values beyond int16"),
    ([1.0] * 3 + [1.0] + [1.0] * 4, [-1024.0] * 3 + [0.5] + [-1024.0] * 4, "a fractional intercept mid-series"),
])
def test_compact_load_falls_back_to_float32(tmp_path: Path, slopes: list[float], intercepts: list[float],
                                            what: str) -> None:
    """A slice whose rescaled values int16 cannot hold turns the whole array float32: the same numbers."""
    spec = SeriesSpec(slices=8)
    datasets = classic_datasets(spec)
    for ds, slope, intercept in zip(datasets, slopes, intercepts, strict=True):
        ds.RescaleSlope, ds.RescaleIntercept = str(slope), str(intercept)
    paths = write_datasets(datasets, tmp_path)
    full, compact = load_series(paths), load_series(paths, compact=True)
    assert compact.array.dtype == np.float32, what
    np.testing.assert_array_equal(compact.array, full.array)


def test_mr_without_rescale_is_raw(tmp_path: Path) -> None:
    spec = SeriesSpec(slices=6, modality="MR", rescale_slope=1.0, rescale_intercept=0.0)
    datasets = classic_datasets(spec)
    for ds in datasets:
        del ds.RescaleSlope
        del ds.RescaleIntercept
    volume = load_series(write_datasets(datasets, tmp_path))
    assert volume.modality == "MR"
    assert volume.slices[0].sop_class_uid == "1.2.840.10008.5.1.4.1.1.4"
    np.testing.assert_array_equal(volume.array, stored_values(spec).astype(np.float32))


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_enhanced_multiframe_loads_like_single_frame(tmp_path: Path, modality: str) -> None:
    spec = SeriesSpec(slices=15, modality=modality, rescale_slope=2.0, rescale_intercept=-5.0,
                      row_cosine=(1.0, 0.0, 0.0), col_cosine=(0.0, 0.0, -1.0))
    order = list(np.random.default_rng(3).permutation(spec.slices))  # frame f+1 holds slice order[f]
    classic = load_series(write_datasets(classic_datasets(spec), tmp_path / "classic"))
    multi = load_series(write_datasets([enhanced_dataset(spec, frame_order=order)], tmp_path / "enhanced"))

    np.testing.assert_array_equal(multi.array, classic.array)
    assert multi.spacing == pytest.approx(classic.spacing)
    assert multi.origin == pytest.approx(classic.origin)
    np.testing.assert_allclose(multi.direction, classic.direction)
    assert multi.is_multiframe and not classic.is_multiframe
    assert len(multi.headers) == 1 and "PixelData" not in multi.headers[0]
    assert {ref.sop_instance_uid for ref in multi.slices} == {multi.headers[0].SOPInstanceUID}
    # slice z came from the frame that holds it
    assert [order[ref.frame_number - 1] for ref in multi.slices] == list(range(spec.slices))


def test_enhanced_per_frame_rescale(tmp_path: Path) -> None:
    spec = SeriesSpec(slices=5)
    ds = enhanced_dataset(spec)
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        item.PixelValueTransformationSequence[0].RescaleSlope = str(1 + f)
    volume = load_series(write_datasets([ds], tmp_path))
    stored = stored_values(spec).astype(np.float64)
    np.testing.assert_allclose(volume.array, np.stack([stored[k] * (1 + k) - 1024 for k in range(5)]))


# ----------------------------------------------------------------------------------------- refusals
def _truncate(paths: list[Path]) -> None:
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: len(data) - 200])


def _garbage(paths: list[Path]) -> None:
    paths[0].write_bytes(b"this is not DICOM" * 40)


def _no_pixels(ds: list[Dataset]) -> None:
    del ds[4].PixelData


def _tilt_orientation(ds: list[Dataset]) -> None:
    ds[6].ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0.6]


def _gantry_tilt(ds: list[Dataset]) -> None:
    for k, d in enumerate(ds):  # 10 degrees: each slice moves tan(10) * 2.5 mm in y
        x, y, z = (float(v) for v in d.ImagePositionPatient)
        d.ImagePositionPatient = [x, y + k * 2.5 * np.tan(np.radians(10)), z]


def _drop_slice(ds: list[Dataset]) -> None:
    del ds[7]


def _uneven(ds: list[Dataset]) -> None:
    for d in ds[10:]:
        x, y, z = (float(v) for v in d.ImagePositionPatient)
        d.ImagePositionPatient = [x, y, z + 1.0]


def _duplicate_position(ds: list[Dataset]) -> None:
    extra = clone(ds[3])
    extra.SOPInstanceUID = extra.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.append(extra)


def _duplicate_instance(ds: list[Dataset]) -> None:
    ds.append(clone(ds[3]))


def _other_size(ds: list[Dataset]) -> None:
    ds[2].Rows = ds[2].Columns = 16
    ds[2].PixelData = np.zeros((16, 16), np.uint16).tobytes()


def _other_spacing(ds: list[Dataset]) -> None:
    ds[2].PixelSpacing = [0.9, 0.7]


def _other_series(ds: list[Dataset]) -> None:
    ds[5].SeriesInstanceUID = "1.2.3.4.5.999"


def _two_slices(ds: list[Dataset]) -> None:
    del ds[2:]


def _colour(ds: list[Dataset]) -> None:
    d = ds[1]
    d.SamplesPerPixel = 3
    d.PhotometricInterpretation = "RGB"
    d.PlanarConfiguration = 0
    d.BitsAllocated = d.BitsStored = 8
    d.HighBit = 7
    d.PixelData = np.zeros((d.Rows, d.Columns, 3), np.uint8).tobytes()


def _corrupt_codestream(ds: list[Dataset]) -> None:
    """Slice 3 as JPEG-LS (pyjpegls), its scan data overwritten between a sound header (what the SCP
    checks) and a sound end marker: CharLS refuses it (libjpeg, tried next by pydicom, would not)."""
    d = ds[3]
    d.compress(JPEGLSLossless)
    frame = bytearray(get_frame(d.PixelData, 0, number_of_frames=1))
    frame[40:-2] = bytes([0x13]) * (len(frame) - 42)
    d.PixelData = encapsulate([bytes(frame)])
    d["PixelData"].is_undefined_length = True


def _cut_codestream(ds: list[Dataset]) -> None:
    """Slice 2 as JPEG-LS, its codestream cut in half: no end marker (libjpeg, which decodes JPEG
    Lossless and would be tried for JPEG-LS too, returns what it has of a cut codestream without an error)."""
    d = ds[2]
    d.compress(JPEGLSLossless)
    frame = get_frame(d.PixelData, 0, number_of_frames=1)
    d.PixelData = encapsulate([frame[:len(frame) // 2]])
    d["PixelData"].is_undefined_length = True


def _mpeg2(ds: list[Dataset]) -> None:
    d = ds[0]
    d.file_meta.TransferSyntaxUID = MPEG2MPML
    d.PixelData = encapsulate([b"\x00" * 64])
    d["PixelData"].VR = "OB"


def _secondary_capture(ds: list[Dataset]) -> None:
    for d in ds:
        d.SOPClassUID = d.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"


def _no_pixel_spacing(ds: list[Dataset]) -> None:
    for d in ds:
        del d.PixelSpacing


def _zero_pixel_spacing(ds: list[Dataset]) -> None:
    for d in ds:
        d.PixelSpacing = [0.0, 0.0]


def _no_frame_of_reference(ds: list[Dataset]) -> None:
    del ds[7].FrameOfReferenceUID


def _mixed_with_multiframe(ds: list[Dataset]) -> None:
    ds.append(enhanced_dataset(SeriesSpec(slices=3)))


REFUSALS: list[tuple[str, str, Callable[[list[Dataset]], None] | None, Callable[[list[Path]], None] | None, str]] = [
    ("truncated", "unreadable", None, _truncate, "cannot decode the pixel data"),
    ("garbage", "unreadable", None, _garbage, "not a readable DICOM file"),
    ("no-pixel-data", "unreadable", _no_pixels, None, "Pixel Data"),
    ("orientation", "mixed_orientation", _tilt_orientation, None, "0.8, 0.6"),
    ("gantry-tilt", "gantry_tilt", _gantry_tilt, None, "10.00 degrees"),
    ("missing", "missing_slices", _drop_slice, None, "1 slice(s) missing between positions 45 and 50"),
    ("uneven", "uneven_slices", _uneven, None, "slice gap 3.5 mm"),
    ("duplicate-position", "duplicate_slices", _duplicate_position, None, "same position"),
    ("duplicate-instance", "duplicate_slices", _duplicate_instance, None, "appears more than once"),
    ("size", "inconsistent_size", _other_size, None, "(16, 16)"),
    ("pixel-spacing", "inconsistent_size", _other_spacing, None, "[0.9, 0.7]"),
    ("series", "mixed_series", _other_series, None, "1.2.3.4.5.999"),
    ("no-pixel-spacing", "bad_spacing", _no_pixel_spacing, None, "missing PixelSpacing"),
    ("zero-pixel-spacing", "bad_spacing", _zero_pixel_spacing, None, "PixelSpacing must be positive"),
    ("no-frame-of-reference", "no_frame_of_reference", _no_frame_of_reference, None,
     "missing or empty FrameOfReferenceUID"),
    ("two-slices", "too_few_slices", _two_slices, None, "2 slice(s)"),
    ("colour", "unsupported", _colour, None, "PhotometricInterpretation=RGB"),
    ("mpeg2", "unsupported", _mpeg2, None, str(MPEG2MPML)),
    ("corrupt-codestream", "undecodable_pixels", _corrupt_codestream, None, "cannot decode the pixel data"),
    ("cut-codestream", "undecodable_pixels", _cut_codestream, None, "not its end marker FFD9 (cut short)"),
    ("secondary-capture", "unsupported", _secondary_capture, None, "1.2.840.10008.5.1.4.1.1.7"),
    ("single-and-multi-frame", "unsupported", _mixed_with_multiframe, None, "multi-frame"),
]


@pytest.mark.parametrize(("code", "damage", "damage_files", "needle"), [r[1:] for r in REFUSALS],
                         ids=[r[0] for r in REFUSALS])
def test_refusals(tmp_path: Path, code: str, damage, damage_files, needle: str) -> None:
    datasets = classic_datasets(SeriesSpec(slices=20))
    if damage is not None:
        damage(datasets)
    paths = write_datasets(datasets, tmp_path)
    if damage_files is not None:
        damage_files(paths)

    with pytest.raises(SeriesError) as info:
        load_series(paths)

    err = info.value
    assert err.reason_code == code, str(err)
    assert needle in str(err)
    assert isinstance(err, ValueError)
    assert not any(word in str(err) for word in PATIENT_WORDS)


def test_no_files() -> None:
    with pytest.raises(SeriesError) as info:
        load_series([])
    assert info.value.reason_code == "no_instances"


def test_every_reason_code_is_exercised() -> None:
    assert {r[1] for r in REFUSALS} | {"no_instances"} == REASON_CODES


def test_multiframe_duplicate_positions_refused(tmp_path: Path) -> None:
    ds = enhanced_dataset(SeriesSpec(slices=6))
    ds.PerFrameFunctionalGroupsSequence[4].PlanePositionSequence[0].ImagePositionPatient = (
        ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[0].ImagePositionPatient
    )
    with pytest.raises(SeriesError) as info:
        load_series(write_datasets([ds], tmp_path))
    assert info.value.reason_code == "duplicate_slices"


def test_unknown_reason_code_is_a_bug() -> None:
    with pytest.raises(ValueError, match="unknown series reason code 'nope'"):
        SeriesError("nope", "x")


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90",
                                    "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.57"])
def test_a_lossless_compressed_series_loads_the_same_voxels(tmp_path: Path, syntax: str) -> None:
    """Each slice encoded by a real encoder (pydicom's RLE, pyjpegls, openjpeg; dcmtk's dcmcjpeg) and decoded
    through pydicom's handlers: the same voxels as the uncompressed series, and no lossy source."""
    from dicom_series import lossy_source
    from tests.compressed import compress_file

    spec = SeriesSpec(slices=6, rows=32, cols=48)
    plain = write_datasets(classic_datasets(spec), tmp_path / "plain")
    packed = [compress_file(p, syntax, tmp_path / "packed" / p.name) for p in plain]
    volume = load_series(packed, compact=True)
    assert np.array_equal(volume.array, load_series(plain, compact=True).array)
    assert np.array_equal(volume.array, expected_volume(spec).astype(np.int16))
    assert lossy_source(volume.headers) is None


def test_a_lossy_series_is_named_by_its_syntax_and_attributes(tmp_path: Path) -> None:
    """JPEG 2000 at 20:1 (openjpeg, which leaves Lossy Image Compression unset) and JPEG Extended (dcmcjpeg,
    which sets it with Method and Ratio): lossy_source names the methods, ratios and syntaxes."""
    from dicom_series import lossy_source
    from tests.compressed import compress_file

    plain = write_datasets(classic_datasets(SeriesSpec(slices=4)), tmp_path / "plain")
    files = [compress_file(plain[0], "1.2.840.10008.1.2.4.91", tmp_path / "a.dcm"),
             compress_file(plain[1], "1.2.840.10008.1.2.4.51", tmp_path / "b.dcm"), *plain[2:]]
    volume = load_series(files, min_slices=3)
    lossy = lossy_source(volume.headers)
    assert lossy is not None and lossy.instances == 2
    assert lossy.methods == ("ISO_15444_1", "ISO_10918_1")
    assert len(lossy.ratios) == 1 and float(lossy.ratios[0]) > 1
    assert lossy.transfer_syntaxes == ("1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.51")
