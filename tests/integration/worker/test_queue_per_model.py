"""A queue per model (issue 18), on both ledger backends, with real Redis and real ``specgate worker``
processes: a job's model is in the ledger (the assembler records its rule's), its message goes to that
model's queue (``gpu.<model>``, also when the reconciler or an operator sends it again), a worker started
with ``--models A`` takes A's studies and leaves B's in their queue until a B worker starts, a worker asked
for a model it cannot run as registered refuses to start naming it, a worker that only delivers starts
without any model, and every attempt's host, process and device is in the ledger and in ``jobs show``.

The models are the shipped SegNet and its bank registered under two names (the names carry a random part,
so their queues are this test's alone on the machine's Redis); the studies are small phantoms.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner, Result
from pydicom import dcmread
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.assembler import Assembler
from ledger import jobs, models
from ledger.db import session_scope
from ledger.schema import AuditEvent, Instance, Job, JobAttempt, JobState, Series, Study, utcnow
from ledger.schema import Result as ResultRow
from model import weights as shipped
from model.data.phantoms import phantom_study
from model.ood import sha256_file
from specgate.cli import main
from specgate.settings import Settings
from specgate.synthetic import write_series
from store import file_sha256
from tests.conftest import REDIS_URL
from tests.peers import wait_for
from worker.celery_app import Enqueuer, make_celery

#: a Redis database of this test session's own (as the end-to-end tests pick theirs)
BROKER = REDIS_URL.rsplit("/", 1)[0] + f"/{random.Random(os.getpid() ^ time.time_ns()).randrange(1, 16)}"


def _register(sessions: sessionmaker[Session], name: str, weights: Path, bank: Path | None) -> None:
    """``name`` in the ledger as ``specgate model register`` and ``fit-ood`` leave it (SegNet weights file)."""
    with session_scope(sessions) as s:
        models.register(s, name=name, version="test", format="segnet", path=str(weights),
                        files_sha256={weights.name: sha256_file(weights)}, labels={1: "foreground"},
                        layer="decoder", settings={"signature": {}, "open_options": {}}, actor="test")
        if bank is not None:
            models.set_bank(s, name, bank_path=str(bank), bank_sha256=sha256_file(bank), actor="test")


def _receive(sessions: sessionmaker[Session], paths: list[Path]) -> str:
    """Index a written series the way the SCP does (its quiet period long over); its study's UID."""
    first = dcmread(paths[0], stop_before_pixels=True)
    with session_scope(sessions) as s:
        study = Study(study_instance_uid=first.StudyInstanceUID, calling_ae="PACS", received_count=len(paths),
                      last_received_at=utcnow() - timedelta(hours=1))
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_instance_uid=first.SeriesInstanceUID, modality=first.Modality)
        s.add(series)
        s.flush()
        for p in paths:
            ds = dcmread(p, stop_before_pixels=True)
            s.add(Instance(series_id=series.id, sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                           spool_path=str(p), size_bytes=p.stat().st_size, sha256=file_sha256(p), calling_ae="PACS"))
    return str(first.StudyInstanceUID)


def _messages(r: redis.Redis, queue: str) -> list[int]:
    """The job ids of the segmentation messages waiting in ``queue`` (kombu's Redis list of that name)."""
    return [json.loads(base64.b64decode(json.loads(m)["body"]))[0][0] for m in r.lrange(queue, 0, -1)]


@dataclass
class Site:
    """A data folder, a ledger, rules that send CT to model ``a`` and MR to model ``b``, and the broker."""

    root: Path
    settings: Settings
    sessions: sessionmaker[Session]
    a: str
    b: str
    env: dict[str, str]
    redis: redis.Redis
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def cli(self, *args: str, expect: int | None = 0, **env: str) -> Result:
        result = CliRunner().invoke(main, list(args), env={**self.env, **env}, catch_exceptions=False)
        if expect is not None:
            assert result.exit_code == expect, result.output
        return result

    def worker(self, *args: str, name: str) -> subprocess.Popen[bytes]:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("SPECGATE_")}, **self.env}
        with (self.root / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "specgate", "worker", "--no-reconcile", *args], env=env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-3000:]

    def job(self, study_uid: str) -> Job:
        with self.sessions() as s:
            return s.execute(select(Job).join(Study).where(Study.study_instance_uid == study_uid)).scalar_one()

    def attempts(self, job_id: int) -> list[JobAttempt]:
        return _attempts(self.sessions, job_id)


