"""The append-only, hash-chained audit trail.

Each event's hash is the SHA-256 of its canonical content (time, actor, action, object, details) followed
by the previous event's hash, so changing, removing or reordering a row breaks the chain from that row on;
:func:`verify` names the first row that does not verify. Database triggers (migration 0001) refuse UPDATE
and DELETE on the table; the chain catches what a superuser does behind the triggers' back.

Details are JSON and must not carry patient names or IDs: :func:`append` refuses the usual keys.

    >>> canonical({"b": 1, "a": [1.5, "x"]})
    '{"a":[1.5,"x"],"b":1}'
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from .schema import AuditEvent, utcnow

__all__ = ["GENESIS_HASH", "VerifyResult", "append", "canonical", "event_hash", "iter_events", "verify"]

GENESIS_HASH = "0" * 64
# Keys whose values would be patient-identifying; refused in details at any depth.
FORBIDDEN_DETAIL_KEYS = frozenset(
    k.lower() for k in (
        "PatientName", "PatientID", "patient_name", "patient_id", "PatientBirthDate", "patient_birth_date",
        "OtherPatientIDs", "OtherPatientNames", "PatientAddress", "IssuerOfPatientID", "AccessionNumber",
        "accession_number",
    )
)
_PG_AUDIT_LOCK = 0x5EC6A7E  # advisory lock key that serialises appends to the chain in PostgreSQL


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _ts_text(ts: datetime) -> str:
    if ts.tzinfo is None:  # SQLite returns naive datetimes; they were written in UTC
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_hash(*, ts: datetime, actor: str, action: str, object_type: str, object_id: str,
               details: Mapping[str, Any], prev_hash: str) -> str:
    content = canonical({
        "ts": _ts_text(ts), "actor": actor, "action": action, "object_type": object_type,
        "object_id": object_id, "details": details,
    })
    return hashlib.sha256((content + prev_hash).encode("utf-8")).hexdigest()


def _check_details(details: Any, path: str = "details") -> None:
    if isinstance(details, Mapping):
        for key, value in details.items():
            if not isinstance(key, str):
                raise ValueError(f"{path} has a non-string key {key!r}")
            if key.lower() in FORBIDDEN_DETAIL_KEYS:
                raise ValueError(f"{path}.{key} would put patient-identifying data in the audit trail")
            _check_details(value, f"{path}.{key}")
    elif isinstance(details, list | tuple):
        for i, value in enumerate(details):
            _check_details(value, f"{path}[{i}]")


def append(session: Session, *, actor: str, action: str, object_type: str, object_id: str | int,
           details: Mapping[str, Any] | None = None) -> AuditEvent:
    """Add one event to the chain inside the caller's transaction (it lands when the caller commits).

    Appends are serialised: a PostgreSQL advisory transaction lock, or SQLite's write lock (every ledger
    transaction on SQLite begins IMMEDIATE), so two writers never chain onto the same head.
    """
    if not actor or not action or not object_type:
        raise ValueError("audit events need an actor, an action and an object type")
    body = dict(details or {})
    _check_details(body)
    canonical(body)  # refuses NaN/inf and non-JSON values before anything is written
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_AUDIT_LOCK})
    prev = session.execute(select(AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1)).scalar()
    prev_hash = prev or GENESIS_HASH
    # Microsecond precision is what both databases keep; hash what will be read back.
    ts = utcnow()
    event = AuditEvent(ts=ts, actor=actor[:128], action=action, object_type=object_type,
                       object_id=str(object_id), details=body, prev_hash=prev_hash)
    event.hash = event_hash(ts=ts, actor=event.actor, action=action, object_type=object_type,
                            object_id=event.object_id, details=body, prev_hash=prev_hash)
    session.add(event)
    session.flush()
    return event


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int
    head_hash: str
    first_bad_id: int | None = None
    problem: str | None = None

    def describe(self) -> str:
        if self.ok:
            return f"audit chain OK: {self.checked} events, head {self.head_hash}"
        return f"audit chain BROKEN at event id {self.first_bad_id}: {self.problem} ({self.checked} verified before it)"


def iter_events(session: Session, batch: int = 1000) -> Iterator[AuditEvent]:
    last_id = 0
    while True:
        rows = session.execute(
            select(AuditEvent).where(AuditEvent.id > last_id).order_by(AuditEvent.id).limit(batch)
        ).scalars().all()
        if not rows:
            return
        yield from rows
        last_id = rows[-1].id
        session.expunge_all()


def verify(session: Session) -> VerifyResult:
    """Walk the chain from the first event; return the first row whose link or hash does not verify."""
    prev_hash = GENESIS_HASH
    checked = 0
    for ev in iter_events(session):
        if ev.prev_hash != prev_hash:
            return VerifyResult(False, checked, prev_hash, ev.id,
                                "its previous-hash does not match the event before it (a row was removed, "
                                "inserted or reordered)")
        expected = event_hash(ts=ev.ts, actor=ev.actor, action=ev.action, object_type=ev.object_type,
                              object_id=ev.object_id, details=ev.details, prev_hash=ev.prev_hash)
        if expected != ev.hash:
            return VerifyResult(False, checked, prev_hash, ev.id,
                                "its content does not match its hash (the row was changed)")
        prev_hash = ev.hash
        checked += 1
    return VerifyResult(True, checked, prev_hash)


def count(session: Session) -> int:
    return int(session.execute(select(func.count(AuditEvent.id))).scalar_one())
