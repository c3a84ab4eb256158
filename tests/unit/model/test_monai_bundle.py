"""The MONAI bundle adapter against MONAI itself: a bundle made and trained with MONAI's tools, run the way
its authors run it (``python -m monai.bundle run``), compared voxel for voxel with the adapter; the hooked
windows' signature against the stitched full feature map; the refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import monai  # noqa: F401  (in the dev extra: missing is a failure, not a skip)
import numpy as np
import pytest
import torch

from model.adapters.base import AdapterError  # noqa: E402
from model.adapters.monai_bundle import MonaiBundleAdapter, default_layer  # noqa: E402
from model.data.phantoms import phantom_case  # noqa: E402
from model.ood import signature_from_gram  # noqa: E402
from model.window_gram import stitch_features  # noqa: E402
from tests.conftest import copy_model  # noqa: E402
from tests.model_factories.monai_bundle import LABELS, ROI, write_nifti  # noqa: E402

# a held-out phantom at 5 x 4 x 4 mm (the bundle resamples to 4 mm: Spacingd and its inversion both work)
CASE = ("ct_liver", 0, 11)


@pytest.fixture(scope="session")
def bundle(monai_bundle: Path) -> Path:
    """The session's bundle (``tests/conftest.py``)."""
    return monai_bundle


@pytest.fixture(scope="session")
def adapter(bundle: Path) -> MonaiBundleAdapter:
    return MonaiBundleAdapter.open(bundle)


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return copy_model(bundle, tmp_path / "copy")


def test_open_reads_the_bundle(adapter: MonaiBundleAdapter) -> None:
    assert {lab.value: lab.name for lab in adapter.labels} == {int(k): v for k, v in LABELS.items() if k != "0"}
    assert adapter.layer == "model.2.0"
    s = adapter.signature_settings()
    assert s["spacing"] == [4.0, 4.0, 4.0] and s["roi_size"] == list(ROI) and s["mode"] == "gaussian"
    assert s["overlap"] == 0.25 and s["ownership"] == "nearest-centre-v1" and "threshold-v1" in s["body"]
    assert set(adapter.files_sha256) == {"configs/inference.json", "configs/metadata.json", "models/model.pt"}


