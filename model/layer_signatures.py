"""The spectral signature of every stage of a SegNet, each at its own resolution (the paper's layer study,
section IV: "applying the method on other feature maps resulted in lower accuracy than on the last layer").

The production signature (:mod:`model.infer`) is taken from the stage ``settings.signature_layer`` names (bank
version 3: the first encoder stage; the paper: the last decoder map), at the input's resolution, with
``settings.spectrum`` over ``settings.signature_voxels``; every stage here is read the same way. :func:`layer_signatures` runs the same windows over the same prepared
canvas (:func:`model.study_inference.prepare_study`: grid, intensities, body crop) with forward hooks on
every encoder stage ``encoders.k`` and decoder stage ``decoders.i``
(:func:`model.baseline_inference.layer_modules`) and accumulates, per stage, the mean Gram matrix of its
map at the stage's own resolution; the signature is that Gram's log-spectrum (:func:`model.ood.signature_from_gram`).

At a stage of stride ``s`` (``s`` input voxels per cell along each axis), a cell of a window enters the
Gram when the first input voxel it covers lies in the window's owned region (the owned regions partition
the canvas, :func:`model.infer.plan_windows`; at stride 1 this is exactly the production stitching) and
when at least half of its input voxels are body (the production signature's mask, averaged over the
cell; with ``signature_voxels="canvas"``, every owned cell). At stride 1 the production stage's signature is
therefore the production signature (a test checks it); at coarser strides windows that start off the stride's lattice make the cells of neighbouring
windows overlap or leave gaps of less than one cell at their shared boundary.

>>> import numpy as np
>>> from model.unet import SegNet
>>> from model.study_inference import InferenceSettings, prepare_study
>>> net = SegNet(base_features=4, levels=2).eval()
>>> s = InferenceSettings(block=16, overlap=4)
>>> img = np.random.default_rng(0).normal(300, 50, (20, 24, 24)).astype(np.float32)
>>> sig = layer_signatures(net, prepare_study(img, (3.0, 2.0, 2.0), "MR", s), s)
>>> [(name, v.shape) for name, v in sig.items()]
[('encoders.0', (4,)), ('encoders.1', (8,)), ('decoders.0', (4,))]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.baseline_inference import layer_modules
from model.infer import plan_windows
from model.ood import signature_from_gram
from model.study_inference import InferenceSettings, PreparedStudy

__all__ = ["layer_names", "layer_signatures", "stage_strides"]


def layer_names(net: nn.Module) -> list[str]:
    """The names of :func:`model.baseline_inference.layer_modules`, in its order: ``encoders.0`` ...
    (finest to coarsest), then ``decoders.0`` ... (coarsest to finest; the last is the production map)."""
    n_enc = len(getattr(net, "encoders", []))
    n_dec = len(getattr(net, "decoders", []))
    return [f"encoders.{k}" for k in range(n_enc)] + [f"decoders.{i}" for i in range(n_dec)]


@torch.inference_mode()
def layer_signatures(net: nn.Module, prep: PreparedStudy, settings: InferenceSettings,
                     device: str | torch.device | None = None) -> dict[str, np.ndarray]:
    """Per stage name (:func:`layer_names`), the spectral signature of its map over the body of ``prep``'s
    canvas, at the stage's resolution, through ``settings``' windows (see the module doc)."""
    mods = layer_modules(net)
    names = layer_names(net)
    dev = torch.device(device) if device is not None else next(net.parameters()).device
    vol = np.asarray(prep.image, dtype=np.float32)
    spatial = tuple(int(n) for n in vol.shape)
    divisor = int(getattr(net, "divisor", 1))
    windows = plan_windows(spatial, settings.block, settings.overlap, divisor)  # type: ignore[arg-type]
    size = windows[0].size
    pad = [(0, max(0, b - n)) for n, b in zip(spatial, size, strict=True)]
    vol = np.pad(vol, pad)
    body = np.ones(spatial, bool) if prep.signature_mask is None else np.asarray(prep.signature_mask, bool)
    body = np.pad(body, pad)
    body_only = settings.signature_voxels == "body"
    grams: list[torch.Tensor | None] = [None] * len(mods)
    counts = [0] * len(mods)
    got: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, i=i: got.__setitem__(i, out)) for i, m in enumerate(mods)]
    try:
        for w in windows:
            x = torch.from_numpy(np.ascontiguousarray(vol[w.read_slices()]))[None, None].to(dev)
            got.clear()
            net(x)
            m = torch.from_numpy(np.ascontiguousarray(body[w.read_slices()], dtype=np.float32))[None, None].to(dev)
            for i in range(len(mods)):
                f = got[i][0].float()  # (C, d, h, w)
                stride = tuple(b // n for b, n in zip(w.size, f.shape[1:], strict=True))
                frac = F.avg_pool3d(m, stride, stride)[0, 0] if any(s > 1 for s in stride) else m[0, 0]
                keep = (frac >= 0.5) if body_only else torch.ones_like(frac, dtype=torch.bool)
                own = torch.zeros_like(keep)
                lo = [-(-(a - s) // st) for a, s, st in zip(w.own_lo, w.start, stride, strict=True)]
                hi = [-(-(b - s) // st) for b, s, st in zip(w.own_hi, w.start, stride, strict=True)]
                own[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
                keep &= own
                a = f[:, keep].to(torch.float64)  # (C, cells)
                g = a @ a.T
                grams[i] = g if grams[i] is None else grams[i] + g  # type: ignore[operator]
                counts[i] += int(keep.sum())
    finally:
        for h in handles:
            h.remove()
    out: dict[str, np.ndarray] = {}
    for name, gram, n in zip(names, grams, counts, strict=True):
        if gram is None or n == 0:
            raise ValueError(f"no body cell at stage {name}: the canvas is smaller than one of its cells")
        out[name] = signature_from_gram(gram.cpu().numpy(), n, settings.spectrum)
    return out


def stage_strides(net: nn.Module) -> dict[str, int]:
    """Input voxels per cell along each axis at every stage (encoder ``k``: ``2**k``)."""
    n_enc = len(getattr(net, "encoders", []))
    n_dec = len(getattr(net, "decoders", []))
    strides: dict[str, Any] = {f"encoders.{k}": 2**k for k in range(n_enc)}
    strides.update({f"decoders.{i}": 2 ** (n_enc - 2 - i) for i in range(n_dec)})
    return strides
