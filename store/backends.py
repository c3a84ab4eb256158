"""One store for instance files and job results, behind a small interface, with two backends.

- ``fs`` (the default, embedded): the data directory. A key is a path relative to it; :meth:`Store.path`
  is that file, :meth:`Store.put` of a file already in place does nothing. A worker that mounts the
  data directory elsewhere (NFS) sets its own ``data_dir``; rows of earlier versions holding absolute
  paths are read as they are (:func:`ledger.paths.from_ledger` semantics, restated here because this
  package imports nothing of ours).
- ``s3``: any S3-compatible object store (MinIO, Ceph RGW, SeaweedFS, a cloud bucket) through boto3. Keys
  live under ``prefix`` in ``bucket``; :meth:`Store.path` is a local copy in the size-bounded cache
  (:class:`store.cache.LocalCache`), fetched on first use. Nothing needs a shared filesystem.

Who calls what: the SCP writes to its spool (local, fsynced) and, with ``s3``, an uploader puts each
instance under its content address (:func:`store.layout.instance_key`) and marks it stored in the
ledger; the worker stages a series with :meth:`Store.path` and checks every file's SHA-256 (a mismatch
is :class:`HashMismatch`); it writes results locally (:meth:`Store.scratch`) and puts them; the delivery
and retraction tasks and the review app read with :meth:`Store.path` (``fresh=True`` for the SEG and SR,
which an approval rewrites under the same key).

Every failure to reach or use the store is :class:`StoreError` naming the backend, the bucket or folder
and the key, never a bare client exception.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from .cache import LocalCache

__all__ = ["FsStore", "HashMismatch", "ObjectMissing", "S3Store", "Store", "StoreConfig", "StoreError", "as_store", "file_sha256",
           "open_store"]

log = logging.getLogger("specgate.store")


class StoreError(OSError):
    """The store cannot be reached, refused an operation, or has no such object. An ``OSError``: to every
    caller it is what a missing or unreadable file was before there was a store (the review app shows
    "cannot be read", a delivery attempt fails and is retried)."""


class ObjectMissing(StoreError):
    """The store answers, and holds no object under this key (lost, pruned, or never uploaded): not an
    outage to wait out."""


class HashMismatch(StoreError):
    """A file's bytes do not hash to the SHA-256 the ledger recorded when it was received."""

    def __init__(self, key: str, expected: str, got: str) -> None:
        super().__init__(f"{key}: SHA-256 {got[:16]}... differs from the ledger's {expected[:16]}...")
        self.key, self.expected, self.got = key, expected, got


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class StoreConfig:
    """Which store, and how to reach it (built by ``specgate`` from its settings)."""

    kind: Literal["fs", "s3"] = "fs"
    endpoint_url: str | None = None  # None: the AWS endpoint for region
    bucket: str = "specgate"
    prefix: str = ""  # keys live under it: one bucket may serve several installations
    region: str = "us-east-1"
    access_key: str | None = None  # None: boto3's own chain (environment, instance role)
    secret_key: str | None = field(default=None, repr=False)
    ca_bundle: Path | None = None  # a private CA for an https endpoint
    cache_dir: Path | None = None  # default: <data_dir>/cache
    cache_max_bytes: int = 20 * 2**30
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0


class Store(ABC):
    """The interface every component uses (see the module docstring); two implementations, below."""

    kind: str = ""
    #: True when received instances must be uploaded before a job may be made of them
    remote: bool = False

    @abstractmethod
    def path(self, key: str, sha256: str | None = None, *, fresh: bool = False,
             pinned_since: float | None = None) -> Path:
        """A local, readable file holding ``key``'s object. ``sha256``: the object is content-addressed by
        it (cached under it); ``fresh``: not from the cache (an object that may have been rewritten)."""
        ...

    def verified_path(self, key: str, sha256: str, *, pinned_since: float | None = None) -> Path:
        """:meth:`path`, with its bytes checked against ``sha256``; :class:`HashMismatch` (after evicting
        the bad local copy, so that asking again fetches it again) when they differ."""
        p = self.path(key, sha256, pinned_since=pinned_since)
        got = file_sha256(p)
        if got != sha256:
            self.evict(key, sha256)
            raise HashMismatch(key, sha256, got)
        return p

    @abstractmethod
    def scratch(self, key: str) -> Path:
        """Where this process writes a file it will :meth:`put` under ``key`` (its folder exists)."""
        ...

    @abstractmethod
    def put(self, key: str, src: Path) -> None:
        """Store the local file ``src`` under ``key`` (durable when this returns)."""
        ...

    @abstractmethod
    def exists(self, key: str) -> bool:
        ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``'s object (and any local copy); no error when it is not there."""
        ...

    def evict(self, key: str, sha256: str | None = None) -> None:
        """Forget this host's copy of ``key`` (nothing to do for ``fs``)."""
        return None  # a store without local copies has nothing to forget

    @abstractmethod
    def check(self) -> None:
        """Reachable and writable: a probe object written, read back and removed; :class:`StoreError`."""
        ...

    @abstractmethod
    def describe(self) -> str:
        ...


