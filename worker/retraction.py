"""Taking a sent result back, by IHE IOCM: a Key Object Selection document that rejects its SEG and SR.

``specgate jobs retract ID --user U --reason quality|patient-safety`` (a radiologist who finds a sent
result wrong), and automatically when a newer version of the study is sent (the earlier result is
superseded: reason ``quality``, user ``specgate``). The KOS is titled (113001, DCM, "Rejected for Quality
Reasons") or (113037, DCM, "Rejected for Patient Safety Reasons"), references exactly the SEG and the SR
that were sent, and goes to every destination that received them, with the same rows, retries and audit
trail as any delivery (:func:`dicom_node.scu.deliver_retraction`).

One retraction per result: its KOS UID is derived from the SEG's, and the ``retractions`` row is unique
per result, so retracting twice (or two people at once) sends one KOS and tells the second who was first.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import scu
from dicom_node.scu import DeliveryOutcome
from ledger import audit
from ledger.db import session_scope
from ledger.schema import Delivery, DeliveryState, Job, JobState, Result, Retraction, RetractionReason
from store import RESULT_FILES, Store, as_store

from .atomic import write_dicom
from .config import DeliveryConfig
from .dicom_seg import derive_uid
from .kos import encode_kos

if TYPE_CHECKING:
    from .prometheus import WorkerMetrics

__all__ = ["RetractionError", "retract_job", "retract_superseded", "send_retraction"]

log = logging.getLogger("specgate.worker.retraction")


class RetractionError(ValueError):
    """The retraction is refused: no such job, never sent, already retracted, no user."""


def retract_job(sessions: sessionmaker[Session], job_id: int, *, user: str, reason: RetractionReason | str,
                note: str | None = None, files: Store | Path | None = None) -> int:
    """Record the retraction of job ``job_id``'s sent result and write its KOS; returns the retraction's
    id (send it with :func:`send_retraction`). Raises :class:`RetractionError` with a message for people."""
    user = (user or "").strip()
    if not user:
        raise RetractionError("a retraction needs the user who retracts")
    reason = RetractionReason(str(reason).replace("-", "_"))
    with session_scope(sessions) as s:
        job = s.get(Job, job_id)
        if job is None:
            raise RetractionError(f"job {job_id} does not exist")
        if job.shadow:  # silent mode (ledger.shadow): nothing of it ever left specgate
            raise RetractionError(f"job {job_id} is a shadow result: it is never sent, so nothing to retract")
        result = s.execute(select(Result).where(Result.job_id == job_id)).scalar_one_or_none()
        if result is None:
            raise RetractionError(f"job {job_id} has no result: nothing to retract")
        earlier = s.execute(select(Retraction).where(Retraction.result_id == result.id)).scalar_one_or_none()
        if earlier is not None:
            raise RetractionError(f"job {job_id} was already retracted by {earlier.username} at "
                                  f"{earlier.created_at:%Y-%m-%d %H:%M} UTC ({earlier.reason}); nothing sent again")
        if not _sent_to(s, result.id):
            raise RetractionError(f"job {job_id} ({job.state}) was never sent to a destination: nothing to retract")
        keys = [p for p in (result.seg_path, result.sr_path) if p]
        kos_uid = derive_uid(result.seg_sop_instance_uid, "kos")
        kos_series = derive_uid(result.seg_sop_instance_uid, "kos-series")
        result_id = result.id
    store = as_store(files)
    # beside the result it withdraws (a row of an earlier version, an absolute path: beside it too)
    kos_key = str(PurePosixPath(keys[0]).with_name(RESULT_FILES["kos"]))
    kos = encode_kos([dcmread(store.path(k, fresh=True)) for k in keys], reason=reason.value,  # type: ignore[arg-type]
                     sop_instance_uid=kos_uid, series_instance_uid=kos_series, retracted_by=user)
    kos_path = write_dicom(kos, store.scratch(kos_key))
    store.put(kos_key, kos_path)
    try:
        with session_scope(sessions) as s:
            row = Retraction(job_id=job_id, result_id=result_id, kos_path=kos_key,
                             kos_sop_instance_uid=kos_uid, kos_series_instance_uid=kos_series, reason=reason,
                             note=(note or "").strip() or None, username=user)
            s.add(row)
            s.flush()
            audit.append(s, actor=f"user:{user}", action="result.retracted", object_type="job", object_id=job_id,
                         details={"retraction_id": row.id, "result_id": result_id, "reason": reason.value,
                                  "note": row.note, "kos_sop_instance_uid": kos_uid})
            retraction_id = row.id
    except IntegrityError as exc:  # another retraction of the same result won the race
        raise RetractionError(f"job {job_id} was retracted by someone else at the same moment") from exc
    log.info("job %d: result retracted (%s); KOS %s", job_id, reason.value, kos_uid)
    return retraction_id


def send_retraction(sessions: sessionmaker[Session], retraction_id: int, config: DeliveryConfig, *,
                    actor: str, metrics: WorkerMetrics | None = None) -> list[DeliveryOutcome]:
    """Send the KOS to every configured destination that received the result (``metrics`` counts the
    attempts)."""
    with session_scope(sessions) as s:
        retraction = s.get(Retraction, retraction_id)
        if retraction is None:
            raise LookupError(f"retraction {retraction_id} does not exist")
        received = set(s.execute(select(Delivery.destination).where(
            Delivery.result_id == retraction.result_id, Delivery.state == DeliveryState.SENT)).scalars())
        gone = sorted(received - {d.name for d in config.destinations})
        if gone:
            audit.append(s, actor=actor, action="retraction.destination_unknown", object_type="retraction",
                         object_id=retraction_id, details={"destinations": gone})
    if gone:
        log.error("retraction %d: destinations %s received the result but are no longer configured", retraction_id,
                  ", ".join(gone))
    targets = [d for d in config.destinations if d.name in received]
    return scu.deliver_retraction(sessions, retraction_id, targets, actor=actor, retry_policy=config.retry,
                                  on_attempt=None if metrics is None else metrics.delivery_observer("retraction"),
                                  files=config.files)


def retract_superseded(sessions: sessionmaker[Session], job_id: int, config: DeliveryConfig, *,
                       actor: str, metrics: WorkerMetrics | None = None) -> list[int]:
    """Job ``job_id`` was just sent: retract every earlier version of its study whose result was sent
    and is not retracted yet (reason ``quality``), and send those KOS. Returns the retraction ids."""
    with session_scope(sessions) as s:
        job = s.get(Job, job_id)
        if job is None:
            return []
        earlier = list(s.execute(select(Job.id).where(Job.study_id == job.study_id, Job.version < job.version,
                                                      Job.state.in_([JobState.SENT, JobState.SUPERSEDED])))
                       .scalars())
        version = job.version
    done = []
    for old in earlier:
        try:
            rid = retract_job(sessions, old, user="specgate", reason=RetractionReason.QUALITY,
                              note=f"superseded by job {job_id} (version {version}) of the same study",
                              files=config.files)
        except RetractionError:
            continue  # never sent, or retracted already
        send_retraction(sessions, rid, config, actor=actor, metrics=metrics)
        done.append(rid)
    return done


def _sent_to(s: Session, result_id: int) -> bool:
    return s.execute(select(Delivery.id).where(Delivery.result_id == result_id,
                                               Delivery.state == DeliveryState.SENT).limit(1)).first() is not None
