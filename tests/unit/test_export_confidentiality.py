"""The profile's pieces on hand-made data sets: dates and times moved as one instant per patient (across
midnight too), the dates option ``remove``, the combined codes resolved, nested UIDs remapped, a short key
refused."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from export.confidentiality import (
    Profile,
    Pseudonyms,
    annex_e_actions,
    annex_e_recipe,
    deidentify,
    patient_key,
)

KEY = Pseudonyms(b"s" * 32)


def _ds(patient: str = "P1", date: str = "20250301", time: str = "233000") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, "1.2.3.4.5"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", "1.2.3.4.1"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "DOE^JOHN", patient, "19600101"
    ds.StudyDate, ds.StudyTime = date, time
    ds.AcquisitionDateTime = f"{date}{time}.25"
    ds.InstitutionName, ds.PatientAddress, ds.AccessionNumber = "St Elsewhere", "1 Elm St", "ACC1"
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = CTImageStorage, "1.2.3.4.9"
    ds.SourceImageSequence = [ref]
    return ds


def _instant(ds: Dataset) -> datetime:
    return datetime.strptime(f"{ds.StudyDate}{str(ds.StudyTime)[:6]}", "%Y%m%d%H%M%S")


def test_dates_and_times_move_together_per_patient() -> None:
    a = deidentify(_ds(date="20250301", time="233000"), Profile(KEY))
    b = deidentify(_ds(date="20250305", time="010000"), Profile(KEY))
    other = deidentify(_ds(patient="P2"), Profile(KEY))
    offset = KEY.offset(patient_key(_ds()))
    assert offset.seconds > 0 and offset.days >= 1
    assert _instant(a) == datetime(2025, 3, 1, 23, 30) - offset  # date and time as one instant (midnight crossed or not)
    assert _instant(b) - _instant(a) == datetime(2025, 3, 5, 1) - datetime(2025, 3, 1, 23, 30)
    assert datetime.strptime(str(a.AcquisitionDateTime), "%Y%m%d%H%M%S.%f") == datetime(2025, 3, 1, 23, 30, 0, 250000) - offset
    assert a.PatientID == b.PatientID != other.PatientID and _instant(other) != _instant(a)
    assert a.LongitudinalTemporalInformationModified == "MODIFIED"
    x, y = _ds(patient=""), _ds(patient="")  # no Patient ID: each study a patient of its own
    y.StudyInstanceUID = "1.2.3.5"
    assert deidentify(x, Profile(KEY)).PatientID != deidentify(y, Profile(KEY)).PatientID


def test_remove_option_and_actions() -> None:
    ds = deidentify(_ds(), Profile(KEY, dates="remove"))
    assert not ds.StudyDate and not ds.StudyTime  # Z
    assert "PatientAddress" not in ds and ds.AcquisitionDateTime == "19000101000000"  # X; X/Z/D -> D (dummy)
    assert ds.InstitutionName == "ANONYMIZED" and not ds.AccessionNumber  # X/Z/D -> D; Z
    assert ds.SOPInstanceUID == KEY.uid("1.2.3.4.5") == ds.file_meta.MediaStorageSOPInstanceUID
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == KEY.uid("1.2.3.4.9")  # X/Z/U* sequence kept
    assert ds.SOPClassUID == CTImageStorage and ds.LongitudinalTemporalInformationModified == "REMOVED"
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100"]


def test_every_listed_tag_has_a_line_and_keys_are_checked(tmp_path: Path) -> None:
    lines = annex_e_recipe("remove").splitlines()
    sequences_under_u = {0x00082112, 0x00081140}  # kept, their UIDs remapped by their own lines
    assert len([x for x in lines if x.startswith(("REMOVE", "BLANK", "REPLACE"))]) == \
        len(annex_e_actions()) - len(sequences_under_u)
    short = tmp_path / "k"
    short.write_bytes(b"0123456789")
    with pytest.raises(ValueError, match="at least 32 bytes"):
        Pseudonyms.from_file(short)
    with pytest.raises(ValueError, match="shift' or 'remove"):
        Profile(KEY, dates="keep")  # type: ignore[arg-type]
