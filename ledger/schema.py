"""The ledger's tables (SQLAlchemy 2 typed models): the source of truth for what exists and in which state.

The broker only carries wake-up calls; everything a process must not forget is a row here. Every change of
schema is an Alembic migration in ``migrations/``; this module and the newest migration must agree (a test
compares them).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "AuditEvent",
    "AuditSample",
    "AuditSampleState",
    "Base",
    "Delivery",
    "DeliveryState",
    "DriftAlarm",
    "DriftChart",
    "DriftObservation",
    "Instance",
    "Job",
    "JobAttempt",
    "JobState",
    "ModelState",
    "RegisteredModel",
    "Result",
    "Review",
    "ReviewDecision",
    "ReviewSession",
    "Series",
    "ShadowComparison",
    "Study",
    "User",
    "utcnow",
]

UID = String(64)
JSONType = JSON().with_variant(JSONB(), "postgresql")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSONType}


class JobState(enum.StrEnum):
    """Job states (ARCHITECTURE.md, "Job states"). Allowed moves live in :mod:`ledger.jobs`."""

    RECEIVING = "receiving"
    QUEUED = "queued"
    RUNNING = "running"
    RELEASED = "released"
    HELD = "held"
    APPROVED = "approved"
    REJECTED = "rejected"
    SENT = "sent"
    FAILED = "failed"
    SUPERSEDED = "superseded"


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"


class ModelState(enum.StrEnum):
    """A registered model: ``registered`` (validated and recorded, no OOD bank yet: nothing may be routed
    to it) or ``live`` (its bank is fitted; a rule may select it). Moves live in :mod:`ledger.models`."""

    REGISTERED = "registered"
    LIVE = "live"


class ReviewDecision(enum.StrEnum):
    APPROVE = "approve"
    REJECT = "reject"


def _enum(e: type[enum.Enum], name: str) -> Enum:
    # Stored as plain strings with a CHECK constraint: portable, readable in SQL reports.
    return Enum(e, name=name, native_enum=False, create_constraint=True, length=16,
                values_callable=lambda x: [m.value for m in x])


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    # Set when the study's quiet period ended and its instances were handed to a job (or to no job).
    assembled_at: Mapped[datetime | None] = mapped_column(default=None)
    # Instances indexed so far, and how many of them the last assembly saw (migration 0003). The study
    # needs (re-)assembly while received_count > assembled_count: a counter, bumped under the study row's
    # lock, does not depend on clocks or commit order the way comparing timestamps would.
    received_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    assembled_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Completeness by asking the archive (migration 0012, dicom_node.completeness): set when the quiet period
    # ended and the source has an archive; the assembler waits for what the archive holds until this time.
    completeness_due_at: Mapped[datetime | None] = mapped_column(default=None)
    # the archive's answer (counts per series) or why it gave none; NULL: not asked (yet)
    completeness: Mapped[dict[str, Any] | None] = mapped_column(JSONType, default=None)
    series: Mapped[list[Series]] = relationship(back_populates="study")
    jobs: Mapped[list[Job]] = relationship(back_populates="study", order_by="Job.version")


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="RESTRICT"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    series_description: Mapped[str | None] = mapped_column(String(64))
    station_name: Mapped[str | None] = mapped_column(String(64), default=None)  # the scanner (0008,1010)
    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


def _spool_path_is_the_key(context: Any) -> str | None:
    """A row written without a store key (``fs``: the spool is the store) is keyed by its spool path."""
    return context.get_current_parameters().get("spool_path")  # type: ignore[no-any-return]


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="RESTRICT"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str | None] = mapped_column(UID)
    spool_path: Mapped[str] = mapped_column(String(512))
    #: the instance's key in the store (store.layout); NULL while the SCP's uploader has not put it there
    store_key: Mapped[str | None] = mapped_column(String(512), index=True, default=_spool_path_is_the_key)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        # one live job per study version, and beside it one shadow job per shadow rule (migration 0014)
        Index("uq_jobs_live_version", "study_id", "version", unique=True, sqlite_where=text("NOT shadow"),
              postgresql_where=text("NOT shadow")),
        Index("uq_jobs_shadow_version", "study_id", "version", "rule_name", unique=True,
              sqlite_where=text("shadow"), postgresql_where=text("shadow")),
        Index("ix_jobs_state_updated", "state", "updated_at"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="RESTRICT"), index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"), default=JobState.QUEUED)
    series_instance_uid: Mapped[str | None] = mapped_column(UID, default=None)
    rule_name: Mapped[str | None] = mapped_column(String(64), default=None)
    # The model the job was made for (its rule's ``model`` when the assembler made it; migration 0009): its
    # segmentation message goes to that model's queue (``gpu.<model>``, worker.celery_app.segment_queue) and
    # the worker runs that model. NULL: a job made before 0009; it goes to the queue of the model its rule
    # names now, or to the bare ``gpu`` queue when its rule is gone.
    model_name: Mapped[str | None] = mapped_column(String(64), default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    reason_code: Mapped[str | None] = mapped_column(String(64), default=None)
    reason_detail: Mapped[str | None] = mapped_column(Text, default=None)
    worker_id: Mapped[str | None] = mapped_column(String(128), default=None)
    task_id: Mapped[str | None] = mapped_column(String(64), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    superseded_by_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), default=None)
    # what the archive said when the job was made (migration 0012): complete, incomplete_at_source (counts at
    # the source and held, per series) or archive_unreachable; NULL: its source has no archive
    completeness: Mapped[dict[str, Any] | None] = mapped_column(JSONType, default=None)
    # silent mode (migration 0014, ledger.shadow): a shadow job runs and is scored but is never approved or
    # sent; shadow_of_id is the live job of the same study version it runs beside (NULL: none matched)
    shadow: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    shadow_of_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), default=None, index=True)
    study: Mapped[Study] = relationship(back_populates="jobs")
    results: Mapped[list[Result]] = relationship(back_populates="job")
    reviews: Mapped[list[Review]] = relationship(back_populates="job", order_by="Review.id")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="job", order_by="Delivery.id")
    attempt_rows: Mapped[list[JobAttempt]] = relationship(back_populates="job", order_by="JobAttempt.id")


class JobAttempt(Base):
    """One attempt at running a job (migration 0009): where it ran (host, process, device: ``cpu``, or
    ``cuda:0 NVIDIA H100 80GB HBM3 (GPU 3)``), when, and how it ended. Opened by the claim
    (:func:`ledger.jobs.start_attempt`); closed by :func:`ledger.jobs.transition` when the job leaves
    ``running``, whoever moves it (the attempt itself, the reconciler, the next claim finding it dead), with
    the state it went to and the reason code. Numbers repeat after an operator's retry (a fresh count):
    the row id orders them."""

    __tablename__ = "job_attempts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="RESTRICT"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    task_id: Mapped[str | None] = mapped_column(String(64), default=None)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(128))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(default=None)
    # the state the job left 'running' for (released, held, failed, queued, superseded); NULL while it runs
    outcome: Mapped[str | None] = mapped_column(String(16), default=None)
    reason_code: Mapped[str | None] = mapped_column(String(64), default=None)
    job: Mapped[Job] = relationship(back_populates="attempt_rows")


class Result(Base):
    __tablename__ = "results"
    __table_args__ = (Index("uq_results_sr_sop_instance_uid", "sr_sop_instance_uid", unique=True),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="RESTRICT"), unique=True)
    seg_path: Mapped[str] = mapped_column(String(512))
    seg_sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    seg_series_instance_uid: Mapped[str] = mapped_column(UID)
    prob_path: Mapped[str | None] = mapped_column(String(512), default=None)
    evidence_path: Mapped[str | None] = mapped_column(String(512), default=None)
    # the gate's evidence as a DICOM SR, sent with the SEG (None: a result made before revision 0004)
    sr_path: Mapped[str | None] = mapped_column(String(512), default=None)
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(UID, default=None)
    sr_series_instance_uid: Mapped[str | None] = mapped_column(UID, default=None)
    oodm: Mapped[float] = mapped_column(Float)
    tau: Mapped[float] = mapped_column(Float)
    is_ood: Mapped[bool] = mapped_column(Boolean)
    model_id: Mapped[str] = mapped_column(String(128))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    superseded: Mapped[bool] = mapped_column(Boolean, default=False)
    # percent of the bank's leave-one-out OODMs at or below this OODM (migration 0005)
    bank_percentile: Mapped[float | None] = mapped_column(Float, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    job: Mapped[Job] = relationship(back_populates="results")


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str | None] = mapped_column(String(128), default=None)
    password_hash: Mapped[str | None] = mapped_column(String(256), default=None)
    role: Mapped[str] = mapped_column(String(32), default="radiologist")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # failed logins in a row (reset by a good one), for slowing the account down (migration 0005)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_failed_login_at: Mapped[datetime | None] = mapped_column(default=None)


class ReviewSession(Base):
    """A login to the review app (migration 0005). The browser holds a random token (in a signed cookie);
    only its SHA-256 is stored, so a copy of the table logs nobody in. Revoked on logout, on password
    change and when the account is disabled; expires after the session's lifetime or when left idle."""

    __tablename__ = "review_sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    remote_addr: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Review(Base):
    __tablename__ = "reviews"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="RESTRICT"), index=True)
    username: Mapped[str] = mapped_column(String(64))
    decision: Mapped[ReviewDecision] = mapped_column(_enum(ReviewDecision, "review_decision"))
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    job: Mapped[Job] = relationship(back_populates="reviews")


