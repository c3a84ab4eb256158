"""The model, as the worker uses it: weights + OOD bank loaded once per worker process, one call per study.

``Segmenter.segment`` runs :func:`model.segment.segment_volume` (the model's grid, the body crop, the
sliding window with the streaming content signature, back to the source grid) and scores the signature
with the :class:`model.ood.SpectralGate` fitted for exactly these weights *and* this inference path: a
bank fitted for other weights, or through other settings (spacing, block, overlap, body crop,
precision), is refused at load with a message that names each difference.

Settings come from the weights' metadata (``inference_block``, ``inference_overlap``,
``inference_spacing``: what the model was trained and evaluated at), then the operator's overrides.

A worker may serve several named models (a rule's ``model`` names one): :class:`Segmenters` opens each on
first use and keeps it for the life of the worker process.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import InferenceOverrides, ModelSpec

__all__ = ["SegmentOutput", "Segmenter", "Segmenters"]


@dataclass(frozen=True)
class SegmentOutput:
    mask: np.ndarray
    prob_fg: np.ndarray
    oodm: float
    tau: float
    is_ood: bool
    signature: np.ndarray
    gate_reason: str | None = None  # "oodm_above_tau" | "modality_not_in_bank" | None (released)
    grid: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


class Segmenter:
    """A loaded model and gate. Build with :meth:`open`; the constructor does no I/O."""

    def __init__(self, net: Any, gate: Any, settings: Any, *, model_name: str, model_version: str,
                 weights_sha256: str, device: str = "cpu", threshold: float = 0.5,
                 clinical_use: bool = False) -> None:
        """``clinical_use``: False marks every object the model makes NOT FOR CLINICAL USE."""
        self.net, self.gate, self.settings = net, gate, settings
        self.model_name, self.model_version, self.weights_sha256 = model_name, model_version, weights_sha256
        self.device, self.threshold, self.clinical_use = device, threshold, clinical_use

    @classmethod
    def open(cls, weights: Path | None = None, bank: Path | None = None, *, device: str = "cpu",
             block: int | None = None, overlap: int | None = None, spacing: Any = None) -> Segmenter:
        """Load weights and bank (default: the shipped model in ``model/weights/``).

        Raises :class:`model.ood.BankMismatchError` when the bank was fitted for other weights or
        through other inference settings than these.
        """
        from model.ood import SpectralGate, sha256_file
        from model.segment import InferenceSettings
        from model.unet import load_weights

        if weights is None or bank is None:
            from model import weights as shipped

            weights = weights or shipped.WEIGHTS_PATH
            bank = bank or shipped.BANK_PATH
        sha = sha256_file(weights)
        net, meta = load_weights(weights, device=device)
        gate = SpectralGate.load(bank, weights_sha256=sha)
        settings = InferenceSettings.for_weights(meta, device=device, block=block, overlap=overlap, spacing=spacing)
        gate.check_inference(settings.signature_settings())
        # not for clinical use unless the weights' metadata says otherwise
        return cls(net, gate, settings, model_name=str(meta.get("name", "specgate-segnet")),
                   model_version=str(meta.get("version", f"sha256-{sha[:12]}")), weights_sha256=sha,
                   device=device, clinical_use=meta.get("clinical_use") is True)

    def segment(self, volume: np.ndarray, modality: str, *, spacing: Any) -> SegmentOutput:
        """Segment and gate one volume (z, y, x, native units) with its spacing (z, y, x) in mm.

        Raises :class:`model.resample.GridError` (``bad_spacing``) for a spacing that cannot be used.
        """
        from model.segment import segment_volume

        res = segment_volume(self.net, volume, spacing, modality, self.settings, device=self.device,
                             out_dtype=np.float16)
        t0 = time.perf_counter()
        oodm, is_ood, reason = self.gate.verdict(res.signature, modality)
        timings = {**res.timings, "gate": time.perf_counter() - t0}
        prob_fg = res.foreground
        mask = prob_fg >= self.threshold
        return SegmentOutput(mask=mask, prob_fg=prob_fg, oodm=float(oodm), tau=float(self.gate.tau),
                             is_ood=bool(is_ood), signature=np.asarray(res.signature), gate_reason=reason,
                             grid=res.evidence(), timings=timings)


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
            if spec is None:  # Settings refuses a rule naming an unknown model: this is a bug, not input
                raise LookupError(f"model {name!r} is not configured (configured: {', '.join(self._specs)})")
            inf = self._inference
            self._open[name] = Segmenter.open(spec.weights, spec.bank, device=self._device, block=inf.block,
                                              overlap=inf.overlap, spacing=inf.spacing)
        return self._open[name]
