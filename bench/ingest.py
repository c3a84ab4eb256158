"""Ingest benchmark: the same CT series sent by dcmtk ``storescu`` to specgate, Orthanc and ``storescp``.

Prints each target's median wall time and the ratios; never asserts. Run from the repository root::

    .venv/bin/python bench/ingest.py                       # 300 slices of 512x512 (157 MB), 5 runs
    .venv/bin/python bench/ingest.py --slices 60 --runs 3  # a quick look
    .venv/bin/python bench/ingest.py --database-url postgresql+psycopg://root@127.0.0.1/bench  # dropped
                                                                                         # and created
                                                                                         # for each run

Targets, alternating run by run, each started fresh (empty storage) for every run so that no target
benefits from having seen an instance before:

* ``specgate``: ``specgate scp`` (every instance fsynced and indexed in the ledger before its 0x0000);
* ``orthanc``: Debian's Orthanc with its default SQLite index;
* ``storescp``: dcmtk's ``storescp --fork`` writing files, the physical reference (no fsync, no index).

And the **durable floor**: what no receiver that keeps specgate's promise (each instance fsynced, with its
folder, and its row committed in the ledger before its 0x0000) can go below on this machine: storescp's
time plus, measured in the same run on the files storescp just wrote, one fsync of each file and of its
folder and one committed single-row transaction per file in specgate's ledger database (the same engine
settings: SQLite in WAL with ``synchronous=FULL``, or the PostgreSQL of ``--database-url``). Measured one
after another, so for several senders at once it is an upper estimate (their fsyncs and commits overlap).

Measured (2026-12-06, 300x512x512 CT of 158 MB, PostgreSQL ledger, medians of 3 runs, 2 for 4 senders,
load 0.3 before): one association specgate 1.28 s, Orthanc 1.68 s, storescp 0.41 s, durable floor 0.95 s
(storescp + 0.22 s of fsyncs + 0.31 s of commits): specgate is 0.76x Orthanc and 1.34x the floor (before the
header was collected by the stream and the ledger path computed without resolving: 1.43 s, 0.89x Orthanc).
Four at once: specgate 2.95 s, Orthanc 3.30 s (0.89x), storescp 1.40 s. Half of Orthanc's time is below
the floor on this machine (0.84 s against 0.95 s): no receiver that fsyncs and commits each instance before
answering can reach it here.

Then 4 senders at once, each with its own study, against each target, and the same 4 studies one after
another. Every dcmtk program and Orthanc runs with ``TCP_NODELAY=1`` (dcmtk 3.6.7 otherwise waits on
Nagle's algorithm and takes 20 times longer).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.peers import Orthanc, dcmtk_path, free_port, peer_env, wait_for, write_ct_series  # noqa: E402

SENDER_AE = "BENCH"
PROCESSES: int | None = None  # --processes


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _recreate_database(url: str) -> None:
    from sqlalchemy import create_engine, make_url, text

    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return
    admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{parsed.database}"'))
    admin.dispose()


@contextmanager
def specgate_target(work: Path, database_url: str | None) -> Iterator[tuple[str, int]]:
    port = free_port()
    env = peer_env()
    if PROCESSES is not None:
        env["SPECGATE_SCP_PROCESSES"] = str(PROCESSES)
    env.update({
        "SPECGATE_DATA_DIR": str(work / "specgate"), "SPECGATE_SCP_PORT": str(port),
        "SPECGATE_ALLOWED_CALLERS": f"{SENDER_AE}@127.0.0.1",
        "SPECGATE_LOG_LEVEL": "WARNING",
    })
    if database_url:
        _recreate_database(database_url)  # every run starts from an empty ledger, like the other targets
        env["SPECGATE_DATABASE_URL"] = database_url
    exe = str(REPO / ".venv" / "bin" / "specgate")
    subprocess.run([exe, "db", "upgrade"], env=env, check=True, capture_output=True)
    proc = subprocess.Popen([exe, "scp"], env=env, stdout=subprocess.DEVNULL, stderr=open(work / "scp.log", "ab"))
    try:
        wait_for(lambda: _port_open(port), timeout=30, what="specgate scp")
        yield "SPECGATE", port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextmanager
def orthanc_target(work: Path, database_url: str | None) -> Iterator[tuple[str, int]]:
    with Orthanc(work / "orthanc") as o:
        yield o.aet, o.dicom_port


@contextmanager
def storescp_target(work: Path, database_url: str | None) -> Iterator[tuple[str, int]]:
    port = free_port()
    out = work / "storescp"
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([dcmtk_path("storescp"), "--fork", "-od", str(out), "-aet", "STORESCP",
                             str(port)], env=peer_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _port_open(port), timeout=30, what="storescp")
        yield "STORESCP", port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


TARGETS: dict[str, Callable[[Path, str | None], object]] = {
    "specgate": specgate_target, "orthanc": orthanc_target, "storescp": storescp_target,
}


def storescu(ae: str, port: int, folder: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([dcmtk_path("storescu"), "-aet", SENDER_AE, "-aec", ae, "+sd", "+r",
                             "127.0.0.1", str(port), str(folder)], env=peer_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def timed_send(ae: str, port: int, folders: Sequence[Path], *, concurrent: bool) -> float:
    t0 = time.perf_counter()
    if concurrent:
        procs = [storescu(ae, port, f) for f in folders]
    else:
        procs = []
        for f in folders:
            p = storescu(ae, port, f)
            p.wait()
            procs.append(p)
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu to {ae} failed ({p.returncode}): {err.decode(errors='replace')[-500:]}")
    return time.perf_counter() - t0


def durability_cost(folder: Path, database_url: str | None, work: Path) -> tuple[float, float]:
    """(s to fsync every file under ``folder`` and its folder, s to commit one row per file in a ledger
    database): measured on files just written and not yet flushed, as a durable receiver would find them."""
    from sqlalchemy import text

    from ledger.db import open_engine

    files = sorted(p for p in folder.rglob("*") if p.is_file())
    t0 = time.perf_counter()
    for p in files:
        for path, flags in ((p, os.O_RDONLY), (p.parent, os.O_RDONLY | os.O_DIRECTORY)):
            fd = os.open(path, flags)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_s = time.perf_counter() - t0
    engine = open_engine(database_url or f"sqlite:///{work / 'floor.db'}")
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS bench_floor"))
            conn.execute(text("CREATE TABLE bench_floor (id INTEGER PRIMARY KEY, sop VARCHAR(64) UNIQUE, "
                              "path VARCHAR(300), sha256 VARCHAR(64), size BIGINT)"))
        t0 = time.perf_counter()
        for i, p in enumerate(files):
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO bench_floor (id, sop, path, sha256, size) VALUES (:i, :s, :p, :h, :n)"),
                             {"i": i, "s": f"1.2.3.{i}", "p": str(p), "h": "0" * 64, "n": 1})
        commit_s = time.perf_counter() - t0
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE bench_floor"))
    finally:
        engine.dispose()
    return fsync_s, commit_s


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5, help="runs per target, one association")
    ap.add_argument("--concurrent-runs", type=int, default=2, help="runs of the 4-senders test per target")
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--database-url", default=None, help="specgate's ledger (default: SQLite in its data dir)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--targets", default="specgate,orthanc,storescp")
    ap.add_argument("--processes", type=int, default=None,
                    help="specgate receiver processes (SPECGATE_SCP_PROCESSES; default: two per core)")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.concurrent_runs < 1:
        ap.error("--runs and --concurrent-runs must be at least 1")
    global PROCESSES
    PROCESSES = args.processes
    load_before = os.getloadavg()
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="specgate-bench-"))
    data = work / "series"
    print(f"generating {args.senders} series of {args.slices} slices {args.size}x{args.size} in {data} ...",
          flush=True)
    series = [data / f"study{i}" for i in range(args.senders)]
    for i, folder in enumerate(series):
        if not folder.exists():
            write_ct_series(folder, slices=args.slices, size=args.size, seed=i)
    mb = sum(p.stat().st_size for p in series[0].iterdir()) / 1e6
    print(f"one series: {mb:.0f} MB in {args.slices} files", flush=True)

    floor_extra: dict[str, list[float]] = {"single": [], "concurrent": [], "sequential": []}

    def run(target: str, folders: Sequence[Path], concurrent: bool, kind: str) -> float:
        scratch = fresh(work / "run")
        with TARGETS[target](scratch, args.database_url) as (ae, port):  # type: ignore[attr-defined]
            dt = timed_send(ae, port, folders, concurrent=concurrent)
        if target == "storescp":
            fsync_s, commit_s = durability_cost(scratch / "storescp", args.database_url, work)
            floor_extra[kind].append(fsync_s + commit_s)
            print(f"  {'':18s} durability on storescp's files: fsync {fsync_s:5.2f} s, ledger commits "
                  f"{commit_s:5.2f} s", flush=True)
        return dt

    single: dict[str, list[float]] = {t: [] for t in targets}
    for r in range(args.runs):
        for t in targets:
            dt = run(t, series[:1], False, "single")
            single[t].append(dt)
            print(f"  run {r + 1}/{args.runs} {t:9s} 1 association: {dt:6.2f} s", flush=True)
    conc: dict[str, list[float]] = {t: [] for t in targets}
    seq: dict[str, list[float]] = {t: [] for t in targets}
    for r in range(args.concurrent_runs):
        for t in targets:
            dt = run(t, series, True, "concurrent")
            conc[t].append(dt)
            print(f"  run {r + 1}/{args.concurrent_runs} {t:9s} {args.senders} at once: {dt:6.2f} s", flush=True)
            dt = run(t, series, False, "sequential")
            seq[t].append(dt)
            print(f"  run {r + 1}/{args.concurrent_runs} {t:9s} {args.senders} one after another: {dt:6.2f} s",
                  flush=True)
    shutil.rmtree(work / "run", ignore_errors=True)

    med = {k: {t: statistics.median(v[t]) for t in targets} for k, v in
           (("single", single), ("concurrent", conc), ("sequential", seq))}
    rows = list(targets)
    if "storescp" in targets:  # the durable floor: storescp's time and the durability measured beside it
        for kind in med:
            med[kind]["floor"] = med[kind]["storescp"] + statistics.median(floor_extra[kind])
        rows.append("floor")
    print()
    print(f"series: {args.slices} x {args.size}x{args.size} uint16, {mb:.0f} MB; cores: {os.cpu_count()}; "
          f"specgate ledger: {args.database_url or 'SQLite'}; receiver processes: {args.processes or 'auto'}")
    print(f"load average before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f} "
          "(other work on the machine makes every figure slower and noisier)")
    print(f"{'target':10s} {'1 assoc (s)':>12s} {f'{args.senders} at once':>12s} {f'{args.senders} in turn':>12s}"
          f" {'in turn/at once':>16s}")
    for t in rows:
        print(f"{t:10s} {med['single'][t]:12.2f} {med['concurrent'][t]:12.2f} {med['sequential'][t]:12.2f}"
              f" {med['sequential'][t] / med['concurrent'][t]:16.2f}")
    if "specgate" in targets:
        for other in (t for t in rows if t != "specgate"):
            print(f"specgate / {other}: 1 association {med['single']['specgate'] / med['single'][other]:.2f}x, "
                  f"{args.senders} at once {med['concurrent']['specgate'] / med['concurrent'][other]:.2f}x")


if __name__ == "__main__":
    main()
