"""A job's kept result files, read and written in one place: the probability file the review app draws
(``probability.npz``: the foreground probability, the mask, a multi-label result's label map and legend)
and the gate's evidence (``evidence.json``). The file names and keys are :mod:`store.layout`'s.

The worker writes (``worker.objects.save_probability`` publishes :func:`write_probability`'s bytes
atomically, and :func:`load_mask` reads the mask back for an approval's re-encoding); the review app reads
(:func:`read_probability`, :func:`read_evidence`). Neither knows the format but through this module.

    >>> import tempfile
    >>> f = Path(tempfile.mkdtemp()) / "probability.npz"
    >>> mask = np.zeros((2, 3, 4), bool); mask[1, 1, 1:3] = True
    >>> with open(f, "wb") as fh:
    ...     write_probability(fh, mask.astype(np.float32), mask)
    >>> m = read_probability(f)
    >>> m.shape, int(m.mask.sum()), int(m.prob_u8.max()), bool((load_mask(f) == mask).all())
    ((2, 3, 4), 2, 255, True)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = ["MASK_RGB", "LabelInfo", "ProbabilityMap", "ResultFileError", "fallback_rgb", "load_mask",
           "read_evidence", "read_probability", "write_probability"]

MASK_RGB = (255, 59, 48)
"""The mask's colour (the worker's static preview draws its outline in the same red)."""


class ResultFileError(ValueError):
    """A kept file is not what its name says, or its parts do not agree with each other (shapes)."""


def read_evidence(path: str | PathLike[str]) -> dict[str, Any]:
    """The gate's evidence as the worker wrote it (a JSON object)."""
    value = json.loads(Path(path).read_text())
    if not isinstance(value, dict):
        raise ResultFileError(f"{Path(path).name}: the evidence is not a JSON object")
    return value


@dataclass(frozen=True)
class LabelInfo:
    """One label of a multi-label result: its value in the label map, name, RGB colour, and (in
    :attr:`StudyImages.legend`) its voxels, volume in mL on the series' grid and the slice where it is
    largest."""

    value: int
    name: str
    rgb: tuple[int, int, int]
    voxels: int = 0
    volume_ml: float = 0.0
    largest_slice: int = 0

    @property
    def hex(self) -> str:
        return "#{:02x}{:02x}{:02x}".format(*self.rgb)


def fallback_rgb(value: int) -> tuple[int, int, int]:
    """The colour of label ``value`` when the file names none: hues a golden angle apart. (The worker
    writes the SEG's own colours as ``label_colors``; this is only for a file without them.)

    >>> fallback_rgb(1)
    (255, 59, 48)
    """
    import colorsys

    if value == 1:
        return MASK_RGB
    r, g, b = colorsys.hsv_to_rgb((0.011 + (value - 1) * 0.381966) % 1.0, 0.81, 1.0)
    return (round(r * 255), round(g * 255), round(b * 255))


@dataclass(frozen=True, eq=False)
class ProbabilityMap:
    """A job's kept foreground probability (``prob_u8 * scale``) and the mask drawn from it, (z, y, x);
    for a multi-label result also its label map (``labels``, 0 background) and the labels shown
    (``legend``: value, name, colour; voxel counts are :class:`StudyImages`')."""

    prob_u8: np.ndarray
    scale: float
    mask: np.ndarray
    labels: np.ndarray | None = None
    legend: tuple[LabelInfo, ...] = ()

    def __post_init__(self) -> None:
        if self.prob_u8.dtype != np.uint8 or self.prob_u8.ndim != 3:
            raise ResultFileError(f"the probability map must be 3D uint8, got {self.prob_u8.ndim}D "
                                   f"{self.prob_u8.dtype}")
        if self.mask.dtype != np.bool_ or self.mask.shape != self.prob_u8.shape:
            raise ResultFileError(f"the mask ({self.mask.dtype} {tuple(self.mask.shape)}) does not match the "
                                   f"probability map {tuple(self.prob_u8.shape)}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ResultFileError(f"the probability scale must be finite and > 0, got {self.scale!r}")
        if self.labels is not None:
            if self.labels.dtype not in (np.uint8, np.uint16) or self.labels.shape != self.prob_u8.shape:
                raise ResultFileError(f"the label map ({self.labels.dtype} {tuple(self.labels.shape)}) must be "
                                       f"uint8 or uint16 of the probability map's shape {tuple(self.prob_u8.shape)}")
            if not self.legend:
                raise ResultFileError("a label map needs its legend (the labels' values, names and colours)")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.prob_u8.shape)  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return int(self.prob_u8.nbytes + self.mask.nbytes + (0 if self.labels is None else self.labels.nbytes))


