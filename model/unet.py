"""The segmentation network of Karimi & Gholipour (2023), section III-B.

A 3D U-Net with residual blocks, where every finer encoder map also feeds every coarser encoder stage
(dense skips, as in DenseNet), a single segmentation head, and no input saying which organ or modality.
The last decoder feature map (``base_features`` channels) is returned with ``return_features=True``; the spectral
signature of the shipped bank reads the first encoder stage (``encoders.0``) by a forward hook instead.

>>> import torch
>>> net = SegNet(base_features=4, levels=2).eval()
>>> logits, features = net(torch.zeros(1, 1, 16, 16, 16), return_features=True)
>>> tuple(logits.shape), tuple(features.shape)
((1, 2, 16, 16, 16), (1, 4, 16, 16, 16))
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model._atomic import atomic_write

__all__ = ["ResBlock", "SegNet", "load_weights", "save_weights"]


class ResBlock(nn.Module):
    """conv3-IN-ReLU-(dropout)-conv3-IN, plus a (projected) shortcut, then ReLU.

    Instance normalisation (affine): the same in training and inference with batches of one block, and
    across datasets of different intensity statistics (batch norm's running averages are not).
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = nn.InstanceNorm3d(out_channels, affine=True)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.InstanceNorm3d(out_channels, affine=True)
        self.shortcut: nn.Module
        if in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, bias=False), nn.InstanceNorm3d(out_channels, affine=True)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)), inplace=True)
        y = self.drop(y)
        y = self.norm2(self.conv2(y))
        return F.relu(y + self.shortcut(x), inplace=True)


class SegNet(nn.Module):
    """Residual 3D U-Net with dense encoder skips and one segmentation head.

    Encoder stage ``k`` has ``base_features * 2**k`` channels. Its input is the concatenation of the
    outputs of *all* finer encoder stages ``j < k``, each max-pooled by ``2**(k - j)`` (stage 0 reads the
    image). The decoder upsamples with transposed convolutions and concatenates the encoder map of the
    same scale (long skips). The last decoder map has ``base_features`` channels; a 1x1x1 convolution maps
    it to ``num_classes`` logits.

    Spatial sizes must be multiples of ``2**(levels - 1)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        base_features: int = 14,
        levels: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        if base_features < 1 or in_channels < 1 or num_classes < 1:
            raise ValueError(
                f"bad sizes: in_channels={in_channels} num_classes={num_classes} base_features={base_features}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.config: dict[str, Any] = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "base_features": base_features,
            "levels": levels,
            "dropout": dropout,
        }
        widths = [base_features * 2**k for k in range(levels)]
        self.widths = widths
        self.encoders = nn.ModuleList()
        for k in range(levels):
            cin = in_channels if k == 0 else sum(widths[:k])
            self.encoders.append(ResBlock(cin, widths[k], dropout))
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for k in range(levels - 2, -1, -1):
            self.ups.append(nn.ConvTranspose3d(widths[k + 1], widths[k], 2, stride=2))
            self.decoders.append(ResBlock(2 * widths[k], widths[k], dropout))
        self.head = nn.Conv3d(widths[0], num_classes, 1)

    @property
    def divisor(self) -> int:
        """Spatial sizes of the input must be multiples of this."""
        return 2 ** (len(self.widths) - 1)

    @property
    def feature_channels(self) -> int:
        return self.widths[0]

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        d = self.divisor
        if any(s % d for s in x.shape[2:]):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} is not a multiple of {d}")
        enc: list[torch.Tensor] = []
        for k, block in enumerate(self.encoders):
            if k == 0:
                inp = x
            else:
                inp = torch.cat(
                    [F.max_pool3d(e, 2 ** (k - j)) for j, e in enumerate(enc)], dim=1
                )
            enc.append(block(inp))
        y = enc[-1]
        for i, (up, dec) in enumerate(zip(self.ups, self.decoders, strict=True)):
            k = len(enc) - 2 - i
            y = dec(torch.cat([up(y), enc[k]], dim=1))
        logits = self.head(y)
        if return_features:
            return logits, y
        return logits


WEIGHTS_FORMAT = "specgate-segnet"
WEIGHTS_VERSION = 1


def save_weights(net: SegNet, path: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> str:
    """Write the network (architecture + parameters, float32, no optimizer) and return the file's SHA-256.

    The file holds only tensors and plain types, so it loads with ``torch.load(weights_only=True)``.
    """
    p = Path(path)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in net.state_dict().items()
             if v.is_floating_point()}
    state.update({k: v.detach().cpu() for k, v in net.state_dict().items() if not v.is_floating_point()})
    payload = {
        "format": WEIGHTS_FORMAT,
        "version": WEIGHTS_VERSION,
        "config": dict(net.config),
        "meta": json.dumps(meta or {}, sort_keys=True),
        "state_dict": state,
    }
    atomic_write(p, lambda fh: torch.save(payload, fh))
    h = hashlib.sha256(p.read_bytes()).hexdigest()
    return h


def load_weights(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[SegNet, dict[str, Any]]:
    """Read a weights file written by :func:`save_weights`: ``(net in eval mode on device, meta)``."""
    payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path} is not a specgate weights file")
    if payload.get("version") != WEIGHTS_VERSION:
        raise ValueError(f"{path}: weights version {payload.get('version')!r} is not supported")
    net = SegNet(**payload["config"])
    net.load_state_dict(payload["state_dict"])
    net.to(device).eval()
    return net, json.loads(payload["meta"])
