"""Login storm benchmark: a radiologist's queue page while 16 wrong logins arrive at once, and while
anonymous 50 MB login bodies arrive, on SQLite and PostgreSQL.

    .venv/bin/python bench/review_login_storm.py                       # both backends, 16 logins, 3 rounds
    .venv/bin/python bench/review_login_storm.py --backends sqlite --logins 32

For each backend, a fresh ledger (as ``bench/review_queue.py`` makes it) with 200 held jobs, the real app
(``review.app.create_app`` on uvicorn, as the tests run it), a signed-in radiologist whose client times
``GET /queue`` (send to last byte). Three phases per round:

1. quiet: the queue page alone (median of 40 requests);
2. storm: ``--logins`` clients each post one wrong password at the same moment (argon2id verifications,
   about 60 ms of CPU and 64 MiB each) while the radiologist keeps asking for the queue page;
3. flood: four anonymous ``POST /login`` bodies of 50 MB (declared and sent) at once, the same.

Printed: the median queue time in each phase and its ratio to the quiet one (the issue's target for the
storm: within 2x on both backends), and how long the 50 MB posts took to be refused. Never asserted. On a
shared machine run it twice and read the second.

Before issue 23 (measured when it was filed): the 16 logins pushed the queue page from 6 ms to 1.25 s on
SQLite (each verification inside a transaction that held the write lock), and each 50 MB post cost 8-10 s
of CPU before its 403.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.review_queue import ledger, seed  # noqa: E402
from ledger import migrations  # noqa: E402
from ledger.db import open_engine, sessionmaker_for  # noqa: E402
from review.app import ReviewActions  # noqa: E402
from specgate.settings import Settings  # noqa: E402
from tests.integration.review.helpers import Client, ReviewServer, make_user  # noqa: E402


def _timed_queue(client: Client, stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        assert client.get("/queue").status == 200
        out.append(1000 * (time.perf_counter() - t0))


def _wrong_login(url: str, barrier: threading.Barrier, statuses: list[int]) -> None:
    c = Client(url)
    token = re.search(r'name="login_token" value="([^"]+)"', c.get("/login").text)
    assert token
    barrier.wait()
    statuses.append(c.post("/login", {"login_token": token.group(1), "username": "bench",
                                      "password": "not the password"}).status)


def _big_post(port: int, size: int, barrier: threading.Barrier, took: list[float]) -> None:
    head = (f"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {size}\r\n\r\n").encode()
    block = b"&" * (1 << 20)
    barrier.wait()
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(head)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused before it was all sent
            for _ in range(size // len(block)):
                sock.sendall(block)
        try:
            answer = sock.recv(64)
        except ConnectionResetError:
            answer = b""
    took.append(time.perf_counter() - t0)
    assert answer[:12] in (b"HTTP/1.1 413", b""), answer


def _during(client: Client, action: threading.Thread | list[threading.Thread]) -> list[float]:
    actions = action if isinstance(action, list) else [action]
    times: list[float] = []
    stop = threading.Event()
    timer = threading.Thread(target=_timed_queue, args=(client, stop, times))
    timer.start()
    for a in actions:
        a.start()
    for a in actions:
        a.join()
    stop.set()
    timer.join()
    return times


def run_backend(backend: str, logins: int, rounds: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory(prefix="specgate-bench-") as tmp, ledger(backend, Path(tmp)) as url:
        settings = Settings.load(data_dir=Path(tmp) / "data", database_url=url)
        migrations.upgrade(settings.db_url)
        engine = open_engine(settings.db_url)
        out: dict[str, list[float]] = {"quiet": [], "storm": [], "flood": [], "flood_refused_s": []}
        try:
            sessions = sessionmaker_for(engine)
            seed(sessions, 200, np.random.default_rng(0))
            make_user(sessions, "radiologist", "radiologist")
            make_user(sessions, "bench", "radiologist")
            cfg = settings.review_config()
            with ReviewServer(cfg, sessions, ReviewActions(deliver=lambda job_id: None)) as srv:
                rad = Client(srv.url)
                assert rad.login("radiologist").status == 303
                for _ in range(5):
                    rad.get("/queue")
                for r in range(rounds):
                    for _ in range(40):
                        t0 = time.perf_counter()
                        rad.get("/queue")
                        out["quiet"].append(1000 * (time.perf_counter() - t0))
                    statuses: list[int] = []
                    barrier = threading.Barrier(logins)
                    out["storm"] += _during(rad, [threading.Thread(target=_wrong_login, args=(srv.url, barrier, statuses))
                                                  for _ in range(logins)])
                    assert statuses == [401] * logins, statuses
                    barrier = threading.Barrier(4)
                    out["flood"] += _during(rad, [threading.Thread(target=_big_post, args=(srv.port, 50 << 20, barrier,
                                                                                            out["flood_refused_s"]))
                                                  for _ in range(4)])
                    print(f"  {backend}: round {r + 1}/{rounds}", flush=True)
        finally:
            engine.dispose()
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--logins", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    results = {b: run_backend(b, args.logins, args.rounds) for b in args.backends.split(",")}
    load = os.getloadavg()[0]
    print(f"\nqueue page (200 held) of a signed-in radiologist; {os.cpu_count()} CPUs, load average {load:.2f}")
    print(f"{'backend':<11} {'quiet ms':>9} {'storm ms':>9} {'storm/quiet':>12} {'flood ms':>9} {'flood/quiet':>12} "
          f"{'50 MB refused in s':>19}")
    for b, r in results.items():
        q, s, f = statistics.median(r["quiet"]), statistics.median(r["storm"]), statistics.median(r["flood"])
        print(f"{b:<11} {q:>9.1f} {s:>9.1f} {s / q:>12.2f} {f:>9.1f} {f / q:>12.2f} "
              f"{statistics.median(r['flood_refused_s']):>19.3f}")
    print(f"(storm: {args.logins} wrong logins at once; flood: 4 anonymous 50 MB POST /login at once. Target: "
          "storm/quiet within 2 on both backends.)")


if __name__ == "__main__":
    main()
