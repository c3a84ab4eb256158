import json

import numpy as np
import pydicom
import pytest

from model.data.clinical import (
    Geometry,
    clinical_case,
    extent_mm,
    regrid,
    sample_geometry,
    write_clinical_set,
)
from model.data.phantoms import KINDS, phantom_case
from model.data.volumes import MSDDataset, iter_cases

RANGES = {  # modality: matrices, pixel (mm), slice (mm), slices
    "CT": ({512}, (0.6, 0.9), (1.0, 2.5), (120, 300)),
    "MR": ({256, 288, 320}, (0.5, 1.2), (1.0, 4.0), (40, 180)),
    "PT": (set(range(128, 201)), (2.0, 4.0), (2.0, 4.0), None),
}


def _organ_inside(case, geom):
    """The organ's bounding box (voxel edges, mm) lies inside the clinical field of view."""
    idx = np.argwhere(case.label)
    centre = (np.array(case.image.shape) - 1) / 2.0
    lo = (idx.min(0) - centre - 0.5) * case.spacing
    hi = (idx.max(0) - centre + 0.5) * case.spacing
    start = np.array(geom.origin_mm) - np.array(geom.spacing) / 2.0
    return bool(np.all(lo >= start) and np.all(hi <= start + np.array(geom.fov_mm)))


def _volume_mm3(case):
    return float(case.label.sum(dtype=np.int64)) * float(np.prod(case.spacing))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_sampled_geometries_are_clinical_and_scan_the_phantom(kind):
    modality = KINDS[kind].modality
    matrices, (pmin, pmax), (smin, smax), slices = RANGES[modality]
    ratios = []
    for index in range(3):
        ext = extent_mm(phantom_case(kind, 0, index))
        for r in range(25):
            g = sample_geometry(modality, np.random.default_rng([index, r]), ext)
            nz, ny, nx = g.shape
            dz, dy, dx = g.spacing
            assert ny == nx and ny in matrices and dy == dx  # square matrix, square pixels
            assert pmin - 1e-9 <= dy <= pmax + 1e-9
            assert smin <= dz <= smax and (dz / 0.125).is_integer()
            if slices is not None:
                assert slices[0] <= nz <= slices[1]
            ratio = np.array(g.fov_mm) / np.array(ext)
            assert np.all(ratio >= 0.8 * (1 - 1e-9)) and np.all(ratio <= 3.0 * (1 + 1e-9)), (g, ext)
            assert all(abs(s) <= 0.05 * f + 1e-9 for s, f in zip(g.shift_mm, g.fov_mm, strict=True))
            ratios.append(ratio)
    r = np.array(ratios)
    assert (r > 1.0).any()  # some scans are padded with air ...
    if kind != "mr_hippocampus":  # (the smallest clinical MR field of view, 128 mm, exceeds this head)
        assert (r < 1.0).any()  # ... and some crop the phantom


def test_sample_geometry_clips_when_the_band_is_out_of_reach():
    g = sample_geometry("CT", np.random.default_rng(0), (20.0, 2000.0, 2000.0))  # tiny z, huge in-plane
    assert 120 <= g.shape[0] <= 300 and g.spacing[0] == 1.0  # closest clinical coverage: 120 x 1 mm
    assert g.spacing[1] == pytest.approx(0.9, abs=1e-6)
    with pytest.raises(ValueError, match="modality"):
        sample_geometry("US", np.random.default_rng(0), (100.0, 100.0, 100.0))


