"""The production topology on one machine (issue 18): every part its own process, no shared folder.

PostgreSQL (a database of the test's own on the real server), Redis started with the shipped
``deploy/redis/redis.conf``, an S3 store (SeaweedFS), ``specgate scp`` with its data directory, two
``specgate worker`` processes, each with its own data directory and cache and no access to the SCP's
(one takes model ``default``'s queue, CT; one model ``mr``'s, MR; both deliver), ``specgate review``,
and an Orthanc PACS as the destination. Twenty studies arrive from four dcmtk ``storescu`` processes at
once. Mid-run the CT worker is SIGKILLed while it segments, one file of that study in its cache is
corrupted on disk, the store is stopped for 30 s and started again, and the worker is started again.

Every study must end with exactly one SEG and its SR at Orthanc (sent) or one held result, never a
failure and never twice; ``input_hash_mismatch`` is in the audit trail for the corrupted file; the audit
chain verifies. The same flow on ``fs`` with the second worker seeing the data directory under another
path (a symlink), without the store's faults (there is no store to stop, and the data directory is the
only copy of a file).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from ledger.db import open_engine, sessionmaker_for
from ledger.schema import AuditEvent, Instance, Job, Series, Study
from model.data.phantoms import phantom_study
from model.weights import BANK_PATH, WEIGHTS_PATH
from specgate.synthetic import write_series
from tests.peers import Orthanc, SeaweedS3, dcmtk, dcmtk_path, free_port, peer_env, wait_for

pytestmark = pytest.mark.slow

CALLER = "TESTSCU"
REDIS_CONF = Path(__file__).resolve().parents[2] / "deploy" / "redis" / "redis.conf"
# (kind, how many): CT goes to model default, MR to model mr; the unseen MR kind is held by the gate
STUDIES = (("ct_liver", 9), ("ct_lung", 3), ("mr_prostate", 6), ("mr_hippocampus", 2))


@dataclass
class Topology:
    root: Path
    base_env: dict[str, str]
    scp_port: int
    orthanc: Orthanc
    sessions: object
    s3: SeaweedS3 | None
    config: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    data_dirs: dict[str, Path] = field(default_factory=dict)

    def env(self, name: str) -> dict[str, str]:
        return {**self.base_env, "SPECGATE_DATA_DIR": str(self.data_dirs[name])}

    def start(self, name: str, *args: str, role: str | None = None) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process record
        proc = subprocess.Popen([sys.executable, "-m", "specgate", "--config", str(self.config), *args],
                                env=self.env(role or name), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            proc.wait(60)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-4000:]

    def cli(self, *args: str, role: str = "scp") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "specgate", "--config", str(self.config), *args],
                              env=self.env(role), capture_output=True, text=True, timeout=180)

    def alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name)}")

    def latest_jobs(self) -> dict[str, Job]:
        with self.sessions() as s:  # type: ignore[operator]
            out: dict[str, Job] = {}
            for job, uid in s.execute(select(Job, Study.study_instance_uid).join(Study).order_by(Job.version)):
                out[uid] = job
            return out


def _shipped_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / "redis.log", "ab")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen(["redis-server", str(REDIS_CONF), "--port", str(port), "--bind", "127.0.0.1",
                             "--dir", str(workdir), "--daemonize", "no"], stdout=log, stderr=subprocess.STDOUT)
    client = redis.Redis(host="127.0.0.1", port=port)

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server refused {REDIS_CONF}: {(workdir / 'redis.log').read_text()[-2000:]}")
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    wait_for(up, timeout=30, what="redis-server with the shipped configuration")
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    client.close()
    return proc, f"redis://127.0.0.1:{port}/0"


def _config(path: Path) -> Path:
    path.write_text(f"""
[[rules]]
name = "ct"
modalities = ["CT"]
model = "default"

[[rules]]
name = "mr"
modalities = ["MR"]
model = "mr"

