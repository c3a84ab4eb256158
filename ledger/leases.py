"""Leases: a row that says "this process is working on it", kept fresh while it works.

Two things in specgate are taken by one process and taken back from a process that died: a ``running`` job
(its ``heartbeat_at``, refreshed by the attempt that claimed it, :mod:`worker.pipeline`) and a ``sending``
delivery row (its ``updated_at``, refreshed by its sender, :mod:`dicom_node.scu`). Whoever finds such a row
not refreshed for long enough (the worker's stale time, the SCU timeout) takes it over. Both holders keep
their lease with a :class:`LeaseRefresher`: a daemon thread that runs the caller's conditional UPDATE every
``every_s`` seconds, each in its own short transaction, while the ``with`` block works::

    def beat() -> Update:
        return (update(Job).where(Job.id == job_id, Job.task_id == task_id, Job.state == JobState.RUNNING)
                .values(heartbeat_at=utcnow()))

    with LeaseRefresher(sessions, f"job {job_id}", beat, every_s=10) as lease:
        ...                     # the work
    lease.held                  # False once a refresh matched no row: the lease was taken over or ended

The UPDATE's own WHERE clause is the lease: it names the holder (the task id) and the state the row must
still be in. So a refresh never resurrects a row that was finished, or taken over by another process
meanwhile: it matches nothing (``rowcount`` 0), :attr:`LeaseRefresher.held` turns False for good, and the
refreshes stop (the WHERE clause names the holder, so a lost lease does not come back).

A refresh that fails (the database restarting, a lock held too long, a bug in the statement) is logged as a
warning naming the lease, never the row's data, and the next one is tried ``every_s`` later: a worker must
not lose a study because PostgreSQL blinked, and a holder whose refreshes keep failing looks dead to
everyone else after the stale time anyway, which is the safe outcome.

On exit the thread is told to stop (it wakes at once from its wait) and joined for at most
:data:`JOIN_TIMEOUT_S`. Only a refresh in flight can make it wait that long; one that lands after the join
gave up is harmless, since the work's end has already moved the row out of the state the UPDATE requires.

This module imports nothing of specgate's but :mod:`ledger.db`: every package may use it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType

from sqlalchemy import Update
from sqlalchemy.orm import Session, sessionmaker

from .db import session_scope

__all__ = ["JOIN_TIMEOUT_S", "LeaseRefresher"]

log = logging.getLogger("specgate.ledger.leases")

#: How long leaving the ``with`` block waits for a refresh in flight: longer than one refresh normally
#: takes (PostgreSQL's connect timeout is 10 s, :func:`ledger.db.open_engine`), and short enough not to hold
#: up a worker's next study. A refresh still running after it does no harm (see the module docstring).
JOIN_TIMEOUT_S = 15.0


class LeaseRefresher:
    """Run ``statement()`` (a conditional UPDATE that refreshes the lease's timestamp) every ``every_s``
    seconds in its own transaction, from a daemon thread, while the ``with`` block runs.

    ``name`` appears in the thread's name and in the log (an id and a table, never patient data). The
    statement is a function so that each refresh stamps its own time. After each refresh,
    :attr:`held` is whether it matched a row; :attr:`refreshes` and :attr:`failures` count the refreshes
    that landed and those that raised.
    The holder learns of a lost lease through :attr:`held`; the refresher does not stop the work.

    >>> LeaseRefresher(sessionmaker(), "job 1", lambda: None, every_s=0)  # type: ignore[arg-type]
    Traceback (most recent call last):
    ...
    ValueError: lease 'job 1': every_s must be positive, got 0
    """

    def __init__(self, sessions: sessionmaker[Session], name: str, statement: Callable[[], Update], *,
                 every_s: float) -> None:
        if not every_s > 0:
            raise ValueError(f"lease {name!r}: every_s must be positive, got {every_s!r}")
        self.name = name
        self._sessions, self._statement, self._every = sessions, statement, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{name}", daemon=True)
        self.held = True
        self.refreshes = 0
        self.failures = 0

    def __enter__(self) -> LeaseRefresher:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(JOIN_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning("lease %s: a refresh is still running %gs after the work ended; left to finish alone",
                        self.name, JOIN_TIMEOUT_S)

    def refresh(self) -> bool:
        """One refresh, now, in its own transaction: whether the row is still held (the UPDATE matched)."""
        with session_scope(self._sessions) as s:
            matched = s.execute(self._statement().execution_options(synchronize_session=False)).rowcount  # type: ignore[attr-defined]
        return bool(matched)

    def _run(self) -> None:
        failing = 0
        while not self._stop.wait(self._every):
            try:
                held = self.refresh()
            except Exception as exc:  # noqa: BLE001 - a missed refresh is not fatal; the next one may land
                self.failures += 1
                failing += 1
                # the exception's first line only: a statement's parameters are ids, but a traceback of a
                # caller's bug could carry anything
                log.warning("lease %s: refresh failed (%s: %s); next try in %gs", self.name, type(exc).__name__,
                            str(exc).splitlines()[0] if str(exc) else "", self._every)
                log.debug("lease %s: refresh failure", self.name, exc_info=True)
                continue
            if failing:
                log.info("lease %s: refreshed again after %d failed refreshes", self.name, failing)
                failing = 0
            self.refreshes += 1
            if not held:
                self.held = False
                log.info("lease %s: no longer held by this process (the row was finished or taken over); "
                         "refreshes stop", self.name)
                return
