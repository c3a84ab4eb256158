"""``specgate export``: held, rejected and approved studies, de-identified, for retraining (registered in
:mod:`specgate.cli`). What is written and how: :mod:`export`."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import click

from ._context import AppContext, operator, pass_app

__all__ = ["export_command", "register"]


@click.command("export")
@click.option("--held", is_flag=True, help="Results held by the gate and not yet decided.")
@click.option("--rejected", is_flag=True, help="Held results a radiologist rejected (with the reason).")
@click.option("--approved", is_flag=True, help="Held results a radiologist approved.")
@click.option("--since", required=True, type=click.DateTime(formats=["%Y-%m-%d"]),
              help="First day (UTC) the job was made, YYYY-MM-DD.")
@click.option("--until", type=click.DateTime(formats=["%Y-%m-%d"]), default=None,
              help="Last day (UTC), included [default: today].")
@click.option("--model", default=None, help="Only the jobs of this model (its name: a rule's `model`).")
@click.option("--to", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="A new (or empty) folder for the export.")
@click.option("--dates", type=click.Choice(["shift", "remove"]), default="shift", show_default=True,
              help="shift: every date moved back by one offset per patient (PS3.15 Retain Longitudinal "
                   "Temporal Information with Modified Dates); remove: the basic profile's empty or dummy dates.")
@click.option("--key-file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="The site's pseudonymisation key (32 bytes or more, kept apart from exports): successive "
                   "exports then agree on UIDs and patient pseudonyms. Default: a random key, not kept.")
@click.option("--include-notes", is_flag=True,
              help="Put the reviewers' free-text notes in the manifest (they may name a patient: read "
                   "them first). Default: only the reason from the review app's fixed list.")
@click.option("--user", default=None, help="Who exports, for the audit trail; default: operator:<login>.")
@pass_app
def export_command(app: AppContext, held: bool, rejected: bool, approved: bool, since: datetime,
                   until: datetime | None, model: str | None, out: Path, dates: str, key_file: Path | None,
                   include_notes: bool, user: str | None) -> None:
    """Write held (and rejected, approved) studies de-identified for retraining: the series and the
    specgate SEG by the DICOM Basic Application Level Confidentiality Profile (PS3.15 Annex E), UIDs
    remapped alike in images and SEG, NIfTI images and labels per modality (`specgate model train
    --dataset` and `model fit-ood --data` read DIR/CT, DIR/MR), manifest.json; one audit event with the
    user and the ledger's job ids."""
    from export import KINDS, Criteria, ExportError, Profile, Pseudonyms, run_export

    kinds = frozenset(k for k, on in zip(KINDS, (held, rejected, approved), strict=True) if on)
    if not kinds:
        raise click.UsageError("choose what to export: --held, --rejected and/or --approved")
    try:
        criteria = Criteria(kinds=kinds, since=since.date(), until=until.date() if until else None, model=model)
        pseudonyms = Pseudonyms.from_file(key_file) if key_file is not None else Pseudonyms.random()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    profile = Profile(pseudonyms=pseudonyms, dates=dates)  # type: ignore[arg-type]
    try:
        summary = run_export(app.sessions(), app.files, out, criteria, profile, actor=user or operator(),
                             key_source="file" if key_file is not None else "random",
                             include_notes=include_notes, progress=click.echo)
    except ExportError as exc:
        raise click.ClickException(str(exc)) from exc
    by_mod: dict[str, int] = {}
    for c in summary.cases:
        by_mod[c["modality"]] = by_mod.get(c["modality"], 0) + 1
    click.echo(f"exported {len(summary.cases)} studies to {summary.out} ("
               + ", ".join(f"{m}: {n}" for m, n in sorted(by_mod.items())) + f"); audit event {summary.audit_id}")
    for skipped in summary.skipped:
        click.echo(f"  left out: job {skipped['job']}: {skipped['reason']}")
    for m in sorted(by_mod):
        click.echo(f"  specgate model fit-ood NAME --data {summary.out / m}")


def register(main: click.Group) -> None:
    main.add_command(export_command)
