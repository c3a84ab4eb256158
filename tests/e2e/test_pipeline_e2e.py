"""The product end to end, on real services: PostgreSQL, Redis, ``specgate scp`` and ``specgate worker``
subprocesses, the shipped model, and an Orthanc PACS (Debian ``orthanc``) as the destination.

A study goes in by C-STORE; its DICOM-SEG comes out at Orthanc, read back over Orthanc's REST API. An
unseen-organ study is held and reaches Orthanc only after ``specgate jobs approve``. Faults: the worker
killed with SIGKILL mid-job, Redis flushed with a job queued, the broker killed and started again while a
job runs (a Redis server of the test's own), a destination that refuses, a corrupt series, the same study
sent twice.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import highdicom
import pytest
import redis
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage
from sqlalchemy import select

from ledger.db import open_engine, sessionmaker_for
from ledger.paths import from_ledger
from ledger.schema import Delivery, Job, JobState, Result, Study
from model.data.phantoms import phantom_study
from specgate.synthetic import write_series
from tests.conftest import REDIS_URL
from tests.peers import Orthanc, free_port, wait_for

pytestmark = pytest.mark.slow

CALLER = "TESTSCU"


@dataclass
class RedisServer:
    """A throw-away ``redis-server`` on a port of its own, without persistence (the machine's shared Redis
    must not be disturbed): :meth:`kill` takes it away as a crash would, :meth:`start` brings up a new,
    empty one on the same port."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - owned by the process record
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url)

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_for(up, timeout=30, what=f"redis-server on port {self.port}", interval=0.05)
        client.close()
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@dataclass
class Stack:
    root: Path
    env: dict[str, str]
    scp_port: int
    orthanc: Orthanc | None
    sessions: object
    broker: RedisServer | None = None  # the stack's own Redis (marker own_broker), else the shared one's db
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process record
        proc = subprocess.Popen([sys.executable, "-m", "specgate", *args], env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            proc.wait(30)

    def file(self, stored: str) -> Path:
        """The file a ledger path names, for this stack's data dir (:mod:`ledger.paths`)."""
        return from_ledger(stored, Path(self.env["SPECGATE_DATA_DIR"]))

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-4000:]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([sys.executable, "-m", "specgate", *args], env=self.env, capture_output=True,
                             text=True, timeout=120)
        if check:
            assert out.returncode == 0, out.stdout + out.stderr
        return out

    def send(self, paths: list[Path]) -> list[int]:
        ae = AE(ae_title=CALLER)
        ae.add_requested_context(CTImageStorage)
        ae.add_requested_context(MRImageStorage)
        assoc = ae.associate("127.0.0.1", self.scp_port, ae_title="SPECGATE")
        assert assoc.is_established
        try:
            return [int(assoc.send_c_store(dcmread(p)).Status) for p in paths]
        finally:
            assoc.release()

    def jobs_for(self, study_uid: str) -> list[Job]:
        with self.sessions() as s:  # type: ignore[operator]
            return list(s.execute(select(Job).join(Study).where(Study.study_instance_uid == study_uid)
                                  .order_by(Job.version)).scalars())

    def reconcile(self, not_before: datetime | None = None) -> str:
        """Run one reconcile pass now (``specgate reconcile``: the code and settings of the worker's own
        passes, on the same ledger and broker), once the clock is past ``not_before`` if given (a pass
        that must see a deadline expire). Returns its report line. Its return is the pass's end: nothing to
        wait on, and the report says what it did."""
        if not_before is not None:
            wait_for(lambda: datetime.now(UTC) >= not_before, timeout=60, what=f"the clock at {not_before}",
                     interval=0.1)
        return self.cli("reconcile").stdout

    def study(self, study_uid: str) -> Study:
        with self.sessions() as s:  # type: ignore[operator]
            return s.execute(select(Study).where(Study.study_instance_uid == study_uid)).scalar_one()

    def wait_state(self, study_uid: str, states: set[str], timeout: float = 180.0) -> Job:
        def check() -> Job | None:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name)}")
            js = self.jobs_for(study_uid)
            return js[-1] if js and str(js[-1].state) in states else None

        return wait_for(check, timeout=timeout, what=f"a job of study {study_uid} in {sorted(states)}",
                        interval=0.1)


_REDIS_DB = random.Random(os.getpid() ^ time.time_ns()).randrange(1, 16)


def _redis_db_url() -> str:
    """A Redis database for this test session alone, so two runs on one machine never share a queue."""
    return REDIS_URL.rsplit("/", 1)[0] + f"/{_REDIS_DB}"


