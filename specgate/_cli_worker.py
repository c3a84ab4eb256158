"""``specgate worker`` and ``specgate reconcile`` (registered in :mod:`specgate.cli` by :func:`register`)."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ._context import AppContext, pass_app

if TYPE_CHECKING:
    from celery import Celery

    from worker.prometheus import WorkerMetrics
    from worker.reconcile import ReconcileReport

    from ._metrics import MetricsEndpoint
    from .settings import Settings

__all__ = ["celery_app", "register", "start_reconciler_thread"]

log = logging.getLogger("specgate")


def celery_app(app: AppContext, device: str = "cpu", metrics: WorkerMetrics | None = None, *,
               serving: bool = False) -> Celery:
    """The Celery app. ``serving``: it runs tasks (``specgate worker``), so its configuration includes the
    ledger's live registered models; a command that only enqueues does not read them."""
    from worker.celery_app import make_celery

    config = app.worker_config() if serving else app.settings.worker_config()
    return make_celery(config, device=device, metrics=metrics)


def _reconcile_once(app: AppContext, celery: Celery) -> ReconcileReport:
    from worker.celery_app import Enqueuer
    from worker.reconcile import reconcile

    enq = Enqueuer(celery, app.sessions())
    cfg = app.settings.worker_config()
    return reconcile(app.sessions(), enqueue_segment=enq.segment, enqueue_delivery=enq.deliver,
                     enqueue_retraction=enq.retract,
                     queued_deadline_s=cfg.queued_deadline_s, stale_after_s=cfg.pipeline.stale_after_s,
                     sending_stale_s=cfg.delivery.retry.sending_stale_s)


def start_reconciler_thread(app: AppContext, celery: Celery, stop: threading.Event,
                            metrics: WorkerMetrics | None = None) -> threading.Thread:
    """Run a reconcile pass every ``reconcile_interval_seconds`` until ``stop`` is set; the jobs a pass
    fails (out of attempts) are counted in ``metrics`` (a :class:`worker.prometheus.WorkerMetrics`)."""
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


def _start_metrics(settings: Settings) -> tuple[Path, MetricsEndpoint, WorkerMetrics]:
    """The worker's multiprocess directory, its /metrics endpoint (serving) and its WorkerMetrics.
    Runs first: before prometheus_client is imported and before Celery forks its child."""
    from ._metrics import MetricsEndpoint, multiprocess_dir, remove_dead_worker_dirs, worker_metrics_dir

    remove_dead_worker_dirs(settings.data_dir)
    metrics_dir = multiprocess_dir(worker_metrics_dir(settings.data_dir))
    from worker.prometheus import WorkerMetrics

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
@pass_app
def worker_command(app: AppContext, gpu: int | None, queues: str, no_reconcile: bool) -> None:
    """Run a Celery worker: one process that segments studies (and sends results).

    Start one per GPU (``--gpu 0``, ``--gpu 1``...) on any number of machines sharing the ledger database
    and the broker. CUDA is initialised only in the process that runs the tasks. With
    SPECGATE_WORKER_METRICS_PORT (a different one per worker process on a machine), Prometheus metrics on
    SPECGATE_METRICS_HOST:port/metrics.
    """
    from celery.signals import worker_process_init, worker_ready, worker_shutting_down

    app.check_routing()  # every rule's model configured, or registered with a fitted bank
    settings = app.settings
    metrics_dir, endpoint, metrics = _start_metrics(settings) if settings.worker_metrics_port else (None, None, None)
    if endpoint is not None:
        worker_process_init.connect(lambda **_: endpoint.close_inherited(), weak=False)
    device = "cpu"
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)  # before any CUDA call; children inherit it
        device = "cuda:0"
    celery = celery_app(app, device, metrics, serving=True)
    # torch's threads, in the pool's child (the process that runs tasks) as it starts, before any model
    runtime = celery.specgate_runtime  # type: ignore[attr-defined]
    worker_process_init.connect(lambda **_: runtime.start_process(), weak=False)
    # The checks above read the ledger: close that engine so that no pooled connection is inherited by the
    # pool's forked children (a child closing its copy would end the parent's); the reconciler opens anew.
    app.close()
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
@pass_app
def reconcile_command(app: AppContext, loop: bool) -> None:
    """Enqueue again the jobs the broker lost (queued too long, or running with a dead worker)."""
    celery = celery_app(app)
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


def register(main: click.Group) -> None:
    main.add_command(worker_command)
    main.add_command(reconcile_command)
