"""The review app over real HTTP (uvicorn on a free port) on a real ledger (SQLite and PostgreSQL), with a
held result made by the real pipeline: who may see what, CSRF, escaping, decisions and their audit rows.
The browser-level tests (Chromium) are in test_browser_pages.py and tests/e2e/test_review_browser.py."""

from __future__ import annotations

import io
import logging
import re
from dataclasses import replace
from datetime import timedelta

import pytest
from PIL import Image
from sqlalchemy import select

from dicom_node.assembler import Assembler
from ledger.db import session_scope
from ledger.prometheus import render as render_metrics
from ledger.schema import AuditEvent, Job, Review, Study, utcnow
from review.app import ReviewActions
from tests.integration.review.helpers import (
    Client,
    Recorder,
    ReviewServer,
    held_job,
    job_state,
    make_user,
    review_config,
)

SCRIPT = "<script>alert(1)</script>"


def _events(sessions, action: str) -> list[AuditEvent]:
    with session_scope(sessions) as s:
        return list(s.execute(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)).scalars())


@pytest.fixture
def site(migrated, tmp_path, tiny_model):
    """A held job (patient name a script, descriptions with markup), two radiologists and an admin, the app."""
    settings, _, sessions = migrated
    job_id = held_job(migrated, tmp_path, tiny_model, patient_name=SCRIPT, calling_ae="CT<B>1",
                      series_description="<img src=x onerror=alert(2)>", station_name="SCANNER&7")
    for name, role in (("anna", "radiologist"), ("ben", "radiologist"), ("root", "admin")):
        make_user(sessions, name, role)
    rec = Recorder()
    cfg = review_config(settings, viewer_url="https://pacs.example/viewer?StudyInstanceUIDs={study_instance_uid}")
    actions = ReviewActions(deliver=rec.deliver, retract=rec.retract, metrics=lambda: render_metrics(sessions))
    with ReviewServer(cfg, sessions, actions) as srv:
        yield srv, sessions, job_id, rec


def test_without_a_session_every_page_sends_to_login_and_nothing_changes(site) -> None:
    srv, sessions, job_id, rec = site
    c = Client(srv.url)
    for path in ("/", "/queue", f"/studies/{job_id}", "/reports", "/users"):
        r = c.get(path)
        assert r.status == 303 and r.location.startswith("/login"), (path, r.status, r.location)
    assert c.get("/queue").location == "/login?next=/queue"
    assert c.get(f"/studies/{job_id}/slices/0.png").status == 401
    r = c.post(f"/studies/{job_id}/approve", {"csrf_token": "x"})
    assert r.status == 401 and r.location is None  # as the module promises: a POST is refused, not redirected
    assert job_state(sessions, job_id) == "held" and rec.delivered == []
    assert c.get("/login").status == 200
    # a forged or unsigned cookie is no session
    c.jar.set_cookie(_cookie("specgate_session", "forged.value"))
    assert c.get("/queue").status == 303


def _cookie(name: str, value: str):
    import http.cookiejar

    return http.cookiejar.Cookie(0, name, value, None, False, "127.0.0.1", False, False, "/", True, False, None,
                                 True, None, None, {})


def test_login_cookie_flags_failed_login_and_login_csrf(site) -> None:
    srv, sessions, _, _ = site
    c = Client(srv.url)
    bad = c.login("anna", "not the password at all")
    assert bad.status == 401 and "wrong account name or password" in bad.text
    assert _events(sessions, "auth.login_failed")[-1].details["reason"] == "bad_password"
    # the login form without its token: refused before any password is checked
    r = c.post("/login", {"username": "anna", "password": "correct horse battery staple"})
    assert r.status == 403 and c.cookie("specgate_session") is None
    ok = c.login("anna")
    assert ok.status == 303 and ok.location == "/queue"
    set_cookie = [h for h in ok.headers.get_all("Set-Cookie") if h.startswith("specgate_session=")][0]
    assert "HttpOnly" in set_cookie and "SameSite=strict" in set_cookie and "Secure" not in set_cookie
    assert _events(sessions, "auth.login")[-1].actor == "user:anna"
    # ?next= never leaves the site
    page = c.get("/login?next=//evil.example/x")
    assert 'value="/queue"' in page.text


def test_secure_cookies_behind_a_tls_proxy(migrated, tmp_path) -> None:
    settings, _, sessions = migrated
    make_user(sessions, "anna", "radiologist")
    with ReviewServer(review_config(settings, secure_cookies=True), sessions, ReviewActions(deliver=print)) as srv:
        c = Client(srv.url)
        page = c.get("/login")
        login_cookie = [h for h in page.headers.get_all("Set-Cookie") if h.startswith("specgate_login=")][0]
        assert "Secure" in login_cookie
        # the browser would send it back over https; this client is on plain http, so send it by hand
        token = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)
        ok = c.request("POST", "/login", {"login_token": token, "username": "anna",
                                          "password": "correct horse battery staple"},
                       headers={"Cookie": login_cookie.split(";")[0]})
        assert ok.status == 303
        session_cookie = [h for h in ok.headers.get_all("Set-Cookie") if h.startswith("specgate_session=")][0]
        assert "Secure" in session_cookie and "HttpOnly" in session_cookie


