"""The near-out-of-distribution phantom kinds, and the frozen generator ids that keep every existing kind's
cases what they were before kinds were added."""

import hashlib

import numpy as np
import pytest
from scipy import ndimage

from model.data.clinical import clinical_case
from model.data.phantoms import (
    KINDS,
    NEAR_OOD_KINDS,
    TRAINING_KINDS,
    UNSEEN_KINDS,
    kind_id,
    phantom_case,
)


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# Computed on main at cf99e60, before the near-OOD kinds were added (the generator key then held
# sorted(KINDS).index(kind)). Images only for the kinds whose generator uses no transcendental ufunc
# (np.exp, np.sin: their float32 SIMD paths may round differently on another CPU); labels for all.
BEFORE = {
    "ct_liver": ("df026ef22e7688539b4b633412c094c1afcb1901e5f523c020d98f1de24eb55c",
                 "a83535a6aac2f4f06a77ae35ff607a1fb4e18500e5dc968696717f0c98c50b8a", -118798187.83918357),
    "ct_lung": (None, "557d051cba534bb216cb5c73de35443f4d4bedfa6076fbceac2dec3a4cfa8cdf", -230096435.89785242),
    "mr_prostate": (None, "57e34c201c80b5909712703ae9ea36ddcbe9a25bf579f710180d14ea403d46f8", 74056376.2514951),
    "mr_hippocampus": (None, "0c10fd08723a2b06c14f357b9efeb47397844f71e9052166ed8b60f41284cb28",
                       78774134.41487533),
    "pt_tumour": ("ec5fe749ea62201f199f943848f1822edce398f6f1301bdcf95608045d528cba",
                  "1b790e8629b4d39c5d24f24046b7b1dd4ee2a45d721b26bb9e41c19f289b2df7", 498419839.87430716),
}


@pytest.mark.parametrize("kind", sorted(BEFORE))
def test_existing_kinds_are_unchanged(kind):
    image_sha, label_sha, total = BEFORE[kind]
    case = phantom_case(kind, 2026, 0)
    assert _sha(case.label) == label_sha
    if image_sha is not None:
        assert _sha(case.image) == image_sha
    assert float(case.image.astype(np.float64).sum()) == pytest.approx(total, rel=1e-6)


def test_existing_clinical_case_is_unchanged():
    case, _ = clinical_case("pt_tumour", 2026, 0)  # pt_tumour sorted last: its old index moved the most
    assert _sha(case.label) == "ab6667e9728e21cd5c854f4a8639a7892b06fd9eb60e6fd256d9306f8ac6fe04"
    assert _sha(case.image) == "60f2cf30e7f67f9884f963e77c95bf3645596b2d02f4305cce9c39e46ccda54c"


def test_kind_ids_are_frozen_and_near_ood_kinds_apart():
    assert [kind_id(k) for k in ("ct_liver", "ct_lung", "mr_hippocampus", "mr_prostate", "pt_tumour")] == [
        0, 1, 2, 3, 4]
    assert set(NEAR_OOD_KINDS) <= set(KINDS)
    assert set(NEAR_OOD_KINDS).isdisjoint(TRAINING_KINDS) and set(NEAR_OOD_KINDS).isdisjoint(UNSEEN_KINDS)
    with pytest.raises(ValueError, match="unknown phantom kind 'ct_knee'"):
        kind_id("ct_knee")


@pytest.mark.parametrize(("kind", "modality", "organ"), [
    ("mr_prostate_t1", "MR", "prostate"), ("ct_head", "CT", "brain"), ("ct_liver_child", "CT", "liver")])
def test_near_ood_kinds_generate(kind, modality, organ):
    a = phantom_case(kind, 2026, 1000)
    assert (a.modality, a.organ, a.kind) == (modality, organ, kind)
    assert a.label.any() and a.label.shape == a.image.shape and a.label.dtype == np.uint8
    assert max(a.image.shape) <= 96
    if modality == "CT":
        assert a.image.min() > -1100 and a.image.max() < 3071
    else:
        assert a.image.min() >= 0
    np.testing.assert_array_equal(a.image, phantom_case(kind, 2026, 1000).image)


def test_t1_prostate_is_the_same_pelvis_with_the_gland_contrast_reversed():
    t2, t1 = phantom_case("mr_prostate", 2026, 1001), phantom_case("mr_prostate_t1", 2026, 1001)
    np.testing.assert_array_equal(t1.label, t2.label)  # the same anatomy
    assert t1.spacing == t2.spacing
    organ = t1.label.astype(bool)
    ring = ndimage.binary_dilation(organ, iterations=3) & ~organ  # muscle right around the gland

    def contrast(c):
        return c.image[organ].mean() / c.image[ring].mean()

    assert contrast(t2) < 0.9 and contrast(t1) > 1.0


def test_child_liver_is_smaller_at_the_same_spacing():
    adult, child = phantom_case("ct_liver", 2026, 1002), phantom_case("ct_liver_child", 2026, 1002)
    assert child.spacing == adult.spacing
    ratio = (child.label.sum() / adult.label.sum()) ** (1 / 3)  # linear size
    assert 0.5 < ratio < 0.7
