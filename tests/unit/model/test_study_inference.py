"""model.study_inference: the production path. Settings parse and record; the body decides what counts."""

import numpy as np
import pytest
import torch

from model.data.phantoms import phantom_case
from model.resample import Grid, from_grid
from model.study_inference import (
    InferenceSettings,
    body_mask,
    labels_on_source,
    parse_spacing,
    segment_labels,
    segment_volume,
    study_windows,
)
from model.unet import SegNet


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return SegNet(base_features=4, levels=2).eval()


def test_parse_spacing():
    assert parse_spacing("native") == ()
    assert parse_spacing("MR=3,1.7,1.7;CT=4,4,4") == (("CT", (4.0, 4.0, 4.0)), ("MR", (3.0, 1.7, 1.7)))
    for bad, msg in [("CT=4,4", "three"), ("CT=0,4,4", "positive"), ("CT=4,4,4;CT=2,2,2", "twice"),
                     ("", "names no spacing"), ("C1=4,4,4", "MODALITY")]:
        with pytest.raises(ValueError, match=msg):
            parse_spacing(bad)


def test_settings_record_round_trip_and_validation():
    s = InferenceSettings.for_weights({"inference_block": 64, "inference_overlap": 16,
                                       "inference_spacing": {"ct": [4, 4, 4]}})
    assert s.block == 64 and s.spacing_for("CT") == (4.0, 4.0, 4.0) and s.spacing_for("MR") is None
    assert InferenceSettings.from_record(s.record()) == s
    assert "batch_size" not in s.signature_settings()
    assert InferenceSettings.for_weights({}, device="cuda:0").batch_size == 8
    assert InferenceSettings.for_weights({"inference_spacing": {"CT": [4, 4, 4]}}, spacing=()).spacing == ()
    with pytest.raises(ValueError, match="precision"):
        InferenceSettings(precision="float16")
    with pytest.raises(ValueError, match="overlap"):
        InferenceSettings(block=32, overlap=32)


def test_body_mask_fills_lungs_and_drops_air():
    case = phantom_case("ct_lung", 0, 0)
    x = (np.clip(case.image, -1000, 1000) + 1000) / 2000
    m = body_mask(x, "CT")
    assert m[case.label.astype(bool)].mean() > 0.99  # lungs (-850 HU) are inside the body
    assert not m[:, 0, :].any() and not m[:, :, 0].any()  # the air at the edge of the field of view is not
    assert not body_mask(np.zeros((8, 16, 16), np.float32), "MR").any()


def test_air_around_the_patient_changes_nothing(net):
    """A larger field of view of the same patient (padded with air) gives the same signature."""
    case = phantom_case("ct_liver", 0, 1)
    s = InferenceSettings(block=32, overlap=8)
    a = segment_volume(net, case.image, case.spacing, "CT", s)
    padded = np.pad(case.image, ((0, 0), (20, 20), (25, 25)), constant_values=-1000.0)
    b = segment_volume(net, padded, case.spacing, "CT", s)
    np.testing.assert_allclose(b.signature, a.signature, atol=1e-5)
    assert a.body_voxels == b.body_voxels > 0
    np.testing.assert_allclose(b.foreground[:, 20:-20, 25:-25], a.foreground, atol=2e-3)
    assert float(b.foreground[:, :20].max()) == 0.0  # outside the body's box: background


def test_resampled_probabilities_lie_on_the_source_grid(net):
    case = phantom_case("ct_liver", 0, 2)
    s = InferenceSettings(block=32, overlap=8, spacing=(("CT", (8.0, 8.0, 8.0)),))
    r = segment_volume(net, case.image, case.spacing, "CT", s, out_dtype=np.float32)
    assert r.resampled and r.probabilities.shape == (2, *case.image.shape)
    assert r.model_shape == tuple(round(n * sp / 8.0) for n, sp in zip(case.image.shape, case.spacing, strict=True))
    np.testing.assert_allclose(r.probabilities.sum(0), 1.0, atol=1e-5)
    native = segment_volume(net, case.image, case.spacing, "MR", s)  # no MR spacing declared: native
    assert not native.resampled and native.model_shape == case.image.shape


