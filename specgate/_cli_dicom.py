"""``specgate scp`` and ``specgate echo``: the DICOM node's commands (registered in :mod:`specgate.cli`)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import click

from ._context import AppContext, pass_app

if TYPE_CHECKING:
    from dicom_node.handoff import Listener
    from dicom_node.prometheus import NodeMetrics
    from dicom_node.scp import StoreSCP
    from dicom_node.spool import Spool
    from dicom_node.stow import StowServer

    from ._metrics import MetricsEndpoint

__all__ = ["echo_command", "register", "scp_command"]

log = logging.getLogger("specgate.scp")


def _job_queued_hook(app: AppContext) -> Callable[[int], None]:
    """The enqueue hook the assembler calls with each new job id: a wake-up call to the workers."""
    from worker.celery_app import Enqueuer, make_celery

    return Enqueuer(make_celery(app.settings.worker_config()), app.sessions()).segment


@click.command("scp")
@click.option("--receiver-fd", type=int, default=None, hidden=True,
              help="Internal: run as a receiver process of the listener, taking connections from this fd.")
@pass_app
def scp_command(app: AppContext, receiver_fd: int | None) -> None:
    """Run the DICOM Storage SCP and the study assembler until SIGTERM/SIGINT.

    Accepts C-ECHO and image C-STORE from the callers in SPECGATE_ALLOWED_CALLERS, makes every instance
    durable (spool file + ledger row) before answering, and turns each study into a job once no instance
    has arrived for SPECGATE_STUDY_QUIET_SECONDS. With SPECGATE_SCP_PROCESSES other than 1 (default: two
    per CPU core) one listener hands connections to that many receiver processes. With
    SPECGATE_SCP_METRICS_PORT, Prometheus metrics on SPECGATE_METRICS_HOST:port/metrics.
    """
    from ledger import migrations

    from ._metrics import multiprocess_dir

    settings = app.settings
    if receiver_fd is not None:
        _run_receiver(app, receiver_fd)
        return
    # first: before prometheus_client is imported and before any receiver process starts
    metrics_dir = multiprocess_dir(settings.data_dir / "metrics" / "scp") if settings.scp_metrics_port else None
    current, head = migrations.current_revision(app.engine), migrations.head_revision()
    if current != head:
        raise click.ClickException(f"the ledger is at revision {current or 'base'}, this version needs {head}: "
                                   "run 'specgate db upgrade' first")
    app.check_routing()  # every rule's model configured, or registered with a fitted bank
    if not settings.allowed_callers:
        log.warning("SPECGATE_ALLOWED_CALLERS is empty: every association will be rejected")
    config_file = click.get_current_context().find_root().params.get("config_file")
    stop = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    _run_node(app, config_file, stop, metrics_dir)


def _metrics_endpoint(app: AppContext, directory: Path, open_associations: Callable[[], int]) -> MetricsEndpoint:
    """The SCP's /metrics: the receivers' counters, the open associations, the ledger's gauges."""
    from dicom_node.prometheus import AssociationsCollector
    from ledger.drift_prometheus import DriftCollector
    from ledger.prometheus import LedgerCollector

    from ._metrics import MetricsEndpoint

    s = app.settings
    endpoint = MetricsEndpoint(s.metrics_host, s.scp_metrics_port, directory,
                               [AssociationsCollector(open_associations), LedgerCollector(app.sessions()),
                                DriftCollector(app.sessions())])
    try:
        return endpoint.start()
    except OSError as exc:
        raise click.ClickException(f"cannot serve metrics on {s.metrics_host}:{s.scp_metrics_port}: {exc}") from exc


