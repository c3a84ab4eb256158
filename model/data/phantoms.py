"""Synthetic CT-like, MR-like and PET-like studies with ground truth, in several "datasets".

Each *kind* is one dataset: an anatomy, a modality, an organ to segment, a resolution, a noise model.
Three kinds are the training distribution of the shipped model; two more are *unseen* (a modality and
organs it never saw) and are what the OOD gate must flag; three are *near* the training distribution
(``NEAR_OOD_KINDS``: a training organ in another contrast or at a child's size, a CT of another region).

======================  ==========  ================================  =====================================
kind                    modality    what is labelled                  image
======================  ==========  ================================  =====================================
``ct_liver``            CT (HU)     a lobulated liver                 abdomen, fat rim, spine, Gaussian noise
``ct_lung``             CT (HU)     both lungs                        thorax, ribs cage ring, spine, noise
``mr_prostate``         MR          the prostate                      pelvis, bias field, Rician noise
``mr_hippocampus`` (*)  MR          both hippocampi (curved tubes)    head, brain texture, 1.2 mm isotropic
``pt_tumour`` (*)       PT          hot lesions                       PET-like: blurred, Poisson-like noise
``mr_prostate_t1`` (+)  MR          the prostate                      the same pelvis, T1-like: fat and marrow
                                                                      bright, gland slightly brighter than
                                                                      muscle, zones barely apart
``ct_head`` (+)         CT (HU)     the brain (intracranial)          scalp, skull with diploe, CSF, grey/
                                                                      white texture, ventricles, neck
``ct_liver_child`` (+)  CT (HU)     the liver                         ``ct_liver`` at 0.55-0.65 of adult
                                                                      size, same spacing
======================  ==========  ================================  =====================================

(*) unseen by the shipped model. (+) near-OOD (``NEAR_OOD_KINDS``): never trained on; case ``i`` of
``mr_prostate_t1`` is case ``i`` of ``mr_prostate`` (same anatomy, other contrast), and ``ct_liver_child``
shares ``ct_liver``'s draws of body and liver, scaled. Shifted versions of any case (blur, thick slices,
noise, gamma, bias field, inversion, ghosting): :mod:`model.data.shifts`; a real MR (MNI152):
:mod:`model.data.mni`.

Arrays are ``(z, y, x)`` with ``spacing`` in mm in the same order; CT images are in Hounsfield units.
A case is a pure function of ``(kind, seed, index)``: ``phantom_case("ct_liver", seed=7, index=3)`` is the
same everywhere (NumPy's PCG64 generator), so held-out cases and the model card can be regenerated.

>>> case = phantom_case("ct_liver", seed=0, index=0)
>>> case.modality, case.image.ndim, bool(case.label.any())
('CT', 3, True)
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from scipy import ndimage

from model._atomic import atomic_write

__all__ = [
    "KINDS",
    "NEAR_OOD_KINDS",
    "TRAINING_KINDS",
    "UNSEEN_KINDS",
    "PhantomCase",
    "PhantomKind",
    "kind_id",
    "phantom_case",
    "phantom_study",
    "write_msd_dataset",
    "write_phantom_datasets",
]


@dataclass(frozen=True)
class PhantomCase:
    image: np.ndarray  # (z, y, x) float32, HU for CT
    label: np.ndarray  # (z, y, x) uint8, 1 = organ
    spacing: tuple[float, float, float]  # mm, (z, y, x)
    modality: str  # DICOM modality code
    kind: str
    organ: str
    seed: int
    index: int


@dataclass(frozen=True)
class PhantomKind:
    name: str
    modality: str
    organ: str
    description: str
    make: Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray, tuple[float, float, float]]]
    #: this kind's part of its generator's key (:func:`phantom_case`), frozen: see :data:`KINDS`
    rng_id: int


# ----------------------------------------------------------------------------------------------------
# helpers


def _grid(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[np.ndarray, ...]:
    """Coordinates in mm, centred, broadcastable (z, y, x)."""
    return tuple(
        ((np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * s).reshape([-1 if a == i else 1 for a in range(3)])
        for i, (n, s) in enumerate(zip(shape, spacing, strict=True))
    )


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], coarse: int = 4) -> np.ndarray:
    """Smooth random field in about [-1, 1]: cubic upsampling of a coarse Gaussian grid."""
    g = rng.normal(size=(coarse, coarse, coarse)).astype(np.float32)
    z = ndimage.zoom(g, [n / coarse for n in shape], order=3, mode="nearest", grid_mode=True)
    z = z[: shape[0], : shape[1], : shape[2]]
    return (z / max(float(np.abs(z).max()), 1e-6)).astype(np.float32)


def _smooth_field_fast(rng: np.random.Generator, shape: tuple[int, ...], coarse: int) -> np.ndarray:
    """:func:`_smooth_field` (the same draws, equal within float rounding: 6e-8) computed axis by axis, one
    small cubic interpolation matrix per axis: about 30x faster than ``ndimage.zoom`` on a 1.5-million-voxel
    grid. For new code (the phantoms keep the slow one: their bytes are frozen)."""
    g = rng.normal(size=(coarse, coarse, coarse))
    for axis, n in enumerate(shape):
        m = ndimage.zoom(np.eye(coarse), (n / coarse, 1.0), order=3, mode="nearest", grid_mode=True)[:n]
        g = np.moveaxis(np.tensordot(m, np.moveaxis(g, axis, 0), axes=1), 0, axis)
    return (g / max(float(np.abs(g).max()), 1e-6)).astype(np.float32)


def _ellipsoid(z, y, x, c, r, wobble=None) -> np.ndarray:  # type: ignore[no-untyped-def]
    q = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2
    return q < (1.0 if wobble is None else 1.0 + wobble)


def _shape(rng: np.random.Generator, d: tuple[int, int], hw: tuple[int, int]) -> tuple[int, int, int]:
    h = int(rng.integers(hw[0], hw[1] + 1))
    return (int(rng.integers(d[0], d[1] + 1)), h, h + int(rng.integers(-4, 5)))


def _texture(rng: np.random.Generator, shape: tuple[int, int, int], sigma: float) -> np.ndarray:
    t = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), sigma)
    return t / max(float(t.std()), 1e-6)  # unit standard deviation


# ----------------------------------------------------------------------------------------------------
# kinds


def _body_ct(rng: np.random.Generator, shape, spacing, scale: float = 1.0):  # type: ignore[no-untyped-def]
    z, y, x = _grid(shape, spacing)
    ax, ay = scale * rng.uniform(125, 150), scale * rng.uniform(90, 112)
    rim, spine_r = scale * 10.0, scale * 15.0
    body = (y / ay) ** 2 + (x / ax) ** 2 < 1.0
    inner = (y / (ay - rim)) ** 2 + (x / (ax - rim)) ** 2 < 1.0
    img = np.full(shape, -1000.0, np.float32)
    img[np.broadcast_to(body, shape)] = -100.0  # fat rim
    soft = np.broadcast_to(inner, shape)
    img[soft] = 40.0 + 10.0 * _texture(rng, shape, 1.5)[soft]
    spine = np.broadcast_to((y - 0.62 * ay) ** 2 + x**2 < spine_r**2, shape)
    img[spine] = 650.0
    return img, (z, y, x), (ax, ay)


def _ct_liver(rng: np.random.Generator, scale: float = 1.0):  # type: ignore[no-untyped-def]
    """Abdominal CT with a lobulated liver. ``scale`` < 1 shrinks the body, its organs and the scanned field
    (not the voxels): a child's abdomen scanned with an adult protocol (``ct_liver_child``)."""
    spacing = (float(rng.choice([4.0, 5.0])), 4.0, 4.0)
    shape = _shape(rng, (40, 52), (72, 88))
    if scale != 1.0:
        shape = (round(shape[0] * scale), round(shape[1] * scale), round(shape[2] * scale))
    img, (z, y, x), (ax, ay) = _body_ct(rng, shape, spacing, scale)
    c = (scale * rng.uniform(-20, 20), scale * rng.uniform(-25, 5), rng.uniform(-0.5, -0.3) * ax)
    r = (scale * rng.uniform(60, 80), scale * rng.uniform(48, 62), scale * rng.uniform(55, 70))
    wobble = 0.35 * _smooth_field(rng, shape)
    liver = _ellipsoid(z, y, x, c, r, wobble) & (img > -500)
    img[liver] = rng.uniform(95, 130) + 8.0 * _texture(rng, shape, 1.0)[liver]
    img += rng.uniform(10, 22) * rng.normal(size=shape).astype(np.float32)
    return img, liver.astype(np.uint8), spacing


