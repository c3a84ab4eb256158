"""A stand-in for ``model.adapters.segnet.SegNetAdapter`` while that module is not on this branch.

It runs a SegNet weights file through :func:`model.segment.segment_volume`, the worker's production path,
as the real adapter does, and refuses what the real one must refuse with :class:`AdapterError`: a missing
file, a file that is not a SegNet weights file, a layer other than its last decoder stage (messages as
the real adapter's on branch ``core``). The registry tests
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
            raise AdapterError(f"{path} is not a loadable SegNet weights file: {exc}") from exc
        default_layer = f"decoders.{len(net.decoders) - 1}"
        if layer is not None and layer != default_layer:
            raise AdapterError(f"SegNet's signature layer is its last decoder stage {default_layer!r}; "
                               f"layer {layer!r} cannot be chosen for this format")
        labels = tuple(Label(int(v), str(n)) for v, n in sorted((meta.get("labels") or {"1": "organ"}).items()))
        return cls(net, InferenceSettings.for_weights(meta, device=device), name=str(meta.get("name", path.stem)),
                   version=str(meta.get("version", "0")), labels=labels, layer=default_layer,
                   files_sha256={path.name: sha256_file(path)}, device=device)

    def predict(self, image: np.ndarray, spacing: Sequence[float], modality: str) -> Prediction:
        from model.segment import segment_volume

        res = segment_volume(self.net, image, spacing, modality, self.settings, device=self.device,
                             out_dtype=np.float32)
        fg = res.foreground
        return Prediction(labels=(fg >= 0.5).astype(np.uint8), foreground=fg.astype(np.float16),
                          signature=np.asarray(res.signature), gram=np.zeros((0, 0)),
                          n_signature_voxels=res.n_signature_voxels, evidence=res.evidence())

    def signature_settings(self) -> dict[str, Any]:
        return dict(self.settings.signature_settings())


def use_segnet_adapter(monkeypatch: pytest.MonkeyPatch) -> str:
    """Make format "segnet" the real adapter when this branch has it, else the stand-in; which one."""
    try:
        importlib.import_module("model.adapters.segnet")
    except ModuleNotFoundError:
        monkeypatch.setitem(FORMATS, "segnet", f"{__name__}:StandInSegNetAdapter")
        return "stand-in"
    return "real"
