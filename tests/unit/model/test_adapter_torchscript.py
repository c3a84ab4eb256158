"""model.adapters.torchscript: a TorchScript export made here, run by its spec; labels equal a direct
computation, and the window-by-window signature equals the stitched full feature map's."""

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from model.adapters.base import AdapterError, Label
from model.adapters.torchscript import TorchScriptAdapter, _gaussian, window_starts
from model.data.phantoms import phantom_case
from model.ood import spectral_signature
from model.preprocess import preprocess
from model.resample import from_grid, model_grid, to_grid
from model.study_inference import body_mask
from model.window_gram import stitch_features

SPEC = """
name = "tiny"
model = "tiny.ts"
[input]
spacing = { CT = [8.0, 8.0, 8.0] }
normalization = { CT = "ct_window" }
ct_window = [-1000, 1000]
[inference]
patch_size = [8, 16, 16]
overlap = 0.5
mode = "gaussian"
[output]
classes = ["background", "liver", "rim"]
[signature]
output = 1
"""


class Tiny(nn.Module):
    """Returns (logits, features), the features the map the head reads."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv3d(1, 6, 3, padding=1)
        self.dec = nn.Conv3d(6, 5, 3, padding=1)
        self.head = nn.Conv3d(5, 3, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.relu(self.dec(torch.relu(self.enc(x * 4.0 - 2.0))))
        return self.head(f), f


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    d = tmp_path_factory.mktemp("ts")
    net = Tiny().eval()
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 1, 8, 16, 16)), str(d / "tiny.ts"))
    (d / "spec.toml").write_text(SPEC)
    return d


@torch.no_grad()
def _reference(module: torch.jit.ScriptModule, image: np.ndarray, spacing: tuple[float, float, float]):
    """The spec's recipe written out directly: Gaussian-weighted mean of the windows' logits, softmax,
    every class resampled back with SimpleITK, argmax; and the stitched full feature map."""
    grid = model_grid(image.shape, spacing, (8.0, 8.0, 8.0))
    small = to_grid(image, spacing, grid)
    x = (np.clip(small, -1000, 1000) + 1000) / 2000
    patch = (8, 16, 16)
    padded = tuple(max(n, p) for n, p in zip(grid.shape, patch, strict=True))
    x = np.pad(x, [(0, p - n) for p, n in zip(padded, grid.shape, strict=True)]).astype(np.float32)
    starts = [window_starts(n, p, 0.5) for n, p in zip(padded, patch, strict=True)]
    windows = [tuple(slice(s, s + p) for s, p in zip(st, patch, strict=True)) for st in itertools.product(*starts)]
    acc, wsum, feats = np.zeros((3, *padded)), np.zeros(padded), []
    w = _gaussian(patch).astype(np.float64)
    for win in windows:
        logits, f = module(torch.from_numpy(x[win])[None, None])
        acc[(slice(None), *win)] += logits[0].numpy() * w
        wsum[win] += w
        feats.append(f[0].numpy())
    crop = (slice(None), *(slice(0, n) for n in grid.shape))
    probs = torch.softmax(torch.from_numpy((acc / wsum)[crop]).float(), 0).numpy()
    per_class = np.stack([from_grid(probs[c], grid, image.shape, spacing) for c in range(3)])
    body = np.pad(body_mask(preprocess(small, "CT"), "CT"), [(0, p - n) for p, n in zip(padded, grid.shape, strict=True)])
    return per_class, stitch_features(padded, windows, feats), body


def test_labels_and_signature_equal_a_direct_computation(exported: Path) -> None:
    a = TorchScriptAdapter.open(exported / "spec.toml")
    assert a.labels == (Label(1, "liver"), Label(2, "rim")) and a.layer == "output:1"
    assert set(a.files_sha256) == {"tiny.ts", "spec.toml"} and a.version.startswith("sha256-")
    case = phantom_case("ct_liver", 0, 0)
    pred = a.predict(case.image, case.spacing, "CT")
    per_class, stitched, body = _reference(a.module, case.image, case.spacing)
    assert pred.labels.shape == case.image.shape and pred.evidence["windows"] > 1
    np.testing.assert_array_equal(pred.labels, per_class.argmax(0))
    np.testing.assert_allclose(pred.foreground.astype(np.float32), 1 - per_class[0], atol=1e-3)
    np.testing.assert_allclose(pred.signature, spectral_signature(stitched, body), atol=1e-6)
    assert pred.n_signature_voxels == int(body.sum())


def test_hooks_do_not_fire_in_torchscript(exported: Path) -> None:
    """Why the spec names an output instead of a module: torch refuses Python hooks on ScriptModules."""
    loaded = torch.jit.load(str(exported / "tiny.ts"))
    with pytest.raises(RuntimeError, match="not supported on ScriptModules"):
        loaded.dec.register_forward_hook(lambda m, i, o: None)


def test_refusals_name_the_problem(exported: Path, tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="does not exist"):
        TorchScriptAdapter.open(tmp_path / "missing.ts", spec=exported / "spec.toml")
    with pytest.raises(AdapterError, match="spec file .* does not exist"):
        TorchScriptAdapter.open(exported / "tiny.ts", spec=tmp_path / "none.toml")
    with pytest.raises(AdapterError, match="needs its spec file"):
        TorchScriptAdapter.open(exported / "tiny.ts")
    (tmp_path / "nospacing.toml").write_text(SPEC.replace("spacing = { CT = [8.0, 8.0, 8.0] }", ""))
    with pytest.raises(AdapterError, match="gives no input spacing"):
        TorchScriptAdapter.open(exported / "tiny.ts", spec=tmp_path / "nospacing.toml")
    with pytest.raises(AdapterError, match="layer output:4 does not exist: the module returns 2 outputs"):
        TorchScriptAdapter.open(exported / "tiny.ts", spec=exported / "spec.toml", layer="output:4")
    with pytest.raises(AdapterError, match="runs no Python forward hooks"):
        TorchScriptAdapter.open(exported / "tiny.ts", spec=exported / "spec.toml", layer="dec")
    (tmp_path / "two.toml").write_text(SPEC.replace('"background", "liver", "rim"', '"background", "liver"'))
    with pytest.raises(AdapterError, match="gives 3 output channels, the spec lists 2"):
        TorchScriptAdapter.open(exported / "tiny.ts", spec=tmp_path / "two.toml")
    (tmp_path / "bad.toml").write_text(SPEC.replace('"ct_window" }', '"minmax" }'))
    with pytest.raises(AdapterError, match="normalization 'minmax' for CT"):
        TorchScriptAdapter.open(exported / "tiny.ts", spec=tmp_path / "bad.toml")