@pytest.fixture
def site(migrated, tmp_path: Path) -> Iterator[Site]:
    settings, _engine, sessions = migrated
    tag = uuid.uuid4().hex[:8]
    a, b = f"ct-model-{tag}", f"mr-model-{tag}"
    rules = [{"name": "ct", "modalities": ["CT"], "min_slices": 8, "model": a},
             {"name": "mr", "modalities": ["MR"], "min_slices": 8, "model": b}]
    env = {"SPECGATE_DATA_DIR": str(settings.data_dir), "SPECGATE_DATABASE_URL": settings.db_url,
           "SPECGATE_BROKER_URL": BROKER, "SPECGATE_RULES": json.dumps(rules), "SPECGATE_LOG_LEVEL": "INFO"}
    settings = Settings.load(data_dir=settings.data_dir, database_url=settings.db_url, broker_url=BROKER,
                             rules=rules)
    r = redis.Redis.from_url(BROKER)
    st = Site(tmp_path, settings, sessions, a, b, env, r)
    try:
        yield st
    finally:
        for proc in st.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(30)
        r.delete(f"gpu.{a}", f"gpu.{b}")
        r.close()


def _wait_done(site: Site, study_uid: str, proc: subprocess.Popen[bytes], name: str) -> Job:
    def done() -> Job | None:
        assert proc.poll() is None, site.log(name)
        job = site.job(study_uid)
        return job if job.state not in (JobState.QUEUED, JobState.RUNNING) else None

    return wait_for(done, timeout=180, what=f"the job of study {study_uid} run by {name}", interval=0.2)


def test_a_worker_takes_only_its_models_queue_and_records_where_each_attempt_ran(site: Site) -> None:
    _register(site.sessions, site.a, shipped.WEIGHTS_PATH, shipped.BANK_PATH)
    _register(site.sessions, site.b, shipped.WEIGHTS_PATH, shipped.BANK_PATH)
    studies = {}
    for name, kind, seed in (("ct1", "ct_liver", 1), ("ct2", "ct_liver", 2), ("mr", "mr_prostate", 1)):
        case = phantom_study(kind, seed=seed)
        series = write_series(case.image, case.spacing, case.modality, site.root / name, patient_id="QUEUE-TEST")
        studies[name] = _receive(site.sessions, list(series.paths))
    # the assembler makes each study's job with its rule's model and sends it to that model's queue
    enqueuer = Enqueuer(make_celery(site.settings.worker_config()), site.sessions)
    made = Assembler(site.settings.assembly_config(), site.sessions, on_job_queued=enqueuer.segment).run_once()
    assert sorted(r.rule or "" for r in made) == ["ct", "ct", "mr"]
    ct1, ct2, mr = (site.job(studies[n]) for n in ("ct1", "ct2", "mr"))
    assert (ct1.model_name, ct2.model_name, mr.model_name) == (site.a, site.a, site.b)
    assert sorted(_messages(site.redis, f"gpu.{site.a}")) == sorted([ct1.id, ct2.id])
    assert _messages(site.redis, f"gpu.{site.b}") == [mr.id]

    worker_a = site.worker("--models", site.a, name="worker-a")
    for name in ("ct1", "ct2"):
        assert _wait_done(site, studies[name], worker_a, "worker-a").state in (JobState.RELEASED, JobState.HELD)
    # both of A's studies were taken one after the other while B's waited in its own queue, untouched
    waiting = site.job(studies["mr"])
    assert (waiting.state, waiting.attempts) == (JobState.QUEUED, 0) and site.attempts(mr.id) == []
    assert _messages(site.redis, f"gpu.{site.b}") == [mr.id]

    worker_b = site.worker("--models", site.b, name="worker-b")
    assert _wait_done(site, studies["mr"], worker_b, "worker-b").state in (JobState.RELEASED, JobState.HELD)
    assert _messages(site.redis, f"gpu.{site.b}") == []

    # every attempt: this host, the worker's pool process (not its parent), the CPU, how it ended
    host = socket.gethostname()
    for job_id, proc in ((ct1.id, worker_a), (ct2.id, worker_a), (mr.id, worker_b)):
        [attempt] = site.attempts(job_id)
        job = site.job(studies["mr"] if job_id == mr.id else studies["ct1" if job_id == ct1.id else "ct2"])
        assert (attempt.attempt, attempt.host, attempt.device) == (1, host, "cpu")
        assert attempt.pid > 0 and attempt.pid != proc.pid
        assert attempt.outcome == str(job.state) and attempt.ended_at is not None and attempt.reason_code is None
    shown = site.cli("jobs", "show", str(mr.id)).output
    [line] = [ln for ln in shown.splitlines() if ln.strip().startswith("attempt 1:")]
    assert f"host {host} pid {site.attempts(mr.id)[0].pid} device cpu" in line
    assert f"-> {site.job(studies['mr']).state}" in line
    assert f"model: {site.b}" in shown
    d = json.loads(site.cli("jobs", "show", str(ct1.id), "--json").output)
    assert d["model"] == site.a
    assert [(x["attempt"], x["host"], x["device"]) for x in d["attempt_history"]] == [(1, host, "cpu")]


