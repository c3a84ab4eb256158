"""Study completeness: after a quiet period with no new instance, a study becomes a job.

DICOM has no "study done" signal. A study is complete when ``study_quiet_seconds`` have passed since its
last instance, across any number of associations. The state lives only in the ledger (``studies``:
``last_received_at``, ``received_count``, ``assembled_count``), so a restarted ``specgate scp`` picks up
every study still in its quiet period, and several assemblers may run against one PostgreSQL ledger (a
study row is locked ``FOR UPDATE SKIP LOCKED`` while it is assembled).

Assembling a study applies the series rules (:func:`choose_series`); the first rule, in the order the
settings list them, that matches a series wins, and among that rule's series the one with most instances.
A match creates a job (state ``queued``, next version, the rule's ``model`` recorded as the job's: it decides
the job's queue, ``gpu.<model>``) and calls the enqueue hook after the commit; a study
whose instances arrive after it was queued gets a new version and every earlier version that can still
move is ``superseded`` (its result marked superseded). No match is recorded with an audit event and left
alone. Shadow rules (``shadow = true``, or a rule whose model is registered as shadow) do not take part in
that choice: each one that matches makes a shadow job beside the live one, of the same version
(:mod:`ledger.shadow` says the whole design).

A study whose sender has an archive to ask (``completeness_archive``) is not assembled when its quiet period
ends: :mod:`dicom_node.completeness` asks the archive and holds it back, at most ``completeness_wait_seconds``,
until every instance the archive holds has arrived; the job records what the archive said
(``jobs.completeness``). Instances pulled from an archive (``specgate studies pull``) are assembled like any
other: new ones make a new version, a pull that brings nothing new makes no job.

    >>> from dicom_node.config import SeriesRule
    >>> rules = [SeriesRule(name="ct", modalities=("CT",), min_slices=16)]
    >>> s = [SeriesFacts("1.2.3", "CT", None, "AXIAL", 20, frozenset({"PACS"})),
    ...      SeriesFacts("1.2.4", "CT", None, "SCOUT", 2, frozenset({"PACS"}))]
    >>> rule, series = choose_series(rules, s)
    >>> rule.name, series.series_instance_uid
    ('ct', '1.2.3')
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from ledger import audit, jobs, shadow
from ledger.db import DatabaseUnavailable, session_scope
from ledger.schema import Instance, Job, JobState, Result, Series, Study, utcnow

from .completeness import CompletenessCheck
from .config import AssemblyConfig, SeriesRule
from .spool import Spool

__all__ = ["Assembler", "AssemblyResult", "JobQueuedHook", "SeriesFacts", "choose_series", "log_job_queued"]

log = logging.getLogger("specgate.dicom_node.assembler")
ACTOR = "dicom_node.assembler"

#: Called with the new job's id after the job is committed in state ``queued``. The worker plugs Celery
#: in here; if the hook fails, the job stays ``queued`` in the ledger and the reconciler finds it.
JobQueuedHook = Callable[[int], None]


def log_job_queued(job_id: int) -> None:
    """The default hook: nothing to wake up, just say so."""
    log.info("job %d queued (no enqueue hook configured)", job_id)


@dataclass(frozen=True)
class SeriesFacts:
    series_instance_uid: str
    modality: str | None
    body_part: str | None
    series_description: str | None
    instances: int
    calling_aes: frozenset[str]


def _rule_matches(rule: SeriesRule, s: SeriesFacts) -> bool:
    if rule.calling_ae is not None and rule.calling_ae.strip() not in s.calling_aes:
        return False
    if rule.modalities and (s.modality or "").upper() not in rule.modalities:
        return False
    if rule.body_part is not None and not re.search(rule.body_part, s.body_part or "", re.IGNORECASE):
        return False
    if rule.series_description is not None and not re.search(rule.series_description,
                                                              s.series_description or "", re.IGNORECASE):
        return False
    return s.instances >= rule.min_slices


def choose_series(rules: Sequence[SeriesRule], series: Sequence[SeriesFacts]) -> tuple[SeriesRule, SeriesFacts] | None:
    """The first rule that matches any series, with its largest matching series; None if none match."""
    for rule in rules:
        matching = [s for s in series if _rule_matches(rule, s)]
        if matching:
            return rule, max(matching, key=lambda s: (s.instances, s.series_instance_uid))
    return None


@dataclass(frozen=True)
class AssemblyResult:
    study_id: int
    job_id: int | None
    rule: str | None
    superseded: tuple[int, ...] = ()
    shadow_jobs: tuple[int, ...] = ()  # silent mode: the shadow jobs made beside it (ledger.shadow)


class Assembler:
    """Finds quiet studies and turns them into jobs. :meth:`run_once` for one pass; :meth:`start` a loop."""

    def __init__(self, config: AssemblyConfig, sessions: sessionmaker[Session], *,
                 on_job_queued: JobQueuedHook = log_job_queued, spool: Spool | None = None,
                 interval_s: float | None = None) -> None:
        """``spool``: its partial files older than ``config.temp_max_age_s`` are swept on every pass."""
        self.config = config
        self.sessions = sessions
        self.on_job_queued = on_job_queued
        self.spool = spool
        self.interval_s = interval_s if interval_s is not None else min(1.0, config.quiet_seconds / 4)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.completeness = CompletenessCheck(config.completeness) if config.completeness.by_source else None

    # ------------------------------------------------------------------------------------- loop
    def start(self) -> Assembler:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="specgate-assembler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.completeness is not None:
            self.completeness.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
                if self.spool is not None:
                    # Partial files of associations that died mid-dataset
                    self.spool.sweep_temp(self.config.temp_max_age_s)
            except DatabaseUnavailable as exc:
                log.error("assembler: ledger unavailable, retrying: %s", exc)
            self._stop.wait(self.interval_s)

    # ------------------------------------------------------------------------------------- pass
    def pending(self, now: datetime | None = None) -> list[int]:
        """Ids of studies whose quiet period is over, that have instances no assembly saw yet, and whose
        every instance is in the store (``store_key`` set: at once with ``fs``, after the upload with
        ``s3``, :mod:`dicom_node.uploader`); and studies waiting for their archive's count
        (:mod:`dicom_node.completeness`), quiet or not: the instances they wait for may be arriving."""
        cutoff = (now or utcnow()) - timedelta(seconds=self.config.quiet_seconds)
        # with an object store, an instance not uploaded yet has no store key: its study waits for it
        not_stored = (select(Instance.id).join(Series, Series.id == Instance.series_id)
                      .where(Series.study_id == Study.id, Instance.store_key.is_(None)).exists())
        with session_scope(self.sessions) as s:
            return list(s.execute(
                select(Study.id).where(Study.received_count > Study.assembled_count,
                                       (Study.last_received_at <= cutoff) | Study.completeness_due_at.is_not(None),
                                       ~not_stored)
                .order_by(Study.last_received_at).limit(500)).scalars())

    def run_once(self, now: datetime | None = None) -> list[AssemblyResult]:
        """One pass: every study that was quiet at ``now`` (default: the current time) is assembled."""
        now = now or utcnow()
        results = []
        for study_id in self.pending(now):
            result = self._assemble(study_id, now)
            if result is None:
                continue
            results.append(result)
            for job_id in (result.job_id, *result.shadow_jobs):
                if job_id is not None:
                    self._enqueue(job_id)
        cutoff = now - timedelta(seconds=self.config.quiet_seconds)
        log.debug("assembly pass finished (cutoff %s)", cutoff.isoformat())
        return results

    def _enqueue(self, job_id: int) -> None:
        try:
            self.on_job_queued(job_id)
        except Exception:  # a plug-in: its failure must not stop assembly; the reconciler re-queues
            log.exception("enqueue hook failed for job %d; it stays queued in the ledger", job_id)

    def _assemble(self, study_id: int, now: datetime | None) -> AssemblyResult | None:
        now = now or utcnow()
        cutoff = now - timedelta(seconds=self.config.quiet_seconds)
        with session_scope(self.sessions) as s:
            q = select(Study).where(Study.id == study_id)
            if s.get_bind().dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True)
            study = s.execute(q).scalar_one_or_none()
            if study is None or study.received_count <= study.assembled_count:
                return None  # another assembler has it, or did it
            last = study.last_received_at if study.last_received_at.tzinfo else \
                study.last_received_at.replace(tzinfo=cutoff.tzinfo)
            if last > cutoff and study.completeness_due_at is None:
                return None  # an instance arrived since pending() looked
            facts = self._series_facts(s, study.id)
            completeness = None
            archive = self.completeness.archive_for(study) if self.completeness is not None else None
            if archive is not None and self.completeness is not None:
                completeness = self.completeness.decide(s, study, archive,
                                                        {f.series_instance_uid: f.instances for f in facts}, now)
                if completeness is None:
                    return None  # waiting for the archive's answer, or for what it holds
            shadows = shadow.shadow_models(s)
            choice = choose_series([r for r in self.config.rules if not shadow.is_shadow_rule(r, shadows)], facts)
            beside = [c for c in (choose_series([r], facts) for r in self.config.rules
                                  if shadow.is_shadow_rule(r, shadows)) if c is not None]
            seen = study.received_count
            s.execute(update(Study).where(Study.id == study.id)
                      .values(assembled_count=seen, assembled_at=now, completeness_due_at=None,
                              completeness=None))
            summary = [{"series_instance_uid": f.series_instance_uid, "modality": f.modality,
                        "instances": f.instances} for f in facts]
            if choice is None and not beside:
                audit.append(s, actor=ACTOR, action="study.no_matching_series", object_type="study",
                             object_id=study.id, details={"study_instance_uid": study.study_instance_uid,
                                                          "instances": seen, "series": summary,
                                                          "completeness": completeness})
                log.info("study %d: no series matches a rule; left alone", study.id)
                return AssemblyResult(study.id, None, None)
            earlier = list(s.execute(select(Job).where(Job.study_id == study.id)).scalars())
            job = None
            superseded: list[int] = []
            if choice is not None:
                rule, series = choice
                job = self._create(s, study, rule, series, seen, completeness)
                superseded = self._supersede(s, earlier, job)
                log.info("study %d: job %d v%d queued (rule %s, series of %d instances)", study.id, job.id,
                         job.version, rule.name, series.instances)
            made: list[Job] = []
            for rule, series in beside:  # silent mode: beside the live job, same version (ledger.shadow)
                made.append(self._create(s, study, rule, series, seen, completeness, beside=True, shadow_of=job,
                                         version=made[0].version if made and job is None else None))
                log.info("study %d: shadow job %d v%d queued (rule %s, model %s)", study.id, made[-1].id,
                         made[-1].version, rule.name, rule.model)
            return AssemblyResult(study.id, None if job is None else job.id, None if choice is None else choice[0].name,
                                  tuple(superseded), tuple(j.id for j in made))

    def _create(self, s: Session, study: Study, rule: SeriesRule, series: SeriesFacts, seen: int,
                completeness: dict[str, Any] | None, *, beside: bool = False, shadow_of: Job | None = None,
                version: int | None = None) -> Job:
        """The study's job for ``rule``'s ``series``: the live one, or (``beside``) a shadow job."""
        job = jobs.create_job(s, study, actor=ACTOR, state=JobState.QUEUED,
                              series_instance_uid=series.series_instance_uid, rule_name=rule.name,
                              model_name=rule.model, max_attempts=self.config.job_max_attempts,
                              details={"instances": seen, "series_instances": series.instances,
                                       "model": rule.model, **({"completeness": completeness["state"]}
                                                               if completeness else {})},
                              shadow=beside, shadow_of=shadow_of, version=version)
        job.completeness = completeness
        return job

    @staticmethod
    def _supersede(s: Session, earlier: list[Job], job: Job) -> list[int]:
        """Every earlier job of the study (live and shadow) gives way to the new live ``job``."""
        superseded = []
        for old in earlier:
            s.execute(update(Result).where(Result.job_id == old.id).values(superseded=True))
            if jobs.is_allowed(old.state, JobState.SUPERSEDED):
                jobs.transition(s, old.id, JobState.SUPERSEDED, actor=ACTOR, superseded_by_id=job.id,
                                details={"superseded_by": job.id, "reason": "new instances"})
                superseded.append(old.id)
            else:
                s.execute(update(Job).where(Job.id == old.id).values(superseded_by_id=job.id))
                audit.append(s, actor=ACTOR, action="job.result_superseded", object_type="job",
                             object_id=old.id, details={"superseded_by": job.id, "state": str(old.state)})
        return superseded

    @staticmethod
    def _series_facts(s: Session, study_id: int) -> list[SeriesFacts]:
        rows = s.execute(
            select(Series.series_instance_uid, Series.modality, Series.body_part, Series.series_description,
                   func.count(Instance.id))
            .join(Instance, Instance.series_id == Series.id)
            .where(Series.study_id == study_id)
            .group_by(Series.id, Series.series_instance_uid, Series.modality, Series.body_part,
                      Series.series_description)
            .order_by(Series.id)).all()
        callers: dict[str, set[str]] = {}
        for uid, ae in s.execute(select(Series.series_instance_uid, Instance.calling_ae).distinct()
                                 .join(Instance, Instance.series_id == Series.id)
                                 .where(Series.study_id == study_id)):
            callers.setdefault(uid, set()).add(ae)
        return [SeriesFacts(uid, mod, bp, desc, int(n), frozenset(callers.get(uid, ())))
                for uid, mod, bp, desc, n in rows]