class _Sending:
    """The columns of one object's (or set of objects') delivery to one destination: where, how it went.
    Shared by ``deliveries`` (a result's SEG and SR) and ``retraction_deliveries`` (a KOS), which
    :mod:`dicom_node.scu` claims, sends and records with the same code."""

    destination: Mapped[str] = mapped_column(String(64))
    ae_title: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    state: Mapped[DeliveryState] = mapped_column(_enum(DeliveryState, "delivery_state"),
                                                 default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status: Mapped[int | None] = mapped_column(Integer, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(default=None)


class Delivery(_Sending, Base):
    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("result_id", "destination", name="uq_deliveries_result_destination"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="RESTRICT"), index=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="RESTRICT"))
    job: Mapped[Job] = relationship(back_populates="deliveries")


class RetractionReason(enum.StrEnum):
    """IHE IOCM rejection notes (the Key Object Selection document's title)."""

    QUALITY = "quality"  # (113001, DCM, "Rejected for Quality Reasons")
    PATIENT_SAFETY = "patient_safety"  # (113037, DCM, "Rejected for Patient Safety Reasons")


class Retraction(Base):
    """A sent result taken back: the IOCM Key Object Selection document that rejects its SEG and SR."""

    __tablename__ = "retractions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="RESTRICT"), index=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="RESTRICT"), unique=True)
    kos_path: Mapped[str] = mapped_column(String(512))
    kos_sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    kos_series_instance_uid: Mapped[str] = mapped_column(UID)
    reason: Mapped[RetractionReason] = mapped_column(_enum(RetractionReason, "retraction_reason"))
    note: Mapped[str | None] = mapped_column(Text, default=None)
    username: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RetractionDelivery(_Sending, Base):
    """One retraction's KOS to one destination (the destinations that received the result)."""

    __tablename__ = "retraction_deliveries"
    __table_args__ = (UniqueConstraint("retraction_id", "destination", name="uq_retraction_deliveries_destination"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="RESTRICT"), index=True)
    retraction_id: Mapped[int] = mapped_column(ForeignKey("retractions.id", ondelete="RESTRICT"))


