"""One DICOM series (a list of files) -> a :class:`Volume` with its patient geometry.

:func:`load_series` reads the headers of every file first (``stop_before_pixels``), checks that they
form one regular 3D grid (:mod:`dicom_series.grid`), orders the slices by their position along the slice
normal (never by InstanceNumber or file name), allocates the output array once and then decodes the pixel
data one file (one frame of a multi-frame file) at a time, applying the rescale slope/intercept of each
slice.

``compact=True`` (the worker's load) keeps the rescaled values as int16 when they are integers that fit
it, as a CT's Hounsfield units are (stored values and an integer slope and intercept): the same values
as the float32 array, in half the memory (a 300x512x512 CT: 157 MB instead of 315 MB). The first slice
that does not fit (a fractional slope, a value beyond int16, floating-point pixel data) turns the array
into float32 there and then, so what comes back is always the same numbers.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from .errors import SeriesError
from .grid import check_grid
from .headers import Instance, Plane, iter_decoded, planes_of, read_instance, value

__all__ = ["SliceRef", "Volume", "find_series", "load_series"]


@dataclass(frozen=True)
class SliceRef:
    """The source of one z index: an instance, and its frame (1-based) when it is multi-frame."""

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None  # None for a single-frame instance


@dataclass(frozen=True, eq=False)
class Volume:
    """A loaded series. ``array`` is read-only float32 (slices, rows, cols) with the rescale applied;
    int16 holding the same values when loaded with ``compact=True`` and they fit (:func:`load_series`).

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

    def without_pixels(self) -> Volume:
        """The same volume, its ``array`` a read-only zero-strided stand-in of the same shape and dtype
        (no memory; every value 0): for what needs only the geometry and the headers (a SEG, an SR) once
        the pixels have been used, so that the caller can let the pixel data go (157 MB for a 300x512x512
        CT as int16).

        >>> import numpy as np
        >>> v = Volume(np.ones((2, 3, 4), np.int16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), "CT", "1", "2", "3",
        ...            (), ())
        >>> light = v.without_pixels()
        >>> light.shape, light.array.dtype, light.array.strides, light.array.flags.writeable
        ((2, 3, 4), dtype('int16'), (0, 0, 0), False)
        """
        stand_in = np.broadcast_to(np.zeros((), self.array.dtype), self.array.shape)
        return dataclasses.replace(self, array=stand_in)

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


def load_series(paths: Sequence[str | os.PathLike[str]], *, min_slices: int = 3, compact: bool = False) -> Volume:
    """Load one series into a :class:`Volume`; raise :class:`SeriesError` when it is not a regular grid.

    ``paths`` are the files of one series in any order. ``min_slices``: fewer planes are refused
    (``too_few_slices``). ``compact``: the array as int16 when the rescaled values are integers that fit
    it (the same values as float32, half the memory; see the module doc), else float32.
    """
    if min_slices < 2:
        raise ValueError(f"min_slices must be at least 2 (a spacing needs two slices), got {min_slices}")
    files = [Path(p) for p in paths]
    if not files:
        raise SeriesError("no_instances", "no files were given for the series")
    instances = [read_instance(path) for path in files]
    series_uid, study_uid, for_uid, modality = _series_identity(instances)
    _check_one_multiframe(instances)
    planes = [plane for index, inst in enumerate(instances) for plane in planes_of(index, inst)]
    planes, direction, spacing_z = check_grid(planes, min_slices)

    array = _decode(instances, planes, compact)
    array.setflags(write=False)
    direction.setflags(write=False)
    if instances[0].multiframe:
        headers: tuple[Dataset, ...] = (instances[0].header,)
    else:
        headers = tuple(instances[p.source].header for p in planes)
    pixel_spacing = planes[0].pixel_spacing
    return Volume(
        array=array,
        spacing=(spacing_z, float(pixel_spacing[0]), float(pixel_spacing[1])),
        origin=tuple(float(v) for v in planes[0].position),  # type: ignore[arg-type]
        direction=direction,
        modality=modality,
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
        frame_of_reference_uid=for_uid,
        slices=tuple(SliceRef(p.sop_class_uid, p.sop_instance_uid, p.frame_number) for p in planes),
        headers=headers,
    )


