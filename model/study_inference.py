"""One study through the model: the path that production runs and that the OOD bank is fitted through.

:func:`segment_volume` takes a volume as the series loader gives it (native units, the scanner's
grid) and returns class probabilities on that same grid with the spectral signature of its content:

1. **The model's grid.** When the weights declare the spacing they were trained at for this modality
   (:class:`InferenceSettings` ``spacing``), the image is resampled onto it (:mod:`model.resample`:
   anti-aliased, linear). Otherwise it is used at its native resolution, the paper's mode.
2. **Intensities**, by modality (:func:`model.preprocess.preprocess`).
3. **The body.** A mask of the voxels inside the patient (:func:`body_mask`). The windows run on a
   canvas of the mask's bounding box plus ``crop_margin_mm`` on every side: the image cropped to it, and
   where the box reaches past the image (a field of view that cuts the body) filled with air (0 once
   preprocessed, for CT and MR alike). Version 2 ran the signature's mean Gram over the mask only; version 3
   runs it over the whole canvas (``signature_voxels``, chosen on the validation range). Air around the
   patient and the padding of a larger field of view therefore change neither the windows' contents
   (instance normalisation inside a window sees what the window holds) nor the signature: see
   :mod:`model.ood` for the measurements. Outside the box the probabilities are background.

   The margin, measured on held-out phantoms of the three known kinds (3 each) with the shipped weights:
   mean DSC 0.986 / 0.990 / 0.944 / 0.924 / 0.776 with 8 / 12 / 16 / 24 / 40 mm, and the signature of
   the same image padded with air moved by at most 0.096 / 0.047 / 0.070 / 0.169 / 0.138 (tau is about
   0.06). The network was trained on blocks with a thin rim of noisy air around the body; a wide rim of
   exact zeros is unlike anything it saw. What remains at 12 mm is the sub-voxel phase of resampling a
   4.5 mm lung or a 1.6-2 mm MR onto the model's grid (zero for the 4 mm liver), which the bank's
   re-gridded training images carry too.
4. **Windows** (:func:`model.infer.sliding_window`): probabilities and the streaming signature together.
5. **Back to the source grid** (:func:`model.resample.from_grid`, linear): the probabilities are defined
   on every source voxel, so the mask thresholded from them lies exactly on the source geometry.

Every setting that changes a signature is in :meth:`InferenceSettings.signature_settings`; a bank records
them, and :meth:`model.ood.SpectralGate.check_inference` refuses a bank fitted through another path.

>>> import numpy as np
>>> from model.unet import SegNet
>>> net = SegNet(base_features=4, levels=2).eval()
>>> s = InferenceSettings(block=16, overlap=4, spacing=(("CT", (4.0, 4.0, 4.0)),))
>>> r = segment_volume(net, np.full((40, 64, 64), -1000.0, np.float32), (1.0, 1.0, 1.0), "CT", s)
>>> r.probabilities.shape, r.model_shape, r.body_voxels
((2, 40, 64, 64), (10, 16, 16), 0)
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from model.infer import InferenceResult, plan_windows, sliding_window
from model.ood import SPECTRA
from model.preprocess import preprocess
from model.resample import Grid, SourceSlabs, from_grid, model_grid, to_grid, validate_spacing

__all__ = ["BODY_RULE", "InferenceSettings", "PreparedStudy", "StudyInference", "StudyLabels", "body_mask",
           "labels_on_source", "parse_spacing", "prepare_study", "release_freed_memory", "segment_labels",
           "segment_volume", "study_windows"]

#: name of the body-mask rule of :func:`body_mask` (recorded in banks: change it when the rule changes)
BODY_RULE = "threshold-v1"
#: the module whose output the signature is made of (chosen on the validation range by
#: ``specgate model experiment failures``: the first encoder stage, at the input's resolution, sees the
#: texture and sharpness that blur, thick slices and ghosting change; the last decoder stage, the paper's
#: choice, is shaped by the segmentation task and let blurred MRs the model fails on through)
SIGNATURE_LAYER = "encoders.0"
#: the voxels the signature's mean Gram runs over: ``"canvas"`` (the body's box plus the margin, every
#: voxel the windows own: chosen on the validation range) or ``"body"`` (the body mask only)
SIGNATURE_VOXELS = ("canvas", "body")
CT_BODY_HU = -500.0  # CT: tissue is above -500 HU (air -1000, lung parenchyma about -850 is inside: filled)
OTHER_BODY_FRACTION = 0.2  # MR/PET: above 20 % of the 99th percentile
KEEP_COMPONENT_FRACTION = 0.1  # components of at least 10 % of the largest one are body (two arms, two legs)

Spacing = tuple[float, float, float]


def parse_spacing(text: str) -> tuple[tuple[str, Spacing], ...]:
    """``"CT=4,4,4;MR=3,1.8,1.8"`` -> ``(("CT", (4.0, 4.0, 4.0)), ("MR", (3.0, 1.8, 1.8)))``; ``"native"`` -> ``()``.

    >>> parse_spacing("CT=4,4,4; mr=3,1.8,1.8")
    (('CT', (4.0, 4.0, 4.0)), ('MR', (3.0, 1.8, 1.8)))
    """
    text = text.strip()
    if text.lower() == "native":
        return ()
    out: dict[str, Spacing] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        mod, sep, values = part.partition("=")
        mod = mod.strip().upper()
        if not sep or not mod.isalpha():
            raise ValueError(f"{part!r} is not MODALITY=z,y,x (for example CT=4,4,4)")
        try:
            sp = validate_spacing([float(v) for v in values.split(",")])
        except ValueError as exc:
            raise ValueError(f"{part!r}: {exc}") from None
        if mod in out:
            raise ValueError(f"modality {mod} is given twice in {text!r}")
        out[mod] = sp
    if not out:
        raise ValueError(f"{text!r} names no spacing; write MODALITY=z,y,x;... or 'native'")
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class InferenceSettings:
    """How a study goes through the model. Frozen, comparable, and recorded in every bank.

    ``spacing``: ``(modality, (z, y, x) mm)`` pairs, the grid the model runs on for that modality; a
    modality without one (or an empty tuple) runs at native resolution. ``precision``: ``"float32"`` or
    ``"bfloat16"`` (CUDA autocast). ``batch_size`` does not change any result (normalisation is per
    window) and is recorded but not compared.
    """

    block: int = 96
    overlap: int = 24
    spacing: tuple[tuple[str, Spacing], ...] = ()
    antialias: bool = True
    crop_margin_mm: float = 12.0
    body: str = BODY_RULE
    precision: str = "float32"
    batch_size: int = 1
    signature_layer: str = SIGNATURE_LAYER
    spectrum: str = "centred"
    signature_voxels: str = "canvas"

    def __post_init__(self) -> None:
        if self.block < 8 or not 0 <= self.overlap < self.block:
            raise ValueError(f"block {self.block} / overlap {self.overlap}: need block >= 8 and 0 <= overlap < block")
        if self.precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be 'float32' or 'bfloat16', got {self.precision!r}")
        if self.body != BODY_RULE:
            raise ValueError(f"unknown body rule {self.body!r} (this version has {BODY_RULE!r})")
        if self.spectrum not in SPECTRA:
            raise ValueError(f"spectrum must be one of {', '.join(SPECTRA)}, got {self.spectrum!r}")
        if self.signature_voxels not in SIGNATURE_VOXELS:
            raise ValueError(f"signature_voxels must be one of {', '.join(SIGNATURE_VOXELS)}, got {self.signature_voxels!r}")
        if not (math.isfinite(self.crop_margin_mm) and self.crop_margin_mm >= 0):
            raise ValueError(f"crop_margin_mm must be >= 0, got {self.crop_margin_mm}")
        norm = tuple(sorted((str(m).upper(), validate_spacing(s)) for m, s in dict(self.spacing).items()))
        object.__setattr__(self, "spacing", norm)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], **overrides: Any) -> InferenceSettings:
        """Settings from a bank's ``meta["inference"]`` (or a weights file's metadata), then ``overrides``."""
        values = {k: v for k, v in {**record, **overrides}.items() if k in cls.__dataclass_fields__ and v is not None}
        if isinstance(values.get("spacing"), Mapping):
            values["spacing"] = tuple(values["spacing"].items())
        return cls(**values)

    @classmethod
    def for_weights(cls, meta: Mapping[str, Any], *, device: str | torch.device = "cpu", block: int | None = None,
                    overlap: int | None = None, spacing: Any = None) -> InferenceSettings:
        """The weights' own inference settings (metadata ``inference_block``, ``inference_overlap``,
        ``inference_spacing``), then overrides. ``spacing``: ``None`` (the weights'), ``()`` (native
        resolution) or ``(modality, (z, y, x))`` pairs.
        """
        declared = meta.get("inference_spacing") or {}
        signature: dict[str, Any] = {k: str(meta[k]) for k in ("signature_layer", "spectrum", "signature_voxels")
                                     if meta.get(k) is not None}
        return cls(
            block=int(block or meta.get("inference_block", 96)),
            overlap=int(overlap if overlap is not None else meta.get("inference_overlap", 24)),
            spacing=tuple(declared.items()) if spacing is None else tuple(spacing),
            # On a GPU, batches keep it busy (H200: 93 blocks/s at 1, 192 at 4, 256 at 8); on a CPU, 1.
            batch_size=8 if str(device).startswith("cuda") else 1,
            **signature,
        )

    def signature_arguments(self, body: np.ndarray | None) -> dict[str, Any]:
        """The signature's arguments of :func:`model.infer.sliding_window` for a study whose body on the
        canvas is ``body``: the layer, the spectrum, and the voxels the mean Gram runs over."""
        return {"signature_layer": self.signature_layer or None, "spectrum": self.spectrum,
                "signature_mask": body if self.signature_voxels == "body" else None}

    def spacing_for(self, modality: str) -> Spacing | None:
        return dict(self.spacing).get(modality.upper())

    def signature_settings(self) -> dict[str, Any]:
        """Everything that changes a signature (what a bank must match)."""
        d = self.record()
        d.pop("batch_size")
        return d

    def record(self) -> dict[str, Any]:
        """JSON-ready form, for bank metadata and evidence files."""
        d = asdict(self)
        d["spacing"] = {m: list(s) for m, s in self.spacing}
        return d


class _GridEvidence:
    """``evidence()`` of a result that carries the model's grid, the crop and the windows (both
    :class:`StudyInference` and :class:`StudyLabels`)."""

    model_shape: tuple[int, int, int]
    model_spacing: tuple[float, float, float]
    resampled: bool
    crop: tuple[tuple[int, int], ...]
    body_voxels: int
    n_signature_voxels: int
    n_windows: int

    def evidence(self) -> dict[str, Any]:
        """The numbers a reviewer needs to see how the signature was made."""
        return {"model_grid_shape": list(self.model_shape),
                "model_grid_spacing_mm": [round(s, 4) for s in self.model_spacing],
                "resampled": self.resampled, "crop": [list(c) for c in self.crop],
                "body_voxels": self.body_voxels, "signature_voxels": self.n_signature_voxels,
                "windows": self.n_windows}


@dataclass
class StudyInference(_GridEvidence):
    """What :func:`segment_volume` returns. ``probabilities`` lie on the source grid."""

    probabilities: np.ndarray  # (num_classes, D, H, W), out_dtype
    signature: np.ndarray
    n_signature_voxels: int
    body_voxels: int  # 0: no body found, the signature runs over every voxel of the model's grid
    model_shape: tuple[int, int, int]
    model_spacing: tuple[float, float, float]
    crop: tuple[tuple[int, int], ...]  # (lo, hi) per axis of the model's grid; may reach beyond it (air)
    n_windows: int
    resampled: bool
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def foreground(self) -> np.ndarray:
        return self.probabilities[1]



def body_mask(x: np.ndarray, modality: str) -> np.ndarray:
    """Voxels inside the patient, from a preprocessed image (rule :data:`BODY_RULE`).

    CT: above -500 HU; other modalities: above 20 % of the 99th percentile of the voxels above 20 % of
    the image's 99th percentile (so that a larger field of view, more air, does not move it). Then one opening (noise
    specks), the connected components of at least 10 % of the largest, and holes filled slice by slice
    (lungs and bowel gas are inside the body). Returns an all-false mask for an image with no body.
    """
    from scipy import ndimage

    if modality.upper() == "CT":
        lo = (CT_BODY_HU + 1000.0) / 2000.0  # model.preprocess maps [-1000, 1000] HU to [0, 1]
        m = x > lo
    else:
        # the 99th percentile of the whole image falls as the field of view grows (more air): take it
        # again over the voxels above a first threshold, which are the body whatever the field of view
        hi = float(np.percentile(x, 99))
        if not hi > 0:
            return np.zeros(x.shape, bool)
        hi = float(np.percentile(x[x > OTHER_BODY_FRACTION * hi], 99))
        m = x > OTHER_BODY_FRACTION * hi
    m = ndimage.binary_opening(m)
    lab, n = ndimage.label(m)
    if n == 0:
        return m
    sizes = np.bincount(lab.ravel())[1:]
    keep = np.flatnonzero(sizes >= KEEP_COMPONENT_FRACTION * sizes.max()) + 1
    m = np.isin(lab, keep)
    for z in range(m.shape[0]):
        if m[z].any():
            m[z] = ndimage.binary_fill_holes(m[z])
    return m


def _body_box(mask: np.ndarray, spacing: Sequence[float], margin_mm: float) -> tuple[tuple[int, int], ...]:
    """The body's bounding box plus ``margin_mm`` on every side, per axis ``(lo, hi)``; it may reach
    beyond the image (negative ``lo``, ``hi`` past the end): that part is filled with air."""
    box = []
    for axis, s in enumerate(spacing):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        pad = math.ceil(margin_mm / s)
        box.append((int(hit[0]) - pad, int(hit[-1]) + 1 + pad))
    return tuple(box)


def _overlap(box: Sequence[tuple[int, int]], shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """(slices of the image, slices of the box's canvas) where the two overlap."""
    img = tuple(slice(max(lo, 0), min(hi, n)) for (lo, hi), n in zip(box, shape, strict=True))
    can = tuple(slice(i.start - lo, i.stop - lo) for i, (lo, _hi) in zip(img, box, strict=True))
    return img, can


@dataclass
class _Canvas:
    """What the windows run on (:func:`_crop_to_body`), and where it lies on the model's grid."""

    image: np.ndarray  # the preprocessed image on the body's box (or the whole grid when no body)
    signature_mask: np.ndarray | None  # the body on the canvas (None: every voxel)
    box: tuple[tuple[int, int], ...]  # (lo, hi) per axis of the model's grid
    grid_slices: tuple[slice, ...]  # where the canvas overlaps the grid: on the grid ...
    canvas_slices: tuple[slice, ...]  # ... and on the canvas
    body_voxels: int


def _to_model_grid(vol: np.ndarray, sp: Spacing, target: Spacing | None, antialias: bool) -> tuple[Grid, np.ndarray]:
    """The model's grid and the image on it: resampled onto ``target`` spacing, or the source as it is."""
    if target is None:
        return Grid(tuple(int(n) for n in vol.shape), sp), vol  # type: ignore[arg-type]
    grid = model_grid(vol.shape, sp, target)
    return grid, to_grid(vol, sp, grid, antialias=antialias)


def _crop_to_body(x: np.ndarray, modality: str, grid: Grid, margin_mm: float) -> _Canvas:
    """The preprocessed image ``x`` on the body's box plus ``margin_mm`` (air where the box leaves the image),
    with the body as the signature mask; the whole image and no mask when no body is found."""
    body = body_mask(x, modality)
    body_voxels = int(body.sum())
    if not body_voxels:
        box = tuple((0, n) for n in grid.shape)
        img_sl, can_sl = _overlap(box, grid.shape)
        return _Canvas(x, None, box, img_sl, can_sl, 0)
    box = _body_box(body, grid.spacing, margin_mm)
    img_sl, can_sl = _overlap(box, grid.shape)
    canvas = np.zeros(tuple(hi - lo for lo, hi in box), np.float32)  # 0: air, once preprocessed
    canvas[can_sl] = x[img_sl]
    sig_mask = np.zeros(canvas.shape, bool)
    sig_mask[can_sl] = body[img_sl]
    return _Canvas(canvas, sig_mask, box, img_sl, can_sl, body_voxels)


def _to_source_grid(probabilities: np.ndarray, canvas: _Canvas, grid: Grid, resampled: bool,
                    shape: tuple[int, ...], sp: Spacing, out_dtype: type[np.floating] | np.dtype) -> np.ndarray:
    """The canvas' ``probabilities`` on the whole model grid (background outside the box), then back on the
    source grid (``shape``, ``sp``) when the model's grid was resampled."""
    k = probabilities.shape[0]
    on_grid = np.zeros((k, *grid.shape), dtype=np.float32 if resampled else out_dtype)
    on_grid[0] = 1.0  # outside the body's box: background
    on_grid[(slice(None), *canvas.grid_slices)] = probabilities[(slice(None), *canvas.canvas_slices)]
    if not resampled:
        return on_grid
    probs = np.empty((k, *shape), dtype=out_dtype)
    for c in range(1, k):
        from_grid(on_grid[c], grid, shape, sp, out=probs[c])
    np.subtract(1.0, probs[1:].sum(axis=0) if k > 2 else probs[1], out=probs[0])
    return probs


def release_freed_memory() -> None:
    """Hand the memory the network's forward pass freed back to the operating system (glibc
    ``malloc_trim``; nothing elsewhere).

    Measured with the shipped weights on the 72x56x72 window of a 300x512x512 CT: the forward pass
    peaks 186 MB above its start and, once its activations are freed, 120 MB of them stay resident in
    glibc's heap (fragmented, under its trim threshold), so the label map and foreground allocated next
    (235 MB) came on top of them; ``malloc_trim(0)`` returns 110 MB of the 120 in about a millisecond.
    (A fixed ``MALLOC_MMAP_THRESHOLD_=65536`` keeps them from staying too, but slowed the forward pass
    from 0.6 s to 1.3 s.)
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # the process' own symbols; glibc only (musl: none)
    if trim is not None:
        trim(0)


@dataclass
class PreparedStudy:
    """One study up to the windows (steps 1-3 of the module doc): the preprocessed image on the body's
    canvas of the model's grid, what every pass over it (the production windows, and the baselines of
    :mod:`model.baselines`) reads."""

    grid: Grid
    canvas: _Canvas
    resampled: bool
    spacing: Spacing  # the source's
    shape: tuple[int, int, int]  # the source's
    timings: dict[str, float]

    @property
    def image(self) -> np.ndarray:
        """The preprocessed canvas the windows run on."""
        return self.canvas.image

    @property
    def signature_mask(self) -> np.ndarray | None:
        """The body on the canvas (``None``: every voxel)."""
        return self.canvas.signature_mask


@dataclass
class _OnGrid(PreparedStudy):
    """One study up to the windows' output: probabilities on the body's canvas of the model's grid."""

    result: InferenceResult


