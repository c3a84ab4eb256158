"""The model formats specgate runs, by name, and :func:`open_adapter`, the one way to load a model.

A small registry (STYLE.md habit 11): each format names the class that implements
:class:`model.adapters.base.ModelAdapter` for it, as ``"module:Class"``. The module is imported only when
a model of that format is opened, so a site without MONAI or nnU-Net installed runs every other format;
opening a model whose format's library is missing raises :class:`AdapterError` naming the package to
install.

    >>> sorted(FORMATS)
    ['monai-bundle', 'nnunet-v2', 'segnet', 'torchscript']
    >>> adapter_class("onnx")
    Traceback (most recent call last):
    ...
    model.adapters.base.AdapterError: unknown model format 'onnx'; formats are monai-bundle, nnunet-v2, segnet, torchscript
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from .base import AdapterError, Label, ModelAdapter, Prediction

__all__ = ["FORMATS", "AdapterError", "Label", "ModelAdapter", "Prediction", "adapter_class", "open_adapter"]

#: format name -> "module:Class" of its adapter (imported on first use)
FORMATS: dict[str, str] = {
    "segnet": "model.adapters.segnet:SegNetAdapter",
    "torchscript": "model.adapters.torchscript:TorchScriptAdapter",
    "monai-bundle": "model.adapters.monai_bundle:MonaiBundleAdapter",
    "nnunet-v2": "model.adapters.nnunet:NnUNetAdapter",
}

# top-level module a format's library imports as -> what ``pip install`` calls it
_PIP_NAMES = {"monai": "monai", "nnunetv2": "nnunetv2", "torch": "torch", "yaml": "pyyaml"}


def adapter_class(fmt: str) -> type[ModelAdapter]:
    """The adapter class of format ``fmt``, importing its module now.

    Raises :class:`AdapterError` for an unknown format, for a format whose library is not installed
    (naming the package), and for an entry that does not name a :class:`ModelAdapter`.
    """
    entry = FORMATS.get(fmt)
    if entry is None:
        raise AdapterError(f"unknown model format {fmt!r}; formats are {', '.join(sorted(FORMATS))}")
    module_name, _, class_name = entry.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise AdapterError(f"model format {fmt!r} is not available in this installation of specgate "
                               f"(its adapter module {module_name} is missing)") from exc
        package = _PIP_NAMES.get(missing, missing)
        raise AdapterError(f"model format {fmt!r} needs the Python package {package!r}, which is not installed "
                           f"(pip install {package})") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, ModelAdapter)):
        raise AdapterError(f"model format {fmt!r}: {entry} is not a ModelAdapter")
    return cls


def open_adapter(fmt: str, path: str | os.PathLike[str], *, layer: str | None = None, device: str = "cpu",
                 **options: Any) -> ModelAdapter:
    """Load the model at ``path`` with format ``fmt``'s own loader (:meth:`ModelAdapter.open`).

    ``layer`` overrides the signature's default layer (a module name); ``options`` go to the format (a
    TorchScript model's ``spec`` file). Raises :class:`AdapterError` naming what is wrong.
    """
    return adapter_class(fmt).open(Path(path), layer=layer, device=device, **options)

