"""Faults injected into real services: the ledger database becomes unavailable in the middle of a
C-STORE, the disk reaches the watermark, and ``specgate scp`` is killed with SIGKILL mid-study."""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from dicom_node.spool import Spool
from ledger.paths import from_ledger
from ledger.schema import Instance, Job, JobState, Study
from tests.conftest import PG_ADMIN_URL
from tests.integration.dicom_node.helpers import (
    CALLER,
    Ledger,
    RawPeer,
    echo,
    pdata,
    scu_ae,
    store,
    store_command,
)
from tests.peers import free_port, wait_for, write_ct_series


def _set_connections(url: str, allowed: bool) -> None:
    name = make_url(url).database
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {"true" if allowed else "false"}'))
            if not allowed:
                conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE datname = :n AND pid <> pg_backend_pid()"), {"n": name})
    finally:
        admin.dispose()


def test_database_unavailable_during_a_store_answers_a700_and_keeps_nothing(pg_ledger: Ledger, start_scp,
                                                                           tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=3)
    scp = start_scp(pg_ledger)
    port = scp.address[1]
    assert store(port, series.paths[:1]) == [0]
    # Send the request and the first part of the data set, take the database away, then send the rest:
    # the handler runs while the database is unavailable.
    raw = series.paths[1].read_bytes()
    meta_end = 132 + 12 + int(dcmread(series.paths[1]).file_meta.FileMetaInformationGroupLength)
    body = raw[meta_end:]
    peer = RawPeer(port)
    cx = peer.accepted[0]
    peer.send(pdata(cx, 0x03, store_command(CTImageStorage, series.sop_instance_uids[1])) + pdata(cx, 0x00, body[:1000]))
    _set_connections(pg_ledger.url, False)
    try:
        peer.send(pdata(cx, 0x02, body[1000:]))
        assert peer.response() == 0xA700
        peer.release()
        assert store(port, series.paths[2:]) == [0xA700]  # and so is a new association's
        # no orphan file: only the first instance's file is in the spool, and nothing is left in tmp
        files = pg_ledger.spool_files()
        assert [f.name for f in files] == [f"{series.sop_instance_uids[0]}.dcm"]
        assert list((pg_ledger.settings.spool_dir / "tmp").iterdir()) == []
    finally:
        _set_connections(pg_ledger.url, True)
    # the database is back: the same instances are stored normally, and the SCP never stopped serving
    assert store(port, series.paths[1:]) == [0, 0]
    assert pg_ledger.count() == 3 and len(pg_ledger.spool_files()) == 3


def test_connections_cut_while_idle_are_replaced_without_a_refusal(pg_ledger: Ledger, start_scp,
                                                                   tmp_path: Path) -> None:
    """PostgreSQL restarted (here: every backend of the ledger's database terminated) while the SCP was
    idle: the next instances are stored (0x0000), on new connections, not refused with 0xA700."""
    series = write_ct_series(tmp_path / "in", slices=4)
    scp = start_scp(pg_ledger)
    assert store(scp.address[1], series.paths[:2]) == [0, 0]  # the second one took the fast path
    name = make_url(pg_ledger.url).database
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            cut = conn.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                    "WHERE datname = :n AND pid <> pg_backend_pid()"), {"n": name}).scalar_one()
    finally:
        admin.dispose()
    assert cut >= 1
    assert store(scp.address[1], series.paths[2:]) == [0, 0]
    assert pg_ledger.count() == 4 and pg_ledger.audit("instance.refused") == []


