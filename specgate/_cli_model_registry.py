"""``specgate model register | list`` and what ``fit-ood NAME`` and ``evaluate NAME`` do with a registered
model: the hospital's own models in the ledger (:mod:`ledger.models`), opened with their format's own loader
(:func:`model.adapters.open_adapter`). The commands are added to ``specgate model`` by
:func:`specgate._cli_model.register`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from ._context import AppContext, operator, pass_app

if TYPE_CHECKING:
    from ledger.schema import RegisteredModel
    from model.adapters.base import Label, ModelAdapter
    from model.bank_fit import BankCase, Regrids
    from model.data.volumes import Case
    from model.ood import SpectralGate

__all__ = ["SiteDataset", "announce_regrids", "fit_registered", "list_cmd", "open_evaluated", "read_codes",
           "register_cmd", "resolve_device", "scanner_regrids", "synthetic_volume"]


def resolve_device(name: str) -> str:
    """``auto``: CUDA when there is one, else the CPU; a CUDA device that is not there is refused."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise click.BadParameter(f"{name!r}: no CUDA device is available", param_hint="--device")
    return name


#: format -> the option of `register` that names its file or folder
_FORMAT_OPTIONS = {"segnet": "--segnet", "torchscript": "--torchscript", "monai-bundle": "--monai-bundle",
                   "nnunet-v2": "--nnunet"}
_SNOMED = "SCT"
#: fewer numbers than this in a signature (channels of its layer) and ``register`` warns
NARROW_SIGNATURE = 8


def _verhoeff_ok(digits: str) -> bool:
    """The Verhoeff check digit that ends every SNOMED CT identifier."""
    d = ((0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 3, 4, 0, 6, 7, 8, 9, 5), (2, 3, 4, 0, 1, 7, 8, 9, 5, 6),
         (3, 4, 0, 1, 2, 8, 9, 5, 6, 7), (4, 0, 1, 2, 3, 9, 5, 6, 7, 8), (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
         (6, 5, 9, 8, 7, 1, 0, 4, 3, 2), (7, 6, 5, 9, 8, 2, 1, 0, 4, 3), (8, 7, 6, 5, 9, 3, 2, 1, 0, 4),
         (9, 8, 7, 6, 5, 4, 3, 2, 1, 0))
    p = ((0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 5, 7, 6, 2, 8, 3, 0, 9, 4), (5, 8, 0, 3, 7, 9, 6, 1, 4, 2),
         (8, 9, 1, 6, 0, 4, 3, 5, 2, 7), (9, 4, 5, 3, 1, 2, 6, 8, 7, 0), (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
         (2, 7, 9, 3, 8, 0, 6, 4, 1, 5), (7, 0, 4, 6, 9, 1, 3, 2, 5, 8))
    c = 0
    for i, ch in enumerate(reversed(digits)):
        c = d[c][p[i % 8][int(ch)]]
    return c == 0


def _snomed_code(code: str, where: str) -> str:
    code = code.strip()
    if not (code.isdigit() and 6 <= len(code) <= 18 and _verhoeff_ok(code)):
        raise click.BadParameter(f"{where}: {code!r} is not a SNOMED CT identifier (6-18 digits ending in a "
                                 "Verhoeff check digit)", param_hint="--codes")
    return code


def read_codes(path: Path, labels: tuple[Label, ...]) -> dict[str, list[str]]:
    """A label -> SNOMED CT mapping file: JSON (``{"liver": "10200004"}`` or ``{"liver": {"code":
    "10200004", "meaning": "Liver"}}``) or CSV (``label,code[,meaning]``, an optional header row). A label
    is named by the model's name for it or by its value. Returns ``{label name: [code, "SCT", meaning]}``
    (the code triple of ``worker.anatomy``'s ``CodeMapping``; the meaning defaults to the label's name);
    refuses (``click.BadParameter``) a label the model does not have or a code that is not a SNOMED CT
    identifier, naming it."""
    by_name = {lab.name: lab.name for lab in labels} | {str(lab.value): lab.name for lab in labels}
    text = path.read_text(encoding="utf-8")
    rows: list[tuple[str, str, str | None]] = []
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise click.BadParameter(f"{path} is not valid JSON: {exc}", param_hint="--codes") from None
        if not isinstance(doc, dict):
            raise click.BadParameter(f"{path}: expected an object label -> code", param_hint="--codes")
        for key, value in doc.items():
            if isinstance(value, dict):
                rows.append((str(key), str(value.get("code", "")), value.get("meaning")))
            else:
                rows.append((str(key), str(value), None))
    else:
        for n, row in enumerate(csv.reader(io.StringIO(text))):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2:
                raise click.BadParameter(f"{path} line {n + 1}: expected label,code[,meaning], got {row!r}",
                                         param_hint="--codes")
            if n == 0 and not row[1].strip().isdigit():
                continue  # a header row
            rows.append((row[0].strip(), row[1], row[2].strip() if len(row) > 2 and row[2].strip() else None))
    out: dict[str, list[str]] = {}
    for key, code, meaning in rows:
        name = by_name.get(key)
        if name is None:
            raise click.BadParameter(f"{path}: the model has no label {key!r} (labels: "
                                     f"{', '.join(f'{lab.value}={lab.name}' for lab in labels)})", param_hint="--codes")
        out[name] = [_snomed_code(code, f"{path}, label {key!r}"), _SNOMED, meaning or name]
    return out


def _probe_spacing(settings: Mapping[str, Any], modality: str) -> tuple[float, float, float]:
    """The spacing a model expects for ``modality``, when its signature settings state one."""
    spacing = settings.get("spacing")
    if isinstance(spacing, Mapping):
        spacing = spacing.get(modality) or spacing.get(modality.upper())
    if isinstance(spacing, list | tuple) and len(spacing) == 3 and all(isinstance(v, int | float) for v in spacing):
        return float(spacing[0]), float(spacing[1]), float(spacing[2])
    return (2.0, 2.0, 2.0)


def synthetic_volume(modality: str, spacing: tuple[float, float, float],
                     shape: tuple[int, int, int] = (24, 40, 40)) -> np.ndarray:
    """A small body-like volume in native units (z, y, x): an elliptic body in air with a brighter sphere
    inside; what ``register`` runs a model on to see that it loads, runs and answers with its labels."""
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) - (n - 1) / 2 for n in shape), indexing="ij")
    body = (y / (0.42 * shape[1])) ** 2 + (x / (0.45 * shape[2])) ** 2 <= 1.0
    organ = (z / (0.3 * shape[0])) ** 2 + (y / (0.2 * shape[1])) ** 2 + (x / (0.2 * shape[2])) ** 2 <= 1.0
    air, tissue, bright = (-1000.0, 40.0, 150.0) if modality == "CT" else (0.0, 300.0, 700.0)
    vol = np.full(shape, air, dtype=np.float32)
    vol[body] = tissue
    vol[organ] = bright
    return vol


