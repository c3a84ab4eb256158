"""``specgate spool prune``: remove the files of studies that are done with, keep every ledger row.

A study may go when the ledger says nothing more will happen to it:

- every job of the study is ``sent`` (delivered), ``rejected`` (a reviewer refused the result) or
  ``superseded`` (a later version of the study replaced it, and that later job is itself sent or
  rejected): at least one job is sent or rejected, and the newest finishing time of them all is older
  than the cut-off. Any job ``receiving``, ``queued``, ``running``, ``released`` or ``approved`` (not
  sent yet), ``held`` (waiting for a reviewer) or ``failed`` (an operator may retry it) keeps the study,
  as does a study with no job at all (nothing was decided about it);
- no instance arrived after its last assembly (``received_count == assembled_count``): a resend is
  becoming a new job version;
- no withdrawal note (KOS) is still being sent to a destination.

Shadow jobs (silent mode, :mod:`ledger.shadow`) stay ``released`` or ``held`` for good: they neither keep a
study nor count for it; their result files go with the study's.

What goes: each instance's file (the store key: the spool path on ``fs``; the content-addressed object on
``s3``, and the SCP's local spool copy when this host has it) and each result file of each job version
(SEG, SR, probability map, evidence, preview, withdrawal KOS), through :class:`store.Store`. A
content-addressed key that an instance of a kept study also names (the same image sent in two studies)
is not removed. The rows stay: studies, series, instances with their SHA-256, jobs, results, deliveries
and the audit trail are the record of what was received, decided and sent.

The prune is recorded in the audit trail only (no schema change): one ``study.files_pruned`` event per
study, actor the operator, with the counts and the keys removed (and any kept because shared, or that
could not be removed). A study pruned once is not pruned again unless a job finished after that event. A
reader that finds a pruned file missing can look up that event (``object_type='study'``).

Not covered: an instance that arrives, in another study, with the very bytes of an instance being pruned,
between the moment the plan is made and its object is removed (s3). The SCP's uploader puts the object
again only for an instance it stores; a resend of a pruned study's image finds the object gone and puts it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from ledger import audit
from ledger.db import session_scope
from ledger.paths import from_ledger
from ledger.schema import (
    AuditEvent,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Result,
    Retraction,
    RetractionDelivery,
    Series,
    Study,
)
from store import Store, StoreError
from store.layout import RESULT_FILES, instance_key

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

__all__ = ["PRUNED_ACTION", "PruneOutcome", "StudyPlan", "plan", "prune"]

log = logging.getLogger("specgate.retention")

PRUNED_ACTION = "study.files_pruned"
#: a study whose jobs are all in these states may be pruned (with one sent or rejected)
DONE = frozenset({JobState.SENT, JobState.REJECTED, JobState.SUPERSEDED})
FINISHED = frozenset({JobState.SENT, JobState.REJECTED})
_CHUNK = 500


@dataclass
class StudyPlan:
    """One study's files to remove (keys, by kind), and those kept because a kept study names them too."""

    study_id: int
    study_uid: str
    finished_at: datetime
    jobs: list[int]
    instance_keys: list[str] = field(default_factory=list)
    local_copies: list[str] = field(default_factory=list)  # s3: the SCP's spool files on this host
    result_keys: list[str] = field(default_factory=list)
    kept_shared: list[str] = field(default_factory=list)
    _sha: dict[str, str] = field(default_factory=dict, repr=False)  # instance key -> SHA-256 (cache eviction)

    def describe(self) -> str:
        shared = f", {len(self.kept_shared)} kept (shared with a kept study)" if self.kept_shared else ""
        return (f"study {self.study_id} {self.study_uid}: jobs {', '.join(map(str, self.jobs))} finished "
                f"{self.finished_at:%Y-%m-%d %H:%M} UTC; {len(self.instance_keys)} instance file(s), "
                f"{len(self.result_keys)} result file(s){shared}")


@dataclass(frozen=True)
class PruneOutcome:
    study_id: int
    removed: int
    failed: list[str]


def _aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)  # SQLite gives back naive UTC


def _instance_key(row: Instance, store: Store) -> str:
    """The store key of an instance's file: its ``store_key`` once the ledger has one, else (not uploaded
    yet: never the case for a study that may be pruned, which had a job) its content address on a remote
    store, or (fs) its spool path."""
    if row.store_key:
        return row.store_key
    return instance_key(row.sha256) if store.remote else row.spool_path