def test_clinical_case_is_deterministic():
    small = Geometry((24, 64, 64), (3.0, 2.5, 2.5), (1.5, -2.0, 3.0))
    a, ga = clinical_case("mr_prostate", 2, 1000, geometry=small)
    b, gb = clinical_case("mr_prostate", 2, 1000, geometry=small)
    c, _ = clinical_case("mr_prostate", 2, 1000, variant=1, geometry=small)
    assert ga == gb == small
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert not np.array_equal(a.image, c.image)  # another variant: other noise
    p1, g1 = clinical_case("pt_tumour", 2, 1001)
    p2, g2 = clinical_case("pt_tumour", 2, 1001)
    assert g1 == g2 and p1.image.shape == g1.shape and p1.spacing == g1.spacing
    np.testing.assert_array_equal(p1.image, p2.image)
    assert (p1.kind, p1.modality, p1.organ, p1.seed, p1.index) == ("pt_tumour", "PT", "tumour", 2, 1001)
    assert clinical_case("pt_tumour", 2, 1001, variant=1)[1] != g1


@pytest.mark.parametrize(
    ("kind", "geom"),
    [
        ("ct_liver", Geometry((110, 160, 160), (2.5, 2.5, 2.5), (2.0, -4.0, 3.0))),
        ("ct_lung", Geometry((100, 140, 140), (2.5, 3.0, 3.0), (-3.0, 0.0, 2.0))),
        ("mr_prostate", Geometry((60, 150, 150), (2.0, 1.2, 1.2), (1.0, 2.0, -1.0))),
        ("mr_hippocampus", Geometry((60, 128, 128), (1.5, 0.9, 0.9), (0.5, -1.0, 1.0))),
        ("pt_tumour", Geometry((70, 128, 128), (3.0, 3.0, 3.0), (0.0, 5.0, -5.0))),
    ],
)
def test_regrid_preserves_label_volume_and_fills_air(kind, geom):
    case = phantom_case(kind, 1, 1000)
    assert _organ_inside(case, geom)
    out = regrid(case, geom, np.random.default_rng(0), noise=False)
    assert out.image.shape == out.label.shape == geom.shape
    assert out.image.dtype == np.float32 and out.label.dtype == np.uint8
    assert out.spacing == geom.spacing
    assert (out.kind, out.modality, out.organ, out.seed, out.index) == (kind, case.modality, case.organ, 1, 1000)
    assert _volume_mm3(out) == pytest.approx(_volume_mm3(case), rel=0.10)
    # the clinical field of view is larger than the phantom on every axis here: its border is air
    air = -1000.0 if case.modality == "CT" else 0.0
    for border in (out.image[0], out.image[-1], out.image[:, 0], out.image[:, :, -1]):
        assert np.all(border == air)
    for border in (out.label[0], out.label[:, -1], out.label[:, :, 0]):
        assert not border.any()


def test_regrid_noise_by_modality():
    ct = phantom_case("ct_liver", 1, 1000)
    g = Geometry((110, 160, 160), (2.5, 2.5, 2.5), (0.0, 0.0, 0.0))
    a = regrid(ct, g, np.random.default_rng(5))
    outside = a.image[0]  # first slice: outside the phantom, air plus noise
    assert np.median(outside) == -1000.0 and 10.0 < outside[outside > -1024].std() < 35.0
    assert a.image.min() >= -1024.0 and np.array_equal(a.image, np.rint(a.image))  # whole HU, as stored
    np.testing.assert_array_equal(a.image, regrid(ct, g, np.random.default_rng(5)).image)
    mr = phantom_case("mr_prostate", 1, 1000)
    gm = Geometry((60, 150, 150), (2.0, 1.2, 1.2), (0.0, 0.0, 0.0))
    clean = regrid(mr, gm, noise=False)
    noisy = regrid(mr, gm, np.random.default_rng(5))
    assert noisy.image.min() >= 0.0  # Rician-like: a magnitude
    p99 = np.percentile(clean.image, 99)
    assert 0.01 * p99 < noisy.image[0].mean() < 0.05 * p99  # |N(0, 2-4 % of p99)| in the air
    np.testing.assert_array_equal(noisy.label, clean.label)
    pt = phantom_case("pt_tumour", 1, 1000)
    gp = Geometry((70, 128, 128), (3.0, 3.0, 3.0), (0.0, 0.0, 0.0))
    np.testing.assert_array_equal(regrid(pt, gp).image, regrid(pt, gp, noise=False).image)