def _ct_lung(rng: np.random.Generator):  # type: ignore[no-untyped-def]
    spacing = (float(rng.choice([3.0, 4.0])), 4.5, 4.5)
    shape = _shape(rng, (44, 56), (72, 88))
    img, (z, y, x), (ax, ay) = _body_ct(rng, shape, spacing)
    ribs = ((y / (ay - 14)) ** 2 + (x / (ax - 14)) ** 2 < 1.0) & ((y / (ay - 20)) ** 2 + (x / (ax - 20)) ** 2 >= 1.0)
    ribs = ribs & (np.sin(z / 9.0 + rng.uniform(0, 6.3)) > 0.3)
    img[ribs] = 500.0
    lungs = np.zeros(shape, bool)
    for side in (-1, 1):
        c = (rng.uniform(-10, 10), rng.uniform(-15, 5), side * rng.uniform(0.38, 0.46) * ax)
        r = (rng.uniform(90, 130), rng.uniform(0.55, 0.65) * ay, rng.uniform(0.3, 0.36) * ax)
        lungs |= _ellipsoid(z, y, x, c, r, 0.25 * _smooth_field(rng, shape))
    lungs &= img > -500
    heart = _ellipsoid(z, y, x, (0, rng.uniform(-20, 0), rng.uniform(-15, 15)), (60, 45, 50))
    lungs &= ~heart
    img[lungs] = -850.0 + 40.0 * _texture(rng, shape, 1.0)[lungs]
    img[heart & (img > -500)] = 45.0
    img += rng.uniform(10, 22) * rng.normal(size=shape).astype(np.float32)
    return img, lungs.astype(np.uint8), spacing


