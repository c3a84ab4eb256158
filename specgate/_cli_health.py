"""``specgate health``: one line per dependency, exit 0 when all answer (registered in :mod:`specgate.cli`).

The checks themselves are :mod:`specgate.health`; this module selects, prints and sets the exit status.
"""

from __future__ import annotations

import json
import sys

import click

from ._context import AppContext, pass_app

__all__ = ["health_command", "register"]


@click.command("health")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of {name, ok, detail}.")
@click.option("--only", multiple=True, metavar="CHECK",
              help="Run only this check or kind (database, broker, store, spool, stow, destination[:NAME], "
                   "model[:NAME], workers); repeatable. A container's readiness probe names its own.")
@click.option("--skip", multiple=True, metavar="CHECK", help="Do not run this check or kind; repeatable.")
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(min=0.1, max=120),
              help="Seconds each check may take (opening a model: 120 s).")
@pass_app
def health_command(app: AppContext, as_json: bool, only: tuple[str, ...], skip: tuple[str, ...],
                   timeout: float) -> None:
    """Check every dependency: the ledger (reachable, at the head revision), the broker, the store
    (writable), the spool (below its watermark), each destination (C-ECHO), each model (files and bank),
    and the workers (answer a ping). One line per check, 'ok' or 'FAIL', its name and what was found;
    exit status 0 when all pass, 1 otherwise."""
    from .health import CHECK_KINDS, run_checks

    for name in (*only, *skip):
        if name.split(":", 1)[0] not in CHECK_KINDS:
            raise click.BadParameter(f"{name!r} is not a check (checks: {', '.join(CHECK_KINDS)})",
                                     param_hint="--only/--skip")
    checks = run_checks(app.settings, store_config=app.settings.store_config(), timeout_s=timeout,
                        only=only, skip=skip)
    if as_json:
        click.echo(json.dumps([c.as_dict() for c in checks], indent=2))
    else:
        for c in checks:
            click.echo(c.line())
    if not checks or not all(c.ok for c in checks):
        sys.exit(1)


def register(main: click.Group) -> None:
    main.add_command(health_command)
