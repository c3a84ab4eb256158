"""worker.sr: the gate's evidence as a TID 1500 Comprehensive 3D SR, read back by highdicom, checked by dciodvfy."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_dicom_seg import (  # noqa: E402
    APPROVED,
    MODEL,
    RELEASED,
    SEGMENT,
    _mask,
    _shuffled_classic,
    _shuffled_multiframe,
    dciodvfy,
)

from dicom_series import Volume  # noqa: E402
from worker.atomic import write_dicom
from worker.dicom_seg import derive_uid, encode_seg  # noqa: E402
from worker.labels import GateEvidence, ModelIdentity, Release  # noqa: E402
from worker.sr import DECISIONS, OOD_C, OOD_TAU, OOD_VERDICT, OODM, RELEASE_DECISION, encode_sr  # noqa: E402


def _objects(volume: Volume, result: tuple[GateEvidence, Release], model: ModelIdentity = MODEL,
             ) -> tuple[Dataset, Dataset]:
    evidence, release = result
    seg = encode_seg(volume, _mask(volume.shape), segments=(SEGMENT,), model=model, evidence=evidence, release=release,
                     sop_instance_uid=derive_uid("t", "seg"), series_instance_uid=derive_uid("t", "seg-series"))
    sr = encode_sr(volume, seg, model=model, evidence=evidence, release=release,
                   sop_instance_uid=derive_uid("t", "sr"), series_instance_uid=derive_uid("t", "sr-series"))
    return seg, sr


def _items(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _named(ds: Dataset, value: str) -> list[Dataset]:
    return [i for i in _items(ds) if "ConceptNameCodeSequence" in i
            and i.ConceptNameCodeSequence[0].CodeValue == value]


def _num(ds: Dataset, value: str) -> float:
    (item,) = _named(ds, value)
    return float(item.MeasuredValueSequence[0].NumericValue)


def _code(ds: Dataset, value: str) -> str:
    (item,) = _named(ds, value)
    return str(item.ConceptCodeSequence[0].CodeValue)


def _text(ds: Dataset, value: str) -> list[str]:
    return [str(i.get("TextValue", i.get("PersonName", ""))) for i in _named(ds, value)]


@pytest.fixture(params=["classic", "enhanced"])
def volume(request: pytest.FixtureRequest, tmp_path: Path) -> Volume:
    return (_shuffled_classic if request.param == "classic" else _shuffled_multiframe)(tmp_path)


def test_released_sr_records_the_evidence(tmp_path: Path, volume: Volume) -> None:
    seg, sr = _objects(volume, RELEASED)
    path = write_dicom(sr, tmp_path / "sr.dcm")
    errors, warnings = dciodvfy(path)
    assert errors == [], "\n".join(errors + warnings)

    read = hd.sr.srread(path)
    assert isinstance(read, hd.sr.Comprehensive3DSR)
    assert read.StudyInstanceUID == volume.study_instance_uid == seg.StudyInstanceUID
    assert read.SeriesInstanceUID not in (volume.series_instance_uid, seg.SeriesInstanceUID)
    assert int(read.SeriesNumber) == 9002 and read.Modality == "SR"
    assert read.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert read.SeriesDescription == "NOT FOR CLINICAL USE: Gate evidence, specgate-unet 1.2.0, gate"
    assert read.VerificationFlag == "UNVERIFIED" and "VerifyingObserverSequence" not in read
    assert read.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99SPECGATE"

    # highdicom finds the measurement group again, with the SEG segment it references
    (group,) = read.content.get_volumetric_roi_measurement_groups()
    ref = group.referenced_segment
    assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID and ref.referenced_segment_numbers == [1]
    assert group.get_measurements(name=OODM)[0].value == pytest.approx(0.031)
    assert _num(read, OOD_TAU.value) == pytest.approx(0.052) and _num(read, OOD_C.value) == pytest.approx(2.5)
    assert _code(read, OOD_VERDICT.value) == "INDIST"
    assert _code(read, RELEASE_DECISION.value) == DECISIONS["gate"].value
    (algorithm_name,) = _text(read, "111001")  # (111001, DCM, "Algorithm Name")
    assert algorithm_name == "specgate-unet" and _text(read, "111003") == ["1.2.0"]  # Algorithm Version
    assert _text(read, "111002") == [f"weights_sha256={MODEL.weights_sha256}"]  # Algorithm Parameters
    assert _text(read, "121106") == ["NOT FOR CLINICAL USE"]  # Comment
    assert _named(read, "121008") == []  # no Person Observer Name: the gate released it

    # the source series: every image in the library and in the evidence; the segment's source series
    evidence = {s.SeriesInstanceUID: {i.ReferencedSOPInstanceUID for i in s.ReferencedSOPSequence}
                for s in read.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence}
    assert evidence == {seg.SeriesInstanceUID: {seg.SOPInstanceUID},
                        volume.series_instance_uid: {r.sop_instance_uid for r in volume.slices}}
    library = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in _items(read)
               if i.get("ValueType") == "IMAGE"}
    if not volume.is_multiframe:
        assert {r.sop_instance_uid for r in volume.slices} <= library
    (source_series,) = _named(read, "121232")  # (121232, DCM, "Source series for segmentation")
    assert source_series.UID == volume.series_instance_uid


def test_approved_sr_names_the_radiologist_and_the_time(tmp_path: Path) -> None:
    volume = _shuffled_classic(tmp_path)
    _, sr = _objects(volume, APPROVED)
    path = write_dicom(sr, tmp_path / "sr.dcm")
    assert dciodvfy(path)[0] == []
    read = pydicom.dcmread(path)
    assert read.SeriesDescription.endswith("approved by Anna J.") and len(read.SeriesDescription) <= 64
    assert read.VerificationFlag == "VERIFIED"
    (verifier,) = read.VerifyingObserverSequence
    assert str(verifier.VerifyingObserverName) == "Jones^Anna"
    assert verifier.VerificationDateTime == "20260304103000+0000"
    assert _text(read, "121008") == ["Jones^Anna"]  # Person Observer Name
    (decision,) = _named(read, RELEASE_DECISION.value)
    assert decision.ConceptCodeSequence[0].CodeValue == "APPROVED"
    assert decision.ObservationDateTime == "20260304103000+0000"
    assert _code(read, OOD_VERDICT.value) == "OOD" and _num(read, OODM.value) == pytest.approx(0.0875)


def test_clinical_model_and_unknown_c(tmp_path: Path) -> None:
    volume = _shuffled_classic(tmp_path)
    model = ModelIdentity("specgate-unet", "1.2.0", MODEL.weights_sha256, clinical_use=True)
    evidence = GateEvidence(oodm=0.2, tau=0.05, c=None, is_ood=True, gate_reason="modality_not_in_bank")
    _, sr = _objects(volume, (evidence, Release("approved", reviewer="ajones")), model=model)
    assert _text(sr, "121106") == [] and "CLINICAL" not in sr.SeriesDescription
    assert _text(sr, "121008") == ["ajones^"] and sr.SeriesDescription.endswith("approved by ajones")
    assert _named(sr, OOD_C.value) == [] and _code(sr, OOD_VERDICT.value) == "NOBANK"
    assert "ObservationDateTime" not in _named(sr, RELEASE_DECISION.value)[0]  # no time given
    assert dciodvfy(write_dicom(sr, tmp_path / "sr.dcm"))[0] == []


def test_sr_refuses_a_seg_of_another_study(tmp_path: Path) -> None:
    volume = _shuffled_classic(tmp_path)
    seg, _ = _objects(volume, RELEASED)
    seg.StudyInstanceUID = derive_uid("another study")
    evidence, release = RELEASED
    with pytest.raises(ValueError, match="is not the volume's study"):
        encode_sr(volume, seg, model=MODEL, evidence=evidence, release=release,
                  sop_instance_uid=derive_uid("x"), series_instance_uid=derive_uid("y"))
    seg.StudyInstanceUID = volume.study_instance_uid
    seg.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    with pytest.raises(ValueError, match="not a SEG"):
        encode_sr(volume, seg, model=MODEL, evidence=evidence, release=release,
                  sop_instance_uid=derive_uid("x"), series_instance_uid=derive_uid("y"))


def test_same_inputs_same_uids(tmp_path: Path) -> None:
    volume = _shuffled_classic(tmp_path)
    a, b = _objects(volume, RELEASED)[1], _objects(volume, RELEASED)[1]
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
    assert np.array_equal([a.SOPInstanceUID], [derive_uid("t", "sr")])