class RegisteredModel(Base):
    """A hospital's model registered with ``specgate model register`` (migration 0008): what it is made of
    (format, path as given, the SHA-256 of every file), what it outputs (labels, optional SNOMED CT codes
    per label), how its signature is taken (layer, signature settings), and its OOD bank once fitted.
    Changed only through :mod:`ledger.models`, which writes an audit event for every change."""

    __tablename__ = "models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    version: Mapped[str] = mapped_column(String(128))
    format: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(String(1024))
    files_sha256: Mapped[dict[str, Any]] = mapped_column(JSONType)  # relative path -> SHA-256
    labels: Mapped[dict[str, Any]] = mapped_column(JSONType)  # label value (as text) -> the model's name
    layer: Mapped[str] = mapped_column(String(256))
    settings: Mapped[dict[str, Any]] = mapped_column(JSONType)  # the adapter's signature settings
    # label name -> [code value, "SCT", code meaning] (SNOMED CT; worker.anatomy's code triple)
    codes: Mapped[dict[str, Any] | None] = mapped_column(JSONType, default=None)
    bank_path: Mapped[str | None] = mapped_column(String(1024), default=None)
    bank_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    state: Mapped[ModelState] = mapped_column(_enum(ModelState, "model_state"), default=ModelState.REGISTERED)
    registered_at: Mapped[datetime] = mapped_column(default=utcnow)
    registered_by: Mapped[str] = mapped_column(String(128))
    bank_fitted_at: Mapped[datetime | None] = mapped_column(default=None)
    # silent mode (migration 0014): the rules' jobs for this model run beside the live ones, never sent
    shadow: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class ShadowComparison(Base):
    """A shadow job's result against its live job's (migration 0014, :mod:`ledger.shadow`): the Dice
    similarity of the two SEGs' label maps (foreground: any segment), NULL with ``note`` saying why when
    they cannot be compared (different series)."""

    __tablename__ = "shadow_comparisons"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    shadow_job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="RESTRICT"), unique=True)
    live_job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="RESTRICT"), index=True)
    dsc: Mapped[float | None] = mapped_column(Float, default=None)
    shadow_voxels: Mapped[int | None] = mapped_column(BigInteger, default=None)
    live_voxels: Mapped[int | None] = mapped_column(BigInteger, default=None)
    note: Mapped[str | None] = mapped_column(String(256), default=None)
    computed_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditSampleState(enum.StrEnum):
    """A released result drawn for a blind review (migration 0015): waiting, or the radiologist's verdict."""

    PENDING = "pending"
    AGREED = "agreed"  # the segmentation is acceptable: a good release
    REJECTED = "rejected"  # the gate let a failure through


