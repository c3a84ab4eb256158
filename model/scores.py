"""Segmentation and OOD-detection metrics (paper section III-E). Distances are in millimetres.

Surface distances follow the usual definitions (as in MedPy): the surface of a mask is its foreground
voxels with a 6-connected background neighbour, the image border counting as background; ``hd95`` is the
95th percentile of the distances from each surface to the other, pooled; ``assd`` is the mean of the two
directed average surface distances. Both are NaN when either mask is empty.

>>> import numpy as np
>>> a = np.zeros((8, 8, 8), bool); a[2:6, 2:6, 2:6] = True
>>> b = np.roll(a, 1, axis=0)
>>> dice(a, b), hd95(a, b, (2.0, 1.0, 1.0))
(0.75, 2.0)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["assd", "dice", "hd95", "ood_detection_metrics", "roc_auc", "surface_distances"]

_SIX = ndimage.generate_binary_structure(3, 1)


def dice(pred: np.ndarray, label: np.ndarray) -> float:
    """Dice similarity coefficient; 1.0 when both masks are empty."""
    a = np.asarray(pred, dtype=bool)
    b = np.asarray(label, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"pred shape {a.shape} != label shape {b.shape}")
    denom = int(a.sum()) + int(b.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / denom


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim or any(not s > 0 for s in sp):
        raise ValueError(f"spacing must be {ndim} positive numbers (mm), got {spacing!r}")
    return sp


def surface_distances(pred: np.ndarray, label: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from pred's surface to label's, and from label's surface to pred's."""
    a = np.asarray(pred, dtype=bool)
    b = np.asarray(label, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"pred shape {a.shape} != label shape {b.shape}")
    sp = _check_spacing(spacing, a.ndim)
    if not a.any() or not b.any():
        return np.array([]), np.array([])
    # crop to the bounding box of both masks (plus one voxel): exact, and much cheaper
    idx = np.argwhere(a | b)
    lo = np.maximum(idx.min(0) - 1, 0)
    hi = np.minimum(idx.max(0) + 2, a.shape)
    box = tuple(slice(int(s), int(e)) for s, e in zip(lo, hi, strict=True))
    a, b = a[box], b[box]
    sa = a & ~ndimage.binary_erosion(a, structure=_SIX, border_value=0)
    sb = b & ~ndimage.binary_erosion(b, structure=_SIX, border_value=0)
    dt_b = ndimage.distance_transform_edt(~sb, sampling=sp)
    dt_a = ndimage.distance_transform_edt(~sa, sampling=sp)
    return dt_b[sa], dt_a[sb]


def hd95(pred: np.ndarray, label: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (NaN if either mask is empty)."""
    d_ab, d_ba = surface_distances(pred, label, spacing)
    if d_ab.size == 0:
        return float("nan")
    return float(np.percentile(np.concatenate([d_ab, d_ba]), 95))


def assd(pred: np.ndarray, label: np.ndarray, spacing: Sequence[float]) -> float:
    """Average symmetric surface distance in mm (NaN if either mask is empty)."""
    d_ab, d_ba = surface_distances(pred, label, spacing)
    if d_ab.size == 0:
        return float("nan")
    return float((d_ab.mean() + d_ba.mean()) / 2.0)


def roc_auc(scores_in: Sequence[float] | np.ndarray, scores_out: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve for "OOD scores higher than in-distribution scores" (ties count 1/2).

    Equal to sweeping the threshold tau over all values (the Mann-Whitney U statistic).
    """
    s_in = np.asarray(scores_in, dtype=np.float64)
    s_out = np.asarray(scores_out, dtype=np.float64)
    if s_in.size == 0 or s_out.size == 0:
        raise ValueError("need at least one in-distribution and one OOD score")
    gt = (s_out[:, None] > s_in[None, :]).sum()
    eq = (s_out[:, None] == s_in[None, :]).sum()
    return float((gt + 0.5 * eq) / (s_in.size * s_out.size))


def ood_detection_metrics(scores_in: Sequence[float], scores_out: Sequence[float], tau: float) -> dict[str, float]:
    """Accuracy, sensitivity (OOD flagged), specificity (in-distribution passed) at ``tau``, and AUC."""
    s_in = np.asarray(scores_in, dtype=np.float64)
    s_out = np.asarray(scores_out, dtype=np.float64)
    tp = int((s_out > tau).sum())
    tn = int((s_in <= tau).sum())
    n = s_in.size + s_out.size
    return {
        "accuracy": (tp + tn) / n,
        "sensitivity": tp / s_out.size,
        "specificity": tn / s_in.size,
        "auc": roc_auc(s_in, s_out),
    }
