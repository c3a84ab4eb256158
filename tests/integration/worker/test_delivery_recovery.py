"""A delivery that dies between the PACS's answer and the ledger write does not block the result.

The worker's delivery (:func:`worker.delivery.deliver_job`) runs in a process of its own and sends to a
real Orthanc through :class:`tests.dicom_proxy.DicomProxy`. The SCU releases its association only once
every C-STORE was answered; the proxy holds that A-RELEASE-RQ, so when it says "held" Orthanc has stored
and acknowledged the objects and the sender has not yet written it down. The test kills the sender there
with SIGKILL: its ``deliveries`` row stays ``sending``. The reconciler leaves a row that fresh alone (its
sender might be alive), takes it back once it has gone without a refresh for the SCU timeout, and enqueues
the delivery; the resend carries the same SOP Instance UID, Orthanc answers success for the object it
already holds, and the job ends ``sent`` with one object at the PACS (on both ledger backends). A live
sender, waiting out a back-off longer than the SCU timeout, is never taken for dead.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update

from dicom_node.config import Destination
from dicom_node.scu import RetryPolicy
from ledger.db import session_scope
from ledger.schema import AuditEvent, Delivery, DeliveryState, Job, JobState, Result, Study, utcnow
from tests.dicom_proxy import A_RELEASE_RQ, DicomProxy
from tests.peers import Orthanc, free_port, wait_for, write_ct_series
from worker.config import DeliveryConfig
from worker.delivery import deliver_job
from worker.reconcile import reconcile

# The SCU timeout of this test's delivery: a row in 'sending' not refreshed this long was abandoned.
TIMEOUT_S = 30.0

SENDER = """
import sys
from dicom_node.config import Destination
from dicom_node.scu import RetryPolicy
from ledger.db import open_engine, sessionmaker_for
from worker.config import DeliveryConfig
from worker.delivery import deliver_job

url, job_id, port, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
config = DeliveryConfig(destinations=(Destination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=port),),
                        retry=RetryPolicy(max_attempts=2, backoff_s=0.1, timeout_s=timeout))
