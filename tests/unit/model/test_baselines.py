import numpy as np
import pytest

from model.baselines import (
    SCORERS,
    EntropyScorer,
    MahalanobisScorer,
    MaxSoftmaxScorer,
    MCDropoutScorer,
    mc_dropout_inference,
)
from model.infer import sliding_window
from model.ood import OODScorer, SpectralGate
from model.unet import SegNet


def _probs(conf, shape=(4, 4, 4)):
    p1 = np.full(shape, conf)
    return np.stack([1 - p1, p1])


def test_registry_and_common_interface():
    assert set(SCORERS) == {"spectral", "max_softmax", "entropy", "mc_dropout", "mahalanobis"}
    assert SCORERS["spectral"] is SpectralGate
    assert all(issubclass(c, OODScorer) for c in SCORERS.values())


def test_uncertainty_scores():
    ms = MaxSoftmaxScorer.fit([_probs(0.95), _probs(0.9), _probs(0.97)])
    assert ms.score(_probs(0.9)) == pytest.approx(0.1)
    assert ms.is_ood(_probs(0.6)) and not ms.is_ood(_probs(0.96))
    ent = EntropyScorer.fit([_probs(0.95), _probs(0.9)], c=1.0)
    h = -(0.6 * np.log(0.6) + 0.4 * np.log(0.4))
    assert ent.score(_probs(0.6)) == pytest.approx(h)
    # only predicted foreground counts
    p = _probs(0.1)
    p[:, 0, 0, 0] = [0.2, 0.8]
    assert ent.score(p) == pytest.approx(-(0.2 * np.log(0.2) + 0.8 * np.log(0.8)))
    scores = np.array([ent.score(_probs(0.95)), ent.score(_probs(0.9))])
    assert ent.tau == pytest.approx(scores.mean() + 1.0 * scores.std())


def test_mahalanobis():
    rng = np.random.default_rng(0)
    train = [rng.normal(size=6) for _ in range(30)]
    m = MahalanobisScorer.fit(train)
    assert m.score(np.zeros(6)) < m.tau < m.score(np.full(6, 10.0))


def test_scorers_observe_inference_results():
    net = SegNet(base_features=4, levels=2, dropout=0.1).eval()
    vols = [np.random.default_rng(i).normal(size=(8, 8, 8)).astype(np.float32) for i in range(3)]
    results = [sliding_window(net, v, block=8, overlap=0) for v in vols]
    for cls in (MaxSoftmaxScorer, EntropyScorer, MahalanobisScorer):
        observations = [cls().observe(r) for r in results]
        scorer = cls.fit(observations)
        assert np.isfinite(scorer.score(scorer.observe(results[0])))
    gate = SpectralGate.fit(np.stack([r.signature for r in results]))
    assert gate.score(gate.observe(results[0])) == 0.0
    with pytest.raises(ValueError, match="mc_dropout_inference"):
        MCDropoutScorer().observe(results[0])


def test_mc_dropout_inference():
    net = SegNet(base_features=4, levels=2, dropout=0.1).eval()
    vol = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    r1 = mc_dropout_inference(net, vol, n_masks=10, seed=1, block=8, overlap=0)
    r2 = mc_dropout_inference(net, vol, n_masks=10, seed=1, block=8, overlap=0)
    plain = sliding_window(net, vol, block=8, overlap=0)
    np.testing.assert_allclose(r1.probabilities, r2.probabilities)  # seeded masks
    assert not np.allclose(r1.probabilities, plain.probabilities)  # dropout was on
    assert not net.training and all(not m.training for m in net.modules())  # restored
    sc = MCDropoutScorer.fit([MCDropoutScorer().observe(r) for r in (r1, r2)])
    assert np.isfinite(sc.score(sc.observe(r1)))
    with pytest.raises(ValueError, match="no dropout"):
        mc_dropout_inference(SegNet(base_features=4, levels=2), vol)
