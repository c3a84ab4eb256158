"""``specgate spool prune``: remove the files of studies done with (registered in :mod:`specgate.cli`).

Which studies, which files, and what the audit trail records: :mod:`specgate.retention`.
"""

from __future__ import annotations

import sys
from datetime import timedelta

import click

from ._context import AppContext, operator, pass_app

__all__ = ["register", "spool"]


@click.group("spool")
def spool() -> None:
    """The received instances and the results kept for them."""


@spool.command("prune")
@click.option("--older-than", "days", required=True, type=click.FloatRange(min=0), metavar="DAYS",
              help="Studies whose jobs all finished (sent or rejected) more than DAYS days ago.")
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
@pass_app
def spool_prune(app: AppContext, days: float, dry_run: bool) -> None:
    """Remove the instance files and result files of studies delivered or rejected more than DAYS days ago.

    Never a study with a job held, queued, running, released or approved but not sent, or failed. Ledger
    rows are kept; each study's removal is one audit event (study.files_pruned) listing what went.
    """

    from .retention import plan, prune

    store = app.files
    older_than = timedelta(days=days)
    with app.sessions()() as session:
        plans = plan(session, store, older_than=older_than)
    for p in plans:
        click.echo(("would remove: " if dry_run else "removing: ") + p.describe())
    if dry_run:
        click.echo(f"dry run: {len(plans)} study(ies) would be pruned, nothing removed")
        return
    outcomes = prune(app.sessions(), store, app.data_dir, older_than=older_than, actor=operator(), plans=plans)
    failed = [o for o in outcomes if o.failed]
    for o in failed:
        click.echo(f"study {o.study_id}: {len(o.failed)} file(s) could not be removed, e.g. {o.failed[0]}", err=True)
    click.echo(f"pruned {len(outcomes)} study(ies), {sum(o.removed for o in outcomes)} file(s) removed"
               + (f", {len(failed)} with failures" if failed else ""))
    if failed:
        sys.exit(1)


def register(main: click.Group) -> None:
    main.add_command(spool)
