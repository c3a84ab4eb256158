"""Study assembly from the ledger: the quiet period across associations, rules, new versions that
supersede earlier ones, no matching series, and a restart that loses nothing. On SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from dicom_node.assembler import Assembler
from dicom_node.config import AssemblyConfig, SeriesRule
from ledger import jobs as ledger_jobs
from ledger.db import session_scope
from ledger.schema import Job, JobState, Result, Study, utcnow
from tests.integration.dicom_node.helpers import Ledger, store
from tests.peers import write_ct_series

_DEFAULT_RULES = (SeriesRule(name="default-ct-mr"),)


def _assembler(ledger: Ledger, queued: list[int], *, rules: Sequence[SeriesRule] = _DEFAULT_RULES,
               job_max_attempts: int = 3) -> Assembler:
    config = AssemblyConfig(quiet_seconds=30, rules=tuple(rules), job_max_attempts=job_max_attempts)
    return Assembler(config, ledger.sessions, on_job_queued=queued.append)


def _later(seconds: float = 31):
    return utcnow() + timedelta(seconds=seconds)


def test_quiet_period_across_associations_makes_one_job(ledger: Ledger, start_scp, tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=20)
    port = start_scp(ledger).address[1]
    queued: list[int] = []
    asm = _assembler(ledger, queued, job_max_attempts=5)
    assert store(port, series.paths[:12]) == [0] * 12
    assert asm.run_once() == [] and asm.run_once(_later(10)) == []  # still in its quiet period
    assert store(port, series.paths[12:]) == [0] * 8  # a second association, same study
    [result] = asm.run_once(_later())
    assert queued == [result.job_id] and result.rule == "default-ct-mr"
    with ledger.sessions() as s:
        job = s.get(Job, result.job_id)
        assert (job.state, job.version, job.series_instance_uid) == (JobState.QUEUED, 1, series.series_instance_uid)
        assert job.max_attempts == 5  # SPECGATE_WORKER_MAX_ATTEMPTS bounds the job's attempts
        study = s.execute(select(Study)).scalar_one()
        assert (study.received_count, study.assembled_count) == (20, 20) and study.assembled_at is not None
    assert asm.run_once(_later(60)) == [] and queued == [result.job_id]  # nothing new, nothing again


def test_new_instances_after_queued_supersede(ledger: Ledger, start_scp, tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=18)
    port = start_scp(ledger).address[1]
    queued: list[int] = []
    asm = _assembler(ledger, queued)
    assert store(port, series.paths[:16]) == [0] * 16
    [first] = asm.run_once(_later())
    # the first version ran and has a result (as the worker would leave it)
    with session_scope(ledger.sessions) as s:
        ledger_jobs.transition(s, first.job_id, JobState.RUNNING, actor="test")
        ledger_jobs.transition(s, first.job_id, JobState.HELD, actor="test")
        s.add(Result(job_id=first.job_id, seg_path="/x", seg_sop_instance_uid="1.2.3.4", seg_series_instance_uid="1.2.3",
                     oodm=1.0, tau=0.5, is_ood=True, model_id="m", weights_sha256="0" * 64))
    assert store(port, series.paths[16:]) == [0, 0]
    [second] = asm.run_once(_later())
    assert second.job_id != first.job_id and second.superseded == (first.job_id,)
    assert queued == [first.job_id, second.job_id]
    with ledger.sessions() as s:
        old, new = s.get(Job, first.job_id), s.get(Job, second.job_id)
        assert (old.state, old.superseded_by_id) == (JobState.SUPERSEDED, new.id)
        assert (new.state, new.version) == (JobState.QUEUED, 2)
        assert s.execute(select(Result.superseded)).scalar_one() is True
    assert [e.object_id for e in ledger.audit("job.superseded")] == [str(first.job_id)]


def test_sent_job_keeps_its_state_but_its_result_is_marked_superseded(ledger: Ledger, start_scp,
                                                                      tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=17)
    port = start_scp(ledger).address[1]
    asm = _assembler(ledger, [])
    assert store(port, series.paths[:16]) == [0] * 16
    [first] = asm.run_once(_later())
    with session_scope(ledger.sessions) as s:
        for state in (JobState.RUNNING, JobState.RELEASED, JobState.SENT):
            ledger_jobs.transition(s, first.job_id, state, actor="test")
        s.add(Result(job_id=first.job_id, seg_path="/x", seg_sop_instance_uid="1.2.3.5", seg_series_instance_uid="1.2.3",
                     oodm=0.1, tau=0.5, is_ood=False, model_id="m", weights_sha256="0" * 64))
    assert store(port, series.paths[16:]) == [0]
    [second] = asm.run_once(_later())
    assert second.superseded == ()
    with ledger.sessions() as s:
        old = s.get(Job, first.job_id)
        assert (old.state, old.superseded_by_id) == (JobState.SENT, second.job_id)
        assert s.execute(select(Result.superseded)).scalar_one() is True
    assert [e.object_id for e in ledger.audit("job.result_superseded")] == [str(first.job_id)]


def test_no_matching_series_is_recorded_and_left_alone(ledger: Ledger, start_scp, tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=5)  # fewer than the default rule's 16 slices
    port = start_scp(ledger).address[1]
    queued: list[int] = []
    asm = _assembler(ledger, queued)
    assert store(port, series.paths) == [0] * 5
    [result] = asm.run_once(_later())
    assert result.job_id is None and queued == []
    assert ledger.count(Job) == 0
    [event] = ledger.audit("study.no_matching_series")
    assert event.details["series"] == [{"series_instance_uid": series.series_instance_uid, "modality": "CT",
                                        "instances": 5}]
    assert asm.run_once(_later(120)) == []


def test_rules_by_calling_ae_and_description(ledger: Ledger, start_scp, tmp_path: Path) -> None:
    study = write_ct_series(tmp_path / "a", slices=4, series_description="SCOUT")
    axial = write_ct_series(tmp_path / "b", slices=6, study_uid=study.study_instance_uid,
                            series_description="AXIAL 1mm")
    port = start_scp(ledger).address[1]
    rule = SeriesRule(name="axial-from-testscu", calling_ae="TESTSCU", series_description="^axial",
                      min_slices=6, model="liver")
    queued: list[int] = []
    asm = _assembler(ledger, queued, rules=[rule])
    assert store(port, study.paths + axial.paths) == [0] * 10
    [result] = asm.run_once(_later())
    assert result.rule == "axial-from-testscu"
    with ledger.sessions() as s:
        assert s.get(Job, result.job_id).series_instance_uid == axial.series_instance_uid


def test_a_new_assembler_picks_up_what_the_last_one_left(ledger: Ledger, start_scp, tmp_path: Path) -> None:
    """State lives in the ledger only: an assembler started after a restart finds the pending study."""
    series = write_ct_series(tmp_path / "in", slices=16)
    port = start_scp(ledger).address[1]
    assert store(port, series.paths) == [0] * 16
    queued: list[int] = []
    assert _assembler(ledger, []).run_once(_later(5)) == []  # first process: still quiet when it "died"
    [result] = _assembler(ledger, queued).run_once(_later())  # the restarted one
    assert queued == [result.job_id]


def test_enqueue_hook_failure_leaves_the_job_queued(ledger: Ledger, start_scp, tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=16)
    port = start_scp(ledger).address[1]
    assert store(port, series.paths) == [0] * 16

    def broker_down(job_id: int) -> None:
        raise ConnectionError("broker down")

    config = AssemblyConfig(quiet_seconds=30, rules=_DEFAULT_RULES)
    [result] = Assembler(config, ledger.sessions, on_job_queued=broker_down).run_once(_later())
    with ledger.sessions() as s:
        assert s.get(Job, result.job_id).state == JobState.QUEUED  # the reconciler finds it


def test_background_loop(ledger: Ledger, start_scp, tmp_path: Path) -> None:
    from tests.peers import wait_for

    series = write_ct_series(tmp_path / "in", slices=16)
    port = start_scp(ledger).address[1]
    config = AssemblyConfig(quiet_seconds=0.5, rules=_DEFAULT_RULES)
    queued: list[int] = []
    asm = Assembler(config, ledger.sessions, on_job_queued=queued.append).start()
    try:
        assert store(port, series.paths) == [0] * 16
        wait_for(lambda: queued, timeout=10, what="the job to be queued")
    finally:
        asm.stop()
    assert len(queued) == 1
