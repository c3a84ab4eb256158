"""specgate's SCP receiving from real peers: dcmtk storescu/echoscu, pynetdicom, and an Orthanc PACS.

Each instance acknowledged with 0x0000 has a durable spool file and exactly one ledger row.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from ledger.paths import from_ledger
from ledger.schema import Instance, Series, Study
from tests.integration.dicom_node.helpers import CALLER, Ledger, echo, store
from tests.peers import Orthanc, dcmtk, write_ct_series


def _rows(ledger: Ledger) -> dict[str, Instance]:
    with ledger.sessions() as s:
        return {i.sop_instance_uid: i for i in s.execute(select(Instance)).scalars()}


def test_dcmtk_storescu_series_is_durable_and_indexed(ledger: Ledger, start_scp, tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=20)
    scp = start_scp(ledger)
    host, port = scp.address
    r = dcmtk("storescu", "-aet", CALLER, "-aec", "SPECGATE", host, str(port), *map(str, series.paths))
    assert r.returncode == 0, r.stderr
    rows = _rows(ledger)
    assert set(rows) == set(series.sop_instance_uids)
    for path, sop in zip(series.paths, series.sop_instance_uids, strict=True):
        row = rows[sop]
        stored = from_ledger(row.spool_path, ledger.data_dir)
        assert stored == ledger.settings.spool_dir / series.study_instance_uid / series.series_instance_uid / f"{sop}.dcm"
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == row.sha256
        assert row.size_bytes == stored.stat().st_size and row.calling_ae == CALLER
        assert row.transfer_syntax_uid and row.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
        # the bytes of the dataset are the sender's, not decoded and re-encoded
        assert dcmread(stored).PixelData == dcmread(path).PixelData
    with ledger.sessions() as s:
        study = s.execute(select(Study)).scalar_one()
        assert (study.study_instance_uid, study.received_count, study.calling_ae) == \
            (series.study_instance_uid, 20, CALLER)
        ser = s.execute(select(Series)).scalar_one()
        assert (ser.modality, ser.body_part, ser.series_description) == ("CT", "ABDOMEN", "AXIAL 1mm")
    assert [e.object_id for e in ledger.audit("study.receiving")] == [str(study.id)]
    assert list(ledger.settings.spool_dir.joinpath("tmp").iterdir()) == []


def test_dcmtk_echoscu(sqlite_ledger: Ledger, start_scp) -> None:
    host, port = start_scp(sqlite_ledger).address
    r = dcmtk("echoscu", "-aet", CALLER, "-aec", "SPECGATE", host, str(port))
    assert r.returncode == 0, r.stderr


def test_same_instance_twice_keeps_one_row_and_one_file(ledger: Ledger, start_scp, tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=3)
    port = start_scp(ledger).address[1]
    assert store(port, series.paths) == [0, 0, 0]
    assert store(port, series.paths[:1]) == [0]
    assert ledger.count() == 3 and len(ledger.spool_files()) == 3
    assert ledger.audit("instance.duplicate_differs") == []
    # same SOP Instance UID, other content: success, the first copy is kept, and an audit event says so
    changed = dcmread(series.paths[0])
    changed.SeriesDescription = "CHANGED"
    first = from_ledger(_rows(ledger)[series.sop_instance_uids[0]].spool_path, ledger.data_dir).read_bytes()
    assert store(port, [changed]) == [0]
    assert ledger.count() == 3 and len(ledger.spool_files()) == 3
    kept = from_ledger(_rows(ledger)[series.sop_instance_uids[0]].spool_path, ledger.data_dir)
    assert kept.read_bytes() == first
    [event] = ledger.audit("instance.duplicate_differs")
    assert event.details["sop_instance_uid"] == series.sop_instance_uids[0]


def test_pynetdicom_scu_across_associations(ledger: Ledger, start_scp, tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=6)
    port = start_scp(ledger).address[1]
    assert echo(port) == 0
    assert store(port, series.paths[:3]) == [0, 0, 0]
    assert store(port, [dcmread(p) for p in series.paths[3:]]) == [0, 0, 0]
    with ledger.sessions() as s:
        assert s.execute(select(Study.received_count)).scalar_one() == 6
    assert ledger.count() == 6


def test_no_patient_identifiers_in_logs_or_audit(sqlite_ledger: Ledger, start_scp, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    series = write_ct_series(tmp_path / "in", slices=2, patient_name="Secret^Name", patient_id="PID-77881")
    caplog.set_level(logging.DEBUG)
    port = start_scp(sqlite_ledger).address[1]
    assert store(port, series.paths) == [0, 0]
    assert echo(port, calling="STRANGER") is None  # rejected, and the rejection is logged and audited
    text = caplog.text
    assert "Secret" not in text and "PID-77881" not in text
    with sqlite_ledger.sessions() as s:
        from ledger.schema import AuditEvent

        for ev in s.execute(select(AuditEvent)).scalars():
            assert "Secret" not in str(ev.details) and "PID-77881" not in str(ev.details)


def test_orthanc_sends_a_study_through_its_rest_api(ledger: Ledger, start_scp, tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=10)
    scp = start_scp(ledger, allowed_callers="ORTHANC@127.0.0.1")
    host, port = scp.address
    with Orthanc(tmp_path / "orthanc", modalities={"specgate": ("SPECGATE", host, port)}) as orthanc:
        orthanc.upload(series.paths)
        [study_id] = orthanc.get("/studies")
        job = orthanc.post("/modalities/specgate/store", {"Resources": [study_id], "Synchronous": True})
        assert job.get("FailedInstancesCount", 0) == 0, job
    assert set(_rows(ledger)) == set(series.sop_instance_uids)
    assert all(r.calling_ae == "ORTHANC" for r in _rows(ledger).values())
