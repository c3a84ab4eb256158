"""One study, from its job row to a gated DICOM-SEG: load -> infer -> gate -> encode -> route or hold.

Every step that must not be forgotten is in the ledger:

1. **Claim** (:func:`claim`): ``queued -> running`` in one conditional UPDATE that also counts the attempt
   and records which task owns the job, and a ``job_attempts`` row: this host, process and device
   (closed by :func:`ledger.jobs.transition` when the job leaves ``running``, however it leaves). A job
   found ``running`` whose heartbeat is stale (its worker died) is taken back (``running -> queued ->
   running``) and counted as a new attempt; one whose heartbeat is fresh is never taken over, even by its
   own message delivered a second time (a worker killed with its task leaves the job to the reconciler,
   once the heartbeat is ``stale_after_s`` old). A job that has used its attempts ends ``failed``
   (``attempts_exhausted``): a study that kills the worker every time never loops.
2. **Work**, with a heartbeat thread: the series is loaded (``dicom_series``; a bad series fails at once
   with its reason code, no retry), segmented and gated (``worker.model_runtime``), encoded as DICOM-SEG
   (``worker.dicom_seg``) whose UIDs derive from (installation, study, job, version): a re-run writes the same
   object. The probability map and the gate's evidence are kept beside it for review.
3. **Route or hold** (:func:`finish`): a ``results`` row and ``running -> released`` (OODM <= tau) or
   ``running -> held``, guarded by the task id, so only the attempt that owns the job finishes it. In the
   same transaction the job is charted on its source's drift chart (:mod:`ledger.drift`); while that
   source's stop alarm is open the job is held whatever its OODM.

Delivery (``released``/``approved`` -> ``sent``) is a separate task on the ``deliver`` queue.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import Update, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import SeriesRule
from dicom_series import LossySource, SeriesError, Volume, load_series, lossy_source
from dicom_series.headers import read_instance
from ledger import audit, audit_sample, drift, jobs
from ledger.db import session_scope
from ledger.leases import LeaseRefresher
from ledger.paths import to_ledger
from ledger.schema import AuditEvent, Job, JobState, Result, utcnow
from store import RESULT_FILES, HashMismatch, ObjectMissing, Store, StoreError, result_folder, result_keys

from .atomic import atomic_write
from .config import PipelineConfig
from .labels import GateEvidence, ModelIdentity, Release
from .model_runtime import Segmenter, SegmentOutput
from .objects import ObjectUIDs, save_probability, series_files, write_objects

if TYPE_CHECKING:
    from .prometheus import WorkerMetrics
    from .segments import SegmentDefinition

__all__ = ["Claim", "StudyOutcome", "claim", "job_paths", "run_job"]

log = logging.getLogger("specgate.worker")


@dataclass(frozen=True)
class Claim:
    job_id: int
    task_id: str
    attempt: int
    version: int
    study_instance_uid: str
    series_instance_uid: str | None
    rule_name: str | None
    model_name: str | None = None  # the job's model (None: a job made before revision 0009; its rule's)
    # what the source archive said when the job was made (dicom_node.completeness; None: no archive asked)
    completeness: dict[str, Any] | None = None
    shadow: bool = False  # silent mode (ledger.shadow): scored like any job, never sent


@dataclass
class StudyOutcome:
    job_id: int
    state: str
    reason_code: str | None = None
    oodm: float | None = None
    tau: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    shadow: bool = False


def _as_aware(ts: Any) -> Any:
    from datetime import UTC

    return ts.replace(tzinfo=UTC) if ts is not None and ts.tzinfo is None else ts


def claim(sessions: sessionmaker[Session], job_id: int, *, task_id: str, worker_id: str,
          stale_after_s: float, actor: str = "worker", metrics: WorkerMetrics | None = None,
          device: str = "cpu") -> Claim | None:
    """Take job ``job_id`` for this attempt, or return None if it is not ours to run (already taken,
    finished, superseded) or has used up its attempts (then it is moved to ``failed``, counted in
    ``metrics``). The attempt is recorded as running in this process, on this host, on ``device``
    (:func:`worker.tasks.device_label`)."""
    with session_scope(sessions) as s:
        job = s.get(Job, job_id)
        if job is None:
            log.warning("job %s does not exist; message dropped", job_id)
            return None
        now = utcnow()
        if job.state == JobState.RUNNING:
            beat = _as_aware(job.heartbeat_at)
            # A fresh heartbeat means an attempt is alive, whatever the message: a duplicate, or this very
            # message handed out again (a broker connection lost, a visibility timeout, a restart) while
            # its first delivery still runs. Only a dead attempt's job is taken over.
            if beat is not None and now - beat < timedelta(seconds=stale_after_s):
                again = " (this message, delivered again)" if job.task_id == task_id[:64] else ""
                log.info("job %s is running elsewhere%s (heartbeat %.0fs ago); skipped", job_id, again,
                         (now - beat).total_seconds())
                return None
            jobs.transition(s, job_id, JobState.QUEUED, actor=actor, expect=JobState.RUNNING,
                            reason_code="worker_lost",
                            guard=[Job.task_id == job.task_id, Job.heartbeat_at == job.heartbeat_at],
                            details={"previous_task": job.task_id})
            s.refresh(job)
        if job.state != JobState.QUEUED:
            log.info("job %s is %s; nothing to do", job_id, job.state)
            return None
        if job.attempts >= job.max_attempts:
            jobs.transition(s, job_id, JobState.FAILED, actor=actor, reason_code="attempts_exhausted",
                            reason_detail=f"{job.attempts} attempts did not finish (last: {job.reason_code})")
            if metrics is not None:
                metrics.job_failed("attempts_exhausted")
            return None
        job = jobs.transition(s, job_id, JobState.RUNNING, actor=actor, expect=JobState.QUEUED,
                              attempts=job.attempts + 1, task_id=task_id[:64], worker_id=worker_id[:128],
                              heartbeat_at=now, reason_code=None, reason_detail=None,
                              details={"attempt": job.attempts + 1, "worker": worker_id[:128], "device": device})
        jobs.start_attempt(s, job, task_id=task_id, host=socket.gethostname(), pid=os.getpid(), device=device)
        return Claim(job_id=job.id, task_id=task_id, attempt=job.attempts, version=job.version,
                     study_instance_uid=job.study.study_instance_uid,
                     series_instance_uid=job.series_instance_uid, rule_name=job.rule_name,
                     model_name=job.model_name, completeness=job.completeness, shadow=job.shadow)


def heartbeat(sessions: sessionmaker[Session], job_id: int, task_id: str, every_s: float) -> LeaseRefresher:
    """Refresh ``jobs.heartbeat_at`` while the attempt works, so the reconciler knows it is alive: the
    attempt's lease (:mod:`ledger.leases`), held while the job is ``running`` under this task id."""

    def beat() -> Update:
        return (update(Job).where(Job.id == job_id, Job.task_id == task_id, Job.state == JobState.RUNNING)
                .values(heartbeat_at=utcnow()))

    return LeaseRefresher(sessions, f"job {job_id}", beat, every_s=every_s)


