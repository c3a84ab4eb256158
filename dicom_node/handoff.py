"""One port, several receiver processes (associations do not queue behind one core): both sides of the
hand-off, the listening parent (:class:`Listener`) and the receiving child (:class:`HandoffReceiver`).

The SCP runs each association in a thread, and Python threads share one core for everything that is
not I/O or hashing (PDU parsing, the ledger statements). ``specgate scp`` therefore runs a small parent that
owns the listening socket and the study assembler, and N receiver processes (``specgate scp-receiver``),
each a full :class:`dicom_node.scp.StoreSCP` taking its connections from a :class:`HandoffReceiver`. The parent accepts every TCP connection, sets TCP_NODELAY,
and passes the connected socket (``SCM_RIGHTS``) to the receiver with the fewest open associations; each
receiver reports, many times a second and whenever one closes, how many connections it has open and how many it was given. The parent alone counts associations, so
``max_associations`` holds for the whole node: a connection over the limit is still handed to a
receiver, marked, and that receiver rejects it with A-ASSOCIATE-RJ "local limit exceeded" (a DICOM answer,
not a dropped connection). TLS, the allow-list and everything else happen in the receivers.

A receiver that dies is started again. When the parent stops (SIGTERM) or dies (SIGKILL), the receivers
see their end of the socket pair close, finish the associations they have, and exit.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import NodeConfig

__all__ = ["HANDOFF_ACCEPT", "HANDOFF_OVER_LIMIT", "HandoffReceiver", "Listener", "accept_until", "bind_port",
           "close_listening", "default_processes"]

log = logging.getLogger("specgate.dicom_node.handoff")

HANDOFF_ACCEPT = b"A"
HANDOFF_OVER_LIMIT = b"L"

#: Starts one receiver process given the file descriptor of its end of the socket pair.
Spawn = Callable[[int], "subprocess.Popen[bytes]"]


def default_processes(config: NodeConfig) -> int:
    """``processes``, or two per CPU core (at most 16) when it is 0: a receiver spends much of an
    instance waiting for fsync and the ledger commit. (Bench, 4 associations of 300 CT slices at once on
    2 cores: 1, 2 and 4 receivers all took 2.7-3.7 s, run-to-run noise larger than their difference.)"""
    return config.processes or max(2, min(16, 2 * (os.cpu_count() or 1)))


def accept_until(sock: socket.socket, stopping: threading.Event,
                 handle: Callable[[socket.socket, object], None]) -> None:
    """Accept connections on ``sock`` and pass each to ``handle`` until ``stopping`` is set (the caller
    then closes ``sock``, which wakes the blocked accept). A failed accept (out of file descriptors, a
    connection reset before it was taken) is retried after a short pause instead of ending the loop."""
    while not stopping.is_set():
        try:
            conn, address = sock.accept()
        except OSError:
            if stopping.wait(0.05):
                return
            continue
        handle(conn, address)


def bind_port(host: str, port: int, *, backlog: int | None = 128) -> socket.socket:
    """A TCP socket bound to ``host:port`` (IPv6 when the host has a colon; SO_REUSEADDR), listening with
    ``backlog`` (None: bound only, the caller listens later). Closed again if binding fails, so the error
    (the port is taken, the address is not ours) reaches the caller and no socket leaks."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        if backlog is not None:
            sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def close_listening(sock: socket.socket | None) -> None:
    """Close a listening socket (None: nothing to do), waking the thread blocked in its accept()."""
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


@dataclass
class _ReceiverProcess:
    index: int
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    sent: int = 0  # connections handed to it
    reported_open: int = 0  # its last report: connections open ...
    reported_received: int = 0  # ... and connections received by then
    buffered: bytes = field(default=b"", repr=False)
    started: float = field(default_factory=time.monotonic)
    ready: threading.Event = field(default_factory=threading.Event)  # its first report arrived: it serves

    @property
    def active(self) -> int:
        return self.reported_open + (self.sent - self.reported_received)


