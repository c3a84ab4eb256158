"""Retraction by IHE IOCM on a real ledger (SQLite and PostgreSQL) and a real DICOM peer: a result is run
through the pipeline, delivered (SEG + SR on one association), then retracted; the KOS reaches the peer
and references exactly what it holds. Refusals (never sent, twice, no user) send nothing; the reconciler
finds a retraction whose KOS has not gone out yet, and not one that has."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    KeyObjectSelectionDocumentStorage,
    SegmentationStorage,
)
from sqlalchemy import select

from dicom_node.config import Destination
from dicom_node.scu import RetryPolicy
from ledger.db import session_scope
from ledger.schema import AuditEvent, Job, JobState, Result, RetractionDelivery
from model.data.phantoms import phantom_study
from specgate.synthetic import write_series
from tests.integration.worker.test_pipeline import _ingest, _run, _segmenter, _signature_of
from tests.peers import free_port
from worker.config import DeliveryConfig
from worker.delivery import deliver_job
from worker.reconcile import reconcile
from worker.retraction import RetractionError, retract_job, send_retraction


class CollectingPeer:
    """A PACS stand-in that stores SEG, SR and KOS objects and keeps what it was sent."""

    def __init__(self) -> None:
        self.received: list[Dataset] = []
        self.ae = AE(ae_title="PACS")
        for uid in (SegmentationStorage, Comprehensive3DSRStorage, KeyObjectSelectionDocumentStorage):
            self.ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        self.port = free_port()
        self.lock = threading.Lock()

    def _store(self, event: evt.Event) -> int:
        with self.lock:
            self.received.append(event.dataset)
        return 0x0000

    def __enter__(self) -> CollectingPeer:
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()

    def modalities(self) -> list[str]:
        return [str(ds.Modality) for ds in self.received]


FAST = RetryPolicy(max_attempts=2, backoff_s=0.1, backoff_max_s=0.2, timeout_s=5)


def _released_job(migrated, tmp_path: Path, tiny_model) -> tuple[object, int]:
    settings, _, sessions = migrated
    case = phantom_study("ct_liver", seed=21)
    series = write_series(case.image, case.spacing, "CT", tmp_path / "series")
    probe = _segmenter(tiny_model, tmp_path, np.stack([np.ones(4) / 2, np.full(4, -0.5)]))
    own = _signature_of(probe, case)
    seg = _segmenter(tiny_model, tmp_path, np.stack([own, own + 1e-3, own - 1e-3]))
    job_id = _ingest(sessions, series)
    assert _run(settings, sessions, job_id, seg, "task-r").state == "released"
    return sessions, job_id


def test_retraction_reaches_the_peer_once_and_refusals_send_nothing(migrated, tmp_path: Path, tiny_model) -> None:
    sessions, job_id = _released_job(migrated, tmp_path, tiny_model)
    with CollectingPeer() as peer:
        dest = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=peer.port)
        config = DeliveryConfig(destinations=(dest,), retry=FAST)
        with pytest.raises(RetractionError, match="never sent"):
            retract_job(sessions, job_id, user="dr.x", reason="quality")
        assert deliver_job(sessions, job_id, config, actor="test") == "sent"
        assert sorted(peer.modalities()) == ["SEG", "SR"]  # the evidence travels with the SEG
        with session_scope(sessions) as s:
            res = s.execute(select(Result).where(Result.job_id == job_id)).scalar_one()
            seg_uid, sr_uid = res.seg_sop_instance_uid, res.sr_sop_instance_uid
        with pytest.raises(RetractionError, match="needs the user"):
            retract_job(sessions, job_id, user=" ", reason="quality")

        rid = retract_job(sessions, job_id, user="dr.x", reason="patient-safety", note="wrong side")
        lost: list[int] = []  # the retraction's task was lost before it ran: the reconciler finds it
        reconcile(sessions, enqueue_segment=lambda _: None, enqueue_delivery=lambda _: None,
                  enqueue_retraction=lost.append, queued_deadline_s=0, stale_after_s=3600,
                  sending_stale_s=30)
        assert lost == [rid]
        [outcome] = send_retraction(sessions, rid, config, actor="test")
        assert outcome.sent
        kos = peer.received[-1]
        assert str(kos.Modality) == "KO" and kos.ConceptNameCodeSequence[0].CodeValue == "113037"
        refs = {str(i.ReferencedSOPInstanceUID) for st in kos.CurrentRequestedProcedureEvidenceSequence
                for se in st.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
        assert refs == {seg_uid, sr_uid}

        with pytest.raises(RetractionError, match="already retracted by dr.x"):
            retract_job(sessions, job_id, user="dr.y", reason="quality")
        again = send_retraction(sessions, rid, config, actor="test")  # a redelivered task: nothing new
        assert [o.already_sent for o in again] == [True] and len(peer.received) == 3
        lost.clear()
        reconcile(sessions, enqueue_segment=lambda _: None, enqueue_delivery=lambda _: None,
                  enqueue_retraction=lost.append, queued_deadline_s=0, stale_after_s=3600,
                  sending_stale_s=30)
        assert lost == []
    with session_scope(sessions) as s:
        assert str(s.get(Job, job_id).state) == JobState.SENT
        [row] = s.execute(select(RetractionDelivery)).scalars().all()
        assert (row.destination, str(row.state), row.attempts) == ("pacs", "sent", 1)
        [event] = s.execute(select(AuditEvent).where(AuditEvent.action == "result.retracted")).scalars().all()
        assert event.actor == "user:dr.x" and event.details["reason"] == "patient_safety"
        assert event.details["note"] == "wrong side"


def test_retracting_a_job_that_does_not_exist_or_has_no_result(migrated, tmp_path: Path) -> None:
    _, _, sessions = migrated
    with pytest.raises(RetractionError, match="does not exist"):
        retract_job(sessions, 424242, user="dr.x", reason="quality")
