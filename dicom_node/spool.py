r"""Durable files for received instances.

An instance becomes durable in three steps, in this order, before its C-STORE is answered:

1. its bytes are in a temporary file under ``<spool>/tmp`` (the SCP writes the data set there while it
   arrives, and hashes it on the way, see :mod:`dicom_node.scp`);
2. the file gets its final name ``<spool>/<study>/<series>/<sop>.dcm`` by a hard link that refuses to
   replace an existing file (``os.link``), the temporary name is removed, then the file and its folder
   are fsynced;
3. the caller inserts the ledger row and commits, and only then answers success. A crash before the
   commit can leave a final file without a row (never a row without a durable file); the peer got no
   success for it and sends it again, which finds the file and indexes it.

The path components are UIDs validated by :func:`validate_uid`; a DICOM value is never used as a path
otherwise. :func:`validate_uid` is also the one rule for every other UID the node takes from a peer (the
A-ASSOCIATE-RQ's syntaxes, the C-STORE request's, the data set's, the file meta we write): a value is
either a UID by PS3.5 9.1 or refused, never tidied into one.

    >>> validate_uid("1.2.840.10008.5.1.4.1.1.2", what="SOP Class UID")
    '1.2.840.10008.5.1.4.1.1.2'
    >>> validate_uid(b"1.2.345\x00", what="Study Instance UID")  # the one NUL that pads an odd length
    '1.2.345'
    >>> validate_uid("1.2/../3", what="SOP Instance UID")
    Traceback (most recent call last):
    ...
    dicom_node.spool.InvalidUID: SOP Instance UID '1.2/../3' is not a UID (digits and dots, no empty component or leading zero, at most 64 characters, one NUL pad at most)
    >>> validate_uid("1.2.3\n", what="Study Instance UID")
    Traceback (most recent call last):
    ...
    dicom_node.spool.InvalidUID: Study Instance UID '1.2.3\n' is not a UID (digits and dots, no empty component or leading zero, at most 64 characters, one NUL pad at most)
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["InvalidUID", "Spool", "SpooledFile", "validate_uid"]

# PS3.5 9.1: components of digits separated by single dots, no leading zero in a multi-digit component.
# Matched with fullmatch: "$" would also match before a trailing newline.
_UID_RE = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
_HASH_CHUNK = 1 << 20


class InvalidUID(ValueError):
    """A value that should be a UID is not one; the message names what it is and shows the value."""


def validate_uid(value: object, *, what: str) -> str:
    """Return ``value`` as a UID if it is one, else raise :class:`InvalidUID` naming ``what`` and showing
    the value (``repr``: a newline or a NUL is visible).

    ``value``: text, or the raw bytes of a UI value (bytes that are not ASCII never make a UID). One
    trailing NUL is the pad of an odd-length UI value (PS3.5 6.2) and is removed; any other trailing or
    leading character, a space or a second NUL included, is part of the value and makes it not a UID.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        text = bytes(value).decode("ascii", errors="replace")
    else:
        text = "" if value is None else str(value)
    if text.endswith("\x00"):
        text = text[:-1]
    if len(text) > 64 or not _UID_RE.fullmatch(text):
        shown = text if len(text) <= 80 else text[:80] + "..."
        raise InvalidUID(f"{what} {shown!r} is not a UID (digits and dots, no empty component or leading zero, "
                         "at most 64 characters, one NUL pad at most)")
    return str(text)


def _fsync(path: Path, flags: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync(path, os.O_DIRECTORY)


@dataclass(frozen=True)
class SpooledFile:
    path: Path
    size_bytes: int
    sha256: str
    created: bool  # False: a file with this name was already there and was kept


class Spool:
    """The spool folder. Construct, then :meth:`open` (creates the folders); no I/O in the constructor."""

    def __init__(self, root: Path, *, watermark_percent: float) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.watermark_percent = watermark_percent

    def open(self) -> Spool:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return self

    # ------------------------------------------------------------------------------------- space
    def usage_percent(self) -> float:
        usage = shutil.disk_usage(self.root)
        return 100.0 * usage.used / usage.total

    def has_room(self) -> bool:
        """False when the spool's file system is at or above the watermark (answer 0xA700 then)."""
        return self.usage_percent() < self.watermark_percent

    # ------------------------------------------------------------------------------------- files
    def final_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        study = validate_uid(study_uid, what="Study Instance UID")
        series = validate_uid(series_uid, what="Series Instance UID")
        sop = validate_uid(sop_uid, what="SOP Instance UID")
        return self.root / study / series / f"{sop}.dcm"

    @staticmethod
    def digest(path: Path, *, fsync: bool = False) -> tuple[int, str]:
        """(size, SHA-256 hex) of a file, read in chunks; with ``fsync``, the file is also made durable."""
        h = hashlib.sha256()
        size = 0
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
                size += len(chunk)
            if fsync:
                os.fsync(f.fileno())
        return size, h.hexdigest()

    def commit(self, temp: Path, study_uid: str, series_uid: str, sop_uid: str, *,
               digest: tuple[int, str] | None = None) -> SpooledFile:
        """Give ``temp`` its final name without replacing an existing file, and make it durable.

        The link comes first and the file's fsync second, so that one journal commit carries the data
        and the new directory entry; the folder is then fsynced as well (and its parents when they were
        created just now), which is what POSIX asks for. If the final name exists already (the same
        instance received before, or at this moment on another association, or a file left by a crash
        before its row was committed), nothing changes and ``created`` is False: the caller decides,
        from the ledger, between :meth:`discard_temp` and :meth:`replace`.

        ``digest``: the file's (size, SHA-256) when the caller computed them while writing it; the file
        is then fsynced without being read again.
        """
        final = self.final_path(study_uid, series_uid, sop_uid)
        new_dirs = [d for d in (final.parent.parent, final.parent) if not d.is_dir()]
        if new_dirs:
            final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(temp, final)
        except FileExistsError:
            return SpooledFile(final, 0, "", created=False)
        os.unlink(temp)  # a temporary name that survives a crash is swept later, it needs no fsync
        if digest is not None:
            size, sha = digest
            _fsync(final)
        else:
            size, sha = self.digest(final, fsync=True)
        _fsync_dir(final.parent)
        for d in reversed(new_dirs):
            _fsync_dir(d.parent)
        return SpooledFile(final, size, sha, created=True)

    def replace(self, temp: Path, final: Path) -> SpooledFile:
        """Put ``temp`` in place of ``final``: only for a final file that has no ledger row (never
        acknowledged, e.g. left by a crash between link and commit, possibly incomplete)."""
        os.replace(temp, final)
        size, sha = self.digest(final, fsync=True)
        _fsync_dir(final.parent)
        return SpooledFile(final, size, sha, created=True)

    def remove(self, path: Path) -> None:
        """Remove a spooled file (its ledger row could not be written) and make the removal durable."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        _fsync_dir(path.parent)

    def discard_temp(self, path: Path | None) -> None:
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def sweep_temp(self, older_than_s: float) -> int:
        """Remove temporary files left by associations that died mid-dataset; returns how many."""
        cutoff = time.time() - older_than_s
        removed = 0
        for entry in os.scandir(self.tmp_dir):
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
