"""Screenshots of the review app for the README: the queue, a held study, the reports page and the Shadow tab.

    .venv/bin/python docs/screenshots.py              # writes docs/review-{queue,study,reports,shadow}.png
    .venv/bin/python docs/screenshots.py --out /tmp   # somewhere else

Builds a throw-away ledger (SQLite, in a temporary folder) the way a reading room would see it:

* six held studies, each run through the real pipeline with the shipped model (so every image, overlay,
  OODM and histogram on the pages is what the product computes): a prostate MR blurred by patient motion
  (sigma 2 voxels, which the model segments badly and the gate holds; ``docs/evidence.md``), two head MRs
  (an organ the model never saw), two PET scans (a modality it never saw) and a CT with a metal artefact,
  from different scanners (calling AE, station name), back-dated so they have waited 9 minutes to
  a day;
* two weeks of history seeded directly as ledger rows (studies, instances, jobs, results, reviews by three
  radiologists, deliveries to two destinations with a few retries and failures, failed jobs, and the
  audit events the report views read), so the reports have something to show;
* beside a third of the CT studies, a shadow model (silent mode, ``ledger.shadow``) with its own result, its
  gate mostly agreeing with the live one, and the DSC of the two masks, for the Shadow tab and the
  side-by-side report.

The held studies run in a scratch ledger; their rows and audit events are copied into the screenshot
ledger moved into the past, and every audit event is appended in time order with its hash chained, so
``specgate audit verify`` passes on it (checked before capturing).

Then serves the real app (uvicorn, as the tests do) and captures the pages in Debian's headless Chromium
(tests/browser.py) at a reading-room size, 1600 x 1000. Takes a few minutes on two cores.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pydicom import dcmread  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from sqlalchemy import insert, select  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from dicom_node.config import SeriesRule  # noqa: E402
from ledger import audit, jobs, migrations  # noqa: E402
from ledger.db import open_engine, session_scope, sessionmaker_for  # noqa: E402
from ledger.paths import to_ledger  # noqa: E402
from ledger.schema import (  # noqa: E402
    AuditEvent,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Result,
    Review,
    ReviewDecision,
    Series,
    ShadowComparison,
    Study,
)
from review.app import ReviewActions  # noqa: E402
from review.auth import add_user  # noqa: E402
from specgate.settings import Settings  # noqa: E402
from specgate.synthetic import write_series  # noqa: E402

PASSWORD = "screenshots only, never a real one"
RADIOLOGISTS = (("dr.berg", "Dr. Anna Berg"), ("dr.okafor", "Dr. Chidi Okafor"), ("dr.lindqvist", "Dr. Sara Lindqvist"))
ADMIN = ("pacs.admin", "PACS administrator")
VIEWER_URL = "https://pacs.example.org/viewer?StudyInstanceUIDs={study_instance_uid}"
WIDTH, HEIGHT = 1600, 1000


@dataclass(frozen=True)
class Source:
    """A scanner that sends studies: its AE title and station name, what it sends, how often."""

    calling_ae: str
    station: str
    modality: str
    body_part: str
    description: str
    per_day: float
    ood_rate: float
    slices: tuple[int, int]
    kb_per_slice: int
    hours: tuple[float, float] = (7.0, 19.5)  # UTC hours it scans between


SOURCES = (
    Source("CT_ER_1", "SOMATOM-FORCE", "CT", "ABDOMEN", "CT ABD/PELVIS PORTAL VENOUS", 9, 0.04, (180, 320), 514,
           (0.0, 24.0)),
    Source("CT_MAIN", "REVOLUTION-CT", "CT", "CHEST", "CT THORAX 1.25 MM", 7, 0.05, (220, 300), 514),
    Source("MR_3T_A", "PRISMA-3T", "MR", "PROSTATE", "T2 TSE AX PROSTATE", 4, 0.14, (40, 70), 162),
    Source("MR_15T", "AVANTO-15T", "MR", "HEAD", "T1 MPRAGE SAG", 2, 0.9, (120, 176), 130),
    Source("PETCT_1", "BIOGRAPH-VISION", "PT", "WHOLEBODY", "PET WB AC", 2, 0.95, (200, 330), 66),
)
BY_AE = {s.calling_ae: s for s in SOURCES}
DESTINATIONS = (("pacs", "PACS_MAIN", "10.20.1.15", 104), ("ai-archive", "AI_ARCHIVE", "10.20.4.31", 11112))


@dataclass(frozen=True)
class HeldCase:
    """One held study made by the real pipeline."""

    name: str
    source: str  # calling AE
    patient: tuple[str, str, str, str]  # name, ID, birth date, sex
    waited: timedelta
    make: Callable[[], tuple[np.ndarray, tuple[float, float, float], str]]


def _clinical(kind: str, index: int, geometry: Any = None) -> Callable[[], tuple[np.ndarray, Any, str]]:
    def make() -> tuple[np.ndarray, Any, str]:
        from model.data.clinical import clinical_case

        case, _ = clinical_case(kind, 2026, index, geometry=geometry)
        return case.image, case.spacing, case.modality

    return make


def _metal_ct() -> tuple[np.ndarray, Any, str]:
    """A liver CT at a clinical grid with a metal implant and its streaks (a crude model of the artefact:
    bright and dark rays around a 3071 HU block): the gate holds it."""
    from model.data.clinical import Geometry, clinical_case

    case, _ = clinical_case("ct_liver", 2026, 1001, geometry=Geometry((72, 512, 512), (2.5, 0.78125, 0.78125),
                                                                       (0.0, 0.0, 0.0)))
    _, y, x = np.ogrid[: case.image.shape[0], :512, :512]
    rays = 500.0 * np.cos(8 * np.arctan2(y - 256, x - 200)) * np.exp(-np.hypot(y - 256, x - 200) / 150.0)
    image = case.image + rays.astype(np.float32)
    image[:, 250:262, 194:206] = 3071.0
    return np.clip(image, -1024.0, 3071.0), case.spacing, "CT"


def _blurred(kind: str, index: int, sigma: float) -> Callable[[], tuple[np.ndarray, Any, str]]:
    """A clinical case blurred (motion, a soft kernel) by a Gaussian of ``sigma`` voxels."""
    from scipy import ndimage

    clear = _clinical(kind, index)

    def make() -> tuple[np.ndarray, Any, str]:
        image, spacing, modality = clear()
        return ndimage.gaussian_filter(image, sigma=sigma, mode="nearest"), spacing, modality

    return make


def _hippocampus(index: int) -> Callable[[], tuple[np.ndarray, Any, str]]:
    from model.data.clinical import Geometry

    return _clinical("mr_hippocampus", index, Geometry((48, 256, 256), (1.5, 0.5, 0.5), (0.0, 0.0, 0.0)))


HELD = (
    HeldCase("prostate", "MR_3T_A", ("NORDMANN^ERIK", "PID-448213", "19570314", "M"), timedelta(minutes=26),
             _blurred("mr_prostate", 1002, 2.0)),
    HeldCase("pet-1", "PETCT_1", ("OKONKWO^GRACE", "PID-501177", "19660921", "F"), timedelta(minutes=9),
             _clinical("pt_tumour", 1000)),
    HeldCase("head-1", "MR_15T", ("SILVA^MARTA", "PID-390561", "19880402", "F"), timedelta(hours=2, minutes=12),
             _hippocampus(1000)),
    HeldCase("metal-ct", "CT_ER_1", ("BRANDT^HANS", "PID-277340", "19490730", "M"), timedelta(minutes=47),
             _metal_ct),
    HeldCase("pet-2", "PETCT_1", ("HASSAN^LEILA", "PID-512904", "19710105", "F"), timedelta(hours=5, minutes=38),
             _clinical("pt_tumour", 1002)),
    HeldCase("head-2", "MR_15T", ("KOWALSKI^PIOTR", "PID-366018", "19930618", "M"), timedelta(days=1, hours=2),
             _hippocampus(1001)),
)
STUDY_PAGE = "prostate"  # the study shown in review-study.png


def open_ledger(root: Path, name: str) -> tuple[Settings, sessionmaker[Session]]:
    """A migrated SQLite ledger ``root/name``; every ledger of the run shares the data folder."""
    settings = Settings.load(data_dir=root / "data", database_url=f"sqlite:///{root / name}",
                             rules=[SeriesRule(name="default-ct-mr"), SeriesRule(name="pet", modalities=("PT",))],
                             review_viewer_url=VIEWER_URL)
    migrations.upgrade(settings.db_url)
    return settings, sessionmaker_for(open_engine(settings.db_url))


def ingest(sessions: sessionmaker[Session], folder: Path, source: Source, rule: str, data_dir: Path) -> int:
    """Record a written series as the SCP and the assembler do (study, series, instances, a queued job;
    the spool paths relative to ``data_dir``)."""
    paths = sorted(folder.glob("*.dcm"))
    first = dcmread(paths[0], stop_before_pixels=True)
    with session_scope(sessions) as s:
        study = Study(study_instance_uid=first.StudyInstanceUID, calling_ae=source.calling_ae,
                      received_count=len(paths), assembled_count=len(paths))
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_instance_uid=first.SeriesInstanceUID, modality=source.modality,
                        body_part=source.body_part, series_description=source.description,
                        station_name=source.station)
        s.add(series)
        s.flush()
        for p in paths:
            ds = dcmread(p, stop_before_pixels=True)
            s.add(Instance(series_id=series.id, sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                           transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                           spool_path=to_ledger(p, data_dir),
                           size_bytes=p.stat().st_size, sha256=hashlib.sha256(p.read_bytes()).hexdigest(),
                           calling_ae=source.calling_ae))
        return jobs.create_job(s, study, actor="assembler", series_instance_uid=series.series_instance_uid,
                               rule_name=rule).id


def run_held(settings: Settings, sessions: sessionmaker[Session]) -> dict[str, int]:
    """Each of HELD through the real pipeline with the shipped model; their job ids by name."""
    from worker.model_runtime import Segmenters
    from worker.pipeline import claim, run_job

    config = settings.worker_config()
    segmenters = Segmenters(config.models, config.inference)
    out = {}
    for case in HELD:
        t0 = time.perf_counter()
        source = BY_AE[case.source]
        image, spacing, modality = case.make()
        name, pid, born, sex = case.patient
        folder = settings.spool_dir / "screenshots" / case.name
        write_series(image, spacing, modality, folder, patient_name=name, patient_id=pid,
                     series_description=source.description, body_part=source.body_part)
        _patient_details(folder, born, sex)
        job_id = ingest(sessions, folder, source, "pet" if modality == "PT" else "default-ct-mr",
                        settings.data_dir)
        c = claim(sessions, job_id, task_id=f"screenshots-{case.name}", worker_id="screenshots", stale_after_s=600)
        assert c is not None
        run_job(sessions, c, config.pipeline, segmenters=segmenters)
        with session_scope(sessions) as s:
            job = s.get(Job, job_id)
            result = s.execute(select(Result).where(Result.job_id == job_id)).scalar_one()
            assert job is not None
            if job.state != JobState.HELD:
                raise SystemExit(f"{case.name}: the shipped model did not hold it ({job.state}, OODM "
                                 f"{result.oodm:.4f}, tau {result.tau:.4f}); pick another case")
        print(f"  {case.name:12} {modality} {image.shape}: held, OODM/tau {result.oodm / result.tau:.2f} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
        out[case.name] = job_id
    return out


def _patient_details(folder: Path, born: str, sex: str) -> None:
    """Birth date, sex and an accession number in every file, as a modality would send them."""
    accession = f"ACC{int(hashlib.sha256(str(folder).encode()).hexdigest()[:7], 16) % 10_000_000:07d}"
    for p in folder.glob("*.dcm"):
        ds = dcmread(p)
        ds.PatientBirthDate, ds.PatientSex, ds.AccessionNumber = born, sex, accession
        ds.save_as(p)


def copy_held(scratch: sessionmaker[Session], target: sessionmaker[Session], waited: dict[int, timedelta],
              events: list[dict[str, Any]]) -> None:
    """Copy the scratch ledger's rows (only the held studies are there) into the target with their ids,
    every timestamp moved ``waited[study_id]`` into the past; their audit events go to ``events``."""
    tables: tuple[Any, ...] = (Study, Series, Instance, Job, Result)
    with session_scope(scratch) as s:
        series_study = dict(s.execute(select(Series.id, Series.study_id)).all())
        job_study = dict(s.execute(select(Job.id, Job.study_id)).all())
        result_job = dict(s.execute(select(Result.id, Result.job_id)).all())
        owner: dict[Any, Callable[[dict[str, Any]], int]] = {
            Study: lambda r: r["id"], Series: lambda r: r["study_id"],
            Instance: lambda r: series_study[r["series_id"]], Job: lambda r: r["study_id"],
            Result: lambda r: job_study[r["job_id"]]}
        rows: dict[Any, list[dict[str, Any]]] = {}
        for table in tables:
            rows[table] = []
            for obj in s.execute(select(table).order_by(table.id)).scalars():
                row = {c.key: getattr(obj, c.key) for c in table.__table__.columns}
                by = waited[owner[table](row)]
                rows[table].append({k: v - by if isinstance(v, datetime) else v for k, v in row.items()})
        for ev in s.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars():
            study_id = None
            if ev.object_type == "job":
                study_id = job_study.get(int(ev.object_id))
            elif ev.object_type == "result" and int(ev.object_id) in result_job:
                study_id = job_study.get(result_job[int(ev.object_id)])
            by = waited[study_id] if study_id is not None else timedelta(0)
            events.append({"ts": ev.ts - by, "actor": ev.actor, "action": ev.action, "object_type": ev.object_type,
                           "object_id": ev.object_id, "details": dict(ev.details)})
    with session_scope(target) as t:
        for table in tables:
            t.execute(insert(table), rows[table])


def seed_history(sessions: sessionmaker[Session], *, days: int, now: datetime, rng: np.random.Generator,
                 template: Result, events: list[dict[str, Any]]) -> None:
    """Two weeks of finished studies as ledger rows: received, segmented, released or held and decided,
    delivered (or failed); the audit events the report views read go to ``events``."""
    reasons = [("segmentation_wrong", "misses the left lobe"), ("wrong_anatomy", "head MR, no target organ"),
               ("image_quality", "motion on most slices"), ("artefact", "hip prosthesis"),
               ("wrong_anatomy", ""), ("not_indicated", "")]
    instances: list[dict[str, Any]] = []
    start = (now - timedelta(days=days)).replace(hour=0, minute=0, second=0, microsecond=0)
    plan = []  # (source, received): drawn first, so the day's counts do not depend on the studies' draws
    for day in range(days + 1):
        midnight = start + timedelta(days=day)
        for src in SOURCES:
            n = int(rng.poisson(src.per_day * (0.5 if midnight.weekday() >= 5 else 1.0)))
            plan += [(src, midnight + timedelta(hours=float(h))) for h in rng.uniform(*src.hours, size=n)]
    with session_scope(sessions) as s:
        for src, received in sorted(plan, key=lambda p: p[1]):
            if received < now - timedelta(minutes=20):
                _seed_study(s, src, received, now, rng, template, reasons, events, instances)
        s.execute(insert(Instance), instances)


def seed_shadow(sessions: sessionmaker[Session], *, rng: np.random.Generator, model: str = "liver-ct-v2") -> int:
    """A shadow job beside a third of the seeded CT results, as the worker leaves one: its result (its gate
    agreeing with the live one nine times in ten) and its comparison (DSC mostly high). Returns how many."""
    made = 0
    with session_scope(sessions) as s:
        live = s.execute(select(Job, Result).join(Result, Result.job_id == Job.id).join(Study)
                         .where(Study.calling_ae.in_([src.calling_ae for src in SOURCES if src.modality == "CT"]))
                         .order_by(Job.id)).all()
        for job, result in live:
            if rng.random() > 1 / 3:
                continue
            is_ood = bool(result.is_ood) != bool(rng.random() < 0.1)
            shadow = Job(study_id=job.study_id, version=job.version, state=JobState.HELD if is_ood else JobState.RELEASED,
                         series_instance_uid=job.series_instance_uid, rule_name="ct-v2", model_name=model,
                         attempts=1, shadow=True, shadow_of_id=job.id, created_at=job.created_at,
                         updated_at=job.updated_at)
            s.add(shadow)
            s.flush()
            oodm = float(result.tau) * float(rng.uniform(1.1, 2.0) if is_ood else rng.uniform(0.3, 0.95))
            s.add(Result(job_id=shadow.id, seg_path=f"{result.seg_path}.shadow", seg_sop_instance_uid=generate_uid(),
                         seg_series_instance_uid=generate_uid(), oodm=oodm, tau=result.tau, is_ood=is_ood,
                         model_id=f"{model}:2.0.0", weights_sha256="5e" * 32, created_at=result.created_at))
            s.add(ShadowComparison(shadow_job_id=shadow.id, live_job_id=job.id, dsc=float(1 - rng.beta(1.2, 14)),
                                   shadow_voxels=int(rng.integers(40_000, 90_000)),
                                   live_voxels=int(rng.integers(40_000, 90_000)), computed_at=result.created_at))
            made += 1
    return made


def _seed_study(s: Session, src: Source, received: datetime, now: datetime, rng: np.random.Generator,
                template: Result, reasons: list[tuple[str, str]], events: list[dict[str, Any]],
                instances: list[dict[str, Any]]) -> None:
    n = int(rng.integers(*src.slices))
    last = received + timedelta(seconds=n * float(rng.uniform(0.08, 0.25)))
    study = Study(study_instance_uid=generate_uid(), calling_ae=src.calling_ae, first_received_at=received,
                  last_received_at=last, assembled_at=last + timedelta(seconds=60), received_count=n,
                  assembled_count=n)
    s.add(study)
    s.flush()
    series = Series(study_id=study.id, series_instance_uid=generate_uid(), modality=src.modality,
                    body_part=src.body_part, series_description=src.description, station_name=src.station)
    s.add(series)
    s.flush()
    sop_class = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
                 "PT": "1.2.840.10008.5.1.4.1.1.128"}[src.modality]
    step = (last - received) / max(n - 1, 1)
    for i in range(n):
        instances.append({"series_id": series.id, "sop_instance_uid": generate_uid(),
                          "sop_class_uid": sop_class, "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                          "spool_path": f"spool/{study.id}/{i + 1}.dcm",
                          "size_bytes": src.kb_per_slice * 1024 + int(rng.integers(0, 2048)), "sha256": "0" * 64,
                          "calling_ae": src.calling_ae, "received_at": received + step * i})
    created = last + timedelta(seconds=60)
    job = Job(study_id=study.id, version=1, state=JobState.QUEUED, series_instance_uid=series.series_instance_uid,
              rule_name="pet" if src.modality == "PT" else "default-ct-mr", attempts=1, created_at=created,
              updated_at=created)
    s.add(job)
    s.flush()
    events.append({"ts": created, "actor": "assembler", "action": "job.created", "object_type": "job",
                   "object_id": job.id, "details": {"study_id": study.id, "version": 1}})
    if rng.random() < 0.015:  # a series the pipeline cannot use
        job.state, job.reason_code = JobState.FAILED, str(rng.choice(["missing_slices", "attempts_exhausted"]))
        job.updated_at = job.finished_at = created + timedelta(seconds=float(rng.uniform(5, 400)))
        events.append({"ts": job.updated_at, "actor": "worker", "action": "job.failed", "object_type": "job",
                       "object_id": job.id, "details": {"reason_code": job.reason_code}})
        return
    done = created + timedelta(seconds=float(rng.uniform(25, 140) * (2.0 if src.modality == "CT" else 1.0)))
    # the last hours' held studies are the real ones (they have images): the seeded ones were all released
    ood = bool(rng.random() < src.ood_rate) and received < now - timedelta(hours=10)
    ratio = float(rng.uniform(1.05, 7.0) if ood else rng.uniform(0.15, 0.95))
    result = Result(job_id=job.id, seg_path="results/seg.dcm", seg_sop_instance_uid=generate_uid(),
                    seg_series_instance_uid=generate_uid(), oodm=template.tau * ratio, tau=template.tau, is_ood=ood,
                    model_id=template.model_id, weights_sha256=template.weights_sha256,
                    bank_percentile=100.0 if ood else float(min(99.0, ratio * 100)), created_at=done)
    s.add(result)
    s.flush()
    job.state = JobState.HELD if ood else JobState.RELEASED
    events.append({"ts": done, "actor": "worker", "action": f"job.{job.state}", "object_type": "job",
                   "object_id": job.id})
    send_at = done + timedelta(seconds=float(rng.uniform(1.5, 9.0)))
    if ood:
        decided = min(done + timedelta(minutes=float(rng.lognormal(np.log(70), 0.8))), now - timedelta(minutes=5))
        user = RADIOLOGISTS[int(rng.integers(len(RADIOLOGISTS)))][0]
        approve = rng.random() < (0.3 if src.body_part == "HEAD" or src.modality == "PT" else 0.7)
        code, note = reasons[int(rng.integers(len(reasons)))]
        reason = None if approve else (f"{code}: {note}" if note else code)
        decision = ReviewDecision.APPROVE if approve else ReviewDecision.REJECT
        s.add(Review(job_id=job.id, username=user, decision=decision, reason=reason, created_at=decided))
        events.append({"ts": decided, "actor": f"user:{user}", "action": f"review.{decision}",
                       "object_type": "job", "object_id": job.id, "details": {"reason": reason}})
        job.state = JobState.APPROVED if approve else JobState.REJECTED
        job.updated_at = decided
        if not approve:
            return
        send_at = decided + timedelta(seconds=float(rng.uniform(2.0, 12.0)))
    failed = False
    for name, ae, host, port in DESTINATIONS:
        d = Delivery(job_id=job.id, result_id=result.id, destination=name, ae_title=ae, host=host, port=port,
                     state=DeliveryState.SENT, attempts=1, last_status=0, created_at=send_at, updated_at=send_at,
                     sent_at=send_at)
        luck = rng.random()
        if name == "ai-archive" and luck < 0.02:  # the archive refuses: out of resources, three times
            d.state, d.attempts, d.last_status, d.sent_at = DeliveryState.FAILED, 3, 0xA700, None
            d.last_error, failed = "C-STORE status 0xA700", True
        elif luck < 0.06:  # through on the second attempt
            d.attempts, d.sent_at = 2, send_at + timedelta(seconds=float(rng.uniform(2, 30)))
            d.updated_at = d.sent_at
            d.last_error = "could not connect to 10.20.1.15:104 (connection refused)" if name == "pacs" else None
        s.add(d)
    job.state = JobState.FAILED if failed else JobState.SENT
    job.reason_code = "delivery_failed" if failed else None
    job.updated_at = job.finished_at = send_at + timedelta(seconds=40 if failed else 3)
    events.append({"ts": job.updated_at, "actor": "worker", "action": f"job.{job.state}", "object_type": "job",
                   "object_id": job.id})


def _utc(ts: datetime) -> datetime:
    """SQLite hands back naive datetimes; the ledger writes UTC."""
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def write_events(sessions: sessionmaker[Session], events: list[dict[str, Any]]) -> None:
    """Append ``events`` to the (empty) audit trail in time order, each chained to the one before as
    :func:`ledger.audit.append` chains them; then verify the chain as ``specgate audit verify`` does."""
    rows = []
    prev = audit.GENESIS_HASH
    for e in sorted(events, key=lambda e: _utc(e["ts"])):
        row = {"ts": e["ts"], "actor": e["actor"], "action": e["action"], "object_type": e["object_type"],
               "object_id": str(e["object_id"]), "details": e.get("details") or {}, "prev_hash": prev}
        row["hash"] = prev = audit.event_hash(ts=row["ts"], actor=row["actor"], action=row["action"],
                                              object_type=row["object_type"], object_id=row["object_id"],
                                              details=row["details"], prev_hash=row["prev_hash"])
        rows.append(row)
    with session_scope(sessions) as s:
        if audit.count(s):
            raise RuntimeError("write_events needs an empty audit trail")
        s.execute(insert(AuditEvent), rows)
    with session_scope(sessions) as s:
        check = audit.verify(s)
        if not check.ok:
            raise SystemExit(f"the seeded audit chain does not verify: {check}")


def capture(url: str, out: Path, job_id: int) -> list[Path]:
    from selenium.webdriver.common.by import By

    from tests.browser import chromium, sign_in, wait

    written = []
    driver = chromium(WIDTH, HEIGHT)
    try:
        sign_in(driver, url, RADIOLOGISTS[0][0], PASSWORD)
        driver.get(url + "/queue")
        written.append(_shot(driver, out / "review-queue.png"))
        driver.get(f"{url}/studies/{job_id}")
        wait(driver, 60).until(lambda d: d.execute_script(
            "var i = document.getElementById('slice'); return i && i.complete && i.naturalWidth > 0;"))
        wait(driver).until(lambda d: d.find_elements(By.ID, "bank-histogram"))
        written.append(_shot(driver, out / "review-study.png"))
        driver.delete_all_cookies()
        sign_in(driver, url, ADMIN[0], PASSWORD)
        driver.get(url + "/reports")
        written.append(_shot(driver, out / "review-reports.png"))
        driver.get(url + "/shadow")
        written.append(_shot(driver, out / "review-shadow.png"))
    finally:
        driver.quit()
    return written


def _shot(driver: Any, path: Path) -> Path:
    """The viewport as PNG (cut at the page's end when the page is shorter), in a 256-colour palette: the
    UI is flat colours, and the images keep their look at a third of the size."""
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    bottom = int(driver.execute_script("return Math.ceil(document.body.getBoundingClientRect().bottom);"))
    if bottom < img.height:  # a short page: no empty band below it
        img = img.crop((0, 0, img.width, bottom))
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"  {path} ({path.stat().st_size // 1024} KB)", flush=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "docs", help="folder for the PNGs (default: docs/)")
    ap.add_argument("--days", type=int, default=14, help="days of seeded history for the reports")
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args()
    from tests.integration.review.helpers import ReviewServer

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="specgate-screenshots-") as tmp:
        root = Path(tmp)
        # the held studies run in a scratch ledger first: the services stamp "now" on every row and audit
        # event, and the audit trail is append-only, so the screenshot ledger is then written in time order
        settings, scratch = open_ledger(root, "scratch.db")
        print("held studies, through the real pipeline with the shipped model:", flush=True)
        held = run_held(settings, scratch)
        settings, sessions = open_ledger(root, "ledger.db")
        with session_scope(scratch) as s:
            template = s.execute(select(Result).where(Result.job_id == held[STUDY_PAGE])).scalar_one()
            s.expunge(template)
            study_of = dict(s.execute(select(Job.id, Job.study_id)).all())
        events: list[dict[str, Any]] = []
        copy_held(scratch, sessions, {study_of[held[c.name]]: c.waited for c in HELD}, events)
        print(f"seeding {args.days} days of history ...", flush=True)
        seed_history(sessions, days=args.days, now=datetime.now(UTC), rng=np.random.default_rng(args.seed),
                     template=template, events=events)
        write_events(sessions, events)
        print(f"shadow model beside {seed_shadow(sessions, rng=np.random.default_rng(args.seed + 1))} CT studies",
              flush=True)
        with session_scope(sessions) as s:
            for name, display in RADIOLOGISTS:
                add_user(s, name, role="radiologist", password=PASSWORD, actor="screenshots", display_name=display)
            add_user(s, ADMIN[0], role="admin", password=PASSWORD, actor="screenshots", display_name=ADMIN[1])
        print("capturing:", flush=True)
        with ReviewServer(settings.review_config(), sessions, ReviewActions(deliver=lambda job_id: None)) as srv:
            capture(srv.url, args.out, held[STUDY_PAGE])


if __name__ == "__main__":
    main()
