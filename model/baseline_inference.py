"""The network passes the baseline OOD scorers need (:mod:`model.baselines`), beside the production one.

Each runs on the same preprocessed canvas as the production windows (:func:`model.study_inference.prepare_study`)
and, where it can, through :func:`model.infer.sliding_window` itself: a baseline that changes the forward
pass (ODIN's tempered softmax of a perturbed input, the Mahalanobis scorer's deepest map) is a small
module wrapping the network that ``sliding_window`` runs like any other, so windows, stitching and the
per-class feature sums are the production ones.

- :func:`mc_dropout_inference`: the mean of ``n_masks`` passes with dropout on (Gal & Ghahramani 2016).
- :func:`ensemble_inference`: the mean of the members' passes (Lakshminarayanan et al. 2017).
- :class:`OdinNet`: input perturbation and temperature scaling (Liang et al. 2018).
- :class:`DeepestMapNet`: the deepest encoder map, nearest-upsampled to the input's voxels, with the
  Mahalanobis input perturbation (Lee et al. 2018).
- :func:`layer_features`, :func:`sample_blocks`: average-pooled features of every stage of blocks around
  the predicted foreground (DkNN, Papernot & McDaniel 2018).

Autograd: the two perturbations need the gradient of a score with respect to the input, while
``sliding_window`` runs under ``torch.inference_mode``. The wrappers leave inference mode for their own
forward pass (``torch.inference_mode(False)`` and ``torch.enable_grad()``), on a copy of the window made
outside it; what they return is detached, so nothing of autograd leaks into the stitching.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.infer import InferenceResult, sliding_window

__all__ = ["DeepestMapNet", "OdinNet", "deepest_module", "ensemble_inference", "layer_features", "layer_modules",
           "mc_dropout_inference", "sample_blocks"]


def mc_dropout_inference(
    net: nn.Module, volume: np.ndarray, n_masks: int = 10, seed: int = 0, **kwargs: Any
) -> InferenceResult:
    """Mean probabilities of ``n_masks`` sliding-window passes with dropout on (the rest in eval mode).

    The signature and features of the result are those of the last pass. ``seed`` fixes the masks.
    ``kwargs`` go to :func:`model.infer.sliding_window`.
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


def ensemble_inference(nets: Sequence[nn.Module], volume: np.ndarray, **kwargs: Any) -> InferenceResult:
    """Mean probabilities of one sliding-window pass of each member (each in the mode it is in: eval).

    The signature and features of the result are those of the first member. ``kwargs`` go to
    :func:`model.infer.sliding_window`.
    """
    if len(nets) < 1:
        raise ValueError("an ensemble needs at least one member")
    total: np.ndarray | None = None
    first: InferenceResult | None = None
    for net in nets:
        res = sliding_window(net, volume, **kwargs)
        p = res.probabilities.astype(np.float64)
        total = p if total is None else total + p
        first = first or res
    assert first is not None and total is not None
    first.probabilities = (total / len(nets)).astype(first.probabilities.dtype)
    first.members = len(nets)
    return first


def _grad_step(x: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor], eps: float) -> torch.Tensor:
    """``x - eps * sign(d objective / d x)``, computed outside inference mode; ``x`` unchanged, result detached."""
    if eps == 0:
        return x
    with torch.inference_mode(False), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(xg), xg)
    return (x - eps * torch.sign(grad).to(x.dtype)).detach()


