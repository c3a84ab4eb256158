"""Publishing a file whole: a reader (the worker loading weights, a resumed training run, an evaluation
reading a bank) finds the previous version or the new one, never a torn one, even after a power cut.

Every file ``model`` publishes (weights, OOD bank, training checkpoint and log, metrics, figures, synthetic
datasets) goes through :func:`atomic_write`. ``model`` imports nothing else of specgate's, so this is its
own copy of the mechanism (the worker has one too), with the same guarantees:

1. a new temporary file beside the target (a rename is atomic only within one file system), created with
   the permissions an ordinary ``open(path, "wb")`` would give (mode 0o666 less the umask);
2. the content written, flushed and fsynced;
3. ``os.replace`` onto the target, then the folder fsynced, so that the rename itself is durable.

On any failure (an exception from the writer, a full disk, KeyboardInterrupt) the temporary file is removed
and the target keeps its old content.

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


def atomic_write(path: str | os.PathLike[str], content: Content) -> Path:
    """Publish ``content`` at ``path``: bytes, or a function that writes to the open binary file.

    Returns the path. The folder must exist.
    """
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
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
