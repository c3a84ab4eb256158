"""model.adapters: the format registry opens each format lazily and says which package a format needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.adapters import FORMATS, AdapterError, adapter_class, open_adapter
from model.adapters.segnet import SegNetAdapter


def test_the_four_formats_are_registered_and_segnet_opens() -> None:
    assert sorted(FORMATS) == ["monai-bundle", "nnunet-v2", "segnet", "torchscript"]
    assert adapter_class("segnet") is SegNetAdapter
    adapter = open_adapter("segnet", _shipped())
    assert adapter.format == "segnet" and adapter.labels and adapter.files_sha256


def _shipped() -> Path:
    from model import weights

    return Path(weights.WEIGHTS_PATH)


def test_a_format_whose_library_is_missing_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "needs_lib_adapter.py").write_text("import specgate_absent_library.bundle\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(FORMATS, "lib-format", "needs_lib_adapter:Adapter")
    with pytest.raises(AdapterError, match=r"model format 'lib-format' needs the Python package "
                                           r"'specgate_absent_library', which is not installed "
                                           r"\(pip install specgate_absent_library\)"):
        open_adapter("lib-format", tmp_path)


def test_a_format_whose_adapter_module_is_absent_or_wrong_is_refused(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(FORMATS, "gone", "model.adapters.gone_adapter:GoneAdapter")
    with pytest.raises(AdapterError, match="model format 'gone' is not available in this installation of specgate "
                                           r"\(its adapter module model.adapters.gone_adapter is missing\)"):
        adapter_class("gone")
    monkeypatch.setitem(FORMATS, "not-adapter", "pathlib:Path")
    with pytest.raises(AdapterError, match="pathlib:Path is not a ModelAdapter"):
        adapter_class("not-adapter")
    with pytest.raises(AdapterError, match="unknown model format 'onnx'; formats are "):
        open_adapter("onnx", tmp_path)
