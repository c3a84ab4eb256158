"""The listener opens its port only once its receiver processes serve."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from dicom_node.handoff import Listener
from specgate.settings import Settings
from tests.peers import free_port

# A stand-in receiver: starts slowly, writes a marker, reports its load once, then waits for the
# listener to close the socket pair (as dicom_node.scp does).
_RECEIVER = """
import os, socket, sys, time
time.sleep(0.3)
fd, marker = int(sys.argv[1]), sys.argv[2]
open(marker, "w").close()
s = socket.socket(fileno=fd)
s.sendall(b"0 0\\n")
while s.recv(4096):
    pass
"""


def _connects(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, port)) == 0


def test_port_listens_only_after_every_receiver_reported(tmp_path: Path) -> None:
    settings = Settings(scp_host="127.0.0.1", scp_port=free_port(), data_dir=tmp_path / "data")
    markers: list[Path] = []

    def spawn(fd: int) -> subprocess.Popen[bytes]:
        marker = tmp_path / f"ready{len(markers)}"
        markers.append(marker)
        return subprocess.Popen([sys.executable, "-c", _RECEIVER, str(fd), str(marker)], pass_fds=(fd,))

    listener = Listener(settings.node_config(), spawn, processes=2)
    try:
        listener.start()
        # start() returned: both receivers had reported, and the port accepts connections
        assert len(markers) == 2 and all(m.exists() for m in markers)
        assert _connects(*listener.address)
    finally:
        listener.stop(timeout=10)