class _Wrapper(nn.Module):
    """A network run by :func:`model.infer.sliding_window` in place of ``net`` (same divisor, device)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    @property
    def divisor(self) -> int:
        return int(getattr(self.net, "divisor", 1))


class OdinNet(_Wrapper):
    """ODIN (Liang, Li & Srikant, ICLR 2018, Eqs. 1-2), per voxel, for :func:`model.infer.sliding_window`.

    Temperature scaling: ``S_i(x; T) = exp(f_i(x) / T) / sum_j exp(f_j(x) / T)``. Input perturbation:
    ``x~ = x - eps * sign(-grad_x log S_y^(x; T))``, ``y^`` the predicted class. A segmentation network
    predicts a class per voxel; the objective whose gradient is taken is the sum over the window's voxels
    of ``log S_y^(x; T)`` at each voxel's own predicted class, so one step moves every voxel towards its
    prediction (the paper's "pushes the image in the direction that increases its predicted class"). The
    forward returns the tempered logits ``f(x~) / T`` (``sliding_window``'s softmax of them is ``S(x~; T)``)
    and the last decoder features of ``x~``.
    """

    def __init__(self, net: nn.Module, temperature: float = 1000.0, eps: float = 0.0014) -> None:
        super().__init__(net)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.temperature, self.eps = float(temperature), float(eps)

    def _objective(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(self.net(x).float() / self.temperature, dim=1)
        return logp.max(dim=1).values.sum()  # the max log-softmax is the predicted class's

    def forward(self, x: torch.Tensor, return_features: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        xp = _grad_step(x, lambda xg: -self._objective(xg), self.eps)  # x - eps*sign(-grad log S)
        logits, feats = self.net(xp, return_features=True)
        return logits.float() / self.temperature, feats


def deepest_module(net: nn.Module) -> nn.Module:
    """The module whose output is the network's deepest (coarsest) map: a SegNet's last encoder stage."""
    encoders = getattr(net, "encoders", None)
    if not isinstance(encoders, nn.ModuleList) or len(encoders) == 0:
        raise ValueError(f"{type(net).__name__} has no encoder stages (`encoders`) to take the deepest map from")
    return encoders[-1]


def layer_modules(net: nn.Module) -> list[nn.Module]:
    """The stages whose outputs DkNN reads: every encoder stage and every decoder stage of a SegNet."""
    mods = list(getattr(net, "encoders", [])) + list(getattr(net, "decoders", []))
    if not mods:
        raise ValueError(f"{type(net).__name__} has no encoder/decoder stages to read features from")
    return mods


def _capture(modules: Sequence[nn.Module], run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``run()`` with the outputs of ``modules`` captured by forward hooks (removed afterwards)."""
    got: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, i=i: got.__setitem__(i, out))
               for i, m in enumerate(modules)]
    try:
        out = run()
    finally:
        for h in handles:
            h.remove()
    return out, [got[i] for i in range(len(modules))]


