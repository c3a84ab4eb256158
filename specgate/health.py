"""``specgate health``'s checks: is each thing this deployment depends on there and usable, now?

Each check is a function of the settings returning a :class:`Check` (name, ok, detail); :func:`run_checks`
runs the selected ones, each in a thread of its own bounded by a timeout, so a dependency that does not
answer (a firewalled database, a PACS that accepts the TCP connection and never replies) is a failed
check naming what did not answer, never a command that hangs. The checks:

``database``
    the ledger answers and is at the Alembic head this version needs (what ``specgate scp`` refuses to
    start without).
``broker``
    Redis answers PING (a ``redis://`` broker); the filesystem broker's folder is writable.
``store``
    :meth:`store.Store.check`: a probe object written, read back and removed (fs: the data directory;
    s3: the bucket).
``spool``
    the spool's file system is below ``spool_disk_watermark_percent``, computed as the SCP computes it
    (:meth:`dicom_node.spool.Spool.usage_percent`; at or above it, the SCP answers C-STORE with 0xA700).
``stow``
    with ``stow_port`` set: the STOW-RS endpoint completes a TLS handshake and answers an unauthenticated
    ``POST /studies`` with 401 (it is up, and it refuses who has no credential; a 401 is counted, never
    audited, so probes do not fill the audit trail).
``destination:NAME``
    each destination answers C-ECHO (:func:`dicom_node.scu.echo`, as ``specgate echo NAME``).
``model:NAME``
    each model the settings configure and each model registered in the ledger: its files open, they are
    the files registered (SHA-256), and its OOD bank is the one the ledger recorded and was fitted for
    these weights through these settings (the worker's own start-up refusal,
    :meth:`worker.model_runtime.Segmenter.from_adapter`).
``workers``
    at least one ``specgate worker`` answers a Celery ping on the broker. A ping answered by the worker's
    main process is the one signal that is both live (a dead worker does not answer) and independent of
    load: a job heartbeat only exists while a job runs, so an idle healthy worker would look dead. The
    filesystem broker has no broadcast, so there the check says it cannot ask (it passes, saying so);
    production runs Redis.

A check that cannot be made because another failed is left out rather than failed too: with the
database down the registered models cannot be read, with the broker down no worker can be asked; the
one line names the cause.

A probe of one component (a container's readiness) selects its checks with ``only``/``skip`` (a name or
its kind: ``destination`` selects every ``destination:NAME``).

    >>> Check("spool", True, "41.0 % used, watermark 95 %").line()
    'ok    spool  41.0 % used, watermark 95 %'
    >>> selected("destination:pacs", only=("destination",), skip=())
    True
    >>> selected("workers", only=(), skip=("workers",))
    False
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from ledger.schema import RegisteredModel
    from store import StoreConfig
    from worker.config import ModelSpec

    from .settings import Settings

__all__ = ["CHECK_KINDS", "Check", "run_checks", "selected"]

#: the kinds of check, in the order they run and print
CHECK_KINDS = ("database", "broker", "store", "spool", "stow", "destination", "model", "workers")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok' if self.ok else 'FAIL':<4}  {self.name}  {self.detail}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class CheckFailed(Exception):
    """A check's finding: the detail that names what is wrong."""


def selected(name: str, *, only: Sequence[str], skip: Sequence[str]) -> bool:
    """Whether the check ``name`` runs: in ``only`` (when given) and not in ``skip``, by name or kind."""
    keys = {name, name.split(":", 1)[0]}
    if only and not keys & set(only):
        return False
    return not keys & set(skip)


def _bounded(name: str, check: Callable[[], str], timeout_s: float) -> Check:
    """Run ``check`` in a daemon thread: its detail when it returns, FAIL with the exception when it
    raises, FAIL "no answer" when it is still running after ``timeout_s`` (the thread is left behind; a
    daemon thread does not keep the command from exiting)."""
    box: list[Check] = []

    def run() -> None:
        try:
            box.append(Check(name, True, check()))
        except CheckFailed as exc:
            box.append(Check(name, False, str(exc)))
        except Exception as exc:  # noqa: BLE001 - whatever breaks a probe is that check's failure, named
            box.append(Check(name, False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))

    t = threading.Thread(target=run, name=f"health-{name}", daemon=True)
    t.start()
    t.join(timeout_s)
    if not box:
        return Check(name, False, f"no answer within {timeout_s:g} s")
    return box[0]


# ------------------------------------------------------------------------------------------ database
def _engine(url: str, timeout_s: float) -> Engine:
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    connect_args: dict[str, Any] = {}
    if url.startswith("postgresql"):
        connect_args["connect_timeout"] = max(1, int(timeout_s))
    return create_engine(url, poolclass=NullPool, connect_args=connect_args)


