"""Drift alarms through the real services (issue 22, item 1): ``specgate scp`` and ``specgate worker`` on
PostgreSQL and Redis with the shipped model, an Orthanc PACS as the destination (the stack of
:mod:`tests.e2e.test_pipeline_e2e`, its SCP started again to allow three senders).

Three sources (calling AEs ``CT_EAST``, ``CT_WEST``, ``CT_NORTH``, each its station name, scanner and
software version) send small CT liver phantoms (the shipped model's own kind) for a baseline of
``BASELINE`` studies each. Then ``CT_EAST``'s studies change (Gaussian blur, sigma 1 voxel: the detector or
the reconstruction kernel went soft) while the other two go on as before. Stated and checked: the chart of
``CT_EAST`` alarms (``oodm``) within ``ALARM_WITHIN`` changed studies and its stop rule fires within
``STOP_WITHIN``; no alarm on the other two sources; ``CT_EAST``'s next, unchanged study, whose OODM is
below tau, is held (``held_for: drift_stop``) and not sent to Orthanc; the alarm is cleared with
``specgate drift clear`` (audited with who and why) and the source's next study is released again. Last,
``CT_WEST``'s software version changes: a metadata alarm on the new source, its study still sent.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from scipy.ndimage import gaussian_filter
from sqlalchemy import select

from ledger.schema import AuditEvent, DriftAlarm, DriftChart, DriftObservation, Result
from model.data.phantoms import phantom_study
from review.app import ReviewActions
from specgate.settings import Settings
from specgate.synthetic import write_series
from tests.e2e import test_pipeline_e2e as pipeline_e2e
from tests.e2e.test_pipeline_e2e import Stack, _port_open, _seg_uids_at
from tests.integration.review.helpers import Client, Recorder, ReviewServer, make_user, review_config
from tests.peers import wait_for

pytestmark = pytest.mark.slow

stack = pipeline_e2e.stack  # the e2e stack fixture (PostgreSQL, Redis, Orthanc, specgate scp), shared

BASELINE = 5  # studies per source before its chart starts
ALARM_WITHIN = 2  # changed studies of CT_EAST until its oodm alarm (stated in the report)
STOP_WITHIN = 3  # ... until its stop alarm
SOURCES = {  # calling AE -> the scanner's header fields
    "CT_EAST": {"StationName": "CT-EAST-1", "ManufacturerModelName": "Scan 64", "SoftwareVersions": "VA40"},
    "CT_WEST": {"StationName": "CT-WEST-1", "ManufacturerModelName": "Scan 128", "SoftwareVersions": "VB20"},
    "CT_NORTH": {"StationName": "CT-NORTH-2", "ManufacturerModelName": "Scan 64", "SoftwareVersions": "VA44"},
}


class Sources:
    """Phantom studies from the three sources: each a fresh seed, written once and sent by its own AE."""

    def __init__(self, stack: Stack, tmp: Path) -> None:
        self.stack, self.tmp, self.seed = stack, tmp, 0

    def send(self, ae_title: str, *, blur: float = 0.0, headers: dict[str, str] | None = None) -> str:
        self.seed += 1
        case = phantom_study("ct_liver", seed=100 + self.seed)
        image = gaussian_filter(case.image.astype(np.float32), sigma=blur) if blur else case.image
        series = write_series(image, case.spacing, case.modality, self.tmp / f"s{self.seed}",
                              series_description="drift e2e", patient_id="TEST-DRIFT")
        ae = AE(ae_title=ae_title)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", self.stack.scp_port, ae_title="SPECGATE")
        assert assoc.is_established
        try:
            for path in series.paths:
                ds = dcmread(path)
                for keyword, value in {**SOURCES[ae_title], **(headers or {})}.items():
                    setattr(ds, keyword, value)
                assert int(assoc.send_c_store(ds).Status) == 0
        finally:
            assoc.release()
        return series.study_instance_uid

    def finish(self, *study_uids: str) -> dict[str, tuple[str, int]]:
        """Wait until every study's job has finished; {study: (state, job id)}."""
        done = {}
        for uid in study_uids:
            job = self.stack.wait_state(uid, {"sent", "held", "failed"}, timeout=240)
            assert str(job.state) != "failed", (job.reason_code, job.reason_detail)
            done[uid] = (str(job.state), job.id)
        return done


def _alarms(stack: Stack) -> list[tuple[str, str, int]]:
    """(calling AE, kind, first job) of every alarm, in the order opened."""
    with stack.sessions() as s:  # type: ignore[operator]
        rows = s.execute(select(DriftAlarm, DriftChart).join(DriftChart, DriftChart.id == DriftAlarm.chart_id)
                         .order_by(DriftAlarm.id)).all()
        return [(c.calling_ae, a.kind, a.first_job_id) for a, c in rows]


def _result(stack: Stack, job_id: int) -> Result:
    with stack.sessions() as s:  # type: ignore[operator]
        return s.execute(select(Result).where(Result.job_id == job_id)).scalar_one()


