"""Calibration inside a band around the ground-truth surface (paper section III-E, Eqs. 3-4).

Confidence is the probability of the predicted class and accuracy is ``prediction == label`` (Guo et al.
2017, the paper's [6]); the prediction is foreground where ``prob_fg >= 0.5``. Only voxels inside the
boundary band count: the ground-truth *surface* (foreground voxels with a 6-connected background
neighbour; voxels outside the image are not background) dilated ``band`` times with the 6-connected
structuring element, inwards and outwards. Confidences are binned into ``bins`` equal intervals of
[0, 1] (the last one closed); for two classes only the upper half of the bins can be occupied.

>>> import numpy as np
>>> label = np.zeros((5, 5, 5), bool); label[1:4, 1:4, 1:4] = True
>>> ece, mce = ece_mce(np.where(label, 0.9, 0.2), label, band=1, bins=10)
>>> round(ece, 6), round(mce, 6)
(0.166667, 0.2)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from model._atomic import atomic_write

__all__ = ["CalibrationBins", "boundary_band", "calibration_bins", "draw_reliability", "ece_mce", "reliability_diagram",
           "surface"]

_SIX = ndimage.generate_binary_structure(3, 1)


def surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a 6-connected background neighbour (outside the image is not background)."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 3:
        raise ValueError(f"mask must be 3-D, got shape {m.shape}")
    return m & ~ndimage.binary_erosion(m, structure=_SIX, border_value=1)


def boundary_band(label: np.ndarray, band: int = 10) -> np.ndarray:
    """The surface of ``label`` dilated ``band`` times (6-connected), in and out."""
    if band < 0:
        raise ValueError(f"band must be >= 0, got {band}")
    s = surface(label)
    if band == 0 or not s.any():
        return s
    return ndimage.binary_dilation(s, structure=_SIX, iterations=band)


@dataclass(frozen=True)
class CalibrationBins:
    """Per-bin counts, mean accuracy and mean confidence (NaN for empty bins)."""

    edges: np.ndarray
    counts: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray

    @property
    def ece(self) -> float:
        n = self.counts.sum()
        if n == 0:
            return float("nan")
        occ = self.counts > 0
        gap = np.abs(self.accuracy[occ] - self.confidence[occ])
        return float(np.sum(self.counts[occ] / n * gap))

    @property
    def mce(self) -> float:
        occ = self.counts > 0
        if not occ.any():
            return float("nan")
        return float(np.max(np.abs(self.accuracy[occ] - self.confidence[occ])))


def calibration_bins(prob_fg: np.ndarray, label: np.ndarray, band: int | None = 10, bins: int = 10) -> CalibrationBins:
    """Bin the band's voxels by confidence. ``band=None`` counts every voxel."""
    p = np.asarray(prob_fg, dtype=np.float64)
    y = np.asarray(label, dtype=bool)
    if p.shape != y.shape:
        raise ValueError(f"prob_fg shape {p.shape} != label shape {y.shape}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if band is not None:
        sel = boundary_band(y, band)
        p, y = p[sel], y[sel]
    else:
        p, y = p.ravel(), y.ravel()
    pred = p >= 0.5
    conf = np.where(pred, p, 1.0 - p)
    correct = (pred == y).astype(np.float64)
    idx = np.minimum((conf * bins).astype(np.int64), bins - 1)
    counts = np.bincount(idx, minlength=bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(idx, weights=correct, minlength=bins) / counts
        cnf = np.bincount(idx, weights=conf, minlength=bins) / counts
    return CalibrationBins(np.linspace(0.0, 1.0, bins + 1), counts, acc, cnf)


def ece_mce(prob_fg: np.ndarray, label: np.ndarray, band: int = 10, bins: int = 10) -> tuple[float, float]:
    """``(ECE, MCE)`` inside the boundary band; ``(nan, nan)`` when the label has no foreground."""
    b = calibration_bins(prob_fg, label, band=band, bins=bins)
    return b.ece, b.mce


def draw_reliability(ax: Any, centers: np.ndarray, accuracy: np.ndarray, confidence: np.ndarray,
                     counts: np.ndarray, gap_label: str = "gap") -> None:
    """Bars of accuracy per confidence bin with the gap to the bin's confidence, on a matplotlib axis
    (the occupied bins only), and the diagonal of perfect calibration."""
    width = 1.0 / len(centers)
    occ = np.asarray(counts) > 0
    ax.bar(centers[occ], accuracy[occ], width=width, edgecolor="black", color="#4c72b0", label="accuracy")
    ax.bar(centers[occ], (confidence - accuracy)[occ], bottom=accuracy[occ], width=width, color="#dd8452",
           alpha=0.6, edgecolor="#dd8452", label=gap_label)
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")


def reliability_diagram(
    prob_fg: np.ndarray | list[np.ndarray],
    label: np.ndarray | list[np.ndarray],
    path: str | os.PathLike[str],
    band: int = 10,
    bins: int = 10,
    title: str = "",
) -> CalibrationBins:
    """Write a reliability diagram (accuracy vs confidence per bin, with the gap) as PNG.

    Lists of volumes are pooled (all their band voxels together). Returns the pooled bins.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    probs = prob_fg if isinstance(prob_fg, list) else [prob_fg]
    labels = label if isinstance(label, list) else [label]
    if len(probs) != len(labels):
        raise ValueError(f"{len(probs)} probability maps but {len(labels)} labels")
    parts = [calibration_bins(p, y, band, bins) for p, y in zip(probs, labels, strict=True)]
    counts = np.sum([b.counts for b in parts], axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.nansum([np.nan_to_num(b.accuracy) * b.counts for b in parts], axis=0) / counts
        cnf = np.nansum([np.nan_to_num(b.confidence) * b.counts for b in parts], axis=0) / counts
    pooled = CalibrationBins(parts[0].edges, counts, acc, cnf)

    fig = Figure(figsize=(4.5, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    draw_reliability(ax, (pooled.edges[:-1] + pooled.edges[1:]) / 2, acc, cnf, counts, "gap")
    ax.set_title(f"{title}  ECE={pooled.ece:.3f} MCE={pooled.mce:.3f}".strip())
    ax.legend(loc="upper left")
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
    return pooled
