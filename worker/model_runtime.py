"""The model, as the worker uses it: a model adapter + its OOD bank loaded once per worker process, one call
per study.

:class:`Segmenter` holds any :class:`model.adapters.base.ModelAdapter` (the shipped SegNet through
:class:`model.adapters.segnet.SegNetAdapter`, a TorchScript file, a MONAI bundle, an nnU-Net folder) and
the :class:`model.ood.SpectralGate` fitted for exactly that model *and* its inference path: a bank fitted
for other files (``ModelAdapter.model_sha256``), or through other settings (spacing, window, overlap,
body crop, precision, layer), is refused at load with a message that names each difference
(:meth:`model.ood.SpectralGate.check_inference` on ``adapter.signature_settings()``).

``Segmenter.segment`` runs the adapter's ``predict`` (the label map and the float16 foreground on the
source grid, the per-class probabilities left on the model's grid) and scores the signature.

A worker may serve several named models (a rule's ``model`` names one): :class:`Segmenters` opens each on
first use and keeps it for the life of the worker process.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import InferenceOverrides, ModelSpec

if TYPE_CHECKING:
    from model.adapters.base import Label, ModelAdapter
    from model.ood import SpectralGate

    from .segments import SegmentDefinition

__all__ = ["SegmentOutput", "Segmenter", "Segmenters"]


@dataclass(frozen=True)
class SegmentOutput:
    """One study through one model and its gate. ``labels``: the label map on the source grid (0
    background, values of ``model_labels``); ``mask``: ``labels > 0``; ``prob_fg``: float16
    1 - P(background) on the source grid."""

    mask: np.ndarray
    prob_fg: np.ndarray
    oodm: float
    tau: float
    is_ood: bool
    signature: np.ndarray
    gate_reason: str | None = None  # "oodm_above_tau" | "modality_not_in_bank" | None (released)
    grid: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    labels: np.ndarray | None = None
    model_labels: tuple[Label, ...] = ()


class Segmenter:
    """A loaded model adapter and its gate. Build with :meth:`open` (SegNet weights) or
    :meth:`from_adapter`; the constructor does no I/O."""

    def __init__(self, adapter: ModelAdapter, gate: SpectralGate,
                 codes: Mapping[str, tuple[str, str, str]] | None = None,
                 model_segment: SegmentDefinition | None = None) -> None:
        """``codes``: the registration's SNOMED CT codes per label name; ``model_segment``: the model's own
        description of its one segment (:attr:`worker.config.ModelSpec.segment`); both for the SEG's
        segments (:func:`worker.segments.segments_for`)."""
        self.adapter, self.gate = adapter, gate
        self.codes: dict[str, tuple[str, str, str]] = dict(codes or {})
        self.model_segment = model_segment

    @property
    def model_name(self) -> str:
        return self.adapter.name

    @property
    def model_version(self) -> str:
        return self.adapter.version

    @property
    def weights_sha256(self) -> str:
        """The model's SHA-256 (the weights file's for a one-file model), which its bank records."""
        return self.adapter.model_sha256()

    @property
    def clinical_use(self) -> bool:
        """False marks every object the model makes NOT FOR CLINICAL USE."""
        return self.adapter.clinical_use

    @property
    def settings(self) -> Any:
        """A SegNet model's :class:`model.study_inference.InferenceSettings` (None for other formats)."""
        from model.adapters.segnet import SegNetAdapter

        return self.adapter.settings if isinstance(self.adapter, SegNetAdapter) else None

    @property
    def takes_int16(self) -> bool:
        """Whether the model takes an int16 volume as it takes the same values in float32 (then the worker
        loads the series with :func:`dicom_series.load_series` ``compact``: a CT in half the memory)."""
        return bool(self.adapter.takes_int16)

    @property
    def labels(self) -> tuple[Label, ...]:
        return tuple(self.adapter.labels)

    def inference_record(self) -> dict[str, Any]:
        """What the evidence file records as the inference path: the bank was checked against it (SegNet:
        its settings' full record, with the batch size, as before adapters)."""
        settings = self.settings
        return settings.record() if settings is not None else self.adapter.signature_settings()

    @classmethod
    def open(cls, weights: Path | None = None, bank: Path | None = None, *, device: str = "cpu",
             block: int | None = None, overlap: int | None = None, spacing: Any = None) -> Segmenter:
        """SegNet weights and their bank (default: the shipped model in ``model/weights/``).

        Raises :class:`model.ood.BankMismatchError` when the bank was fitted for other weights or
        through other inference settings than these.
        """
        from model.adapters.segnet import SegNetAdapter

        if bank is None:  # the shipped bank (refused, naming both hashes, for any other weights)
            from model import weights as shipped

            bank = shipped.BANK_PATH
        adapter = SegNetAdapter.open(weights, device=device, block=block, overlap=overlap, spacing=spacing)
        return cls.from_adapter(adapter, bank)

    @classmethod
    def from_adapter(cls, adapter: ModelAdapter, bank: Path) -> Segmenter:
        """``adapter`` with the bank at ``bank``: refused (:class:`model.ood.BankMismatchError`) when the
        bank was fitted for another model or through other signature settings."""
        from model.ood import SpectralGate

        gate = SpectralGate.load(bank, weights_sha256=adapter.model_sha256())
        gate.check_inference(adapter.signature_settings())
        return cls(adapter, gate)

    def segment(self, volume: np.ndarray, modality: str, *, spacing: Any) -> SegmentOutput:
        """Segment and gate one volume (z, y, x, native units) with its spacing (z, y, x) in mm.

        ``volume`` may be int16 (:attr:`takes_int16`); a model that does not take it gets it as float32.
        Raises :class:`model.resample.GridError` (``bad_spacing``) for a spacing that cannot be used.
        """
        if volume.dtype == np.int16 and not self.takes_int16:
            volume = volume.astype(np.float32)
        pred = self.adapter.predict(volume, spacing, modality)
        t0 = time.perf_counter()
        oodm, is_ood, reason = self.gate.verdict(pred.signature, modality)
        timings = {**pred.timings, "gate": time.perf_counter() - t0}
        labels = pred.labels
        one = labels.dtype == np.uint8 and max((lab.value for lab in self.labels), default=0) == 1
        mask = labels.view(np.bool_) if one else labels > 0  # 0/1 bytes are a valid bool view: no 78 MB copy
        return SegmentOutput(mask=mask, prob_fg=pred.foreground, oodm=float(oodm),
                             tau=float(self.gate.tau), is_ood=bool(is_ood), signature=np.asarray(pred.signature),
                             gate_reason=reason, grid=dict(pred.evidence), timings=timings, labels=pred.labels,
                             model_labels=self.labels)


