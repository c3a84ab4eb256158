"""The review app against an outside attacker, over real HTTP (uvicorn on a free port) on a real ledger
(SQLite and PostgreSQL): no 5xx on any input, the security headers on every kind of response, inert CSV
cells, one answer for every refused login, a bounded request body (issue 23). Each test here failed
before the fix it covers (500s, a live formula, bare 404/405/static/500 responses, "too many failed
logins for this account", a 50 MB body parsed before the 403, ``private, max-age=300`` on slices)."""

from __future__ import annotations

import contextlib
import csv
import io
import re
import socket
import threading
from dataclasses import replace

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicom_node.scp import StoreSCP
from ledger import jobs
from ledger.db import session_scope
from ledger.prometheus import render as render_metrics
from ledger.reports import REPORTS
from ledger.schema import AuditEvent, JobState, Series, Study, User
from model.data.phantoms import phantom_study
from review.app import ReviewActions
from review.security import SECURITY_HEADERS
from specgate.settings import Settings
from specgate.synthetic import write_series
from tests.integration.dicom_node.helpers import CALLER, store
from tests.integration.review.helpers import (
    PASSWORD,
    Client,
    Recorder,
    ReviewServer,
    held_job,
    job_state,
    make_user,
    review_config,
)
from tests.integration.worker.test_pipeline import _run, _segmenter, _signature_of
from tests.peers import free_port

BIG_ID = "9223372036854775808"  # 2^63: past every 64-bit integer key
BAD_NUMBERS = ("nan", "inf", "-inf", "1e8", "-1e9", "1e309", "abc", "-1")


def _events(sessions, action: str) -> list[AuditEvent]:
    with session_scope(sessions) as s:
        return list(s.execute(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)).scalars())


def _has_headers(reply, what: str) -> None:
    for k, v in SECURITY_HEADERS.items():
        assert reply.headers.get(k) == v, f"{what}: {k} is {reply.headers.get(k)!r}"
    assert reply.headers.get("Cache-Control") == "no-store", f"{what}: Cache-Control {reply.headers.get('Cache-Control')!r}"


class _BrokenImages:
    """A slice cache with a bug in it: the app must answer 500, with its headers and no traceback."""

    def get(self, *args: object) -> object:
        raise RuntimeError("a bug in the slice cache: /secret/path/PID-42")


@pytest.fixture
def site(migrated, tmp_path, tiny_model):
    settings, _, sessions = migrated
    job_id = held_job(migrated, tmp_path, tiny_model)
    for name, role in (("anna", "radiologist"), ("root", "admin")):
        make_user(sessions, name, role)
    actions = ReviewActions(deliver=Recorder().deliver, metrics=lambda: render_metrics(sessions))
    with ReviewServer(review_config(settings), sessions, actions) as srv:
        yield srv, sessions, job_id, settings


