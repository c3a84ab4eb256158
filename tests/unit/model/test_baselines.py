"""The baseline OOD scorers: each score against a value computed by hand, and each through the production path."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from model.baseline_inference import DeepestMapNet, OdinNet, ensemble_inference, sample_blocks
from model.baselines import (
    BASELINES,
    SCORERS,
    BlockFeatures,
    ClassPooled,
    DkNNScorer,
    EnsembleScorer,
    EntropyScorer,
    MahalanobisScorer,
    MaxSoftmaxScorer,
    MCDropoutScorer,
    OdinScorer,
    OutlierExposureScorer,
    fit_baseline,
    mc_dropout_inference,
    observe_study,
)
from model.data.phantoms import phantom_case
from model.infer import sliding_window
from model.ood import OODScorer, SpectralGate
from model.study_inference import InferenceSettings, prepare_study, segment_volume
from model.train import TrainConfig, TrainData, outlier_exposure_loss, train
from model.unet import SegNet

H = {0.9: 0.9 * math.log(1 / 0.9) + 0.1 * math.log(10), 0.7: 0.7 * math.log(1 / 0.7) + 0.3 * math.log(1 / 0.3)}


def _p(p1):
    """Two-class probabilities with P(class 1) = p1 (any shape)."""
    p1 = np.asarray(p1, dtype=np.float64)
    return np.stack([1 - p1, p1])


def test_registry_and_common_interface():
    assert set(SCORERS) == {"spectral", "max_softmax", "entropy", "mc_dropout", "ensemble", "mahalanobis", "odin",
                            "dknn", "outlier_exposure"}
    assert SCORERS["spectral"] is SpectralGate
    assert all(issubclass(c, OODScorer) for c in SCORERS.values())
    for cls in BASELINES:  # every docstring names its paper
        assert any(year in (cls.__doc__ or "") for year in ("2016", "2017", "2018", "2019")), cls.name


def test_max_softmax_and_entropy_by_hand():
    obs = _p([0.9, 0.7, 0.2, 0.4])  # predicted foreground: the first two voxels
    assert MaxSoftmaxScorer().score(obs) == pytest.approx(1 - (0.9 + 0.7) / 2)
    assert EntropyScorer().score(obs) == pytest.approx((H[0.9] + H[0.7]) / 2)
    assert H[0.9] == pytest.approx(0.325083, abs=1e-6) and H[0.7] == pytest.approx(0.610864, abs=1e-6)
    # nothing predicted: the whole image counts
    assert MaxSoftmaxScorer().score(_p([0.1, 0.3])) == pytest.approx(1 - (0.9 + 0.7) / 2)
    # Eq. (2) over the training scores: 0.1, 0.2, 0.3 -> mean 0.2, population std sqrt(2/3) * 0.1
    ms = MaxSoftmaxScorer.fit([_p([0.9]), _p([0.8]), _p([0.7])], c=2.0)
    assert ms.tau == pytest.approx(0.2 + 2.0 * 0.1 * math.sqrt(2 / 3))
    assert ms.is_ood(_p([0.6])) and not ms.is_ood(_p([0.85]))
    assert OutlierExposureScorer().score(obs) == MaxSoftmaxScorer().score(obs)


class _LogitNet(nn.Module):
    """Logits (0, w * x + b) per voxel; features: the input. ``encoders[0]`` is the deepest map (w * x)."""

    divisor = 1

    def __init__(self, w: float, b: float = 0.0, fg_everywhere: bool = False) -> None:
        super().__init__()
        conv = nn.Conv3d(1, 1, 1, bias=False)
        with torch.no_grad():
            conv.weight.fill_(w)
        self.encoders = nn.ModuleList([conv])
        self.b, self.fg_everywhere = b, fg_everywhere

    def forward(self, x, return_features=False):
        f = self.encoders[0](x)
        z = torch.ones_like(f) + 0 * f if self.fg_everywhere else f + self.b
        logits = torch.cat([torch.zeros_like(z), z], 1)
        return (logits, x) if return_features else logits


def test_ensemble_of_two_fixed_outputs():
    x = np.log(np.array([9.0, 1.5], np.float32)).reshape(1, 1, 2)  # logits: member A x, member B x - ln 4
    res = ensemble_inference([_LogitNet(1.0), _LogitNet(1.0, -math.log(4))], x, block=2, overlap=0)
    mean = [(0.9 + 9 / 13) / 2, (0.6 + 0.375 / 1.375) / 2]  # 0.796, 0.436: only the first is foreground
    np.testing.assert_allclose(res.probabilities[1].ravel(), mean, rtol=1e-5)
    assert res.members == 2
    h = -(mean[0] * math.log(mean[0]) + (1 - mean[0]) * math.log(1 - mean[0]))
    assert EnsembleScorer(members=2).score(EnsembleScorer(members=2).observe(res)) == pytest.approx(h, rel=1e-5)
    with pytest.raises(ValueError, match="ensemble of 5"):
        EnsembleScorer().observe(res)
    with pytest.raises(ValueError, match="at least 2"):
        EnsembleScorer(members=1)


def test_odin_temperature_and_perturbation_by_hand():
    # w = 2: voxels at x = 1 predict class 1 (logit 2) and are moved up by eps (towards it); x = -1 down
    x = np.array([1.0, 1.0, -1.0, -1.0], np.float32).reshape(1, 2, 2)
    t, eps = 1000.0, 0.1
    res = sliding_window(OdinNet(_LogitNet(2.0), temperature=t, eps=eps), x, block=2, overlap=0)
    sig = 1 / (1 + math.exp(-2 * (1 + eps) / t))
    np.testing.assert_allclose(res.probabilities[1].ravel(), [sig, sig, 1 - sig, 1 - sig], rtol=1e-6)
    assert OdinScorer().score(res.probabilities) == pytest.approx(1 - sig, rel=1e-6)
    # without perturbation and temperature, ODIN is MSP
    plain = sliding_window(OdinNet(_LogitNet(2.0), temperature=1.0, eps=0.0), x, block=2, overlap=0)
    assert plain.probabilities[1, 0, 0, 0] == pytest.approx(1 / (1 + math.exp(-2)), rel=1e-6)


def _pooled(*rows_and_counts):
    means = np.array([r for r, _ in rows_and_counts], dtype=np.float64)
    return ClassPooled(means, np.array([n for _, n in rows_and_counts], dtype=np.float64))


def test_mahalanobis_class_conditional_tied_covariance_by_hand():
    # class 0 around (0, 0), class 1 around (10, 0), each with scatter diag(2, 2): Sigma = 4 I / 8 = I / 2
    d = [(1, 0), (-1, 0), (0, 1), (0, -1)]
    train = [_pooled((a, 5), ((10 + a[0], a[1]), 3)) for a in d]
    m = MahalanobisScorer.fit(train, c=1.0, shrinkage=0.0)
    np.testing.assert_allclose(m.means, [[0, 0], [10, 0]])
    np.testing.assert_allclose(m.precision, 2 * np.eye(2))
    # class 0 at (1, 1): 2 * 2 = 4 (class 1's mean: 164); class 1 at (7, 0): 2 * 9 = 18 (class 0's: 98)
    assert m.score(_pooled(((1, 1), 10), ((7, 0), 10))) == pytest.approx((4 + 18) / 2)
    assert m.score(_pooled(((1, 1), 10), ((7, 0), 0))) == pytest.approx(4)  # an absent class does not count
    assert m.score(train[0]) == pytest.approx(2.0)  # every training image: (2 + 2) / 2
    assert m.tau == pytest.approx(2.0)
    # shrinkage toward (tr Sigma / C) I leaves an isotropic Sigma as it is
    np.testing.assert_allclose(MahalanobisScorer.fit(train, shrinkage=0.5).precision, 2 * np.eye(2))


def test_mahalanobis_input_perturbation_moves_towards_the_nearest_mean():
    # deepest map f = 2x, everything predicted class 1; class means 5 and 0 (precision 1): at x = 1 the
    # pooled f = 2 is nearest to 0, the gradient of (2 mean x)^2 is positive, so x~ = 1 - eps, f = 1.8
    x = np.ones((4, 4, 4), np.float32)
    net = _LogitNet(2.0, fg_everywhere=True)
    sc = MahalanobisScorer(means=np.array([[5.0], [0.0]]), precision=np.eye(1), eps=0.1)
    res = sliding_window(DeepestMapNet(net, sc.means, sc.precision, sc.eps), x, block=4, overlap=0)
    obs = sc.observe(res)
    np.testing.assert_allclose(obs.means[1], [1.8], rtol=1e-6)
    assert obs.counts.tolist() == [0, 64]
    assert sc.score(obs) == pytest.approx(1.8**2)
    clean = sliding_window(DeepestMapNet(net), x, block=4, overlap=0)
    assert sc.score(sc.observe(clean)) == pytest.approx(4.0)


def test_deepest_map_is_pooled_per_predicted_class():
    net = SegNet(base_features=4, levels=2).eval()
    x = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    res = sliding_window(DeepestMapNet(net), x, block=8, overlap=0)
    with torch.no_grad():
        deep = net.encoders[-1]
        got = {}
        h = deep.register_forward_hook(lambda _m, _i, o: got.setdefault("d", o))
        logits = net(torch.from_numpy(x)[None, None])
        h.remove()
    pred = (logits.softmax(1)[0, 1] > logits.softmax(1)[0, 0]).numpy()
    up = torch.nn.functional.interpolate(got["d"], size=(8, 8, 8), mode="nearest")[0].numpy()
    for k, mask in enumerate((~pred, pred)):
        np.testing.assert_allclose(res.class_feature_sums[k], up[:, mask].sum(1), rtol=1e-4, atol=1e-4)
        assert res.class_counts[k] == mask.sum()
    assert res.class_feature_sums.shape == (2, 8)  # the deepest map: 2 * base_features channels


def _dknn_fitted(k=3):
    sc = DkNNScorer(k=k)
    sc.label_names = ["a", "b"]
    sc.train_layers = [np.array([[0, 0], [0, 1], [1, 0], [10, 10], [10, 11], [11, 10]], np.float64)]
    sc.train_labels = np.array([0, 0, 0, 1, 1, 1])
    sc.calibration = np.array([0.0, 0.0, 1.0, 3.0])
    return sc


def test_dknn_credibility_by_hand():
    sc = _dknn_fitted()
    # blocks at (0.2, 0.2) and (1, 1): 3 neighbours of a -> alpha(a) = 0, alpha(b) = 3 -> p(a) = 4/4, p(b) = 1/4
    # block at (9, 9): the reverse -> p(a) = 1/4. Most blocks predict a; credibility = (1 + 1/4 + 1) / 3
    obs = BlockFeatures((np.array([[0.2, 0.2], [9.0, 9.0], [1.0, 1.0]]),))
    np.testing.assert_allclose(sc._alpha(obs), [[0, 3], [3, 0], [0, 3]])
    cred, label = sc.credibility(obs)
    assert (cred, label) == (pytest.approx(0.75), "a")
    assert sc.score(obs) == pytest.approx(0.25)
    # two layers that agree: nonconformities add up (6), beyond every calibration value -> p = 0
    two = _dknn_fitted()
    two.train_layers = two.train_layers * 2
    obs2 = BlockFeatures((obs.layers[0], obs.layers[0]))
    np.testing.assert_allclose(two._alpha(obs2), [[0, 6], [6, 0], [0, 6]])
    assert two.score(obs2) == pytest.approx(1 - (1 + 0 + 1) / 3)


def test_dknn_fit_splits_calibration_per_dataset_and_needs_two_datasets():
    rng = np.random.default_rng(0)
    obs = [BlockFeatures((rng.normal(c, 0.1, size=(4, 2)),)) for c in (0, 0, 0, 5, 5, 5)]
    labels = ["a", "a", "a", "b", "b", "b"]
    sc = DkNNScorer.fit(obs, c=2.5, labels=labels, k=3, test_blocks=2, calibration_fraction=0.34)
    assert len(sc.train_labels) == 4 * 4 and len(sc.calibration) == 2 * 4  # one calibration image per dataset
    assert (sc.calibration == 0).all()  # well separated: every calibration block agrees with its dataset
    assert sc.score(obs[0]) == pytest.approx(0.0) and np.isfinite(sc.tau)
    with pytest.raises(ValueError, match="at least two datasets"):
        DkNNScorer.fit(obs, labels=["a"] * 6)
    with pytest.raises(ValueError, match="labels"):
        DkNNScorer.fit(obs)


def test_sample_blocks_hold_a_foreground_voxel():
    img = np.arange(20 * 20 * 20, dtype=np.float32).reshape(20, 20, 20)
    where = np.zeros(img.shape, bool)
    where[3, 17, 9] = True
    for b in sample_blocks(img, where, 5, 8, np.random.default_rng(0)):
        assert b.shape == (8, 8, 8) and img[3, 17, 9] in b


def test_outlier_exposure_loss():
    assert float(outlier_exposure_loss(torch.full((2, 3, 4, 4, 4), 7.0))) == pytest.approx(0.0, abs=1e-7)
    z = torch.zeros(1, 2, 2, 2, 2)
    z[:, 1] = math.log(3)  # p = (1/4, 3/4): KL(U || p) = -(ln 1/4 + ln 3/4) / 2 - ln 2
    assert float(outlier_exposure_loss(z)) == pytest.approx(-(math.log(0.25) + math.log(0.75)) / 2 - math.log(2))
    assert float(outlier_exposure_loss(torch.randn(1, 2, 4, 4, 4))) > 0


class _Case:
    def __init__(self, image, label, modality="CT", name="c"):
        self.image, self.label, self.modality, self.name = image, label, modality, name


def test_train_with_outlier_exposure_runs(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.normal(0, 200, size=(16, 16, 16)).astype(np.float32)
    lab = (img > 0).astype(np.uint8)
    data = TrainData.from_cases({"in": [_Case(img, lab)]}, block=16)
    out = TrainData.from_cases({"other": [_Case(-img, lab, name="o")]}, block=16)
    cfg = TrainConfig(block=16, base_features=4, levels=2, max_iterations=3, eval_every=3, outlier_weight=0.5)
    res = train(data, tmp_path, cfg, outliers=out, progress=False)
    assert res.iterations == 3 and np.isfinite(res.best_loss)
    with pytest.raises(ValueError, match="needs outlier datasets"):
        train(data, tmp_path / "x", cfg, progress=False)
    with pytest.raises(ValueError, match="outlier_weight is 0"):
        train(data, tmp_path / "y", TrainConfig(block=16, base_features=4, levels=2), outliers=out, progress=False)


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
    with pytest.raises(ValueError, match="mc_dropout_inference"):
        MCDropoutScorer().observe(plain)
    with pytest.raises(ValueError, match="no dropout"):
        mc_dropout_inference(SegNet(base_features=4, levels=2), vol)


# ------------------------------------------------------------------------------------------------
# the production path


SETTINGS = InferenceSettings(block=16, overlap=4, spacing=(("CT", (8.0, 8.0, 8.0)), ("MR", (6.0, 6.0, 6.0))))


@pytest.fixture(scope="module")
def studies():
    return [phantom_case(kind, 2026, i) for kind in ("ct_liver", "mr_prostate") for i in range(3)]


def _nets(n, dropout=0.0):
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(SegNet(base_features=4, levels=2, dropout=dropout).eval())
    return out


def test_observe_study_runs_every_scorer_on_the_gates_canvas(studies):
    s = studies[0]
    net = _nets(1, dropout=0.1)[0]
    canvas = prepare_study(s.image, s.spacing, s.modality, SETTINGS).image
    assert canvas.shape != s.image.shape  # re-gridded and cropped to the body, as production runs
    sig = observe_study("spectral", net, s.image, s.spacing, s.modality, SETTINGS)
    np.testing.assert_allclose(sig, segment_volume(net, s.image, s.spacing, s.modality, SETTINGS).signature)
    for name in ("max_softmax", "entropy", "odin", "outlier_exposure"):
        obs = observe_study(name, net, s.image, s.spacing, s.modality, SETTINGS)
        assert obs.shape == (2, *canvas.shape) and np.isfinite(SCORERS[name]().score(obs)), name
    mc = observe_study(MCDropoutScorer(n_masks=3), net, s.image, s.spacing, s.modality, SETTINGS)
    assert mc.shape == (2, *canvas.shape)
    ens = observe_study("ensemble", _nets(5), s.image, s.spacing, s.modality, SETTINGS)
    assert np.isfinite(EnsembleScorer().score(ens))
    with pytest.raises(ValueError, match="5 members"):
        observe_study("ensemble", _nets(2), s.image, s.spacing, s.modality, SETTINGS)
    with pytest.raises(ValueError, match="unknown scorer"):
        observe_study("odn", net, s.image, s.spacing, s.modality, SETTINGS)
    with pytest.raises(ValueError, match="one network"):
        observe_study("odin", _nets(2), s.image, s.spacing, s.modality, SETTINGS)
    maha = observe_study("mahalanobis", net, s.image, s.spacing, s.modality, SETTINGS)
    assert isinstance(maha, ClassPooled) and maha.means.shape == (2, 8) and maha.counts.sum() == canvas.size
    blocks = observe_study(DkNNScorer(test_blocks=4), net, s.image, s.spacing, s.modality, SETTINGS)
    assert [x.shape for x in blocks.layers] == [(4, 4), (4, 8), (4, 4)]  # two encoder stages, one decoder


def test_fit_baseline_through_the_production_path(studies):
    net = _nets(1)[0]
    ct = [s for s in studies if s.modality == "CT"]
    maha = fit_baseline("mahalanobis", net, ct, SETTINGS, c=2.5, eps=0.01)
    assert maha.fitted and np.isfinite(maha.tau)
    s = studies[-1]  # an MR: the fitted scorer observes it perturbed
    assert np.isfinite(maha.score(observe_study(maha, net, s.image, s.spacing, s.modality, SETTINGS)))
    dknn = fit_baseline("dknn", net, studies, SETTINGS, labels=[s.modality for s in studies], k=5,
                        train_blocks=3, test_blocks=2, calibration_fraction=0.34)
    assert dknn.label_names == ["CT", "MR"] and len(dknn.train_labels) == 4 * 3
    obs = observe_study(dknn, net, s.image, s.spacing, s.modality, SETTINGS)
    assert 0.0 <= dknn.score(obs) <= 1.0
    msp = fit_baseline(MaxSoftmaxScorer, net, ct, SETTINGS)
    assert 0.0 <= msp.tau <= 1.0
    with pytest.raises(ValueError, match="not a baseline"):
        fit_baseline("spectral", net, ct, SETTINGS)
