"""The export's NIfTI dataset when its cases come from models with other labels: one value per label name
across the dataset, each case's label map renumbered to it, read back by the loader ``train`` and
``fit-ood`` use."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from export.writer import _write_datasets, nifti_affine
from model.data.volumes import MSDDataset


def _case(root: Path, name: str, segments: list[str], label: np.ndarray) -> dict:
    affine = nifti_affine(np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]]))  # axial, 2 mm
    for sub, data in (("imagesTr", np.zeros(label.shape, np.int16)), ("labelsTr", label)):
        (root / "CT" / sub).mkdir(parents=True, exist_ok=True)
        fname = f"{name}_0000.nii.gz" if sub == "imagesTr" else f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), affine), str(root / "CT" / sub / fname))
    return {"case": name, "modality": "CT", "segments": segments, "image": f"CT/imagesTr/{name}_0000.nii.gz",
            "label": f"CT/labelsTr/{name}.nii.gz"}


def test_labels_of_several_models_share_one_numbering(tmp_path: Path) -> None:
    a = np.zeros((3, 4, 5), np.uint8)
    a[1, 1:3, 1:3] = 1  # liver
    b = np.zeros((3, 4, 5), np.uint8)
    b[0, 0, :] = 1  # spleen (this model's segment 1)
    b[2, 3, :] = 2  # liver (its segment 2)
    cases = [_case(tmp_path, "case_0001", ["liver"], a), _case(tmp_path, "case_0002", ["spleen", "liver"], b)]
    assert _write_datasets(tmp_path, cases) == {"CT": {"liver": 1, "spleen": 2}}
    assert [c["labels"] for c in cases] == [{"liver": 1}, {"spleen": 2, "liver": 1}]
    ds = MSDDataset(tmp_path / "CT")
    assert ds.label_names == {1: "liver", 2: "spleen"} and ds.modality == "CT" and len(ds) == 2
    got_a, got_b = ds[0].label_map, ds[1].label_map
    # the loader turns the volume to the closest canonical orientation: compare counts and values per label
    assert sorted(np.unique(got_a).tolist()) == [0, 1] and int((got_a == 1).sum()) == 4
    assert int((got_b == 2).sum()) == 5 and int((got_b == 1).sum()) == 5 and got_b.max() == 2
    assert set(np.unique(got_b[0])) == {0, 2} and set(np.unique(got_b[2])) == {0, 1}  # spleen 2, liver 1 (slices kept)
    assert ds[1].label_map.shape == ds[1].image.shape == (3, 4, 5)