def _rician(rng: np.random.Generator, img: np.ndarray, sigma: float) -> np.ndarray:
    n1 = rng.normal(scale=sigma, size=img.shape).astype(np.float32)
    n2 = rng.normal(scale=sigma, size=img.shape).astype(np.float32)
    return np.sqrt((img + n1) ** 2 + n2**2)


def _ct_liver_child(rng: np.random.Generator):  # type: ignore[no-untyped-def]
    """``ct_liver`` at 0.55-0.65 of adult size (drawn from a generator spawned from ``rng``, so that every
    draw of ``rng`` itself is the adult case's: body and liver are case ``i``'s of ``ct_liver``, scaled)."""
    scale = float(rng.spawn(1)[0].uniform(0.55, 0.65))
    return _ct_liver(rng, scale)


def _ct_head(rng: np.random.Generator):  # type: ignore[no-untyped-def]
    """Head CT: scalp, skull (cortical bone with a darker diploe), subarachnoid CSF, brain with a grey/white
    texture and two lateral ventricles, a neck below; label: the intracranial contents ("brain")."""
    dz, px = float(rng.choice([4.0, 5.0])), float(rng.choice([2.5, 2.6]))
    spacing = (dz, px, px)
    shape = _shape(rng, (40, 48), (84, 90))
    z, y, x = _grid(shape, spacing)
    ri = (rng.uniform(62, 74), rng.uniform(78, 86), rng.uniform(62, 70))  # inner table of the skull, mm
    c = (rng.uniform(0, 15), rng.uniform(-5, 5), rng.uniform(-3, 3))
    skull, scalp = rng.uniform(5, 8), rng.uniform(3, 6)
    wobble = 0.06 * _smooth_field(rng, shape)
    grown = [tuple(v + d for v in ri) for d in (skull, skull + scalp)]
    head = _ellipsoid(z, y, x, c, grown[1], wobble)
    neck = np.broadcast_to((y / 55.0) ** 2 + (x / 48.0) ** 2 < 1.0, shape) & (z < c[0] - 0.5 * ri[0])
    img = np.full(shape, -1000.0, np.float32)
    img[head | neck] = rng.uniform(30, 50)  # scalp, neck muscles
    img[np.broadcast_to(y**2 + x**2 < 9.0**2, shape) & (z < c[0] - 0.6 * ri[0])] = 700.0  # cervical spine
    bone = _ellipsoid(z, y, x, c, grown[0], wobble)
    img[bone] = rng.uniform(1000, 1400) + 150.0 * _texture(rng, shape, 1.0)[bone]
    diploe = _ellipsoid(z, y, x, c, tuple(v + 0.65 * skull for v in ri), wobble)
    diploe &= ~_ellipsoid(z, y, x, c, tuple(v + 0.35 * skull for v in ri), wobble)
    img[diploe] = rng.uniform(500, 700)  # marrow between the two tables
    brain = _ellipsoid(z, y, x, c, ri, wobble)
    img[brain] = rng.uniform(3, 8)  # CSF around the brain
    parenchyma = _ellipsoid(z, y, x, c, tuple(v - 3.0 for v in ri), wobble)
    grey = _texture(rng, shape, 1.5) > 0
    img[parenchyma] = np.where(grey[parenchyma], rng.uniform(36, 42), rng.uniform(24, 30))
    for side in (-1, 1):
        vc = (c[0] + rng.uniform(5, 15), c[1] + rng.uniform(-8, 0), c[2] + side * rng.uniform(7, 10))
        img[_ellipsoid(z, y, x, vc, (rng.uniform(14, 20), rng.uniform(22, 30), rng.uniform(4, 6)))] = 5.0
    img += rng.uniform(3, 8) * rng.normal(size=shape).astype(np.float32)
    return img, brain.astype(np.uint8), spacing