def job_paths(results_dir: Path, job_id: int, version: int) -> dict[str, Path]:
    """Where this host writes one job version's files (names: :data:`store.layout.RESULT_FILES`)."""
    base = results_dir / PurePosixPath(result_folder(job_id, version)).name
    return {"dir": base, **{role: base / name for role, name in RESULT_FILES.items() if role != "kos"}}


def fail(sessions: sessionmaker[Session], c: Claim, reason_code: str, detail: str, *, actor: str) -> None:
    with session_scope(sessions) as s:
        jobs.transition(s, c.job_id, JobState.FAILED, actor=actor, expect=JobState.RUNNING,
                        reason_code=reason_code, reason_detail=detail[:2000], guard=[Job.task_id == c.task_id])


def retry_or_fail(sessions: sessionmaker[Session], c: Claim, exc: BaseException, *, actor: str,
                  metrics: WorkerMetrics | None = None) -> bool:
    """After an attempt failed: back to ``queued`` if attempts remain (True, audited ``job.queued`` with
    ``attempt_failed``, or an :class:`AttemptFailed`'s own reason code), else ``failed`` (reason ``error``,
    or the :class:`AttemptFailed`'s own: ``input_missing``, and ``input_hash_mismatch`` as soon as the
    series was fetched again and still differs; its ``job.failed``
    audit row carries the attempts made, and ``metrics`` counts it). An attempt that is not counted
    (``store_unavailable``) is given back: the job waits for the store however long it is away."""
    detail = f"{type(exc).__name__}: {exc}"[:2000]
    reason = exc.reason_code if isinstance(exc, AttemptFailed) else "attempt_failed"
    with session_scope(sessions) as s:
        job = s.get(Job, c.job_id)
        assert job is not None
        if isinstance(exc, AttemptFailed) and not exc.counted:
            jobs.transition(s, c.job_id, JobState.QUEUED, actor=actor, expect=JobState.RUNNING,
                            reason_code=reason, reason_detail=detail, heartbeat_at=utcnow(),
                            attempts=max(job.attempts - 1, 0), guard=[Job.task_id == c.task_id],
                            details={"attempt_counted": False})
            return True
        # when it ends failed: the last attempt's own reason (input_missing...), else "error"
        final = reason if isinstance(exc, AttemptFailed) else "error"
        give_up = job.attempts >= job.max_attempts
        if reason == "input_hash_mismatch":
            seen = s.execute(select(func.count()).select_from(AuditEvent).where(
                AuditEvent.action == "job.input_hash_mismatch", AuditEvent.object_type == "job",
                AuditEvent.object_id == str(c.job_id))).scalar_one()
            give_up = give_up or seen >= 2  # fetched again and still not the bytes received: a person must look
        if not give_up:
            jobs.transition(s, c.job_id, JobState.QUEUED, actor=actor, expect=JobState.RUNNING,
                            reason_code=reason, reason_detail=detail, heartbeat_at=utcnow(),
                            guard=[Job.task_id == c.task_id])
            return True
        jobs.transition(s, c.job_id, JobState.FAILED, actor=actor, expect=JobState.RUNNING,
                        reason_code=final, reason_detail=detail, guard=[Job.task_id == c.task_id])
        if metrics is not None:
            metrics.job_failed(final)
        return False


