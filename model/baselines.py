"""The paper's comparison methods (section IV, (a)-(g)) as OOD scorers with the gate's interface.

Every scorer is an :class:`model.ood.OODScorer`: ``Scorer.fit(train_observations, c=2.5, **params)``
returns a fitted scorer whose ``tau`` is Eq. (2) (``mean + c * std``) over the training images' scores,
``observe(result)`` picks what it needs from an :class:`model.infer.InferenceResult`, ``score`` /
``is_ood`` as for the spectral gate; higher scores are further from the training data.

Every scorer also runs a study through the production path (:func:`observe_study`): the model's grid,
intensities and the body crop of :func:`model.study_inference.prepare_study` (what
:func:`model.study_inference.segment_volume` and the worker run), then the scorer's own passes over that
canvas: the same windows, perturbed, masked, per member or per block. :func:`fit_baseline` fits one from
training studies the same way. The scores run on the model's grid (the canvas), where the gate's signature
is taken too; nothing is brought back to the source grid.

=====================  ============================================  ==========================================
name                   score (per image)                             network(s)
=====================  ============================================  ==========================================
``max_softmax``        1 - mean max softmax on the predicted fg      the model
``entropy``            mean softmax entropy on the predicted fg      the model
``mc_dropout``         entropy of the mean of 10 dropout masks       the model trained with dropout 0.1
``ensemble``           entropy of the members' mean                  5 models, seeds 0-4
``mahalanobis``        min-class Mahalanobis distance, deepest map   the model
``odin``               1 - mean max tempered softmax, perturbed      the model
``dknn``               1 - DkNN credibility over 10 fg blocks        the model; training labels = datasets
``outlier_exposure``   as ``max_softmax``                            the model trained with ``outlier_weight``
=====================  ============================================  ==========================================

"Predicted foreground" (fg) is every voxel whose most probable class is not background; it falls back to
the whole canvas when nothing is predicted. Unlike the spectral gate's leave-one-out threshold, the
baselines take Eq. (2) over their in-sample training scores (DkNN: over its calibration images).

Left out: Lee-2017 (Lee, Lee, Lee & Shin, "Training confidence-calibrated classifiers for detecting
out-of-distribution samples", ICLR 2018; the paper's method (e)). Its classifier is trained with two
terms: a confidence loss, the KL divergence from the uniform distribution to the softmax on out-of-
distribution inputs, which is the term :func:`model.train.outlier_exposure_loss` already adds (with real
outliers, the other datasets), and a GAN whose generator is trained jointly, in alternation, to produce
"boundary" samples for that term. For us the generator would have to produce 96^3 medical volumes, its
adversarial training run beside the segmentation network's, and its stability be tuned on our data: a
second research project, on a machine (2 CPU cores) where no GAN of that size trains. Without the GAN,
Lee-2017 is outlier exposure with generated instead of real outliers, and the paper's own tables put it
at or below outlier exposure in every experiment (Tables V-VIII). Scored at test time it is MSP
(``max_softmax``) of that network, so adding it later needs only the trained weights.

Which networks: ``mc_dropout`` a model trained with ``TrainConfig(dropout=0.1)``; ``ensemble`` five
models trained with ``TrainConfig(seed=0)`` ... ``seed=4``; ``outlier_exposure`` a model trained with
``TrainConfig(outlier_weight=0.5)`` and ``train(..., outliers=TrainData of the other datasets)``; the
others the model itself.

>>> from model.data.phantoms import phantom_case
>>> from model.unet import SegNet
>>> net = SegNet(base_features=4, levels=2).eval()
>>> settings = InferenceSettings(block=16, overlap=4, spacing=(("CT", (8.0, 8.0, 8.0)),))
>>> train = [phantom_case("ct_liver", 2026, i) for i in range(3)]
>>> msp = fit_baseline("max_softmax", net, train, settings, c=2.5)
>>> study = phantom_case("ct_liver", 2026, 5000)
>>> score = msp.score(observe_study(msp, net, study.image, study.spacing, study.modality, settings))
>>> 0.0 <= score <= 1.0
True
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from model.baseline_inference import (
    DeepestMapNet,
    OdinNet,
    ensemble_inference,
    layer_features,
    mc_dropout_inference,
    sample_blocks,
)
from model.infer import InferenceResult, sliding_window
from model.ood import OODScorer, SpectralGate, fit_threshold
from model.study_inference import InferenceSettings, PreparedStudy, prepare_study

__all__ = [
    "BASELINES",
    "SCORERS",
    "ClassPooled",
    "DkNNScorer",
    "EnsembleScorer",
    "EntropyScorer",
    "MCDropoutScorer",
    "MahalanobisScorer",
    "MaxSoftmaxScorer",
    "OdinScorer",
    "OutlierExposureScorer",
    "ensemble_inference",
    "fit_baseline",
    "mc_dropout_inference",
    "observe_study",
]

Device = str | torch.device | None


def _fg_mask(probs: np.ndarray) -> np.ndarray:
    fg = probs.argmax(0) > 0
    return fg if fg.any() else np.ones(fg.shape, bool)


def _window_kwargs(settings: InferenceSettings, device: Device, prep: PreparedStudy,
                   signature: bool = True) -> dict[str, Any]:
    """The production windows' arguments of :func:`model.infer.sliding_window` (as ``_run_on_grid``);
    ``signature=False`` for a wrapped network (ODIN, Mahalanobis), whose signature nobody reads."""
    sig = settings.signature_arguments(prep.signature_mask) if signature else {"signature_mask": prep.signature_mask}
    return {"block": settings.block, "overlap": settings.overlap, "batch_size": settings.batch_size,
            "device": device, "amp": settings.precision == "bfloat16", "out_dtype": np.float32, **sig}


def _one_net(nets: Sequence[nn.Module], name: str) -> nn.Module:
    if len(nets) != 1:
        raise ValueError(f"{name} runs one network, got {len(nets)}")
    return nets[0]


class _ThresholdScorer(OODScorer):
    """A statistic per image, thresholded at mean + c * std of the training images' statistics.

    Subclasses keep their hyperparameters as constructor keywords (:meth:`params`); :meth:`fit` takes
    them too. :meth:`observe_prepared` runs the scorer's passes over a prepared study.
    """

    def __init__(self, tau: float = float("inf"), c: float = 2.5) -> None:
        self.tau = float(tau)
        self.c = float(c)

    def params(self) -> dict[str, Any]:
        """The constructor keywords besides ``tau`` and ``c`` (what :meth:`fit` needs to rebuild it)."""
        return {}

    def _fit_params(self, observations: list[Any], **fit_kwargs: Any) -> list[Any]:
        """Learn parameters from the training observations; return those whose scores set tau."""
        return observations

    @classmethod
    def fit(cls, observations: Sequence[Any], c: float = 2.5, **kwargs: Any) -> Any:
        """A fitted scorer: parameters from ``observations`` (one per training image), then tau by Eq. (2)
        over their scores. ``kwargs``: the constructor's hyperparameters (and DkNN's ``labels``)."""
        if len(observations) < 2:
            raise ValueError(f"need at least two training observations, got {len(observations)}")
        fit_kwargs = {k: kwargs.pop(k) for k in ("labels",) if k in kwargs}
        sc = cls(c=c, **kwargs)
        scored = sc._fit_params(list(observations), **fit_kwargs)
        sc.set_threshold(scored)
        return sc

    def set_threshold(self, observations: Sequence[Any]) -> None:
        """tau by Eq. (2) over the scores of ``observations`` (e.g. the training images observed again
        with a fitted perturbation)."""
        self.tau = fit_threshold(np.array([self.score(o) for o in observations]), self.c)

    # ---- the production path

    #: whether this scorer's observation of a study needs its fitted parameters (a perturbation towards them)
    observes_with_fit: ClassVar[bool] = False

    def infer(self, nets: Sequence[nn.Module], prep: PreparedStudy, settings: InferenceSettings,
              device: Device = None) -> InferenceResult:
        """The scorer's pass(es) over the prepared canvas: by default the production windows."""
        net = _one_net(nets, self.name)
        return sliding_window(net, prep.image, **_window_kwargs(settings, device, prep))

    def observe_prepared(self, nets: Sequence[nn.Module], prep: PreparedStudy, settings: InferenceSettings,
                         device: Device = None, fitting: bool = False) -> Any:
        return self.observe(self.infer(nets, prep, settings, device))