_LABEL_KEYS = ("labels", "label_values", "label_names", "label_colors")


def _legend(name: str, labels: np.ndarray, values: np.ndarray | None, names: np.ndarray | None,
            colors: np.ndarray | None) -> tuple[LabelInfo, ...]:
    """The labels a file lists (or, listing none, the values its label map holds), with names and colours."""
    if values is None:
        values = np.unique(labels)
        values = values[values > 0]
    values = np.asarray(values).ravel()
    n = values.size
    if values.dtype.kind not in "iu" or (n and (values.min() < 1 or len(set(values.tolist())) != n)):
        raise ResultFileError(f"{name}: label_values must be distinct integers >= 1, got {values.tolist()}")
    if names is not None and (names.dtype.kind != "U" or names.shape != (n,)):
        raise ResultFileError(f"{name}: label_names must be {n} strings, got {names.dtype} {names.shape}")
    if colors is not None and (colors.dtype != np.uint8 or colors.shape != (n, 3)):
        raise ResultFileError(f"{name}: label_colors must be ({n}, 3) uint8 RGB, got {colors.dtype} {colors.shape}")
    return tuple(LabelInfo(value=int(v), name=str(names[i]) if names is not None else f"label {int(v)}",
                           rgb=(tuple(int(c) for c in colors[i]) if colors is not None  # type: ignore[arg-type]
                                else fallback_rgb(int(v))))
                 for i, v in enumerate(values))


def read_probability(path: str | PathLike[str]) -> ProbabilityMap:
    """Read ``prob.npz`` as the worker writes it: ``prob_fg_u8`` (uint8, z y x), ``scale`` (float32,
    1/255), ``mask_bits`` (the mask bit-packed over the flattened array) and ``shape`` (int64, 3).

    A multi-label result adds (``worker.segments.review_arrays``):

    - ``labels``: (z, y, x) ``uint8`` or ``uint16``, 0 background, only the labels sent;
    - ``label_values``: (n,) integers, the labels to list, in the SEG's segment order;
    - ``label_names``: (n,) unicode, their names; ``label_colors``: (n, 3) ``uint8``, their RGB colours.

    With ``labels``, ``mask_bits`` may be left out (the mask is then ``labels > 0``), and each of the other
    three may be: the values are then those the map holds, the names "label V", the colours
    :func:`fallback_rgb`'s.

    Raises :class:`ResultFileError` naming the file and the disagreeing values when the arrays do not
    fit together; a missing file raises FileNotFoundError as usual. Pickles are refused.
    """
    p = Path(path)
    with np.load(p, allow_pickle=False) as npz:
        has_labels = "labels" in npz.files
        needed = {"prob_fg_u8", "scale", "shape"} | (set() if has_labels else {"mask_bits"})
        missing = sorted(needed - set(npz.files))
        if missing:
            raise ResultFileError(f"{p.name}: not a probability map, missing {', '.join(missing)}")
        shape = tuple(int(n) for n in np.asarray(npz["shape"]).ravel())
        prob = np.asarray(npz["prob_fg_u8"])
        scale = float(np.asarray(npz["scale"]))
        bits = np.asarray(npz["mask_bits"]) if "mask_bits" in npz.files else None
        extra = {k: np.asarray(npz[k]) for k in _LABEL_KEYS if k in npz.files}
    if len(shape) != 3 or min(shape) < 1:
        raise ResultFileError(f"{p.name}: shape {shape} is not a 3D (z, y, x) shape")
    if tuple(prob.shape) != shape:
        raise ResultFileError(f"{p.name}: prob_fg_u8 has shape {tuple(prob.shape)}, the file says {shape}")
    labels = extra.get("labels")
    if labels is not None and tuple(labels.shape) != shape:
        raise ResultFileError(f"{p.name}: labels has shape {tuple(labels.shape)}, the file says {shape}")
    n = int(np.prod(shape))
    if bits is None:
        assert labels is not None
        mask = labels > 0
    else:
        if bits.dtype != np.uint8 or bits.size != (n + 7) // 8:
            raise ResultFileError(f"{p.name}: mask_bits holds {bits.size} {bits.dtype} bytes, a mask of {shape} "
                                   f"needs {(n + 7) // 8}")
        mask = np.unpackbits(bits, count=n).view(np.bool_).reshape(shape)  # 0/1 bytes: a valid bool view
    if labels is None:
        return ProbabilityMap(prob_u8=prob, scale=scale, mask=mask)
    legend = _legend(p.name, labels, extra.get("label_values"), extra.get("label_names"), extra.get("label_colors"))
    return ProbabilityMap(prob_u8=prob, scale=scale, mask=mask, labels=labels, legend=legend)


