"""A job's result goes to a DICOMweb destination the way it goes to a C-STORE one: the worker's
:func:`worker.delivery.deliver_job` sends the SEG and the SR by STOW-RS to Orthanc (Debian's DICOMweb
plugin), the job ends ``sent``; a retraction's KOS follows by the same road and references exactly what
Orthanc holds."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from dicom_node.config import Destination
from dicom_node.scu import RetryPolicy
from ledger.db import session_scope
from ledger.schema import Delivery, Job, JobState, Result, RetractionDelivery
from tests.integration.worker.test_retraction import _released_job
from tests.peers import Orthanc
from worker.config import DeliveryConfig
from worker.delivery import deliver_job
from worker.retraction import retract_job, send_retraction

FAST = RetryPolicy(max_attempts=2, backoff_s=0.1, backoff_max_s=0.2, timeout_s=10)


def test_seg_sr_and_kos_go_by_stow_rs(migrated, tmp_path: Path, tiny_model) -> None:
    sessions, job_id = _released_job(migrated, tmp_path, tiny_model)
    token = tmp_path / "password"
    token.write_text("stow-secret\n")
    with Orthanc(tmp_path / "orthanc", dicomweb=True, users={"specgate": "stow-secret"}) as orthanc:
        dest = Destination(name="web", url=orthanc.dicomweb_url + "/", username="specgate", password_file=token)
        config = DeliveryConfig(destinations=(dest,), retry=FAST)
        assert deliver_job(sessions, job_id, config, actor="test") == "sent"
        with session_scope(sessions) as s:
            res = s.execute(select(Result).where(Result.job_id == job_id)).scalar_one()
            seg_uid, sr_uid = res.seg_sop_instance_uid, res.sr_sop_instance_uid
            assert str(s.get(Job, job_id).state) == JobState.SENT
            [row] = s.execute(select(Delivery)).scalars().all()
            assert (row.destination, str(row.state), row.attempts, row.last_status) == ("web", "sent", 1, 200)
        held = {orthanc.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"]: i for i in orthanc.get("/instances")}
        assert set(held) == {seg_uid, sr_uid}
        assert orthanc.get(f"/instances/{held[seg_uid]}/simplified-tags")["Modality"] == "SEG"
        assert orthanc.get(f"/instances/{held[sr_uid]}/simplified-tags")["Modality"] == "SR"

        rid = retract_job(sessions, job_id, user="dr.x", reason="quality")
        [outcome] = send_retraction(sessions, rid, config, actor="test")
        assert outcome.sent and outcome.last_status == 200
        kos_ids = [i for i in orthanc.get("/instances") if i not in held.values()]
        [kos_id] = kos_ids
        assert orthanc.get(f"/instances/{kos_id}/simplified-tags")["Modality"] == "KO"
        kos = orthanc.get(f"/instances/{kos_id}/tags?simplify")
        refs = {i["ReferencedSOPInstanceUID"] for st in kos["CurrentRequestedProcedureEvidenceSequence"]
                for se in st["ReferencedSeriesSequence"] for i in se["ReferencedSOPSequence"]}
        assert refs == {seg_uid, sr_uid}
        again = send_retraction(sessions, rid, config, actor="test")  # a redelivered task sends nothing
        assert [o.already_sent for o in again] == [True] and len(orthanc.get("/instances")) == 3
    with session_scope(sessions) as s:
        [rrow] = s.execute(select(RetractionDelivery)).scalars().all()
        assert (rrow.destination, str(rrow.state), rrow.attempts, rrow.last_status) == ("web", "sent", 1, 200)
