"""One DICOM series (files from the spool) -> a volume with its patient geometry.

:func:`load_series` reads the headers of every file first (``stop_before_pixels``), checks that they
form one regular 3D grid, orders the slices by their position along the slice normal (never by
InstanceNumber or file name), allocates the output array once and then decodes the pixel data one
file (one frame of a multi-frame file) at a time, applying the rescale slope/intercept of each slice.

Classic single-frame CT / MR / PET images and one multi-frame Enhanced (or Legacy Converted Enhanced)
CT / MR / PET instance per series are read. Anything the worker cannot place on a regular grid is
refused with a :class:`SeriesError` whose ``reason_code`` is one of :data:`REASON_CODES`; messages name
the offending values (UIDs, positions, sizes), never patient names or IDs.

Axes: ``Volume.array[z, y, x]``: z follows the slice normal (row cosine x column cosine), y the
column cosine (down the rows), x the row cosine (along a row). ``Volume.affine`` maps the index
``(z, y, x, 1)`` to patient coordinates (x, y, z) in mm.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder, iter_pixels

__all__ = [
    "REASON_CODES",
    "SINGLE_FRAME_SOP_CLASSES",
    "MULTI_FRAME_SOP_CLASSES",
    "SeriesError",
    "SliceRef",
    "Volume",
    "load_series",
]

REASON_CODES = frozenset(
    {
        "no_instances",
        "unreadable",
        "mixed_orientation",
        "gantry_tilt",
        "missing_slices",
        "uneven_slices",
        "duplicate_slices",
        "inconsistent_size",
        "mixed_series",
        "too_few_slices",
        "unsupported",
        "bad_spacing",
    }
)

SINGLE_FRAME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.128": "Positron Emission Tomography Image Storage",
}
MULTI_FRAME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.128.1": "Legacy Converted Enhanced PET Image Storage",
}

# Tolerances. Cosines are unit vectors written as decimal strings; positions and spacings in mm.
ORIENTATION_ATOL = 1e-3  # per direction-cosine component (~0.06 degrees)
PIXEL_SPACING_RTOL = 1e-3  # PixelSpacing of every slice within 0.1 % of the first
DUPLICATE_ATOL_MM = 0.01  # two slices closer than this along the normal are the same position
SPACING_RTOL = 0.05  # every slice gap within 5 % of the median gap
TILT_VOXEL_FRACTION = 0.1  # in-plane drift of the slice positions, in units of the finest pixel spacing

# Errors pydicom raises for files it cannot parse or decode.
_READ_ERRORS = (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, struct.error)


class SeriesError(ValueError):
    """A series the worker refuses; ``reason_code`` is stable (one of :data:`REASON_CODES`).

    >>> err = SeriesError("gantry_tilt", "slices drift 3.1 mm in-plane")
    >>> err.reason_code, str(err)
    ('gantry_tilt', 'gantry_tilt: slices drift 3.1 mm in-plane')
    """

    def __init__(self, reason_code: str, message: str) -> None:
        if reason_code not in REASON_CODES:
            raise ValueError(f"unknown series reason code {reason_code!r}; expected one of {sorted(REASON_CODES)}")
        super().__init__(f"{reason_code}: {message}")
        self.reason_code = reason_code
        self.message = message


@dataclass(frozen=True)
class SliceRef:
    """The source of one z index: an instance, and its frame (1-based) when it is multi-frame."""

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None  # None for a single-frame instance


@dataclass(frozen=True, eq=False)
class Volume:
    """A loaded series. ``array`` is read-only float32 (slices, rows, cols) with the rescale applied.

    ``spacing`` is (z, y, x) in mm: the distance between slice positions along the normal, then
    PixelSpacing (between rows, between columns). ``origin`` is the ImagePositionPatient of slice 0.
    ``direction`` is 3x3, one row per vector: row cosine, column cosine, slice normal.
    ``slices[z]`` says where slice z came from. ``headers`` are the source datasets without pixel
    data: one per instance, in z order for single-frame series; the one instance of a multi-frame series.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    modality: str
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    slices: tuple[SliceRef, ...]
    headers: tuple[Dataset, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def is_multiframe(self) -> bool:
        return self.slices[0].frame_number is not None

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix: ``affine @ (z, y, x, 1)`` = (x, y, z, 1) in patient coordinates (mm)."""
        dz, dy, dx = self.spacing
        row, col, normal = self.direction
        out = np.eye(4)
        out[:3, 0] = normal * dz
        out[:3, 1] = col * dy
        out[:3, 2] = row * dx
        out[:3, 3] = self.origin
        return out


@dataclass
class _Frame:
    """One 2D plane of the series, as described by its header."""

    source: int  # index into the list of instances
    frame_number: int | None
    sop_class_uid: str
    sop_instance_uid: str
    position: np.ndarray  # ImagePositionPatient
    orientation: np.ndarray  # ImageOrientationPatient (6)
    pixel_spacing: np.ndarray  # (2,)
    rows: int
    cols: int
    slope: float
    intercept: float


@dataclass
class _Instance:
    path: Path
    header: Dataset
    multiframe: bool


def _name(path: Path) -> str:
    return path.name


def _value(ds: Dataset, keyword: str, where: str, *, required: bool = True, default: Any = None) -> Any:
    try:
        if keyword not in ds or ds[keyword].value is None or ds[keyword].value == "":
            if required:
                raise SeriesError("unreadable", f"{where}: missing {keyword}")
            return default
        return ds[keyword].value
    except SeriesError:
        raise
    except _READ_ERRORS as exc:
        raise SeriesError("unreadable", f"{where}: invalid {keyword} ({exc})") from exc


def _floats(ds: Dataset, keyword: str, n: int, where: str) -> np.ndarray:
    raw = _value(ds, keyword, where)
    try:
        items = [raw] if isinstance(raw, (str, bytes)) or not hasattr(raw, "__iter__") else list(raw)
        values = np.array([float(v) for v in items], dtype=float)
    except (TypeError, ValueError) as exc:
        raise SeriesError("unreadable", f"{where}: invalid {keyword} {raw!r}") from exc
    if values.shape != (n,) or not np.all(np.isfinite(values)):
        raise SeriesError("unreadable", f"{where}: {keyword} must be {n} finite numbers, got {list(values)}")
    return values


def _float(ds: Dataset | None, keyword: str, where: str, default: float) -> float:
    if ds is None:
        return default
    raw = _value(ds, keyword, where, required=False)
    if raw is None:
        return default
    try:
        value = float(raw)
    except (TypeError, ValueError) as exc:
        raise SeriesError("unreadable", f"{where}: invalid {keyword} {raw!r}") from exc
    if not math.isfinite(value):
        raise SeriesError("unreadable", f"{where}: {keyword} is not finite ({raw!r})")
    return value


def _read_header(path: Path) -> Dataset:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except _READ_ERRORS as exc:
        raise SeriesError("unreadable", f"{_name(path)}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    return ds


def _pixel_spacing(ds: Dataset, where: str) -> np.ndarray:
    """PixelSpacing (row, column) in mm; missing or unreadable is ``bad_spacing``: no grid without it."""
    try:
        return _floats(ds, "PixelSpacing", 2, where)
    except SeriesError as exc:
        raise SeriesError("bad_spacing", exc.message) from exc


def _check_pixel_format(ds: Dataset, where: str) -> None:
    samples = int(_value(ds, "SamplesPerPixel", where))
    photometric = str(_value(ds, "PhotometricInterpretation", where))
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise SeriesError(
            "unsupported",
            f"{where}: colour images are not supported (SamplesPerPixel={samples}, "
            f"PhotometricInterpretation={photometric})",
        )
    if "ModalityLUTSequence" in ds:
        raise SeriesError("unsupported", f"{where}: a Modality LUT Sequence is not supported, only rescale")
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None:
        raise SeriesError("unreadable", f"{where}: no TransferSyntaxUID in the file meta information")
    try:
        available = get_decoder(tsyntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise SeriesError(
            "unsupported", f"{where}: cannot decode transfer syntax {tsyntax} ({getattr(tsyntax, 'name', '')})"
        )


def _classic_frames(index: int, ds: Dataset, where: str) -> list[_Frame]:
    return [
        _Frame(
            source=index,
            frame_number=None,
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(_value(ds, "SOPInstanceUID", where)),
            position=_floats(ds, "ImagePositionPatient", 3, where),
            orientation=_floats(ds, "ImageOrientationPatient", 6, where),
            pixel_spacing=_pixel_spacing(ds, where),
            rows=int(_value(ds, "Rows", where)),
            cols=int(_value(ds, "Columns", where)),
            slope=_float(ds, "RescaleSlope", where, 1.0),
            intercept=_float(ds, "RescaleIntercept", where, 0.0),
        )
    ]


def _group(per_frame: Dataset | None, shared: Dataset | None, sequence: str) -> Dataset | None:
    """The first item of a functional group macro, per-frame first, then shared."""
    for fg in (per_frame, shared):
        if fg is not None and sequence in fg and len(fg[sequence].value) > 0:
            return fg[sequence].value[0]
    return None


def _multiframe_frames(index: int, ds: Dataset, where: str) -> list[_Frame]:
    n = int(_value(ds, "NumberOfFrames", where))
    shared_seq = _value(ds, "SharedFunctionalGroupsSequence", where)
    per_frame_seq = _value(ds, "PerFrameFunctionalGroupsSequence", where)
    shared = shared_seq[0] if len(shared_seq) else None
    if len(per_frame_seq) != n:
        raise SeriesError(
            "unreadable",
            f"{where}: NumberOfFrames is {n} but PerFrameFunctionalGroupsSequence has {len(per_frame_seq)} items",
        )
    rows, cols = int(_value(ds, "Rows", where)), int(_value(ds, "Columns", where))
    sop_instance_uid = str(_value(ds, "SOPInstanceUID", where))
    frames = []
    for f, item in enumerate(per_frame_seq):
        fwhere = f"{where} frame {f + 1}"
        groups = {}
        for seq in ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence"):
            group = _group(item, shared, seq)
            if group is None:
                raise SeriesError("unreadable", f"{fwhere}: no {seq} in the functional groups")
            groups[seq] = group
        transform = _group(item, shared, "PixelValueTransformationSequence")
        frames.append(
            _Frame(
                source=index,
                frame_number=f + 1,
                sop_class_uid=str(ds.SOPClassUID),
                sop_instance_uid=sop_instance_uid,
                position=_floats(groups["PlanePositionSequence"], "ImagePositionPatient", 3, fwhere),
                orientation=_floats(groups["PlaneOrientationSequence"], "ImageOrientationPatient", 6, fwhere),
                pixel_spacing=_pixel_spacing(groups["PixelMeasuresSequence"], fwhere),
                rows=rows,
                cols=cols,
                slope=_float(transform, "RescaleSlope", fwhere, 1.0),
                intercept=_float(transform, "RescaleIntercept", fwhere, 0.0),
            )
        )
    return frames


def _fmt(v: Sequence[float] | np.ndarray) -> str:
    return "[" + ", ".join(f"{float(x):.6g}" for x in v) + "]"


def _check_same(values: Sequence[str], what: str, code: str = "mixed_series") -> str:
    distinct = sorted(set(values))
    if len(distinct) > 1:
        raise SeriesError(code, f"the files hold {len(distinct)} different {what}: {', '.join(distinct[:4])}")
    return distinct[0]


def _geometry(frames: list[_Frame], min_slices: int) -> tuple[list[_Frame], np.ndarray, float]:
    """Validate and order the planes; return (frames in z order, direction rows, slice spacing)."""
    first = frames[0]
    sizes = {(fr.rows, fr.cols) for fr in frames}
    if len(sizes) > 1:
        raise SeriesError("inconsistent_size", f"slices have different sizes (rows, cols): {sorted(sizes)[:4]}")
    spacings = np.array([fr.pixel_spacing for fr in frames])
    if not np.allclose(spacings, first.pixel_spacing[None, :], rtol=PIXEL_SPACING_RTOL, atol=1e-6):
        bad = next(fr for fr in frames if not np.allclose(fr.pixel_spacing, first.pixel_spacing, rtol=PIXEL_SPACING_RTOL, atol=1e-6))
        raise SeriesError(
            "inconsistent_size",
            f"PixelSpacing differs: {_fmt(first.pixel_spacing)} and {_fmt(bad.pixel_spacing)}",
        )
    if np.any(first.pixel_spacing <= 0):
        raise SeriesError("bad_spacing", f"PixelSpacing must be positive, got {_fmt(first.pixel_spacing)}")

    orientations = np.array([fr.orientation for fr in frames])
    deviation = np.abs(orientations - first.orientation[None, :]).max(axis=1)
    if np.any(deviation > ORIENTATION_ATOL):
        bad = frames[int(np.argmax(deviation))]
        raise SeriesError(
            "mixed_orientation",
            f"ImageOrientationPatient differs: {_fmt(first.orientation)} ({first.sop_instance_uid}) and "
            f"{_fmt(bad.orientation)} ({bad.sop_instance_uid})",
        )
    row, col = first.orientation[:3], first.orientation[3:]
    if (
        abs(np.linalg.norm(row) - 1) > ORIENTATION_ATOL
        or abs(np.linalg.norm(col) - 1) > ORIENTATION_ATOL
        or abs(float(row @ col)) > ORIENTATION_ATOL
    ):
        raise SeriesError("unreadable", f"ImageOrientationPatient {_fmt(first.orientation)} is not two orthonormal vectors")
    row = row / np.linalg.norm(row)
    col = col - (col @ row) * row
    col = col / np.linalg.norm(col)
    normal = np.cross(row, col)
    direction = np.stack([row, col, normal])

    seen: set[tuple[str, int | None]] = set()
    for fr in frames:
        key = (fr.sop_instance_uid, fr.frame_number)
        if key in seen:
            raise SeriesError("duplicate_slices", f"SOP Instance {fr.sop_instance_uid} appears more than once")
        seen.add(key)

    if len(frames) < min_slices:
        raise SeriesError("too_few_slices", f"{len(frames)} slice(s); at least {min_slices} are needed")

    positions = np.array([fr.position for fr in frames])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    frames = [frames[i] for i in order]
    positions, along = positions[order], along[order]

    gaps = np.diff(along)
    same_place = np.flatnonzero(gaps < DUPLICATE_ATOL_MM)
    if same_place.size:
        i = int(same_place[0])
        raise SeriesError(
            "duplicate_slices",
            f"two slices at the same position {_fmt(positions[i])}: {frames[i].sop_instance_uid} and "
            f"{frames[i + 1].sop_instance_uid}",
        )

    offsets = positions - positions[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    drift = np.linalg.norm(in_plane, axis=1)
    tolerance = TILT_VOXEL_FRACTION * float(first.pixel_spacing.min())
    if drift.max() > tolerance:
        k = int(np.argmax(drift))
        angle = math.degrees(math.atan2(drift[k], float(offsets[k] @ normal)))
        raise SeriesError(
            "gantry_tilt",
            f"slice positions leave the slice normal {_fmt(normal)} by up to {drift[k]:.3g} mm "
            f"(about {angle:.2f} degrees; tolerance {tolerance:.3g} mm)",
        )

    step = float(np.median(gaps))
    ratio = gaps / step
    uneven = np.flatnonzero(np.abs(ratio - np.round(ratio)) > SPACING_RTOL * np.maximum(np.round(ratio), 1))
    uneven = np.union1d(uneven, np.flatnonzero(np.round(ratio) < 1))
    if uneven.size:
        i = int(uneven[0])
        raise SeriesError(
            "uneven_slices",
            f"slice gap {gaps[i]:.4g} mm between positions {along[i]:.4g} and {along[i + 1]:.4g} mm along "
            f"the normal; the usual gap is {step:.4g} mm",
        )
    missing = np.flatnonzero(np.round(ratio) >= 2)
    if missing.size:
        i = int(missing[0])
        raise SeriesError(
            "missing_slices",
            f"{int(np.round(ratio[i])) - 1} slice(s) missing between positions {along[i]:.4g} and "
            f"{along[i + 1]:.4g} mm along the normal (gap {gaps[i]:.4g} mm, usual {step:.4g} mm); "
            f"{int(np.round(ratio[missing]).sum()) - missing.size} missing in all",
        )
    spacing_z = float((along[-1] - along[0]) / (len(frames) - 1)) if len(frames) > 1 else float("nan")
    return frames, direction, spacing_z


def _iter_frames(path: Path, expected: int, where: str) -> Iterator[np.ndarray]:
    """Decoded frames of one file, one at a time; failures become ``unreadable``."""
    count = 0
    try:
        for frame in iter_pixels(path):
            count += 1
            yield frame
    except SeriesError:
        raise
    except (AttributeError, *_READ_ERRORS) as exc:
        raise SeriesError("unreadable", f"{where}: cannot decode the pixel data ({type(exc).__name__}: {exc})") from exc
    if count != expected:
        raise SeriesError("unreadable", f"{where}: {count} frame(s) decoded, {expected} expected")


def load_series(paths: Sequence[Path], *, min_slices: int = 3) -> Volume:
    """Load one series into a :class:`Volume`; raise :class:`SeriesError` when it is not a regular grid.

    ``paths`` are the files of one series in any order. ``min_slices``: fewer planes are refused
    (``too_few_slices``).
    """
    if min_slices < 2:
        raise ValueError(f"min_slices must be at least 2 (a spacing needs two slices), got {min_slices}")
    paths = [Path(p) for p in paths]
    if not paths:
        raise SeriesError("no_instances", "no files were given for the series")

    instances: list[_Instance] = []
    for path in paths:
        ds = _read_header(path)
        where = _name(path)
        sop_class = str(_value(ds, "SOPClassUID", where))
        if sop_class in SINGLE_FRAME_SOP_CLASSES:
            multiframe = False
        elif sop_class in MULTI_FRAME_SOP_CLASSES:
            multiframe = True
        else:
            raise SeriesError("unsupported", f"{where}: SOP Class {sop_class} is not a CT, MR or PET image")
        instances.append(_Instance(path=path, header=ds, multiframe=multiframe))

    def same(keyword: str, what: str) -> str:
        return _check_same([str(_value(inst.header, keyword, _name(inst.path))) for inst in instances], what)

    series_uid = same("SeriesInstanceUID", "SeriesInstanceUIDs")
    study_uid = same("StudyInstanceUID", "StudyInstanceUIDs")
    for_uid = same("FrameOfReferenceUID", "FrameOfReferenceUIDs")
    modality = same("Modality", "Modalities")

    n_multi = sum(inst.multiframe for inst in instances)
    if n_multi and len(instances) > 1:
        raise SeriesError(
            "unsupported",
            f"a series of {len(instances)} instances of which {n_multi} are multi-frame; only one multi-frame "
            f"instance per series, or single-frame instances only, can be encoded as one SEG",
        )

    frames: list[_Frame] = []
    for index, inst in enumerate(instances):
        where = _name(inst.path)
        _check_pixel_format(inst.header, where)
        if inst.multiframe:
            frames.extend(_multiframe_frames(index, inst.header, where))
        else:
            frames.extend(_classic_frames(index, inst.header, where))

    frames, direction, spacing_z = _geometry(frames, min_slices)
    rows, cols = frames[0].rows, frames[0].cols
    z_of = {(fr.source, fr.frame_number): z for z, fr in enumerate(frames)}

    array = np.empty((len(frames), rows, cols), dtype=np.float32)
    for index, inst in enumerate(instances):
        where = _name(inst.path)
        n = int(inst.header.NumberOfFrames) if inst.multiframe else 1
        for f, pixels in enumerate(_iter_frames(inst.path, n, where)):
            if pixels.shape != (rows, cols):
                raise SeriesError("unreadable", f"{where}: decoded frame of shape {pixels.shape}, header says {(rows, cols)}")
            z = z_of[(index, f + 1 if inst.multiframe else None)]
            fr = frames[z]
            out = array[z]
            out[...] = pixels
            if fr.slope != 1.0:
                out *= np.float32(fr.slope)
            if fr.intercept != 0.0:
                out += np.float32(fr.intercept)
    array.setflags(write=False)
    direction.setflags(write=False)

    if n_multi:
        ordered_headers: tuple[Dataset, ...] = (instances[0].header,)
    else:
        ordered_headers = tuple(instances[fr.source].header for fr in frames)
    pixel_spacing = frames[0].pixel_spacing
    return Volume(
        array=array,
        spacing=(spacing_z, float(pixel_spacing[0]), float(pixel_spacing[1])),
        origin=tuple(float(v) for v in frames[0].position),  # type: ignore[arg-type]
        direction=direction,
        modality=modality,
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
        frame_of_reference_uid=for_uid,
        slices=tuple(SliceRef(fr.sop_class_uid, fr.sop_instance_uid, fr.frame_number) for fr in frames),
        headers=ordered_headers,
    )
