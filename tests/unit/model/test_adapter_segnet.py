"""model.adapters.segnet: the shipped network as one adapter among the formats, its signature unchanged."""

from pathlib import Path

import numpy as np
import pytest
import torch

from model.adapters.base import AdapterError, Label
from model.adapters.segnet import SegNetAdapter
from model.data.phantoms import phantom_case
from model.ood import SpectralGate, sha256_file
from model.study_inference import segment_volume
from model.unet import SegNet, save_weights
from model.weights import BANK_PATH, WEIGHTS_PATH


@pytest.fixture(scope="module")
def shipped() -> SegNetAdapter:
    torch.set_num_threads(2)
    return SegNetAdapter.open()


def test_shipped_model_matches_its_bank(shipped: SegNetAdapter) -> None:
    gate = SpectralGate.load(BANK_PATH, weights_sha256=shipped.model_sha256())
    gate.check_inference(shipped.signature_settings())  # the bank's settings, key for key
    assert shipped.model_sha256() == sha256_file(WEIGHTS_PATH)
    assert shipped.files_sha256 == {"segnet.pt": sha256_file(WEIGHTS_PATH)}
    assert shipped.labels == (Label(1, "Phantom organ"),) and shipped.layer == "encoders.0"
    assert shipped.record()["format"] == "segnet" and not shipped.clinical_use


def test_prediction_is_the_production_path(shipped: SegNetAdapter) -> None:
    case = phantom_case("ct_liver", 2026, 1000)
    pred = shipped.predict(case.image, case.spacing, "CT")
    full = segment_volume(shipped.net, case.image, case.spacing, "CT", shipped.settings)
    np.testing.assert_array_equal(pred.signature, full.signature)  # bit for bit: what the bank was fitted on
    np.testing.assert_array_equal(pred.labels, full.foreground >= 0.5)
    np.testing.assert_array_equal(pred.foreground, full.foreground)
    assert pred.labels.shape == case.image.shape and pred.evidence["layer"] == "encoders.0"
    assert pred.gram.shape == (14, 14) and pred.n_signature_voxels == full.n_signature_voxels


def test_labels_from_the_weights_metadata(tmp_path: Path) -> None:
    net = SegNet(base_features=4, levels=2, num_classes=3)
    save_weights(net, tmp_path / "w.pt", {"labels": {"1": "Liver", "2": "Spleen"}, "name": "abd", "version": "7"})
    a = SegNetAdapter.open(tmp_path / "w.pt", block=32, overlap=8)
    assert a.labels == (Label(1, "Liver"), Label(2, "Spleen")) and (a.name, a.version) == ("abd", "7")
    assert a.signature_settings()["block"] == 32
    save_weights(net, tmp_path / "bad.pt", {"labels": {"1": "Liver"}})
    with pytest.raises(AdapterError, match=r"names labels \[1\], the network has classes \[1, 2\]"):
        SegNetAdapter.open(tmp_path / "bad.pt")


def test_refusals_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="does not exist"):
        SegNetAdapter.open(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(AdapterError, match="not a loadable SegNet weights file"):
        SegNetAdapter.open(tmp_path / "junk.pt")
    with pytest.raises(AdapterError, match="layer 'encoders.1' cannot be chosen"):
        SegNetAdapter.open(WEIGHTS_PATH, layer="encoders.1")
    with pytest.raises(AdapterError, match="unknown SegNet option"):
        SegNetAdapter.open(WEIGHTS_PATH, spec="x.toml")
