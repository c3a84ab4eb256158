"""Celery tasks: ``specgate.segment(job_id)`` on its model's queue (``gpu.<model>``), ``specgate.deliver(job_id)``
and ``specgate.retract(retraction_id)`` on ``deliver`` (:mod:`worker.celery_app`).

Tasks carry only a job id; everything else is read from the ledger, so a duplicated or re-delivered
message is harmless (the claim in :func:`worker.pipeline.claim` lets one attempt run a job at a time).

Per worker *process* state (engine, loaded models) lives in :class:`Runtime`, created lazily in the process
that runs tasks, after the fork: CUDA is initialised only there.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from .config import WorkerConfig
from .model_runtime import Segmenters

if TYPE_CHECKING:
    from .prometheus import WorkerMetrics

__all__ = ["Runtime", "device_label", "register_tasks", "set_torch_threads"]

log = logging.getLogger("specgate.worker")


def set_torch_threads(threads: int) -> tuple[int, int]:
    """Size torch's thread pools in this process: ``threads`` intra-op threads (``torch.set_num_threads``)
    and as many inter-op threads; 0 leaves torch's defaults (one intra-op thread per core). Returns the
    (intra-op, inter-op) threads torch now uses.

    Why a setting: torch's intra-op threads wait for each other by spinning, so a worker whose threads
    outnumber the cores it really gets (a small machine shared with the SCP, the database, a second worker)
    loses time to the spinning instead of gaining it: give it the cores it may use. The inter-op pool can
    be sized once per process, before any inter-op work (torch raises ``RuntimeError`` otherwise, also in a
    process forked from one that sized it): then it stays as it is, with a warning; intra-op always applies.
    """
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
        if torch.get_num_interop_threads() != threads:
            try:
                torch.set_num_interop_threads(threads)
            except RuntimeError as exc:
                log.warning("torch inter-op threads stay %d, not %d: %s", torch.get_num_interop_threads(),
                            threads, exc)
    return torch.get_num_threads(), torch.get_num_interop_threads()


def device_label(device: str) -> str:
    """What the ledger records as an attempt's device (``job_attempts.device``): ``cpu``, or a CUDA device
    with the name of its GPU and, when the worker was given one (``--gpu N``), the machine's index of it:
    ``cuda:0 NVIDIA H100 80GB HBM3 (GPU 3)``. Call it in the process that runs the tasks: it initialises
    CUDA, which the worker's parent must never do."""
    if not device.startswith("cuda"):
        return device
    import torch

    try:
        name = torch.cuda.get_device_name(device)
    except (RuntimeError, AssertionError) as exc:  # no CUDA here: the model's load will say so too
        return f"{device} (unavailable: {exc})"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{device} {name}" + (f" (GPU {visible})" if visible else "")


