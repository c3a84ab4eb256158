"""A queue per model, without a broker: queue names, which queues a worker consumes for its options, what
an attempt records as its device, and where a registered model's files are looked for."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
import torch

from ledger.models import recorded_files
from ledger.schema import RegisteredModel
from specgate._cli_worker import plan_queues
from specgate.settings import Settings, SettingsError
from worker.celery_app import segment_queue
from worker.tasks import device_label

RULES = ["default", "liver", "default"]


@pytest.mark.parametrize(("models", "queues", "served", "consumed"), [
    (None, None, ["default", "liver"], ["gpu.default", "gpu.liver", "gpu", "deliver"]),
    ("liver", None, ["liver"], ["gpu.liver"]),
    ("liver, lung", None, ["liver", "lung"], ["gpu.liver", "gpu.lung"]),
    ("liver", "deliver", ["liver"], ["gpu.liver", "deliver"]),
    ("liver", "gpu", ["liver"], ["gpu.liver", "gpu"]),  # 'gpu' with --models: those models' queues
    (None, "gpu", ["default", "liver"], ["gpu.default", "gpu.liver", "gpu"]),
    (None, "deliver", [], ["deliver"]),  # a CPU machine that only sends: no model
    (None, "gpu.lung,deliver,gpu.lung", ["lung"], ["gpu.lung", "deliver"]),
    ("liver", "gpu.lung", ["liver", "lung"], ["gpu.liver", "gpu.lung"]),
])
def test_which_queues_a_worker_consumes(models: str | None, queues: str | None, served: list[str],
                                        consumed: list[str]) -> None:
    assert plan_queues(models, queues, RULES) == (served, consumed)


@pytest.mark.parametrize(("models", "queues", "message"), [
    ("", None, "--models: names nothing"),
    ("liver,my model", None, "'my model' cannot name a queue"),
    (None, "gpu.,deliver", "'' cannot name a queue"),
    (None, "celery", "'celery' is not a queue: deliver, gpu, or gpu.MODEL"),
])
def test_a_queue_or_model_that_cannot_be_is_refused_naming_it(models: str | None, queues: str | None,
                                                               message: str) -> None:
    with pytest.raises(click.BadParameter) as err:
        plan_queues(models, queues, RULES)
    assert message in err.value.format_message()


def test_queue_names() -> None:
    assert segment_queue("liver_ct-2.v1") == "gpu.liver_ct-2.v1"
    for bad in ("", "-liver", "a" * 65, "liver ct", "liver,ct", "gpu/x"):
        with pytest.raises(ValueError, match="cannot name a queue"):
            segment_queue(bad)


def test_settings_refuse_a_model_name_that_cannot_name_a_queue() -> None:
    with pytest.raises(SettingsError, match=r"rule 'x' model: model name 'liver ct' cannot name a queue"):
        Settings.load(rules=[{"name": "x", "model": "liver ct"}])


def test_the_device_an_attempt_records() -> None:
    assert device_label("cpu") == "cpu"
    label = device_label("cuda:0")
    if torch.cuda.is_available():
        assert label.startswith(f"cuda:0 {torch.cuda.get_device_name(0)}")
    else:  # the name cannot be read: the device as configured, and why
        assert label.startswith("cuda:0 (unavailable: ")


def test_where_a_registered_models_files_are(tmp_path: Path) -> None:
    folder = tmp_path / "nnunet"
    (folder / "fold_0").mkdir(parents=True)
    row = RegisteredModel(path=str(folder), settings={"open_options": {}},
                          files_sha256={"dataset.json": "0", "fold_0/checkpoint_final.pth": "0"})
    assert recorded_files(row) == {"dataset.json": folder / "dataset.json",
                                   "fold_0/checkpoint_final.pth": folder / "fold_0" / "checkpoint_final.pth"}
    weights = tmp_path / "liver.pt"
    row = RegisteredModel(path=str(weights), settings={}, files_sha256={"liver.pt": "0"})
    assert recorded_files(row) == {"liver.pt": weights}