def test_a_worker_for_a_model_it_cannot_run_as_registered_refuses_to_start(site: Site) -> None:
    weights = site.root / "models" / "segnet.pt"
    weights.parent.mkdir()
    shutil.copyfile(shipped.WEIGHTS_PATH, weights)
    bank = site.root / "models" / "bank.npz"
    shutil.copyfile(shipped.BANK_PATH, bank)
    _register(site.sessions, site.a, weights, bank)

    def refused(*args: str) -> str:
        return " ".join(site.cli("worker", "--no-reconcile", *args, expect=1).output.split())

    assert ("refusing to start: model 'nobody' is neither configured (models: default) nor registered in the "
            f"ledger (registered: {site.a})") in refused("--models", f"{site.a},nobody")
    _register(site.sessions, site.b, weights, None)  # a rule names it: the rules' check says so first
    assert (f"rule 'mr' names model '{site.b}', which is registered without an OOD bank") in refused("--models", site.b)
    _register(site.sessions, "unrouted", weights, None)  # no rule names it: the models' check
    assert ("model 'unrouted' is registered without an OOD bank: fit one with 'specgate model fit-ood unrouted "
            "--data DIR'") in refused("--models", "unrouted")

    recorded = sha256_file(weights)
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # the weights on this machine are not the registered
    out = refused("--models", site.a)
    assert (f"model '{site.a}': its file {weights} is not the one the ledger recorded (SHA-256 "
            f"{sha256_file(weights)}, recorded {recorded}); register the model again under a new name") in out
    weights.unlink()
    assert f"model '{site.a}': its file {weights} is missing" in refused("--queues", f"gpu.{site.a},deliver")
    weights.write_bytes(data)
    recorded_bank = sha256_file(bank)
    saved = bank.read_bytes()
    bank.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
    out = refused("--models", site.a)
    assert (f"rule 'ct' names model '{site.a}', whose OOD bank {bank} is not the one the ledger recorded (SHA-256 "
            f"{sha256_file(bank)}, recorded {recorded_bank}); fit it again") in out
    spare = site.root / "models" / "spare.npz"  # a model no rule names: the models' check reads its bank
    shutil.copyfile(shipped.BANK_PATH, spare)
    _register(site.sessions, "spare", shipped.WEIGHTS_PATH, spare)
    spare.write_bytes(bank.read_bytes())  # the tampered bank of above
    assert (f"model 'spare': its OOD bank {spare} is not the one the ledger recorded (SHA-256 {sha256_file(spare)}, "
            f"recorded {sha256_file(shipped.BANK_PATH)}); fit it again with 'specgate model fit-ood spare --data DIR'"
            ) in refused("--models", "spare")
    res = site.cli("worker", "--queues", "gpu,pacs", expect=2)
    assert "'pacs' is not a queue: deliver, gpu, or gpu.MODEL" in res.output


