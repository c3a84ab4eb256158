"""STOW-RS ingest beside C-STORE: the same CT series into a fresh ``specgate scp`` by dcmtk ``storescu`` (one
association) and by STOW-RS over HTTPS (one request: ``curl`` posting a prepared multipart body, and
``dicomweb-client``'s ``store_instances``, which encodes the data sets on the way).

Prints each way's median wall time and the ratio to C-STORE; never asserts. Run from the repository root::

    .venv/bin/python bench/stow.py                       # 300 slices of 512x512 (157 MB), 3 runs
    .venv/bin/python bench/stow.py --slices 60 --runs 3  # a quick look
    .venv/bin/python bench/stow.py --database-url postgresql+psycopg://root@127.0.0.1/bench  # dropped and
                                                                                    # created for each run

Every way stores the same bytes with the same promise (each instance fsynced and in the ledger before its
answer); each run starts from an empty data folder (and ledger), the ways alternating run by run. The
certificate is made for the run with ``openssl``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.ingest import SENDER_AE, _port_open, _recreate_database, fresh, timed_send  # noqa: E402
from tests.peers import free_port, peer_env, wait_for, write_ct_series  # noqa: E402

TOKEN = "bench-token"
BOUNDARY = "specgate-bench"


def _certificate(work: Path) -> tuple[Path, Path]:
    cert, key = work / "stow.pem", work / "stow.key"
    if not cert.exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                        "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                        "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@contextmanager
def specgate(work: Path, database_url: str | None, cert: Path, key: Path) -> Iterator[tuple[int, int]]:
    """``specgate scp`` with STOW-RS on: (DICOM port, HTTPS port)."""
    port, stow_port = free_port(), free_port()
    env = peer_env()
    env.update({
        "SPECGATE_DATA_DIR": str(work / "specgate"), "SPECGATE_SCP_PORT": str(port),
        "SPECGATE_ALLOWED_CALLERS": f"{SENDER_AE}@127.0.0.1", "SPECGATE_LOG_LEVEL": "WARNING",
        "SPECGATE_STOW_PORT": str(stow_port), "SPECGATE_STOW_TLS_CERT": str(cert), "SPECGATE_STOW_TLS_KEY": str(key),
        "SPECGATE_STOW_TOKENS": f"BENCH:{hashlib.sha256(TOKEN.encode()).hexdigest()}",
    })
    if database_url:
        _recreate_database(database_url)
        env["SPECGATE_DATABASE_URL"] = database_url
    exe = str(Path(sys.executable).with_name("specgate"))
    subprocess.run([exe, "db", "upgrade"], env=env, check=True, capture_output=True)
    proc = subprocess.Popen([exe, "scp"], env=env, stdout=subprocess.DEVNULL, stderr=open(work / "scp.log", "ab"))
    try:
        wait_for(lambda: _port_open(port) and _port_open(stow_port), timeout=60, what="specgate scp with STOW-RS")
        yield port, stow_port
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def multipart_body(folder: Path, out: Path) -> Path:
    with out.open("wb") as f:
        for path in sorted(folder.iterdir()):
            f.write(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            f.write(path.read_bytes())
            f.write(b"\r\n")
        f.write(f"--{BOUNDARY}--\r\n".encode())
    return out


def curl_post(stow_port: int, cert: Path, body: Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(["curl", "-sS", "--cacert", str(cert), "-o", os.devnull, "-w", "%{http_code}",
                        "-H", f"Authorization: Bearer {TOKEN}",
                        "-H", f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}',
                        "--data-binary", f"@{body}", f"https://127.0.0.1:{stow_port}/studies"],
                       capture_output=True, text=True, env=peer_env())
    if r.stdout != "200":
        raise RuntimeError(f"curl: HTTP {r.stdout} {r.stderr[-500:]}")
    return time.perf_counter() - t0


def dicomweb_client_post(stow_port: int, cert: Path, folder: Path) -> float:
    import requests
    from dicomweb_client.api import DICOMwebClient
    from pydicom import dcmread

    session = requests.Session()
    session.trust_env = False
    session.verify = str(cert)
    session.headers["Authorization"] = f"Bearer {TOKEN}"
    client = DICOMwebClient(url=f"https://127.0.0.1:{stow_port}", session=session, timeout=600)
    t0 = time.perf_counter()
    datasets = [dcmread(p) for p in sorted(folder.iterdir())]
    client.store_instances(datasets)
    dt = time.perf_counter() - t0
    session.close()
    return dt


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--database-url", default=None, help="specgate's ledger (default: SQLite in its data dir)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="specgate-bench-stow-"))
    folder = work / "series"
    if not folder.exists():
        print(f"generating {args.slices} slices {args.size}x{args.size} in {folder} ...", flush=True)
        write_ct_series(folder, slices=args.slices, size=args.size)
    mb = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
    body = multipart_body(folder, work / "body.multipart")
    cert, key = _certificate(work)

    ways: dict[str, Callable[[int, int], float]] = {
        "C-STORE (storescu)": lambda port, _stow: timed_send("SPECGATE", port, [folder], concurrent=False),
        "STOW-RS (curl)": lambda _port, stow: curl_post(stow, cert, body),
        "STOW-RS (dicomweb-client)": lambda _port, stow: dicomweb_client_post(stow, cert, folder),
    }
    times: dict[str, list[float]] = {w: [] for w in ways}
    for r in range(args.runs):
        for name, send in ways.items():
            with specgate(fresh(work / "run"), args.database_url, cert, key) as (port, stow_port):
                dt = send(port, stow_port)
            times[name].append(dt)
            print(f"  run {r + 1}/{args.runs} {name:26s} {dt:6.2f} s", flush=True)
    med = {w: statistics.median(v) for w, v in times.items()}
    base = med["C-STORE (storescu)"]
    print()
    print(f"series: {args.slices} x {args.size}x{args.size} uint16, {mb:.0f} MB; cores: {os.cpu_count()}; "
          f"specgate ledger: {args.database_url or 'SQLite'}")
    print(f"load average before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f} "
          "(other work on the machine makes every figure slower and noisier)")
    print(f"{'way':28s} {'median (s)':>10s} {'MB/s':>8s} {'/ C-STORE':>10s}")
    for name, t in med.items():
        print(f"{name:28s} {t:10.2f} {mb / t:8.1f} {t / base:10.2f}")


if __name__ == "__main__":
    main()