def _where(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def check_database(settings: Settings, timeout_s: float) -> str:
    from sqlalchemy.exc import DBAPIError

    from ledger import migrations

    engine = _engine(settings.db_url, timeout_s)
    try:
        current = migrations.current_revision(engine)
    except DBAPIError as exc:
        raise CheckFailed(f"{_where(settings.db_url)}: {str(exc.orig or exc).strip().splitlines()[0]}") from exc
    finally:
        engine.dispose()
    head = migrations.head_revision()
    if current != head:
        raise CheckFailed(f"{_where(settings.db_url)} is at revision {current or 'base'}, this version needs "
                          f"{head}: run 'specgate db upgrade'")
    return f"{_where(settings.db_url)} at head {head}"


# -------------------------------------------------------------------------------------------- broker
def check_broker(settings: Settings, timeout_s: float) -> str:
    url = settings.broker_url
    if not url or url.startswith("filesystem://"):
        folder = settings.data_dir / "broker" / "queue"
        if not folder.is_dir():
            raise CheckFailed(f"filesystem broker {folder} does not exist (no worker or SCP has started here)")
        if not os.access(folder, os.W_OK):
            raise CheckFailed(f"filesystem broker {folder} is not writable")
        return f"filesystem broker {folder} writable"
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    where = _where(url)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise CheckFailed(f"{where}: {exc}") from exc
    finally:
        client.close()
    return f"{where} answered PING"


# --------------------------------------------------------------------------------------------- store
def check_store(settings: Settings, store_config: StoreConfig | None) -> str:
    from store import StoreError, open_store

    store = open_store(store_config, settings.data_dir)
    try:
        store.check()
    except StoreError as exc:
        raise CheckFailed(str(exc)) from exc
    return f"{store.describe()} writable"


# --------------------------------------------------------------------------------------------- spool
def check_spool(settings: Settings) -> str:
    from dicom_node.spool import Spool

    folder = settings.spool_dir
    if not folder.is_dir():
        raise CheckFailed(f"{folder} does not exist (the SCP makes it when it starts)")
    spool = Spool(folder, watermark_percent=settings.spool_disk_watermark_percent)
    used, mark = spool.usage_percent(), spool.watermark_percent
    free = shutil.disk_usage(folder).free
    text = f"{used:.1f} % used, watermark {mark:g} %, {free / 2**30:.1f} GiB free"
    if not spool.has_room():
        raise CheckFailed(f"over the watermark: {text}; the SCP answers C-STORE with 0xA700 (out of resources)")
    return text


# --------------------------------------------------------------------------------------------- STOW-RS
def check_stow(settings: Settings, timeout_s: float) -> str:
    import socket
    import ssl

    host = "127.0.0.1" if settings.stow_host in ("0.0.0.0", "::") else settings.stow_host
    # Whether our own endpoint is up and refuses the unauthenticated, not who it is: the certificate is
    # read, not verified (the callers' CA may not be the one that signed it).
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, settings.stow_port), timeout=timeout_s) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(f"POST /studies HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n"
                        "Connection: close\r\n\r\n".encode())
            answer = tls.recv(256).split(b"\r\n", 1)[0].decode("latin-1")
            version = tls.version()
    except (OSError, ssl.SSLError) as exc:
        raise CheckFailed(f"https://{host}:{settings.stow_port}: {exc}") from exc
    if not answer.startswith("HTTP/1.1 401"):
        raise CheckFailed(f"https://{host}:{settings.stow_port}/studies answered {answer!r} without credentials, "
                          "not 401")
    return f"https://{host}:{settings.stow_port}/studies up ({version}, 401 without credentials)"


# -------------------------------------------------------------------------------------- destinations
def destination_check(settings: Settings, name: str, timeout_s: float) -> Callable[[], str]:
    def run() -> str:
        from dicom_node.scu import echo

        dest = settings.destination(name)
        result = echo(dest, ae_title=settings.scu_ae_title, timeout_s=timeout_s)
        if not result.ok:
            raise CheckFailed(result.describe(dest))
        return result.describe(dest)

    return run


# -------------------------------------------------------------------------------------------- models
def settings_model_check(settings: Settings, spec: ModelSpec) -> Callable[[], str]:
    """A model of the settings: its weights open and its bank was fitted for them (the worker's check)."""

    def run() -> str:
        from model.ood import BankMismatchError
        from worker.model_runtime import Segmenters

        cfg = settings.worker_config()
        try:
            seg = Segmenters([spec], cfg.inference, device="cpu")(spec.name)
        except BankMismatchError as exc:
            raise CheckFailed(f"its OOD bank does not belong to these weights: {exc}") from exc
        except (OSError, ValueError) as exc:
            raise CheckFailed(f"cannot open it: {exc}") from exc
        return f"{seg.model_name} {seg.model_version}, weights SHA-256 {seg.weights_sha256[:12]}..., bank matches"

    return run


