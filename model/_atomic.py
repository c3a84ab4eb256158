"""Publishing a file whole: a reader (the worker loading weights, a resumed training run, an evaluation
reading a bank, the review app opening a result) finds the previous version or the new one, never a torn
one, even after a power cut.

Every file ``model`` publishes (weights, OOD bank, training checkpoint and log, metrics, figures, synthetic
datasets) goes through :func:`atomic_write`, and so does every file the worker writes for a job, through
:mod:`worker.atomic` (``worker`` may import ``model``; ``model`` imports nothing else of specgate's, so the
one writer lives here):

1. a new temporary file beside the target (a rename is atomic only within one file system), created with
   ``mode`` less the umask (see below);
2. the content written, flushed and fsynced;
3. ``os.replace`` onto the target, then the folder fsynced, so that the rename itself is durable.

On any failure (an exception from the writer, a full disk, KeyboardInterrupt) the temporary file is removed
and the target keeps its old content.

The file's mode is the caller's decision, because the two kinds of file differ:

- ``model``'s files (the default, 0o666 less the umask, what an ordinary ``open(path, "wb")`` gives): weights,
  banks, figures and reports hold no patient data and are read by other accounts (the service user reading
  weights a developer built, a reviewer reading an experiment's report);
- a job's results (0o600, :data:`worker.atomic.RESULT_MODE`): a DICOM-SEG and its SR carry the patient's name
  and ID, the probability map and preview are the patient's anatomy. They are readable by the services'
  own account only, like the received instances in the spool (``dicom_node.sink``); the shipped units run
  ``scp``, ``worker`` and ``review`` as one user (``deploy/systemd``), so nothing that needs them loses access.

>>> import tempfile
>>> folder = Path(tempfile.mkdtemp())
>>> atomic_write(folder / "card.txt", b"v1").read_bytes()
b'v1'
>>> _ = atomic_write(folder / "card.txt", lambda fh: fh.write(b"v2"))
>>> [p.name for p in folder.iterdir()], (folder / "card.txt").read_bytes()
(['card.txt'], b'v2')
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write"]

Content = bytes | Callable[[BinaryIO], object]


def atomic_write(path: str | os.PathLike[str], content: Content, *, mode: int = 0o666) -> Path:
    """Publish ``content`` at ``path``: bytes, or a function that writes to the open binary file. The file
    is created with ``mode`` less the process's umask (see the module docstring).

    Returns the path. The folder must exist.
    """
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    published = False
    try:
        with open(fd, "wb") as fh:
            _fill(fh, content)
        os.replace(temporary, target)
        published = True
    finally:
        if not published:
            temporary.unlink(missing_ok=True)
    _sync_folder(target.parent)
    return target


def _fill(fh: BinaryIO, content: Content) -> None:
    """Write the content and make it durable before anyone can see it under the target's name."""
    if isinstance(content, bytes | bytearray | memoryview):
        fh.write(content)
    else:
        content(fh)
    fh.flush()
    os.fsync(fh.fileno())


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