# --------------------------------------------------------------------------------------------------
# softmax statistics


def _max_softmax_score(probabilities: np.ndarray) -> float:
    p = np.asarray(probabilities, dtype=np.float64)
    return float(1.0 - p.max(0)[_fg_mask(p)].mean())


def _entropy_score(probabilities: np.ndarray) -> float:
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)
    h = -(p * np.log(p)).sum(0)
    return float(h[_fg_mask(p)].mean())


class MaxSoftmaxScorer(_ThresholdScorer):
    """Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017; the paper's [41]).

    Per voxel, ``max_k p_k`` is the confidence; the image's score is ``1 - mean(max_k p_k)`` over the
    predicted foreground (the paper's image-wise aggregate, section IV (a)), so that higher is more OOD.
    Observation: the ``(K, ...)`` probabilities.
    """

    name: ClassVar[str] = "max_softmax"

    def observe(self, result: InferenceResult) -> np.ndarray:
        return result.probabilities

    def score(self, probabilities: np.ndarray) -> float:
        return _max_softmax_score(probabilities)


class EntropyScorer(_ThresholdScorer):
    """Predictive entropy ``H(p) = -sum_k p_k log p_k`` per voxel (natural log), averaged over the
    predicted foreground: the uncertainty of the paper's section IV (a) (after Kendall & Gal, NeurIPS 2017,
    its [45]) of one deterministic pass. The paper writes ``H(p_bar) = -p_bar log(p_bar)``; we read it as
    the sum over the classes (for two classes, the binary entropy of the foreground probability), the
    entropy of a distribution. Observation: the ``(K, ...)`` probabilities."""

    name: ClassVar[str] = "entropy"

    def observe(self, result: InferenceResult) -> np.ndarray:
        return result.probabilities

    def score(self, probabilities: np.ndarray) -> float:
        return _entropy_score(probabilities)