@pytest.mark.parametrize("spacing", [(("CT", (8.0, 8.0, 8.0)),), ()], ids=["resampled", "native"])
def test_labels_equal_the_thresholded_probabilities_of_two_classes(net, spacing):
    """The worker's path (label map + float16 foreground) gives the mask and the foreground of the
    full-probability path bit for bit, and the same signature."""
    case = phantom_case("ct_liver", 0, 3)
    s = InferenceSettings(block=32, overlap=8, spacing=spacing)
    full = segment_volume(net, case.image, case.spacing, "CT", s)
    lab = segment_labels(net, case.image, case.spacing, "CT", s)
    assert lab.labels.dtype == np.uint8 and lab.foreground.dtype == np.float16 and lab.n_classes == 2
    np.testing.assert_array_equal(lab.foreground, full.foreground)
    np.testing.assert_array_equal(lab.labels, full.foreground >= 0.5)
    np.testing.assert_array_equal(lab.signature, full.signature)
    assert lab.evidence() == full.evidence()


def test_labels_of_many_classes_are_the_argmax_of_the_resampled_probabilities():
    torch.manual_seed(1)
    net5 = SegNet(base_features=4, levels=2, num_classes=5).eval()
    case = phantom_case("ct_liver", 0, 4)
    s = InferenceSettings(block=32, overlap=8, spacing=(("CT", (8.0, 8.0, 8.0)),))
    full = segment_volume(net5, case.image, case.spacing, "CT", s, out_dtype=np.float32)
    lab = segment_labels(net5, case.image, case.spacing, "CT", s)
    assert lab.n_classes == 5 and set(np.unique(lab.labels)) <= set(range(5))
    np.testing.assert_array_equal(lab.labels, full.probabilities.argmax(0))
    np.testing.assert_allclose(lab.foreground.astype(np.float32), 1 - full.probabilities[0], atol=1e-3)


def test_running_argmax_skips_only_classes_that_cannot_win():
    """Many classes, each present in a few slices only: the slab-wise running maximum with skipped
    classes equals the argmax over every class resampled at full resolution (SimpleITK)."""
    rng = np.random.default_rng(0)
    k, grid = 40, Grid((12, 10, 9), (4.0, 4.0, 4.0))
    logits = rng.normal(size=(k, *grid.shape)) * 0.5
    for c in range(1, k):  # class c strong around slice c % 12 only
        logits[c, c % 12] += 4.0
    p = np.exp(logits) / np.exp(logits).sum(0)
    shape, sp = (48, 40, 30), (1.0, 1.0, 1.2)
    box = ((0, 12), (0, 10), (0, 9))
    labels, fg = labels_on_source(p.astype(np.float32), box, grid, shape, sp)
    ref = np.stack([from_grid(p[c].astype(np.float32), grid, shape, sp) for c in range(k)])
    np.testing.assert_array_equal(labels, ref.argmax(0))
    np.testing.assert_array_equal(fg, (1.0 - ref[0]).astype(np.float16))
    big = labels_on_source(np.full((300, 2, 2, 2), 1 / 300, np.float32), ((0, 2),) * 3, Grid((2, 2, 2), (2.0,) * 3),
                           (4, 4, 4), (1.0, 1.0, 1.0))[0]
    assert big.dtype == np.uint16 and not big.any()  # all tied: the lowest class


@pytest.mark.parametrize("kind", ["ct_lung", "mr_prostate"])
def test_study_windows_counts_what_segment_volume_runs(net, kind):
    """The card's count of training phantoms that take several windows runs no network: it must agree with
    the windows the worker's path runs."""
    case = phantom_case(kind, 0, 0)
    s = InferenceSettings(block=32, overlap=8, spacing=(("CT", (6.0, 6.0, 6.0)), ("MR", (3.0, 3.0, 3.0))))
    shape, windows = study_windows(case.image, case.spacing, case.modality, s, net.divisor)
    r = segment_volume(net, case.image, case.spacing, case.modality, s)
    assert windows == r.n_windows > 1
    assert shape == tuple(hi - lo for lo, hi in r.crop)
