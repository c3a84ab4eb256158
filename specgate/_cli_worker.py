"""``specgate worker`` and ``specgate reconcile`` (registered in :mod:`specgate.cli` by :func:`register`).

Which queues a worker consumes (:func:`plan_queues`) and the start-up check of the models it serves
(:func:`check_served_models`) live here: a worker takes a model's jobs (``gpu.<model>``) only once it has
seen that the model's files and OOD bank on this machine are the ones the ledger registered; a worker that
only delivers (``--queues deliver``) serves no model and checks none, so a CPU machine without the models
may run it.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ._context import AppContext, StartupError, pass_app

if TYPE_CHECKING:
    from celery import Celery

    from worker.prometheus import WorkerMetrics
    from worker.reconcile import ReconcileReport

    from ._metrics import MetricsEndpoint
    from .settings import Settings

__all__ = ["celery_app", "check_served_models", "plan_queues", "register", "start_reconciler_thread"]

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

    enq = Enqueuer(celery, app.sessions(), app.settings.rules)  # the rules: for jobs made before 0009
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


def _names(value: str, option: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise click.BadParameter("names nothing", param_hint=option)
    return names


def plan_queues(models: str | None, queues: str | None, rule_models: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the models this worker segments with, the queues it consumes), from ``--models`` and ``--queues``.

    ``--models a,b``: the queues ``gpu.a,gpu.b`` and nothing else, unless ``--queues`` names more (then both
    are consumed). ``--queues``: ``deliver`` (results and retractions; no model), ``gpu.NAME`` (model NAME's
    jobs), ``gpu`` (the queues of every model ``--models`` names, or without it every model the rules name,
    and the old single ``gpu`` queue). Neither: ``gpu,deliver``, as before queues per model.

        >>> plan_queues(None, None, ["default", "liver", "default"])
        (['default', 'liver'], ['gpu.default', 'gpu.liver', 'gpu', 'deliver'])
        >>> plan_queues("liver", None, ["default"])
        (['liver'], ['gpu.liver'])
        >>> plan_queues("liver", "deliver", ["default"])
        (['liver'], ['gpu.liver', 'deliver'])
        >>> plan_queues(None, "deliver", ["default"])
        ([], ['deliver'])
        >>> plan_queues(None, "gpu.lung,pacs", ["default"])
        Traceback (most recent call last):
        ...
        click.exceptions.BadParameter: 'pacs' is not a queue: deliver, gpu, or gpu.MODEL
    """
    from worker.celery_app import DELIVER_QUEUE, GPU_QUEUE, segment_queue

    chosen = _names(models, "--models") if models is not None else None
    asked = _names(queues, "--queues") if queues is not None else (["gpu", "deliver"] if chosen is None else [])
    served: list[str] = []
    consumed: list[str] = []

    def serve(name: str, option: str) -> None:
        try:
            queue = segment_queue(name)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=option) from None
        if name not in served:
            served.append(name)
        if queue not in consumed:
            consumed.append(queue)

    for name in chosen or ():
        serve(name, "--models")
    for queue in asked:
        if queue == GPU_QUEUE:
            for name in chosen if chosen is not None else rule_models:
                serve(name, "--models" if chosen is not None else "rules")
            consumed.append(GPU_QUEUE)
        elif queue == DELIVER_QUEUE:
            consumed.append(DELIVER_QUEUE)
        elif queue.startswith(GPU_QUEUE + "."):
            serve(queue[len(GPU_QUEUE) + 1:], "--queues")
        else:
            raise click.BadParameter(f"{queue!r} is not a queue: {DELIVER_QUEUE}, {GPU_QUEUE}, or {GPU_QUEUE}.MODEL",
                                     param_hint="--queues")
    return served, list(dict.fromkeys(consumed))