def test_drift_on_one_source_alarms_stops_it_and_is_cleared(stack: Stack, tmp_path: Path) -> None:
    stack.kill("scp", signal.SIGTERM)
    stack.env.update({"SPECGATE_ALLOWED_CALLERS": ",".join(f"{ae}@127.0.0.1" for ae in SOURCES),
                      "SPECGATE_DRIFT_BASELINE_STUDIES": str(BASELINE), "SPECGATE_STUDY_QUIET_SECONDS": "1",
                      "SPECGATE_WORKER_TORCH_THREADS": "1"})
    stack.start("scp", "scp")
    wait_for(lambda: _port_open(stack.scp_port), timeout=60, what="specgate scp listening")
    stack.start("worker", "worker")
    src = Sources(stack, tmp_path)

    baseline = src.finish(*[src.send(ae) for _ in range(BASELINE) for ae in SOURCES])
    assert {state for state, _ in baseline.values()} == {"sent"}  # in distribution: released and delivered
    assert _alarms(stack) == []

    # CT_EAST's studies go soft; CT_WEST and CT_NORTH do not change
    changed: list[int] = []
    for _ in range(STOP_WITHIN):
        east = src.send("CT_EAST", blur=1.0)
        others = [src.send("CT_WEST"), src.send("CT_NORTH")]
        done = src.finish(east, *others)
        changed.append(done[east][1])
        assert {done[u][0] for u in others} == {"sent"}
        if any(kind == "stop" for _, kind, _ in _alarms(stack)):
            break
    alarms = _alarms(stack)
    assert {ae for ae, _, _ in alarms} == {"CT_EAST"}, alarms  # not on the unchanged sources
    first = {kind: job for _, kind, job in reversed(alarms)}
    assert changed.index(first["oodm"]) + 1 <= ALARM_WITHIN and changed.index(first["stop"]) + 1 <= STOP_WITHIN
    with stack.sessions() as s:  # type: ignore[operator]
        seen = s.execute(select(DriftObservation.calling_ae, DriftObservation.oodm, DriftObservation.tau,
                                DriftObservation.in_baseline).order_by(DriftObservation.id)).all()
    for ae in SOURCES:  # what the report states: the OODMs each source's chart saw
        print(ae, "baseline", [round(o, 4) for a, o, _, b in seen if a == ae and b],
              "after", [round(o, 4) for a, o, _, b in seen if a == ae and not b], "tau", round(seen[0][2], 4))
    print(f"CT_EAST alarms after changed studies: oodm {changed.index(first['oodm']) + 1}, "
          f"stop {changed.index(first['stop']) + 1}; alarms {[(k, j) for _, k, j in alarms]}")

    # the stop rule: CT_EAST's next study is unchanged, its OODM below tau, and it is held all the same
    normal = src.send("CT_EAST")
    state, job_id = src.finish(normal)[normal]
    res = _result(stack, job_id)
    assert state == "held" and res.oodm <= res.tau and not res.is_ood, (state, res.oodm, res.tau)
    with stack.sessions() as s:  # type: ignore[operator]
        held = s.execute(select(AuditEvent).where(AuditEvent.action == "job.held",
                                                  AuditEvent.object_id == str(job_id))).scalar_one()
        stop_id = s.execute(select(DriftAlarm.id).where(DriftAlarm.kind == "stop")).scalar_one()
        assert held.details["held_for"] == "drift_stop" and held.details["drift_alarm_id"] == stop_id
        observed = s.execute(select(DriftObservation).where(DriftObservation.job_id == job_id)).scalar_one()
        assert (observed.calling_ae, observed.station_name, observed.software_versions, observed.kvp) == (
            "CT_EAST", "CT-EAST-1", "VA40", 120.0)
    assert _seg_uids_at(stack.orthanc, normal) == []  # nothing of it reached the PACS
    # the radiologist's study page says why a result in distribution waits for them
    settings = Settings.load(data_dir=Path(stack.env["SPECGATE_DATA_DIR"]),
                             database_url=stack.env["SPECGATE_DATABASE_URL"])
    make_user(stack.sessions, "dr.drift", "radiologist")
    with ReviewServer(review_config(settings), stack.sessions, ReviewActions(deliver=Recorder().deliver)) as srv:
        reader = Client(srv.url)
        assert reader.login("dr.drift").status == 303
        page = reader.get(f"/studies/{job_id}")
    assert page.status == 200 and 'id="held-for"' in page.text
    assert f"drift stop alarm #{stop_id} is open" in page.text

    status = json.loads(stack.cli("drift", "status", "--format", "json").stdout)
    assert {a["id"] for a in status["open_alarms"] if a["kind"] == "stop"} == {stop_id}
    assert sorted(c["calling_ae"] for c in status["charts"] if c["open_alarms"]) == ["CT_EAST"]

    # the admin clears it, saying why: audited; CT_EAST's next study is gated by its OODM again
    out = stack.cli("drift", "clear", str(stop_id), "--reason", "detector recalibrated", "--user", "root")
    assert f"drift alarm {stop_id} (stop) cleared by user:root" in out.stdout
    with stack.sessions() as s:  # type: ignore[operator]
        cleared = s.execute(select(AuditEvent).where(AuditEvent.action == "drift.alarm_cleared")).scalar_one()
        assert (cleared.actor, cleared.object_id, cleared.details["reason"]) == (
            "user:root", str(stop_id), "detector recalibrated")
    again = src.send("CT_EAST")
    state, job_id = src.finish(again)[again]
    assert state == "sent"
    assert _seg_uids_at(stack.orthanc, again) == [_result(stack, job_id).seg_sop_instance_uid]

    # CT_WEST's scanner gets a software update: a new source, and a metadata alarm (nothing held for it)
    updated = src.send("CT_WEST", headers={"SoftwareVersions": "VB30"})
    state, job_id = src.finish(updated)[updated]
    assert state == "sent"
    with stack.sessions() as s:  # type: ignore[operator]
        [(alarm, chart)] = s.execute(select(DriftAlarm, DriftChart).join(DriftChart, DriftChart.id == DriftAlarm.chart_id)
                                     .where(DriftAlarm.kind == "metadata")).all()
        assert (chart.calling_ae, chart.software_versions, alarm.first_job_id) == ("CT_WEST", "VB30", job_id)
        assert alarm.detail["novel"] == {"software_versions": "VB30"} and alarm.state == "open"
