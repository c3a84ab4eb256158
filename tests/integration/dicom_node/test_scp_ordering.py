"""Duplicates and ordering through the real SCP (issue 12): one SOP Instance UID arriving again under
another series or study, and a peer that aborts in the middle of a study. pynetdicom is the peer; the
assembler is driven with an explicit ``now`` (no sleeping). On SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import func, select

from dicom_node.assembler import Assembler
from dicom_node.config import AssemblyConfig, SeriesRule
from ledger import audit
from ledger.paths import from_ledger
from ledger.schema import Instance, Job, JobState, Series, Study
from tests.integration.dicom_node.helpers import CALLER, Ledger, encode_dataset, pdata, store, store_command
from tests.peers import wait_for, write_ct_series

UID_CONFLICT = 0xC409


def _rows(ledger: Ledger) -> dict[str, tuple[str, str, str]]:
    """SOP Instance UID -> (series UID, spool path, sha256) of every instance row."""
    with ledger.sessions() as s:
        return {sop: (series, path, sha) for sop, series, path, sha in s.execute(
            select(Instance.sop_instance_uid, Series.series_instance_uid, Instance.spool_path, Instance.sha256)
            .join(Series, Series.id == Instance.series_id))}


@pytest.mark.parametrize("where", ["other_series", "other_study"])
def test_same_sop_instance_under_another_series_is_refused_and_the_first_kept(ledger: Ledger, start_scp,
                                                                              tmp_path: Path, where: str) -> None:
    """One SOP Instance UID names one image. Arriving again under another series (of the same study or of
    another one) it is a conflict (a modality or PACS that reuses UIDs, or a study split or merged
    elsewhere), not a copy: answered 0xC409 with ``uid_conflict`` (what dcm4chee answers for a SOP Instance
    UID stored before in another study), audited; the first copy, its row and its study's counters are
    untouched, no row or file for the other series, and the association serves its next message."""
    series = write_ct_series(tmp_path / "a", slices=3)
    other = write_ct_series(tmp_path / "b", slices=2)  # an unrelated study, to follow on one association
    port = start_scp(ledger).address[1]
    assert store(port, series.paths) == [0, 0, 0]
    before = _rows(ledger)
    first_file = from_ledger(before[series.sop_instance_uids[0]][1], ledger.data_dir).read_bytes()

    clash = dcmread(series.paths[0])
    clash.SeriesInstanceUID = generate_uid()
    if where == "other_study":
        clash.StudyInstanceUID = generate_uid()
    assert store(port, [clash, *other.paths]) == [UID_CONFLICT, 0, 0]

    after = _rows(ledger)
    assert {sop: after[sop] for sop in before} == before  # the first copy's row, series, path and digest
    assert from_ledger(after[series.sop_instance_uids[0]][1], ledger.data_dir).read_bytes() == first_file
    assert len(after) == 5 and len(ledger.spool_files()) == 5
    assert not any(clash.SeriesInstanceUID in str(p) for p in ledger.spool_files())
    with ledger.sessions() as s:
        assert s.execute(select(func.count()).select_from(Series)
                         .where(Series.series_instance_uid == clash.SeriesInstanceUID)).scalar_one() == 0
        assert s.execute(select(Study.received_count)
                         .where(Study.study_instance_uid == series.study_instance_uid)).scalar_one() == 3
        assert s.execute(select(func.count()).select_from(Study)).scalar_one() == 2  # a and b, nothing else
    [refused] = ledger.audit("instance.refused")
    assert refused.details["reason"] == "uid_conflict" and refused.details["status"] == "0xC409"
    assert refused.details["sop_instance_uid"] == series.sop_instance_uids[0]
    assert ledger.audit("instance.duplicate_differs") == []
    # the sender trying again gets the same answer; the true copy is still a harmless duplicate
    assert store(port, [clash, series.paths[0]]) == [UID_CONFLICT, 0]
    assert _rows(ledger) == after


def test_peer_aborting_mid_study_keeps_what_was_acknowledged_and_no_job_starts_early(ledger: Ledger, start_scp,
                                                                                   tmp_path: Path) -> None:
    """12 instances acknowledged, the 13th half sent, then the peer's A-ABORT: the 12 are kept (rows and
    complete files), the 13th leaves nothing (no row, no spool file, no temporary file). No job exists
    while the study is inside its quiet period, counted from its last acknowledged instance; the peer comes
    back and sends the rest, and once the study is quiet it becomes one job, version 1, of all 20."""
    quiet = 60
    series = write_ct_series(tmp_path / "in", slices=20)
    scp = start_scp(ledger)
    port = scp.address[1]
    ae = AE(ae_title=CALLER)
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="SPECGATE")
    assert assoc.is_established
    acknowledged = []
    for path, sop in zip(series.paths[:12], series.sop_instance_uids[:12], strict=True):
        rsp = assoc.send_c_store(path)
        assert rsp is not None and int(rsp.Status) == 0
        acknowledged.append(sop)
    # the 13th: its C-STORE request and the first part of its data set, then the peer aborts
    cx = assoc.accepted_contexts[0].context_id
    # the data set starts after the preamble and the file meta, whose length varies with the UIDs in it
    body = encode_dataset(dcmread(series.paths[12]))
    assert len(body) > 5000
    assoc.dul.socket.socket.sendall(pdata(cx, 0x03, store_command(CTImageStorage, series.sop_instance_uids[12], 13))
                                    + pdata(cx, 0x00, body[:4000]))
    wait_for(lambda: list(scp.spool.tmp_dir.iterdir()), timeout=10, what="the 13th's partial temporary file")
    assoc.abort()
    wait_for(lambda: scp.active_associations() == 0, timeout=10, what="the aborted association to end")

    rows = _rows(ledger)
    assert sorted(rows) == sorted(acknowledged)
    for sop in acknowledged:
        _, path, sha = rows[sop]
        assert hashlib.sha256(from_ledger(path, ledger.data_dir).read_bytes()).hexdigest() == sha
    assert len(ledger.spool_files()) == 12
    assert list(scp.spool.tmp_dir.iterdir()) == []
    with ledger.sessions() as s:
        study = s.execute(select(Study)).scalar_one()
        assert (study.received_count, study.assembled_count) == (12, 0)
        last = study.last_received_at

    queued: list[int] = []
    assembler = Assembler(AssemblyConfig(quiet_seconds=quiet, rules=(SeriesRule(name="ct"),)), ledger.sessions,
                          on_job_queued=queued.append)
    assert assembler.run_once(last) == []
    assert assembler.run_once(last + timedelta(seconds=quiet - 1)) == []
    assert ledger.count(Job) == 0 and queued == []

    # the sender comes back with what it has no success for (the 13th included), inside the quiet period
    assert store(port, series.paths[12:]) == [0] * 8
    with ledger.sessions() as s:
        study = s.execute(select(Study)).scalar_one()
        assert (study.received_count, study.assembled_count) == (20, 0)
        last = study.last_received_at
    assert assembler.run_once(last + timedelta(seconds=quiet - 1)) == []
    assert ledger.count(Job) == 0
    [result] = assembler.run_once(last + timedelta(seconds=quiet + 1))
    assert queued == [result.job_id]
    with ledger.sessions() as s:
        job = s.get(Job, result.job_id)
        assert job is not None
        assert (job.state, job.version, job.series_instance_uid) == (JobState.QUEUED, 1, series.series_instance_uid)
        study = s.execute(select(Study)).scalar_one()
        assert (study.received_count, study.assembled_count) == (20, 20)
        assert audit.verify(s).ok
    assert sorted(_rows(ledger)) == sorted(series.sop_instance_uids)
    [created] = ledger.audit("job.created")
    assert created.details["instances"] == 20
