"""File paths in the ledger are relative to the data directory (issue 18, item 1): the SCP started in one
folder, a worker that sees the data under another path, the review app started from a third folder; and
rows of earlier versions (absolute paths) still resolve. SQLite and PostgreSQL."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from sqlalchemy import select

from dicom_node.scp import StoreSCP
from ledger import jobs
from ledger.db import session_scope
from ledger.paths import from_ledger
from ledger.prometheus import render as render_metrics
from ledger.schema import AuditEvent, Instance, JobState, Result, Study
from model.data.phantoms import phantom_study
from review import queries
from review.app import ReviewActions
from specgate.settings import Settings
from specgate.synthetic import write_series
from tests.integration.dicom_node.helpers import CALLER, echo, store
from tests.integration.review.helpers import Client, Recorder, ReviewServer, make_user, review_config
from tests.integration.worker.test_pipeline import _claim_and_run, _ingest, _segmenter, _signature_of
from tests.peers import free_port, wait_for, write_ct_series
from worker.config import PipelineConfig
from worker.objects import series_files


def _assert_relative(stored: str, data_dir: Path) -> None:
    assert not stored.startswith("/") and ".." not in Path(stored).parts, stored
    assert not stored.startswith(data_dir.name + "/"), stored


def _instance_paths(sessions) -> list[str]:
    with session_scope(sessions) as s:
        return list(s.execute(select(Instance.spool_path).order_by(Instance.id)).scalars())


def test_scp_started_in_one_folder_stores_spool_paths_relative_to_the_data_dir(migrated, tmp_path: Path) -> None:
    """``specgate scp`` started in ``tmp/site`` with the data dir given relative to it (``specgate-data``,
    as ``make demo`` does): the rows name ``spool/...``, not ``specgate-data/spool/...``."""
    settings, _, sessions = migrated
    site = tmp_path / "site"
    site.mkdir()
    data = site / "specgate-data"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECGATE_")}
    env.update({"SPECGATE_DATA_DIR": "specgate-data", "SPECGATE_DATABASE_URL": settings.db_url,
                "SPECGATE_SCP_PORT": str(port), "SPECGATE_ALLOWED_CALLERS": f"{CALLER}@127.0.0.1",
                "SPECGATE_SCP_PROCESSES": "1", "SPECGATE_STUDY_QUIET_SECONDS": "3600"})
    log = tmp_path / "scp.log"
    proc = subprocess.Popen([str(Path(sys.executable).with_name("specgate")), "scp"], env=env, cwd=site,
                            stdout=subprocess.DEVNULL, stderr=open(log, "ab"))
    try:
        wait_for(lambda: proc.poll() is not None or echo(port) == 0, timeout=60, what="specgate scp to answer")
        assert proc.poll() is None, log.read_text()[-3000:]
        series = write_ct_series(tmp_path / "in", slices=3)
        assert store(port, series.paths) == [0, 0, 0]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    stored = _instance_paths(sessions)
    assert len(stored) == 3
    for sop, p in zip(series.sop_instance_uids, stored, strict=True):
        _assert_relative(p, data)
        assert p == f"spool/{series.study_instance_uid}/{series.series_instance_uid}/{sop}.dcm"
        assert from_ledger(p, data).is_file()


def test_data_dir_moved_after_receive_worker_and_review_from_elsewhere(migrated, tmp_path: Path, tiny_model,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Received by the real SCP under one data dir; the data dir then moved (a worker or a review host
    that mounts it elsewhere): the pipeline reads the study there and stores relative result paths, and
    the review app started from another folder shows the job's slices."""
    settings, _, sessions = migrated
    case = phantom_study("ct_liver", seed=11)
    series = write_series(case.image, case.spacing, "CT", tmp_path / "series", patient_id="PID-11")
    scp = StoreSCP(Settings.load(data_dir=settings.data_dir, database_url=settings.db_url, scp_port=free_port(),
                                 allowed_callers=f"{CALLER}@127.0.0.1").node_config(), sessions).start()
    try:
        assert set(store(scp.address[1], series.paths)) == {0}
    finally:
        scp.stop()
    for p in _instance_paths(sessions):
        _assert_relative(p, settings.data_dir)
    with session_scope(sessions) as s:
        study = s.execute(select(Study)).scalar_one()
        job_id = jobs.create_job(s, study, actor="test", series_instance_uid=series.series_instance_uid,
                                 rule_name="default-ct-mr").id

    moved = tmp_path / "mnt" / "elsewhere"
    moved.parent.mkdir()
    shutil.move(str(settings.data_dir), str(moved))
    assert not settings.data_dir.exists()
    there = Settings.load(data_dir=moved, database_url=settings.db_url)
    probe = _segmenter(tiny_model, tmp_path, np.stack([np.ones(4) / 2, np.full(4, -0.5)]))
    far = -_signature_of(probe, case)  # a bank far from the study: held, so a reviewer looks at it
    seg = _segmenter(tiny_model, tmp_path, np.stack([far, far + 1e-4, far - 1e-4, far + 2e-4]))
    cfg = PipelineConfig(results_dir=there.results_dir, data_dir=there.data_dir, installation="TEST",
                         rules=tuple(there.rules), heartbeat_s=0.2)
    assert _claim_and_run(sessions, job_id, cfg, {"default": seg}.__getitem__, "task-moved").state == JobState.HELD
    with session_scope(sessions) as s:
        res = s.execute(select(Result).where(Result.job_id == job_id)).scalar_one()
        stored = [res.seg_path, res.sr_path, res.prob_path, res.evidence_path]
    for p in stored:
        assert p is not None
        _assert_relative(p, moved)
        assert p.startswith("results/") and from_ledger(p, moved).is_file()

    elsewhere = tmp_path / "another-cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    make_user(sessions, "anna", "radiologist")
    actions = ReviewActions(deliver=Recorder().deliver, retract=Recorder().retract,
                            metrics=lambda: render_metrics(sessions))
    with ReviewServer(review_config(there), sessions, actions) as srv:
        c = Client(srv.url)
        assert c.login("anna").status == 303
        page = c.get(f"/studies/{job_id}")
        assert page.status == 200
        assert "No images to show" not in page.text
        n = int(re.search(r'data-slices="(\d+)"', page.text).group(1))
        assert n == case.image.shape[0]
        png = c.get(f"/studies/{job_id}/slices/{n // 2}.png")
        assert png.status == 200 and png.body[:8] == b"\x89PNG\r\n\x1a\n"


