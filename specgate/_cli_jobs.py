"""``specgate jobs ...``: list and inspect jobs, and the operators' decisions on them (approve, reject,
retry, retract). Registered in :mod:`specgate.cli` by :func:`register`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ._cli_worker import celery_app
from ._context import AppContext, pass_app

if TYPE_CHECKING:
    from ledger.schema import Job
    from store import Store

__all__ = ["jobs", "register"]


@click.group("jobs")
def jobs() -> None:
    """List and inspect jobs in the ledger."""


def _gate_evidence(path: Path | None) -> dict[str, Any] | None:
    """Why the gate decided as it did, from the result's evidence file (None when it is gone)."""
    try:
        ev = json.loads(path.read_text()) if path else None
    except (OSError, ValueError):
        return None
    if not isinstance(ev, dict):
        return None
    return {"reason": ev.get("gate_reason"), "grid": ev.get("grid"),
            "spacing": (ev.get("inference") or {}).get("spacing")}


def _job_dict(job: Job, *, full: bool = False, files: Store | None = None) -> dict[str, Any]:
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
        "model": job.model_name,
        "shadow_of": job.shadow_of_id if job.shadow else None,  # silent mode (ledger.shadow)
        "shadow": job.shadow,
        "oodm": result.oodm if result else None,
        "tau": result.tau if result else None,
        "created_at": job.created_at.isoformat(),
        "updated_at": job.updated_at.isoformat(),
    }
    if full:
        from store import as_store

        store = as_store(files)

        def where(key: str) -> str:  # a local path with fs; the object's key with s3 (nothing fetched)
            return key if store.remote else str(store.path(key))

        d["reason_detail"] = job.reason_detail
        d["completeness"] = job.completeness  # what the source archive said (dicom_node.completeness)
        d["finished_at"] = job.finished_at.isoformat() if job.finished_at else None
        d["result"] = None if result is None else {
            "seg_sop_instance_uid": result.seg_sop_instance_uid,
            "seg_path": where(result.seg_path),
            "is_ood": result.is_ood, "model_id": result.model_id, "weights_sha256": result.weights_sha256,
            "superseded": result.superseded,
            "gate": _gate_evidence(store.path(result.evidence_path) if result.evidence_path else None),
            "sr_sop_instance_uid": result.sr_sop_instance_uid,
        }
        d["retraction"] = _retraction_dict(job)
        d["reviews"] = [{"user": r.username, "decision": str(r.decision), "reason": r.reason,
                         "at": r.created_at.isoformat()} for r in job.reviews]
        d["deliveries"] = [{"destination": dv.destination, "state": str(dv.state), "attempts": dv.attempts,
                            "last_status": dv.last_status} for dv in job.deliveries]
        d["attempt_history"] = [
            {"attempt": a.attempt, "host": a.host, "pid": a.pid, "device": a.device, "task_id": a.task_id,
             "started_at": a.started_at.isoformat(), "ended_at": a.ended_at.isoformat() if a.ended_at else None,
             "outcome": a.outcome, "reason_code": a.reason_code} for a in job.attempt_rows]
    return d


def _retraction_dict(job: Job) -> dict[str, Any] | None:
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
@pass_app
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
@pass_app
def jobs_show(app: AppContext, job_id: int, as_json: bool) -> None:
    """Show one job: its state, model, each attempt (host, process, device, how it ended), result, reviews,
    deliveries and audit history."""
    from sqlalchemy import select

    from ledger.schema import AuditEvent, Job

    with app.sessions()() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise click.ClickException(f"job {job_id} does not exist")
        d = _job_dict(job, full=True, files=app.files)
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
                "series_instance_uid", "rule", "model", "oodm", "tau", "created_at", "updated_at", "finished_at"):
        click.echo(f"{key:>20}: {d[key] if d[key] is not None else '-'}")
    for a in d["attempt_history"]:
        ended = (f"ended {a['ended_at']} -> {a['outcome']}" + (f" ({a['reason_code']})" if a["reason_code"] else "")
                 if a["ended_at"] else "running")
        click.echo(f"{'attempt ' + str(a['attempt']):>20}: host {a['host']} pid {a['pid']} device {a['device']}; "
                   f"started {a['started_at']}, {ended}")
    if d["shadow"]:
        click.echo(f"{'shadow':>20}: yes, beside job {d['shadow_of'] or '-'}: never approved or sent")
    if d["completeness"]:
        click.echo(f"{'completeness':>20}: {json.dumps(d['completeness'])}")
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


