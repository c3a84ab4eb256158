"""The drift watch on the ledger, both backends (:mod:`ledger.drift`): baseline, EWMA charts against limits
computed here from the configured lambda and L, alarms as ledger and audit rows, the stop rule's answer,
metadata novelty, clearing (who and why), the status rows and the Prometheus gauges."""

from __future__ import annotations

import http.server
import json
import math
import threading
import uuid

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import func, select

from ledger import audit, drift, jobs
from ledger.db import session_scope
from ledger.drift import DriftConfig, SeriesMetadata
from ledger.drift_prometheus import DriftCollector
from ledger.schema import AuditEvent, DriftAlarm, DriftObservation, Study

TAU = 0.03
CFG = DriftConfig(baseline_studies=8, ewma_lambda=0.2, rate_lambda=0.05, limit_l=3.0, stop_l=4.5)
SCANNER = SeriesMetadata(station_name="CT-EAST", manufacturer="ACME", manufacturer_model="Scan 64",
                         software_versions="VA40", modality="CT", slice_thickness=1.25, pixel_spacing=0.7,
                         kvp=120.0, convolution_kernel="B30f")


def _job(s, ae: str) -> int:
    study = Study(study_instance_uid=f"2.25.{uuid.uuid4().int}", calling_ae=ae)
    s.add(study)
    s.flush()
    return jobs.create_job(s, study, actor="test").id


def _observe(sessions, ae: str, oodm: float, meta: SeriesMetadata = SCANNER, cfg: DriftConfig = CFG,
             is_ood: bool | None = None) -> tuple[int, drift.Watch]:
    with session_scope(sessions) as s:
        job_id = _job(s, ae)
        watch = drift.observe(s, job_id, model="default", meta=meta, oodm=oodm, tau=TAU,
                              is_ood=oodm > TAU if is_ood is None else is_ood, cfg=cfg)
    return job_id, watch


def _baseline(sessions, ae: str, rng: np.random.Generator, meta: SeriesMetadata = SCANNER) -> list[float]:
    scores = list(rng.normal(-1.0, 0.2, CFG.baseline_studies))
    for x in scores:
        _, watch = _observe(sessions, ae, TAU * math.exp(x), meta)
        assert watch.opened == () and watch.stop_alarm_id is None
    return scores