def _class_pooled(deep: torch.Tensor, pred: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, the mean of the deepest map ``deep`` (B, C, d, h, w) over the input voxels predicted
    that class (``pred``, (B, D, H, W), each coarse cell weighted by its share of them): ``(B, K, C)``
    means and ``(B, K)`` voxel counts."""
    onehot = F.one_hot(pred.long(), k).permute(0, 4, 1, 2, 3).to(deep.dtype)  # (B, K, D, H, W)
    frac = F.adaptive_avg_pool3d(onehot, tuple(int(n) for n in deep.shape[2:]))  # type: ignore[arg-type]  # (B, K, d, h, w): share of each cell
    scale = float(np.prod(pred.shape[1:])) / float(np.prod(deep.shape[2:]))  # voxels per cell
    sums = torch.einsum("bkxyz,bcxyz->bkc", frac, deep) * scale
    counts = frac.sum(dim=(2, 3, 4)) * scale
    return sums / counts.clamp_min(1e-12)[..., None], counts


class DeepestMapNet(_Wrapper):
    """The deepest encoder map for :func:`model.infer.sliding_window`, with Lee et al.'s input perturbation.

    The forward returns the logits and the deepest map nearest-upsampled to the input's voxels, so the
    result's ``class_feature_sums`` / ``class_counts`` are, per predicted class, the sum of the deepest
    map over the voxels predicted that class (each coarse cell counted once per voxel it covers): average
    pooling of the deepest map per predicted class, stitched as production stitches. The cost: the
    upsampled map of a 96^3 window of the shipped network holds 112 channels (400 MB in float32 per window
    of a batch); measured on a CPU with the shipped weights, a liver phantom took 1.8 s clean and 3.3 s
    perturbed, against 1.3 s for the production windows.

    With ``eps > 0`` and fitted class means ``means`` (K, C) and tied ``precision`` (C, C) (Lee, Lee, Lee &
    Shin, NeurIPS 2018, Eq. 4): ``x~ = x - eps * sign(grad_x sum_k min_c (f_k - mu_c)^T Sigma^-1 (f_k - mu_c))``,
    ``f_k`` the window's deepest map pooled over its voxels predicted class ``k`` (the classes present),
    i.e. every window is moved to make its pooled features closer to the nearest class mean, and the
    features returned are those of ``x~``.
    """

    def __init__(self, net: nn.Module, means: np.ndarray | None = None, precision: np.ndarray | None = None,
                 eps: float = 0.0) -> None:
        super().__init__(net)
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if eps > 0 and (means is None or precision is None):
            raise ValueError("input perturbation needs the fitted class means and precision")
        self.eps = float(eps)
        self.deepest = deepest_module(net)
        self._means = None if means is None else torch.as_tensor(np.asarray(means), dtype=torch.float32)
        self._precision = None if precision is None else torch.as_tensor(np.asarray(precision), dtype=torch.float32)

    def _objective(self, x: torch.Tensor) -> torch.Tensor:
        assert self._means is not None and self._precision is not None
        logits, (deep,) = _capture([self.deepest], lambda: self.net(x))
        pred = logits.argmax(1)
        pooled, counts = _class_pooled(deep.float(), pred, logits.shape[1])  # (B, K, C), (B, K)
        mu, prec = self._means.to(x.device), self._precision.to(x.device)
        d = pooled[:, :, None, :] - mu[None, None]  # (B, K, K', C)
        d2 = torch.einsum("bkjc,cd,bkjd->bkj", d, prec, d).min(dim=2).values  # (B, K)
        return (d2 * (counts > 0)).sum()

    def forward(self, x: torch.Tensor, return_features: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        xp = _grad_step(x, self._objective, self.eps)
        logits, (deep,) = _capture([self.deepest], lambda: self.net(xp))
        return logits, F.interpolate(deep, size=tuple(x.shape[2:]), mode="nearest")


def sample_blocks(image: np.ndarray, where: np.ndarray, n: int, block: int, rng: np.random.Generator,
                  divisor: int = 1) -> list[np.ndarray]:
    """``n`` blocks of ``image`` (D, H, W), each holding a voxel of ``where`` (drawn uniformly; every voxel
    when ``where`` is empty) at a uniformly drawn position inside it; an axis shorter than ``block`` is
    zero-padded at the end to a multiple of ``divisor``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    pts = np.argwhere(where) if where.any() else np.argwhere(np.ones(image.shape, bool))
    size = [min(block, -(-s // divisor) * divisor) for s in image.shape]
    img = np.pad(image, [(0, max(0, b - s)) for b, s in zip(size, image.shape, strict=True)])
    out = []
    for p in pts[rng.integers(len(pts), size=n)]:
        lo = [int(np.clip(c - rng.integers(b), 0, s - b)) for c, b, s in zip(p, size, img.shape, strict=True)]
        out.append(np.ascontiguousarray(img[tuple(slice(a, a + b) for a, b in zip(lo, size, strict=True))]))
    return out


@torch.inference_mode()
def layer_features(net: nn.Module, blocks: Sequence[np.ndarray], device: str | torch.device | None = None,
                   batch_size: int = 1) -> list[np.ndarray]:
    """For each of :func:`layer_modules`, the blocks' average-pooled features: ``[(n_blocks, C_l)]``."""
    mods = layer_modules(net)
    dev = torch.device(device) if device is not None else next(net.parameters()).device
    per_layer: list[list[np.ndarray]] = [[] for _ in mods]
    for i in range(0, len(blocks), batch_size):
        x = torch.from_numpy(np.stack(blocks[i:i + batch_size]).astype(np.float32)[:, None]).to(dev)
        _, outs = _capture(mods, partial(net, x))
        for acc, o in zip(per_layer, outs, strict=True):
            acc.append(o.float().mean(dim=(2, 3, 4)).cpu().numpy().astype(np.float64))
    return [np.concatenate(a) for a in per_layer]