def test_bad_query_path_and_token_values_answer_4xx_with_the_reason(site) -> None:
    srv, sessions, job_id, _ = site
    anna = Client(srv.url)
    assert anna.login("anna").status == 303
    for value in BAD_NUMBERS:
        for key in ("min_age_h", "max_age_h"):
            r = anna.get(f"/queue?{key}={value}")
            assert r.status == 400 and key in r.text, (key, value, r.status)
            _has_headers(r, f"/queue?{key}={value}")
    assert anna.get("/queue?min_age_h=2&max_age_h=48").status == 200
    assert anna.get("/queue?modality=%00CT").status == 400  # PostgreSQL refuses NUL in text: no 500
    for path in (f"/studies/{BIG_ID}", f"/studies/{BIG_ID}/slices/0.png", f"/studies/{job_id}/slices/{BIG_ID}.png",
                 "/studies/0", f"/studies/{job_id}/slices/100001.png"):
        r = anna.get(path)
        assert r.status == 404, (path, r.status)
        _has_headers(r, path)
    token = anna.csrf()
    r = anna.post(f"/studies/{BIG_ID}/reject", {"csrf_token": token, "reason_code": "other", "note": "x"})
    assert r.status == 404
    r = anna.post(f"/studies/{job_id}/reject", {"csrf_token": token, "reason_code": "other", "note": "a\x00b"})
    assert r.status == 400 and job_state(sessions, job_id) == "held"

    # CSRF tokens that are not ASCII: refused (403) and audited, never a 500
    before = len(_events(sessions, "auth.csrf_refused"))
    assert anna.post(f"/studies/{job_id}/approve", {"csrf_token": "\u00e9"}).status == 403
    r = _raw_post(anna, f"/studies/{job_id}/approve", b"csrf_token=\xff\xfe", "application/x-www-form-urlencoded")
    assert r.status == 403
    r = _raw_post(anna, f"/studies/{job_id}/approve",
                  b'--xx\r\nContent-Disposition: form-data; name="csrf_token"\r\n\r\n\xff\r\n--xx--\r\n',
                  "multipart/form-data; boundary=xx; charset=bogus")
    assert r.status == 415, r.status  # the app's forms are urlencoded; nothing else is parsed
    _has_headers(r, "415")
    refused = _events(sessions, "auth.csrf_refused")
    assert len(refused) == before + 2 and all(e.actor == "user:anna" for e in refused[before:])
    assert job_state(sessions, job_id) == "held"

    # anonymously, through the login form
    stranger = Client(srv.url)
    stranger.get("/login")
    r = stranger.post("/login", {"login_token": "\u00e9", "username": "anna", "password": PASSWORD})
    assert r.status == 403 and "security token" in r.text
    _has_headers(r, "login 403")
    assert _events(sessions, "auth.csrf_refused")[-1].actor == "anonymous"

    # the reports' period, for an admin
    root = Client(srv.url)
    assert root.login("root").status == 303
    for q in ("since=yesterday", "until=2026-13-01", "since=2026-12-05&until=2026-12-01"):
        for path in ("/reports", "/reports/queue.csv"):
            r = root.get(f"{path}?{q}")
            assert r.status == 400, (path, q, r.status)
            _has_headers(r, f"{path}?{q}")
    assert root.get("/reports?since=0001-01-01&until=9999-12-31").status == 200