def test_shift_opens_oodm_then_stop_alarm_audited_and_clear_restarts(migrated) -> None:
    _, _, sessions = migrated
    rng = np.random.default_rng(7)
    scores = _baseline(sessions, "CT_EAST", rng)
    west = SeriesMetadata(station_name="CT-WEST", manufacturer="ACME", manufacturer_model="Scan 64",
                          software_versions="VA40")
    _baseline(sessions, "CT_WEST", rng, west)
    mean, sd = float(np.mean(scores)), float(np.std(scores, ddof=1))
    k = math.sqrt(0.2 / 1.8)
    # the chart, computed here: one in-control study, then studies 2.5 sd up, until the stop limit
    ewma, opened_kinds, job_of = 0.0, [], {}
    shifted = [mean, *[mean + 2.5 * sd] * 12]
    for x in shifted:
        job_id, watch = _observe(sessions, "CT_EAST", TAU * math.exp(x))
        ewma = max(0.0, 0.2 * (x - mean) / sd + 0.8 * ewma)
        for a in watch.opened:
            opened_kinds.append(a.kind)
            job_of[a.kind] = job_id
            assert a.first_job_id == job_id
        expect = [kind for kind, lim in (("oodm", 3.0 * k), ("stop", 4.5 * k)) if ewma > lim]
        assert sorted(set(opened_kinds)) == sorted(expect), (ewma, opened_kinds)
        with session_scope(sessions) as s:
            row = s.execute(select(DriftObservation).where(DriftObservation.job_id == job_id)).scalar_one()
            assert row.ewma_oodm == pytest.approx(ewma, rel=1e-6) and row.limit_oodm == pytest.approx(3.0 * k)
        if "stop" in expect:
            assert watch.stop_alarm_id is not None
            break
    assert opened_kinds == ["oodm", "stop"]  # all below tau: the gate released every one of them
    stop_id = watch.stop_alarm_id
    # the stop alarm holds the next study, however typical; the other source is not touched
    _, again = _observe(sessions, "CT_EAST", TAU * math.exp(mean))
    assert again.stop_alarm_id == stop_id and again.opened == ()
    _, other = _observe(sessions, "CT_WEST", TAU * math.exp(mean + 1.0 * sd), west)
    assert other.stop_alarm_id is None and other.opened == ()
    with session_scope(sessions) as s:
        rows = {a.kind: a for a in s.execute(select(DriftAlarm)).scalars()}
        assert set(rows) == {"oodm", "stop"} and rows["stop"].first_job_id == job_of["stop"]
        opened = s.execute(select(AuditEvent).where(AuditEvent.action == "drift.alarm_opened")
                           .order_by(AuditEvent.id)).scalars().all()
        assert [(e.object_id, e.details["kind"], e.details["calling_ae"]) for e in opened] == [
            (str(rows["oodm"].id), "oodm", "CT_EAST"), (str(stop_id), "stop", "CT_EAST")]
        status = {c["calling_ae"]: c for c in drift.charts_status(s, CFG)}
        assert status["CT_EAST"]["open_alarms"] == [f"{rows['oodm'].id}:oodm", f"{stop_id}:stop"]
        assert status["CT_WEST"]["open_alarms"] == [] and status["CT_WEST"]["baseline_done"]
    registry = CollectorRegistry()
    registry.register(DriftCollector(sessions))
    text = generate_latest(registry).decode()
    assert 'specgate_drift_alarms_open{kind="stop",model="default"} 1.0' in text
    assert 'specgate_drift_alarms_open{kind="metadata",model="default"} 0.0' in text
    assert 'specgate_drift_charts{model="default"} 2.0' in text and "CT_EAST" not in text

    with session_scope(sessions) as s, pytest.raises(drift.DriftError, match="needs a reason"):
        drift.clear(s, stop_id, user="user:root", reason="  ")
    with session_scope(sessions) as s:
        drift.clear(s, stop_id, user="user:root", reason="detector recalibrated by the vendor")
    with session_scope(sessions) as s, pytest.raises(drift.DriftError, match="already cleared by user:root"):
        drift.clear(s, stop_id, user="user:other", reason="again")
    with session_scope(sessions) as s:
        ev = s.execute(select(AuditEvent).where(AuditEvent.action == "drift.alarm_cleared")).scalar_one()
        assert (ev.actor, ev.object_id, ev.details["reason"], ev.details["restarted"]) == (
            "user:root", str(stop_id), "detector recalibrated by the vendor", True)
        assert audit.verify(s).ok
    # restarted: the next typical study is charted from 0 and not held (the oodm alarm stays open)
    _, after = _observe(sessions, "CT_EAST", TAU * math.exp(mean))
    assert after.stop_alarm_id is None and after.opened == ()


def test_ood_rate_chart_opens_its_own_alarm(migrated) -> None:
    _, _, sessions = migrated
    rng = np.random.default_rng(3)
    _baseline(sessions, "MR_1", rng, SeriesMetadata(station_name="MR-1"))
    p0 = 0.5 / (CFG.baseline_studies + 1)  # no OOD study in the baseline
    limit = p0 + 3.0 * math.sqrt(p0 * (1 - p0)) * math.sqrt(0.05 / 1.95)
    rate, kinds = p0, []
    for i in range(6):  # OOD by the gate, with an unremarkable OODM score (is_ood given apart)
        _, watch = _observe(sessions, "MR_1", TAU * math.exp(-1.0), SeriesMetadata(station_name="MR-1"), is_ood=True)
        rate = max(p0, 0.05 + 0.95 * rate)
        kinds += [a.kind for a in watch.opened]
        assert ("ood_rate" in kinds) == (rate > limit), (i, rate, limit)
    assert "ood_rate" in kinds and "oodm" not in kinds