@pytest.fixture
def stack(tmp_path: Path, pg_url: str, request: pytest.FixtureRequest) -> Iterator[Stack]:
    refuse = request.node.get_closest_marker("refusing_destination") is not None
    broker = RedisServer(tmp_path / "redis").start() if request.node.get_closest_marker("own_broker") else None
    broker_url = broker.url if broker is not None else _redis_db_url()
    r = redis.Redis.from_url(broker_url)
    r.flushdb()
    orthanc = None
    if refuse:
        dest = f"pacs=NOBODY@127.0.0.1:{free_port()}"  # nothing listens there: every attempt is refused
    else:
        orthanc = Orthanc(tmp_path / "orthanc").start()
        dest = f"pacs=ORTHANC@127.0.0.1:{orthanc.dicom_port}"
    scp_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECGATE_")}
    env.update({
        "SPECGATE_DATA_DIR": str(tmp_path / "data"),
        "SPECGATE_DATABASE_URL": pg_url,
        "SPECGATE_BROKER_URL": broker_url,
        "SPECGATE_SCP_PORT": str(scp_port),
        "SPECGATE_ALLOWED_CALLERS": f"{CALLER}@127.0.0.1",
        "SPECGATE_DESTINATIONS": dest,
        "SPECGATE_STUDY_QUIET_SECONDS": "2",
        "SPECGATE_WORKER_HEARTBEAT_SECONDS": "1",
        "SPECGATE_WORKER_STALE_SECONDS": "8",
        "SPECGATE_RECONCILE_INTERVAL_SECONDS": "2",
        "SPECGATE_QUEUED_DEADLINE_SECONDS": "6",
        "SPECGATE_SCU_BACKOFF_SECONDS": "0.2",
        "SPECGATE_SCU_MAX_ATTEMPTS": "3",
        "SPECGATE_SCU_TIMEOUT": "5",
        "SPECGATE_LOG_LEVEL": "DEBUG",  # the most talkative logs must still carry no patient identifiers
    })
    engine = open_engine(pg_url)
    st = Stack(tmp_path, env, scp_port, orthanc, sessionmaker_for(engine), broker)
    st.cli("db", "upgrade")
    st.start("scp", "scp")
    wait_for(lambda: _port_open(scp_port), timeout=30, what="specgate scp listening")
    try:
        yield st
    finally:
        for name in list(st.procs):
            st.kill(name, signal.SIGTERM)
        if orthanc is not None:
            orthanc.stop()
        engine.dispose()
        if broker is not None:
            broker.kill()
        else:
            r.flushdb()


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _study(tmp: Path, kind: str, name: str, seed: int = 1):
    case = phantom_study(kind, seed=seed)
    return write_series(case.image, case.spacing, case.modality, tmp / name,
                        series_description=f"test {kind}", patient_id="TEST-E2E")


def _clinical_study(tmp: Path, kind: str, name: str, geometry):
    """A study at a scanner's geometry (thin slices, 512 matrix for CT), as production receives it."""
    from model.data.clinical import clinical_case

    case, _ = clinical_case(kind, 0, 10_002, geometry=geometry)
    return write_series(case.image, case.spacing, case.modality, tmp / name,
                        series_description=f"test {kind}", patient_id="TEST-E2E")


def _seg_uids_at(orthanc: Orthanc, study_uid: str, modality: str = "SEG") -> list[str]:
    """SOP Instance UIDs of the SEG (or SR, ...) instances Orthanc holds for a study (REST /tools/find)."""
    found = orthanc.post("/tools/find", {"Level": "Instance", "Expand": True,
                                         "Query": {"StudyInstanceUID": study_uid, "Modality": modality}})
    return sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in found)


def _held_by_orthanc(orthanc: Orthanc, sop_uid: str) -> Any:
    """The instance as the PACS holds it, read back."""
    return dcmread(io.BytesIO(orthanc.get(f"/instances/{_orthanc_id(orthanc, sop_uid)}/file")))


def _result(stack: Stack, job_id: int) -> Result:
    with stack.sessions() as s:  # type: ignore[operator]
        return s.execute(select(Result).where(Result.job_id == job_id)).scalar_one()


