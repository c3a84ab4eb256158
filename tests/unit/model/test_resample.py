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
