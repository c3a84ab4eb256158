"""``specgate worker``, ``specgate reconcile`` and the review decisions ``jobs approve|reject|retry``."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from typing import Any

import click

__all__ = ["register"]

log = logging.getLogger("specgate")


def _celery(app: Any, device: str = "cpu", metrics: Any = None) -> Any:
    from worker.celery_app import make_celery

    return make_celery(app.settings.worker_config(), device=device, metrics=metrics)


def _reconcile_once(app: Any, celery: Any) -> Any:
    from worker.celery_app import Enqueuer
    from worker.reconcile import reconcile

    enq = Enqueuer(celery, app.sessions())
    cfg = app.settings.worker_config()
    return reconcile(app.sessions(), enqueue_segment=enq.segment, enqueue_delivery=enq.deliver,
                     enqueue_retraction=enq.retract,
                     queued_deadline_s=cfg.queued_deadline_s, stale_after_s=cfg.pipeline.stale_after_s,
                     sending_stale_s=cfg.delivery.retry.sending_stale_s)


def start_reconciler_thread(app: Any, celery: Any, stop: threading.Event, metrics: Any = None) -> threading.Thread:
    """Run a reconcile pass every ``reconcile_interval_seconds`` until ``stop`` is set; the jobs a pass
    fails (out of attempts) are counted in ``metrics`` (a :class:`worker.metrics.WorkerMetrics`)."""
    interval = app.settings.worker_config().reconcile_interval_s

    def loop() -> None:
        while not stop.wait(interval):
            try:
                report = _reconcile_once(app, celery)
            except Exception:  # noqa: BLE001 - the next pass retries; a dead DB must not kill the worker
                log.warning("reconcile pass failed", exc_info=True)
                continue
            if metrics is not None:
                for _ in report.failed:
                    metrics.job_failed("attempts_exhausted")

    t = threading.Thread(target=loop, name="reconciler", daemon=True)
    t.start()
    return t


def _start_metrics(settings: Any) -> tuple[Any, Any, Any]:
    """The worker's multiprocess directory, its /metrics endpoint (serving) and its WorkerMetrics.
    Runs first: before prometheus_client is imported and before Celery forks its child."""
    from ._metrics import MetricsEndpoint, multiprocess_dir, remove_dead_worker_dirs, worker_metrics_dir

    remove_dead_worker_dirs(settings.data_dir)
    metrics_dir = multiprocess_dir(worker_metrics_dir(settings.data_dir))
    from worker.metrics import WorkerMetrics

    metrics = WorkerMetrics()
    endpoint = MetricsEndpoint(settings.metrics_host, settings.worker_metrics_port, metrics_dir)
    try:
        endpoint.start()
    except OSError as exc:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        raise click.ClickException(f"cannot serve metrics on {settings.metrics_host}:"
                                   f"{settings.worker_metrics_port}: {exc}") from exc
    return metrics_dir, endpoint, metrics


@click.command("worker")
@click.option("--gpu", type=int, default=None, help="Run on this GPU (CUDA index). Without it: the CPU.")
@click.option("--queues", default="gpu,deliver", show_default=True,
              help="Queues to consume: 'gpu' (segmentation), 'deliver' (sending results).")
@click.option("--no-reconcile", is_flag=True, help="Do not run the periodic reconciler in this process.")
@click.pass_obj
def worker_command(app: Any, gpu: int | None, queues: str, no_reconcile: bool) -> None:
    """Run a Celery worker: one process that segments studies (and sends results).

    Start one per GPU (``--gpu 0``, ``--gpu 1``...) on any number of machines sharing the ledger database
    and the broker. CUDA is initialised only in the process that runs the tasks. With
    SPECGATE_WORKER_METRICS_PORT (a different one per worker process on a machine), Prometheus metrics on
    SPECGATE_METRICS_HOST:port/metrics.
    """
    from celery.signals import worker_process_init, worker_ready, worker_shutting_down

    settings = app.settings
    metrics_dir, endpoint, metrics = _start_metrics(settings) if settings.worker_metrics_port else (None, None, None)
    if endpoint is not None:
        worker_process_init.connect(lambda **_: endpoint.close_inherited(), weak=False)
    device = "cpu"
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)  # before any CUDA call; children inherit it
        device = "cuda:0"
    celery = _celery(app, device, metrics)
    stop = threading.Event()
    if not no_reconcile:
        worker_ready.connect(lambda **_: start_reconciler_thread(app, celery, stop, metrics), weak=False)
        worker_shutting_down.connect(lambda **_: stop.set(), weak=False)
    name = f"specgate-{'gpu' + str(gpu) if gpu is not None else 'cpu'}-{os.getpid()}@%h"
    try:
        celery.worker_main([
            "worker", f"--loglevel={settings.log_level}", f"--queues={queues}", "--concurrency=1",
            "--pool=prefork", f"--hostname={name}", "--without-gossip", "--without-mingle",
        ])
    finally:
        if endpoint is not None:
            endpoint.stop()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


@click.command("reconcile")
@click.option("--loop", is_flag=True, help="Keep running, one pass every reconcile_interval_seconds.")
@click.pass_obj
def reconcile_command(app: Any, loop: bool) -> None:
    """Enqueue again the jobs the broker lost (queued too long, or running with a dead worker)."""
    celery = _celery(app)
    report = _reconcile_once(app, celery)
    click.echo(report.describe())
    if loop:
        interval = app.settings.worker_config().reconcile_interval_s
        stop = threading.Event()
        try:
            while not stop.wait(interval):
                click.echo(_reconcile_once(app, celery).describe())
        except KeyboardInterrupt:
            pass


def _decide(app: Any, job_id: int, user: str, decision: str, reason: str | None) -> None:
    from ledger.db import session_scope
    from ledger.reviews import ReviewError, decide

    try:
        with session_scope(app.sessions()) as s:
            decide(s, job_id, user=user, decision=decision, reason=reason)
    except ReviewError as exc:
        raise click.ClickException(str(exc)) from exc


@click.command("approve")
@click.argument("job_id", type=int)
@click.option("--user", required=True, help="Who approves (recorded in the audit trail).")
@click.option("--reason", default=None, help="Optional note.")
@click.pass_obj
def approve_command(app: Any, job_id: int, user: str, reason: str | None) -> None:
    """Approve a held result: it is then sent to every destination."""
    from worker.celery_app import Enqueuer

    _decide(app, job_id, user, "approve", reason)
    Enqueuer(_celery(app), app.sessions()).deliver(job_id)
    click.echo(f"job {job_id} approved by {user}; delivery enqueued")


@click.command("reject")
@click.argument("job_id", type=int)
@click.option("--user", required=True, help="Who rejects (recorded in the audit trail).")
@click.option("--reason", required=True, help="Why (required).")
@click.pass_obj
def reject_command(app: Any, job_id: int, user: str, reason: str) -> None:
    """Reject a held result: it is never sent."""
    _decide(app, job_id, user, "reject", reason)
    click.echo(f"job {job_id} rejected by {user}")


@click.command("retry")
@click.argument("job_id", type=int)
@click.option("--user", required=True, help="Who asks for the retry (recorded in the audit trail).")
@click.pass_obj
def retry_command(app: Any, job_id: int, user: str) -> None:
    """Put a failed job back in the queue, with a fresh count of attempts."""
    from ledger import jobs
    from ledger.db import session_scope
    from ledger.schema import JobState
    from worker.celery_app import Enqueuer

    try:
        with session_scope(app.sessions()) as s:
            jobs.transition(s, job_id, JobState.QUEUED, actor=f"user:{user}", expect=JobState.FAILED,
                            attempts=0, details={"why": "operator retry"})
    except (jobs.TransitionError, LookupError) as exc:
        raise click.ClickException(str(exc)) from exc
    Enqueuer(_celery(app), app.sessions()).segment(job_id)
    click.echo(f"job {job_id} queued again")


@click.command("retract")
@click.argument("job_id", type=int)
@click.option("--user", required=True, help="Who retracts (recorded in the audit trail and in the KOS).")
@click.option("--reason", required=True, type=click.Choice(["quality", "patient-safety"]),
              help="IHE IOCM rejection note: 'Rejected for Quality Reasons' or '... for Patient Safety Reasons'.")
@click.option("--note", default=None, help="Optional free text, kept in the ledger.")
@click.pass_obj
def retract_command(app: Any, job_id: int, user: str, reason: str, note: str | None) -> None:
    """Take a sent result back: a Key Object Selection document (IHE IOCM) that rejects its SEG and SR is
    sent to every destination that received them."""
    from worker.celery_app import Enqueuer
    from worker.retraction import RetractionError, retract_job

    try:
        retraction_id = retract_job(app.sessions(), job_id, user=user, reason=reason, note=note)
    except RetractionError as exc:
        raise click.ClickException(str(exc)) from exc
    Enqueuer(_celery(app), app.sessions()).retract(retraction_id)
    click.echo(f"job {job_id} retracted by {user} ({reason}); the rejection note is on its way to the PACS")


def register(main: click.Group, jobs_group: click.Group) -> None:
    main.add_command(worker_command)
    main.add_command(reconcile_command)
    for cmd in (approve_command, reject_command, retry_command, retract_command):
        jobs_group.add_command(cmd)
