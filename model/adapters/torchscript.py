"""Format ``"torchscript"``: a ``torch.jit`` file and a small TOML spec that says how to run it.

A TorchScript file holds the network but not how it was trained to be used, so the spec states it
(nothing is guessed: a spec without a spacing, a normalisation, a patch size or the classes is refused)::

    name = "abdomen"                 # optional: the file's stem
    version = "3"                    # optional: the file's SHA-256 prefix
    model = "abdomen.ts"             # optional: the TorchScript file, relative to the spec
    [input]
    spacing = { CT = [1.5, 1.5, 1.5], MR = [3.0, 1.0, 1.0] }   # (z, y, x) mm, per modality: required
    normalization = { CT = "ct_window", MR = "zscore" }       # per modality, or one name for all
    ct_window = [-1000, 1000]        # ct_window: HU clipped to it, scaled to [0, 1]
    [inference]
    patch_size = [64, 64, 64]        # (z, y, x) voxels
    overlap = 0.25                   # fraction of the patch shared by neighbouring windows, [0, 1)
    mode = "gaussian"                # "constant" | "gaussian": how overlapping windows' logits combine
    [output]
    classes = ["background", "liver", "spleen"]   # channel order; channel 0 is background
    [signature]
    output = 1                       # the module returns a tuple; this element is the feature map

Normalisations: ``ct_window`` (clip to ``ct_window``, scale to [0, 1]), ``zscore`` (minus the mean,
divided by the standard deviation), ``divide_std`` (divided by the standard deviation: specgate's MR).

**Where the signature's features come from.** A Python forward hook cannot see inside a TorchScript
graph: with torch 2.13, ``register_forward_hook`` on a loaded (scripted or traced) module or on any of its
submodules raises ``RuntimeError: register_forward_hook is not supported on ScriptModules``, and wrapping
the loaded module in an ``nn.Module`` does not help (its children are still ScriptModules; checked in
``tests/unit/model/test_adapter_torchscript.py``). The one honest route is the model's own output: export
the module to return ``(logits, features)`` with the feature map at the logits' resolution (the last
map before the segmentation head) and name its index in ``[signature] output``. The layer is recorded as
``"output:<index>"``; ``--layer`` may name it so, and naming a submodule is refused with this reason.

**Windows.** The image is resampled to the spec's spacing (:func:`model.resample.to_grid`), normalised,
and tiled by windows of ``patch_size`` whose starts step by ``patch * (1 - overlap)`` (rounded down, at
least 1) with the last window flush with the end (an axis shorter than the patch is zero-padded at its
end), as MONAI's ``sliding_window_inference`` and nnU-Net do. Overlapping windows' *logits* are averaged,
weighted by a constant or by a Gaussian of sigma ``patch / 8`` per axis (``mode``), then softmax: the
combination of both those libraries. The signature's feature map is combined by
:data:`model.window_gram.OWNERSHIP_RULE` (each voxel's features from the window whose centre is nearest)
and accumulated window by window over the body (:func:`model.study_inference.body_mask` on the model's grid) in a
:class:`model.window_gram.WindowGram`: the full feature map never exists. The label map and the float16
foreground come back to the source grid by :func:`model.study_inference.labels_on_source` (the per-class
probabilities stay on the model's grid).
"""

from __future__ import annotations

import itertools
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from model.adapters.base import AdapterError, Label, ModelAdapter, Prediction

__all__ = ["NORMALIZATIONS", "TorchScriptAdapter", "TorchScriptSpec", "window_starts"]

NORMALIZATIONS = ("ct_window", "zscore", "divide_std")
MODES = ("constant", "gaussian")
Spacing = tuple[float, float, float]


def _sha256(path: Path) -> str:
    from model.ood import sha256_file

    return sha256_file(path)


