"""``specgate review`` (the web app) and ``specgate users ...`` (its accounts)."""

from __future__ import annotations

import ipaddress
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import click

from ._context import AppContext, operator, pass_app

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker
    from starlette.applications import Starlette

T = TypeVar("T")

__all__ = ["register"]

log = logging.getLogger("specgate")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_password(prompt: bool) -> str:
    """From a hidden prompt (twice) on a terminal, else the first line of standard input."""
    if prompt and sys.stdin.isatty():
        return str(click.prompt("Password", hide_input=True, confirmation_prompt=True))
    line = sys.stdin.readline()
    return line.rstrip("\r\n")


def _in_tx(app: AppContext, fn: Callable[[Session], T]) -> T:
    from ledger.db import session_scope
    from review.auth import AccountError

    try:
        with session_scope(app.sessions()) as s:
            return fn(s)
    except AccountError as exc:
        raise click.ClickException(str(exc)) from exc




@click.group("users")
def users_group() -> None:
    """Accounts of the review app (radiologists and admins)."""


@users_group.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(["radiologist", "admin"]), required=True)
@click.option("--display-name", default=None, help="Name shown in the app and recorded with decisions.")
@pass_app
def users_add(app: AppContext, name: str, role: str, display_name: str | None) -> None:
    """Add an account. The password is asked for (or read from standard input)."""
    from review.auth import add_user

    password = _read_password(prompt=True)
    _in_tx(app, lambda s: add_user(s, name, role=role, password=password, actor=operator(),
                                   display_name=display_name))
    click.echo(f"account {name} added ({role})")


@users_group.command("list")
@pass_app
def users_list(app: AppContext) -> None:
    """List the accounts."""
    from review.auth import list_users

    users = _in_tx(app, list_users)
    click.echo(f"{'account':20} {'role':12} {'active':6} {'failed':6} created")
    for u in users:
        click.echo(f"{u.username:20} {u.role:12} {'yes' if u.active else 'no':6} {u.failed_logins:<6} "
                   f"{u.created_at:%Y-%m-%d %H:%M}")


@users_group.command("disable")
@click.argument("name")
@pass_app
def users_disable(app: AppContext, name: str) -> None:
    """Disable an account; its sessions end at once."""
    from review.auth import disable_user

    _in_tx(app, lambda s: disable_user(s, name, actor=operator()))
    click.echo(f"account {name} disabled")


@users_group.command("passwd")
@click.argument("name")
@pass_app
def users_passwd(app: AppContext, name: str) -> None:
    """Set an account's password (asked for, or read from standard input); its sessions end."""
    from review.auth import set_password

    password = _read_password(prompt=True)
    _in_tx(app, lambda s: set_password(s, name, password, actor=operator()))
    click.echo(f"password of {name} changed")


def build_app(app: AppContext) -> Starlette:
    """The review ASGI app with its actions wired to the worker (delivery, retraction) and metrics."""
    from review.app import ReviewActions, create_app
    from worker.celery_app import Enqueuer, make_celery

    celery = make_celery(app.settings.worker_config())
    sessions = app.sessions()
    enqueuer = Enqueuer(celery, sessions)

    def retract(job_id: int, user: str, reason: str, note: str | None) -> int:
        from worker.retraction import retract_job

        retraction_id = retract_job(sessions, job_id, user=user, reason=reason, note=note,
                                    files=app.files)
        enqueuer.retract(retraction_id)
        return retraction_id

    return create_app(app.settings.review_config(), sessions,
                      ReviewActions(deliver=enqueuer.deliver, retract=retract, metrics=_metrics(sessions)))


def _metrics(sessions: sessionmaker[Session]) -> Callable[[], tuple[bytes, str]]:
    from ledger.prometheus import render

    return lambda: render(sessions)


@click.command("review")
@click.option("--host", default=None, help="Listen on this address (default: the review_host setting).")
@click.option("--port", type=int, default=None, help="Listen on this port (default: the review_port setting).")
@pass_app
def review_command(app: AppContext, host: str | None, port: int | None) -> None:
    """Serve the review web app (the queue of held results, the study viewer, reports, users).

    It refuses to listen beyond loopback while no admin account exists or an account has no password.
    """
    import uvicorn

    from ledger.db import session_scope
    from review.auth import startup_problems

    cfg = app.settings.review_config()
    host = host or cfg.host
    port = port or cfg.port
    with session_scope(app.sessions()) as s:
        problems = startup_problems(s)
    if problems and not _is_loopback(host):
        raise click.ClickException(f"refusing to listen on {host}: " + "; ".join(problems))
    for p in problems:
        log.warning("review app: %s (listening on loopback only)", p)
    asgi = build_app(app)
    ssl = {}
    if cfg.tls_cert is not None and cfg.tls_key is not None:
        ssl = {"ssl_certfile": str(cfg.tls_cert), "ssl_keyfile": str(cfg.tls_key)}
    log.info("review app on %s://%s:%d", "https" if ssl else "http", host, port)
    uvicorn.run(asgi, host=host, port=port, log_level=app.settings.log_level.lower(), access_log=False,
                proxy_headers=app.settings.review_behind_tls_proxy, server_header=False, **ssl)  # type: ignore[arg-type]


def register(main: click.Group) -> None:
    main.add_command(review_command)
    main.add_command(users_group)
