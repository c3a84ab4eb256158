"""Format ``"segnet"``: specgate's own :class:`model.unet.SegNet` weights file, through the production path.

:meth:`SegNetAdapter.predict` is :func:`model.study_inference.segment_labels`: the model's grid, the body crop,
the sliding window with the streaming signature (:func:`model.infer.sliding_window`, each voxel's
features from the one window that owns it), the label map and the float16 foreground brought back to
the source grid. The signature is the one the shipped bank was fitted through, bit for bit
(:func:`model.study_inference.segment_volume` and :func:`~model.study_inference.segment_labels` share everything up to
the windows), so :meth:`signature_settings` is exactly :meth:`model.study_inference.InferenceSettings.signature_settings`:
a bank records those keys and :meth:`model.ood.SpectralGate.check_inference` compares every one of
them (a key the bank lacks counts as a difference, so none is added here; the bank is tied to the
weights by their SHA-256 instead).

The signature's layer is the settings' ``signature_layer``: the first encoder stage ``encoders.0`` (bank
version 3, chosen on the validation range by ``specgate model experiment failures``), read by a forward
hook, or the last decoder stage (``decoders.<n>``, the map the head reads, the paper's choice); both lie at
the input's resolution, as the window's ownership of voxels needs. No other layer can be chosen.

>>> from pathlib import Path
>>> SegNetAdapter.open(Path("/nonexistent/segnet.pt"))
Traceback (most recent call last):
...
model.adapters.base.AdapterError: SegNet weights file /nonexistent/segnet.pt does not exist
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from model.adapters.base import AdapterError, Label, ModelAdapter, Prediction

__all__ = ["DEFAULT_LABEL", "SegNetAdapter"]

#: the shipped model's one foreground label when the weights' metadata names none
DEFAULT_LABEL = "Phantom organ"


def _labels(meta: Mapping[str, Any], num_classes: int) -> tuple[Label, ...]:
    """From the metadata's ``labels`` ({"1": "Liver", ...}, every class 1..K-1 named), else a default."""
    named = meta.get("labels")
    if named is None:
        if num_classes == 2:
            return (Label(1, DEFAULT_LABEL),)
        return tuple(Label(c, f"class {c}") for c in range(1, num_classes))
    if not isinstance(named, Mapping):
        raise AdapterError(f"the weights' metadata 'labels' must map values to names, got {named!r}")
    try:
        out = {int(v): str(n) for v, n in named.items()}
    except ValueError:
        raise AdapterError(f"the weights' metadata 'labels' has a value that is not an integer: {named!r}") from None
    expected = set(range(1, num_classes))
    if set(out) != expected:
        raise AdapterError(f"the weights' metadata names labels {sorted(out)}, the network has classes "
                           f"{sorted(expected)} (0 is background)")
    return tuple(Label(v, out[v]) for v in sorted(out))


class SegNetAdapter(ModelAdapter):
    """A :class:`model.unet.SegNet` and its inference settings. Build with :meth:`open`."""

    format: ClassVar[str] = "segnet"
    #: :func:`model.resample.to_grid` reads int16 block by block, :func:`model.preprocess.preprocess` converts
    takes_int16: ClassVar[bool] = True

    def __init__(self, net: Any, settings: Any, *, name: str, version: str, labels: tuple[Label, ...],
                 layer: str, files_sha256: Mapping[str, str], weights_sha256: str, meta: Mapping[str, Any],
                 device: str = "cpu") -> None:
        self.net, self.settings = net, settings
        self.name, self.version, self.labels, self.layer = name, version, labels, layer
        self.files_sha256, self.weights_sha256 = dict(files_sha256), weights_sha256
        self.meta, self.device = dict(meta), device
        self.clinical_use = self.meta.get("clinical_use") is True  # only weights that say so

    @classmethod
    def open(cls, path: Path | None = None, *, layer: str | None = None, device: str = "cpu",
             **options: Any) -> SegNetAdapter:
        """Load a weights file (default: the shipped ``model/weights/segnet.pt``).

        ``options``: ``block``, ``overlap``, ``spacing`` override the weights' own inference settings
        (:meth:`model.study_inference.InferenceSettings.for_weights`). Raises :class:`AdapterError` for a missing
        or unreadable file, a ``layer`` other than the first encoder or last decoder stage, an unknown option.
        """
        from model.ood import sha256_file
        from model.study_inference import InferenceSettings
        from model.unet import load_weights

        unknown = sorted(set(options) - {"block", "overlap", "spacing"})
        if unknown:
            raise AdapterError(f"unknown SegNet option(s) {', '.join(unknown)} (known: block, overlap, spacing)")
        if path is None:
            from model import weights as shipped

            path = shipped.WEIGHTS_PATH
        path = Path(path)
        if not path.is_file():
            raise AdapterError(f"SegNet weights file {path} does not exist")
        import pickle

        try:
            net, meta = load_weights(path, device=device)
        except (ValueError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as exc:
            raise AdapterError(f"{path} is not a loadable SegNet weights file: {exc}") from exc
        last_decoder = f"decoders.{len(net.decoders) - 1}" if len(net.decoders) else "encoders.0"
        allowed = ("encoders.0", last_decoder)
        if layer is not None and layer not in allowed:
            raise AdapterError(f"SegNet's signature layer is its first encoder stage or its last decoder stage "
                               f"({' or '.join(repr(x) for x in allowed)}); layer {layer!r} cannot be chosen for "
                               "this format")
        try:
            settings = InferenceSettings.for_weights(meta, device=device, block=options.get("block"),
                                                     overlap=options.get("overlap"), spacing=options.get("spacing"))
            if layer is not None:
                settings = dataclasses.replace(settings, signature_layer=layer)
        except ValueError as exc:
            raise AdapterError(f"{path}: inference settings: {exc}") from exc
        default_layer = settings.signature_layer
        sha = sha256_file(path)
        return cls(net, settings, name=str(meta.get("name", "specgate-segnet")),
                   version=str(meta.get("version", f"sha256-{sha[:12]}")),
                   labels=_labels(meta, int(net.config["num_classes"])), layer=default_layer,
                   files_sha256={path.name: sha}, weights_sha256=sha, meta=meta, device=device)

    def predict(self, image: np.ndarray, spacing: Sequence[float], modality: str) -> Prediction:
        from model.study_inference import segment_labels

        r = segment_labels(self.net, image, spacing, modality, self.settings, device=self.device)
        return Prediction(labels=r.labels, foreground=r.foreground, signature=np.asarray(r.signature),
                          gram=r.gram, n_signature_voxels=r.n_signature_voxels,
                          evidence={**r.evidence(), "layer": self.layer}, timings=dict(r.timings))

    def signature_settings(self) -> dict[str, Any]:
        return dict(self.settings.signature_settings())