def test_released_study_reaches_orthanc_and_ood_study_waits_for_approval(stack: Stack, tmp_path: Path) -> None:
    """Studies at clinical geometry through the real services: a 512x512 thin-slice CT of a known kind is
    released and delivered, a 256x256 MR of an unseen organ is held until approved."""
    from model.data.clinical import Geometry

    stack.start("worker", "worker")
    known = _clinical_study(tmp_path, "ct_liver", "known", Geometry((64, 512, 512), (3.0, 0.703125, 0.703125),
                                                                     (0.0, 0.0, 0.0)))
    unseen = _clinical_study(tmp_path, "mr_hippocampus", "unseen", Geometry((48, 256, 256), (1.5, 0.5, 0.5),
                                                                            (0.0, 0.0, 0.0)))
    assert set(stack.send(known.paths)) == {0}
    assert set(stack.send(unseen.paths)) == {0}

    job = stack.wait_state(known.study_instance_uid, {"sent", "failed", "held"})
    assert str(job.state) == "sent", (job.reason_code, job.reason_detail)
    res = _result(stack, job.id)
    assert res.oodm <= res.tau and not res.is_ood
    assert _seg_uids_at(stack.orthanc, known.study_instance_uid) == [res.seg_sop_instance_uid]
    raw = stack.orthanc.get(f"/instances/{_orthanc_id(stack.orthanc, res.seg_sop_instance_uid)}/file")
    seg = highdicom.seg.Segmentation.from_dataset(dcmread(io.BytesIO(raw)))  # what the PACS holds, read back
    assert seg.StudyInstanceUID == known.study_instance_uid and seg.SegmentationType == "BINARY"
    ours = highdicom.seg.Segmentation.from_dataset(dcmread(stack.file(res.seg_path)))
    assert seg.SOPInstanceUID == ours.SOPInstanceUID and seg.NumberOfFrames == ours.NumberOfFrames
    assert seg.pixel_array.tobytes() == ours.pixel_array.tobytes()
    # its evidence travels with it: the SR, in the same study, naming the gate's decision
    assert _seg_uids_at(stack.orthanc, known.study_instance_uid, "SR") == [res.sr_sop_instance_uid]
    sr = _held_by_orthanc(stack.orthanc, str(res.sr_sop_instance_uid))
    assert sr.StudyInstanceUID == known.study_instance_uid and "gate" in str(seg.SeriesDescription).lower()

    held = stack.wait_state(unseen.study_instance_uid, {"held", "sent", "failed"})
    assert str(held.state) == "held", (held.reason_code, held.reason_detail)
    hres = _result(stack, held.id)
    assert hres.oodm > hres.tau and hres.is_ood
    listed = json.loads(stack.cli("jobs", "list", "--state", "held", "--json").stdout)
    assert [(j["id"], j["study_instance_uid"]) for j in listed] == [(held.id, unseen.study_instance_uid)]
    assert listed[0]["oodm"] == pytest.approx(hres.oodm) and listed[0]["tau"] == pytest.approx(hres.tau)
    # the held result must not leak out while nobody approved it: a reconcile pass re-sends nothing
    assert "re-sent 0 deliveries" in stack.reconcile()
    assert _seg_uids_at(stack.orthanc, unseen.study_instance_uid) == []

    never = stack.cli("jobs", "retract", str(held.id), "--user", "dr.house", "--reason", "quality", check=False)
    assert never.returncode != 0 and "never sent" in never.stderr
    stack.cli("jobs", "approve", str(held.id), "--user", "dr.house")
    sent = stack.wait_state(unseen.study_instance_uid, {"sent", "failed"})
    assert str(sent.state) == "sent"
    assert _seg_uids_at(stack.orthanc, unseen.study_instance_uid) == [hres.seg_sop_instance_uid]
    assert _seg_uids_at(stack.orthanc, unseen.study_instance_uid, "SR") == [hres.sr_sop_instance_uid]
    approved_seg = _held_by_orthanc(stack.orthanc, hres.seg_sop_instance_uid)
    approved_sr = _held_by_orthanc(stack.orthanc, str(hres.sr_sop_instance_uid))
    assert "dr.house" in str(approved_seg.ContentCreatorName) and "dr.house" in str(approved_seg.SeriesDescription)
    assert "dr.house" in str(approved_sr)  # the approver, in the SR's content tree

    # the radiologist takes it back: an IOCM rejection note referencing exactly what the PACS holds
    stack.cli("jobs", "retract", str(held.id), "--user", "dr.house", "--reason", "patient-safety")
    kos_uids = wait_for(lambda: _seg_uids_at(stack.orthanc, unseen.study_instance_uid, "KO"), timeout=60,
                        what="the KOS at Orthanc", interval=0.2)
    kos = _held_by_orthanc(stack.orthanc, kos_uids[0])
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113037"
    assert _kos_references(kos) == {hres.seg_sop_instance_uid, hres.sr_sop_instance_uid}
    again = stack.cli("jobs", "retract", str(held.id), "--user", "dr.other", "--reason", "quality", check=False)
    assert again.returncode != 0 and "already retracted by dr.house" in again.stderr
    shown = json.loads(stack.cli("jobs", "show", str(held.id), "--json").stdout)
    assert shown["retraction"]["user"] == "dr.house" and shown["retraction"]["reason"] == "patient_safety"
    stack.reconcile()
    assert _seg_uids_at(stack.orthanc, unseen.study_instance_uid, "KO") == kos_uids  # one KOS, not two
    shown = json.loads(stack.cli("jobs", "show", str(held.id), "--json").stdout)
    assert [r["user"] for r in shown["reviews"]] == ["dr.house"]
    assert "OK" in stack.cli("audit", "verify").stdout

    for name in ("scp", "worker"):  # DEBUG logs of both services: UIDs yes, patient name or ID never
        log = (stack.root / f"{name}.log").read_text(errors="replace")
        assert "job" in log and "TEST-E2E" not in log and "SYNTHETIC" not in log and "PHANTOM" not in log

    # the same study sent again: success for every instance, no new job, no second (different) SEG
    assert set(stack.send(known.paths)) == {0}
    # answered only once in the ledger: duplicates are not counted as received, so the study has nothing
    # left for an assembly pass to (wrongly) make a job of
    again = stack.study(known.study_instance_uid)
    assert again.received_count == again.assembled_count == len(known.paths)
    assert len(stack.jobs_for(known.study_instance_uid)) == 1
    assert _seg_uids_at(stack.orthanc, known.study_instance_uid) == [res.seg_sop_instance_uid]


