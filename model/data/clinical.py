"""A *clinical-geometry* evaluation set: the phantoms, rescanned on the grids real scanners produce.

The phantoms of :mod:`model.data.phantoms` live on small, coarse grids (CT 4-5 mm on 72-88 pixels,
PT 4 mm, MR 1.2-3 mm) centred on the anatomy. A model trained on them has never seen what a hospital
sends: a 512 x 512 CT with 0.6-0.9 mm pixels and 1-2.5 mm slices, an MR on a 256/288/320 matrix, a PET
on a 128-200 matrix, with the anatomy a little off centre, sometimes padded with air, sometimes cropped.
This module resamples each phantom onto such a geometry so that the evaluation (and the OOD gate) can be
checked on clinical grids without any real patient data:

- :func:`sample_geometry` draws a plausible clinical grid for a modality and a phantom's extent; the
  field of view on every axis is kept between 0.8x and 3x the phantom's extent (a mix of cropped and
  air-padded scans) and the centre is shifted by up to 5 % of the field of view;
- :func:`regrid` resamples the image (linear) and the label (linear, then >= 0.5) onto it with SimpleITK,
  fills the outside with air, and adds noise at the fine grid (an upsampled coarse image is unrealistically
  smooth): Gaussian for CT (then whole HU, floored at -1024 like a scanner stores them), Rician-like for MR,
  none for PT;
- :func:`clinical_case` is a pure function of ``(kind, seed, index, variant)``;
- :func:`read_scanner_geometries` reads the grids of a site's own series (headers only) and
  :func:`regrid_volume` rescans any volume onto one of them as :func:`regrid` rescans a phantom
  (``specgate model fit-ood --like``);
- :func:`write_clinical_set` writes ``root/<kind>_clinical/``: an MSD-like ``dataset.json`` whose images
  are DICOM series (one file per slice, real geometry) and whose labels are ``.npz`` files, readable with
  :func:`model.data.volumes.iter_cases` and so by ``specgate model evaluate --data``.

Axes are ``(z, y, x)`` everywhere, spacings and shifts in mm in the same order. Both grids are centred on
the phantom's centre (patient coordinate 0); the clinical grid's centre is at ``Geometry.shift_mm``.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from model._atomic import atomic_write
from model.data.phantoms import KINDS, PhantomCase, kind_id, phantom_case, write_dataset_json

__all__ = [
    "AIR",
    "Geometry",
    "ScannerGeometry",
    "clinical_case",
    "extent_mm",
    "read_scanner_geometries",
    "regrid",
    "regrid_volume",
    "sample_geometry",
    "write_clinical_set",
]

#: fill value outside the phantom, by modality (anything not listed: 0)
AIR: dict[str, float] = {"CT": -1000.0, "MR": 0.0, "PT": 0.0}
CT_FLOOR = -1024.0  # lowest HU a scanner stores (unsigned pixels, intercept -1024)
_CHUNK_VOXELS = 1 << 23  # voxels per resampled slab (32 MB of float32): bounds the temporaries
_Z_STEP = 0.125  # slice spacings are multiples of 1/8 mm and z origins of 1/64 mm: exact, short DICOM strings
_SHIFT_STEP = 1.0 / 64.0


@dataclass(frozen=True)
class Geometry:
    """A clinical grid: ``shape`` and ``spacing`` (mm) in (z, y, x) order, and the shift (mm, z, y, x) of the
    field-of-view centre relative to the phantom's centre."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    shift_mm: tuple[float, float, float]

    @property
    def fov_mm(self) -> tuple[float, float, float]:
        """Field of view per axis (voxel count x spacing)."""
        return tuple(n * s for n, s in zip(self.shape, self.spacing, strict=True))  # type: ignore[return-value]

    @property
    def origin_mm(self) -> tuple[float, float, float]:
        """Centre of voxel (0, 0, 0) in mm, (z, y, x)."""
        return tuple(  # type: ignore[return-value]
            -(n - 1) / 2.0 * s + d for n, s, d in zip(self.shape, self.spacing, self.shift_mm, strict=True)
        )

    def to_json(self) -> dict[str, list[float] | list[int]]:
        return {"shape": list(self.shape), "spacing": list(self.spacing), "shift_mm": list(self.shift_mm)}


