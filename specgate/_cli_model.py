"""``specgate model ...``: register the hospital's models, fit their OOD banks, train and evaluate SegNet.

- ``register NAME --segnet W | --torchscript F --spec S | --monai-bundle D | --nnunet D``: opens the model
  with its format's own loader (:func:`model.adapters.open_adapter`), runs it on a small synthetic volume,
  and records it in the ledger (:mod:`ledger.models`): files and their SHA-256, labels, layer, signature
  settings, optional SNOMED CT codes per label. ``list`` shows them.
- ``fit-ood NAME --data DIR... [--like DIR... --regrids N --seed S]``: the registered model's OOD bank,
  fitted through the adapter's ``predict`` (what the worker runs) on the site's images, each also
  re-gridded to the grids of the site's own scanners with ``--like`` (:class:`model.bank_fit.Regrids`);
  the bank goes into the data directory and its SHA-256 into the ledger, and the model becomes live.
- ``evaluate NAME --data DIR... --ood DIR...``: any registered model through its adapter and its bank
  (:func:`model.evaluate.evaluate_adapter`): DSC per label (the ground truth's labels matched by name),
  ECE/MCE, the gate's figures.
- ``experiment calibration|...``: the paper's experiments regenerated on the phantoms (JSON, Markdown made
  from it, figures): :mod:`specgate._cli_experiment`, :mod:`model.experiments`.
- ``train``, ``fit-ood --weights [--like DIR...]``, ``evaluate --weights --bank``: the SegNet of the paper
  (Karimi & Gholipour 2023), by its weights file; ``--like`` re-grids as for a registered model.

``register``, ``list`` and the registered-model halves of ``fit-ood`` and ``evaluate`` live in
:mod:`specgate._cli_model_registry`. Commands that need the settings or the ledger take the typed
:class:`specgate._context.AppContext` (:func:`specgate._context.pass_app`); the group is registered in
:mod:`specgate.cli` by :func:`register`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ._cli_model_registry import (
    SiteDataset,
    announce_regrids,
    fit_registered,
    list_cmd,
    open_evaluated,
    register_cmd,
    resolve_device,
    scanner_regrids,
)
from ._context import app_context

if TYPE_CHECKING:
    from model.data.volumes import Case, MSDDataset
    from model.ood import SpectralGate
    from model.study_inference import InferenceSettings
    from model.unet import SegNet

__all__ = ["model_group", "register"]


def _dataset_name(path: Path) -> str:
    meta = path / "dataset.json"
    if meta.is_file():
        return str(json.loads(meta.read_text()).get("name") or path.name)
    return path.name


def _load(paths: tuple[Path, ...], what: str) -> dict[str, MSDDataset | list[Case]]:
    """Datasets by name. MSD folders load one case at a time as they are iterated (a clinical-size CT is
    300 MB: a set of them never sits in memory at once); a bare folder of DICOM series is read whole."""
    from model.data.volumes import MSDDataset, iter_cases

    out: dict[str, MSDDataset | list[Case]] = {}
    for p in paths:
        name = _dataset_name(p)
        if name in out:
            raise click.BadParameter(f"two {what} datasets are named {name!r}", param_hint=f"--{what}")
        try:
            out[name] = MSDDataset(p) if (p / "dataset.json").is_file() else list(iter_cases(p))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=f"--{what}") from None
    return out


class _Chain:
    """Several datasets as one sized iterable, loaded case by case."""

    def __init__(self, parts: list[MSDDataset | list[Case]]) -> None:
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __iter__(self) -> Iterator[Case]:
        return (case for part in self.parts for case in part)

    def modalities(self) -> list[str]:
        """The modality of each image, without loading an MSD folder's images (its ``dataset.json``'s)."""
        from model.data.volumes import MSDDataset

        return [m for part in self.parts
                for m in ([part.modality] * len(part) if isinstance(part, MSDDataset) else [c.modality for c in part])]


def _parse_named(values: tuple[str, ...]) -> dict[str, Path]:
    named: dict[str, Path] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{v!r} is not NAME=PATH", param_hint="--dataset")
        p = Path(path)
        if not (p / "dataset.json").is_file():
            raise click.BadParameter(f"{path!r} is not an MSD dataset folder (no dataset.json)", param_hint="--dataset")
        if name in named:
            raise click.BadParameter(f"dataset name {name!r} given twice", param_hint="--dataset")
        named[name] = p
    return named


def _open_gate(weights: Path, bank: Path) -> SpectralGate:
    from model.ood import BankMismatchError, SpectralGate, sha256_file

    try:
        return SpectralGate.load(bank, weights_sha256=sha256_file(weights))
    except BankMismatchError as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--bank") from None


def _open_net(weights: Path, device: str) -> tuple[SegNet, dict[str, Any]]:
    from model.unet import load_weights

    try:
        return load_weights(weights, device)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--weights") from None


def _settings(meta: dict[str, Any], device: str, block: int | None, overlap: int | None,
              spacing: str | None) -> InferenceSettings:
    """The inference path: the weights' own (block, overlap, spacing per modality), then these options."""
    from model.study_inference import InferenceSettings, parse_spacing

    try:
        sp = None if spacing is None else parse_spacing(spacing)
        return InferenceSettings.for_weights(meta, device=device, block=block, overlap=overlap, spacing=sp)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--spacing") from None


