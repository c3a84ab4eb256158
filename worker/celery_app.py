"""The Celery application, built from the worker's configuration (no module-level app, no work at import).

Queues: ``gpu.<model>`` carries one message per study to segment with that model (one worker process per
GPU, prefetch 1): a job's model is in the ledger (``jobs.model_name``, its rule's ``model`` when it was
made), and :func:`segment_queue_of` is the one place that turns a job into its queue, for the DICOM node's
enqueue hook, the reconciler, an operator's retry and a task's own retry alike. A worker consumes the
queues of the models it serves (``specgate worker --models a,b``: ``gpu.a,gpu.b``), so a model's jobs wait
for a machine that has that model, and one model's backlog never queues behind another's. ``deliver``
carries sending results and retractions to destinations, so a slow PACS never holds a GPU; it needs no
model and may be consumed on a CPU machine (``--queues deliver``). The bare ``gpu`` queue is the old
single queue: a job made before revision 0009 (no ``model_name``) whose rule is gone is sent there, as is
every message an older specgate sent; a worker started without ``--models`` drains it.

Reliability settings (ARCHITECTURE.md, "Celery"):
- ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only when its task ends; a
  worker process killed mid-task puts the message back.
- ``worker_prefetch_multiplier = 1``: a worker holds one study at a time.
- Redis ``visibility_timeout`` longer than the longest task's hard time limit, with a margin
  (:class:`worker.config.TaskLimits`, checked at start-up by the settings), so a message is not handed to
  a second worker while the first still works on it; and should it be (a lost connection), the claim
  never starts a second run beside a live one (:func:`worker.pipeline.claim`).
- ``worker_cancel_long_running_tasks_on_connection_loss = False``: a broker outage does not kill the
  running task (Celery's alternative: terminate it, because its message can no longer be acknowledged on
  the lost channel, and let it run again). It carries on, under its heartbeat, and finishes the job; the
  message, should the broker hand it out again, finds the job running with a fresh heartbeat or finished,
  and is dropped by the claim. A 30-minute segmentation is not thrown away for a Redis restart.
- The ledger, not the broker, is the source of truth: attempts are counted there, and the reconciler
  (:mod:`worker.reconcile`) enqueues again what the broker lost.

The default broker needs no server: kombu's filesystem transport in ``broker_dir`` (embedded use and
the demo; it does not redeliver a message whose worker died; the reconciler does that from the ledger).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from .config import WorkerConfig

if TYPE_CHECKING:
    from dicom_node.config import SeriesRule

    from .prometheus import WorkerMetrics

__all__ = ["DELIVER_QUEUE", "GPU_QUEUE", "Enqueuer", "broker_url_for", "make_celery", "segment_queue",
           "segment_queue_of"]

GPU_QUEUE = "gpu"
DELIVER_QUEUE = "deliver"
SEGMENT_TASK = "specgate.segment"
DELIVER_TASK = "specgate.deliver"
RETRACT_TASK = "specgate.retract"
#: a model name that can be part of a queue name: what the ledger's registry allows (``ledger.models``), so
#: that ``--queues a,b`` splits as it reads, and the filesystem broker's file names stay plain
_MODEL_IN_QUEUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def segment_queue(model_name: str) -> str:
    """The queue of the jobs that model ``model_name`` segments.

    >>> segment_queue("default"), segment_queue("liver-ct.v2")
    ('gpu.default', 'gpu.liver-ct.v2')
    >>> segment_queue("liver,ct")
    Traceback (most recent call last):
    ...
    ValueError: model name 'liver,ct' cannot name a queue: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit
    """
    if not _MODEL_IN_QUEUE.fullmatch(model_name):
        raise ValueError(f"model name {model_name!r} cannot name a queue: 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return f"{GPU_QUEUE}.{model_name}"


def segment_queue_of(session: Session, job_id: int, rules: Sequence[SeriesRule] = ()) -> str:
    """The queue job ``job_id``'s segmentation goes to: its model's (``jobs.model_name``). A job made before
    revision 0009 has none: the model its rule names in ``rules`` (the running settings), else (its rule is
    gone, or no rules were given) the bare ``gpu`` queue, which a worker without ``--models`` drains (the job
    then fails ``unknown_rule`` there, as it would anywhere). A job that does not exist: ``gpu`` too (the
    task drops the message)."""
    from sqlalchemy import select

    from ledger.schema import Job

    row = session.execute(select(Job.model_name, Job.rule_name).where(Job.id == job_id)).one_or_none()
    if row is None:
        return GPU_QUEUE
    model, rule_name = row
    if model is None:
        model = next((r.model for r in rules if r.name == rule_name), None)
    return GPU_QUEUE if model is None else segment_queue(model)


def broker_url_for(config: WorkerConfig) -> str:
    return config.broker_url or "filesystem://"


def _filesystem_options(broker_dir: Path) -> dict[str, Any]:
    folder = (broker_dir / "queue").resolve()
    processed = (broker_dir / "processed").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    processed.mkdir(parents=True, exist_ok=True)
    return {"data_folder_in": str(folder), "data_folder_out": str(folder), "processed_folder": str(processed),
            "store_processed": False}


def make_celery(config: WorkerConfig, *, device: str = "cpu", metrics: WorkerMetrics | None = None) -> Celery:
    """The Celery app for this configuration, with specgate's tasks registered (see :mod:`worker.tasks`);
    its tasks count in ``metrics`` (a worker with a metrics port)."""
    broker = broker_url_for(config)
    app = Celery("specgate", broker=broker, set_as_current=False)
    limits = config.limits
    transport_options: dict[str, Any] = {"visibility_timeout": limits.visibility_timeout_s}
    if broker.startswith("filesystem://"):
        transport_options = _filesystem_options(config.broker_dir)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        task_default_queue=GPU_QUEUE,
        task_routes={SEGMENT_TASK: {"queue": GPU_QUEUE}, DELIVER_TASK: {"queue": DELIVER_QUEUE},
                     RETRACT_TASK: {"queue": DELIVER_QUEUE}},
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=10,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_annotations={
            SEGMENT_TASK: {"soft_time_limit": limits.segment_soft_s, "time_limit": limits.segment_hard_s},
            DELIVER_TASK: {"soft_time_limit": limits.deliver_soft_s, "time_limit": limits.deliver_hard_s},
            RETRACT_TASK: {"soft_time_limit": limits.deliver_soft_s, "time_limit": limits.deliver_hard_s},
        },
    )
    from .tasks import register_tasks

    register_tasks(app, config, device=device, metrics=metrics)
    return app


class Enqueuer:
    """Send wake-up calls to the workers, recording in the ledger when a queued job was last enqueued.

    This is the DICOM node's enqueue hook (``on_job_queued``) and what the CLI, the reconciler, a task's
    retry and the review app call. ``rules``: the settings' rules, for jobs made before revision 0009 (no
    ``model_name``; :func:`segment_queue_of`).
    """

    def __init__(self, app: Celery, sessions: sessionmaker[Session], rules: Sequence[SeriesRule] = ()) -> None:
        self._app, self._sessions, self._rules = app, sessions, tuple(rules)

    def segment(self, job_id: int, *, countdown: float | None = None) -> None:
        """Send job ``job_id`` to its model's queue (``countdown``: not before that many seconds)."""
        from ledger.db import session_scope

        from .reconcile import mark_enqueued

        with session_scope(self._sessions) as s:
            mark_enqueued(s, job_id)
            queue = segment_queue_of(s, job_id, self._rules)
        self._app.send_task(SEGMENT_TASK, args=[int(job_id)], queue=queue, countdown=countdown)

    def deliver(self, job_id: int) -> None:
        self._app.send_task(DELIVER_TASK, args=[int(job_id)])

    def retract(self, retraction_id: int) -> None:
        self._app.send_task(RETRACT_TASK, args=[int(retraction_id)])

    __call__ = segment
