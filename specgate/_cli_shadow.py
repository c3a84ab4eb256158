"""``specgate model shadow NAME`` and ``specgate model promote NAME``: silent mode (:mod:`ledger.shadow`).

Registered in :mod:`specgate._cli_model` (under ``specgate model``). The side-by-side report is
``specgate report shadow`` (:mod:`ledger.reports`).
"""

from __future__ import annotations

import click

from ._context import AppContext, operator, pass_app

__all__ = ["promote_cmd", "shadow_cmd"]


def _actor(user: str) -> str:
    user = user.strip()
    if not user:
        raise click.BadParameter("who does it must be named", param_hint="--user")
    return f"user:{user}"


def _rules_naming(app: AppContext, name: str) -> list[str]:
    return [f"{r.name}{' (shadow = true in the settings)' if r.shadow else ''}"
            for r in app.settings.rules if r.model == name]


@click.command("shadow")
@click.argument("name")
@click.option("--user", required=True, help="Who puts it in shadow (audited).")
@click.option("--why", default=None, help="Why, for the audit trail.")
@pass_app
def shadow_cmd(app: AppContext, name: str, user: str, why: str | None) -> None:
    """Put registered model NAME in shadow: the rules that name it make shadow jobs beside the live ones,
    stored and scored but never sent, from the next study on."""
    from ledger import models
    from ledger.db import session_scope

    try:
        with session_scope(app.sessions()) as s:
            row = models.set_shadow(s, name, actor=_actor(user), why=why)
            state = str(row.state)
    except models.ModelRegistryError as exc:
        raise click.ClickException(str(exc)) from None
    rules = _rules_naming(app, name)
    click.echo(f"model {name} is in shadow ({state}): its results are stored and scored, never sent")
    click.echo(f"  rules naming it: {', '.join(rules) if rules else 'none yet (add a [[rules]] table with model = ' + repr(name) + ')'}")
    click.echo("  compare: specgate report shadow; promote: specgate model promote " + name + " --user NAME")


@click.command("promote")
@click.argument("name")
@click.option("--user", required=True, help="Who promotes it (audited).")
@click.option("--demote", default=None, metavar="OLD",
              help="A registered model to put in shadow in the same step (it goes on running beside, silent).")
@click.option("--why", default=None, help="Why, for the audit trail (e.g. the committee's minute).")
@pass_app
def promote_cmd(app: AppContext, name: str, user: str, demote: str | None, why: str | None) -> None:
    """Make shadow model NAME live: its rules' next studies are released or held by its gate and sent.
    The previously live model is left as it is unless --demote names it: the rules, in their order, decide
    which model a study goes to (put the promoted model's rule first to replace the old one)."""
    from ledger import models
    from ledger.db import session_scope

    try:
        with session_scope(app.sessions()) as s:
            models.promote(s, name, actor=_actor(user), demote=demote,
                           why=f"{why} ({operator()})" if why else operator())
    except models.ModelRegistryError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"model {name} is live: its rules' next results are sent" + (f"; {demote} is in shadow" if demote else ""))
    for rule in app.settings.rules:
        if rule.model == name and rule.shadow:
            click.echo(f"  note: rule {rule.name!r} says shadow = true in the settings: its jobs stay shadow until "
                       "that line is removed and the services restarted")