class MCDropoutScorer(_ThresholdScorer):
    """UNC-Dropout (Gal & Ghahramani, ICML 2016; the paper's [45] and section IV (a)).

    The network is trained with dropout 0.1 in every layer (``TrainConfig(dropout=0.1)``); at test time
    ``n_masks`` = 10 dropout masks are drawn, and the score is the entropy of the mean probability
    ``H(p_bar) = -sum_k p_bar_k log p_bar_k``, averaged over the predicted foreground of ``p_bar``.
    Observe a result of :func:`mc_dropout_inference` (``observe_study`` runs it).
    """

    name: ClassVar[str] = "mc_dropout"

    def __init__(self, tau: float = float("inf"), c: float = 2.5, n_masks: int = 10, seed: int = 0) -> None:
        super().__init__(tau, c)
        if n_masks < 1:
            raise ValueError(f"n_masks must be >= 1, got {n_masks}")
        self.n_masks, self.seed = int(n_masks), int(seed)

    def params(self) -> dict[str, Any]:
        return {"n_masks": self.n_masks, "seed": self.seed}

    def observe(self, result: InferenceResult) -> np.ndarray:
        if result.mc_masks < 1:
            raise ValueError("mc_dropout needs a result of model.baselines.mc_dropout_inference")
        return result.probabilities

    def score(self, probabilities: np.ndarray) -> float:
        return _entropy_score(probabilities)

    def infer(self, nets: Sequence[nn.Module], prep: PreparedStudy, settings: InferenceSettings,
              device: Device = None) -> InferenceResult:
        net = _one_net(nets, self.name)
        return mc_dropout_inference(net, prep.image, self.n_masks, self.seed, **_window_kwargs(settings, device, prep))


class EnsembleScorer(_ThresholdScorer):
    """UNC-Ensemble: a deep ensemble (Lakshminarayanan, Pritzel & Blundell, NeurIPS 2017; the paper's [31]).

    ``members`` networks of the same architecture, trained on the same data from different random
    initialisations and block orders (``TrainConfig(seed=0..4)``); the prediction is the mean of their
    probabilities ``p_bar = (1/M) sum_m p_m`` and the score the entropy of ``p_bar`` averaged over its
    predicted foreground, as for UNC-Dropout (the paper scores both alike, [38]).

    How many: 5. Lakshminarayanan et al. use M = 5 in their experiments and show that most of the gain in
    NLL and in OOD entropy is reached by then; [38], which the paper cites for this method, trained 50,
    which the paper calls inefficient; the paper's time per study (15 s against 5 s for one model, section
    V) fits a handful. Each member costs a full training run, so 5 is also what a 2-core CPU can train.
    Lakshminarayanan's optional adversarial-training term is not used (the paper does not mention it).
    ``observe_study`` refuses another number of networks than ``members``.
    """

    name: ClassVar[str] = "ensemble"

    def __init__(self, tau: float = float("inf"), c: float = 2.5, members: int = 5) -> None:
        super().__init__(tau, c)
        if members < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {members}")
        self.members = int(members)

    def params(self) -> dict[str, Any]:
        return {"members": self.members}

    def observe(self, result: InferenceResult) -> np.ndarray:
        if result.members != self.members:
            raise ValueError(f"ensemble of {self.members} needs a result of ensemble_inference over as many "
                             f"networks, got {result.members}")
        return result.probabilities

    def score(self, probabilities: np.ndarray) -> float:
        return _entropy_score(probabilities)

    def infer(self, nets: Sequence[nn.Module], prep: PreparedStudy, settings: InferenceSettings,
              device: Device = None) -> InferenceResult:
        if len(nets) != self.members:
            raise ValueError(f"the ensemble has {self.members} members, got {len(nets)} networks")
        return ensemble_inference(nets, prep.image, **_window_kwargs(settings, device, prep))