class AuditSample(Base):
    """A released result drawn for a blind review (:mod:`ledger.audit_sample`, migration 0015)."""

    __tablename__ = "audit_samples"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="RESTRICT"), unique=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="RESTRICT"))
    share: Mapped[float] = mapped_column(Float)  # audit_sample_share when it was drawn
    draw: Mapped[float] = mapped_column(Float)  # the study UID's draw in [0, 1): drawn when draw < share
    state: Mapped[AuditSampleState] = mapped_column(_enum(AuditSampleState, "audit_sample_state"), index=True,
                                                    default=AuditSampleState.PENDING)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    reviewed_by: Mapped[str | None] = mapped_column(String(64), default=None)
    reviewed_at: Mapped[datetime | None] = mapped_column(default=None)
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    retraction_id: Mapped[int | None] = mapped_column(ForeignKey("retractions.id", ondelete="RESTRICT"),
                                                      default=None)


class AuditEvent(Base):
    """One row of the append-only, hash-chained audit trail (see :mod:`ledger.audit`).

    Database triggers refuse UPDATE and DELETE on this table (migration 0001).
    """

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_object", "object_type", "object_id"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    ts: Mapped[datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64), index=True)
    object_type: Mapped[str] = mapped_column(String(32))
    object_id: Mapped[str] = mapped_column(String(128))
    details: Mapped[dict[str, Any]] = mapped_column(JSONType)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


# --- drift alarms (migration 0013; ledger.drift) ------------------------------------------------------------
class _DriftSource:
    """A source (calling AE, station, manufacturer, the manufacturer's model name, software versions, as
    the series' headers say) and the model its studies ran through: shared by a chart and its observations."""

    model: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(String(16))
    station_name: Mapped[str | None] = mapped_column(String(64), default=None)
    manufacturer: Mapped[str | None] = mapped_column(String(64), default=None)
    manufacturer_model: Mapped[str | None] = mapped_column(String(64), default=None)
    software_versions: Mapped[str | None] = mapped_column(String(128), default=None)


