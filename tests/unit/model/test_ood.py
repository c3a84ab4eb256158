import numpy as np
import pytest
import torch

from model.ood import (
    SINGULAR_VALUE_FLOOR,
    BankMismatchError,
    SpectralGate,
    leave_one_out_oodm,
    signature_from_gram,
    spectral_signature,
)


def _reference_signature(f):
    """Plain SVD reference, written out step by step (no shared code): the paper's, on F / sqrt(voxels)."""
    c = f.shape[0]
    mat = np.moveaxis(f, 0, -1).reshape(-1, c).astype(np.float64)
    s = np.linalg.svd(mat, compute_uv=False) / np.sqrt(mat.shape[0])
    s = np.maximum(s, SINGULAR_VALUE_FLOOR * s.max())
    ls = np.log(s)
    return ls / np.sqrt((ls**2).sum())


def test_signature_equals_plain_svd(rng):
    f = rng.normal(size=(14, 6, 7, 8)) * rng.uniform(0.1, 10, size=(14, 1, 1, 1))
    sig = spectral_signature(f)
    assert sig.shape == (14,)
    np.testing.assert_allclose(sig, _reference_signature(f), atol=1e-12)
    assert np.linalg.norm(sig) == pytest.approx(1.0)
    assert np.all(np.diff(sig) <= 1e-15) or np.all(np.diff(sig) >= -1e-15)  # ordered like s