def test_metadata_novelty_new_software_version_accepted_by_clearing(migrated) -> None:
    _, _, sessions = migrated
    rng = np.random.default_rng(5)
    _baseline(sessions, "CT_EAST", rng)
    # same kernel, thickness within tolerance: nothing
    _, quiet = _observe(sessions, "CT_EAST", TAU * 0.4, SeriesMetadata(**{**SCANNER.__dict__, "slice_thickness": 1.3}))
    assert quiet.opened == ()
    # a software update: a new source (its own chart) whose version the sender's baseline never saw
    updated = SeriesMetadata(**{**SCANNER.__dict__, "software_versions": "VB10", "slice_thickness": 2.5})
    job_id, watch = _observe(sessions, "CT_EAST", TAU * 0.4, updated)
    assert [(a.kind, a.detail["novel"]) for a in watch.opened] == [
        ("metadata", {"software_versions": "VB10", "slice_thickness": 2.5})]
    assert watch.stop_alarm_id is None and watch.hold is None  # by default a metadata alarm does not hold results
    _, second = _observe(sessions, "CT_EAST", TAU * 0.4, updated)
    assert second.opened == ()  # one open alarm per chart and kind
    with session_scope(sessions) as s:
        drift.clear(s, watch.opened[0].id, user="user:root", reason="VB10 validated by physics")
    _, accepted = _observe(sessions, "CT_EAST", TAU * 0.4, updated)
    assert accepted.opened == ()
    # a sender never seen has no baseline to differ from: its chart starts one
    _, newcomer = _observe(sessions, "NEW_CT", TAU * 0.4, SeriesMetadata(station_name="CT-NEW"))
    assert newcomer.opened == ()
    with session_scope(sessions) as s:
        assert s.execute(select(func.count()).select_from(DriftAlarm).where(DriftAlarm.state == "open")).scalar() == 0
        assert [a.clear_reason for a in s.execute(select(DriftAlarm)).scalars()] == ["VB10 validated by physics"]


def test_a_job_observed_twice_counts_once(migrated) -> None:
    _, _, sessions = migrated
    with session_scope(sessions) as s:
        job_id = _job(s, "PACS")
        drift.observe(s, job_id, model="default", meta=SCANNER, oodm=0.01, tau=TAU, is_ood=False, cfg=CFG)
    with session_scope(sessions) as s:  # an attempt that died after recording its result, run again
        drift.observe(s, job_id, model="default", meta=SCANNER, oodm=0.01, tau=TAU, is_ood=False, cfg=CFG)
        assert s.execute(select(func.count()).select_from(DriftObservation)).scalar() == 1
        assert drift.charts_status(s, CFG)[0]["studies"] == 1


def test_drift_cli_status_and_clear(migrated, cli) -> None:
    _, _, sessions = migrated
    rng = np.random.default_rng(7)
    scores = _baseline(sessions, "CT_EAST", rng)
    mean, sd = float(np.mean(scores)), float(np.std(scores, ddof=1))
    watch = drift.Watch()
    while watch.stop_alarm_id is None:
        _, watch = _observe(sessions, "CT_EAST", TAU * math.exp(mean + 4 * sd))
    table = cli("drift", "status").output
    header, _, row = table.splitlines()[:3]
    assert header.split()[:4] == ["CHART", "MODEL", "AE", "STATION"] and row.split()[1:4] == ["default", "CT_EAST",
                                                                                             "CT-EAST"]
    assert f"alarm {watch.stop_alarm_id} stop  RESULTS HELD: CT_EAST / CT-EAST / VA40, model default" in table
    as_json = json.loads(cli("drift", "status", "--format", "json").output)
    assert [a["kind"] for a in as_json["open_alarms"]] == ["stop", "oodm"]
    assert as_json["charts"][0]["baseline_n"] == CFG.baseline_studies
    assert "not cleared: no drift alarm 999" in cli("drift", "clear", "999", "--reason", "x", expect=1).output
    out = cli("drift", "clear", str(watch.stop_alarm_id), "--reason", "vendor fixed it", "--user", "root").output
    assert f"drift alarm {watch.stop_alarm_id} (stop) cleared by user:root" in out
    assert [a["kind"] for a in json.loads(cli("drift", "status", "--format", "json").output)["open_alarms"]] == ["oodm"]


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(204 if self.path == "/ok" else 500)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None  # quiet: the test reads what arrived


def test_webhook_gets_each_new_alarm_and_a_failure_is_audited(migrated) -> None:
    from worker.drift_notify import notify

    _, _, sessions = migrated
    rng = np.random.default_rng(7)
    scores = _baseline(sessions, "CT_EAST", rng)
    _, watch = _observe(sessions, "CT_EAST", TAU * math.exp(float(np.mean(scores)) + 12 * float(np.std(scores))))
    assert [a.kind for a in watch.opened] == ["oodm", "stop"]
    server = http.server.HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        _Hook.received.clear()
        assert notify(sessions, DriftConfig(notify_url=base + "/ok"), watch.opened) == 2
        assert [(m["event"], m["kind"], m["calling_ae"], m["id"]) for m in _Hook.received] == [
            ("specgate.drift_alarm", a.kind, "CT_EAST", a.id) for a in watch.opened]
        assert notify(sessions, DriftConfig(notify_url=base + "/broken"), watch.opened[:1]) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert notify(sessions, DriftConfig(notify_url=base + "/ok", notify_timeout_s=2), watch.opened[:1]) == 0
    with session_scope(sessions) as s:
        failed = s.execute(select(AuditEvent).where(AuditEvent.action == "drift.notify_failed")
                           .order_by(AuditEvent.id)).scalars().all()
        assert [(e.object_id, e.details["status"]) for e in failed] == [(str(watch.opened[0].id), 500),
                                                                      (str(watch.opened[0].id), 0)]
        assert "Connection refused" in failed[1].details["error"]


