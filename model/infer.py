"""Sliding-window inference with a streaming spectral signature, in one pass.

Windows and stitching
    Along each axis, windows of ``block`` voxels start every ``block - overlap`` voxels; the last one is
    shifted back to end at the edge of the volume (the paper's text: 24 voxels of overlap, stride 72; the
    authors' public code instead shifts windows by 24 voxels, i.e. ``overlap=72``). An axis shorter than
    ``block`` gets one window, ``block`` shrunk to the axis length rounded up to the network's divisor and
    zero-padded at the end.

    Every voxel is *owned* by exactly one window: where two windows overlap, the boundary between them is
    the middle of the overlap, so each window keeps its central part and drops the margins where its
    receptive field is cut off (center-crop stitching; no averaging). The stitched probability and feature
    maps therefore take every voxel from one window.

Streaming signature
    Because stitching assigns each voxel to one window, the rows of the stitched ``(voxels, C)`` feature
    matrix are the disjoint union of the owned rows of the windows, and its Gram matrix is the *sum* of the
    windows' owned-region Gram matrices: ``F^T F = sum_w F_w^T F_w``, exactly, up to the order of the
    float64 additions. The full-volume feature map never exists; the signature is taken from the *mean*
    Gram ``F^T F / N`` (see :mod:`model.ood` for why the mean), where ``N`` and the sum run over the voxels
    of ``signature_mask`` (default: every voxel). With averaging stitching this would not hold (the Gram
    of averaged rows is not a sum of per-window Grams).

Memory
    The output is one preallocated ``(num_classes, D, H, W)`` array (``out_dtype``, float32 by default;
    float16 halves it), plus one batch of windows at a time.

>>> import numpy as np, torch
>>> from model.unet import SegNet
>>> net = SegNet(base_features=4, levels=2).eval()
>>> r = sliding_window(net, np.zeros((20, 16, 16), np.float32), block=16, overlap=4)
>>> r.probabilities.shape, r.signature.shape
((2, 20, 16, 16), (4,))
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from model.ood import signature_from_gram

__all__ = ["InferenceResult", "Window", "axis_windows", "plan_windows", "sliding_window"]


@dataclass(frozen=True)
class Window:
    """One window: where it reads (``start``/``size`` in the padded volume) and what it owns."""

    start: tuple[int, int, int]
    size: tuple[int, int, int]
    own_lo: tuple[int, int, int]  # owned region, volume coordinates
    own_hi: tuple[int, int, int]

    def read_slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(s, s + n) for s, n in zip(self.start, self.size, strict=True))  # type: ignore[return-value]

    def own_slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(lo, hi) for lo, hi in zip(self.own_lo, self.own_hi, strict=True))  # type: ignore[return-value]

    def local_own_slices(self) -> tuple[slice, slice, slice]:
        return tuple(
            slice(lo - s, hi - s) for lo, hi, s in zip(self.own_lo, self.own_hi, self.start, strict=True)
        )  # type: ignore[return-value]


@dataclass
class InferenceResult:
    """What one sliding-window pass produces.

    ``probabilities``: ``(num_classes, D, H, W)``. ``signature``: the spectral signature (float64).
    ``gram``: the accumulated ``C x C`` float64 Gram matrix (a sum) of the stitched feature map over the
    ``n_signature_voxels`` voxels of the signature mask.
    ``class_feature_sums`` / ``class_counts``: sum of feature vectors and voxel count per predicted class
    (the Mahalanobis baseline runs the windows with the deepest map as the features,
    :class:`model.baseline_inference.DeepestMapNet`). ``features``: the stitched feature map, only with
    ``return_features=True`` (small volumes, tests).
    """

    probabilities: np.ndarray
    signature: np.ndarray
    gram: np.ndarray
    n_voxels: int
    n_windows: int
    n_signature_voxels: int
    class_feature_sums: np.ndarray
    class_counts: np.ndarray
    features: np.ndarray | None = field(default=None, repr=False)
    mc_masks: int = 0  # > 0: probabilities are the mean of this many MC-dropout passes
    members: int = 0  # > 0: probabilities are the mean of this many ensemble members' passes

    @property
    def foreground(self) -> np.ndarray:
        """Probability of the foreground (class 1) for two-class models."""
        return self.probabilities[1]


def _round_up(n: int, d: int) -> int:
    return -(-n // d) * d


def axis_windows(n: int, block: int, overlap: int, divisor: int = 1) -> list[tuple[int, int, int, int]]:
    """Windows along one axis of length ``n``: ``(start, size, own_lo, own_hi)`` tuples.

    The owned intervals partition ``[0, n)``.
    """
    if n < 1:
        raise ValueError(f"axis length must be >= 1, got {n}")
    if block < 1 or block % divisor:
        raise ValueError(f"block {block} must be a positive multiple of the network divisor {divisor}")
    if not 0 <= overlap < block:
        raise ValueError(f"overlap must be in [0, block), got overlap={overlap} block={block}")
    size = min(block, _round_up(n, divisor))
    if size >= n:
        return [(0, size, 0, n)]
    stride = size - overlap
    count = math.ceil((n - size) / stride) + 1
    starts = sorted({min(i * stride, n - size) for i in range(count)})
    out = []
    for i, s in enumerate(starts):
        lo = 0 if i == 0 else (starts[i - 1] + size + s) // 2
        hi = n if i == len(starts) - 1 else (s + size + starts[i + 1]) // 2
        out.append((s, size, lo, hi))
    return out


def plan_windows(shape: tuple[int, int, int], block: int | tuple[int, int, int], overlap: int, divisor: int) -> list[Window]:
    """All windows of a 3-D volume (the product of the per-axis windows)."""
    blocks = (block,) * 3 if isinstance(block, int) else tuple(block)
    axes = [axis_windows(n, b, overlap, divisor) for n, b in zip(shape, blocks, strict=True)]
    wins = []
    for combo in itertools.product(*axes):
        wins.append(
            Window(
                start=tuple(c[0] for c in combo),  # type: ignore[arg-type]
                size=tuple(c[1] for c in combo),  # type: ignore[arg-type]
                own_lo=tuple(c[2] for c in combo),  # type: ignore[arg-type]
                own_hi=tuple(c[3] for c in combo),  # type: ignore[arg-type]
            )
        )
    return wins


def _batches(items: list[Window], size: int) -> Iterator[list[Window]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _net_device(net: nn.Module) -> torch.device:
    p = next(net.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _accumulate(
    f: torch.Tensor, pred: torch.Tensor, gram: torch.Tensor, cls_sums: torch.Tensor, cls_counts: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> None:
    """Add one window's owned features ``f`` (C, d, h, w) to the float64 Gram matrix and class sums.

    ``keep`` (d, h, w, bool): only those voxels enter the Gram matrix (the class sums take every voxel).

    On CPU the work goes in slabs of a few slices, so each float64 copy stays in cache (about three times
    faster than converting the whole region at once); on CUDA in one piece (fewer kernel launches).
    """
    c, k = f.shape[0], cls_sums.shape[0]
    step = f.shape[1] if f.device.type == "cuda" else 4
    for z in range(0, f.shape[1], step):
        a = f[:, z : z + step].to(torch.float64).reshape(c, -1)  # (C, voxels)
        pz = pred[z : z + step].reshape(-1)
        if keep is None:
            gram += a @ a.T
        else:
            kz = keep[z : z + step].reshape(-1)
            ak = a[:, kz]
            gram += ak @ ak.T
        if k == 2:
            fg = a @ pz.to(torch.float64)
            cls_sums[1] += fg
            cls_sums[0] += a.sum(1) - fg
        else:
            cls_sums += torch.nn.functional.one_hot(pz.long(), k).to(torch.float64).T @ a.T
    cls_counts += torch.bincount(pred.reshape(-1).long(), minlength=k).to(torch.float64)


@torch.inference_mode()
def sliding_window(
    net: nn.Module,
    volume: np.ndarray,
    block: int | tuple[int, int, int] = 96,
    overlap: int = 24,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    out_dtype: type[np.floating] | np.dtype = np.float32,
    return_features: bool = False,
    channels_last: bool | None = None,
    progress: bool = False,
    signature_mask: np.ndarray | None = None,
    signature_layer: str | None = None,
    spectrum: str = "mean",
) -> InferenceResult:
    """Class probabilities for the whole volume and its spectral signature, in one pass.

    ``net`` must be a :class:`model.unet.SegNet`-like module whose ``forward(x, return_features=True)``
    returns ``(logits, features)``, already on ``device`` (default: where its parameters are) and in the
    mode the caller wants (``net.eval()`` for inference; the MC-dropout baseline keeps dropout on).
    ``volume`` is a preprocessed ``(D, H, W)`` or ``(in_channels, D, H, W)`` array.

    ``amp`` (default: on for CUDA) runs the network under bf16 autocast; it is refused on CPU, where bf16
    convolutions are two orders of magnitude slower. ``channels_last`` (default: on CUDA) runs the network in
    ``channels_last_3d`` memory format; note it converts ``net`` in place.

    ``signature_mask`` (``(D, H, W)`` bool, at least one voxel): the voxels the signature's mean Gram runs
    over (:mod:`model.study_inference` passes the body); default every voxel.

    ``signature_layer``: the name of the module (``net.get_submodule``) whose output the signature and
    ``features`` are made of, read by a forward hook; it must have the input's spatial size (SegNet:
    ``encoders.0``, or a last decoder stage). Default: the features ``forward`` returns (SegNet's last
    decoder stage). ``spectrum``: ``"mean"`` or ``"centred"`` (:func:`model.ood.signature_from_singular_values`).
    """
    vol = _channels_first(volume)
    dev, amp, channels_last = _run_settings(net, device, amp, batch_size, channels_last)
    spatial = tuple(int(s) for s in vol.shape[1:])
    windows = plan_windows(spatial, block, overlap, int(getattr(net, "divisor", 1)))  # type: ignore[arg-type]
    keep_all = _signature_voxels(signature_mask, spatial)
    vol = _pad_to_window(vol, windows[0].size)
    if channels_last:
        net.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]

    stitched = _Stitched(spatial, dev, out_dtype, return_features, keep_all, spectrum)
    batches = _batches(windows, batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, total=math.ceil(len(windows) / batch_size), desc="windows", unit="batch")
    hooked = _LayerHook(net, signature_layer) if signature_layer else None
    try:
        for batch in batches:
            probs, feats = _forward(net, vol, batch, dev, amp, channels_last)
            if hooked is not None:
                feats = hooked.take(probs.shape[2:])
            for i, w in enumerate(batch):
                stitched.add(w, probs[i], feats[i])
    finally:
        if hooked is not None:
            hooked.remove()
    return stitched.result(len(windows))


class _LayerHook:
    """The output of one named module of ``net`` at every forward pass (a forward hook)."""

    def __init__(self, net: nn.Module, name: str) -> None:
        try:
            module = net.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the network has no module {name!r} for the signature") from None
        self.name, self.out = name, None
        self.handle = module.register_forward_hook(self._keep)

    def _keep(self, _module: nn.Module, _inp: Any, out: Any) -> None:
        self.out = out

    def take(self, spatial: Any) -> torch.Tensor:
        out, self.out = self.out, None
        if not isinstance(out, torch.Tensor) or out.ndim != 5 or tuple(out.shape[2:]) != tuple(spatial):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"signature layer {self.name!r} gave {shape}; it must give (batch, channels) and "
                             f"the window's size {tuple(spatial)}")
        return out

    def remove(self) -> None:
        self.handle.remove()


def _channels_first(volume: np.ndarray) -> np.ndarray:
    """``volume`` as (C, D, H, W); refuses other shapes and non-float (not preprocessed) arrays."""
    vol = np.asarray(volume)
    if vol.ndim == 3:
        vol = vol[None]
    if vol.ndim != 4:
        raise ValueError(f"volume must be (D, H, W) or (C, D, H, W), got shape {np.shape(volume)}")
    if not np.issubdtype(vol.dtype, np.floating):
        raise ValueError(f"volume must be a preprocessed floating-point array, got dtype {vol.dtype}")
    return vol


def _run_settings(
    net: nn.Module, device: str | torch.device | None, amp: bool | None, batch_size: int, channels_last: bool | None
) -> tuple[torch.device, bool, bool]:
    """(device, amp, channels_last) with the defaults filled in; refuses a device the network is not on,
    autocast off CUDA and an empty batch."""
    dev = torch.device(device) if device is not None else _net_device(net)
    if _net_device(net).type != dev.type or (
        dev.index is not None and _net_device(net).index not in (None, dev.index)
    ):
        raise ValueError(f"the network is on {_net_device(net)}, but device={dev} was asked for")
    if amp is None:
        amp = dev.type == "cuda"
    if amp and dev.type != "cuda":
        raise ValueError(f"mixed precision is supported on CUDA only, not on {dev}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if channels_last is None:
        channels_last = dev.type == "cuda"
    return dev, amp, channels_last


def _signature_voxels(signature_mask: np.ndarray | None, spatial: tuple[int, ...]) -> np.ndarray | None:
    """The signature mask as a bool array of the volume's shape (None: every voxel)."""
    if signature_mask is None:
        return None
    keep_all = np.asarray(signature_mask, dtype=bool)
    if keep_all.shape != spatial:
        raise ValueError(f"signature_mask has shape {keep_all.shape}, the volume {spatial}")
    if not keep_all.any():
        raise ValueError("signature_mask selects no voxel")
    return keep_all


