"""worker.atomic: a job's files are published whole, through model's writer, and readable by the services'
account alone (0o600) whatever the umask: they are patient data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from worker.atomic import RESULT_MODE, atomic_write, write_dicom


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o027])
def test_results_are_0600_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        paths = [atomic_write(tmp_path / "evidence.json", b"{}"),
                 atomic_write(tmp_path / "preview.png", lambda fh: fh.write(b"\x89PNG"))]
    finally:
        os.umask(old)
    assert RESULT_MODE == 0o600
    assert [p.stat().st_mode & 0o777 for p in paths] == [0o600, 0o600]


def test_bytes_and_a_writer_are_published_and_replace_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "evidence.json"
    assert atomic_write(target, b"one") == target and target.read_bytes() == b"one"
    assert atomic_write(target, lambda fh: fh.write(b"two")).read_bytes() == b"two"
    assert _names(tmp_path) == ["evidence.json"]


def test_a_writer_that_fails_half_way_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "probability.npz"
    atomic_write(target, b"old map")

    def half_then_fail(fh: BinaryIO) -> None:
        fh.write(b"new m")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old map"
    assert _names(tmp_path) == ["probability.npz"]


def test_write_dicom_publishes_a_part_10_file_at_result_mode(tmp_path: Path) -> None:
    from pydicom import dcmread

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = write_dicom(ds, tmp_path / "seg.dcm")
    assert dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
    assert path.stat().st_mode & 0o777 == 0o600 and _names(tmp_path) == ["seg.dcm"]