def _run_node(app: AppContext, config_file: Path | None, stop: threading.Event, metrics_dir: Path | None = None) -> None:
    from dicom_node.assembler import Assembler
    from dicom_node.handoff import Listener, default_processes
    from dicom_node.scp import StoreSCP
    from dicom_node.spool import Spool

    settings = app.settings
    node = settings.node_config()
    sessions = app.sessions()
    processes = default_processes(node)
    spool = Spool(node.spool_dir, watermark_percent=node.spool_watermark_percent).open()
    front: StoreSCP | Listener
    if processes == 1:
        front = StoreSCP(node, sessions, spool=spool, metrics=_node_metrics(metrics_dir))
        open_associations = front.active_associations
    else:
        def spawn(fd: int) -> subprocess.Popen[bytes]:
            argv = [sys.executable, "-m", "specgate.cli"]
            if config_file is not None:
                argv += ["--config", str(config_file)]
            argv += ["scp", "--receiver-fd", str(fd)]
            return subprocess.Popen(argv, pass_fds=(fd,))

        front = Listener(node, spawn, processes=processes)
        open_associations = front.open_associations
    endpoint = None if metrics_dir is None else _metrics_endpoint(app, metrics_dir, open_associations)
    try:
        front.start()
    except OSError as exc:
        if endpoint is not None:
            endpoint.stop()
        raise click.ClickException(f"cannot listen on {settings.scp_host}:{settings.scp_port}: {exc}") from exc
    assembler = Assembler(settings.assembly_config(), sessions, on_job_queued=_job_queued_hook(app),
                          spool=spool).start()
    uploader = None
    if node.files.remote:  # every received instance goes on to the object store; studies wait for it
        from dicom_node.uploader import Uploader

        uploader = Uploader(sessions, node.files, node.data_dir).start()
    host, port = front.address
    click.echo(f"specgate scp: {settings.scp_ae_title} listening on {host}:{port} "
               f"({processes} receiver process{'es' if processes > 1 else ''})", err=True)
    stow: StowServer | None = None
    try:
        stow = _start_stow(app, spool, metrics_dir)
        if stow is not None:
            click.echo("specgate scp: STOW-RS on https://{}:{}/studies".format(*stow.address), err=True)
        while not stop.wait(1.0):
            pass
    finally:
        t0 = time.monotonic()
        if isinstance(front, StoreSCP):  # one process: stop accepting, let open associations finish
            left = front.drain(node.network_timeout + node.dimse_timeout)
            if left:
                log.warning("%d association(s) still open after the drain: aborting them", left)
        if stow is not None:
            stow.stop()  # (uvicorn finishes the requests it has, up to 10 s)
        front.stop()  # (the listener: its receivers finish their associations, then exit)
        assembler.stop()
        if uploader is not None:
            uploader.stop()
        if endpoint is not None:
            endpoint.stop()
        log.info("stopped in %.1f s", time.monotonic() - t0)


def _start_stow(app: AppContext, spool: Spool, metrics_dir: Path | None) -> StowServer | None:
    """The STOW-RS endpoint (``stow_port``), in this process beside the assembler; None when it is off."""
    config = app.settings.stow_config()
    if config is None:
        return None
    from dicom_node.stow import StowServer

    metrics = None
    if metrics_dir is not None:
        from dicom_node.prometheus import StowMetrics

        from ._metrics import require_multiprocess

        require_multiprocess(metrics_dir)
        metrics = StowMetrics()
    server = StowServer.for_node(config, app.settings.node_config(), app.sessions(), spool=spool, metrics=metrics)
    try:
        return server.start()
    except OSError as exc:
        raise click.ClickException(f"cannot serve STOW-RS on {config.host}:{config.port}: {exc}") from exc


def _node_metrics(metrics_dir: Path | None) -> NodeMetrics | None:
    """The counters of an SCP process, in the multiprocess directory its parent set up (None: not counted)."""
    if metrics_dir is None:
        return None
    from dicom_node.prometheus import NodeMetrics

    from ._metrics import require_multiprocess

    require_multiprocess(metrics_dir)
    return NodeMetrics()


def _run_receiver(app: AppContext, fd: int) -> None:
    """A receiver process: serve the connections the listener hands over until it goes away."""
    import socket

    from dicom_node.scp import StoreSCP

    handoff = socket.socket(fileno=fd)
    # The listener decides when receivers stop (it closes the socket pair); a terminal's Ctrl-C and a
    # supervisor's SIGTERM (systemd's default KillMode, a container runtime's stop of the whole group) reach
    # every process of the group, so receivers ignore both and finish their associations.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    node = app.settings.node_config()
    # the listener set PROMETHEUS_MULTIPROC_DIR in the environment this process inherited
    metrics_dir = (app.settings.data_dir / "metrics" / "scp").resolve() if app.settings.scp_metrics_port else None
    scp = StoreSCP(node, app.sessions(), handoff=handoff, metrics=_node_metrics(metrics_dir)).start()
    try:
        scp.wait_parent_gone()
        log.info("receiver %d: listener gone, finishing %d association(s)", os.getpid(),
                 scp.established_associations())
        deadline = time.monotonic() + node.network_timeout + node.dimse_timeout
        while scp.established_associations() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        scp.stop()
        log.info("receiver %d: stopped", os.getpid())


@click.command("echo")
@click.argument("name")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait for the peer.")
@pass_app
def echo_command(app: AppContext, name: str, timeout: float) -> None:
    """C-ECHO the destination NAME (from SPECGATE_DESTINATIONS) and say whether it answered (over TLS when it
    names a tls_ca; a DICOMweb destination: one QIDO-RS query with its credentials)."""
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


def register(main: click.Group) -> None:
    main.add_command(scp_command)
    main.add_command(echo_command)