def test_queue_and_study_escape_dicom_values_and_show_the_evidence(site, caplog) -> None:
    srv, sessions, job_id, _ = site
    caplog.set_level(logging.DEBUG)
    c = Client(srv.url)
    c.login("anna")
    q = c.get("/queue")
    assert q.status == 200 and "<title>(1) Review queue" in q.text
    assert q.headers["Cache-Control"] == "no-store" and "script-src 'self'" in q.headers["Content-Security-Policy"]
    assert "&lt;img src=x onerror=alert(2)&gt;" in q.text and "<img src=x" not in q.text
    assert "CT&lt;B&gt;1" in q.text and "SCANNER&amp;7" in q.text
    assert f'data-job="{job_id}"' in q.text and "tiny-test:0.0.1" in q.text
    assert SCRIPT not in q.text and "&lt;script&gt;" not in q.text  # no patient name on the queue
    assert f'data-job="{job_id}"' not in c.get("/queue?modality=MR").text
    assert f'data-job="{job_id}"' not in c.get("/queue?ae=OTHER").text
    assert f'data-job="{job_id}"' in c.get("/queue?ae=CT%3CB%3E1&modality=CT").text
    assert f'data-job="{job_id}"' not in c.get("/queue?min_age_h=1").text
    page = c.get(f"/studies/{job_id}")
    assert page.status == 200
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text and SCRIPT not in page.text
    assert 'id="bank-histogram"' in page.text and "<svg" in page.text
    assert 'id="approve-form"' in page.text and 'id="reject-form"' in page.text
    with session_scope(sessions) as s:
        study_uid = s.execute(select(Study.study_instance_uid).join(Job).where(Job.id == job_id)).scalar_one()
    assert f'href="https://pacs.example/viewer?StudyInstanceUIDs={study_uid}"' in page.text
    viewed = _events(sessions, "review.viewed")
    assert viewed[-1].actor == "user:anna" and viewed[-1].object_id == str(job_id)
    z = int(re.search(r'data-z="(\d+)"', page.text).group(1))
    n = int(re.search(r'data-slices="(\d+)"', page.text).group(1))
    png = c.get(f"/studies/{job_id}/slices/{z}.png?window=lung&overlay=prob")
    assert png.status == 200 and png.headers["Content-Type"] == "image/png"
    assert Image.open(io.BytesIO(png.body)).size[0] > 0
    assert c.get(f"/studies/{job_id}/slices/{n}.png").status == 404
    assert c.get(f"/studies/{job_id}/slices/0.png?window=nonsense").status == 400
    assert c.get(f"/studies/{job_id}/slices/0.png?overlay=nonsense").status == 400
    assert c.get("/studies/999999").status == 404
    assert "alert(1)" not in caplog.text and "PID-11" not in caplog.text  # no patient name or ID in logs


def test_forms_without_their_csrf_token_are_refused(site) -> None:
    srv, sessions, job_id, rec = site
    c = Client(srv.url)
    c.login("anna")
    for data in ({}, {"csrf_token": "guessed"}):
        r = c.post(f"/studies/{job_id}/approve", data)
        assert r.status == 403 and "security token" in r.text
        r = c.post(f"/studies/{job_id}/reject", {**data, "reason_code": "artefact"})
        assert r.status == 403
    assert job_state(sessions, job_id) == "held" and rec.delivered == []
    assert len(_events(sessions, "auth.csrf_refused")) == 4
    # another user's token is not this user's
    other = Client(srv.url)
    other.login("ben")
    r = c.post(f"/studies/{job_id}/approve", {"csrf_token": other.csrf()})
    assert r.status == 403 and job_state(sessions, job_id) == "held"


def test_approve_once_and_the_second_reviewer_sees_who_decided(site) -> None:
    srv, sessions, job_id, rec = site
    anna, ben = Client(srv.url), Client(srv.url)
    anna.login("anna")
    ben.login("ben")
    anna_token, ben_token = anna.csrf(f"/studies/{job_id}"), ben.csrf(f"/studies/{job_id}")
    r = anna.post(f"/studies/{job_id}/approve", {"csrf_token": anna_token, "note": "looks right"})
    assert r.status == 303
    assert "approved: the result is on its way" in anna.get(r.location).text
    r = ben.post(f"/studies/{job_id}/approve", {"csrf_token": ben_token})
    page = ben.get(r.location).text
    assert f"not approved: job {job_id} is approved, not held" in page
    assert re.search(r"Approved by <b>anna</b>", page)
    assert rec.delivered == [job_id] and job_state(sessions, job_id) == "approved"
    with session_scope(sessions) as s:
        reviews = s.execute(select(Review).where(Review.job_id == job_id)).scalars().all()
        assert [(r.username, r.decision, r.reason) for r in reviews] == [("anna", "approve", "looks right")]
    assert [e.actor for e in _events(sessions, "review.approve")] == ["user:anna"]


