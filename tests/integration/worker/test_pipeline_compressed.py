"""Compressed series through the pipeline (no broker): a lossy source recorded in the evidence and the
SEG, a rule that refuses lossy sources, and a corrupt codestream failing its job ``undecodable_pixels``
while the worker goes on to the next job. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.encaps import encapsulate, get_frame
from sqlalchemy import select

from ledger.db import session_scope
from ledger.schema import AuditEvent, Instance, Job, JobState, Result
from model.data.phantoms import phantom_study
from specgate.settings import SeriesRule
from specgate.synthetic import write_series
from tests.compressed import compress_file
from tests.integration.worker.test_pipeline import _claim_and_run, _ingest, _run, _segmenter
from worker.config import PipelineConfig
from worker.pipeline import claim, job_paths

BANK = np.stack([np.ones(4) / 2, np.full(4, -0.5)])


def _compressed_series(tmp_path: Path, name: str, seed: int, syntax: str):  # type: ignore[no-untyped-def]
    case = phantom_study("ct_liver", seed=seed)
    series = write_series(case.image, case.spacing, "CT", tmp_path / name)
    series.paths[:] = [compress_file(p, syntax, tmp_path / f"{name}-{syntax}" / p.name) for p in series.paths]
    return series


def _failed_audit(sessions, job_id: int) -> AuditEvent:  # type: ignore[no-untyped-def]
    with session_scope(sessions) as s:
        event = s.execute(select(AuditEvent).where(AuditEvent.action == "job.failed",
                                                   AuditEvent.object_id == str(job_id))).scalar_one()
        s.expunge(event)
        return event


def test_a_lossy_source_is_in_the_evidence_and_the_seg(migrated, tmp_path: Path, tiny_model) -> None:
    """A CT encoded as JPEG 2000 at 20:1 (openjpeg; it leaves Lossy Image Compression unset): segmented,
    its evidence names the lossy source, and the SEG carries Lossy Image Compression "01" with the
    method; a JPEG-LS lossless copy of it records none."""
    settings, _, sessions = migrated
    seg = _segmenter(tiny_model, tmp_path, BANK)
    lossy = _compressed_series(tmp_path, "lossy", 31, "1.2.840.10008.1.2.4.91")
    job_id = _ingest(sessions, lossy)
    assert _run(settings, sessions, job_id, seg, "t-lossy").state in ("released", "held")
    paths = job_paths(settings.results_dir, job_id, 1)
    evidence = json.loads(paths["evidence"].read_text())
    assert evidence["lossy_source"] == {"instances": len(lossy.paths), "methods": ["ISO_15444_1"], "ratios": [],
                                        "transfer_syntaxes": ["1.2.840.10008.1.2.4.91"]}
    seg_ds = dcmread(paths["seg"])
    assert seg_ds.LossyImageCompression == "01" and seg_ds.LossyImageCompressionMethod == "ISO_15444_1"
    assert "LossyImageCompressionRatio" not in seg_ds

    lossless = _compressed_series(tmp_path, "lossless", 31, "1.2.840.10008.1.2.4.80")
    job_id = _ingest(sessions, lossless)
    assert _run(settings, sessions, job_id, seg, "t-lossless").state in ("released", "held")
    paths = job_paths(settings.results_dir, job_id, 1)
    assert json.loads(paths["evidence"].read_text())["lossy_source"] is None
    assert dcmread(paths["seg"]).LossyImageCompression == "00"


def test_a_rule_that_refuses_lossy_sources(migrated, tmp_path: Path, tiny_model) -> None:
    """``refuse_lossy``: a JPEG Baseline series (dcmcjpeg, which sets Lossy Image Compression "01" with its
    ratio) ends failed ``lossy_source_refused``, audited, no result, not retried; decided from the headers
    before any decode (one slice's codestream is cut short, which a decode would fail on)."""
    settings, _, sessions = migrated
    series = _compressed_series(tmp_path, "baseline", 32, "1.2.840.10008.1.2.4.50")
    cut = dcmread(series.paths[0])
    frame = get_frame(cut.PixelData, 0, number_of_frames=1)
    cut.PixelData = encapsulate([frame[:len(frame) // 2]])
    cut["PixelData"].is_undefined_length = True
    cut.save_as(series.paths[0], enforce_file_format=True)
    job_id = _ingest(sessions, series, rule_name="no-lossy")
    cfg = PipelineConfig(results_dir=settings.results_dir, installation="TEST", heartbeat_s=0.2,
                         rules=(SeriesRule(name="no-lossy", refuse_lossy=True),))
    seg = _segmenter(tiny_model, tmp_path, BANK)
    outcome = _claim_and_run(sessions, job_id, cfg, {"default": seg}.__getitem__, "t-refuse")
    assert (outcome.state, outcome.reason_code) == ("failed", "lossy_source_refused")
    with session_scope(sessions) as s:
        job = s.get(Job, job_id)
        assert job.state == JobState.FAILED and job.attempts == 1
        assert "'no-lossy' refuses lossy sources" in job.reason_detail and "ISO_10918_1" in job.reason_detail
        assert s.execute(select(Result).where(Result.job_id == job_id)).scalar_one_or_none() is None
    assert _failed_audit(sessions, job_id).details["reason_code"] == "lossy_source_refused"
    assert claim(sessions, job_id, task_id="t-refuse2", worker_id="test", stale_after_s=60) is None


def test_a_corrupt_codestream_fails_undecodable_pixels_and_the_next_job_runs(migrated, tmp_path: Path,
                                                                               tiny_model) -> None:
    """One slice of a JPEG-LS series with a sound header and end marker but garbage scan data (what the
    SCP's header check lets through): the job ends failed ``undecodable_pixels`` (audited, no retry),
    and the same worker then segments the next study."""
    settings, _, sessions = migrated
    seg = _segmenter(tiny_model, tmp_path, BANK)
    series = _compressed_series(tmp_path, "corrupt", 33, "1.2.840.10008.1.2.4.80")
    victim = series.paths[len(series.paths) // 2]
    ds = dcmread(victim)
    frame = bytearray(get_frame(ds.PixelData, 0, number_of_frames=1))
    frame[40:-2] = bytes([0x13]) * (len(frame) - 42)
    ds.PixelData = encapsulate([bytes(frame)])
    ds["PixelData"].is_undefined_length = True
    ds.save_as(victim, enforce_file_format=True)
    job_id = _ingest(sessions, series)
    outcome = _run(settings, sessions, job_id, seg, "t-corrupt")
    assert (outcome.state, outcome.reason_code) == ("failed", "undecodable_pixels")
    with session_scope(sessions) as s:
        job = s.get(Job, job_id)
        assert job.attempts == 1 and victim.name in job.reason_detail
    assert _failed_audit(sessions, job_id).details["reason_code"] == "undecodable_pixels"
    assert claim(sessions, job_id, task_id="t-corrupt2", worker_id="test", stale_after_s=60) is None

    good = _compressed_series(tmp_path, "good", 34, "1.2.840.10008.1.2.4.70")
    next_job = _ingest(sessions, good)
    assert _run(settings, sessions, next_job, seg, "t-next").state in ("released", "held")


def test_compressed_series_received_by_the_scp_segment_like_the_uncompressed_one(migrated, tmp_path: Path,
                                                                                  tiny_model) -> None:
    """One phantom CT written three times (three studies): uncompressed, as JPEG-LS lossless (pyjpegls) and
    as JPEG Lossless SV1 (dcmcjpeg), each sent by dcmtk storescu to the real SCP proposing only its own
    syntax, stored as sent, then segmented from the spool: the three SEGs' frames and probability maps are
    identical."""
    from dicom_node.scp import StoreSCP
    from ledger import jobs
    from ledger.schema import Study
    from specgate.settings import Settings
    from tests.integration.dicom_node.test_scp_compressed import _profile
    from tests.peers import dcmtk, free_port

    settings, _, sessions = migrated
    case = phantom_study("ct_liver", seed=35)
    syntaxes = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.70")
    sent = {}
    for ts in syntaxes:
        series = write_series(case.image, case.spacing, "CT", tmp_path / f"plain-{ts}")
        if ts != syntaxes[0]:
            series.paths[:] = [compress_file(p, ts, tmp_path / f"sent-{ts}" / p.name) for p in series.paths]
        sent[ts] = series
    node = Settings.load(data_dir=settings.data_dir, database_url=settings.db_url, scp_port=free_port(),
                         allowed_callers="TESTSCU@127.0.0.1")
    scp = StoreSCP(node.node_config(), sessions).start()
    try:
        for ts, series in sent.items():
            r = dcmtk("storescu", "-xf", _profile(tmp_path / f"{ts}.cfg", (ts,)), "OnlyCompressed", "-aet", "TESTSCU",
                      "-aec", "SPECGATE", "127.0.0.1", str(scp.address[1]), *series.paths)
            assert r.returncode == 0, r.stderr
    finally:
        scp.stop()
    seg = _segmenter(tiny_model, tmp_path, BANK)
    seg_frames, probs = [], []
    for ts, series in sent.items():
        with session_scope(sessions) as s:
            study = s.execute(select(Study).where(Study.study_instance_uid == series.study_instance_uid)).scalar_one()
            job_id = jobs.create_job(s, study, actor="test", series_instance_uid=series.series_instance_uid,
                                     rule_name="default-ct-mr").id
        assert _run(settings, sessions, job_id, seg, f"t-{ts}", data_dir=settings.data_dir).state in ("released",
                                                                                                     "held")
        paths = job_paths(settings.results_dir, job_id, 1)
        seg_frames.append(dcmread(paths["seg"]).pixel_array)
        with np.load(paths["prob"]) as z:
            probs.append(z["prob_fg_u8"])
        with session_scope(sessions) as s:
            stored = {i.transfer_syntax_uid for i in s.execute(select(Instance)).scalars()
                      if i.sop_instance_uid in {dcmread(p, stop_before_pixels=True).SOPInstanceUID
                                                for p in series.paths}}
        assert stored == {ts}
    for other in range(1, len(syntaxes)):
        np.testing.assert_array_equal(seg_frames[other], seg_frames[0])
        np.testing.assert_array_equal(probs[other], probs[0])
