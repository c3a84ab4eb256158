"""A DICOM upper-layer proxy for tests: forwards a real peer's associations PDU by PDU, and can stop at a
chosen point the way a broken network or a hung PACS would.

The proxy sits between our SCU and a real destination (Orthanc, a pynetdicom SCP). It reads the client's
PDUs by their 6-byte header (type, reserved, 4-byte length; PS3.8 9.3) and forwards each one; the first
PDU of the type named in ``hold`` is not forwarded: from then on the proxy reads nothing more from that
client, forwards nothing more to it, and sets :attr:`DicomProxy.held`. Two uses:

- ``hold=A_RELEASE_RQ``: every C-STORE was answered by the destination (the client releases only after
  its last response), and the client now waits for a release answer that never comes. A test kills the
  client there: the destination holds the objects, the client never wrote down that it sent them.
- ``hold=P_DATA_TF``: the association was accepted, and then the destination neither reads nor answers
  (a hung PACS): the client's writes fill the socket buffers and stop.

Only the first association is held (``hold_once``); later ones pass through untouched, as a resend after
the fault would.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable

from tests.peers import free_port

__all__ = ["A_RELEASE_RQ", "P_DATA_TF", "DicomProxy"]

P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class DicomProxy:
    """Listen on 127.0.0.1:``port`` and forward to ``upstream`` (host, port); see the module docstring."""

    def __init__(self, upstream: tuple[str, int], *, hold: int, hold_once: bool = True) -> None:
        self.upstream, self.hold, self.hold_once = upstream, hold, hold_once
        self.port = free_port()
        self.held = threading.Event()
        self.associations = 0
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> DicomProxy:
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        for t in self._threads:
            t.join(10)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream, timeout=10)
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
                self.associations += 1
                holding = not (self.hold_once and self.held.is_set())
            self._spawn(self._client_to_upstream, client, upstream, holding)
            self._spawn(self._upstream_to_client, upstream, client)

    def _client_to_upstream(self, client: socket.socket, upstream: socket.socket, holding: bool) -> None:
        try:
            while True:
                header = _read_exact(client, 6)
                if header is None:
                    break
                pdu_type, length = header[0], struct.unpack(">L", header[2:6])[0]
                if holding and pdu_type == self.hold:
                    self.held.set()
                    self._closing.wait()  # read nothing more from this client, forward nothing more
                    return
                body = _read_exact(client, length)
                if body is None:
                    break
                upstream.sendall(header + body)
        except OSError:
            pass
        for s in (upstream, client):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _upstream_to_client(self, upstream: socket.socket, client: socket.socket) -> None:
        try:
            while chunk := upstream.recv(1 << 16):
                client.sendall(chunk)
        except OSError:
            pass