def registered_model_check(row: RegisteredModel) -> Callable[[], str]:
    """A model registered in the ledger: its files are those registered, its bank the one recorded and
    fitted for them (:meth:`specgate._context.AppContext.check_routing`'s and the worker's checks)."""

    def run() -> str:
        from model.adapters import AdapterError, open_adapter
        from model.ood import BankMismatchError
        from worker.model_runtime import Segmenter

        from ._context import _bank_problem

        options = row.settings.get("open_options") or {}
        try:
            adapter = open_adapter(row.format, Path(row.path), layer=row.layer, device="cpu", **options)
        except (AdapterError, OSError) as exc:
            raise CheckFailed(f"{row.format} {row.path} does not open: {exc}") from exc
        recorded, now = dict(row.files_sha256), dict(adapter.files_sha256)
        if recorded != now:
            changed = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))
            raise CheckFailed(f"{row.path}: files changed since it was registered ({', '.join(changed)})")
        if row.bank_path is None or row.bank_sha256 is None:
            return f"{row.format} {row.path}: files match, no OOD bank yet (nothing may be routed to it)"
        bank = _bank_problem(Path(row.bank_path), row.bank_sha256)
        if bank is not None:
            raise CheckFailed(f"OOD bank {bank}")
        try:
            Segmenter.from_adapter(adapter, Path(row.bank_path))
        except BankMismatchError as exc:
            raise CheckFailed(f"its OOD bank does not belong to these weights: {exc}") from exc
        return f"{row.format} {row.path}: {len(now)} file(s) match, bank matches"

    return run


def _registered_models(settings: Settings, timeout_s: float) -> list[RegisteredModel]:
    from sqlalchemy.orm import Session

    from ledger import models

    engine = _engine(settings.db_url, timeout_s)
    try:
        with Session(engine) as session:
            rows = models.list_models(session)
            session.expunge_all()
            return rows
    finally:
        engine.dispose()


# ------------------------------------------------------------------------------------------- workers
def check_workers(settings: Settings, timeout_s: float) -> str:
    url = settings.broker_url
    if not url or url.startswith("filesystem://"):
        return "not checked: the filesystem broker cannot ping workers (run Redis to have this checked)"
    from celery import Celery

    app = Celery("specgate-health", broker=url, set_as_current=False)
    app.conf.update(broker_connection_timeout=timeout_s, broker_connection_retry=False,
                    broker_connection_max_retries=0,
                    broker_transport_options={"socket_connect_timeout": timeout_s, "socket_timeout": timeout_s})
    try:
        answers = app.control.inspect(timeout=min(timeout_s, 2.0)).ping() or {}
    finally:
        app.close()
    names = sorted(answers)
    if not names:
        raise CheckFailed(f"no worker answered a ping on {_where(url)} within {min(timeout_s, 2.0):g} s "
                          "(is 'specgate worker' running?)")
    return f"{len(names)} answered: {', '.join(names)}"


# ------------------------------------------------------------------------------------------ together
def run_checks(settings: Settings, *, store_config: StoreConfig | None = None, timeout_s: float = 5.0,
               model_timeout_s: float = 120.0, only: Sequence[str] = (), skip: Sequence[str] = ()) -> list[Check]:
    """Every selected check, in :data:`CHECK_KINDS` order, each bounded by ``timeout_s`` (opening a model
    by ``model_timeout_s``: it loads the weights)."""
    out: list[Check] = []

    def add(name: str, check: Callable[[], str], timeout: float = timeout_s) -> None:
        if selected(name, only=only, skip=skip):
            out.append(_bounded(name, check, timeout))

    add("database", lambda: check_database(settings, timeout_s), timeout_s + 1)
    add("broker", lambda: check_broker(settings, timeout_s), timeout_s + 1)
    add("store", lambda: check_store(settings, store_config), 3 * timeout_s)
    add("spool", lambda: check_spool(settings))
    if settings.stow_port:
        add("stow", lambda: check_stow(settings, timeout_s), timeout_s + 1)
    for dest in settings.destinations:
        add(f"destination:{dest.name}", destination_check(settings, dest.name, timeout_s), timeout_s + 1)
    if selected("model", only=only, skip=skip):
        specs = settings.worker_config().models
        for spec in specs:
            add(f"model:{spec.name}", settings_model_check(settings, spec), model_timeout_s)
        rows: list[RegisteredModel] = []

        def read() -> str:
            rows.extend(_registered_models(settings, timeout_s))
            return ""

        registry = _bounded("models", read, timeout_s + 1)
        database_down = any(c.name == "database" and not c.ok for c in out)
        if not registry.ok and not database_down:  # (a ledger that is down is said once, by "database")
            out.append(Check("models", False, f"cannot read the registered models: {registry.detail}"))
        configured = {s.name for s in specs}
        for row in rows:
            if row.name not in configured:
                add(f"model:{row.name}", registered_model_check(row), model_timeout_s)
    if not any(c.name == "broker" and not c.ok for c in out):  # (a broker that is down is said once)
        add("workers", lambda: check_workers(settings, timeout_s), timeout_s + 3)
    return out