def test_labels_equal_the_bundles_own_run(adapter: MonaiBundleAdapter, bundle: Path, tmp_path: Path) -> None:
    """The bundle run as its authors run it, on a NIfTI of the same image, gives the same label map."""
    case = phantom_case(*CASE)
    assert case.spacing == (5.0, 4.0, 4.0)
    write_nifti(case.image, case.spacing, tmp_path / "data" / "case.nii.gz")
    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
         "--meta_file", str(bundle / "configs" / "metadata.json"), "--bundle_root", str(bundle),
         "--dataset_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    import nibabel as nib

    ref = nib.load(str(tmp_path / "out" / "case_seg.nii.gz"))
    assert isinstance(ref, nib.Nifti1Image)
    np.testing.assert_array_equal(ref.affine, np.diag([-4.0, -4.0, 5.0, 1.0]))  # saved on the source grid
    theirs = np.asarray(ref.dataobj).transpose(2, 1, 0)

    pred = adapter.predict(case.image, case.spacing, "CT")
    assert pred.labels.shape == case.image.shape and pred.labels.dtype == np.uint8
    assert pred.evidence["postprocessing"] == "channelwise-invert-argmax"
    assert pred.evidence["skipped"] == ["preprocessing[0] LoadImaged", "postprocessing[3] SaveImaged"]
    assert int((pred.labels != theirs).sum()) == 0
    assert set(np.unique(theirs)) >= {0, 1}  # the model does segment something
    assert pred.foreground.dtype == np.float16 and pred.foreground.shape == case.image.shape
    assert float(pred.foreground.min()) >= 0.0 and float(pred.foreground.max()) <= 1.0
    # where the bundle says background wins, P(background) >= every other class's, so >= 1/4
    assert float(pred.foreground[pred.labels == 0].max()) <= 0.75 + 1e-3


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_channelwise_inversion_equals_the_whole_postprocessing(adapter: MonaiBundleAdapter, chunk: int,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory path (Invertd on ``chunk`` channels at a time, running argmax) gives the label map and
    foreground of the bundle's whole postprocessing Compose (less SaveImaged) on the same network output."""
    from monai.data import decollate_batch, list_data_collate

    import model.adapters.monai_bundle as mb

    monkeypatch.setattr(mb, "INVERT_CHANNELS", chunk)
    case = phantom_case(*CASE)
    with torch.no_grad():
        data, _ = adapter.network_input(case.image, case.spacing, "CT")
        pred = adapter.inferer(list_data_collate([data])["image"], adapter.network)
    item = {**data, "pred": decollate_batch(pred, detach=True)[0]}
    labels, fg, how = adapter._postprocess(dict(item))
    assert how == "channelwise-invert-argmax"
    probs = adapter.postprocessing(dict(item), start=0, end=2)["pred"]
    whole = adapter.postprocessing({**item, "pred": probs}, start=2, end=3)["pred"]
    assert np.array_equal(labels, np.asarray(whole[0]).astype(np.uint8))
    np.testing.assert_allclose(fg.astype(np.float32), 1.0 - np.asarray(probs[0]), atol=1e-3)


def test_signature_equals_the_stitched_feature_map(adapter: MonaiBundleAdapter) -> None:
    """Windows recomputed here with MONAI's own slicing, each run on its own, features stitched by the
    ownership rule: the Gram over the body equals the one the adapter hooked from the inferer's batches.
    The image is shorter than the window along z (30 voxels at 4 mm < 32): the inferer's padding too."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    case = phantom_case(*CASE)
    image = case.image[8:32]
    pred = adapter.predict(image, case.spacing, "CT")
    data, body = adapter.network_input(image, case.spacing, "CT")
    x = data["image"].as_tensor()[None]
    shape = tuple(int(n) for n in x.shape[2:])
    assert min(shape) < ROI[0]
    pads = [max(r - n, 0) for r, n in zip(ROI, shape, strict=True)]
    x = torch.nn.functional.pad(x, [p for d in reversed(pads) for p in (d // 2, d - d // 2)])
    padded = tuple(int(n) for n in x.shape[2:])
    mask = np.zeros(padded, bool)
    mask[tuple(slice(d // 2, d // 2 + n) for d, n in zip(pads, shape, strict=True))] = body
    windows = [(w[0], w[1], w[2]) for w in dense_patch_slices(padded, ROI, _get_scan_interval(padded, ROI, 3, (0.25,) * 3))]
    feats: list[np.ndarray] = []
    layer = adapter.network.get_submodule(adapter.layer)
    handle = layer.register_forward_hook(lambda m, i, o: feats.append(o[0].detach().double().numpy()))
    try:
        with torch.no_grad():
            for w in windows:
                adapter.network(x[(slice(None), slice(None), *w)])
    finally:
        handle.remove()
    full = stitch_features(padded, windows, feats)
    f = full[:, mask]
    assert f.shape[1] == pred.n_signature_voxels > 0
    # the inferer runs windows two at a time, this test one at a time: float32 convolutions differ in
    # rounding (measured: 2.3e-7 relative on the Gram), far below what moves the signature by 1e-6; an
    # entry near zero (2.67 beside 2e4 on the diagonal) is compared at the matrix's scale, not its own
    gram = f @ f.T
    np.testing.assert_allclose(pred.gram, gram, rtol=1e-5, atol=1e-7 * float(np.abs(gram).max()))
    np.testing.assert_allclose(pred.signature, signature_from_gram(f @ f.T, f.shape[1]), atol=1e-6)
    assert len(windows) == pred.evidence["windows"] > 1


def test_refuses_an_inference_config_that_does_not_parse(bundle: Path, tmp_path: Path) -> None:
    bad = _copy(bundle, tmp_path)
    (bad / "configs" / "inference.json").write_text('{"network_def": {"_target_": "UNet",')
    with pytest.raises(AdapterError, match="inference config cannot be parsed"):
        MonaiBundleAdapter.open(bad)


def test_refuses_a_component_that_cannot_be_built(bundle: Path, tmp_path: Path) -> None:
    bad = _copy(bundle, tmp_path)
    cfg = json.loads((bad / "configs" / "inference.json").read_text())
    cfg["inferer"]["_target_"] = "NoSuchInferer"
    (bad / "configs" / "inference.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="'inferer' cannot be instantiated"):
        MonaiBundleAdapter.open(bad)


def test_refuses_a_missing_model_pt(bundle: Path, tmp_path: Path) -> None:
    bad = _copy(bundle, tmp_path)
    (bad / "models" / "model.pt").unlink()
    with pytest.raises(AdapterError, match="missing models/model.pt"):
        MonaiBundleAdapter.open(bad)


def test_refuses_weights_that_do_not_match_network_def(bundle: Path, tmp_path: Path) -> None:
    bad = _copy(bundle, tmp_path)
    cfg = json.loads((bad / "configs" / "inference.json").read_text())
    cfg["network_def"]["channels"] = [4, 8, 16]
    (bad / "configs" / "inference.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="does not match network_def"):
        MonaiBundleAdapter.open(bad)


def test_refuses_a_device_that_is_not_there(bundle: Path) -> None:
    with pytest.raises(AdapterError, match="'gpu0' is not a torch device"):
        MonaiBundleAdapter.open(bundle, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(AdapterError, match="no CUDA device here"):
            MonaiBundleAdapter.open(bundle, device="cuda:0")


def test_refuses_a_layer_that_does_not_exist(bundle: Path) -> None:
    with pytest.raises(AdapterError, match=r"layer 'model\.2\.7' does not exist .*model\.2\.0"):
        MonaiBundleAdapter.open(bundle, layer="model.2.7")


def test_a_layer_not_at_the_windows_resolution_is_refused_at_predict(bundle: Path) -> None:
    coarse = MonaiBundleAdapter.open(bundle, layer="model.1")  # the skip block: half resolution
    case = phantom_case(*CASE)
    with pytest.raises(AdapterError, match=r"features are \(16, 16, 16\) voxels for a \(32, 32, 32\) window"):
        coarse.predict(case.image[:20, :40, :40], case.spacing, "CT")


def test_torchscript_weights_load_into_network_def(bundle: Path, adapter: MonaiBundleAdapter, tmp_path: Path) -> None:
    ts = _copy(bundle, tmp_path)
    torch.jit.script(adapter.network).save(str(ts / "models" / "model.ts"))
    (ts / "models" / "model.pt").unlink()
    cfg = json.loads((ts / "configs" / "inference.json").read_text())
    del cfg["checkpointloader"]
    (ts / "configs" / "inference.json").write_text(json.dumps(cfg))
    other = MonaiBundleAdapter.open(ts)
    a, b = adapter.network.state_dict(), other.network.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_default_layers_from_the_network_definition() -> None:
    from monai.networks.nets import SegResNet, UNet

    assert default_layer(UNet(3, 1, 3, (4, 8), (2,), num_res_units=1)) == "model.2.0"
    # a top level at full resolution: the top skip connection (2 x channels[0] wide) feeds the head
    unet = UNet(3, 1, 2, (4, 8, 16), (1, 2), num_res_units=1).eval()
    assert default_layer(unet) == "model.1"
    seen: list[tuple[int, ...]] = []
    unet.get_submodule("model.1").register_forward_hook(lambda _m, _i, o: seen.append(tuple(o.shape)))
    with torch.no_grad():
        assert tuple(unet(torch.zeros(1, 1, 8, 8, 8)).shape) == (1, 2, 8, 8, 8)
    assert seen == [(1, 8, 8, 8, 8)]  # full resolution, 8 channels where the head gives 2
    assert default_layer(SegResNet(3, 8, 1, 3, blocks_down=(1, 1, 1), blocks_up=(1, 1))) == "up_layers.1"
    with pytest.raises(AdapterError, match="num_res_units=0"):
        default_layer(UNet(3, 1, 3, (4, 8), (2,), num_res_units=0))
    with pytest.raises(AdapterError, match="no default signature layer for a Conv3d"):
        default_layer(torch.nn.Conv3d(1, 2, 3))


def test_register_warns_about_a_narrow_signature_layer(adapter: MonaiBundleAdapter,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The tests' bundle is a UNet with a strided top level: its default layer is as wide as its 4
    classes, and ``register``'s probe says the gate can tell little apart with 4 numbers."""
    from specgate._cli_model_registry import NARROW_SIGNATURE, _probe

    _probe(adapter, "narrow", "CT")
    err = capsys.readouterr().err
    assert len(LABELS) < NARROW_SIGNATURE
    assert f"the signature's layer 'model.2.0' gives {len(LABELS)} numbers a study" in err, err
