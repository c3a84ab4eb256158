"""The s3 store along the whole path (issue 18, item 1), against a real S3 server (SeaweedFS): the SCP
acknowledges from its spool and uploads in the background, a study becomes a job only when all of it is
in the store, a worker with a data directory of its own (none of the SCP's files) stages the series
from the store and checks every file, a corrupted cached file fails the attempt with
``input_hash_mismatch`` and is fetched again, the results go to the store and the review app started on a
third host reads them from there. A store outage loses nothing and costs no attempt. SQLite and PostgreSQL.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from dicom_node.assembler import Assembler
from dicom_node.scp import StoreSCP
from dicom_node.uploader import Uploader
from ledger import jobs
from ledger.db import session_scope
from ledger.prometheus import render as render_metrics
from ledger.schema import AuditEvent, Instance, Job, JobState, Result, Study
from model.data.phantoms import phantom_study
from review.app import ReviewActions
from specgate.settings import Settings
from specgate.synthetic import write_series
from store import StoreError, instance_key, open_store
from tests.integration.dicom_node.helpers import CALLER, store
from tests.integration.review.helpers import Client, Recorder, ReviewServer, make_user, review_config
from tests.integration.worker.test_pipeline import _segmenter, _signature_of
from tests.peers import SeaweedS3, free_port, wait_for
from worker.config import PipelineConfig
from worker.pipeline import AttemptFailed, claim, retry_or_fail, run_job


def _s3_settings(base: Settings, data_dir: Path, server: SeaweedS3, prefix: str, **kw) -> Settings:
    return Settings.load(data_dir=data_dir, database_url=base.db_url, store="s3", s3_endpoint_url=server.endpoint_url,
                         s3_bucket=server.bucket, s3_access_key=server.access_key, s3_secret_key=server.secret_key,
                         s3_prefix=prefix, **kw)


def _receive(settings: Settings, sessions, tmp_path: Path, seed: int = 11):
    case = phantom_study("ct_liver", seed=seed)
    series = write_series(case.image, case.spacing, "CT", tmp_path / f"series-{seed}", patient_id=f"PID-{seed}")
    node = Settings.load(**{**settings.model_dump(exclude_unset=True), "scp_port": free_port(),
                            "allowed_callers": f"{CALLER}@127.0.0.1"}).node_config()
    scp = StoreSCP(node, sessions).start()
    try:
        assert set(store(scp.address[1], series.paths)) == {0}
    finally:
        scp.stop()
    return case, series


def _keys(sessions) -> list[str | None]:
    with session_scope(sessions) as s:
        return list(s.execute(select(Instance.store_key).order_by(Instance.id)).scalars())


def _backlog(sessions) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    body = render_metrics(sessions)[0].decode()
    [family] = [f for f in text_string_to_metric_families(body) if f.name == "specgate_instances_not_stored"]
    return family.samples[0].value


def _run(sessions, job_id: int, cfg: PipelineConfig, seg, task_id: str):
    c = claim(sessions, job_id, task_id=task_id, worker_id="test", stale_after_s=60)
    assert c is not None
    try:
        return run_job(sessions, c, cfg, segmenters={"default": seg}.__getitem__)
    except AttemptFailed as exc:
        retry_or_fail(sessions, c, exc, actor="worker")
        return exc


def test_s3_from_the_scp_to_the_review_app_without_a_shared_folder(migrated, tmp_path: Path, tiny_model,
                                                                   s3_server: SeaweedS3,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    base, _, sessions = migrated
    prefix = f"p-{tmp_path.name[-12:]}"
    scp_settings = _s3_settings(base, tmp_path / "scp-host", s3_server, prefix, study_quiet_seconds=0.001)
    case, series = _receive(scp_settings, sessions, tmp_path)

    # acknowledged from the spool; not in the store yet, so not a job yet however quiet the study
    assert _keys(sessions) == [None] * len(series.paths)
    assert _backlog(sessions) == len(series.paths)  # the operator sees the upload backlog in /metrics
    assembler = Assembler(scp_settings.assembly_config(), sessions)
    assert assembler.pending() == []
    files = open_store(scp_settings.store_config(), scp_settings.data_dir)
    uploader = Uploader(sessions, files, scp_settings.data_dir)
    assert uploader.run_once() == len(series.paths)
    assert _backlog(sessions) == 0
    keys = _keys(sessions)
    with session_scope(sessions) as s:
        shas = list(s.execute(select(Instance.sha256).order_by(Instance.id)).scalars())
    assert keys == [instance_key(h) for h in shas]
    assert all(files.exists(k) for k in keys if k)
    assert uploader.run_once() == 0  # nothing left: a restart finds nothing to do
    assert len(assembler.pending()) == 1
    with session_scope(sessions) as s:
        study = s.execute(select(Study)).scalar_one()
        job_id = jobs.create_job(s, study, actor="test", series_instance_uid=series.series_instance_uid,
                                 rule_name="default-ct-mr").id

    shutil.rmtree(scp_settings.data_dir)  # the worker never sees the SCP's disk
    worker = _s3_settings(base, tmp_path / "worker-host", s3_server, prefix)
    cfg = PipelineConfig(results_dir=worker.results_dir, data_dir=worker.data_dir, store=worker.store_config(),
                         installation="TEST", rules=tuple(worker.rules), heartbeat_s=0.2)
    probe = _segmenter(tiny_model, tmp_path, np.stack([np.ones(4) / 2, np.full(4, -0.5)]))
    far = -_signature_of(probe, case)
    seg = _segmenter(tiny_model, tmp_path, np.stack([far, far + 1e-4, far - 1e-4, far + 2e-4]))

    # one cached file corrupted on the worker's disk: the attempt fails, and says which file
    cached = cfg.files.path(keys[1], shas[1])
    cached.write_bytes(b"\0" * 200 + cached.read_bytes()[200:])
    failed = _run(sessions, job_id, cfg, seg, "task-a")
    assert isinstance(failed, AttemptFailed) and failed.reason_code == "input_hash_mismatch"
    with session_scope(sessions) as s:
        job = s.get(Job, job_id)
        assert job.state == JobState.QUEUED and job.reason_code == "input_hash_mismatch"
        row = s.execute(select(AuditEvent).where(AuditEvent.action == "job.input_hash_mismatch")).scalar_one()
        assert row.details["key"] == keys[1] and row.details["expected_sha256"] == shas[1]
    # the next attempt fetches it again from the store, and the job ends as it should
    assert _run(sessions, job_id, cfg, seg, "task-b").state == JobState.HELD
    with session_scope(sessions) as s:
        res = s.execute(select(Result).where(Result.job_id == job_id)).scalar_one()
        stored = [res.seg_path, res.sr_path, res.prob_path, res.evidence_path]
    assert stored == [f"results/job-{job_id:08d}-v1/{n}" for n in
                      ("seg.dcm", "sr.dcm", "probability.npz", "evidence.json")]
    assert all(cfg.files.exists(k) for k in stored)

    # the review app on a third host: its own empty data directory, everything from the store
    reviewer = _s3_settings(base, tmp_path / "review-host", s3_server, prefix)
    elsewhere = tmp_path / "review-cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    make_user(sessions, "anna", "radiologist")
    actions = ReviewActions(deliver=Recorder().deliver, retract=Recorder().retract,
                            metrics=lambda: render_metrics(sessions))
    with ReviewServer(review_config(reviewer), sessions, actions) as srv:
        c = Client(srv.url)
        assert c.login("anna").status == 303
        page = c.get(f"/studies/{job_id}")
        assert page.status == 200 and "No images to show" not in page.text
        n = int(re.search(r'data-slices="(\d+)"', page.text).group(1))
        assert n == case.image.shape[0]
        png = c.get(f"/studies/{job_id}/slices/{n // 2}.png")
        assert png.status == 200 and png.body[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (reviewer.data_dir / "spool").exists() and not (reviewer.data_dir / "results").exists()


def test_a_store_outage_loses_nothing_and_costs_no_attempt(migrated, tmp_path: Path, tiny_model) -> None:
    """A private S3 server stopped after the SCP received a study: the uploader waits (nothing lost, no
    job), the worker's staging gives its attempt back (``store_unavailable``, not counted); started again,
    the uploads resume and the job runs."""
    base, _, sessions = migrated
    server = SeaweedS3(tmp_path / "s3").start()
    try:
        scp_settings = _s3_settings(base, tmp_path / "scp-host", server, "outage", study_quiet_seconds=0.001)
        case, series = _receive(scp_settings, sessions, tmp_path, seed=12)
        files = open_store(scp_settings.store_config(), scp_settings.data_dir)
        uploader = Uploader(sessions, files, scp_settings.data_dir)
        assert uploader.run_once() == len(series.paths)
        _, later = _receive(scp_settings, sessions, tmp_path, seed=13)
        server.stop()
        with pytest.raises(StoreError, match=server.endpoint_url):
            uploader.run_once()
        assert _keys(sessions)[len(series.paths):] == [None] * len(later.paths)  # waiting, nothing lost
        assert len(Assembler(scp_settings.assembly_config(), sessions).pending()) == 1  # the first study only

        with session_scope(sessions) as s:
            study = s.execute(select(Study).where(Study.study_instance_uid == series.study_instance_uid)).scalar_one()
            job_id = jobs.create_job(s, study, actor="test", series_instance_uid=series.series_instance_uid,
                                     rule_name="default-ct-mr").id
        worker = _s3_settings(base, tmp_path / "worker-host", server, "outage")
        cfg = PipelineConfig(results_dir=worker.results_dir, data_dir=worker.data_dir, store=worker.store_config(),
                             installation="TEST", rules=tuple(worker.rules), heartbeat_s=0.2)
        probe = _segmenter(tiny_model, tmp_path, np.stack([np.ones(4) / 2, np.full(4, -0.5)]))
        own = _signature_of(probe, case)
        seg = _segmenter(tiny_model, tmp_path, np.stack([own, own + 1e-3, own - 1e-3]))
        away = _run(sessions, job_id, cfg, seg, "task-1")
        assert isinstance(away, AttemptFailed) and away.reason_code == "store_unavailable"
        with session_scope(sessions) as s:
            job = s.get(Job, job_id)
            assert job.state == JobState.QUEUED and job.attempts == 0  # given back

        server.start()
        assert uploader.run_once() == len(later.paths)
        assert None not in _keys(sessions)
        assert _run(sessions, job_id, cfg, seg, "task-2").state == JobState.RELEASED
    finally:
        server.stop()


def test_an_object_lost_from_the_store_ends_the_job_failed_not_waiting_forever(migrated, tmp_path: Path, tiny_model,
                                                                              s3_server: SeaweedS3) -> None:
    """The store answers but no longer holds one of the series' objects (deleted, a bad restore): that is
    not an outage to wait out. Each attempt is counted (``input_missing``) and the job ends failed with
    that reason once its attempts are used, instead of being given back every 15 s for ever."""
    base, _, sessions = migrated
    prefix = f"lost-{tmp_path.name[-12:]}"
    scp_settings = _s3_settings(base, tmp_path / "scp-host", s3_server, prefix, study_quiet_seconds=0.001)
    case, series = _receive(scp_settings, sessions, tmp_path, seed=14)
    files = open_store(scp_settings.store_config(), scp_settings.data_dir)
    assert Uploader(sessions, files, scp_settings.data_dir).run_once() == len(series.paths)
    files.delete(_keys(sessions)[2])  # the store answers, and no longer has it
    with session_scope(sessions) as s:
        study = s.execute(select(Study)).scalar_one()
        job_id = jobs.create_job(s, study, actor="test", series_instance_uid=series.series_instance_uid,
                                 rule_name="default-ct-mr", max_attempts=2).id
    worker = _s3_settings(base, tmp_path / "worker-host", s3_server, prefix)
    cfg = PipelineConfig(results_dir=worker.results_dir, data_dir=worker.data_dir, store=worker.store_config(),
                         installation="TEST", rules=tuple(worker.rules), heartbeat_s=0.2)
    probe = _segmenter(tiny_model, tmp_path, np.stack([np.ones(4) / 2, np.full(4, -0.5)]))
    first = _run(sessions, job_id, cfg, probe, "task-1")
    assert isinstance(first, AttemptFailed) and first.reason_code == "input_missing" and first.counted
    with session_scope(sessions) as s:
        job = s.get(Job, job_id)
        assert (job.state, job.attempts, job.reason_code) == (JobState.QUEUED, 1, "input_missing")
    assert isinstance(_run(sessions, job_id, cfg, probe, "task-2"), AttemptFailed)
    lost = _keys(sessions)[2]
    with session_scope(sessions) as s:
        job = s.get(Job, job_id)
        assert (job.state, job.attempts, job.reason_code) == (JobState.FAILED, 2, "input_missing")
        assert lost in job.reason_detail


class _BuggyOnce:
    """The store with a bug in its first upload (what no StoreError names): the uploader must go on."""

    def __init__(self, store: Any) -> None:
        self.store, self.failed = store, 0

    def put(self, key: str, src: Path) -> None:
        if not self.failed:
            self.failed += 1
            raise RuntimeError("a bug in the first upload")
        self.store.put(key, src)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_the_uploader_outlives_an_unexpected_error(migrated, tmp_path: Path) -> None:
    base, _, sessions = migrated
    server = SeaweedS3(tmp_path / "s3").start()
    try:
        scp_settings = _s3_settings(base, tmp_path / "scp-host", server, "bug", study_quiet_seconds=0.001)
        _, series = _receive(scp_settings, sessions, tmp_path, seed=14)
        store = _BuggyOnce(open_store(scp_settings.store_config(), scp_settings.data_dir))
        uploader = Uploader(sessions, store, scp_settings.data_dir, interval_s=0.05).start()  # type: ignore[arg-type]
        try:
            wait_for(lambda: None not in _keys(sessions), timeout=60, what="every instance uploaded after the bug")
        finally:
            uploader.stop()
        assert store.failed == 1 and len(_keys(sessions)) == len(series.paths)
    finally:
        server.stop()
