"""``deploy/compose.yaml`` passes ``docker compose config`` (or Debian's ``docker-compose``, which
``deploy/dev-services.sh`` installs where the Compose plugin is missing), and its rendered form is the
topology the issue asks for: the migration one-shot that every specgate service waits for, the GPU worker's
device reservation, the delivery worker, Redis with the shipped configuration, health checks, and no
password in the file. ``config`` needs no daemon: it validates the file against the Compose schema.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from specgate.settings import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
SPECGATE_SERVICES = ("scp", "review", "worker-gpu", "worker-cpu")
# Settings other branches of issue 18 add (the object store and the worker cache); once merged, every
# name here is in Settings.model_fields and this set may go.
def _compose() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    assert legacy, ("neither `docker compose` nor `docker-compose` is installed (deploy/dev-services.sh "
                    "installs Debian's docker-compose)")
    return [legacy]


def _config(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_compose(), "-f", str(path), "config", *extra], capture_output=True, text=True,
                          timeout=120, cwd=path.parent)


@pytest.fixture(scope="module")
def rendered() -> dict[str, Any]:
    result = _config(COMPOSE)
    assert result.returncode == 0, f"{' '.join(_compose())} config refused deploy/compose.yaml:\n{result.stderr}"
    assert "WARN" not in result.stderr.upper(), result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_config_accepts_the_file(rendered: dict[str, Any]) -> None:
    assert {"postgres", "redis", "s3", "s3-bucket", "migrate", *SPECGATE_SERVICES} <= set(rendered["services"])


def test_compose_config_refuses_a_broken_copy(tmp_path: Path) -> None:
    """The check above can fail: a misspelt dependency condition is a schema error."""
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("service_completed_successfully", "service_completed"))
    result = _config(broken, "-q")
    assert result.returncode != 0 and "service_completed" in result.stderr + result.stdout


def test_the_topology(rendered: dict[str, Any]) -> None:
    services = rendered["services"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "db upgrade" in " ".join(services["migrate"]["entrypoint"])
    assert " db roles" in " ".join(services["migrate"]["entrypoint"])
    for name in SPECGATE_SERVICES:
        svc = services[name]
        assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
        assert svc["healthcheck"]["test"] == ["CMD", "specgate-entrypoint", "health"], name
        assert svc["environment"]["SPECGATE_DATABASE_URL"].startswith("postgresql+psycopg://specgate_svc@")
        assert svc["environment"]["SPECGATE_STORE"] == "s3"
    for name, svc in services.items():
        assert "healthcheck" in svc or svc.get("restart") == "no", f"{name}: no health check"
    (gpu,) = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"] and gpu["count"] == 1
    assert services["worker-gpu"]["build"]["target"] == "cuda"
    assert services["worker-gpu"]["command"][:2] == ["worker", "--models"]
    assert services["worker-cpu"]["command"] == ["worker", "--queues", "deliver"]
    assert "deploy" not in services["worker-cpu"]
    redis = services["redis"]
    assert redis["command"][:2] == ["redis-server", "/usr/local/etc/redis/redis.conf"]
    assert any(str(v.get("source", v)).endswith("redis/redis.conf") for v in redis["volumes"]
               if isinstance(v, dict)) or any("redis/redis.conf" in str(v) for v in redis["volumes"])
    # the spool is the SCP's own volume; no volume is shared between specgate services
    mounts: dict[str, str] = {}
    for name in SPECGATE_SERVICES:
        for volume in services[name].get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else str(volume).split(":")[0]
            assert source not in mounts, f"{name} shares volume {source} with {mounts.get(source)}"
            mounts[source] = name


def settings_from_environment(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a service would start with, from its SPECGATE_* variables (a pending setting left out
    until it exists; a NAME__FILE secret is not a setting)."""
    for key, value in env.items():
        if key.startswith("SPECGATE_") and not key.endswith("__FILE"):
            if key.removeprefix("SPECGATE_").lower() not in set(Settings.model_fields):
                continue
            monkeypatch.setenv(key, str(value))
    return Settings.load()


@pytest.mark.parametrize("service", [*SPECGATE_SERVICES, "migrate"])
def test_each_service_starts_with_valid_settings(rendered: dict[str, Any], service: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from_environment(rendered["services"][service]["environment"], monkeypatch)
    assert settings.broker_url == "redis://redis:6379/0"
    assert settings.db_url.startswith("postgresql+psycopg://specgate_")


def test_no_password_is_written_in_the_file_and_every_setting_exists(rendered: dict[str, Any]) -> None:
    known = set(Settings.model_fields)
    for name, svc in rendered["services"].items():
        env = svc.get("environment") or {}
        for key, value in env.items():
            if key.endswith("__FILE"):  # read by deploy/docker/specgate-entrypoint
                assert str(value).startswith("/run/secrets/"), f"{name}: {key}={value}"
            elif key.endswith("_FILE") and not key.startswith("SPECGATE_"):  # another image's convention
                assert str(value).startswith("/run/secrets/"), f"{name}: {key}={value}"
            assert not ("PASSWORD" in key and not key.endswith("_FILE")), f"{name}: {key} in plain text"
            if key.startswith("SPECGATE_"):
                setting = key.removeprefix("SPECGATE_").removesuffix("__FILE").lower()
                assert setting in known, f"{name}: {key} is not a setting"
        for value in env.values():
            assert "://" not in str(value) or "@" not in str(value).split("://", 1)[1].split("/")[0] \
                or ":" not in str(value).split("://", 1)[1].split("@")[0], f"{name}: a password in a URL"
    for secret in rendered["secrets"].values():
        assert Path(secret["file"]).parent == DEPLOY / "secrets"
    ignore = (DEPLOY / "secrets" / ".gitignore").read_text().split()
    assert ignore[0] == "*", "deploy/secrets/ must keep its secrets out of git"
