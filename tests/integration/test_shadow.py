"""Silent (shadow) mode (issue 22, item 2; :mod:`ledger.shadow`), on SQLite and PostgreSQL.

- the assembler makes a shadow job beside the live job (a model registered as shadow, a rule that says
  ``shadow = true``), of the same version, linked to it and queued to its model; a newer version
  supersedes both; promotion makes the model's rule an ordinary first-match rule;
- a shadow result is never approved or sent: the ledger's transition, the review decision (refusal
  committed in the audit trail), the SCU's delivery and the worker's delivery refuse it, the reconciler and
  the review queue leave it out, a retraction is refused;
- the side-by-side report on a seeded ledger, against figures computed here from the seed;
- the DSC of two real SEGs (label maps written by the worker's encoder) stored when the pair completes;
- migration 0014: one live job per version still enforced, a shadow job beside it allowed, downgrade
  refused while shadow jobs exist.
"""

from __future__ import annotations

import json
import random
import statistics
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import scu
from dicom_node.assembler import Assembler
from dicom_node.config import AssemblyConfig, SeriesRule
from dicom_series import load_series
from export.selection import Criteria, select_jobs
from ledger import jobs, migrations, models, shadow
from ledger.db import open_engine, session_scope, sessionmaker_for
from ledger.prometheus import snapshot
from ledger.reports import REPORTS
from ledger.reviews import ReviewError, decide
from ledger.schema import (
    AuditEvent,
    Delivery,
    Instance,
    Job,
    JobState,
    Result,
    Review,
    ReviewDecision,
    Series,
    ShadowComparison,
    Study,
    utcnow,
)
from review import queries
from specgate.settings import Destination
from tests.integration.review.multilabel import multilabel_job, write_result
from tests.peers import free_port
from worker.config import DeliveryConfig
from worker.delivery import deliver_job
from worker.reconcile import redeliver_lost
from worker.retraction import RetractionError, retract_job
from worker.shadow import compare_ready

SHADOW_MODEL = "liver-v2"


def _register(sessions: sessionmaker[Session], name: str, *, in_shadow: bool) -> None:
    with session_scope(sessions) as s:
        models.register(s, name=name, version="2.0", format="segnet", path=f"/models/{name}.pt",
                        files_sha256={f"{name}.pt": "ab" * 32}, labels={1: "liver"}, layer="decoder",
                        settings={"signature": {}, "open_options": {}}, actor="test")
        models.set_bank(s, name, bank_path=f"/models/{name}.npz", bank_sha256="cd" * 32, actor="test")
        if in_shadow:
            models.set_shadow(s, name, actor="user:admin", why="acceptance test")


_uid = iter(range(1, 10**6))


