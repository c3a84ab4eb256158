"""nnU-Net v2 trained model folders through nnU-Net's own predictor, with the signature hooked in.

A trained model folder (``dataset.json``, ``plans.json``, ``fold_*/checkpoint_final.pth``) is loaded by
``nnUNetPredictor.initialize_from_trained_model_folder``, and a study runs through nnU-Net's own code:
the configuration's preprocessor (``run_case_npy``: transpose, crop to non-zero, normalisation,
resampling to the plans' spacing), ``predict_logits_from_preprocessed_data`` (padding, sliding window
with ``tile_step_size``, Gaussian weighting, test-time mirroring over the checkpoint's
``inference_allowed_mirroring_axes``, the folds' logits averaged), and nnU-Net's export geometry
(``resampling_fn_probabilities`` back to the cropped original shape, argmax, the crop put back, the
transpose reverted). Labels and their names come from ``dataset.json`` ``labels``, the spacing from
``plans.json``.

**Signature.** A forward hook on one module (default: the last decoder stage before the segmentation
head, ``decoder.stages[-1]`` of ``PlainConvUNet`` / ``ResidualEncoderUNet``; any module whose output has
the window's spatial size can be named instead). The predictor is subclassed in two methods only, each
calling nnU-Net's own code: ``_internal_get_sliding_window_slicers`` (the windows of one pass, on the
padded network grid) and ``_internal_maybe_mirror_and_predict`` (one window: nnU-Net runs the plain
pass and then one pass per combination of the mirror axes, in ``itertools.combinations`` order, one
after another; the windows come in the order of the slicers, one producer thread feeding a FIFO queue).
The rule, the same for every format (:mod:`model.window_gram`):

1. the mirrored passes of a window are flipped back and averaged, as nnU-Net averages their logits;
2. each voxel's feature is taken from the window with the nearest centre per axis
   (:data:`model.window_gram.OWNERSHIP_RULE`);
3. **folds**: the signature comes from the *first* fold in ``folds`` only (nnU-Net averages the folds'
   logits after each fold has run its whole sliding window; averaging the folds' features the same way
   would hold every window's features until the last fold: 32 channels x 11 M voxels x 4 bytes =
   1.5 GB for a TotalSegmentator-sized network grid, instead of one window at a time). A bank fitted
   with other folds is refused, since ``folds`` is in :meth:`NnUNetAdapter.signature_settings`;
4. **body**: :func:`model.study_inference.body_mask` on the network's input grid, computed from the source
   image (CT in HU, scaled from [-1000, 1000] to [0, 1] as ``body_mask`` expects), taken through
   nnU-Net's own geometry (transpose, the preprocessor's crop) and sampled nearest-neighbour onto the
   network grid's shape (voxel centres, ``align_corners=False``), then padded like the data
   (``pad_nd_image``). Not from the preprocessed data: nnU-Net's ``CTNormalization`` clips at the
   foreground's 0.5th percentile, which is above -500 HU for most organs, so air and fat are one value.

**Memory.** nnU-Net itself (``convert_predicted_logits_to_segmentation_with_correct_shape``) resamples
the logits of *every* class to the original shape at once: a float64 copy of all classes on the network
grid and a float16 array of all classes at full resolution, then an int64 argmax. For 105 classes
(TotalSegmentator) on a 300x512x512 CT (79 M voxels) with a 1.5 mm network grid (about 11 M voxels) that
is 105 x 11 M x 8 B = 9.6 GB + 105 x 79 M x 2 B = 16.5 GB + 0.6 GB. This adapter keeps nnU-Net's float16
logits on the network grid (105 x 11 M x 2 B = 2.4 GB: what nnU-Net's predictor returns) and calls the
same ``resampling_fn_probabilities`` one class at a time, keeping

- a running maximum (the resampled float16 values held in float32: exact) and the index of the first
  class that reaches it (nnU-Net's ``argmax`` tie-break): the label map is identical;
- a running sum of ``exp(logit - max)`` and the background's resampled logits, so that
  1 - P(background) is the softmax of the *resampled* logits, as nnU-Net's ``save_probabilities`` export
  computes it (tested: within float16 rounding, 2.4e-4).

Above the logits that is one class at full resolution at a time (skimage's float64 output 0.63 GB and
its float16 copy 0.16 GB, transient), the maximum and the sum (2 x 0.31 GB), the background logits
(0.16 GB), the label map (0.08 GB) and the temporaries of one update (0.31 + 0.31 + 0.08 GB): at most
about 2 GB whatever the number of classes, against 27 GB for nnU-Net's own export of 105 classes.
Measured (``bench/adapter_nnunet.py --no-mirroring``, 300x512x512 CT at 1.0 x 0.7 x 0.7 mm, the tests'
phantom model on a 5 x 4 x 4 mm grid, 2 threads on a shared 2-core machine): with 2 classes both peak at
3.3 GB resident, with a 16-output head nnU-Net peaks at 6.4 GB and this adapter still at 3.3 GB; that
3.3 GB is nnU-Net's own preprocessing (``run_case_npy`` alone, in a process holding the model and the CT:
1.0 GB before, 3.3 GB after; its cubic resampling of the CT in float64), which the adapter runs
unchanged. With a 105-output head (``--classes 105``) on an 80x512x512 CT (nnU-Net's side would not fit
this 23 GB machine at 300 slices): nnU-Net 9.3 GB, this adapter 1.4 GB (0.8 GB above the loaded model),
0.84x nnU-Net's time. Label maps equal voxel for voxel in every run. Time, specgate / nnU-Net: 1.27
(2 classes), 1.01 (16), 1.33 with mirroring (72 s for nnU-Net),
1.02 on 120x512x512 with mirroring and two folds (12 s); on this shared machine the same call varies by
up to 6x between runs, and the hook itself measured 13.1 s against 15.0 s unhooked (175 windows x 8
passes), i.e. within that noise. The extra work is the body mask, the foreground's log-sum-exp and the
Gram; each class's resampling to the source grid (skimage, about 10 s per class at 300x512x512) is
nnU-Net's and dominates both.

Not supported (refused at :meth:`NnUNetAdapter.open`, naming the reason): region-based models
(``labels`` with lists), models with more than one input channel, 2D configurations, cascades
(``previous_stage``), and
image readers other than ``SimpleITKIO`` and ``NibabelIO`` (the ``WithReorient`` ones need the
image's orientation).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from model.adapters.base import AdapterError, Label, ModelAdapter, Prediction, StateDictMismatch
from model.ood import sha256_file
from model.study_inference import BODY_RULE, body_mask
from model.window_gram import OWNERSHIP_RULE, WindowGram

__all__ = ["FOLD_RULE", "NnUNetAdapter"]

#: recorded in signature_settings(): which fold's features make the signature
FOLD_RULE = "first-fold-v1"
BODY_GRID_RULE = "source-nearest-to-network-grid-v1"
CHECKPOINT = "checkpoint_final.pth"
#: nnU-Net's readers that hand the network the file's voxel order as SimpleITK's (z, y, x) array (nibabel's
#: transposes to it): an in-memory (z, y, x) volume is what they would read. The "WithReorient" readers
#: turn the image to RAS first, which needs the orientation that (image, spacing) does not carry.
_READERS = {"SimpleITKIO", "NibabelIO"}


def _default_layer(network: torch.nn.Module) -> str | None:
    decoder = getattr(network, "decoder", None)
    stages = getattr(decoder, "stages", None)
    if isinstance(stages, torch.nn.ModuleList) and len(stages) > 0:
        return f"decoder.stages.{len(stages) - 1}"
    return None


def _mirror_combinations(axes: Sequence[int] | None) -> list[tuple[int, ...]]:
    """The flips nnU-Net applies to one window, in its order (``_internal_maybe_mirror_and_predict``),
    as dimensions of the (1, C, d, h, w) tensor; the first entry (no flip) is the plain pass."""
    if not axes:
        return [()]
    dims = [int(a) + 2 for a in axes]
    return [()] + [c for i in range(len(dims)) for c in itertools.combinations(dims, i + 1)]


class _WindowRecorder:
    """The hooked layer's output, window by window, for the first fold's pass (see the module docstring)."""

    def __init__(self, layer: str, mirrors: list[tuple[int, ...]], mask: np.ndarray, patch: Sequence[int]) -> None:
        self.layer = layer
        self.mirrors = mirrors
        self.mask = mask  # body on the unpadded network grid
        self.patch = [int(p) for p in patch]
        self.passes = 0
        self.window = -1
        self.gram: WindowGram | None = None
        self.sum: torch.Tensor | None = None
        self.forwards = 0
        self.active = False

    def start_pass(self, image_size: Sequence[int], slicers: Sequence[tuple[slice, ...]]) -> None:
        from acvl_utils.cropping_and_padding.padding import pad_nd_image

        if self.gram is not None and not self.gram.complete():
            # the first fold's pass began again: nnU-Net retries a pass on the CPU when the device runs
            # out of memory (predict_sliding_window_return_logits), with the same slicers
            self.passes -= 1
        self.passes += 1
        self.window = -1
        self.active = self.passes == 1
        if not self.active:
            return
        shape = tuple(int(n) for n in image_size)
        mask = pad_nd_image(self.mask, self.patch, "constant", {"constant_values": False})
        if tuple(mask.shape) != shape:
            raise RuntimeError(f"the body mask padded to {tuple(mask.shape)} is not the sliding window's grid {shape}")
        windows = [(s[-3], s[-2], s[-1]) for s in slicers]
        self.gram = WindowGram(shape, windows, mask)

    def start_window(self) -> None:
        self.window += 1
        self.sum = None
        self.forwards = 0

    def hook(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if not self.active or self.forwards >= len(self.mirrors):
            self.forwards += 1
            return
        f = output.detach().float()
        flip = self.mirrors[self.forwards]
        if flip:
            f = torch.flip(f, flip)
        self.sum = f.clone() if self.sum is None else self.sum + f
        self.forwards += 1

    def end_window(self) -> None:
        if not self.active:
            return
        assert self.gram is not None
        if self.forwards != len(self.mirrors) or self.sum is None:
            raise RuntimeError(f"window {self.window}: the layer {self.layer!r} ran {self.forwards} times, "
                               f"expected {len(self.mirrors)} (one per mirrored pass)")
        features = self.sum[0] / len(self.mirrors)
        win = self.gram.windows[self.window]
        want = tuple(s.stop - s.start for s in win)
        if tuple(features.shape[1:]) != want:
            raise AdapterError(f"layer {self.layer!r} outputs {tuple(features.shape[1:])} voxels per window, "
                               f"not the window's {want}: choose a full-resolution layer")
        self.gram.add(self.window, features)


@functools.cache
def _hooked_predictor_class() -> type:
    """``nnUNetPredictor`` with the two calls that tell the recorder where it is (imported on first use:
    nnunetv2 is an optional dependency)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    class HookedPredictor(nnUNetPredictor):  # type: ignore[misc]
        recorder: _WindowRecorder | None = None

        def _internal_get_sliding_window_slicers(self, image_size: tuple[int, ...]) -> list[tuple[slice, ...]]:
            slicers: list[tuple[slice, ...]] = super()._internal_get_sliding_window_slicers(image_size)
            if self.recorder is not None:
                self.recorder.start_pass(image_size, slicers)
            return slicers

        def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
            if self.recorder is None:
                out: torch.Tensor = super()._internal_maybe_mirror_and_predict(x)
                return out
            self.recorder.start_window()
            out = super()._internal_maybe_mirror_and_predict(x)
            self.recorder.end_window()
            return out

    return HookedPredictor


