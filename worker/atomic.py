"""Publishing a job's files so that a reader (the review app, a resend after a crash) sees the old one or
the new one whole, never a part: every file the worker writes for a job (SEG, SR, KOS, probability map,
preview, evidence) goes through :func:`atomic_write` or :func:`write_dicom`.

The mechanism is :func:`model._atomic.atomic_write` (a temporary file beside the target, written, flushed
and fsynced, renamed over it, the folder fsynced; on any failure the temporary file is removed and the
target is left as it was). What this module adds is the mode: a job's files are patient data (a SEG's
header names the patient), created 0o600 (:data:`RESULT_MODE`) whatever the umask, as the spool's are;
``model``'s own files follow the umask. Why the two differ: :mod:`model._atomic`.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> atomic_write(folder / "a.txt", b"one").read_bytes()
    b'one'
    >>> atomic_write(folder / "a.txt", lambda fh: fh.write(b"two")).read_bytes()
    b'two'
    >>> sorted(p.name for p in folder.iterdir()), oct((folder / "a.txt").stat().st_mode & 0o777)
    (['a.txt'], '0o600')
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from model._atomic import atomic_write as _publish

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["RESULT_MODE", "atomic_write", "write_dicom"]

#: The mode of every file the worker publishes for a job: its service account's alone (patient data).
RESULT_MODE = 0o600


def atomic_write(path: Path, content: bytes | Callable[[BinaryIO], object]) -> Path:
    """Write ``content`` (bytes, or a function that writes to the open binary file) to ``path`` atomically,
    mode :data:`RESULT_MODE`.

    Returns ``path``. The folder must exist.
    """
    return _publish(path, content, mode=RESULT_MODE)


def write_dicom(ds: Dataset, path: Path) -> Path:
    """Publish a DICOM data set (a SEG, an SR, a KOS) as a Part 10 file at ``path``, atomically."""
    return atomic_write(Path(path), lambda fh: ds.save_as(fh, enforce_file_format=True))
