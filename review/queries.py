"""What the review pages show, read from the ledger (and, for the patient banner, from the spool).

The queue is one SQL query over held jobs with their study, series and result, oldest first, so a queue
of a thousand held studies is one round trip. Patient name and ID are never stored in the ledger; the
study page reads them from the first stored instance of the series, and they go nowhere else.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from ledger.schema import (
    AuditEvent,
    Delivery,
    Instance,
    Job,
    JobState,
    Result,
    Retraction,
    Review,
    Series,
    Study,
    utcnow,
)
from store import Store, StoreError, as_store

from .auth import aware

log = logging.getLogger("specgate.review")

__all__ = ["REJECT_REASONS", "QueueFilter", "QueueRow", "StudyView", "image_files", "queue", "queue_facets",
           "series_paths", "study_view"]

# The fixed list a rejection picks from (the free text adds detail). Kept short, as a reading room uses it.
REJECT_REASONS: dict[str, str] = {
    "segmentation_wrong": "Segmentation is wrong",
    "wrong_anatomy": "Wrong anatomy or series for this model",
    "image_quality": "Image quality too poor to judge",
    "artefact": "Artefact (metal, motion) misleads the model",
    "not_indicated": "Result not clinically needed",
    "other": "Other (say why in the note)",
}


@dataclass(frozen=True)
class QueueFilter:
    modality: str | None = None
    calling_ae: str | None = None
    min_age_h: float | None = None
    max_age_h: float | None = None
    limit: int = 500


@dataclass(frozen=True)
class QueueRow:
    job_id: int
    version: int
    held_at: datetime
    age_s: float
    modality: str | None
    body_part: str | None
    series_description: str | None
    calling_ae: str
    station_name: str | None
    model_id: str
    oodm: float
    tau: float
    bank_percentile: float | None

    @property
    def ratio(self) -> float:
        return self.oodm / self.tau if self.tau > 0 else float("inf")


def _held(session: Session, f: QueueFilter) -> Any:
    now = utcnow()
    q = (select(Job.id, Job.version, Job.updated_at, Series.modality, Series.body_part, Series.series_description,
                Study.calling_ae, Series.station_name, Result.model_id, Result.oodm, Result.tau,
                Result.bank_percentile)
         .join(Study, Study.id == Job.study_id)
         .join(Result, Result.job_id == Job.id)
         .outerjoin(Series, Series.series_instance_uid == Job.series_instance_uid)
         .where(Job.state == JobState.HELD, Job.shadow.is_(False)))  # shadow results: never reviewed
    if f.modality:
        q = q.where(func.upper(Series.modality) == f.modality.upper())
    if f.calling_ae:
        q = q.where(Study.calling_ae == f.calling_ae)
    if f.min_age_h is not None:
        q = q.where(Job.updated_at <= now - timedelta(hours=f.min_age_h))
    if f.max_age_h is not None:
        q = q.where(Job.updated_at >= now - timedelta(hours=f.max_age_h))
    return q, now


def queue(session: Session, f: QueueFilter) -> tuple[list[QueueRow], int]:
    """Held results matching ``f``, oldest first (at most ``f.limit``), and how many match in all."""
    q, now = _held(session, f)
    total = session.execute(select(func.count()).select_from(q.subquery())).scalar_one()
    rows = []
    for r in session.execute(q.order_by(Job.updated_at, Job.id).limit(f.limit)):
        held_at = aware(r.updated_at)
        rows.append(QueueRow(job_id=r.id, version=r.version, held_at=held_at, age_s=(now - held_at).total_seconds(),
                             modality=r.modality, body_part=r.body_part, series_description=r.series_description,
                             calling_ae=r.calling_ae, station_name=r.station_name, model_id=r.model_id,
                             oodm=float(r.oodm), tau=float(r.tau), bank_percentile=r.bank_percentile))
    return rows, int(total)


def queue_facets(session: Session) -> dict[str, list[str]]:
    """The modalities and calling AEs that have held results (the filter menus)."""
    base = (select(Series.modality, Study.calling_ae).select_from(Job).join(Study, Study.id == Job.study_id)
            .outerjoin(Series, Series.series_instance_uid == Job.series_instance_uid)
            .where(Job.state == JobState.HELD, Job.shadow.is_(False)))
    mods, aes = set(), set()
    for m, ae in session.execute(base.distinct()):
        if m:
            mods.add(m)
        aes.add(ae)
    return {"modalities": sorted(mods), "calling_aes": sorted(aes)}


def held_count(session: Session) -> int:
    return int(session.execute(select(func.count()).select_from(Job)
                               .where(Job.state == JobState.HELD, Job.shadow.is_(False))).scalar_one())


@dataclass
class StudyView:
    """Everything the study page shows about one job."""

    job: Job
    study: Study
    series: Series | None
    result: Result | None
    evidence: dict[str, Any]
    series_paths: list[Path]
    reviews: list[Review]
    deliveries: list[Delivery]
    retraction: Retraction | None
    history: list[AuditEvent]
    newer_job_id: int | None
    patient: dict[str, str] = field(default_factory=dict)
    prob_file: Path | None = None  # the kept probability map, resolved against the data directory

    @property
    def held(self) -> bool:
        """Held for a radiologist: a shadow job's result (ledger.shadow) never is (its page is read-only)."""
        return self.job.state == JobState.HELD and not self.job.shadow

    @property
    def decision(self) -> Review | None:
        return self.reviews[-1] if self.reviews else None

    @property
    def held_for(self) -> dict[str, Any] | None:
        """Why a result the gate released was held anyway, from the job's move to ``held`` (worker.pipeline:
        ``incomplete_at_source``, or ``drift_stop`` with its ``drift_alarm_id``); None: held by the gate, or
        not held."""
        for event in reversed(self.history):
            details = event.details or {}
            if event.object_type == "job" and "held_for" in details:
                return details
        return None


