"""One typed settings object for every specgate process.

Values come from, in order of precedence: keyword arguments (tests), environment variables with the
prefix ``SPECGATE_``, an optional TOML file (``specgate --config FILE``), then the defaults below. The
settings are built once, by the CLI, and passed down; nothing in specgate reads the environment anywhere
else. A value that makes no sense stops start-up with a message naming the setting::

    >>> Settings(scp_port=11112).scp_port
    11112
    >>> Settings(scp_port=0)
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for Settings
    ...

Comma-separated list settings (``SPECGATE_ALLOWED_CALLERS``, ``SPECGATE_DESTINATIONS``) are parsed here,
at the boundary, into small typed records.
"""

from __future__ import annotations

import os
import re
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from dicom_node.config import (
    AllowedCaller,
    Archive,
    AssemblyConfig,
    CompletenessConfig,
    Destination,
    NodeConfig,
    ReceiveLimits,
    SeriesRule,
    StowConfig,
    StowToken,
    TLSConfig,
    validate_ae_title,
    validate_host,
)
from dicom_node.scu import RetryPolicy
from ledger.drift import DriftConfig
from review.config import ReviewConfig, validate_viewer_url
from store import StoreConfig
from worker.anatomy import AnatomyCode
from worker.config import (
    DEFAULT_MODEL,
    VISIBILITY_MARGIN_S,
    DeliveryConfig,
    InferenceOverrides,
    ModelSpec,
    PipelineConfig,
    SpacingPairs,
    TaskLimits,
    WorkerConfig,
)
from worker.segments import PHANTOM_SEGMENT, SegmentDefinition

__all__ = [
    "AllowedCaller",
    "Destination",
    "SeriesRule",
    "Settings",
    "SettingsError",
    "validate_ae_title",
]

ENV_PREFIX = "SPECGATE_"


class SettingsError(ValueError):
    """Start-up configuration is invalid; the message names the setting(s) and value(s)."""


class ModelFiles(BaseModel):
    """One named model (TOML ``[models.NAME]``): its weights, the OOD bank fitted for those weights, and
    what the SEG says its segment is (a one-label model's; a model with several labels names each segment
    after its label, :mod:`worker.segments`). The defaults describe the shipped model honestly: it was
    trained on synthetic phantoms only, so its segment is "an organ of a phantom", not a named human organ;
    a model that names its own ``segment_label`` gets no description unless it gives one.

    ``[models.default]`` describes the default model (model_weights/model_bank, or the shipped model): it
    sets no ``weights`` or ``bank``; every other model sets both::

        >>> ModelFiles(weights="liver.pt", bank="liver.npz", segment_label="Liver",
        ...            type_code=("10200004", "SCT", "Liver")).segment().code.type
        ('10200004', 'SCT', 'Liver')
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    weights: Path | None = None
    bank: Path | None = None
    segment_label: str = Field(default=PHANTOM_SEGMENT.label, min_length=1, max_length=64)
    segment_description: str | None = Field(default=None, max_length=64)
    # SNOMED CT codes: (code value, coding scheme designator, code meaning)
    category_code: tuple[str, str, str] = PHANTOM_SEGMENT.code.category
    type_code: tuple[str, str, str] = PHANTOM_SEGMENT.code.type
    # the segment's recommended display colour, RGB 0-255 (written as CIELab, as DICOM asks)
    display_color: tuple[int, int, int] = PHANTOM_SEGMENT.color

    @model_validator(mode="before")
    @classmethod
    def _phantom_description(cls, data: Any) -> Any:
        """The default label comes with the description of what the shipped model really is."""
        if isinstance(data, dict) and "segment_label" not in data and "segment_description" not in data:
            data = {**data, "segment_description": PHANTOM_SEGMENT.description}
        return data

    @field_validator("display_color")
    @classmethod
    def _rgb(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if not all(0 <= c <= 255 for c in v):
            raise ValueError(f"display_color must be three integers 0-255 (RGB), got {v!r}")
        return v

    @model_validator(mode="after")
    def _segment_writable(self) -> ModelFiles:
        self.segment()  # raises ValueError naming a label, code or colour a SEG cannot carry
        return self

    def segment(self) -> SegmentDefinition:
        """The model's one segment as the worker writes it (:attr:`worker.config.ModelSpec.segment`)."""
        return SegmentDefinition(value=1, label=self.segment_label, color=self.display_color,
                                 code=AnatomyCode(type=self.type_code, category=self.category_code),
                                 description=self.segment_description)


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part for part in (p.strip() for p in value.split(",")) if part]
    return value