def test_a_worker_that_only_delivers_starts_without_any_model(site: Site) -> None:
    """The rules name two models this machine does not have (neither is even registered): a ``--queues
    deliver`` worker starts all the same and delivers a released result."""
    with session_scope(site.sessions) as s:
        study = Study(study_instance_uid="1.2.826.0.1.3680043.8.498.1", calling_ae="PACS")
        s.add(study)
        s.flush()
        job = jobs.create_job(s, study, actor="test", model_name=site.a)
        s.flush()
        s.execute(update(Job).where(Job.id == job.id).values(state=JobState.RELEASED))
        s.add(ResultRow(job_id=job.id, seg_path="seg.dcm", seg_sop_instance_uid="1.2.3.4", seg_series_instance_uid="1.2.3",
                        oodm=0.1, tau=0.5, is_ood=False, model_id="m", weights_sha256="0" * 64))
        job_id = job.id
    assert "neither configured" in site.cli("worker", "--no-reconcile", expect=1).output  # a segmenting worker
    proc = site.worker("--queues", "deliver", name="deliverer")
    Enqueuer(make_celery(site.settings.worker_config()), site.sessions).deliver(job_id)

    def skipped() -> bool:
        assert proc.poll() is None, site.log("deliverer")
        with site.sessions() as s:
            return s.execute(select(AuditEvent).where(AuditEvent.action == "delivery.skipped",
                                                      AuditEvent.object_id == str(job_id))).first() is not None

    wait_for(skipped, timeout=120, what="the deliver-only worker's delivery (no destinations: skipped)", interval=0.2)


def test_the_reconciler_and_a_retry_send_each_job_to_its_models_queue(site: Site) -> None:
    """Jobs the broker lost go back to their model's queue: one made with a model, one made before revision
    0009 (no model: its rule's model now), one of a rule that is gone (the bare ``gpu`` queue)."""
    made: dict[str, int] = {}
    with session_scope(site.sessions) as s:
        for n, (key, rule, model) in enumerate((("new", "ct", site.a), ("old", "mr", None), ("orphan", "gone", None))):
            study = Study(study_instance_uid=f"1.2.826.0.1.3680043.8.498.{n + 10}", calling_ae="PACS")
            s.add(study)
            s.flush()
            made[key] = jobs.create_job(s, study, actor="test", rule_name=rule, model_name=model).id
    site.cli("reconcile", SPECGATE_QUEUED_DEADLINE_SECONDS="1")  # never enqueued: all three are overdue
    try:
        assert _messages(site.redis, f"gpu.{site.a}") == [made["new"]]
        assert _messages(site.redis, f"gpu.{site.b}") == [made["old"]]
        assert made["orphan"] in _messages(site.redis, "gpu")
    finally:  # the bare queue is the one name this test shares with the machine: take only its own message
        for raw in site.redis.lrange("gpu", 0, -1):
            if json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0] == made["orphan"]:
                site.redis.lrem("gpu", 1, raw)  # type: ignore[arg-type]  # (redis-py types values as str)

    # a running job whose worker died: the reconciler takes it back to its model's queue, and its attempt
    # is closed (worker_lost) with it
    from worker.pipeline import claim

    c = claim(site.sessions, made["new"], task_id="t1", worker_id="gone:1", stale_after_s=60, device="cuda:0 test")
    assert c is not None and c.model_name == site.a
    site.redis.delete(f"gpu.{site.a}")
    with session_scope(site.sessions) as s:
        s.execute(update(Job).where(Job.id == made["new"]).values(heartbeat_at=utcnow() - timedelta(hours=1)))
    site.cli("reconcile", SPECGATE_WORKER_STALE_SECONDS="60")
    assert _messages(site.redis, f"gpu.{site.a}") == [made["new"]]
    [attempt] = site.attempts(made["new"])
    assert (attempt.device, attempt.outcome, attempt.reason_code) == ("cuda:0 test", "queued", "worker_lost")

    # an operator's retry of a failed job: to its model's queue as well
    with session_scope(site.sessions) as s:
        jobs.transition(s, made["old"], JobState.FAILED, actor="test", reason_code="unreadable")
    site.redis.delete(f"gpu.{site.b}")
    site.cli("jobs", "retry", str(made["old"]), "--user", "admin")
    assert _messages(site.redis, f"gpu.{site.b}") == [made["old"]]


