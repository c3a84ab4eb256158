"""``specgate model register`` refuses a broken model of each format through the real CLI, naming the
problem (the file, the config key, the layer), and records nothing.

The models are the formats' own (``tests/model_factories``: a MONAI bundle trained briefly with MONAI's
tools, an nnU-Net v2 folder from nnU-Net's planning and preprocessing, a traced TorchScript module with its
spec); each case breaks a copy the way a site's model arrives broken: a file left behind, weights of
another architecture, a config edited by hand, a layer name mistyped. The ledger is SQLite only here: a
refusal happens before the ledger is written, and ``test_model_registry`` runs the same refusal path on
PostgreSQL as well.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import Result
from sqlalchemy import select

from ledger import models
from ledger.schema import AuditEvent
from tests.conftest import copy_model
from tests.model_factories.torchscript_model import SPEC, write_torchscript_model

Run = Callable[..., Result]


def _edit_json(path: Path, change: Callable[[dict], None]) -> None:  # type: ignore[type-arg]
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def _arch(plans: dict) -> dict:  # type: ignore[type-arg]
    kw: dict = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]  # type: ignore[type-arg]
    return kw


def _two_stages(plans: dict) -> None:  # type: ignore[type-arg]
    """The plans of a two-stage network: the checkpoint has three."""
    _arch(plans).update(n_stages=2, features_per_stage=[4, 8], kernel_sizes=[[3, 3, 3]] * 2,
                        strides=[[1, 1, 1], [2, 2, 2]], n_conv_per_stage=[1, 1], n_conv_per_stage_decoder=[1])


@dataclass(frozen=True)
class Broken:
    """One broken model: ``fmt`` (the factory it copies), ``breaks`` (changes the copy, returns the
    arguments of ``register`` after the name), and what the message must say."""

    fmt: str
    breaks: Callable[[Path], list[str]]
    expected: tuple[str, ...]


def _bundle(change: Callable[[Path], object], *extra: str) -> Callable[[Path], list[str]]:
    def breaks(d: Path) -> list[str]:
        change(d)
        return ["--monai-bundle", str(d), *extra]
    return breaks


def _nnunet(change: Callable[[Path], object], *extra: str) -> Callable[[Path], list[str]]:
    def breaks(d: Path) -> list[str]:
        change(d)
        return ["--nnunet", str(d), *extra]
    return breaks


def _ts(spec: str | None, *extra: str, model: str = "net.ts", junk: bool = False) -> Callable[[Path], list[str]]:
    def breaks(d: Path) -> list[str]:
        if spec is not None:
            (d / "spec.toml").write_text(spec)
        if junk:
            (d / model).write_bytes(b"not a TorchScript file")
        return ["--torchscript", str(d / model), "--spec", str(d / "spec.toml"), *extra]
    return breaks


def _unlink(rel: str) -> Callable[[Path], object]:
    return lambda d: (d / rel).unlink()


def _write(rel: str, text: str) -> Callable[[Path], object]:
    return lambda d: (d / rel).write_text(text)


def _yaml_config(d: Path) -> None:
    """A bundle whose config is YAML (the zoo ships both), with an indentation slip."""
    (d / "configs" / "inference.json").unlink()
    (d / "configs" / "inference.yaml").write_text("network_def:\n  _target_: UNet\n   spatial_dims: 3\n")


def _nothing(d: Path) -> None:
    return None


def _no_checkpoints(d: Path) -> None:
    for f in d.glob("fold_*/checkpoint_final.pth"):
        f.unlink()


CFG = "configs/inference.json"
CASES: dict[str, Broken] = {
    # MONAI bundle
    "bundle without models/model.pt": Broken("monai", _bundle(_unlink("models/model.pt")),
                                             ("missing models/model.pt",)),
    "bundle without metadata.json": Broken("monai", _bundle(_unlink("configs/metadata.json")),
                                           ("missing configs/metadata.json",)),
    "bundle without an inference config": Broken("monai", _bundle(_unlink(CFG)),
                                                 ("missing configs/inference.json (or .yaml)",)),
    "bundle with broken JSON": Broken("monai", _bundle(_write(CFG, '{"network_def": {"_target_": "UNet",')),
                                      ("configs/inference.json: the inference config cannot be parsed",
                                       "line 1 column")),
    "bundle with broken YAML": Broken("monai", _bundle(_yaml_config),
                                      ("configs/inference.yaml: the inference config cannot be parsed",
                                       "line 3")),
    "bundle with an unknown network class": Broken(
        "monai", _bundle(lambda d: _edit_json(d / CFG, lambda c: c["network_def"].update(_target_="NoSuchNet"))),
        ("configs/inference.json: 'network_def' cannot be instantiated", "NoSuchNet")),
    "bundle with a bad network argument": Broken(
        "monai", _bundle(lambda d: _edit_json(d / CFG, lambda c: c["network_def"].update(no_such_argument=1))),
        ("'network_def' cannot be instantiated", "no_such_argument")),
    "bundle with a dangling reference": Broken(
        "monai", _bundle(lambda d: _edit_json(d / CFG, lambda c: c["network_def"].update(out_channels="@nope"))),
        ("'network_def' cannot be instantiated", "@nope")),
    "bundle without network_def": Broken(
        "monai", _bundle(lambda d: _edit_json(d / CFG, lambda c: c.pop("network_def"))),
        ("configs/inference.json: the inference config has no 'network_def'",)),
    "bundle weights of other channels": Broken(
        "monai", _bundle(lambda d: _edit_json(d / CFG, lambda c: c["network_def"].update(channels=[4, 8, 16]))),
        ("models/model.pt: does not match network_def (UNet of inference.json)", "model.0.conv.unit0.conv.weight")),
    "bundle weights that are not a checkpoint": Broken(
        "monai", _bundle(lambda d: (d / "models" / "model.pt").write_bytes(b"not a checkpoint")),
        ("models/model.pt: not a PyTorch checkpoint",)),
    "bundle layer that does not exist": Broken("monai", _bundle(_nothing, "--layer", "nope"),
                                               ("layer 'nope' does not exist in the bundle's UNet",
                                                "the default is 'model.2.0'")),
    # nnU-Net v2
    "nnU-Net without plans.json": Broken("nnunet", _nnunet(_unlink("plans.json")), ("missing plans.json",)),
    "nnU-Net without dataset.json": Broken("nnunet", _nnunet(_unlink("dataset.json")), ("missing dataset.json",)),
    "nnU-Net without a checkpoint": Broken("nnunet", _nnunet(_no_checkpoints),
                                           ("missing fold_*/checkpoint_final.pth (no trained fold)",)),
    "nnU-Net plans.json that is not JSON": Broken("nnunet", _nnunet(_write("plans.json", "{plans")),
                                                  ("plans.json is not JSON",)),
    "nnU-Net checkpoint of other features": Broken(
        "nnunet", _nnunet(lambda d: _edit_json(d / "plans.json",
                                               lambda p: _arch(p).update(features_per_stage=[8, 16, 32]))),
        ("fold_0/checkpoint_final.pth does not match the network of plans.json and dataset.json",
         "PlainConvUNet with n_stages 3, features_per_stage [8, 16, 32]",
         "encoder.stages.0.0.convs.0.conv.weight is [4, 1, 3, 3, 3] in the checkpoint, [8, 1, 3, 3, 3] in the network")),
    "nnU-Net checkpoint of more stages": Broken(
        "nnunet", _nnunet(lambda d: _edit_json(d / "plans.json", _two_stages)),
        ("fold_0/checkpoint_final.pth does not match the network of plans.json",
         "the checkpoint has 3 encoder stages, plans.json 2")),
    "nnU-Net checkpoint of fewer classes": Broken(
        "nnunet", _nnunet(lambda d: _edit_json(d / "dataset.json", lambda j: j["labels"].update(spleen=2))),
        ("fold_0/checkpoint_final.pth does not match the network of plans.json and dataset.json",
         "the checkpoint's segmentation head gives 2 classes, dataset.json's labels are 3 (background, liver, "
         "spleen)")),
    "nnU-Net later fold of another network": Broken(
        "nnunet", _nnunet(lambda d: _replace_weights(d / "fold_1" / "checkpoint_final.pth")),
        ("fold_1/checkpoint_final.pth does not match the network of plans.json", "missing from the checkpoint")),
    "nnU-Net checkpoint that is not one": Broken(
        "nnunet", _nnunet(lambda d: (d / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")),
        ("fold_0/checkpoint_final.pth is not a readable PyTorch checkpoint",)),
    "nnU-Net layer that does not exist": Broken("nnunet", _nnunet(_nothing, "--layer", "nope"),
                                                ("layer 'nope' does not exist in PlainConvUNet",
                                                 "the default is 'decoder.stages.1'")),
    # TorchScript
    "TorchScript spec without spacing": Broken(
        "torchscript", _ts(SPEC.replace("spacing = { CT = [4.0, 4.0, 4.0] }\n", "")),
        ("spec.toml gives no input spacing", "[input] spacing")),
    "TorchScript spacing of two axes": Broken(
        "torchscript", _ts(SPEC.replace("[4.0, 4.0, 4.0]", "[4.0, 4.0]")),
        ("spec.toml: [input] spacing", "got [4.0, 4.0]")),
    "TorchScript spec that is not TOML": Broken("torchscript", _ts(SPEC.replace("[input]", "[input")),
                                                ("spec.toml is not valid TOML",)),
    "TorchScript spec of other classes": Broken(
        "torchscript", _ts(SPEC.replace('"spleen"]', '"spleen", "kidney"]')),
        ("spec.toml:", "the module gives 3 output channels, the spec lists 4 classes")),
    "TorchScript file that is not one": Broken("torchscript", _ts(None, junk=True),
                                               ("net.ts is not a loadable TorchScript file",)),
    "TorchScript missing file": Broken("torchscript", _ts(None, model="gone.ts"),
                                       ("--torchscript", "gone.ts' does not exist")),
    "TorchScript layer by module name": Broken("torchscript", _ts(None, "--layer", "nope"),
                                               ("layer 'nope': a TorchScript module runs no Python forward hooks",
                                                "'output:<index>'")),
    "TorchScript layer output that does not exist": Broken("torchscript", _ts(None, "--layer", "output:5"),
                                                           ("layer output:5 does not exist",
                                                            "the module returns 2 outputs")),
}


def _replace_weights(ckpt: Path) -> None:
    """Fold 1 holds a state dict of another network (an nnU-Net checkpoint otherwise)."""
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    saved["network_weights"] = torch.nn.Conv3d(1, 2, 1).state_dict()
    torch.save(saved, ckpt)


@pytest.fixture(scope="module")
def torchscript_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    net, _spec = write_torchscript_model(tmp_path_factory.mktemp("ts"))
    return net.parent


@pytest.fixture
def source(request: pytest.FixtureRequest) -> Callable[[str], Path]:
    """The model folder of a format, built once per session (MONAI, nnU-Net) or module (TorchScript)."""
    def get(fmt: str) -> Path:
        return Path(request.getfixturevalue({"monai": "monai_bundle", "nnunet": "nnunet_model",
                                             "torchscript": "torchscript_model"}[fmt]))
    return get


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("case", list(CASES))
def test_register_refuses_a_broken_model_naming_the_problem(migrated, cli: Run, source: Callable[[str], Path],
                                                            tmp_path: Path, case: str) -> None:
    _settings, _engine, sessions = migrated
    broken = CASES[case]
    args = broken.breaks(copy_model(source(broken.fmt), tmp_path / "model"))
    result = cli("model", "register", "site-model", *args, expect=None)
    assert result.exit_code == 1, result.output
    message = " ".join(result.output.split())
    assert message.startswith("Error: model"), result.output
    assert "Traceback" not in result.output
    for expected in broken.expected:
        assert expected in message, f"{expected!r} not in {result.output}"
    # nothing recorded: no row, no audit event, and the list says so
    assert json.loads(cli("model", "list", "--json").output) == []
    with sessions() as s:
        assert models.list_models(s) == []
        assert list(s.execute(select(AuditEvent).where(AuditEvent.action == "model.registered")).scalars()) == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("fmt", ["monai", "nnunet", "torchscript"])
def test_the_unbroken_models_register(migrated, cli: Run, source: Callable[[str], Path], tmp_path: Path,
                                      fmt: str) -> None:
    """The same copies, unbroken, register: each refusal above is the breakage's, not the factory's."""
    d = copy_model(source(fmt), tmp_path / "model")
    args = {"monai": ["--monai-bundle", str(d)], "nnunet": ["--nnunet", str(d)],
            "torchscript": ["--torchscript", str(d / "net.ts"), "--spec", str(d / "spec.toml")]}[fmt]
    out = cli("model", "register", "site-model", *args).output
    assert "registered site-model:" in out
    assert [m["name"] for m in json.loads(cli("model", "list", "--json").output)] == ["site-model"]
