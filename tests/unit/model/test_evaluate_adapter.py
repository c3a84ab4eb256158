"""model.evaluate: one evaluation loop for a bare SegNet and for any model through its adapter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.adapters.segnet import SegNetAdapter
from model.bank_fit import fit_adapter_bank
from model.data.phantoms import phantom_case
from model.evaluate import evaluate, evaluate_adapter, format_report
from model.ood import BankMismatchError
from model.scores import dice
from model.unet import SegNet, save_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("w") / "w.pt"
    save_weights(SegNet(base_features=4, levels=2).eval(), p,
                 {"inference_block": 32, "inference_overlap": 8, "inference_spacing": {"CT": [6.0, 6.0, 6.0]},
                  "labels": {"1": "liver"}})
    return p


def test_segnet_by_weights_and_through_its_adapter_report_alike(weights: Path, tmp_path: Path) -> None:
    adapter = SegNetAdapter.open(weights)
    gate = fit_adapter_bank(adapter, [phantom_case("ct_liver", 0, i) for i in range(3)])
    held_out = {"liver": [phantom_case("ct_liver", 0, i) for i in (10, 11)]}
    ood = {"lung": [phantom_case("ct_lung", 0, 10)]}
    by_weights = evaluate(adapter.net, gate, held_out, ood, settings=adapter.settings)
    through = evaluate_adapter(adapter, gate, held_out, ood, out_dir=tmp_path / "ev")

    # the same signatures (the same production path), so the same gate figures
    assert through["oodm"] == by_weights["oodm"] and through["ood"] == by_weights["ood"]
    assert through["gate"] == by_weights["gate"]
    a, b = through["datasets"]["liver"], by_weights["datasets"]["liver"]
    assert a["flagged_ood"] == b["flagged_ood"] and a["n"] == b["n"] == 2
    # label map (argmax) against p >= 0.5 of two classes; the float16 foreground against float32
    assert a["dsc"] == pytest.approx(b["dsc"], abs=1e-3) and a["ece"] == pytest.approx(b["ece"], abs=1e-2)
    expected = np.mean([dice(adapter.predict(c.image, c.spacing, c.modality).labels == 1, c.label == 1)
                        for c in held_out["liver"]])
    assert a["dsc_per_label"] == {"liver": pytest.approx(expected, abs=1e-4)}
    assert "dsc_per_label" not in b  # a bare SegNet: one foreground, no label names
    assert through["inference"]["model"]["format"] == "segnet"
    assert through["inference"]["signature"] == adapter.signature_settings()
    assert "DSC per label: liver=" in format_report(through)
    assert (tmp_path / "ev" / "metrics.json").is_file() and (tmp_path / "ev" / "reliability_liver.png").is_file()
    assert (tmp_path / "ev" / "oodm_histogram.png").is_file()

    # a bank fitted through other signature settings is refused, naming the difference
    with pytest.raises(BankMismatchError, match="overlap: bank 8, this evaluation 16"):
        evaluate_adapter(SegNetAdapter.open(weights, overlap=16), gate, held_out)
