"""A real MR: the MNI152 template that nilearn ships inside its wheel, as several "subjects".

The template is real MR data (the ICBM 2009a non-linear symmetric average of 152 T1-weighted scans,
skull-stripped, 1 mm) with tissue probability maps; nilearn installs it with its package
(``nilearn/datasets/data/mni_icbm152_{t1,gm}_tal_nlin_sym_09a_converted.nii.gz``), so nothing is
downloaded, at install time or at run time. This module reads those two files with nibabel (nilearn
itself is not imported: only its package folder is located).

A *subject* ``(seed, index)`` is the template

- warped by a random global transform (head size 0.92-1.08, each axis another 0.97-1.03, rotation up
  to 6 degrees about z and 4 about x) and a smooth random displacement field (2-4 mm amplitude);
- resampled (linear) onto an isotropic grid, 1.5 mm by default (a common research MR resolution; the
  shipped model's MR is 1.6-2 mm in plane, 3 mm slices);
- with its grey/white contrast varied a little (the intensities raised to a power in 0.9-1.1), a smooth
  multiplicative bias field (log-amplitude 0.1-0.3) and Rician noise (sigma 2-5 % of the brain's
  median);
- labelled with the warped grey-matter probability > 0.5.

Arrays are ``(z, y, x)`` with axial slices in the DICOM patient orientation (x towards the patient's left,
y towards posterior, z towards superior), like :mod:`model.data.phantoms`. The result is a
:class:`~model.data.phantoms.PhantomCase` of kind ``mr_mni152``, modality ``MR``, organ ``grey matter``:
a real brain that no training kind resembles (an unseen organ in a known modality), for the OOD and
failure experiments.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from model.data.phantoms import PhantomCase, _rician
from model.data.phantoms import _smooth_field_fast as _smooth_field

__all__ = ["KIND", "MNI_FILES", "mni_case", "mni_template", "template_paths"]

KIND = "mr_mni152"
#: the files of the nilearn wheel this module reads: the T1 template and its grey-matter probability map
MNI_FILES = ("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")
_RNG_ID = 0x4D4E49  # "MNI": this module's part of every subject's generator key
_MARGIN = 8  # voxels (1 mm) kept around the brain's bounding box


def template_paths() -> tuple[Path, Path]:
    """The T1 and grey-matter files inside the installed nilearn package (``RuntimeError`` saying what is
    missing otherwise)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise RuntimeError("the MNI152 template ships inside nilearn's wheel, and nilearn is not installed "
                           "(pip install nilearn; it is a dependency of specgate)")
    folder = Path(spec.origin).parent / "datasets" / "data"
    paths = tuple(folder / name for name in MNI_FILES)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise RuntimeError(f"this nilearn does not ship the MNI152 template files: {missing}")
    return paths  # type: ignore[return-value]


def _read_lps(path: Path) -> np.ndarray:
    """A NIfTI volume as float32 ``(z, y, x)`` in LPS (the files are RAS with a diagonal affine)."""
    import nibabel as nib

    img = nib.Nifti1Image.from_filename(path)
    aff = np.asarray(img.affine)
    if not np.allclose(aff[:3, :3], np.eye(3)):
        raise RuntimeError(f"{path}: expected a 1 mm RAS affine, got {aff[:3, :3].tolist()}")
    data = np.asarray(img.dataobj, dtype=np.float32) / 255.0  # uint8 0-255 -> 0-1
    return np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])


@lru_cache(maxsize=1)
def mni_template() -> tuple[np.ndarray, np.ndarray]:
    """The template's T1 (0-1) and grey-matter probability (0-1), 1 mm, ``(z, y, x)`` LPS, cropped to the
    brain plus 8 mm; read once per process, read-only."""
    t1_path, gm_path = template_paths()
    t1, gm = _read_lps(t1_path), _read_lps(gm_path)
    nz = np.argwhere(t1 > 0)
    lo = np.maximum(nz.min(0) - _MARGIN, 0)
    hi = np.minimum(nz.max(0) + 1 + _MARGIN, t1.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    out = (np.ascontiguousarray(t1[box]), np.ascontiguousarray(gm[box]))
    for a in out:
        a.flags.writeable = False
    return out


def _rotation(rz: float, rx: float) -> np.ndarray:
    """Rotation in ``(z, y, x)`` coordinates: ``rz`` radians about z (in the axial plane), then ``rx``
    about x (nodding)."""
    cz, sz, cx, sx = np.cos(rz), np.sin(rz), np.cos(rx), np.sin(rx)
    about_z = np.array([[1, 0, 0], [0, cz, -sz], [0, sz, cz]])
    about_x = np.array([[cx, -sx, 0], [sx, cx, 0], [0, 0, 1]])
    return about_x @ about_z


def mni_case(seed: int, index: int, spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)) -> PhantomCase:
    """Subject ``index`` for ``seed``: the MNI152 template deformed, resampled to ``spacing`` (mm, z y x),
    with a bias field and Rician noise; label: grey-matter probability > 0.5. A pure function of its
    arguments (``np.random.default_rng([seed, 0x4D4E49, index])``)."""
    sp = np.array([float(s) for s in spacing])
    if sp.shape != (3,) or not np.all(sp > 0):
        raise ValueError(f"spacing must be three positive mm values (z, y, x), got {spacing!r}")
    t1, gm = mni_template()
    rng = np.random.default_rng([int(seed), _RNG_ID, int(index)])
    # draw every parameter first (then apply them)
    scale = rng.uniform(0.92, 1.08) * rng.uniform(0.97, 1.03, size=3)
    rot = _rotation(np.deg2rad(rng.uniform(-6, 6)), np.deg2rad(rng.uniform(-4, 4)))
    warp_mm = rng.uniform(2.0, 4.0)
    power = rng.uniform(0.9, 1.1)
    bias = rng.uniform(0.1, 0.3)
    noise = rng.uniform(0.02, 0.05)
    level = rng.uniform(400.0, 1200.0)  # arbitrary MR units

    ext = np.array(t1.shape) * scale  # mm covered by the subject's head and margin
    shape = tuple(int(np.ceil(e / s)) for e, s in zip(ext, sp, strict=True))
    centre_out = (np.array(shape) - 1) / 2.0
    centre_in = (np.array(t1.shape) - 1) / 2.0
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1)
    p = (grid - centre_out[:, None].astype(np.float32)) * sp[:, None].astype(np.float32)  # mm about the centre
    q = (rot.T @ p) / scale[:, None]  # back into the template, mm == voxels
    for axis in range(3):
        q[axis] += warp_mm * _smooth_field(rng, shape, 5).reshape(-1)
    q += centre_in[:, None]
    image = ndimage.map_coordinates(t1, q, order=1, mode="constant", cval=0.0).reshape(shape)
    grey = ndimage.map_coordinates(gm, q, order=1, mode="constant", cval=0.0).reshape(shape)
    del grid, p, q

    image = np.clip(image, 0.0, 1.0) ** np.float32(power)
    brain = image > 0.05
    image = image * np.float32(level) * np.exp(np.float32(bias) * _smooth_field(rng, shape, 3))
    sigma = noise * float(np.median(image[brain])) if brain.any() else noise * level
    image = _rician(rng, image.astype(np.float32), sigma)
    return PhantomCase(
        image=np.ascontiguousarray(image, dtype=np.float32),
        label=np.ascontiguousarray(grey > 0.5, dtype=np.uint8),
        spacing=(float(sp[0]), float(sp[1]), float(sp[2])),
        modality="MR",
        kind=KIND,
        organ="grey matter",
        seed=int(seed),
        index=int(index),
    )
