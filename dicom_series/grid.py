"""Do the planes of a series form one regular 3D grid? Each check refuses with its own reason code.

The order of the checks is part of the contract (a series with several faults is refused for the first):
in-plane size and PixelSpacing, orientation, repeated instances, slice count, then, with the planes
ordered along the slice normal: repeated positions, gantry tilt, uneven and missing slices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .errors import SeriesError
from .headers import Plane

__all__ = [
    "DUPLICATE_ATOL_MM",
    "ORIENTATION_ATOL",
    "PIXEL_SPACING_RTOL",
    "SPACING_RTOL",
    "TILT_VOXEL_FRACTION",
    "check_grid",
]

# Tolerances. Cosines are unit vectors written as decimal strings; positions and spacings in mm.
ORIENTATION_ATOL = 1e-3  # per direction-cosine component (~0.06 degrees)
PIXEL_SPACING_RTOL = 1e-3  # PixelSpacing of every slice within 0.1 % of the first
DUPLICATE_ATOL_MM = 0.01  # two slices closer than this along the normal are the same position
SPACING_RTOL = 0.05  # every slice gap within 5 % of the median gap
TILT_VOXEL_FRACTION = 0.1  # in-plane drift of the slice positions, in units of the finest pixel spacing


def _fmt(v: Sequence[float] | np.ndarray) -> str:
    return "[" + ", ".join(f"{float(x):.6g}" for x in v) + "]"


def check_grid(planes: list[Plane], min_slices: int) -> tuple[list[Plane], np.ndarray, float]:
    """Validate and order the planes; return (planes in z order, direction rows, slice spacing in mm).

    ``direction`` is 3x3, one row per vector: row cosine, column cosine, slice normal.
    """
    pixel_spacing = _check_in_plane_grid(planes)
    direction = _common_direction(planes)
    _check_unique_instances(planes)
    if len(planes) < min_slices:
        raise SeriesError("too_few_slices", f"{len(planes)} slice(s); at least {min_slices} are needed")
    normal = direction[2]
    planes, positions, along = _order_along(planes, normal)
    _check_distinct_positions(planes, positions, along)
    _check_no_tilt(positions, normal, pixel_spacing)
    _check_slice_gaps(along)
    spacing_z = float((along[-1] - along[0]) / (len(planes) - 1)) if len(planes) > 1 else float("nan")
    return planes, direction, spacing_z


def _check_in_plane_grid(planes: list[Plane]) -> np.ndarray:
    """Every plane has the same Rows/Columns and PixelSpacing (positive); return that PixelSpacing."""
    first = planes[0]
    sizes = {(p.rows, p.cols) for p in planes}
    if len(sizes) > 1:
        raise SeriesError("inconsistent_size", f"slices have different sizes (rows, cols): {sorted(sizes)[:4]}")
    for p in planes:
        if not np.allclose(p.pixel_spacing, first.pixel_spacing, rtol=PIXEL_SPACING_RTOL, atol=1e-6):
            raise SeriesError(
                "inconsistent_size",
                f"PixelSpacing differs: {_fmt(first.pixel_spacing)} and {_fmt(p.pixel_spacing)}",
            )
    if np.any(first.pixel_spacing <= 0):
        raise SeriesError("bad_spacing", f"PixelSpacing must be positive, got {_fmt(first.pixel_spacing)}")
    return first.pixel_spacing


def _common_direction(planes: list[Plane]) -> np.ndarray:
    """One ImageOrientationPatient for all planes, two orthonormal vectors; return (row, col, normal)."""
    first = planes[0]
    orientations = np.array([p.orientation for p in planes])
    deviation = np.abs(orientations - first.orientation[None, :]).max(axis=1)
    if np.any(deviation > ORIENTATION_ATOL):
        bad = planes[int(np.argmax(deviation))]
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
    return np.stack([row, col, np.cross(row, col)])


def _check_unique_instances(planes: list[Plane]) -> None:
    seen: set[tuple[str, int | None]] = set()
    for p in planes:
        key = (p.sop_instance_uid, p.frame_number)
        if key in seen:
            raise SeriesError("duplicate_slices", f"SOP Instance {p.sop_instance_uid} appears more than once")
        seen.add(key)


def _order_along(planes: list[Plane], normal: np.ndarray) -> tuple[list[Plane], np.ndarray, np.ndarray]:
    """The planes sorted by their position along the normal; return (planes, positions, along)."""
    positions = np.array([p.position for p in planes])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    return [planes[i] for i in order], positions[order], along[order]


def _check_distinct_positions(planes: list[Plane], positions: np.ndarray, along: np.ndarray) -> None:
    same_place = np.flatnonzero(np.diff(along) < DUPLICATE_ATOL_MM)
    if same_place.size:
        i = int(same_place[0])
        first, second = planes[i].sop_instance_uid, planes[i + 1].sop_instance_uid
        raise SeriesError("duplicate_slices", f"two slices at the same position {_fmt(positions[i])}: {first} and {second}")


def _check_no_tilt(positions: np.ndarray, normal: np.ndarray, pixel_spacing: np.ndarray) -> None:
    """The slice positions lie on one line along the normal (a tilted gantry shears them in-plane)."""
    offsets = positions - positions[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    drift = np.linalg.norm(in_plane, axis=1)
    tolerance = TILT_VOXEL_FRACTION * float(pixel_spacing.min())
    if drift.max() > tolerance:
        k = int(np.argmax(drift))
        angle = math.degrees(math.atan2(drift[k], float(offsets[k] @ normal)))
        raise SeriesError(
            "gantry_tilt",
            f"slice positions leave the slice normal {_fmt(normal)} by up to {drift[k]:.3g} mm "
            f"(about {angle:.2f} degrees; tolerance {tolerance:.3g} mm)",
        )


def _check_slice_gaps(along: np.ndarray) -> None:
    """Every gap is a whole multiple of the median gap (within :data:`SPACING_RTOL`), and that multiple is 1."""
    gaps = np.diff(along)
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
