"""``deploy/redis/redis.conf`` makes a Redis that cannot silently drop jobs: a real ``redis-server`` started
with the shipped file (on a free loopback port, in a temporary folder) reports ``maxmemory-policy
noeviction`` and the append-only file on, writes that file, and at its memory limit refuses a new message
instead of evicting the queued ones."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.peers import free_port, wait_for

CONF = Path(__file__).resolve().parents[2] / "deploy" / "redis" / "redis.conf"


@pytest.fixture
def shipped_redis(tmp_path: Path) -> Iterator[redis.Redis]:
    server = shutil.which("redis-server")
    assert server, "redis-server is not installed (deploy/dev-services.sh installs it)"
    port = free_port()
    proc = subprocess.Popen([server, str(CONF), "--port", str(port), "--dir", str(tmp_path),
                             "--bind", "127.0.0.1", "--daemonize", "no"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def answers() -> bool:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise AssertionError(f"redis-server refused deploy/redis/redis.conf:\n{out}")
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_for(answers, timeout=30, what="redis-server with deploy/redis/redis.conf")
        yield client
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=30)


def test_the_shipped_redis_never_evicts_and_keeps_an_append_only_file(shipped_redis: redis.Redis,
                                                                      tmp_path: Path) -> None:
    r = shipped_redis
    assert r.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    assert r.config_get("appendonly") == {"appendonly": "yes"}
    assert r.config_get("appendfsync") == {"appendfsync": "everysec"}
    assert r.config_get("protected-mode") == {"protected-mode": "yes"}
    r.lpush("celery", b"job-1")
    r.execute_command("BGREWRITEAOF")  # the file is written where --dir says
    wait_for(lambda: list(tmp_path.rglob("appendonly.aof*")), timeout=30, what="the append-only file")

    # at the memory limit a write is refused (the enqueue fails loudly); the queued message stays
    r.config_set("maxmemory", str(r.info("memory")["used_memory"]))
    with pytest.raises(redis.exceptions.ResponseError, match="maxmemory"):
        r.lpush("celery", b"x" * 1_000_000)
    assert r.lrange("celery", 0, -1) == [b"job-1"]
