"""A picture for the reviewer: the slice with most foreground, the mask's outline and the probability map."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from worker.atomic import atomic_write

__all__ = ["write_preview"]


def write_preview(path: Path, image: np.ndarray, prob_fg: np.ndarray, mask: np.ndarray, *, modality: str,
                  title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # slice by slice: count_nonzero along an axis first makes a boolean copy of the whole mask (78 MB)
    counts = np.array([np.count_nonzero(m) for m in mask])
    z = int(np.argmax(counts)) if counts.max() > 0 else mask.shape[0] // 2
    sl = image[z].astype(np.float32)
    if modality.upper() == "CT":
        lo, hi = -160.0, 240.0
    else:
        lo, hi = (float(v) for v in np.percentile(sl, [1, 99]))
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.6), dpi=100)
    for ax in axes:
        ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi)
        ax.set_axis_off()
    if mask[z].any():
        axes[0].contour(mask[z].astype(float), levels=[0.5], colors=["#ff3b30"], linewidths=1.2)
    heat = axes[1].imshow(np.ma.masked_less(prob_fg[z].astype(np.float32), 0.05), cmap="inferno", vmin=0, vmax=1,
                          alpha=0.7)
    axes[0].set_title(f"segmentation, slice {z + 1}/{mask.shape[0]}", fontsize=9)
    axes[1].set_title("foreground probability", fontsize=9)
    fig.colorbar(heat, ax=axes[1], fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
    finally:
        plt.close(fig)
