"""The ownership rule of model.window_gram: the Gram added window by window equals the Gram of the
stitched feature map, for regular grids, edge windows shifted back (nnU-Net, MONAI) and a body mask."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from model.ood import signature_from_gram
from model.window_gram import WindowGram, owned_regions, stitch_features


def _grid(shape, patch, step):
    axes = []
    for n, p, s in zip(shape, patch, step, strict=True):
        starts = list(range(0, max(n - p, 0) + 1, s))
        if starts[-1] + p < n:
            starts.append(n - p)  # edge window shifted back, as MONAI's and nnU-Net's planners do
        axes.append(starts)
    return [tuple(slice(a, a + p) for a, p in zip(st, patch, strict=True)) for st in itertools.product(*axes)]


@pytest.mark.parametrize("shape,patch,step", [((23, 17, 30), (8, 8, 12), (4, 5, 6)), ((16, 16, 16), (16, 16, 16), (8, 8, 8)),
                                              ((40, 9, 9), (12, 9, 9), (7, 3, 3))])
def test_windows_equal_stitched(shape, patch, step):
    rng = np.random.default_rng(0)
    wins = _grid(shape, patch, step)
    feats = [rng.normal(size=(5, *(s.stop - s.start for s in w))).astype(np.float32) for w in wins]
    mask = rng.random(shape) > 0.3
    g = WindowGram(shape, wins, mask)
    for i in rng.permutation(len(wins)):
        g.add(int(i), feats[int(i)])
    full = stitch_features(shape, wins, feats)
    rows = full.reshape(5, -1)[:, mask.ravel()]
    expect = signature_from_gram(rows @ rows.T, rows.shape[1])
    assert g.n_voxels == int(mask.sum())
    np.testing.assert_allclose(g.signature(), expect, atol=1e-6)


def test_ownership_partitions_the_volume():
    shape = (23, 17, 30)
    wins = _grid(shape, (8, 8, 12), (4, 5, 6))
    count = np.zeros(shape, int)
    for own in owned_regions(shape, wins):
        count[own] += 1
    assert (count == 1).all()


def test_refuses_gaps_and_incomplete():
    with pytest.raises(ValueError, match="cover"):
        WindowGram((10, 4, 4), [(slice(0, 4), slice(0, 4), slice(0, 4)), (slice(6, 10), slice(0, 4), slice(0, 4))])
    g = WindowGram((8, 4, 4), _grid((8, 4, 4), (4, 4, 4), (4, 4, 4)))
    g.add(0, np.ones((2, 4, 4, 4)))
    with pytest.raises(ValueError, match="never added"):
        g.signature()
    with pytest.raises(ValueError, match="twice"):
        g.add(0, np.ones((2, 4, 4, 4)))
