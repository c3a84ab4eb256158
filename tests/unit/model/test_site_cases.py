"""model.data.volumes.iter_site_cases: a site's training images in each layout fit-ood accepts."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from model.data.volumes import iter_site_cases


def _nifti(path: Path, shape: tuple[int, int, int], zooms: tuple[float, float, float], value: float) -> None:
    """A volume whose array is (x, y, z) with the given voxel sizes (x, y, z) mm, RAS identity-like."""
    affine = np.diag([*zooms, 1.0])
    nib.save(nib.Nifti1Image(np.full(shape, value, dtype=np.float32), affine), str(path))


def test_nnunet_raw_layout_reads_the_channel_as_modality(tmp_path: Path) -> None:
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0,
                                                       "liver": 1}, "numTraining": 2, "file_ending": ".nii.gz"}))
    _nifti(tmp_path / "imagesTr" / "liver_001_0000.nii.gz", (10, 12, 8), (0.8, 0.7, 2.5), 40.0)
    _nifti(tmp_path / "imagesTr" / "liver_002_0000.nii.gz", (10, 12, 9), (0.8, 0.7, 2.5), 50.0)
    cases = list(iter_site_cases(tmp_path))
    assert [c.name for c in cases] == ["liver_001", "liver_002"]
    assert [c.modality for c in cases] == ["CT", "CT"]
    assert cases[0].image.shape == (8, 12, 10) and cases[0].spacing == pytest.approx((2.5, 0.7, 0.8))
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2", "1": "ADC"}}))
    with pytest.raises(ValueError, match="only single-channel images are supported"):
        list(iter_site_cases(tmp_path))
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2"}, "file_ending": ".nii.gz"}))
    assert [c.modality for c in iter_site_cases(tmp_path)] == ["MR", "MR"]


def test_bare_nifti_files_need_their_modality(tmp_path: Path) -> None:
    _nifti(tmp_path / "a.nii.gz", (6, 6, 4), (1.0, 1.0, 3.0), 0.0)
    _nifti(tmp_path / "b.nii", (6, 6, 5), (1.0, 1.0, 3.0), 0.0)
    with pytest.raises(ValueError, match="holds NIfTI files, which do not record their modality"):
        list(iter_site_cases(tmp_path))
    cases = list(iter_site_cases(tmp_path, "mr"))
    assert [(c.name, c.modality, c.image.shape[0]) for c in cases] == [("a", "MR", 4), ("b", "MR", 5)]


def test_a_folder_without_images_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"{tmp_path} holds no images"):
        list(iter_site_cases(tmp_path))
    (tmp_path / "dataset.json").write_text("{}")
    with pytest.raises(ValueError, match="neither an MSD dataset.json"):
        list(iter_site_cases(tmp_path))


def test_ground_truth_keeps_its_label_values_and_modalities_are_read_without_pixels(tmp_path: Path) -> None:
    from model.data.volumes import site_modalities

    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}))
    _nifti(tmp_path / "imagesTr" / "a_0000.nii.gz", (6, 5, 4), (1.0, 1.0, 2.0), 40.0)
    _nifti(tmp_path / "imagesTr" / "b_0000.nii.gz", (6, 5, 4), (1.0, 1.0, 2.0), 40.0)
    truth = np.zeros((6, 5, 4), np.uint8)
    truth[1:3] = 1
    truth[4] = 3
    nib.save(nib.Nifti1Image(truth, np.eye(4)), str(tmp_path / "labelsTr" / "a.nii.gz"))  # b has none
    a, b = iter_site_cases(tmp_path)
    assert a.label_map is not None and sorted(np.unique(a.label_map)) == [0, 1, 3]
    assert a.label_map.dtype == np.uint8 and a.label_map.shape == a.image.shape == (4, 5, 6)
    np.testing.assert_array_equal(a.label, (a.label_map > 0).astype(np.uint8))
    assert b.label is None and b.label_map is None
    assert site_modalities(tmp_path) == ["CT", "CT"]
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 3), np.uint8), np.eye(4)), str(tmp_path / "labelsTr" / "b.nii.gz"))
    with pytest.raises(ValueError, match="label shape"):
        list(iter_site_cases(tmp_path))
    with pytest.raises(ValueError, match="do not record their modality"):
        site_modalities(tmp_path / "imagesTr")
    assert site_modalities(tmp_path / "imagesTr", "mr") == ["MR", "MR"]
