"""``specgate spool prune``: removes what it may, keeps what it must, on both stores (the data directory and
a real S3 server) and both ledgers (SQLite, PostgreSQL); the audit trail says what went."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from ledger import audit
from ledger.db import session_scope
from ledger.paths import from_ledger
from ledger.schema import AuditEvent, Instance, Job, JobState, Result, Series, Study
from specgate.retention import PRUNED_ACTION, plan, prune
from store import Store, open_store
from store.layout import instance_key, result_keys

S = JobState
OLD, RECENT = 40, 2  # days ago


@dataclass
class Made:
    study_id: int
    instance_keys: list[str] = field(default_factory=list)
    spool_files: list[Path] = field(default_factory=list)
    result_keys: list[str] = field(default_factory=list)


class World:
    """A ledger and a store with studies in every state that matters."""

    def __init__(self, sessions: sessionmaker[Session], store: Store, data_dir: Path) -> None:
        self.sessions, self.store, self.data = sessions, store, data_dir
        self.n = 0

    def study(self, states: list[JobState], days_ago: float, *, payloads: list[bytes] | None = None) -> Made:
        self.n += 1
        n = self.n
        now = datetime.now(UTC)
        payloads = payloads or [f"instance {n}.{i}".encode() for i in range(2)]
        with session_scope(self.sessions) as s:
            study = Study(study_instance_uid=f"1.2.826.0.1.{n}", calling_ae="MODALITY",
                          received_count=len(payloads), assembled_count=len(payloads))
            series = Series(study=study, series_instance_uid=f"1.2.826.0.2.{n}", modality="CT")
            s.add_all([study, series])
            s.flush()
            made = Made(study.id)
            for i, body in enumerate(payloads):
                rel = f"spool/{study.study_instance_uid}/{series.series_instance_uid}/1.2.826.0.3.{n}.{i}.dcm"
                path = self.data / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(body)
                sha = hashlib.sha256(body).hexdigest()
                s.add(Instance(series=series, sop_instance_uid=f"1.2.826.0.3.{n}.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                               spool_path=rel, store_key=instance_key(sha) if self.store.remote else rel,
                               size_bytes=len(body), sha256=sha, calling_ae="MODALITY"))
                if self.store.remote:
                    self.store.put(instance_key(sha), path)
                    made.instance_keys.append(instance_key(sha))
                else:
                    made.instance_keys.append(rel)
                made.spool_files.append(path)
            for v, state in enumerate(states, start=1):
                done = state in (S.SENT, S.REJECTED, S.SUPERSEDED, S.FAILED)
                job = Job(study_id=study.id, version=v, state=state, series_instance_uid=series.series_instance_uid,
                          finished_at=now - timedelta(days=days_ago) if done else None)
                s.add(job)
                s.flush()
                if state in (S.QUEUED, S.RECEIVING, S.RUNNING):
                    continue
                keys = result_keys(job.id, v)
                for role in ("seg", "sr", "prob", "evidence", "preview"):
                    local = self.store.scratch(keys[role])
                    local.write_bytes(f"{role} of job {job.id}".encode())
                    self.store.put(keys[role], local)
                    made.result_keys.append(keys[role])
                s.add(Result(job_id=job.id, seg_path=keys["seg"], seg_sop_instance_uid=f"1.2.826.0.4.{job.id}",
                             seg_series_instance_uid=f"1.2.826.0.5.{job.id}", sr_path=keys["sr"],
                             prob_path=keys["prob"], evidence_path=keys["evidence"], oodm=1.0, tau=2.0, is_ood=False,
                             model_id="test", weights_sha256="0" * 64))
        return made

    def exists(self, key: str) -> bool:
        return self.store.exists(key)


@pytest.fixture(params=["fs", "s3"])
def world(request: pytest.FixtureRequest, migrated: Any, tmp_path: Path) -> World:
    settings, _engine, sessions = migrated
    data = settings.data_dir
    data.mkdir(parents=True, exist_ok=True)
    if request.param == "fs":
        store = open_store(None, data)
    else:
        store = open_store(request.getfixturevalue("s3_store_config"), data)
    return World(sessions, store, data)


def _audit(sessions: sessionmaker[Session]) -> list[AuditEvent]:
    with sessions() as s:
        return list(s.execute(select(AuditEvent).where(AuditEvent.action == PRUNED_ACTION)
                              .order_by(AuditEvent.id)).scalars())


def test_prune_removes_what_it_may_and_keeps_what_it_must(world: World) -> None:
    w = world
    sent_old = w.study([S.SENT], OLD)
    rejected_old = w.study([S.SUPERSEDED, S.REJECTED], OLD)
    held_old = w.study([S.HELD], OLD)
    queued = w.study([S.QUEUED], OLD)
    failed_old = w.study([S.FAILED], OLD)
    approved_old = w.study([S.SUPERSEDED, S.APPROVED], OLD)
    sent_recent = w.study([S.SENT], RECENT)
    sent_then_held = w.study([S.SENT, S.HELD], OLD)  # sent, then sent again: the new version is held
    sent_then_queued = w.study([S.SENT, S.QUEUED], OLD)
    # the same image in a pruned study and a kept one: one object on s3, which the kept study still needs
    shared_body = b"the same image, sent twice"
    shared_old = w.study([S.SENT], OLD, payloads=[shared_body, b"only in the old study"])
    shared_kept = w.study([S.HELD], OLD, payloads=[shared_body])
    kept = [held_old, queued, failed_old, approved_old, sent_recent, sent_then_held, sent_then_queued, shared_kept]
    going = [sent_old, rejected_old, shared_old]

    # dry run: the plan names the studies, nothing changes
    with w.sessions() as s:
        plans = plan(s, w.store, older_than=timedelta(days=30))
    assert [p.study_id for p in plans] == [m.study_id for m in going]
    assert all(w.exists(k) for m in going + kept for k in m.instance_keys + m.result_keys)
    assert _audit(w.sessions) == []

    outcomes = prune(w.sessions, w.store, w.data, older_than=timedelta(days=30), actor="operator:test")
    assert [o.study_id for o in outcomes] == [m.study_id for m in going] and not any(o.failed for o in outcomes)

    shared_key = instance_key(hashlib.sha256(shared_body).hexdigest()) if w.store.remote else None
    for m in going:
        for key in m.instance_keys + m.result_keys:
            assert w.exists(key) == (key == shared_key), key
        assert not any(p.exists() for p in m.spool_files)  # fs: the file itself; s3: the SCP's local copy
        assert not (w.data / m.result_keys[0]).parent.exists()  # the job's folder, once empty, is gone
    for m in kept:
        assert all(w.exists(k) for k in m.instance_keys + m.result_keys), m
        assert all(p.exists() for p in m.spool_files)

    # the audit trail: one event per study, by the operator, naming what went (and the shared key kept)
    events = _audit(w.sessions)
    assert [(e.object_type, e.object_id, e.actor) for e in events] == [
        ("study", str(m.study_id), "operator:test") for m in going]
    for e, m in zip(events, going, strict=True):
        expected = {k for k in m.instance_keys + m.result_keys if k != shared_key}
        assert set(e.details["removed"]) == expected
        assert e.details["kept_shared"] == ([shared_key] if m is shared_old and shared_key else [])
        assert e.details["instances_removed"] == len([k for k in m.instance_keys if k != shared_key])
        assert e.details["results_removed"] == len(m.result_keys) and e.details["failed"] == []
    with w.sessions() as s:
        assert audit.verify(s).ok
        # ledger rows kept
        assert s.execute(select(func.count(Instance.id))).scalar_one() == sum(len(m.spool_files) for m in going + kept)
        assert s.execute(select(func.count(Study.id))).scalar_one() == len(going + kept)
        assert s.execute(select(func.count(Result.id))).scalar_one() > 0

    # a second run has nothing left to do
    with w.sessions() as s:
        assert plan(s, w.store, older_than=timedelta(days=30)) == []
    assert prune(w.sessions, w.store, w.data, older_than=timedelta(days=30), actor="operator:test") == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_command_dry_run_then_prune(migrated: Any, cli: Any) -> None:
    settings, _engine, sessions = migrated
    w = World(sessions, open_store(None, settings.data_dir), settings.data_dir)
    old, recent = w.study([S.SENT], OLD), w.study([S.SENT], RECENT)
    res = cli("spool", "prune", "--older-than", "30", "--dry-run")
    assert f"would remove: study {old.study_id} " in res.output and f"study {recent.study_id} " not in res.output
    assert all(from_ledger(k, settings.data_dir).exists() for k in old.instance_keys + old.result_keys)
    assert _audit(sessions) == []
    res = cli("spool", "prune", "--older-than", "30")
    assert "pruned 1 study(ies), 7 file(s) removed" in res.output
    assert not any(from_ledger(k, settings.data_dir).exists() for k in old.instance_keys + old.result_keys)
    assert all(from_ledger(k, settings.data_dir).exists() for k in recent.instance_keys + recent.result_keys)
    [event] = _audit(sessions)
    assert event.actor.startswith("operator:") and event.object_id == str(old.study_id)
    with sessions() as s:
        assert s.execute(select(func.count(Job.id))).scalar_one() == 2
