"""``specgate drift status`` and ``specgate drift clear``: the drift watch of :mod:`ledger.drift` from a
terminal (registered in :mod:`specgate.cli`)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ._context import AppContext, operator, pass_app

__all__ = ["drift", "register"]

_COLUMNS = (("chart", "CHART"), ("model", "MODEL"), ("calling_ae", "AE"), ("station_name", "STATION"),
            ("manufacturer_model", "SCANNER"), ("software_versions", "SOFTWARE"), ("studies", "STUDIES"),
            ("baseline_n", "BASELINE"), ("ewma_oodm", "EWMA OODM"), ("limit_oodm", "LIMIT"), ("stop_oodm", "STOP"),
            ("ewma_rate", "EWMA RATE"), ("limit_rate", "LIMIT"), ("open_alarms", "OPEN ALARMS"))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    text = f"{value:.4f}" if isinstance(value, float) else str(value)
    return "".join(ch if ch.isprintable() else "?" for ch in text)  # DICOM text reaches the terminal


@click.group("drift")
def drift() -> None:
    """Drift alarms: per source (calling AE, station, scanner, software) and model, an EWMA chart of the
    OODM and of the OOD rate, the acquisition metadata watched, and a stop rule."""


@drift.command("status")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@pass_app
def drift_status(app: AppContext, fmt: str) -> None:
    """Every chart (source x model): its baseline, statistics against their limits, and the open alarms."""
    from ledger import drift as ledger_drift

    cfg = app.settings.drift_config()
    with app.sessions()() as s:
        charts = ledger_drift.charts_status(s, cfg)
        alarms = ledger_drift.open_alarms(s)
    if fmt == "json":
        click.echo(json.dumps({"charts": charts, "open_alarms": [a.as_json() for a in alarms]}, indent=2))
        return
    rows = [[_cell(c[k]) for k, _ in _COLUMNS] for c in charts]
    header = [h for _, h in _COLUMNS]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    for line in [header, ["-" * w for w in widths], *rows]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    if not charts:
        click.echo("no charts yet: no study has finished since the drift watch was installed")
    click.echo("")
    if not alarms:
        click.echo("no open drift alarms")
    for a in alarms:
        what = (f"novel {a.detail.get('novel')}" if a.kind == "metadata" else
                f"statistic {_cell(a.statistic)} > limit {_cell(a.threshold)}")
        held = "  RESULTS HELD" if a.kind == "stop" else ""
        click.echo(f"alarm {a.id} {a.kind}{held}: {_cell(a.calling_ae)} / {_cell(a.station_name)} / "
                   f"{_cell(a.software_versions)}, model {a.model}: {what}; since job {a.first_job_id} "
                   f"({a.opened_at:%Y-%m-%d %H:%M} UTC)")


@drift.command("clear")
@click.argument("alarm_id", type=int)
@click.option("--reason", required=True, help="Why it is cleared (what was found, what was done).")
@click.option("--user", default=None, help="Who clears it (default: operator:<login>).")
@click.option("--rebaseline", is_flag=True,
              help="Also gather a new baseline from the source's next studies (a change accepted as normal).")
@pass_app
def drift_clear(app: AppContext, alarm_id: int, reason: str, user: str | None, rebaseline: bool) -> None:
    """Clear open drift alarm ALARM_ID, audited with who and why. A stop alarm's source is released: its
    next results are gated by their OODM again. A chart alarm restarts the chart's EWMA."""
    from ledger import drift as ledger_drift
    from ledger.db import session_scope

    who = f"user:{user}" if user else operator()
    try:
        with session_scope(app.sessions()) as s:
            alarm = ledger_drift.clear(s, alarm_id, user=who, reason=reason, rebaseline=rebaseline)
            kind = alarm.kind
    except ledger_drift.DriftError as exc:
        click.echo(f"not cleared: {exc}", err=True)
        sys.exit(1)
    click.echo(f"drift alarm {alarm_id} ({kind}) cleared by {who}")


def register(main: click.Group) -> None:
    main.add_command(drift)
