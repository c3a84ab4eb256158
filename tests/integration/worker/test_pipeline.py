"""One study through the pipeline (no broker): series on disk -> claim -> infer -> gate -> SEG -> state.

A real (small, untrained) SegNet and a gate fitted for its weights: the gate's decision is steered by
what the bank holds, so both routes are exercised. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import highdicom
import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import select

from ledger import jobs
from ledger.db import session_scope
from ledger.schema import AuditEvent, Instance, Job, JobState, Result, Series, Study
from model.data.phantoms import phantom_study
from model.ood import BankMismatchError, SpectralGate, sha256_file
from model.study_inference import InferenceSettings
from model.unet import load_weights, save_weights
from specgate.settings import SeriesRule, Settings
from specgate.synthetic import write_series
from store import file_sha256
from worker.config import PipelineConfig
from worker.model_runtime import Segmenter, Segmenters
from worker.pipeline import claim, job_paths, run_job


def _ingest(sessions, series, calling_ae: str = "PACS", rule_name: str = "default-ct-mr") -> int:
    """Record a written series in the ledger the way the SCP does, and make its job."""
    with session_scope(sessions) as s:
        study = Study(study_instance_uid=series.study_instance_uid, calling_ae=calling_ae)
        s.add(study)
        s.flush()
        ser = Series(study_id=study.id, series_instance_uid=series.series_instance_uid, modality=series.modality)
        s.add(ser)
        s.flush()
        for p in series.paths:
            ds = dcmread(p, stop_before_pixels=True)
            s.add(Instance(series_id=ser.id, sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                           spool_path=str(p), size_bytes=p.stat().st_size, sha256=file_sha256(p), calling_ae=calling_ae))
        return jobs.create_job(s, study, actor="test", series_instance_uid=series.series_instance_uid,
                               rule_name=rule_name).id


def _fit_bank(weights: Path, bank: Path, signatures: np.ndarray, spacing=None) -> Path:
    """An OOD bank of ``signatures`` for ``weights``, fitted through block 32, overlap 8 and ``spacing``."""
    inference = InferenceSettings.for_weights(load_weights(weights)[1], block=32, overlap=8, spacing=spacing)
    SpectralGate.fit(signatures, c=2.5, weights_sha256=sha256_file(weights),
                     meta={"inference": inference.record()}).save(bank)
    return bank


def _segmenter(tiny_model, tmp_path: Path, bank_signatures: np.ndarray, spacing=None) -> Segmenter:
    weights, _ = tiny_model
    bank = _fit_bank(weights, tmp_path / "bank.npz", bank_signatures, spacing)
    return Segmenter.open(weights, bank, block=32, overlap=8, spacing=spacing)


def _claim_and_run(sessions, job_id: int, cfg: PipelineConfig, segmenters, task_id: str):
    """Claim the job as a worker would and run it through the pipeline."""
    c = claim(sessions, job_id, task_id=task_id, worker_id="test", stale_after_s=60)
    return run_job(sessions, c, cfg, segmenters=segmenters)


def _run(settings, sessions, job_id: int, seg: Segmenter, task_id: str, *, data_dir: Path | None = None):
    """Run the job under ``settings``' rules with ``seg`` as the default model; ``data_dir``: what the
    ledger's paths are relative to (a study received by the real SCP), as the worker's settings give it."""
    cfg = PipelineConfig(results_dir=settings.results_dir, installation="TEST", rules=tuple(settings.rules),
                         data_dir=data_dir, heartbeat_s=0.2)
    return _claim_and_run(sessions, job_id, cfg, {"default": seg}.__getitem__, task_id)


def _signature_of(seg: Segmenter, case) -> np.ndarray:
    return seg.segment(case.image, case.modality, spacing=case.spacing).signature


@pytest.mark.parametrize("route", ["released", "held"])
def test_one_study_end_to_end_without_broker(migrated, tmp_path: Path, tiny_model, route: str) -> None:
    settings, _, sessions = migrated
    case = phantom_study("ct_liver", seed=11)
    series = write_series(case.image, case.spacing, "CT", tmp_path / "series", patient_id="PID-SECRET-42")
    probe = _segmenter(tiny_model, tmp_path, np.stack([np.ones(4) / 2, np.full(4, -0.5)]))
    own = _signature_of(probe, case)
    if route == "released":  # the bank holds this very study's signature (and a neighbour): OODM ~ 0
        bank = np.stack([own, own + 1e-3, own - 1e-3])
    else:  # a bank of signatures far from it, tightly clustered: tau is tiny, the study is OOD
        far = -own
        bank = np.stack([far, far + 1e-4, far - 1e-4])
    seg = _segmenter(tiny_model, tmp_path, bank)
    job_id = _ingest(sessions, series)
    outcome = _run(settings, sessions, job_id, seg, "task-1")
    assert outcome.state == route
    with session_scope(sessions) as s:
        job = s.get(Job, job_id)
        res = s.execute(select(Result).where(Result.job_id == job_id)).scalar_one()
        assert str(job.state) == route
        assert res.is_ood == (route == "held") and (res.oodm > res.tau) == res.is_ood
        assert res.weights_sha256 == sha256_file(tiny_model[0]) and res.model_id == "tiny-test:0.0.1"
        actions = [e.action for e in s.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars()]
        details = json.dumps([e.details for e in s.execute(select(AuditEvent)).scalars()])
    assert actions[-2:] == [f"job.{route}", "result.created"]
    assert "PID-SECRET-42" not in details and "SYNTHETIC" not in details

    paths = job_paths(settings.results_dir, job_id, 1)
    seg_ds = highdicom.seg.Segmentation.from_dataset(dcmread(paths["seg"]))
    assert seg_ds.SOPInstanceUID == res.seg_sop_instance_uid
    assert seg_ds.StudyInstanceUID == series.study_instance_uid
    refs = {r.ReferencedSOPInstanceUID for r in seg_ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in series.paths}
    evidence = json.loads(paths["evidence"].read_text())
    assert evidence["oodm"] == pytest.approx(res.oodm) and len(evidence["signature"]) == 4
    with np.load(paths["prob"]) as z:
        assert z["prob_fg_u8"].shape == case.image.shape
    assert paths["preview"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # an attempt after a crash derives the same SEG object (idempotent resend)
    from worker.dicom_seg import derive_uid

    assert derive_uid("TEST", series.study_instance_uid, str(job_id), "1", "seg") == res.seg_sop_instance_uid


def test_bad_series_fails_with_reason_and_is_not_retried(migrated, tmp_path: Path, tiny_model) -> None:
    settings, _, sessions = migrated
    case = phantom_study("ct_liver", seed=12)
    series = write_series(case.image, case.spacing, "CT", tmp_path / "series")
    series.paths[5].unlink()  # a gap in the series (the spool lost nothing: the sender never sent it)
    series.paths.pop(5)
    job_id = _ingest(sessions, series)
    seg = _segmenter(tiny_model, tmp_path, np.stack([np.ones(4) / 2, np.full(4, -0.5)]))
    outcome = _run(settings, sessions, job_id, seg, "t")
    assert outcome.state == "failed" and outcome.reason_code == "missing_slices"
    with session_scope(sessions) as s:
        job = s.get(Job, job_id)
        assert job.state == JobState.FAILED and job.attempts == 1 and job.reason_code == "missing_slices"
    assert claim(sessions, job_id, task_id="t2", worker_id="test", stale_after_s=60) is None


def test_bank_of_another_inference_path_is_refused(tmp_path: Path, tiny_model) -> None:
    """The bank was fitted at native resolution: a worker told to run on a 4 mm grid refuses it by name."""
    seg = _segmenter(tiny_model, tmp_path, np.stack([np.ones(4) / 2, np.full(4, -0.5)]))
    with pytest.raises(BankMismatchError, match=r"spacing: bank \{\}, the worker \{'CT': \[4.0, 4.0, 4.0\]\}"):
        Segmenter.open(tiny_model[0], tmp_path / "bank.npz", block=32, overlap=8, spacing=(("CT", (4, 4, 4)),))
    with pytest.raises(BankMismatchError, match="overlap: bank 8, the worker 16"):
        Segmenter.open(tiny_model[0], tmp_path / "bank.npz", block=32, overlap=16)
    assert seg.settings.spacing == ()


def test_seg_from_a_resampled_grid_lies_on_the_source_series(migrated, tmp_path: Path, tiny_model) -> None:
    """Thin-slice CT, run on a 4 mm grid: the SEG's frames are the source slices, dciodvfy finds no error."""
    from dicom_series import load_series
    from model.data.phantoms import phantom_case
    from tests.unit.worker.test_dicom_seg import dciodvfy

    settings, _, sessions = migrated
    case = phantom_case("ct_liver", 3, 5)
    src_spacing = (2.5, 1.6, 1.6)  # a clinical-like grid over the phantom's box: 2.5 x finer in-plane
    shape = tuple(int(round(n * s / t)) for n, s, t in zip(case.image.shape, case.spacing, src_spacing, strict=True))
    from model.resample import Grid, from_grid

    image = from_grid(case.image, Grid(case.image.shape, case.spacing), shape, src_spacing)
    series = write_series(image, src_spacing, "CT", tmp_path / "series")
    spacing = (("CT", (4.0, 4.0, 4.0)),)
    probe = _segmenter(tiny_model, tmp_path, np.stack([np.ones(4) / 2, np.full(4, -0.5)]), spacing)
    out = probe.segment(image, "CT", spacing=src_spacing)
    assert out.grid["resampled"] and out.grid["model_grid_shape"][1] < shape[1] // 2
    assert out.prob_fg.shape == shape and out.mask.shape == shape
    seg = _segmenter(tiny_model, tmp_path, np.stack([out.signature, out.signature + 1e-3, out.signature - 1e-3]),
                     spacing)
    job_id = _ingest(sessions, series)
    outcome = _run(settings, sessions, job_id, seg, "task-rs")
    assert outcome.state == "released"
    paths = job_paths(settings.results_dir, job_id, 1)
    evidence = json.loads(paths["evidence"].read_text())
    assert evidence["inference"]["spacing"] == {"CT": [4.0, 4.0, 4.0]} and evidence["grid"]["resampled"]

    volume = load_series(series.paths)
    seg_ds = highdicom.seg.segread(paths["seg"])
    z_of = {ref.sop_instance_uid: z for z, ref in enumerate(volume.slices)}
    seen = set()
    for item in seg_ds.PerFrameFunctionalGroupsSequence:
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        z = z_of[source.ReferencedSOPInstanceUID]
        seen.add(z)
        np.testing.assert_allclose([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
                                   (volume.affine @ [z, 0, 0, 1])[:3], atol=1e-4)
    assert seen  # the untrained tiny network marks something; every frame maps to its source slice
    mask = seg_ds.get_volume(combine_segments=True).array if hasattr(seg_ds, "get_volume") else None
    if mask is not None:
        assert mask.shape[1:] == shape[1:]
    errors, _warnings = dciodvfy(paths["seg"])
    assert errors == []


@pytest.mark.parametrize("pixel_spacing", [None, [0.0, 0.0], [0.001, 0.001]],
                         ids=["missing", "zero", "grid-under-one-voxel"])
def test_unusable_spacing_fails_with_its_own_reason(migrated, tmp_path: Path, tiny_model, pixel_spacing) -> None:
    """PixelSpacing missing, zero, or so fine that the model's 4 mm grid has under one voxel across the
    image: the job ends failed/bad_spacing at once (no retry), nothing is written or delivered."""
    from pydicom import dcmread as read

    settings, _, sessions = migrated
    case = phantom_study("ct_liver", seed=13)
    series = write_series(case.image, case.spacing, "CT", tmp_path / "series")
    for path in series.paths:
        ds = read(path)
        if pixel_spacing is None:
            del ds.PixelSpacing
        else:
            ds.PixelSpacing = pixel_spacing
        ds.save_as(path)
    seg = _segmenter(tiny_model, tmp_path, np.stack([np.ones(4) / 2, np.full(4, -0.5)]), (("CT", (4.0, 4.0, 4.0)),))
    job_id = _ingest(sessions, series)
    outcome = _run(settings, sessions, job_id, seg, "t-sp")
    assert outcome.state == "failed" and outcome.reason_code == "bad_spacing"
    with session_scope(sessions) as s:
        job = s.get(Job, job_id)
        assert job.state == JobState.FAILED and job.reason_code == "bad_spacing" and job.attempts == 1
        assert s.execute(select(Result).where(Result.job_id == job_id)).scalar_one_or_none() is None
    assert not job_paths(settings.results_dir, job_id, 1)["seg"].exists()
    assert claim(sessions, job_id, task_id="t-sp2", worker_id="test", stale_after_s=60) is None


def test_job_whose_rule_is_gone_fails_unknown_rule(migrated, tmp_path: Path) -> None:
    """The job's rule was removed from the configuration after the job was made: no other rule's label or
    model stands in for it; the job fails ``unknown_rule`` at once (audited, no retry), nothing is written."""
    settings, _, sessions = migrated
    case = phantom_study("ct_liver", seed=14)
    series = write_series(case.image, case.spacing, "CT", tmp_path / "series")
    job_id = _ingest(sessions, series, rule_name="liver-ct")
    cfg = PipelineConfig(results_dir=settings.results_dir, installation="TEST",
                         rules=(SeriesRule(name="default-ct-mr"),), heartbeat_s=0.2)

    def no_model(name: str) -> Segmenter:
        raise AssertionError(f"model {name!r} loaded for a job without a rule")

    outcome = _claim_and_run(sessions, job_id, cfg, no_model, "t-rule")
    assert outcome.state == "failed" and outcome.reason_code == "unknown_rule"
    with session_scope(sessions) as s:
        job = s.get(Job, job_id)
        assert job.state == JobState.FAILED and job.reason_code == "unknown_rule" and job.attempts == 1
        assert "'liver-ct'" in job.reason_detail and "default-ct-mr" in job.reason_detail
        assert s.execute(select(Result).where(Result.job_id == job_id)).scalar_one_or_none() is None
        failed = s.execute(select(AuditEvent).where(AuditEvent.action == "job.failed",
                                                    AuditEvent.object_id == str(job_id))).scalar_one()
        assert failed.details["reason_code"] == "unknown_rule"
    assert not job_paths(settings.results_dir, job_id, 1)["dir"].exists()
    assert claim(sessions, job_id, task_id="t-rule2", worker_id="test", stale_after_s=60) is None


def test_each_rule_runs_the_model_it_names(migrated, tmp_path: Path, tiny_model) -> None:
    """Two named models (``[models.NAME]``) and a rule for each, from Settings down: each job runs its
    rule's model, and the result, the SEG, the evidence and the audit trail say which one ran."""
    settings, _, sessions = migrated
    _, net = tiny_model
    signatures = np.stack([np.ones(4) / 2, np.full(4, -0.5)])
    models = {}
    for name in ("liver", "spleen"):
        weights = tmp_path / f"{name}.pt"
        save_weights(net, weights, meta={"name": f"tiny-{name}", "version": "1.0"})
        models[name] = {"weights": weights, "bank": _fit_bank(weights, tmp_path / f"{name}.npz", signatures)}
    settings = Settings.load(data_dir=settings.data_dir, database_url=settings.db_url, models=models,
                             inference_block=32, inference_overlap=8,
                             rules=[{"name": "liver-ct", "model": "liver"}, {"name": "spleen-ct", "model": "spleen"}])
    config = settings.worker_config()
    cfg = dataclasses.replace(config.pipeline, heartbeat_s=0.2)
    segmenters = Segmenters(config.models, config.inference)

    ran = {}
    for seed, (rule, model) in enumerate((("spleen-ct", "spleen"), ("liver-ct", "liver"))):
        case = phantom_study("ct_liver", seed=20 + seed)
        series = write_series(case.image, case.spacing, "CT", tmp_path / rule)
        job_id = _ingest(sessions, series, rule_name=rule)
        assert _claim_and_run(sessions, job_id, cfg, segmenters, f"t-{rule}").state in ("released", "held")
        ran[job_id] = model

    for job_id, model in ran.items():
        weights_sha = sha256_file(models[model]["weights"])
        with session_scope(sessions) as s:
            res = s.execute(select(Result).where(Result.job_id == job_id)).scalar_one()
            created = s.execute(select(AuditEvent).where(AuditEvent.action == "result.created",
                                                         AuditEvent.object_id == str(res.id))).scalar_one()
            assert res.model_id == f"tiny-{model}:1.0" and res.weights_sha256 == weights_sha
            assert created.details["model"] == model and created.details["model_id"] == res.model_id
        paths = job_paths(settings.results_dir, job_id, 1)
        evidence = json.loads(paths["evidence"].read_text())
        assert evidence["configured_model"] == model and evidence["weights_sha256"] == weights_sha
        algorithm = dcmread(paths["seg"]).SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == f"tiny-{model}"
    assert segmenters("liver") is segmenters("liver")  # opened once per process


@pytest.mark.parametrize("frame_of_reference", [None, ""], ids=["missing", "empty"])
def test_series_without_frame_of_reference_fails_with_its_own_reason(migrated, tmp_path: Path, tiny_model,
                                                                     frame_of_reference) -> None:
    """A CT series whose FrameOfReferenceUID is missing or empty: its positions belong to no patient
    coordinate system, and a SEG (whose planes must name the source's frame of reference) cannot be placed
    on it. Nothing is invented: the job ends failed/``no_frame_of_reference`` at once (no retry), audited
    with that reason, nothing written."""
    settings, _, sessions = migrated
    case = phantom_study("ct_liver", seed=15)
    series = write_series(case.image, case.spacing, "CT", tmp_path / "series")
    for path in series.paths:
        ds = dcmread(path)
        if frame_of_reference is None:
            del ds.FrameOfReferenceUID
        else:
            ds.FrameOfReferenceUID = frame_of_reference
        ds.save_as(path)
    seg = _segmenter(tiny_model, tmp_path, np.stack([np.ones(4) / 2, np.full(4, -0.5)]))
    job_id = _ingest(sessions, series)
    outcome = _run(settings, sessions, job_id, seg, "t-for")
    assert outcome.state == "failed" and outcome.reason_code == "no_frame_of_reference"
    with session_scope(sessions) as s:
        job = s.get(Job, job_id)
        assert job.state == JobState.FAILED and job.reason_code == "no_frame_of_reference" and job.attempts == 1
        assert "FrameOfReferenceUID" in job.reason_detail
        assert s.execute(select(Result).where(Result.job_id == job_id)).scalar_one_or_none() is None
        failed = s.execute(select(AuditEvent).where(AuditEvent.action == "job.failed",
                                                    AuditEvent.object_id == str(job_id))).scalar_one()
        assert failed.details["reason_code"] == "no_frame_of_reference"
    assert not job_paths(settings.results_dir, job_id, 1)["seg"].exists()
    assert claim(sessions, job_id, task_id="t-for2", worker_id="test", stale_after_s=60) is None


def test_empty_mask_goes_through_to_a_valid_seg_and_sr(migrated, tmp_path: Path, tiny_model) -> None:
    """A model that finds nothing: the job ends like any other (routed by the gate; here released), with a
    SEG whose one segment is empty on every source slice and an SR beside it, both read back strictly.
    An empty result is a result ("nothing found"), reported as such, never dropped or failed."""
    import torch

    settings, _, sessions = migrated
    _, net = tiny_model
    blind = type(net)(**net.config)
    blind.load_state_dict(net.state_dict())
    with torch.no_grad():  # the head sees the same features, and always answers "background"
        blind.head.weight.zero_()
        blind.head.bias.copy_(torch.tensor([20.0, -20.0]))
    weights = tmp_path / "blind.pt"
    save_weights(blind.eval(), weights, meta={"name": "tiny-blind", "version": "0.0.1"})
    blind_model = (weights, blind)
    case = phantom_study("ct_liver", seed=16)
    series = write_series(case.image, case.spacing, "CT", tmp_path / "series")
    probe = _segmenter(blind_model, tmp_path, np.stack([np.ones(4) / 2, np.full(4, -0.5)]))
    own = _signature_of(probe, case)
    seg = _segmenter(blind_model, tmp_path, np.stack([own, own + 1e-3, own - 1e-3]))
    job_id = _ingest(sessions, series)
    outcome = _run(settings, sessions, job_id, seg, "t-empty")
    assert outcome.state == "released"

    paths = job_paths(settings.results_dir, job_id, 1)
    evidence = json.loads(paths["evidence"].read_text())
    assert evidence["foreground_voxels"] == 0
    with np.load(paths["prob"]) as z:
        assert z["prob_fg_u8"].max() == 0 and not np.unpackbits(z["mask_bits"]).any()
    seg_ds = highdicom.seg.segread(paths["seg"])
    sources = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in series.paths}
    assert {r.ReferencedSOPInstanceUID for r in seg_ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence} \
        == sources
    assert seg_ds.SegmentSequence[0].SegmentNumber == 1 and not seg_ds.pixel_array.any()
    assert seg_ds.FrameOfReferenceUID == dcmread(series.paths[0], stop_before_pixels=True).FrameOfReferenceUID
    sr = highdicom.sr.srread(paths["sr"])
    [reference] = [r for e in sr.CurrentRequestedProcedureEvidenceSequence for s in e.ReferencedSeriesSequence
                   for r in s.ReferencedSOPSequence if r.ReferencedSOPInstanceUID == seg_ds.SOPInstanceUID]
    assert reference.ReferencedSOPClassUID == seg_ds.SOPClassUID
    with session_scope(sessions) as s:
        res = s.execute(select(Result).where(Result.job_id == job_id)).scalar_one()
        assert (res.seg_sop_instance_uid, res.sr_sop_instance_uid) == (seg_ds.SOPInstanceUID, sr.SOPInstanceUID)
        assert s.get(Job, job_id).state == JobState.RELEASED


