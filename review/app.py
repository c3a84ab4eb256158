"""The review web app: login, the queue of held results, the study page, decisions, reports, users.

Server-rendered (Starlette + Jinja2 with autoescaping: every value that came from DICOM is escaped),
served by uvicorn (``specgate review``). Built by :func:`create_app` from a :class:`ReviewConfig`, the
ledger's sessionmaker and :class:`ReviewActions` (what happens after a decision: enqueue the delivery,
send a retraction), which the composition root supplies, so this package never imports the worker.

Security, as a hospital's review would ask:
- every page except ``/login``, ``/metrics`` and ``/static`` needs a session; without one a page answers
  303 to ``/login`` (an image or a POST answers 401/403);
- the session cookie is signed, HttpOnly, SameSite=Strict, and Secure when served over TLS or behind a
  TLS proxy (:mod:`review.auth` for the server side);
- every form carries the session's CSRF token (the login form a signed double-submit cookie); a POST
  without it is refused with 403 and nothing happens;
- pages that show patient data are ``Cache-Control: no-store``; a Content-Security-Policy allows scripts
  only from this app (an injected ``<script>`` would not run even if escaping failed);
- the patient's name and ID are shown on the study page only, never logged or counted.
"""

from __future__ import annotations

import csv
import inspect
import io
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import quote

from itsdangerous import BadSignature, URLSafeSerializer
from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ledger import audit
from ledger.db import DatabaseUnavailable, session_scope
from ledger.reviews import ReviewError, decide

from . import auth, queries, render
from .config import ReviewConfig

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


