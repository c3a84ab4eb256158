"""Completeness by asking the archive, against a real Orthanc as the source archive (C-FIND and QIDO-RS):
a study that arrived short is made a job at the bound with ``incomplete_at_source``; the missing series
arriving within the wait makes one complete job; an archive that does not answer is recorded and the job
goes on at the bound. The assembler runs on a clock the test sets (``run_once(now)``); the archive's
answer is real and waited for with ``wait_for``."""

from __future__ import annotations

import base64
import json
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_node.assembler import Assembler, AssemblyResult
from dicom_node.config import Archive, AssemblyConfig, CompletenessConfig, SeriesRule
from ledger.schema import Job, Study, utcnow
from tests.integration.dicom_node.helpers import CALLER, Ledger, store
from tests.peers import CTSeries, Orthanc, free_port, wait_for, write_ct_series

QUIET = 30.0
WAIT = 120.0


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    # Orthanc answers C-FIND only from peers it knows, unless told to answer anyone
    with Orthanc(tmp_path_factory.mktemp("orthanc"), dicomweb=True, extra_config={"DicomAlwaysAllowFind": True}) as o:
        yield o


def two_series_study(folder: Path, accession: str = "") -> tuple[CTSeries, CTSeries]:
    """A study of two CT series (16 and 4 slices of 16x16), with an accession number if given."""
    study_uid = generate_uid()
    a = write_ct_series(folder / "a", slices=16, size=16, study_uid=study_uid, seed=1)
    b = write_ct_series(folder / "b", slices=4, size=16, study_uid=study_uid, seed=2, series_description="SCOUT")
    if accession:
        for p in (*a.paths, *b.paths):
            ds = dcmread(p)
            ds.AccessionNumber = accession
            ds.save_as(p, enforce_file_format=True)
    return a, b


def _assembler(ledger: Ledger, archive: Archive, rules: tuple[SeriesRule, ...] = (SeriesRule(name="ct"),)) -> Assembler:
    completeness = CompletenessConfig(archives=(archive,), by_source=((CALLER, archive.name),), wait_s=WAIT,
                                      timeout_s=5, ae_title="SPECGATE")
    config = AssemblyConfig(quiet_seconds=QUIET, rules=rules, completeness=completeness)
    return Assembler(config, ledger.sessions, on_job_queued=lambda _job: None)


def _dimse(orthanc: Orthanc) -> Archive:
    return Archive.parse(f"pacs=ORTHANC@127.0.0.1:{orthanc.dicom_port}")


def _after_answer(asm: Assembler, ledger: Ledger, at: datetime) -> list[AssemblyResult]:
    """Passes at ``at`` until the archive's answer (or its failure) is recorded on the study; the last
    pass's results."""
    results: list[AssemblyResult] = []

    def answered() -> bool:
        results[:] = asm.run_once(at)
        with ledger.sessions() as s:
            study = s.execute(select(Study)).scalar_one()
            return study.completeness is not None or study.assembled_count == study.received_count

    wait_for(answered, timeout=20, what="the archive's answer recorded on the study")
    return results


def _job(ledger: Ledger, job_id: int) -> Job:
    with ledger.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.expunge(job)
        return job


def test_short_study_is_made_a_job_at_the_bound_incomplete_at_source(ledger: Ledger, start_scp, orthanc,
                                                                     tmp_path: Path) -> None:
    """On SQLite and PostgreSQL (the completeness columns are JSON there, JSONB here)."""
    sqlite_ledger = ledger
    a, b = two_series_study(tmp_path / "in")
    orthanc.upload([*a.paths, *b.paths])
    port = start_scp(sqlite_ledger).address[1]
    asm = _assembler(sqlite_ledger, _dimse(orthanc))
    try:
        assert store(port, a.paths) == [0] * 16  # the first series only
        t0 = utcnow()
        assert _after_answer(asm, sqlite_ledger, t0 + timedelta(seconds=QUIET + 1)) == []  # asked, now waiting
        with sqlite_ledger.sessions() as s:
            study = s.execute(select(Study)).scalar_one()
            assert study.completeness["series"] == {a.series_instance_uid: 16, b.series_instance_uid: 4}
            assert study.completeness_due_at is not None
        assert asm.run_once(t0 + timedelta(seconds=QUIET + WAIT - 5)) == []  # still within the bound
        [result] = asm.run_once(t0 + timedelta(seconds=QUIET + WAIT + 2))  # the bound has passed
    finally:
        asm.stop()
    job = _job(sqlite_ledger, result.job_id)
    assert job.completeness is not None and job.completeness["state"] == "incomplete_at_source"
    assert job.completeness["series"] == [{"series_instance_uid": b.series_instance_uid, "at_source": 4, "held": 0}]
    assert [e.details["completeness"] for e in sqlite_ledger.audit("job.created")] == ["incomplete_at_source"]
    with sqlite_ledger.sessions() as s:  # the study's waiting state is cleared with the assembly
        study = s.execute(select(Study)).scalar_one()
        assert study.completeness_due_at is None and study.completeness is None
    from click.testing import CliRunner

    from specgate.cli import main

    shown = CliRunner().invoke(main, ["jobs", "show", str(result.job_id), "--json"], catch_exceptions=False,
                               env={"SPECGATE_DATA_DIR": str(ledger.data_dir), "SPECGATE_DATABASE_URL": ledger.url})
    assert json.loads(shown.output)["completeness"]["state"] == "incomplete_at_source"