class Listener:
    """The parent side. ``start()`` binds the port and starts the receivers; ``stop()`` ends them."""

    def __init__(self, config: NodeConfig, spawn: Spawn, *, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        self.config = config
        self.spawn = spawn
        self.processes = processes
        self._receivers: dict[int, _ReceiverProcess] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._selector = selectors.DefaultSelector()

    @property
    def address(self) -> tuple[str, int]:
        assert self._sock is not None
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def start(self, ready_timeout: float = 60.0) -> Listener:
        """Bind the port, start the receivers, and listen once they serve (or after ``ready_timeout``):
        a peer that connects as soon as the port opens is served at once instead of waiting for a
        receiver process to import its libraries and open the ledger."""
        c = self.config
        sock = self._sock = bind_port(c.host, c.port, backlog=None)  # the port is ours (errors show now), not listening
        for i in range(self.processes):
            self._spawn(i)
        watch = threading.Thread(target=self._watch_loop, name="specgate-listener-watch", daemon=True)
        watch.start()
        self._threads.append(watch)
        deadline = time.monotonic() + ready_timeout
        with self._lock:
            receivers = list(self._receivers.values())
        for r in receivers:
            if not r.ready.wait(max(0.0, deadline - time.monotonic())):
                log.warning("receiver %d not serving after %.0f s; listening anyway", r.index, ready_timeout)
                break
        sock.listen(128)
        accept = threading.Thread(target=self._accept_loop, name="specgate-listener-accept", daemon=True)
        accept.start()
        self._threads.append(accept)
        log.info("listening on %s:%d with %d receiver processes", *self.address, self.processes)
        return self

    def open_associations(self) -> int:
        """Connections the receivers hold now, by the listener's own count (the one the limit uses)."""
        with self._lock:
            return sum(r.active for r in self._receivers.values())

    def _spawn(self, index: int) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = self.spawn(child_end.fileno())
        finally:
            child_end.close()
        rcv = _ReceiverProcess(index, proc, parent_end)
        with self._lock:
            self._receivers[index] = rcv
        self._selector.register(parent_end, selectors.EVENT_READ, rcv)

    def _accept_loop(self) -> None:
        assert self._sock is not None
        accept_until(self._sock, self._stopping, self._take)

    def _take(self, conn: socket.socket, _address: object) -> None:
        with conn:  # the receiver holds its own copy of the descriptor once it is handed off
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._hand_off(conn)

    def _hand_off(self, conn: socket.socket) -> None:
        for _ in range(3):
            with self._lock:
                alive = [r for r in self._receivers.values() if r.proc.poll() is None]
                if not alive:
                    break
                rcv = min(alive, key=lambda r: (r.active, r.index))
                over = sum(r.active for r in self._receivers.values()) >= self.config.max_associations
                rcv.sent += 1
            try:
                socket.send_fds(rcv.sock, [HANDOFF_OVER_LIMIT if over else HANDOFF_ACCEPT], [conn.fileno()])
                return
            except OSError as exc:
                log.warning("receiver %d did not take a connection: %s", rcv.index, exc)
                with self._lock:
                    rcv.sent -= 1
        log.error("no receiver process available; connection closed")

    def _watch_loop(self) -> None:
        while not self._stopping.is_set():
            for key, _ in self._selector.select(timeout=0.5):
                rcv: _ReceiverProcess = key.data
                try:
                    data = rcv.sock.recv(4096)
                except OSError:
                    data = b""
                if data:
                    rcv.buffered += data
                    *lines, rcv.buffered = rcv.buffered.split(b"\n")
                    if lines:
                        open_now, received = (int(x) for x in lines[-1].split())
                        with self._lock:
                            rcv.reported_open, rcv.reported_received = open_now, received
                        rcv.ready.set()
                    continue
                self._selector.unregister(rcv.sock)
                rcv.sock.close()
                if not self._stopping.is_set():
                    try:
                        code = rcv.proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:  # closed its end but lives on: not serving, end it
                        rcv.proc.kill()
                        code = rcv.proc.wait(timeout=10)
                    lived = time.monotonic() - rcv.started
                    log.error("receiver process %d (pid %d) ended with %s after %.0f s; starting it again",
                              rcv.index, rcv.proc.pid, code, lived)
                    if lived < 5:  # it cannot start (bad configuration, database down): do not spin
                        self._stopping.wait(2.0)
                    if not self._stopping.is_set():
                        self._spawn(rcv.index)

    def stop(self, timeout: float = 60.0) -> None:
        self._stopping.set()
        close_listening(self._sock)
        with self._lock:
            receivers = list(self._receivers.values())
        for r in receivers:
            try:
                r.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for r in receivers:
            try:
                r.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("receiver %d did not finish in %.0f s; killing it", r.index, timeout)
                r.proc.kill()  # (receivers ignore SIGTERM: a supervisor's stop reaches them too)
                r.proc.wait(timeout=10)
        for t in self._threads:
            t.join(timeout=5)
        self._selector.close()


class HandoffReceiver:
    """The receiver process's side: connections arrive on its end of the socket pair and go to
    ``serve(connection, over_limit)``; :meth:`report` sends back the load that ``load()`` returns
    (connections open, connections received so far: absolute numbers, so a lost line cannot make the
    listener's count drift). When the listener closes its end (it stopped or died), :attr:`parent_gone`
    is set and no more connections come."""

    def __init__(self, sock: socket.socket, serve: Callable[[socket.socket, bool], None],
                 load: Callable[[], tuple[int, int]], *, interval_s: float = 0.05) -> None:
        self.sock = sock
        self.serve = serve
        self.load = load
        self.interval_s = interval_s
        self.parent_gone = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for target, name in ((self._take_loop, "specgate-handoff-take"), (self._report_loop, "specgate-handoff-load")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Stop reporting; the taking thread ends when the listener closes its end (it may be blocked
        in a receive that only the listener can end)."""
        self._stopping.set()
        for t in self._threads[1:]:
            t.join(timeout=10)

    def report(self) -> None:
        line = "{} {}\n".format(*self.load()).encode()
        try:
            self.sock.send(line)
        except OSError:
            pass

    def _take_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                msg, fds, _flags, _addr = socket.recv_fds(self.sock, 16, 1)
            except OSError:
                msg, fds = b"", []
            if not fds:
                self.parent_gone.set()
                return
            self.serve(socket.socket(fileno=fds[0]), msg == HANDOFF_OVER_LIMIT)

    def _report_loop(self) -> None:
        while not self.parent_gone.wait(self.interval_s) and not self._stopping.is_set():
            self.report()
