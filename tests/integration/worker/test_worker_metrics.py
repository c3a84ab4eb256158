"""Every way a job ends ``failed`` in a worker is counted once in ``specgate_jobs_failed_total`` by its
reason code, and leaves one ``job.failed`` audit row carrying the reason, the attempts made and the
attempts allowed (on both ledger backends): a series the pipeline refuses, the last attempt's error, a
claim that finds the attempts used up, and the reconciler (in the worker's parent) finding a dead
worker's job out of attempts."""

from __future__ import annotations

import threading
from pathlib import Path

from prometheus_client import CollectorRegistry
from sqlalchemy import select, update

from ledger import jobs
from ledger.db import session_scope
from ledger.schema import AuditEvent, Job, JobState, Study, utcnow
from specgate.cli import AppContext
from specgate.settings import Settings
from tests.peers import wait_for
from worker.config import PipelineConfig
from worker.pipeline import claim, retry_or_fail, run_job
from worker.prometheus import WorkerMetrics


def _job(sessions, uid: str, max_attempts: int = 3, rule_name: str | None = None) -> int:
    with session_scope(sessions) as s:
        study = Study(study_instance_uid=uid, calling_ae="PACS")
        s.add(study)
        s.flush()
        return jobs.create_job(s, study, actor="test", max_attempts=max_attempts, rule_name=rule_name).id


def _failed_rows(sessions, job_id: int) -> list[dict]:
    with session_scope(sessions) as s:
        return [e.details for e in s.execute(select(AuditEvent).where(
            AuditEvent.action == "job.failed", AuditEvent.object_id == str(job_id))).scalars()]


def _failed(registry: CollectorRegistry, reason: str) -> float | None:
    return registry.get_sample_value("specgate_jobs_failed_total", {"reason": reason})


def test_each_failure_in_the_pipeline_is_counted_once_and_audited(migrated, tmp_path: Path) -> None:
    _, _, sessions = migrated
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)

    # the last attempt's unexpected error
    errs = _job(sessions, "1.2.3.1", max_attempts=1)
    c = claim(sessions, errs, task_id="t1", worker_id="w", stale_after_s=60, metrics=metrics)
    assert c is not None
    assert retry_or_fail(sessions, c, RuntimeError("boom"), actor="worker", metrics=metrics) is False
    assert _failed(registry, "error") == 1
    assert [(d["reason_code"], d["attempts"], d["max_attempts"]) for d in _failed_rows(sessions, errs)] \
        == [("error", 1, 1)]

    # attempts used up when a claim comes (the worker died during each of them)
    gone = _job(sessions, "1.2.3.2", max_attempts=1)
    assert claim(sessions, gone, task_id="t2", worker_id="w", stale_after_s=60, metrics=metrics) is not None
    with session_scope(sessions) as s:  # its worker died: the reconciler put it back in the queue
        jobs.transition(s, gone, JobState.QUEUED, actor="reconciler", reason_code="worker_lost")
    assert claim(sessions, gone, task_id="t3", worker_id="w", stale_after_s=60, metrics=metrics) is None
    assert _failed(registry, "attempts_exhausted") == 1
    assert [(d["reason_code"], d["attempts"], d["max_attempts"]) for d in _failed_rows(sessions, gone)] \
        == [("attempts_exhausted", 1, 1)]

    # a job the pipeline refuses at once (its rule is gone): no model is loaded, no retry
    orphan = _job(sessions, "1.2.3.3", rule_name="gone-rule")
    c = claim(sessions, orphan, task_id="t4", worker_id="w", stale_after_s=60, metrics=metrics)
    cfg = PipelineConfig(results_dir=tmp_path / "results", installation="TEST", heartbeat_s=0.2)
    outcome = run_job(sessions, c, cfg, segmenters=lambda name: None, metrics=metrics)  # type: ignore[arg-type,return-value]
    assert (outcome.state, outcome.reason_code) == ("failed", "unknown_rule")
    assert _failed(registry, "unknown_rule") == 1
    assert [(d["reason_code"], d["attempts"]) for d in _failed_rows(sessions, orphan)] == [("unknown_rule", 1)]

    # nothing was counted twice, and no failure went uncounted
    failed_jobs = sum(v.value for m in registry.collect() if m.name == "specgate_jobs_failed"
                      for v in m.samples if v.name == "specgate_jobs_failed_total")
    with session_scope(sessions) as s:
        assert failed_jobs == len(s.execute(select(Job.id).where(Job.state == JobState.FAILED)).all()) == 3


def test_the_reconciler_thread_counts_the_jobs_it_fails(migrated, tmp_path: Path) -> None:
    """A running job whose worker died on its last attempt: the worker parent's reconciler fails it
    (``attempts_exhausted``) and counts it in the worker's metrics."""
    from specgate._cli_worker import start_reconciler_thread
    from worker.celery_app import make_celery

    settings, _, sessions = migrated
    settings = Settings.load(data_dir=settings.data_dir, database_url=settings.db_url,
                             reconcile_interval_seconds=0.1, worker_stale_seconds=5, worker_heartbeat_seconds=1)
    job_id = _job(sessions, "1.2.3.4", max_attempts=1)
    assert claim(sessions, job_id, task_id="t1", worker_id="dead", stale_after_s=5) is not None
    with session_scope(sessions) as s:
        s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow().replace(year=2000)))
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    app = AppContext(settings)
    stop = threading.Event()
    thread = start_reconciler_thread(app, make_celery(settings.worker_config()), stop, metrics)
    try:
        wait_for(lambda: _failed(registry, "attempts_exhausted"), timeout=30, what="the reconciler's failed job")
    finally:
        stop.set()
        thread.join(timeout=10)
        app.close()
    assert _failed(registry, "attempts_exhausted") == 1
    assert [(d["reason_code"], d["attempts"], d["max_attempts"]) for d in _failed_rows(sessions, job_id)] \
        == [("attempts_exhausted", 1, 1)]
