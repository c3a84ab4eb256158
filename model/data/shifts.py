"""Shift sets with known failure: a case degraded in one controlled way, at several strengths.

A *shift* takes a :class:`~model.data.phantoms.PhantomCase` (a phantom, a clinical-geometry case, the MNI
MR) and returns a :class:`ShiftedCase`: the degraded image, the same label (resampled where the grid
changes) and a record of what was applied. Each one simulates something a clinical site sends, and each
is a failure the gate should hold once it is strong enough for the model to fail (issue 20: held-out
prostate MRs blurred by sigma 1.5 voxels were segmented with DSC 0.00-0.02, and half were released).

==========  ==========================  ========================  =============================================
shift       strength                    default strengths         simulates
==========  ==========================  ========================  =============================================
``blur``    Gaussian sigma, voxels      0.5, 1.0, 1.5, 2.0        a soft reconstruction kernel, heavy denoising,
                                                                  a low-resolution acquisition interpolated up
``thick``   slice thickness, mm         6, 8, 10                  thick-slab reconstruction beyond the training
                                                                  range (MR 3 mm, CT 3-5 mm): slab averaging
``noise``   sigma / body std            0.1, 0.25, 0.5, 1.0       low dose (CT), low field or fast protocol (MR):
                                                                  Gaussian for CT/PT, Rician for MR
``gamma``   exponent                    0.5, 0.7, 1.5, 2.0        a non-linear intensity response: another
                                                                  scanner's post-processing, a vendor's filter
``bias``    log-amplitude of the field  0.25, 0.5, 0.75, 1.0      coil sensitivity (MR, beyond the training's
                                                                  <= 0.45), cupping / beam hardening (CT)
``invert``  blend weight, 0-1           0.25, 0.5, 0.75, 1.0      contrast reversed inside the body: MONOCHROME1
                                                                  read as MONOCHROME2, another MR weighting
``ghost``   replica amplitude           0.1, 0.2, 0.35, 0.5       motion ghosts: shifted replicas along the phase
                                                                  encoding axis (y)
==========  ==========================  ========================  =============================================

Every shift leaves the image as it was at its identity strength (0, or 1 for ``gamma``), keeps CT in
stored Hounsfield units (clipped to [-1024, 3071]) and MR/PT non-negative. A shifted case is a pure
function of ``(case, shift, strength, seed)``; the random parts (the noise, the bias field) are drawn from
``np.random.default_rng([..., shift, case kind, case seed, case index, seed])`` and do not depend on the
strength, so stronger is the same pattern scaled. ``kind`` records what was applied
(``mr_prostate+blur1.5``; shifts compose: ``mr_prostate+thick6.0+noise0.25``).

>>> case = shifted_case("mr_prostate", seed=0, index=0, shift="thick", strength=6.0)
>>> case.kind, case.base_kind, case.spacing[0], case.label.shape == case.image.shape
('mr_prostate+thick6.0', 'mr_prostate', 6.0, True)
>>> shifted_case("mr_prostate", 0, 0, "invert", 1.5)
Traceback (most recent call last):
...
ValueError: invert strength must be in [0.0, 1.0] (blend weight, 0-1), got 1.5
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from model.data.phantoms import PhantomCase, phantom_case
from model.data.phantoms import _smooth_field_fast as _smooth_field

__all__ = ["CT_RANGE", "SHIFTS", "Shift", "ShiftedCase", "apply_shift", "body_mask", "shifted_case"]

#: the Hounsfield units a CT scanner stores (12 bits, intercept -1024); every shifted CT is clipped to it
CT_RANGE: tuple[float, float] = (-1024.0, 3071.0)

Spacing = tuple[float, float, float]
_Apply = Callable[[np.ndarray, np.ndarray, Spacing, str, float, np.random.Generator],
                  tuple[np.ndarray, np.ndarray, Spacing]]


@dataclass(frozen=True)
class ShiftedCase(PhantomCase):
    """A :class:`PhantomCase` after one or more shifts. ``kind`` is ``base_kind`` plus ``+<shift><strength>``
    per shift; ``shifts`` lists ``(shift, strength, seed)`` in the order applied. ``seed`` and ``index`` are
    the base case's."""

    base_kind: str
    shifts: tuple[tuple[str, float, int], ...]


@dataclass(frozen=True)
class Shift:
    """One kind of shift: its strength's meaning and bounds, its default strengths (mild to severe), the
    strength that leaves the image unchanged, and what it simulates clinically."""

    name: str
    unit: str
    strengths: tuple[float, ...]
    identity: float
    bounds: tuple[float, float]
    simulates: str
    apply: _Apply

    def check(self, strength: float) -> float:
        """``strength`` as a float, or ``ValueError`` naming it if it is outside :attr:`bounds`."""
        s = float(strength)
        lo, hi = self.bounds
        if not lo <= s <= hi:  # also refuses NaN
            raise ValueError(f"{self.name} strength must be in [{lo}, {hi}] ({self.unit}), got {strength!r}")
        return s


# ----------------------------------------------------------------------------------------------------
# helpers


