"""Moving a volume between the scanner's grid and the grid the model was trained at (SimpleITK).

A series arrives at the scanner's resolution (a CT at 0.6-0.9 mm in-plane, 1-2.5 mm slices); a model
sees what it was trained on (the shipped one: CT at 4 mm, prostate MR at 3 x 1.8 mm). :func:`model_grid`
chooses the model's grid for a volume, :func:`to_grid` resamples the image onto it (linear, after
block averaging on every axis coarsened twofold or more) and :func:`from_grid` brings values computed there
(class probabilities) back onto the source grid (linear), so the result lies exactly on the source
geometry: every source voxel gets a value, and the DICOM-SEG still references the source instances.

Both grids cover the same box in the volume's own index frame: voxel ``i`` of an axis with ``n`` voxels
of ``s`` mm spans ``[i * s, (i + 1) * s)``, the box is ``[0, n * s)``. The model's grid has
``n' = round(n * s / t)`` voxels of ``n * s / n'`` mm (within half a voxel of the target ``t``), so the
boxes are identical and no slice is shifted. Orientation and origin are those of the source series:
resampling happens in its index frame, scaled by its spacing, so rotation and origin never enter.

Anti-aliasing: coarsening an axis by a factor ``f >= 2`` first averages blocks of ``k = floor(f)`` source
voxels along it (a box filter about one target voxel wide: what a thick slice or a large pixel measures),
then interpolates linearly from the block centres; the remaining factor ``f / k < 2`` is covered by the
linear weights. Without it, linear interpolation of a thin-slice CT samples its fine-grained noise (8
neighbours per output voxel) instead of averaging it as a thick voxel would. Block means cost a few
hundred milliseconds on a 300x512x512 CT, where a Gaussian of the same width (SimpleITK's
``DiscreteGaussian``) took 6.3 s on two cores. An axis whose length is not a multiple of ``k`` has its
last block completed by repeating the last voxel (only the outermost half voxel of the box is affected).

>>> import numpy as np
>>> g = model_grid((100, 512, 512), (1.0, 0.7, 0.7), (4.0, 4.0, 4.0))
>>> g.shape, tuple(round(s, 3) for s in g.spacing)
((25, 90, 90), (4.0, 3.982, 3.982))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Grid", "GridError", "SourceSlabs", "from_grid", "model_grid", "to_grid", "validate_spacing"]


class GridError(ValueError):
    """The volume's spacing cannot be placed on a grid (missing, zero, negative, non-finite, or so large
    that the model's grid would have less than one voxel on an axis). ``reason_code``: ``bad_spacing``."""

    reason_code = "bad_spacing"