def _probe(adapter: ModelAdapter, name: str, modality: str) -> tuple[tuple[float, float, float], tuple[int, ...]]:
    """Run the model on :func:`synthetic_volume`; refuse (ClickException) an answer that is not a label map
    of the model's labels on the input grid with a finite signature."""
    from model.adapters.base import AdapterError

    spacing = _probe_spacing(adapter.signature_settings(), modality)
    image = synthetic_volume(modality, spacing)
    try:
        pred = adapter.predict(image, spacing, modality)
    except (AdapterError, RuntimeError, ValueError) as exc:
        raise click.ClickException(f"model {name!r} refused: it failed on a {modality} test volume of shape "
                                   f"{image.shape} at spacing {spacing} mm: {exc}") from exc
    allowed = {0, *(lab.value for lab in adapter.labels)}
    found = {int(v) for v in np.unique(pred.labels)}
    problems = []
    if tuple(pred.labels.shape) != image.shape:
        problems.append(f"its label map has shape {tuple(pred.labels.shape)}, the volume {image.shape}")
    if not found <= allowed:
        problems.append(f"its label map holds values {sorted(found - allowed)} that are not among its labels "
                        f"{sorted(allowed)}")
    sig = np.asarray(pred.signature, dtype=np.float64)
    if sig.ndim != 1 or sig.size == 0 or not np.all(np.isfinite(sig)):
        problems.append(f"its signature is not a finite vector (shape {sig.shape})")
    if problems:
        raise click.ClickException(f"model {name!r} refused: on a {modality} test volume " + "; ".join(problems))
    if sig.size < NARROW_SIGNATURE:
        click.echo(f"warning: the signature's layer {adapter.layer!r} gives {sig.size} numbers a study (a feature "
                   f"map {sig.size} channels wide): the gate can tell little apart with so few; pass --layer a "
                   "wider feature map before the segmentation head", err=True)
    return spacing, tuple(sorted(found))