def extent_mm(case: PhantomCase) -> tuple[float, float, float]:
    """Physical extent of a phantom's grid per axis (voxel count x spacing), (z, y, x)."""
    return tuple(float(n * s) for n, s in zip(case.image.shape, case.spacing, strict=True))  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------
# geometry

_FOV_RATIO = (0.8, 3.0)


@dataclass(frozen=True)
class _Protocol:
    """Clinical ranges of one modality."""

    matrices: tuple[int, ...]  # square in-plane matrices to choose from
    matrix_p: tuple[float, ...]
    pixel_mm: tuple[float, float]
    slice_mm: tuple[float, float]
    slices: tuple[int, int] | None  # None: chosen to cover a similar length as the phantom (PT)


_PROTOCOLS: dict[str, _Protocol] = {
    "CT": _Protocol((512,), (1.0,), (0.6, 0.9), (1.0, 2.5), (120, 300)),
    "MR": _Protocol((256, 288, 320), (0.45, 0.15, 0.40), (0.5, 1.2), (1.0, 4.0), (40, 180)),
    "PT": _Protocol(tuple(range(128, 201, 8)), (1.0 / 10,) * 10, (2.0, 4.0), (2.0, 4.0), None),
}
_PT_LENGTH = (0.8, 1.5)  # PT axial coverage / object length
_P_CROP = 0.2  # per axis: how often a feasible field of view smaller than the object is drawn


def _band(extent: float) -> tuple[float, float]:
    return _FOV_RATIO[0] * extent, _FOV_RATIO[1] * extent


def _pick(rng: np.random.Generator, ok: np.ndarray) -> int:
    """Index of a uniformly drawn ``True`` in ``ok`` (-1 when none)."""
    idx = np.flatnonzero(ok)
    return int(idx[int(rng.integers(len(idx)))]) if len(idx) else -1


def _crop_or_pad(rng: np.random.Generator, lo: int, hi: int, pivot: float) -> int:
    """An integer in ``[lo, hi]``: below ``pivot`` (a field of view that crops the object) with probability
    ``_P_CROP`` when both sides are possible, otherwise uniform on the possible side."""
    edge = math.ceil(pivot - 1e-9)  # first value that covers the object
    crop = (lo, min(hi, edge - 1))
    pad = (max(lo, edge), hi)
    ok_crop, ok_pad = crop[0] <= crop[1], pad[0] <= pad[1]
    side = crop if ok_crop and (not ok_pad or rng.uniform() < _P_CROP) else pad
    return int(rng.integers(side[0], side[1] + 1))


def _slices(rng: np.random.Generator, p: _Protocol, ez: float) -> tuple[int, float]:
    """Slice count and spacing: spacing on a 1/8 mm grid in the protocol's range, count in the protocol's
    range such that the axial coverage lies in the band (redrawn among the spacings that allow it; the
    clinical limit closest to the band when none does)."""
    lo, hi = _band(ez)
    dzs = np.arange(p.slice_mm[0], p.slice_mm[1] + 1e-9, _Z_STEP)
    if p.slices is None:  # PT: about the object's length
        lo, hi = max(lo, _PT_LENGTH[0] * ez), min(hi, _PT_LENGTH[1] * ez)
        cmin, cmax = 1, 10_000
    else:
        cmin, cmax = p.slices
    nlo = np.maximum(np.ceil(lo / dzs - 1e-9), cmin).astype(int)
    nhi = np.minimum(np.floor(hi / dzs + 1e-9), cmax).astype(int)
    first = int(rng.integers(len(dzs)))
    k = first if nlo[first] <= nhi[first] else _pick(rng, nlo <= nhi)
    if k >= 0:
        return _crop_or_pad(rng, int(nlo[k]), int(nhi[k]), ez / dzs[k]), float(dzs[k])
    # the band is out of the protocol's reach: its closest coverage (shortest or longest scan)
    return (cmin, float(dzs[0])) if cmin * dzs[0] > hi else (cmax, float(dzs[-1]))


