"""The nnU-Net v2 adapter against nnU-Net's own predictor, on a model made by nnU-Net's own planning and
preprocessing (``tests/model_factories/nnunet_model.py``)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import nnunetv2  # noqa: F401  (installed by `make setup`, Makefile --no-deps step: missing is a failure, not a skip)
import numpy as np
import pytest
import torch

from model.adapters.base import AdapterError  # noqa: E402
from model.adapters.nnunet import NnUNetAdapter  # noqa: E402
from model.data.clinical import Geometry, clinical_case  # noqa: E402
from model.ood import signature_from_gram  # noqa: E402
from model.window_gram import stitch_features  # noqa: E402
from tests.conftest import copy_model  # noqa: E402

# a CT on another grid than the model's (5 x 4 x 4 mm): nnU-Net resamples it in and the logits back out;
# on the network grid (24, 40, 40) with patch (16, 32, 32): 2 x 2 x 2 windows, each run 8 times (mirrors)
GEOMETRY = Geometry((30, 64, 64), (4.0, 2.5, 2.5), (2.0, -3.0, 4.0))


@pytest.fixture(scope="module")
def case():  # type: ignore[no-untyped-def]
    c, _ = clinical_case("ct_liver", 0, 20, geometry=GEOMETRY)
    return c


@pytest.fixture(scope="module")
def two_folds(nnunet_model: Path):  # type: ignore[no-untyped-def]
    return NnUNetAdapter.open(nnunet_model, folds=(0, 1))


@pytest.fixture(scope="module")
def prediction(two_folds, case):  # type: ignore[no-untyped-def]
    torch.set_num_threads(2)
    return two_folds.predict(case.image, case.spacing, "CT")


def _own_prediction(model_dir: Path, case, out: Path, folds, mirroring: bool = True) -> np.ndarray:  # type: ignore[no-untyped-def]
    """nnU-Net's own path: a NIfTI of the same image through ``nnUNetPredictor.predict_from_files_sequential``."""
    import SimpleITK as sitk
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    out.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(case.image.astype(np.float32))
    img.SetSpacing([float(s) for s in reversed(case.spacing)])
    sitk.WriteImage(img, str(out / "ct_0000.nii.gz"))
    p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                        perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    p.initialize_from_trained_model_folder(str(model_dir), use_folds=folds, checkpoint_name="checkpoint_final.pth")
    (out / "pred").mkdir()
    p.predict_from_files_sequential([[str(out / "ct_0000.nii.gz")]], [str(out / "pred" / "ct")])
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out / "pred" / "ct.nii.gz")))


def test_labels_equal_nnunet_own_prediction_with_two_folds_and_mirroring(nnunet_model, case, prediction, tmp_path):  # type: ignore[no-untyped-def]
    own = _own_prediction(nnunet_model, case, tmp_path, (0, 1))
    assert prediction.labels.shape == case.image.shape == own.shape
    assert prediction.labels.dtype == np.uint8
    # the model segments: the comparison is not between two empty maps
    inter = np.logical_and(prediction.labels == 1, case.label == 1).sum()
    dice = 2 * inter / ((prediction.labels == 1).sum() + (case.label == 1).sum())
    assert dice > 0.5, dice
    assert np.array_equal(prediction.labels, own), int((prediction.labels != own).sum())


