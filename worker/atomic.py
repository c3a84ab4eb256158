"""Publishing a file so that a reader (the review app, a resend after a crash) sees the old one or the new
one whole, never a part: every file the worker writes for a job (SEG, probability map, preview, evidence)
goes through :func:`atomic_write`.

A temporary file in the same folder (a rename is atomic only within one file system), written, flushed and
fsynced, renamed over the target, then the folder fsynced so that the rename itself survives a power cut.
On any failure the temporary file is removed and the target is left as it was.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> atomic_write(folder / "a.txt", b"one").read_bytes()
    b'one'
    >>> atomic_write(folder / "a.txt", lambda fh: fh.write(b"two")).read_bytes()
    b'two'
    >>> sorted(p.name for p in folder.iterdir())
    ['a.txt']
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["atomic_write", "write_dicom"]


def atomic_write(path: Path, content: bytes | Callable[[BinaryIO], object]) -> Path:
    """Write ``content`` (bytes, or a function that writes to the open binary file) to ``path`` atomically.

    Returns ``path``. The folder must exist.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            if isinstance(content, bytes):
                fh.write(content)
            else:
                content(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_dicom(ds: Dataset, path: Path) -> Path:
    """Publish a DICOM data set (a SEG, an SR, a KOS) as a Part 10 file at ``path``, atomically."""
    return atomic_write(Path(path), lambda fh: ds.save_as(fh, enforce_file_format=True))