def _mr_prostate(rng: np.random.Generator, t1: bool = False):  # type: ignore[no-untyped-def]
    """Pelvic MR, T2-like; ``t1``: the same pelvis with T1-like contrast (``mr_prostate_t1``): fat and marrow
    bright, the gland slightly brighter than muscle instead of darker, its zones barely apart and reversed.
    Both draw the same numbers from ``rng``: case ``i`` of either kind is the same anatomy."""
    inplane = float(rng.choice([1.6, 1.8, 2.0]))
    spacing = (3.0, inplane, inplane)
    shape = _shape(rng, (28, 36), (76, 90))
    z, y, x = _grid(shape, spacing)
    ax, ay = rng.uniform(70, 85), rng.uniform(55, 68)
    body = (y / ay) ** 2 + (x / ax) ** 2 < 1.0
    img = np.zeros(shape, np.float32)
    b = np.broadcast_to(body, shape)
    base = rng.uniform(250, 350)
    img[b] = base * (1.0 + 0.08 * _texture(rng, shape, 2.0)[b])
    fat = b & ~np.broadcast_to((y / (ay - 8)) ** 2 + (x / (ax - 8)) ** 2 < 1.0, shape)
    img[fat] = base * (2.6 if t1 else 1.8)
    bones = np.zeros(shape, bool)
    for side in (-1, 1):
        bones |= (y - 5.0) ** 2 + (x - side * 0.62 * ax) ** 2 < 11.0**2
    img[np.broadcast_to(bones, shape)] = base * (1.6 if t1 else 0.25)  # fatty marrow: bright on T1
    c = (rng.uniform(-8, 8), rng.uniform(-6, 10), rng.uniform(-6, 6))
    r = (rng.uniform(17, 24), rng.uniform(14, 19), rng.uniform(18, 24))
    organ = _ellipsoid(z, y, x, c, r, 0.2 * _smooth_field(rng, shape))
    zone = _ellipsoid(z, y, x, c, tuple(0.55 * v for v in r))
    if t1:  # the same draws as T2 (one uniform each), other ranges
        img[organ] = base * rng.uniform(1.08, 1.18)
        img[zone] = base * rng.uniform(1.0, 1.05)
    else:
        img[organ] = base * rng.uniform(0.55, 0.7)
        img[zone] = base * rng.uniform(0.85, 1.0)
    bias = np.exp(rng.uniform(0.2, 0.45) * _smooth_field(rng, shape, 3))
    img = _rician(rng, img * bias, rng.uniform(0.03, 0.06) * base)
    img *= rng.uniform(0.5, 3.0)  # arbitrary MR units
    return img.astype(np.float32), organ.astype(np.uint8), spacing


def _mr_hippocampus(rng: np.random.Generator):  # type: ignore[no-untyped-def]
    spacing = (1.2, 1.2, 1.2)
    shape = _shape(rng, (52, 64), (64, 76))
    z, y, x = _grid(shape, spacing)
    head = _ellipsoid(z, y, x, (0, 0, 0), (32, 40, 36))
    brain = _ellipsoid(z, y, x, (0, 0, 0), (28, 36, 32))
    img = np.zeros(shape, np.float32)
    img[head] = 900.0  # scalp / marrow, bright on T1
    gm_wm = _texture(rng, shape, 2.0)
    img[brain] = np.where(gm_wm[brain] > 0, 700.0, 480.0)  # gyri-like white/grey pattern
    organ = np.zeros(shape, bool)
    for side in (-1, 1):
        t = np.linspace(0, np.pi * 0.8, 40)
        pts = np.stack([8 * np.sin(t) - 4, 14 * np.cos(t) - 2, side * (14 + 2 * np.sin(2 * t))], 1)
        d = np.full(shape, np.inf, np.float32)
        for p in pts:
            d = np.minimum(d, (z - p[0]) ** 2 + (y - p[1]) ** 2 + (x - p[2]) ** 2)
        organ |= d < rng.uniform(3.0, 4.0) ** 2
    img[organ] = 560.0
    img = _rician(rng, img * np.exp(0.2 * _smooth_field(rng, shape, 3)), 25.0)
    return img.astype(np.float32), organ.astype(np.uint8), spacing


