"""``specgate studies pull`` against a real Orthanc: by C-MOVE to our running SCP and by WADO-RS through the
receive path; by Study Instance UID and by accession number; a study partly held gets a new job version
with what was missing; a pull that brings nothing new makes no job; an unknown accession number is a clear
error with its own exit code. Every pull is audited with who asked."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select

from dicom_node.assembler import Assembler
from dicom_node.config import AssemblyConfig, SeriesRule
from ledger.schema import Instance, Job, JobState, utcnow
from specgate.cli import main
from tests.integration.dicom_node.helpers import CALLER, Ledger, store
from tests.integration.dicom_node.test_archive_completeness import two_series_study
from tests.peers import Orthanc, free_port


@pytest.fixture
def node(sqlite_ledger: Ledger, start_scp, tmp_path: Path) -> Iterator[tuple[Ledger, int, Orthanc]]:
    """Our SCP (which accepts Orthanc as a caller) and an Orthanc that knows it as a move destination."""
    port = free_port()
    start_scp(sqlite_ledger, scp_port=port, allowed_callers=f"{CALLER}@127.0.0.1,ORTHANC@127.0.0.1")
    with Orthanc(tmp_path / "orthanc", modalities={"specgate": ("SPECGATE", "127.0.0.1", port)},
                 dicomweb=True) as orthanc:
        yield sqlite_ledger, port, orthanc


def pull(ledger: Ledger, orthanc: Orthanc, *args: str) -> Result:
    env = {"SPECGATE_DATA_DIR": str(ledger.data_dir), "SPECGATE_DATABASE_URL": ledger.url,
           "SPECGATE_ARCHIVES": f"pacs=ORTHANC@127.0.0.1:{orthanc.dicom_port},"
                                f"web=http://127.0.0.1:{orthanc.http_port}/dicom-web"}
    return CliRunner().invoke(main, ["studies", "pull", *args], env=env, catch_exceptions=False)


def assemble(ledger: Ledger) -> list[int]:
    asm = Assembler(AssemblyConfig(quiet_seconds=30, rules=(SeriesRule(name="ct"),)), ledger.sessions,
                    on_job_queued=lambda _job: None)
    return [r.job_id for r in asm.run_once(utcnow() + timedelta(seconds=31)) if r.job_id is not None]


def held(ledger: Ledger) -> dict[str, str]:
    with ledger.sessions() as s:
        return dict(s.execute(select(Instance.sop_instance_uid, Instance.calling_ae)).all())  # type: ignore[arg-type]


def test_pull_by_accession_and_c_move_completes_a_partly_held_study_with_a_new_job_version(node, tmp_path: Path) -> None:
    ledger, port, orthanc = node
    a, b = two_series_study(tmp_path / "in", accession="ACC-MOVE-1")
    orthanc.upload([*a.paths, *b.paths])
    assert store(port, a.paths) == [0] * 16  # only the first series was routed to us
    [first] = assemble(ledger)

    res = pull(ledger, orthanc, "--accession", "ACC-MOVE-1", "--from", "pacs", "--as", "dr.moves")
    assert res.exit_code == 0, res.output
    assert "20 instance(s) in 2 series at pacs" in res.output and "4 new, 20 held" in res.output
    assert "20/20 retrieved" in res.output  # progress
    callers = held(ledger)
    assert len(callers) == 20 and {callers[s] for s in b.sop_instance_uids} == {"ORTHANC"}  # came by C-STORE
    [second] = assemble(ledger)  # the missing series makes a new version; the first is superseded
    with ledger.sessions() as s:
        old, new = s.get(Job, first), s.get(Job, second)
        assert (old.state, new.version, new.state) == (JobState.SUPERSEDED, 2, JobState.QUEUED)
    [asked] = ledger.audit("studies.pull_requested")
    [done] = ledger.audit("studies.pull_done")
    assert asked.actor == done.actor == "dr.moves" and asked.details["method"] == "c-move"
    assert (done.details["at_source"], done.details["retrieved"], done.details["new"], done.details["failed"]) == \
        (20, 20, 4, 0)


def test_pull_by_accession_over_wado_rs_then_again_brings_nothing_new(node, tmp_path: Path) -> None:
    ledger, _port, orthanc = node
    a, b = two_series_study(tmp_path / "in", accession="ACC-QR-7")
    orthanc.upload([*a.paths, *b.paths])
    res = pull(ledger, orthanc, "--accession", "ACC-QR-7", "--from", "web", "--as", "dr.web")
    assert res.exit_code == 0, res.output
    assert f"study {a.study_instance_uid}: 20 instance(s) in 2 series at web" in res.output
    assert "20 new, 20 held" in res.output
    callers = held(ledger)
    assert set(callers) == {*a.sop_instance_uids, *b.sop_instance_uids} and set(callers.values()) == {"web"}
    assert len(ledger.spool_files()) == 20
    [job_id] = assemble(ledger)
    with ledger.sessions() as s:
        assert s.get(Job, job_id).series_instance_uid == a.series_instance_uid

    again = pull(ledger, orthanc, "--study", a.study_instance_uid, "--from", "web", "--as", "dr.web")
    assert again.exit_code == 0, again.output
    assert "0 new, 20 held" in again.output and "nothing new" in again.output
    assert assemble(ledger) == []  # the same instances again: the study's job stands
    done = ledger.audit("studies.pull_done")
    assert [(d.actor, d.details["method"], d.details["new"]) for d in done] == [("dr.web", "wado-rs", 20),
                                                                                ("dr.web", "wado-rs", 0)]


def test_unknown_accession_is_a_clear_error_with_its_exit_code(node, caplog: pytest.LogCaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    ledger, _port, orthanc = node
    from pynetdicom import _config

    for switch in ("LOG_REQUEST_IDENTIFIERS", "LOG_RESPONSE_IDENTIFIERS"):  # pynetdicom's defaults
        monkeypatch.setattr(_config, switch, True)
    caplog.set_level(logging.INFO)
    for archive in ("pacs", "web"):
        res = pull(ledger, orthanc, "--accession", "NO-SUCH-ACC", "--from", archive, "--as", "dr.none")
        assert res.exit_code == 3
        assert f"archive {archive} holds no study with accession number 'NO-SUCH-ACC'" in res.output
    failed = ledger.audit("studies.pull_failed")
    assert [(e.actor, e.details["reason"]) for e in failed] == [("dr.none", "not_found")] * 2
    # the C-FIND went out (pynetdicom logged it) without its identifier: the accession number in no log
    assert "Sending Find Request" in caplog.text and "NO-SUCH-ACC" not in caplog.text
    assert ledger.count() == 0


def test_pull_from_an_archive_that_does_not_answer_exits_1(sqlite_ledger: Ledger, tmp_path: Path) -> None:
    with Orthanc(tmp_path / "orthanc") as stopped:
        pass  # stopped: nothing listens on its ports any more
    res = pull(sqlite_ledger, stopped, "--study", "1.2.826.0.1.3680043.8.498.99", "--from", "pacs")
    assert res.exit_code == 1 and "could not connect" in res.output
    [event] = sqlite_ledger.audit("studies.pull_failed")
    assert event.details["reason"] == "archive_unreachable" and event.actor.startswith("operator:")


def test_pull_by_accession_and_c_get_comes_back_on_our_own_association_through_the_receive_path(node, tmp_path: Path) -> None:
    ledger, _port, orthanc = node
    a, b = two_series_study(tmp_path / "in", accession="ACC-GET-3")
    orthanc.upload([*a.paths, *b.paths])
    # found by its accession number with a C-FIND at STUDY level
    res = pull(ledger, orthanc, "--accession", "ACC-GET-3", "--from", "pacs", "--method", "get", "--as", "dr.get")
    assert res.exit_code == 0, res.output
    assert "pulled 20 of 20 instance(s) from pacs; 20 new, 20 held" in res.output
    callers = held(ledger)
    assert set(callers) == {*a.sop_instance_uids, *b.sop_instance_uids} and set(callers.values()) == {"ORTHANC"}
    assert len(ledger.spool_files()) == 20
    [done] = ledger.audit("studies.pull_done")
    assert (done.actor, done.details["method"], done.details["retrieved"]) == ("dr.get", "c-get", 20)
    assert len(assemble(ledger)) == 1
    wrong = pull(ledger, orthanc, "--study", a.study_instance_uid, "--from", "web", "--method", "get")
    assert wrong.exit_code == 2 and "is DICOMweb (WADO-RS)" in wrong.output