@pytest.mark.parametrize("when_incomplete", ["hold", "run"])
def test_incomplete_at_source_is_in_the_evidence_and_the_rule_decides(migrated, tmp_path: Path, tiny_model,
                                                                      when_incomplete: str) -> None:
    """A job the assembler made at the bound with series still missing (dicom_node.completeness): the
    evidence says so, per series; a rule with when_incomplete = "hold" holds it though the gate releases."""
    settings, _, sessions = migrated
    case = phantom_study("ct_liver", seed=11)
    series = write_series(case.image, case.spacing, "CT", tmp_path / "series")
    probe = _segmenter(tiny_model, tmp_path, np.stack([np.ones(4) / 2, np.full(4, -0.5)]))
    own = _signature_of(probe, case)
    seg = _segmenter(tiny_model, tmp_path, np.stack([own, own + 1e-3, own - 1e-3]))  # in distribution
    rule = SeriesRule(name="ct-complete-only", when_incomplete=when_incomplete)
    job_id = _ingest(sessions, series, rule_name=rule.name)
    short = [{"series_instance_uid": "1.2.826.0.1.3680043.8.498.1", "at_source": 4, "held": 0}]
    with session_scope(sessions) as s:
        s.get(Job, job_id).completeness = {"state": "incomplete_at_source", "archive": "pacs", "series": short}
    cfg = PipelineConfig(results_dir=settings.results_dir, installation="TEST", rules=(rule,), heartbeat_s=0.2)
    outcome = _claim_and_run(sessions, job_id, cfg, {"default": seg}.__getitem__, "task-incomplete")
    assert outcome.state == ("held" if when_incomplete == "hold" else "released")
    evidence = json.loads(job_paths(settings.results_dir, job_id, 1)["evidence"].read_text())
    assert evidence["is_ood"] is False
    assert evidence["incomplete_at_source"] == {"archive": "pacs", "series": short, "when_incomplete": when_incomplete}
    assert evidence["completeness"]["state"] == "incomplete_at_source" and "archive_unreachable" not in evidence
    with session_scope(sessions) as s:
        [moved] = s.execute(select(AuditEvent).where(AuditEvent.action == f"job.{outcome.state}")).scalars()
        assert moved.details.get("held_for") == ("incomplete_at_source" if when_incomplete == "hold" else None)