class _JobFailed(Exception):
    """The job ends ``failed`` with this reason code, without a retry: the series or the configuration
    is at fault, and running it again would give the same answer."""

    def __init__(self, reason_code: str, detail: str) -> None:
        super().__init__(detail)
        self.reason_code, self.detail = reason_code, detail


def run_job(sessions: sessionmaker[Session], c: Claim, cfg: PipelineConfig, *,
            segmenters: Callable[[str], Segmenter], metrics: WorkerMetrics | None = None) -> StudyOutcome:
    """Run one claimed job to ``released``/``held`` (or raise) with the job's model (``segmenters(name)``:
    the model it was made for and queued to, ``jobs.model_name``; a job made before revision 0009: the
    model its rule names). A series the pipeline cannot use (``SeriesError``, a spacing the model's
    grid refuses) or a rule that no longer exists (``unknown_rule``) ends it ``failed``, with no retry.
    ``metrics``: the segmentation's time, the gate's decision once recorded, a failure's reason code."""
    timings: dict[str, float] = {}
    paths = job_paths(cfg.results_dir, c.job_id, c.version)
    try:
        rule = cfg.rule(c.rule_name)
        if rule is None:  # the configuration changed since the job was made: its label and model are unknown
            known = ", ".join(r.name for r in cfg.rules) or "none"
            raise _JobFailed("unknown_rule", f"rule {c.rule_name!r} is not configured (rules: {known})")
        with heartbeat(sessions, c.job_id, c.task_id, cfg.heartbeat_s):
            model = c.model_name or rule.model
            segmenter = segmenters(model)  # loaded on its first job, under the heartbeat
            volume = _load_volume(sessions, c, timings, compact=segmenter.takes_int16, files=cfg.files,
                                  refuse_lossy=rule.name if rule.refuse_lossy else None)
            lossy = lossy_source(volume.headers)
            t0 = time.perf_counter()
            out = _segment(segmenter, volume)
            if metrics is not None:
                metrics.inference(time.perf_counter() - t0, model=model, modality=volume.modality)
            timings.update(out.timings)
            segments = _segments(rule, segmenter)
            paths["dir"].mkdir(parents=True, exist_ok=True)
            _write_views(paths, c, volume, out, segments, timings)  # the preview is the last use of the pixels
            volume = volume.without_pixels()  # the SEG and the SR need its geometry and headers: 157 MB less
            uids = _write_objects(paths, c, cfg, volume, out, segmenter, segments, timings)
            _write_evidence(paths["evidence"], rule, volume, out, segmenter, segments, timings, model=model,
                            completeness=c.completeness, lossy=lossy)
    except _JobFailed as exc:
        fail(sessions, c, exc.reason_code, exc.detail, actor=cfg.actor)
        if metrics is not None:
            metrics.job_failed(exc.reason_code)
        return StudyOutcome(c.job_id, "failed", reason_code=exc.reason_code)
    outcome = finish(sessions, c, cfg, paths=paths, uids=uids, out=out, segmenter=segmenter,
                     configured_model=model, timings=timings, hold_incomplete=rule.when_incomplete == "hold",
                     series_meta=drift.SeriesMetadata.from_headers(volume.headers, modality=volume.modality,
                                                                   spacing=volume.spacing))
    if metrics is not None:
        metrics.ood_decision(is_ood=out.is_ood, reason=out.gate_reason, model=model, modality=volume.modality)
    return outcome