class _Denied(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status, self.message = status, message


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
            if path.endswith((".png", ".csv")):
                raise _Denied(401, "sign in first")
            raise _Redirect(f"/login?next={quote(path)}" if request.method == "GET" else "/login")
        if admin and not me.is_admin:
            raise _Denied(403, "this page is for administrators")
        return me

    async def form(self, request: Request, me: auth.SessionInfo) -> dict[str, str]:
        form = await request.form()
        values = {k: str(v) for k, v in form.items() if isinstance(v, str)}
        if not me.csrf_ok(values.get("csrf_token")):
            with session_scope(self.sessions) as s:
                audit.append(s, actor=f"user:{me.username}", action="auth.csrf_refused", object_type="user",
                             object_id=me.user_id, details={"path": request.url.path})
            raise _Denied(403, "the form's security token is missing or wrong: reload the page and try again")
        return values

    # --- login ------------------------------------------------------------------------------------
    async def login_page(self, request: Request) -> Response:
        nonce = secrets.token_urlsafe(24)
        response = self.render(request, "login.html", login_token=nonce, error=None,
                               next=_safe_next(request.query_params.get("next")))
        self._cookie(response, LOGIN_COOKIE, self.signer.dumps(nonce), max_age=3600)
        return response

    async def login(self, request: Request) -> Response:
        form = await request.form()
        values = {k: str(v) for k, v in form.items() if isinstance(v, str)}
        cookie = request.cookies.get(LOGIN_COOKIE, "")
        try:
            expected = self.signer.loads(cookie) if cookie else None
        except BadSignature:
            expected = None
        if not expected or not secrets.compare_digest(str(expected), values.get("login_token", "")):
            return PlainTextResponse("the login form's security token is missing or wrong: reload the page",
                                     status_code=403)
        remote = request.client.host if request.client else None

        def attempt() -> tuple[str | None, auth.LoginRefused | None]:
            with session_scope(self.sessions) as s:
                try:
                    user = auth.authenticate(s, values.get("username", ""), values.get("password", ""),
                                             limit=self.config.failed_login_limit, remote_addr=remote)
                except auth.LoginRefused as exc:
                    return None, exc  # committed: the failure's audit row and count stay
                return auth.open_session(s, user, lifetime_s=self.config.session_s, remote_addr=remote), None

        token, refused = await run_in_threadpool(attempt)
        if refused is not None or token is None:
            msg = str(refused)
            if refused is not None and refused.retry_after_s:
                msg += f": try again in {int(refused.retry_after_s) + 1} s"
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
        f = queries.QueueFilter(modality=qp.get("modality") or None, calling_ae=qp.get("ae") or None,
                                min_age_h=_float(qp.get("min_age_h")), max_age_h=_float(qp.get("max_age_h")))
        with session_scope(self.sessions) as s:
            rows, total = queries.queue(s, f)
            facets = queries.queue_facets(s)
            waiting = queries.held_count(s)
        return self.render(request, "queue.html", me=me, rows=rows, total=total, waiting=waiting, facets=facets,
                           filter=f)

    # --- study ------------------------------------------------------------------------------------
    def study_page(self, request: Request) -> Response:
        me = self.require(request)
        job_id = int(request.path_params["job_id"])
        message = self.flash(request)
        with session_scope(self.sessions) as s:
            view = queries.study_view(s, job_id)
            if view is None:
                raise _Denied(404, f"no job {job_id}")
            audit.append(s, actor=f"user:{me.username}", action="review.viewed", object_type="job",
                         object_id=job_id, details={"state": str(view.job.state)})
            waiting = queries.held_count(s)
        images = None
        histogram = None
        start_z = 0
        if view.result is not None and view.result.prob_path and view.series_paths:
            try:
                images = self.images.get(view.job.id, view.series_paths, Path(view.result.prob_path))
                start_z = render.slice_with_most_foreground(images)
            except (OSError, ValueError) as exc:
                log.warning("job %s: images cannot be shown (%s)", job_id, type(exc).__name__)
                images = None
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
        job_id = int(request.path_params["job_id"])
        z = int(request.path_params["z"])
        with session_scope(self.sessions) as s:
            files = queries.image_files(s, job_id)
        if files is None:
            return PlainTextResponse("no images for this job", status_code=404)
        window = request.query_params.get("window") or None
        overlay = request.query_params.get("overlay") or "mask"
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
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    async def approve(self, request: Request) -> Response:
        me = self.require(request)
        values = await self.form(request, me)
        job_id = int(request.path_params["job_id"])

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
        values = await self.form(request, me)
        job_id = int(request.path_params["job_id"])
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
        values = await self.form(request, me)
        job_id = int(request.path_params["job_id"])
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

        since, until = _date(request.query_params.get("since")), _date(request.query_params.get("until"))
        tables = {}
        with session_scope(self.sessions) as s:
            for name, report in REPORTS.items():
                tables[name] = report.run(s, since, until)
            waiting = queries.held_count(s)
        figures = {
            "OOD rate over time": charts.ood_rate_chart(tables.get("ood-rate", [])),
            "Turnaround percentiles": charts.turnaround_chart(tables.get("turnaround-daily", [])),
            "Review queue age": charts.queue_age_chart(tables.get("queue", [])),
        }
        return self.render(request, "reports.html", me=me, reports=REPORTS, tables=tables, figures=figures,
                           since=since, until=until, waiting=waiting)

    def report_csv(self, request: Request) -> Response:
        self.require(request, admin=True)
        from ledger.reports import REPORTS

        name = request.path_params["name"]
        report = REPORTS.get(name)
        if report is None:
            raise _Denied(404, f"no report named {name!r}")
        since, until = _date(request.query_params.get("since")), _date(request.query_params.get("until"))
        with session_scope(self.sessions) as s:
            rows = report.run(s, since, until)
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(report.column_names)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row.get(c) for c in report.column_names])
        return Response(out.getvalue(), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="specgate-{name}.csv"'})

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


def _float(v: str | None) -> float | None:
    try:
        return float(v) if v not in (None, "") else None
    except ValueError:
        return None


def _date(v: str | None) -> date | None:
    try:
        return date.fromisoformat(v) if v else None
    except ValueError:
        return None


_SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def _wrap(app: ReviewApp, handler: Callable[..., Any], *, html: bool = True) -> Callable[[Request], Awaitable[Response]]:
    """One error boundary per request: redirects to login, refusals as pages, no-store on pages."""

    async def endpoint(request: Request) -> Response:
        try:
            if inspect.iscoroutinefunction(handler):
                response = await handler(request)
            else:
                response = await run_in_threadpool(handler, request)
        except _Redirect as r:
            response = RedirectResponse(r.url, status_code=303)
        except DatabaseUnavailable as exc:
            log.error("review app: %s", exc)
            d = _Denied(503, "the ledger database cannot be reached: nothing was changed; try again shortly")
            response = _refusal(app, request, d, html, me=False)
        except _Denied as d:
            response = _refusal(app, request, d, html)
        for k, v in _SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        if html:
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    return endpoint


def _refusal(app: ReviewApp, request: Request, d: _Denied, html: bool, *, me: bool = True) -> Response:
    if not html:
        return PlainTextResponse(d.message, status_code=d.status)
    return app.render(request, "error.html", status=d.status, message=d.message,
                      me=app.current(request) if me else None, waiting=None)


def create_app(config: ReviewConfig, sessions: sessionmaker[Session], actions: ReviewActions, *,
               images: Any = None) -> Starlette:
    """The ASGI application. ``images`` is the slice cache (default: a :class:`review.render.ImageCache`)."""
    secret = load_secret(config.secret_file)
    cache = images if images is not None else _JobImages(render.ImageCache())
    app = ReviewApp(config, sessions, actions, secret, cache)
    w = _wrap
    routes = [
        Route("/", w(app, app.index)),
        Route("/login", w(app, app.login_page), methods=["GET"]),
        Route("/login", w(app, app.login), methods=["POST"]),
        Route("/logout", w(app, app.logout), methods=["POST"]),
        Route("/queue", w(app, app.queue_page)),
        Route("/studies/{job_id:int}", w(app, app.study_page)),
        Route("/studies/{job_id:int}/slices/{z:int}.png", w(app, app.slice_png, html=False)),
        Route("/studies/{job_id:int}/approve", w(app, app.approve), methods=["POST"]),
        Route("/studies/{job_id:int}/reject", w(app, app.reject), methods=["POST"]),
        Route("/studies/{job_id:int}/retract", w(app, app.retract), methods=["POST"]),
        Route("/reports", w(app, app.reports_page)),
        Route("/reports/{name}.csv", w(app, app.report_csv, html=False)),
        Route("/users", w(app, app.users_page), methods=["GET"]),
        Route("/users", w(app, app.users_post), methods=["POST"]),
        Route("/metrics", w(app, app.metrics, html=False)),
        Route("/healthz", w(app, app.health, html=False)),
        Mount("/static", StaticFiles(packages=[("review", "static")]), name="static"),
    ]
    return Starlette(routes=routes)


class _JobImages:
    """Adapter: the study page's images by job id, through the render module's cache."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def get(self, job_id: int, series_paths: list[Path], prob_path: Path) -> Any:
        return self.cache.get(job_id, lambda: render.StudyImages.open(series_paths, prob_path))