def _kos_references(kos: Any) -> set[str]:
    """The SOP Instance UIDs a Key Object Selection document references (its evidence sequence)."""
    return {str(inst.ReferencedSOPInstanceUID) for study in kos.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence for inst in series.ReferencedSOPSequence}


def _orthanc_id(orthanc: Orthanc, sop_uid: str) -> str:
    found = orthanc.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}})
    return found[0]


def test_a_newer_version_sent_retracts_the_superseded_result(stack: Stack, tmp_path: Path) -> None:
    """A study sent and released; then a longer series of the same study arrives: version 2 is sent, and
    the PACS receives a KOS (Rejected for Quality Reasons) for version 1's SEG and SR."""
    stack.start("worker", "worker")
    first = _study(tmp_path, "ct_liver", "v1", seed=7)
    assert set(stack.send(first.paths)) == {0}
    v1 = stack.wait_state(first.study_instance_uid, {"sent", "failed", "held"})
    assert str(v1.state) == "sent", (v1.reason_code, v1.reason_detail)
    r1 = _result(stack, v1.id)
    case = phantom_study("ct_liver", seed=8)
    longer = write_series(case.image, case.spacing, case.modality, tmp_path / "v2", patient_id="TEST-E2E",
                          study_instance_uid=first.study_instance_uid, series_description="test ct_liver v2")
    assert set(stack.send(longer.paths)) == {0}
    v2 = wait_for(lambda: next((j for j in stack.jobs_for(first.study_instance_uid)
                                if j.version == 2 and str(j.state) in {"sent", "failed", "held"}), None),
                  timeout=180, what="version 2 finished", interval=0.2)
    assert str(v2.state) == "sent", (v2.reason_code, v2.reason_detail)
    kos_uids = wait_for(lambda: _seg_uids_at(stack.orthanc, first.study_instance_uid, "KO"), timeout=60,
                        what="the KOS at Orthanc", interval=0.2)
    kos = _held_by_orthanc(stack.orthanc, kos_uids[0])
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113001"
    assert _kos_references(kos) == {r1.seg_sop_instance_uid, r1.sr_sop_instance_uid}