def _decide(app: AppContext, job_id: int, user: str, decision: str, reason: str | None) -> None:
    from ledger.db import session_scope
    from ledger.reviews import ReviewError, decide

    try:
        with session_scope(app.sessions()) as s:
            decide(s, job_id, user=user, decision=decision, reason=reason)
    except ReviewError as exc:
        raise click.ClickException(str(exc)) from exc


@jobs.command("approve")
@click.argument("job_id", type=int)
@click.option("--user", required=True, help="Who approves (recorded in the audit trail).")
@click.option("--reason", default=None, help="Optional note.")
@pass_app
def approve_command(app: AppContext, job_id: int, user: str, reason: str | None) -> None:
    """Approve a held result: it is then sent to every destination."""
    from worker.celery_app import Enqueuer

    _decide(app, job_id, user, "approve", reason)
    Enqueuer(celery_app(app), app.sessions()).deliver(job_id)
    click.echo(f"job {job_id} approved by {user}; delivery enqueued")


@jobs.command("reject")
@click.argument("job_id", type=int)
@click.option("--user", required=True, help="Who rejects (recorded in the audit trail).")
@click.option("--reason", required=True, help="Why (required).")
@pass_app
def reject_command(app: AppContext, job_id: int, user: str, reason: str) -> None:
    """Reject a held result: it is never sent."""
    _decide(app, job_id, user, "reject", reason)
    click.echo(f"job {job_id} rejected by {user}")


@jobs.command("retry")
@click.argument("job_id", type=int)
@click.option("--user", required=True, help="Who asks for the retry (recorded in the audit trail).")
@pass_app
def retry_command(app: AppContext, job_id: int, user: str) -> None:
    """Put a failed job back in the queue, with a fresh count of attempts."""
    from ledger import jobs
    from ledger.db import session_scope
    from ledger.schema import JobState
    from worker.celery_app import Enqueuer

    try:
        with session_scope(app.sessions()) as s:
            jobs.transition(s, job_id, JobState.QUEUED, actor=f"user:{user}", expect=JobState.FAILED,
                            attempts=0, details={"why": "operator retry"})
    except (jobs.TransitionError, LookupError) as exc:
        raise click.ClickException(str(exc)) from exc
    Enqueuer(celery_app(app), app.sessions(), app.settings.rules).segment(job_id)  # to its model's queue
    click.echo(f"job {job_id} queued again")


@jobs.command("retract")
@click.argument("job_id", type=int)
@click.option("--user", required=True, help="Who retracts (recorded in the audit trail and in the KOS).")
@click.option("--reason", required=True, type=click.Choice(["quality", "patient-safety"]),
              help="IHE IOCM rejection note: 'Rejected for Quality Reasons' or '... for Patient Safety Reasons'.")
@click.option("--note", default=None, help="Optional free text, kept in the ledger.")
@pass_app
def retract_command(app: AppContext, job_id: int, user: str, reason: str, note: str | None) -> None:
    """Take a sent result back: a Key Object Selection document (IHE IOCM) that rejects its SEG and SR is
    sent to every destination that received them."""
    from worker.celery_app import Enqueuer
    from worker.retraction import RetractionError, retract_job

    try:
        retraction_id = retract_job(app.sessions(), job_id, user=user, reason=reason, note=note,
                                    files=app.files)
    except RetractionError as exc:
        raise click.ClickException(str(exc)) from exc
    Enqueuer(celery_app(app), app.sessions()).retract(retraction_id)
    click.echo(f"job {job_id} retracted by {user} ({reason}); the rejection note is on its way to the PACS")


def register(main: click.Group) -> None:
    main.add_command(jobs)