def _pt_tumour(rng: np.random.Generator):  # type: ignore[no-untyped-def]
    spacing = (4.0, 4.0, 4.0)
    shape = _shape(rng, (40, 56), (64, 80))
    z, y, x = _grid(shape, spacing)
    body = np.broadcast_to((y / 100.0) ** 2 + (x / 135.0) ** 2 < 1.0, shape)
    act = np.where(body, 1.0, 0.02).astype(np.float32)
    act += 2.5 * _ellipsoid(z, y, x, (0, -20, -50), (60, 45, 55))  # liver-like uptake
    act += 6.0 * _ellipsoid(z, y, x, (-60, 40, 0), (25, 20, 20))  # bladder / kidney-like hot organ
    organ = np.zeros(shape, bool)
    for _ in range(int(rng.integers(1, 4))):
        c = (rng.uniform(-60, 60), rng.uniform(-50, 50), rng.uniform(-80, 80))
        organ |= _ellipsoid(z, y, x, c, (rng.uniform(8, 16),) * 3)
    organ &= body
    act[organ] += rng.uniform(5, 10)
    act = ndimage.gaussian_filter(act, 1.5)
    counts = rng.poisson(act * 40.0).astype(np.float32) / 40.0
    img = ndimage.gaussian_filter(counts, 0.7) * rng.uniform(2000, 6000)  # Bq/ml-like
    return img.astype(np.float32), organ.astype(np.uint8), spacing


# ``rng_id`` is part of every case's generator key. It is frozen: the first five are the positions those
# kinds had in ``sorted(KINDS)`` when the key was derived from that (so adding a kind changes no existing
# case: tests/unit/model/test_near_ood.py compares checksums). A near-OOD variant shares its parent's id:
# its case ``i`` is drawn from the same numbers as the parent's case ``i`` (the same anatomy).
KINDS: dict[str, PhantomKind] = {
    k.name: k
    for k in (
        PhantomKind("ct_liver", "CT", "liver", "abdominal CT, lobulated liver", _ct_liver, 0),
        PhantomKind("ct_lung", "CT", "lung", "thoracic CT, both lungs", _ct_lung, 1),
        PhantomKind("mr_prostate", "MR", "prostate", "pelvic MR with bias field and Rician noise", _mr_prostate, 3),
        PhantomKind("mr_hippocampus", "MR", "hippocampus", "head MR, brain texture, 1.2 mm isotropic",
                    _mr_hippocampus, 2),
        PhantomKind("pt_tumour", "PT", "tumour", "PET-like uptake with hot lesions", _pt_tumour, 4),
        PhantomKind("mr_prostate_t1", "MR", "prostate", "pelvic MR, T1-like contrast (near-OOD)",
                    partial(_mr_prostate, t1=True), 3),
        PhantomKind("ct_head", "CT", "brain", "head CT, skull and brain (near-OOD: unseen body region)",
                    _ct_head, 5),
        PhantomKind("ct_liver_child", "CT", "liver", "abdominal CT of a child, 0.55-0.65 adult size (near-OOD)",
                    _ct_liver_child, 0),
    )
}
TRAINING_KINDS: tuple[str, ...] = ("ct_liver", "ct_lung", "mr_prostate")
UNSEEN_KINDS: tuple[str, ...] = ("mr_hippocampus", "pt_tumour")
#: near the training distribution: a training organ in another MR contrast, a CT of an unseen body region,
#: a training organ at a child's size
NEAR_OOD_KINDS: tuple[str, ...] = ("mr_prostate_t1", "ct_head", "ct_liver_child")


def _kind(name: str) -> PhantomKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown phantom kind {name!r}; known: {sorted(KINDS)}") from None


