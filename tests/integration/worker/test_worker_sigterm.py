"""SIGTERM to a ``specgate worker`` while it segments a study: Celery's warm shutdown lets the running task
finish, so the job ends released or held (not handed back, not lost), and the process then exits 0.

The signal goes to the worker's main process only, as ``docker stop`` and systemd (``KillMode=mixed``)
send it; the prefork child running the task is the main process's to stop.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select

from ledger import jobs, migrations
from ledger.db import open_engine, session_scope, sessionmaker_for
from ledger.schema import AuditEvent, Instance, Job, JobState, Series, Study
from model.data.phantoms import phantom_study
from specgate.settings import Settings
from specgate.synthetic import write_series
from tests.peers import wait_for
from worker.celery_app import Enqueuer, make_celery


def test_sigterm_mid_job_finishes_the_job_then_exits_0(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    url = f"sqlite:///{data / 'specgate.db'}"
    migrations.upgrade(url)
    settings = Settings.load(data_dir=data, database_url=url)
    engine = open_engine(url)
    sessions = sessionmaker_for(engine)
    case = phantom_study("ct_liver", seed=4)
    series = write_series(case.image, case.spacing, case.modality, tmp_path / "in")
    with session_scope(sessions) as s:
        study = Study(study_instance_uid=series.study_instance_uid, calling_ae="PACS")
        s.add(study)
        s.flush()
        ser = Series(study_id=study.id, series_instance_uid=series.series_instance_uid, modality=series.modality)
        s.add(ser)
        s.flush()
        for p in series.paths:
            ds = dcmread(p, stop_before_pixels=True)
            s.add(Instance(series_id=ser.id, sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                           spool_path=str(p), size_bytes=p.stat().st_size,
                           sha256=hashlib.sha256(p.read_bytes()).hexdigest(), calling_ae="PACS"))
        job_id = jobs.create_job(s, study, actor="test", series_instance_uid=series.series_instance_uid,
                                 rule_name="default-ct-mr").id
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SPECGATE_")}, "SPECGATE_DATA_DIR": str(data),
           "SPECGATE_DATABASE_URL": url}
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "specgate", "worker", "--no-reconcile"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        Enqueuer(make_celery(settings.worker_config()), sessions).segment(job_id)

        def state() -> JobState:
            assert proc.poll() is None, log.read_text()[-3000:]
            with sessions() as s:
                return JobState(s.execute(select(Job.state).where(Job.id == job_id)).scalar_one())

        wait_for(lambda: state() == JobState.RUNNING, timeout=120, what="the worker to start the job", interval=0.02)
        signalled = datetime.now(UTC)
        proc.send_signal(signal.SIGTERM)  # the main process only
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        engine.dispose()
    with sessions() as s:
        job = s.execute(select(Job).where(Job.id == job_id)).scalar_one()
        decided = s.execute(select(AuditEvent.ts).where(
            AuditEvent.object_type == "job", AuditEvent.object_id == str(job_id),
            AuditEvent.action.in_(["job.released", "job.held"]))).scalar_one()
    assert JobState(job.state) in (JobState.RELEASED, JobState.HELD, JobState.SENT), (job.state, job.reason_code)
    assert job.attempts == 1
    # the gate's verdict came after the signal: the signal came mid-job and the job was finished, not dropped
    assert decided.replace(tzinfo=UTC) > signalled
