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
    """Plain SVD reference, written out step by step from the paper (no shared code)."""
    c = f.shape[0]
    mat = np.moveaxis(f, 0, -1).reshape(-1, c).astype(np.float64)
    s = np.linalg.svd(mat, compute_uv=False)
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
    s = np.linalg.svd(np.moveaxis(f, 0, -1).reshape(-1, 5), compute_uv=False)
    logs = np.log(np.maximum(s, SINGULAR_VALUE_FLOOR * s[0]))
    assert sig[-1] == pytest.approx(logs[-1] / np.linalg.norm(logs))


def test_gram_route_equals_svd(rng):
    f = rng.normal(size=(14, 9, 9, 9)).astype(np.float32)
    f[3] = 0.0
    mat = f.reshape(14, -1).astype(np.float64)
    np.testing.assert_allclose(signature_from_gram(mat @ mat.T), spectral_signature(f), atol=1e-9)


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
    assert (g2.tau, g2.c, g2.weights_sha256, g2.meta) == (gate.tau, 2.0, "a" * 64, {"n": 5})
    with pytest.raises(BankMismatchError, match="fitted for weights with SHA-256 a{64}"):
        SpectralGate.load(p, weights_sha256="b" * 64)


def test_load_refuses_unknown_version(tmp_path):
    import json

    p = tmp_path / "bank.npz"
    np.savez(p, bank=np.zeros((2, 3)), header=np.array(json.dumps({"format": "specgate-spectral-bank", "version": 99})))
    with pytest.raises(ValueError, match="version 99"):
        SpectralGate.load(p)