def test_each_attempt_is_closed_however_the_job_leaves_running(migrated) -> None:
    """The claim opens an attempt; an error retried, a dead worker taken over, a failure: each closes it."""
    from worker.pipeline import claim, retry_or_fail

    _, _, sessions = migrated
    with session_scope(sessions) as s:
        study = Study(study_instance_uid="1.2.3", calling_ae="PACS")
        s.add(study)
        s.flush()
        job_id = jobs.create_job(s, study, actor="test", max_attempts=3).id
    c = claim(sessions, job_id, task_id="t1", worker_id="w", stale_after_s=60)
    assert c is not None and retry_or_fail(sessions, c, RuntimeError("boom"), actor="worker")
    assert claim(sessions, job_id, task_id="t2", worker_id="w", stale_after_s=60, device="cuda:0 X") is not None
    with session_scope(sessions) as s:  # its worker died
        s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(hours=1)))
    c = claim(sessions, job_id, task_id="t3", worker_id="w", stale_after_s=60)
    assert c is not None and c.attempt == 3
    with session_scope(sessions) as s:
        jobs.transition(s, job_id, JobState.FAILED, actor="worker", reason_code="bad_spacing")
    with sessions() as s:
        rows = [(a.attempt, a.device, a.outcome, a.reason_code, a.ended_at is not None, a.pid, a.host)
                for a in s.execute(select(JobAttempt).order_by(JobAttempt.id)).scalars()]
    me = (os.getpid(), socket.gethostname())
    assert rows == [(1, "cpu", "queued", "attempt_failed", True, *me), (2, "cuda:0 X", "queued", "worker_lost", True, *me),
                    (3, "cpu", "failed", "bad_spacing", True, *me)]


def test_a_failed_attempt_is_retried_on_its_models_queue(migrated) -> None:
    """The segment task's own retry (an unexpected error, attempts left) goes to the job's model's queue,
    through the same enqueue as every other send: here the filesystem broker, whose files name the queue."""
    settings, _, sessions = migrated
    settings = Settings.load(data_dir=settings.data_dir, database_url=settings.db_url,
                             rules=[{"name": "ct", "model": "ghost"}])  # a model no worker has configured
    with session_scope(sessions) as s:
        study = Study(study_instance_uid="1.2.826.0.1.3680043.8.498.99", calling_ae="PACS")
        s.add(study)
        s.flush()
        job_id = jobs.create_job(s, study, actor="test", rule_name="ct", model_name="ghost").id
    app = make_celery(settings.worker_config())
    assert app.tasks["specgate.segment"].apply(args=[job_id]).get() == "error"  # LookupError: not configured
    with sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None and (job.state, job.attempts, job.reason_code) == (JobState.QUEUED, 1, "attempt_failed")
    queued = sorted(p.name for p in (settings.data_dir / "broker" / "queue").iterdir())
    assert len(queued) == 1 and queued[0].endswith(".gpu.ghost.msg"), queued
    [attempt] = [(a.outcome, a.reason_code) for a in _attempts(sessions, job_id)]
    assert attempt == ("queued", "attempt_failed")


def _attempts(sessions: sessionmaker[Session], job_id: int) -> list[JobAttempt]:
    with sessions() as s:
        return list(s.execute(select(JobAttempt).where(JobAttempt.job_id == job_id).order_by(JobAttempt.id)).scalars())
