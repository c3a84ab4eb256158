"""Silent (shadow) mode end to end (issue 22, item 2), on the real services of test_pipeline_e2e.py:
PostgreSQL, Redis, ``specgate scp`` and ``specgate worker`` subprocesses, an Orthanc PACS as the destination.

A second model (the shipped weights and bank, registered under a name of its own and put in shadow) has a
rule listed before the live one. A CT study sent over C-STORE makes two jobs: the live one (default model)
is delivered; the shadow one runs on its model's queue, is scored and compared (DSC of the two SEGs: the
same weights, so 1.0), and nothing of it reaches Orthanc, also after a reconcile pass. ``specgate model
promote`` makes it live: the next study is one job of that model, and its result is at Orthanc.
"""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from ledger import models
from ledger.db import session_scope
from ledger.schema import AuditEvent, Job, JobState, Result, ShadowComparison, Study
from model import weights as shipped
from tests.e2e.test_pipeline_e2e import Stack, _port_open, _seg_uids_at, _study, stack  # noqa: F401 (fixture)
from tests.integration.worker.test_queue_per_model import _register
from tests.peers import wait_for

pytestmark = pytest.mark.slow


def _jobs(st: Stack, study_uid: str) -> list[Job]:
    with st.sessions() as s:  # type: ignore[operator]
        return list(s.execute(select(Job).join(Study).where(Study.study_instance_uid == study_uid)
                              .order_by(Job.version, Job.shadow, Job.id)).scalars())


def _results(st: Stack, *job_ids: int) -> dict[int, Result]:
    with st.sessions() as s:  # type: ignore[operator]
        return {r.job_id: r for r in s.execute(select(Result).where(Result.job_id.in_(job_ids))).scalars()}


def _alive(st: Stack) -> None:
    for name, proc in st.procs.items():
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{st.log(name)}")


def test_a_shadow_model_beside_the_live_one_sends_nothing_until_promoted(stack: Stack, tmp_path: Path) -> None:  # noqa: F811
    name = f"liver-v2-{uuid.uuid4().hex[:6]}"  # its queue (gpu.NAME) is this test's alone on the shared Redis
    _register(stack.sessions, name, shipped.WEIGHTS_PATH, shipped.BANK_PATH)  # type: ignore[arg-type]
    with session_scope(stack.sessions) as s:  # type: ignore[arg-type]
        models.set_shadow(s, name, actor="user:dr.chair", why="acceptance")
    rules = [{"name": "ct-v2", "modalities": ["CT"], "min_slices": 8, "model": name},
             {"name": "ct", "modalities": ["CT"], "min_slices": 8}]
    stack.kill("scp", signal.SIGTERM)  # the SCP's assembler reads the rules at start
    stack.env["SPECGATE_RULES"] = json.dumps(rules)
    stack.start("scp", "scp")
    wait_for(lambda: _port_open(stack.scp_port), timeout=30, what="specgate scp listening again")
    stack.start("worker", "worker")  # every rule's model: gpu.default and gpu.NAME, and deliver

    first = _study(tmp_path, "ct_liver", "first")
    assert set(stack.send(first.paths)) == {0}

    def both_done() -> tuple[Job, Job] | None:
        _alive(stack)
        js = _jobs(stack, first.study_instance_uid)
        if len(js) == 2 and str(js[0].state) in ("sent", "failed") and str(js[1].state) in ("released", "held",
                                                                                               "failed"):
            return js[0], js[1]
        return None

    live, beside = wait_for(both_done, timeout=300, what="the live job sent and the shadow job scored", interval=0.2)
    assert (live.state, live.shadow, live.model_name) == (JobState.SENT, False, "default"), live.reason_detail
    assert (beside.shadow, beside.shadow_of_id, beside.model_name, beside.version) == (True, live.id, name, 1)
    assert beside.state in (JobState.RELEASED, JobState.HELD), beside.reason_detail
    res = _results(stack, live.id, beside.id)
    # the shadow result was made in full (SEG, SR, evidence) and compared: the same weights draw the same mask
    assert stack.file(res[beside.id].seg_path).is_file() and stack.file(str(res[beside.id].sr_path)).is_file()
    assert res[beside.id].oodm == pytest.approx(res[live.id].oodm)

    def compared() -> ShadowComparison | None:
        _alive(stack)
        with stack.sessions() as s:  # type: ignore[operator]
            return s.execute(select(ShadowComparison).where(ShadowComparison.shadow_job_id == beside.id)
                             ).scalar_one_or_none()

    comparison = wait_for(compared, timeout=60, what="the shadow job's comparison", interval=0.2)
    assert comparison.dsc == pytest.approx(1.0) and comparison.live_job_id == live.id and comparison.live_voxels > 0

    # at the PACS: the live SEG and SR, nothing of the shadow model, also after a reconcile pass
    assert _seg_uids_at(stack.orthanc, first.study_instance_uid) == [res[live.id].seg_sop_instance_uid]
    stack.reconcile()
    held_by_pacs = stack.orthanc.instance_uids()
    shadow_uids = {res[beside.id].seg_sop_instance_uid, res[beside.id].sr_sop_instance_uid}
    assert not shadow_uids & held_by_pacs
    assert {res[live.id].seg_sop_instance_uid, res[live.id].sr_sop_instance_uid} <= held_by_pacs
    assert f"beside job {live.id}: never approved or sent" in stack.cli("jobs", "show", str(beside.id)).stdout
    refused = stack.cli("jobs", "approve", str(beside.id), "--user", "dr.house", check=False)
    assert refused.returncode != 0 and f"job {beside.id} is a shadow result" in refused.stdout + refused.stderr
    report = json.loads(stack.cli("report", "shadow", "--format", "json").stdout)
    assert [(r["shadow_model"], r["live_model"], r["studies"], r["compared"], r["dsc_min"]) for r in report] == [
        (name, "default", 1, 1, pytest.approx(1.0))]

    # promoted: the next study is one live job of that model, and its result reaches the PACS
    out = stack.cli("model", "promote", name, "--user", "dr.chair", "--why", "committee").stdout
    assert f"model {name} is live" in out
    with stack.sessions() as s:  # type: ignore[operator]
        promoted = s.execute(select(AuditEvent).where(AuditEvent.action == "model.promoted")).scalar_one()
    assert (promoted.actor, promoted.object_id) == ("user:dr.chair", name)
    second = _study(tmp_path, "ct_liver", "second", seed=2)
    assert set(stack.send(second.paths)) == {0}
    sent = stack.wait_state(second.study_instance_uid, {"sent", "failed", "held"}, timeout=300)
    [only] = _jobs(stack, second.study_instance_uid)
    assert (only.id, only.model_name, only.shadow, only.rule_name) == (sent.id, name, False, "ct-v2")
    assert str(sent.state) == "sent", (sent.reason_code, sent.reason_detail)
    assert _seg_uids_at(stack.orthanc, second.study_instance_uid) == [_results(stack, only.id)[only.id].seg_sop_instance_uid]