class AttemptFailed(Exception):
    """This attempt cannot go on, for a reason that is not the study's: the job goes back to ``queued``
    with ``reason_code`` (:func:`retry_or_fail`). ``counted``: whether the attempt counts against the
    job's attempts (a store that does not answer is not the study's fault: it does not)."""

    def __init__(self, reason_code: str, detail: str, *, counted: bool = True) -> None:
        super().__init__(detail)
        self.reason_code, self.detail, self.counted = reason_code, detail, counted


def _stage(sessions: sessionmaker[Session], c: Claim, files: Store) -> list[Path]:
    """The series' files on this host, every one checked against the SHA-256 the ledger recorded when it
    was received: a file that differs (a bad disk, a corrupted cache, an object changed in the store)
    fails the attempt with ``input_hash_mismatch`` (audited, naming the instance's key) and its local copy
    is dropped, so the next attempt fetches it again; never a segmentation of other bytes."""
    try:
        return series_files(sessions, c.series_instance_uid, files, verify=True)
    except HashMismatch as exc:
        with session_scope(sessions) as s:
            audit.append(s, actor="worker", action="job.input_hash_mismatch", object_type="job", object_id=c.job_id,
                         details={"key": exc.key, "expected_sha256": exc.expected, "got_sha256": exc.got,
                                  "attempt": c.attempt, "store": files.describe()})
        raise AttemptFailed("input_hash_mismatch", str(exc)) from exc
    except (ObjectMissing, FileNotFoundError) as exc:  # lost or pruned: counted, so the job ends failed
        raise AttemptFailed("input_missing", str(exc)) from exc
    except StoreError as exc:  # the store does not answer: wait for it, however long
        raise AttemptFailed("store_unavailable", str(exc), counted=False) from exc


