"""``specgate studies pull``: retrieve a study from a configured archive so it runs through the normal
rules (registered in :mod:`specgate.cli`). How: :mod:`dicom_node.pull`.

Exit codes: 0 pulled; 1 the archive did not answer, or the retrieve failed; 3 the archive holds no such
study (or several for one accession number). Every pull is audited with who asked (``--as``, else the
operator's login): ``studies.pull_requested``, then ``studies.pull_done`` with the counts or
``studies.pull_failed`` with the reason.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from ._context import AppContext, operator, pass_app

__all__ = ["register", "studies"]

EXIT_NOT_FOUND = 3


@click.group("studies")
def studies() -> None:
    """Studies held by specgate and by the archives it may ask."""


def _held(app: AppContext, study_uid: str) -> int:
    from sqlalchemy import func, select

    from ledger.schema import Instance, Series, Study

    with app.sessions()() as s:
        return int(s.execute(select(func.count(Instance.id)).join(Series, Series.id == Instance.series_id)
                             .join(Study, Study.id == Series.study_id)
                             .where(Study.study_instance_uid == study_uid)).scalar_one())


def _audit(app: AppContext, actor: str, action: str, object_id: str, details: dict[str, Any]) -> None:
    from ledger import audit
    from ledger.db import session_scope

    with session_scope(app.sessions()) as s:
        audit.append(s, actor=actor, action=action, object_type="study", object_id=object_id, details=details)


@studies.command("pull")
@click.option("--accession", default=None, help="find the study by its Accession Number (C-FIND / QIDO-RS)")
@click.option("--study", "study_uid", default=None, help="the study's Study Instance UID")
@click.option("--from", "archive_name", default=None, help="the archive (SPECGATE_ARCHIVES); default: the only one")
@click.option("--as", "user", default=None, help="who asked, for the audit trail; default: operator:<login>")
@click.option("--method", type=click.Choice(["move", "get"]), default="move", show_default=True,
              help="a DIMSE archive: C-MOVE to our SCP, or C-GET on our own association")
@pass_app
def pull_command(app: AppContext, accession: str | None, study_uid: str | None, archive_name: str | None,
                 user: str | None, method: str) -> None:
    """Retrieve a study from an archive (C-MOVE to our SCP; C-GET or WADO-RS into the spool) and let it
    run through the normal rules: the SCP's assembler makes its job after the quiet period.

    For C-MOVE a DIMSE archive must know this node (its AE title SPECGATE_SCP_AE_TITLE, host and port) as a
    move destination, and `specgate scp` must be running. A study already held gets a new job version only
    if the pull brings instances that were not held.
    """
    from dicom_node.archive import ArchiveUnreachable, DimseArchive, MoveProgress, open_archive
    from dicom_node.pull import NotFound, pull_by_get, pull_by_move, pull_by_wado, resolve_study
    from dicom_node.spool import InvalidUID, validate_uid

    if (accession is None) == (study_uid is None):
        raise click.UsageError("give exactly one of --accession and --study")
    if study_uid is not None:
        try:
            study_uid = validate_uid(study_uid, what="--study")
        except InvalidUID as exc:
            raise click.UsageError(str(exc)) from exc
    from .settings import SettingsError

    settings = app.settings
    try:
        archive = settings.archive(archive_name)
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from exc
    if archive.kind == "dicomweb" and method != "move":
        raise click.UsageError(f"--method {method} is for a DIMSE archive; {archive.name} is DICOMweb (WADO-RS)")
    actor = user.strip() if user and user.strip() else operator()
    how = "wado-rs" if archive.kind == "dicomweb" else f"c-{method}"
    asked = {"archive": archive.name, "accession": accession, "study_instance_uid": study_uid,
             "requested_by": actor, "method": how}
    _audit(app, actor, "studies.pull_requested", study_uid or f"accession:{accession}", asked)
    cfg = settings.completeness_config()
    client = open_archive(archive, timeout_s=cfg.timeout_s, ae_title=cfg.ae_title, credentials=cfg.credentials_of(archive))
    shown = [-1]

    def progress(p: MoveProgress) -> None:
        done = p.completed + p.failed + p.warning
        total = done + (p.remaining or 0)
        step = max(1, total // 20)
        if done - shown[0] >= step or p.remaining == 0:
            shown[0] = done
            click.echo(f"  {done}/{total} retrieved" + (f", {p.failed} failed" if p.failed else ""))

    try:
        uid, counts = resolve_study(client, accession=accession, study_uid=study_uid)
        click.echo(f"study {uid}: {counts.instances} instance(s) in {len(counts.series)} series at {archive.name}")
        before = _held(app, uid)
        if isinstance(client, DimseArchive) and how == "c-move":
            result = pull_by_move(client, uid, counts, our_ae=settings.scp_ae_title, progress=progress)
        else:
            from dicom_node.receive import InstanceReceiver
            from dicom_node.scp import IMAGE_STORAGE_SOP_CLASSES
            from dicom_node.spool import Spool

            node = settings.node_config()
            receiver = InstanceReceiver(Spool(node.spool_dir, watermark_percent=node.spool_watermark_percent).open(),
                                        app.sessions(), actor=actor, image_sop_classes=IMAGE_STORAGE_SOP_CLASSES,
                                        data_dir=node.data_dir, remote_store=node.files.remote)
            try:
                if isinstance(client, DimseArchive):
                    result = pull_by_get(client, uid, counts, receiver, storage=sorted(IMAGE_STORAGE_SOP_CLASSES),
                                         limits=node.limits,
                                         progress=progress)
                else:
                    result = pull_by_wado(client, uid, counts, receiver, limits=node.limits, progress=progress)
            finally:
                receiver.close()
    except NotFound as exc:
        _audit(app, actor, "studies.pull_failed", study_uid or f"accession:{accession}",
               {**asked, "reason": "not_found", "error": str(exc)})
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_NOT_FOUND)
    except ArchiveUnreachable as exc:
        _audit(app, actor, "studies.pull_failed", study_uid or f"accession:{accession}",
               {**asked, "reason": "archive_unreachable", "error": str(exc)})
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    held = _held(app, uid)
    done = {**asked, "study_instance_uid": uid, "at_source": counts.instances, "series_at_source": len(counts.series),
            "retrieved": result.completed, "failed": result.failed, "warning": result.warning,
            "new": held - before, "held": held, "refused": result.refused[:20]}
    _audit(app, actor, "studies.pull_done", uid, done)
    click.echo(f"pulled {result.completed} of {counts.instances} instance(s) from {archive.name}"
               + (f", {result.failed} failed" if result.failed else "")
               + f"; {held - before} new, {held} held; "
               + ("the SCP's assembler makes the job after the quiet period" if held > before
                  else "nothing new: the study's jobs stand as they are"))
    if result.failed:
        sys.exit(1)


def register(main: click.Group) -> None:
    main.add_command(studies)