_spacing_option = click.option(
    "--spacing", default=None, metavar="MOD=z,y,x;...|native",
    help="Grid the model runs on per modality, e.g. 'CT=4,4,4;MR=3,1.8,1.8', or 'native' "
         "[default: the spacing the weights declare].")


_existing_dir = click.Path(exists=True, file_okay=False, path_type=Path)
_existing_file = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.group("model")
def model_group() -> None:
    """Train the segmentation network, fit its OOD gate, evaluate it (Karimi & Gholipour 2023)."""


@model_group.command("train")
@click.option("--dataset", "datasets", multiple=True, required=True, metavar="NAME=PATH",
              help="An MSD-layout dataset (imagesTr/, labelsTr/, dataset.json); repeat for multi-task training.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for best.pt (weights), checkpoint.pt and train_log.json.")
@click.option("--block", default=96, show_default=True, help="Training block edge in voxels (CPU: try 64 or 32).")
@click.option("--batch-size", default=1, show_default=True)
@click.option("--lr", default=1e-4, show_default=True)
@click.option("--eval-every", default=2000, show_default=True, help="Iterations between evaluations.")
@click.option("--patience", default=2, show_default=True, help="Stop after this many evaluations without improvement.")
@click.option("--max-iterations", default=100_000, show_default=True)
@click.option("--max-minutes", type=float, default=None)
@click.option("--folds", default=1, show_default=True, help="Patient-wise k-fold (1: no validation split).")
@click.option("--fold", default=0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--base-features", default=14, show_default=True)
@click.option("--levels", default=4, show_default=True)
@click.option("--dropout", default=0.0, show_default=True, help="0.1 for the MC-dropout baseline.")
@click.option("--device", default="auto", show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt.")
def train_cmd(datasets: tuple[str, ...], out: Path, block: int, batch_size: int, lr: float, eval_every: int,
              patience: int, max_iterations: int, max_minutes: float | None, folds: int, fold: int, seed: int,
              base_features: int, levels: int, dropout: float, device: str, resume: bool) -> None:
    """Train one network on several datasets at once (sqrt(n) sampling)."""
    from model.data.volumes import MSDDataset
    from model.train import TrainConfig, TrainData, sampling_probabilities, train

    named = _parse_named(datasets)
    dev = resolve_device(device)
    cfg = TrainConfig(block=block, batch_size=batch_size, lr=lr, eval_every=eval_every, patience=patience,
                      max_iterations=max_iterations, max_minutes=max_minutes, seed=seed, folds=folds, fold=fold,
                      base_features=base_features, levels=levels, dropout=dropout)
    cases = {}
    for name, path in named.items():
        ds = MSDDataset(path, name)
        cases[name] = [ds[i] for i in range(len(ds))]
    probs = sampling_probabilities([len(c) for c in cases.values()])
    for (name, cs), p in zip(cases.items(), probs, strict=True):
        click.echo(f"{name}: {len(cs)} cases, drawn with p={p:.3f}")
    try:
        data = TrainData.from_cases(cases, block=block, device=dev)
        res = train(data, out, cfg, device=dev, resume=resume)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{res.iterations} iterations, best loss {res.best_loss:.4f} ({res.stopped})")
    click.echo(f"weights: {res.weights} sha256={res.weights_sha256}")


@model_group.command("fit-ood")
@click.argument("name", required=False)
@click.option("--data", "data", multiple=True, required=True, type=_existing_dir,
              help="Training images: DICOM series folders, NIfTI files, an MSD or nnU-Net v2 dataset folder; "
                   "repeatable.")
@click.option("--modality", type=click.Choice(["CT", "MR"], case_sensitive=False), default=None,
              help="Modality of bare NIfTI files (DICOM and dataset folders state their own).")
@click.option("--weights", type=_existing_file, default=None,
              help="Without NAME: a SegNet weights file that is not registered.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Without NAME: the bank file (.npz). A registered model's bank goes into the data directory.")
@click.option("--c", "c", default=2.5, show_default=True, help="tau = mean + c * std of leave-one-out OODMs.")
@click.option("--like", "like", multiple=True, type=_existing_dir,
              help="DICOM series from the site's own scanners (only their grids are read); each training "
                   "image is also re-gridded to --regrids of those of its modality. Repeatable.")
@click.option("--regrids", type=click.IntRange(min=1), default=None,
              help="With --like: scanner geometries each training image is re-gridded to [default: 2].")
@click.option("--seed", type=int, default=0, show_default=True,
              help="With --like: seeds which geometries each image gets and their scanner noise.")
@click.option("--block", type=int, default=None, help="Without NAME: sliding-window block [default: the weights'].")
@click.option("--overlap", type=int, default=None,
              help="Without NAME: sliding-window overlap [default: the weights'].")
@_spacing_option
@click.option("--device", default="auto", show_default=True)
def fit_ood_cmd(name: str | None, data: tuple[Path, ...], modality: str | None, weights: Path | None,
                out: Path | None, c: float, like: tuple[Path, ...], regrids: int | None, seed: int,
                block: int | None, overlap: int | None, spacing: str | None, device: str) -> None:
    """Fit the spectral OOD gate on the training images' signatures.

    With NAME (a registered model): every image goes through the model's own inference, exactly the
    worker's path; the bank is written into the data directory, its SHA-256 recorded in the ledger, and
    the model becomes live (a rule may route to it). With --like, each image goes into the bank at its
    own grid and re-gridded to the grids of the site's scanners, as the shipped bank is (all of one
    image's signatures count as one image for tau). Without NAME: a SegNet weights file (--weights) and
    a bank file (--out), --like alike. The bank records the inference settings; a worker running others refuses it.
    """
    if name is not None:
        given = [opt for opt, v in (("--weights", weights), ("--out", out), ("--block", block),
                                    ("--overlap", overlap), ("--spacing", spacing)) if v is not None]
        if given:
            raise click.UsageError(f"{', '.join(given)}: not for a registered model (model {name!r} runs with the "
                                   "files and settings it was registered with)")
        fit_registered(app_context(), name, data, modality, c, resolve_device(device), like=like,
                       regrids=regrids, seed=seed)
        return
    if weights is None or out is None:
        raise click.UsageError("give NAME (a registered model), or --weights and --out (a SegNet weights file)")
    from model.bank_fit import regrid_total
    from model.evaluate import fit_bank
    from model.ood import sha256_file

    plan = scanner_regrids(like, regrids, seed)
    dev = resolve_device(device)
    net, meta = _open_net(weights, dev)
    settings = _settings(meta, dev, block, overlap, spacing)
    sets = _load(data, "data")
    cases = _Chain(list(sets.values()))
    modalities = cases.modalities()
    announce_regrids(plan, modalities)
    gate = fit_bank(net, cases, sha256_file(weights), settings, c=c, device=dev, progress=True,
                    meta={"datasets": {k: len(v) for k, v in sets.items()}}, regrids=plan,
                    total=regrid_total(modalities, plan))
    gate.save(out)
    click.echo(f"bank of {gate.bank.shape[0]} signatures ({gate.meta['images']} images"
               + (f", each also re-gridded to up to {plan.per_image} of {len(plan.geometries)} scanner geometries"
                  if plan is not None else "")
               + f"), tau={gate.tau:.4f} (c={c}) -> {out}")


def _load_site(paths: tuple[Path, ...], what: str, modality: str | None) -> dict[str, SiteDataset]:
    """Datasets by name, in any layout a registered model's ``fit-ood`` reads, loaded case by case."""
    out: dict[str, SiteDataset] = {}
    for p in paths:
        name = _dataset_name(p)
        if name in out:
            raise click.BadParameter(f"two {what} datasets are named {name!r}", param_hint=f"--{what}")
        out[name] = SiteDataset(p, modality, f"--{what}")
    return out


@model_group.command("evaluate")
@click.argument("name", required=False)
@click.option("--weights", type=_existing_file, default=None, help="Without NAME: a SegNet weights file.")
@click.option("--bank", type=_existing_file, default=None, help="Without NAME: the OOD bank of those weights.")
@click.option("--data", "data", multiple=True, required=True, type=_existing_dir,
              help="In-distribution test data (MSD folder with labels, or DICOM series; with NAME also an "
                   "nnU-Net v2 raw dataset or NIfTI files); repeatable.")
@click.option("--ood", "ood", multiple=True, type=_existing_dir, help="Out-of-distribution test data; repeatable.")
@click.option("--modality", type=click.Choice(["CT", "MR"], case_sensitive=False), default=None,
              help="With NAME: modality of bare NIfTI files (DICOM and dataset folders state their own).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for metrics.json, oodm_histogram.png, reliability_*.png "
                   "[default: DATA_DIR/evaluation, DATA_DIR/evaluation/NAME for a registered model].")
@click.option("--block", type=int, default=None, help="Sliding-window block [default: the weights'].")
@click.option("--overlap", type=int, default=None, help="Sliding-window overlap [default: the weights'].")
@_spacing_option
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON instead of the table.")
def evaluate_cmd(name: str | None, weights: Path | None, bank: Path | None, data: tuple[Path, ...],
                 ood: tuple[Path, ...], modality: str | None, out: Path | None, block: int | None,
                 overlap: int | None, spacing: str | None, device: str, as_json: bool) -> None:
    """DSC/HD95/ASSD/ECE/MCE per dataset; the spectral OOD figures (OODM alone) and the gate's decisions.

    NAME: a registered model of any format with its fitted bank, run through its adapter (the worker's
    path), with the DSC of each of its labels by name; else a SegNet --weights file and its --bank.
    Metrics are computed on each image's own grid.
    """
    from model.adapters import AdapterError
    from model.evaluate import evaluate, evaluate_adapter, format_report
    from model.ood import BankMismatchError
    from model.resample import GridError

    dev = resolve_device(device)
    if name is not None:
        given = [opt for opt, v in (("--weights", weights), ("--bank", bank), ("--block", block),
                                    ("--overlap", overlap), ("--spacing", spacing)) if v is not None]
        if given:
            raise click.UsageError(f"{', '.join(given)}: not for a registered model (model {name!r} runs with the "
                                   "files, settings and bank it was registered and fitted with)")
        app = app_context()
        adapter, gate = open_evaluated(app, name, dev)
        mod = modality.upper() if modality else None
        ids, oods = _load_site(data, "data", mod), _load_site(ood, "ood", mod)
        _refuse_clash(set(ids), set(oods))
        out = out or app.data_dir / "evaluation" / name
        try:
            m = evaluate_adapter(adapter, gate, ids, oods, out_dir=out, progress=True)
        except (AdapterError, GridError) as exc:  # a case the model cannot run (the worker would fail it too)
            where = "; ".join(getattr(exc, "__notes__", []))
            raise click.ClickException(f"model {name!r} failed on {where}: {exc}") from exc
    else:
        if weights is None or bank is None:
            raise click.UsageError("give NAME (a registered model), or --weights and --bank")
        if modality is not None:
            raise click.UsageError("--modality: for a registered model (NAME)")
        net, meta = _open_net(weights, dev)
        gate = _open_gate(weights, bank)
        settings = _settings(meta, dev, block, overlap, spacing)
        try:
            gate.check_inference(settings.signature_settings(), "this evaluation")
        except BankMismatchError as exc:
            raise click.ClickException(str(exc)) from None
        if out is None:
            out = app_context().data_dir / "evaluation"
        ids_w, oods_w = _load(data, "data"), _load(ood, "ood")
        _refuse_clash(set(ids_w), set(oods_w))
        m = evaluate(net, gate, ids_w, oods_w, settings=settings, device=dev, out_dir=out)
    click.echo(json.dumps(m, indent=2, sort_keys=True) if as_json else format_report(m))
    click.echo(f"figures and metrics.json in {out}", err=True)


def _refuse_clash(ids: set[str], oods: set[str]) -> None:
    clash = ids & oods
    if clash:
        raise click.BadParameter(f"datasets {sorted(clash)} given as both --data and --ood", param_hint="--ood")


def register(main: click.Group) -> None:
    from ._cli_experiment import experiment_group

    model_group.add_command(register_cmd)
    model_group.add_command(experiment_group)
    model_group.add_command(list_cmd)
    from ._cli_shadow import promote_cmd, shadow_cmd  # silent mode (ledger.shadow)

    model_group.add_command(shadow_cmd)
    model_group.add_command(promote_cmd)
    main.add_command(model_group)