def _series_identity(instances: list[Instance]) -> tuple[str, str, str, str]:
    """(SeriesInstanceUID, StudyInstanceUID, FrameOfReferenceUID, Modality), each one value in all files.

    A missing or empty FrameOfReferenceUID is ``no_frame_of_reference``: the positions and orientations
    are then in no known patient coordinate system, and a SEG drawn on them could not say which one its
    planes lie in (nor would anything be gained by inventing a UID for it).
    """
    for inst in instances:
        if not str(inst.header.get("FrameOfReferenceUID", "") or "").strip():
            raise SeriesError("no_frame_of_reference", f"{inst.path.name}: missing or empty FrameOfReferenceUID")

    def same(keyword: str, what: str) -> str:
        distinct = sorted({str(value(inst.header, keyword, inst.path.name)) for inst in instances})
        if len(distinct) > 1:
            raise SeriesError(
                "mixed_series", f"the files hold {len(distinct)} different {what}: {', '.join(distinct[:4])}"
            )
        return distinct[0]

    return (
        same("SeriesInstanceUID", "SeriesInstanceUIDs"),
        same("StudyInstanceUID", "StudyInstanceUIDs"),
        same("FrameOfReferenceUID", "FrameOfReferenceUIDs"),
        same("Modality", "Modalities"),
    )


def _check_one_multiframe(instances: list[Instance]) -> None:
    n_multi = sum(inst.multiframe for inst in instances)
    if n_multi and len(instances) > 1:
        raise SeriesError(
            "unsupported",
            f"a series of {len(instances)} instances of which {n_multi} are multi-frame; only one multi-frame "
            f"instance per series, or single-frame instances only, can be encoded as one SEG",
        )


def _decode(instances: list[Instance], planes: list[Plane], compact: bool = False) -> np.ndarray:
    """The pixel data of every plane, rescaled, in z order: decoded one frame at a time into one array
    (int16 while ``compact`` and every slice so far fits it, see :func:`_as_int16`; else float32)."""
    rows, cols = planes[0].rows, planes[0].cols
    z_of = {(p.source, p.frame_number): z for z, p in enumerate(planes)}
    array = np.empty((len(planes), rows, cols), dtype=np.int16 if compact else np.float32)
    for index, inst in enumerate(instances):
        for f, pixels in enumerate(iter_decoded(inst)):
            if pixels.shape != (rows, cols):
                raise SeriesError(
                    "unreadable", f"{inst.path.name}: decoded frame of shape {pixels.shape}, header says {(rows, cols)}"
                )
            z = z_of[(index, f + 1 if inst.multiframe else None)]
            plane = planes[z]
            if array.dtype == np.int16:
                values = _as_int16(pixels, plane.slope, plane.intercept)
                if values is not None:
                    array[z] = values
                    continue
                # this slice does not fit: the slices written so far hold exact integers, float32 from here
                array = array.astype(np.float32)
            out = array[z]
            out[...] = pixels
            if plane.slope != 1.0:
                out *= np.float32(plane.slope)
            if plane.intercept != 0.0:
                out += np.float32(plane.intercept)
    return array


#: an integer slope up to this and an intercept under 2**16 keep stored values of up to 16 bits exact in
#: float32 (every product and sum under 2**24), so the int16 values equal the float32 rescale bit for bit
_MAX_INT_SLOPE = 256


def _as_int16(pixels: np.ndarray, slope: float, intercept: float) -> np.ndarray | None:
    """``pixels * slope + intercept`` as int16 when that is exactly what the float32 rescale gives: integer
    stored values of at most 16 bits, an integer slope (at most :data:`_MAX_INT_SLOPE` in size) and
    intercept (under 2**16), every result within int16. None otherwise."""
    if pixels.dtype.kind not in "iu" or pixels.dtype.itemsize > 2:
        return None
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        return None
    if not (slope == int(slope) and 0 < abs(slope) <= _MAX_INT_SLOPE and intercept == int(intercept)
            and abs(intercept) < 2**16):
        return None
    values = pixels.astype(np.int32)
    if slope != 1.0:
        values *= int(slope)
    if intercept != 0.0:
        values += int(intercept)
    if values.size and (int(values.min()) < -(2**15) or int(values.max()) >= 2**15):
        return None
    return values.astype(np.int16)


def find_series(root: str | os.PathLike[str]) -> dict[str, list[Path]]:
    """The DICOM files under ``root`` (recursively), grouped by SeriesInstanceUID; other files are skipped."""
    groups: dict[str, list[Path]] = {}
    for p in sorted(Path(root).rglob("*")):
        if not p.is_file():
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if uid:
            groups.setdefault(uid, []).append(p)
    return groups
