"""SIGTERM to ``specgate scp`` in the middle of an association: the node stops accepting, the open
association finishes (every instance stored), and the process exits 0. One receiving process (the SCP
drains itself) and the listener with two receiver processes (the receivers drain when it lets them go),
the signal sent to the main process or to the whole process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.dicom_node.helpers import CALLER, Ledger
from tests.peers import dcmtk_path, free_port, peer_env, wait_for, write_ct_series


def _refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize(("processes", "to"), [("1", "main"), ("2", "main"), ("2", "group")])
def test_sigterm_mid_association_finishes_it_then_exits_0(sqlite_ledger: Ledger, tmp_path: Path,
                                                         processes: str, to: str) -> None:
    """``to``: the main process (``docker stop``, systemd ``KillMode=mixed``) or every process of the
    group (systemd's default ``KillMode=control-group``: the receiver processes get SIGTERM too)."""
    series = write_ct_series(tmp_path / "in", slices=400, size=64)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECGATE_")}
    env.update({"SPECGATE_DATA_DIR": str(sqlite_ledger.data_dir), "SPECGATE_DATABASE_URL": sqlite_ledger.url,
                "SPECGATE_SCP_PORT": str(port), "SPECGATE_ALLOWED_CALLERS": f"{CALLER}@127.0.0.1",
                "SPECGATE_SCP_PROCESSES": processes, "SPECGATE_STUDY_QUIET_SECONDS": "600"})
    log = tmp_path / "scp.log"
    proc = subprocess.Popen([str(Path(sys.executable).with_name("specgate")), "scp"], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(log, "ab"), start_new_session=True)
    sender = None
    try:
        wait_for(lambda: not _refused(port) or proc.poll() is not None, timeout=60, what="specgate scp to listen")
        assert proc.poll() is None, log.read_text()
        # one association carrying the whole series (storescu sends every file on one association)
        sender = subprocess.Popen([dcmtk_path("storescu"), "-aet", CALLER, "-aec", "SPECGATE", "127.0.0.1",
                                   str(port), *map(str, series.paths)], env=peer_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for(lambda: sqlite_ledger.count() >= 5, timeout=60, what="the first instances to be stored")
        if to == "group":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        stored_at_signal = sqlite_ledger.count()
        assert stored_at_signal < len(series.paths), "the association ended before the signal: nothing tested"
        wait_for(lambda: _refused(port), timeout=30, what="the port to refuse new connections")
        out, _ = sender.communicate(timeout=120)
        assert sender.returncode == 0, out[-3000:]
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        for p in (sender, proc):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
    assert sqlite_ledger.count() == len(series.paths)  # every instance of the open association stored
    assert _refused(port)
