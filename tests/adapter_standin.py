"""A stand-in for ``model.adapters.segnet.SegNetAdapter`` while that module is not on this branch.

It runs a SegNet weights file through :func:`model.segment.segment_volume`, the worker's production path,
as the real adapter does, and refuses what the real one must refuse with :class:`AdapterError`: a missing
file, a file that is not a SegNet weights file, a layer the network does not have. The registry tests
use the real adapter when it is importable (:func:`use_segnet_adapter`) and this one otherwise.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model.adapters import FORMATS
from model.adapters.base import AdapterError, Label, ModelAdapter, Prediction

DEFAULT_LAYER = "decoders"


class StandInSegNetAdapter(ModelAdapter):
    format = "segnet"

    def __init__(self, net: Any, settings: Any, *, name: str, version: str, labels: tuple[Label, ...],
                 layer: str, files_sha256: dict[str, str], device: str) -> None:
        self.net, self.settings, self.device = net, settings, device
        self.name, self.version, self.labels, self.layer = name, version, labels, layer
        self.files_sha256 = files_sha256

    @classmethod
    def open(cls, path: Path, *, layer: str | None = None, device: str = "cpu", **options: Any) -> ModelAdapter:
        from model.ood import sha256_file
        from model.segment import InferenceSettings
        from model.unet import load_weights

        if not path.is_file():
            raise AdapterError(f"SegNet weights {str(path)!r} do not exist")
        try:
            net, meta = load_weights(path, device=device)
        except (ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            raise AdapterError(f"{path} is not a SegNet weights file ({exc})") from exc
        modules = dict(net.named_modules())
        if layer is not None and layer not in modules:
            raise AdapterError(f"layer {layer!r} does not exist in {path.name} (modules: "
                               f"{', '.join(n for n in modules if n and '.' not in n)})")
        return cls(net, InferenceSettings.for_weights(meta, device=device), name=str(meta.get("name", path.stem)),
                   version=str(meta.get("version", "0")), labels=(Label(1, str(meta.get("label", "organ"))),),
                   layer=layer or DEFAULT_LAYER, files_sha256={path.name: sha256_file(path)}, device=device)

    def predict(self, image: np.ndarray, spacing: Sequence[float], modality: str) -> Prediction:
        from model.segment import segment_volume

        res = segment_volume(self.net, image, spacing, modality, self.settings, device=self.device,
                             out_dtype=np.float32)
        fg = res.foreground
        return Prediction(labels=(fg >= 0.5).astype(np.uint8), foreground=fg.astype(np.float16),
                          signature=np.asarray(res.signature), gram=np.zeros((0, 0)),
                          n_signature_voxels=res.n_signature_voxels, evidence=res.evidence())

    def signature_settings(self) -> dict[str, Any]:
        return {**self.settings.signature_settings(), "format": self.format, "layer": self.layer}


def use_segnet_adapter(monkeypatch: pytest.MonkeyPatch) -> str:
    """Make format "segnet" the real adapter when this branch has it, else the stand-in; which one."""
    try:
        importlib.import_module("model.adapters.segnet")
    except ModuleNotFoundError:
        monkeypatch.setitem(FORMATS, "segnet", f"{__name__}:StandInSegNetAdapter")
        return "stand-in"
    return "real"
