"""The streaming mean-Gram signature for any format's sliding window: which window owns which voxel.

Every format tiles the network's input grid with windows and combines the windows' outputs its own way
(SegNet: each voxel from one window; MONAI's ``SlidingWindowInferer`` and nnU-Net's predictor: a
weighted average, constant or Gaussian, and nnU-Net also averages mirrored passes). The *probabilities*
are always taken from the format's own combination. The *signature's* feature map is combined by one
rule for every format, so that it can be accumulated window by window without the full feature map:

1. **Mirrored passes** (test-time augmentation) of one window are flipped back and averaged, as the
   format averages their logits; the adapter does that before :meth:`WindowGram.add`.
2. **Overlapping windows**: each voxel's feature vector is taken from exactly one window, the one whose
   centre is nearest along every axis (ties to the earlier window). The windows of every format here
   are a Cartesian grid (their starts are the product of per-axis starts), so ownership is the product
   of per-axis partitions: along an axis, a window with start ``s`` owns from the midpoint between its
   centre and the previous window's centre to the midpoint with the next one. This is the window whose
   Gaussian weight is largest at the voxel (nnU-Net, MONAI ``mode="gaussian"``), the window in which the
   voxel is furthest from a cut receptive field.

The stitched feature map ``F`` (voxels x C) built by that rule has rows that are the disjoint union of
the windows' owned rows, so ``F^T F = sum_w F_w^T F_w`` exactly (up to the order of float64 additions):
:meth:`WindowGram.add` adds each window's owned part; :func:`stitch_features` builds the full map for
tests. The sum and the voxel count run over the voxels of ``mask`` (the body), as in
:mod:`model.infer`.

>>> import numpy as np
>>> g = WindowGram((10, 4, 4), [(slice(0, 6), slice(0, 4), slice(0, 4)), (slice(4, 10), slice(0, 4), slice(0, 4))])
>>> g.owned[0], g.owned[1]
((slice(0, 5, None), slice(0, 4, None), slice(0, 4, None)), (slice(5, 10, None), slice(0, 4, None), slice(0, 4, None)))
>>> for i, sl in enumerate(g.windows):
...     g.add(i, np.ones((2, 6, 4, 4), np.float32))
>>> g.n_voxels, g.gram.tolist()
(160, [[160.0, 160.0], [160.0, 160.0]])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from model.ood import signature_from_gram

__all__ = ["OWNERSHIP_RULE", "WindowGram", "owned_regions", "stitch_features"]

#: recorded in a bank's settings: a bank fitted under another rule is refused
OWNERSHIP_RULE = "nearest-centre-v1"

Slices = tuple[slice, slice, slice]


def _axis_owned(starts_sizes: Sequence[tuple[int, int]], n: int) -> dict[tuple[int, int], tuple[int, int]]:
    """Along one axis: for each distinct (start, size), the interval of voxels it owns (a partition of
    ``[0, n)``, clipped to the windows' union)."""
    uniq = sorted(set(starts_sizes), key=lambda t: (t[0] + t[1] / 2.0, t[0]))
    centres2 = [2 * s + z for s, z in uniq]  # twice the centre: integer arithmetic
    out = {}
    for i, (s, z) in enumerate(uniq):
        lo = s if i == 0 else max(s, -(-(centres2[i - 1] + centres2[i]) // 4))
        hi = s + z if i == len(uniq) - 1 else min(s + z, -(-(centres2[i] + centres2[i + 1]) // 4))
        out[(s, z)] = (max(lo, 0), min(hi, n))
    return out


def owned_regions(shape: Sequence[int], windows: Sequence[Slices]) -> list[Slices]:
    """For each window (slices into a volume of ``shape``), the slices of the voxels it owns.

    Raises ``ValueError`` when the windows are not a Cartesian grid or leave a voxel uncovered.
    """
    per_axis: list[dict[tuple[int, int], tuple[int, int]]] = []
    for ax, n in enumerate(shape):
        ss = [(int(w[ax].start or 0), int((w[ax].stop if w[ax].stop is not None else n) - (w[ax].start or 0)))
              for w in windows]
        per_axis.append(_axis_owned(ss, int(n)))
        covered = sorted(per_axis[-1].values())
        if covered[0][0] != 0 or covered[-1][1] != n or any(a[1] != b[0] for a, b in zip(covered, covered[1:], strict=False)):
            raise ValueError(f"windows do not cover axis {ax} (length {n}) without gaps: {covered}")
    keys = {tuple((int(w[ax].start or 0), int(w[ax].stop) - int(w[ax].start or 0)) for ax in range(3)) for w in windows}
    expected = 1
    for d in per_axis:
        expected *= len(d)
    if len(keys) != expected:
        raise ValueError(f"the windows are not a Cartesian grid ({len(keys)} distinct windows, {expected} in the grid)")
    owned: list[Slices] = []
    seen: set[tuple[tuple[int, int], ...]] = set()
    for w in windows:
        key = tuple((int(w[ax].start or 0), int(w[ax].stop) - int(w[ax].start or 0)) for ax in range(3))
        if key in seen:  # the same window twice (a format may repeat an edge window): owns nothing again
            owned.append((slice(0, 0), slice(0, 0), slice(0, 0)))
            continue
        seen.add(key)
        owned.append(tuple(slice(*per_axis[ax][key[ax]]) for ax in range(3)))  # type: ignore[arg-type]
    return owned


class WindowGram:
    """The float64 Gram matrix of the stitched feature map over ``mask``, added window by window.

    ``shape``: the network input grid (z, y, x) the windows tile. ``windows``: every window's slices, in
    any order (all of them: ownership depends on the neighbours). ``mask``: the voxels that count (the
    body on that grid); None: all.
    """

    def __init__(self, shape: Sequence[int], windows: Sequence[Slices], mask: np.ndarray | None = None) -> None:
        self.shape = tuple(int(n) for n in shape)
        self.windows: list[Slices] = [(w[0], w[1], w[2]) for w in windows]
        self.owned = owned_regions(self.shape, self.windows)
        if mask is not None and tuple(mask.shape) != self.shape:
            raise ValueError(f"mask shape {mask.shape} is not the grid's {self.shape}")
        self.mask = None if mask is None else torch.from_numpy(np.ascontiguousarray(mask, dtype=bool))
        self.gram: np.ndarray = np.zeros((0, 0))
        self.n_voxels = 0
        self.added: set[int] = set()

    def add(self, index: int, features: np.ndarray | torch.Tensor) -> None:
        """Window ``index``'s features, (C, d, h, w) over the whole window (mirrors already combined)."""
        if index in self.added:
            raise ValueError(f"window {index} was added twice")
        self.added.add(index)
        f = torch.as_tensor(features).detach()
        win, own = self.windows[index], self.owned[index]
        if own[0].stop - own[0].start <= 0:
            return
        local = tuple(slice(o.start - w.start, o.stop - w.start) for o, w in zip(own, win, strict=True))
        c = f.shape[0]
        if self.gram.size == 0:
            self.gram = np.zeros((c, c))
        part = f[(slice(None), *local)].to(torch.float64).reshape(c, -1).cpu()
        if self.mask is not None:
            keep = self.mask[own].reshape(-1)
            part = part[:, keep]
        self.gram += (part @ part.T).numpy()
        self.n_voxels += int(part.shape[1])

    def complete(self) -> bool:
        return len(self.added) == len(self.windows)

    def signature(self) -> np.ndarray:
        """The signature of the mean Gram (:func:`model.ood.signature_from_gram`)."""
        if not self.complete():
            raise ValueError(f"{len(self.windows) - len(self.added)} of {len(self.windows)} windows were never added")
        return signature_from_gram(self.gram, max(self.n_voxels, 1))


def stitch_features(shape: Sequence[int], windows: Sequence[Slices], features: Sequence[np.ndarray]) -> np.ndarray:
    """The full (C, z, y, x) feature map by the ownership rule (for tests: small volumes only)."""
    owned = owned_regions(shape, windows)
    c = features[0].shape[0]
    out = np.full((c, *shape), np.nan, np.float64)
    for win, own, f in zip(windows, owned, features, strict=True):
        local = tuple(slice(o.start - w.start, o.stop - w.start) for o, w in zip(own, win, strict=True))
        out[(slice(None), *own)] = np.asarray(f, np.float64)[(slice(None), *local)]
    if np.isnan(out).any():
        raise ValueError("the windows leave voxels without features")
    return out
