"""The model, as the worker uses it: weights + OOD bank loaded once per worker process, one call per study.

``Segmenter.segment`` preprocesses by modality, runs :func:`model.infer.sliding_window` (probabilities and
the spectral signature in one pass) and scores the signature with the :class:`model.ood.SpectralGate`
fitted for exactly these weights (a bank fitted for other weights is refused at load).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SegmentOutput", "Segmenter"]


@dataclass(frozen=True)
class SegmentOutput:
    mask: np.ndarray
    prob_fg: np.ndarray
    oodm: float
    tau: float
    is_ood: bool
    signature: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


class Segmenter:
    """A loaded model and gate. Build with :meth:`open`; the constructor does no I/O."""

    def __init__(self, net: Any, gate: Any, *, model_name: str, model_version: str, weights_sha256: str,
                 device: str = "cpu", block: int = 96, overlap: int = 24, threshold: float = 0.5) -> None:
        self.net, self.gate = net, gate
        self.model_name, self.model_version, self.weights_sha256 = model_name, model_version, weights_sha256
        self.device, self.block, self.overlap, self.threshold = device, block, overlap, threshold

    @classmethod
    def open(cls, weights: Path | None = None, bank: Path | None = None, *, device: str = "cpu",
             block: int | None = None, overlap: int | None = None) -> Segmenter:
        """Load weights and bank (default: the shipped model in ``model/weights/``)."""
        from model.ood import SpectralGate, sha256_file
        from model.unet import load_weights

        inference: dict[str, Any] = {}
        if weights is None or bank is None:
            from model import weights as shipped

            weights = weights or shipped.WEIGHTS_PATH
            bank = bank or shipped.BANK_PATH
            inference = dict(shipped.INFERENCE)
        sha = sha256_file(weights)
        net, meta = load_weights(weights, device=device)
        gate = SpectralGate.load(bank, weights_sha256=sha)
        return cls(net, gate, model_name=str(meta.get("name", "specgate-segnet")),
                   model_version=str(meta.get("version", f"sha256-{sha[:12]}")), weights_sha256=sha,
                   device=device, block=int(block or meta.get("inference_block", inference.get("block", 96))),
                   overlap=int(overlap if overlap is not None
                               else meta.get("inference_overlap", inference.get("overlap", 24))))

    def segment(self, volume: np.ndarray, modality: str, *, spacing: Any = None) -> SegmentOutput:
        from model.infer import sliding_window
        from model.preprocess import preprocess

        t0 = time.perf_counter()
        x = preprocess(volume, modality)
        t1 = time.perf_counter()
        # On a GPU, batches keep it busy (H200, bf16: 93 blocks/s at 1, 192 at 4, 256 at 8); on a CPU, 1.
        batch = 8 if str(self.device).startswith("cuda") else 1
        res = sliding_window(self.net, x, block=self.block, overlap=self.overlap, device=self.device,
                             batch_size=batch, out_dtype=np.float16)
        t2 = time.perf_counter()
        oodm = float(self.gate.score(res.signature))
        t3 = time.perf_counter()
        prob_fg = res.foreground
        mask = prob_fg >= self.threshold
        return SegmentOutput(mask=mask, prob_fg=prob_fg, oodm=oodm, tau=float(self.gate.tau),
                             is_ood=bool(oodm > self.gate.tau), signature=np.asarray(res.signature),
                             timings={"preprocess": t1 - t0, "infer": t2 - t1, "gate": t3 - t2})