@dataclass(frozen=True)
class Grid:
    """A regular grid over the volume's box: ``shape`` voxels of ``spacing`` mm, (z, y, x)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]


def validate_spacing(spacing: Sequence[float] | None) -> tuple[float, float, float]:
    """``spacing`` as three positive finite floats (z, y, x), or :class:`GridError` naming it."""
    if spacing is None:
        raise GridError("the volume has no voxel spacing")
    try:
        sp = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        raise GridError(f"voxel spacing {spacing!r} is not three numbers") from None
    if len(sp) != 3 or not all(math.isfinite(v) and v > 0 for v in sp):
        raise GridError(f"voxel spacing must be three positive finite numbers (z, y, x) in mm, got {spacing!r}")
    return sp  # type: ignore[return-value]


def model_grid(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> Grid:
    """The grid at (about) ``target`` spacing over the same box as ``shape`` x ``spacing``."""
    sp = validate_spacing(spacing)
    tg = validate_spacing(target)
    out_shape, out_spacing = [], []
    for axis, (n, s, t) in enumerate(zip(shape, sp, tg, strict=True)):
        extent = int(n) * s
        if extent < t:
            raise GridError(
                f"axis {'zyx'[axis]}: {int(n)} voxel(s) of {s:g} mm cover {extent:g} mm, under one voxel of the "
                f"model's {t:g} mm grid")
        m = max(1, round(extent / t))
        out_shape.append(int(m))
        out_spacing.append(extent / m)
    return Grid(tuple(out_shape), tuple(out_spacing))  # type: ignore[arg-type]


def _image(array: np.ndarray, spacing: Sequence[float]):  # type: ignore[no-untyped-def]
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.asarray(array, dtype=np.float32))
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))  # SimpleITK is (x, y, z)
    img.SetOrigin(tuple(float(s) / 2.0 for s in spacing[::-1]))  # voxel centres at (i + 1/2) * s
    return img


def _reference(grid: Grid):  # type: ignore[no-untyped-def]
    import SimpleITK as sitk

    ref = sitk.Image([int(n) for n in grid.shape[::-1]], sitk.sitkFloat32)
    ref.SetSpacing(tuple(float(s) for s in grid.spacing[::-1]))
    ref.SetOrigin(tuple(float(s) / 2.0 for s in grid.spacing[::-1]))
    return ref


def _resample(img, grid: Grid) -> np.ndarray:  # type: ignore[no-untyped-def]
    import SimpleITK as sitk

    f = sitk.ResampleImageFilter()
    f.SetReferenceImage(_reference(grid))
    f.SetInterpolator(sitk.sitkLinear)
    f.SetOutputPixelType(sitk.sitkFloat32)
    # the outer half voxel of the box lies beyond the last centre: take the nearest value, not a fill
    f.SetUseNearestNeighborExtrapolator(True)
    return sitk.GetArrayFromImage(f.Execute(img))


def _block_mean(a: np.ndarray, axis: int, k: int) -> np.ndarray:
    """Means of consecutive blocks of ``k`` voxels along ``axis`` (the last block completed by edge values).

    The full blocks are averaged through a view and only the last, incomplete one is copied and
    completed (completing the whole array first copied it: 80 MB more at the peak of a 300x512x512 CT);
    every mean adds the same values in the same order, so the result is the same bit for bit.
    """
    n = a.shape[axis]
    full = n - n % k
    head = a[(slice(None),) * axis + (slice(0, full),)]
    out = head.reshape(a.shape[:axis] + (full // k, k) + a.shape[axis + 1:]).mean(axis=axis + 1, dtype=np.float32)
    if full == n:
        return out
    tail = a[(slice(None),) * axis + (slice(full, n),)]
    edge = np.take(a, [n - 1] * (k - (n - full)), axis=axis)
    last = np.concatenate([tail, edge], axis=axis)
    last = last.reshape(a.shape[:axis] + (1, k) + a.shape[axis + 1:]).mean(axis=axis + 1, dtype=np.float32)
    return np.concatenate([out, last], axis=axis)


def to_grid(image: np.ndarray, spacing: Sequence[float], grid: Grid, antialias: bool = True) -> np.ndarray:
    """``image`` (z, y, x) with ``spacing`` resampled onto ``grid`` (float32, linear; see the module doc).

    ``image`` is float32, or a dtype whose values float32 holds exactly (the int16 of
    :func:`dicom_series.load_series` ``compact``): the result is the same bit for bit.
    """
    sp = list(validate_spacing(spacing))
    ks = [max(1, int(grid.spacing[axis] / sp[axis])) if antialias else 1 for axis in range(3)]
    a = _block_means(np.asarray(image), [k if k >= 2 else 1 for k in ks])
    for axis, k in enumerate(ks):
        if k >= 2:
            sp[axis] *= k  # block j is centred at (j + 1/2) * k * s: the box convention holds
    return _resample(_image(a, sp), grid)


#: source slices per chunk of :func:`_block_means` (rounded to whole blocks): 16 MB of a 512x512 CT in float32
_CHUNK_SLICES = 16


def _block_means(image: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """The float32 block means of ``image`` with ``ks[axis]`` voxels per block (1: that axis as it is),
    along z, then y, then x, computed a chunk of whole z blocks at a time.

    Each mean adds the same values in the same order as over the whole volume, so the result is the same
    bit for bit; what is held at once is one chunk in float32 (16 slices) instead of the whole volume
    converted (315 MB for a 300x512x512 CT loaded as int16) and its first block means (78 MB).
    """
    if all(k == 1 for k in ks):
        return np.asarray(image, dtype=np.float32)
    n, kz = image.shape[0], ks[0]
    step = kz * max(1, _CHUNK_SLICES // kz)
    out: np.ndarray | None = None
    for z0 in range(0, n, step):
        a = np.asarray(image[z0:z0 + step], dtype=np.float32)  # the last chunk ends at the last slice: its edge
        for axis, k in enumerate(ks):
            if k >= 2:
                a = _block_mean(a, axis, k)
        if out is None:
            out = np.empty((-(-n // kz), *a.shape[1:]), dtype=np.float32)
        out[z0 // kz:z0 // kz + a.shape[0]] = a
    assert out is not None  # n >= 1
    return out


def from_grid(values: np.ndarray, grid: Grid, shape: Sequence[int], spacing: Sequence[float],
              out: np.ndarray | None = None) -> np.ndarray:
    """``values`` on ``grid`` brought back onto the source grid ``shape`` x ``spacing`` (linear).

    Linear weights sum to one, so class probabilities stay probabilities. With ``out`` (source-shaped,
    any float dtype) the result is written there.
    """
    if tuple(values.shape) != tuple(grid.shape):
        raise ValueError(f"values have shape {values.shape}, the grid {grid.shape}")
    src = Grid(tuple(int(n) for n in shape), validate_spacing(spacing))  # type: ignore[arg-type]
    res = _resample(_image(values, grid.spacing), src)
    if out is None:
        return res
    out[...] = res
    return out


class SourceSlabs:
    """Values on a model ``grid`` brought back onto the source grid ``shape`` x ``spacing`` slab by slab
    along z (linear, separable), so a caller never holds a full-resolution array it does not keep (a
    running argmax over 100+ classes holds one slab of one class at a time).

    A slab is the run of source slices ``[z0, z1)`` that lie between the same two grid slices ``ga`` and
    ``gb`` (:meth:`slabs`; the outer half voxel takes the edge slice's value). Each grid slice is brought
    to the source's (y, x) once (:meth:`plane`: x, then y), and the slab's slices are linear blends of the two
    planes (:meth:`blend`), a few megabytes that stay in cache. The same box convention as
    :func:`from_grid` (source voxel ``i`` sits at grid index ``(i + 1/2) * n_grid / n_source - 1/2``,
    clamped to the first and last centre: the nearest value in the outer half voxel), with torch, in the
    dtype of the values given. Measured on a 300x512x512 CT from its 75x90x90 grid on a shared 2-core
    machine: SimpleITK's resampler (:func:`from_grid`) 2.2-2.8 s; gathers along each axis of z slabs
    2.5-5.0 s (a gather along z copies whole 1 MB planes per output slice twice); this 0.5 s in float64,
    and in float64 rounded to float32 it equals :func:`from_grid` on every voxel (float32 blends: an ulp
    apart on 25 % of them).

    >>> import numpy as np, torch
    >>> s = SourceSlabs(Grid((2, 2, 2), (2.0, 2.0, 2.0)), (4, 4, 4), (1.0, 1.0, 1.0))
    >>> s.slabs()
    [(0, 3, 0, 1), (3, 4, 1, 1)]
    >>> a, b = s.plane(torch.zeros(2, 2)), s.plane(torch.ones(2, 2))
    >>> s.blend(a, b, 0, 3)[:, 0, 0].tolist()
    [0.0, 0.25, 0.75]
    """

    def __init__(self, grid: Grid, shape: Sequence[int], spacing: Sequence[float]) -> None:
        import torch

        validate_spacing(spacing)
        self.grid, self.shape = grid, tuple(int(n) for n in shape)
        self._axes = []
        for n_in, n_out in zip(grid.shape, self.shape, strict=True):
            pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
            i0 = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
            i1 = np.minimum(i0 + 1, n_in - 1)
            w = np.where(i1 > i0, pos - i0, 0.0)  # clamped: the edge value, whatever the fraction
            self._axes.append((torch.from_numpy(i0), torch.from_numpy(i1), torch.from_numpy(w)))

    def slabs(self) -> list[tuple[int, int, int, int]]:
        """``(z0, z1, ga, gb)``: source slices ``[z0, z1)`` blend grid slices ``ga`` and ``gb``."""
        i0, i1, _ = self._axes[0]
        out: list[tuple[int, int, int, int]] = []
        for z, (a, b) in enumerate(zip(i0.tolist(), i1.tolist(), strict=True)):
            if out and out[-1][2:] == (a, b):
                out[-1] = (out[-1][0], z + 1, a, b)
            else:
                out.append((z, z + 1, a, b))
        return out

    def plane(self, values: Any, ys: slice = slice(None), xs: slice = slice(None)) -> Any:
        """One grid slice (a float tensor ``(..., h, w)``) on the source's (y, x): ``(..., H, W)``, or
        only its rows ``ys`` and columns ``xs``."""
        import torch

        out = values
        for axis, sl in ((-1, xs), (-2, ys)):
            i0, i1, w = (t[sl] for t in self._axes[axis])
            w = w.to(out.dtype)
            out = torch.lerp(out.index_select(axis, i0), out.index_select(axis, i1),
                             w if axis == -1 else w.view(-1, 1))
        return out

    def window(self, cells: np.ndarray) -> tuple[slice, slice] | None:
        """The source rows and columns that read any grid point where ``cells`` ((h, w) bool) is true
        (their bounding box), or None when none is."""
        hit = [np.flatnonzero(cells.any(axis=1 - a)) for a in (0, 1)]
        if not hit[0].size:
            return None
        out = []
        for a, h in zip((1, 2), hit, strict=True):
            i0, i1, _ = self._axes[a]
            lo = int(np.searchsorted(i1.numpy(), h[0], "left"))
            hi = int(np.searchsorted(i0.numpy(), h[-1], "right"))
            out.append(slice(lo, hi))
        return out[0], out[1]

    def blend(self, a: Any, b: Any, z0: int, z1: int) -> Any:
        """Source slices ``[z0, z1)`` of a slab from its two planes ``a``, ``b`` (``(H, W)``)."""
        import torch

        return torch.lerp(a.expand(z1 - z0, *a.shape), b.expand(z1 - z0, *b.shape),
                          self._axes[0][2][z0:z1].to(a.dtype).view(-1, 1, 1))
