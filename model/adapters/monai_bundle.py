"""A MONAI bundle (the MONAI Model Zoo format) behind the gate, run through ``monai.bundle`` itself.

A bundle is a folder::

    configs/metadata.json            labels: network_data_format.outputs.pred.channel_def
    configs/inference.json | .yaml   network_def, preprocessing, inferer, postprocessing (ConfigParser)
    models/model.pt | models/model.ts

:meth:`MonaiBundleAdapter.open` parses the configs with :class:`monai.bundle.ConfigParser` (``bundle_root``
set to the folder, ``device`` to the adapter's device) and instantiates the bundle's own ``network_def``,
``preprocessing``, ``inferer`` and ``postprocessing``. The weights are loaded as the bundle's
``checkpointloader`` (MONAI's ``CheckpointLoader``) loads them: its ``load_path`` and ``load_dict`` from the
config, a checkpoint that is a bare state dict taken as the one entry of ``load_dict`` (as
``CheckpointLoader`` does), ``strict`` as configured (default true). The ignite handler itself is not
called (it needs an ignite engine); without a ``checkpointloader`` the weights are ``models/model.pt``
into ``network_def``. With only ``models/model.ts`` (TorchScript), its ``state_dict`` is loaded into
``network_def``: the forward hook needs the Python module, the weights are the same.

:meth:`MonaiBundleAdapter.predict` runs a study the way the bundle's ``SupervisedEvaluator`` runs a
data-loader item, with exactly these differences:

- **Skipped**: the *first* preprocessing transform when it is ``LoadImaged`` (it reads a file). In its
  place the volume is given as the ``MetaTensor`` that ``LoadImaged`` with nibabel makes of a NIfTI of
  the same image: the array in NIfTI (x, y, z) order, ``float32``, with ``affine`` and
  ``original_affine`` (RAS, :func:`ras_affine`), ``spatial_shape``, ``space`` RAS,
  ``original_channel_dim`` ``"no_channel"`` and ``filename_or_obj``. The *last* postprocessing transform
  when it is ``SaveImaged`` (it writes a file). Nothing else is skipped, reordered or re-implemented:
  the remaining preprocessing (``EnsureChannelFirstd``, ``Orientationd``, ``Spacingd``, intensity ...) runs
  as the bundle's own ``Compose`` (``start=1``), the batch goes through ``list_data_collate``, the bundle's
  inferer and ``decollate_batch``, and the postprocessing (``Activationsd``, ``Invertd`` back to the
  source grid through the recorded ``applied_operations``, ``AsDiscreted`` ...) runs as the bundle's own
  ``Compose`` on ``{"image", "pred"}``, as ``engine_apply_transform`` builds it.
- **Orientation**: ``predict`` gets a (z, y, x) array of a DICOM series (columns along the row cosine,
  rows along the column cosine, slices along the normal, in LPS). The affine is the one ``dcm2niix`` or
  MONAI's ITK reader would write for it: LPS flipped to RAS (``diag(-1, -1, 1)``), direction cosines
  identity unless ``direction`` is given. So ``Orientationd(axcodes="RAS")`` flips x and y as it does
  for the NIfTI of the same series. A NIfTI stores its affine in float32: a spacing such as 0.7 mm
  becomes 0.699999988 in a file, not here (the tests use spacings exact in float32).
- **The foreground** (``1 - P(background)``, float16) is read from ``pred`` just before the first
  ``AsDiscreted`` of the postprocessing, when the bundle's ``Activationsd`` applies ``softmax``: there
  ``pred`` is the bundle's own per-class probabilities on the source grid. Without a softmax it is the
  label map's foreground (0 or 1): the adapter does not invent probabilities the bundle does not make.

**Memory.** When the postprocessing after the softmax is exactly ``Invertd`` then ``AsDiscreted(argmax=
True)`` (the zoo's layout), the bundle's own ``Invertd`` object runs on :data:`INVERT_CHANNELS` channels of
``pred`` at a time, with a running argmax; resampling treats channels apart, so the label map is the one
the whole inversion gives (ties go to the lower channel, as ``argmax`` does; tested), and per-class
probabilities exist only on the network grid and for one chunk on the source grid. Measured on an
80x512x512 CT with the tests' bundle (2 threads): ``Invertd`` of 1 channel 4.0 s, of 4 channels 8.1 s,
both +730 MB of peak: the resampling grid MONAI builds over the source grid dominates, one channel adds
4 bytes a voxel. So 8 channels at a time: a 4-class bundle costs what the bundle's own run costs, a
105-class one does not hold 105 float32 maps at full resolution. Otherwise the postprocessing runs as
a whole.

**Signature** (:mod:`model.window_gram`). A forward hook on :attr:`MonaiBundleAdapter.layer` receives the
features of each batch of windows of the bundle's ``SlidingWindowInferer``; the windows are MONAI's own
(``dense_patch_slices`` with the inferer's scan interval, on the input padded as the inferer pads it), in
the order the inferer runs them (``sw_batch_size`` at a time), and every hook call's features must have
the window's size. Ownership: :data:`model.window_gram.OWNERSHIP_RULE` (nearest window centre per axis;
no mirrored passes: the zoo's inferers have none), whatever the bundle's blend ``mode``: the
probabilities are the inferer's own blend, the signature's features are the owner window's. A
``SimpleInferer`` is one window over the whole input.

**The body** (:data:`BODY_RULE`). The bundle's intensity transforms clip (the spleen bundle: -57 to 164
HU) so the body cannot be found in the network's input. The source volume in native units goes through
:func:`model.preprocess.preprocess` (CT: [-1000, 1000] HU -> [0, 1], what :func:`model.study_inference.body_mask`
expects), is resampled linearly onto the network input's grid (MONAI ``ResampleToMatch`` to the
preprocessed image's affine and shape), and :func:`model.study_inference.body_mask` is taken there; voxels the
inferer pads in are outside. Its cost is one more linear resampling of the source, what the bundle's own
``Spacingd`` costs (measured on an 80x512x512 CT, 2 threads: 1.4-1.5 s each).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from model.adapters.base import AdapterError, Label, ModelAdapter, Prediction, StateDictMismatch
from model.preprocess import preprocess
from model.resample import validate_spacing
from model.study_inference import BODY_RULE as SEGMENT_BODY_RULE
from model.study_inference import body_mask
from model.window_gram import OWNERSHIP_RULE, Slices, WindowGram

__all__ = ["BODY_RULE", "MonaiBundleAdapter", "default_layer", "ras_affine"]

#: the body of the signature: the source resampled onto the network input grid, then ``body_mask``
BODY_RULE = f"source-preprocess-resampled-to-network-grid+{SEGMENT_BODY_RULE}"

_LOADERS = ("LoadImaged", "LoadImage")
_SAVERS = ("SaveImaged", "SaveImage")
_CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
#: channels inverted together (see the module doc, Memory)
INVERT_CHANNELS = 8
_IMAGE, _PRED = "image", "pred"  # the keys SupervisedEvaluator's default_prepare_batch and its output use
# what instantiating a config can raise for a config that is wrong (not a bug of ours): JSON/YAML syntax,
# unknown ids or targets, bad arguments, expressions that do not evaluate
_CONFIG_ERRORS = (ValueError, KeyError, TypeError, RuntimeError, ImportError, AttributeError, SyntaxError, NameError,
                  IndexError)
# what torch.load raises for a file that is not a checkpoint: a zip torch cannot read (RuntimeError), a legacy
# file cut short (struct.error, EOFError), a pickle that weights_only refuses or that is not one (UnpicklingError)
_CHECKPOINT_ERRORS = (RuntimeError, OSError, ValueError, EOFError, struct.error, pickle.UnpicklingError)


def _syntax_errors() -> tuple[type[BaseException], ...]:
    """What reading a config file raises for bad syntax: JSON's ``ValueError`` and, when PyYAML is there
    (MONAI reads ``.yaml`` configs with it), ``yaml.YAMLError``, which is no ``ValueError``."""
    try:
        import yaml
    except ImportError:  # no PyYAML: MONAI refuses a .yaml config with an OptionalImportError (ImportError)
        return _CONFIG_ERRORS
    return (*_CONFIG_ERRORS, yaml.YAMLError)


def ras_affine(spacing: Sequence[float], direction: np.ndarray | None = None) -> np.ndarray:
    """The RAS affine of a (z, y, x) DICOM volume stored as (x, y, z), as a NIfTI of it would carry.

    ``spacing`` (z, y, x) mm; ``direction``: 3x3, rows row cosine, column cosine, slice normal (LPS);
    None: identity (an axial series). The origin is 0 (the adapter's input carries none; a shift of the
    whole grid changes no output).

    >>> ras_affine((2.0, 0.5, 0.5)).tolist()
    [[-0.5, 0.0, 0.0, 0.0], [0.0, -0.5, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    """
    d = np.eye(3) if direction is None else np.asarray(direction, np.float64)
    if d.shape != (3, 3):
        raise ValueError(f"direction must be 3x3 (row cosine, column cosine, normal), got shape {d.shape}")
    sz, sy, sx = (float(v) for v in spacing)
    aff = np.eye(4)
    aff[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ (d.T * np.array([sx, sy, sz]))  # columns: x, y, z voxel steps
    return aff


def _net_kind(net: nn.Module) -> str:
    return type(net).__name__


def default_layer(net: nn.Module) -> str:
    """The last full-resolution feature map before the segmentation head, from the network's class.

    MONAI ``UNet``: ``model.1`` is the top skip connection (the first level's features concatenated with
    the upsampled deeper ones, ``2 * channels[0]`` wide) and ``model.2`` the top up-layer that makes the
    classes of it. With ``strides[0] == 1`` the top level is at full resolution and ``model.1`` is the
    signature's layer. With ``strides[0] == 2`` (the zoo's spleen bundle) ``model.1`` is at half
    resolution, and the only full-resolution map before the head is ``model.2.0`` (the transposed conv,
    then a residual unit whose last conv is the head), which is only ``out_channels`` wide: a 2-class
    model's signature is then 2 numbers, and ``specgate model register`` warns that the layer is narrow
    (pass ``layer=``). ``SegResNet``: the
    last of ``up_layers`` (``conv_final`` follows). ``SwinUNETR``: ``decoder1`` (``out`` follows).
    Raises :class:`AdapterError` for a network whose head input is not at full resolution or whose class
    is not one of these (pass ``layer=``).
    """
    kind = _net_kind(net)
    names = {n for n, _ in net.named_modules()}
    if kind in ("UNet", "Unet"):
        strides = getattr(net, "strides", None)
        if strides is not None and len(strides) and int(strides[0]) == 1 and "model.1" in names:
            return "model.1"
        top = net.get_submodule("model.2")
        if isinstance(top, nn.Sequential) and "model.2.0" in names:
            return "model.2.0"
        raise AdapterError("this MONAI UNet (num_res_units=0) has no full-resolution feature map before its head "
                           "(model.2 is the head itself): pass layer= a module name")
    if kind in ("SegResNet", "SegResNetVAE", "SegResNetDS"):
        ups = [n for n in names if n.startswith("up_layers.") and n.count(".") == 1]
        if ups:
            return max(ups, key=lambda n: int(n.split(".")[1]))
    if kind == "SwinUNETR" and "decoder1" in names:
        return "decoder1"
    raise AdapterError(f"no default signature layer for a {kind}: pass layer= one of its modules, e.g. "
                       f"{_some_names(net)}")


def _some_names(net: nn.Module, k: int = 8) -> str:
    top = [n for n, _ in net.named_modules() if n and n.count(".") <= 1]
    return ", ".join(top[-k:])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _labels(meta: Mapping[str, Any], path: Path) -> tuple[Label, ...]:
    try:
        channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    except (KeyError, TypeError):
        raise AdapterError(f"{path}: no network_data_format.outputs.pred.channel_def: the label names are "
                           "not in the bundle") from None
    if not isinstance(channels, Mapping):
        raise AdapterError(f"{path}: channel_def must map channel numbers to names, got {channels!r}")
    labels = []
    for k, v in channels.items():
        try:
            value = int(k)
        except ValueError:
            raise AdapterError(f"{path}: channel_def key {k!r} is not a channel number") from None
        if value < 0 or not isinstance(v, str) or not v:
            raise AdapterError(f"{path}: channel_def {k!r}: {v!r} is not a label name")
        if value > 0:
            labels.append(Label(value, v))
    if not labels:
        raise AdapterError(f"{path}: channel_def {dict(channels)!r} has no label besides background (0)")
    return tuple(sorted(labels, key=lambda lab: lab.value))


class _WindowFeatures:
    """The forward hook: each call's batch of window features, in the inferer's order, into a WindowGram."""

    def __init__(self, gram: WindowGram) -> None:
        self.gram = gram
        self.next = 0
        self.error: str | None = None

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self.error is not None:
            return
        f = output[0] if isinstance(output, (tuple, list)) else output
        for item in f.detach():
            if self.next >= len(self.gram.windows):
                self.error = f"the layer ran on more than the {len(self.gram.windows)} windows"
                return
            win = self.gram.windows[self.next]
            size = tuple(s.stop - s.start for s in win)
            if tuple(item.shape[1:]) != size:
                self.error = (f"the layer's features are {tuple(item.shape[1:])} voxels for a {size} window: "
                              "choose a layer at the window's resolution")
                return
            self.gram.add(self.next, item.float())
            self.next += 1


class MonaiBundleAdapter(ModelAdapter):
    """A MONAI bundle (see the module doc). Build with :meth:`open`."""

    format: ClassVar[str] = "monai-bundle"

    def __init__(self, *, name: str, version: str, labels: tuple[Label, ...], layer: str,
                 files_sha256: Mapping[str, str], network: nn.Module, preprocessing: Any, inferer: Any,
                 postprocessing: Any, device: torch.device, amp: bool, settings: Mapping[str, Any]) -> None:
        self.name = name
        self.version = version
        self.labels = labels
        self.layer = layer
        self.files_sha256 = dict(files_sha256)
        self.network = network
        self.preprocessing = preprocessing
        self.inferer = inferer
        self.postprocessing = postprocessing
        self.device = device
        self.amp = amp
        self._settings = dict(settings)

    # ------------------------------------------------------------------------------------------------
    # open

    @classmethod
    def open(cls, path: Path, *, layer: str | None = None, device: str = "cpu", **options: Any) -> MonaiBundleAdapter:
        """Parse and load the bundle at ``path`` (see the module doc); :class:`AdapterError` naming what is wrong."""
        from monai.bundle import ConfigParser

        if options:
            raise AdapterError(f"unknown options for a MONAI bundle: {sorted(options)}")
        root = Path(path)
        if not root.is_dir():
            raise AdapterError(f"{root}: not a bundle directory")
        meta_path = root / "configs" / "metadata.json"
        if not meta_path.is_file():
            raise AdapterError(f"{root}: missing configs/metadata.json")
        cfg_path = next((root / "configs" / n for n in _CONFIG_NAMES if (root / "configs" / n).is_file()), None)
        if cfg_path is None:
            raise AdapterError(f"{root}: missing configs/inference.json (or .yaml)")
        pt, ts = root / "models" / "model.pt", root / "models" / "model.ts"
        if not pt.is_file() and not ts.is_file():
            raise AdapterError(f"{root}: missing models/model.pt (and no models/model.ts)")
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise AdapterError(f"device {device!r} is not a torch device") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise AdapterError(f"device {device!r}: no CUDA device here")

        try:
            meta = json.loads(meta_path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise AdapterError(f"{meta_path}: not JSON: {exc}") from None
        labels = _labels(meta, meta_path)

        parser = ConfigParser()
        try:
            parser.read_meta(meta_path)
            parser.read_config(cfg_path)
        except _syntax_errors() as exc:  # JSON/YAML syntax
            raise AdapterError(f"{cfg_path}: the inference config cannot be parsed: {type(exc).__name__}: "
                               f"{' '.join(str(exc).split())}") from None
        parser["bundle_root"] = str(root)
        parser["device"] = f"$torch.device({str(dev)!r})"
        for key in ("network_def", "preprocessing", "inferer", "postprocessing"):
            if key not in parser:
                raise AdapterError(f"{cfg_path}: the inference config has no {key!r}")

        def parsed(key: str) -> Any:
            try:
                return parser.get_parsed_content(key)
            except _CONFIG_ERRORS as exc:
                raise AdapterError(f"{cfg_path}: {key!r} cannot be instantiated: {type(exc).__name__}: {exc}") from None

        network = parsed("network_def")
        if not isinstance(network, nn.Module):
            raise AdapterError(f"{cfg_path}: network_def is a {type(network).__name__}, not a torch module")
        cls._load_weights(parser, parsed, network, pt, ts, cfg_path)
        network = network.to(dev).eval()
        pre, inferer, post = parsed("preprocessing"), parsed("inferer"), parsed("postprocessing")
        for key, comp in (("preprocessing", pre), ("postprocessing", post)):
            if not hasattr(comp, "transforms") or not callable(comp):
                raise AdapterError(f"{cfg_path}: {key} is a {type(comp).__name__}, not a Compose")
        infer_kind = type(inferer).__name__
        if infer_kind not in ("SlidingWindowInferer", "SimpleInferer"):
            raise AdapterError(f"{cfg_path}: inferer {infer_kind} is not supported (SlidingWindowInferer, SimpleInferer)")
        if getattr(inferer, "buffer_steps", None) or getattr(inferer, "with_coord", False):
            raise AdapterError(f"{cfg_path}: a SlidingWindowInferer with buffer_steps or with_coord is not supported")

        names = [n for n, _ in network.named_modules() if n]
        chosen = default_layer(network) if layer is None else layer
        if chosen not in names:
            near = [n for n in names if n.startswith(chosen.rsplit(".", 1)[0])][:8] or names[-8:]
            try:
                default = f" (the default is {default_layer(network)!r})"
            except AdapterError:
                default = ""
            raise AdapterError(f"layer {chosen!r} does not exist in the bundle's {_net_kind(network)}{default}; "
                               f"valid names include: {', '.join(near)}")

        evaluator = parser.get("evaluator")
        amp = bool(parsed("evaluator#amp")) if isinstance(evaluator, dict) and "amp" in evaluator else False
        files = {str(p.relative_to(root)): _sha256(p) for p in sorted(root.rglob("*"))
                 if p.is_file() and (p.parent.name in ("configs", "models") and p.parent.parent == root)}
        settings = cls._settings_of(pre, inferer, chosen, _net_kind(network))
        return cls(name=str(meta.get("name", root.name)), version=str(meta.get("version", "")), labels=labels,
                   layer=chosen, files_sha256=files, network=network, preprocessing=pre, inferer=inferer,
                   postprocessing=post, device=dev, amp=amp, settings=settings)

    @staticmethod
    def _load_weights(parser: Any, parsed: Callable[[str], Any], network: nn.Module, pt: Path, ts: Path,
                      cfg_path: Path) -> None:
        """The weights as the bundle's ``checkpointloader`` would load them (see the module doc)."""
        key, strict, load_path = "model", True, pt
        loader = parser.get("checkpointloader")
        if isinstance(loader, dict) and "load_path" in loader:
            load_path = Path(str(parsed("checkpointloader#load_path")))
            keys = list(loader.get("load_dict", {"model": None}))
            if len(keys) != 1:
                raise AdapterError(f"{cfg_path}: checkpointloader load_dict {keys} is not one network")
            key, strict = keys[0], bool(loader.get("strict", True))
        if load_path.is_file():
            try:
                ckpt = torch.load(load_path, map_location="cpu", weights_only=True)
            except _CHECKPOINT_ERRORS as exc:
                raise AdapterError(f"{load_path}: not a PyTorch checkpoint: {exc}") from None
        elif ts.is_file():
            try:
                ckpt = torch.jit.load(str(ts), map_location="cpu").state_dict()
            except (RuntimeError, OSError, ValueError) as exc:
                raise AdapterError(f"{ts}: not a TorchScript model: {exc}") from None
        else:
            raise AdapterError(f"{load_path}: missing (the bundle's checkpoint)")
        if not isinstance(ckpt, Mapping):
            raise AdapterError(f"{load_path}: holds a {type(ckpt).__name__}, not a state dict")
        if key in ckpt and isinstance(ckpt[key], Mapping):
            ckpt = ckpt[key]  # CheckpointLoader: {"model": state_dict}; else the whole file is the state dict
        try:
            network.load_state_dict(ckpt, strict=strict)
        except RuntimeError as exc:
            mismatch = StateDictMismatch.parse(exc)
            why = mismatch.summary() if mismatch is not None else str(exc)[:400]
            raise AdapterError(f"{load_path}: does not match network_def ({_net_kind(network)} of {cfg_path.name}): "
                               f"{why}") from None

    @staticmethod
    def _settings_of(pre: Any, inferer: Any, layer: str, net_kind: str) -> dict[str, Any]:
        spacing = [list(map(float, t.spacing_transform.pixdim)) for t in pre.transforms
                   if type(t).__name__ == "Spacingd"]
        orient = [str(t.ornt_transform.axcodes) for t in pre.transforms if type(t).__name__ == "Orientationd"]
        out: dict[str, Any] = {
            "format": "monai-bundle", "network": net_kind, "layer": layer,
            "preprocessing": [type(t).__name__ for t in pre.transforms],
            "spacing": spacing[-1] if spacing else None, "orientation": orient[-1] if orient else None,
            "inferer": type(inferer).__name__, "ownership": OWNERSHIP_RULE, "body": BODY_RULE, "mirrors": None,
        }
        if type(inferer).__name__ == "SlidingWindowInferer":
            out.update(roi_size=[int(v) for v in inferer.roi_size], overlap=inferer.overlap, mode=str(inferer.mode),
                       sigma_scale=inferer.sigma_scale, padding_mode=str(inferer.padding_mode), cval=float(inferer.cval))
        return json.loads(json.dumps(out, default=str))

    def signature_settings(self) -> dict[str, Any]:
        return dict(self._settings)

    # ------------------------------------------------------------------------------------------------
    # predict

    def source_tensor(self, image: np.ndarray, spacing: Sequence[float], direction: np.ndarray | None = None) -> Any:
        """The (z, y, x) volume as ``LoadImaged`` gives a NIfTI of it (see the module doc)."""
        from monai.data import MetaTensor

        vol = np.asarray(image)
        if vol.ndim != 3:
            raise ValueError(f"image must be (z, y, x), got shape {vol.shape}")
        aff = ras_affine(validate_spacing(spacing), direction)
        arr = torch.from_numpy(np.asarray(vol, np.float32).transpose(2, 1, 0))  # a view, as nibabel's (x, y, z)
        meta = {"affine": torch.as_tensor(aff, dtype=torch.float64), "original_affine": aff.copy(),
                "spatial_shape": np.array(arr.shape), "space": "RAS", "original_channel_dim": "no_channel",
                "filename_or_obj": "specgate-volume"}
        return MetaTensor(arr, meta=meta)

    def network_input(self, image: np.ndarray, spacing: Sequence[float], modality: str,
                      direction: np.ndarray | None = None) -> tuple[dict[str, Any], np.ndarray]:
        """The bundle's preprocessing of the volume (``{"image": MetaTensor}``) and the body on that grid."""
        from monai.transforms import ResampleToMatch

        src = self.source_tensor(image, spacing, direction)
        start = 1 if self.preprocessing.transforms and type(self.preprocessing.transforms[0]).__name__ in _LOADERS else 0
        data = self.preprocessing({_IMAGE: src}, start=start)
        x = data[_IMAGE]
        body_src = self.source_tensor(preprocess(np.asarray(image), modality), spacing, direction)[None]
        on_grid = ResampleToMatch(mode="bilinear", padding_mode="zeros")(body_src, img_dst=x)
        return data, body_mask(np.asarray(on_grid[0].numpy(), np.float32), modality)

    def _windows(self, shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...], list[Slices]]:
        """(padded shape, padding before each axis, windows) as the inferer makes them."""
        from monai.data.utils import dense_patch_slices
        from monai.inferers.utils import _get_scan_interval
        from monai.utils import ensure_tuple_rep, fall_back_tuple

        if type(self.inferer).__name__ == "SimpleInferer":
            return tuple(shape), (0, 0, 0), [tuple(slice(0, int(n)) for n in shape)]  # type: ignore[list-item]
        roi = fall_back_tuple(self.inferer.roi_size, list(shape))
        before = tuple(max(r - n, 0) // 2 for r, n in zip(roi, shape, strict=True))
        padded = tuple(max(int(n), int(r)) for n, r in zip(shape, roi, strict=True))
        overlap = ensure_tuple_rep(self.inferer.overlap, 3)
        scan = _get_scan_interval(padded, roi, 3, overlap)
        wins = dense_patch_slices(padded, roi, scan, return_slice=True)
        return padded, before, [(slice(int(w[0].start), int(w[0].stop)), slice(int(w[1].start), int(w[1].stop)),
                                 slice(int(w[2].start), int(w[2].stop))) for w in wins]

    def predict(self, image: np.ndarray, spacing: Sequence[float], modality: str, *,
                direction: np.ndarray | None = None) -> Prediction:
        """Segment one (z, y, x) volume in native units; ``direction`` as :func:`ras_affine` takes it."""
        from monai.data import decollate_batch, list_data_collate

        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        vol = np.asarray(image)
        with torch.no_grad():
            data, body = self.network_input(vol, spacing, modality, direction)
            timings["preprocess"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            grid = tuple(int(n) for n in data[_IMAGE].shape[1:])
            padded, before, windows = self._windows(grid)
            mask = np.zeros(padded, bool)
            mask[tuple(slice(b, b + n) for b, n in zip(before, grid, strict=True))] = body
            gram = WindowGram(padded, windows, mask)
            hook = _WindowFeatures(gram)
            handle = self.network.get_submodule(self.layer).register_forward_hook(hook)
            try:
                batch = list_data_collate([data])
                inputs = batch[_IMAGE].to(self.device)
                amp = torch.autocast("cuda") if self.amp and self.device.type == "cuda" else nullcontext()
                with amp:
                    pred = self.inferer(inputs, self.network)
            finally:
                handle.remove()
            if hook.error is not None or not gram.complete():
                raise AdapterError(f"signature layer {self.layer!r}: "
                                   f"{hook.error or f'ran on {hook.next} of {len(windows)} windows'}")
            timings["infer"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            item = {**data, _PRED: decollate_batch(pred, detach=True)[0]}
            del pred, batch, inputs
            labels, foreground, how = self._postprocess(item)
            timings["postprocess"] = time.perf_counter() - t0
        labels_zyx = labels.transpose(2, 1, 0)
        if labels_zyx.shape != vol.shape:
            raise AdapterError(f"the bundle's postprocessing gave {labels_zyx.shape[::-1]} (x, y, z), not the source "
                               f"grid {vol.shape[::-1]}: it does not invert the preprocessing (Invertd)")
        top = max(lab.value for lab in self.labels)
        out = np.ascontiguousarray(labels_zyx, dtype=np.uint8 if top < 256 else np.uint16)
        fg = np.ascontiguousarray(foreground.transpose(2, 1, 0), dtype=np.float16)
        evidence = {"network_grid": list(grid), "padded_grid": list(padded), "windows": len(windows),
                    "layer": self.layer, "body_voxels_on_grid": int(body.sum()), "postprocessing": how,
                    "skipped": self._skipped()}
        return Prediction(labels=out, foreground=fg, signature=gram.signature(), gram=gram.gram,
                          n_signature_voxels=gram.n_voxels, evidence=evidence, timings=timings)

    def _skipped(self) -> list[str]:
        out = []
        if self.preprocessing.transforms and type(self.preprocessing.transforms[0]).__name__ in _LOADERS:
            out.append(f"preprocessing[0] {type(self.preprocessing.transforms[0]).__name__}")
        post = self.postprocessing.transforms
        if post and type(post[-1]).__name__ in _SAVERS:
            out.append(f"postprocessing[{len(post) - 1}] {type(post[-1]).__name__}")
        return out

    def _postprocess(self, item: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, str]:
        """The bundle's postprocessing without its final ``SaveImaged``: (labels, foreground) in (x, y, z)."""
        post = self.postprocessing
        ts = list(post.transforms)
        end = len(ts) - 1 if ts and type(ts[-1]).__name__ in _SAVERS else len(ts)
        names = [type(t).__name__ for t in ts[:end]]
        softmax = next((i for i, t in enumerate(ts[:end]) if type(t).__name__ == "Activationsd"
                        and _PRED in t.keys and bool(t.softmax[list(t.keys).index(_PRED)])), None)
        disc = next((i for i, n in enumerate(names) if n == "AsDiscreted"), None)
        if (softmax is not None and names[softmax + 1:] == ["Invertd", "AsDiscreted"]
                and list(ts[softmax + 1].keys) == [_PRED] and self._plain_argmax(ts[softmax + 2])):
            return (*self._channelwise(item, softmax), "channelwise-invert-argmax")
        if softmax is not None and disc is not None and disc > softmax:
            item = post(item, start=0, end=disc)
            fg = 1.0 - np.asarray(item[_PRED][0], np.float32)
            item = post(item, start=disc, end=end)
            return np.asarray(item[_PRED][0]), fg, "compose"
        item = post(item, start=0, end=end)
        lab = np.asarray(item[_PRED][0])
        return lab, (lab > 0).astype(np.float16), "compose-no-softmax"

    @staticmethod
    def _plain_argmax(t: Any) -> bool:
        """An ``AsDiscreted`` on ``pred`` alone that only takes the argmax (no threshold, one-hot, rounding)."""
        if list(t.keys) != [_PRED]:
            return False
        return bool(t.argmax[0]) and t.to_onehot[0] is None and t.threshold[0] is None and t.rounding[0] is None

    def _channelwise(self, item: dict[str, Any], softmax: int) -> tuple[np.ndarray, np.ndarray]:
        """Activations, then the bundle's ``Invertd`` on :data:`INVERT_CHANNELS` channels at a time with a
        running argmax (ties to the lower channel, as ``torch.argmax``)."""
        from monai.data import MetaTensor

        post = self.postprocessing
        item = post(item, start=0, end=softmax + 1)
        probs = item[_PRED]
        k = int(probs.shape[0])
        best_p: torch.Tensor | None = None
        best_c: torch.Tensor | None = None
        fg: np.ndarray | None = None
        for c0 in range(0, k, INVERT_CHANNELS):
            part = {**item, _PRED: probs[c0:c0 + INVERT_CHANNELS].clone()}
            inv = post(part, start=softmax + 1, end=softmax + 2)[_PRED]
            p = inv.as_tensor() if isinstance(inv, MetaTensor) else torch.as_tensor(inv)
            if c0 == 0:
                fg = (1.0 - p[0]).numpy().astype(np.float16)
            val, idx = torch.max(p, dim=0)
            del p, inv
            idx = idx.to(torch.uint8 if k <= 256 else torch.int32) + c0
            if best_p is None or best_c is None:
                best_p, best_c = val, idx
                continue
            better = val > best_p
            best_p = torch.where(better, val, best_p)
            best_c = torch.where(better, idx, best_c)
        assert best_c is not None and fg is not None
        return best_c.numpy(), fg
