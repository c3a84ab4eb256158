"""The systemd units in ``deploy/systemd`` pass ``systemd-analyze verify``, and hang together: the migration
is a oneshot that every service Requires= and comes After=, each segmentation worker instance is one model,
the delivery worker consumes the ``deliver`` queue only.

``systemd-analyze verify`` checks that each ExecStart binary exists and is executable. The units name
``/opt/specgate/.venv/bin/specgate``, the install path on a production host; here the test verifies a copy
whose only change is that path, pointed at the ``specgate`` entry point of the virtualenv that runs the tests
(the real program, not a stub). Anything else systemd would ignore with a warning (a misspelt key, a bad
signal name) fails the test too: verify exits 0 on those, so its output must be empty.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
INSTALLED = "/opt/specgate/.venv/bin/specgate"
SERVICES = ("specgate-scp.service", "specgate-review.service", "specgate-deliver.service",
            "specgate-worker@.service")


def _entry_point() -> Path:
    exe = Path(sys.executable).parent / "specgate"
    assert exe.is_file(), f"{exe} missing: the project is not installed in the test virtualenv (make setup)"
    return exe


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read_string((UNITS / name).read_text(encoding="utf-8"))
    return parser


def _verify(folder: Path, *units: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is not installed (Debian: systemd)"
    return subprocess.run([tool, "verify", *(str(folder / u) for u in units)], capture_output=True,
                          text=True, timeout=120, cwd=folder)


@pytest.fixture
def runnable_copy(tmp_path: Path) -> Path:
    """The units with the install path replaced by this virtualenv's ``specgate``; nothing else changed."""
    exe = str(_entry_point())
    for unit in UNITS.iterdir():
        text = unit.read_text(encoding="utf-8")
        (tmp_path / unit.name).write_text(text.replace(INSTALLED, exe), encoding="utf-8")
    return tmp_path


def test_systemd_analyze_verify_passes_on_every_unit(runnable_copy: Path) -> None:
    units = sorted(p.name for p in UNITS.iterdir() if p.suffix in (".service", ".target"))
    assert {"specgate-migrate.service", "specgate.target", *SERVICES} <= set(units)
    # a template is verified as an instance: specgate-worker@default runs the default model
    names = [u.replace("@.service", "@default.service") for u in units]
    result = _verify(runnable_copy, *names)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        f"systemd-analyze verify {' '.join(names)}:\n{result.stdout}{result.stderr}")


def test_verify_would_fail_on_a_broken_unit(runnable_copy: Path) -> None:
    """The check above can fail: a misspelt signal (a warning) and a missing binary (an error) are caught."""
    worker = runnable_copy / "specgate-worker@.service"
    worker.write_text(worker.read_text().replace("KillSignal=SIGTERM", "KillSignal=SIGTREM"))
    result = _verify(runnable_copy, "specgate-worker@default.service")
    assert "SIGTREM" in result.stdout + result.stderr
    scp = runnable_copy / "specgate-scp.service"
    scp.write_text(scp.read_text().replace(str(_entry_point()), "/nonexistent/specgate"))
    assert _verify(runnable_copy, "specgate-scp.service").returncode != 0


def test_the_units_hang_together() -> None:
    migrate = _unit("specgate-migrate.service")
    assert migrate["Service"]["Type"] == "oneshot" and migrate["Service"]["RemainAfterExit"] == "yes"
    text = (UNITS / "specgate-migrate.service").read_text()
    assert text.index(" db upgrade") < text.index(" db roles"), "roles are granted after the migration"
    for name in SERVICES:
        unit = _unit(name)
        assert "specgate-migrate.service" in unit["Unit"]["Requires"].split(), f"{name}: Requires= migrate"
        assert "specgate-migrate.service" in unit["Unit"]["After"].split(), f"{name}: After= migrate"
        assert unit["Service"]["ExecStart"].startswith(INSTALLED + " --config /etc/specgate/specgate.toml ")
        assert unit["Service"]["User"] == "specgate" and unit["Service"]["NoNewPrivileges"] == "true"
        exec_lines = [ln for ln in (UNITS / name).read_text().splitlines() if ln.startswith("Exec")]
        assert not any("db upgrade" in ln for ln in exec_lines), f"{name} migrates itself; the oneshot does"
    assert " worker --models %i " in _unit("specgate-worker@.service")["Service"]["ExecStart"] + " "
    assert _unit("specgate-deliver.service")["Service"]["ExecStart"].endswith(" worker --queues deliver")
