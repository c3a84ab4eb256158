"""Harder variants of the phantoms, where segmentation is imperfect and calibration becomes measurable.

The standard phantoms (:mod:`model.data.phantoms`) are segmented with DSC 0.98-0.99 and ECE 0.002-0.014:
every model is right and confident almost everywhere, and no difference in calibration can show. A hard
variant takes the standard case and makes three things harder, as real data are:

1. **Lower organ contrast.** The organ's mean intensity is moved towards that of its surroundings (a
   2-voxel ring outside the organ, median): ``contrast`` of the step is kept (1: unchanged).
2. **Partial-volume edges.** The organ's occupancy of each voxel is a continuous field: the label
   smoothed by a Gaussian of ``partial_volume_mm``. The image takes the occupancy-weighted intensity
   (the edge is blurred over a few voxels); the reference label is the voxels the organ covers at least
   half of, what a label drawn on a finer grid gives when averaged over each voxel and thresholded at 0.5.
3. **Label jitter** (annotators disagree): the reference label's boundary is moved along its normal by a
   smooth random field of at most ``jitter_mm`` (a coarse Gaussian grid of ``jitter_grid`` nodes per axis,
   cubic upsampling), outwards where the field is positive. The image does not move with it: near the
   edge the label is not a function of the image, as between two annotators.
4. Extra Gaussian noise of ``noise`` times the remaining organ contrast.

A case is a pure function of ``(kind, seed, index, difficulty)``: the standard case, then draws from a
generator of its own (``numpy.random.default_rng([seed, kind number, index, 7919])``), so a hard case and
the standard case of the same index show the same anatomy.

>>> easy = hard_case("ct_liver", seed=0, index=0, difficulty="standard")
>>> base = phantom_case("ct_liver", seed=0, index=0)
>>> bool((easy.image == base.image).all() and (easy.label == base.label).all())
True
>>> DIFFICULTIES["hard"].contrast, difficulty(0.5).contrast
(0.3, 0.65)
>>> difficulty("very")
Traceback (most recent call last):
ValueError: difficulty 'very' is neither a level (standard, mild, hard) nor a number in [0, 1]
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from model.data.phantoms import KINDS, PhantomCase, phantom_case

__all__ = ["DIFFICULTIES", "Difficulty", "difficulty", "hard_case"]

_STREAM = 7919  # the hard variant's own random stream, apart from the standard case's


@dataclass(frozen=True)
class Difficulty:
    """How much harder than the standard phantom (see the module doc)."""

    contrast: float = 1.0  # fraction of the organ/surroundings step kept
    partial_volume_mm: float = 0.0  # Gaussian sigma of the occupancy (0: sharp edges)
    jitter_mm: float = 0.0  # largest displacement of the label boundary
    jitter_grid: int = 5  # nodes per axis of the coarse random grid (more: a wigglier boundary)
    noise: float = 0.0  # extra Gaussian noise, as a fraction of the remaining contrast

    def __post_init__(self) -> None:
        if not 0.0 < self.contrast <= 1.0:
            raise ValueError(f"contrast must be in (0, 1], got {self.contrast}")
        for name in ("partial_volume_mm", "jitter_mm", "noise"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be >= 0, got {v}")
        if self.jitter_grid < 2:
            raise ValueError(f"jitter_grid must be >= 2, got {self.jitter_grid}")

    def record(self) -> dict[str, float]:
        return dataclasses.asdict(self)


DIFFICULTIES: dict[str, Difficulty] = {
    "standard": Difficulty(),
    "mild": Difficulty(contrast=0.5, partial_volume_mm=2.0, jitter_mm=3.0, noise=0.15),
    "hard": Difficulty(contrast=0.3, partial_volume_mm=3.0, jitter_mm=6.0, noise=0.3),
}


def difficulty(level: str | float | Difficulty) -> Difficulty:
    """A named level, a :class:`Difficulty`, or a number in [0, 1] (0 standard, 1 ``hard``, linear between)."""
    if isinstance(level, Difficulty):
        return level
    if isinstance(level, str) and level in DIFFICULTIES:
        return DIFFICULTIES[level]
    try:
        t = float(level)
    except (TypeError, ValueError):
        t = math.nan
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"difficulty {level!r} is neither a level ({', '.join(DIFFICULTIES)}) nor a number in [0, 1]")
    a, b = DIFFICULTIES["standard"], DIFFICULTIES["hard"]
    return Difficulty(contrast=round(a.contrast + t * (b.contrast - a.contrast), 6),
                      partial_volume_mm=t * b.partial_volume_mm, jitter_mm=t * b.jitter_mm,
                      jitter_grid=b.jitter_grid, noise=t * b.noise)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], nodes: int) -> np.ndarray:
    """A smooth random field scaled to [-1, 1]: a coarse Gaussian grid, cubic upsampling."""
    g = rng.normal(size=(nodes,) * 3)
    f = ndimage.zoom(g, [n / nodes for n in shape], order=3, mode="nearest", grid_mode=True)[
        : shape[0], : shape[1], : shape[2]]
    return f / max(float(np.abs(f).max()), 1e-9)


def _signed_distance(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """mm from the boundary, positive outside ``mask``, negative inside; the boundary lies half the finest
    voxel edge beyond the centres of the voxels on either side of it (so a displacement of less than one
    voxel moves it)."""
    half = min(spacing) / 2.0
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing) - half
    inside = ndimage.distance_transform_edt(mask, sampling=spacing) - half
    return np.asarray(np.where(mask, -inside, outside), dtype=np.float32)


def hard_case(kind: str, seed: int, index: int, difficulty: str | float | Difficulty = "hard") -> PhantomCase:
    """Case ``index`` of ``kind`` made harder (see the module doc); ``"standard"`` returns the case unchanged."""
    d = _resolve(difficulty)
    base = phantom_case(kind, seed, index)
    if d == DIFFICULTIES["standard"]:
        return base
    rng = np.random.default_rng([int(seed), sorted(KINDS).index(kind), int(index), _STREAM])
    sp = base.spacing
    lab = base.label.astype(bool)
    img = base.image.astype(np.float32)
    if not lab.any():
        return base

    if d.partial_volume_mm > 0:
        occ = ndimage.gaussian_filter(lab.astype(np.float32), [d.partial_volume_mm / s for s in sp])
    else:
        occ = lab.astype(np.float32)
    ring = ndimage.binary_dilation(lab, iterations=2) & ~lab
    step = float(np.median(img[lab])) - (float(np.median(img[ring])) if ring.any() else 0.0)
    img = img - step * lab + d.contrast * step * occ  # the organ's step, kept at `contrast`, blurred by occupancy
    if d.noise > 0:
        img = img + (d.noise * abs(d.contrast * step)) * rng.standard_normal(img.shape, dtype=np.float32)
    truth = occ >= 0.5
    if d.jitter_mm > 0 and truth.any():
        field = _smooth_field(rng, truth.shape, d.jitter_grid)
        truth = (_signed_distance(truth, sp) - d.jitter_mm * field) < 0
    if base.modality != "CT":
        img = np.maximum(img, 0.0)  # MR and PET magnitudes are not negative
    return dataclasses.replace(base, image=np.ascontiguousarray(img, dtype=np.float32),
                               label=np.ascontiguousarray(truth, dtype=np.uint8))


def _resolve(level: str | float | Difficulty) -> Difficulty:
    return difficulty(level)
