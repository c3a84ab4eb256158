"""The real MR: MNI152 "subjects" from the template inside nilearn's wheel."""

import numpy as np
import pytest

from model.data.mni import KIND, mni_case, mni_template, template_paths


def test_the_template_ships_with_nilearn_and_reads_in_lps():
    t1_path, gm_path = template_paths()
    assert "nilearn" in t1_path.parts and t1_path.is_file() and gm_path.is_file()
    t1, gm = mni_template()
    assert t1.shape == gm.shape and not t1.flags.writeable
    assert 0.0 <= t1.min() and t1.max() <= 1.0 and 0.0 <= gm.min() and gm.max() <= 1.0
    # LPS: the frontal lobe (anterior) is at low y, the cerebellum (inferior, posterior) at low z, high y
    zc = t1.shape[0] // 2
    assert t1[zc, : t1.shape[1] // 8].sum() < t1[zc, t1.shape[1] // 8: t1.shape[1] // 4].sum()
    low = t1[: t1.shape[0] // 4]
    assert low[:, t1.shape[1] // 2:].sum() > low[:, : t1.shape[1] // 2].sum()


def test_subjects_are_deterministic_and_differ_between_indices():
    a = mni_case(2026, 1000, spacing=(3.0, 3.0, 3.0))
    b = mni_case(2026, 1000, spacing=(3.0, 3.0, 3.0))
    c = mni_case(2026, 1001, spacing=(3.0, 3.0, 3.0))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.image.shape != c.image.shape or not np.array_equal(a.label, c.label)
    assert (a.kind, a.modality, a.organ, a.seed, a.index) == (KIND, "MR", "grey matter", 2026, 1000)
    assert a.spacing == (3.0, 3.0, 3.0)


def test_a_subject_at_the_default_spacing_is_a_plausible_brain_mr():
    case = mni_case(2026, 1002)
    assert case.spacing == (1.5, 1.5, 1.5) and case.label.shape == case.image.shape
    assert case.image.dtype == np.float32 and case.label.dtype == np.uint8 and case.image.min() >= 0.0
    frac = float(case.label.mean())
    assert 0.1 < frac < 0.35  # grey matter > 0.5 in a box around the brain
    gm_ml = case.label.sum() * np.prod(case.spacing) / 1e3
    assert 700 < gm_ml < 1400  # the template's own is about 1080 ml; heads scale by 0.92-1.08
    grey = case.image[case.label.astype(bool)].mean()
    white = case.image[(case.image > 0.8 * np.percentile(case.image, 99)) & ~case.label.astype(bool)].mean()
    assert grey < white  # T1: grey matter darker than white matter
    air = case.image[:3, :3, :3]
    assert 0 < air.mean() < 0.1 * grey  # Rician noise floor outside the head


def test_bad_spacing_is_refused_with_the_value():
    with pytest.raises(ValueError, match=r"three positive mm values .* got \(1.0, 0.0, 1.0\)"):
        mni_case(0, 0, spacing=(1.0, 0.0, 1.0))


def test_the_fast_smooth_field_is_the_phantoms_field():
    from model.data.phantoms import _smooth_field, _smooth_field_fast

    for shape, coarse in (((40, 50, 60), 4), ((17, 9, 33), 3), ((30, 30, 30), 5)):
        a = _smooth_field(np.random.default_rng(7), shape, coarse)
        b = _smooth_field_fast(np.random.default_rng(7), shape, coarse)
        assert a.shape == b.shape == shape
        np.testing.assert_allclose(b, a, atol=1e-6)
