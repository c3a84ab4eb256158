import json

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_series import SeriesError
from model.data.phantoms import (
    KINDS,
    TRAINING_KINDS,
    UNSEEN_KINDS,
    phantom_case,
    phantom_study,
    write_msd_dataset,
)
from model.data.volumes import MSDDataset, iter_cases, load_dicom_series
from model.preprocess import preprocess


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_phantoms_are_deterministic_and_labelled(kind):
    a = phantom_case(kind, seed=3, index=1)
    b = phantom_case(kind, seed=3, index=1)
    c = phantom_case(kind, seed=3, index=2)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)
    assert a.label.shape == a.image.shape and a.label.any() and a.label.dtype == np.uint8
    assert max(a.image.shape) <= 96  # one 96^3 window each
    assert all(s > 0 for s in a.spacing)
    assert a.modality == KINDS[kind].modality


def test_kinds_differ_in_modality_and_resolution():
    assert set(TRAINING_KINDS).isdisjoint(UNSEEN_KINDS)
    assert {KINDS[k].modality for k in TRAINING_KINDS} == {"CT", "MR"}
    assert "PT" in {KINDS[k].modality for k in UNSEEN_KINDS}
    # the near-OOD kinds share their parent's resolution on purpose (another contrast, a child's size)
    distinct = (*TRAINING_KINDS, *UNSEEN_KINDS)
    assert len({phantom_case(k, 0, 0).spacing for k in distinct}) == len(distinct)
    ct = phantom_case("ct_liver", 0, 0).image
    assert ct.min() < -900 and ct.max() > 400  # Hounsfield units


def test_demo_studies_are_not_evaluation_cases():
    s = phantom_study("pt_tumour", seed=1)
    assert s.index == 10_001 and s.modality == "PT"
    with pytest.raises(ValueError, match="unknown phantom kind"):
        phantom_study("xray")


def test_msd_roundtrip(tmp_path):
    root = write_msd_dataset(tmp_path, "mr_prostate", 2, seed=5)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["numTraining"] == 2 and meta["modality"] == {"0": "MR"}
    ds = MSDDataset(root)
    assert len(ds) == 2 and ds.modality == "MR"
    case = ds[1]
    ref = phantom_case("mr_prostate", 5, 1)
    np.testing.assert_array_equal(case.image, ref.image)  # (z, y, x) order survives NIfTI
    np.testing.assert_array_equal(case.label, ref.label)
    assert case.spacing == pytest.approx(ref.spacing)
    assert [c.name for c in iter_cases(root)] == ["mr_prostate_000", "mr_prostate_001"]


def test_msd_refuses_non_dataset(tmp_path):
    with pytest.raises(ValueError, match="dataset.json"):
        MSDDataset(tmp_path)


def _write_series(folder, vol, spacing, modality="CT", slope=1.0, intercept=-1024.0):
    folder.mkdir()
    series = generate_uid()
    for z in np.random.default_rng(0).permutation(vol.shape[0]):  # files in random order
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{z}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series
        ds.StudyInstanceUID = "1.2.3"
        ds.FrameOfReferenceUID = "1.2.3.1"
        ds.Modality = modality
        ds.Rows, ds.Columns = vol.shape[1:]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-10.0, -20.0, 100.0 + z * spacing[0]]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = ((vol[z] - intercept) / slope).astype(np.uint16).tobytes()
        ds.save_as(folder / f"{z}.dcm", enforce_file_format=True)


def test_dicom_series_loader_sorts_and_rescales(tmp_path):
    vol = np.random.default_rng(1).integers(-1000, 1000, size=(6, 8, 10)).astype(np.float32)
    _write_series(tmp_path / "s", vol, (2.5, 0.8, 0.7))
    got, geom, modality = load_dicom_series(tmp_path / "s")
    np.testing.assert_array_equal(got, vol)
    assert modality == "CT"
    assert geom.spacing == pytest.approx((2.5, 0.8, 0.7))
    assert geom.origin == pytest.approx((-10.0, -20.0, 100.0))
    assert len(geom.sop_instance_uids) == 6
    cases = list(iter_cases(tmp_path))
    assert len(cases) == 1 and cases[0].label is None


def test_dicom_series_loader_refuses_gaps(tmp_path):
    vol = np.zeros((4, 4, 4), np.float32)
    _write_series(tmp_path / "s", vol, (2.0, 1.0, 1.0))
    ds = pydicom.dcmread(tmp_path / "s" / "3.dcm")
    ds.ImagePositionPatient = [-10.0, -20.0, 120.0]
    ds.save_as(tmp_path / "s" / "3.dcm")
    with pytest.raises(SeriesError) as info:  # 100, 102, 104, 120 mm: seven slices missing
        load_dicom_series(tmp_path / "s")
    assert info.value.reason_code == "missing_slices"


def test_preprocess():
    np.testing.assert_allclose(preprocess(np.array([-1500.0, -1000, 0, 1000, 2000]), "CT"), [0, 0, 0.5, 1, 1])
    mr = np.random.default_rng(0).normal(5, 3, size=1000)
    assert np.std(preprocess(mr, "MR")) == pytest.approx(1.0, rel=1e-5)
    assert np.std(preprocess(mr, "PT")) == pytest.approx(1.0, rel=1e-5)
    assert not preprocess(np.zeros(4), "MR").any()
    with pytest.raises(ValueError, match="modality"):
        preprocess(mr, "")