def _format_and_path(options: Mapping[str, Path | None], spec: Path | None) -> tuple[str, Path]:
    chosen = [(fmt, path) for fmt, path in options.items() if path is not None]
    if len(chosen) != 1:
        names = " | ".join(_FORMAT_OPTIONS.values())
        given = ", ".join(_FORMAT_OPTIONS[f] for f, _ in chosen)
        raise click.UsageError(f"give exactly one of {names}" + (f" (given: {given})" if given else ""))
    fmt, path = chosen[0]
    if fmt == "torchscript" and spec is None:
        raise click.UsageError("--torchscript needs --spec FILE (input spacing, normalisation, patch size, classes)")
    if fmt != "torchscript" and spec is not None:
        raise click.UsageError(f"--spec is for --torchscript, not {_FORMAT_OPTIONS[fmt]}")
    if not path.exists():
        raise click.ClickException(f"model refused: {_FORMAT_OPTIONS[fmt]} {str(path)!r} does not exist")
    if spec is not None and not spec.is_file():
        raise click.ClickException(f"model refused: --spec {str(spec)!r} does not exist")
    return fmt, path


def _open(fmt: str, path: Path, name: str, *, layer: str | None, device: str,
          options: Mapping[str, str]) -> ModelAdapter:
    from model.adapters import AdapterError, open_adapter

    try:
        return open_adapter(fmt, path, layer=layer, device=device, **options)
    except AdapterError as exc:
        raise click.ClickException(f"model {name!r} refused: {exc}") from exc


def _open_registered(row: RegisteredModel, device: str) -> ModelAdapter:
    """A registered model's adapter, refusing one whose files changed since it was registered."""
    options = row.settings.get("open_options") or {}
    adapter = _open(row.format, Path(row.path), row.name, layer=row.layer, device=device, options=options)
    recorded, now = dict(row.files_sha256), dict(adapter.files_sha256)
    if recorded != now:
        changed = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))
        raise click.ClickException(f"model {row.name!r}: its files changed since it was registered ({', '.join(changed)}); "
                                   "register it again under a new name")
    return adapter


@click.command("register")
@click.argument("name")
@click.option("--segnet", type=click.Path(path_type=Path), default=None, help="A SegNet weights file (.pt).")
@click.option("--torchscript", type=click.Path(path_type=Path), default=None,
              help="A TorchScript file; needs --spec.")
@click.option("--spec", type=click.Path(path_type=Path), default=None,
              help="The TorchScript model's spec file (spacing, normalisation, patch size, classes).")
@click.option("--monai-bundle", "monai_bundle", type=click.Path(path_type=Path), default=None,
              help="A MONAI bundle folder (configs/, models/).")
@click.option("--nnunet", type=click.Path(path_type=Path), default=None,
              help="An nnU-Net v2 trained model folder (dataset.json, plans.json, fold_*/).")
@click.option("--layer", default=None, metavar="MODULE",
              help="Module whose output is the spectral signature [default: the format's last feature map "
                   "before the segmentation head].")
@click.option("--codes", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="SNOMED CT code per label: CSV (label,code[,meaning]) or JSON {label: code}.")
@click.option("--modality", type=click.Choice(["CT", "MR"], case_sensitive=False), default="CT",
              show_default=True, help="Modality of the test volume the model is run on.")
@click.option("--device", default="cpu", show_default=True)
@pass_app
def register_cmd(app: AppContext, name: str, segnet: Path | None, torchscript: Path | None, spec: Path | None,
                 monai_bundle: Path | None, nnunet: Path | None, layer: str | None, codes: Path | None,
                 modality: str, device: str) -> None:
    """Register a model as NAME: load it with its format's own loader, run it on a small test volume, and
    record it in the ledger (files and SHA-256, labels, layer, settings). Fit its bank next
    (``specgate model fit-ood NAME``): until then no rule may route to it."""
    from ledger import models
    from ledger.db import session_scope

    fmt, path = _format_and_path({"segnet": segnet, "torchscript": torchscript, "monai-bundle": monai_bundle,
                                  "nnunet-v2": nnunet}, spec)
    try:
        models.validate_name(name)
    except models.ModelRegistryError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from None
    if name in app.settings.models:
        raise click.ClickException(f"model name {name!r} is already configured in the settings (SPECGATE_MODELS)")
    with app.sessions()() as session:
        existing = models.get(session, name)
    if existing is not None:
        raise click.ClickException(f"a model named {name!r} is already registered ({existing.format} {existing.path}, "
                                   f"version {existing.version}); choose another name")
    options = {"spec": str(spec)} if spec is not None else {}
    adapter = _open(fmt, path, name, layer=layer, device=resolve_device(device), options=options)
    spacing, found = _probe(adapter, name, modality.upper())
    code_map = read_codes(codes, adapter.labels) if codes is not None else None
    settings = {"signature": adapter.signature_settings(), "open_options": options}
    try:
        with session_scope(app.sessions()) as session:
            row = models.register(session, name=name, version=adapter.version, format=fmt, path=str(path),
                                  files_sha256=adapter.files_sha256,
                                  labels={lab.value: lab.name for lab in adapter.labels}, layer=adapter.layer,
                                  settings=settings, codes=code_map, actor=operator())
    except models.ModelRegistryError as exc:
        raise click.ClickException(str(exc)) from None
    labels = ", ".join(f"{v}={n}" for v, n in row.labels.items())
    click.echo(f"registered {name}: {fmt} {path} version {row.version}, {len(row.files_sha256)} file(s)")
    click.echo(f"  labels: {labels}")
    click.echo(f"  layer: {row.layer}; test volume {modality.upper()} at {spacing} mm -> labels {list(found)}")
    if code_map:
        click.echo("  codes: " + ", ".join(f"{k}={v[0]}" for k, v in code_map.items()))
    click.echo(f"next: specgate model fit-ood {name} --data DIR (no rule can use it before its bank is fitted)")


