"""Baseline OOD scorers (paper section III-D (a), (e), (g)), with the gate's interface.

Every scorer is an :class:`model.ood.OODScorer`: ``Scorer.fit(train_observations, c=2.5)`` returns a
fitted scorer whose ``tau`` is Eq. (2) over the training images' scores, ``observe(result)`` picks what it
needs from an :class:`model.infer.InferenceResult`, ``score`` / ``is_ood`` as for the spectral gate.

- ``max_softmax``: 1 - mean max-softmax probability over the predicted foreground (Hendrycks & Gimpel).
- ``entropy``: mean voxel entropy of the probabilities over the predicted foreground.
- ``mc_dropout``: the same entropy of the mean of ``n_masks`` (10) dropout passes of a network trained with
  dropout (0.1): use :func:`mc_dropout_inference` to get the result to observe (UNC-Dropout).
- ``mahalanobis``: Mahalanobis distance of the average-pooled last feature map (mean feature per predicted
  class, concatenated) to the training images' Gaussian (shared covariance, shrunk toward its diagonal's
  mean so it is invertible with few images) (Mah-Dist).

The predicted foreground falls back to the whole image when nothing is predicted. Unlike the spectral
gate's leave-one-out threshold, these use the in-sample training scores for Eq. (2).

``SCORERS`` maps names to classes: ``SCORERS["spectral"]`` is :class:`model.ood.SpectralGate`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from model.infer import InferenceResult, sliding_window
from model.ood import OODScorer, SpectralGate, fit_threshold

__all__ = [
    "BASELINES",
    "SCORERS",
    "EntropyScorer",
    "MCDropoutScorer",
    "MahalanobisScorer",
    "MaxSoftmaxScorer",
    "mc_dropout_inference",
]


def _fg_mask(probs: np.ndarray) -> np.ndarray:
    fg = probs.argmax(0) > 0
    return fg if fg.any() else np.ones(fg.shape, bool)


class _ThresholdScorer(OODScorer):
    """A statistic per image, thresholded at mean + c * std of the training images' statistics."""

    def __init__(self, tau: float = float("inf"), c: float = 2.5) -> None:
        self.tau = float(tau)
        self.c = float(c)

    def _fit_params(self, observations: list[Any]) -> None:  # noqa: B027 - optional hook
        """Learn parameters from the training observations (before the threshold is computed)."""

    @classmethod
    def fit(cls, observations: list[Any], c: float = 2.5, **kwargs: Any) -> Any:
        if len(observations) < 2:
            raise ValueError(f"need at least two training observations, got {len(observations)}")
        sc = cls(c=c, **kwargs)
        sc._fit_params(list(observations))
        sc.tau = fit_threshold(np.array([sc.score(o) for o in observations]), c)
        return sc


class MaxSoftmaxScorer(_ThresholdScorer):
    name: ClassVar[str] = "max_softmax"

    def observe(self, result: InferenceResult) -> np.ndarray:
        return result.probabilities

    def score(self, probabilities: np.ndarray) -> float:
        p = np.asarray(probabilities, dtype=np.float64)
        return float(1.0 - p.max(0)[_fg_mask(p)].mean())


def _entropy_score(probabilities: np.ndarray) -> float:
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)
    h = -(p * np.log(p)).sum(0)
    return float(h[_fg_mask(p)].mean())


class EntropyScorer(_ThresholdScorer):
    name: ClassVar[str] = "entropy"

    def observe(self, result: InferenceResult) -> np.ndarray:
        return result.probabilities

    def score(self, probabilities: np.ndarray) -> float:
        return _entropy_score(probabilities)


class MCDropoutScorer(_ThresholdScorer):
    """Entropy of the MC-dropout mean; observe a result of :func:`mc_dropout_inference`."""

    name: ClassVar[str] = "mc_dropout"

    def observe(self, result: InferenceResult) -> np.ndarray:
        if not result_is_mc(result):
            raise ValueError("mc_dropout needs a result of model.baselines.mc_dropout_inference")
        return result.probabilities

    def score(self, probabilities: np.ndarray) -> float:
        return _entropy_score(probabilities)


class MahalanobisScorer(_ThresholdScorer):
    name: ClassVar[str] = "mahalanobis"

    def __init__(self, tau: float = float("inf"), c: float = 2.5, shrinkage: float = 0.1) -> None:
        super().__init__(tau, c)
        self.shrinkage = float(shrinkage)
        self.mean = np.zeros(0)
        self.precision: np.ndarray = np.zeros((0, 0))

    def _fit_params(self, observations: list[Any]) -> None:
        x = np.stack([np.asarray(o, dtype=np.float64).ravel() for o in observations])
        self.mean = x.mean(0)
        cov = np.cov(x, rowvar=False, bias=True).reshape(x.shape[1], x.shape[1])
        target = np.eye(cov.shape[0]) * max(float(np.trace(cov)) / cov.shape[0], 1e-12)
        self.precision = np.linalg.inv((1 - self.shrinkage) * cov + self.shrinkage * target)

    def observe(self, result: InferenceResult) -> np.ndarray:
        return result.pooled_features()

    def score(self, pooled: np.ndarray) -> float:
        d = np.asarray(pooled, dtype=np.float64).ravel() - self.mean
        return float(np.sqrt(max(float(d @ self.precision @ d), 0.0)))


def result_is_mc(result: InferenceResult) -> bool:
    return result.mc_masks > 0


def mc_dropout_inference(
    net: nn.Module, volume: np.ndarray, n_masks: int = 10, seed: int = 0, **kwargs: Any
) -> InferenceResult:
    """Mean probabilities of ``n_masks`` sliding-window passes with dropout on (the rest in eval mode).

    The signature and features of the result are those of the last pass. ``seed`` fixes the masks.
    """
    drops = [m for m in net.modules() if isinstance(m, nn.Dropout | nn.Dropout3d)]
    if not drops:
        raise ValueError("the network has no dropout layers; build it with SegNet(dropout=0.1) and train it so")
    if n_masks < 1:
        raise ValueError(f"n_masks must be >= 1, got {n_masks}")
    was = [m.training for m in drops]
    torch.manual_seed(seed)
    try:
        for m in drops:
            m.train()
        total: np.ndarray | None = None
        res: InferenceResult | None = None
        for _ in range(n_masks):
            res = sliding_window(net, volume, **kwargs)
            p = res.probabilities.astype(np.float64)
            total = p if total is None else total + p
    finally:
        for m, w in zip(drops, was, strict=True):
            m.train(w)
    assert res is not None and total is not None
    res.probabilities = (total / n_masks).astype(res.probabilities.dtype)
    res.mc_masks = n_masks
    return res


BASELINES: tuple[type[_ThresholdScorer], ...] = (MaxSoftmaxScorer, EntropyScorer, MCDropoutScorer, MahalanobisScorer)
SCORERS: dict[str, type[OODScorer]] = {SpectralGate.name: SpectralGate, **{c.name: c for c in BASELINES}}
