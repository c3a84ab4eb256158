"""The review web app: login, the queue of held results, the study page, decisions, reports, users.

Server-rendered (Starlette + Jinja2 with autoescaping: every value that came from DICOM is escaped),
served by uvicorn (``specgate review``). Built by :func:`create_app` from a :class:`ReviewConfig`, the
ledger's sessionmaker and :class:`ReviewActions` (what happens after a decision: enqueue the delivery,
send a retraction), which the composition root supplies, so this package never imports the worker.

Security, as a hospital's review would ask (and a penetration tester with OWASP ASVS level 2 checks):
- every page except ``/login``, ``/metrics``, ``/healthz`` and ``/static`` needs a session; without one a
  page answers 303 to ``/login``, an image, a CSV or a POST answers 401;
- the session cookie is signed, HttpOnly, SameSite=Strict, and Secure when served over TLS or behind a
  TLS proxy (:mod:`review.auth` for the server side);
- every form carries the session's CSRF token (the login form a signed double-submit cookie); a POST
  without it is refused with 403 and nothing happens;
- every response (pages, errors, images, CSVs, static files) carries the security headers and
  ``Cache-Control: no-store`` (:class:`review.security.SecurityHeaders`, one middleware); a
  Content-Security-Policy allows scripts only from this app (an injected ``<script>`` would not run even
  if escaping failed);
- bad input answers 4xx with its reason, never 5xx: every query, path and form value is checked at the
  boundary (:mod:`review.security`), and Starlette's own errors render the app's error page; a request
  body past ``max_body_bytes`` is refused with 413 before it is read; forms are urlencoded only;
- every refused login gets the same answer, whether the account exists, is disabled or is being slowed
  down; the password is verified outside any transaction, at most ``hash_concurrency`` at a time;
- CSV cells that a spreadsheet would run as a formula are written inert (:func:`ledger.reports.to_csv`);
- the patient's name and ID are shown on the study page only, never logged or counted.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import anyio.to_thread
from itsdangerous import BadSignature, URLSafeSerializer
from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from ledger import audit, audit_sample
from ledger.db import DatabaseUnavailable, session_scope
from ledger.reviews import ReviewError, decide

from . import auth, blind, drift_view, queries, render
from .config import ReviewConfig
from .security import (
    BadInput,
    BodyLimit,
    SecurityHeaders,
    parse_date,
    parse_float,
    parse_id,
    parse_text,
    tokens_equal,
)

__all__ = ["ReviewActions", "create_app", "load_secret"]

log = logging.getLogger("specgate.review")

SESSION_COOKIE = "specgate_session"
LOGIN_COOKIE = "specgate_login"
RETRACT_REASONS = {"quality": "Rejected for quality reasons", "patient-safety": "Rejected for patient safety reasons"}


@dataclass(frozen=True)
class ReviewActions:
    """What the app asks of the rest of specgate; supplied by ``specgate review``."""

    deliver: Callable[[int], None]
    retract: Callable[[int, str, str, str | None], int] | None = None  # (job, user, reason, note) -> id
    metrics: Callable[[], tuple[bytes, str]] | None = None


def load_secret(path: Path) -> bytes:
    """The key that signs cookies: read it, or make one (mode 0600) the first time. Two processes starting
    at once agree on one key: the new file is linked into place only if none is there yet."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "wb") as fh:
            fh.write(secrets.token_hex(32).encode())
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # fails if another process made the key first: that one is used
        except FileExistsError:
            log.info("session key %s made by another process; using it", path)
        finally:
            tmp.unlink()
    data = path.read_bytes().strip()
    if len(data) < 32:
        raise ValueError(f"session key {path} is shorter than 32 bytes: remove it to make a new one")
    return data


class _Redirect(Exception):
    def __init__(self, url: str) -> None:
        self.url = url


