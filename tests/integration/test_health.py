"""``specgate health`` against real dependencies: a healthy deployment passes, then each dependency in turn
is made unavailable and exactly that check fails (and the command exits 1 naming it).

The deployment: the real PostgreSQL server (a database of this test's own), a private ``redis-server``
(stopped in the test), a private SeaweedFS S3 server (stopped in the test), a pynetdicom Verification
SCP as the destination, and a real ``specgate worker`` process on that Redis.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy.engine import make_url

from ledger import migrations
from model import weights as shipped
from specgate.health import Check, run_checks
from specgate.settings import Settings
from tests.peers import SeaweedS3, free_port, wait_for


@dataclass
class Deployment:
    data: Path
    db_url: str
    broker_url: str
    pacs_port: int
    redis: subprocess.Popen[bytes]
    s3: SeaweedS3

    def env(self, **more: str) -> dict[str, str]:
        return {"SPECGATE_DATA_DIR": str(self.data), "SPECGATE_DATABASE_URL": self.db_url,
                "SPECGATE_BROKER_URL": self.broker_url,
                "SPECGATE_DESTINATIONS": f"pacs=PACS@127.0.0.1:{self.pacs_port}", **more}

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {"data_dir": self.data, "database_url": self.db_url, "broker_url": self.broker_url,
                                  "destinations": [f"pacs=PACS@127.0.0.1:{self.pacs_port}"]}
        values.update(overrides)
        return Settings.load(**values)

    def checks(self, settings: Settings | None = None) -> list[Check]:
        return run_checks(settings or self.settings(), store_config=self.s3.store_config(prefix="health"),
                          timeout_s=3.0)


def _failed(checks: list[Check]) -> dict[str, str]:
    return {c.name: c.detail for c in checks if not c.ok}


def _start_redis(port: int, folder: Path) -> subprocess.Popen[bytes]:
    redis = shutil.which("redis-server")
    assert redis is not None, "redis-server is not installed"
    proc = subprocess.Popen([redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis as redis_py

    def up() -> bool:
        try:
            return bool(redis_py.Redis(port=port, socket_timeout=1).ping())
        except redis_py.RedisError:
            return False

    wait_for(up, timeout=20, what=f"redis-server on port {port}")
    return proc


def _stop(proc: subprocess.Popen[bytes], *, group: bool = False) -> None:
    if proc.poll() is None:
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def deployment(tmp_path: Path, pg_url: str) -> Iterator[Deployment]:
    data = tmp_path / "data"
    (data / "spool").mkdir(parents=True)
    migrations.upgrade(pg_url)
    redis_port = free_port()
    redis = _start_redis(redis_port, tmp_path)
    s3 = SeaweedS3(tmp_path / "seaweedfs").start()
    pacs = AE(ae_title="PACS")
    pacs.add_supported_context(Verification)
    pacs_port = free_port()
    server = pacs.start_server(("127.0.0.1", pacs_port), block=False)
    assert server is not None
    try:
        yield Deployment(data, pg_url, f"redis://127.0.0.1:{redis_port}/0", pacs_port, redis, s3)
    finally:
        server.shutdown()
        s3.stop()
        _stop(redis)


@pytest.fixture
def worker(deployment: Deployment, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real ``specgate worker`` on the deployment's Redis (answers Celery's ping)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SPECGATE_")}, **deployment.env()}
    with (tmp_path / "worker.log").open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "specgate", "worker", "--no-reconcile"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        _stop(proc, group=True)


def test_health_passes_then_names_each_dependency_that_is_down(deployment: Deployment, worker: Any,
                                                                tmp_path: Path) -> None:
    def answered() -> list[Check] | None:
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
        checks = deployment.checks()
        return checks if not _failed(checks) else None

    healthy = wait_for(answered, timeout=90, what="every check to pass (the worker to answer its ping)",
                       interval=1.0)
    assert [c.name for c in healthy] == ["database", "broker", "store", "spool", "destination:pacs",
                                        "model:default", "workers"]
    assert "at head" in healthy[0].detail and "answered PING" in healthy[1].detail

    # the command: one line per check, exit 0 (the store is the data dir here: the CLI's settings)
    from specgate.cli import main

    res = CliRunner().invoke(main, ["health", "--skip", "model"], env=deployment.env(), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert [line.split()[:2] for line in lines] == [["ok", n] for n in ("database", "broker", "store", "spool",
                                                                        "destination:pacs", "workers")]

    # PostgreSQL: a database that is not there (the shared server keeps running)
    gone = make_url(deployment.db_url).set(database="sg_no_such_database").render_as_string(hide_password=False)
    failed = _failed(deployment.checks(deployment.settings(database_url=gone)))
    assert list(failed) == ["database"] and "sg_no_such_database" in failed["database"]
    res = CliRunner().invoke(main, ["health", "--skip", "model"], env=deployment.env(SPECGATE_DATABASE_URL=gone),
                             catch_exceptions=False)
    assert res.exit_code == 1
    assert [line.split()[1] for line in res.output.splitlines() if line.startswith("FAIL")] == ["database"]

    # a destination nobody answers for
    failed = _failed(deployment.checks(deployment.settings(destinations=[f"pacs=PACS@127.0.0.1:{free_port()}"])))
    assert list(failed) == ["destination:pacs"] and "did NOT answer C-ECHO" in failed["destination:pacs"]

    # the spool over its watermark
    failed = _failed(deployment.checks(deployment.settings(spool_disk_watermark_percent=0.001)))
    assert list(failed) == ["spool"] and "over the watermark" in failed["spool"]

    # a bank for other weights: another model's weights with the shipped model's bank
    other = tmp_path / "other.pt"
    _other_weights(other)
    failed = _failed(deployment.checks(deployment.settings(models={"other": {"weights": other,
                                                                             "bank": shipped.BANK_PATH}})))
    assert list(failed) == ["model:other"] and "bank" in failed["model:other"]

    # the store: the S3 server stopped
    deployment.s3.stop()
    failed = _failed(deployment.checks())
    assert list(failed) == ["store"] and deployment.s3.endpoint_url in failed["store"]
    deployment.s3.start()

    # no worker running
    _stop(worker, group=True)
    failed = _failed(deployment.checks())
    assert list(failed) == ["workers"] and "no worker answered" in failed["workers"]

    # Redis stopped: the broker (the workers cannot be asked then; not said twice)
    _stop(deployment.redis)
    failed = _failed(deployment.checks())
    assert list(failed) == ["broker"] and deployment.broker_url in failed["broker"]
    res = CliRunner().invoke(main, ["health", "--json", "--only", "broker"], env=deployment.env(),
                             catch_exceptions=False)
    assert res.exit_code == 1
    assert [(c["name"], c["ok"]) for c in json.loads(res.output)] == [("broker", False)]


def _other_weights(path: Path, seed: int = 1) -> None:
    import torch

    from model.unet import SegNet, save_weights

    torch.manual_seed(seed)
    save_weights(SegNet(base_features=4, levels=2).eval(), path, meta={"name": "other", "version": "1"})


def test_a_registered_model_whose_file_changed_fails_its_check(tmp_path: Path, sqlite_url: str) -> None:
    """A model registered in the ledger whose weights file was replaced after registration."""
    from ledger import models as registry
    from ledger.db import open_engine, session_scope, sessionmaker_for

    migrations.upgrade(sqlite_url)
    weights = tmp_path / "reg.pt"
    _other_weights(weights)
    from model.adapters import open_adapter

    adapter = open_adapter("segnet", weights, layer=None, device="cpu")
    engine = open_engine(sqlite_url)
    with session_scope(sessionmaker_for(engine)) as s:
        registry.register(s, name="reg", version="1", format="segnet", path=str(weights),
                          files_sha256=dict(adapter.files_sha256), labels={1: "organ"}, layer=adapter.layer,
                          settings={}, actor="operator:test")
    engine.dispose()
    settings = Settings.load(data_dir=tmp_path / "data", database_url=sqlite_url)
    only = ("model",)
    assert not _failed(run_checks(settings, only=only))
    _other_weights(weights, seed=2)  # other weights under the registered name
    failed = _failed(run_checks(settings, only=only))
    assert list(failed) == ["model:reg"] and "files changed since it was registered" in failed["model:reg"]