def body_mask(image: np.ndarray, modality: str) -> np.ndarray:
    """The patient's body: CT above -500 HU, otherwise above 10 % of the 99th percentile; holes filled
    slice by slice (lungs, dark bone on MR), only the largest connected component kept (noise specks)."""
    if modality.upper() == "CT":
        fg = image > -500.0
    else:
        fg = image > 0.1 * float(np.percentile(image, 99.0))
    fg = ndimage.binary_fill_holes(fg, structure=np.ones((1, 3, 3), bool))  # per axial slice
    lab, n = ndimage.label(fg)
    if n > 1:
        sizes = ndimage.sum_labels(fg, lab, index=np.arange(1, n + 1))
        fg = lab == 1 + int(np.argmax(sizes))
    return np.asarray(fg, dtype=bool)


def _attenuation(image: np.ndarray, modality: str) -> tuple[np.ndarray, float]:
    """The image on a scale where multiplying and adding are physical: CT as HU + 1024 (proportional to the
    linear attenuation, air ~ 0), anything else as it is. Returns the image and the offset to undo it."""
    off = -CT_RANGE[0] if modality.upper() == "CT" else 0.0
    return image.astype(np.float32) + np.float32(off), off


def _finish(image: np.ndarray, modality: str) -> np.ndarray:
    """Stored range: CT clipped to :data:`CT_RANGE`, MR/PT floored at 0; float32."""
    out = np.asarray(image, dtype=np.float32)
    if modality.upper() == "CT":
        return np.clip(out, np.float32(CT_RANGE[0]), np.float32(CT_RANGE[1]))
    return np.maximum(out, np.float32(0.0))


# ----------------------------------------------------------------------------------------------------
# the shifts: (image, label, spacing, modality, strength, rng) -> (image, label, spacing)


def _blur(image, label, spacing, modality, sigma, rng):  # type: ignore[no-untyped-def]
    return ndimage.gaussian_filter(image, sigma=sigma, mode="nearest"), label, spacing


def _slab_weights(n: int, dz: float, thickness: float) -> np.ndarray:
    """``(m, n)`` weights: the overlap of each new slab of ``thickness`` mm with each old slice of ``dz``
    mm, both stacks centred on the same point, rows normalised; ``m = round(n * dz / thickness)``."""
    m = max(1, round(n * dz / thickness))
    old = np.arange(n + 1) * dz
    new = (n * dz - m * thickness) / 2.0 + np.arange(m + 1) * thickness
    w = np.minimum(old[None, 1:], new[1:, None]) - np.maximum(old[None, :-1], new[:-1, None])
    w = np.clip(w, 0.0, None)
    return w / w.sum(axis=1, keepdims=True)


def _thick(image, label, spacing, modality, thickness, rng):  # type: ignore[no-untyped-def]
    dz, dy, dx = spacing
    if thickness < dz - 1e-6:
        raise ValueError(f"thick strength {thickness} mm is thinner than the case's {dz} mm slices")
    w = _slab_weights(image.shape[0], dz, thickness)
    img = np.empty((w.shape[0], *image.shape[1:]), np.float32)
    frac = np.empty(img.shape, np.float32)
    for j, row in enumerate(w):
        ks = np.flatnonzero(row)
        img[j] = np.tensordot(row[ks], image[ks], axes=1)
        frac[j] = np.tensordot(row[ks], label[ks].astype(np.float32), axes=1)
    return img, (frac >= 0.5).astype(np.uint8), (float(thickness), dy, dx)


def _noise(image, label, spacing, modality, fraction, rng):  # type: ignore[no-untyped-def]
    sigma = np.float32(fraction * float(image[body_mask(image, modality)].std()))
    n1 = rng.standard_normal(image.shape, dtype=np.float32) * sigma
    if modality.upper() == "MR":  # magnitude of a complex signal with Gaussian noise in both channels
        n2 = rng.standard_normal(image.shape, dtype=np.float32) * sigma
        return np.sqrt((image + n1) ** 2 + n2**2), label, spacing
    return image + n1, label, spacing


def _gamma(image, label, spacing, modality, gamma, rng):  # type: ignore[no-untyped-def]
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return image, label, spacing
    u = (image - np.float32(lo)) * np.float32(1.0 / (hi - lo))  # float32: clinical volumes are large
    return np.float32(lo) + np.float32(hi - lo) * u ** np.float32(gamma), label, spacing


def _bias(image, label, spacing, modality, amplitude, rng):  # type: ignore[no-untyped-def]
    field = np.exp(np.float32(amplitude) * _smooth_field(rng, image.shape, 3))  # in [e^-a, e^a]
    att, off = _attenuation(image, modality)
    return att * field - np.float32(off), label, spacing


def _invert(image, label, spacing, modality, weight, rng):  # type: ignore[no-untyped-def]
    body = body_mask(image, modality)
    if not body.any():
        return image, label, spacing
    vals = image[body]
    lo, hi = float(vals.min()), float(vals.max())
    out = image.astype(np.float32)  # a copy
    out[body] = (1.0 - weight) * vals + weight * (lo + hi - vals)  # the body's range, reversed
    return out, label, spacing


