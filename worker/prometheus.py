"""A worker's Prometheus metrics: inference time, the gate's decisions, deliveries, failed jobs.

Where they are counted, and why this way: ``specgate worker`` is a Celery parent whose prefork child runs
the tasks (CUDA lives only there, and a child killed by a study is replaced). The counters are
incremented in the child, and the reconciler's in the parent, so they use prometheus_client's
*multiprocess mode*: the parent sets ``PROMETHEUS_MULTIPROC_DIR`` (``<data_dir>/metrics/worker-<host>-<pid>``,
made empty) before prometheus_client is imported and before Celery forks; each process writes its own
memory-mapped file there (prometheus_client notices the fork by the pid), and the parent's endpoint sums
them at scrape time. A child that dies keeps what it counted (its file stays). Each worker process has
its own directory and port (``worker_metrics_port``): Prometheus sums the workers.

Label values come only from fixed sets in our code or configuration: reason codes (``dicom_series``'s,
the grid's, the pipeline's), the gate's decision and reason, the configured model and destination names,
the modality folded by :func:`dicom_node.prometheus.modality_label`. No UID, no patient data.

    >>> from prometheus_client import CollectorRegistry
    >>> registry = CollectorRegistry()
    >>> m = WorkerMetrics(registry)
    >>> m.job_failed("missing_slices")
    >>> registry.get_sample_value("specgate_jobs_failed_total", {"reason": "missing_slices"})
    1.0
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dicom_node.prometheus import modality_label

__all__ = ["INFERENCE_BUCKETS", "WorkerMetrics"]

#: Seconds: a small CT on a GPU takes a few, a 512x512x600 CT on a CPU can take twenty minutes.
INFERENCE_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0)


class WorkerMetrics:
    """The counters and the histogram a worker increments. ``registry``: where to register them (a
    process exposing its own metrics); None in multiprocess mode, where the files are what is exported.
    Build one per worker process, in the parent, before Celery forks."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._inference = Histogram(
            "specgate_inference_seconds", "Wall time of one study's segmentation and gate (model grid, "
            "sliding window, spectral signature, OOD gate)", ["model", "modality"], buckets=INFERENCE_BUCKETS,
            registry=registry)
        self._decisions = Counter(
            "specgate_ood_decisions", "The OOD gate's decisions on finished results: in_distribution (released) "
            "or ood (held), with the gate's reason", ["decision", "reason", "model", "modality"], registry=registry)
        self._attempts = Counter(
            "specgate_delivery_attempts", "C-STORE attempts to a destination (object: result = SEG and SR, "
            "retraction = KOS)", ["destination", "object"], registry=registry)
        self._attempt_failures = Counter(
            "specgate_delivery_attempt_failures", "C-STORE attempts that did not end in success (retried or "
            "not)", ["destination", "object"], registry=registry)
        self._deliveries_failed = Counter(
            "specgate_deliveries_failed", "Deliveries given up (the destination refused for good, or every "
            "attempt failed)", ["destination", "object"], registry=registry)
        # set once by each process that runs tasks (multiprocess: the largest of the live and dead children's;
        # they all apply the same setting)
        self._torch_threads = Gauge(
            "specgate_worker_torch_threads", "torch threads the worker's task process runs with, per pool "
            "(intra_op, inter_op), after worker_torch_threads is applied (0 there: torch's default, one per core)",
            ["pool"], registry=registry, multiprocess_mode="max")
        self._jobs_failed = Counter(
            "specgate_jobs_failed", "Jobs that ended failed, by reason code (every failed job is final until "
            "an operator retries it)", ["reason"], registry=registry)

    def inference(self, seconds: float, *, model: str, modality: str | None) -> None:
        self._inference.labels(model=model, modality=modality_label(modality)).observe(seconds)

    def ood_decision(self, *, is_ood: bool, reason: str | None, model: str, modality: str | None) -> None:
        """``reason``: the gate's reason (``oodm_above_tau``, ``modality_not_in_bank``), None when released."""
        self._decisions.labels(decision="ood" if is_ood else "in_distribution", reason=reason or "none",
                               model=model, modality=modality_label(modality)).inc()

    def delivery_observer(self, obj: str) -> Callable[[str, bool, bool], None]:
        """What :func:`dicom_node.scu.deliver` calls after each attempt: (destination, sent, gave up)."""

        def observe(destination: str, sent: bool, gave_up: bool) -> None:
            self._attempts.labels(destination=destination, object=obj).inc()
            if not sent:
                self._attempt_failures.labels(destination=destination, object=obj).inc()
            if gave_up:
                self._deliveries_failed.labels(destination=destination, object=obj).inc()

        return observe

    def torch_threads(self, *, intra_op: int, inter_op: int) -> None:
        self._torch_threads.labels(pool="intra_op").set(intra_op)
        self._torch_threads.labels(pool="inter_op").set(inter_op)

    def job_failed(self, reason: str) -> None:
        self._jobs_failed.labels(reason=reason).inc()