def kind_id(kind: str) -> int:
    """The number ``kind`` contributes to its cases' generator keys (frozen; ``ValueError`` if unknown).

    >>> kind_id("ct_liver"), kind_id("pt_tumour"), kind_id("mr_prostate_t1") == kind_id("mr_prostate")
    (0, 4, True)
    """
    return _kind(kind).rng_id


def phantom_case(kind: str, seed: int, index: int) -> PhantomCase:
    """Case ``index`` of dataset ``kind`` for ``seed``: ``np.random.default_rng([seed, kind_id(kind),
    index])`` draws it (independent of every other case of the kind)."""
    k = _kind(kind)
    rng = np.random.default_rng([int(seed), k.rng_id, int(index)])
    img, lab, spacing = k.make(rng)
    return PhantomCase(
        image=np.ascontiguousarray(img, dtype=np.float32),
        label=np.ascontiguousarray(lab, dtype=np.uint8),
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        modality=k.modality,
        kind=kind,
        organ=k.organ,
        seed=int(seed),
        index=int(index),
    )


def phantom_study(kind: str = "ct_liver", seed: int = 0) -> PhantomCase:
    """One study for the demo: ``phantom_study("ct_liver")`` is in distribution for the shipped model,
    ``phantom_study("pt_tumour")`` / ``phantom_study("mr_hippocampus")`` are unseen modality / organ.

    Uses index 10_000 + seed so it is never one of the training or evaluation cases.
    """
    return phantom_case(kind, seed=0, index=10_000 + int(seed))


# ----------------------------------------------------------------------------------------------------
# MSD layout


def _nifti_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    aff = np.eye(4)
    aff[0, 0], aff[1, 1], aff[2, 2] = spacing[2], spacing[1], spacing[0]  # NIfTI axes are (x, y, z)
    return aff


def write_msd_dataset(
    root: str | os.PathLike[str],
    kind: str,
    n: int,
    seed: int,
    first_index: int = 0,
    progress: bool = False,
) -> Path:
    """Write ``n`` cases of ``kind`` as a Medical Segmentation Decathlon folder ``root/<kind>``."""
    import nibabel as nib

    k = _kind(kind)
    out = Path(root) / kind
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    idx = range(first_index, first_index + n)
    if progress:
        from tqdm import tqdm

        idx = tqdm(idx, desc=f"phantoms {kind}", unit="case")  # type: ignore[assignment]
    for i in idx:
        case = phantom_case(kind, seed, i)
        name = f"{kind}_{i:03d}.nii.gz"
        aff = _nifti_affine(case.spacing)
        _save_nifti_gz(nib.Nifti1Image(case.image.transpose(2, 1, 0), aff), out / "imagesTr" / name)
        _save_nifti_gz(nib.Nifti1Image(case.label.transpose(2, 1, 0), aff), out / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    write_dataset_json(out, kind, kind, f"specgate phantom: {k.description}", training,
                       {"specgate_phantom": {"kind": kind, "seed": int(seed), "first_index": int(first_index)}})
    return out


def _save_nifti_gz(img: Any, path: Path) -> None:
    """``nib.save(img, path)`` for a ``.nii.gz`` path (the same bytes once decompressed), published whole."""

    def write(fh: BinaryIO) -> None:
        with gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=1, mtime=0) as gz:
            img.to_stream(gz)

    atomic_write(path, write)


def write_dataset_json(out: Path, name: str, kind: str, description: str, training: list[dict[str, str]],
                       extra: dict[str, object]) -> None:
    """The MSD ``dataset.json`` of a phantom dataset folder (one label: the kind's organ)."""
    k = _kind(kind)
    meta = {
        "name": name,
        "description": description,
        "tensorImageSize": "3D",
        "modality": {"0": k.modality},
        "labels": {"0": "background", "1": k.organ},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
        **extra,
    }
    atomic_write(out / "dataset.json", json.dumps(meta, indent=2).encode())


def write_phantom_datasets(
    root: str | os.PathLike[str],
    sizes: dict[str, int] | Sequence[str] = TRAINING_KINDS,
    n: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Path]:
    """Write several MSD-layout phantom datasets; ``sizes`` maps kind -> number of cases (or lists kinds)."""
    counts = dict(sizes) if isinstance(sizes, dict) else {k: n for k in sizes}
    return {k: write_msd_dataset(root, k, c, seed, progress=progress) for k, c in counts.items()}
