"""What the worker is configured with: small frozen records, built by the composition root
(``specgate.settings.Settings.worker_config``) and passed down. Nothing here reads the environment or a file.

:class:`WorkerConfig` is the whole of it; each part goes to the code that needs it and no further:
:class:`PipelineConfig` to :func:`worker.pipeline.run_job`, :class:`ModelSpec` and
:class:`InferenceOverrides` to :class:`worker.segmenter.Segmenters`, :class:`DeliveryConfig` to
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

__all__ = ["DEFAULT_MODEL", "DeliveryConfig", "InferenceOverrides", "ModelSpec", "PipelineConfig",
           "SpacingPairs", "WorkerConfig"]

DEFAULT_MODEL = "default"

# (modality, (z, y, x) mm) pairs, as :func:`model.segment.parse_spacing` returns them; () means native.
SpacingPairs = tuple[tuple[str, tuple[float, float, float]], ...]


@dataclass(frozen=True)
class ModelSpec:
    """One named model: its weights and the OOD bank fitted for them (None: the shipped model's file)."""

    name: str
    weights: Path | None = None
    bank: Path | None = None


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
    rules: tuple[SeriesRule, ...] = ()
    heartbeat_s: float = 10.0
    stale_after_s: float = 120.0
    actor: str = "worker"

    def rule(self, name: str | None) -> SeriesRule | None:
        """The rule called ``name``, or None when no rule has that name (any more)."""
        return next((r for r in self.rules if r.name == name), None)


@dataclass(frozen=True)
class DeliveryConfig:
    """Where results go and how hard sending is tried."""

    destinations: tuple[Destination, ...] = ()
    retry: RetryPolicy = RetryPolicy()
    rules: tuple[SeriesRule, ...] = ()  # an approved result's objects are re-encoded with its rule


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker process (and the reconciler beside it) is configured with."""

    database_url: str
    broker_url: str | None  # None: kombu's filesystem transport under ``broker_dir`` (no server)
    broker_dir: Path
    pipeline: PipelineConfig
    models: tuple[ModelSpec, ...] = (ModelSpec(DEFAULT_MODEL),)
    inference: InferenceOverrides = InferenceOverrides()
    delivery: DeliveryConfig = DeliveryConfig()
    reconcile_interval_s: float = 30.0
    queued_deadline_s: float = 600.0