def _nearest_index(n_src: int, n_out: int) -> np.ndarray:
    """Source index of each output voxel centre (``align_corners=False``)."""
    i = np.floor((np.arange(n_out) + 0.5) * (n_src / n_out)).astype(np.int64)
    return np.clip(i, 0, n_src - 1)


class NnUNetAdapter(ModelAdapter):
    """An nnU-Net v2 trained model folder (module docstring: the rules). Build with :meth:`open`."""

    format: ClassVar[str] = "nnunet-v2"

    def __init__(self, *, name: str, version: str, labels: tuple[Label, ...], layer: str,
                 files_sha256: dict[str, str], predictor: Any, folds: tuple[int | str, ...], step_size: float,
                 use_mirroring: bool) -> None:
        self.name = name
        self.version = version
        self.labels = labels
        self.layer = layer
        self.files_sha256 = files_sha256
        self.predictor = predictor
        self.folds = folds
        self.step_size = step_size
        self.use_mirroring = use_mirroring
        self.configuration = self._configuration_name(predictor)

    # ------------------------------------------------------------------------------------------------
    # opening

    @classmethod
    def open(cls, path: Path, *, layer: str | None = None, device: str = "cpu", **options: Any) -> NnUNetAdapter:
        """Load the trained model folder ``path``.

        Options: ``folds`` (default: every ``fold_*`` with a ``checkpoint_final.pth``, as nnU-Net
        auto-detects), ``configuration`` (checked against the checkpoints', which is what nnU-Net uses),
        ``step_size`` (nnU-Net's ``tile_step_size``, default 0.5), ``use_mirroring`` (default True).

        >>> NnUNetAdapter.open(Path("/nonexistent"))
        Traceback (most recent call last):
        ...
        model.adapters.base.AdapterError: nnU-Net model folder /nonexistent: missing dataset.json
        """
        known = {"folds", "configuration", "step_size", "use_mirroring"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise AdapterError(f"unknown nnU-Net option(s) {unknown}; known: {sorted(known)}")
        path = Path(path)
        for f in ("dataset.json", "plans.json"):
            if not (path / f).is_file():
                raise AdapterError(f"nnU-Net model folder {path}: missing {f}")
        folds = cls._folds(path, options.get("folds"))
        step_size = float(options.get("step_size", 0.5))
        if not 0.0 < step_size <= 1.0:
            raise AdapterError(f"step_size must be in (0, 1], got {step_size!r}")
        use_mirroring = bool(options.get("use_mirroring", True))
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise AdapterError(f"device {device!r} is not a torch device: {e}") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise AdapterError(f"device {device!r}: this machine has no CUDA device")
        dataset_json = cls._json(path / "dataset.json")
        plans = cls._json(path / "plans.json")
        labels = cls._labels(path, dataset_json)
        n_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
        if n_channels != 1:
            raise AdapterError(f"{path / 'dataset.json'}: {n_channels} input channels; this adapter takes one image")
        reader = str(plans.get("image_reader_writer", "SimpleITKIO"))
        if reader not in _READERS:
            raise AdapterError(f"{path / 'plans.json'}: image_reader_writer {reader!r} is not supported "
                               f"(one of {sorted(_READERS)})")

        predictor = _hooked_predictor_class()(
            tile_step_size=step_size, use_gaussian=True, use_mirroring=use_mirroring,
            perform_everything_on_device=dev.type == "cuda", device=dev, verbose=False,
            allow_tqdm=False)
        try:
            predictor.initialize_from_trained_model_folder(str(path), use_folds=folds, checkpoint_name=CHECKPOINT)
        except RuntimeError as e:
            mismatch = StateDictMismatch.parse(e)
            if mismatch is not None:  # nnU-Net loads the first fold's weights into the network it built
                raise cls._mismatch(path, folds[0], plans, dataset_json, mismatch) from e
            raise cls._unreadable(path, folds, e) from e
        except (KeyError, pickle.UnpicklingError, EOFError) as e:
            raise cls._unreadable(path, folds, e) from e
        except ImportError as e:  # nnU-Net finds the checkpoint's trainer by importing every trainer module
            raise AdapterError(f"nnU-Net model folder {path}: nnU-Net could not import a module while looking up "
                               f"the trainer its checkpoints name ({type(e).__name__}: {e}); install the missing "
                               f"package ({e.name or 'see the message'}) beside nnunetv2") from e
        cls._check_all_folds(path, predictor, folds)
        cfg_name = cls._configuration_name(predictor)
        wanted = options.get("configuration")
        if wanted is not None and wanted != cfg_name:
            raise AdapterError(f"configuration {wanted!r} was asked for, but the checkpoints in {path} were trained "
                               f"with {cfg_name!r}")
        if len(predictor.configuration_manager.patch_size) != 3:
            raise AdapterError(f"{path}: configuration {cfg_name!r} is 2D (patch "
                               f"{predictor.configuration_manager.patch_size}); this adapter runs 3D configurations")
        if predictor.configuration_manager.previous_stage_name is not None:
            raise AdapterError(f"{path}: configuration {cfg_name!r} is a cascade stage (needs "
                               f"{predictor.configuration_manager.previous_stage_name!r}); not supported")

        network = predictor.network
        names = [n for n, _ in network.named_modules() if n]
        chosen = layer if layer is not None else _default_layer(network)
        if chosen is None:
            raise AdapterError(f"{type(network).__name__} has no decoder.stages; name the signature layer, one of: "
                               f"{', '.join(names)}")
        if chosen not in names:
            default = _default_layer(network)
            stages = [n for n in names if n.count(".") == 2 and n.split(".")[1] == "stages"]
            raise AdapterError(f"layer {chosen!r} does not exist in {type(network).__name__}"
                               + (f" (the default is {default!r})" if default else "")
                               + f"; its stages: {', '.join(stages) or '-'}; every module: {', '.join(names)}")

        files = {"dataset.json": path / "dataset.json", "plans.json": path / "plans.json"}
        files.update({f"fold_{f}/{CHECKPOINT}": path / f"fold_{f}" / CHECKPOINT for f in folds})
        sha = {k: sha256_file(p) for k, p in files.items()}
        version = hashlib.sha256(json.dumps(sha, sort_keys=True).encode()).hexdigest()[:12]
        name = str(plans.get("dataset_name", dataset_json.get("name", path.parent.name)))
        adapter = cls(name=name, version=version, labels=labels, layer=chosen, files_sha256=sha,
                      predictor=predictor, folds=folds, step_size=step_size, use_mirroring=use_mirroring)
        return adapter

    @staticmethod
    def _json(p: Path) -> dict[str, Any]:
        try:
            out = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise AdapterError(f"{p} is not JSON: {e}") from e
        if not isinstance(out, dict):
            raise AdapterError(f"{p} is not a JSON object")
        return out

    @staticmethod
    def _folds(path: Path, folds: Any) -> tuple[int | str, ...]:
        if folds is None:
            found = sorted(int(d.name[5:]) for d in path.glob("fold_*")
                           if d.name[5:].isdigit() and (d / CHECKPOINT).is_file())
            if not found:
                raise AdapterError(f"nnU-Net model folder {path}: missing fold_*/{CHECKPOINT} (no trained fold)")
            return tuple(found)
        if isinstance(folds, (int, str)):
            folds = [folds]
        out: list[int | str] = []
        for f in folds:
            if not (f == "all" or (isinstance(f, int) and f >= 0) or (isinstance(f, str) and f.isdigit())):
                raise AdapterError(f"fold {f!r} is not a fold number or 'all'")
            fold: int | str = f if f == "all" else int(f)
            if not (path / f"fold_{fold}" / CHECKPOINT).is_file():
                raise AdapterError(f"nnU-Net model folder {path}: missing fold_{fold}/{CHECKPOINT}")
            out.append(fold)
        if not out:
            raise AdapterError("folds is empty")
        return tuple(out)

    @staticmethod
    def _labels(path: Path, dataset_json: dict[str, Any]) -> tuple[Label, ...]:
        raw = dataset_json.get("labels")
        if not isinstance(raw, dict) or not raw:
            raise AdapterError(f"{path / 'dataset.json'}: no 'labels'")
        out = []
        for name, value in raw.items():
            if not isinstance(value, int):
                raise AdapterError(f"{path / 'dataset.json'}: label {name!r} is {value!r}: region-based models "
                                   "are not supported")
            if value != 0:
                out.append(Label(value, str(name)))
        values = sorted(lab.value for lab in out)
        if values != list(range(1, len(values) + 1)):
            raise AdapterError(f"{path / 'dataset.json'}: label values {values} are not 1..{len(values)}")
        return tuple(sorted(out, key=lambda lab: lab.value))

    @staticmethod
    def _saved(path: Path, fold: int | str) -> dict[str, Any]:
        """One fold's checkpoint as nnU-Net reads it (a pickle: nnU-Net's own ``torch.load``, weights_only
        False); :class:`AdapterError` naming the file when it is not an nnU-Net checkpoint."""
        ck = path / f"fold_{fold}" / CHECKPOINT
        try:
            saved = torch.load(ck, map_location="cpu", weights_only=False)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, struct.error) as e:
            raise AdapterError(f"nnU-Net model folder {path}: fold_{fold}/{CHECKPOINT} is not a readable PyTorch "
                               f"checkpoint: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
        missing = [k for k in ("network_weights", "trainer_name", "init_args") if not isinstance(saved, dict)
                   or k not in saved]
        if missing:
            raise AdapterError(f"nnU-Net model folder {path}: fold_{fold}/{CHECKPOINT} is not an nnU-Net checkpoint "
                               f"(no {', '.join(repr(k) for k in missing)})")
        return dict(saved)

    @classmethod
    def _unreadable(cls, path: Path, folds: tuple[int | str, ...], error: BaseException) -> AdapterError:
        """What nnU-Net's loader stumbled on: the first fold whose checkpoint does not read, or its message."""
        for fold in folds:
            try:
                cls._saved(path, fold)
            except AdapterError as e:
                return e
        return AdapterError(f"nnU-Net model folder {path} (folds {list(folds)}): the checkpoint cannot be loaded "
                            f"against plans.json: {type(error).__name__}: {str(error)[:800]}")

    @classmethod
    def _mismatch(cls, path: Path, fold: int | str, plans: dict[str, Any], dataset_json: dict[str, Any],
                  mismatch: StateDictMismatch) -> AdapterError:
        """A fold's weights against the network nnU-Net built from ``plans.json`` (the checkpoint's
        configuration) and ``dataset.json`` (one output per label): which file, which network, and when the
        checkpoint shows it, the number of stages or of classes that differs."""
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        saved = cls._saved(path, fold)
        weights = saved["network_weights"]
        configuration = str(saved["init_args"].get("configuration", "?"))
        names = [str(n) for n in dataset_json.get("labels", {})]
        hints = []
        try:
            cm = PlansManager(plans).get_configuration(configuration)
            kw = dict(cm.network_arch_init_kwargs)
            network = f"{cm.network_arch_class_name.rsplit('.', 1)[-1]} with n_stages {kw.get('n_stages')}, " \
                      f"features_per_stage {kw.get('features_per_stage')}"
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError):
            kw, network = {}, "?"
        stages = {k.split(".")[2] for k in weights if k.startswith("encoder.stages.") and k.count(".") > 2}
        if stages and isinstance(kw.get("n_stages"), int) and len(stages) != kw["n_stages"]:
            hints.append(f"the checkpoint has {len(stages)} encoder stages, plans.json {kw['n_stages']}")
        heads = sorted((k for k in weights if k.startswith("decoder.seg_layers.") and k.endswith(".weight")),
                       key=lambda k: int(k.split(".")[2]) if k.split(".")[2].isdigit() else -1)
        if heads and names and int(weights[heads[-1]].shape[0]) != len(names):
            hints.append(f"the checkpoint's segmentation head gives {int(weights[heads[-1]].shape[0])} classes, "
                         f"dataset.json's labels are {len(names)} ({', '.join(names)})")
        return AdapterError(f"{path / f'fold_{fold}' / CHECKPOINT} does not match the network of plans.json and "
                            f"dataset.json (configuration {configuration!r}: {network}; {len(names)} classes): "
                            + "; ".join([*hints, mismatch.summary()]))

    @staticmethod
    def _configuration_name(predictor: Any) -> str:
        """The name of the configuration nnU-Net took from the checkpoint (``init_args``); the predictor
        keeps only its content."""
        pm, cfg = predictor.plans_manager, predictor.configuration_manager.configuration
        for name in pm.available_configurations:
            if pm.get_configuration(name).configuration == cfg:
                return str(name)
        raise AdapterError(f"the checkpoint's configuration is none of plans.json's {pm.available_configurations}")

    @staticmethod
    def _check_all_folds(path: Path, predictor: Any, folds: tuple[int | str, ...]) -> None:
        """nnU-Net loads only the first fold's weights into the network at start; a later fold that does
        not match the plans would fail in the middle of a study. Load each once here."""
        for fold, params in zip(folds, predictor.list_of_parameters, strict=True):
            try:
                predictor.network.load_state_dict(params)
            except RuntimeError as e:
                mismatch = StateDictMismatch.parse(e)
                if mismatch is None:
                    raise AdapterError(f"{path / f'fold_{fold}' / CHECKPOINT} does not match the network of "
                                       f"plans.json: {str(e)[:800]}") from e
                raise NnUNetAdapter._mismatch(path, fold, predictor.plans_manager.plans, predictor.dataset_json,
                                              mismatch) from e
        predictor.network.load_state_dict(predictor.list_of_parameters[0])

    @property
    def spacing(self) -> tuple[float, ...]:
        """The spacing (mm) the network expects, from ``plans.json``, in nnU-Net's (transposed) axis order:
        (z, y, x) for SimpleITK's reader with ``transpose_forward`` [0, 1, 2]."""
        return tuple(float(s) for s in self.predictor.configuration_manager.spacing)

    # ------------------------------------------------------------------------------------------------
    # predicting

    def network_input(self, image: np.ndarray, spacing: Sequence[float], modality: str) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
        """nnU-Net's preprocessed ``data`` (1, ...) and ``properties`` for ``image`` (z, y, x), and the body
        mask on the same (unpadded) network grid."""
        if image.ndim != 3:
            raise ValueError(f"image must be (z, y, x), got shape {image.shape}")
        sp = [float(s) for s in spacing]
        if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
            raise ValueError(f"spacing must be three positive mm values (z, y, x), got {tuple(spacing)!r}")
        if not modality:
            raise ValueError("modality is empty")
        img = np.asarray(image, np.float32)
        pm, cm = self.predictor.plans_manager, self.predictor.configuration_manager
        pre = cm.preprocessor_class(verbose=False)
        data, _, props = pre.run_case_npy(img[None], None, {"spacing": sp}, pm, cm, self.predictor.dataset_json)
        # the body (module docstring, rule 4): nnU-Net's transpose and crop, then the network grid's shape
        src = img.transpose(pm.transpose_forward)
        bbox = props["bbox_used_for_cropping"]
        src = src[tuple(slice(int(a), int(b)) for a, b in bbox)]
        idx = [_nearest_index(n, int(m)) for n, m in zip(src.shape, data.shape[1:], strict=True)]
        on_grid = src[np.ix_(*idx)]
        if modality.upper() == "CT":
            on_grid = (np.clip(on_grid, -1000.0, 1000.0) + 1000.0) / 2000.0
        mask = body_mask(on_grid, modality)
        return data, props, mask

    def predict(self, image: np.ndarray, spacing: Sequence[float], modality: str) -> Prediction:
        import time

        t0 = time.perf_counter()
        data, props, mask = self.network_input(image, spacing, modality)
        t1 = time.perf_counter()
        timings = {"preprocess_and_body": t1 - t0}
        p = self.predictor
        mirrors = _mirror_combinations(p.allowed_mirroring_axes if self.use_mirroring else None)
        recorder = _WindowRecorder(self.layer, mirrors, mask, p.configuration_manager.patch_size)
        module = dict(p.network.named_modules())[self.layer]
        handle = module.register_forward_hook(recorder.hook)
        p.recorder = recorder
        try:
            logits = p.predict_logits_from_preprocessed_data(torch.from_numpy(data))
        finally:
            p.recorder = None
            handle.remove()
        t2 = time.perf_counter()
        assert recorder.gram is not None
        grid = [int(n) for n in data.shape[1:]]
        del data
        labels, foreground = self._export(logits, props)
        del logits
        t3 = time.perf_counter()
        gram = recorder.gram
        evidence = {"format": self.format, "layer": self.layer, "network_grid": grid,
                    "sliding_window_grid": list(gram.shape), "windows": len(gram.windows),
                    "mirrored_passes": len(mirrors), "folds": list(self.folds), "fold_rule": FOLD_RULE,
                    "bbox_used_for_cropping": [list(map(int, b)) for b in props["bbox_used_for_cropping"]],
                    "body_voxels": int(mask.sum())}
        return Prediction(labels=np.ascontiguousarray(labels), foreground=np.ascontiguousarray(foreground),
                          signature=gram.signature(), gram=gram.gram / max(gram.n_voxels, 1),
                          n_signature_voxels=gram.n_voxels, evidence=evidence,
                          timings={**timings, "inference_and_signature": t2 - t1, "export": t3 - t2})

    def _resample_back(self, channels: torch.Tensor, props: dict[str, Any]) -> np.ndarray:
        """nnU-Net's ``resampling_fn_probabilities`` from the network grid to the cropped original shape,
        with the arguments ``convert_predicted_logits_to_segmentation_with_correct_shape`` passes."""
        pm, cm = self.predictor.plans_manager, self.predictor.configuration_manager
        shape = props["shape_after_cropping_and_before_resampling"]
        spacing_t = [props["spacing"][i] for i in pm.transpose_forward]
        current = cm.spacing if len(cm.spacing) == len(shape) else [spacing_t[0], *cm.spacing]
        out = cm.resampling_fn_probabilities(channels, shape, current, spacing_t)
        return np.asarray(out.numpy() if isinstance(out, torch.Tensor) else out)

    def _uncrop(self, a: np.ndarray, props: dict[str, Any], dtype: Any) -> np.ndarray:
        from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

        full = np.zeros(props["shape_before_cropping"], dtype=dtype)
        full = insert_crop_into_image(full, a, props["bbox_used_for_cropping"])
        return np.asarray(full).transpose(self.predictor.plans_manager.transpose_backward)

    def _export(self, logits: torch.Tensor, props: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """The label map and 1 - P(background) on the source grid, one class at a time (module docstring,
        Memory): each class's logits through nnU-Net's resampling, a running argmax (strict ``>``: ties
        stay with the earlier class, as numpy's ``argmax`` in nnU-Net's ``convert_logits_to_segmentation``)
        and a running log-sum-exp (max ``m``, sum ``s`` of ``exp(l - m)``) for the softmax nnU-Net's
        ``apply_inference_nonlin`` takes of the same resampled logits."""
        lm = self.predictor.label_manager
        dtype = np.uint8 if len(lm.foreground_labels) < 255 else np.uint16
        r0 = m = s = seg = None
        for c in range(logits.shape[0]):
            r = self._resample_back(logits[c:c + 1], props)[0]
            if r0 is None or m is None or s is None or seg is None:
                r0, m = r, r.astype(np.float32)
                s, seg = np.ones(r.shape, np.float32), np.zeros(r.shape, dtype)
                continue
            diff = r.astype(np.float32)
            del r
            diff -= m
            better = diff > 0
            seg[better] = c
            e = np.exp(-np.abs(diff))
            np.multiply(s, e, out=s, where=better)  # rescale the sum to the new maximum, then add exp(0)
            np.add(s, 1.0, out=s, where=better)
            np.add(s, e, out=s, where=~better)
            np.add(m, diff, out=m, where=better)
            del diff, better, e
        assert r0 is not None and m is not None and s is not None and seg is not None
        np.subtract(r0, m, out=m)  # m := l_background - max
        np.exp(m, out=m)
        m /= s
        del s
        fg = (1.0 - m).astype(np.float16)
        del m
        return self._uncrop(seg, props, dtype), self._uncrop(fg, props, np.float16)

    def signature_settings(self) -> dict[str, Any]:
        p = self.predictor
        cm = p.configuration_manager
        mirrors = p.allowed_mirroring_axes if self.use_mirroring else None
        return {"format": self.format, "layer": self.layer, "configuration": self.configuration,
                "trainer": p.trainer_name, "plans": p.plans_manager.plans_name, "folds": list(self.folds),
                "spacing": [float(s) for s in cm.spacing], "patch_size": [int(s) for s in cm.patch_size],
                "step_size": self.step_size, "gaussian": True,
                "mirroring_axes": None if mirrors is None else [int(a) for a in mirrors],
                "ownership_rule": OWNERSHIP_RULE, "fold_rule": FOLD_RULE,
                "body_rule": f"{BODY_RULE}+{BODY_GRID_RULE}"}
