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
    assert through["oodm"] == by_weights["oodm"] and through["spectral"] == by_weights["spectral"]
    assert through["decisions"] == by_weights["decisions"]
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


def _write_nnunet(folder: Path, cases: list, labels: dict[str, int]) -> Path:
    """A tiny nnU-Net v2 raw dataset: 2 = the organ, 1 = the body outside it (values named by ``labels``)."""
    import json

    import nibabel as nib

    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for i, c in enumerate(cases):
        sz, sy, sx = c.spacing
        affine = np.diag([sx, sy, sz, 1.0])
        truth = np.where(c.label > 0, 2, np.where(c.image > -500, 1, 0)).astype(np.uint8)
        nib.save(nib.Nifti1Image(c.image.astype(np.float32).transpose(2, 1, 0), affine),
                 str(folder / "imagesTr" / f"case_{i:03d}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(truth.transpose(2, 1, 0), affine), str(folder / "labelsTr" / f"case_{i:03d}.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels,
                                                     "file_ending": ".nii.gz", "numTraining": len(cases)}))
    return folder


def test_ground_truth_labels_are_matched_to_the_models_by_name(tmp_path: Path) -> None:
    from model.data.volumes import iter_site_cases

    torch.manual_seed(1)
    w = tmp_path / "w.pt"
    net = SegNet(num_classes=4, base_features=4, levels=2).eval()
    with torch.no_grad():  # label 1 nearly everywhere: the body (value 1 here) scores far above the organ
        net.head.bias.copy_(torch.tensor([0.0, 4.0, 0.0, 0.0]))  # type: ignore[union-attr]
    save_weights(net, w,
                 {"inference_block": 32, "inference_overlap": 8, "inference_spacing": {"CT": [6.0, 6.0, 6.0]},
                  "labels": {"1": "liver", "2": "spleen", "3": "Kidney_Left"}})
    adapter = SegNetAdapter.open(w)
    gate = fit_adapter_bank(adapter, [phantom_case("ct_liver", 0, i) for i in range(2)])
    held = [phantom_case("ct_liver", 0, i) for i in (10, 11)]
    # the dataset numbers the labels the other way round: 1 = spleen (the body), 2 = liver (the organ)
    folder = _write_nnunet(tmp_path / "Dataset001", held,
                           {"background": 0, "Spleen": 1, "liver": 2, "pancreas": 3})
    cases = list(iter_site_cases(folder))
    assert cases[0].label_names == {1: "Spleen", 2: "liver", 3: "pancreas"}
    report = evaluate_adapter(adapter, gate, {"site": cases})
    entry = report["datasets"]["site"]

    by_name: dict[str, list[float]] = {"liver": [], "spleen": []}
    by_value: dict[str, list[float]] = {"liver": [], "spleen": []}
    for c in cases:
        pred = adapter.predict(c.image, c.spacing, c.modality).labels
        assert c.label_map is not None
        for value, name, truth in ((1, "liver", 2), (2, "spleen", 1)):
            by_name[name].append(dice(pred == value, c.label_map == truth))
            by_value[name].append(dice(pred == value, c.label_map == value))
    expected = {k: float(np.mean(v)) for k, v in by_name.items()}
    assert entry["dsc_per_label"] == {k: pytest.approx(v, abs=1e-4) for k, v in expected.items()}
    assert any(abs(expected[k] - float(np.mean(by_value[k]))) > 0.05 for k in expected)  # the swap matters
    assert entry["labels_matched_by"] == "name"
    assert entry["labels_not_in_dataset"] == ["Kidney_Left"] and entry["dataset_labels_not_in_model"] == ["pancreas"]
    table = format_report(report)
    assert "(labels matched by name)" in table and "not in the dataset (no DSC): Kidney_Left" in table
    assert "the dataset's labels the model lacks: pancreas" in table

    # a dataset that names no labels: matched by value, and the report says so
    for c in cases:
        c.label_names = None
    entry = evaluate_adapter(adapter, gate, {"site": cases})["datasets"]["site"]
    assert entry["labels_matched_by"] == "value" and "labels_not_in_dataset" not in entry
    assert entry["dsc_per_label"]["liver"] == pytest.approx(float(np.mean(by_value["liver"])), abs=1e-4)
