"""model.bank_fit: a bank fitted through an adapter is the worker's bank (same signatures, same records)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from model.adapters.segnet import SegNetAdapter
from model.bank_fit import fit_adapter_bank
from model.data.phantoms import phantom_case
from model.evaluate import fit_bank
from model.ood import BankMismatchError, SpectralGate, sha256_file
from model.unet import SegNet, save_weights


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    p = tmp_path_factory.mktemp("w") / "w.pt"
    save_weights(SegNet(base_features=4, levels=2).eval(), p,
                 {"inference_block": 32, "inference_overlap": 8, "inference_spacing": {"CT": [6.0, 6.0, 6.0]}})
    return p


def test_segnet_bank_through_the_adapter_equals_the_production_fit(tiny: Path, tmp_path: Path) -> None:
    adapter = SegNetAdapter.open(tiny)
    cases = [phantom_case("ct_liver", 0, i) for i in range(3)]
    gate = fit_adapter_bank(adapter, cases, meta={"fitted_on": "three phantoms"})
    ref = fit_bank(adapter.net, cases, sha256_file(tiny), adapter.settings)
    np.testing.assert_array_equal(gate.bank, ref.bank)
    assert gate.tau == ref.tau and gate.weights_sha256 == sha256_file(tiny)
    assert gate.meta["model"]["format"] == "segnet" and gate.meta["fitted_on"] == "three phantoms"
    gate.save(tmp_path / "bank.npz")
    loaded = SpectralGate.load(tmp_path / "bank.npz", weights_sha256=adapter.model_sha256())
    loaded.check_inference(adapter.signature_settings())
    with pytest.raises(BankMismatchError, match="overlap: bank 8, the worker 16"):
        loaded.check_inference(SegNetAdapter.open(tiny, overlap=16).signature_settings())


def test_plain_tuples_are_one_image_each(tiny: Path) -> None:
    adapter = SegNetAdapter.open(tiny)
    cases = [(c.image, c.spacing, c.modality) for c in (phantom_case("ct_liver", 0, i) for i in range(2))]
    gate = fit_adapter_bank(adapter, cases)
    assert gate.bank.shape == (2, 4) and gate.meta["images"] == 2 and gate.meta["modalities"] == ["CT"]
    with pytest.raises(ValueError, match="at least two training images, got 1"):
        fit_adapter_bank(adapter, cases[:1])
