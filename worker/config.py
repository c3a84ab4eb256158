"""What the worker is configured with: small frozen records, built by the composition root
(``specgate.settings.Settings.worker_config``) and passed down. Nothing here reads the environment or a file.

:class:`WorkerConfig` is the whole of it; each part goes to the code that needs it and no further:
:class:`PipelineConfig` to :func:`worker.pipeline.run_job`, :class:`ModelSpec` and
:class:`InferenceOverrides` to :class:`worker.model_runtime.Segmenters`, :class:`DeliveryConfig` to
:func:`worker.delivery.deliver_job`.

    >>> cfg = PipelineConfig(results_dir=Path("/results"), installation="SITE",
    ...                      rules=(SeriesRule(name="abdomen-ct"),))
    >>> cfg.rule("abdomen-ct").model, cfg.rule("gone") is None
    ('default', True)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dicom_node.config import Destination, SeriesRule
from dicom_node.scu import RetryPolicy
from ledger.drift import DriftConfig
from store import Store, StoreConfig, open_store

from .segments import PHANTOM_SEGMENT, SegmentDefinition

__all__ = ["DEFAULT_MODEL", "VISIBILITY_MARGIN_S", "DeliveryConfig", "InferenceOverrides", "ModelSpec",
           "PipelineConfig", "SpacingPairs", "TaskLimits", "WorkerConfig"]

DEFAULT_MODEL = "default"

#: How much longer than the longest hard time limit the broker's visibility timeout must be (seconds).
#: Redis measures a message's time out from when a worker's client took it, by that machine's clock, and
#: another worker gives it out again by its own clock; the hard limit is counted from the task's start,
#: and killing the task, acknowledging the message and the round trips take a moment more. Five minutes
#: covers clocks that NTP keeps within seconds and a pool that is slow to kill its child.
VISIBILITY_MARGIN_S = 300.0

# (modality, (z, y, x) mm) pairs, as :func:`model.study_inference.parse_spacing` returns them; () means native.
SpacingPairs = tuple[tuple[str, tuple[float, float, float]], ...]


@dataclass(frozen=True)
class ModelSpec:
    """One named model: its files and the OOD bank fitted for them.

    ``format`` names the model's format (``"segnet"``, ``"torchscript"``, ``"monai-bundle"``,
    ``"nnunet-v2"``: :mod:`model.adapters`), ``path`` its file or folder and ``layer`` the module whose
    output the signature reads (None: the format's default). ``weights`` is the SegNet weights file (the
    older name of ``path`` for that format); SegNet's ``path``/``weights`` and ``bank`` default to the
    shipped model's files. Any other format needs its ``path`` and its ``bank``. ``options``: what its
    adapter is opened with besides (a TorchScript model's ``spec`` file), as ``(name, value)`` pairs; a model
    registered in the ledger (``specgate model register``) records them.

    >>> ModelSpec("ts", format="torchscript", path=Path("m.ts"))
    Traceback (most recent call last):
    ...
    ValueError: model 'ts' (format 'torchscript') needs its OOD bank (bank=...): a model without one cannot be routed to
    """

    name: str
    weights: Path | None = None
    bank: Path | None = None
    format: str = "segnet"
    path: Path | None = None
    layer: str | None = None
    options: tuple[tuple[str, str], ...] = ()
    #: SNOMED CT codes per label name, ``(name, (code value, scheme, meaning))``, from the registration
    #: (``specgate model register --codes``); over :data:`worker.anatomy.DEFAULT_ANATOMY` in the SEG
    codes: tuple[tuple[str, tuple[str, str, str]], ...] = ()
    #: What the SEG says the model's one segment is (label, description, codes, colour), when the model
    #: says it: a settings model's ``[models.NAME]`` table (the shipped model's:
    #: :data:`worker.segments.PHANTOM_SEGMENT`). None: each label is described by its name and ``codes``
    #: (a registered model). See :func:`worker.segments.segments_for`.
    segment: SegmentDefinition | None = None

    def __post_init__(self) -> None:
        if self.format == "segnet":
            if self.weights is not None and self.path is not None and self.weights != self.path:
                raise ValueError(f"model {self.name!r}: weights {self.weights} and path {self.path} disagree")
            return
        if self.weights is not None:
            raise ValueError(f"model {self.name!r} (format {self.format!r}): 'weights' is SegNet's; give 'path'")
        if self.path is None:
            raise ValueError(f"model {self.name!r} (format {self.format!r}) needs the path of its model")
        if self.bank is None:
            raise ValueError(f"model {self.name!r} (format {self.format!r}) needs its OOD bank (bank=...): "
                             "a model without one cannot be routed to")


@dataclass(frozen=True)
class InferenceOverrides:
    """The operator's overrides of the weights' own inference settings (None: the weights' value)."""

    block: int | None = None
    overlap: int | None = None
    spacing: SpacingPairs | None = None


@dataclass(frozen=True)
class PipelineConfig:
    """What one study's run needs: where results go, how UIDs are derived, the rules, the heartbeat."""

    results_dir: Path
    installation: str
    data_dir: Path | None = None  # the ledger's paths are relative to it (ledger.paths)
    store: StoreConfig | None = None  # None: fs on data_dir
    rules: tuple[SeriesRule, ...] = ()
    heartbeat_s: float = 10.0
    stale_after_s: float = 120.0
    actor: str = "worker"
    #: share of released results also queued for a blind review (ledger.audit_sample); 0: off
    audit_sample_share: float = 0.0
    drift: DriftConfig | None = None  # the drift watch (ledger.drift); None: off

    def rule(self, name: str | None) -> SeriesRule | None:
        """The rule called ``name``, or None when no rule has that name (any more)."""
        return next((r for r in self.rules if r.name == name), None)

    @property
    def files(self) -> Store:
        """Where the job's series is read from and its results go (:mod:`store`)."""
        return open_store(self.store, self.data_dir)


@dataclass(frozen=True)
class DeliveryConfig:
    """Where results go and how hard sending is tried."""

    destinations: tuple[Destination, ...] = ()
    retry: RetryPolicy = RetryPolicy()
    data_dir: Path | None = None  # the ledger's paths are relative to it (ledger.paths)
    store: StoreConfig | None = None  # None: fs on data_dir

    @property
    def files(self) -> Store:
        """Where the results to send are read from (:mod:`store`)."""
        return open_store(self.store, self.data_dir)


@dataclass(frozen=True)
class TaskLimits:
    """Celery's time limits of the tasks and the Redis visibility timeout, in seconds.

    A task is interrupted at its soft limit (it ends its attempt cleanly) and killed at its hard limit; a
    message that is not acknowledged is handed to another worker once it has been out for the visibility
    timeout. ``specgate.settings.Settings`` refuses limits where the visibility timeout does not outlast
    every hard limit by :data:`VISIBILITY_MARGIN_S`; the claim (:func:`worker.pipeline.claim`) would still
    refuse to start a second run beside a live one, but the message would be spent on nothing.
    """

    segment_soft_s: float = 1800.0
    segment_hard_s: float = 2100.0
    deliver_soft_s: float = 900.0
    deliver_hard_s: float = 1000.0
    visibility_timeout_s: float = 7200.0


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker process (and the reconciler beside it) is configured with."""

    database_url: str
    broker_url: str | None  # None: kombu's filesystem transport under ``broker_dir`` (no server)
    broker_dir: Path
    pipeline: PipelineConfig
    models: tuple[ModelSpec, ...] = (ModelSpec(DEFAULT_MODEL, segment=PHANTOM_SEGMENT),)
    inference: InferenceOverrides = InferenceOverrides()
    delivery: DeliveryConfig = DeliveryConfig()
    reconcile_interval_s: float = 30.0
    queued_deadline_s: float = 600.0
    limits: TaskLimits = TaskLimits()
    #: torch's intra-op (and inter-op) threads in each process that runs tasks; 0: torch's default
    torch_threads: int = 0