def test_signature_equals_the_stitched_feature_maps_including_mirrored_passes(two_folds, case, prediction):  # type: ignore[no-untyped-def]
    """Recomputed apart from the adapter's hook: every window of nnU-Net's slicers, each of nnU-Net's 8
    mirror combinations run on the first fold's network, flipped back and averaged, stitched by the
    nearest-centre rule, Gram over the body."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    p = two_folds.predictor
    data, _, mask = two_folds.network_input(case.image, case.spacing, "CT")
    patch = p.configuration_manager.patch_size
    padded = pad_nd_image(torch.from_numpy(data), patch, "constant", {"value": 0}, False, None)
    pmask = pad_nd_image(mask, patch, "constant", {"constant_values": False})
    slicers = p._internal_get_sliding_window_slicers(padded.shape[1:])
    net = p.network
    net.load_state_dict(p.list_of_parameters[0])
    captured: list[torch.Tensor] = []
    handle = dict(net.named_modules())["decoder.stages.1"].register_forward_hook(
        lambda m, i, o: captured.append(o.detach().double()))
    combos = [()] + [c for k in range(3) for c in itertools.combinations((2, 3, 4), k + 1)]
    feats = []
    try:
        with torch.inference_mode():
            for s in slicers:
                x = padded[s][None]
                acc = None
                for axes in combos:
                    captured.clear()
                    net(torch.flip(x, axes) if axes else x)
                    f = torch.flip(captured[0], axes) if axes else captured[0]
                    acc = f if acc is None else acc + f
                assert acc is not None
                feats.append((acc[0] / len(combos)).numpy())
    finally:
        handle.remove()
    windows = [tuple(s[1:]) for s in slicers]
    full = stitch_features(padded.shape[1:], windows, feats)
    rows = full[:, pmask].T
    gram = rows.T @ rows
    assert prediction.n_signature_voxels == int(pmask.sum()) > 0
    assert prediction.evidence["windows"] == len(slicers) == 8
    assert prediction.evidence["mirrored_passes"] == 8
    np.testing.assert_allclose(prediction.signature, signature_from_gram(gram, int(pmask.sum())), rtol=0, atol=1e-6)
    np.testing.assert_allclose(prediction.gram, gram / pmask.sum(), rtol=1e-5, atol=1e-8)


def test_foreground_is_nnunet_probability_within_the_stated_bound(nnunet_model, case):  # type: ignore[no-untyped-def]
    """nnU-Net's own ``return_probabilities`` export (all logits resampled, then softmax) against the
    adapter's class-by-class log-sum-exp: equal to float16 rounding. One fold, no mirroring (cheaper)."""
    from nnunetv2.inference.export_prediction import (
        convert_predicted_logits_to_segmentation_with_correct_shape,
    )

    a = NnUNetAdapter.open(nnunet_model, folds=(0,), use_mirroring=False)
    pred = a.predict(case.image, case.spacing, "CT")
    assert pred.foreground.dtype == np.float16 and pred.foreground.shape == case.image.shape
    data, props, _ = a.network_input(case.image, case.spacing, "CT")
    p = a.predictor
    logits = p.predict_logits_from_preprocessed_data(torch.from_numpy(data))
    seg, probs = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, p.plans_manager, p.configuration_manager, p.label_manager, props, return_probabilities=True)
    diff = np.abs(pred.foreground.astype(np.float32) - (1.0 - probs[0]))
    assert float(diff.max()) < 5e-4, float(diff.max())  # float16: half a unit in the last place below 1 is 2.4e-4
    assert np.array_equal(seg, pred.labels)
    assert pred.evidence["mirrored_passes"] == 1
    assert a.signature_settings()["mirroring_axes"] is None


def test_signature_settings_and_labels(two_folds):  # type: ignore[no-untyped-def]
    s = two_folds.signature_settings()
    assert s["format"] == "nnunet-v2" and s["layer"] == "decoder.stages.1"
    assert s["configuration"] == "3d_fullres" and s["folds"] == [0, 1] and s["fold_rule"] == "first-fold-v1"
    assert s["spacing"] == [5.0, 4.0, 4.0] and s["patch_size"] == [16, 32, 32] and s["step_size"] == 0.5
    assert s["mirroring_axes"] == [0, 1, 2] and s["ownership_rule"] == "nearest-centre-v1"
    assert [(lab.value, lab.name) for lab in two_folds.labels] == [(1, "liver")]
    assert two_folds.spacing == (5.0, 4.0, 4.0)
    assert set(two_folds.files_sha256) == {"dataset.json", "plans.json", "fold_0/checkpoint_final.pth",
                                           "fold_1/checkpoint_final.pth"}
    json.dumps(two_folds.record())


def _copy(model: Path, tmp: Path) -> Path:
    return copy_model(model, tmp / "model")


def test_refuses_a_missing_checkpoint(nnunet_model, tmp_path):  # type: ignore[no-untyped-def]
    with pytest.raises(AdapterError, match=r"missing fold_3/checkpoint_final\.pth"):
        NnUNetAdapter.open(nnunet_model, folds=(3,))
    m = _copy(nnunet_model, tmp_path)
    for f in m.glob("fold_*/checkpoint_final.pth"):
        f.unlink()
    with pytest.raises(AdapterError, match=r"missing fold_\*/checkpoint_final\.pth"):
        NnUNetAdapter.open(m)
    (m / "plans.json").unlink()
    with pytest.raises(AdapterError, match=r"missing plans\.json"):
        NnUNetAdapter.open(m)