class OdinScorer(_ThresholdScorer):
    """ODIN (Liang, Li & Srikant, ICLR 2018; the paper's [42], section IV (f)).

    The confidence of a voxel is the maximum tempered softmax ``max_k S_k(x~; T)``,
    ``S_k(x; T) = exp(f_k(x)/T) / sum_j exp(f_j(x)/T)``, of the perturbed input
    ``x~ = x - eps * sign(-grad_x log S_y^(x; T))`` (:class:`model.baseline_inference.OdinNet`: per window,
    every voxel towards its own predicted class). Score: ``1 - mean max_k S_k(x~; T)`` over the predicted
    foreground. ``T = 1000`` (Liang et al.'s choice for every network); ``eps = 0.0014`` (their
    CIFAR-10 value, for inputs of unit scale, as ours are: CT in [0, 1], MR divided by its std). Liang
    et al. tune ``eps`` on validation OOD data: do that on the validation range (``model.data.splits``).
    With two classes and ``T = 1000`` every tempered probability lies within a few 1e-4 of 0.5; only the
    ranking matters for Eq. (2) and the AUC.
    """

    name: ClassVar[str] = "odin"

    def __init__(self, tau: float = float("inf"), c: float = 2.5, temperature: float = 1000.0,
                 eps: float = 0.0014) -> None:
        super().__init__(tau, c)
        self.temperature, self.eps = float(temperature), float(eps)

    def params(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "eps": self.eps}

    def observe(self, result: InferenceResult) -> np.ndarray:
        return result.probabilities

    def score(self, probabilities: np.ndarray) -> float:
        return _max_softmax_score(probabilities)

    def infer(self, nets: Sequence[nn.Module], prep: PreparedStudy, settings: InferenceSettings,
              device: Device = None) -> InferenceResult:
        odin = OdinNet(_one_net(nets, self.name), self.temperature, self.eps)
        return sliding_window(odin, prep.image, **_window_kwargs(settings, device, prep, signature=False))


class OutlierExposureScorer(MaxSoftmaxScorer):
    """Outlier Exposure (Hendrycks, Mazeika & Dietterich, ICLR 2019; the paper's [64], section IV (d)).

    The method is in the training: ``model.train.train(..., outliers=...)`` with
    ``TrainConfig(outlier_weight=0.5)`` adds ``lambda * E_{x' ~ D_out}[KL(U || softmax f(x'))]``
    (:func:`model.train.outlier_exposure_loss`: cross-entropy to the uniform distribution, less its
    constant ``log K``) on blocks of the outlier datasets: every training dataset other than the
    in-distribution ones, as the paper does. At test time the score is Hendrycks et al.'s, the maximum
    softmax probability: ``1 - mean max_k p_k`` over the predicted foreground, of the OE-trained network.
    """

    name: ClassVar[str] = "outlier_exposure"


# --------------------------------------------------------------------------------------------------
# Mahalanobis (Lee et al. 2018)


@dataclass(frozen=True)
class ClassPooled:
    """Per predicted class, the mean feature vector over its voxels (``means``, (K, C)) and the voxel
    count (``counts``, (K,)); a class with count 0 is absent."""

    means: np.ndarray
    counts: np.ndarray

    @classmethod
    def from_result(cls, result: InferenceResult) -> ClassPooled:
        counts = np.asarray(result.class_counts, np.float64)
        sums = np.asarray(result.class_feature_sums, np.float64)
        return cls(sums / np.maximum(counts, 1e-12)[:, None], counts)

    def present(self) -> np.ndarray:
        return self.means[self.counts > 0]