def _inplane(rng: np.random.Generator, p: _Protocol, ey: float, ex: float) -> tuple[int, float]:
    """Square matrix and pixel spacing: an integer field of view (mm) in the band for both axes and in the
    protocol's pixel range, for a matrix drawn by the protocol's frequencies (redrawn among the matrices
    that allow it; the clinical limit closest to the band when none does)."""
    lo, hi = _FOV_RATIO[0] * max(ey, ex), _FOV_RATIO[1] * min(ey, ex)
    ms = np.array(p.matrices)
    flo = np.maximum(np.ceil(lo - 1e-9), np.ceil(ms * p.pixel_mm[0] - 1e-9)).astype(int)
    fhi = np.minimum(np.floor(hi + 1e-9), np.floor(ms * p.pixel_mm[1] + 1e-9)).astype(int)
    first = int(rng.choice(len(ms), p=np.asarray(p.matrix_p) / sum(p.matrix_p)))
    k = first if flo[first] <= fhi[first] else _pick(rng, flo <= fhi)
    if k >= 0:
        m = int(ms[k])
        fov = float(_crop_or_pad(rng, int(flo[k]), int(fhi[k]), max(ey, ex)))
        px = round(fov / m, 6)  # short decimal strings in DICOM; kept inside the band and the range
        px_lo, px_hi = max(lo / m, p.pixel_mm[0]), min(hi / m, p.pixel_mm[1])
        if px < px_lo:
            px = math.ceil(px_lo * 1e6) / 1e6
        elif px > px_hi:
            px = math.floor(px_hi * 1e6) / 1e6
        return m, px
    # out of the protocol's reach (or an empty band): the closest field of view it allows
    want = (lo + hi) / 2.0
    fovs = np.clip(want, ms * p.pixel_mm[0], ms * p.pixel_mm[1])
    k = int(np.argmin(np.abs(fovs - want)))
    return int(ms[k]), round(float(fovs[k]) / int(ms[k]), 6)


def sample_geometry(
    modality: str, rng: np.random.Generator, extent_mm: tuple[float, float, float]
) -> Geometry:
    """A clinical grid for a scan of an object of physical extent ``extent_mm`` (z, y, x) in ``modality``.

    ======  ===========================  ============  ===========  ===========================
    \\       in-plane matrix (square)     pixel (mm)    slice (mm)   slices
    ======  ===========================  ============  ===========  ===========================
    CT      512                          0.6-0.9       1-2.5        120-300
    MR      256, 320 (sometimes 288)     0.5-1.2       1-4          40-180
    PT      128-200                      2-4           2-4          about the object's length
    ======  ===========================  ============  ===========  ===========================

    The field of view on each axis is kept within 0.8x-3x the extent (counts / fields of view are drawn
    among those that satisfy it; clipped to the clinical ranges where none does), so a set mixes scans
    padded with air and scans that crop the object. Slice spacings are multiples of 1/8 mm. The centre is
    shifted by up to 5 % of the field of view on each axis.
    """
    m = modality.upper()
    if m not in _PROTOCOLS:
        raise ValueError(f"no clinical protocol for modality {modality!r}; known: {sorted(_PROTOCOLS)}")
    if len(extent_mm) != 3 or not all(e > 0 for e in extent_mm):
        raise ValueError(f"extent_mm must be three positive lengths, got {extent_mm!r}")
    p = _PROTOCOLS[m]
    ez, ey, ex = (float(e) for e in extent_mm)
    nz, dz = _slices(rng, p, ez)
    mat, px = _inplane(rng, p, ey, ex)
    shape = (nz, mat, mat)
    spacing = (dz, px, px)
    shift = tuple(
        math.trunc(float(rng.uniform(-0.05, 0.05)) * n * s / _SHIFT_STEP) * _SHIFT_STEP  # toward 0: <= 5 %
        for n, s in zip(shape, spacing, strict=True)
    )
    return Geometry(shape=shape, spacing=spacing, shift_mm=shift)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# resampling


