"""Radiologists' decisions in a real headless Chromium, on the real services: ``specgate review`` as a
subprocess beside ``specgate scp`` and a Celery ``specgate worker`` (PostgreSQL, Redis, the shipped model)
delivering to an Orthanc PACS: the e2e stack of :mod:`tests.e2e.test_pipeline_e2e`. Accounts are made by
``specgate users add`` with the password on standard input, as an operator's script would.

Two studies of an organ the shipped model has never seen (the hippocampus phantom), so the gate holds
both. One, whose PatientName is ``<script>alert(1)</script>``, is rejected with a reason; the other is
approved by two radiologists in two browsers at the same moment: exactly one SEG reaches Orthanc, with
the winner as its content creator, and the loser's page names who decided.

"Nothing is sent" after the reject is shown without sleeping. A rejection enqueues nothing; what could
still send the rejected result is a wake-up call on the ``deliver`` queue (from the app, or from the
reconciler finding the job). So the test runs a reconcile pass after the rejection (``specgate reconcile``,
the worker's own code and settings), checks that it re-sent nothing, and only then approves the other
study. The worker takes one message at a time (concurrency 1, prefetch 1) from a FIFO queue, so when the
approved study's SEG is at Orthanc, every message enqueued before it has been dealt with: the rejected study must then have no SEG or SR at Orthanc and no
delivery row in the ledger, and its job must still be ``rejected``.

Pages, redirects, CSRF, escaping and roles in the browser without a PACS: the faster
tests/integration/review/test_browser_pages.py.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select
from sqlalchemy import select

from ledger.schema import AuditEvent, Delivery, Job, Result, Review
from model.data.phantoms import phantom_study
from specgate.synthetic import SyntheticSeries, write_series
from tests.browser import chromium, sign_in, wait
from tests.e2e import test_pipeline_e2e as pipeline_e2e
from tests.e2e.test_pipeline_e2e import Stack, _held_by_orthanc, _seg_uids_at
from tests.peers import free_port, wait_for

pytestmark = pytest.mark.slow

stack = pipeline_e2e.stack  # the e2e stack fixture (PostgreSQL, Redis, Orthanc, specgate scp), shared

PASSWORD = "a long reading-room passphrase"
SCRIPT = "<script>alert(1)</script>"


def _add_user(stack: Stack, name: str, role: str) -> None:
    """``specgate users add`` with the password on standard input (not a terminal: one line is read)."""
    out = subprocess.run([sys.executable, "-m", "specgate", "users", "add", name, "--role", role],
                         input=PASSWORD + "\n", env=stack.env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and f"account {name} added" in out.stdout, out.stdout + out.stderr


def _start_review(stack: Stack) -> str:
    port = free_port()
    stack.start("review", "review", "--port", str(port))
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        proc = stack.procs["review"]
        if proc.poll() is not None:
            raise RuntimeError(f"specgate review exited with {proc.returncode}:\n{stack.log('review')}")
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    wait_for(healthy, timeout=60, what="specgate review answering /healthz", interval=0.1)
    return base


def _unseen_study(tmp: Path, name: str, seed: int, patient_name: str) -> SyntheticSeries:
    case = phantom_study("mr_hippocampus", seed=seed)
    return write_series(case.image, case.spacing, case.modality, tmp / name, patient_id="TEST-E2E",
                        patient_name=patient_name, series_description="MR HEAD T1 hippocampus", body_part="HEAD")


def _open_from_queue(driver: WebDriver, base: str, job_id: int) -> None:
    driver.get(base + "/queue")
    driver.find_element(By.CSS_SELECTOR, f"#queue tr[data-job='{job_id}'] a.button").click()
    wait(driver).until(lambda d: d.current_url == f"{base}/studies/{job_id}")


def _flash(driver: WebDriver) -> str:
    """The message the study page shows after a decision (waits for the page after the POST)."""
    found = wait(driver, 60).until(lambda d: d.find_elements(By.ID, "flash"))
    return str(found[0].text)


def test_reject_sends_nothing_and_two_browsers_approving_at_once_send_one_seg(stack: Stack, tmp_path: Path) -> None:
    stack.start("worker", "worker")
    _add_user(stack, "anna", "radiologist")
    _add_user(stack, "ben", "radiologist")
    base = _start_review(stack)
    approved = _unseen_study(tmp_path, "approved", seed=31, patient_name="DOE^JANE")
    rejected = _unseen_study(tmp_path, "rejected", seed=32, patient_name=SCRIPT)
    assert set(stack.send(approved.paths)) == {0}
    assert set(stack.send(rejected.paths)) == {0}
    orthanc = stack.orthanc
    assert orthanc is not None
    a = stack.wait_state(approved.study_instance_uid, {"held", "sent", "failed"})
    b = stack.wait_state(rejected.study_instance_uid, {"held", "sent", "failed"})
    assert (str(a.state), str(b.state)) == ("held", "held"), (a.reason_code, b.reason_code)

    anna, ben = chromium(), chromium()
    try:
        # anna signs in, sees both in the queue, opens the one whose patient name is a script
        sign_in(anna, base, "anna", PASSWORD)
        assert anna.title.startswith("(2) Review queue")
        _open_from_queue(anna, base, b.id)
        assert anna.find_element(By.ID, "patient-name").text == SCRIPT
        assert SCRIPT in anna.find_element(By.ID, "patient").text
        with pytest.raises(NoAlertPresentException):
            anna.switch_to.alert  # noqa: B018 - the property raises when no dialog is open

        # she rejects it with a reason from the list and a note
        Select(anna.find_element(By.ID, "reject-reason")).select_by_value("wrong_anatomy")
        anna.find_element(By.ID, "reject-note").send_keys("head MR, not this model's anatomy")
        anna.find_element(By.ID, "reject").click()
        assert _flash(anna) == "rejected: nothing will be sent"
        assert anna.find_element(By.ID, "job-state").text == "rejected"
        assert anna.find_element(By.ID, "decided-by").text.startswith("Rejected by anna")
        assert not anna.find_elements(By.ID, "approve")
        assert "re-sent 0 deliveries" in stack.reconcile()  # a pass that saw the rejected job

        # anna and ben open the other study and approve it at the same moment
        _open_from_queue(anna, base, a.id)
        sign_in(ben, base, "ben", PASSWORD)
        _open_from_queue(ben, base, a.id)
        barrier = threading.Barrier(2, timeout=30)
        errors: list[BaseException] = []

        def approve(driver: WebDriver) -> None:
            try:
                button = driver.find_element(By.ID, "approve")
                barrier.wait()
                button.click()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread below
                errors.append(exc)

        threads = [threading.Thread(target=approve, args=(d,)) for d in (anna, ben)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        flashes = {"anna": _flash(anna), "ben": _flash(ben)}

        with stack.sessions() as s:  # type: ignore[operator]
            reviews = s.execute(select(Review).where(Review.job_id == a.id)).scalars().all()
            assert [str(r.decision) for r in reviews] == ["approve"]
            winner = reviews[0].username
            result = s.execute(select(Result).where(Result.job_id == a.id)).scalar_one()
        loser = "ben" if winner == "anna" else "anna"
        assert flashes[winner] == "approved: the result is on its way to the PACS", flashes
        assert flashes[loser].startswith("not approved: job"), flashes
        loser_page = ben if loser == "ben" else anna
        assert loser_page.find_element(By.ID, "decided-by").text.startswith(f"Approved by {winner}")
        assert not loser_page.find_elements(By.ID, "approve")

        # the approved SEG reaches the PACS, once, with the approver in it
        wait_for(lambda: _seg_uids_at(orthanc, approved.study_instance_uid), timeout=120,
                 what="the approved SEG at Orthanc", interval=0.2)
        sent = stack.wait_state(approved.study_instance_uid, {"sent", "failed"}, timeout=60)
        assert str(sent.state) == "sent", (sent.reason_code, sent.reason_detail)
        assert _seg_uids_at(orthanc, approved.study_instance_uid) == [result.seg_sop_instance_uid]
        assert _seg_uids_at(orthanc, approved.study_instance_uid, "SR") == [result.sr_sop_instance_uid]
        assert winner in str(_held_by_orthanc(orthanc, result.seg_sop_instance_uid).ContentCreatorName)

        # every wake-up call enqueued before the approval has been consumed: nothing of the rejected study
        assert _seg_uids_at(orthanc, rejected.study_instance_uid) == []
        assert _seg_uids_at(orthanc, rejected.study_instance_uid, "SR") == []
        with stack.sessions() as s:  # type: ignore[operator]
            job_b = s.get(Job, b.id)
            assert job_b is not None and str(job_b.state) == "rejected"
            assert s.execute(select(Delivery).where(Delivery.job_id == b.id)).scalars().all() == []
            review_b = s.execute(select(Review).where(Review.job_id == b.id)).scalar_one()
            assert (review_b.username, str(review_b.decision)) == ("anna", "reject")
            assert review_b.reason == "wrong_anatomy: head MR, not this model's anatomy"

        # a reconcile pass after the delivery: still one SEG, one delivery row, sent by one C-STORE
        stack.reconcile()
        assert _seg_uids_at(orthanc, approved.study_instance_uid) == [result.seg_sop_instance_uid]
        with stack.sessions() as s:  # type: ignore[operator]
            rows = s.execute(select(Delivery).where(Delivery.job_id == a.id)).scalars().all()
            assert [(d.destination, str(d.state)) for d in rows] == [("pacs", "sent")]
            sends = s.execute(select(AuditEvent).where(AuditEvent.action == "delivery.sent",
                                                       AuditEvent.object_id == str(rows[0].id))).scalars().all()
            assert len(sends) == 1
            decided = s.execute(select(AuditEvent.actor).where(AuditEvent.action.like("review.%"),
                                                               AuditEvent.action != "review.viewed",
                                                               AuditEvent.object_id.in_([str(a.id), str(b.id)]))
                                ).scalars().all()
            assert sorted(decided) == sorted([f"user:{winner}", "user:anna"])
    finally:
        anna.quit()
        ben.quit()

    log = (stack.root / "review.log").read_text(errors="replace")
    assert "TEST-E2E" not in log and "alert(1)" not in log  # no patient identifiers in the app's log