class MahalanobisScorer(_ThresholdScorer):
    """Mah-Dist (Lee, Lee, Lee & Shin, NeurIPS 2018; the paper's [7], section IV (g)), on the deepest map.

    Features: the deepest (bottleneck) encoder map, average-pooled (as the paper does, "given the very
    large size of the feature maps") per predicted class: for an image and a class ``k`` it predicts,
    ``f_k`` = the mean of the deepest map over the voxels predicted ``k``, each coarse cell counted once
    per voxel of the input it covers (:class:`model.baseline_inference.DeepestMapNet`, stitched by the
    production windows). The samples of class ``k`` are the ``f_k`` of the training images that predict
    ``k``; classes come from the prediction, not the ground truth, so fitting and scoring see the same.

    Fit (Lee et al., Eq. 1): class means ``mu_k`` and one tied covariance
    ``Sigma = (1/N) sum_k sum_{i in k} (f_i - mu_k)(f_i - mu_k)^T``. The deepest map has more channels
    (8 x 14 = 112) than there are training images, so ``Sigma`` is singular; it is shrunk toward the
    identity times its mean variance, ``(1 - s) Sigma + s (tr Sigma / C) I``, ``s = shrinkage`` = 0.1
    (Lee et al. invert the empirical covariance of 50,000 images; with tens of volumes it has no inverse).

    Score (Lee et al., Eq. 2, negated): ``min_c (f_k - mu_c)^T Sigma^-1 (f_k - mu_c)`` (squared distance to
    the closest class mean) for each class ``k`` the image predicts, averaged over those classes.

    Input perturbation (Lee et al., Eq. 4): ``x~ = x - eps * sign(grad_x min_c D_c(x))``, per window
    (:class:`DeepestMapNet`), with the fitted means and precision: the observation of a study needs the
    fitted scorer (``observes_with_fit``). :func:`fit_baseline` fits the means and covariance on the clean
    training images (as Lee et al.) and tau on the same images observed perturbed (the scores a test
    study gets). ``eps = 0.0014``, as ODIN's; Lee et al. tune it on validation data.

    One layer: Lee et al.'s "feature ensemble" (the score at every layer, combined by a logistic
    regression fitted on validation OOD samples) is not used: it needs labelled OOD data to fit, which the
    paper's protocol does not give the competing methods, and the paper describes Mah-Dist by the single
    average-pooled map.
    """

    name: ClassVar[str] = "mahalanobis"
    observes_with_fit: ClassVar[bool] = True

    def __init__(self, tau: float = float("inf"), c: float = 2.5, shrinkage: float = 0.1, eps: float = 0.0014,
                 means: np.ndarray | None = None, precision: np.ndarray | None = None) -> None:
        super().__init__(tau, c)
        if not 0 <= shrinkage <= 1:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
        self.shrinkage, self.eps = float(shrinkage), float(eps)
        self.means = None if means is None else np.asarray(means, np.float64)
        self.precision = None if precision is None else np.asarray(precision, np.float64)

    def params(self) -> dict[str, Any]:
        return {"shrinkage": self.shrinkage, "eps": self.eps}

    @property
    def fitted(self) -> bool:
        return self.means is not None and self.precision is not None

    def _fit_params(self, observations: list[Any], **fit_kwargs: Any) -> list[Any]:
        obs: list[ClassPooled] = observations
        n_classes, n_channels = obs[0].means.shape
        means, resid = [], []
        for c in range(n_classes):
            xs = [o.means[c] for o in obs if o.counts[c] > 0]
            if not xs:  # a class no training image predicts: no mean, never the nearest
                means.append(np.full(n_channels, np.nan))
                continue
            means.append(np.mean(xs, axis=0))
            resid.append(np.stack(xs) - means[-1])
        r = np.concatenate(resid)
        cov = r.T @ r / len(r)
        target = np.eye(cov.shape[0]) * max(float(np.trace(cov)) / cov.shape[0], 1e-12)
        self.means = np.stack(means)
        self.precision = np.linalg.inv((1 - self.shrinkage) * cov + self.shrinkage * target)
        return obs

    def observe(self, result: InferenceResult) -> ClassPooled:
        return ClassPooled.from_result(result)

    def score(self, pooled: ClassPooled) -> float:
        if not self.fitted:
            raise ValueError("the Mahalanobis scorer is not fitted")
        assert self.means is not None and self.precision is not None
        f = pooled.present()
        if len(f) == 0:
            raise ValueError("the observation has no predicted class")
        mu = self.means[~np.isnan(self.means).any(1)]
        d = f[:, None, :] - mu[None]  # (present, classes, C)
        d2 = np.einsum("kjc,cd,kjd->kj", d, self.precision, d)
        return float(d2.min(axis=1).mean())

    def infer(self, nets: Sequence[nn.Module], prep: PreparedStudy, settings: InferenceSettings,
              device: Device = None) -> InferenceResult:
        net = _one_net(nets, self.name)
        wrap = DeepestMapNet(net)
        if self.fitted and self.eps > 0:
            assert self.means is not None
            wrap = DeepestMapNet(net, self.means[~np.isnan(self.means).any(1)], self.precision, self.eps)
        return sliding_window(wrap, prep.image, **_window_kwargs(settings, device, prep, signature=False))


