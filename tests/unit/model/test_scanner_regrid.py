"""Re-gridding a site's training images to its own scanners' geometries for the OOD bank
(``specgate model fit-ood NAME --like DIR``): the geometries read from series headers, the resampling,
and the bank with every re-gridding of one image in one group."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.adapters.segnet import SegNetAdapter
from model.bank_fit import Regrids, fit_adapter_bank, regrid_total
from model.data.clinical import Geometry, ScannerGeometry, read_scanner_geometries, regrid_volume
from model.data.phantoms import phantom_case
from model.data.series_writer import write_series
from model.unet import SegNet, save_weights


def _series(folder: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float], modality: str) -> None:
    write_series(np.full(shape, 40.0 if modality == "CT" else 300.0, np.float32), spacing, modality, folder)


def test_scanner_geometries_come_from_the_headers_one_per_grid(tmp_path: Path) -> None:
    _series(tmp_path / "a", (12, 32, 30), (2.5, 0.8, 0.75), "CT")
    _series(tmp_path / "b" / "deeper", (12, 32, 30), (2.5, 0.8, 0.75), "CT")  # same protocol, another series
    _series(tmp_path / "c", (10, 24, 24), (3.0, 1.125, 1.125), "MR")
    found = read_scanner_geometries(tmp_path)
    assert sorted((g.modality, g.geometry.shape, g.geometry.spacing, g.series) for g in found) == [
        ("CT", (12, 32, 30), (2.5, 0.8, 0.75), 2), ("MR", (10, 24, 24), (3.0, 1.125, 1.125), 1)]
    ct = next(g for g in found if g.modality == "CT")
    assert ct.geometry.shift_mm == (0.0, 0.0, 0.0) and Path(ct.source).parent in (tmp_path, tmp_path / "b")
    assert ct.to_json()["shape"] == [12, 32, 30]

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no DICOM series"):
        read_scanner_geometries(empty)
    _series(tmp_path / "short", (2, 8, 8), (2.0, 1.0, 1.0), "CT")
    with pytest.raises(ValueError, match=r"series .* cannot be read as a grid: too_few_slices"):
        read_scanner_geometries(tmp_path / "short")


def test_regrid_volume_rescans_any_volume_centred_with_air_outside() -> None:
    image = np.full((10, 20, 20), 100.0, np.float32)  # 50 x 40 x 40 mm of 100 HU
    geom = Geometry((30, 32, 32), (2.5, 2.0, 2.0), (0.0, 0.0, 0.0))  # 75 x 64 x 64 mm: padded with air
    out = regrid_volume(image, (5.0, 2.0, 2.0), "ct", geom, np.random.default_rng(0), noise=False)
    assert out.shape == (30, 32, 32) and out.dtype == np.float32
    assert out[15, 16, 16] == pytest.approx(100.0) and out[0, 0, 0] == -1000.0 and out[15, 0, 16] == -1000.0
    inside = out[6:24, 7:25, 7:25]  # well inside the 50 x 40 x 40 mm block: 100 HU everywhere
    assert np.allclose(inside, 100.0)
    noisy = regrid_volume(image, (5.0, 2.0, 2.0), "CT", geom, np.random.default_rng(1))
    again = regrid_volume(image, (5.0, 2.0, 2.0), "CT", geom, np.random.default_rng(1))
    np.testing.assert_array_equal(noisy, again)  # the noise comes from the generator only
    assert noisy[6:24, 7:25, 7:25].std() > 10 and np.all(noisy == np.rint(noisy)) and noisy.min() >= -1024
    with pytest.raises(ValueError, match="three positive spacings"):
        regrid_volume(image, (5.0, 0.0, 2.0), "CT", geom, np.random.default_rng(0))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> SegNetAdapter:
    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("w") / "w.pt"
    save_weights(SegNet(base_features=4, levels=2).eval(), p,
                 {"inference_block": 32, "inference_overlap": 8, "inference_spacing": {"CT": [6.0, 6.0, 6.0]}})
    return SegNetAdapter.open(p)


CT_A = ScannerGeometry("CT", Geometry((24, 64, 64), (5.0, 3.0, 3.0), (0.0, 0.0, 0.0)), "scanner-a")
CT_B = ScannerGeometry("CT", Geometry((30, 48, 48), (4.0, 4.5, 4.5), (0.0, 0.0, 0.0)), "scanner-b")
CT_C = ScannerGeometry("CT", Geometry((20, 56, 56), (6.0, 3.5, 3.5), (0.0, 0.0, 0.0)), "scanner-c")
MR_A = ScannerGeometry("MR", Geometry((16, 40, 40), (3.0, 2.0, 2.0), (0.0, 0.0, 0.0)), "scanner-mr")


def test_the_bank_holds_each_image_at_its_grid_and_regridded_in_one_group(tiny: SegNetAdapter) -> None:
    cases = [phantom_case("ct_liver", 0, i) for i in range(3)]
    plan = Regrids((CT_A, CT_B, CT_C, MR_A), per_image=2, seed=7)
    assert [plan.count(m) for m in ("CT", "mr", "PT")] == [2, 1, 0]
    assert regrid_total(["CT", "CT", "MR", "PT"], plan) == 3 + 3 + 2 + 1
    gate = fit_adapter_bank(tiny, cases, regrids=plan)
    assert gate.bank.shape[0] == 3 * (1 + 2) and gate.meta["images"] == 3 and gate.meta["n"] == 9
    rec = gate.meta["regrids"]
    assert (rec["per_image"], rec["seed"], rec["noise"]) == (2, 7, True)
    assert [(g["modality"], g["shape"], g["spacing"], g["source"]) for g in rec["geometries"]] == [
        (g.modality, list(g.geometry.shape), list(g.geometry.spacing), g.source) for g in plan.geometries]
    used = [g["images"] for g in rec["geometries"]]
    assert sum(used[:3]) == 6 and used[3] == 0  # CT images only ever get CT grids

    # bank rows: each image at its own grid, then its re-griddings (its own grid's signature is the
    # worker's signature of the image as it came)
    for i, case in enumerate(cases):
        own = tiny.predict(case.image, case.spacing, case.modality).signature
        np.testing.assert_allclose(gate.bank[3 * i], own, rtol=0, atol=1e-12)
        assert not np.allclose(gate.bank[3 * i + 1], own)
    # tau: every signature's leave-one-out OODM leaves out the whole image, its re-griddings included
    bank = gate.bank
    for k in range(9):
        others = [j for j in range(9) if j // 3 != k // 3]
        expected = min(np.linalg.norm(bank[k] - bank[j]) for j in others)
        assert gate.loo_oodm[k] == pytest.approx(expected, abs=1e-6)

    # the same seed gives the same bank; another seed draws other geometries for some image
    np.testing.assert_array_equal(fit_adapter_bank(tiny, cases, regrids=plan).bank, bank)
    draws = {seed: [tuple(sorted(Regrids((CT_A, CT_B, CT_C), 2, seed=seed).rng(f"img{i}").choice(3, 2, replace=False)))
                    for i in range(6)] for seed in (7, 8)}
    assert draws[7] != draws[8]


def test_a_plan_without_geometries_or_regrids_is_refused() -> None:
    with pytest.raises(ValueError, match="no scanner geometries"):
        Regrids((), per_image=1)
    with pytest.raises(ValueError, match="at least 1, got 0"):
        Regrids((CT_A,), per_image=0)
