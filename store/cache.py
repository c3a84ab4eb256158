"""A worker's local copies of objects in the store: size-bounded, least recently used out first.

A worker on a machine without the SCP's disk stages a series here before inference; the review app keeps
the images of the studies it shows. Files are named by what they hold (``sha256/<hex>`` for instances,
which never change; ``keys/<key>`` for result files), fetched into a temporary name and renamed, so a
reader never sees half a file and two processes fetching the same object at once end with one whole copy.

Use is recorded in the file's modification time (touched on every hit). When the cache is over
``max_bytes`` after a fetch, the files used longest ago go first, except those used since ``pinned_since``
(the series being staged right now): a cache smaller than one series grows past its bound rather than
deleting what the job is about to read, and says so in the log.

    >>> import tempfile
    >>> c = LocalCache(Path(tempfile.mkdtemp()), max_bytes=10)
    >>> p = c.get("keys/a", lambda dest: dest.write_bytes(b"12345678"))
    >>> p.read_bytes(), c.size()
    (b'12345678', 8)
    >>> q = c.get("keys/b", lambda dest: dest.write_bytes(b"abcdef"))
    >>> p.exists(), q.exists(), c.size()
    (False, True, 6)
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["LocalCache"]

log = logging.getLogger("specgate.store")


class LocalCache:
    """Local copies under ``root``, at most ``max_bytes`` of them (0: no bound)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def path(self, name: str) -> Path:
        """Where ``name`` is kept (whether or not it is there): no ``..`` and no absolute names."""
        parts = name.split("/")
        if not name or name.startswith("/") or any(p in ("..", ".", "") for p in parts) or "\x00" in name:
            raise ValueError(f"not a cache name: {name[:200]!r}")
        return self.root.joinpath(*parts)

    def get(self, name: str, fetch: Callable[[Path], object], *, pinned_since: float | None = None) -> Path:
        """The local copy of ``name``, fetched with ``fetch(temporary_path)`` when it is not here."""
        target = self.path(name)
        if target.exists():
            self.touch(target)
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            fetch(tmp)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.trim(keep=target, pinned_since=pinned_since)
        return target

    def put(self, name: str, src: Path) -> Path:
        """Keep a copy of a local file under ``name`` (a file this process just wrote and uploaded)."""
        target = self.path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and os.path.samefile(target, src):
            return target
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            with open(src, "rb") as fi, open(tmp, "wb") as fo:
                while chunk := fi.read(1 << 20):
                    fo.write(chunk)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.trim(keep=target)
        return target

    def evict(self, name: str) -> None:
        """Forget ``name``'s copy (it failed its check, or its object changed)."""
        self.path(name).unlink(missing_ok=True)

    @staticmethod
    def touch(path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):  # evicted by another process meanwhile
            os.utime(path)

    def _files(self) -> list[tuple[float, int, Path]]:
        out = []
        for folder, _, names in os.walk(self.root):
            for n in names:
                if n.endswith(".part"):
                    continue
                p = Path(folder) / n
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                out.append((st.st_mtime, st.st_size, p))
        return out

    def size(self) -> int:
        """Bytes held now."""
        return sum(size for _, size, _ in self._files())

    def trim(self, *, keep: Path | None = None, pinned_since: float | None = None) -> int:
        """Remove the least recently used files until the cache is within its bound; returns bytes freed."""
        if self.max_bytes == 0:
            return 0
        with self._lock:
            files = sorted(self._files())
            total = sum(size for _, size, _ in files)
            freed = 0
            for mtime, size, p in files:
                if total <= self.max_bytes:
                    break
                if p == keep or (pinned_since is not None and mtime >= pinned_since):
                    continue
                p.unlink(missing_ok=True)
                total -= size
                freed += size
            if total > self.max_bytes:
                log.warning("cache %s holds %d bytes, over its %d: every file left is in use", self.root, total,
                            self.max_bytes)
            return freed

    @staticmethod
    def now() -> float:
        """A time to pass as ``pinned_since`` before staging (file times, not a monotonic clock)."""
        return time.time() - 1.0  # file times may be coarser than the clock