@dataclass(frozen=True)
class TorchScriptSpec:
    """The spec file, validated (:meth:`parse`)."""

    spacing: tuple[tuple[str, Spacing], ...]
    normalization: tuple[tuple[str, str], ...]  # ("*", name) applies to every modality
    ct_window: tuple[float, float]
    patch_size: tuple[int, int, int]
    overlap: float
    mode: str
    classes: tuple[str, ...]
    output: int
    name: str | None = None
    version: str | None = None
    model: str | None = None

    @classmethod
    def parse(cls, text: str, source: str = "the spec") -> TorchScriptSpec:
        """Validate the TOML ``text``; :class:`AdapterError` names the first problem and its value."""
        from model.resample import validate_spacing

        try:
            d = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise AdapterError(f"{source} is not valid TOML: {exc}") from None
        inp, inf, out, sig = (d.get(k, {}) for k in ("input", "inference", "output", "signature"))
        sp = inp.get("spacing")
        if not isinstance(sp, Mapping) or not sp:
            raise AdapterError(f"{source} gives no input spacing: add [input] spacing = {{ CT = [z, y, x] }} (mm), "
                               "the spacing the model was trained at")
        try:
            spacing = tuple(sorted((str(m).upper(), validate_spacing(v)) for m, v in sp.items()))
        except ValueError as exc:
            raise AdapterError(f"{source}: [input] spacing: {exc}") from None
        norm = inp.get("normalization")
        if norm is None:
            raise AdapterError(f"{source} gives no [input] normalization (one of {', '.join(NORMALIZATIONS)})")
        pairs = (("*", norm),) if isinstance(norm, str) else tuple(sorted((str(m).upper(), n) for m, n in norm.items()))
        for m, n in pairs:
            if n not in NORMALIZATIONS:
                raise AdapterError(f"{source}: normalization {n!r} for {m} is not one of {', '.join(NORMALIZATIONS)}")
        window = inp.get("ct_window", [-1000.0, 1000.0])
        if not (isinstance(window, list) and len(window) == 2 and float(window[0]) < float(window[1])):
            raise AdapterError(f"{source}: ct_window must be [low, high] with low < high, got {window!r}")
        patch = inf.get("patch_size")
        if not (isinstance(patch, list) and len(patch) == 3 and all(isinstance(p, int) and p >= 1 for p in patch)):
            raise AdapterError(f"{source}: [inference] patch_size must be three positive integers (z, y, x), "
                               f"got {patch!r}")
        overlap = float(inf.get("overlap", 0.25))
        if not 0.0 <= overlap < 1.0:
            raise AdapterError(f"{source}: overlap must be in [0, 1), got {overlap!r}")
        mode = inf.get("mode", "constant")
        if mode not in MODES:
            raise AdapterError(f"{source}: mode must be one of {', '.join(MODES)}, got {mode!r}")
        classes = out.get("classes")
        if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) and c for c in classes)):
            raise AdapterError(f"{source}: [output] classes must list at least two names in channel order "
                               f"(background first), got {classes!r}")
        index = sig.get("output")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise AdapterError(f"{source}: [signature] output must name the index of the feature map in the "
                               f"module's output tuple (TorchScript runs no Python hooks), got {index!r}")
        return cls(spacing=spacing, normalization=pairs, ct_window=(float(window[0]), float(window[1])),
                   patch_size=(patch[0], patch[1], patch[2]), overlap=overlap, mode=mode, classes=tuple(classes),
                   output=index, name=d.get("name"), version=d.get("version"), model=d.get("model"))

    def spacing_for(self, modality: str) -> Spacing | None:
        return dict(self.spacing).get(modality.upper())

    def normalization_for(self, modality: str) -> str | None:
        d = dict(self.normalization)
        return d.get(modality.upper(), d.get("*"))

    def normalize(self, image: np.ndarray, modality: str) -> np.ndarray:
        """The spec's intensity normalisation of ``image`` (float32)."""
        name = self.normalization_for(modality)
        x = np.asarray(image, dtype=np.float32)
        if name == "ct_window":
            lo, hi = self.ct_window
            return ((np.clip(x, lo, hi) - lo) / (hi - lo)).astype(np.float32)
        if name is None:
            raise AdapterError(f"the spec gives no normalization for modality {modality!r}")
        std = float(np.std(x, dtype=np.float64))
        std = std if std > 0 else 1.0
        if name == "zscore":
            return ((x - float(np.mean(x, dtype=np.float64))) / std).astype(np.float32)
        return (x / std).astype(np.float32)


def window_starts(n: int, patch: int, overlap: float) -> list[int]:
    """Starts of the windows along an axis of ``n`` voxels (already padded to at least ``patch``): a step
    of ``floor(patch * (1 - overlap))`` (at least 1), the last window flush with the end.

    >>> window_starts(100, 64, 0.25), window_starts(64, 64, 0.5), window_starts(130, 64, 0.5)
    ([0, 36], [0], [0, 32, 64, 66])
    """
    step = max(1, int(patch * (1.0 - overlap)))
    starts = list(range(0, max(n - patch, 0) + 1, step))
    if starts[-1] + patch < n:
        starts.append(n - patch)
    return starts