print(deliver_job(sessionmaker_for(open_engine(url)), job_id, config, actor="worker"), flush=True)
"""


def _released_job(sessions, tmp_path: Path) -> tuple[int, str]:
    """A released job whose result is one DICOM object (a CT slice stands in for the SEG)."""
    series = write_ct_series(tmp_path / "seg", slices=1)
    with session_scope(sessions) as s:
        study = Study(study_instance_uid=series.study_instance_uid, calling_ae="PACS")
        s.add(study)
        s.flush()
        job = Job(study_id=study.id, version=1, state=JobState.RELEASED)
        s.add(job)
        s.flush()
        s.add(Result(job_id=job.id, seg_path=str(series.paths[0]), seg_sop_instance_uid=series.sop_instance_uids[0],
                     seg_series_instance_uid=series.series_instance_uid, oodm=0.1, tau=0.5, is_ood=False,
                     model_id="m", weights_sha256="0" * 64))
        return job.id, series.sop_instance_uids[0]


def _row(sessions, job_id: int) -> Delivery:
    with sessions() as s:
        return s.execute(select(Delivery).where(Delivery.job_id == job_id)).scalar_one()


def test_a_delivery_killed_after_the_pacs_answered_is_taken_back_and_sent_once(migrated, tmp_path: Path) -> None:
    settings, _, sessions = migrated
    job_id, sop = _released_job(sessions, tmp_path)
    with Orthanc(tmp_path / "orthanc") as orthanc, \
            DicomProxy(("127.0.0.1", orthanc.dicom_port), hold=A_RELEASE_RQ, hold_once=True) as pacs:
        sender = subprocess.Popen([sys.executable, "-c", SENDER, settings.db_url, str(job_id), str(pacs.port),
                                   str(TIMEOUT_S)], cwd=Path(__file__).resolve().parents[3])
        try:
            wait_for(lambda: pacs.held.is_set() or sender.poll() is not None, timeout=120,
                     what="the sender's A-RELEASE-RQ (every C-STORE answered)")
            assert sender.poll() is None, "the sender ended before it released its association"
            assert orthanc.instance_uids() == {sop}  # the PACS stored it and answered success
            assert _row(sessions, job_id).state == DeliveryState.SENDING  # ... and nobody wrote that down
        finally:
            sender.send_signal(signal.SIGKILL)
            sender.wait(30)

        row = _row(sessions, job_id)
        assert (row.state, row.attempts, row.sent_at) == (DeliveryState.SENDING, 0, None)
        delivery = DeliveryConfig(destinations=(Destination(name="pacs", ae_title="ORTHANC", host="127.0.0.1",
                                                            port=pacs.port),),
                                  retry=RetryPolicy(max_attempts=2, backoff_s=0.1, timeout_s=TIMEOUT_S))
        enqueued: list[int] = []

        def reconcile_pass():  # the worker's reconciler, with this delivery's SCU timeout
            return reconcile(sessions, enqueue_segment=lambda j: None, enqueue_delivery=enqueued.append,
                             queued_deadline_s=600, stale_after_s=120,
                             sending_stale_s=delivery.retry.sending_stale_s)

        # within the SCU timeout the sender may still be alive: its row is left alone
        assert reconcile_pass().reclaimed == [] and enqueued == []
        assert deliver_job(sessions, job_id, delivery, actor="worker") == "busy"
        with session_scope(sessions) as s:  # the SCU timeout passes without a refresh of the row
            s.execute(update(Delivery).where(Delivery.id == row.id)
                      .values(updated_at=utcnow() - timedelta(seconds=TIMEOUT_S + 1)))
        report = reconcile_pass()
        assert report.reclaimed == [row.id] and enqueued == [job_id]
        assert _row(sessions, job_id).state == DeliveryState.PENDING
        assert reconcile_pass().reclaimed == []  # taken back once

        # the enqueued delivery runs: the same object again, which the PACS already holds
        assert deliver_job(sessions, job_id, delivery, actor="worker") == "sent"
        assert orthanc.instance_uids() == {sop} and pacs.associations == 2

    row = _row(sessions, job_id)
    assert (row.state, row.attempts, row.last_status) == (DeliveryState.SENT, 1, 0)
    with session_scope(sessions) as s:
        assert s.get(Job, job_id).state == JobState.SENT
        result = s.execute(select(Result).where(Result.job_id == job_id)).scalar_one()
        assert result.seg_sop_instance_uid == sop
        [reclaimed] = s.execute(select(AuditEvent).where(AuditEvent.action == "delivery.reclaimed")).scalars()
        assert reclaimed.object_id == str(row.id) and reclaimed.details["destination"] == "pacs"
        assert [e.details["attempt"] for e in s.execute(
            select(AuditEvent).where(AuditEvent.action == "delivery.sent")).scalars()] == [1]


def test_a_live_sender_is_never_taken_for_dead(migrated, tmp_path: Path) -> None:
    """A sender waiting out its back-off (longer than the SCU timeout) keeps its row fresh: the reconciler,
    passing again and again meanwhile, never takes it back, and the delivery ends on its own."""
    _, _, sessions = migrated
    job_id, _ = _released_job(sessions, tmp_path)
    policy = RetryPolicy(max_attempts=2, backoff_s=4, timeout_s=1.5)  # a 4 s wait; 'sending' stale after 1.5 s
    down = Destination(name="pacs", ae_title="NOBODY", host="127.0.0.1", port=free_port())
    outcome: list[str] = []
    sender = threading.Thread(target=lambda: outcome.append(
        deliver_job(sessions, job_id, DeliveryConfig(destinations=(down,), retry=policy), actor="worker")))
    sender.start()
    reclaimed, passes = [], 0
    while sender.is_alive():  # a reconcile pass every 0.2 s for as long as the sender works
        report = reconcile(sessions, enqueue_segment=lambda j: None, enqueue_delivery=lambda j: None,
                           queued_deadline_s=600, stale_after_s=120, sending_stale_s=policy.sending_stale_s)
        reclaimed += report.reclaimed
        passes += 1
        sender.join(0.2)
    assert outcome == ["failed"] and passes > 1 and reclaimed == []
    row = _row(sessions, job_id)
    assert (row.state, row.attempts) == (DeliveryState.FAILED, 2)
