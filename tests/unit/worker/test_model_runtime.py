"""worker.model_runtime: any model adapter behind its own gate; the shipped model keeps its decisions."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from model.adapters.base import Label
from model.adapters.torchscript import TorchScriptAdapter
from model.bank_fit import BankCase, fit_adapter_bank
from model.data.phantoms import phantom_case
from model.ood import BankMismatchError
from worker.config import ModelSpec
from worker.model_runtime import Segmenter

SPEC = """
[input]
spacing = { CT = [8.0, 8.0, 8.0] }
normalization = "ct_window"
[inference]
patch_size = [16, 16, 16]
overlap = 0.25
mode = "constant"
[output]
classes = ["background", "organ", "rim", "core"]
[signature]
output = 1
"""


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv3d(1, 6, 3, padding=1)
        self.head = nn.Conv3d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.relu(self.body(x * 4.0 - 2.0))
        return self.head(f), f


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    d = tmp_path_factory.mktemp("ts")
    torch.jit.save(torch.jit.script(Net().eval()), str(d / "net.ts"))
    (d / "spec.toml").write_text(SPEC)
    adapter = TorchScriptAdapter.open(d / "net.ts", spec=d / "spec.toml")
    cases = [BankCase(c.image, c.spacing, c.modality, f"liver-{i}")
             for i, c in enumerate(phantom_case("ct_liver", 0, i) for i in range(3))]
    fit_adapter_bank(adapter, cases).save(d / "bank.npz")
    return d


def test_a_torchscript_model_behind_its_own_gate(model_dir: Path) -> None:
    seg = Segmenter.from_adapter(TorchScriptAdapter.open(model_dir / "net.ts", spec=model_dir / "spec.toml"),
                                 model_dir / "bank.npz")
    case = phantom_case("ct_liver", 0, 7)
    out = seg.segment(case.image, "CT", spacing=case.spacing)
    assert out.labels is not None and out.labels.shape == case.image.shape and out.labels.dtype == np.uint8
    np.testing.assert_array_equal(out.mask, out.labels > 0)
    assert out.prob_fg.dtype == np.float16 and out.model_labels == (Label(1, "organ"), Label(2, "rim"), Label(3, "core"))
    assert np.isfinite(out.oodm) and out.grid["layer"] == "output:1" and "gate" in out.timings
    assert seg.inference_record()["format"] == "torchscript" and seg.settings is None
    assert seg.weights_sha256 == seg.adapter.model_sha256() and not seg.clinical_use


def test_a_bank_of_other_files_or_settings_is_refused(model_dir: Path, tmp_path: Path) -> None:
    shutil.copy(model_dir / "net.ts", tmp_path / "net.ts")
    (tmp_path / "spec.toml").write_text(SPEC.replace("overlap = 0.25", "overlap = 0.5"))
    other = TorchScriptAdapter.open(tmp_path / "net.ts", spec=tmp_path / "spec.toml")
    with pytest.raises(BankMismatchError, match="fitted for weights with SHA-256"):
        Segmenter.from_adapter(other, model_dir / "bank.npz")


def test_the_shipped_model_opens_through_its_adapter() -> None:
    seg = Segmenter.open()
    assert seg.adapter.format == "segnet" and seg.labels == (Label(1, "Phantom organ"),)
    assert seg.inference_record() == seg.settings.record()
    seg.gate.check_inference(seg.adapter.signature_settings())


def _hu_int16(image: np.ndarray) -> np.ndarray:
    """A phantom in whole Hounsfield units as int16, as ``load_series(compact=True)`` gives a CT."""
    return np.clip(np.rint(image), -32768, 32767).astype(np.int16)


def test_an_int16_ct_gives_the_shipped_model_the_same_result_bit_for_bit() -> None:
    """The worker loads a CT as int16 for SegNet (``takes_int16``): the label map, foreground and
    signature equal those of the same values in float32, bit for bit."""
    seg = Segmenter.open()
    assert seg.takes_int16
    hu = _hu_int16(phantom_case("ct_liver", 0, 7).image)
    spacing = (1.0, 0.703125, 0.703125)  # resampled onto the 4 mm grid: block means along every axis
    a, b = seg.segment(hu, "CT", spacing=spacing), seg.segment(hu.astype(np.float32), "CT", spacing=spacing)
    assert a.labels is not None and b.labels is not None
    assert a.labels.tobytes() == b.labels.tobytes() and a.prob_fg.tobytes() == b.prob_fg.tobytes()
    assert a.signature.tobytes() == b.signature.tobytes() and a.oodm == b.oodm


def test_a_model_that_does_not_take_int16_gets_float32(model_dir: Path) -> None:
    seg = Segmenter.from_adapter(TorchScriptAdapter.open(model_dir / "net.ts", spec=model_dir / "spec.toml"),
                                 model_dir / "bank.npz")
    assert not seg.takes_int16
    hu = _hu_int16(phantom_case("ct_liver", 0, 7).image)
    a, b = seg.segment(hu, "CT", spacing=(2.0, 2.0, 2.0)), seg.segment(hu.astype(np.float32), "CT", spacing=(2.0, 2.0, 2.0))
    assert a.labels is not None and b.labels is not None
    assert a.labels.tobytes() == b.labels.tobytes() and a.signature.tobytes() == b.signature.tobytes()


def test_model_spec_formats() -> None:
    assert ModelSpec("default").format == "segnet"
    ModelSpec("ts", format="torchscript", path=Path("m.ts"), bank=Path("b.npz"), layer="output:1")
    with pytest.raises(ValueError, match="needs the path of its model"):
        ModelSpec("ts", format="torchscript", bank=Path("b.npz"))
    with pytest.raises(ValueError, match="'weights' is SegNet's"):
        ModelSpec("ts", format="torchscript", weights=Path("w.pt"), path=Path("m.ts"), bank=Path("b.npz"))