def test_refuses_a_checkpoint_that_does_not_match_its_plans(nnunet_model, tmp_path):  # type: ignore[no-untyped-def]
    m = _copy(nnunet_model, tmp_path)
    plans = json.loads((m / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [8, 16, 32]
    (m / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(AdapterError, match=r"fold_0/checkpoint_final\.pth does not match the network of plans\.json and "
                                           r"dataset\.json \(configuration '3d_fullres': PlainConvUNet with n_stages 3, "
                                           r"features_per_stage \[8, 16, 32\]; 2 classes\): \d+ weight\(s\) of another shape"):
        NnUNetAdapter.open(m, folds=(0,))


def test_refuses_a_state_dict_of_another_architecture_in_a_later_fold(nnunet_model, tmp_path):  # type: ignore[no-untyped-def]
    from model.unet import SegNet

    m = _copy(nnunet_model, tmp_path)
    ck = torch.load(m / "fold_1" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    ck["network_weights"] = SegNet(base_features=4, levels=2).state_dict()
    torch.save(ck, m / "fold_1" / "checkpoint_final.pth")
    with pytest.raises(AdapterError, match=r"fold_1/checkpoint_final\.pth does not match the network of plans\.json"):
        NnUNetAdapter.open(m, folds=(0, 1))


def test_refuses_a_trainer_whose_modules_cannot_be_imported(nnunet_model, tmp_path):  # type: ignore[no-untyped-def]
    """nnU-Net looks a checkpoint's trainer (here ``nnUNetTrainerNoMirroring``, a real variant) up by
    importing its trainer modules, some of which need ``timm``: without it, ``register`` printed a traceback
    instead of a refusal. Where timm is installed the same model opens."""
    import importlib.util

    m = _copy(nnunet_model, tmp_path)
    for f in m.glob("fold_*/checkpoint_final.pth"):
        ckpt = torch.load(f, map_location="cpu", weights_only=False)
        ckpt["trainer_name"] = "nnUNetTrainerNoMirroring"
        torch.save(ckpt, f)
    if importlib.util.find_spec("timm") is not None:
        assert NnUNetAdapter.open(m, folds=(0,)).labels
        return
    with pytest.raises(AdapterError, match=r"could not import a module .* install the missing package \(timm\)"):
        NnUNetAdapter.open(m, folds=(0,))


def test_refuses_a_layer_that_does_not_exist(nnunet_model):  # type: ignore[no-untyped-def]
    with pytest.raises(AdapterError, match=r"layer 'decoder\.head' does not exist.*decoder\.stages\.1"):
        NnUNetAdapter.open(nnunet_model, folds=(0,), layer="decoder.head")


def test_refuses_a_low_resolution_layer_at_its_first_window(nnunet_model, case):  # type: ignore[no-untyped-def]
    a = NnUNetAdapter.open(nnunet_model, folds=(0,), layer="decoder.stages.0", use_mirroring=False)
    with pytest.raises(AdapterError, match=r"layer 'decoder\.stages\.0' outputs \(8, 16, 16\) voxels per window"):
        a.predict(case.image, case.spacing, "CT")


def test_refuses_a_reader_that_reorients(nnunet_model, tmp_path):  # type: ignore[no-untyped-def]
    m = _copy(nnunet_model, tmp_path)
    plans = json.loads((m / "plans.json").read_text())
    plans["image_reader_writer"] = "NibabelIOWithReorient"
    (m / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(AdapterError, match=r"image_reader_writer 'NibabelIOWithReorient' is not supported"):
        NnUNetAdapter.open(m)


def test_predict_refuses_a_bad_volume_or_spacing_naming_it(two_folds):  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=r"image must be \(z, y, x\), got shape \(4, 4\)"):
        two_folds.predict(np.zeros((4, 4), np.float32), (1.0, 1.0, 1.0), "CT")
    with pytest.raises(ValueError, match=r"spacing must be three positive mm values \(z, y, x\), got \(1.0, 0.0, 1.0\)"):
        two_folds.predict(np.zeros((4, 4, 4), np.float32), (1.0, 0.0, 1.0), "CT")


def test_refuses_a_cuda_device_on_a_machine_without_one(nnunet_model):  # type: ignore[no-untyped-def]
    with pytest.raises(AdapterError, match=r"device 'gpu' is not a torch device"):
        NnUNetAdapter.open(nnunet_model, device="gpu")
    if torch.cuda.is_available():  # a machine with a GPU: the device is taken
        assert NnUNetAdapter.open(nnunet_model, folds=(0,), device="cuda:0").labels
        return
    with pytest.raises(AdapterError, match=r"device 'cuda:0': this machine has no CUDA device"):
        NnUNetAdapter.open(nnunet_model, device="cuda:0")
