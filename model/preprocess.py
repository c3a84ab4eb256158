"""Intensity normalisation of the paper (section III-A), at native resolution.

- CT: Hounsfield units clipped to [-1000, 1000] and mapped linearly to [0, 1].
- anything else (MR, and modalities the model has never seen): divided by the standard deviation of the
  image's voxel intensities.

>>> import numpy as np
>>> preprocess(np.array([-2000.0, 0.0, 3000.0]), "CT").tolist()
[0.0, 0.5, 1.0]
"""

from __future__ import annotations

import numpy as np

__all__ = ["normalize_ct", "normalize_mr", "preprocess", "CT_WINDOW"]

CT_WINDOW = (-1000.0, 1000.0)


def normalize_ct(volume: np.ndarray) -> np.ndarray:
    """Hounsfield units -> [0, 1] (float32)."""
    lo, hi = CT_WINDOW
    out = np.array(volume, dtype=np.float32)  # always a new array; then work in place (large CTs)
    np.clip(out, lo, hi, out=out)
    out -= lo
    out /= hi - lo
    return out


def normalize_mr(volume: np.ndarray) -> np.ndarray:
    """Divide by the standard deviation of the image (float32). A constant image is returned as zeros."""
    v = np.asarray(volume, dtype=np.float32)
    std = float(np.std(v, dtype=np.float64))
    if not np.isfinite(std):
        raise ValueError("image contains non-finite intensities")
    if std == 0.0:
        return np.zeros_like(v)
    return v / np.float32(std)


def preprocess(volume: np.ndarray, modality: str) -> np.ndarray:
    """Normalise ``volume`` for the network according to its DICOM modality code ("CT", "MR", "PT", ...)."""
    if not isinstance(modality, str) or not modality:
        raise ValueError(f"modality must be a DICOM modality code such as 'CT' or 'MR', got {modality!r}")
    if modality.upper() == "CT":
        return normalize_ct(volume)
    return normalize_mr(volume)