def test_real_512_ct_geometry_in_memory():
    case, g = clinical_case("ct_liver", 0, 1000)
    assert g.shape[1:] == (512, 512) and 120 <= g.shape[0] <= 300
    assert case.image.shape == case.label.shape == g.shape and case.image.dtype == np.float32
    assert case.image.min() >= -1024.0 and case.image.max() < 1500.0
    ref = phantom_case("ct_liver", 0, 1000)
    if _organ_inside(ref, g):
        assert _volume_mm3(case) == pytest.approx(_volume_mm3(ref), rel=0.10)
    else:
        assert 0 < _volume_mm3(case) <= 1.10 * _volume_mm3(ref)


@pytest.mark.parametrize(
    ("kind", "geom"),
    [
        ("mr_prostate", Geometry((24, 64, 64), (3.0, 2.5, 2.5), (1.5, -2.0, 3.0))),
        ("pt_tumour", Geometry((20, 48, 48), (4.0, 5.0, 5.0), (0.0, 1.0, -1.0))),
    ],
)
def test_write_read_round_trip(tmp_path, kind, geom):
    out = write_clinical_set(tmp_path, kind, 1, seed=4, geometry=geom)
    assert out == tmp_path / f"{kind}_clinical"
    meta = json.loads((out / "dataset.json").read_text())
    name = f"{kind}_clinical_1000"
    assert meta["name"] == f"{kind}_clinical" and meta["numTraining"] == 1
    assert meta["modality"] == {"0": KINDS[kind].modality}
    assert meta["labels"] == {"0": "background", "1": KINDS[kind].organ}
    assert meta["training"] == [{"image": f"./series/{name}/", "label": f"./labelsTr/{name}.npz"}]
    assert meta["specgate_clinical"]["geometries"] == [{"name": name, "index": 1000, **geom.to_json()}]
    files = sorted((out / "series" / name).iterdir())
    assert len(files) == geom.shape[0]
    ds0 = pydicom.dcmread(files[0])
    assert ds0.Modality == KINDS[kind].modality and "SYNTH" in str(ds0.PatientID)

    ref, _ = clinical_case(kind, 4, 1000, geometry=geom)
    (case,) = list(iter_cases(out))
    assert case.name == name and case.modality == ref.modality
    assert case.image.shape == ref.image.shape and case.image.dtype == np.float32
    assert case.spacing == pytest.approx(geom.spacing)
    np.testing.assert_array_equal(case.label, ref.label)
    # values equal within the rescale quantisation (half a stored step; per slice for PT)
    steps = [float(pydicom.dcmread(f, stop_before_pixels=True).RescaleSlope) for f in files]
    assert np.all(np.abs(case.image - ref.image).max(axis=(1, 2)) <= np.array(steps) * 0.5 + 1e-3 * np.array(steps)
                  + 1e-4 * np.abs(ref.image).max())
    with np.load(out / "labelsTr" / f"{name}.npz") as z:
        assert z["label"].dtype == np.uint8
        np.testing.assert_allclose(z["spacing"], geom.spacing)
    # a rerun replaces the series rather than mixing two
    write_clinical_set(tmp_path, kind, 1, seed=4, geometry=geom)
    assert len(list((out / "series" / name).iterdir())) == geom.shape[0]
    assert MSDDataset(out)[0].meta["geometry"].spacing == pytest.approx(geom.spacing)


def test_npz_label_without_label_array_is_refused(tmp_path):
    geom = Geometry((20, 48, 48), (4.0, 5.0, 5.0), (0.0, 0.0, 0.0))
    out = write_clinical_set(tmp_path, "pt_tumour", 1, seed=0, geometry=geom)
    np.savez(out / "labelsTr" / "pt_tumour_clinical_1000.npz", mask=np.zeros(geom.shape, np.uint8))
    with pytest.raises(ValueError, match="no 'label'"):
        MSDDataset(out)[0]