def _receive(sessions: sessionmaker[Session], modality: str = "CT", n: int = 6, study_uid: str | None = None) -> str:
    """A study's rows as the SCP leaves them, its quiet period over (no files: the assembler reads rows)."""
    study_uid = study_uid or f"1.2.826.0.1.3680043.8.498.{next(_uid)}"
    with session_scope(sessions) as s:
        study = s.execute(select(Study).where(Study.study_instance_uid == study_uid)).scalar_one_or_none()
        if study is None:
            study = Study(study_instance_uid=study_uid, calling_ae="PACS")
            s.add(study)
            s.flush()
            series = Series(study_id=study.id, series_instance_uid=f"{study_uid}.1", modality=modality)
            s.add(series)
            s.flush()
        else:
            series = s.execute(select(Series).where(Series.study_id == study.id)).scalar_one()
        for _ in range(n):
            k = next(_uid)
            s.add(Instance(series_id=series.id, sop_instance_uid=f"{study_uid}.1.{k}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                           spool_path=f"spool/{k}.dcm", size_bytes=1, sha256="0" * 64, calling_ae="PACS"))
        study.received_count += n
        study.last_received_at = utcnow() - timedelta(hours=1)
    return study_uid


def _jobs(sessions: sessionmaker[Session], study_uid: str) -> list[Job]:
    with sessions() as s:
        return list(s.execute(select(Job).join(Study).where(Study.study_instance_uid == study_uid)
                              .order_by(Job.version, Job.shadow, Job.id)).scalars())


def _audit(sessions: sessionmaker[Session], action: str) -> list[AuditEvent]:
    with sessions() as s:
        return list(s.execute(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)).scalars())


def test_a_shadow_model_runs_beside_the_live_one_until_promoted(migrated) -> None:
    _, _, sessions = migrated
    _register(sessions, SHADOW_MODEL, in_shadow=True)
    rules = (SeriesRule(name="v2", model=SHADOW_MODEL, min_slices=4),  # first: takes the studies once promoted
             SeriesRule(name="ct", min_slices=4),
             SeriesRule(name="silent", modalities=("CT",), min_slices=4, shadow=True))
    queued: list[int] = []
    asm = Assembler(AssemblyConfig(quiet_seconds=30, rules=rules), sessions, on_job_queued=queued.append)

    study = _receive(sessions)
    [made] = asm.run_once()
    live, beside_v2, beside_silent = _jobs(sessions, study)
    assert (made.job_id, made.rule, made.shadow_jobs) == (live.id, "ct", (beside_v2.id, beside_silent.id))
    assert queued == [live.id, beside_v2.id, beside_silent.id]  # each to its model's queue, by the worker's hook
    assert (live.shadow, live.model_name, live.version) == (False, "default", 1)
    assert [(j.shadow, j.shadow_of_id, j.version, j.rule_name, j.model_name) for j in (beside_v2, beside_silent)] == [
        (True, live.id, 1, "v2", SHADOW_MODEL), (True, live.id, 1, "silent", "default")]
    [created] = [e for e in _audit(sessions, "job.created") if e.object_id == str(beside_v2.id)]
    assert created.details["shadow"] is True and created.details["shadow_of"] == live.id

    _receive(sessions, study_uid=study, n=1)  # more instances: a new version for all three
    [again] = asm.run_once()
    assert sorted(again.superseded) == sorted([live.id, beside_v2.id, beside_silent.id])
    jobs_now = _jobs(sessions, study)
    assert [(j.version, j.shadow, j.state) for j in jobs_now] == [
        (1, False, JobState.SUPERSEDED), (1, True, JobState.SUPERSEDED), (1, True, JobState.SUPERSEDED),
        (2, False, JobState.QUEUED), (2, True, JobState.QUEUED), (2, True, JobState.QUEUED)]
    assert {j.shadow_of_id for j in jobs_now[4:]} == {jobs_now[3].id}

    with session_scope(sessions) as s, pytest.raises(models.ModelRegistryError, match="promoted and put in shadow"):
        models.promote(s, SHADOW_MODEL, actor="user:admin", demote=SHADOW_MODEL)
    with session_scope(sessions) as s:
        models.promote(s, SHADOW_MODEL, actor="user:dr.chair", why="committee 2026-12")
    [promoted] = _audit(sessions, "model.promoted")
    assert (promoted.actor, promoted.object_id, promoted.details["why"]) == ("user:dr.chair", SHADOW_MODEL,
                                                                              "committee 2026-12")
    assert [e.actor for e in _audit(sessions, "model.shadowed")] == ["user:admin"]
    # promoted: its rule is an ordinary rule again, listed first: it takes the next study, live
    after = _receive(sessions)
    [made] = asm.run_once()
    live, beside = _jobs(sessions, after)
    assert (made.rule, live.model_name, live.shadow) == ("v2", SHADOW_MODEL, False)
    assert (beside.rule_name, beside.shadow, beside.shadow_of_id) == ("silent", True, live.id)
    with session_scope(sessions) as s, pytest.raises(models.ModelRegistryError, match="is not in shadow"):
        models.promote(s, SHADOW_MODEL, actor="user:dr.chair")


@dataclass
class Pair:
    live: int
    shadow: int
    live_result: int
    shadow_result: int


def _job_with_result(s: Session, study: Study, state: JobState, *, is_ood: bool, model: str,
                     shadow_of: Job | None = None, beside: bool = False, rule: str = "ct") -> tuple[Job, int]:
    job = jobs.create_job(s, study, actor="test", rule_name=rule, model_name=model, shadow=beside,
                          shadow_of=shadow_of, series_instance_uid=f"{study.study_instance_uid}.1")
    s.execute(update(Job).where(Job.id == job.id).values(state=state))
    k = next(_uid)
    result = Result(job_id=job.id, seg_path=f"results/{k}/seg.dcm", seg_sop_instance_uid=f"2.25.{k}",
                    seg_series_instance_uid=f"2.25.{k}.1", sr_path=f"results/{k}/sr.dcm",
                    oodm=0.09 if is_ood else 0.02, tau=0.05, is_ood=is_ood, model_id=f"{model}:1",
                    weights_sha256="0" * 64)
    s.add(result)
    s.flush()
    return job, result.id


def _pair(sessions: sessionmaker[Session], *, live_state: JobState, shadow_state: JobState, live_ood: bool,
          shadow_ood: bool, model: str = SHADOW_MODEL, live_model: str = "default") -> Pair:
    with session_scope(sessions) as s:
        study = Study(study_instance_uid=f"1.2.826.0.1.3680043.8.498.{next(_uid)}", calling_ae="PACS")
        s.add(study)
        s.flush()
        live, lr = _job_with_result(s, study, live_state, is_ood=live_ood, model=live_model)
        sh, sr = _job_with_result(s, study, shadow_state, is_ood=shadow_ood, model=model, shadow_of=live, beside=True,
                                  rule=f"shadow-{model}")
        return Pair(live.id, sh.id, lr, sr)


def test_a_shadow_result_is_never_approved_or_sent(migrated, tmp_path: Path) -> None:
    settings, _, sessions = migrated
    held = _pair(sessions, live_state=JobState.HELD, shadow_state=JobState.HELD, live_ood=True, shadow_ood=True)
    released = _pair(sessions, live_state=JobState.RELEASED, shadow_state=JobState.RELEASED, live_ood=False,
                     shadow_ood=False)

    # the review decision (CLI and review app alike): refused, and the refusal stays in the audit trail
    for decision in (ReviewDecision.APPROVE, ReviewDecision.REJECT):
        with pytest.raises(ReviewError, match=rf"job {held.shadow} is a shadow result \(model {SHADOW_MODEL}\)"):
            with session_scope(sessions) as s:
                decide(s, held.shadow, user="anna", decision=decision, reason="looks fine")
    refused = _audit(sessions, "review.refused")
    assert [(e.actor, e.object_id, e.details["refused"]) for e in refused] == [
        ("user:anna", str(held.shadow), "approved"), ("user:anna", str(held.shadow), "rejected")]
    with sessions() as s:
        assert s.get(Job, held.shadow).state == JobState.HELD
        assert s.execute(select(func.count()).select_from(Review)).scalar_one() == 0

    # the one door every approval and delivery goes through
    for job_id, to in ((held.shadow, JobState.APPROVED), (released.shadow, JobState.SENT)):
        with session_scope(sessions) as s, pytest.raises(jobs.ShadowRefused, match="never approved or sent"):
            jobs.transition(s, job_id, to, actor="test")

    # the delivery paths: no row is ever made for a shadow result; a live one goes on as before
    nobody = Destination(name="pacs", ae_title="NOBODY", host="127.0.0.1", port=free_port())
    with pytest.raises(shadow.ShadowError, match="is never sent"):
        scu.deliver(sessions, released.shadow_result, [nobody], actor="worker", files=settings.data_dir)
    config = DeliveryConfig(destinations=(nobody,), retry=replace(scu.RetryPolicy(), max_attempts=1, timeout_s=2),
                            data_dir=settings.data_dir)
    assert deliver_job(sessions, released.shadow, config, actor="worker") == "refused (shadow job)"
    with sessions() as s:
        assert s.execute(select(Delivery.job_id)).scalars().all() == []
        assert s.get(Job, released.shadow).state == JobState.RELEASED
    assert [(e.object_id, e.details["refused"]) for e in _audit(sessions, "delivery.refused")] == [
        (str(released.shadow), "sent"), (str(released.shadow), "sent")]

    # the reconciler looks for lost deliveries of live results only
    with session_scope(sessions) as s:
        s.execute(update(Job).values(updated_at=utcnow() - timedelta(hours=2)))
    again: list[int] = []
    redeliver_lost(sessions, enqueue_delivery=again.append, queued_deadline_s=60, now=utcnow(), actor="test")
    assert again == [released.live]

    # the radiologists' queue and count, the queue report and the queue-depth gauge: live results only
    with sessions() as s:
        rows, total = queries.queue(s, queries.QueueFilter())
        assert ([r.job_id for r in rows], total, queries.held_count(s)) == ([held.live], 1, 1)
        assert [r["job_id"] for r in REPORTS["queue"].run(s)] == [held.live]
        gauges = snapshot(s)
        assert (gauges.queue_depth, gauges.jobs_by_state["released"]) == (1, 1)
    with pytest.raises(RetractionError, match="shadow result: it is never sent"):
        retract_job(sessions, released.shadow, user="anna", reason="quality", files=settings.data_dir)


def test_the_side_by_side_report_on_a_seeded_ledger(migrated, cli) -> None:
    """Seeded pairs of two shadow models against the default model: both gates' decisions, DSCs (some
    missing: not compared yet), radiologists' decisions on held live results; superseded pairs and a
    shadow job without a live one left out. Every figure computed here from the seed."""
    _, _, sessions = migrated
    rng = random.Random(22)
    truth: list[dict[str, Any]] = []
    for n in range(40):
        model = ("liver-v2", "liver-v3")[n % 2]
        live_ood, shadow_ood = rng.random() < 0.4, rng.random() < 0.3
        decision = rng.choice([None, "approve", "reject"]) if live_ood else None
        live_state = JobState.HELD if live_ood and decision is None else (
            JobState.SENT if not live_ood or decision == "approve" else JobState.REJECTED)
        p = _pair(sessions, live_state=live_state, shadow_state=JobState.HELD if shadow_ood else JobState.RELEASED,
                  live_ood=live_ood, shadow_ood=shadow_ood, model=model)
        dsc = None if n % 7 == 0 else round(rng.uniform(0.5, 1.0), 4)
        with session_scope(sessions) as s:
            if dsc is not None:
                s.execute(insert(ShadowComparison).values(shadow_job_id=p.shadow, live_job_id=p.live, dsc=dsc,
                                                          computed_at=utcnow()))
            if decision is not None:
                s.add(Review(job_id=p.live, username="anna", decision=decision, reason="r"))
        truth.append({"model": model, "live_ood": live_ood, "shadow_ood": shadow_ood, "decision": decision,
                      "dsc": dsc})
    # left out: a superseded pair, and a shadow job that ran without a live one
    gone = _pair(sessions, live_state=JobState.SUPERSEDED, shadow_state=JobState.SUPERSEDED, live_ood=True,
                 shadow_ood=False)
    with session_scope(sessions) as s:
        s.execute(update(Result).where(Result.job_id.in_([gone.live, gone.shadow])).values(superseded=True))
        study = Study(study_instance_uid="1.2.826.0.1.3680043.8.498.777", calling_ae="PACS")
        s.add(study)
        s.flush()
        _job_with_result(s, study, JobState.RELEASED, is_ood=False, model="liver-v2", beside=True, rule="alone")

    expected = []
    for model in ("liver-v2", "liver-v3"):
        t = [x for x in truth if x["model"] == model]
        dscs = [x["dsc"] for x in t if x["dsc"] is not None]
        held = [x for x in t if x["live_ood"]]
        expected.append({
            "shadow_model": model, "live_model": "default", "studies": len(t), "compared": len(dscs),
            "dsc_mean": pytest.approx(sum(dscs) / len(dscs)), "dsc_median": pytest.approx(statistics.median(dscs)),
            "dsc_min": pytest.approx(min(dscs)),
            "both_in": sum(not x["live_ood"] and not x["shadow_ood"] for x in t),
            "live_in_shadow_ood": sum(not x["live_ood"] and x["shadow_ood"] for x in t),
            "live_ood_shadow_in": sum(x["live_ood"] and not x["shadow_ood"] for x in t),
            "both_ood": sum(x["live_ood"] and x["shadow_ood"] for x in t),
            "held": len(held), "held_approved": sum(x["decision"] == "approve" for x in held),
            "held_rejected": sum(x["decision"] == "reject" for x in held),
            "held_pending": sum(x["decision"] is None for x in held),
            "held_approved_shadow_in": sum(x["decision"] == "approve" and not x["shadow_ood"] for x in held),
            "held_rejected_shadow_in": sum(x["decision"] == "reject" and not x["shadow_ood"] for x in held)})
    assert all(e["held_rejected"] and e["live_ood_shadow_in"] and e["held_pending"] for e in expected)  # seed covers
    with sessions() as s:
        rows = REPORTS["shadow"].run(s)
    assert rows == expected
    assert list(rows[0]) == list(REPORTS["shadow"].column_names)
    shown = json.loads(cli("report", "shadow", "--format", "json").output)
    assert [(r["shadow_model"], r["studies"], r["both_ood"], r["held_rejected_shadow_in"]) for r in shown] == [
        (e["shadow_model"], e["studies"], e["both_ood"], e["held_rejected_shadow_in"]) for e in expected]
    with sessions() as s:  # the Shadow page: every shadow result not superseded, with its live job
        listed = shadow.shadow_results(s)
    assert len(listed) == 41 and {r.live_job_id is None for r in listed} == {True, False}


def test_the_dsc_of_the_two_segs_is_stored_when_the_pair_completes(migrated, tmp_path: Path) -> None:
    """A held live result and a shadow result beside it whose label map is the live one moved by 3 voxels
    and without its lesion, both written as real DICOM-SEGs: the stored DSC is the label maps' own."""
    settings, _, sessions = migrated
    live = multilabel_job(sessions, tmp_path, settings.results_dir)
    other = np.roll(live.label_map, 3, axis=2)
    other[other == 5] = 0
    with session_scope(sessions) as s:
        live_job = s.get(Job, live.job_id)
        assert live_job is not None
        study = s.get(Study, live_job.study_id)
        assert study is not None
        beside = jobs.create_job(s, study, actor="test", rule_name="abdomen-v2", model_name=SHADOW_MODEL,
                                 series_instance_uid=live_job.series_instance_uid, shadow=True, shadow_of=live_job)
        jobs.transition(s, beside.id, JobState.RUNNING, actor="test", task_id="t2", attempts=1)
        shadow_id, version = beside.id, beside.version
    volume = load_series(sorted((tmp_path / "multilabel-series").iterdir()))
    files = settings.worker_config().pipeline.files
    assert compare_ready(sessions, live.job_id, files, actor="worker") == 0  # the shadow result is not made yet
    write_result(sessions, settings.results_dir, shadow_id, version, volume, other, is_ood=False)
    assert compare_ready(sessions, shadow_id, files, actor="worker") == 1
    assert compare_ready(sessions, live.job_id, files, actor="worker") == 0  # stored once
    # what the SEGs carry: the segments the rule sends (not the spleen, label 4)
    sent = [d.value for d in live.segments]
    a, b = np.isin(other, sent), np.isin(live.label_map, sent)
    want = 2 * int((a & b).sum()) / int(a.sum() + b.sum())
    assert 0.3 < want < 0.95  # a real disagreement, not a trivial one
    with sessions() as s:
        row = s.execute(select(ShadowComparison)).scalar_one()
        assert (row.shadow_job_id, row.live_job_id, row.note) == (shadow_id, live.job_id, None)
        assert row.dsc == pytest.approx(want, abs=1e-9)
        assert (row.shadow_voxels, row.live_voxels) == (int(a.sum()), int(b.sum()))
        [report] = REPORTS["shadow"].run(s)
    assert (report["compared"], report["live_ood_shadow_in"], report["held_pending"]) == (1, 1, 1)
    assert report["dsc_mean"] == pytest.approx(want)
    [event] = _audit(sessions, "shadow.compared")
    assert event.object_id == str(shadow_id) and event.details["dsc"] == pytest.approx(want, abs=1e-6)


def test_migration_0014_keeps_one_live_job_per_version(db_url: str) -> None:
    migrations.upgrade(db_url, "0013")
    engine = open_engine(db_url)
    try:
        sessions = sessionmaker_for(engine)
        with session_scope(sessions) as s:  # a ledger of before: one job, sent
            study = Study(study_instance_uid="1.2.3", calling_ae="PACS")
            s.add(study)
            s.flush()
            s.execute(text("INSERT INTO jobs (study_id, version, state, attempts, max_attempts, created_at, updated_at) "
                           "VALUES (:study, 1, 'sent', 1, 3, :now, :now)"), {"study": study.id, "now": utcnow()})
        engine.dispose()
        migrations.upgrade(db_url)
        with session_scope(sessions) as s:
            old = s.execute(select(Job)).scalar_one()
            assert (old.shadow, old.shadow_of_id, old.state) == (False, None, JobState.SENT)
            study = s.get(Study, old.study_id)
            assert study is not None
            jobs.create_job(s, study, actor="test", rule_name="silent", shadow=True, shadow_of=old)
        with pytest.raises(IntegrityError), session_scope(sessions) as s:  # a second live job of version 1
            s.execute(insert(Job.__table__).values(study_id=old.study_id, version=1, state="queued", attempts=0,
                                                   max_attempts=3, created_at=utcnow(), updated_at=utcnow(),
                                                   shadow=False))
        with pytest.raises(IntegrityError), session_scope(sessions) as s:  # the same shadow rule twice
            s.execute(insert(Job.__table__).values(study_id=old.study_id, version=1, state="queued", attempts=0,
                                                   max_attempts=3, created_at=utcnow(), updated_at=utcnow(),
                                                   shadow=True, rule_name="silent"))
        engine.dispose()
        with pytest.raises(RuntimeError, match="shadow jobs exist"):
            migrations.downgrade(db_url, "0013")
        with session_scope(sessions) as s:
            s.execute(Job.__table__.delete().where(Job.shadow))
        engine.dispose()
        migrations.downgrade(db_url, "0013")
        migrations.upgrade(db_url)
        with sessions() as s:
            assert s.execute(select(func.count()).select_from(Job)).scalar_one() == 1
    finally:
        engine.dispose()


def test_a_model_is_put_in_shadow_once_and_promoted_only_with_a_bank(migrated) -> None:
    _, _, sessions = migrated
    with session_scope(sessions) as s:
        models.register(s, name="no-bank", version="1", format="segnet", path="/m.pt", files_sha256={"m.pt": "ab" * 32},
                        labels={1: "liver"}, layer="decoder", settings={}, actor="test")
        models.set_shadow(s, "no-bank", actor="user:admin")
    with session_scope(sessions) as s, pytest.raises(models.ModelRegistryError, match="in shadow already"):
        models.set_shadow(s, "no-bank", actor="user:admin")
    with session_scope(sessions) as s, pytest.raises(models.ModelRegistryError, match="has no OOD bank"):
        models.promote(s, "no-bank", actor="user:admin")
    with session_scope(sessions) as s, pytest.raises(models.ModelRegistryError, match="no model is registered"):
        models.set_shadow(s, "ghost", actor="user:admin")
    counts: dict[str, int] = defaultdict(int)
    for e in _audit(sessions, "model.shadowed"):
        counts[e.object_id] += 1
    assert dict(counts) == {"no-bank": 1}


def test_a_shadow_job_neither_keeps_a_study_from_pruning_nor_is_left_behind(migrated) -> None:
    """``specgate spool prune``: a shadow job stays released or held for good; the live job decides."""
    from specgate.retention import plan

    settings, _, sessions = migrated
    done = _pair(sessions, live_state=JobState.SENT, shadow_state=JobState.RELEASED, live_ood=False, shadow_ood=False)
    waiting = _pair(sessions, live_state=JobState.HELD, shadow_state=JobState.RELEASED, live_ood=True,
                    shadow_ood=False)
    with session_scope(sessions) as s:
        s.execute(update(Job).where(Job.id.in_([done.live, waiting.live]))
                  .values(finished_at=utcnow() - timedelta(days=40)))
    with sessions() as s:
        planned = plan(s, settings.worker_config().pipeline.files, older_than=timedelta(days=30))
        shadow_seg = s.execute(select(Result.seg_path).where(Result.job_id == done.shadow)).scalar_one()
    assert [sorted(p.jobs) for p in planned] == [sorted([done.live, done.shadow])]
    assert shadow_seg in planned[0].result_keys  # its files go with the study's


def test_an_export_takes_the_live_held_result_not_the_shadow_one_beside_it(migrated) -> None:
    """``specgate export --held`` selects a held study once, by its live job: the shadow job beside it (held
    by its own gate, never reviewed) is not a radiologist's case."""
    _, _, sessions = migrated
    pair = _pair(sessions, live_state=JobState.HELD, shadow_state=JobState.HELD, live_ood=True, shadow_ood=True)
    with session_scope(sessions) as s:
        chosen = select_jobs(s, Criteria(frozenset({"held"}), since=date(2000, 1, 1)))
    assert [c.job_id for c in chosen] == [pair.live]


def test_the_ood_rate_counts_the_live_result_of_a_study_not_the_shadow_one(migrated) -> None:
    """Migration 0016: ``v_ood_rate`` (the reports page's OOD-rate chart) leaves shadow results out; a shadow
    model that holds everything does not move the live gate's rate."""
    _, _, sessions = migrated
    for _ in range(3):
        _pair(sessions, live_state=JobState.RELEASED, shadow_state=JobState.HELD, live_ood=False, shadow_ood=True)
    with session_scope(sessions) as s:
        rows = REPORTS["ood-rate"].run(s)
    assert {r["model_id"] for r in rows} == {"default:1"}
    assert (sum(r["results"] for r in rows), sum(r["ood"] for r in rows)) == (3, 0)