# --------------------------------------------------------------------------------------------------
# DkNN (Papernot & McDaniel 2018)


@dataclass(frozen=True)
class BlockFeatures:
    """Average-pooled features of ``n`` blocks of one image at every layer: ``layers[l]`` is (n, C_l)."""

    layers: tuple[np.ndarray, ...]

    @property
    def n_blocks(self) -> int:
        return int(self.layers[0].shape[0])


class DkNNScorer(_ThresholdScorer):
    """Deep k-nearest neighbours (Papernot & McDaniel 2018; the paper's [44], sections II-C and IV (c)).

    Papernot's algorithm: for an input, find its ``k`` nearest training samples in the representation of
    every layer ``l`` (``Omega_l``, with their labels); nonconformity with label ``j`` is
    ``alpha(x, j) = sum_l |{i in Omega_l : label(i) != j}|``; with ``A`` the nonconformities of a held-out
    calibration set at their true labels, ``p_j(x) = |{a in A : a >= alpha(x, j)}| / |A|``; the
    prediction is ``argmax_j p_j`` and its *credibility* ``max_j p_j``. (The paper writes ``>`` for
    ``>=``; we follow Papernot's Algorithm 1.) ``k = 75`` (Papernot's), or every training sample when
    there are fewer.

    The paper's adaptation to segmentation, which we follow: the samples are blocks and the labels are
    the training *datasets* ("can only be applied when the training set has more than one class"); 20 %
    of the training images are the calibration set; each image gives 100 samples by augmentation; a test
    image gives 10 blocks overlapping its predicted foreground, and its credibility is the mean over them
    of ``p(x, j')``, ``j'`` the label most of its blocks predict. Ours: a block is a ``settings.block``
    cube around a voxel drawn from the predicted foreground of the production windows (the body canvas);
    training blocks are augmented by the training augmentation (flips, quarter turns, noise); each layer's
    representation is the block's feature map average-pooled over space, at every encoder and decoder
    stage (:func:`model.baseline_inference.layer_features`); distances are Euclidean, found exactly.
    Score: ``1 - credibility``. tau: Eq. (2) over the calibration images' scores (their blocks are also
    in ``A``, which makes tau a little tight; each is scored on its first ``test_blocks`` blocks, as many
    as a test image gives).

    :meth:`fit` takes ``labels``: the dataset of each training observation.
    """

    name: ClassVar[str] = "dknn"

    def __init__(self, tau: float = float("inf"), c: float = 2.5, k: int = 75, train_blocks: int = 100,
                 test_blocks: int = 10, calibration_fraction: float = 0.2, seed: int = 0) -> None:
        super().__init__(tau, c)
        if k < 1 or train_blocks < 1 or test_blocks < 1:
            raise ValueError(f"k, train_blocks and test_blocks must be >= 1, got {k}, {train_blocks}, {test_blocks}")
        if not 0 < calibration_fraction < 1:
            raise ValueError(f"calibration_fraction must be in (0, 1), got {calibration_fraction}")
        self.k, self.train_blocks, self.test_blocks = int(k), int(train_blocks), int(test_blocks)
        self.calibration_fraction, self.seed = float(calibration_fraction), int(seed)
        self.train_layers: list[np.ndarray] = []
        self.train_labels = np.zeros(0, int)
        self.label_names: list[str] = []
        self.calibration = np.zeros(0)

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "train_blocks": self.train_blocks, "test_blocks": self.test_blocks,
                "calibration_fraction": self.calibration_fraction, "seed": self.seed}

    def _fit_params(self, observations: list[Any], **fit_kwargs: Any) -> list[Any]:
        labels = fit_kwargs.get("labels")
        if labels is None or len(labels) != len(observations):
            raise ValueError("DkNN needs labels: the training dataset of each observation")
        self.label_names = sorted({str(x) for x in labels})
        if len(self.label_names) < 2:
            raise ValueError(f"DkNN needs training images of at least two datasets, got {self.label_names}")
        lab = np.array([self.label_names.index(str(x)) for x in labels])
        # the calibration images: a seeded 20 % of each dataset (at least one), the rest is the kNN set
        rng = np.random.default_rng(self.seed)
        cal = np.zeros(len(observations), bool)
        for j in range(len(self.label_names)):
            idx = rng.permutation(np.flatnonzero(lab == j))
            if len(idx) < 2:
                raise ValueError(f"dataset {self.label_names[j]!r} has {len(idx)} training image(s); DkNN needs "
                                 "two (one for the kNN set, one for calibration)")
            cal[idx[:max(1, round(self.calibration_fraction * len(idx)))]] = True
        tr = [o for o, m in zip(observations, cal, strict=True) if not m]
        self.train_layers = [np.concatenate([o.layers[i] for o in tr]) for i in range(len(tr[0].layers))]
        self.train_labels = np.concatenate([np.full(o.n_blocks, j) for o, j in zip(tr, lab[~cal], strict=True)])
        cal_obs = [o for o, m in zip(observations, cal, strict=True) if m]
        self.calibration = np.concatenate([self._alpha(o)[:, j] for o, j in zip(cal_obs, lab[cal], strict=True)])
        # tau: the calibration images scored as a test image is, on as many blocks
        return [BlockFeatures(tuple(x[:self.test_blocks] for x in o.layers)) for o in cal_obs]

    def _alpha(self, obs: BlockFeatures) -> np.ndarray:
        """Nonconformity ``alpha(block, j)`` of each block with each label: (n_blocks, labels)."""
        n_labels = len(self.label_names)
        alpha = np.zeros((obs.n_blocks, n_labels))
        k = min(self.k, len(self.train_labels))
        for feats, train in zip(obs.layers, self.train_layers, strict=True):
            d = ((feats[:, None, :] - train[None]) ** 2).sum(-1)
            nn_idx = np.argsort(d, axis=1, kind="stable")[:, :k]
            counts = np.stack([(self.train_labels[nn_idx] == j).sum(1) for j in range(n_labels)], 1)
            alpha += k - counts
        return alpha

    def credibility(self, obs: BlockFeatures) -> tuple[float, str]:
        """(mean over the blocks of ``p(x, j')``, ``j'``): ``j'`` the label most blocks predict."""
        if not self.label_names:
            raise ValueError("the DkNN scorer is not fitted")
        alpha = self._alpha(obs)
        p = (self.calibration[None, None, :] >= alpha[..., None]).mean(-1)  # (blocks, labels)
        votes = np.bincount(p.argmax(1), minlength=len(self.label_names))
        j = int(votes.argmax())
        return float(p[:, j].mean()), self.label_names[j]

    def observe(self, result: Any) -> BlockFeatures:
        raise ValueError("DkNN observes blocks of a study, not a sliding-window result: use observe_study")

    def score(self, obs: BlockFeatures) -> float:
        return 1.0 - self.credibility(obs)[0]

    def observe_prepared(self, nets: Sequence[nn.Module], prep: PreparedStudy, settings: InferenceSettings,
                         device: Device = None, fitting: bool = False) -> BlockFeatures:
        from model.train import AugmentParams, apply_augmentation, draw_augmentation

        net = _one_net(nets, self.name)
        res = sliding_window(net, prep.image, **_window_kwargs(settings, device, prep))
        fg = res.probabilities.argmax(0) > 0
        rng = np.random.default_rng(self.seed)
        n = self.train_blocks if fitting else self.test_blocks
        blocks = sample_blocks(prep.image, fg, n, settings.block, rng, int(getattr(net, "divisor", 1)))
        if fitting:  # "100 data samples via augmentation": the training augmentation of each block
            aug = []
            for b in blocks:
                a = draw_augmentation(rng)
                if len(set(b.shape)) != 1:  # a block cut by a small canvas: quarter turns need a cube
                    a = AugmentParams(a.flips, (0, 0, 0), a.noise_std, a.noise_seed)
                t = torch.from_numpy(b)
                aug.append(apply_augmentation(t, t, a)[0].numpy())
            blocks = aug
        return BlockFeatures(tuple(layer_features(net, blocks, device, settings.batch_size)))