class DriftChart(_DriftSource, Base):
    """One control chart: a source (calling AE, station, manufacturer, model name, software versions) and
    the model its studies ran through. Its baseline (in-control mean and sd of log(OODM/tau), OOD count, the
    metadata seen) and its EWMA statistics now; changed only through :mod:`ledger.drift`."""

    __tablename__ = "drift_charts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_key: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 of the source fields and model
    baseline_n: Mapped[int] = mapped_column(Integer, default=0)
    baseline_sum: Mapped[float] = mapped_column(Float, default=0.0)
    baseline_sumsq: Mapped[float] = mapped_column(Float, default=0.0)
    baseline_ood: Mapped[int] = mapped_column(Integer, default=0)
    baseline_done: Mapped[bool] = mapped_column(Boolean, default=False)
    # what the baseline's studies carried: field -> sorted values (text) or [min, max] (numbers)
    baseline_metadata: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    ewma_oodm: Mapped[float] = mapped_column(Float, default=0.0)
    ewma_rate: Mapped[float | None] = mapped_column(Float, default=None)
    charted: Mapped[int] = mapped_column(Integer, default=0)  # observations charted since the last restart
    observations: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class DriftObservation(_DriftSource, Base):
    """One finished job as its source's chart saw it: the series' acquisition metadata, the gate's numbers
    and the chart's statistics after it. Written in the transaction that records the job's result."""

    __tablename__ = "drift_observations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="RESTRICT"), unique=True)
    chart_id: Mapped[int] = mapped_column(ForeignKey("drift_charts.id", ondelete="RESTRICT"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16), default=None)
    slice_thickness: Mapped[float | None] = mapped_column(Float, default=None)
    pixel_spacing: Mapped[float | None] = mapped_column(Float, default=None)
    kvp: Mapped[float | None] = mapped_column(Float, default=None)
    convolution_kernel: Mapped[str | None] = mapped_column(String(64), default=None)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)
    oodm: Mapped[float] = mapped_column(Float)
    tau: Mapped[float] = mapped_column(Float)
    is_ood: Mapped[bool] = mapped_column(Boolean)
    in_baseline: Mapped[bool] = mapped_column(Boolean, default=False)
    # the chart after this study (NULL while the baseline is being gathered)
    ewma_oodm: Mapped[float | None] = mapped_column(Float, default=None)
    limit_oodm: Mapped[float | None] = mapped_column(Float, default=None)
    stop_oodm: Mapped[float | None] = mapped_column(Float, default=None)
    ewma_rate: Mapped[float | None] = mapped_column(Float, default=None)
    limit_rate: Mapped[float | None] = mapped_column(Float, default=None)
    stop_rate: Mapped[float | None] = mapped_column(Float, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class DriftAlarm(Base):
    """A raised hand: ``kind`` ``oodm`` / ``ood_rate`` (the EWMA past its control limit), ``stop`` (past the
    stop limit: the source's results are held until it is cleared) or ``metadata`` (a station, software
    version, kernel... the baseline never saw). ``open`` until an admin clears it, with who and why."""

    __tablename__ = "drift_alarms"
    __table_args__ = (Index("ix_drift_alarms_state_chart", "state", "chart_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    chart_id: Mapped[int] = mapped_column(ForeignKey("drift_charts.id", ondelete="RESTRICT"))
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="open")
    statistic: Mapped[float | None] = mapped_column(Float, default=None)
    threshold: Mapped[float | None] = mapped_column(Float, default=None)  # the limit it crossed
    detail: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    first_job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="RESTRICT"))
    opened_at: Mapped[datetime] = mapped_column(default=utcnow)
    cleared_at: Mapped[datetime | None] = mapped_column(default=None)
    cleared_by: Mapped[str | None] = mapped_column(String(128), default=None)
    clear_reason: Mapped[str | None] = mapped_column(Text, default=None)