def test_worker_killed_mid_job_completes_once(stack: Stack, tmp_path: Path) -> None:
    stack.start("worker", "worker")
    study = _study(tmp_path, "ct_liver", "known", seed=2)
    assert set(stack.send(study.paths)) == {0}
    stack.wait_state(study.study_instance_uid, {"running"}, timeout=120)
    stack.kill("worker", signal.SIGKILL)  # the whole worker: parent and the child running the task
    job = stack.jobs_for(study.study_instance_uid)[-1]
    assert str(job.state) == "running"
    stack.start("worker2", "worker")
    done = stack.wait_state(study.study_instance_uid, {"sent", "failed"}, timeout=180)
    assert str(done.state) == "sent" and done.attempts == 2
    res = _result(stack, done.id)
    assert _seg_uids_at(stack.orthanc, study.study_instance_uid) == [res.seg_sop_instance_uid]
    with stack.sessions() as s:  # type: ignore[operator]
        rows = s.execute(select(Delivery).where(Delivery.job_id == done.id)).scalars().all()
        assert [(d.destination, str(d.state)) for d in rows] == [("pacs", "sent")]


def test_redis_flushed_with_a_job_queued_the_reconciler_brings_it_back(stack: Stack, tmp_path: Path) -> None:
    study = _study(tmp_path, "ct_liver", "known", seed=3)
    assert set(stack.send(study.paths)) == {0}
    stack.wait_state(study.study_instance_uid, {"queued"}, timeout=60)
    r = redis.Redis.from_url(_redis_db_url())
    wait_for(lambda: r.llen("gpu.default") > 0, timeout=10, what="the job's message in Redis (its model's queue)")
    r.flushdb()  # the broker forgets everything
    assert r.llen("gpu.default") == 0
    stack.start("worker", "worker")
    done = stack.wait_state(study.study_instance_uid, {"sent", "failed"}, timeout=180)
    assert str(done.state) == "sent"
    assert len(_seg_uids_at(stack.orthanc, study.study_instance_uid)) == 1


@pytest.mark.own_broker
def test_broker_lost_mid_job_and_started_again_one_seg_one_delivery(stack: Stack, tmp_path: Path) -> None:
    """Redis dies while a job runs (SIGKILL: every connection cut, every message gone) and a new, empty one
    comes up on the same port: the running attempt carries on (a broker outage costs no GPU work, and
    no second attempt starts beside it), and the study reaches the PACS as one SEG and one SR, by one
    delivery."""
    assert stack.broker is not None
    stack.start("worker", "worker")
    study = _study(tmp_path, "ct_liver", "known", seed=9)
    assert set(stack.send(study.paths)) == {0}
    stack.wait_state(study.study_instance_uid, {"running"}, timeout=120)
    stack.broker.kill()
    stack.broker.start()
    done = stack.wait_state(study.study_instance_uid, {"sent", "failed", "held"}, timeout=180)
    assert (str(done.state), done.attempts) == ("sent", 1), (done.reason_code, done.reason_detail)
    res = _result(stack, done.id)
    assert _seg_uids_at(stack.orthanc, study.study_instance_uid) == [res.seg_sop_instance_uid]
    assert _seg_uids_at(stack.orthanc, study.study_instance_uid, "SR") == [res.sr_sop_instance_uid]
    with stack.sessions() as s:  # type: ignore[operator]
        rows = s.execute(select(Delivery).where(Delivery.job_id == done.id)).scalars().all()
        assert [(d.destination, str(d.state), d.attempts) for d in rows] == [("pacs", "sent", 1)]


@pytest.mark.refusing_destination
def test_destination_that_refuses_ends_failed_never_sent(stack: Stack, tmp_path: Path) -> None:
    stack.start("worker", "worker")
    study = _study(tmp_path, "ct_liver", "known", seed=4)
    assert set(stack.send(study.paths)) == {0}
    done = stack.wait_state(study.study_instance_uid, {"sent", "failed"}, timeout=180)
    assert str(done.state) == "failed" and done.reason_code == "delivery_failed"
    with stack.sessions() as s:  # type: ignore[operator]
        d = s.execute(select(Delivery).where(Delivery.job_id == done.id)).scalar_one()
        assert str(d.state) == "failed" and d.attempts == 3 and d.sent_at is None