def _load_volume(sessions: sessionmaker[Session], c: Claim, timings: dict[str, float], *,
                 compact: bool = False, files: Store, refuse_lossy: str | None = None) -> Volume:
    """The job's series, staged from the store and checked (:func:`_stage`); ``compact``: int16 when that
    holds its values (a CT: 157 MB instead of 315 MB for 300x512x512), for a model that takes it
    (:attr:`worker.model_runtime.Segmenter.takes_int16`). ``refuse_lossy``: the name of a rule that refuses
    lossy sources: a series with a lossy compressed instance fails ``lossy_source_refused`` from its headers,
    before any pixel is decoded."""
    t0 = time.perf_counter()
    staged = _stage(sessions, c, files)
    timings["stage"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        if not staged:
            raise SeriesError("no_instances", f"series {c.series_instance_uid} has no stored instances")
        if refuse_lossy is not None:
            lossy = lossy_source(read_instance(path).header for path in staged)
            if lossy is not None:
                raise _JobFailed("lossy_source_refused",
                                 f"rule {refuse_lossy!r} refuses lossy sources; {lossy.instances} instance(s) of the "
                                 f"series are lossy compressed ({', '.join(lossy.methods) or 'method not given'})")
        volume = load_series(staged, compact=compact)
    except SeriesError as exc:
        raise _JobFailed(exc.reason_code, str(exc)) from exc
    timings["load"] = time.perf_counter() - t0
    return volume


def _segment(segmenter: Segmenter, volume: Volume) -> SegmentOutput:
    from model.resample import GridError

    try:
        return segmenter.segment(volume.array, volume.modality, spacing=volume.spacing)
    except GridError as exc:  # a spacing the model's grid cannot use: the series' fault, no retry
        raise _JobFailed(exc.reason_code, f"{exc.reason_code}: {exc}") from exc


def _segments(rule: SeriesRule, segmenter: Segmenter) -> tuple[SegmentDefinition, ...]:
    """The SEG's segments: the model's labels the rule sends, named and coded (the registration's codes
    over the shipped anatomy table). A rule that chooses a label the model lacks is refused at start-up;
    met here (a model replaced under a running configuration) it fails the job, with no retry."""
    from .segments import segments_for

    try:
        return segments_for(rule, segmenter.labels, codes=segmenter.codes, segment=segmenter.model_segment)
    except ValueError as exc:
        raise _JobFailed("rule_labels", str(exc)) from exc


def _label_map(out: SegmentOutput) -> np.ndarray:
    return out.labels if out.labels is not None else out.mask.astype(np.uint8)


def _write_objects(paths: dict[str, Path], c: Claim, cfg: PipelineConfig, volume: Volume,
                   out: SegmentOutput, segmenter: Segmenter, segments: tuple[SegmentDefinition, ...],
                   timings: dict[str, float]) -> ObjectUIDs:
    """The labelled DICOM-SEG and the gate's evidence as an SR, under UIDs derived from the job (a resend
    after a crash is the same object). A held result's objects say "gate" until a radiologist approves
    it; they are written again then (:func:`worker.objects.rewrite_approved`) and only then sent."""
    from model.study_inference import release_freed_memory

    t0 = time.perf_counter()
    uids = ObjectUIDs.for_job(cfg.installation, c.study_instance_uid, c.job_id, c.version)
    model = ModelIdentity(name=segmenter.model_name, version=segmenter.model_version,
                          weights_sha256=segmenter.weights_sha256, clinical_use=segmenter.clinical_use)
    evidence = GateEvidence(oodm=out.oodm, tau=out.tau, c=segmenter.gate.c, is_ood=out.is_ood,
                            gate_reason=out.gate_reason)
    write_objects(paths["seg"], paths["sr"], volume, _label_map(out), model=model, evidence=evidence,
                  release=Release("gate"), uids=uids, segments=segments)
    release_freed_memory()  # highdicom's encoding leaves 40 MB of freed heap resident, under the views to come
    timings["encode"] = time.perf_counter() - t0
    return uids


def _write_views(paths: dict[str, Path], c: Claim, volume: Volume, out: SegmentOutput,
                 segments: tuple[SegmentDefinition, ...], timings: dict[str, float]) -> None:
    """What a reviewer looks at: the probability map with the label map and its legend (each label in its
    colour), and the preview PNG with the gate's verdict."""
    from .preview import write_preview
    from .segments import review_arrays

    save_probability(paths["prob"], out.prob_fg, out.mask, extra=review_arrays(_label_map(out), segments))
    t0 = time.perf_counter()
    verdict = ("HELD: a modality the model was not trained on" if out.gate_reason == "modality_not_in_bank"
               else "HELD: unlike the training data" if out.is_ood else "released")
    write_preview(paths["preview"], volume.array, out.prob_fg, out.mask, modality=volume.modality,
                  title=f"job {c.job_id} v{c.version}: OODM {out.oodm:.4f} vs tau {out.tau:.4f} ({verdict})")
    timings["preview"] = time.perf_counter() - t0


def _write_evidence(path: Path, rule: SeriesRule, volume: Volume, out: SegmentOutput, segmenter: Segmenter,
                    segments: tuple[SegmentDefinition, ...], timings: dict[str, float], *, model: str,
                    completeness: dict[str, Any] | None = None, lossy: LossySource | None = None) -> None:
    """The gate's evidence and what produced it, as JSON beside the result; ``segments``: what the SEG
    holds (names, colours, codes, volumes), which an approval re-encodes. ``completeness``: what the
    source archive said (:mod:`dicom_node.completeness`), recorded as ``completeness`` and, when the study
    was short or the archive silent, as ``incomplete_at_source`` (per series: at source, held) or
    ``archive_unreachable``; ``lossy``: the series' lossy compressed sources (``lossy_source``: null when
    none was)."""
    from .segments import segments_evidence

    evidence = {"oodm": out.oodm, "tau": out.tau, "is_ood": out.is_ood, "gate_reason": out.gate_reason,
                "signature": list(map(float, out.signature)),
                "c": segmenter.gate.c, "clinical_use": segmenter.clinical_use,
                "bank_percentile": segmenter.gate.percentile(out.oodm),
                "bank_loo_oodm": [round(float(v), 6) for v in segmenter.gate.loo_oodm],
                "rule": rule.name, "rule_config": rule.model_dump(mode="json"), "configured_model": model,
                "model": segmenter.model_name, "model_version": segmenter.model_version,
                "weights_sha256": segmenter.weights_sha256, "spacing_mm": list(map(float, volume.spacing)),
                "shape": list(volume.array.shape), "foreground_voxels": int(out.mask.sum()),
                "inference": segmenter.inference_record(), "grid": out.grid,
                "segments": segments_evidence(segments, _label_map(out), volume.spacing),
                "lossy_source": lossy.evidence() if lossy is not None else None,
                "timings_s": timings}
    if completeness is not None:
        evidence["completeness"] = completeness
        flag = completeness.get("state")
        if flag == "incomplete_at_source":
            evidence["incomplete_at_source"] = {"archive": completeness.get("archive"),
                                                "series": completeness.get("series", []),
                                                "when_incomplete": rule.when_incomplete}
        elif flag == "archive_unreachable":
            evidence["archive_unreachable"] = {"archive": completeness.get("archive"),
                                               "error": completeness.get("error")}
    atomic_write(path, json.dumps(evidence, indent=2).encode())


def _publish(cfg: PipelineConfig, c: Claim, paths: dict[str, Path]) -> dict[str, str]:
    """The result's files into the store (nothing to do for ``fs``: written in place); their keys, as the
    ledger keeps them. A store that refuses fails the attempt (``store_unavailable``, not counted)."""
    files = cfg.files
    roles = ("seg", "sr", "prob", "evidence", "preview")
    if not files.remote:
        return {k: to_ledger(paths[k], cfg.data_dir) for k in roles}
    keys = result_keys(c.job_id, c.version)
    try:
        for k in roles:
            files.put(keys[k], paths[k])
    except StoreError as exc:
        raise AttemptFailed("store_unavailable", str(exc), counted=False) from exc
    return {k: keys[k] for k in roles}


def finish(sessions: sessionmaker[Session], c: Claim, cfg: PipelineConfig, *, paths: dict[str, Path],
           uids: ObjectUIDs, out: SegmentOutput, segmenter: Segmenter, configured_model: str,
           timings: dict[str, float], hold_incomplete: bool = False,
           series_meta: drift.SeriesMetadata | None = None) -> StudyOutcome:
    """The result recorded and the job ``held`` (out of distribution; or ``incomplete_at_source`` under a
    rule whose ``when_incomplete`` is ``hold``; or its source's drift stop alarm is open: ``drift_stop``; or,
    with ``drift_hold_on_metadata``, its metadata alarm: ``drift_metadata``) or ``released``. ``series_meta``:
    the series' acquisition metadata, charted (:mod:`ledger.drift`)."""
    incomplete = (c.completeness or {}).get("state") == "incomplete_at_source"
    held_incomplete = incomplete and hold_incomplete
    to = JobState.HELD if out.is_ood or held_incomplete else JobState.RELEASED
    stored = _publish(cfg, c, paths)
    model_id = f"{segmenter.model_name}:{segmenter.model_version}"
    seg_uid = uids.seg
    with session_scope(sessions) as s:
        result = s.execute(select(Result).where(Result.job_id == c.job_id)).scalar_one_or_none()
        if result is None:
            result = Result(job_id=c.job_id, seg_path=stored["seg"], seg_sop_instance_uid=uids.seg,
                            seg_series_instance_uid=uids.seg_series, sr_path=stored["sr"],
                            sr_sop_instance_uid=uids.sr, sr_series_instance_uid=uids.sr_series,
                            prob_path=stored["prob"], evidence_path=stored["evidence"], oodm=out.oodm,
                            tau=out.tau, is_ood=out.is_ood, model_id=model_id,
                            weights_sha256=segmenter.weights_sha256,
                            bank_percentile=segmenter.gate.percentile(out.oodm))
            s.add(result)
        else:  # an earlier attempt got this far and died: the same deterministic object, refreshed numbers
            result.oodm, result.tau, result.is_ood = out.oodm, out.tau, out.is_ood
            result.bank_percentile = segmenter.gate.percentile(out.oodm)
        s.flush()
        # drift watch (ledger.drift): chart this job; an open stop alarm of its source holds it
        watch = drift.Watch()
        if cfg.drift is not None and cfg.drift.enabled and series_meta is not None:
            watch = drift.observe(s, c.job_id, model=configured_model, meta=series_meta, oodm=out.oodm, tau=out.tau,
                                  is_ood=out.is_ood, cfg=cfg.drift, actor=cfg.actor)
        drift_hold = watch.hold if to == JobState.RELEASED else None  # a stop (or held-on metadata) alarm
        to = JobState.HELD if drift_hold is not None else to
        jobs.transition(s, c.job_id, to, actor=cfg.actor, expect=JobState.RUNNING,
                        guard=[Job.task_id == c.task_id], heartbeat_at=utcnow(),
                        details={"oodm": round(out.oodm, 6), "tau": round(out.tau, 6), "result_id": result.id,
                                 "seg_sop_instance_uid": seg_uid,
                                 **({"held_for": "incomplete_at_source"} if held_incomplete else {}),
                                 **({"held_for": drift_hold[1], "drift_alarm_id": drift_hold[0]}
                                    if drift_hold is not None else {})})
        audit.append(s, actor=cfg.actor, action="result.created", object_type="result", object_id=result.id,
                     details={"job_id": c.job_id, "gate": "ood" if out.is_ood else "in_distribution",
                              "gate_reason": out.gate_reason, "model": configured_model,
                              "model_id": model_id,
                              "timings_s": {k: round(v, 3) for k, v in timings.items()}})
        if to == JobState.RELEASED and not c.shadow:  # the blind audit sample: drawn with the release, never
            # delaying it; a shadow result is never sent, so it is not a release to audit
            audit_sample.consider(s, job_id=c.job_id, result_id=result.id, study_instance_uid=c.study_instance_uid,
                                  share=cfg.audit_sample_share, actor=cfg.actor)
    if watch.opened and cfg.drift is not None and cfg.drift.notify_url:
        from .drift_notify import notify

        notify(sessions, cfg.drift, watch.opened, actor=cfg.actor)
    return StudyOutcome(c.job_id, str(to), oodm=out.oodm, tau=out.tau, timings=timings, shadow=c.shadow)

