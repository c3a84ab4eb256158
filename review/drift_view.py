"""The drift alarms on the reports page (:mod:`ledger.drift`): a banner per open alarm with its source,
statistic and limit, a form to clear it (admins, CSRF as every form, a reason required: audited with who
and why), and the control chart of every alarmed source (:func:`review.drift_charts.drift_chart`).

Wired by :func:`review.app.create_app`: :func:`panel` feeds the page, :func:`clear_alarm` is the POST
``/drift/{alarm_id}/clear`` route.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ledger import drift

from .drift_charts import drift_chart

if TYPE_CHECKING:
    from .app import ReviewApp

__all__ = ["DriftPanel", "clear_alarm", "panel"]

MAX_CHARTS = 6  # charts drawn on the page (the alarmed sources, stop alarms first)


@dataclass(frozen=True)
class DriftPanel:
    alarms: list[drift.AlarmView]
    charts: dict[str, str]  # caption -> SVG


def _source(a: drift.AlarmView) -> str:
    parts = [a.calling_ae, a.station_name, a.manufacturer_model, a.software_versions]
    return " / ".join(p for p in parts if p)


def panel(s: Session) -> DriftPanel:
    """The open alarms and the charts of their sources."""
    alarms = drift.open_alarms(s)
    charts: dict[str, str] = {}
    for a in alarms:
        caption = f"{_source(a)}, model {a.model}"
        if caption in charts or len(charts) >= MAX_CHARTS:
            continue
        charts[caption] = drift_chart(drift.chart_points(s, a.chart_id), caption)
    return DriftPanel(alarms, charts)


async def clear_alarm(app: ReviewApp, request: Request) -> Response:
    """POST ``/drift/{alarm_id}/clear``: an admin clears an open alarm with a reason."""
    me = app.require(request, admin=True)
    values = await app.form(request, me)
    alarm_id = int(request.path_params["alarm_id"])

    def run(s: Session) -> str:
        alarm = drift.clear(s, alarm_id, user=f"user:{me.username}", reason=values.get("reason", ""),
                            rebaseline=values.get("rebaseline") == "1")
        return f"drift alarm {alarm_id} ({alarm.kind}) cleared"

    try:
        msg = await run_in_threadpool(app._in_tx, run)
    except drift.DriftError as exc:
        msg = f"not cleared: {exc}"
    return RedirectResponse(f"/reports?msg={quote(app.signer.dumps(msg))}#drift", status_code=303)