def test_baseline_by_date_range(migrated) -> None:
    """With ``baseline_until``: studies before ``baseline_since`` are neither baseline nor charted, those
    in the range are the baseline, the first after it closes the baseline and is charted. Time passes here
    as the configured range moves past "now" between studies."""
    from datetime import timedelta

    from ledger.schema import utcnow

    _, _, sessions = migrated
    later = utcnow() + timedelta(days=1)
    before = DriftConfig(baseline_since=later, baseline_until=later + timedelta(days=1))
    _observe(sessions, "CT_EAST", 0.01, cfg=before)
    during = DriftConfig(baseline_since=utcnow() - timedelta(days=1), baseline_until=later, baseline_studies=1000)
    for oodm in (0.010, 0.012, 0.011, 0.013):
        _observe(sessions, "CT_EAST", oodm, cfg=during)
    after = DriftConfig(baseline_since=utcnow() - timedelta(days=2), baseline_until=utcnow() - timedelta(seconds=1))
    job_id, _ = _observe(sessions, "CT_EAST", 0.012, cfg=after)
    with session_scope(sessions) as s:
        rows = s.execute(select(DriftObservation).order_by(DriftObservation.id)).scalars().all()
        assert [r.in_baseline for r in rows] == [False, True, True, True, True, False]
        assert [r.ewma_oodm is not None for r in rows] == [False] * 5 + [True]
        [chart] = drift.charts_status(s, after)
        assert (chart["baseline_n"], chart["baseline_done"], chart["studies"]) == (4, True, 6)
        scores = [math.log(o / TAU) for o in (0.010, 0.012, 0.011, 0.013)]
        assert chart["baseline_mean"] == pytest.approx(np.mean(scores), abs=1e-4)
        assert chart["baseline_sd"] == pytest.approx(np.std(scores, ddof=1), abs=1e-4)


def test_with_hold_on_metadata_a_new_software_version_is_held_until_cleared(migrated) -> None:
    """``drift_hold_on_metadata``: the studies of a source whose metadata alarm is open are held (the worker
    holds them ``drift_metadata``), like a stop; clearing the alarm releases the next ones."""
    _, _, sessions = migrated
    hold = DriftConfig(**{**CFG.__dict__, "hold_on_metadata": True})
    rng = np.random.default_rng(7)
    for x in rng.normal(-1.0, 0.2, CFG.baseline_studies):
        _, watch = _observe(sessions, "CT_EAST", TAU * math.exp(x), cfg=hold)
        assert watch.hold is None
    updated = SeriesMetadata(**{**SCANNER.__dict__, "software_versions": "VB10"})
    _, first = _observe(sessions, "CT_EAST", TAU * 0.4, updated, cfg=hold)
    [alarm] = first.opened
    assert alarm.kind == "metadata" and first.hold == (alarm.id, "drift_metadata")
    _, second = _observe(sessions, "CT_EAST", TAU * 0.4, updated, cfg=hold)
    assert second.opened == () and second.hold == (alarm.id, "drift_metadata")  # still held, one alarm
    _, other = _observe(sessions, "CT_EAST", TAU * 0.4, cfg=hold)  # the scanner that was not updated
    assert other.hold is None
    with session_scope(sessions) as s:
        drift.clear(s, alarm.id, user="user:root", reason="VB10 checked by physics on a phantom")
    _, after = _observe(sessions, "CT_EAST", TAU * 0.4, updated, cfg=hold)
    assert after.hold is None


def test_the_hold_on_metadata_setting_reaches_the_drift_config(tmp_path) -> None:
    from specgate.settings import Settings

    assert Settings.load(data_dir=tmp_path).drift_config().hold_on_metadata is False
    assert Settings.load(data_dir=tmp_path, drift_hold_on_metadata=True).drift_config().hold_on_metadata is True