class Runtime:
    """What a worker process opens once: the ledger engine and, each on first use, the models; and the
    metrics it counts in (None: not counted), built by the parent before the fork."""

    def __init__(self, config: WorkerConfig, device: str = "cpu", metrics: WorkerMetrics | None = None) -> None:
        self.config, self.device, self.metrics = config, device, metrics
        self._engine: Engine | None = None
        self._sessions: sessionmaker[Session] | None = None
        self._pid = -1
        self._started_pid = -1
        self._device_label: tuple[int, str] | None = None
        self.segmenters = Segmenters(config.models, config.inference, device=device)

    @property
    def device_label(self) -> str:
        """:func:`device_label` of this worker's device, found once per process."""
        if self._device_label is None or self._device_label[0] != os.getpid():
            self._device_label = (os.getpid(), device_label(self.device))
        return self._device_label[1]

    def start_process(self) -> None:
        """Once in each process that runs tasks, before it opens a model: torch's threads
        (:func:`set_torch_threads`, ``config.torch_threads``), logged and exported. ``specgate worker`` calls
        it when Celery starts the pool's child (``worker_process_init``); every task calls it too, so a
        pool that sends no such signal still applies it before its first model."""
        if self._started_pid == os.getpid():
            return
        self._started_pid = os.getpid()
        intra, inter = set_torch_threads(self.config.torch_threads)
        log.info("worker process %d: torch threads %d intra-op, %d inter-op (worker_torch_threads=%d%s)",
                 os.getpid(), intra, inter, self.config.torch_threads,
                 ": torch's default" if self.config.torch_threads == 0 else "")
        if self.metrics is not None:
            self.metrics.torch_threads(intra_op=intra, inter_op=inter)

    @property
    def sessions(self) -> sessionmaker[Session]:
        if self._sessions is None or self._pid != os.getpid():  # never share a pool across a fork
            from ledger.db import open_engine, sessionmaker_for

            self._engine = open_engine(self.config.database_url)
            self._sessions = sessionmaker_for(self._engine)
            self._pid = os.getpid()
        return self._sessions


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def register_tasks(app: Celery, config: WorkerConfig, *, device: str = "cpu",
                   metrics: WorkerMetrics | None = None) -> None:
    from .celery_app import Enqueuer
    from .pipeline import AttemptFailed, claim, retry_or_fail, run_job
    from .shadow import compare_ready

    runtime = Runtime(config, device, metrics)
    app.specgate_runtime = runtime  # type: ignore[attr-defined]
    cfg = config.pipeline
    # shared=False: these tasks close over this app's configuration. Celery shares a task with every app
    # made after it by default, and the first app's callable then answers for the name in all of them:
    # a second app in the same process (a test, an embedded use) ran the first one's ledger and models.

    @app.task(name="specgate.segment", bind=True, acks_late=True, reject_on_worker_lost=True, shared=False)
    def segment(self: Any, job_id: int) -> str:
        from ledger.jobs import TransitionError

        runtime.start_process()
        task_id = self.request.id or f"local-{os.getpid()}"
        c = claim(runtime.sessions, job_id, task_id=task_id, worker_id=_worker_id(),
                  stale_after_s=cfg.stale_after_s, metrics=runtime.metrics, device=runtime.device_label)
        if c is None:
            return "skipped"
        try:
            outcome = run_job(runtime.sessions, c, cfg, segmenters=runtime.segmenters, metrics=runtime.metrics)
        except TransitionError as exc:  # superseded or taken over while we worked: not ours to finish
            log.warning("job %s: %s", job_id, exc)
            return "lost"
        except (Exception, SoftTimeLimitExceeded) as exc:
            log.exception("job %s attempt %s failed", job_id, c.attempt)
            if retry_or_fail(runtime.sessions, c, exc, actor="worker", metrics=runtime.metrics):
                # a store that is away is waited for at a steady pace; the study's own failures back off
                uncounted = isinstance(exc, AttemptFailed) and not exc.counted
                countdown = 15 if uncounted else min(300, 5 * 2 ** (c.attempt - 1))
                # to its model's queue, as every enqueue
                Enqueuer(app, runtime.sessions, cfg.rules).segment(job_id, countdown=countdown)
            return "error"
        log.info("job %s -> %s (oodm=%s tau=%s)", job_id, outcome.state, outcome.oodm, outcome.tau)
        if outcome.state == "released" and not outcome.shadow:  # a shadow result is never sent
            app.send_task("specgate.deliver", args=[job_id])
        if outcome.state in ("released", "held"):  # silent mode: the DSC of a shadow/live pair now complete,
            compare_ready(runtime.sessions, job_id, cfg.files, actor="worker")  # after the delivery is on its way
        return outcome.state

    @app.task(name="specgate.deliver", bind=True, acks_late=True, reject_on_worker_lost=True, shared=False)
    def deliver(self: Any, job_id: int) -> str:
        from .delivery import deliver_job

        return deliver_job(runtime.sessions, job_id, config.delivery, actor="worker", metrics=runtime.metrics)

    @app.task(name="specgate.retract", bind=True, acks_late=True, reject_on_worker_lost=True, shared=False)
    def retract(self: Any, retraction_id: int) -> str:
        from .retraction import send_retraction

        outcomes = send_retraction(runtime.sessions, retraction_id, config.delivery, actor="worker",
                                   metrics=runtime.metrics)
        return ", ".join(f"{o.destination}: {o.state}" for o in outcomes) or "no destination received it"
