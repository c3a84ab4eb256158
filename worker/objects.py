"""A result's DICOM objects: the labelled SEG and the gate's evidence as an SR, written together.

They are written when the job runs (released by the gate, or held), and written again, under the same
UIDs, when a radiologist approves a held result: the approver's name and the time of the decision go into
both before anything is sent (a held result's objects never left specgate, so the same UIDs name the one
object a PACS will ever see). UIDs are derived from (installation, study, job, version): a resend after a
crash is the same object.

The mask is kept beside the probability map (``prob.npz``, bit-packed) so that approval re-encodes the
very mask the model drew, without running the model again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_series import Volume, load_series
from ledger.db import session_scope
from ledger.schema import Instance, Job, Result, Review, ReviewDecision, Series
from store import LocalCache, Store, as_store
from store.results import load_mask, write_probability

from .atomic import atomic_write, write_dicom
from .dicom_seg import derive_uid, encode_seg
from .labels import GateEvidence, ModelIdentity, Release
from .sr import encode_sr

if TYPE_CHECKING:
    from .segments import SegmentDefinition

__all__ = ["ObjectUIDs", "load_mask", "rewrite_approved", "save_probability", "series_files", "write_objects"]


@dataclass(frozen=True)
class ObjectUIDs:
    seg: str
    seg_series: str
    sr: str
    sr_series: str

    @classmethod
    def for_job(cls, installation: str, study_uid: str, job_id: int, version: int) -> ObjectUIDs:
        def uid(kind: str) -> str:
            return derive_uid(installation, study_uid, str(job_id), str(version), kind)

        return cls(seg=uid("seg"), seg_series=uid("series"), sr=uid("sr"), sr_series=uid("sr-series"))


def write_objects(seg_path: Path, sr_path: Path, volume: Volume, mask: np.ndarray, *,
                  model: ModelIdentity, evidence: GateEvidence, release: Release, uids: ObjectUIDs,
                  segments: Sequence[SegmentDefinition]) -> None:
    """Encode the SEG and its SR and publish both (each atomically). ``mask``: a label map, or a boolean
    mask (one segment, value 1), with its ``segments`` (:func:`worker.segments.segments_for`)."""
    from model.study_inference import release_freed_memory

    seg = encode_seg(volume, mask, model=model, evidence=evidence, release=release,
                     sop_instance_uid=uids.seg, series_instance_uid=uids.seg_series, segments=segments)
    release_freed_memory()  # the SEG's encoding leaves 40 MB of freed heap resident, under the SR's to come
    sr = encode_sr(volume, seg, model=model, evidence=evidence, release=release, sop_instance_uid=uids.sr,
                   series_instance_uid=uids.sr_series)
    write_dicom(seg, seg_path)
    write_dicom(sr, sr_path)


def save_probability(path: Path, prob_fg: np.ndarray, mask: np.ndarray,
                     extra: Mapping[str, np.ndarray] | None = None) -> None:
    """The review app's probability file (format: :func:`store.results.write_probability`), published
    atomically."""
    atomic_write(path, lambda fh: write_probability(fh, prob_fg, mask, extra))


def series_files(sessions: sessionmaker[Session], series_uid: str | None,
                 store: Store | Path | None = None, *, verify: bool = False) -> list[Path]:
    """The series' files in the order they were stored, as local files: the data directory's (``fs``, a
    ``Path`` or None: the paths as stored) or this host's cached copies (``s3``, fetched on first use).
    ``verify``: each file's SHA-256 checked against the ledger's (:class:`store.HashMismatch`)."""
    files = as_store(store)
    with session_scope(sessions) as s:
        q = select(Instance.store_key, Instance.spool_path, Instance.sha256).join(Series).where(
            Series.series_instance_uid == series_uid)
        rows = s.execute(q.order_by(Instance.id)).all()
    pinned = LocalCache.now()  # the series being staged is not evicted while the rest of it arrives

    def one(row: Any) -> Path:
        key, spool_path, sha = row
        k = key or spool_path  # a row without a key is never part of a job (the assembler waits for it)
        return (files.verified_path(k, sha, pinned_since=pinned) if verify
                else files.path(k, sha, pinned_since=pinned))

    if not files.remote:
        return [one(r) for r in rows]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="specgate-stage") as pool:  # fetches overlap
        return list(pool.map(one, rows))


def rewrite_approved(sessions: sessionmaker[Session], job_id: int, store: Store | Path | None = None) -> bool:
    """Re-encode an approved job's SEG and SR with the approver and the time of approval, with the segments
    they were first written with (from the job's evidence), whatever the configuration says now, and put
    them back in the store under the same keys. False when there is nothing to rewrite (no SR: a result
    made before SRs existed is sent as it was)."""
    files = as_store(store)
    with session_scope(sessions) as s:
        job = s.get(Job, job_id)
        result = s.execute(select(Result).where(Result.job_id == job_id)).scalar_one()
        review = s.execute(select(Review).where(Review.job_id == job_id, Review.decision == ReviewDecision.APPROVE)
                           .order_by(Review.id)).scalars().first()
        if job is None or review is None or result.sr_path is None or result.prob_path is None:
            return False
        seg_key, sr_key = result.seg_path, str(result.sr_path)
        prob, evidence_file = files.path(result.prob_path), files.path(str(result.evidence_path))
        uids = ObjectUIDs(result.seg_sop_instance_uid, result.seg_series_instance_uid, str(result.sr_sop_instance_uid),
                          str(result.sr_series_instance_uid))
        series_uid = job.series_instance_uid
        release = Release("approved", reviewer=review.username, decided_at=review.created_at)
    evidence: dict[str, Any] = json.loads(evidence_file.read_text())
    volume = load_series(series_files(sessions, series_uid, files, verify=True))
    segments: Sequence[SegmentDefinition] | None = None
    mask = None
    if evidence.get("segments"):  # the segments it was written with, whatever the configuration says now
        from .segments import segments_from_evidence

        segments = segments_from_evidence(evidence["segments"])
        with np.load(prob) as npz:
            if "labels" in npz.files:
                mask = npz["labels"]
    if mask is None:  # a result kept before label maps were: its one mask
        mask = load_mask(prob)
    if segments is None:  # ... and before segments were recorded: its rule's one segment
        segments = (_segment_from_rule_config(evidence, job_id),)
    seg_file, sr_file = files.scratch(seg_key), files.scratch(sr_key)
    write_objects(seg_file, sr_file, volume, mask, model=model_identity(evidence),
                  evidence=gate_evidence(evidence), release=release, uids=uids, segments=segments)
    files.put(seg_key, seg_file)
    files.put(sr_key, sr_file)
    return True


def model_identity(evidence: dict[str, Any]) -> ModelIdentity:
    return ModelIdentity(name=str(evidence["model"]), version=str(evidence["model_version"]),
                         weights_sha256=str(evidence["weights_sha256"]),
                         clinical_use=bool(evidence.get("clinical_use", False)))


def gate_evidence(evidence: dict[str, Any]) -> GateEvidence:
    c = evidence.get("c")
    return GateEvidence(oodm=float(evidence["oodm"]), tau=float(evidence["tau"]),
                        c=None if c is None else float(c), is_ood=bool(evidence["is_ood"]),
                        gate_reason=evidence.get("gate_reason"))


def _segment_from_rule_config(evidence: dict[str, Any], job_id: int) -> SegmentDefinition:
    """The one segment of a result written before segments were recorded: its rule then described it, and
    the evidence records that rule (``rule_config``: ``segment_label``, ``segment_description``,
    ``category_code``, ``type_code``, ``display_color``; what it left out was the shipped model's)."""
    from .anatomy import AnatomyCode
    from .segments import PHANTOM_SEGMENT

    recorded = evidence.get("rule_config")
    if not isinstance(recorded, dict):
        raise LookupError(f"job {job_id}'s evidence records neither its segments nor its rule")
    p = PHANTOM_SEGMENT
    return replace(p, label=str(recorded.get("segment_label", p.label)),
                   description=recorded.get("segment_description",
                                            p.description if "segment_label" not in recorded else None),
                   color=tuple(int(c) for c in recorded.get("display_color", p.color)),  # type: ignore[arg-type]
                   code=AnatomyCode(type=tuple(recorded.get("type_code", p.code.type)),  # type: ignore[arg-type]
                                    category=tuple(recorded.get("category_code", p.code.category))))  # type: ignore[arg-type]
