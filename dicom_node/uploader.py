"""The SCP's uploader: every instance received into the spool goes on to the object store.

Only with a remote store (``store = "s3"``). The C-STORE was answered 0x0000 after the local fsync and the
ledger row, as always; the row's ``store_key`` stays NULL until the file is in the store under its
content address (:func:`store.layout.instance_key`, the SHA-256 the ledger keeps). The assembler makes a
job of a study only when every instance of it has a key (:meth:`dicom_node.assembler.Assembler.pending`),
so no worker ever stages part of a series.

State lives only in the ledger: a restarted SCP finds the rows still without a key and uploads them. An
upload is idempotent (the same bytes under the same key), so two SCP hosts, or a crash between the upload
and the UPDATE, cost a second upload and nothing else. A store that does not answer is retried with
back-off (1 s doubling to 30 s), logged once per outage; nothing is lost meanwhile: the spool holds the
files and the studies wait. Rows whose file is not in this host's spool (received by another SCP host
sharing the ledger) are left to that host.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from ledger.db import DatabaseUnavailable, session_scope
from ledger.paths import from_ledger
from ledger.schema import Instance
from store import Store, StoreError, instance_key

if TYPE_CHECKING:
    from .prometheus import NodeMetrics

__all__ = ["Uploader"]

log = logging.getLogger("specgate.dicom_node.uploader")


class Uploader:
    """Puts instances without a store key into ``store``; :meth:`run_once` for one pass, :meth:`start` a loop."""

    def __init__(self, sessions: sessionmaker[Session], store: Store, data_dir: Path | None, *, batch: int = 256,
                 threads: int = 4, interval_s: float = 0.5, metrics: NodeMetrics | None = None) -> None:
        self.sessions, self.store, self.data_dir = sessions, store, data_dir
        self.batch, self.threads, self.interval_s = batch, threads, interval_s
        self.metrics = metrics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._elsewhere: set[int] = set()  # rows whose file is not in this host's spool
        self.uploaded = 0

    def start(self) -> Uploader:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="specgate-uploader", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            try:
                done = self.run_once()
                if backoff:
                    log.warning("store %s answers again; uploads resumed", self.store.describe())
                backoff = 0.0
                if done:
                    continue  # more may be waiting
            except StoreError as exc:
                if not backoff:
                    log.error("store unavailable, uploads wait (the spool keeps every file): %s", exc)
                backoff = min(30.0, max(1.0, backoff * 2))
                self._stop.wait(backoff)
                continue
            except DatabaseUnavailable as exc:
                log.error("uploader: ledger unavailable, retrying: %s", exc)
            except Exception:  # noqa: BLE001 - a bug must not end the uploads for good (the SCP keeps running)
                backoff = min(30.0, max(1.0, backoff * 2))
                log.exception("uploader: unexpected error, retrying in %.0f s (the spool keeps every file)", backoff)
                self._stop.wait(backoff)
                continue
            self._stop.wait(self.interval_s)

    def pending(self) -> list[tuple[int, str, str]]:
        """(id, spool path, SHA-256) of rows without a store key, oldest first."""
        with session_scope(self.sessions) as s:
            rows = s.execute(select(Instance.id, Instance.spool_path, Instance.sha256)
                             .where(Instance.store_key.is_(None)).order_by(Instance.id)
                             .limit(self.batch + len(self._elsewhere))).all()
        return [(int(i), str(p), str(h)) for i, p, h in rows if i not in self._elsewhere][: self.batch]

    def _upload(self, row: tuple[int, str, str]) -> tuple[int, str] | None:
        row_id, spool_path, sha256 = row
        local = from_ledger(spool_path, self.data_dir)
        if not local.exists():
            self._elsewhere.add(row_id)
            log.info("instance %d: not in this host's spool; left to the host that received it", row_id)
            return None
        key = instance_key(sha256)
        self.store.put(key, local)
        return row_id, key

    def run_once(self) -> int:
        """Upload one batch; the number of instances now in the store. Raises :class:`StoreError` when
        the store refuses (what was uploaded before the error is recorded)."""
        rows = self.pending()
        if not rows:
            return 0
        done: list[tuple[int, str]] = []
        error: StoreError | None = None
        with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="specgate-upload") as pool:
            for fut in [pool.submit(self._upload, r) for r in rows]:
                try:
                    item = fut.result()
                except StoreError as exc:
                    error = error or exc
                    continue
                if item is not None:
                    done.append(item)
        if done:
            t0 = time.perf_counter()
            with session_scope(self.sessions) as s:
                for row_id, key in done:
                    s.execute(update(Instance).where(Instance.id == row_id, Instance.store_key.is_(None))
                              .values(store_key=key).execution_options(synchronize_session=False))
            log.debug("%d instances marked stored in %.3f s", len(done), time.perf_counter() - t0)
            self.uploaded += len(done)
        if error is not None:
            raise error
        return len(done)
