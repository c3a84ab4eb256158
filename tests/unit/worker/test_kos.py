"""worker.kos: an IHE IOCM rejection note for a SEG and its SR, read back by highdicom, checked by dciodvfy."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_dicom_seg import APPROVED, MODEL, RELEASED, _shuffled_classic, dciodvfy  # noqa: E402
from test_sr import _objects  # noqa: E402

from worker.atomic import write_dicom
from worker.dicom_seg import derive_uid  # noqa: E402
from worker.kos import encode_kos  # noqa: E402
from worker.labels import ModelIdentity  # noqa: E402


def _kos(objects: list[Dataset], **kwargs: object) -> Dataset:
    args: dict = {"reason": "quality", "sop_instance_uid": derive_uid("t", "kos"),
                  "series_instance_uid": derive_uid("t", "kos-series"), **kwargs}
    return encode_kos(objects, **args)


@pytest.mark.parametrize(("reason", "title"), [("quality", ("113001", "Rejected for Quality Reasons")),
                                               ("patient_safety", ("113037", "Rejected for Patient Safety Reasons"))])
def test_rejection_note_references_exactly_seg_and_sr(tmp_path: Path, reason: str, title: tuple[str, str]) -> None:
    volume = _shuffled_classic(tmp_path)
    seg, sr = _objects(volume, APPROVED)
    path = write_dicom(_kos([seg, sr], reason=reason, retracted_by="Jones^Anna"), tmp_path / "kos.dcm")
    errors, warnings = dciodvfy(path)
    assert errors == [], "\n".join(errors + warnings)

    kos = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(path))
    assert kos.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59" and kos.Modality == "KO"
    concept = kos.ConceptNameCodeSequence[0]
    assert (concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning) == (title[0], "DCM", title[1])
    assert kos.StudyInstanceUID == volume.study_instance_uid
    assert kos.SeriesInstanceUID not in (seg.SeriesInstanceUID, sr.SeriesInstanceUID, volume.series_instance_uid)
    assert int(kos.SeriesNumber) == 9003 and kos.PatientID == seg.PatientID

    referenced = {item.referenced_sop_instance_uid for item in kos.content.get_references()}
    assert referenced == {seg.SOPInstanceUID, sr.SOPInstanceUID}
    evidence = {(s.SeriesInstanceUID, i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID)
                for s in kos.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
                for i in s.ReferencedSOPSequence}
    assert evidence == {(seg.SeriesInstanceUID, seg.SOPClassUID, seg.SOPInstanceUID),
                        (sr.SeriesInstanceUID, sr.SOPClassUID, sr.SOPInstanceUID)}

    (observer,) = kos.content.get_observer_contexts()
    assert str(observer.observer_identifying_attributes.name) == "Jones^Anna"
    description = [i.TextValue for i in kos.ContentSequence if i.ValueType == "TEXT"]
    assert description == [f"{title[1]}: AI result retracted by Anna Jones. NOT FOR CLINICAL USE."]
    assert kos.SeriesDescription.startswith("NOT FOR CLINICAL USE: Rejected (")
    assert len(kos.SeriesDescription) <= 64


def test_superseded_result_without_a_user(tmp_path: Path) -> None:
    """Retracted automatically (a newer study version): no person observer; a clinical model is not marked."""
    volume = _shuffled_classic(tmp_path)
    clinical = ModelIdentity(MODEL.name, MODEL.version, MODEL.weights_sha256, clinical_use=True)
    seg, sr = _objects(volume, RELEASED, model=clinical)
    kos = _kos([seg, sr])
    assert kos.SeriesDescription == "Rejected (quality): AI result"
    assert not hd.ko.KeyObjectSelectionDocument.from_dataset(kos).content.get_observer_contexts()
    assert dciodvfy(write_dicom(kos, tmp_path / "kos.dcm"))[0] == []


def test_same_inputs_same_uids(tmp_path: Path) -> None:
    volume = _shuffled_classic(tmp_path)
    seg, sr = _objects(volume, RELEASED)
    a, b = _kos([seg, sr]), _kos([seg, sr])
    assert a.SOPInstanceUID == b.SOPInstanceUID == derive_uid("t", "kos")


def test_refuses_bad_input(tmp_path: Path) -> None:
    volume = _shuffled_classic(tmp_path)
    seg, sr = _objects(volume, RELEASED)
    with pytest.raises(ValueError, match="reason must be one of"):
        _kos([seg, sr], reason="bored")
    with pytest.raises(ValueError, match="at least one object"):
        _kos([])
    with pytest.raises(ValueError, match="given twice"):
        _kos([seg, seg])
    other = copy.deepcopy(sr)
    other.StudyInstanceUID = derive_uid("another study")
    with pytest.raises(ValueError, match="of one study"):
        _kos([seg, other])
    with pytest.raises(ValueError, match="retracted_by"):
        _kos([seg, sr], retracted_by="a\\b")