[models.mr]
weights = "{WEIGHTS_PATH}"
bank = "{BANK_PATH}"
""")
    return path


@pytest.fixture(params=["s3", "fs"])
def topology(request: pytest.FixtureRequest, tmp_path: Path, pg_url: str) -> Iterator[Topology]:
    backend = request.param
    redis_proc, broker_url = _shipped_redis(tmp_path / "redis")
    orthanc = Orthanc(tmp_path / "orthanc").start()
    s3 = SeaweedS3(tmp_path / "s3").start() if backend == "s3" else None
    scp_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECGATE_")}
    env.update({
        "SPECGATE_DATABASE_URL": pg_url,
        "SPECGATE_BROKER_URL": broker_url,
        "SPECGATE_SCP_PORT": str(scp_port),
        "SPECGATE_REVIEW_PORT": str(free_port()),  # never the default 8080: something else may hold it
        "SPECGATE_SCP_PROCESSES": "1",
        "SPECGATE_ALLOWED_CALLERS": ",".join(f"{CALLER}{i}@127.0.0.1" for i in range(4)),
        "SPECGATE_DESTINATIONS": f"pacs=ORTHANC@127.0.0.1:{orthanc.dicom_port}",
        "SPECGATE_STUDY_QUIET_SECONDS": "2",
        "SPECGATE_WORKER_HEARTBEAT_SECONDS": "1",
        "SPECGATE_WORKER_STALE_SECONDS": "8",
        "SPECGATE_WORKER_MAX_ATTEMPTS": "5",
        "SPECGATE_WORKER_TORCH_THREADS": "1",
        "SPECGATE_RECONCILE_INTERVAL_SECONDS": "2",
        "SPECGATE_QUEUED_DEADLINE_SECONDS": "20",
        "SPECGATE_SCU_BACKOFF_SECONDS": "0.2",
        "SPECGATE_SCU_TIMEOUT": "10",
        "SPECGATE_LOG_LEVEL": "INFO",
    })
    if s3 is not None:
        env.update(s3.env())
    engine = open_engine(pg_url)
    top = Topology(tmp_path, env, scp_port, orthanc, sessionmaker_for(engine), s3, _config(tmp_path / "specgate.toml"))
    for name in ("scp", "worker-ct", "worker-mr", "review"):
        top.data_dirs[name] = tmp_path / f"{name}-host" / "data"
        top.data_dirs[name].mkdir(parents=True)
    if backend == "fs":  # one data directory, seen by the MR worker under another path
        shared = top.data_dirs["scp"]
        for name in ("worker-ct", "review"):
            top.data_dirs[name] = shared
        elsewhere = tmp_path / "worker-mr-host" / "mnt" / "specgate-data"
        elsewhere.parent.mkdir(parents=True)
        elsewhere.symlink_to(shared, target_is_directory=True)
        top.data_dirs["worker-mr"] = elsewhere
    out = top.cli("db", "upgrade")
    assert out.returncode == 0, out.stdout + out.stderr
    try:
        yield top
    finally:
        for name in list(top.procs):
            top.kill(name, signal.SIGTERM)
        if s3 is not None:
            s3.stop()
        orthanc.stop()
        engine.dispose()
        redis_proc.terminate()
        redis_proc.wait(30)


def _write_studies(root: Path) -> list[tuple[str, list[Path]]]:
    out = []
    n = 0
    for kind, count in STUDIES:
        for i in range(count):
            case = phantom_study(kind, seed=100 + n)
            series = write_series(case.image, case.spacing, case.modality, root / f"{kind}-{i}",
                                  series_description=f"topology {kind}", patient_id=f"TOPO-{n}")
            out.append((series.study_instance_uid, list(series.paths)))
            n += 1
    return out


def _at_orthanc(orthanc: Orthanc, study_uid: str, modality: str) -> int:
    """How many instances of ``modality`` Orthanc holds for a study (REST /tools/find)."""
    return len(orthanc.post("/tools/find", {"Level": "Instance", "Expand": True,
                                            "Query": {"StudyInstanceUID": study_uid, "Modality": modality}}))


# twenty studies through five processes with a killed worker and a 30 s store outage: 3-5 min on a quiet
# 2-core machine, longer beside other work; its own waits are bounded (600 s, 900 s) inside this limit
@pytest.mark.timeout(1800)
def test_production_topology_twenty_studies_with_faults(topology: Topology, tmp_path: Path) -> None:
    top = topology
    s3 = top.s3
    top.start("scp", "scp")
    wait_for(lambda: dcmtk("echoscu", "-aet", f"{CALLER}0", "-aec", "SPECGATE", "127.0.0.1", str(top.scp_port),
                           check=False).returncode == 0, timeout=60, what="specgate scp to answer C-ECHO")
    top.start("worker-ct", "worker", "--models", "default", "--queues", "deliver")
    top.start("worker-mr", "worker", "--models", "mr", "--queues", "deliver")
    top.start("review", "review")
    studies = _write_studies(tmp_path / "studies")

    # four senders at once, five studies each
    senders = []
    for i in range(4):
        files = [str(p) for _, paths in studies[i::4] for p in paths]
        senders.append(subprocess.Popen([dcmtk_path("storescu"), "-aet", f"{CALLER}{i}", "-aec", "SPECGATE",
                                         "127.0.0.1", str(top.scp_port), *files],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=peer_env()))
    for p in senders:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out.decode(errors="replace")[-3000:]

    # the CT worker killed while it segments a study whose files are all in its cache
    ct_cache = top.data_dirs["worker-ct"] / "cache"

    def ct_running_staged() -> Job | None:
        top.alive()
        with top.sessions() as s:  # type: ignore[operator]
            for job in s.execute(select(Job).where(Job.state == "running", Job.model_name == "default")).scalars():
                shas = s.execute(select(Instance.sha256).join(Series).where(
                    Series.series_instance_uid == job.series_instance_uid)).scalars().all()
                if s3 is None or all((ct_cache / "sha256" / h[:2] / h).exists() for h in shas):
                    return job
        return None

    victim = wait_for(ct_running_staged, timeout=600, what="a CT job running with its series staged", interval=0.05)
    top.kill("worker-ct", signal.SIGKILL)
    corrupted = None
    if s3 is not None:
        with top.sessions() as s:  # type: ignore[operator]
            sha = s.execute(select(Instance.sha256).join(Series).where(
                Series.series_instance_uid == victim.series_instance_uid).order_by(Instance.id)).scalars().first()
        corrupted = ct_cache / "sha256" / sha[:2] / sha
        data = bytearray(corrupted.read_bytes())
        data[-100:] = b"\x55" * 100
        corrupted.write_bytes(bytes(data))
        s3.stop()  # the store away for 30 s while the MR worker and the SCP go on
        back_at = time.monotonic() + 30  # 30 s away, every process checked alive meanwhile
        wait_for(lambda: top.alive() or time.monotonic() >= back_at, timeout=60, what="30 s without the store",
                 interval=1.0)
        s3.start()
    top.start("worker-ct", "worker", "--models", "default", "--queues", "deliver")

    uids = [uid for uid, _ in studies]

    def all_done() -> dict[str, Job] | None:
        top.alive()
        jobs = top.latest_jobs()
        if len(jobs) == len(uids) and all(str(j.state) in ("sent", "held", "failed") for j in jobs.values()):
            return jobs
        return None

    done = wait_for(all_done, timeout=900, what="every study sent or held", interval=1.0)
    states = {uid: str(done[uid].state) for uid in uids}
    assert "failed" not in states.values(), {u: (s, done[u].reason_code, done[u].reason_detail)
                                            for u, s in states.items() if s == "failed"}
    assert set(states.values()) <= {"sent", "held"}
    for uid in uids:
        seg, sr = _at_orthanc(top.orthanc, uid, "SEG"), _at_orthanc(top.orthanc, uid, "SR")
        if states[uid] == "sent":
            assert (seg, sr) == (1, 1), (uid, seg, sr)
        else:
            assert (seg, sr) == (0, 0), (uid, seg, sr)
    assert sum(s == "sent" for s in states.values()) >= 10  # the known kinds go out; the unseen one is held
    with top.sessions() as s:  # type: ignore[operator]
        models = {str(j.model_name) for j in s.execute(select(Job)).scalars()}
        assert models == {"default", "mr"}
        if corrupted is not None:
            rows = s.execute(select(AuditEvent).where(AuditEvent.action == "job.input_hash_mismatch")).scalars().all()
            assert [r.object_id for r in rows] == [str(victim.id)]
            assert rows[0].details["got_sha256"] != rows[0].details["expected_sha256"]
    victim_after = next(j for j in done.values() if j.id == victim.id)
    assert victim_after.attempts >= 2 and str(victim_after.state) in ("sent", "held")
    verify = top.cli("audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    if s3 is not None:  # no worker ever read the SCP's disk: its data directory holds the spool and nothing else
        assert not (top.data_dirs["worker-ct"] / "spool").exists()
        assert not (top.data_dirs["worker-mr"] / "spool").exists()