class Settings(BaseSettings):
    """All of specgate's configuration. Environment names are ``SPECGATE_`` + the field name, upper case."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    # --- storage -----------------------------------------------------------------------------------
    data_dir: Path = Field(default=Path("./specgate-data"),
                           description="spool, results and the embedded database")
    database_url: str | None = Field(default=None,
                                     description="SQLAlchemy URL; default: SQLite file in the data dir")
    broker_url: str | None = Field(default=None,
                                   description="Celery broker; default: one that needs no server")
    store: Literal["fs", "s3"] = Field(
        default="fs", description="where instance files and results live: the data dir (fs), or an "
                                  "S3-compatible object store (s3), so workers need no shared filesystem")
    s3_endpoint_url: str | None = Field(default=None, description="S3 endpoint (MinIO, Ceph RGW, SeaweedFS); "
                                                                  "empty: AWS for s3_region")
    s3_bucket: str = Field(default="specgate", min_length=3, max_length=63, description="the bucket (made by the operator)")
    s3_prefix: str = Field(default="", max_length=200, description="keys live under it: one bucket, several installations")
    s3_region: str = Field(default="us-east-1", description="the bucket's region")
    s3_access_key: str | None = Field(default=None, description="empty: boto3's own chain (environment, instance role)")
    s3_secret_key: str | None = Field(default=None, repr=False, description="the access key's secret")
    s3_ca_bundle: Path | None = Field(default=None, description="a private CA for an https endpoint")
    cache_dir: Path | None = Field(default=None, description="this host's copies of stored objects (s3); "
                                                             "default: <data_dir>/cache")
    cache_max_bytes: int = Field(default=20 * 2**30, ge=0, description="bound of the cache; least recently used "
                                                                        "files go first (0: no bound)")

    # --- DICOM SCP ---------------------------------------------------------------------------------
    scp_ae_title: str = Field(default="SPECGATE", description="the SCP's AE title; a caller must call it")
    scp_host: str = Field(default="127.0.0.1", description="address the SCP listens on")
    scp_port: int = Field(default=11112, ge=1, le=65535, description="DICOM port the SCP listens on")
    allowed_callers: Annotated[list[AllowedCaller], NoDecode] = Field(
        default_factory=list, description="who may send: AE_TITLE@HOST (HOST may be *), comma-separated in the "
                                          "environment; empty: nobody")
    destinations: Annotated[list[Destination], NoDecode] = Field(
        default_factory=list,
        description="where results go, comma-separated in the environment: NAME=AE_TITLE@HOST:PORT (C-STORE) or "
                    "NAME=https://HOST/PATH (DICOMweb STOW-RS), each optionally followed by ?KEY=VALUE&... "
                    "options: tls_ca, tls_cert, tls_key, tls_verify_hostname (C-STORE over TLS with tls_ca; https), "
                    "token_file, token_env, username, password_file, password_env (DICOMweb credentials); in TOML "
                    "also [[destinations]] tables with name, ae_title, host, port or url, and the same keys. "
                    "The files must exist and the variables be set at start-up")
    study_quiet_seconds: float = Field(default=60.0, gt=0,
                                      description="a study with no new instance this long is complete")
    scp_max_associations: int = Field(default=10, ge=1, le=1000, description="associations open at once")
    scp_processes: int = Field(default=0, ge=0, le=64,
                               description="receiver processes behind the one port; 0: two per CPU core")
    scp_acse_timeout: float = Field(default=30.0, gt=0, description="association negotiation timeout")
    scp_dimse_timeout: float = Field(default=60.0, gt=0, description="timeout of one DIMSE message")
    scp_network_timeout: float = Field(default=60.0, gt=0, description="an idle association is closed after this")
    scp_max_pdu: int = Field(default=1048576, ge=4096, le=1 << 26,
                             description="the longest PDU we read, announced to peers; a longer one is aborted")
    scp_require_called_ae: bool = Field(default=True, description="refuse a caller that calls another AE title")
    scp_tls_cert: Path | None = Field(default=None, description="DICOM TLS certificate (PEM); TLS is off without it")
    scp_tls_key: Path | None = Field(default=None, description="the private key of scp_tls_cert")
    scp_tls_ca: Path | None = Field(default=None, description="CA that signs the callers' client certificates")
    scp_tls_require_client_cert: bool = Field(default=False,
                                              description="mutual TLS: refuse a caller without a certificate "
                                                          "signed by scp_tls_ca")
    spool_disk_watermark_percent: float = Field(default=95.0, gt=0, le=100,
                                                description="refuse C-STORE above this disk usage")
    # What one peer may make the SCP read, hold or store (dicom_node.config.ReceiveLimits; the answers in
    # dicom_node/CONFORMANCE.md, "Limits").
    scp_max_command_bytes: int = Field(default=1 << 16, ge=1024, le=1 << 20,
                                       description="a DIMSE command set; longer: A-ABORT")
    scp_max_element_bytes: int = Field(default=64 << 20, ge=1 << 10, le=0xFFFFFFFE,
                                       description="the length one data element other than pixel data may "
                                                   "declare; more: 0xC000")
    scp_max_instance_bytes: int = Field(default=2 << 30, ge=1 << 20, le=1 << 40,
                                        description="one data set on the wire, and the most any element "
                                                    "may declare; a data set that passes it: A-ABORT")
    scp_max_association_bytes: int = Field(default=64 << 30, ge=1 << 20, le=1 << 50,
                                           description="everything one association carries; more: A-ABORT")
    scp_max_sequence_depth: int = Field(default=32, ge=1, le=64,
                                        description="sequences nested in one another; deeper: 0xC000")
    scp_accept_deflated: bool = Field(default=False,
                                      description="negotiate Deflated Explicit VR Little Endian "
                                                  "(1.2.840.10008.1.2.1.99)")
    scp_max_inflated_bytes: int = Field(default=256 << 20, ge=1 << 20, le=1 << 40,
                                        description="what a deflated data set may inflate to; more: 0xC000")

    # --- STOW-RS (DICOMweb in, run by specgate scp; dicom_node.stow) -------------------------------------
    stow_port: int = Field(default=0, ge=0, le=65535,
                           description="HTTPS port of the STOW-RS endpoint (POST /studies); 0: off")
    stow_host: str = Field(default="127.0.0.1", description="address the STOW-RS endpoint listens on")
    stow_tls_cert: Path | None = Field(default=None, description="the STOW-RS endpoint's certificate (PEM); "
                                                                 "required with stow_port")
    stow_tls_key: Path | None = Field(default=None, description="the private key of stow_tls_cert")
    stow_tls_ca: Path | None = Field(default=None,
                                     description="CA whose client certificates authenticate a caller (named "
                                                 "by the certificate's common name); needs stow_tls_callers")
    stow_tls_callers: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="the common names of the client certificates (from stow_tls_ca) "
                                          "allowed to store; another certificate of that CA is refused (403)")
    stow_tokens: Annotated[list[StowToken], NoDecode] = Field(
        default_factory=list, description="callers allowed by bearer token: NAME:SHA256 (hex SHA-256 of the "
                                          "token, never the token), comma-separated in the environment")

    # --- DICOM SCU (sending results) ---------------------------------------------------------------
    scu_ae_title: str = Field(default="SPECGATE", description="calling AE title of outbound C-STORE/C-ECHO")
    scu_max_attempts: int = Field(default=5, ge=1, le=100, description="C-STORE (or STOW-RS) attempts per destination")
    scu_backoff_seconds: float = Field(default=2.0, ge=0, le=3600,
                                       description="wait before the 2nd attempt; doubles after each")
    scu_backoff_max_seconds: float = Field(default=300.0, ge=0, le=86400, description="cap on one wait")
    scu_timeout: float = Field(default=30.0, gt=0, le=3600,
                               description="ACSE/DIMSE/network timeout of outbound associations")

    # --- archives: completeness and pull (dicom_node.archive) ------------------------------------------
    archives: Annotated[list[Archive], NoDecode] = Field(
        default_factory=list, description="query/retrieve peers: NAME=AE_TITLE@HOST:PORT (C-FIND, C-MOVE) or "
                                          "NAME=https://HOST/PATH (QIDO-RS, WADO-RS), comma-separated in the "
                                          "environment")
    archive_credentials: dict[str, Path] = Field(
        default_factory=dict, description="a DICOMweb archive's credential file, by archive name: one line, "
                                          "user:password (HTTP basic) or a bearer token; never logged")
    archive_timeout_seconds: float = Field(default=10.0, gt=0, le=600,
                                           description="one query or association to an archive")
    completeness_archive: dict[str, str] = Field(
        default_factory=dict, description="which archive to ask how much of a study there is, by the calling "
                                          "AE title of its sender ({\"CT01\" = \"pacs\"}); a sender not listed "
                                          "is not asked")
    completeness_wait_seconds: float = Field(default=300.0, gt=0, le=86400,
                                             description="after the quiet period, wait at most this long for "
                                                         "what the archive holds")

    # --- routing -----------------------------------------------------------------------------------
    rules: list[SeriesRule] = Field(default_factory=lambda: [SeriesRule(name="default-ct-mr")],
                                    description="which series are segmented, by which model ([[rules]] "
                                                "tables); the first match wins")

    # --- worker and model ----------------------------------------------------------------------------
    installation_id: str | None = Field(
        default=None, max_length=64,
        description="names this installation in derived result UIDs; default: the SCP AE title")
    model_weights: Path | None = Field(default=None, description="weights file; default: the shipped model")
    model_bank: Path | None = Field(default=None, description="OOD bank for those weights; default: shipped")
    models: dict[str, ModelFiles] = Field(
        default_factory=dict,
        description="more models, by name ([models.NAME] tables: weights, bank, and what the SEG says the "
                    "segment is: segment_label, segment_description, category_code, type_code, "
                    "display_color), that a rule's `model` selects; 'default' is always model_weights/"
                    "model_bank (or the shipped model), described by [models.default]; a rule may also "
                    "select a model registered in the ledger (specgate model register)")
    inference_block: int | None = Field(default=None, ge=16, le=512,
                                        description="sliding-window block; default: the model's own")
    inference_overlap: int | None = Field(default=None, ge=0, le=256,
                                          description="sliding-window overlap in voxels; default: the model's")
    inference_spacing: str | None = Field(
        default=None,
        description="grid the model runs on per modality ('CT=4,4,4;MR=3,1.8,1.8') or 'native'; "
                    "default: the spacing the weights declare")
    worker_torch_threads: int = Field(
        default=0, ge=0, le=256,
        description="torch threads (intra-op, and inter-op) of each worker process that runs tasks; 0: torch's "
                    "default (one per core)")
    worker_max_attempts: int = Field(default=3, ge=1, le=20,
                                     description="attempts per job before it ends failed")
    worker_heartbeat_seconds: float = Field(default=10.0, gt=0, le=600,
                                            description="a running job's heartbeat in the ledger, this often")
    worker_stale_seconds: float = Field(default=120.0, gt=0, le=86400,
                                        description="a running job without heartbeat this long is taken back")
    reconcile_interval_seconds: float = Field(default=30.0, gt=0, le=3600,
                                              description="the reconciler's pass (re-enqueue what the broker lost)")
    queued_deadline_seconds: float = Field(default=600.0, gt=0, le=86400,
                                           description="re-enqueue a queued job not claimed this long")
    worker_segment_soft_time_limit_seconds: float = Field(
        default=1800.0, gt=0, le=7 * 86400, description="a segmentation attempt is interrupted after this long")
    worker_segment_time_limit_seconds: float = Field(
        default=2100.0, gt=0, le=7 * 86400, description="hard limit: the attempt's process is killed after this long")
    worker_delivery_soft_time_limit_seconds: float = Field(
        default=900.0, gt=0, le=7 * 86400, description="a delivery (or retraction) task is interrupted after this long")
    worker_delivery_time_limit_seconds: float = Field(
        default=1000.0, gt=0, le=7 * 86400, description="hard limit of a delivery (or retraction) task")
    broker_visibility_timeout_seconds: float = Field(
        default=7200.0, gt=0, le=30 * 86400,
        description="Redis hands a message not acknowledged this long to another worker; must outlast every "
                    "hard time limit by 5 minutes")

    # --- review app (specgate review) -----------------------------------------------------------------
    review_host: str = Field(default="127.0.0.1", description="address the review app listens on")
    review_port: int = Field(default=8080, ge=1, le=65535, description="port the review app listens on")
    review_secret_file: Path | None = Field(
        default=None, description="key that signs session cookies; default: review-secret in the data dir, "
                                  "made on first start (mode 0600). Every review process must share it")
    review_behind_tls_proxy: bool = Field(
        default=False, description="the app sits behind a TLS-terminating proxy: cookies are marked Secure")
    review_tls_cert: Path | None = Field(default=None, description="serve the review app over HTTPS itself")
    review_tls_key: Path | None = Field(default=None, description="the private key of review_tls_cert")
    review_session_minutes: float = Field(default=480.0, gt=0, le=7 * 24 * 60,
                                          description="a login lasts this long (a reading-room shift)")
    review_idle_minutes: float = Field(default=30.0, gt=0, le=24 * 60,
                                       description="a session unused this long must log in again")
    review_viewer_url: str | None = Field(
        default=None, description="'open in viewer' link, e.g. https://pacs/ohif/viewer?StudyInstanceUIDs="
                                  "{study_instance_uid}")
    review_failed_login_limit: int = Field(default=5, ge=1, le=100,
                                           description="failed logins before the account is slowed down")
    review_max_body_bytes: int = Field(default=256 * 1024, ge=4096, le=64 * 1024 * 1024,
                                       description="longest request body the review app reads (413 past it)")
    review_hash_concurrency: int = Field(default_factory=lambda: max(1, (os.cpu_count() or 2) // 2), ge=1, le=64,
                                         description="password verifications at once (argon2id, CPU-bound)")

    # --- the gate's scorecard: blind audit sample (ledger.audit_sample) ------------------------------
    audit_sample_share: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="share of released results also queued for a blind review in the review app (0: off; "
                    "e.g. 0.05); drawn reproducibly from the Study Instance UID, delivery is not delayed")

    # --- metrics (Prometheus) ------------------------------------------------------------------------
    scp_metrics_port: int = Field(default=0, ge=0, le=65535,
                                  description="/metrics of the SCP on this port (0: off)")
    worker_metrics_port: int = Field(default=0, ge=0, le=65535,
                                     description="/metrics of a worker on this port (0: off); one per process")
    metrics_host: str = Field(default="127.0.0.1", description="address the SCP and worker metrics listen on")

    # --- drift alarms (ledger.drift) -----------------------------------------------------------------
    drift_enabled: bool = Field(default=True, description="chart every finished job per source and model; "
                                "alarms, the stop rule (off: nothing recorded, nothing held for drift)")
    drift_baseline_studies: int = Field(default=30, ge=2, le=100000,
                                        description="a chart's baseline: its source's first N studies")
    drift_baseline_since: datetime | None = Field(
        default=None, description="baseline by dates instead: studies from this time (with drift_baseline_until)")
    drift_baseline_until: datetime | None = Field(
        default=None, description="baseline by dates: studies before this time (UTC); charted after it")
    drift_ewma_lambda: float = Field(default=0.2, gt=0, le=1, description="EWMA weight of the OODM chart")
    drift_rate_lambda: float = Field(default=0.05, gt=0, le=1, description="EWMA weight of the OOD-rate chart")
    drift_limit_l: float = Field(default=3.0, gt=0, le=20,
                                 description="control limit: L asymptotic sd of the EWMA (an alarm past it)")
    drift_stop_l: float = Field(default=4.5, gt=0, le=30,
                                description="stop limit, above drift_limit_l: past it the source's results are held "
                                            "until an admin clears the alarm")
    drift_sd_floor: float = Field(default=0.05, gt=0, le=10,
                                  description="smallest baseline sd of log(OODM/tau) the chart divides by")
    drift_metadata_tolerance: float = Field(
        default=0.05, ge=0, le=10,
        description="slice thickness, pixel spacing, kVp past the baseline's range by more than this (relative) alarm")
    drift_hold_on_metadata: bool = Field(
        default=False, description="while a source's metadata alarm is open (a software version, station or kernel "
                                   "its sender's baselines never saw), hold its results whatever their OODM, until an "
                                   "admin clears the alarm (the new source's own chart is still gathering its baseline)")
    drift_notify_url: str | None = Field(default=None, description="POST each new drift alarm as JSON here "
                                                                   "(a webhook); a failure is audited, not fatal")

    # --- logging -----------------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="log level")

    @field_validator("review_viewer_url")
    @classmethod
    def _viewer_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        return validate_viewer_url(v)

    @field_validator("allowed_callers", mode="before")
    @classmethod
    def _parse_callers(cls, v: Any) -> Any:
        v = _split_csv(v)
        return [AllowedCaller.parse(x) if isinstance(x, str) else x for x in v]

    @field_validator("destinations", mode="after")
    @classmethod
    def _destinations_usable(cls, v: list[Destination]) -> list[Destination]:
        """Every file a destination names exists (and a TLS one's certificates load), and every
        environment variable that holds its credentials is set: read here, once, into the destination
        (a ``SecretStr``: never shown, dumped or written to the ledger). A token or password file is read
        again by each attempt (:func:`dicom_node.dicomweb.session_for`), so a rotated token is picked up."""
        out = []
        for d in v:
            for option, path in d.files():
                if not path.is_file():
                    raise ValueError(f"destination {d.name!r}: {option} {str(path)!r} is not a file")
            if d.tls_ca is not None or d.tls_cert is not None:
                from dicom_node.security import client_ssl_context

                try:
                    client_ssl_context(d.tls_ca, d.tls_cert, d.tls_key)
                except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                    raise ValueError(f"destination {d.name!r}: its TLS files do not load: {exc}") from None
            secrets: dict[str, SecretStr] = {}
            for option, field in (("token_env", "token"), ("password_env", "password")):
                name = getattr(d, option)
                if name is not None:
                    value = os.environ.get(name, "")
                    if not value.strip():
                        raise ValueError(f"destination {d.name!r}: {option} names {name!r}, which is not set "
                                         "in the environment")
                    secrets[field] = SecretStr(value.strip())
            out.append(d.model_copy(update=secrets) if secrets else d)
        return out

    @field_validator("destinations", mode="before")
    @classmethod
    def _parse_destinations(cls, v: Any) -> Any:
        v = _split_csv(v)
        return [Destination.parse(x) if isinstance(x, str) else x for x in v]

    @field_validator("archives", mode="before")
    @classmethod
    def _parse_archives(cls, v: Any) -> Any:
        v = _split_csv(v)
        return [Archive.parse(x) if isinstance(x, str) else x for x in v]

    @model_validator(mode="after")
    def _archives_consistent(self) -> Settings:
        """Archive names unique; ``completeness_archive`` maps allowed callers to configured archives;
        ``archive_credentials`` names DICOMweb archives, with files that exist."""
        names = [a.name for a in self.archives]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"archive names must be unique, repeated: {', '.join(dupes)}")
        known = ", ".join(names) or "none configured"
        callers = {c.ae_title for c in self.allowed_callers}
        for ae, name in self.completeness_archive.items():
            validate_ae_title(ae, what="completeness_archive calling AE title")
            if name not in names:
                raise ValueError(f"completeness_archive[{ae!r}] names archive {name!r}, which is not configured "
                                 f"(SPECGATE_ARCHIVES: {known})")
            if ae.strip() not in callers:
                raise ValueError(f"completeness_archive names calling AE title {ae!r}, which is not an allowed "
                                 f"caller (SPECGATE_ALLOWED_CALLERS): no study would ever come from it")
        for name, path in self.archive_credentials.items():
            archive = next((a for a in self.archives if a.name == name), None)
            if archive is None or archive.kind != "dicomweb":
                raise ValueError(f"archive_credentials names {name!r}, which is not a DICOMweb archive "
                                 f"(SPECGATE_ARCHIVES: {known})")
            if not Path(path).is_file():
                raise ValueError(f"archive_credentials[{name!r}]: file {str(path)!r} does not exist")
        return self

    def archive(self, name: str | None) -> Archive:
        """The archive called ``name``; None: the only one configured."""
        if name is None and len(self.archives) == 1:
            return self.archives[0]
        for a in self.archives:
            if a.name == name:
                return a
        known = ", ".join(a.name for a in self.archives) or "none configured"
        if name is None:
            raise SettingsError(f"name the archive (--from): SPECGATE_ARCHIVES has {known}")
        raise SettingsError(f"unknown archive {name!r} (SPECGATE_ARCHIVES: {known})")

    def completeness_config(self) -> CompletenessConfig:
        """What :mod:`dicom_node.completeness` (and the pull) needs to reach the archives."""
        return CompletenessConfig(archives=tuple(self.archives),
                                  by_source=tuple((ae.strip(), n) for ae, n in self.completeness_archive.items()),
                                  wait_s=self.completeness_wait_seconds, timeout_s=self.archive_timeout_seconds,
                                  ae_title=self.scu_ae_title, credentials=tuple(self.archive_credentials.items()))

    @field_validator("stow_tls_callers", mode="before")
    @classmethod
    def _parse_stow_tls_callers(cls, v: Any) -> Any:
        return [validate_ae_title(str(x), what="stow_tls_callers common name") for x in _split_csv(v)]

    @field_validator("stow_tokens", mode="before")
    @classmethod
    def _parse_stow_tokens(cls, v: Any) -> Any:
        v = _split_csv(v)
        return [StowToken.parse(x) if isinstance(x, str) else x for x in v]

    @field_validator("scp_ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return validate_ae_title(v, what="SCP AE title")

    @field_validator("scu_ae_title")
    @classmethod
    def _scu_ae(cls, v: str) -> str:
        return validate_ae_title(v, what="SCU AE title")

    @field_validator("scp_host", "metrics_host", "stow_host")
    @classmethod
    def _host(cls, v: str) -> str:
        return validate_host(v, allow_wildcard=False)

    @field_validator("database_url")
    @classmethod
    def _db_url(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        if not re.match(r"^(sqlite|postgresql(\+psycopg)?)://", v):
            raise ValueError(f"database URL must start with sqlite:// or postgresql+psycopg://, got {v.split('://')[0]!r}")
        if v.startswith("postgresql://"):
            v = "postgresql+psycopg://" + v[len("postgresql://"):]
        return v

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        if not re.match(r"^(redis|rediss|memory|filesystem|sqla\+[a-z+]+)://", v):
            raise ValueError(f"broker URL must be redis://, rediss:// or filesystem://, got {v.split('://')[0]!r}")
        return v

    @field_validator("inference_spacing")
    @classmethod
    def _inference_spacing(cls, v: str | None) -> str | None:
        if v is None or v.strip() == "":
            return None
        from model.study_inference import parse_spacing

        parse_spacing(v)  # raises ValueError naming the bad part
        return v.strip()

    @property
    def inference_spacing_pairs(self) -> SpacingPairs | None:
        """``inference_spacing`` parsed: None (the weights'), () (native) or (modality, (z, y, x)) pairs."""
        if self.inference_spacing is None:
            return None
        from model.study_inference import parse_spacing

        return parse_spacing(self.inference_spacing)

    @model_validator(mode="after")
    def _default_model_is_model_weights(self) -> Settings:
        """``default`` is model_weights/model_bank. Whether each rule's ``model`` exists is checked when
        ``specgate worker`` or ``scp`` starts (``specgate._context.AppContext.check_routing``): a rule may
        name a model registered in the ledger, which the settings cannot see."""
        default = self.models.get(DEFAULT_MODEL)
        if default is not None and (default.weights is not None or default.bank is not None):
            raise ValueError(f"models.{DEFAULT_MODEL} cannot set weights or bank: the {DEFAULT_MODEL!r} model is "
                             "model_weights/model_bank (or the shipped model); its table only describes its segment")
        missing = sorted(name for name, m in self.models.items()
                         if name != DEFAULT_MODEL and (m.weights is None or m.bank is None))
        if missing:
            raise ValueError(f"models.{missing[0]} (SPECGATE_MODELS, TOML [models.{missing[0]}]) needs weights and "
                             "bank (the OOD bank fitted for those weights)")
        return self

    @model_validator(mode="after")
    def _models_name_queues(self) -> Settings:
        """Each model's jobs have a queue of their own (``gpu.<model>``): a name a queue cannot carry (a comma,
        a space) is refused here, naming it, rather than when the first study is enqueued."""
        from worker.celery_app import segment_queue

        for where, name in [*((f"models.{n}", n) for n in self.models),
                            *((f"rule {r.name!r} model", r.model) for r in self.rules)]:
            try:
                segment_queue(name)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        return self

    @model_validator(mode="after")
    def _tls_consistent(self) -> Settings:
        if (self.scp_tls_cert is None) != (self.scp_tls_key is None):
            raise ValueError("scp_tls_cert and scp_tls_key must be set together")
        if self.scp_tls_require_client_cert and (self.scp_tls_cert is None or self.scp_tls_ca is None):
            raise ValueError("scp_tls_require_client_cert needs scp_tls_cert, scp_tls_key and scp_tls_ca")
        if (self.review_tls_cert is None) != (self.review_tls_key is None):
            raise ValueError("review_tls_cert and review_tls_key must be set together")
        names = [d.name for d in self.destinations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destination names must be unique, repeated: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _stow_consistent(self) -> Settings:
        if not self.stow_port:
            return self
        if self.stow_tls_cert is None or self.stow_tls_key is None:
            raise ValueError("stow_port needs stow_tls_cert and stow_tls_key: the STOW-RS endpoint is HTTPS only "
                             "(bearer tokens and patient data never cross the network in clear)")
        if not self.stow_tokens and self.stow_tls_ca is None:
            raise ValueError("stow_port needs stow_tokens or stow_tls_ca: no caller could authenticate")
        if (self.stow_tls_ca is None) != (not self.stow_tls_callers):
            raise ValueError("stow_tls_ca and stow_tls_callers go together: the CA verifies a client "
                             "certificate, the list names the common names allowed to store")
        if self.stow_port in (self.scp_port, self.scp_metrics_port):
            raise ValueError(f"stow_port {self.stow_port} is also the SCP's DICOM or metrics port")
        names = [t.name for t in self.stow_tokens]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stow_tokens names must be unique, repeated: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _limits_consistent(self) -> Settings:
        if self.scp_max_association_bytes < self.scp_max_instance_bytes:
            raise ValueError(f"scp_max_association_bytes ({self.scp_max_association_bytes}) is below "
                             f"scp_max_instance_bytes ({self.scp_max_instance_bytes}): an association could "
                             "not carry one instance of the largest size accepted")
        return self

    @model_validator(mode="after")
    def _worker_timing_consistent(self) -> Settings:
        """The relations the claim and the broker rely on: a live attempt's heartbeat never looks stale,
        a soft limit comes before its hard limit, and the broker does not give a message to a second
        worker while the task it started may still run (the visibility timeout outlasts every hard
        limit by :data:`worker.config.VISIBILITY_MARGIN_S`)."""
        env = f"{ENV_PREFIX}{{}}".format
        if self.worker_stale_seconds < 3 * self.worker_heartbeat_seconds:
            raise ValueError(f"{env('WORKER_STALE_SECONDS')} ({self.worker_stale_seconds:g}) must be at least 3 x "
                             f"{env('WORKER_HEARTBEAT_SECONDS')} ({self.worker_heartbeat_seconds:g}): a running job "
                             "would look abandoned between two heartbeats and be taken over")
        hard_limits = []
        for task in ("SEGMENT", "DELIVERY"):
            soft = getattr(self, f"worker_{task.lower()}_soft_time_limit_seconds")
            hard = getattr(self, f"worker_{task.lower()}_time_limit_seconds")
            if soft >= hard:
                raise ValueError(f"{env(f'WORKER_{task}_SOFT_TIME_LIMIT_SECONDS')} ({soft:g}) must be below "
                                 f"{env(f'WORKER_{task}_TIME_LIMIT_SECONDS')} ({hard:g}): the soft limit lets an "
                                 "attempt end cleanly before the hard one kills it")
            hard_limits.append((hard, env(f"WORKER_{task}_TIME_LIMIT_SECONDS")))
        hard, name = max(hard_limits)
        if self.broker_visibility_timeout_seconds < hard + VISIBILITY_MARGIN_S:
            raise ValueError(f"{env('BROKER_VISIBILITY_TIMEOUT_SECONDS')} ({self.broker_visibility_timeout_seconds:g}) "
                             f"must exceed {name} ({hard:g}) by at least {VISIBILITY_MARGIN_S:g} s: the broker "
                             "would hand a message to a second worker while the task it started may still run")
        return self

    @model_validator(mode="after")
    def _metrics_port_free(self) -> Settings:
        if self.scp_metrics_port and self.scp_metrics_port == self.scp_port:
            raise ValueError(f"scp_metrics_port {self.scp_metrics_port} is the DICOM port (scp_port): the SCP "
                             "cannot listen on it twice")
        return self

    # --- derived values ----------------------------------------------------------------------------
    @property
    def db_url(self) -> str:
        """The database URL in effect (the embedded SQLite file unless ``database_url`` is set)."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'specgate.db').resolve()}"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def installation(self) -> str:
        return self.installation_id or self.scp_ae_title

    @property
    def tls_enabled(self) -> bool:
        return self.scp_tls_cert is not None

    # --- each package's own configuration -----------------------------------------------------------
    def store_config(self) -> StoreConfig:
        """Where :mod:`store` keeps instance files and results."""
        return StoreConfig(kind=self.store, endpoint_url=self.s3_endpoint_url, bucket=self.s3_bucket,
                           prefix=self.s3_prefix, region=self.s3_region, access_key=self.s3_access_key,
                           secret_key=self.s3_secret_key, ca_bundle=self.s3_ca_bundle, cache_dir=self.cache_dir,
                           cache_max_bytes=self.cache_max_bytes)

    def node_config(self) -> NodeConfig:
        """What :mod:`dicom_node`'s SCP, listener and security need, and nothing else."""
        tls = None
        if self.scp_tls_cert is not None and self.scp_tls_key is not None:
            tls = TLSConfig(cert=self.scp_tls_cert, key=self.scp_tls_key, ca=self.scp_tls_ca,
                            require_client_cert=self.scp_tls_require_client_cert)
        return NodeConfig(
            spool_dir=self.spool_dir, ae_title=self.scp_ae_title, host=self.scp_host, port=self.scp_port,
            allowed_callers=tuple(self.allowed_callers), require_called_ae=self.scp_require_called_ae,
            max_associations=self.scp_max_associations, processes=self.scp_processes,
            acse_timeout=self.scp_acse_timeout, network_timeout=self.scp_network_timeout,
            dimse_timeout=self.scp_dimse_timeout, max_pdu=self.scp_max_pdu,
            spool_watermark_percent=self.spool_disk_watermark_percent, tls=tls,
            limits=ReceiveLimits(command_bytes=self.scp_max_command_bytes,
                                 element_bytes=self.scp_max_element_bytes,
                                 instance_bytes=self.scp_max_instance_bytes,
                                 association_bytes=self.scp_max_association_bytes,
                                 sequence_depth=self.scp_max_sequence_depth,
                                 inflated_bytes=self.scp_max_inflated_bytes),
            accept_deflated=self.scp_accept_deflated, data_dir=self.data_dir, store=self.store_config())

    def stow_config(self) -> StowConfig | None:
        """What :mod:`dicom_node.stow` needs; None when the endpoint is off (``stow_port`` 0)."""
        if not self.stow_port or self.stow_tls_cert is None or self.stow_tls_key is None:
            return None
        return StowConfig(tls=TLSConfig(cert=self.stow_tls_cert, key=self.stow_tls_key, ca=self.stow_tls_ca),
                          host=self.stow_host, port=self.stow_port, tokens=tuple(self.stow_tokens),
                          certificate_callers=tuple(self.stow_tls_callers),
                          max_connections=self.scp_max_associations, idle_timeout_s=self.scp_network_timeout)

    def assembly_config(self) -> AssemblyConfig:
        """What :class:`dicom_node.assembler.Assembler` needs."""
        return AssemblyConfig(quiet_seconds=self.study_quiet_seconds, rules=tuple(self.rules),
                              job_max_attempts=self.worker_max_attempts,
                              temp_max_age_s=self.node_config().temp_max_age_s,
                              completeness=self.completeness_config())

    def retry_policy(self) -> RetryPolicy:
        """How :mod:`dicom_node.scu` sends results: AE title, timeout, attempts and back-off."""
        return RetryPolicy(max_attempts=self.scu_max_attempts, backoff_s=self.scu_backoff_seconds,
                           backoff_max_s=self.scu_backoff_max_seconds, ae_title=self.scu_ae_title,
                           timeout_s=self.scu_timeout)

    def worker_config(self) -> WorkerConfig:
        """What :mod:`worker` (its tasks, pipeline, delivery and reconciler) needs."""
        return WorkerConfig(
            database_url=self.db_url, broker_url=self.broker_url, broker_dir=self.data_dir / "broker",
            pipeline=PipelineConfig(results_dir=self.results_dir, data_dir=self.data_dir, store=self.store_config(),
                                    installation=self.installation,
                                    rules=tuple(self.rules), heartbeat_s=self.worker_heartbeat_seconds,
                                    stale_after_s=self.worker_stale_seconds,
                                    audit_sample_share=self.audit_sample_share, drift=self.drift_config()),
            models=(ModelSpec(DEFAULT_MODEL, self.model_weights, self.model_bank,
                              segment=self.models.get(DEFAULT_MODEL, ModelFiles()).segment()),
                    *(ModelSpec(name, m.weights, m.bank, segment=m.segment())
                      for name, m in self.models.items() if name != DEFAULT_MODEL)),
            inference=InferenceOverrides(block=self.inference_block, overlap=self.inference_overlap,
                                         spacing=self.inference_spacing_pairs),
            delivery=DeliveryConfig(destinations=tuple(self.destinations), retry=self.retry_policy(),
                                    data_dir=self.data_dir, store=self.store_config()),
            reconcile_interval_s=self.reconcile_interval_seconds, queued_deadline_s=self.queued_deadline_seconds,
            torch_threads=self.worker_torch_threads,
            limits=TaskLimits(segment_soft_s=self.worker_segment_soft_time_limit_seconds,
                              segment_hard_s=self.worker_segment_time_limit_seconds,
                              deliver_soft_s=self.worker_delivery_soft_time_limit_seconds,
                              deliver_hard_s=self.worker_delivery_time_limit_seconds,
                              visibility_timeout_s=self.broker_visibility_timeout_seconds))

    def drift_config(self) -> DriftConfig:
        """What :mod:`ledger.drift` (the worker's charts, ``specgate drift``) needs."""
        return DriftConfig(enabled=self.drift_enabled, baseline_studies=self.drift_baseline_studies,
                           baseline_since=self.drift_baseline_since, baseline_until=self.drift_baseline_until,
                           ewma_lambda=self.drift_ewma_lambda, rate_lambda=self.drift_rate_lambda,
                           limit_l=self.drift_limit_l, stop_l=self.drift_stop_l, sd_floor=self.drift_sd_floor,
                           metadata_tolerance=self.drift_metadata_tolerance, notify_url=self.drift_notify_url,
                           hold_on_metadata=self.drift_hold_on_metadata)

    @model_validator(mode="after")
    def _drift_limits(self) -> Settings:
        if self.drift_stop_l <= self.drift_limit_l:
            raise ValueError(f"drift_stop_l ({self.drift_stop_l}) must be above drift_limit_l ({self.drift_limit_l})")
        if self.drift_baseline_since is not None and self.drift_baseline_until is None:
            raise ValueError("drift_baseline_since needs drift_baseline_until (the end of the baseline period)")
        if self.drift_notify_url is not None and not self.drift_notify_url.startswith(("https://", "http://")):
            raise ValueError(f"drift_notify_url must be an http(s) URL, not {self.drift_notify_url[:80]!r}")
        return self

    def review_config(self) -> ReviewConfig:
        """What :mod:`review` (the web app) needs."""
        return ReviewConfig(
            database_url=self.db_url, host=self.review_host, port=self.review_port,
            secret_file=self.review_secret_file or self.data_dir / "review-secret",
            secure_cookies=self.review_behind_tls_proxy or self.review_tls_cert is not None,
            tls_cert=self.review_tls_cert, tls_key=self.review_tls_key,
            session_s=self.review_session_minutes * 60, idle_s=self.review_idle_minutes * 60,
            viewer_url=self.review_viewer_url, failed_login_limit=self.review_failed_login_limit,
            max_body_bytes=self.review_max_body_bytes, hash_concurrency=self.review_hash_concurrency,
            data_dir=self.data_dir, store=self.store_config())

    def destination(self, name: str) -> Destination:
        for d in self.destinations:
            if d.name == name:
                return d
        known = ", ".join(d.name for d in self.destinations) or "none configured"
        raise SettingsError(f"unknown destination {name!r} (SPECGATE_DESTINATIONS: {known})")

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> Settings:
        """Build the settings: overrides > environment > TOML file > defaults.

        Raises :class:`SettingsError` with one line per bad setting, naming its environment variable.
        """
        unknown = sorted(k for k in os.environ
                         if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX):].lower() not in cls.model_fields)
        if unknown:
            raise SettingsError("unknown setting(s) in the environment (a typo?): " + ", ".join(unknown))
        toml_values: dict[str, Any] = {}
        if config_file is not None:
            try:
                toml_values = tomllib.loads(Path(config_file).read_text(encoding="utf-8"))
            except FileNotFoundError as exc:
                raise SettingsError(f"config file {str(config_file)!r} does not exist") from exc
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise SettingsError(f"config file {str(config_file)!r} is not valid TOML: {exc}") from exc

        class _FromFile(cls):  # type: ignore[valid-type, misc]
            @classmethod
            def settings_customise_sources(
                cls_,
                settings_cls: type[BaseSettings],
                init_settings: PydanticBaseSettingsSource,
                env_settings: PydanticBaseSettingsSource,
                dotenv_settings: PydanticBaseSettingsSource,
                file_secret_settings: PydanticBaseSettingsSource,
            ) -> tuple[PydanticBaseSettingsSource, ...]:
                return (init_settings, env_settings, _DictSource(settings_cls, toml_values))

        try:
            built = _FromFile(**overrides)
        except ValidationError as exc:
            raise SettingsError(describe_validation_error(exc)) from exc
        return cls.model_validate(built.model_dump(), context=None) if type(built) is not cls else built


class _DictSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._values = values

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


def describe_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = err.get("loc") or ()
        field = str(loc[0]) if loc else "settings"
        where = f"{ENV_PREFIX}{field.upper()}" if field in Settings.model_fields else field
        if len(loc) > 1:  # inside a table: which entry and key ([models.NAME] key, the n-th [[rules]])
            where += "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc[1:])
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"invalid setting {where}: {err.get('msg')}{shown}")
    return "\n".join(lines)