class Segmenters:
    """The :class:`Segmenter` of each named model, opened on first use and kept (one load per process).

    The constructor does no I/O; ``segmenters(name)`` loads the model the first time it is asked for.
    """

    def __init__(self, models: Sequence[ModelSpec], inference: InferenceOverrides | None = None, *,
                 device: str = "cpu") -> None:
        self._specs = {m.name: m for m in models}
        self._inference, self._device = inference or InferenceOverrides(), device
        self._open: dict[str, Segmenter] = {}

    def __call__(self, name: str) -> Segmenter:
        if name not in self._open:
            spec = self._specs.get(name)
            if spec is None:  # start-up refuses a rule naming an unknown model: this is a bug, not input
                raise LookupError(f"model {name!r} is not configured (configured: {', '.join(self._specs)})")
            self._open[name] = self._load(spec)
        return self._open[name]

    def _load(self, spec: ModelSpec) -> Segmenter:
        inf = self._inference
        if spec.format == "segnet":  # the overrides are SegNet's (its weights' own settings, then these)
            seg = Segmenter.open(spec.path or spec.weights, spec.bank, device=self._device, block=inf.block,
                                 overlap=inf.overlap, spacing=inf.spacing)
        else:
            if spec.path is None or spec.bank is None:  # ModelSpec refuses it; a bug, not input
                raise LookupError(f"model {spec.name!r} ({spec.format}) has no path or no OOD bank")
            # the registry (model/adapters/__init__.py) opens every format with its own loader
            from model.adapters import open_adapter  # type: ignore[attr-defined,unused-ignore]

            adapter = open_adapter(spec.format, spec.path, layer=spec.layer, device=self._device,
                                   **dict(spec.options))
            seg = Segmenter.from_adapter(adapter, spec.bank)
        seg.codes, seg.model_segment = dict(spec.codes), spec.segment  # what the SEG says each segment is
        return seg
