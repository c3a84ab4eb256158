"""``specgate model experiment NAME --scale tiny|cpu|gpu --out DIR [--seeds 0,1] [--device auto]``: the
paper's experiments (:mod:`model.experiments`), each writing ``NAME.json``, ``NAME.md`` and its figures.

Every experiment takes the same options (:func:`experiment_options`); adding one is a module in
``model/experiments/`` with ``SCALES``, ``run(scale, out, seeds=, device=, progress=, log=)`` and
``rerender(out)`` (the Markdown and figures again from the JSON, for ``--report-only``), and a
three-line command here that calls :func:`run_experiment`. The group is added to ``specgate model`` by
:func:`specgate._cli_model.register`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ._cli_model_registry import resolve_device

__all__ = ["experiment_group", "experiment_options", "parse_seeds", "run_experiment"]

F = TypeVar("F", bound=Callable[..., Any])
SCALE_NAMES = ("tiny", "cpu", "gpu")


def parse_seeds(text: str | None) -> tuple[int, ...] | None:
    """``"0,1,2"`` -> ``(0, 1, 2)``; ``None`` -> ``None`` (the scale's own seeds).

    >>> parse_seeds("3, 4")
    (3, 4)
    >>> parse_seeds("1,x")
    Traceback (most recent call last):
    click.exceptions.BadParameter: '1,x' is not a comma-separated list of distinct non-negative integers
    """
    if text is None:
        return None
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        seeds = ()
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise click.BadParameter(f"{text!r} is not a comma-separated list of distinct non-negative integers",
                                 param_hint="--seeds")
    return seeds


def experiment_options(f: F) -> F:
    """The options every experiment takes."""
    for option in reversed((
        click.option("--scale", type=click.Choice(SCALE_NAMES), default="cpu", show_default=True,
                     help="tiny: a test run of seconds; cpu: a 2-core machine; gpu: the paper's settings "
                          "as far as the phantoms allow."),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
                     help="Folder for NAME.json, NAME.md and the figures."),
        click.option("--seeds", default=None, metavar="S,S,...",
                     help="Training seeds [default: the scale's]."),
        click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
        click.option("--report-only", is_flag=True,
                     help="Run nothing: write NAME.md and the figures again from OUT/NAME.json."),
    )):
        f = option(f)
    return f


def run_experiment(name: str, scale: str, out: Path, seeds: str | None, device: str, quiet: bool,
                   report_only: bool = False) -> dict[str, Any]:
    """Run ``model.experiments.<name>`` at ``scale`` (or, with ``report_only``, only make its Markdown and
    figures again from ``out/<name>.json``) and print where its report went and its Markdown."""
    mod = importlib.import_module(f"model.experiments.{name}")
    data: dict[str, Any]
    if report_only:
        if not (out / f"{name}.json").is_file():
            raise click.BadParameter(f"{out / f'{name}.json'} does not exist", param_hint="--out")
        data = mod.rerender(out)
    else:
        data = mod.run(mod.SCALES[scale], out, seeds=parse_seeds(seeds), device=resolve_device(device),
                       progress=not quiet, log=None if quiet else click.echo)
    click.echo((out / f"{name}.md").read_text())
    click.echo(f"wrote {out / f'{name}.json'}, {out / f'{name}.md'} ({data['wall_s']:.0f} s)")
    return data


@click.group("experiment")
def experiment_group() -> None:
    """Regenerate the paper's experiments on the phantoms: JSON, Markdown tables made from it, figures."""


@experiment_group.command("calibration")
@experiment_options
def calibration_cmd(scale: str, out: Path, seeds: str | None, device: str, quiet: bool, report_only: bool) -> None:
    """Table II: multi-task against single-task models (3-fold CV, DSC/HD95/ASSD/ECE/MCE, paired t-tests,
    reliability diagrams)."""
    run_experiment("calibration", scale, out, seeds, device, quiet, report_only)


@experiment_group.command("failures")
@experiment_options
def failures_cmd(scale: str, out: Path, seeds: str | None, device: str, quiet: bool, report_only: bool) -> None:
    """The gate against the model's failures: signature designs compared on the validation range, the
    choice reported on the test range (bad studies held, good ones released, bootstrap intervals, the
    layer study, OODM / tau against DSC). Runs the shipped weights on the CPU; --seeds is not used."""
    run_experiment("failures", scale, out, seeds, "cpu" if device == "auto" else device, quiet, report_only)


@experiment_group.command("ood")
@experiment_options
def ood_cmd(scale: str, out: Path, seeds: str | None, device: str, quiet: bool, report_only: bool) -> None:
    """Tables V-VI: OOD detection by the spectral gate and every baseline (accuracy, sensitivity,
    specificity, AUC with bootstrap intervals, time per study), OODM histograms, the layer study. One
    seed: the base model's (ensemble member m is trained with seed + m)."""
    parsed = parse_seeds(seeds)
    if parsed is not None and len(parsed) != 1:
        raise click.BadParameter(f"{seeds!r}: the ood experiment trains one set of models, give one seed",
                                 param_hint="--seeds")
    run_experiment("ood", scale, out, seeds, device, quiet, report_only)
