"""The one interface every model format implements, so the worker, the gate and the bank fit do not know
which format a model came in.

An adapter is opened once per worker process (:meth:`ModelAdapter.open`, the only place that reads
files) and then predicts study after study. :meth:`ModelAdapter.predict` runs the *format's own*
pre-processing, inferer and post-processing (SegNet: :func:`model.study_inference.segment_volume`; a MONAI
bundle: its ``preprocessing``, ``inferer`` and ``postprocessing`` from ``monai.bundle``; nnU-Net v2:
``nnUNetPredictor``; TorchScript: the spec file's settings), with a forward hook on the signature's
layer feeding a :class:`model.window_gram.WindowGram` window by window. It returns the label map on the
*source* grid (what goes into the SEG) and the foreground probability for the review overlay.

Memory: per-class probabilities stay on the model's grid; only the label map (``uint8``/``uint16``) and
one float16 foreground map are brought back to the source grid.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

__all__ = ["AdapterError", "Label", "ModelAdapter", "Prediction", "StateDictMismatch"]


class AdapterError(ValueError):
    """A model folder or file that cannot be used, with the reason (a missing file, a layer that does not
    exist, a checkpoint that does not match its plans, a config that does not parse)."""


_SIZE = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from checkpoint, "
                   r"the shape in current model is torch\.Size\(\[([\d, ]*)\]\)")
_KEYS = re.compile(r"(Missing|Unexpected) key\(s\) in state_dict: ((?:\"[^\"]*\"(?:, )?)+)")


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


@dataclass(frozen=True)
class StateDictMismatch:
    """What torch's ``load_state_dict`` refused, read from its ``RuntimeError`` (whose text is the only
    place torch states it): weights missing from the checkpoint, weights the network does not have, and
    weights of another shape (key, shape in the checkpoint, shape in the network).

    >>> import torch
    >>> net = torch.nn.Conv3d(1, 2, 3)
    >>> try:
    ...     net.load_state_dict(torch.nn.Conv3d(1, 4, 3).state_dict())
    ... except RuntimeError as exc:
    ...     print(StateDictMismatch.parse(exc).summary())
    2 weight(s) of another shape (first: weight is [4, 1, 3, 3, 3] in the checkpoint, [2, 1, 3, 3, 3] in the network)
    """

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    shapes: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]

    @classmethod
    def parse(cls, exc: BaseException) -> StateDictMismatch | None:
        """The mismatch in ``exc``'s message; None when it is not a ``load_state_dict`` refusal."""
        text = str(exc)
        if "Error(s) in loading state_dict" not in text:
            return None
        keys: dict[str, tuple[str, ...]] = {"Missing": (), "Unexpected": ()}
        for kind, listed in _KEYS.findall(text):
            keys[kind] = tuple(re.findall(r'"([^"]*)"', listed))
        shapes = tuple((k, _shape(a), _shape(b)) for k, a, b in _SIZE.findall(text))
        return cls(keys["Missing"], keys["Unexpected"], shapes)

    def summary(self) -> str:
        parts = []
        if self.shapes:
            key, ours, theirs = self.shapes[0]
            parts.append(f"{len(self.shapes)} weight(s) of another shape (first: {key} is {list(ours)} in the "
                         f"checkpoint, {list(theirs)} in the network)")
        if self.missing:
            parts.append(f"{len(self.missing)} weight(s) missing from the checkpoint (first: {self.missing[0]})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} weight(s) the network does not have (first: {self.unexpected[0]})")
        return "; ".join(parts) or "torch refused the state dict"


def normalise_name(name: str) -> str:
    """A label name as specgate compares names (a rule's choice of labels, the anatomy table, a held-out
    dataset's labels against the model's): lower case, words separated by one space, the words "left"
    and "right" (and the parentheses around them) moved to the end.

    >>> normalise_name("Kidney_Left"), normalise_name("left  kidney"), normalise_name("kidney (left)")
    ('kidney left', 'kidney left', 'kidney left')
    """
    words = re.sub(r"[\s_\-.()\[\],/]+", " ", name.casefold()).split()
    sides = [w for w in words if w in ("left", "right")]
    return " ".join([w for w in words if w not in ("left", "right")] + sides)


