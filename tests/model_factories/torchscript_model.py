"""A tiny TorchScript model and its spec file, as a site's own team would export one: the module returns
``(logits, features)`` (a TorchScript module runs no Python forward hooks, so the signature's feature map is
an output), traced by torch on one window; three classes, 4 features at full resolution."""

from __future__ import annotations

from pathlib import Path

import torch

SPEC = """
model = "net.ts"
[input]
spacing = { CT = [4.0, 4.0, 4.0] }
normalization = { CT = "ct_window" }
ct_window = [-1000, 1000]
[inference]
patch_size = [8, 16, 16]
overlap = 0.25
mode = "gaussian"
[output]
classes = ["background", "liver", "spleen"]
[signature]
output = 1
"""


class TwoOutputs(torch.nn.Module):
    """(logits, features): a TorchScript export names its signature's feature map as an output."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.head = torch.nn.Conv3d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.relu(self.features(x))
        return self.head(f), f


def write_torchscript_model(folder: Path, *, seed: int = 0) -> tuple[Path, Path]:
    """``folder/net.ts`` (traced, untrained) and ``folder/spec.toml`` (:data:`SPEC`); returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = folder / "net.ts"
    torch.jit.save(torch.jit.trace(TwoOutputs().eval(), torch.zeros(1, 1, 8, 16, 16)), str(net))
    spec = folder / "spec.toml"
    spec.write_text(SPEC)
    return net, spec
