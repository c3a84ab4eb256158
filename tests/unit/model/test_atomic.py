"""model._atomic.atomic_write: the file is published whole or not at all, and a failure leaves no temporary."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
import torch

from model._atomic import atomic_write
from model.ood import SpectralGate
from model.unet import SegNet, load_weights, save_weights


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_bytes_and_writer_are_published_complete(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024)
    assert atomic_write(tmp_path / "blob", data) == tmp_path / "blob"
    assert (tmp_path / "blob").read_bytes() == data

    array = np.arange(1_000_000, dtype=np.float32)
    atomic_write(tmp_path / "a.npz", lambda fh: np.savez(fh, array=array))
    with np.load(tmp_path / "a.npz") as z:
        np.testing.assert_array_equal(z["array"], array)
    assert _names(tmp_path) == ["a.npz", "blob"]


def test_a_failing_writer_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "weights.pt"
    target.write_bytes(b"old weights")

    def half_then_fail(fh: BinaryIO) -> None:
        fh.write(b"new wei")
        raise RuntimeError("the writer failed half way")

    with pytest.raises(RuntimeError, match="half way"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old weights"
    assert _names(tmp_path) == ["weights.pt"]


def test_an_interrupt_is_cleaned_up_too(tmp_path: Path) -> None:
    def interrupted(fh: BinaryIO) -> None:
        fh.write(b"x" * 100)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "new.json", interrupted)
    assert _names(tmp_path) == []


def test_a_full_disk_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    """A real write failure (EFBIG under RLIMIT_FSIZE, as a full disk would give ENOSPC), in a child
    process so that the limit does not reach the test run."""
    target = tmp_path / "bank.npz"
    target.write_bytes(b"old bank")
    script = textwrap.dedent(f"""
        import errno, resource, signal, sys
        from model._atomic import atomic_write
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            atomic_write({str(target)!r}, bytes(1_000_000))
        except OSError as exc:
            sys.exit(0 if exc.errno == errno.EFBIG else 3)
        sys.exit(2)
    """)
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert target.read_bytes() == b"old bank"
    assert _names(tmp_path) == ["bank.npz"]


def test_the_published_file_has_ordinary_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "card.md", b"# card")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_caller_may_ask_for_a_stricter_mode_and_the_umask_still_applies(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        ordinary = atomic_write(tmp_path / "ordinary", b"x")
        strict = atomic_write(tmp_path / "strict", b"x", mode=0o640)
    finally:
        os.umask(old)
    assert (ordinary.stat().st_mode & 0o777, strict.stat().st_mode & 0o777) == (0o600, 0o600)
    old = os.umask(0)
    try:
        assert atomic_write(tmp_path / "strict", b"y", mode=0o640).stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_weights_and_bank_survive_a_failed_overwrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     rng: np.random.Generator) -> None:
    """save_weights and SpectralGate.save publish through atomic_write: a failing serialiser leaves the
    previous file loadable."""
    net = SegNet(base_features=4, levels=2)
    sha = save_weights(net, tmp_path / "w.pt", {"run": 1})
    gate = SpectralGate.fit(rng.normal(size=(5, 4)), weights_sha256=sha)
    gate.save(tmp_path / "bank.npz")

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken)
    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="No space"):
        save_weights(net, tmp_path / "w.pt", {"run": 2})
    with pytest.raises(OSError, match="No space"):
        gate.save(tmp_path / "bank.npz")

    assert load_weights(tmp_path / "w.pt")[1]["run"] == 1
    np.testing.assert_array_equal(SpectralGate.load(tmp_path / "bank.npz", sha).bank, gate.bank)
    assert _names(tmp_path) == ["bank.npz", "w.pt"]