def _ghost(image, label, spacing, modality, amplitude, rng):  # type: ignore[no-untyped-def]
    att, off = _attenuation(image, modality)
    d = max(1, image.shape[1] // 4)  # a quarter of the field of view along y, wrapping like k-space ghosts
    ghosts = np.roll(att, d, axis=1) + np.roll(att, -d, axis=1)
    return att + np.float32(amplitude / 2.0) * ghosts - np.float32(off), label, spacing


SHIFTS: dict[str, Shift] = {
    s.name: s
    for s in (
        Shift("blur", "Gaussian sigma, voxels", (0.5, 1.0, 1.5, 2.0), 0.0, (0.0, 20.0),
              "a soft reconstruction kernel, heavy denoising, or a low-resolution acquisition interpolated "
              "to a finer grid: edges and texture smoothed", _blur),
        Shift("thick", "slice thickness, mm; 0: unchanged", (6.0, 8.0, 10.0), 0.0, (0.0, 50.0),
              "thick-slab reconstruction beyond the training range (MR 3 mm, CT 3-5 mm): slices averaged "
              "over the slab, partial volume along z, fewer slices", _thick),
        Shift("noise", "sigma as a fraction of the body's standard deviation", (0.1, 0.25, 0.5, 1.0), 0.0,
              (0.0, 10.0), "low dose (CT), low field strength or a fast protocol (MR): Gaussian noise for "
              "CT and PT, Rician (magnitude) noise for MR", _noise),
        Shift("gamma", "exponent on the image normalised to [0, 1]", (0.5, 0.7, 1.5, 2.0), 1.0, (0.05, 20.0),
              "a non-linear intensity response: another scanner's post-processing or filter, a "
              "mis-applied display curve baked into the pixels", _gamma),
        Shift("bias", "log-amplitude of a smooth multiplicative field", (0.25, 0.5, 0.75, 1.0), 0.0,
              (0.0, 5.0), "MR: receive-coil sensitivity beyond the training's (<= 0.45); CT: cupping or "
              "beam hardening (multiplies the attenuation, HU + 1024)", _bias),
        Shift("invert", "blend weight, 0-1", (0.25, 0.5, 0.75, 1.0), 0.0, (0.0, 1.0),
              "contrast reversed inside the body (min + max - x): a MONOCHROME1 series read as "
              "MONOCHROME2, or another MR weighting; 0.5 removes all contrast", _invert),
        Shift("ghost", "replica amplitude (two replicas of half of it)", (0.1, 0.2, 0.35, 0.5), 0.0, (0.0, 2.0),
              "periodic motion (breathing, peristalsis) during an MR acquisition: replicas of the body "
              "shifted by a quarter of the field of view along the phase-encoding axis (y)", _ghost),
    )
}


def _shift(shift: str | Shift) -> Shift:
    if isinstance(shift, Shift):
        return shift
    try:
        return SHIFTS[shift]
    except KeyError:
        raise ValueError(f"unknown shift {shift!r}; known: {sorted(SHIFTS)}") from None


def apply_shift(case: PhantomCase, shift: str | Shift, strength: float, seed: int = 0) -> ShiftedCase:
    """``case`` after ``shift`` at ``strength`` (``ValueError`` naming a value out of bounds). A pure
    function of its arguments; at the shift's identity strength the image and label are ``case``'s."""
    sh = _shift(shift)
    s = sh.check(strength)
    modality = case.modality.upper()
    if s == sh.identity:
        image, label, spacing = case.image.copy(), case.label.copy(), case.spacing
    else:
        key = [0x5317F7, zlib.crc32(sh.name.encode()), zlib.crc32(case.kind.encode()), int(case.seed),
               int(case.index), int(seed)]
        image, label, spacing = sh.apply(case.image, case.label, case.spacing, modality, s,
                                         np.random.default_rng(key))
        image = _finish(image, modality)
    base = case.base_kind if isinstance(case, ShiftedCase) else case.kind
    before = case.shifts if isinstance(case, ShiftedCase) else ()
    return ShiftedCase(
        image=np.ascontiguousarray(image, dtype=np.float32),
        label=np.ascontiguousarray(label, dtype=np.uint8),
        spacing=tuple(float(v) for v in spacing),  # type: ignore[arg-type]
        modality=case.modality,
        kind=f"{case.kind}+{sh.name}{s!r}",
        organ=case.organ,
        seed=case.seed,
        index=case.index,
        base_kind=base,
        shifts=(*before, (sh.name, s, int(seed))),
    )


def shifted_case(kind: str, seed: int, index: int, shift: str | Shift, strength: float,
                 shift_seed: int = 0) -> ShiftedCase:
    """Phantom ``(kind, seed, index)`` (:func:`~model.data.phantoms.phantom_case`) after ``shift`` at
    ``strength``: ``apply_shift(phantom_case(kind, seed, index), shift, strength, shift_seed)``."""
    _shift(shift).check(strength)  # before generating the case
    return apply_shift(phantom_case(kind, seed, index), shift, strength, shift_seed)