def test_missing_series_within_the_wait_makes_one_complete_job(sqlite_ledger: Ledger, start_scp, orthanc,
                                                               tmp_path: Path) -> None:
    a, b = two_series_study(tmp_path / "in")
    orthanc.upload([*a.paths, *b.paths])
    port = start_scp(sqlite_ledger).address[1]
    asm = _assembler(sqlite_ledger, _dimse(orthanc))
    try:
        assert store(port, a.paths) == [0] * 16
        t0 = utcnow()
        assert _after_answer(asm, sqlite_ledger, t0 + timedelta(seconds=QUIET + 1)) == []
        assert store(port, b.paths) == [0] * 4  # the second series arrives within the wait
        # complete at once: no second quiet period, no waiting for the bound
        [result] = asm.run_once(utcnow() + timedelta(seconds=2))
        assert asm.run_once(t0 + timedelta(seconds=QUIET + WAIT + 60)) == []  # one job, not two
    finally:
        asm.stop()
    job = _job(sqlite_ledger, result.job_id)
    assert job.completeness is not None and job.completeness["state"] == "complete"
    assert job.completeness["held"] == {a.series_instance_uid: 16, b.series_instance_uid: 4}
    assert job.series_instance_uid == a.series_instance_uid and job.version == 1


def test_archive_that_does_not_answer_is_recorded_and_the_job_goes_on_at_the_bound(sqlite_ledger: Ledger, start_scp,
                                                                                   tmp_path: Path) -> None:
    a, _b = two_series_study(tmp_path / "in")
    with Orthanc(tmp_path / "orthanc") as stopped:
        archive = _dimse(stopped)
    # Orthanc has stopped: nothing listens on its DICOM port any more
    port = start_scp(sqlite_ledger).address[1]
    asm = _assembler(sqlite_ledger, archive)
    try:
        assert store(port, a.paths) == [0] * 16
        t0 = utcnow()
        assert _after_answer(asm, sqlite_ledger, t0 + timedelta(seconds=QUIET + 1)) == []  # within the bound: waits
        [event] = sqlite_ledger.audit("archive.unreachable")
        assert event.details["archive"] == "pacs" and "could not connect" in event.details["error"]
        [result] = asm.run_once(t0 + timedelta(seconds=QUIET + WAIT + 1))
    finally:
        asm.stop()
    job = _job(sqlite_ledger, result.job_id)
    assert job.completeness is not None and job.completeness["state"] == "archive_unreachable"
    assert "could not connect" in job.completeness["error"]


def test_qido_rs_counts_and_a_restart_goes_on_waiting(sqlite_ledger: Ledger, start_scp, orthanc,
                                                      tmp_path: Path) -> None:
    """QIDO-RS as the question; the wait is in the ledger: a new assembler (a restarted SCP) asks again
    and makes the job at the same bound."""
    a, b = two_series_study(tmp_path / "in")
    orthanc.upload([*a.paths, *b.paths])
    port = start_scp(sqlite_ledger).address[1]
    archive = Archive.parse(f"web=http://127.0.0.1:{orthanc.http_port}/dicom-web")
    first = _assembler(sqlite_ledger, archive)
    assert store(port, a.paths) == [0] * 16
    t0 = utcnow()
    try:
        assert _after_answer(first, sqlite_ledger, t0 + timedelta(seconds=QUIET + 1)) == []
    finally:
        first.stop()
    with sqlite_ledger.sessions() as s:
        study = s.execute(select(Study)).scalar_one()
        assert study.completeness["series"] == {a.series_instance_uid: 16, b.series_instance_uid: 4}
        due = study.completeness_due_at
    again = _assembler(sqlite_ledger, archive)  # the restart
    try:
        assert again.run_once(t0 + timedelta(seconds=QUIET + WAIT - 5)) == []
        [result] = again.run_once(t0 + timedelta(seconds=QUIET + WAIT + 2))
    finally:
        again.stop()
    assert due is not None
    job = _job(sqlite_ledger, result.job_id)
    assert job.completeness is not None and job.completeness["state"] == "incomplete_at_source"
    assert job.completeness["archive"] == "web"


