"""The blind audit over real HTTP (review.blind), SQLite and PostgreSQL.

Three studies run through the real pipeline (a tiny model, a bank holding each study's own signature, so
the gate releases them) with ``audit_sample_share = 1``, so each is drawn for a blind review by the hook in
``worker.pipeline.finish``. One is delivered for real to a DICOM peer before its review. Over HTTP: the
blind page shows the images but none of the gate's verdict (OODM, tau, its values, held/released,
percentile, evidence, deliveries, history), which the job's own study page does show; a rejection of the
delivered one is recorded and retracted for quality through the real retraction path (the IHE IOCM note,
"Rejected for Quality Reasons", reaches the peer); a rejection of one never sent is recorded, and its
refused retraction is audited; an agreement is recorded once, a second verdict is refused with who gave
the first. The scorecard then counts the three verdicts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from dicom_node.config import Destination
from dicom_node.scu import RetryPolicy
from ledger import audit
from ledger.db import session_scope
from ledger.reports import REPORTS
from ledger.schema import AuditEvent, AuditSample, Result, Retraction
from model.data.phantoms import phantom_study
from review.app import ReviewActions
from specgate.synthetic import write_series
from tests.integration.review.helpers import Client, Recorder, ReviewServer, make_user, review_config
from tests.integration.worker.test_pipeline import _claim_and_run, _ingest, _segmenter, _signature_of
from tests.integration.worker.test_retraction import CollectingPeer
from worker.config import DeliveryConfig, PipelineConfig
from worker.delivery import deliver_job
from worker.retraction import retract_job, send_retraction

#: what the blind page must not show, and the study page does (with the values of this result)
VERDICT = ("OODM", "&tau;", "in distribution", "The gate's evidence", "training images", "released", "History",
           "Deliveries")


def _released_and_drawn(migrated: Any, tmp_path: Path, tiny_model: Any, seeds: tuple[int, ...]) -> list[int]:
    settings, _, sessions = migrated
    cfg = PipelineConfig(results_dir=settings.results_dir, installation="TEST", rules=tuple(settings.rules),
                         heartbeat_s=0.2, audit_sample_share=1.0)
    probe = _segmenter(tiny_model, tmp_path, np.stack([np.ones(4) / 2, np.full(4, -0.5)]))
    jobs = []
    for seed in seeds:
        case = phantom_study("ct_liver", seed=seed)
        series = write_series(case.image, case.spacing, "CT", tmp_path / f"series-{seed}", patient_id=f"PID-{seed}")
        own = _signature_of(probe, case)
        seg = _segmenter(tiny_model, tmp_path, np.stack([own, own + 1e-3, own - 1e-3]))
        job_id = _ingest(sessions, series, calling_ae="CT_ROOM_2")
        assert _claim_and_run(sessions, job_id, cfg, {"default": seg}.__getitem__, f"task-{seed}").state == "released"
        jobs.append(job_id)
    return jobs


def _message(client: Client, reply: Any) -> str:
    assert reply.status == 303, reply.text[:300]
    page = client.get(reply.location)
    found = re.search(r'id="flash">([^<]*)<', page.text)
    assert found, page.text[:500]
    return found.group(1).replace("&#39;", "'")


def test_blind_review_hides_the_verdict_and_a_rejection_retracts(migrated, tmp_path: Path, tiny_model) -> None:
    settings, _, sessions = migrated
    sent_job, unsent_job, agreed_job = _released_and_drawn(migrated, tmp_path, tiny_model, (41, 42, 43))
    with session_scope(sessions) as s:
        samples = {r.job_id: r.id for r in s.execute(select(AuditSample)).scalars()}
        results = {r.job_id: r for r in s.execute(select(Result)).scalars()}
    assert set(samples) == {sent_job, unsent_job, agreed_job}
    make_user(sessions, "anna", "radiologist")
    make_user(sessions, "bob", "radiologist")
    recorder = Recorder()
    with CollectingPeer() as peer:
        delivery = DeliveryConfig(destinations=(Destination(name="pacs", ae_title="PACS", host="127.0.0.1",
                                                            port=peer.port),),
                                  retry=RetryPolicy(max_attempts=2, backoff_s=0.1, backoff_max_s=0.2, timeout_s=5),
                                  data_dir=settings.data_dir)
        assert deliver_job(sessions, sent_job, delivery, actor="test") == "sent"

        def retract(job_id: int, user: str, reason: str, note: str | None) -> int:
            rid = retract_job(sessions, job_id, user=user, reason=reason, note=note, files=settings.data_dir)
            send_retraction(sessions, rid, delivery, actor="test")
            return rid

        actions = ReviewActions(deliver=recorder.deliver, retract=retract)
        with ReviewServer(review_config(settings), sessions, actions) as srv:
            anna, bob = Client(srv.url), Client(srv.url)
            assert anna.login("anna").status == 303 and bob.login("bob").status == 303
            queue = anna.get("/queue").text
            assert "3 blind audit reviews waiting" in queue
            listing = anna.get("/audit")
            assert listing.status == 200
            assert all(f'href="/audit/{samples[j]}"' in listing.text for j in samples)

            for job_id in (sent_job, unsent_job):
                blind = anna.get(f"/audit/{samples[job_id]}")
                study = anna.get(f"/studies/{job_id}")
                assert blind.status == 200 and study.status == 200
                res = results[job_id]
                values = (f"{res.oodm:.4f}", f"{res.tau:.4f}")
                for text in (*VERDICT, *values):
                    assert text not in blind.text, text
                for text in (*VERDICT[:5], *values):
                    assert text in study.text, text
                assert not re.search(r"\bheld\b", blind.text, re.IGNORECASE)
                assert 'id="slice"' in blind.text and f"/studies/{job_id}/slices/" in blind.text  # the images
                assert f"PID-{41 if job_id == sent_job else 42}" in blind.text  # the patient banner

            token = anna.csrf(f"/audit/{samples[sent_job]}")
            no_reason = anna.post(f"/audit/{samples[sent_job]}/decide", {"csrf_token": token, "verdict": "reject"})
            assert _message(anna, no_reason) == "not recorded: choose a reason from the list"
            reply = anna.post(f"/audit/{samples[sent_job]}/decide",
                              {"csrf_token": token, "verdict": "reject", "reason_code": "segmentation_wrong",
                               "note": "misses the left lobe"})
            assert _message(anna, reply).startswith("rejection recorded: the result is retracted")
            kos = peer.received[-1]
            assert str(kos.Modality) == "KO" and kos.ConceptNameCodeSequence[0].CodeValue == "113001"

            reply = anna.post(f"/audit/{samples[unsent_job]}/decide",
                              {"csrf_token": token, "verdict": "reject", "reason_code": "artefact"})
            assert "rejection recorded; the result was not retracted" in _message(anna, reply)
            assert "Rejected by <b>anna</b>" in anna.get(f"/audit/{samples[unsent_job]}").text

            reply = bob.post(f"/audit/{samples[agreed_job]}/decide",
                             {"csrf_token": bob.csrf(f"/audit/{samples[agreed_job]}"), "verdict": "agree"})
            assert _message(bob, reply) == "recorded: you agree with the segmentation"
            again = anna.post(f"/audit/{samples[agreed_job]}/decide", {"csrf_token": token, "verdict": "reject",
                                                                       "reason_code": "artefact"})
            assert _message(anna, again) == "not recorded: audit sample " \
                f"{samples[agreed_job]} was decided already (agreed) by bob"
            assert "Agreed by <b>bob</b>" in anna.get(f"/audit/{samples[agreed_job]}").text
            assert "blind audit review" not in anna.get("/queue").text  # nothing waits any more
            assert anna.post(f"/audit/{samples[agreed_job]}/decide", {"verdict": "agree"}).status == 403

    assert recorder.delivered == []  # a blind review never sends anything
    with session_scope(sessions) as s:
        rows = {r.job_id: r for r in s.execute(select(AuditSample)).scalars()}
        assert {j: (str(r.state), r.reviewed_by) for j, r in rows.items()} == {
            sent_job: ("rejected", "anna"), unsent_job: ("rejected", "anna"), agreed_job: ("agreed", "bob")}
        assert rows[sent_job].reason == "segmentation_wrong: misses the left lobe"
        [retraction] = s.execute(select(Retraction)).scalars().all()
        assert (retraction.job_id, str(retraction.reason), retraction.username) == (sent_job, "quality", "anna")
        assert retraction.note == f"blind audit sample {samples[sent_job]}: segmentation_wrong: misses the left lobe"
        assert rows[sent_job].retraction_id == retraction.id and rows[unsent_job].retraction_id is None
        events = [(e.action, e.object_id, e.actor) for e in s.execute(
            select(AuditEvent).where(AuditEvent.action.like("audit_sample.%")).order_by(AuditEvent.id)).scalars()]
        for action, job_id, actor in (("audit_sample.rejected", sent_job, "user:anna"),
                                      ("audit_sample.retracted", sent_job, "user:anna"),
                                      ("audit_sample.rejected", unsent_job, "user:anna"),
                                      ("audit_sample.retraction_refused", unsent_job, "user:anna"),
                                      ("audit_sample.agreed", agreed_job, "user:bob"),
                                      ("audit_sample.viewed", sent_job, "user:anna")):
            assert (action, str(job_id), actor) in events, action
        refused = s.execute(select(AuditEvent).where(AuditEvent.action == "audit_sample.retraction_refused")
                            ).scalar_one()
        assert "never sent" in refused.details["why"]
        assert audit.verify(s).ok
        [row] = REPORTS["gate"].run(s)
    assert (row["released"], row["retracted"], row["audited"], row["audit_agreed"], row["audit_rejected"]) == \
        (3, 1, 3, 1, 2)
    assert row["audit_miss"] == pytest.approx(2 / 3)
