import json

import numpy as np
from click.testing import CliRunner

from model.data.phantoms import write_msd_dataset
from model.ood import SpectralGate, sha256_file
from specgate._cli_model import model_group


def test_train_fit_ood_evaluate(tmp_path):
    liver = write_msd_dataset(tmp_path / "data", "ct_liver", 3, seed=1)
    prostate = write_msd_dataset(tmp_path / "data", "mr_prostate", 2, seed=1)
    unseen = write_msd_dataset(tmp_path / "data", "pt_tumour", 2, seed=1)
    run = CliRunner()

    res = run.invoke(model_group, ["train", "--dataset", f"liver={liver}", "--dataset", f"prostate={prostate}",
                                   "--out", str(tmp_path / "run"), "--block", "16", "--base-features", "4",
                                   "--levels", "2", "--max-iterations", "4", "--eval-every", "2", "--device", "cpu"],
                     catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "liver: 3 cases, drawn with p=0.551" in res.stdout  # sqrt(3) / (sqrt(3) + sqrt(2))
    weights = tmp_path / "run" / "best.pt"
    assert f"sha256={sha256_file(weights)}" in res.stdout

    bank = tmp_path / "bank.npz"
    res = run.invoke(model_group, ["fit-ood", "--weights", str(weights), "--data", str(liver), "--data", str(prostate),
                                   "--out", str(bank), "--device", "cpu"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    gate = SpectralGate.load(bank, weights_sha256=sha256_file(weights))
    assert gate.bank.shape == (5, 4)

    res = run.invoke(model_group, ["evaluate", "--weights", str(weights), "--bank", str(bank), "--data", str(liver),
                                   "--ood", str(unseen), "--out", str(tmp_path / "ev"), "--device", "cpu", "--json"],
                     catch_exceptions=False)
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    assert set(m["datasets"]) == {"ct_liver", "pt_tumour"}
    assert m["spectral"]["n_in"] == 3 and m["spectral"]["n_out"] == 2 and m["decisions"]["held_for_modality"] <= 2
    assert np.isfinite(m["datasets"]["ct_liver"]["ece"])
    # PET is a modality the bank never saw: held whatever its OODM; those its OODM alone would release are
    # counted as held for the modality
    pet = m["datasets"]["pt_tumour"]
    assert pet["flagged_ood"] == 2 and pet.get("held_for_modality", 0) == 2 - pet["oodm_above_tau"]
    assert gate.meta["modalities"] == ["CT", "MR"] and gate.meta["inference"]["spacing"] == {}

    # a clinical-geometry set (DICOM series + labels) reads like any other data; the same bank applies
    from model.data.clinical import Geometry, write_clinical_set

    clinical = write_clinical_set(tmp_path / "clin", "ct_liver", 1, seed=1,
                                  geometry=Geometry((40, 128, 128), (5.0, 2.5, 2.5), (0.0, 0.0, 0.0)))
    res = run.invoke(model_group, ["evaluate", "--weights", str(weights), "--bank", str(bank), "--data",
                                   str(clinical), "--out", str(tmp_path / "ev2"), "--device", "cpu", "--json"],
                     catch_exceptions=False)
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    assert m["datasets"]["ct_liver_clinical"]["n"] == 1 and m["datasets"]["ct_liver_clinical"]["dsc"] is not None

    # a worker path other than the bank's is refused, naming the difference
    res = run.invoke(model_group, ["evaluate", "--weights", str(weights), "--bank", str(bank), "--data", str(liver),
                                   "--spacing", "CT=4,4,4", "--device", "cpu"])
    assert res.exit_code != 0 and "spacing: bank {}, this evaluation {'CT': [4.0, 4.0, 4.0]}" in res.output
    assert (tmp_path / "ev" / "oodm_histogram.png").is_file()


def test_train_rejects_bad_dataset_argument(tmp_path):
    res = CliRunner().invoke(model_group, ["train", "--dataset", "nopath", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "NAME=PATH" in res.output
    res = CliRunner().invoke(model_group, ["train", "--dataset", f"x={tmp_path}", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "dataset.json" in res.output


def test_fit_ood_weights_like_regrids_to_the_sites_scanners(tmp_path):
    import torch

    from model.data.series_writer import write_series
    from model.unet import SegNet, save_weights

    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    save_weights(SegNet(base_features=4, levels=2).eval(), weights,
                 {"inference_block": 32, "inference_overlap": 8, "inference_spacing": {"CT": [6.0, 6.0, 6.0]}})
    liver = write_msd_dataset(tmp_path / "data", "ct_liver", 2, seed=1)
    scanners = tmp_path / "scanners"
    for n, (modality, shape, spacing) in enumerate([("CT", (12, 24, 24), (5.0, 3.0, 3.0)),
                                                    ("CT", (10, 20, 20), (6.0, 4.0, 4.0)),
                                                    ("MR", (8, 16, 16), (3.0, 2.0, 2.0))]):
        write_series(np.full(shape, 40.0 if modality == "CT" else 300.0, np.float32), spacing, modality,
                     scanners / f"s{n}")
    run = CliRunner()
    bank = tmp_path / "bank.npz"
    res = run.invoke(model_group, ["fit-ood", "--weights", str(weights), "--data", str(liver), "--out", str(bank),
                                   "--regrids", "2", "--device", "cpu"])
    assert res.exit_code == 2 and "--regrids needs --like DIR" in res.output

    res = run.invoke(model_group, ["fit-ood", "--weights", str(weights), "--data", str(liver), "--out", str(bank),
                                   "--like", str(scanners), "--regrids", "2", "--seed", "3", "--device", "cpu"],
                     catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "bank of 6 signatures (2 images, each also re-gridded to up to 2 of 3 scanner geometries)" in res.stdout
    assert "scanner geometry CT 12x24x24 at 5, 3, 3 mm" in res.stderr and "/6 " in res.stderr
    gate = SpectralGate.load(bank, weights_sha256=sha256_file(weights))
    assert gate.bank.shape[0] == 2 * (1 + 2) and gate.meta["images"] == 2
    rec = gate.meta["regrids"]
    assert (rec["per_image"], rec["seed"]) == (2, 3)
    used = {(g["modality"], tuple(g["shape"]), tuple(g["spacing"])): g["images"] for g in rec["geometries"]}
    assert used == {("CT", (12, 24, 24), (5.0, 3.0, 3.0)): 2, ("CT", (10, 20, 20), (6.0, 4.0, 4.0)): 2,
                    ("MR", (8, 16, 16), (3.0, 2.0, 2.0)): 0}
