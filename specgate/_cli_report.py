"""``specgate report NAME``: the administrators' reports of :mod:`ledger.reports` as a table, CSV or JSON.

Registered in :mod:`specgate.cli`. Without NAME (or with ``--list``) it lists the reports.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

import click

from ._context import AppContext, pass_app

if TYPE_CHECKING:
    from ledger.reports import Report

__all__ = ["register", "render_csv", "render_json", "render_table"]

_NUMERIC = frozenset({"int", "float", "seconds", "rate"})


def _printable(text: str) -> str:
    """DICOM values (AE titles, station names) reach the terminal: no control characters."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def render_table(report: Report, rows: Sequence[dict[str, Any]]) -> str:
    """An aligned text table: numbers to the right, text to the left, '-' for nothing."""
    from ledger.reports import format_value

    header = [c.label.upper() for c in report.columns]
    body = [[_printable(format_value(row[c.name], c.kind)) for c in report.columns] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(header)]
    right = [c.kind in _NUMERIC for c in report.columns]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.rjust(w) if r else cell.ljust(w) for cell, w, r in zip(cells, widths, right, strict=True)
                         ).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out.extend(line(r) for r in body)
    return "\n".join(out)


def _plain(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def render_json(rows: Sequence[dict[str, Any]]) -> str:
    return json.dumps([{k: _plain(v) for k, v in row.items()} for row in rows], indent=2)


def render_csv(report: Report, rows: Sequence[dict[str, Any]]) -> str:
    """CSV with the column names as header; formula-like text made inert (:func:`ledger.reports.to_csv`)."""
    from ledger.reports import to_csv

    return to_csv(report, rows)


def _period_text(since: date | None, until: date | None) -> str:
    if since is None and until is None:
        return "all days"
    return f"{since.isoformat() if since else 'the start'} to {until.isoformat() if until else 'today'} (UTC)"


def _list_reports(fmt: str) -> None:
    from ledger.reports import REPORTS

    if fmt == "json":
        click.echo(json.dumps([{"name": r.name, "title": r.title, "description": r.description,
                                "columns": [{"name": c.name, "label": c.label, "kind": c.kind} for c in r.columns]}
                               for r in REPORTS.values()], indent=2))
        return
    width = max(len(name) for name in REPORTS)
    click.echo("reports (specgate report NAME [--since DAY] [--until DAY] [--format table|csv|json]):")
    for r in REPORTS.values():
        click.echo(f"  {r.name:<{width}}  {r.title}")


@click.command("report")
@click.argument("name", required=False)
@click.option("--since", type=click.DateTime(formats=["%Y-%m-%d"]), default=None,
              help="First UTC day included (YYYY-MM-DD).")
@click.option("--until", type=click.DateTime(formats=["%Y-%m-%d"]), default=None,
              help="Last UTC day included (YYYY-MM-DD).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--list", "list_only", is_flag=True, help="List the reports and exit.")
@pass_app
def report_command(app: AppContext, name: str | None, since: datetime | None, until: datetime | None, fmt: str,
                   list_only: bool) -> None:
    """Print an administrators' report: volume, turnaround, OOD rate, review queue, reviewers,
    delivery failures, failed jobs, the gate's scorecard (``specgate report --list``). Days are UTC and
    both ends are included."""
    from sqlalchemy.exc import DBAPIError

    from ledger.db import DatabaseUnavailable
    from ledger.reports import REPORTS

    if list_only or name is None:
        _list_reports(fmt)
        return
    report = REPORTS.get(name)
    if report is None:
        raise click.BadParameter(f"no report {name!r}; reports are {', '.join(REPORTS)}", param_hint="NAME")
    first = since.date() if since else None
    last = until.date() if until else None
    if first is not None and last is not None and first > last:
        raise click.BadParameter(f"--since {first.isoformat()} is after --until {last.isoformat()}: the period "
                                 "is empty", param_hint="--since/--until")
    try:
        with app.sessions()() as session:
            rows = report.run(session, first, last)
    except (DBAPIError, DatabaseUnavailable) as exc:
        detail = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise click.ClickException(f"report {name!r} could not be read from the ledger: {detail} "
                                   "(is the ledger migrated? specgate db upgrade)") from exc
    if fmt == "json":
        click.echo(render_json(rows))
    elif fmt == "csv":
        click.echo(render_csv(report, rows), nl=False)
    else:
        click.echo(f"{report.title}, {_period_text(first, last)}")
        click.echo(render_table(report, rows) if rows else "no rows in this period")


def register(main: click.Group) -> None:
    main.add_command(report_command)