def write_probability(fh: BinaryIO, prob_fg: np.ndarray, mask: np.ndarray,
                      extra: Mapping[str, np.ndarray] | None = None) -> None:
    """The foreground probability (uint8 quantisation: 1/255 steps keep a 512x512x300 map near 80 MB
    uncompressed), the mask drawn from it (bit-packed), and ``extra`` arrays (a multi-label result's label
    map and legend, read by ``review.render.read_probability``), as an ``.npz`` that ``numpy.load`` reads, into the open binary file ``fh``
    (the worker publishes it atomically: ``worker.objects.save_probability``).

    Quantised slab by slab in float32, in place, and streamed into the file (``np.round`` on the float16 map
    took 1.5-2 s on a 300x512x512 CT, and the whole uint8 map is 78 MB more at the worker's peak); zipped at
    deflate level 1, not ``savez_compressed``'s 6: on that CT's map (mostly zeros outside the body) 1.0 s
    instead of 2.7-3.1 s, for 0.54 MB instead of 0.32 MB. ``numpy.load`` reads it as any ``.npz``.
    """
    import zipfile

    fg = np.asarray(prob_fg)
    bits = np.asarray(mask, dtype=bool).reshape(-1)
    arrays = {"scale": np.float32(1 / 255), "mask_bits": bits, "shape": np.asarray(mask.shape, dtype=np.int64),
              **(extra or {})}

    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open("prob_fg_u8.npy", "w", force_zip64=True) as f:  # slab by slab: no full uint8 copy
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                     "fortran_order": False, "shape": fg.shape})
            for z0 in range(0, fg.shape[0], 4):  # in place: one float32 slab of 4 slices (4 MB)
                slab = fg[z0:z0 + 4].astype(np.float32)
                np.clip(slab, 0, 1, out=slab)
                slab *= 255
                f.write(np.rint(slab, out=slab).astype(np.uint8).tobytes())
        for name, a in arrays.items():
            with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                if name == "mask_bits":  # packed a slab at a time: not a 10 MB array and its 10 MB of bytes
                    np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                             "shape": (-(-bits.size // 8),)})
                    for i in range(0, bits.size, 8 * 2**20):  # whole bytes: np.packbits of the whole mask
                        f.write(np.packbits(bits[i:i + 8 * 2**20]).tobytes())
                    continue
                np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=False)


def load_mask(path: str | PathLike[str]) -> np.ndarray:
    """The mask of a probability file (an approval re-encodes exactly the mask the model drew)."""
    with np.load(path) as npz:
        shape = tuple(int(n) for n in npz["shape"])
        bits = np.unpackbits(npz["mask_bits"], count=int(np.prod(shape)))
    return bits.reshape(shape).astype(bool)
