"""The shift sets: each moves the image the way it claims, deterministically, and leaves it alone at its
identity strength; CT stays in stored Hounsfield units, MR non-negative."""

import numpy as np
import pytest
from scipy import ndimage

from model.data.phantoms import phantom_case
from model.data.shifts import CT_RANGE, SHIFTS, ShiftedCase, apply_shift, body_mask, shifted_case

# validation-range cases (model.data.splits): nothing here is reported
MR = phantom_case("mr_prostate", 2026, 1000)
CT = phantom_case("ct_liver", 2026, 1000)


def _gradient_energy(img):
    return sum(float((g.astype(np.float64) ** 2).sum()) for g in np.gradient(img))


def _air(case):
    """Voxels far from the body: a flat region (air) of the case."""
    return ~ndimage.binary_dilation(body_mask(case.image, case.modality), iterations=3)


@pytest.mark.parametrize("name", sorted(SHIFTS))
@pytest.mark.parametrize("case", [MR, CT], ids=["MR", "CT"])
def test_identity_strength_keeps_the_image_and_every_strength_is_deterministic(name, case):
    sh = SHIFTS[name]
    same = apply_shift(case, name, sh.identity)
    np.testing.assert_array_equal(same.image, case.image)
    np.testing.assert_array_equal(same.label, case.label)
    assert same.spacing == case.spacing and same.kind == f"{case.kind}+{name}{float(sh.identity)!r}"
    strongest = sh.strengths[-1]
    a, b = apply_shift(case, name, strongest), apply_shift(case, name, strongest)
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(a.image, case.image)
    assert a.image.dtype == np.float32 and a.label.dtype == np.uint8 and a.label.shape == a.image.shape
    if case.modality == "CT":
        assert CT_RANGE[0] <= a.image.min() and a.image.max() <= CT_RANGE[1]
    else:
        assert a.image.min() >= 0.0


def test_blur_lowers_the_gradient_energy_monotonically():
    energies = [_gradient_energy(apply_shift(MR, "blur", s).image) for s in (0.0, *SHIFTS["blur"].strengths)]
    assert all(b < a for a, b in zip(energies, energies[1:], strict=False))


def test_thick_slices_have_the_new_spacing_and_a_label_of_the_new_shape():
    for t in SHIFTS["thick"].strengths:
        s = apply_shift(MR, "thick", t)
        assert s.spacing == (t, MR.spacing[1], MR.spacing[2])
        assert s.image.shape == (round(MR.image.shape[0] * MR.spacing[0] / t), *MR.image.shape[1:])
        assert s.label.shape == s.image.shape
        vol = s.label.sum() * np.prod(s.spacing) / (MR.label.sum() * np.prod(MR.spacing))
        assert 0.8 < vol < 1.2  # the organ keeps its volume within the slab's partial volume
    # slab averaging: 35 slices of 3 mm (105 mm) -> 18 slabs of 6 mm (108 mm) centred alike, so slab 1
    # covers [4.5, 10.5] mm: half of slice 1, slice 2, half of slice 3
    assert MR.image.shape[0] == 35 and MR.spacing[0] == 3.0
    s = apply_shift(MR, "thick", 6.0)
    x = MR.image.astype(np.float64)
    np.testing.assert_allclose(s.image[1], 0.25 * x[1] + 0.5 * x[2] + 0.25 * x[3], rtol=1e-5)
    with pytest.raises(ValueError, match="thinner than the case's 3.0 mm slices"):
        apply_shift(MR, "thick", 2.0)
    same = apply_shift(MR, "thick", MR.spacing[0])  # the case's own thickness: unchanged
    np.testing.assert_array_equal(same.image, MR.image)


@pytest.mark.parametrize("case", [MR, CT], ids=["MR", "CT"])
def test_noise_raises_the_std_in_a_flat_region(case):
    air = _air(case)
    stds = [float(apply_shift(case, "noise", s).image[air].std()) for s in (0.0, 0.25, 1.0)]
    assert stds[0] < stds[1] < stds[2]
    other = apply_shift(case, "noise", 0.25, seed=1)
    assert not np.array_equal(other.image, apply_shift(case, "noise", 0.25).image)