def test_corrupt_series_fails_with_its_reason_and_no_retry_loop(stack: Stack, tmp_path: Path) -> None:
    stack.start("worker", "worker")
    study = _study(tmp_path, "ct_liver", "gap", seed=5)
    paths = [p for i, p in enumerate(study.paths) if i != len(study.paths) // 2]  # a slice missing
    assert set(stack.send(paths)) == {0}
    done = stack.wait_state(study.study_instance_uid, {"sent", "failed", "held"}, timeout=120)
    assert str(done.state) == "failed" and done.reason_code == "missing_slices" and done.attempts == 1
    # a reconcile pass past the stale and queued deadlines (8 s and 6 s here): nothing picks it up again
    report = stack.reconcile(not_before=done.updated_at + timedelta(seconds=8))
    assert "re-enqueued 0 queued, recovered 0 running (worker lost), failed 0" in report
    job = stack.jobs_for(study.study_instance_uid)[-1]
    assert str(job.state) == "failed" and job.attempts == 1
    assert JobState(job.state) == JobState.FAILED


def test_a_study_that_kills_every_attempt_ends_failed_and_never_loops(stack: Stack, tmp_path: Path) -> None:
    """The worker dies during every attempt (SIGKILL of the whole worker, as an OOM kill would): after
    SPECGATE_WORKER_MAX_ATTEMPTS (3) attempts the job ends failed/attempts_exhausted and nothing is sent."""
    from scipy import ndimage

    case = phantom_study("ct_liver", seed=6)
    big = ndimage.zoom(case.image, (1, 2, 2), order=1)  # several windows: each attempt runs for seconds
    study = write_series(big, (case.spacing[0], case.spacing[1] / 2, case.spacing[2] / 2), "CT",
                         tmp_path / "big", patient_id="TEST-E2E")
    assert set(stack.send(study.paths)) == {0}
    uid = study.study_instance_uid
    for attempt in (1, 2, 3):
        stack.start(f"worker{attempt}", "worker")

        def running(attempt: int = attempt) -> Job | None:
            js = stack.jobs_for(uid)
            return js[-1] if js and str(js[-1].state) == "running" and js[-1].attempts == attempt else None

        wait_for(running, timeout=120, what=f"attempt {attempt} running", interval=0.05)
        stack.kill(f"worker{attempt}", signal.SIGKILL)
    stack.start("worker4", "worker")
    done = stack.wait_state(uid, {"failed", "sent", "held"}, timeout=120)
    assert (str(done.state), done.reason_code, done.attempts) == ("failed", "attempts_exhausted", 3)
    # a reconcile pass past the stale and queued deadlines: the failed job is not picked up again
    report = stack.reconcile(not_before=done.updated_at + timedelta(seconds=8))
    assert "re-enqueued 0 queued, recovered 0 running (worker lost), failed 0" in report
    job = stack.jobs_for(uid)[-1]
    assert (str(job.state), job.attempts) == ("failed", 3)
    assert _seg_uids_at(stack.orthanc, uid) == []


def test_the_gate_holds_blurred_prostate_mrs_the_model_fails_on(stack: Stack, tmp_path: Path) -> None:
    """Test-range prostate MRs through the real SCP and worker (issue 20): the clear ones are released and
    segmented well; the same pelvises blurred (Gaussian, sigma 2 voxels), which the model segments badly,
    are held. The SEG's DSC is measured on what the worker wrote, against the phantom's truth."""
    from dicom_series import load_series
    from model.data.phantoms import phantom_case
    from model.data.shifts import apply_shift
    from model.data.splits import SEED, TEST
    from model.scores import dice

    stack.start("worker", "worker")
    studies = []
    for k in range(2):
        clear = phantom_case("mr_prostate", SEED, TEST.index(k))
        for name, case in (("clear", clear), ("blurred", apply_shift(clear, "blur", 2.0))):
            series = write_series(case.image, case.spacing, case.modality, tmp_path / f"{name}{k}",
                                  series_description=f"test prostate {name}", patient_id="TEST-E2E")
            studies.append((name, series, case.label))
    for _, series, _ in studies:
        assert set(stack.send(series.paths)) == {0}
    failures = 0
    for name, series, truth in studies:
        job = stack.wait_state(series.study_instance_uid, {"sent", "held", "failed"}, timeout=300)
        res = _result(stack, job.id)
        seg = highdicom.seg.Segmentation.from_dataset(dcmread(stack.file(res.seg_path)))
        volume = load_series(series.paths)
        mask = seg.get_pixels_by_source_instance([r.sop_instance_uid for r in volume.slices],
                                                 assert_missing_frames_are_empty=True)[..., 0].astype(bool)
        score = dice(mask, truth)
        print(f"{name}: {job.state}, DSC {score:.3f}, OODM/tau {res.oodm / res.tau:.2f}")
        if name == "clear":
            assert str(job.state) == "sent" and score >= 0.8, (name, job.state, score, res.oodm / res.tau)
        else:
            assert str(job.state) == "held" and res.is_ood, (name, job.state, score, res.oodm / res.tau)
            failures += score < 0.5
    assert failures >= 1, "no blurred study was segmented badly: the test shows nothing about failures"