def _clean_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("..", ".", "") for p in parts) or "\\" in key or "\x00" in key:
        raise StoreError(f"not a store key: {key[:200]!r}")
    return key


class FsStore(Store):
    """The data directory (``root`` None: keys are taken as paths, as given)."""

    kind = "fs"
    remote = False

    def __init__(self, root: Path | None) -> None:
        self.root = None if root is None else Path(root).resolve()

    def _file(self, key: str) -> Path:
        p = Path(key)
        if p.is_absolute() or self.root is None:  # a row of an earlier version, or no data dir configured
            return p
        return self.root / PurePosixPath(_clean_key(key))

    def path(self, key: str, sha256: str | None = None, *, fresh: bool = False,
             pinned_since: float | None = None) -> Path:
        return self._file(key)

    def scratch(self, key: str) -> Path:
        p = self._file(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def put(self, key: str, src: Path) -> None:
        target = self._file(key)
        if target.exists() and os.path.samefile(target, src):
            return  # written in place (the worker's results, the SCP's spool)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as fo, open(src, "rb") as fi:
                shutil.copyfileobj(fi, fo, 1 << 20)
                fo.flush()
                os.fsync(fo.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, key: str) -> bool:
        return self._file(key).exists()

    def delete(self, key: str) -> None:
        try:
            self._file(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot remove {key}: {exc}") from exc

    def check(self) -> None:
        if self.root is None:
            raise StoreError("fs store: no data directory configured")
        probe = self.root / f".store-probe-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as fh:
                fh.write(b"specgate")
                fh.flush()
                os.fsync(fh.fileno())
            if probe.read_bytes() != b"specgate":
                raise StoreError(f"fs store {self.root}: a probe file read back differently")
        except OSError as exc:
            raise StoreError(f"fs store {self.root} is not writable: {exc.strerror or exc}") from exc
        finally:
            probe.unlink(missing_ok=True)

    def describe(self) -> str:
        return f"fs:{self.root}"


class S3Store(Store):
    """An S3-compatible bucket, with this host's copies in a :class:`LocalCache` under ``cache_dir``."""

    kind = "s3"
    remote = True

    def __init__(self, config: StoreConfig, data_dir: Path | None) -> None:
        self.config = config
        base = Path(data_dir).resolve() if data_dir is not None else Path.cwd()
        self.local_root = base
        self.cache = LocalCache(config.cache_dir or base / "cache", config.cache_max_bytes)
        self.prefix = config.prefix.strip("/") + "/" if config.prefix.strip("/") else ""
        self._client: Any = None
        self._pid = -1
        self._lock = threading.Lock()

    # --- the client: made per process (boto3 clients are not safe across a fork) ------------------
    def client(self) -> Any:
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                import boto3
                from botocore.config import Config

                c = self.config
                self._client = boto3.client(
                    "s3", endpoint_url=c.endpoint_url, region_name=c.region, aws_access_key_id=c.access_key,
                    aws_secret_access_key=c.secret_key,
                    verify=str(c.ca_bundle) if c.ca_bundle is not None else None,
                    config=Config(connect_timeout=c.connect_timeout_s, read_timeout=c.read_timeout_s,
                                  retries={"max_attempts": 3, "mode": "standard"},
                                  s3={"addressing_style": "path"}))
                self._pid = os.getpid()
            return self._client

    def _key(self, key: str) -> str:
        return self.prefix + _clean_key(key)

    def _error(self, what: str, key: str, exc: Exception) -> StoreError:
        # a ClientError's response is a dict; botocore's connection errors carry ``response = None``
        response = getattr(exc, "response", None)
        detail = response.get("Error", {}) if isinstance(response, dict) else {}
        code = detail.get("Code") if isinstance(detail, dict) else None
        why = f"{code}: {detail.get('Message', '')}".strip(": ") if code else f"{type(exc).__name__}: {exc}"
        return StoreError(f"{self.describe()}: {what} {key}: {why}"[:1000])

    @staticmethod
    def _not_found(exc: Exception) -> bool:
        response = getattr(exc, "response", None)
        code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
        return code in ("404", "NoSuchKey", "NotFound")

    def _download(self, key: str, dest: Path) -> None:
        try:
            self.client().download_file(self.config.bucket, self._key(key), str(dest))
        except Exception as exc:  # noqa: BLE001 - botocore's errors, named in ours
            if self._not_found(exc):
                raise ObjectMissing(f"{self.describe()}: no object {key}") from exc
            raise self._error("cannot fetch", key, exc) from exc

    @staticmethod
    def _cache_name(key: str, sha256: str | None) -> str:
        return f"sha256/{sha256[:2]}/{sha256}" if sha256 else f"keys/{_clean_key(key)}"

    def path(self, key: str, sha256: str | None = None, *, fresh: bool = False,
             pinned_since: float | None = None) -> Path:
        name = self._cache_name(key, sha256)
        if fresh:
            self.cache.evict(name)
        return self.cache.get(name, lambda dest: self._download(key, dest), pinned_since=pinned_since)

    def evict(self, key: str, sha256: str | None = None) -> None:
        self.cache.evict(self._cache_name(key, sha256))

    def scratch(self, key: str) -> Path:
        p = self.local_root / PurePosixPath(_clean_key(key))
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def put(self, key: str, src: Path) -> None:
        try:
            self.client().upload_file(str(src), self.config.bucket, self._key(key))
        except Exception as exc:  # noqa: BLE001
            raise self._error("cannot store", key, exc) from exc
        if not key.startswith("instances/"):  # this host reads its own results again (review, approval)
            self.cache.put(self._cache_name(key, None), Path(src))

    def exists(self, key: str) -> bool:
        try:
            self.client().head_object(Bucket=self.config.bucket, Key=self._key(key))
        except Exception as exc:  # noqa: BLE001
            if self._not_found(exc):
                return False
            raise self._error("cannot look up", key, exc) from exc
        return True

    def delete(self, key: str) -> None:
        try:
            self.client().delete_object(Bucket=self.config.bucket, Key=self._key(key))
        except Exception as exc:  # noqa: BLE001
            if not self._not_found(exc):
                raise self._error("cannot remove", key, exc) from exc
        self.cache.evict(self._cache_name(key, None))

    def keys(self, under: str = "") -> Iterator[str]:
        """Every key under ``under`` (without the prefix)."""
        try:
            pages = self.client().get_paginator("list_objects_v2").paginate(
                Bucket=self.config.bucket, Prefix=self.prefix + under)
            for page in pages:
                for obj in page.get("Contents", []):
                    yield str(obj["Key"])[len(self.prefix):]
        except Exception as exc:  # noqa: BLE001
            raise self._error("cannot list", under or "/", exc) from exc

    def ensure_bucket(self) -> None:
        """Create the bucket if it is not there (the demo and tests; production creates it)."""
        client = self.client()
        try:
            client.head_bucket(Bucket=self.config.bucket)
            return
        except Exception:  # noqa: BLE001 - not there (or not ours): try to make it, which says why if not
            pass
        try:
            client.create_bucket(Bucket=self.config.bucket)
        except Exception as exc:  # noqa: BLE001
            raise self._error("cannot create bucket", self.config.bucket, exc) from exc

    def check(self) -> None:
        key = f".probe/{os.uname().nodename}-{os.getpid()}"
        client = self.client()
        try:
            client.put_object(Bucket=self.config.bucket, Key=self._key(key), Body=b"specgate")
            body = client.get_object(Bucket=self.config.bucket, Key=self._key(key))["Body"].read()
            client.delete_object(Bucket=self.config.bucket, Key=self._key(key))
        except Exception as exc:  # noqa: BLE001
            raise self._error("probe failed on", key, exc) from exc
        if body != b"specgate":
            raise StoreError(f"{self.describe()}: a probe object read back differently")

    def describe(self) -> str:
        return f"s3:{self.config.endpoint_url or 'aws'}/{self.config.bucket}/{self.prefix}"


_OPEN: dict[tuple[StoreConfig, str | None], Store] = {}
_OPEN_LOCK = threading.Lock()


def open_store(config: StoreConfig | None, data_dir: Path | None) -> Store:
    """The store for this configuration (one object per configuration and data directory in a process)."""
    cfg = config or StoreConfig()
    if cfg.kind == "fs":
        return FsStore(data_dir)
    if cfg.kind != "s3":
        raise ValueError(f"store must be 'fs' or 's3', got {cfg.kind!r}")
    k = (cfg, None if data_dir is None else str(Path(data_dir).resolve()))
    with _OPEN_LOCK:
        if k not in _OPEN:
            _OPEN[k] = S3Store(cfg, data_dir)
        return _OPEN[k]


def as_store(value: Store | Path | None) -> Store:
    """A store from what a caller has: a store, a data directory (``fs``), or None (paths as given)."""
    if isinstance(value, Store):
        return value
    return FsStore(value)