def _chunks(values: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for i in range(0, len(values), _CHUNK):
        yield values[i:i + _CHUNK]


def _eligible(session: Session, cutoff: datetime) -> list[tuple[Study, list[Job], datetime]]:
    """The studies that may go (module docstring), with their jobs and newest finishing time."""
    done = [str(s) for s in DONE]
    not_done = select(Job.study_id).where(Job.state.not_in(done), Job.shadow.is_(False))
    pending_kos = (select(RetractionDelivery.job_id)
                   .where(RetractionDelivery.state.in_([str(DeliveryState.PENDING), str(DeliveryState.SENDING)])))
    rows = session.execute(
        select(Study).join(Job, Job.study_id == Study.id)
        .where(Study.id.not_in(not_done), Study.received_count == Study.assembled_count,
               Study.id.not_in(select(Job.study_id).where(Job.id.in_(pending_kos))))
        .group_by(Study.id).having(func.max(Job.finished_at) < cutoff)
        .order_by(Study.id)).scalars().all()
    out = []
    for study in rows:
        jobs = list(session.execute(select(Job).where(Job.study_id == study.id).order_by(Job.version)).scalars())
        live = [j for j in jobs if not j.shadow]  # a shadow job never finishes: it decides nothing here
        if not any(JobState(j.state) in FINISHED for j in live) or any(j.finished_at is None for j in live):
            continue
        out.append((study, jobs, max(_aware(j.finished_at) for j in live if j.finished_at is not None)))
    if not out:
        return out
    pruned: dict[str, datetime] = {}
    for ids in _chunks([str(s.id) for s, _, _ in out]):
        for object_id, ts in session.execute(
                select(AuditEvent.object_id, func.max(AuditEvent.ts))
                .where(AuditEvent.action == PRUNED_ACTION, AuditEvent.object_type == "study",
                       AuditEvent.object_id.in_(ids)).group_by(AuditEvent.object_id)):
            pruned[object_id] = _aware(ts)
    return [(s, j, f) for s, j, f in out if str(s.id) not in pruned or pruned[str(s.id)] < f]


def plan(session: Session, store: Store, *, older_than: timedelta, now: datetime | None = None) -> list[StudyPlan]:
    """What a prune would remove now (reads only)."""
    cutoff = (now or datetime.now(UTC)) - older_than
    plans: list[StudyPlan] = []
    for study, jobs, finished in _eligible(session, cutoff):
        p = StudyPlan(study.id, study.study_instance_uid, finished, [j.id for j in jobs])
        instances = session.execute(select(Instance).join(Series).where(Series.study_id == study.id)
                                    .order_by(Instance.id)).scalars().all()
        for row in instances:
            key = _instance_key(row, store)
            if key not in p._sha:
                p._sha[key] = row.sha256
                p.instance_keys.append(key)
            if store.remote and row.spool_path and row.spool_path != key:
                p.local_copies.append(row.spool_path)
        job_ids = [j.id for j in jobs]
        results = session.execute(select(Result).where(Result.job_id.in_(job_ids)).order_by(Result.id)).scalars()
        for r in results:
            keys = [r.seg_path, r.sr_path, r.prob_path, r.evidence_path,
                    str(PurePosixPath(r.seg_path).parent / RESULT_FILES["preview"])]
            p.result_keys.extend(k for k in keys if k and k not in p.result_keys)
        kos = session.execute(select(Retraction.kos_path).where(Retraction.job_id.in_(job_ids))).scalars()
        p.result_keys.extend(k for k in kos if k and k not in p.result_keys)
        plans.append(p)
    _keep_shared(session, store, plans)
    return plans


def _keep_shared(session: Session, store: Store, plans: list[StudyPlan]) -> None:
    """Move out of each plan the instance keys an instance of a study not being pruned also names."""
    going = {p.study_id for p in plans}
    shas = sorted({sha for p in plans for sha in p._sha.values()})
    kept_keys: set[str] = set()
    for chunk in _chunks(shas):
        for row in session.execute(select(Instance).join(Series).where(
                Instance.sha256.in_(chunk), Series.study_id.not_in(going))).scalars():
            kept_keys.add(_instance_key(row, store))
    for p in plans:
        p.kept_shared = [k for k in p.instance_keys if k in kept_keys]
        p.instance_keys = [k for k in p.instance_keys if k not in kept_keys]


def _remove_local(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _remove_empty_parents(paths: Iterable[Path], root: Path) -> None:
    """Remove the folders the removals left empty (a spool study's series folders, a job's result
    folder), up to but not including ``root``'s top-level folders (spool/, results/)."""
    root = root.resolve()
    for start in sorted({p.parent for p in paths}, key=lambda d: len(d.parts), reverse=True):
        d = start
        while d != root and d.parent != root and root in d.parents:
            try:
                d.rmdir()
            except OSError:  # not empty (another series, a file the ledger does not know), or gone
                break
            d = d.parent


def prune(sessions: sessionmaker[Session], store: Store, data_dir: Path, *, older_than: timedelta, actor: str,
          plans: list[StudyPlan] | None = None) -> list[PruneOutcome]:
    """Remove what :func:`plan` lists (or ``plans``), one study at a time, each followed by its audit event
    (what went, what was kept because shared, what could not be removed and why)."""
    if plans is None:
        with sessions() as s:
            plans = plan(s, store, older_than=older_than)
    outcomes = []
    for p in plans:
        removed: list[str] = []
        failed: list[str] = []
        local: list[Path] = []
        for key in [*p.instance_keys, *p.result_keys]:
            try:
                store.delete(key)
            except StoreError as exc:
                failed.append(f"{key}: {exc}")
                continue
            if key in p._sha:
                store.evict(key, p._sha[key])
            removed.append(key)
            where = from_ledger(key, data_dir)
            if store.remote:  # the copy the worker wrote before it put it, when this host has it
                try:
                    _remove_local(where)
                except OSError as exc:
                    failed.append(f"{key} (local copy): {exc.strerror or exc}")
            local.append(where)
        for stored in p.local_copies:
            where = from_ledger(stored, data_dir)
            try:
                _remove_local(where)
            except OSError as exc:
                failed.append(f"{stored}: {exc.strerror or exc}")
                continue
            local.append(where)
        _remove_empty_parents(local, data_dir)
        details: dict[str, Any] = {
            "older_than_days": older_than.total_seconds() / 86400, "store": store.describe(),
            "jobs": p.jobs, "finished_at": p.finished_at.isoformat(),
            "instances_removed": len([k for k in removed if k in p._sha]),
            "results_removed": len([k for k in removed if k not in p._sha]),
            "removed": removed, "local_copies_removed": len(p.local_copies),
            "kept_shared": p.kept_shared, "failed": failed,
        }
        with session_scope(sessions) as s:
            audit.append(s, actor=actor, action=PRUNED_ACTION, object_type="study", object_id=p.study_id,
                         details=details)
        if failed:
            log.error("study %d: %d file(s) could not be removed: %s", p.study_id, len(failed), failed[0])
        outcomes.append(PruneOutcome(p.study_id, len(removed), failed))
    return outcomes

