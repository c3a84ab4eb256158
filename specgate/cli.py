"""The ``specgate`` command: the composition root. Settings are built here, once, and passed down."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from .settings import Settings, SettingsError

__all__ = ["AppContext", "main"]

log = logging.getLogger("specgate")


@dataclass
class AppContext:
    """What every command gets: the settings, and the ledger engine opened on first use."""

    settings: Settings
    _engine: Any = field(default=None, repr=False)

    @property
    def engine(self) -> Any:
        if self._engine is None:
            from ledger.db import open_engine

            self._engine = open_engine(self.settings.db_url)
        return self._engine

    def sessions(self) -> Any:
        from ledger.db import sessionmaker_for

        return sessionmaker_for(self.engine)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # pynetdicom logs identifiers (patient names/IDs) at DEBUG; never let it.
    logging.getLogger("pynetdicom").setLevel(max(logging.INFO, logging.getLevelName(level)))
    logging.getLogger("alembic").setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TOML file with settings (environment variables SPECGATE_* override it).")
@click.version_option(package_name="specgate")
@click.pass_context
def main(ctx: click.Context, config_file: Path | None) -> None:
    """specgate: a clinical AI worker beside the PACS.

    It receives CT/MR studies over DICOM, segments them with a 3D CNN, checks each result with a spectral
    out-of-distribution gate, sends confident DICOM-SEG results back, holds the others for review, and
    keeps an append-only audit trail of every step.
    """
    try:
        settings = Settings.load(config_file)
    except SettingsError as exc:
        raise click.UsageError(f"configuration refused:\n{exc}") from exc
    _configure_logging(settings.log_level)
    app = AppContext(settings)
    ctx.obj = app
    ctx.call_on_close(app.close)


# ---------------------------------------------------------------------------------------------- db
@main.group()
def db() -> None:
    """Create or change the ledger's schema (Alembic migrations)."""


@db.command("upgrade")
@click.argument("revision", default="head")
@click.pass_obj
def db_upgrade(app: AppContext, revision: str) -> None:
    """Migrate the ledger up to REVISION (default: head)."""
    from ledger import migrations

    migrations.upgrade(app.settings.db_url, revision)
    click.echo(f"ledger at revision {migrations.current_revision(app.engine)}")


@db.command("downgrade")
@click.argument("revision")
@click.pass_obj
def db_downgrade(app: AppContext, revision: str) -> None:
    """Migrate the ledger down to REVISION (e.g. 0001, or 'base' to remove everything)."""
    from ledger import migrations

    migrations.downgrade(app.settings.db_url, revision)
    click.echo(f"ledger at revision {migrations.current_revision(app.engine) or 'base'}")


@db.command("current")
@click.pass_obj
def db_current(app: AppContext) -> None:
    """Print the ledger's current revision and the newest one this version knows."""
    from ledger import migrations

    click.echo(f"current: {migrations.current_revision(app.engine) or 'base'}  head: {migrations.head_revision()}")


# ------------------------------------------------------------------------------------------- audit
@main.group()
def audit() -> None:
    """The append-only audit trail."""


@audit.command("verify")
@click.pass_obj
def audit_verify(app: AppContext) -> None:
    """Walk the hash chain; exit 1 naming the first event that does not verify."""
    from ledger import audit as ledger_audit

    with app.sessions()() as session:
        result = ledger_audit.verify(session)
    click.echo(result.describe())
    if not result.ok:
        sys.exit(1)


# -------------------------------------------------------------------------------------------- jobs
@main.group()
def jobs() -> None:
    """List and inspect jobs in the ledger."""


def _gate_evidence(path: str | None) -> dict[str, Any] | None:
    """Why the gate decided as it did, from the result's evidence file (None when it is gone)."""
    try:
        ev = json.loads(Path(path).read_text()) if path else None
    except (OSError, ValueError):
        return None
    if not isinstance(ev, dict):
        return None
    return {"reason": ev.get("gate_reason"), "grid": ev.get("grid"),
            "spacing": (ev.get("inference") or {}).get("spacing")}


def _job_dict(job: Any, *, full: bool = False) -> dict[str, Any]:
    result = job.results[-1] if job.results else None
    d: dict[str, Any] = {
        "id": job.id,
        "study_instance_uid": job.study.study_instance_uid,
        "version": job.version,
        "state": str(job.state),
        "attempts": job.attempts,
        "reason_code": job.reason_code,
        "series_instance_uid": job.series_instance_uid,
        "rule": job.rule_name,
        "oodm": result.oodm if result else None,
        "tau": result.tau if result else None,
        "created_at": job.created_at.isoformat(),
        "updated_at": job.updated_at.isoformat(),
    }
    if full:
        d["reason_detail"] = job.reason_detail
        d["finished_at"] = job.finished_at.isoformat() if job.finished_at else None
        d["result"] = None if result is None else {
            "seg_sop_instance_uid": result.seg_sop_instance_uid, "seg_path": result.seg_path,
            "is_ood": result.is_ood, "model_id": result.model_id, "weights_sha256": result.weights_sha256,
            "superseded": result.superseded, "gate": _gate_evidence(result.evidence_path),
            "sr_sop_instance_uid": result.sr_sop_instance_uid,
        }
        d["retraction"] = _retraction_dict(job)
        d["reviews"] = [{"user": r.username, "decision": str(r.decision), "reason": r.reason,
                         "at": r.created_at.isoformat()} for r in job.reviews]
        d["deliveries"] = [{"destination": dv.destination, "state": str(dv.state), "attempts": dv.attempts,
                            "last_status": dv.last_status} for dv in job.deliveries]
    return d