def test_disk_watermark_answers_a700(sqlite_ledger: Ledger, start_scp, tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=2)
    sqlite_ledger.settings.spool_dir.mkdir(parents=True, exist_ok=True)
    used = Spool(sqlite_ledger.settings.spool_dir, watermark_percent=100).usage_percent()
    scp = start_scp(sqlite_ledger, spool_disk_watermark_percent=max(round(used - 1, 2), 0.01))
    assert store(scp.address[1], series.paths) == [0xA700, 0xA700]
    assert sqlite_ledger.count() == 0 and sqlite_ledger.spool_files() == []
    assert list((sqlite_ledger.settings.spool_dir / "tmp").iterdir()) == []
    assert {e.details["reason"] for e in sqlite_ledger.audit("instance.refused")} == {"disk_watermark"}
    roomy = start_scp(sqlite_ledger)  # same spool, watermark at its default
    assert store(roomy.address[1], series.paths) == [0, 0]


def test_a_write_the_disk_refuses_answers_a700_and_the_association_goes_on(sqlite_ledger: Ledger, start_scp,
                                                                            tmp_path: Path) -> None:
    """The file system refuses a write in the middle of a data set (here the file size limit RLIMIT_FSIZE
    stands in for a full disk, which a test cannot cause without root): that instance gets 0xA700 with
    nothing kept, the rest of its data set is read and dropped, and the next instance on the same
    association is stored."""
    big = write_ct_series(tmp_path / "big", slices=1, size=1024)  # a 2 MiB data set
    small = write_ct_series(tmp_path / "small", slices=1, size=64)
    scp = start_scp(sqlite_ledger)
    assert echo(scp.address[1]) == 0  # the ledger's files exist and are small: the limit hits the spool file
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limits[1]))
    try:
        statuses = store(scp.address[1], [big.paths[0], small.paths[0]])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert statuses == [0xA700, 0]
    [event] = sqlite_ledger.audit("instance.refused")
    assert event.details["reason"] == "disk_write_failed" and event.details["status"] == "0xA700"
    assert [f.name for f in sqlite_ledger.spool_files()] == [f"{small.sop_instance_uids[0]}.dcm"]
    assert sqlite_ledger.count() == 1
    assert list((sqlite_ledger.settings.spool_dir / "tmp").iterdir()) == []


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _start_scp_process(ledger: Ledger, port: int, log: Path, **extra: str) -> subprocess.Popen[bytes]:
    """``specgate scp`` in a process group of its own (the listener and its receiver processes)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECGATE_")}
    env.update({"SPECGATE_DATA_DIR": str(ledger.data_dir), "SPECGATE_DATABASE_URL": ledger.url,
                "SPECGATE_SCP_PORT": str(port), "SPECGATE_ALLOWED_CALLERS": f"{CALLER}@127.0.0.1",
                "SPECGATE_STUDY_QUIET_SECONDS": "2", "SPECGATE_SCP_PROCESSES": "2", **extra})
    exe = Path(sys.executable).with_name("specgate")
    proc = subprocess.Popen([str(exe), "scp"], env=env, stdout=subprocess.DEVNULL, stderr=open(log, "ab"),
                            start_new_session=True)
    wait_for(lambda: _port_open(port) or proc.poll() is not None, timeout=30, what="specgate scp to listen")
    assert proc.poll() is None, log.read_text()
    return proc


def test_sigkill_mid_study_loses_nothing_acknowledged(ledger: Ledger, tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=60)
    port = free_port()
    proc = _start_scp_process(ledger, port, tmp_path / "scp.log")
    statuses: dict[str, int | None] = {}

    def sender() -> None:
        ae = scu_ae(CALLER, [CTImageStorage])
        assoc = ae.associate("127.0.0.1", port, ae_title="SPECGATE")
        assert assoc.is_established
        for path, sop in zip(series.paths, series.sop_instance_uids, strict=True):
            if not assoc.is_established:
                break
            rsp = assoc.send_c_store(path)
            statuses[sop] = int(rsp.Status) if rsp is not None and "Status" in rsp else None
        if assoc.is_established:
            assoc.release()

    t = threading.Thread(target=sender)
    t.start()
    wait_for(lambda: sum(1 for s in statuses.values() if s == 0) >= 12, timeout=30, what="12 instances stored",
             interval=0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole service at once: listener and receivers
    proc.wait(timeout=10)
    t.join(timeout=30)
    wait_for(lambda: not _port_open(port), timeout=10, what="the port to close")
    acked = [sop for sop, status in statuses.items() if status == 0]
    assert 12 <= len(acked) < 60
    with ledger.sessions() as s:
        rows = {i.sop_instance_uid: i for i in s.execute(select(Instance)).scalars()}
    for sop in acked:  # every instance that got 0x0000 is in the ledger, with its complete file
        assert sop in rows, f"acknowledged instance {sop} lost"
        stored = from_ledger(rows[sop].spool_path, ledger.data_dir)
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == rows[sop].sha256
    # restart; the sender sends again what it has no success for; the study still becomes one job
    proc = _start_scp_process(ledger, port, tmp_path / "scp.log")
    try:
        missing = [p for p, sop in zip(series.paths, series.sop_instance_uids, strict=True) if sop not in acked]
        assert store(port, missing) == [0] * len(missing)

        def job() -> Job | None:
            with ledger.sessions() as s:
                return s.execute(select(Job)).scalar_one_or_none()

        queued = wait_for(job, timeout=30, what="the study's job")
        assert queued.state == JobState.QUEUED and queued.version == 1
        with ledger.sessions() as s:
            study = s.execute(select(Study)).scalar_one()
            assert study.received_count == study.assembled_count == 60
        assert ledger.count() == 60
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0


def _receiver_pids(listener_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(listener_pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_listener_spreads_associations_and_restarts_a_dead_receiver(sqlite_ledger: Ledger, tmp_path: Path) -> None:
    port = free_port()
    proc = _start_scp_process(sqlite_ledger, port, tmp_path / "scp.log", SPECGATE_SCP_MAX_ASSOCIATIONS="4")
    try:
        receivers = wait_for(lambda: len(_receiver_pids(proc.pid)) == 2 and _receiver_pids(proc.pid),
                             timeout=20, what="two receiver processes")
        # both receivers are serving (the port probe above was a connection too; it is gone by now)
        wait_for(lambda: echo(port) == 0 and echo(port) == 0, timeout=20, what="the receivers to answer")
        studies = [write_ct_series(tmp_path / f"in{i}", slices=8, seed=i) for i in range(4)]
        results: dict[int, list[int | None]] = {}

        def send(i: int) -> None:
            results[i] = store(port, studies[i].paths)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert results == {i: [0] * 8 for i in range(4)}
        assert sqlite_ledger.count() == 32
        # the limit holds for the whole node, across the receiver processes
        ae = scu_ae(CALLER, [CTImageStorage])
        # (an association that just released counts until its receiver's report reaches the listener, a
        # few milliseconds: ask again until each of the four is accepted)

        def accepted() -> Any:
            a = ae.associate("127.0.0.1", port, ae_title="SPECGATE")
            return a if a.is_established else None

        held = [wait_for(accepted, timeout=10, what="an association within the limit", interval=0.05)
                for _ in range(4)]
        # A connection counts from the moment the listener hands it over until its receiver closes it,
        # so the fifth is refused at once, whichever receiver it lands on.
        fifth = ae.associate("127.0.0.1", port, ae_title="SPECGATE")
        assert fifth.is_rejected
        prim = fifth.acceptor.primitive
        assert (prim.result, prim.result_source, prim.diagnostic) == (0x02, 0x03, 0x02)
        for a in held:
            a.release()
        # a receiver that dies is started again; the node keeps serving meanwhile
        os.kill(receivers[0], signal.SIGKILL)
        wait_for(lambda: len(set(_receiver_pids(proc.pid)) - {receivers[0]}) == 2, timeout=20,
                 what="the dead receiver to be replaced")
        more = write_ct_series(tmp_path / "more", slices=3)
        for _ in range(4):  # each receiver gets some of these
            assert store(port, more.paths) == [0, 0, 0]
        assert sqlite_ledger.count() == 35
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0
    assert _receiver_pids(proc.pid) == []
