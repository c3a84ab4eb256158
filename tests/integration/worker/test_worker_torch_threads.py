"""``SPECGATE_WORKER_TORCH_THREADS`` reaches torch in the process that runs the tasks: a real ``specgate
worker`` (its Celery parent, its prefork child), read back from the worker's own ``/metrics``, which the
child sets from ``torch.get_num_threads()`` after applying the setting (the parent never sets it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from ledger import migrations
from tests.peers import free_port, wait_for
from worker.tasks import set_torch_threads


def _threads(port: int) -> dict[str, float]:
    """{pool: threads} from the worker's /metrics; empty until the child has set them (or the port is up)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as rsp:
            text = rsp.read().decode()
    except OSError:
        return {}
    return {s.labels["pool"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "specgate_worker_torch_threads"}


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, int, Path]]:
    """``specgate worker`` with SQLite and the filesystem broker (no server), metrics on, and a thread
    setting that is not torch's default here (so a worker that ignored it would show the default)."""
    threads = torch.get_num_threads() + 2
    data = tmp_path / "data"
    data.mkdir()
    url = f"sqlite:///{data / 'specgate.db'}"
    migrations.upgrade(url)
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SPECGATE_")}, "SPECGATE_DATA_DIR": str(data),
           "SPECGATE_DATABASE_URL": url, "SPECGATE_WORKER_METRICS_PORT": str(port),
           "SPECGATE_WORKER_TORCH_THREADS": str(threads)}
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "specgate", "worker", "--no-reconcile"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc, port, threads, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)


def test_the_worker_process_runs_torch_with_the_configured_threads(worker) -> None:  # type: ignore[no-untyped-def]
    proc, port, threads, log = worker

    def applied() -> dict[str, float]:
        assert proc.poll() is None, log.read_text()[-3000:]
        return _threads(port)

    seen = wait_for(applied, timeout=120, what="the worker child's torch threads on /metrics")
    assert seen == {"intra_op": threads, "inter_op": threads}, log.read_text()[-3000:]
    # and the operator reads it in the log, from the child (not the Celery parent)
    text = wait_for(lambda: "torch threads" in (t := log.read_text()) and t, timeout=30, what="the log line")
    [line] = [ln for ln in text.splitlines() if "torch threads" in ln]
    assert f"torch threads {threads} intra-op, {threads} inter-op (worker_torch_threads={threads})" in line
    assert f"worker process {proc.pid}:" not in line


def test_zero_leaves_torch_its_defaults() -> None:
    before = (torch.get_num_threads(), torch.get_num_interop_threads())
    assert set_torch_threads(0) == before
    assert (torch.get_num_threads(), torch.get_num_interop_threads()) == before
