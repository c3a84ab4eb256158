"""``specgate scp`` and ``specgate echo``: the DICOM node's commands (registered in :mod:`specgate.cli`)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Any

import click

__all__ = ["echo_command", "scp_command"]

log = logging.getLogger("specgate.scp")


def _job_queued_hook(app: Any) -> Any:
    """The enqueue hook the assembler calls with each new job id: a wake-up call to the workers."""
    from worker.celery_app import Enqueuer, make_celery

    return Enqueuer(make_celery(app.settings), app.sessions()).segment


@click.command("scp")
@click.pass_obj
def scp_command(app: Any) -> None:
    """Run the DICOM Storage SCP and the study assembler until SIGTERM/SIGINT.

    Accepts C-ECHO and image C-STORE from the callers in SPECGATE_ALLOWED_CALLERS, makes every instance
    durable (spool file + ledger row) before answering, and turns each study into a job once no instance
    has arrived for SPECGATE_STUDY_QUIET_SECONDS.
    """
    from dicom_node.assembler import Assembler
    from dicom_node.scp import StoreSCP
    from ledger import migrations

    settings = app.settings
    current, head = migrations.current_revision(app.engine), migrations.head_revision()
    if current != head:
        raise click.ClickException(f"the ledger is at revision {current or 'base'}, this version needs {head}: "
                                   "run 'specgate db upgrade' first")
    if not settings.allowed_callers:
        log.warning("SPECGATE_ALLOWED_CALLERS is empty: every association will be rejected")
    sessions = app.sessions()
    scp = StoreSCP(settings, sessions)
    try:
        scp.start()
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {settings.scp_host}:{settings.scp_port}: {exc}") from exc
    assembler = Assembler(settings, sessions, on_job_queued=_job_queued_hook(app), spool=scp.spool).start()
    host, port = scp.address
    click.echo(f"specgate scp: {settings.scp_ae_title} listening on {host}:{port}", err=True)
    stop = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        scp.stop()
        assembler.stop()
    sys.stderr.flush()


@click.command("echo")
@click.argument("name")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait for the peer.")
@click.pass_obj
def echo_command(app: Any, name: str, timeout: float) -> None:
    """C-ECHO the destination NAME (from SPECGATE_DESTINATIONS) and say whether it answered."""
    from dicom_node.scu import echo
    from specgate.settings import SettingsError

    try:
        dest = app.settings.destination(name)
    except SettingsError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from exc
    result = echo(dest, ae_title=app.settings.scu_ae_title, timeout_s=timeout)
    click.echo(result.describe(dest))
    if not result.ok:
        sys.exit(1)
