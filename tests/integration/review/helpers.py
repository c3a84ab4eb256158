"""The review app under test: a real uvicorn server on a free port, a plain HTTP client with cookies, and
held results made by the real pipeline (a tiny model, a bank far from the study, so the gate holds it)."""

from __future__ import annotations

import http.cookiejar
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from sqlalchemy import select

from ledger.db import session_scope
from ledger.schema import Job, JobState, Series
from model.data.phantoms import phantom_study
from review.app import ReviewActions, create_app
from review.auth import add_user
from review.config import ReviewConfig
from specgate.synthetic import write_series
from tests.integration.worker.test_pipeline import _ingest, _run, _segmenter, _signature_of
from tests.peers import free_port, wait_for

PASSWORD = "correct horse battery staple"


@dataclass
class Recorder:
    """The actions the app asks for, recorded (the tests that need a real delivery use a real one)."""

    delivered: list[int] = field(default_factory=list)
    retracted: list[tuple[int, str, str]] = field(default_factory=list)

    def deliver(self, job_id: int) -> None:
        self.delivered.append(job_id)

    def retract(self, job_id: int, user: str, reason: str, note: str | None) -> int:
        self.retracted.append((job_id, user, reason))
        return len(self.retracted)


class ReviewServer:
    """``create_app`` served by uvicorn in a thread of the test process, on 127.0.0.1 and a free port."""

    def __init__(self, config: ReviewConfig, sessions: Any, actions: ReviewActions, **app_options: Any) -> None:
        self.port = free_port()
        self.app = create_app(config, sessions, actions, **app_options)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, name="review-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ReviewServer:
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=30, what="the review app to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@dataclass
class Reply:
    status: int
    headers: Any
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    @property
    def location(self) -> str | None:
        return self.headers.get("Location")


class Client:
    """A browser without JavaScript: keeps cookies, does not follow redirects, reads CSRF tokens."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect())

    def request(self, method: str, path: str, data: dict[str, str] | None = None,
                headers: dict[str, str] | None = None) -> Reply:
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers or {})
        if body is not None:
            req.add_header("Content-Type", "application/x-www-form-urlencoded")
        try:
            with self.opener.open(req, timeout=60) as resp:
                return Reply(resp.status, resp.headers, resp.read())
        except urllib.error.HTTPError as err:
            return Reply(err.code, err.headers, err.read())

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def post(self, path: str, data: dict[str, str]) -> Reply:
        return self.request("POST", path, data)

    def login(self, username: str, password: str = PASSWORD) -> Reply:
        page = self.get("/login")
        token = re.search(r'name="login_token" value="([^"]+)"', page.text)
        assert token, page.text
        return self.post("/login", {"login_token": token.group(1), "username": username, "password": password,
                                    "next": "/queue"})

    def csrf(self, path: str = "/queue") -> str:
        page = self.get(path)
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert token, f"no CSRF token on {path}: {page.status} {page.text[:300]}"
        return token.group(1)

    def cookie(self, name: str) -> http.cookiejar.Cookie | None:
        return next((c for c in self.jar if c.name == name), None)


def make_user(sessions: Any, name: str, role: str, password: str = PASSWORD) -> None:
    with session_scope(sessions) as s:
        add_user(s, name, role=role, password=password, actor="test")


def holding_segmenter(tiny_model: Any, tmp_path: Path, case: Any) -> Any:
    """The tiny model with a bank far from ``case``'s signature: the gate holds that study."""
    probe = _segmenter(tiny_model, tmp_path, np.stack([np.ones(4) / 2, np.full(4, -0.5)]))
    far = -_signature_of(probe, case)
    return _segmenter(tiny_model, tmp_path, np.stack([far, far + 1e-4, far - 1e-4, far + 2e-4]))


def held_job(migrated: Any, tmp_path: Path, tiny_model: Any, *, seed: int = 11, calling_ae: str = "CT_SCANNER",
             patient_name: str = "DOE^JANE", series_description: str = "ABD PORTAL VENOUS",
             station_name: str | None = None, patient_id: str | None = None,
             prepare: Callable[[list[Path]], None] | None = None) -> int:
    """A study run through the real pipeline and held by the gate (a bank far from its signature).
    ``prepare``: changes the written files before they are recorded (as if the scanner had sent them so)."""
    settings, _, sessions = migrated
    case = phantom_study("ct_liver", seed=seed)
    out = tmp_path / f"series-{seed}"
    series = write_series(case.image, case.spacing, "CT", out, patient_name=patient_name,
                          patient_id=patient_id or f"PID-{seed}", series_description=series_description,
                          body_part="ABDOMEN")
    if prepare is not None:
        prepare(series.paths)
    seg = holding_segmenter(tiny_model, tmp_path, case)
    job_id = _ingest(sessions, series, calling_ae=calling_ae)
    with session_scope(sessions) as s:
        ser = s.execute(select(Series).where(Series.series_instance_uid == series.series_instance_uid)).scalar_one()
        ser.body_part, ser.series_description, ser.station_name = "ABDOMEN", series_description, station_name
    assert _run(settings, sessions, job_id, seg, f"task-{seed}").state == JobState.HELD
    return job_id


def job_state(sessions: Any, job_id: int) -> str:
    with session_scope(sessions) as s:
        job = s.get(Job, job_id)
        assert job is not None
        return str(job.state)


def review_config(settings: Any, **overrides: Any) -> ReviewConfig:
    from dataclasses import replace

    return replace(settings.review_config(), **overrides)