def test_rows_of_earlier_versions_with_absolute_paths_still_resolve(migrated, tmp_path: Path) -> None:
    """An absolute spool path (as every earlier version wrote) is read as it is, whatever the data dir."""
    settings, _, sessions = migrated
    series = write_ct_series(tmp_path / "old-spool", slices=2)
    _ingest(sessions, SimpleNamespace(**vars(series), modality="CT"))
    stored = _instance_paths(sessions)
    assert all(p.startswith("/") for p in stored)
    other = tmp_path / "some" / "other" / "data"
    assert series_files(sessions, series.series_instance_uid, other) == list(series.paths)
    with session_scope(sessions) as s:
        assert queries.series_paths(s, series.series_instance_uid, other) == list(series.paths)
    assert all(p.is_file() for p in series_files(sessions, series.series_instance_uid, other))


def test_db_relativize_paths_rewrites_old_rows_inside_the_data_dir(migrated, cli, tmp_path: Path) -> None:
    """``specgate db relativize-paths``: the absolute spool paths of an earlier version inside the data dir
    become relative (and still name the same files); one outside it is left as it was; audited."""
    settings, _, sessions = migrated
    inside = write_ct_series(settings.spool_dir / "old", slices=2)
    outside = write_ct_series(tmp_path / "outside", slices=1)
    _ingest(sessions, SimpleNamespace(**vars(inside), modality="CT"))
    _ingest(sessions, SimpleNamespace(**vars(outside), modality="CT"))
    out = cli("db", "relativize-paths").output
    assert "instances.spool_path 2" in out
    stored = _instance_paths(sessions)
    assert [from_ledger(p, settings.data_dir) for p in stored] == [*inside.paths, *outside.paths]
    for p in stored[:2]:
        _assert_relative(p, settings.data_dir)
    assert stored[2] == str(outside.paths[0])
    assert "instances.spool_path 0" in cli("db", "relativize-paths").output  # nothing left to do
    with session_scope(sessions) as s:
        events = s.execute(select(AuditEvent).where(AuditEvent.action == "ledger.paths_relativized")).scalars()
        assert [e.details["rows"]["instances.spool_path"] for e in events] == [2, 0]
