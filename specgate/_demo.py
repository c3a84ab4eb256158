"""``specgate demo``: the whole product on embedded defaults, in one command, with no servers.

It migrates the SQLite ledger, starts the DICOM SCP and assembler, a worker process (``specgate worker``
on the filesystem broker) and an embedded "PACS" that receives results, generates two studies at clinical
scanner geometry (a 512x512 CT of 160 thin slices of the liver phantom the shipped model knows, and a
256x256 head MR of an organ it never saw), sends them to itself over C-STORE, and reports what happened:
one DICOM-SEG released and delivered, one held with its OODM against tau. Ctrl-C stops everything cleanly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .settings import AllowedCaller, Destination, Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

__all__ = ["run_demo"]

DEMO_CALLER = "DEMO_MODALITY"
DEMO_PACS_AE = "DEMO_PACS"
TERMINAL_FOR_DEMO = {"sent", "held", "failed", "rejected", "superseded", "released"}
# the studies sent: {study instance UID: (label, description, slices)}
Studies = dict[str, tuple[str, str, int]]


def _demo_studies() -> tuple[tuple[str, str, str, Any], ...]:
    from model.data.clinical import Geometry

    # A thin-slice abdominal CT as a scanner writes it (512 x 512 at 0.703 mm, 160 slices of 1.25 mm: the
    # field of view is wider than the patient, padded with air) and a head MR (256 x 256 at 0.5 mm, 60
    # slices of 1.5 mm). With the shipped model: OODM 0.019 and 0.370 against tau 0.0520.
    return (
        ("known", "ct_liver", "CT abdomen (liver phantom)", Geometry((160, 512, 512), (1.25, 0.703125, 0.703125),
                                                                      (0.0, 0.0, 0.0))),
        ("unseen", "mr_hippocampus", "MR head (hippocampus phantom)", Geometry((60, 256, 256), (1.5, 0.5, 0.5),
                                                                               (0.0, 0.0, 0.0))),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class EmbeddedPACS:
    """A minimal storage SCP standing in for the hospital PACS: it files what it receives under ``folder``."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder, self.port = folder, port
        self.received: list[Path] = []
        self._server: Any = None

    def start(self) -> EmbeddedPACS:
        from pynetdicom import AE, StoragePresentationContexts, evt

        self.folder.mkdir(parents=True, exist_ok=True)

        def on_store(event: Any) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            uid = str(ds.SOPInstanceUID)
            if not all(c.isdigit() or c == "." for c in uid):
                return 0xC000
            path = self.folder / f"{uid}.dcm"
            ds.save_as(path, enforce_file_format=True)
            self.received.append(path)
            return 0x0000

        ae = AE(ae_title=DEMO_PACS_AE)
        ae.supported_contexts = StoragePresentationContexts
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, on_store)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()


def _send(paths: list[Path], host: str, port: int, called_ae: str) -> int:
    from pydicom import dcmread
    from pydicom.uid import CTImageStorage, MRImageStorage
    from pynetdicom import AE

    ae = AE(ae_title=DEMO_CALLER)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise RuntimeError(f"our own SCP at {host}:{port} refused the demo association")
    ok = 0
    try:
        for p in paths:
            status = assoc.send_c_store(dcmread(p))
            ok += int(getattr(status, "Status", -1) == 0)
    finally:
        assoc.release()
    return ok


def _quiet_logs(settings: Settings) -> None:
    """The demo prints its own story; the services log warnings only (unless DEBUG was asked for)."""
    import logging

    if settings.log_level != "DEBUG":
        logging.getLogger("specgate").setLevel(logging.WARNING)
        logging.getLogger("kombu").setLevel(logging.ERROR)
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _demo_settings(settings: Settings, pacs_port: int) -> Settings:
    """``settings`` plus the demo's caller and PACS, a free SCP port and short waits."""
    scp_port = settings.scp_port if _port_free(settings.scp_host, settings.scp_port) else _free_port()
    return settings.model_copy(update={
        "allowed_callers": [*settings.allowed_callers, AllowedCaller(ae_title=DEMO_CALLER, host="127.0.0.1")],
        "destinations": [Destination(name="demo-pacs", ae_title=DEMO_PACS_AE, host="127.0.0.1", port=pacs_port)],
        "study_quiet_seconds": min(settings.study_quiet_seconds, 3.0),
        "scp_port": scp_port,
        "reconcile_interval_seconds": min(settings.reconcile_interval_seconds, 10.0),
    })


