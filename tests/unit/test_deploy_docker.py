"""``deploy/docker/Dockerfile``: both variants (``--target cpu``, ``--target cuda``) exist, run ``specgate``
as an unprivileged user with ``specgate health`` as their health check, install PyTorch from the right
index, and copy every package the project installs; ``.dockerignore`` keeps local state out of the context.

Building the image needs a container daemon and the base images. These machines have neither (no daemon
runs, nothing outside can be reached): the build test then says so in a warning, naming what ``docker
info`` answered, and builds nothing; it does not pass as a build. Where a daemon answers and the base image
is there, it builds the CPU target and runs ``specgate --help`` in it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"


def _stages() -> dict[str, list[str]]:
    """Each stage's instructions (continuation lines joined), by stage name."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)$", line, re.IGNORECASE)
        if m:
            current = stages.setdefault(m.group(2), [line])
        else:
            current.append(line)
    return stages


def _last(stage: list[str], instruction: str) -> str:
    found = [ln for ln in stage if ln.split()[0].upper() == instruction]
    assert found, f"no {instruction} in stage {stage[0]!r}"
    return found[-1][len(instruction):].strip()


def test_both_variants_run_specgate_unprivileged() -> None:
    stages = _stages()
    assert {"build", "base-cpu", "base-cuda", "cpu", "cuda"} <= set(stages), sorted(stages)
    assert stages["cpu"][0].split()[1] == "base-cpu" and stages["cuda"][0].split()[1] == "base-cuda"
    assert "python:${PYTHON_VERSION}-slim" in stages["base-cpu"][0]
    assert stages["base-cuda"][0].split()[1] == "${CUDA_IMAGE}"
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-", DOCKERFILE.read_text())
    assert any("$TORCH_CPU_INDEX" in ln and "torch==" in ln for ln in stages["base-cpu"])
    assert any("$TORCH_CUDA_INDEX" in ln and "torch==" in ln for ln in stages["base-cuda"])
    for target in ("cpu", "cuda"):
        stage = stages[target]
        user = _last(stage, "USER")
        assert user not in ("root", "0") and not user.startswith("0:"), f"{target} runs as {user}"
        assert _last(stage, "ENTRYPOINT") == '["specgate-entrypoint"]'
        assert _last(stage, "HEALTHCHECK").endswith('CMD ["specgate-entrypoint", "health"]')
        assert any(ln.startswith("COPY --chmod=0755 deploy/docker/specgate-entrypoint /usr/local/bin/")
                   for ln in stage)
        assert "SPECGATE_DATA_DIR=/var/lib/specgate" in _last(stage, "ENV")


def test_the_entrypoint_reads_secret_files_and_runs_specgate(tmp_path: Path) -> None:
    """``specgate-entrypoint`` run here as in the image (the real ``specgate`` on PATH): NAME__FILE becomes
    NAME, and is removed (specgate refuses an unknown SPECGATE_* variable); SPECGATE_REVIEW_SECRET_FILE, a
    setting whose name happens to end in _FILE, is left alone."""
    script = ROOT / "deploy" / "docker" / "specgate-entrypoint"
    assert script.read_text().rstrip().endswith('exec specgate "$@"')
    secret = tmp_path / "database_url"
    secret.write_text(f"sqlite:///{tmp_path / 'ledger.db'}\n")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "SPECGATE_DATA_DIR": str(tmp_path),
           "SPECGATE_DATABASE_URL__FILE": str(secret),
           "SPECGATE_REVIEW_SECRET_FILE": str(tmp_path / "review-secret")}
    done = subprocess.run([str(script), "db", "upgrade"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ledger.db").is_file() and "ledger at revision" in done.stdout
    env["SPECGATE_DATABASE_URL__FILE"] = str(tmp_path / "missing")
    refused = subprocess.run([str(script), "db", "current"], env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "SPECGATE_DATABASE_URL__FILE names" in refused.stderr


def test_the_image_holds_every_package_the_project_installs() -> None:
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    wanted = {p.rstrip("*") for p in packages["include"]}
    copies = [ln.split()[1:] for ln in _stages()["build"] if ln.startswith("COPY")]
    copied = {Path(src).name for *sources, _ in copies for src in sources}
    assert wanted <= copied, f"the build stage does not COPY {sorted(wanted - copied)}"
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert {".git", ".venv", "specgate-data"} <= ignored
    assert not ignored & copied, f".dockerignore drops what the image copies: {sorted(ignored & copied)}"


def test_the_image_builds_where_a_daemon_and_the_base_image_are_reachable() -> None:
    docker = shutil.which("docker")
    assert docker, "the docker client is not installed"
    info = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                          timeout=60)
    if info.returncode != 0:
        answer = (info.stderr or info.stdout).strip().splitlines()[-1]
        assert "daemon" in answer.lower() or "connect" in answer.lower(), answer
        warnings.warn(f"NOT BUILT: no container daemon answers on this machine ({answer}); the image "
                      "build is untested here, only the Dockerfile's structure", stacklevel=1)
        return
    base = "python:3.11-slim-bookworm"
    if subprocess.run([docker, "image", "inspect", base], capture_output=True, timeout=60).returncode != 0:
        warnings.warn(f"NOT BUILT: the daemon answers but the base image {base} is not present and cannot be "
                      "pulled from here", stacklevel=1)
        return
    tag = "specgate-test:cpu"
    build = subprocess.run([docker, "build", "-f", str(DOCKERFILE), "--target", "cpu", "-t", tag, str(ROOT)],
                           capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([docker, "run", "--rm", tag, "--help"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "specgate" in run.stdout, run.stdout + run.stderr