def _model_dict(row: RegisteredModel) -> dict[str, Any]:
    return {"name": row.name, "state": str(row.state), "format": row.format, "version": row.version,
            "path": row.path, "layer": row.layer, "labels": row.labels, "codes": row.codes,
            "files_sha256": row.files_sha256, "bank_path": row.bank_path, "bank_sha256": row.bank_sha256,
            "registered_at": row.registered_at.isoformat(), "registered_by": row.registered_by,
            "shadow": row.shadow}


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@pass_app
def list_cmd(app: AppContext, as_json: bool) -> None:
    """List the registered models: state (registered / live; /shadow in silent mode), format, labels, bank."""
    rows = [_model_dict(r) for r in app.registered_models()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no registered models (specgate model register NAME ...)")
        return
    click.echo(f"{'NAME':<20} {'STATE':<10} {'FORMAT':<12} {'VERSION':<12} {'BANK':<14} LABELS")
    for r in rows:
        bank = r["bank_sha256"][:12] if r["bank_sha256"] else "-"
        labels = ",".join(f"{v}={n}" for v, n in r["labels"].items())
        state = f"{r['state']}{'/shadow' if r['shadow'] else ''}"
        click.echo(f"{r['name']:<20} {state:<10} {r['format']:<12} {r['version']:<12} {bank:<14} {labels}")


def _site_cases(paths: tuple[Path, ...], modality: str | None) -> Iterator[BankCase]:
    """Each image of each folder, one at a time; its training image (the bank's group) named by folder
    and case, so that two folders with the same case names stay apart."""
    from model.bank_fit import BankCase
    from model.data.volumes import iter_site_cases

    for p in paths:
        try:
            for case in iter_site_cases(p, modality):
                yield BankCase(case.image, case.spacing, case.modality, f"{p}:{case.name}")
        except ValueError as exc:  # a folder that is not a dataset, a series the worker would refuse
            raise click.BadParameter(str(exc), param_hint="--data") from None


class _Counted:
    """The site's cases as a sized iterable (the progress bar's total), loaded one at a time."""

    def __init__(self, paths: tuple[Path, ...], modality: str | None) -> None:
        self.paths, self.modality = paths, modality
        self._modalities: list[str] | None = None  # one per image

    def modalities(self) -> list[str]:
        """The modality of each image, read without its pixels."""
        if self._modalities is None:
            from model.data.volumes import site_modalities

            try:
                self._modalities = [m for p in self.paths for m in site_modalities(p, self.modality)]
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--data") from None
        return self._modalities

    def __len__(self) -> int:
        return len(self.modalities())

    def __iter__(self) -> Iterator[BankCase]:
        return _site_cases(self.paths, self.modality)


def scanner_regrids(like: tuple[Path, ...], regrids: int | None, seed: int) -> Regrids | None:
    """``--like`` folders' distinct series geometries and ``--regrids`` as a :class:`model.bank_fit.Regrids`."""
    from model.bank_fit import Regrids
    from model.data.clinical import ScannerGeometry, read_scanner_geometries

    if not like:
        if regrids is not None:
            raise click.UsageError("--regrids needs --like DIR (series from the site's scanners)")
        return None
    found: dict[tuple[str, Any], ScannerGeometry] = {}  # one grid of several folders counts once
    for folder in like:
        try:
            for g in read_scanner_geometries(folder):
                key = (g.modality, g.geometry)
                seen = found.get(key)
                found[key] = g if seen is None else dataclasses.replace(seen, series=seen.series + g.series)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--like") from None
    try:
        return Regrids(tuple(found.values()), per_image=2 if regrids is None else regrids, seed=seed)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--regrids") from None


def announce_regrids(plan: Regrids | None, modalities: Sequence[str]) -> None:
    """On stderr: the scanner geometries of ``plan``, and each modality of the training images
    (``modalities``) that none of them has (those images go into the bank at their own grid only)."""
    if plan is None:
        return
    for g in plan.geometries:
        click.echo(f"scanner geometry {g.modality} {'x'.join(map(str, g.geometry.shape))} at "
                   f"{', '.join(f'{v:g}' for v in g.geometry.spacing)} mm ({g.series} series, {g.source})",
                   err=True)
    for m in sorted(set(modalities)):
        if plan.count(m) == 0:
            click.echo(f"note: --like has no {m} series: the {m} images go into the bank at their own grid "
                       "only", err=True)


def fit_registered(app: AppContext, name: str, data: tuple[Path, ...], modality: str | None, c: float,
                   device: str, like: tuple[Path, ...] = (), regrids: int | None = None, seed: int = 0) -> None:
    from ledger import models
    from ledger.db import session_scope
    from model.bank_fit import fit_adapter_bank, regrid_total
    from model.ood import sha256_file

    with app.sessions()() as session:
        try:
            row = models.require(session, name)
        except models.ModelRegistryError as exc:
            raise click.BadParameter(str(exc), param_hint="NAME") from None
    plan = scanner_regrids(like, regrids, seed)
    adapter = _open_registered(row, device)
    cases = _Counted(data, modality.upper() if modality else None)
    announce_regrids(plan, cases.modalities())
    try:
        gate = fit_adapter_bank(adapter, cases, c=c, progress=True, regrids=plan,
                                total=regrid_total(cases.modalities(), plan),
                                meta={"data": [str(p) for p in data], "registered_model": name})
    except ValueError as exc:
        raise click.ClickException(f"model {name!r}: no bank fitted: {exc}") from exc
    folder = app.data_dir / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / ".ood-bank.partial.npz"
    gate.save(partial)
    sha = sha256_file(partial)
    bank = folder / f"ood-bank-{sha[:16]}.npz"
    os.replace(partial, bank)  # content-addressed: an earlier bank stays where the audit trail says it was
    details = {"signatures": int(gate.bank.shape[0]), "tau": gate.tau, "c": gate.c,
               "modalities": gate.meta.get("modalities"), "data": [str(p) for p in data]}
    if plan is not None:
        details["regrids"] = gate.meta["regrids"]
    with session_scope(app.sessions()) as session:
        models.set_bank(session, name, bank_path=str(bank), bank_sha256=sha, actor=operator(), details=details)
    images = gate.meta.get("images")
    click.echo(f"model {name}: bank of {gate.bank.shape[0]} signatures ({images} images"
               + (f", each also re-gridded to up to {plan.per_image} of {len(plan.geometries)} scanner geometries"
                  if plan is not None else "")
               + f"), tau={gate.tau:.4f} (c={c}) -> {bank} sha256={sha}; the model is live")


def open_evaluated(app: AppContext, name: str, device: str) -> tuple[ModelAdapter, SpectralGate]:
    """Registered model ``name`` as ``evaluate`` runs it: its adapter (the worker's path, refused when its
    files changed) and its fitted bank (refused when there is none, or when it is not this model's)."""
    from ledger import models
    from model.ood import BankMismatchError, SpectralGate

    with app.sessions()() as session:
        try:
            row = models.require(session, name)
        except models.ModelRegistryError as exc:
            raise click.BadParameter(str(exc), param_hint="NAME") from None
    if row.bank_path is None:
        raise click.ClickException(f"model {name!r} has no OOD bank yet: specgate model fit-ood {name} --data DIR")
    adapter = _open_registered(row, device)
    try:
        gate = SpectralGate.load(row.bank_path, weights_sha256=adapter.model_sha256())
        gate.check_inference(adapter.signature_settings(), "this evaluation")
    except BankMismatchError as exc:
        raise click.ClickException(f"model {name!r}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"model {name!r}: its OOD bank {row.bank_path} cannot be read: {exc}") from None
    return adapter, gate


class SiteDataset:
    """One ``--data``/``--ood`` folder in any layout :func:`model.data.volumes.iter_site_cases` reads, as a
    sized dataset whose cases load one at a time (with their ground truth where the folder has it)."""

    def __init__(self, path: Path, modality: str | None, option: str) -> None:
        from model.data.volumes import site_modalities

        self.path, self.modality = path, modality
        try:
            self._n = len(site_modalities(path, modality))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=option) from None

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[Case]:
        from model.data.volumes import iter_site_cases

        return iter_site_cases(self.path, self.modality)