def test_reject_needs_a_reason_from_the_list_and_sends_nothing(site) -> None:
    srv, sessions, job_id, rec = site
    c = Client(srv.url)
    c.login("ben")
    token = c.csrf(f"/studies/{job_id}")
    for data, why in (({}, "choose a reason"), ({"reason_code": "because"}, "choose a reason"),
                      ({"reason_code": "other"}, "needs a note")):
        r = c.post(f"/studies/{job_id}/reject", {"csrf_token": token, **data})
        assert why in c.get(r.location).text
        assert job_state(sessions, job_id) == "held"
    r = c.post(f"/studies/{job_id}/reject", {"csrf_token": token, "reason_code": "artefact", "note": "metal"})
    assert "rejected: nothing will be sent" in c.get(r.location).text
    assert job_state(sessions, job_id) == "rejected" and rec.delivered == []
    with session_scope(sessions) as s:
        review = s.execute(select(Review).where(Review.job_id == job_id)).scalar_one()
    assert (review.username, review.decision, review.reason) == ("ben", "reject", "artefact: metal")


def test_a_page_opened_before_a_newer_version_cannot_approve_the_superseded_result(site, migrated) -> None:
    srv, sessions, job_id, rec = site
    c = Client(srv.url)
    c.login("anna")
    token = c.csrf(f"/studies/{job_id}")  # the page is open...
    # ...when the study receives another instance and the assembler makes a new version (the SCP's path)
    with session_scope(sessions) as s:
        study = s.get(Study, s.get(Job, job_id).study_id)
        study.received_count += 1
    settings = migrated[0]
    results = Assembler(replace(settings.assembly_config(), quiet_seconds=0.001), sessions).run_once(
        utcnow() + timedelta(seconds=1))
    assert [r.superseded for r in results] == [(job_id,)]
    newer = results[0].job_id
    r = c.post(f"/studies/{job_id}/approve", {"csrf_token": token})
    page = c.get(r.location).text
    assert "not approved" in page and 'id="superseded"' in page and f'href="/studies/{newer}"' in page
    assert 'id="approve-form"' not in page
    assert job_state(sessions, job_id) == "superseded" and rec.delivered == []


def test_roles_reports_and_users_are_for_admins(site) -> None:
    srv, sessions, job_id, _ = site
    rad, admin = Client(srv.url), Client(srv.url)
    rad.login("anna")
    admin.login("root")
    for path in ("/reports", "/users", "/reports/ood-rate.csv"):
        r = rad.get(path)
        assert r.status == 403, path
    assert 'id="nav-reports"' not in rad.get("/queue").text
    assert admin.get("/reports").status == 200
    csv = admin.get("/reports/ood-rate.csv")
    assert csv.status == 200 and csv.headers["Content-Type"].startswith("text/csv")
    users = admin.get("/users")
    assert users.status == 200 and "anna" in users.text
    token = admin.csrf("/users")
    r = admin.post("/users", {"csrf_token": token, "action": "add", "username": "cleo", "role": "radiologist",
                              "password": "short"})
    assert "at least 12 characters" in admin.get(r.location).text
    r = admin.post("/users", {"csrf_token": token, "action": "add", "username": "cleo", "role": "radiologist",
                              "password": "cleo's long passphrase"})
    assert "account cleo added" in admin.get(r.location).text
    assert Client(srv.url).login("cleo", "cleo's long passphrase").status == 303
    # disabling anna ends her session at once
    assert rad.get("/queue").status == 200
    admin.post("/users", {"csrf_token": token, "action": "disable", "username": "anna"})
    assert rad.get("/queue").status == 303
    assert [e.actor for e in _events(sessions, "user.disabled")] == ["user:root"]


def test_logout_ends_the_session(site) -> None:
    srv, _, _, _ = site
    c = Client(srv.url)
    c.login("anna")
    token = c.csrf()
    stolen = c.cookie("specgate_session").value
    assert c.post("/logout", {"csrf_token": token}).location == "/login"
    thief = Client(srv.url)
    thief.jar.set_cookie(_cookie("specgate_session", stolen))
    assert thief.get("/queue").status == 303


def test_metrics_need_no_session_parse_and_follow_the_queue(site) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    srv, sessions, job_id, _ = site

    def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        r = Client(srv.url).get("/metrics")
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        assert "DOE" not in r.text and "alert(1)" not in r.text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(r.text) for s in fam.samples}

    before = samples()
    assert before[("specgate_review_queue_depth", ())] == 1
    assert before[("specgate_jobs", (("state", "held"),))] == 1
    c = Client(srv.url)
    c.login("anna")
    c.post(f"/studies/{job_id}/reject", {"csrf_token": c.csrf(f"/studies/{job_id}"), "reason_code": "artefact"})
    after = samples()
    assert after[("specgate_review_queue_depth", ())] == 0
    assert after[("specgate_jobs", (("state", "rejected"),))] == 1