def _pad_to_window(vol: np.ndarray, window: tuple[int, ...]) -> np.ndarray:
    """Zero-pad (at the end) only the axes shorter than their window."""
    spatial = vol.shape[1:]
    padded = tuple(max(n, s) for n, s in zip(spatial, window, strict=True))
    if padded == spatial:
        return vol
    return np.pad(vol, [(0, 0)] + [(0, p - n) for p, n in zip(padded, spatial, strict=True)])


def _forward(
    net: nn.Module, vol: np.ndarray, batch: list[Window], dev: torch.device, amp: bool, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(class probabilities, features) of one batch of windows, each (batch, channels, d, h, w)."""
    x = np.stack([vol[(slice(None), *w.read_slices())] for w in batch])
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dev, non_blocking=True)
    if channels_last:
        xt = xt.contiguous(memory_format=torch.channels_last_3d)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with autocast:
        logits, feats = net(xt, return_features=True)
    return torch.softmax(logits.float(), dim=1), feats


class _Stitched:
    """The outputs of one pass, filled window by window: each window's owned region of the probabilities
    (and features), and the signature's float64 Gram matrix and per-class feature sums. Allocated at the
    first window, when the number of classes and feature channels is known."""

    def __init__(self, spatial: tuple[int, ...], dev: torch.device, out_dtype: type[np.floating] | np.dtype,
                 return_features: bool, keep_all: np.ndarray | None, spectrum: str = "mean") -> None:
        self.spatial, self.dev, self.out_dtype, self.spectrum = spatial, dev, out_dtype, spectrum
        self.return_features, self.keep_all = return_features, keep_all
        self.probs: np.ndarray | None = None
        self.feats: np.ndarray | None = None
        self.gram = torch.zeros((0, 0), dtype=torch.float64, device=dev)
        self.cls_sums = torch.zeros((0, 0), dtype=torch.float64, device=dev)
        self.cls_counts = torch.zeros(0, dtype=torch.float64, device=dev)

    def _allocate(self, k: int, c: int) -> np.ndarray:
        probs = np.empty((k, *self.spatial), dtype=self.out_dtype)
        if self.return_features:
            self.feats = np.empty((c, *self.spatial), dtype=np.float32)
        self.gram = torch.zeros((c, c), dtype=torch.float64, device=self.dev)
        self.cls_sums = torch.zeros((k, c), dtype=torch.float64, device=self.dev)
        self.cls_counts = torch.zeros(k, dtype=torch.float64, device=self.dev)
        return probs

    def add(self, w: Window, probs: torch.Tensor, feats: torch.Tensor) -> None:
        """One window's probabilities (K, d, h, w) and features (C, d, h, w), whole window."""
        if self.probs is None:
            self.probs = self._allocate(probs.shape[0], feats.shape[0])
        loc = (slice(None), *w.local_own_slices())
        p = probs[loc]
        f = feats[loc]
        pred = p[1] > p[0] if p.shape[0] == 2 else p.argmax(0)  # ties -> the lower class, as argmax
        keep = None
        if self.keep_all is not None:
            keep = torch.from_numpy(np.ascontiguousarray(self.keep_all[w.own_slices()])).to(self.dev)
        _accumulate(f, pred, self.gram, self.cls_sums, self.cls_counts, keep)
        own = (slice(None), *w.own_slices())
        self.probs[own] = p.cpu().numpy()
        if self.feats is not None:
            self.feats[own] = f.float().cpu().numpy()

    def result(self, n_windows: int) -> InferenceResult:
        assert self.probs is not None  # at least one window always exists
        g = self.gram.cpu().numpy()
        n_voxels = int(np.prod(self.spatial))
        n_sig = int(self.keep_all.sum()) if self.keep_all is not None else n_voxels
        return InferenceResult(
            probabilities=self.probs,
            signature=signature_from_gram(g, n_sig, self.spectrum),
            gram=g,
            n_voxels=n_voxels,
            n_windows=n_windows,
            n_signature_voxels=n_sig,
            class_feature_sums=self.cls_sums.cpu().numpy(),
            class_counts=self.cls_counts.cpu().numpy(),
            features=self.feats,
        )