def _gaussian(patch: Sequence[int]) -> np.ndarray:
    """Importance map: a Gaussian of sigma ``patch / 8`` per axis, peak 1, floored at its smallest positive
    value (no zero weight at the corners), as nnU-Net's and MONAI's Gaussian modes."""
    axes = [np.exp(-0.5 * ((np.arange(p) - (p - 1) / 2.0) / (p / 8.0)) ** 2) for p in patch]
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return np.maximum(w / w.max(), w[w > 0].min()).astype(np.float32)


class TorchScriptAdapter(ModelAdapter):
    """A TorchScript module and its spec. Build with :meth:`open`."""

    format: ClassVar[str] = "torchscript"

    def __init__(self, module: Any, spec: TorchScriptSpec, *, name: str, version: str,
                 files_sha256: Mapping[str, str], device: str = "cpu") -> None:
        self.module, self.spec, self.device = module, spec, device
        self.name, self.version = name, version
        self.labels = tuple(Label(i, n) for i, n in enumerate(spec.classes) if i > 0)
        self.layer = f"output:{spec.output}"
        self.files_sha256 = dict(files_sha256)

    @classmethod
    def open(cls, path: Path, *, layer: str | None = None, device: str = "cpu", **options: Any) -> TorchScriptAdapter:
        """``path``: the TorchScript file, or the spec (``.toml``) naming it in ``model``; ``spec=`` the
        spec file when ``path`` is the module. ``layer``: ``"output:<index>"`` (overrides the spec's).

        Raises :class:`AdapterError` for a missing file, a spec that does not validate, a layer that is
        not an output of the module, a module that does not load or run on a tiny volume.
        """
        import torch

        unknown = sorted(set(options) - {"spec"})
        if unknown:
            raise AdapterError(f"unknown TorchScript option(s) {', '.join(unknown)} (known: spec)")
        path = Path(path)
        spec_path = Path(options["spec"]) if options.get("spec") is not None else None
        if spec_path is None and path.suffix == ".toml":
            spec_path, path = path, Path()
        if spec_path is None:
            raise AdapterError(f"a TorchScript model needs its spec file (spec=...): {path} alone does not say "
                               "its spacing, normalisation, patch size or classes")
        if not spec_path.is_file():
            raise AdapterError(f"TorchScript spec file {spec_path} does not exist")
        spec = TorchScriptSpec.parse(spec_path.read_text(encoding="utf-8"), str(spec_path))
        if path == Path():
            if spec.model is None:
                raise AdapterError(f"{spec_path} names no model file (model = \"...ts\") and none was given")
            path = spec_path.parent / spec.model
        if not path.is_file():
            raise AdapterError(f"TorchScript file {path} does not exist")
        if layer is not None:
            if not layer.startswith("output:") or not layer[7:].isdigit():
                raise AdapterError(
                    f"layer {layer!r}: a TorchScript module runs no Python forward hooks (torch: "
                    "'register_forward_hook is not supported on ScriptModules'); name the element of its output "
                    "tuple that carries the feature map, as 'output:<index>'")
            spec = TorchScriptSpec(**{**spec.__dict__, "output": int(layer[7:])})
        try:
            module = torch.jit.load(str(path), map_location=device).eval()
        except (RuntimeError, ValueError) as exc:
            raise AdapterError(f"{path} is not a loadable TorchScript file: {exc}") from exc
        sha = {path.name: _sha256(path), spec_path.name: _sha256(spec_path)}
        adapter = cls(module, spec, name=spec.name or path.stem, version=spec.version or "",
                      files_sha256=sha, device=device)
        adapter.version = adapter.version or f"sha256-{adapter.model_sha256()[:12]}"
        adapter._check_outputs(path, spec_path)
        return adapter

    def _run(self, x: Any) -> tuple[Any, Any]:
        """(logits, features) of one batch of windows, checked against the spec."""
        out = self.module(x)
        if not isinstance(out, (tuple, list)):
            raise AdapterError(f"the module returns one tensor, not a tuple: the spec's [signature] output "
                               f"{self.spec.output} does not exist (export it to return (logits, features))")
        if self.spec.output >= len(out) or self.spec.output == 0:
            raise AdapterError(f"layer output:{self.spec.output} does not exist: the module returns {len(out)} "
                               "outputs (0 is the logits)")
        logits, feats = out[0], out[self.spec.output]
        if logits.shape[1] != len(self.spec.classes):
            raise AdapterError(f"the module gives {logits.shape[1]} output channels, the spec lists "
                               f"{len(self.spec.classes)} classes {list(self.spec.classes)}")
        if tuple(feats.shape[2:]) != tuple(x.shape[2:]):
            raise AdapterError(f"output:{self.spec.output} has spatial shape {tuple(feats.shape[2:])}, the window "
                               f"{tuple(x.shape[2:])}: the signature needs the feature map at the logits' resolution")
        return logits, feats

    def _check_outputs(self, path: Path, spec_path: Path) -> None:
        """Run the module on one window of zeros: the outputs the spec names must exist; a refusal names
        both files (the module and the spec that does not describe it)."""
        import torch

        with torch.inference_mode():
            try:
                self._run(torch.zeros((1, 1, *self.spec.patch_size), device=self.device))
            except RuntimeError as exc:
                raise AdapterError(f"{path} does not run on a {self.spec.patch_size} window: {exc}") from exc
            except AdapterError as exc:
                raise AdapterError(f"{path} against {spec_path}: {exc}") from None

    def signature_settings(self) -> dict[str, Any]:
        from model.study_inference import BODY_RULE
        from model.window_gram import OWNERSHIP_RULE

        s = self.spec
        return {"format": self.format, "layer": self.layer, "spacing": {m: list(v) for m, v in s.spacing},
                "normalization": dict(s.normalization), "ct_window": list(s.ct_window),
                "patch_size": list(s.patch_size), "overlap": s.overlap, "mode": s.mode, "padding": "end-zero",
                "ownership": OWNERSHIP_RULE, "body": BODY_RULE}

    def predict(self, image: np.ndarray, spacing: Sequence[float], modality: str) -> Prediction:
        import torch

        from model.preprocess import preprocess
        from model.resample import GridError, model_grid, to_grid, validate_spacing
        from model.study_inference import body_mask, labels_on_source, release_freed_memory
        from model.window_gram import WindowGram

        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        vol = np.asarray(image)
        if vol.ndim != 3:
            raise ValueError(f"image must be (z, y, x), got shape {vol.shape}")
        sp = validate_spacing(spacing)
        target = self.spec.spacing_for(modality)
        if target is None:
            raise GridError(f"model {self.name!r} has no spacing for modality {modality!r} "
                            f"(its spec: {', '.join(m for m, _ in self.spec.spacing)})")
        grid = model_grid(vol.shape, sp, target)
        small = to_grid(vol, sp, grid)
        timings["resample"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        x = self.spec.normalize(small, modality)
        body = body_mask(preprocess(small, modality), modality)  # the body rule SegNet's bank uses
        del small
        padded = tuple(max(n, p) for n, p in zip(grid.shape, self.spec.patch_size, strict=True))
        pad = [(0, p - n) for p, n in zip(padded, grid.shape, strict=True)]
        x = np.pad(x, pad)
        mask = np.pad(body, pad) if body.any() else None
        timings["preprocess"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        axes = [window_starts(n, p, self.spec.overlap) for n, p in zip(padded, self.spec.patch_size, strict=True)]
        windows = [tuple(slice(s, s + p) for s, p in zip(st, self.spec.patch_size, strict=True))
                   for st in itertools.product(*axes)]
        gram = WindowGram(padded, windows, mask)  # type: ignore[arg-type]
        weight = _gaussian(self.spec.patch_size) if self.spec.mode == "gaussian" else np.ones(self.spec.patch_size, np.float32)
        k = len(self.spec.classes)
        acc = np.zeros((k, *padded), np.float32)
        wsum = np.zeros(padded, np.float32)
        with torch.inference_mode():
            for i, win in enumerate(windows):
                xt = torch.from_numpy(np.ascontiguousarray(x[win]))[None, None].to(self.device)
                logits, feats = self._run(xt)
                gram.add(i, feats[0])
                acc[(slice(None), *win)] += logits[0].float().cpu().numpy() * weight
                wsum[win] += weight
        crop = tuple(slice(0, n) for n in grid.shape)
        acc = acc[(slice(None), *crop)] / wsum[crop]
        probs = torch.softmax(torch.from_numpy(acc), dim=0).numpy()
        del acc, wsum
        release_freed_memory()
        timings["infer"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        labels, fg = labels_on_source(probs, tuple((0, n) for n in grid.shape), grid, vol.shape, sp, resampled=True)
        timings["restore"] = time.perf_counter() - t0
        return Prediction(labels=labels, foreground=fg, signature=gram.signature(), gram=gram.gram,
                          n_signature_voxels=gram.n_voxels,
                          evidence={"model_grid_shape": list(grid.shape),
                                    "model_grid_spacing_mm": [round(s, 4) for s in grid.spacing],
                                    "resampled": True, "body_voxels": int(body.sum()),
                                    "signature_voxels": gram.n_voxels, "windows": len(windows), "layer": self.layer,
                                    "mode": self.spec.mode},
                          timings=timings)
