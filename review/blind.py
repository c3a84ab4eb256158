"""The blind audit's pages: released results drawn for a blind review (:mod:`ledger.audit_sample`).

``/audit`` lists the blind reviews waiting, ``/audit/{sample}`` shows one: the patient banner, the slice
viewer with the model's mask, the labels, and two answers, *agree* or *reject* (a reason from the same list
as a held result's rejection, and a note). The page shows nothing of the gate's verdict (no OODM, no tau,
no percentile, no held or released, no deliveries, no history, whose audit details carry the OODM), so the
reviewer judges the segmentation alone. Any signed-in reviewer may answer. A rejection is recorded first
(the label), then the result, which reached the PACS, is retracted for quality through
:attr:`review.app.ReviewActions.retract` (an IHE IOCM rejection note, as ``specgate jobs retract``); a
retraction that cannot be made (the result was never sent, or was retracted already) is an audit event and
the page says why, and the label stands.

The page's blindness is a matter of what it shows: the images are the study page's
(``/studies/{job}/slices/...``), so a reviewer who goes to the job's own page sees the verdict there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from ledger import audit, audit_sample
from ledger.db import session_scope
from ledger.schema import AuditSample

from . import queries
from .security import parse_id

if TYPE_CHECKING:
    from .app import ReviewApp

__all__ = ["routes"]


def routes(app: ReviewApp) -> list[Route]:
    """The blind audit's routes, served by ``app`` (its sessions, templates, sign-in and CSRF checks)."""

    def back(sample_id: int, message: str) -> Response:
        return RedirectResponse(f"/audit/{sample_id}?msg={quote(app.signer.dumps(message))}", status_code=303)

    def queue_page(request: Request) -> Response:
        me = app.require(request)
        with session_scope(app.sessions) as s:
            rows = audit_sample.pending(s)
            waiting = queries.held_count(s)
        return app.render(request, "audit_queue.html", me=me, rows=rows, waiting=waiting)

    def blind_page(request: Request) -> Response:
        me = app.require(request)
        sample_id = parse_id(request.path_params["sample_id"], "audit sample")
        with session_scope(app.sessions) as s:
            sample = s.get(AuditSample, sample_id)
            view = None if sample is None else queries.study_view(s, sample.job_id, app.config.files)
            if sample is None or view is None:
                raise HTTPException(404, f"no audit sample {sample_id}")
            audit.append(s, actor=f"user:{me.username}", action="audit_sample.viewed", object_type="job",
                         object_id=sample.job_id, details={"sample_id": sample_id})
            waiting = queries.held_count(s)
            state, reviewed_by, reviewed_at = str(sample.state), sample.reviewed_by, sample.reviewed_at
        images, start_z = app.study_images(view)
        return app.render(request, "blind.html", me=me, v=view, sample_id=sample_id, state=state,
                          reviewed_by=reviewed_by, reviewed_at=reviewed_at, images=images, start_z=start_z,
                          windows=list(images.windows) if images is not None else [], waiting=waiting,
                          message=app.flash(request), reject_reasons=queries.REJECT_REASONS)

    async def decide(request: Request) -> Response:
        me = app.require(request)
        sample_id = parse_id(request.path_params["sample_id"], "audit sample")
        values = await app.form(request, me)
        verdict = values.get("verdict", "")
        code = values.get("reason_code", "")
        note = (values.get("note") or "").strip()
        if verdict == "reject":
            if code not in queries.REJECT_REASONS:
                return back(sample_id, "not recorded: choose a reason from the list")
            if code == "other" and not note:
                return back(sample_id, "not recorded: 'Other' needs a note saying why")
        reason = (f"{code}: {note}" if note else code) if verdict == "reject" else (note or None)
        retract = app.actions.retract

        def run() -> str:
            try:
                with session_scope(app.sessions) as s:
                    job_id = audit_sample.decide(s, sample_id, user=me.username, verdict=verdict,
                                                 reason=reason).job_id
            except audit_sample.AuditSampleError as exc:
                return f"not recorded: {exc}"
            if verdict == "agree":
                return "recorded: you agree with the segmentation"
            refused = None
            retraction_id = None
            if retract is None:
                refused = "retraction is not available from this server"
            else:
                try:
                    retraction_id = retract(job_id, me.username, "quality", f"blind audit sample {sample_id}: {reason}")
                except ValueError as exc:  # RetractionError: never sent, or retracted already
                    refused = str(exc)
            with session_scope(app.sessions) as s:
                audit_sample.record_retraction(s, sample_id, user=me.username, retraction_id=retraction_id,
                                               refused=refused)
            if refused:
                return f"rejection recorded; the result was not retracted: {refused}"
            return "rejection recorded: the result is retracted (the rejection note is on its way to the PACS)"

        return back(sample_id, await run_in_threadpool(run))

    return [Route("/audit", queue_page), Route("/audit/{sample_id:int}", blind_page),
            Route("/audit/{sample_id:int}/decide", decide, methods=["POST"])]