def check_served_models(app: AppContext, names: Sequence[str]) -> None:
    """Refuse to start a worker for a model it could not run as registered.

    A model of the settings (``default``, ``[models.NAME]``) is checked where it is opened, as before (its
    bank against its weights and inference path, :meth:`worker.model_runtime.Segmenter.from_adapter`).
    Every other name must be registered in the ledger with a fitted OOD bank, and each file the
    registration hashed (``ledger.models.recorded_files``) and the bank must be on this machine with the
    SHA-256 the ledger recorded; nothing is loaded (no CUDA in this, the parent, process). Raises
    :class:`StartupError` naming each model and what differs.
    """
    from ledger.models import recorded_files
    from worker.config import DEFAULT_MODEL

    from ._context import _bank_problem

    configured = {DEFAULT_MODEL, *app.settings.models}
    others = [n for n in names if n not in configured]
    if not others:
        return
    registered = {row.name: row for row in app.registered_models()}
    problems = []
    for name in others:
        row = registered.get(name)
        if row is None:
            problems.append(f"model {name!r} is neither configured (models: {', '.join(sorted(configured))}) nor "
                            f"registered in the ledger (registered: {', '.join(sorted(registered)) or 'none'})")
            continue
        if row.bank_path is None or row.bank_sha256 is None:
            problems.append(f"model {name!r} is registered without an OOD bank: fit one with "
                            f"'specgate model fit-ood {name} --data DIR'")
            continue
        for rel, path in recorded_files(row).items():
            wrong = _bank_problem(path, row.files_sha256[rel])
            if wrong is not None:
                problems.append(f"model {name!r}: its file {wrong}; register the model again under a new name")
        bank = _bank_problem(Path(row.bank_path), row.bank_sha256)
        if bank is not None:
            problems.append(f"model {name!r}: its OOD bank {bank}; fit it again with "
                            f"'specgate model fit-ood {name} --data DIR'")
    if problems:
        raise StartupError("refusing to start: " + "; ".join(problems))


@click.command("worker")
@click.option("--gpu", type=int, default=None, help="Run on this GPU (CUDA index). Without it: the CPU.")
@click.option("--models", default=None, metavar="A,B",
              help="Segment with these models only: consume their queues gpu.A,gpu.B and no other (unless "
                   "--queues names more). Each is checked at start-up: a registered model's files and OOD bank "
                   "must be the ones the ledger recorded. Default: every model the rules name.")
@click.option("--queues", default=None, metavar="Q,R",
              help="Queues to consume: 'deliver' (sending results and retractions; needs no model, so a CPU "
                   "machine may take it), 'gpu.MODEL' (MODEL's studies), 'gpu' (the studies of every model "
                   "--models names, or the rules name, and the old single queue). Added to --models' queues. "
                   "Default without --models: gpu,deliver.")
@click.option("--no-reconcile", is_flag=True, help="Do not run the periodic reconciler in this process.")
@pass_app
def worker_command(app: AppContext, gpu: int | None, models: str | None, queues: str | None,
                   no_reconcile: bool) -> None:
    """Run a Celery worker: one process that segments studies (and sends results).

    Start one per GPU (``--gpu 0``, ``--gpu 1``...) on any number of machines sharing the ledger database
    and the broker; ``--models`` gives a machine the models it has (a queue per model). CUDA is initialised
    only in the process that runs the tasks. With SPECGATE_WORKER_METRICS_PORT (a different one per worker
    process on a machine), Prometheus metrics on SPECGATE_METRICS_HOST:port/metrics.
    """
    from celery.signals import worker_process_init, worker_ready, worker_shutting_down

    settings = app.settings
    served, consumed = plan_queues(models, queues, [r.model for r in settings.rules])
    if served:  # a worker that only delivers runs no model: it checks none (a CPU machine without them)
        app.check_routing(served)  # the rules it serves: their model configured, or registered with a bank
        check_served_models(app, served)  # and each model's files here the ones the ledger registered
    log.info("worker: models %s; queues %s", ", ".join(served) or "none", ",".join(consumed))
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
            "worker", f"--loglevel={settings.log_level}", f"--queues={','.join(consumed)}", "--concurrency=1",
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
