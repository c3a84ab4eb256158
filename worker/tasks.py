"""Celery tasks: ``specgate.segment(job_id)`` on the gpu queue, ``specgate.deliver(job_id)`` on deliver.

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
from .segmenter import Segmenters

if TYPE_CHECKING:
    from .metrics import WorkerMetrics

__all__ = ["Runtime", "register_tasks"]

log = logging.getLogger("specgate.worker")


class Runtime:
    """What a worker process opens once: the ledger engine and, each on first use, the models; and the
    metrics it counts in (None: not counted), built by the parent before the fork."""

    def __init__(self, config: WorkerConfig, device: str = "cpu", metrics: WorkerMetrics | None = None) -> None:
        self.config, self.device, self.metrics = config, device, metrics
        self._engine: Engine | None = None
        self._sessions: sessionmaker[Session] | None = None
        self._pid = -1
        self.segmenters = Segmenters(config.models, config.inference, device=device)

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
    from .pipeline import claim, retry_or_fail, run_job

    runtime = Runtime(config, device, metrics)
    app.specgate_runtime = runtime  # type: ignore[attr-defined]
    cfg = config.pipeline

    @app.task(name="specgate.segment", bind=True, acks_late=True, reject_on_worker_lost=True)
    def segment(self: Any, job_id: int) -> str:
        from ledger.jobs import TransitionError

        task_id = self.request.id or f"local-{os.getpid()}"
        c = claim(runtime.sessions, job_id, task_id=task_id, worker_id=_worker_id(),
                  stale_after_s=cfg.stale_after_s, metrics=runtime.metrics)
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
                countdown = min(300, 5 * 2 ** (c.attempt - 1))
                app.send_task("specgate.segment", args=[job_id], countdown=countdown)
            return "error"
        log.info("job %s -> %s (oodm=%s tau=%s)", job_id, outcome.state, outcome.oodm, outcome.tau)
        if outcome.state == "released":
            app.send_task("specgate.deliver", args=[job_id])
        return outcome.state

    @app.task(name="specgate.deliver", bind=True, acks_late=True, reject_on_worker_lost=True)
    def deliver(self: Any, job_id: int) -> str:
        from .delivery import deliver_job

        return deliver_job(runtime.sessions, job_id, config.delivery, actor="worker", metrics=runtime.metrics)

    @app.task(name="specgate.retract", bind=True, acks_late=True, reject_on_worker_lost=True)
    def retract(self: Any, retraction_id: int) -> str:
        from .retraction import send_retraction

        outcomes = send_retraction(runtime.sessions, retraction_id, config.delivery, actor="worker",
                                   metrics=runtime.metrics)
        return ", ".join(f"{o.destination}: {o.state}" for o in outcomes) or "no destination received it"