def test_gamma_below_one_brightens_the_midtones_and_above_one_darkens_them():
    def mean_normalised(img):
        lo, hi = float(MR.image.min()), float(MR.image.max())
        return float(((img - lo) / (hi - lo)).mean())

    m = {g: mean_normalised(apply_shift(MR, "gamma", g).image) for g in (0.5, 1.0, 2.0)}
    assert m[0.5] > m[1.0] > m[2.0]
    g = apply_shift(MR, "gamma", 2.0).image
    assert g.min() == pytest.approx(MR.image.min(), abs=1e-4) and g.max() == pytest.approx(MR.image.max())


def test_bias_is_a_smooth_multiplicative_field_of_the_given_log_amplitude():
    body = body_mask(MR.image, "MR") & (MR.image > 1.0)
    logs = []
    for a in SHIFTS["bias"].strengths:
        ratio = np.log(apply_shift(MR, "bias", a).image[body] / MR.image[body])
        assert np.abs(ratio).max() <= a + 1e-4
        logs.append(float(ratio.std()))
    assert all(b > a for a, b in zip(logs, logs[1:], strict=False))
    # the same field at every strength: log-ratios scale with the amplitude
    r1 = np.log(apply_shift(MR, "bias", 0.5).image[body] / MR.image[body])
    r2 = np.log(apply_shift(MR, "bias", 1.0).image[body] / MR.image[body])
    np.testing.assert_allclose(r2, 2 * r1, atol=1e-3)


def test_ct_bias_multiplies_the_attenuation_and_leaves_air_alone():
    s = apply_shift(CT, "bias", 1.0)
    air = _air(CT) & (CT.image > -1024)
    att = CT.image[air] + 1024.0  # ~ 0 in air: multiplied, it stays ~ 0
    delta = np.abs(s.image[air] - CT.image[air])
    assert np.all(delta <= att * (np.e - 1) + 1e-2) and delta.mean() < 20
    liver = CT.label.astype(bool)
    assert np.abs(s.image[liver] - CT.image[liver]).mean() > 100


@pytest.mark.parametrize("case", [MR, CT], ids=["MR", "CT"])
def test_inversion_reverses_the_order_of_organ_and_surroundings(case):
    organ = case.label.astype(bool)
    ring = ndimage.binary_dilation(organ, iterations=3) & ~organ

    def diff(img):
        return float(img[organ].mean() - img[ring].mean())

    full, half = apply_shift(case, "invert", 1.0), apply_shift(case, "invert", 0.5)
    assert np.sign(diff(full.image)) == -np.sign(diff(case.image)) != 0
    body = body_mask(case.image, case.modality)
    assert np.ptp(half.image[body]) < 1e-3 * np.ptp(case.image[body]) + 1e-3  # no contrast left
    np.testing.assert_array_equal(full.image[~body], np.clip(case.image[~body], *CT_RANGE)
                                  if case.modality == "CT" else case.image[~body])


def test_ghosting_puts_replicas_of_the_body_in_the_air():
    s = apply_shift(MR, "ghost", 0.35)
    diff = s.image - MR.image
    air = _air(MR)
    assert s.image[air].mean() > MR.image[air].mean() + 10
    d = MR.image.shape[1] // 4
    replicas = 0.35 / 2 * (np.roll(MR.image, d, 1) + np.roll(MR.image, -d, 1))
    np.testing.assert_allclose(diff, replicas, rtol=1e-4, atol=1e-2)


def test_shifted_case_records_what_was_applied_and_composes():
    s = shifted_case("mr_prostate", 2026, 1000, "thick", 6.0)
    t = apply_shift(s, "noise", 0.25, seed=3)
    assert isinstance(t, ShiftedCase) and t.kind == "mr_prostate+thick6.0+noise0.25"
    assert t.base_kind == "mr_prostate" and t.shifts == (("thick", 6.0, 0), ("noise", 0.25, 3))
    assert (t.seed, t.index, t.organ, t.modality) == (2026, 1000, "prostate", "MR")
    np.testing.assert_array_equal(s.image, apply_shift(MR, "thick", 6.0).image)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="unknown shift 'sharpen'"):
        apply_shift(MR, "sharpen", 1.0)
    with pytest.raises(ValueError, match=r"blur strength must be in \[0.0, 20.0\].*got -1"):
        apply_shift(MR, "blur", -1)
    with pytest.raises(ValueError, match="gamma strength"):
        shifted_case("mr_prostate", 2026, 1000, "gamma", 0.0)