def _retraction_dict(job: Any) -> dict[str, Any] | None:
    from sqlalchemy import select
    from sqlalchemy.orm import object_session

    from ledger.schema import Retraction, RetractionDelivery

    session = object_session(job)
    assert session is not None
    r = session.execute(select(Retraction).where(Retraction.job_id == job.id)).scalar_one_or_none()
    if r is None:
        return None
    rows = session.execute(select(RetractionDelivery).where(RetractionDelivery.retraction_id == r.id)
                           .order_by(RetractionDelivery.id)).scalars()
    return {"at": r.created_at.isoformat(), "user": r.username, "reason": str(r.reason), "note": r.note,
            "kos_sop_instance_uid": r.kos_sop_instance_uid,
            "deliveries": [{"destination": dv.destination, "state": str(dv.state), "attempts": dv.attempts,
                            "last_status": dv.last_status} for dv in rows]}


@jobs.command("list")
@click.option("--state", "states", multiple=True, help="Only jobs in this state (repeatable).")
@click.option("--limit", default=200, show_default=True, help="At most this many, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.pass_obj
def jobs_list(app: AppContext, states: tuple[str, ...], limit: int, as_json: bool) -> None:
    """List jobs, newest first."""
    from sqlalchemy import select

    from ledger.schema import Job, JobState

    try:
        wanted = [JobState(s) for s in states]
    except ValueError as exc:
        raise click.BadParameter(f"{exc}; states are {', '.join(s.value for s in JobState)}",
                                 param_hint="--state") from exc
    with app.sessions()() as session:
        q = select(Job).order_by(Job.id.desc()).limit(limit)
        if wanted:
            q = q.where(Job.state.in_(wanted))
        rows = [_job_dict(j) for j in session.execute(q).scalars()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no jobs")
        return
    click.echo(f"{'ID':>6}  {'STATE':<10} {'VER':>3} {'ATT':>3}  {'OODM':>8} {'TAU':>8}  STUDY")
    for r in rows:
        oodm = f"{r['oodm']:.4f}" if r["oodm"] is not None else "-"
        tau = f"{r['tau']:.4f}" if r["tau"] is not None else "-"
        click.echo(f"{r['id']:>6}  {r['state']:<10} {r['version']:>3} {r['attempts']:>3}  {oodm:>8} {tau:>8}  "
                   f"{r['study_instance_uid']}")


@jobs.command("show")
@click.argument("job_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def jobs_show(app: AppContext, job_id: int, as_json: bool) -> None:
    """Show one job: its state, result, reviews, deliveries and audit history."""
    from sqlalchemy import select

    from ledger.schema import AuditEvent, Job

    with app.sessions()() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise click.ClickException(f"job {job_id} does not exist")
        d = _job_dict(job, full=True)
        d["history"] = [
            {"at": e.ts.isoformat(), "actor": e.actor, "action": e.action, "details": e.details}
            for e in session.execute(select(AuditEvent).where(AuditEvent.object_type == "job",
                                                              AuditEvent.object_id == str(job_id))
                                     .order_by(AuditEvent.id)).scalars()
        ]
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    for key in ("id", "study_instance_uid", "version", "state", "attempts", "reason_code", "reason_detail",
                "series_instance_uid", "rule", "oodm", "tau", "created_at", "updated_at", "finished_at"):
        click.echo(f"{key:>20}: {d[key] if d[key] is not None else '-'}")
    if d["result"]:
        click.echo(f"{'result':>20}: {json.dumps(d['result'])}")
    for r in d["reviews"]:
        click.echo(f"{'review':>20}: {r['at']} {r['user']} {r['decision']} {r['reason'] or ''}")
    for dv in d["deliveries"]:
        click.echo(f"{'delivery':>20}: {dv['destination']} {dv['state']} attempts={dv['attempts']} "
                   f"status={dv['last_status']}")
    if d["retraction"]:
        r = d["retraction"]
        click.echo(f"{'retracted':>20}: {r['at']} by {r['user']} ({r['reason']}) {r['note'] or ''} "
                   f"KOS {r['kos_sop_instance_uid']}")
        for dv in r["deliveries"]:
            click.echo(f"{'retraction sent':>20}: {dv['destination']} {dv['state']} attempts={dv['attempts']} "
                       f"status={dv['last_status']}")
    click.echo("history:")
    for h in d["history"]:
        click.echo(f"  {h['at']}  {h['actor']:<24} {h['action']:<16} {json.dumps(h['details'])}")


# -------------------------------------------------------------------------------------------- demo
@main.command("demo")
@click.option("--timeout", default=900.0, show_default=True, help="Give up after this many seconds.")
@click.pass_obj
def demo(app: AppContext, timeout: float) -> None:
    """Run the whole product on embedded defaults: SCP, worker, gate, a local PACS, two studies.

    One study the shipped model knows is segmented, released and delivered; one of an organ it never saw
    is held for review. SQLite ledger and a filesystem broker in the data dir: no servers needed.
    """
    from ._demo import run_demo

    sys.exit(run_demo(app.settings, echo=click.echo, timeout_s=timeout))


from ._cli_model import model_group  # noqa: E402
from ._cli_worker import register as _register_worker  # noqa: E402

main.add_command(model_group)

_register_worker(main, jobs)

from ._cli_report import register as _register_report  # noqa: E402

_register_report(main)

from ._cli_dicom import echo_command, scp_command  # noqa: E402

main.add_command(scp_command)
main.add_command(echo_command)

from ._cli_review import register as _register_review  # noqa: E402

_register_review(main)

if __name__ == "__main__":  # pragma: no cover
    main()