def prepare_study(image: np.ndarray, spacing: Sequence[float], modality: str,
                  settings: InferenceSettings) -> PreparedStudy:
    """Steps 1-3 of the module doc: the model's grid, intensities and the body crop. Raises as
    :func:`segment_volume` does for a bad image or spacing."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    vol = np.asarray(image)
    if vol.ndim != 3:
        raise ValueError(f"image must be (z, y, x), got shape {vol.shape}")
    sp = validate_spacing(spacing)
    target = settings.spacing_for(modality)
    resampled = target is not None
    grid, small = _to_model_grid(vol, sp, target, settings.antialias)
    timings["resample"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    x = preprocess(small, modality)
    del small
    canvas = _crop_to_body(x, modality, grid, settings.crop_margin_mm)
    del x
    release_freed_memory()  # the resampling's full-resolution block means (120 MB on a 300x512x512 CT)
    timings["preprocess"] = time.perf_counter() - t0
    return PreparedStudy(grid, canvas, resampled, sp, tuple(int(n) for n in vol.shape), timings)  # type: ignore[arg-type]


def _run_on_grid(net: nn.Module, image: np.ndarray, spacing: Sequence[float], modality: str,
                 settings: InferenceSettings, device: str | torch.device | None,
                 grid_dtype: type[np.floating] | np.dtype) -> _OnGrid:
    """Steps 1-4 of the module doc: :func:`prepare_study`, then the windows and the signature.
    :func:`segment_volume` and :func:`segment_labels` share it, so their signatures are the same."""
    prep = prepare_study(image, spacing, modality, settings)
    t0 = time.perf_counter()
    res = sliding_window(net, prep.image, block=settings.block, overlap=settings.overlap,
                         batch_size=settings.batch_size, device=device, amp=settings.precision == "bfloat16",
                         out_dtype=grid_dtype, **settings.signature_arguments(prep.signature_mask))
    release_freed_memory()
    prep.timings["infer"] = time.perf_counter() - t0
    return _OnGrid(prep.grid, prep.canvas, prep.resampled, prep.spacing, prep.shape, prep.timings, res)


def study_windows(image: np.ndarray, spacing: Sequence[float], modality: str, settings: InferenceSettings,
                  divisor: int = 1) -> tuple[tuple[int, int, int], int]:
    """The canvas the windows run over (:func:`prepare_study`: the model's grid, the body crop) and
    the number of windows :func:`segment_volume` runs on it, without running a model. ``divisor``: the
    network's (:attr:`model.unet.SegNet.divisor`).

    >>> s = InferenceSettings(block=96, overlap=24, spacing=(("MR", (3.0, 1.7, 1.7)),))
    >>> body = np.zeros((40, 200, 100), np.float32); body[5:35, 10:190, 10:90] = 300.0
    >>> study_windows(body, (3.0, 1.7, 1.7), "MR", s, divisor=8)
    ((38, 196, 96), 3)
    """
    z, y, x = (int(n) for n in prepare_study(image, spacing, modality, settings).image.shape[-3:])
    return (z, y, x), len(plan_windows((z, y, x), settings.block, settings.overlap, divisor))


def segment_volume(net: nn.Module, image: np.ndarray, spacing: Sequence[float], modality: str,
                   settings: InferenceSettings, *, device: str | torch.device | None = None,
                   out_dtype: type[np.floating] | np.dtype = np.float16) -> StudyInference:
    """Probabilities on the source grid and the content signature of one volume (see the module doc).

    ``image``: (z, y, x) in native units (HU for CT). ``spacing``: (z, y, x) mm. Raises
    :class:`model.resample.GridError` (``reason_code`` ``bad_spacing``) for a spacing that cannot be used.
    Every class at full resolution: for evaluation (DSC, calibration) and the bank fit; the worker runs
    :func:`segment_labels`, which keeps only the label map and the foreground.
    """
    run = _run_on_grid(net, image, spacing, modality, settings, device,
                       np.float32 if settings.spacing_for(modality) is not None else out_dtype)
    t0 = time.perf_counter()
    probs = _to_source_grid(run.result.probabilities, run.canvas, run.grid, run.resampled, run.shape, run.spacing,
                            out_dtype)
    run.timings["restore"] = time.perf_counter() - t0
    res, canvas, grid = run.result, run.canvas, run.grid
    return StudyInference(
        probabilities=probs, signature=res.signature, n_signature_voxels=res.n_signature_voxels,
        body_voxels=canvas.body_voxels, model_shape=grid.shape, model_spacing=grid.spacing,
        crop=tuple((int(lo), int(hi)) for lo, hi in canvas.box), n_windows=res.n_windows,
        resampled=run.resampled, timings=run.timings)


@dataclass
class StudyLabels(_GridEvidence):
    """What :func:`segment_labels` returns: the label map and the foreground on the source grid, the
    per-class probabilities left on the model's grid.

    ``labels``: (z, y, x) ``uint8`` (``uint16`` past 256 classes), the class index (0 background).
    ``foreground``: (z, y, x) float16, 1 - P(background).
    """

    labels: np.ndarray
    foreground: np.ndarray
    signature: np.ndarray
    gram: np.ndarray
    n_signature_voxels: int
    body_voxels: int
    model_shape: tuple[int, int, int]
    model_spacing: tuple[float, float, float]
    crop: tuple[tuple[int, int], ...]
    n_windows: int
    resampled: bool
    n_classes: int
    timings: dict[str, float] = field(default_factory=dict)



def segment_labels(net: nn.Module, image: np.ndarray, spacing: Sequence[float], modality: str,
                   settings: InferenceSettings, *, device: str | torch.device | None = None) -> StudyLabels:
    """The worker's path: as :func:`segment_volume` (the same grid, crop, windows and signature), but
    only the label map and one float16 foreground map come back to the source grid
    (:func:`labels_on_source`); the per-class probabilities stay on the model's grid.
    """
    run = _run_on_grid(net, image, spacing, modality, settings, device, np.float32)
    t0 = time.perf_counter()
    labels, fg = labels_on_source(run.result.probabilities, run.canvas.box, run.grid, run.shape, run.spacing,
                                  resampled=run.resampled)
    release_freed_memory()
    run.timings["restore"] = time.perf_counter() - t0
    res, canvas, grid = run.result, run.canvas, run.grid
    return StudyLabels(
        labels=labels, foreground=fg, signature=res.signature, gram=res.gram,
        n_signature_voxels=res.n_signature_voxels, body_voxels=canvas.body_voxels, model_shape=grid.shape,
        model_spacing=grid.spacing, crop=tuple((int(lo), int(hi)) for lo, hi in canvas.box),
        n_windows=res.n_windows, resampled=run.resampled, n_classes=int(res.probabilities.shape[0]),
        timings=run.timings)


def _label_dtype(k: int) -> type[np.unsignedinteger]:
    if k > 65536:
        raise ValueError(f"{k} classes do not fit a uint16 label map")
    return np.uint8 if k <= 256 else np.uint16


def _grid_slices(probs: np.ndarray, box: Sequence[tuple[int, int]], grid_shape: Sequence[int],
                 g: int) -> torch.Tensor:
    """Every class on grid slice ``g`` of the whole model grid, (K, h, w) float64: the canvas' values where
    the body's box lies, background (P = 1 for class 0, 0 for the others) elsewhere."""
    k = probs.shape[0]
    out = torch.zeros((k, *grid_shape[1:]), dtype=torch.float64)
    out[0] = 1.0
    if box[0][0] <= g < box[0][1]:
        img_sl, can_sl = _overlap(box[1:], grid_shape[1:])
        part = probs[:, g - box[0][0]][(slice(None), *can_sl)]
        out[(slice(None), *img_sl)] = torch.from_numpy(np.ascontiguousarray(part, np.float64))
    return out


def labels_on_source(probs: np.ndarray, box: Sequence[tuple[int, int]], grid: Grid, shape: Sequence[int],
                     spacing: Sequence[float], *, resampled: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, foreground)`` on the source grid from the class probabilities ``probs`` (K, canvas)
    of the body's ``box`` on the model's ``grid`` (background outside it).

    The decision rule is the argmax of the linearly interpolated class probabilities (ties to the lower
    class), computed slab by slab along z (:class:`model.resample.SourceSlabs`: the source slices between
    two grid slices) with a running maximum over the classes, so only one slab of one class is ever held
    in float32 at full resolution. An interpolated value never exceeds its grid neighbours', so a class
    can only win where some neighbour's probability reaches the smallest running maximum of the slab:
    each class is interpolated only over the (y, x) bounding box of those grid points
    (:meth:`model.resample.SourceSlabs.window`), and classes are visited by decreasing maximum, so an
    organ costs its own extent and an organ absent from the slab nothing.

    The interpolation runs in float64 and is rounded to float32: bit for bit what SimpleITK's resampler
    (:func:`model.resample.from_grid`, the path before) gave, measured on every voxel of a 300x512x512 CT
    from a smooth random field (in float32 the blends differed by an ulp on 25 % of the voxels and 2352
    float16 values moved). Two classes: the foreground is P(class 1) so interpolated and rounded to float16
    (1 - P(background) in exact arithmetic) and the label is ``foreground >= 0.5``: the worker's rule
    before, the same mask. More: the foreground is 1 - P(background) (float16) and the label the argmax
    of the float32 values.

    The slab work runs on one torch thread: its operations are a few megabytes each, memory-bound, and
    thousands of them; on the shared 2-core machine the 105-class bench restored in 2.4 s on one thread
    and 67.5 s on two (each operation waited for the second thread), two classes in 0.6-0.7 s and 3.6 s.
    """
    k = int(probs.shape[0])
    dtype = _label_dtype(k)
    shape = tuple(int(n) for n in shape)
    labels = np.zeros(shape, dtype)
    fg = np.zeros(shape, np.float16)
    if not resampled:  # the model's grid is the source grid
        img_sl, can_sl = _overlap(box, shape)
        part = probs[(slice(None), *can_sl)]
        if k == 2:
            fg[img_sl] = part[1]
            np.greater_equal(fg, np.float16(0.5), out=labels.view(np.bool_))
        else:
            fg[img_sl] = 1.0 - part[0]
            labels[img_sl] = np.argmax(part, axis=0)
        return labels, fg
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the docstring: restored below
    try:
        _labels_by_slab(probs, box, grid, shape, spacing, labels, fg)
    finally:
        torch.set_num_threads(threads)
    return labels, fg


def _labels_by_slab(probs: np.ndarray, box: Sequence[tuple[int, int]], grid: Grid, shape: tuple[int, ...],
                    spacing: Sequence[float], labels: np.ndarray, fg: np.ndarray) -> None:
    """:func:`labels_on_source` on a resampled grid, written into ``labels`` and ``fg``."""
    k, dtype = int(probs.shape[0]), labels.dtype
    src = SourceSlabs(grid, shape, spacing)
    fg_t = torch.from_numpy(fg)
    lab_t = torch.from_numpy(labels.view(np.bool_))
    planes: dict[int, torch.Tensor] = {}
    for z0, z1, ga, gb in src.slabs():
        grid_a = _grid_slices(probs, box, grid.shape, ga)
        grid_b = grid_a if gb == ga else _grid_slices(probs, box, grid.shape, gb)
        if k == 2:  # one class: each grid slice brought to the source's plane once
            planes = {g: planes[g] if g in planes else src.plane(s[1]) for g, s in ((ga, grid_a), (gb, grid_b))}
            fg_t[z0:z1] = src.blend(planes[ga], planes[gb], z0, z1).float()  # float32 first, as before
            torch.ge(fg_t[z0:z1], 0.5, out=lab_t[z0:z1])
            continue
        p0 = src.blend(src.plane(grid_a[0]), src.plane(grid_b[0]), z0, z1).float()
        fg_t[z0:z1] = 1.0 - p0
        best = torch.full_like(p0, -1.0)
        lab = torch.zeros(p0.shape, dtype=torch.int64)
        top = torch.maximum(grid_a, grid_b).numpy()  # (K, h, w): no interpolated value exceeds its corners'
        for c in np.argsort(-top.max(axis=(1, 2)), kind="stable").tolist():
            floor = float(best.min()) / (1 + 1e-6)  # a float lerp may pass its corners by an ulp
            win = src.window(top[c] >= floor)
            if win is None:
                break  # this class and every later one (smaller maxima) lose everywhere in the slab
            ys, xs = win
            v = p0[:, ys, xs] if c == 0 else src.blend(src.plane(grid_a[c], ys, xs), src.plane(grid_b[c], ys, xs),
                                                       z0, z1).float()
            b, lb = best[:, ys, xs], lab[:, ys, xs]
            take = (v > b) | ((v == b) & (lb > c))
            b.copy_(torch.where(take, v, b))
            lb.masked_fill_(take, c)
        labels[z0:z1] = lab.numpy().astype(dtype)