def _kind_id(kind: str) -> int:
    """The phantom kind's frozen generator id (:func:`model.data.phantoms.kind_id`)."""
    return kind_id(kind)


def _percentile(img: np.ndarray, q: float, max_voxels: int = 1 << 23) -> float:
    """``q``-th percentile of ``img`` on a regular subsample of at most about ``max_voxels`` voxels (a full
    percentile copies the whole volume)."""
    step = max(1, math.ceil((img.size / max_voxels) ** (1.0 / 3.0)))
    return float(np.percentile(img[::step, ::step, ::step], q))


def _slab_depth(shape: tuple[int, ...]) -> int:
    """Slices per slab of a (z, y, x) volume: at most :data:`_CHUNK_VOXELS` voxels, at least one slice."""
    return max(1, _CHUNK_VOXELS // (int(shape[1]) * int(shape[2])))


def _slabs(shape: tuple[int, ...]) -> Iterator[slice]:
    """Consecutive z slabs of :func:`_slab_depth` slices (the last one shorter) covering the volume."""
    nz, chunk = int(shape[0]), _slab_depth(shape)
    for z0 in range(0, nz, chunk):
        yield slice(z0, z0 + min(chunk, nz - z0))


def _sitk_image(a: np.ndarray, spacing: Sequence[float], origin: Sequence[float]) -> Any:
    """``a`` (z, y, x) as a float32 SimpleITK image with ``spacing`` and ``origin`` given in (z, y, x)."""
    import SimpleITK as sitk

    im = sitk.GetImageFromArray(np.ascontiguousarray(a, dtype=np.float32))
    im.SetSpacing([float(s) for s in spacing[::-1]])
    im.SetOrigin([float(o) for o in origin[::-1]])
    return im


def _resample_slab(src: Any, out: np.ndarray, origin_xyz: list[float], spacing_xyz: list[float], default: float,
                   threshold: float | None = None) -> None:
    """``src`` resampled (linear) into the slab ``out`` (z, y, x) whose voxel (0, 0, 0) is at ``origin_xyz``,
    ``default`` outside ``src``; with ``threshold``, ``out`` gets ``value >= threshold``."""
    import SimpleITK as sitk

    n, ny, nx = out.shape
    r = sitk.Resample(src, [nx, ny, n], sitk.Transform(), sitk.sitkLinear, origin_xyz, spacing_xyz,
                      [1, 0, 0, 0, 1, 0, 0, 0, 1], default, sitk.sitkFloat32)
    values = sitk.GetArrayViewFromImage(r)  # a view of r's buffer: used while r is alive
    out[...] = values if threshold is None else values >= threshold


def _resample_volume(image: np.ndarray, spacing: Sequence[float], geom: Geometry, air: float,
                     label: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``image`` (linear, ``air`` outside) and ``label`` when given (linear then >= 0.5, 0 outside) on
    ``geom``, both grids centred on patient coordinate 0, slab by slab; slabs wholly outside the image's
    z extent are just air."""
    src_origin = [-(n - 1) / 2.0 * s for n, s in zip(image.shape, spacing, strict=True)]
    src_img = _sitk_image(image, spacing, src_origin)
    src_lab = _sitk_image(label, spacing, src_origin) if label is not None else None
    # the source's z extent (voxel centres, plus half a voxel)
    zlo = src_origin[0] - float(spacing[0]) / 2.0
    zhi = -zlo
    dz, dy, dx = (float(s) for s in geom.spacing)
    oz, oy, ox = geom.origin_mm
    out = np.empty(tuple(int(n) for n in geom.shape), np.float32)
    out_lab = np.empty(out.shape, np.uint8) if src_lab is not None else None
    for sl in _slabs(out.shape):
        n = sl.stop - sl.start
        zs = oz + sl.start * dz
        if zs + (n - 1) * dz < zlo or zs > zhi:
            out[sl] = air
            if out_lab is not None:
                out_lab[sl] = 0
        else:
            _resample_slab(src_img, out[sl], [ox, oy, zs], [dx, dy, dz], air)
            if out_lab is not None:
                # linear, then >= 0.5: the organ's outline at the fine grid, not the coarse grid's staircase
                _resample_slab(src_lab, out_lab[sl], [ox, oy, zs], [dx, dy, dz], 0.0, threshold=0.5)
    return out, out_lab


def _resample_onto(case: PhantomCase, geom: Geometry, air: float) -> tuple[np.ndarray, np.ndarray]:
    """The phantom's image and label on ``geom`` (:func:`_resample_volume`)."""
    image, label = _resample_volume(case.image, case.spacing, geom, air, case.label)
    assert label is not None
    return image, label


def _add_gaussian(image: np.ndarray, rng: np.random.Generator, sigma: float, rectify: bool = False) -> None:
    """``image += N(0, sigma)`` in place, slab by slab (float32 draws in z order); with ``rectify``, then
    ``|image|``."""
    buf = np.empty((_slab_depth(image.shape), *image.shape[1:]), np.float32)
    for sl in _slabs(image.shape):
        b = buf[:sl.stop - sl.start]
        rng.standard_normal(dtype=np.float32, out=b)
        b *= np.float32(sigma)
        seg = image[sl]
        seg += b
        if rectify:
            np.abs(seg, out=seg)


def _add_scanner_noise(image: np.ndarray, modality: str, rng: np.random.Generator) -> None:
    """Fine-grid noise, in place (see :func:`regrid`): CT Gaussian then whole HU floored at
    :data:`CT_FLOOR`, MR Rician-like, none otherwise."""
    if modality == "CT":
        _add_gaussian(image, rng, float(rng.uniform(15.0, 35.0)))
        np.rint(image, out=image)
        np.maximum(image, np.float32(CT_FLOOR), out=image)
    elif modality == "MR":
        sigma = float(rng.uniform(0.02, 0.04)) * max(_percentile(image, 99.0), 0.0)
        if sigma > 0:
            _add_gaussian(image, rng, sigma, rectify=True)


def regrid(
    case: PhantomCase,
    geom: Geometry,
    rng: np.random.Generator | None = None,
    noise: bool = True,
) -> PhantomCase:
    """``case`` resampled onto ``geom`` (image: linear, label: linear then >= 0.5, the organ's outline rather than the coarse grid's staircase), air outside the phantom
    (-1000 HU for CT, 0 otherwise; label 0), plus fine-grid noise when ``noise``:

    - CT: Gaussian, sigma drawn in 15-35 HU, everywhere; then whole HU floored at -1024 (as stored);
    - MR: Rician-like, ``|image + N(0, sigma)|`` with sigma 2-4 % of the image's 99th percentile;
    - PT: none.

    The noise comes from ``rng`` (default: derived from the case's kind, seed and index). The output is
    built slab by slab into one float32 and one uint8 array: no full-size temporaries.
    """
    if len(geom.shape) != 3 or min(geom.shape) < 1 or min(geom.spacing) <= 0:
        raise ValueError(f"invalid geometry {geom!r}")
    if rng is None:
        # a shifted case (kind ``mr_prostate+blur1.5``, model.data.shifts) gets its base case's noise
        rng = np.random.default_rng([case.seed, 104729, _kind_id(case.kind.partition("+")[0]), case.index])
    modality = case.modality.upper()
    image, label = _resample_onto(case, geom, AIR.get(modality, 0.0))
    if noise:
        _add_scanner_noise(image, modality, rng)
    dz, dy, dx = (float(s) for s in geom.spacing)
    return replace(case, image=image, label=label, spacing=(dz, dy, dx))


def regrid_volume(
    image: np.ndarray,
    spacing: Sequence[float],
    modality: str,
    geom: Geometry,
    rng: np.random.Generator,
    noise: bool = True,
) -> np.ndarray:
    """Any volume ``image`` (z, y, x, native units) at ``spacing`` (mm) rescanned on ``geom`` as
    :func:`regrid` rescans a phantom: both grids centred on the image's centre (then ``geom.shift_mm``),
    linear, air outside, and the same fine-grid noise when ``noise`` (drawn from ``rng``). What
    ``specgate model fit-ood --like`` does to a site's training image for each of its scanners'
    geometries (:func:`read_scanner_geometries`)."""
    if len(geom.shape) != 3 or min(geom.shape) < 1 or min(geom.spacing) <= 0:
        raise ValueError(f"invalid geometry {geom!r}")
    if image.ndim != 3 or len(spacing) != 3 or min(float(s) for s in spacing) <= 0:
        raise ValueError(f"expected a 3-D image with three positive spacings, got shape {image.shape}, "
                         f"spacing {tuple(spacing)}")
    m = modality.upper()
    out, _ = _resample_volume(image, spacing, geom, AIR.get(m, 0.0))
    if noise:
        _add_scanner_noise(out, m, rng)
    return out


def clinical_case(
    kind: str, seed: int, index: int, variant: int = 0, geometry: Geometry | None = None
) -> tuple[PhantomCase, Geometry]:
    """Phantom ``(kind, seed, index)`` on a clinical grid drawn from
    ``np.random.default_rng([seed, 7919, kind_id, index, variant])`` (the same generator then draws the
    noise): a pure function of its arguments. ``geometry`` overrides the drawn grid (which is still drawn
    first, so the generator's state is the same), for tests and for small examples."""
    kid = _kind_id(kind)
    case = phantom_case(kind, seed, index)
    rng = np.random.default_rng([int(seed), 7919, kid, int(index), int(variant)])
    geom = sample_geometry(case.modality, rng, extent_mm(case))
    if geometry is not None:
        geom = geometry
    return regrid(case, geom, rng=rng), geom


# ----------------------------------------------------------------------------------------------------
# a site's own scanner geometries


@dataclass(frozen=True)
class ScannerGeometry:
    """The grid one of a site's scanners produces for one protocol, read from a series it wrote:
    ``geometry`` (slices, rows, columns; slice spacing, pixel spacing; no shift) and the series' modality.
    ``source``: the folder of the first series seen with it, ``series``: how many series share it."""

    modality: str
    geometry: Geometry
    source: str
    series: int = 1

    def to_json(self) -> dict[str, Any]:
        return {"modality": self.modality, "shape": list(self.geometry.shape),
                "spacing": list(self.geometry.spacing), "source": self.source, "series": self.series}


def _series_geometry(files: Sequence[Path]) -> tuple[str, Geometry]:
    """Modality and grid of one series from its headers only, validated as :func:`dicom_series.load_series`
    validates it (one regular grid, slices ordered along the normal) but with no pixel decoded."""
    from dicom_series import SeriesError
    from dicom_series.grid import check_grid
    from dicom_series.headers import planes_of, read_instance

    instances = [read_instance(Path(f)) for f in files]
    modalities = sorted({str(inst.header.get("Modality", "") or "").upper() for inst in instances})
    if len(modalities) != 1 or not modalities[0]:
        raise SeriesError("mixed_series", f"the files state modalities {modalities}, not one")
    planes = [plane for i, inst in enumerate(instances) for plane in planes_of(i, inst)]
    planes, _direction, dz = check_grid(planes, 3)
    px = planes[0].pixel_spacing
    shape = (len(planes), int(planes[0].rows), int(planes[0].cols))
    spacing = (round(float(dz), 6), float(px[0]), float(px[1]))
    return modalities[0], Geometry(shape=shape, spacing=spacing, shift_mm=(0.0, 0.0, 0.0))


def read_scanner_geometries(root: str | os.PathLike[str]) -> list[ScannerGeometry]:
    """The distinct grids of the DICOM series under ``root`` (any depth), in the order of their series'
    UIDs: modality, rows x columns, pixel spacing, slice spacing (the distance between slice positions
    along the normal, as the worker's loader measures it: the grid a study arrives on) and the number of
    slices. Only headers are read. Series on the same grid count once (``series`` says how many).
    Raises ``ValueError`` naming the folder (no series) or the series (one the worker would refuse)."""
    from dicom_series import SeriesError, find_series

    groups = find_series(root)
    if not groups:
        raise ValueError(f"{root} holds no DICOM series")
    found: dict[tuple[str, Geometry], ScannerGeometry] = {}
    for uid, files in sorted(groups.items()):
        try:
            modality, geom = _series_geometry(files)
        except SeriesError as exc:
            raise ValueError(f"{root}: series {uid} cannot be read as a grid: {exc}") from exc
        key = (modality, geom)
        seen = found.get(key)
        source = str(Path(files[0]).parent)
        found[key] = ScannerGeometry(modality, geom, source) if seen is None else replace(seen, series=seen.series + 1)
    return list(found.values())


# ----------------------------------------------------------------------------------------------------
# writing


def _uid(*parts: object) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _write_case(case: PhantomCase, geom: Geometry, folder: Path, name: str) -> None:
    from model.data.series_writer import write_series

    if folder.exists():  # a rerun: never mix the slices of two runs in one series folder
        shutil.rmtree(folder)
    oz, oy, ox = geom.origin_mm
    origin = (round(ox, 4), round(oy, 4), oz)  # LPS (x, y, z) of voxel (0, 0, 0)
    study = _uid("specgate-clinical-study", case.kind, case.seed, case.index)
    series = _uid("specgate-clinical-series", case.kind, case.seed, case.index, geom)
    kw: dict[str, Any] = {"study_instance_uid": study, "series_instance_uid": series,
                          "patient_id": f"SYNTH{case.index:06d}", "patient_name": "SYNTHETIC^CLINICAL",
                          "series_description": f"specgate clinical {name}"}
    write_series(case.image, case.spacing, case.modality, folder, origin=origin, **kw)


def write_clinical_set(
    root: str | os.PathLike[str],
    kind: str,
    n: int,
    seed: int,
    first_index: int = 1000,
    progress: bool = False,
    geometry: Geometry | None = None,
) -> Path:
    """Write ``n`` clinical-geometry cases of ``kind`` to ``root/<kind>_clinical/``:

    - ``series/<name>/``: one DICOM file per slice (:func:`model.data.series_writer.write_series`: CT, MR,
      PET Image Storage), synthetic patient placeholders;
    - ``labelsTr/<name>.npz``: ``label`` (uint8, (z, y, x) in the series' slice order, i.e. ascending
      Image Position along the normal) and ``spacing`` (z, y, x) mm;
    - ``dataset.json``: the MSD keys (training entries ``{"image": "./series/<name>/", "label":
      "./labelsTr/<name>.npz"}``) plus ``specgate_clinical`` with the kind, seed, first index and each
      case's geometry.

    Case ``first_index + i`` is :func:`clinical_case` ``(kind, seed, first_index + i)`` (``geometry``
    overrides the drawn grid). The default first index 1000 keeps the cases apart from the phantom sets.
    """
    _kind_id(kind)  # validates
    k = KINDS[kind]
    out = Path(root) / f"{kind}_clinical"
    (out / "series").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    training: list[dict[str, str]] = []
    geometries: list[dict[str, Any]] = []
    idx: Any = range(first_index, first_index + n)
    if progress:
        from tqdm import tqdm

        idx = tqdm(idx, desc=f"clinical {kind}", unit="case")
    for i in idx:
        case, geom = clinical_case(kind, seed, i, geometry=geometry)
        name = f"{kind}_clinical_{i:04d}"
        _write_case(case, geom, out / "series" / name, name)
        write_label = partial(np.savez_compressed, label=case.label, spacing=np.asarray(case.spacing, np.float64))
        atomic_write(out / "labelsTr" / f"{name}.npz", write_label)
        training.append({"image": f"./series/{name}/", "label": f"./labelsTr/{name}.npz"})
        geometries.append({"name": name, "index": int(i), **geom.to_json()})
        del case
    write_dataset_json(out, f"{kind}_clinical", kind, f"specgate phantom on clinical geometries: {k.description}",
                       training, {"specgate_clinical": {"kind": kind, "seed": int(seed),
                                                        "first_index": int(first_index), "geometries": geometries}})
    return out

