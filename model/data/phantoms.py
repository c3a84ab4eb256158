"""Synthetic CT-like, MR-like and PET-like studies with ground truth, in several "datasets".

Each *kind* is one dataset: an anatomy, a modality, an organ to segment, a resolution, a noise model.
Three kinds are the training distribution of the shipped model; two more are *unseen* (a modality and
organs it never saw) and are what the OOD gate must flag.

======================  ==========  ================================  =====================================
kind                    modality    what is labelled                  image
======================  ==========  ================================  =====================================
``ct_liver``            CT (HU)     a lobulated liver                 abdomen, fat rim, spine, Gaussian noise
``ct_lung``             CT (HU)     both lungs                        thorax, ribs cage ring, spine, noise
``mr_prostate``         MR          the prostate                      pelvis, bias field, Rician noise
``mr_hippocampus`` (*)  MR          both hippocampi (curved tubes)    head, brain texture, 1.2 mm isotropic
``pt_tumour`` (*)       PT          hot lesions                       PET-like: blurred, Poisson-like noise
======================  ==========  ================================  =====================================

(*) unseen by the shipped model.

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
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from scipy import ndimage

from model._atomic import atomic_write

__all__ = [
    "KINDS",
    "TRAINING_KINDS",
    "UNSEEN_KINDS",
    "PhantomCase",
    "PhantomKind",
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


def _body_ct(rng: np.random.Generator, shape, spacing):  # type: ignore[no-untyped-def]
    z, y, x = _grid(shape, spacing)
    ax, ay = rng.uniform(125, 150), rng.uniform(90, 112)
    body = (y / ay) ** 2 + (x / ax) ** 2 < 1.0
    inner = (y / (ay - 10)) ** 2 + (x / (ax - 10)) ** 2 < 1.0
    img = np.full(shape, -1000.0, np.float32)
    img[np.broadcast_to(body, shape)] = -100.0  # fat rim
    soft = np.broadcast_to(inner, shape)
    img[soft] = 40.0 + 10.0 * _texture(rng, shape, 1.5)[soft]
    spine = np.broadcast_to((y - 0.62 * ay) ** 2 + x**2 < 15.0**2, shape)
    img[spine] = 650.0
    return img, (z, y, x), (ax, ay)


def _ct_liver(rng: np.random.Generator):  # type: ignore[no-untyped-def]
    spacing = (float(rng.choice([4.0, 5.0])), 4.0, 4.0)
    shape = _shape(rng, (40, 52), (72, 88))
    img, (z, y, x), (ax, ay) = _body_ct(rng, shape, spacing)
    c = (rng.uniform(-20, 20), rng.uniform(-25, 5), rng.uniform(-0.5, -0.3) * ax)
    r = (rng.uniform(60, 80), rng.uniform(48, 62), rng.uniform(55, 70))
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


def _mr_prostate(rng: np.random.Generator):  # type: ignore[no-untyped-def]
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
    img[fat] = base * 1.8
    bones = np.zeros(shape, bool)
    for side in (-1, 1):
        bones |= (y - 5.0) ** 2 + (x - side * 0.62 * ax) ** 2 < 11.0**2
    img[np.broadcast_to(bones, shape)] = base * 0.25
    c = (rng.uniform(-8, 8), rng.uniform(-6, 10), rng.uniform(-6, 6))
    r = (rng.uniform(17, 24), rng.uniform(14, 19), rng.uniform(18, 24))
    organ = _ellipsoid(z, y, x, c, r, 0.2 * _smooth_field(rng, shape))
    zone = _ellipsoid(z, y, x, c, tuple(0.55 * v for v in r))
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


KINDS: dict[str, PhantomKind] = {
    k.name: k
    for k in (
        PhantomKind("ct_liver", "CT", "liver", "abdominal CT, lobulated liver", _ct_liver),
        PhantomKind("ct_lung", "CT", "lung", "thoracic CT, both lungs", _ct_lung),
        PhantomKind("mr_prostate", "MR", "prostate", "pelvic MR with bias field and Rician noise", _mr_prostate),
        PhantomKind("mr_hippocampus", "MR", "hippocampus", "head MR, brain texture, 1.2 mm isotropic", _mr_hippocampus),
        PhantomKind("pt_tumour", "PT", "tumour", "PET-like uptake with hot lesions", _pt_tumour),
    )
}
TRAINING_KINDS: tuple[str, ...] = ("ct_liver", "ct_lung", "mr_prostate")
UNSEEN_KINDS: tuple[str, ...] = ("mr_hippocampus", "pt_tumour")


def _kind(name: str) -> PhantomKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown phantom kind {name!r}; known: {sorted(KINDS)}") from None


def phantom_case(kind: str, seed: int, index: int) -> PhantomCase:
    """Case ``index`` of dataset ``kind`` for ``seed`` (independent of every other case)."""
    k = _kind(kind)
    kid = sorted(KINDS).index(kind)
    rng = np.random.default_rng([int(seed), kid, int(index)])
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
