"""The shipped default model: a :class:`model.unet.SegNet` trained on phantoms, its OOD bank, its card.

>>> from model.weights import load_default
>>> net, gate = load_default()          # doctest: +SKIP
>>> gate.weights_sha256 == default_weights_sha256()  # doctest: +SKIP
True

``default_weights_sha256()`` is the SHA-256 of ``segnet.pt``; the bank records it and refuses other weights.
How the files were made: :mod:`model.weights.build` and ``MODEL_CARD.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from model.ood import SpectralGate
    from model.unet import SegNet

__all__ = [
    "BANK_PATH",
    "CARD_PATH",
    "WEIGHTS_DIR",
    "WEIGHTS_PATH",
    "default_weights_sha256",
    "load_default",
]

WEIGHTS_DIR = Path(__file__).resolve().parent
WEIGHTS_PATH = WEIGHTS_DIR / "segnet.pt"
BANK_PATH = WEIGHTS_DIR / "ood_bank.npz"
CARD_PATH = WEIGHTS_DIR / "MODEL_CARD.md"


def default_weights_sha256() -> str:
    """SHA-256 of the shipped weights file (computed from the file, so it cannot drift)."""
    from model.ood import sha256_file

    return sha256_file(WEIGHTS_PATH)


def load_default(device: str | torch.device = "cpu") -> tuple[SegNet, SpectralGate]:
    """The shipped network (eval mode, on ``device``) and its spectral gate.

    The bank is checked against the weights' SHA-256 and refused if it was fitted for other weights.
    """
    from model.ood import SpectralGate
    from model.unet import load_weights

    if not WEIGHTS_PATH.is_file() or not BANK_PATH.is_file():
        raise FileNotFoundError(f"the default model is missing from {WEIGHTS_DIR}")
    net, _meta = load_weights(WEIGHTS_PATH, device)
    gate = SpectralGate.load(BANK_PATH, weights_sha256=default_weights_sha256())
    return net, gate


def card_metrics() -> dict[str, Any]:
    """The metrics JSON embedded in MODEL_CARD.md (between the ``metrics-json`` markers)."""
    text = CARD_PATH.read_text()
    start = text.index("<!-- metrics-json -->")
    body = text[start:].split("```json", 1)[1].split("```", 1)[0]
    return json.loads(body)