# --------------------------------------------------------------------------------------------------
# the production path


class _Study(Protocol):
    image: np.ndarray
    spacing: tuple[float, float, float]
    modality: str


def observe_study(scorer: OODScorer | str, nets: nn.Module | Sequence[nn.Module], image: np.ndarray,
                  spacing: Sequence[float], modality: str, settings: InferenceSettings, *,
                  device: Device = None, fitting: bool = False) -> Any:
    """The observation ``scorer`` needs of one study, through the production path.

    :func:`model.study_inference.prepare_study` (the model's grid, intensities, body crop: what the worker
    runs) and then the scorer's passes over that canvas with ``settings``' windows. ``scorer``: a
    (fitted) scorer, or a name of :data:`SCORERS` for an unfitted one with default parameters (for
    Mahalanobis: the clean observation its fit takes; a fitted one observes with its input perturbation;
    for ``"spectral"``: the signature). ``nets``: the network, or the
    ensemble's members. ``fitting``: the study is a training image (DkNN draws its augmented training
    blocks). The spectral gate's observation is the signature, as ``segment_volume`` gives it.
    """
    sc: OODScorer | None
    if isinstance(scorer, str):
        if scorer not in SCORERS:
            raise ValueError(f"unknown scorer {scorer!r}; known: {sorted(SCORERS)}")
        cls = SCORERS[scorer]
        sc = cls() if issubclass(cls, _ThresholdScorer) else None
    else:
        sc = scorer
    members = [nets] if isinstance(nets, nn.Module) else list(nets)
    prep = prepare_study(image, spacing, modality, settings)
    if isinstance(sc, _ThresholdScorer):
        return sc.observe_prepared(members, prep, settings, device, fitting)
    # the spectral gate: the signature of the production windows (what segment_volume gives)
    res = sliding_window(_one_net(members, "spectral"), prep.image, **_window_kwargs(settings, device, prep))
    return res.signature if sc is None else sc.observe(res)