def study_view(session: Session, job_id: int, files: Store | Path | None = None) -> StudyView | None:
    """``files``: where the ledger's keys are read from (:mod:`store`; a data directory: ``fs``)."""
    files = as_store(files)
    job = session.get(Job, job_id)
    if job is None:
        return None
    study = session.get(Study, job.study_id)
    assert study is not None
    series = session.execute(select(Series).where(Series.series_instance_uid == job.series_instance_uid)
                             ).scalar_one_or_none()
    result = session.execute(select(Result).where(Result.job_id == job.id)).scalar_one_or_none()
    paths = series_paths(session, job.series_instance_uid, files)
    evidence: dict[str, Any] = {}
    if result is not None and result.evidence_path:
        try:
            evidence = json.loads(files.path(result.evidence_path).read_text())
        except (OSError, ValueError):
            evidence = {}
    reviews = list(session.execute(select(Review).where(Review.job_id == job.id).order_by(Review.id)).scalars())
    deliveries = list(session.execute(select(Delivery).where(Delivery.job_id == job.id)
                                      .order_by(Delivery.id)).scalars())
    retraction = session.execute(select(Retraction).where(Retraction.job_id == job.id)).scalar_one_or_none()
    objects = [("job", str(job.id))] + ([("result", str(result.id))] if result is not None else [])
    history = list(session.execute(
        select(AuditEvent).where(or_(*[(AuditEvent.object_type == t) & (AuditEvent.object_id == i)
                                       for t, i in objects]))
        .order_by(AuditEvent.id).limit(500)).scalars())
    newer = session.execute(select(Job.id).where(Job.study_id == job.study_id, Job.version > job.version,
                                                 Job.shadow.is_(False))
                            .order_by(Job.version.desc()).limit(1)).scalar_one_or_none()
    return StudyView(job=job, study=study, series=series, result=result, evidence=evidence, series_paths=paths,
                     reviews=reviews, deliveries=deliveries, retraction=retraction, history=history,
                     newer_job_id=newer, patient=patient_banner(paths[0]) if paths else {},
                     prob_file=_local(files, result.prob_path) if result is not None and result.prob_path
                     else None)


def _local(files: Store, key: str) -> Path | None:
    try:
        return files.path(key)
    except StoreError as exc:
        log.warning("a kept file cannot be read from the store: %s", exc)
        return None


def series_paths(session: Session, series_instance_uid: str | None, files: Store | Path | None = None) -> list[Path]:
    """The files of a job's series, in the order they were stored, on this host (from the store's cache
    with ``s3``); empty when the store cannot give them (logged: the page says there are no images)."""
    store = as_store(files)
    rows = session.execute(
        select(Instance.store_key, Instance.spool_path, Instance.sha256).join(Series)
        .where(Series.series_instance_uid == series_instance_uid).order_by(Instance.id)).all()
    try:
        return [store.path(key or spool, sha) for key, spool, sha in rows]
    except StoreError as exc:
        log.warning("the series' files cannot be read from the store: %s", exc)
        return []


def image_files(session: Session, job_id: int, files: Store | Path | None = None) -> tuple[list[Path], Path] | None:
    """What a slice is drawn from: the series' files and the kept probability map (None: no images).
    Two small queries: a slice request must not read what the study page shows (history, banner)."""
    store = as_store(files)
    row = session.execute(select(Job.series_instance_uid, Result.prob_path).join(Result, Result.job_id == Job.id)
                          .where(Job.id == job_id)).one_or_none()
    if row is None or not row.prob_path:
        return None
    paths = series_paths(session, row.series_instance_uid, store)
    prob = _local(store, row.prob_path)
    return (paths, prob) if paths and prob is not None else None


def patient_banner(path: Path) -> dict[str, str]:
    """Patient and study identity for the banner of the study page, read from one stored instance.

    Only for display to the signed-in reviewer: never logged, never in metrics or audit details."""
    from pydicom import dcmread

    tags = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyDate",
            "StudyDescription", "InstitutionName"]
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=tags)
    except (OSError, ValueError, EOFError, TypeError, AttributeError):
        return {}
    out = {}
    for kw in tags:
        v = ds.get(kw)
        if v is not None and str(v).strip():
            out[kw] = str(v).strip()
    for kw in ("PatientBirthDate", "StudyDate"):
        if kw in out:
            out[kw] = dicom_date(out[kw])
    if "PatientName" in out:
        out["PatientName"] = person_name(out["PatientName"])
    return out


def dicom_date(value: str) -> str:
    """DA (YYYYMMDD) as YYYY-MM-DD; anything else unchanged (shown as sent).

    >>> dicom_date("19570314"), dicom_date("1957")
    ('1957-03-14', '1957')
    """
    v = value.strip()
    if len(v) == 8 and v.isdigit():
        return f"{v[:4]}-{v[4:6]}-{v[6:]}"
    return v


def person_name(value: str) -> str:
    """PN as a reading room writes it: ``FAMILY, Given Middle`` (the alphabetic group only).

    >>> person_name("NORDMANN^ERIK"), person_name("DOE^JANE^Q^DR"), person_name("<script>alert(1)</script>")
    ('NORDMANN, ERIK', 'DR DOE, JANE Q', '<script>alert(1)</script>')
    """
    parts = value.split("=")[0].split("^")
    family = parts[0].strip()
    given = " ".join(p.strip() for p in parts[1:3] if p.strip())
    prefix = parts[3].strip() if len(parts) > 3 else ""
    suffix = parts[4].strip() if len(parts) > 4 else ""
    name = f"{family}, {given}" if given else family
    return " ".join(x for x in (prefix, name, suffix) if x) or value
