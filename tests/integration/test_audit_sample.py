"""The blind audit sample's draw (ledger.audit_sample), on SQLite and PostgreSQL.

- Many releases through the hook: the share drawn lies within the binomial distribution's central 99.9%,
  for random UIDs and for sequential ones (the hash spreads both); every draw is recomputed here from the
  UID with hashlib, and the drawn set is exactly the UIDs whose draw is below the share; the audit trail
  has one ``audit_sample.drawn`` event per release and its chain verifies.
- The real pipeline: a released job is drawn in the transaction that releases it; a held one never.
- Settings: ``audit_sample_share`` reaches the worker's pipeline; a share outside 0..1 stops start-up.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import binom
from sqlalchemy import func, select, update

from ledger import audit, audit_sample
from ledger.db import session_scope
from ledger.schema import AuditEvent, AuditSample, Job, JobState, Result, Study
from model.data.phantoms import phantom_study
from specgate.settings import Settings, SettingsError
from specgate.synthetic import write_series
from tests.integration.worker.test_pipeline import _claim_and_run, _ingest, _segmenter, _signature_of
from worker.config import PipelineConfig

SHARE = 0.05
N = 2000


def _released(sessions: Any, uids: list[str]) -> list[tuple[int, int, str]]:
    """A released job and result for each UID, as the worker leaves them: (job id, result id, UID)."""
    with session_scope(sessions) as s:
        rows = []
        for i, uid in enumerate(uids):
            study = Study(study_instance_uid=uid, calling_ae="CT_A")
            s.add(study)
            s.flush()
            job = Job(study_id=study.id, state=JobState.RELEASED, rule_name="r")
            s.add(job)
            s.flush()
            res = Result(job_id=job.id, seg_path=f"r/{i}", seg_sop_instance_uid=f"{uid}.9", seg_series_instance_uid=f"{uid}.8",
                         oodm=0.1, tau=0.5, is_ood=False, model_id="m:1", weights_sha256="0" * 64)
            s.add(res)
            s.flush()
            rows.append((job.id, res.id, uid))
    return rows


def _independent_draw(uid: str) -> float:
    return int(hashlib.sha256(uid.encode()).hexdigest()[:16], 16) / 2**64


def test_the_share_drawn_is_within_binomial_bounds_and_reproducible(migrated) -> None:
    _, _, sessions = migrated
    rng = random.Random(2026)
    populations = {"random": [f"2.25.{rng.getrandbits(120)}" for _ in range(N)],
                   "sequential": [f"1.2.826.0.1.3680043.10.7.{i}" for i in range(1, N + 1)]}
    lo, hi = binom.ppf(0.0005, N, SHARE), binom.ppf(0.9995, N, SHARE)
    for name, uids in populations.items():
        released = _released(sessions, uids)
        with session_scope(sessions) as s:
            for job_id, result_id, uid in released:
                audit_sample.consider(s, job_id=job_id, result_id=result_id, study_instance_uid=uid, share=SHARE,
                                      actor="worker")
        with session_scope(sessions) as s:
            rows = s.execute(select(AuditSample).where(AuditSample.job_id.in_([j for j, _, _ in released]))).scalars().all()
            drawn_uids = {s.get(Study, s.get(Job, r.job_id).study_id).study_instance_uid for r in rows}
            for r in rows:
                assert str(r.state) == "pending" and r.share == SHARE
        want = {uid for uid in uids if _independent_draw(uid) < SHARE}
        assert drawn_uids == want, name
        assert lo <= len(want) <= hi, f"{name}: {len(want)} of {N} drawn, outside [{lo}, {hi}]"
        print(f"{name} UIDs: {len(want)} of {N} releases drawn at share {SHARE} (99.9% bounds {lo:.0f}..{hi:.0f})")
    with session_scope(sessions) as s:
        events = s.execute(select(AuditEvent).where(AuditEvent.action == "audit_sample.drawn")).scalars().all()
        assert len(events) == 2 * N
        by_job = {int(e.object_id): e.details for e in events}
        job_uid = dict(s.execute(select(Job.id, Study.study_instance_uid).join(Study, Study.id == Job.study_id)).all())
        for job_id, d in list(by_job.items())[:200]:
            assert d["draw"] == _independent_draw(job_uid[job_id]) and d["drawn"] == (d["draw"] < SHARE)
            assert d["share"] == SHARE and d["method"] == audit_sample.METHOD
        assert audit.verify(s).ok
        # the same study again (a newer version, or the hook run twice): the same draw, no second row
        job_id, result_id = s.execute(select(AuditSample.job_id, AuditSample.result_id).limit(1)).one()
        uid = job_uid[job_id]
        again = audit_sample.consider(s, job_id=job_id, result_id=result_id, study_instance_uid=uid, share=SHARE,
                                      actor="worker")
        assert again is not None and again.job_id == job_id
        assert s.execute(select(func.count()).select_from(AuditSample)
                         .where(AuditSample.job_id == job_id)).scalar_one() == 1


def test_share_zero_draws_nothing_and_a_bad_share_is_refused(migrated) -> None:
    _, _, sessions = migrated
    [(job_id, result_id, uid)] = _released(sessions, ["2.25.77"])
    with session_scope(sessions) as s:
        assert audit_sample.consider(s, job_id=job_id, result_id=result_id, study_instance_uid=uid, share=0.0,
                                     actor="worker") is None
        with pytest.raises(ValueError, match="within 0..1, got 1.5"):
            audit_sample.consider(s, job_id=job_id, result_id=result_id, study_instance_uid=uid, share=1.5,
                                  actor="worker")
    with session_scope(sessions) as s:
        assert s.execute(select(func.count()).select_from(AuditEvent)
                         .where(AuditEvent.action.like("audit_sample.%"))).scalar_one() == 0


def test_the_pipeline_draws_a_released_job_and_never_a_held_one(migrated, tmp_path: Path, tiny_model) -> None:
    settings, _, sessions = migrated
    case = phantom_study("ct_liver", seed=31)
    probe = _segmenter(tiny_model, tmp_path, np.stack([np.ones(4) / 2, np.full(4, -0.5)]))
    own = _signature_of(probe, case)
    cfg = PipelineConfig(results_dir=settings.results_dir, installation="TEST", rules=tuple(settings.rules),
                         heartbeat_s=0.2, audit_sample_share=1.0)
    states = {}
    for route, bank in (("released", np.stack([own, own + 1e-3, own - 1e-3])),
                        ("held", np.stack([-own, -own + 1e-4, -own - 1e-4]))):
        series = write_series(case.image, case.spacing, "CT", tmp_path / route)
        seg = _segmenter(tiny_model, tmp_path, bank)
        job_id = _ingest(sessions, series)
        states[job_id] = _claim_and_run(sessions, job_id, cfg, {"default": seg}.__getitem__, f"task-{route}").state
    assert sorted(states.values()) == ["held", "released"]
    released = next(j for j, st in states.items() if st == "released")
    held = next(j for j, st in states.items() if st == "held")
    with session_scope(sessions) as s:
        [sample] = s.execute(select(AuditSample)).scalars().all()
        result_id = s.execute(select(Result.id).where(Result.job_id == released)).scalar_one()
        assert (sample.job_id, sample.result_id, str(sample.state), sample.share) == (released, result_id, "pending", 1.0)
        actions = [e.action for e in s.execute(select(AuditEvent).where(AuditEvent.object_type == "job",
                                                                         AuditEvent.object_id == str(released))
                                               .order_by(AuditEvent.id)).scalars()]
        assert actions[-2:] == ["job.released", "audit_sample.drawn"]
        assert not s.execute(select(AuditEvent).where(AuditEvent.action == "audit_sample.drawn",
                                                      AuditEvent.object_id == str(held))).first()
        assert str(s.get(Job, released).state) == "released"  # drawn, and released all the same


def test_the_setting_reaches_the_pipeline_and_nonsense_is_refused(tmp_path: Path) -> None:
    settings = Settings.load(data_dir=tmp_path, audit_sample_share=0.05)
    assert settings.worker_config().pipeline.audit_sample_share == 0.05
    assert Settings.load(data_dir=tmp_path).worker_config().pipeline.audit_sample_share == 0.0
    for bad in (-0.1, 1.5):
        with pytest.raises(SettingsError, match="SPECGATE_AUDIT_SAMPLE_SHARE"):
            Settings.load(data_dir=tmp_path, audit_sample_share=bad)


def test_verdicts_are_checked_and_a_superseded_sample_leaves_the_queue(migrated) -> None:
    _, _, sessions = migrated
    released = _released(sessions, ["2.25.101", "2.25.102"])
    with session_scope(sessions) as s:
        ids = [audit_sample.consider(s, job_id=j, result_id=r, study_instance_uid=u, share=1.0, actor="worker").id
               for j, r, u in released]
    with session_scope(sessions) as s:
        assert audit_sample.pending_count(s) == 2 and [p.sample_id for p in audit_sample.pending(s)] == ids
        for kwargs, message in (({"user": " ", "verdict": "agree"}, "needs the user"),
                                ({"user": "anna", "verdict": "maybe"}, "agree or reject, not 'maybe'"),
                                ({"user": "anna", "verdict": "reject", "reason": " "}, "needs a reason")):
            with pytest.raises(audit_sample.AuditSampleError, match=message):
                audit_sample.decide(s, ids[0], **kwargs)
        with pytest.raises(audit_sample.AuditSampleError, match="audit sample 999999 does not exist"):
            audit_sample.decide(s, 999999, user="anna", verdict="agree")
        assert str(audit_sample.decide(s, ids[0], user="anna", verdict="agree").state) == "agreed"
    with session_scope(sessions) as s:
        with pytest.raises(audit_sample.AuditSampleError, match=r"decided already \(agreed\) by anna"):
            audit_sample.decide(s, ids[0], user="bob", verdict="reject", reason="artefact")
        # a newer version of the second study arrived: its earlier result is superseded, the sample leaves
        s.execute(update(Result).where(Result.job_id == released[1][0]).values(superseded=True))
    with session_scope(sessions) as s:
        assert audit_sample.pending_count(s) == 0 and audit_sample.pending(s) == []
        verdicts = s.execute(select(AuditEvent.action, AuditEvent.actor).where(
            AuditEvent.action.in_(["audit_sample.agreed", "audit_sample.rejected"]))).all()
        assert [tuple(v) for v in verdicts] == [("audit_sample.agreed", "user:anna")]