def fit_baseline(scorer: str | type[_ThresholdScorer], nets: nn.Module | Sequence[nn.Module],
                 studies: Iterable[_Study], settings: InferenceSettings, c: float = 2.5, *,
                 labels: Sequence[str] | None = None, device: Device = None, **params: Any) -> _ThresholdScorer:
    """A baseline fitted on training ``studies`` (objects with ``image``, ``spacing``, ``modality``, e.g.
    :class:`model.data.phantoms.PhantomCase`), each observed through :func:`observe_study`.

    ``params``: the scorer's hyperparameters (e.g. ``members=5``, ``eps=0.002``, ``k=75``). ``labels``:
    each study's training dataset (DkNN only). A scorer whose observation needs its fit (Mahalanobis with
    ``eps > 0``) is fitted on the clean observations and its tau set on the studies observed again with
    the fitted perturbation.
    """
    cls = SCORERS[scorer] if isinstance(scorer, str) else scorer
    if not (isinstance(cls, type) and issubclass(cls, _ThresholdScorer)):
        raise ValueError(f"{scorer!r} is not a baseline; the spectral gate is fitted by model.bank_fit")
    studies = list(studies)
    proto = cls(**params)
    obs = [observe_study(proto, nets, s.image, s.spacing, s.modality, settings, device=device, fitting=True)
           for s in studies]
    fitted = cls.fit(obs, c=c, **({"labels": labels} if labels is not None else {}), **proto.params())
    if cls.observes_with_fit:
        again = [observe_study(fitted, nets, s.image, s.spacing, s.modality, settings, device=device)
                 for s in studies]
        fitted.set_threshold(again)
    return fitted


BASELINES: tuple[type[_ThresholdScorer], ...] = (
    MaxSoftmaxScorer, EntropyScorer, MCDropoutScorer, EnsembleScorer, MahalanobisScorer, OdinScorer, DkNNScorer,
    OutlierExposureScorer)
SCORERS: dict[str, type[OODScorer]] = {SpectralGate.name: SpectralGate, **{c.name: c for c in BASELINES}}
