"""The ``/metrics`` endpoint of ``specgate scp`` and ``specgate worker``: prometheus_client's multiprocess
mode set up by the parent process, and a small HTTP server that sums the processes' files at scrape time.

Both services count in child processes (the SCP's receivers, Celery's prefork child), so both use
prometheus_client's multiprocess mode (see :mod:`dicom_node.prometheus` and :mod:`worker.prometheus` for why).
Its one constraint shapes this module: prometheus_client decides at its *import* whether values live in
memory or in files (``prometheus_client.values.ValueClass``, chosen from ``PROMETHEUS_MULTIPROC_DIR``).
So :func:`multiprocess_dir` runs in the parent first thing, before anything imports prometheus_client
and before a child starts (children inherit the environment, and a fork inherits the choice), and
refuses to go on if prometheus_client was imported earlier without it. That environment variable and
prometheus_client's own module state are the only process-wide configuration involved.

Directories: ``<data_dir>/metrics/scp`` (one SCP per data folder) and
``<data_dir>/metrics/worker-<host>-<pid>`` (several workers may share a data folder, even across
machines). Each is emptied when its service starts; a worker removes its own when it stops, and the
directories of workers of this host that are no longer running when a worker starts.

    >>> endpoint = MetricsEndpoint("127.0.0.1", 9464, Path("/tmp/m"))   # no I/O until start()
    >>> endpoint.address
    ('127.0.0.1', 9464)
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["MULTIPROC_ENV", "MetricsEndpoint", "multiprocess_dir", "remove_dead_worker_dirs", "require_multiprocess",
           "worker_metrics_dir"]

log = logging.getLogger("specgate.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _worker_prefix() -> str:
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"
    return f"worker-{host}-"


def worker_metrics_dir(data_dir: Path) -> Path:
    """``<data_dir>/metrics/worker-<host>-<pid>`` of this process."""
    return data_dir / "metrics" / f"{_worker_prefix()}{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_dead_worker_dirs(data_dir: Path) -> list[Path]:
    """Remove the metrics directories of this host's workers that are no longer running."""
    mine = _worker_prefix()
    removed: list[Path] = []
    parent = data_dir / "metrics"
    if not parent.is_dir():
        return removed
    for d in parent.iterdir():
        rest = d.name[len(mine):]
        if d.is_dir() and d.name.startswith(mine) and rest.isdigit() and not _alive(int(rest)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def multiprocess_dir(directory: Path) -> Path:
    """Empty ``directory`` and make it this process's (and its future children's) multiprocess directory.

    Call before prometheus_client is imported and before children start. Raises :class:`RuntimeError`
    when prometheus_client was already imported in single-process mode (a bug: its metrics would go
    nowhere).
    """
    if "prometheus_client.values" in sys.modules and not _multiprocess_active():
        raise RuntimeError("prometheus_client was imported before the metrics directory was set up: its values "
                           "would stay in this process and no child's count would reach /metrics")
    directory = directory.resolve()
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(directory)
    return require_multiprocess(directory)


def _multiprocess_active() -> bool:
    from prometheus_client import values

    return bool(getattr(values.ValueClass, "_multiprocess", False))


def require_multiprocess(directory: Path | None = None) -> Path:
    """The multiprocess directory this process counts into; raises :class:`RuntimeError` when
    prometheus_client is not in multiprocess mode (or, given ``directory``, writes elsewhere). A child
    (an SCP receiver) calls it before it builds its metrics."""
    current = os.environ.get(MULTIPROC_ENV)
    if not current or not _multiprocess_active():
        raise RuntimeError(f"{MULTIPROC_ENV} is not set, or was set after prometheus_client was imported: "
                           "this process's metrics would not reach /metrics")
    if directory is not None and Path(current) != directory:
        raise RuntimeError(f"{MULTIPROC_ENV} is {current!r}, expected {str(directory)!r}")
    return Path(current)


class MetricsEndpoint:
    """``GET /metrics`` on ``host:port``: the multiprocess files of ``directory`` summed, plus the
    ``collectors`` asked at scrape time (in this process). ``start()`` binds; ``stop()`` closes."""

    def __init__(self, host: str, port: int, directory: Path, collectors: Sequence[Any] = ()) -> None:
        self.host, self.port, self.directory = host, port, directory
        self.collectors = tuple(collectors)
        self._server: Any = None
        self._thread: Any = None

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            return self.host, self.port
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> MetricsEndpoint:
        """Bind and serve in a daemon thread. Raises :class:`OSError` when the port cannot be had."""
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.directory))
        for collector in self.collectors:
            registry.register(collector)
        self._server, self._thread = start_http_server(self.port, addr=self.host, registry=registry)
        log.info("metrics on http://%s:%d/metrics", *self.address)
        return self

    def close_inherited(self) -> None:
        """In a forked child: close the copy of the listening socket (the child does not serve it, and
        must not keep the port when the parent goes)."""
        if self._server is not None:
            self._server.socket.close()

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None
