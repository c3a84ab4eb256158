"""Completeness by asking the archive: before a quiet study becomes a job, its source's archive says how
many series and instances it holds, and the assembler waits (at most ``completeness_wait_seconds``) until
specgate holds them all.

A study whose sender (the calling AE title that first sent it) has an archive
(``completeness_archive``) is not assembled when its quiet period ends; :meth:`CompletenessCheck.decide`
instead

1. records the bound in the ledger (``studies.completeness_due_at``: a restarted SCP goes on waiting, and
   asks again),
2. asks the archive on a thread of its own (a C-FIND or QIDO-RS that hangs never stops the assembler's
   pass), and records its answer (``studies.completeness``) or, audited ``archive.unreachable``, why
   there is none (asked again every ``retry_s`` until the bound),
3. lets the study become a job as soon as every series the archive holds is held here with as many
   instances (``complete``), or the archive holds nothing of it (``not_at_source``); at the bound, with
   ``incomplete_at_source`` (counts at the source and held, per series) or ``archive_unreachable``.

What it decided goes on the job (``jobs.completeness``); the worker copies it into the job's evidence and
the rule's ``when_incomplete`` decides whether an ``incomplete_at_source`` job runs as the gate says or is
held.

    >>> verdict({"1.2": 20, "1.3": 4}, {"1.2": 20})
    ('incomplete_at_source', [{'series_instance_uid': '1.3', 'at_source': 4, 'held': 0}])
    >>> verdict({"1.2": 20}, {"1.2": 20, "1.9": 2})
    ('complete', [])
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from ledger import audit
from ledger.schema import Study

from .archive import ArchiveClient, ArchiveUnreachable, StudyCounts, open_archive
from .config import Archive, CompletenessConfig

__all__ = ["CompletenessCheck", "verdict"]

log = logging.getLogger("specgate.dicom_node.completeness")
ACTOR = "dicom_node.completeness"


def verdict(at_source: dict[str, int], held: dict[str, int]) -> tuple[str, list[dict[str, Any]]]:
    """``complete``, or ``incomplete_at_source`` with each series the archive holds more of."""
    short = [{"series_instance_uid": uid, "at_source": n, "held": held.get(uid, 0)}
             for uid, n in sorted(at_source.items()) if held.get(uid, 0) < n]
    return ("incomplete_at_source" if short else "complete"), short


def _aware(ts: datetime, like: datetime) -> datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=like.tzinfo)


class CompletenessCheck:
    """The assembler's question to the archive; one per assembler. :meth:`close` stops its threads."""

    def __init__(self, config: CompletenessConfig, *, retry_s: float | None = None) -> None:
        self.config = config
        self.retry_s = retry_s if retry_s is not None else max(1.0, min(30.0, config.wait_s / 10))
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="specgate-archive-query")
        self._asked: dict[int, tuple[Future[StudyCounts | None], datetime]] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def archive_for(self, study: Study) -> Archive | None:
        return self.config.archive_for(study.calling_ae)

    def client(self, archive: Archive) -> ArchiveClient:
        return open_archive(archive, timeout_s=self.config.timeout_s, ae_title=self.config.ae_title,
                            credentials=self.config.credentials_of(archive))

    def decide(self, s: Session, study: Study, archive: Archive, held: dict[str, int],
               now: datetime) -> dict[str, Any] | None:
        """What the job records (see the module), or None: keep waiting. Called under the study's lock,
        in the assembler's transaction; it writes the study's completeness columns and audit rows there."""
        decided = self._decide(s, study, archive, held, now)
        if decided is not None:  # a question still in flight belongs to this wait, not to a later version's
            with self._lock:
                self._asked.pop(study.id, None)
        return decided

    def _decide(self, s: Session, study: Study, archive: Archive, held: dict[str, int],
                now: datetime) -> dict[str, Any] | None:
        if study.completeness_due_at is None:
            study.completeness_due_at = now + timedelta(seconds=self.config.wait_s)
            audit.append(s, actor=ACTOR, action="study.completeness_wait", object_type="study", object_id=study.id,
                         details={"archive": archive.name, "wait_s": self.config.wait_s,
                                  "due_at": study.completeness_due_at.isoformat()})
        due = _aware(study.completeness_due_at, now)
        answer = study.completeness if study.completeness and "series" in study.completeness else None
        if answer is None:
            answer = self._poll(s, study, archive, now)
        base: dict[str, Any] = {"archive": archive.name, "asked_at": (answer or study.completeness or {}).get("at")}
        if answer is not None:
            at_source: dict[str, int] = dict(answer["series"])
            if not at_source:
                return {**base, "state": "not_at_source", "held": held}
            state, short = verdict(at_source, held)
            if state == "complete":
                return {**base, "state": state, "at_source": at_source, "held": held}
            if now >= due:
                return {**base, "state": state, "at_source": at_source, "held": held, "series": short}
            return None
        if now >= due:
            error = (study.completeness or {}).get("error", "no answer within the wait")
            return {**base, "state": "archive_unreachable", "error": error, "held": held}
        return None

    def _poll(self, s: Session, study: Study, archive: Archive, now: datetime) -> dict[str, Any] | None:
        """The archive's answer if it has come (recorded on the study), else None; asks when nothing is in
        flight and the last failure is ``retry_s`` old."""
        with self._lock:
            asked = self._asked.get(study.id)
        if asked is None:
            last_error = (study.completeness or {}).get("at")
            if last_error is not None and now < datetime.fromisoformat(last_error) + timedelta(seconds=self.retry_s):
                return None
            client = self.client(archive)
            future = self._pool.submit(client.study_counts, study.study_instance_uid)
            with self._lock:
                self._asked[study.id] = (future, now)
            return None
        future, _ = asked
        if not future.done():
            return None
        with self._lock:
            self._asked.pop(study.id, None)
        try:
            counts = future.result()
        except Exception as exc:  # noqa: BLE001 - a third party's answer: whatever it was, the bound must hold
            if not isinstance(exc, ArchiveUnreachable):
                log.error("study %d: asking archive %s failed", study.id, archive.name, exc_info=exc)
                exc = ArchiveUnreachable(f"archive {archive.name}: the query failed ({type(exc).__name__})")
            study.completeness = {"archive": archive.name, "error": str(exc), "at": now.isoformat()}
            audit.append(s, actor=ACTOR, action="archive.unreachable", object_type="study", object_id=study.id,
                         details={"archive": archive.name, "error": str(exc), "purpose": "completeness"})
            log.warning("study %d: archive %s did not answer: %s", study.id, archive.name, exc)
            return None
        answer = {"archive": archive.name, "at": now.isoformat(),
                  "series": {} if counts is None else counts.as_json()["series"]}
        study.completeness = answer
        audit.append(s, actor=ACTOR, action="study.counts_at_source", object_type="study", object_id=study.id,
                     details={**answer, "instances": sum(answer["series"].values())})
        return answer
