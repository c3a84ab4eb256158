"""Tell someone when a drift alarm opens: one JSON POST per new alarm to ``drift_notify_url`` (a chat or
paging webhook), after the alarm is committed. A refused or unreachable webhook never fails the job: the
failure is audited (``drift.notify_failed``) and logged, and the alarm stays on the reports page, in
``specgate drift status`` and in ``specgate_drift_alarms_open``.

The body carries the alarm, the source's calling AE and station and the model; never a patient's data.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict

from sqlalchemy.orm import Session, sessionmaker

from ledger import audit
from ledger.db import session_scope
from ledger.drift import DriftConfig, OpenedAlarm

__all__ = ["notify"]

log = logging.getLogger("specgate.worker.drift")


def notify(sessions: sessionmaker[Session], cfg: DriftConfig, alarms: Sequence[OpenedAlarm], *,
           actor: str = "worker") -> int:
    """POST each alarm to ``cfg.notify_url``; the number that were accepted (2xx)."""
    if not cfg.notify_url:
        return 0
    sent = 0
    for alarm in alarms:
        body = json.dumps({"event": "specgate.drift_alarm", **asdict(alarm)}).encode()
        request = urllib.request.Request(cfg.notify_url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=cfg.notify_timeout_s) as answer:  # noqa: S310 - http(s) only
                status = answer.status
        except urllib.error.HTTPError as exc:
            status, error = exc.code, f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            status, error = 0, f"{type(exc).__name__}: {exc}"
        else:
            error = "" if 200 <= status < 300 else f"HTTP {status}"
        if not error:
            sent += 1
            continue
        log.error("drift alarm %s: the notification to the webhook failed: %s", alarm.id, error)
        with session_scope(sessions) as s:
            audit.append(s, actor=actor, action="drift.notify_failed", object_type="drift_alarm", object_id=alarm.id,
                         details={"status": status, "error": error[:500]})
    return sent