def test_archive_not_listening_is_unreachable_naming_why() -> None:
    from dicom_node.archive import ArchiveUnreachable, DimseArchive

    client = DimseArchive(Archive.parse(f"none=NOBODY@127.0.0.1:{free_port()}"), timeout_s=2, ae_title="SPECGATE")
    with pytest.raises(ArchiveUnreachable, match="could not connect"):
        client.study_counts(generate_uid())


def test_dicomweb_archive_with_credentials_from_a_file(tmp_path: Path) -> None:
    """QIDO-RS with HTTP basic credentials read from a file; wrong ones are a 401 named as such, the
    password in no message."""
    from dicom_node.archive import ArchiveUnreachable, DicomwebArchive

    a, b = two_series_study(tmp_path / "in")
    users = {"AuthenticationEnabled": True, "RegisteredUsers": {"specgate": "pa55-qr-9"}}
    with Orthanc(tmp_path / "orthanc", dicomweb=True, extra_config=users) as o:
        for p in (*a.paths, *b.paths):  # its REST API wants the same credentials now
            req = urllib.request.Request(f"http://127.0.0.1:{o.http_port}/instances", data=p.read_bytes(),
                                         method="POST", headers={"Authorization": "Basic " + base64.b64encode(
                                             b"specgate:pa55-qr-9").decode()})
            urllib.request.urlopen(req, timeout=30).close()
        archive = Archive.parse(f"web=http://127.0.0.1:{o.http_port}/dicom-web")
        good, bad = tmp_path / "good.cred", tmp_path / "bad.cred"
        good.write_text("specgate:pa55-qr-9\n")
        bad.write_text("specgate:wrong-pa55\n")
        counts = DicomwebArchive(archive, timeout_s=5, credentials=good).study_counts(a.study_instance_uid)
        assert counts is not None and counts.as_json()["series"] == {a.series_instance_uid: 16, b.series_instance_uid: 4}
        with pytest.raises(ArchiveUnreachable, match="HTTP 401") as refused:
            DicomwebArchive(archive, timeout_s=5, credentials=bad).study_counts(a.study_instance_uid)
        with pytest.raises(ArchiveUnreachable, match="HTTP 401"):
            DicomwebArchive(archive, timeout_s=5).study_counts(a.study_instance_uid)
    assert "pa55" not in str(refused.value)


def _jobs(ledger: Ledger) -> list[Job]:
    with ledger.sessions() as s:
        rows = list(s.execute(select(Job).order_by(Job.id)).scalars())
        s.expunge_all()
        return rows


@pytest.mark.parametrize("check", [True, False])
def test_second_half_after_the_quiet_period_one_job_with_the_check_two_without(sqlite_ledger: Ledger, start_scp,
                                                                                orthanc, tmp_path: Path,
                                                                                check: bool) -> None:
    """The running assembler loop on the real clock (quiet period 1 s): the study's second series arrives
    after the first's quiet period has ended. Asking the archive makes one complete job; without it the
    first half is a job of its own and the second half a second version."""
    a, b = two_series_study(tmp_path / "in")
    orthanc.upload([*a.paths, *b.paths])
    port = start_scp(sqlite_ledger).address[1]
    archive = _dimse(orthanc)
    completeness = CompletenessConfig(archives=(archive,), by_source=((CALLER, "pacs"),) if check else (),
                                      wait_s=60, timeout_s=5)
    asm = Assembler(AssemblyConfig(quiet_seconds=1, rules=(SeriesRule(name="ct"),), completeness=completeness),
                    sqlite_ledger.sessions, on_job_queued=lambda _job: None, interval_s=0.1).start()
    try:
        assert store(port, a.paths) == [0] * 16

        def first_half_done() -> bool:  # its quiet period is over: made a job, or waiting for the archive
            with sqlite_ledger.sessions() as s:
                study = s.execute(select(Study)).scalar_one()
                return bool(study.completeness) if check else study.assembled_count == 16

        wait_for(first_half_done, timeout=30, what="the first half's quiet period to end")
        assert store(port, b.paths) == [0] * 4
        wait_for(lambda: _jobs(sqlite_ledger) and _jobs(sqlite_ledger)[-1].completeness is not None if check
                 else len(_jobs(sqlite_ledger)) == 2, timeout=30, what="the job(s) of the whole study")
    finally:
        asm.stop()
    jobs = _jobs(sqlite_ledger)
    with sqlite_ledger.sessions() as s:
        study = s.execute(select(Study)).scalar_one()
        assert (study.received_count, study.assembled_count) == (20, 20)  # nothing left to assemble
    if check:
        [job] = jobs
        assert job.completeness is not None and job.completeness["state"] == "complete"
    else:
        assert [(j.version, str(j.state), j.completeness) for j in jobs] == [(1, "superseded", None),
                                                                             (2, "queued", None)]