def _raw_post(client: Client, path: str, body: bytes, ctype: str):
    import urllib.error
    import urllib.request

    from tests.integration.review.helpers import Reply

    req = urllib.request.Request(client.base + path, data=body, method="POST", headers={"Content-Type": ctype})
    try:
        with client.opener.open(req, timeout=60) as resp:
            return Reply(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as err:
        return Reply(err.code, err.headers, err.read())


def test_every_kind_of_response_carries_the_security_headers(site, migrated) -> None:
    srv, sessions, job_id, settings = site
    anon = Client(srv.url)
    _has_headers(anon.get("/login"), "login page")
    _has_headers(anon.get("/queue"), "redirect to login")
    _has_headers(anon.get("/static/style.css"), "static file")
    _has_headers(anon.get("/static/nothing-here.css"), "static 404")
    _has_headers(anon.get("/no/such/page"), "Starlette's 404")
    r = anon.request("DELETE", "/queue")
    assert r.status == 405 and "GET" in (r.headers.get("Allow") or "")
    _has_headers(r, "Starlette's 405")
    _has_headers(anon.get("/metrics"), "metrics")
    _has_headers(anon.get("/healthz"), "health")
    anna = Client(srv.url)
    anna.login("anna")
    r = anna.get(f"/studies/{job_id}/slices/0.png")
    assert r.status == 200 and r.headers.get("Content-Type") == "image/png"
    _has_headers(r, "slice PNG")  # the patient's image: no-store, gone from the cache at logout
    root = Client(srv.url)
    root.login("root")
    r = root.get("/reports/queue.csv")
    assert r.status == 200 and r.headers.get("Content-Type").startswith("text/csv")
    _has_headers(r, "report CSV")

    # a bug in the app: 500, the headers, the app's own words, no traceback or what the error said
    with ReviewServer(review_config(settings), sessions, ReviewActions(deliver=Recorder().deliver),
                      images=_BrokenImages()) as server:
        c = Client(server.url)
        c.login("anna")
        r = c.get(f"/studies/{job_id}/slices/0.png")
        assert r.status == 500, r.status
        _has_headers(r, "500")
        assert "PID-42" not in r.text and "Traceback" not in r.text and "secret" not in r.text


def _login_error(client: Client, username: str, password: str) -> tuple[int, str]:
    r = client.login(username, password)
    m = re.search(r'<p class="error"[^>]*>(.*?)</p>', r.text, re.S) or re.search(r'id="login-error"[^>]*>(.*?)<', r.text, re.S)
    body = re.sub(r'value="[^"]*"', 'value=""', r.text)  # the new form's nonce differs each time
    return r.status, (m.group(1).strip() if m else "") + "\n" + body


def test_an_unknown_a_throttled_and_a_disabled_account_get_the_same_answer(site) -> None:
    srv, sessions, _, _ = site
    make_user(sessions, "carl", "radiologist")
    c = Client(srv.url)
    for i in range(5):  # the limit: anna is now being slowed down
        assert c.login("anna", f"wrong guess {i}").status == 401
    with session_scope(sessions) as s:
        s.execute(select(User).where(User.username == "carl")).scalar_one().active = False
        # as after 12 failures: a wait of 2^7 s, so that a slow machine cannot outlast it during the test
        s.execute(select(User).where(User.username == "anna")).scalar_one().failed_logins = 12
    throttled = _login_error(c, "anna", PASSWORD)  # the right password, while throttled
    unknown = _login_error(c, "nobody-here", "wrong guess")
    disabled = _login_error(c, "carl", PASSWORD)
    wrong = _login_error(Client(srv.url), "root", "wrong guess")
    assert throttled == unknown == disabled == wrong
    assert throttled[0] == 401 and "wrong account name or password" in throttled[1]
    assert "too many" not in throttled[1] and "try again in" not in throttled[1]
    assert _events(sessions, "auth.login_throttled"), "the throttle is applied and audited, only not announced"


def test_concurrent_wrong_logins_are_each_counted_and_refused(site) -> None:
    """16 wrong logins at once: each refused the same way, each counted (the count is incremented in SQL,
    not read-modify-written around the password check that now runs outside the transaction)."""
    srv, sessions, _, _ = site
    clients = [Client(srv.url) for _ in range(16)]
    for c in clients:
        c.get("/login")
    statuses: list[int] = []

    def attempt(c: Client) -> None:
        token = re.search(r'name="login_token" value="([^"]+)"', c.get("/login").text).group(1)
        statuses.append(c.post("/login", {"login_token": token, "username": "anna", "password": "wrong!"}).status)

    threads = [threading.Thread(target=attempt, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert statuses == [401] * 16
    with session_scope(sessions) as s:
        anna = s.execute(select(User).where(User.username == "anna")).scalar_one()
        refused = anna.failed_logins
    failed = [e for e in _events(sessions, "auth.login_failed") if e.actor == "user:anna"]
    throttled = [e for e in _events(sessions, "auth.login_throttled") if e.actor == "user:anna"]
    assert len(failed) + len(throttled) == 16 and refused == len(failed)


def _http_head_then(port: int, head: bytes, body_parts, read_timeout: float = 30.0) -> tuple[int, int]:
    """Send ``head`` and then the parts of a body until the server answers; (status, bytes of body sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=read_timeout)
    sent = 0
    try:
        sock.sendall(head)
        sock.setblocking(False)
        answer = b""
        for part in body_parts:
            with contextlib.suppress(BlockingIOError):  # nothing from the server yet
                answer += sock.recv(65536)
            if answer:
                break
            try:
                sock.sendall(part)
                sent += len(part)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                break
        sock.setblocking(True)
        sock.settimeout(read_timeout)
        while b"\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    finally:
        sock.close()
    return int(answer.split(b" ", 2)[1]), sent


def test_a_body_past_the_cap_is_refused_before_it_is_read(site) -> None:
    srv, sessions, _, _ = site
    size = 50 * 1024 * 1024
    head = (f"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {size}\r\n\r\n").encode()
    # the answer comes while 49+ MB of the declared body were never sent
    status, sent = _http_head_then(srv.port, head, [b"&" * 65536] * 16)
    assert status == 413 and sent <= 16 * 65536
    # without a Content-Length (chunked): refused once the bytes received pass the cap (256 KiB)
    head = (b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"10000\r\n" + b"&" * 65536 + b"\r\n"
    status, sent = _http_head_then(srv.port, head, [chunk] * 800)
    assert status == 413 and sent < 800 * len(chunk) // 4
    # and the app still serves the others
    anna = Client(srv.url)
    assert anna.login("anna").status == 303 and anna.get("/queue").status == 200


@pytest.fixture
def formula_study(migrated, tmp_path, tiny_model):
    """A study whose StationName and SeriesDescription are formulas, sent by C-STORE through the real SCP,
    run through the real pipeline (held)."""
    settings, _, sessions = migrated
    case = phantom_study("ct_liver", seed=21)
    series = write_series(case.image, case.spacing, "CT", tmp_path / "series",
                          series_description='=HYPERLINK("http://evil","x")', body_part="ABDOMEN")
    for p in series.paths:
        ds = dcmread(p)
        ds.StationName = "=1+2"
        ds.BodyPartExamined = "@SUM(A1)"
        ds.save_as(p)
    scp_settings = Settings.load(data_dir=settings.data_dir, database_url=settings.db_url, scp_port=free_port(),
                                 allowed_callers=f"{CALLER}@127.0.0.1", scp_acse_timeout=5, scp_dimse_timeout=10,
                                 scp_network_timeout=10)
    scp = StoreSCP(scp_settings.node_config(), sessions).start()
    try:
        assert set(store(scp_settings.scp_port, series.paths)) == {0}
    finally:
        scp.stop()
    with session_scope(sessions) as s:
        ser = s.execute(select(Series).where(Series.series_instance_uid == series.series_instance_uid)).scalar_one()
        assert ser.station_name == "=1+2"  # stored as sent
        study = s.get(Study, ser.study_id)
        job_id = jobs.create_job(s, study, actor="test", series_instance_uid=series.series_instance_uid,
                                 rule_name="default-ct-mr").id
    probe = _segmenter(tiny_model, tmp_path, np.stack([np.ones(4) / 2, np.full(4, -0.5)]))
    far = -_signature_of(probe, case)
    seg = _segmenter(tiny_model, tmp_path, np.stack([far, far + 1e-4, far - 1e-4, far + 2e-4]))
    assert _run(settings, sessions, job_id, seg, "task-formula", data_dir=settings.data_dir).state == JobState.HELD
    return job_id


def _inert(text: str, what: str) -> list[str]:
    cells = [c for row in csv.reader(io.StringIO(text)) for c in row]
    for c in cells:
        if c[:1] in ("=", "+", "@", "\t", "\r") or (c[:1] == "-" and not _number(c)):
            raise AssertionError(f"{what}: a live formula cell {c!r}")
    return cells


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def test_formula_values_sent_by_a_scanner_come_out_of_every_csv_inert(formula_study, migrated, cli) -> None:
    settings, _, sessions = migrated
    make_user(sessions, "root", "admin")
    actions = ReviewActions(deliver=Recorder().deliver)
    seen_app: list[str] = []
    seen_cli: list[str] = []
    with ReviewServer(review_config(settings), sessions, actions) as srv:
        root = Client(srv.url)
        assert root.login("root").status == 303
        for name in REPORTS:
            r = root.get(f"/reports/{name}.csv")
            assert r.status == 200, (name, r.status)
            seen_app += _inert(r.text, f"/reports/{name}.csv")
            seen_cli += _inert(cli("report", name, "--format", "csv").output, f"specgate report {name}")
    assert "'=1+2" in seen_app and "'=1+2" in seen_cli  # the station reached the CSVs, as text


def test_anonymous_posts_are_refused_not_redirected(site) -> None:
    srv, sessions, job_id, _ = site
    c = Client(srv.url)
    for path in (f"/studies/{job_id}/approve", f"/studies/{job_id}/reject", "/logout", "/users"):
        r = c.post(path, {"csrf_token": "x"})
        assert r.status == 401 and r.location is None, (path, r.status)
        _has_headers(r, path)
    assert job_state(sessions, job_id) == "held"


def test_body_limit_setting_reaches_the_app(migrated, tmp_path) -> None:
    settings, _, _ = migrated
    s = Settings.load(data_dir=settings.data_dir, database_url=settings.db_url, review_max_body_bytes=8192)
    assert s.review_config().max_body_bytes == 8192
    assert replace(s.review_config(), hash_concurrency=2).hash_concurrency == 2
    with pytest.raises(Exception, match="SPECGATE_REVIEW_MAX_BODY_BYTES"):
        Settings.load(data_dir=settings.data_dir, database_url=settings.db_url, review_max_body_bytes=10)