def test_signature_accepts_tensor(rng):
    f = rng.normal(size=(4, 5, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(spectral_signature(torch.from_numpy(f)), spectral_signature(f), atol=1e-12)


def test_dead_channel_is_floored_not_infinite(rng):
    f = rng.normal(size=(5, 6, 6, 6))
    f[2] = 0.0  # a dead ReLU channel
    sig = spectral_signature(f)
    assert np.all(np.isfinite(sig))
    np.testing.assert_allclose(sig, _reference_signature(f), atol=1e-12)
    # the floored value is log(floor * s_max), before normalisation
    s = np.linalg.svd(np.moveaxis(f, 0, -1).reshape(-1, 5), compute_uv=False) / np.sqrt(6**3)
    logs = np.log(np.maximum(s, SINGULAR_VALUE_FLOOR * s[0]))
    assert sig[-1] == pytest.approx(logs[-1] / np.linalg.norm(logs))


def test_gram_route_equals_svd(rng):
    f = rng.normal(size=(14, 9, 9, 9)).astype(np.float32)
    f[3] = 0.0
    mat = f.reshape(14, -1).astype(np.float64)
    np.testing.assert_allclose(signature_from_gram(mat @ mat.T, 9**3), spectral_signature(f), atol=1e-9)
    with pytest.raises(ValueError, match="n_voxels"):
        signature_from_gram(mat @ mat.T, 0)


@pytest.mark.parametrize("reps", [2, 4, 8])
def test_signature_of_a_tiling_is_the_signature_of_the_map(rng, reps):
    """A signature of content: the same features repeated (a larger scan of the same thing) do not move it."""
    f = rng.normal(size=(14, 6, 7, 5)) * rng.uniform(0.1, 10, size=(14, 1, 1, 1))
    f[4] = 0.0
    tiled = np.tile(f, (1, reps, 1, 1)) if reps == 2 else np.tile(f, (1, 2, reps // 2, 1))
    np.testing.assert_allclose(spectral_signature(tiled), spectral_signature(f), atol=1e-6)
    t = tiled.reshape(14, -1)
    np.testing.assert_allclose(signature_from_gram(t @ t.T, t.shape[1]), spectral_signature(f), atol=1e-6)
    # the paper's sum would not: its log adds 0.5 * log(reps) to every entry, which unit scaling keeps
    def sum_signature(x):
        s = np.linalg.svd(x.reshape(14, -1).T, compute_uv=False)
        ls = np.log(np.maximum(s, SINGULAR_VALUE_FLOOR * s.max()))
        return ls / np.linalg.norm(ls)
    assert np.linalg.norm(sum_signature(tiled) - sum_signature(f)) > 1e-3


def test_mask_selects_the_voxels_that_count(rng):
    f = rng.normal(size=(5, 6, 6, 6))
    mask = np.zeros((6, 6, 6), bool)
    mask[1:4, 2:5, :] = True
    padded = f.copy()
    padded[:, ~mask] = 0.0  # what lies outside the mask (air, padding) does not enter
    np.testing.assert_allclose(spectral_signature(padded, mask), spectral_signature(f, mask), atol=1e-12)
    np.testing.assert_allclose(spectral_signature(f, mask), _reference_signature(f[:, mask][:, :, None, None]),
                               atol=1e-12)
    with pytest.raises(ValueError, match="no voxel"):
        spectral_signature(f, np.zeros((6, 6, 6), bool))
    with pytest.raises(ValueError, match="mask has shape"):
        spectral_signature(f, mask[:5])


def test_leave_one_out_by_group_skips_the_same_image(rng):
    base = rng.normal(size=(4, 3))
    bank = np.concatenate([base, base + 1e-4])  # each image twice (two geometries)
    groups = [0, 1, 2, 3, 0, 1, 2, 3]
    plain = leave_one_out_oodm(bank)
    grouped = leave_one_out_oodm(bank, groups)
    assert plain.max() < 1e-3  # each copy is the other's neighbour: tau would be re-gridding noise
    expected = leave_one_out_oodm(base)
    np.testing.assert_allclose(grouped[:4], expected, atol=2e-4)
    gate = SpectralGate.fit(bank, groups=groups)
    assert gate.tau > 10 * SpectralGate.fit(bank).tau
    with pytest.raises(ValueError, match="one label per signature"):
        leave_one_out_oodm(bank, groups[:3])
    with pytest.raises(ValueError, match="two different"):
        leave_one_out_oodm(bank, [0] * 8)


def test_bank_refuses_another_inference_path(tmp_path, rng):
    inference = {"block": 96, "overlap": 24, "spacing": {"CT": [4.0, 4.0, 4.0]}, "precision": "float32"}
    gate = SpectralGate.fit(rng.normal(size=(5, 14)), meta={"inference": inference})
    gate.save(tmp_path / "b.npz")
    g = SpectralGate.load(tmp_path / "b.npz")
    g.check_inference({"block": 96, "overlap": 24, "spacing": {"CT": (4, 4, 4)}, "precision": "float32"})
    with pytest.raises(BankMismatchError, match=r"overlap: bank 24, the worker 72; spacing: bank"):
        g.check_inference({"block": 96, "overlap": 72, "spacing": {}, "precision": "float32"})
    with pytest.raises(BankMismatchError, match="does not record"):
        SpectralGate.fit(rng.normal(size=(5, 14))).check_inference(inference)


def test_tau_matches_leave_one_out_formula(rng):
    bank = rng.normal(size=(7, 4))
    # by hand: for each j, nearest other signature; tau = mean + c * population std
    loo = []
    for j in range(7):
        loo.append(min(np.sqrt(((bank[j] - bank[k]) ** 2).sum()) for k in range(7) if k != j))
    loo = np.array(loo)
    np.testing.assert_allclose(leave_one_out_oodm(bank), loo)
    gate = SpectralGate.fit(bank, c=2.5)
    assert gate.tau == pytest.approx(loo.mean() + 2.5 * np.sqrt(((loo - loo.mean()) ** 2).mean()))
    assert SpectralGate.fit(bank, c=0.0).tau == pytest.approx(loo.mean())


def test_score_is_nearest_neighbour_distance_and_flags(rng):
    bank = np.eye(3)
    gate = SpectralGate(bank, tau=0.5, c=2.5)
    assert gate.score(np.array([1.0, 0.1, 0.0])) == pytest.approx(0.1)
    assert not gate.is_ood(np.array([1.0, 0.1, 0.0]))
    assert gate.is_ood(np.array([0.6, 0.6, 0.6]))
    with pytest.raises(ValueError, match="length"):
        gate.score(np.zeros(4))


def test_fit_needs_two_signatures():
    with pytest.raises(ValueError, match="at least two"):
        SpectralGate.fit(np.zeros((1, 3)))


def test_save_load_and_weights_check(tmp_path, rng):
    gate = SpectralGate.fit(rng.normal(size=(5, 14)), c=2.0, weights_sha256="a" * 64, meta={"n": 5})
    p = tmp_path / "bank.npz"
    gate.save(p)
    g2 = SpectralGate.load(p, weights_sha256="a" * 64)
    np.testing.assert_array_equal(g2.bank, gate.bank)
    assert (g2.tau, g2.c, g2.weights_sha256) == (gate.tau, 2.0, "a" * 64)
    assert g2.meta["n"] == 5 and len(g2.meta["loo_oodm"]) == 5
    with pytest.raises(BankMismatchError, match="fitted for weights with SHA-256 a{64}"):
        SpectralGate.load(p, weights_sha256="b" * 64)


def test_load_refuses_unknown_version(tmp_path):
    import json

    p = tmp_path / "bank.npz"
    np.savez(p, bank=np.zeros((2, 3)), header=np.array(json.dumps({"format": "specgate-spectral-bank", "version": 99})))
    with pytest.raises(ValueError, match="version 99"):
        SpectralGate.load(p)
    np.savez(p, bank=np.zeros((2, 3)), header=np.array(json.dumps({"format": "specgate-spectral-bank", "version": 1})))
    with pytest.raises(ValueError, match=r"grow with the scan's size\); refit"):
        SpectralGate.load(p)
    np.savez(p, bank=np.zeros((2, 3)), header=np.array(json.dumps({"format": "specgate-spectral-bank", "version": 2})))
    with pytest.raises(ValueError, match=r"version 2 banks were fitted before .*blurred .*\); refit"):
        SpectralGate.load(p)


def test_centred_signature_ignores_a_gain_and_the_mean_one_does_not(rng):
    """Bank version 3's spectrum: a feature map times a gain has the same centred signature (issue 20: x1.1
    moved the mean signature by about one tau)."""
    f = rng.normal(size=(14, 6, 6, 6))
    for gain in (1.1, 1.25, 3.0):
        np.testing.assert_allclose(spectral_signature(gain * f, spectrum="centred"),
                                   spectral_signature(f, spectrum="centred"), atol=1e-12)
        assert np.linalg.norm(spectral_signature(gain * f) - spectral_signature(f)) > 1e-3
    c = spectral_signature(f, spectrum="centred")
    assert abs(c.sum()) < 1e-12 and np.linalg.norm(c) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown spectrum"):
        spectral_signature(f, spectrum="median")
