"""A held multi-label result written straight into a ledger and a result folder, without running a model:
a synthetic CT series recorded as the SCP records it, a job moved queued -> running -> held, and the
result folder the worker keeps (``worker.pipeline.job_paths``): the SEG and SR as ``worker.dicom_seg`` /
``worker.sr`` write them from a label map with four labels, ``prob.npz`` with the label map and legend of
``worker.segments.review_arrays``, and ``evidence.json`` with ``worker.segments.segments_evidence``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread

from dicom_node.config import SeriesRule
from dicom_series import load_series
from ledger import jobs
from ledger.db import session_scope
from ledger.schema import Instance, JobState, Result, Series, Study
from model.adapters.base import Label
from specgate.synthetic import write_series
from store import file_sha256
from worker.atomic import atomic_write, write_dicom
from worker.dicom_seg import encode_seg
from worker.labels import GateEvidence, ModelIdentity, Release
from worker.objects import ObjectUIDs
from worker.pipeline import job_paths
from worker.segments import SegmentDefinition, review_arrays, segments_evidence, segments_for
from worker.sr import encode_sr

MODEL = ModelIdentity("abdomen-net", "2.0.0", "5e" * 32)
LABELS = (Label(1, "liver"), Label(2, "kidney_left"), Label(3, "kidney_right"), Label(4, "spleen"),
          Label(5, "lesion <b>"))
RULE = SeriesRule(name="abdomen", labels=("liver", "kidney_left", "kidney_right", "lesion <b>"))  # no spleen
SHAPE = (12, 64, 64)
SPACING = (2.5, 0.8, 0.8)
SLICE = 6  # every label is on this slice, which has the most foreground (the lesion's second part)


@dataclass(frozen=True)
class MultiLabelJob:
    job_id: int
    label_map: np.ndarray
    segments: tuple[SegmentDefinition, ...]
    spacing: tuple[float, float, float]
    seg_path: Path


def label_map() -> np.ndarray:
    """Liver, both kidneys, a spleen the rule does not send, and a small lesion, in boxes."""
    lm = np.zeros(SHAPE, dtype=np.uint8)
    lm[2:10, 8:30, 6:34] = 1
    lm[4:9, 36:48, 8:18] = 2
    lm[4:9, 36:48, 44:54] = 3
    lm[3:8, 10:24, 42:58] = 4
    lm[SLICE, 50:56, 28:34] = 5
    lm[SLICE, 9:12, 20:24] = 5
    return lm


def multilabel_job(sessions: Any, root: Path, results_dir: Path, *, patient_name: str = "DOE^JOHN",
                   calling_ae: str = "CT_ROOM_3") -> MultiLabelJob:
    """Write the series, the ledger rows and the result folder of one held multi-label job."""
    lm = label_map()
    image = np.where(lm > 0, 60.0, -80.0).astype(np.float32) + np.random.default_rng(3).normal(0, 8, SHAPE)
    series = write_series(image.astype(np.float32), SPACING, "CT", root / "multilabel-series",
                          patient_name=patient_name, patient_id="PID-ML", series_description="ABD MULTI",
                          body_part="ABDOMEN")
    with session_scope(sessions) as s:
        study = Study(study_instance_uid=series.study_instance_uid, calling_ae=calling_ae)
        s.add(study)
        s.flush()
        ser = Series(study_id=study.id, series_instance_uid=series.series_instance_uid, modality="CT",
                     body_part="ABDOMEN", series_description="ABD MULTI")
        s.add(ser)
        s.flush()
        for p in series.paths:
            ds = dcmread(p, stop_before_pixels=True)
            s.add(Instance(series_id=ser.id, sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                           spool_path=str(p), size_bytes=p.stat().st_size, sha256=file_sha256(p), calling_ae=calling_ae))
        job = jobs.create_job(s, study, actor="test", series_instance_uid=series.series_instance_uid,
                              rule_name=RULE.name)
        job_id, version = job.id, job.version
        jobs.transition(s, job_id, JobState.RUNNING, actor="test", task_id="t", attempts=1)
    volume = load_series(series.paths)
    segments = write_result(sessions, results_dir, job_id, version, volume, lm, is_ood=True)
    return MultiLabelJob(job_id=job_id, label_map=lm, segments=segments, spacing=volume.spacing,
                         seg_path=job_paths(results_dir, job_id, version)["seg"])


def write_result(sessions: Any, results_dir: Path, job_id: int, version: int, volume: Any, lm: np.ndarray, *,
                 is_ood: bool, model: ModelIdentity = MODEL) -> tuple[SegmentDefinition, ...]:
    """The result folder and ``results`` row of running job ``job_id`` for label map ``lm`` on ``volume``
    (its SEG, SR, probability map and evidence, as the worker keeps them), and the job moved to ``held``
    (``is_ood``) or ``released``. Returns the SEG's segments."""
    segments = segments_for(RULE, LABELS)
    evidence = GateEvidence(oodm=0.0912 if is_ood else 0.031, tau=0.052, c=2.5, is_ood=is_ood,
                            gate_reason="oodm_above_tau" if is_ood else None)
    release = Release("gate")
    uids = ObjectUIDs.for_job("TEST", volume.study_instance_uid, job_id, version)
    paths = job_paths(results_dir, job_id, version)
    paths["dir"].mkdir(parents=True, exist_ok=True)
    seg = encode_seg(volume, lm, model=model, evidence=evidence, release=release, segments=segments,
                     sop_instance_uid=uids.seg, series_instance_uid=uids.seg_series)
    sr = encode_sr(volume, seg, model=model, evidence=evidence, release=release, sop_instance_uid=uids.sr,
                   series_instance_uid=uids.sr_series)
    write_dicom(seg, paths["seg"])
    write_dicom(sr, paths["sr"])
    prob = np.where(lm > 0, 230, 0).astype(np.uint8)
    atomic_write(paths["prob"], lambda fh: np.savez_compressed(
        fh, prob_fg_u8=prob, scale=np.float32(1 / 255), mask_bits=np.packbits(lm > 0, axis=None),
        shape=np.asarray(lm.shape, dtype=np.int64), **review_arrays(lm, segments)))
    record = {"oodm": evidence.oodm, "tau": evidence.tau, "is_ood": is_ood, "gate_reason": evidence.gate_reason,
              "c": evidence.c, "clinical_use": False, "bank_loo_oodm": [0.02, 0.025, 0.03, 0.031, 0.04],
              "rule": RULE.name, "rule_config": RULE.model_dump(mode="json"), "model": model.name,
              "model_version": model.version, "weights_sha256": model.weights_sha256,
              "foreground_voxels": int((lm > 0).sum()), "segments": segments_evidence(segments, lm, volume.spacing)}
    atomic_write(paths["evidence"], json.dumps(record, indent=2).encode())
    with session_scope(sessions) as s:
        result = Result(job_id=job_id, seg_path=str(paths["seg"]), seg_sop_instance_uid=uids.seg,
                        seg_series_instance_uid=uids.seg_series, sr_path=str(paths["sr"]), sr_sop_instance_uid=uids.sr,
                        sr_series_instance_uid=uids.sr_series, prob_path=str(paths["prob"]),
                        evidence_path=str(paths["evidence"]), oodm=evidence.oodm, tau=evidence.tau, is_ood=is_ood,
                        model_id=f"{model.name}:{model.version}", weights_sha256=model.weights_sha256,
                        bank_percentile=100.0 if is_ood else 50.0)
        s.add(result)
        s.flush()
        jobs.transition(s, job_id, JobState.HELD if is_ood else JobState.RELEASED, actor="test",
                        expect=JobState.RUNNING, details={"result_id": result.id})
    return segments