class _Denied(HTTPException):
    """A refusal the app answers with its error page (or plain text for images and CSVs)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status_code=status, detail=message)


#: the longest queue age filter, in hours (ten years)
MAX_AGE_H = 24 * 3653.0
#: the largest slice index a path may name
MAX_SLICE = 100_000
#: the most fields one form may have, and the longest value (a note)
MAX_FORM_FIELDS = 32
MAX_FORM_VALUE = 4000


def _fmt_age(seconds: float) -> str:
    s = max(int(seconds), 0)
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {(s % 3600) // 60:02d} min"
    return f"{s // 86400} d {(s % 86400) // 3600} h"


def _fmt_value(value: Any, kind: str) -> str:
    from ledger.reports import format_value

    return format_value(value, kind)  # type: ignore[arg-type]


def _templates() -> Environment:
    env = Environment(loader=PackageLoader("review", "templates"), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["age"] = _fmt_age
    env.filters["fmt"] = _fmt_value
    env.filters["ts"] = lambda d: d.strftime("%Y-%m-%d %H:%M:%S UTC") if d is not None else ""
    return env


class ReviewApp:
    """The routes, with the state they share (config, ledger sessions, templates, signer, image cache)."""

    def __init__(self, config: ReviewConfig, sessions: sessionmaker[Session], actions: ReviewActions,
                 secret: bytes, images: Any) -> None:
        self.config, self.sessions, self.actions = config, sessions, actions
        self.signer = URLSafeSerializer(secret, salt="specgate-review")
        self.env = _templates()
        self.images = images
        self.hash_limiter = anyio.CapacityLimiter(config.hash_concurrency)

    # --- plumbing ---------------------------------------------------------------------------------
    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = self.env.get_template(name).render(request=request, config=self.config, **context)
        return HTMLResponse(html, status_code=status)

    def _cookie(self, response: Response, key: str, value: str, max_age: int | None) -> None:
        response.set_cookie(key, value, max_age=max_age, httponly=True, samesite="strict",
                            secure=self.config.secure_cookies, path="/")

    def current(self, request: Request) -> auth.SessionInfo | None:
        raw = request.cookies.get(SESSION_COOKIE)
        if not raw:
            return None
        try:
            token = self.signer.loads(raw)
        except BadSignature:
            return None
        if not isinstance(token, str):
            return None
        with session_scope(self.sessions) as s:
            return auth.read_session(s, token, idle_s=self.config.idle_s)

    def require(self, request: Request, *, admin: bool = False) -> auth.SessionInfo:
        me = self.current(request)
        if me is None:
            path = request.url.path
            if path.endswith((".png", ".csv")) or request.method not in ("GET", "HEAD"):
                raise _Denied(401, "sign in first")
            raise _Redirect(f"/login?next={quote(path)}")
        if admin and not me.is_admin:
            raise _Denied(403, "this page is for administrators")
        return me

    async def read_form(self, request: Request) -> dict[str, str]:
        """The posted form, checked: urlencoded only (the app's forms are; multipart would only widen what
        a stranger can make the parser do), a bounded number of fields, values of printable text."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise BadInput("forms must be sent as application/x-www-form-urlencoded", status_code=415)
        form = await request.form(max_files=0, max_fields=MAX_FORM_FIELDS)
        values: dict[str, str] = {}
        for k, v in form.items():
            if isinstance(v, str):
                values[k] = parse_text(v, f"form field {k[:40]!r}", MAX_FORM_VALUE) or ""
        return values

    async def form(self, request: Request, me: auth.SessionInfo) -> dict[str, str]:
        values = await self.read_form(request)
        if not me.csrf_ok(values.get("csrf_token")):
            await run_in_threadpool(self._csrf_refused, request, f"user:{me.username}", me.user_id)
            raise _Denied(403, "the form's security token is missing or wrong: reload the page and try again")
        return values

    def _csrf_refused(self, request: Request, actor: str, user_id: int | str) -> None:
        with session_scope(self.sessions) as s:
            audit.append(s, actor=actor, action="auth.csrf_refused", object_type="user", object_id=user_id,
                         details={"path": request.url.path,
                                  **({"remote_addr": request.client.host} if request.client else {})})

    # --- login ------------------------------------------------------------------------------------
    async def login_page(self, request: Request) -> Response:
        nonce = secrets.token_urlsafe(24)
        response = self.render(request, "login.html", login_token=nonce, error=None,
                               next=_safe_next(request.query_params.get("next")))
        self._cookie(response, LOGIN_COOKIE, self.signer.dumps(nonce), max_age=3600)
        return response

    async def login(self, request: Request) -> Response:
        values = await self.read_form(request)
        cookie = request.cookies.get(LOGIN_COOKIE, "")
        try:
            expected = self.signer.loads(cookie) if cookie else None
        except BadSignature:
            expected = None
        if not isinstance(expected, str) or not tokens_equal(expected, values.get("login_token")):
            await run_in_threadpool(self._csrf_refused, request, "anonymous", "-")
            raise _Denied(403, "the login form's security token is missing or wrong: reload the page")
        remote = request.client.host if request.client else None
        username, password = values.get("username", ""), values.get("password", "")
        limit = self.config.failed_login_limit

        def lookup() -> auth.LoginAttempt:
            with session_scope(self.sessions) as s:
                return auth.login_lookup(s, username, limit=limit)

        def record(attempt: auth.LoginAttempt, ok: bool, rehash: str | None) -> tuple[str | None, bool]:
            with session_scope(self.sessions) as s:
                try:
                    user = auth.login_record(s, attempt, ok, limit=limit, rehash=rehash, remote_addr=remote)
                except auth.LoginRefused:
                    return None, False  # committed: the failure's audit row and count stay
                return auth.open_session(s, user, lifetime_s=self.config.session_s, remote_addr=remote), True

        attempt = await run_in_threadpool(lookup)
        # argon2 outside any transaction, and only hash_concurrency at a time: a burst of logins queues
        # here instead of taking every core from the radiologists' pages
        good, rehash = await anyio.to_thread.run_sync(auth.verify_password, attempt, password,
                                                    limiter=self.hash_limiter)
        token, _ = await run_in_threadpool(record, attempt, good, rehash)
        if token is None:
            msg = auth.LOGIN_REFUSED
            nonce = secrets.token_urlsafe(24)
            response = self.render(request, "login.html", status=401, login_token=nonce, error=msg,
                                   next=_safe_next(values.get("next")))
            self._cookie(response, LOGIN_COOKIE, self.signer.dumps(nonce), max_age=3600)
            return response
        ok = RedirectResponse(_safe_next(values.get("next")), status_code=303)
        self._cookie(ok, SESSION_COOKIE, self.signer.dumps(token), max_age=int(self.config.session_s))
        ok.delete_cookie(LOGIN_COOKIE, path="/")
        return ok

    async def logout(self, request: Request) -> Response:
        me = self.require(request)
        await self.form(request, me)
        await run_in_threadpool(self._in_tx, lambda s: auth.revoke_session(s, me))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    def back(self, job_id: int, message: str) -> Response:
        """Back to the study page with a message (signed: a link cannot put words in the app's mouth)."""
        return RedirectResponse(f"/studies/{job_id}?msg={quote(self.signer.dumps(message))}", status_code=303)

    def flash(self, request: Request) -> str | None:
        raw = request.query_params.get("msg")
        if not raw:
            return None
        try:
            value = self.signer.loads(raw)
        except BadSignature:
            return None
        return value if isinstance(value, str) else None

    def _in_tx(self, fn: Callable[[Session], Any]) -> Any:
        with session_scope(self.sessions) as s:
            return fn(s)

    # --- queue ------------------------------------------------------------------------------------
    def queue_page(self, request: Request) -> Response:
        me = self.require(request)
        qp = request.query_params
        f = queries.QueueFilter(modality=parse_text(qp.get("modality"), "modality", 16),
                                calling_ae=parse_text(qp.get("ae"), "ae", 64),
                                min_age_h=parse_float(qp.get("min_age_h"), "min_age_h", 0, MAX_AGE_H),
                                max_age_h=parse_float(qp.get("max_age_h"), "max_age_h", 0, MAX_AGE_H))
        with session_scope(self.sessions) as s:
            rows, total = queries.queue(s, f)
            facets = queries.queue_facets(s)
            waiting = queries.held_count(s)
            blind_waiting = audit_sample.pending_count(s)
        return self.render(request, "queue.html", me=me, rows=rows, total=total, waiting=waiting, facets=facets,
                           filter=f, blind_waiting=blind_waiting)

    # --- study ------------------------------------------------------------------------------------
    def study_images(self, view: queries.StudyView) -> tuple[Any, int]:
        """The slice viewer's images of a study page and the slice it opens on (None, 0: none to show)."""
        if view.result is None or view.prob_file is None or not view.series_paths:
            return None, 0
        try:
            images = self.images.get(view.job.id, view.series_paths, view.prob_file)
            return images, render.slice_with_most_foreground(images)
        except (OSError, ValueError) as exc:
            log.warning("job %s: images cannot be shown (%s)", view.job.id, type(exc).__name__)
            return None, 0

    def study_page(self, request: Request) -> Response:
        me = self.require(request)
        job_id = parse_id(request.path_params["job_id"], "job")
        message = self.flash(request)
        with session_scope(self.sessions) as s:
            view = queries.study_view(s, job_id, self.config.files)
            if view is None:
                raise _Denied(404, f"no job {job_id}")
            audit.append(s, actor=f"user:{me.username}", action="review.viewed", object_type="job",
                         object_id=job_id, details={"state": str(view.job.state)})
            waiting = queries.held_count(s)
        histogram = None
        images, start_z = self.study_images(view)
        if view.result is not None and view.prob_file is not None and view.series_paths:
            loo = view.evidence.get("bank_loo_oodm")
            if loo:
                histogram = render.bank_histogram_svg(loo, view.result.oodm, view.result.tau)
        viewer = None
        if self.config.viewer_url:
            viewer = self.config.viewer_url.format(study_instance_uid=view.study.study_instance_uid,
                                                   series_instance_uid=view.job.series_instance_uid or "")
        return self.render(request, "study.html", me=me, v=view, images=images, start_z=start_z,
                           histogram=histogram, viewer=viewer, waiting=waiting, message=message,
                           reject_reasons=queries.REJECT_REASONS, retract_reasons=RETRACT_REASONS,
                           windows=_windows(images))

    def slice_png(self, request: Request) -> Response:
        self.require(request)
        job_id = parse_id(request.path_params["job_id"], "job")
        z = int(request.path_params["z"])
        if not 0 <= z <= MAX_SLICE:
            raise _Denied(404, f"no slice {z}")
        with session_scope(self.sessions) as s:
            files = queries.image_files(s, job_id, self.config.files)
        if files is None:
            return PlainTextResponse("no images for this job", status_code=404)
        window = parse_text(request.query_params.get("window"), "window", 32)
        overlay = parse_text(request.query_params.get("overlay"), "overlay", 32) or "mask"
        try:
            images = self.images.get(job_id, *files)
        except (OSError, ValueError) as exc:  # a spool file gone, or the kept map does not fit the series
            log.warning("job %s: images cannot be shown (%s)", job_id, type(exc).__name__)
            return PlainTextResponse("the images of this job cannot be read", status_code=409)
        try:
            png = render.slice_png(images, z, window=window, overlay=overlay)
        except IndexError as exc:
            return PlainTextResponse(str(exc), status_code=404)
        except ValueError as exc:
            return PlainTextResponse(str(exc), status_code=400)
        return Response(png, media_type="image/png")  # no-store, as every response (SecurityHeaders)

    async def approve(self, request: Request) -> Response:
        me = self.require(request)
        job_id = parse_id(request.path_params["job_id"], "job")
        values = await self.form(request, me)

        def run() -> str:
            try:
                with session_scope(self.sessions) as s:
                    decide(s, job_id, user=me.username, decision="approve", reason=values.get("note") or None)
            except ReviewError as exc:
                return f"not approved: {exc}"
            self.actions.deliver(job_id)
            return "approved: the result is on its way to the PACS"

        return self.back(job_id, await run_in_threadpool(run))

    async def reject(self, request: Request) -> Response:
        me = self.require(request)
        job_id = parse_id(request.path_params["job_id"], "job")
        values = await self.form(request, me)
        code = values.get("reason_code", "")
        if code not in queries.REJECT_REASONS:
            return self.back(job_id, "not rejected: choose a reason from the list")
        note = (values.get("note") or "").strip()
        if code == "other" and not note:
            return self.back(job_id, "not rejected: 'Other' needs a note saying why")
        reason = f"{code}: {note}" if note else code

        def run() -> str:
            try:
                with session_scope(self.sessions) as s:
                    decide(s, job_id, user=me.username, decision="reject", reason=reason)
            except ReviewError as exc:
                return f"not rejected: {exc}"
            return "rejected: nothing will be sent"

        return self.back(job_id, await run_in_threadpool(run))

    async def retract(self, request: Request) -> Response:
        me = self.require(request)
        job_id = parse_id(request.path_params["job_id"], "job")
        values = await self.form(request, me)
        if self.actions.retract is None:
            return self.back(job_id, "retraction is not available from this server")
        reason = values.get("reason", "")
        if reason not in RETRACT_REASONS:
            return self.back(job_id, "not retracted: choose a reason")
        retract = self.actions.retract

        def run() -> str:
            try:
                retract(job_id, me.username, reason, (values.get("note") or "").strip() or None)
            except ValueError as exc:
                return f"not retracted: {exc}"
            return "retracted: the rejection note is on its way to the PACS"

        return self.back(job_id, await run_in_threadpool(run))

    # --- reports ----------------------------------------------------------------------------------
    def reports_page(self, request: Request) -> Response:
        me = self.require(request, admin=True)
        from ledger.reports import REPORTS

        from . import charts

        since, until = _period(request)
        tables = {}
        with session_scope(self.sessions) as s:
            for name, report in REPORTS.items():
                tables[name] = report.run(s, since, until)
            waiting = queries.held_count(s)
            drift = drift_view.panel(s)  # open drift alarms and their charts (review.drift_view)
        figures = {
            "OOD rate over time": charts.ood_rate_chart(tables.get("ood-rate", [])),
            "Turnaround percentiles": charts.turnaround_chart(tables.get("turnaround-daily", [])),
            "Review queue age": charts.queue_age_chart(tables.get("queue", [])),
            "The gate's scorecard per week": charts.gate_chart(tables.get("gate-weekly", [])),
            "Shadow models beside the live ones": charts.shadow_chart(tables.get("shadow", [])),
        }
        return self.render(request, "reports.html", me=me, reports=REPORTS, tables=tables, figures=figures,
                           since=since, until=until, waiting=waiting, drift=drift, message=self.flash(request))

    def report_csv(self, request: Request) -> Response:
        self.require(request, admin=True)
        from ledger.reports import REPORTS, to_csv

        name = request.path_params["name"]
        report = REPORTS.get(name)
        if report is None:
            raise _Denied(404, f"no report named {name[:64]!r}")
        since, until = _period(request)
        with session_scope(self.sessions) as s:
            rows = report.run(s, since, until)
        return Response(to_csv(report, rows), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="specgate-{name}.csv"'})

    # --- shadow (silent mode, ledger.shadow) --------------------------------------------------------
    def shadow_page(self, request: Request) -> Response:
        """Shadow results beside their live jobs; read-only, for every signed-in user."""
        me = self.require(request)
        from ledger.shadow import shadow_results

        with session_scope(self.sessions) as s:
            rows = shadow_results(s)
            waiting = queries.held_count(s)
        return self.render(request, "shadow.html", me=me, rows=rows, waiting=waiting)

    # --- users ------------------------------------------------------------------------------------
    def users_page(self, request: Request) -> Response:
        me = self.require(request, admin=True)
        with session_scope(self.sessions) as s:
            users = auth.list_users(s)
            waiting = queries.held_count(s)
        return self.render(request, "users.html", me=me, users=users, roles=auth.ROLES, waiting=waiting,
                           message=self.flash(request))

    async def users_post(self, request: Request) -> Response:
        me = self.require(request, admin=True)
        values = await self.form(request, me)
        action = values.get("action", "")
        name = values.get("username", "")
        actor = f"user:{me.username}"

        def run(s: Session) -> str:
            if action == "add":
                auth.add_user(s, name, role=values.get("role", ""), password=values.get("password", ""),
                              actor=actor, display_name=values.get("display_name"))
                return f"account {name} added"
            if action == "disable":
                if name == me.username:
                    raise auth.AccountError("you cannot disable your own account")
                auth.disable_user(s, name, actor=actor)
                return f"account {name} disabled; its sessions are ended"
            if action == "passwd":
                auth.set_password(s, name, values.get("password", ""), actor=actor)
                return f"password of {name} changed; its sessions are ended"
            raise auth.AccountError(f"unknown action {action!r}")

        try:
            msg = await run_in_threadpool(self._in_tx, run)
        except auth.AccountError as exc:
            msg = f"not done: {exc}"
        return RedirectResponse(f"/users?msg={quote(self.signer.dumps(msg))}", status_code=303)

    # --- the rest ---------------------------------------------------------------------------------
    def metrics(self, request: Request) -> Response:
        if self.actions.metrics is None:
            return PlainTextResponse("metrics are not configured", status_code=404)
        body, ctype = self.actions.metrics()
        return Response(body, media_type=ctype)

    def health(self, request: Request) -> Response:
        with session_scope(self.sessions) as s:
            queries.held_count(s)
        return PlainTextResponse("ok")

    def index(self, request: Request) -> Response:
        self.require(request)
        return RedirectResponse("/queue", status_code=303)


def _windows(images: Any) -> list[str]:
    if images is None:
        return []
    return list(images.windows)


def _safe_next(value: str | None) -> str:
    """Only a local path: ``next`` must never send a radiologist to another site after login."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/queue"


def _period(request: Request) -> tuple[date | None, date | None]:
    since = parse_date(request.query_params.get("since"), "since")
    until = parse_date(request.query_params.get("until"), "until")
    if since is not None and until is not None and since > until:
        raise BadInput(f"the period is empty: since {since.isoformat()} is after until {until.isoformat()}")
    return since, until


_PLAIN_PATHS = ("/metrics", "/healthz", "/static/")


def _is_plain(request: Request) -> bool:
    """Images, CSVs, metrics and static files are answered in plain text, not with a page."""
    path = request.url.path
    return path.endswith((".png", ".csv")) or path.startswith(_PLAIN_PATHS)


def _error_handlers(app: ReviewApp) -> dict[Any, Callable[[Request, Exception], Any]]:
    """One error page for every refusal: the app's own (403/404/409/...), Starlette's (404 for an unknown
    path, 405, 400 for a form it cannot parse), 413 from :class:`review.security.BodyLimit`, 503 when the
    ledger is down, and 500 for a bug (the traceback goes to the server log, never to the page)."""

    def page(request: Request, status: int, message: str, headers: dict[str, str] | None = None,
             who: bool = True) -> Response:
        if _is_plain(request):
            return PlainTextResponse(message, status_code=status, headers=headers)
        me = None
        if who:
            try:
                me = app.current(request)
            except DatabaseUnavailable:
                me = None
        response = app.render(request, "error.html", status=status, message=message, me=me, waiting=None)
        for k, v in (headers or {}).items():
            response.headers[k] = v
        return response

    def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        default = {404: "no such page", 405: "this page does not take that method"}.get(exc.status_code)
        return page(request, exc.status_code, str(exc.detail) if exc.detail and default is None else
                    default or str(exc.detail), headers=dict(exc.headers or {}), who=exc.status_code != 413)

    def redirect(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, _Redirect)
        return RedirectResponse(exc.url, status_code=303)

    def unavailable(request: Request, exc: Exception) -> Response:
        log.error("review app: %s", exc)
        return page(request, 503, "the ledger database cannot be reached: nothing was changed; try again shortly",
                    who=False)

    def server_error(request: Request, exc: Exception) -> Response:
        return page(request, 500, "something went wrong on the server: nothing was changed", who=False)

    return {HTTPException: http_error, _Redirect: redirect, DatabaseUnavailable: unavailable, 500: server_error}


class _ReviewStarlette(Starlette):
    """Starlette with :class:`review.security.SecurityHeaders` outside everything, Starlette's own
    ServerErrorMiddleware included, so that even a 500 carries the headers."""

    hsts: bool = False

    def build_middleware_stack(self) -> ASGIApp:
        return SecurityHeaders(super().build_middleware_stack(), hsts=self.hsts)


def create_app(config: ReviewConfig, sessions: sessionmaker[Session], actions: ReviewActions, *,
               images: Any = None) -> Starlette:
    """The ASGI application. ``images`` is the slice cache (default: a :class:`review.render.ImageCache`)."""
    secret = load_secret(config.secret_file)
    cache = images if images is not None else _JobImages(render.ImageCache())
    app = ReviewApp(config, sessions, actions, secret, cache)
    routes = [
        Route("/", app.index),
        Route("/login", app.login_page, methods=["GET"]),
        Route("/login", app.login, methods=["POST"]),
        Route("/logout", app.logout, methods=["POST"]),
        Route("/queue", app.queue_page),
        Route("/studies/{job_id:int}", app.study_page),
        Route("/studies/{job_id:int}/slices/{z:int}.png", app.slice_png),
        Route("/studies/{job_id:int}/approve", app.approve, methods=["POST"]),
        Route("/studies/{job_id:int}/reject", app.reject, methods=["POST"]),
        Route("/studies/{job_id:int}/retract", app.retract, methods=["POST"]),
        Route("/shadow", app.shadow_page),
        Route("/reports", app.reports_page),
        Route("/reports/{name}.csv", app.report_csv),
        Route("/drift/{alarm_id:int}/clear", functools.partial(drift_view.clear_alarm, app), methods=["POST"]),
        Route("/users", app.users_page, methods=["GET"]),
        Route("/users", app.users_post, methods=["POST"]),
        Route("/metrics", app.metrics),
        Route("/healthz", app.health),
        *blind.routes(app),  # the blind audit sample's queue and pages
        Mount("/static", StaticFiles(packages=[("review", "static")]), name="static"),
    ]
    web = _ReviewStarlette(routes=routes, exception_handlers=_error_handlers(app),
                           middleware=[Middleware(BodyLimit, max_bytes=config.max_body_bytes)])
    web.hsts = config.secure_cookies
    return web


class _JobImages:
    """Adapter: the study page's images by job id, through the render module's cache."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def get(self, job_id: int, series_paths: list[Path], prob_path: Path) -> Any:
        return self.cache.get(job_id, lambda: render.StudyImages.open(series_paths, prob_path))
