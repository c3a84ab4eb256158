"""model.resample: the model's grid over the same box, anti-aliased down, linear back, bad spacings named."""

import numpy as np
import pytest

from model.resample import Grid, GridError, from_grid, model_grid, to_grid, validate_spacing


def test_model_grid_keeps_the_box():
    g = model_grid((300, 512, 512), (1.25, 0.7, 0.7), (4.0, 4.0, 4.0))
    assert g.shape == (94, 90, 90)
    for n, s, m, t in zip((300, 512, 512), (1.25, 0.7, 0.7), g.shape, g.spacing, strict=True):
        assert m * t == pytest.approx(n * s)  # same extent: no slice shifted
        assert abs(t - 4.0) <= 4.0 / m  # within half a voxel of the target over the extent


@pytest.mark.parametrize("spacing", [None, (0.0, 1.0, 1.0), (1.0, -1.0, 1.0), (float("nan"), 1, 1), (1.0, 1.0), "abc"])
def test_bad_spacing_is_named(spacing):
    with pytest.raises(GridError) as info:
        validate_spacing(spacing)
    assert info.value.reason_code == "bad_spacing"


def test_grid_under_one_voxel_is_refused():
    with pytest.raises(GridError, match=r"axis y: 512 voxel\(s\) of 0.001 mm cover 0.512 mm, under one voxel"):
        model_grid((10, 512, 512), (2.0, 0.001, 0.001), (4.0, 4.0, 4.0))


def test_linear_ramp_is_sampled_at_the_new_centres():
    ramp = np.broadcast_to(np.arange(40, dtype=np.float32)[:, None, None], (40, 6, 6)).copy()
    g = model_grid(ramp.shape, (1.0, 1.0, 1.0), (4.0, 1.0, 1.0))
    out = to_grid(ramp, (1.0, 1.0, 1.0), g, antialias=False)
    # voxel j of 4 mm is centred at 4j + 2 mm, i.e. between source voxels 4j+1 and 4j+2 (value 4j + 1.5)
    np.testing.assert_allclose(out[:, 3, 3], 4 * np.arange(10) + 1.5, atol=1e-5)
    back = from_grid(out, g, ramp.shape, (1.0, 1.0, 1.0))
    np.testing.assert_allclose(back[2:-2, 3, 3], ramp[2:-2, 3, 3], atol=1e-4)
    assert np.isfinite(back).all() and back[0, 0, 0] == pytest.approx(1.5)  # nearest beyond the last centre


def test_antialiasing_averages_fine_noise_like_a_thick_voxel():
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(64, 64, 64)).astype(np.float32)
    g = model_grid(noise.shape, (1.0, 1.0, 1.0), (4.0, 4.0, 4.0))
    smooth = to_grid(noise, (1.0, 1.0, 1.0), g).std()
    sampled = to_grid(noise, (1.0, 1.0, 1.0), g, antialias=False).std()
    assert smooth < 0.5 * sampled  # a 4 mm voxel averages 64 noisy 1 mm voxels; sampling does not


def test_probabilities_stay_probabilities():
    rng = np.random.default_rng(1)
    p = rng.uniform(size=(10, 12, 12)).astype(np.float32)
    g = Grid((10, 12, 12), (4.0, 4.0, 4.0))
    out = from_grid(p, g, (27, 61, 61), (1.5, 0.8, 0.8))
    assert out.shape == (27, 61, 61) and out.min() >= 0.0 and out.max() <= 1.0
    buf = np.empty((27, 61, 61), np.float16)
    from_grid(p, g, (27, 61, 61), (1.5, 0.8, 0.8), out=buf)
    np.testing.assert_allclose(buf, out, atol=1e-3)
    with pytest.raises(ValueError, match="the grid"):
        from_grid(p[:5], g, (27, 61, 61), (1.5, 0.8, 0.8))


def _whole_volume_block_means(a, spacing, grid):
    """The block means over the whole volume at once (the path before chunks), as float32."""
    from model.resample import _block_mean

    a = np.asarray(a, dtype=np.float32)
    for axis in range(3):
        k = int(grid.spacing[axis] / spacing[axis])
        if k >= 2:
            a = _block_mean(a, axis, k)
    return a


@pytest.mark.parametrize(("shape", "spacing", "target"), [
    ((70, 64, 61), (1.0, 0.703125, 0.703125), (4.0, 4.0, 4.0)),  # z blocks of 4 split over chunks, x with a tail
    ((41, 70, 66), (2.5, 0.45, 0.45), (4.0, 4.0, 4.0)),  # no z blocks; 8 per block in-plane (pairwise sums)
    ((70, 30, 90), (0.3, 1.0, 0.25), (4.0, 4.0, 4.0)),  # 13 per z block, a short last chunk; 16 along x
    ((33, 40, 40), (1.0, 1.0, 1.0), (1.5, 1.5, 1.5)),  # no block at all
])
def test_int16_and_chunked_block_means_give_the_same_grid(shape, spacing, target):
    """An int16 CT resamples to the same float32 bits as its float32 copy, and the chunked block means
    equal the whole-volume ones (each mean adds the same values in the same order)."""
    from model.resample import _block_means

    rng = np.random.default_rng(1)
    hu = rng.integers(-1024, 3072, size=shape).astype(np.int16)
    grid = model_grid(shape, spacing, target)
    ref = _whole_volume_block_means(hu, spacing, grid)
    ks = [max(1, int(g / s)) for g, s in zip(grid.spacing, spacing, strict=True)]
    chunked = _block_means(hu, [k if k >= 2 else 1 for k in ks])
    assert chunked.dtype == np.float32 and chunked.tobytes() == ref.tobytes()
    assert to_grid(hu, spacing, grid).tobytes() == to_grid(hu.astype(np.float32), spacing, grid).tobytes()