def _worker_env(s: Settings) -> dict[str, str]:
    """The environment of the ``specgate worker`` child: this process's, with the demo's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECGATE_")}
    env.update({
        "SPECGATE_DATA_DIR": str(s.data_dir.resolve()),
        "SPECGATE_DATABASE_URL": s.db_url,
        "SPECGATE_DESTINATIONS": ",".join(str(d) for d in s.destinations),
        "SPECGATE_LOG_LEVEL": "WARNING",
        # the jobs name these rules, and the rules these models: the worker must know the same ones
        "SPECGATE_RULES": json.dumps([r.model_dump(mode="json") for r in s.rules]),
        "SPECGATE_MODELS": json.dumps({n: m.model_dump(mode="json") for n, m in s.models.items()}),
    })
    for name in ("broker_url", "model_weights", "model_bank", "inference_block", "inference_overlap",
                 "inference_spacing"):
        value = getattr(s, name)
        if value is not None:
            env[f"SPECGATE_{name.upper()}"] = str(value)
    return env


class _WorkerProcess:
    """``specgate worker`` in a child process (its own session, so its pool stops with it), logging to a file."""

    def __init__(self, s: Settings) -> None:
        self.log_path = s.data_dir / "demo-worker.log"
        self._env = _worker_env(s)
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> subprocess.Popen[bytes]:
        with open(self.log_path, "ab") as log_file:  # the child keeps its own descriptor
            self._proc = subprocess.Popen([sys.executable, "-m", "specgate", "worker"], env=self._env,
                                          stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        return self._proc

    def __exit__(self, *exc: object) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _send_studies(s: Settings, echo: Callable[[str], None]) -> Studies:
    """Write the demo studies and C-STORE them to our own SCP."""
    from model.data.clinical import clinical_case

    from .synthetic import write_series

    studies: Studies = {}
    with tempfile.TemporaryDirectory(prefix="specgate-demo-") as tmp:
        for label, kind, desc, geometry in _demo_studies():
            # Fixed cases (new UIDs each run) that the shipped model scores well below / far above tau
            # (see DEMO_STUDIES), so the demo tells the same story every time.
            case, _ = clinical_case(kind, 0, 10_001, geometry=geometry)
            series = write_series(case.image, case.spacing, case.modality, Path(tmp) / label,
                                  series_description=desc, patient_id=f"DEMO-{label.upper()}")
            studies[series.study_instance_uid] = (label, desc, len(series.paths))
            n = _send(series.paths, "127.0.0.1", s.scp_port, s.scp_ae_title)
            echo(f"  sent    {desc}: {n}/{len(series.paths)} slices stored by C-STORE")
    return studies


def _wait_for_jobs(sessions: sessionmaker[Session], studies: Studies, worker: subprocess.Popen[bytes], *,
                   stop: threading.Event, timeout_s: float, log_path: Path, echo: Callable[[str], None]) -> int | None:
    """Print each job's state as it changes until every study's job has ended; None then, else an exit status."""
    from sqlalchemy import select

    from ledger.schema import Job, Study

    deadline = time.monotonic() + timeout_s
    seen: dict[str, str] = {}
    while time.monotonic() < deadline and not stop.is_set():
        with sessions() as db:
            rows = db.execute(select(Study.study_instance_uid, Job.id, Job.state).join(Job)
                              .where(Study.study_instance_uid.in_(list(studies)))).all()
        for uid, job_id, state in rows:
            key = f"{uid}:{job_id}"
            if seen.get(key) != str(state):
                seen[key] = str(state)
                echo(f"  job {job_id:>4}  {studies[uid][1]:<32} {state}")
        done = {uid for uid, _, state in rows if str(state) in TERMINAL_FOR_DEMO - {"released"}}
        if len(done) == len(studies):
            break
        if worker.poll() is not None:
            echo(f"the worker exited with status {worker.returncode}; see {log_path}")
            return 1
        stop.wait(0.5)  # a poll of the ledger; SIGTERM ends the wait at once
    else:
        if not stop.is_set():
            echo(f"timed out after {timeout_s:.0f} s; jobs so far: {seen}")
            return 1
    if stop.is_set():
        echo("stopped")
        return 130
    return None


def _report(sessions: sessionmaker[Session], studies: Studies, pacs: EmbeddedPACS,
            echo: Callable[[str], None], data_dir: Path) -> None:
    """What became of each study: its job's state, the gate's numbers, where the SEG went or what to do."""
    from sqlalchemy import select

    from ledger.paths import from_ledger
    from ledger.schema import Job, Result, Study

    echo("")
    echo("what happened:")
    with sessions() as db:
        for uid, (_label, desc, _) in studies.items():
            job = db.execute(select(Job).join(Study).where(Study.study_instance_uid == str(uid))
                             .order_by(Job.version.desc())).scalars().first()
            if job is None:
                echo(f"  {desc}: no job (no series matched the rules)")
                continue
            res = db.execute(select(Result).where(Result.job_id == job.id)).scalar_one_or_none()
            gate = "" if res is None else (f"OODM {res.oodm:.4f} {'>' if res.is_ood else '<='} tau {res.tau:.4f}")
            echo(f"  {desc}: job {job.id} {job.state}  {gate}")
            if str(job.state) == "sent" and res is not None:
                echo(f"    DICOM-SEG {res.seg_sop_instance_uid} delivered to demo-pacs: "
                     f"{pacs.folder / (res.seg_sop_instance_uid + '.dcm')}")
                if res.sr_sop_instance_uid:
                    echo(f"    with its evidence (DICOM SR, TID 1500): "
                         f"{pacs.folder / (res.sr_sop_instance_uid + '.dcm')}")
            elif str(job.state) == "held" and res is not None:
                echo("    held for review: the gate says this study is unlike the training data.")
                preview = from_ledger(res.seg_path, data_dir).parent / "preview.png"
                echo(f"    review it:  specgate jobs show {job.id}   (preview: {preview})")
                echo(f"    then:       specgate jobs approve {job.id} --user NAME   or   "
                     f"specgate jobs reject {job.id} --user NAME --reason TEXT")
                echo("    or in a browser: specgate users add NAME --role radiologist, then specgate review "
                     f"and open /studies/{job.id}")
            elif job.reason_code:
                echo(f"    reason: {job.reason_code}: {job.reason_detail or ''}")


def run_demo(settings: Settings, *, echo: Callable[[str], None] = print, timeout_s: float = 900.0) -> int:
    """Start the services, send the demo studies, wait for their jobs and tell what happened; the exit status."""
    from dicom_node.assembler import Assembler
    from dicom_node.scp import StoreSCP
    from ledger import migrations
    from ledger.db import open_engine, sessionmaker_for
    from worker.celery_app import Enqueuer, make_celery

    _quiet_logs(settings)
    pacs_port = _free_port()
    s = _demo_settings(settings, pacs_port)
    s.data_dir.mkdir(parents=True, exist_ok=True)
    echo(f"specgate demo: data in {s.data_dir.resolve()}")
    echo(f"  ledger  {s.db_url}")
    migrations.upgrade(s.db_url)
    stop = threading.Event()
    with contextlib.ExitStack() as services:
        engine = open_engine(s.db_url)
        services.callback(engine.dispose)
        sessions = sessionmaker_for(engine)
        enqueuer = Enqueuer(make_celery(s.worker_config()), sessions)
        pacs = EmbeddedPACS(s.data_dir / "demo-pacs", pacs_port).start()
        services.callback(pacs.stop)
        echo(f"  PACS    embedded receiver {DEMO_PACS_AE}@127.0.0.1:{pacs_port} -> {pacs.folder}")
        services.callback(StoreSCP(s.node_config(), sessions).start().stop)
        services.callback(Assembler(s.assembly_config(), sessions, on_job_queued=enqueuer.segment).start().stop)
        echo(f"  SCP     {s.scp_ae_title}@{s.scp_host}:{s.scp_port} (quiet period {s.study_quiet_seconds:g} s)")
        worker_process = _WorkerProcess(s)
        worker = services.enter_context(worker_process)
        echo(f"  worker  pid {worker.pid} (CPU; log {worker_process.log_path})")
        services.callback(signal.signal, signal.SIGTERM, signal.signal(signal.SIGTERM, lambda *_: stop.set()))
        try:
            studies = _send_studies(s, echo)
            echo("waiting for the quiet period, segmentation and the gate (CPU; a minute or two)...")
            status = _wait_for_jobs(sessions, studies, worker, stop=stop, timeout_s=timeout_s,
                                    log_path=worker_process.log_path, echo=echo)
            if status is not None:
                return status
            _report(sessions, studies, pacs, echo, s.data_dir)
            echo(f"audit trail: `specgate audit verify`; all jobs: `specgate jobs list` (data dir {s.data_dir})")
            return 0
        except KeyboardInterrupt:
            echo("\ninterrupted; stopping")
            return 130