@dataclass(frozen=True)
class Label:
    """One output label: its value in the model's label map (``1..``; 0 is background) and the model's
    own name for it (nnU-Net ``dataset.json`` ``labels``, a bundle's ``metadata.json``, the spec file)."""

    value: int
    name: str


@dataclass
class Prediction:
    """One study through one model.

    ``labels``: (z, y, x) on the source grid, 0 background, values from :attr:`ModelAdapter.labels`
    (``uint8``, or ``uint16`` past 255 labels). ``foreground``: (z, y, x) float16 on the source grid,
    1 - P(background) (the review overlay, calibration). ``gram`` / ``n_signature_voxels`` /
    ``signature``: the mean-Gram signature of the signature layer over the body
    (:class:`model.window_gram.WindowGram`). ``evidence``: how it was made (grid, crop, windows, mirrors,
    layer), for the evidence JSON.
    """

    labels: np.ndarray
    foreground: np.ndarray
    signature: np.ndarray
    gram: np.ndarray
    n_signature_voxels: int
    evidence: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


class ModelAdapter(ABC):
    """A loaded model of one format. The constructor does no I/O; build with :meth:`open`."""

    #: "segnet" | "monai-bundle" | "nnunet-v2" | "torchscript"
    format: ClassVar[str]

    name: str
    version: str
    labels: tuple[Label, ...]
    layer: str  # module name of the signature's layer (a forward hook)
    files_sha256: Mapping[str, str]  # relative path -> SHA-256 of every file the model is made of
    #: False marks every object the model makes NOT FOR CLINICAL USE (a format may read it from its files)
    clinical_use: bool = False
    #: True when :meth:`predict` gives the same result for an int16 image as for the same values in float32
    #: (the worker then loads a CT as int16, half the memory: :func:`dicom_series.load_series` ``compact``);
    #: False: the image is given as float32
    takes_int16: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def open(cls, path: Path, *, layer: str | None = None, device: str = "cpu", **options: Any) -> ModelAdapter:
        """Load the model at ``path`` with the format's own loader; ``layer`` overrides the default
        signature layer. Raises :class:`AdapterError` naming what is wrong."""

    @abstractmethod
    def predict(self, image: np.ndarray, spacing: Sequence[float], modality: str) -> Prediction:
        """Segment one volume: ``image`` (z, y, x) in native units (HU for CT), ``spacing`` (z, y, x) mm."""

    @abstractmethod
    def signature_settings(self) -> dict[str, Any]:
        """Everything that changes a signature (the bank records it; a worker running other settings
        refuses the bank): format, layer, the grid/spacing, window size and overlap, mirroring, folds,
        :data:`model.window_gram.OWNERSHIP_RULE`, the body rule."""

    def model_sha256(self) -> str:
        """One SHA-256 for the whole model, what its OOD bank records and checks: the file's own for a
        one-file model (so a SegNet bank keeps matching :func:`model.ood.sha256_file`), else the SHA-256 of
        the sorted ``"<sha256>  <relative path>"`` lines (``sha256sum``'s format)."""
        files = dict(self.files_sha256)
        if not files:
            raise AdapterError(f"model {self.name!r} lists no files, so it has no SHA-256")
        if len(files) == 1:
            return next(iter(files.values()))
        lines = "".join(f"{sha}  {rel}\n" for rel, sha in sorted(files.items()))
        return hashlib.sha256(lines.encode("utf-8")).hexdigest()

    def record(self) -> dict[str, Any]:
        """JSON-ready description for the ledger's model row and the evidence file."""
        return {"format": self.format, "name": self.name, "version": self.version, "layer": self.layer,
                "labels": {lab.value: lab.name for lab in self.labels}, "files_sha256": dict(self.files_sha256),
                "signature_settings": self.signature_settings()}
