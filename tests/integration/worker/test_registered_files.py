"""What ``specgate worker`` hashes at start-up to see that it runs the model that was registered
(:func:`ledger.models.recorded_files`): for a model of each format, as its own loader opened it, every file
the registration hashed is found where the loader read it, with the same SHA-256, without opening the model."""

from __future__ import annotations

from pathlib import Path

import pytest

from ledger.models import recorded_files
from ledger.schema import RegisteredModel
from model.adapters import open_adapter
from model.ood import sha256_file
from tests.model_factories.torchscript_model import write_torchscript_model


def _row(fmt: str, path: Path, options: dict[str, str]) -> RegisteredModel:
    """The ledger's row as ``specgate model register`` writes it for the model at ``path``."""
    adapter = open_adapter(fmt, path, **options)
    return RegisteredModel(name="m", format=fmt, path=str(path), files_sha256=dict(adapter.files_sha256),
                           settings={"signature": adapter.signature_settings(), "open_options": options})


@pytest.mark.parametrize("fmt", ["segnet", "torchscript", "monai-bundle", "nnunet-v2"])
def test_each_recorded_file_is_found_where_its_format_read_it(fmt: str, tmp_path: Path,
                                                               request: pytest.FixtureRequest) -> None:
    options: dict[str, str] = {}
    if fmt == "segnet":
        from model import weights as shipped

        path = shipped.WEIGHTS_PATH
    elif fmt == "torchscript":
        path, spec = write_torchscript_model(tmp_path / "net")
        moved = tmp_path / "specs" / "abdomen.toml"  # the spec kept apart from the module, as sites do
        moved.parent.mkdir()
        spec.rename(moved)
        options = {"spec": str(moved)}
    else:
        path = request.getfixturevalue("monai_bundle" if fmt == "monai-bundle" else "nnunet_model")
    row = _row(fmt, path, options)
    found = recorded_files(row)
    assert set(found) == set(row.files_sha256) and len(found) >= 1
    assert {rel: sha256_file(p) for rel, p in found.items()} == row.files_sha256
