"""Upgrading a ledger that holds studies in every state (issue 12, "Upgrades"), on SQLite and PostgreSQL.

The ledger is built at revision 0002 (before the assembly counters existed) with a study in every state
the schema allows then: still receiving inside its quiet period (with no job, and with a job in state
``receiving``), queued, running, released, held, approved, sent, rejected, failed, superseded, one whose
series matched no rule, one sent without ``assembled_at`` recorded, and one that received more instances
after it was sent. It is then upgraded to head, either straight (``fresh``) or through the 0003 that
shipped first, which left every study at 0/0 (``after_broken_0003``: upgraded to 0003, counters set to 0/0,
then upgraded to head, where 0007 repairs them). Both must end the same: the counters computed from the
instances stored, the study still in its quiet period assembled by a real :class:`Assembler` pass once
its quiet period ends (one job, the right series), nothing else assembled again, the audit chain intact.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import Engine, MetaData, Table, insert, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.assembler import Assembler
from dicom_node.config import AssemblyConfig, SeriesRule
from ledger import audit, jobs, migrations
from ledger.db import open_engine, session_scope, sessionmaker_for
from ledger.schema import Job, JobAttempt, JobState, Result, Study, utcnow

QUIET_S = 60
RULES = (SeriesRule(name="ct", modalities=("CT",), min_slices=16),)
S = JobState

# study name -> the states its job versions walk through, oldest version first ([] = no job)
PATHS: dict[str, list[list[JobState]]] = {
    "waiting": [],
    "waiting_receiving_job": [[]],  # a version-1 job left in state 'receiving'
    "queued": [[S.QUEUED]],
    "running": [[S.QUEUED, S.RUNNING]],
    "released": [[S.QUEUED, S.RUNNING, S.RELEASED]],
    "held": [[S.QUEUED, S.RUNNING, S.HELD]],
    "approved": [[S.QUEUED, S.RUNNING, S.HELD, S.APPROVED]],
    "sent": [[S.QUEUED, S.RUNNING, S.RELEASED, S.SENT]],
    "rejected": [[S.QUEUED, S.RUNNING, S.HELD, S.REJECTED]],
    "failed": [[S.QUEUED, S.RUNNING, S.FAILED]],
    "superseded": [[S.QUEUED, S.RUNNING, S.HELD, S.SUPERSEDED], [S.QUEUED, S.RUNNING, S.RELEASED, S.SENT]],
    "no_match": [],
    "sent_no_assembled_at": [[S.QUEUED, S.RUNNING, S.RELEASED, S.SENT]],
    "more_after_sent": [[S.QUEUED, S.RUNNING, S.RELEASED, S.SENT]],
}
WAITING = ("waiting", "waiting_receiving_job")
# (received_count, assembled_count) right after the upgrade
EXPECTED_COUNTERS = {name: (16, 16) for name in PATHS} | {
    "waiting": (23, 0), "waiting_receiving_job": (16, 0), "no_match": (3, 3), "more_after_sent": (18, 16)}


@dataclass
class Seeded:
    now: datetime  # the seed's clock: the waiting studies' last instance came 5 s before it
    study_ids: dict[str, int] = field(default_factory=dict)
    axial: dict[str, str] = field(default_factory=dict)  # study name -> the series a job must choose
    jobs_before: dict[str, list[tuple[int, int, str]]] = field(default_factory=dict)  # (id, version, state)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = open_engine(db_url)
    try:
        yield eng
    finally:
        eng.dispose()


def _move(s: Session, jobs_table: Table, job_id: int, to: JobState, **fields: Any) -> None:
    """A job move as :func:`ledger.jobs.transition` makes it (the state's UPDATE and its ``job.<state>``
    audit event), on the 0002 table: today's ``transition`` reads and writes columns and tables later
    revisions added (``jobs.model_name``, ``job_attempts``: 0009)."""
    current = s.execute(select(jobs_table.c.state).where(jobs_table.c.id == job_id)).scalar_one()
    assert jobs.is_allowed(current, to)
    now = utcnow()
    values: dict[str, Any] = {"state": str(to), "updated_at": now, **fields}
    if to in jobs.TERMINAL:
        values["finished_at"] = now
    s.execute(update(jobs_table).where(jobs_table.c.id == job_id).values(**values))
    body: dict[str, Any] = {"from": str(current), "to": str(to)}
    if "reason_code" in fields:
        body["reason_code"] = fields["reason_code"]
    audit.append(s, actor="test", action=f"job.{to}", object_type="job", object_id=job_id, details=body)


def _seed_at_0002(engine: Engine, sessions: sessionmaker[Session]) -> Seeded:
    """Rows as a ledger at revision 0002 holds them, written through its own (reflected) tables; job
    moves as :func:`ledger.jobs.transition` makes them (:func:`_move`), so the audit trail is the code's."""
    meta = MetaData()
    meta.reflect(engine)
    t: dict[str, Table] = dict(meta.tables)
    assert "received_count" not in t["studies"].c  # really the 0002 schema
    now = utcnow()
    long_ago = now - timedelta(days=2)
    assembled = long_ago + timedelta(minutes=2)
    seeded = Seeded(now)

    def new_id(s: Session, table: str, **values: Any) -> int:
        return int(s.execute(insert(t[table]).values(**values).returning(t[table].c.id)).scalar_one())

    with session_scope(sessions) as s:
        for name, versions in PATHS.items():
            # instances: one time per instance; the waiting studies are still inside their quiet period
            if name in WAITING:
                series = {"LOCALIZER": [now - timedelta(seconds=20)] * 3, "AXIAL": [now - timedelta(seconds=5)] * 20}
                if name == "waiting_receiving_job":
                    series = {"AXIAL": [now - timedelta(seconds=5)] * 16}
            elif name == "no_match":
                series = {"AXIAL": [long_ago] * 3}
            elif name == "more_after_sent":
                series = {"AXIAL": [long_ago] * 16 + [now - timedelta(hours=2)] * 2}
            else:
                series = {"AXIAL": [long_ago] * 16}
            times = [ts for stamps in series.values() for ts in stamps]
            assembled_at = None if name in (*WAITING, "sent_no_assembled_at") else assembled
            study_uid = generate_uid()
            study_id = new_id(s, "studies", study_instance_uid=study_uid, calling_ae="PACS",
                              first_received_at=min(times), last_received_at=max(times), assembled_at=assembled_at)
            seeded.study_ids[name] = study_id
            audit.append(s, actor="PACS", action="study.receiving", object_type="study", object_id=study_id,
                         details={"study_instance_uid": study_uid})
            for description, stamps in series.items():
                series_uid = generate_uid()
                series_id = new_id(s, "series", study_id=study_id, series_instance_uid=series_uid, modality="CT",
                                   series_description=description)
                if description == "AXIAL":
                    seeded.axial[name] = series_uid
                for ts in stamps:
                    new_id(s, "instances", series_id=series_id, sop_instance_uid=generate_uid(),
                           sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                           spool_path=f"/spool/{generate_uid()}.dcm", size_bytes=1000, sha256="0" * 64,
                           calling_ae="PACS", received_at=ts)
            job_ids: list[int] = []
            for version, path in enumerate(versions, start=1):
                created = assembled + timedelta(seconds=version)
                job_id = new_id(s, "jobs", study_id=study_id, version=version,
                                state="queued" if path else "receiving", attempts=0, max_attempts=3,
                                series_instance_uid=seeded.axial[name] if path else None,
                                rule_name="ct" if path else None, created_at=created, updated_at=created)
                audit.append(s, actor="test", action="job.created", object_type="job", object_id=job_id,
                             details={"study_id": study_id, "version": version})
                job_ids.append(job_id)
            for version, (job_id, path) in enumerate(zip(job_ids, versions, strict=True), start=1):
                result_id = None
                for state in path[1:]:
                    fields: dict[str, Any] = {}
                    if state == S.FAILED:
                        fields["reason_code"] = "bad_spacing"
                    if state == S.SUPERSEDED:
                        fields["superseded_by_id"] = job_ids[version]
                    _move(s, t["jobs"], job_id, state, **fields)
                    if state in (S.RELEASED, S.HELD):
                        result_id = new_id(s, "results", job_id=job_id, seg_path=f"/results/{job_id}/seg.dcm",
                                           seg_sop_instance_uid=generate_uid(), seg_series_instance_uid=generate_uid(),
                                           oodm=0.5 if state == S.HELD else 0.1, tau=0.3, is_ood=state == S.HELD,
                                           model_id="m:1", weights_sha256="0" * 64, superseded=False,
                                           created_at=utcnow())
                    if state in (S.APPROVED, S.REJECTED):
                        decision = "approve" if state == S.APPROVED else "reject"
                        new_id(s, "reviews", job_id=job_id, username="dr", decision=decision, created_at=utcnow())
                    if state == S.SENT:
                        new_id(s, "deliveries", job_id=job_id, result_id=result_id, destination="pacs",
                               ae_title="PACS", host="127.0.0.1", port=104, state="sent", attempts=1,
                               created_at=utcnow(), updated_at=utcnow(), sent_at=utcnow())
                if path and path[-1] == S.SUPERSEDED:
                    s.execute(update(t["results"]).where(t["results"].c.job_id == job_id).values(superseded=True))
        rows = s.execute(select(t["jobs"].c.study_id, t["jobs"].c.id, t["jobs"].c.version, t["jobs"].c.state)
                         .order_by(t["jobs"].c.id)).all()
    by_id = {v: k for k, v in seeded.study_ids.items()}
    for study_id, job_id, version, state in rows:
        seeded.jobs_before.setdefault(by_id[study_id], []).append((job_id, version, state))
    return seeded


def _jobs_of(s: Session, study_id: int) -> list[tuple[int, int, str]]:
    return [(j.id, j.version, str(j.state))
            for j in s.execute(select(Job).where(Job.study_id == study_id).order_by(Job.id)).scalars()]


@pytest.mark.parametrize("route", ["fresh", "after_broken_0003"])
def test_upgrade_from_0002_with_every_state_assembles_only_what_was_waiting(db_url: str, engine: Engine,
                                                                            route: str) -> None:
    sessions = sessionmaker_for(engine)
    migrations.upgrade(db_url, "0002")
    seeded = _seed_at_0002(engine, sessions)
    if route == "after_broken_0003":
        # what the 0003 that shipped first left behind: every study at 0/0, then the ledger moved on
        migrations.upgrade(db_url, "0003")
        with engine.begin() as conn:
            conn.execute(text("UPDATE studies SET received_count = 0, assembled_count = 0"))
    migrations.upgrade(db_url)
    assert migrations.current_revision(engine) == migrations.head_revision()

    ids = seeded.study_ids
    with session_scope(sessions) as s:
        counters = {name: tuple(s.execute(select(Study.received_count, Study.assembled_count)
                                          .where(Study.id == ids[name])).one()) for name in PATHS}
    assert counters == EXPECTED_COUNTERS

    queued: list[int] = []
    assembler = Assembler(AssemblyConfig(quiet_seconds=QUIET_S, rules=RULES), sessions, on_job_queued=queued.append)
    now = seeded.now
    # at the upgrade's moment: only the study whose instances came after it was sent (quiet for 2 h)
    [more] = assembler.run_once(now)
    assert more.study_id == ids["more_after_sent"] and more.job_id is not None
    # the waiting studies are still inside their quiet period: nothing starts
    assert assembler.run_once(now + timedelta(seconds=QUIET_S - 10)) == []
    # their quiet period is over: each is assembled once, on its axial series
    done = {r.study_id: r for r in assembler.run_once(now + timedelta(seconds=QUIET_S + 1))}
    assert set(done) == {ids[name] for name in WAITING}
    assert assembler.run_once(now + timedelta(days=1)) == []
    assert len(queued) == 3 and set(queued) == {more.job_id, *(r.job_id for r in done.values())}

    with session_scope(sessions) as s:
        for name in WAITING:
            job = s.get(Job, done[ids[name]].job_id)
            assert job is not None and job.state == JobState.QUEUED and job.rule_name == "ct"
            assert job.model_name == "default"  # the rule's model, recorded by the assembler (0009)
            assert job.series_instance_uid == seeded.axial[name]
        [waiting_job] = _jobs_of(s, ids["waiting"])
        assert waiting_job[1:] == (1, "queued")
        # the job left 'receiving' is superseded by the version the assembly made; nothing is lost
        (old_id, _, old_state), (new_id, new_version, new_state) = _jobs_of(s, ids["waiting_receiving_job"])
        assert (old_state, new_version, new_state) == ("superseded", 2, "queued")
        assert s.get(Job, old_id).superseded_by_id == new_id  # type: ignore[union-attr]
        # the study that received more after it was sent: a second version; the sent one keeps its state,
        # its result marked superseded
        (sent_id, _, sent_state), (_, version2, state2) = _jobs_of(s, ids["more_after_sent"])
        assert (sent_state, version2, state2) == ("sent", 2, "queued")
        assert s.execute(select(Result.superseded).where(Result.job_id == sent_id)).scalar_one() is True
        # every other study: the same jobs in the same states, no new version
        for name in PATHS:
            if name not in (*WAITING, "more_after_sent"):
                assert _jobs_of(s, ids[name]) == seeded.jobs_before.get(name, []), name
        # every study now counts all it holds as assembled
        for study in s.execute(select(Study)).scalars():
            assert study.received_count == study.assembled_count == EXPECTED_COUNTERS[
                next(n for n, i in ids.items() if i == study.id)][0]
        # jobs made before 0009 have no model (their rule's model decides their queue) and no attempt rows;
        # one left running moves on as any other, with no attempt to close
        assert all(j.model_name is None for j in s.execute(select(Job).where(Job.id.notin_(queued))).scalars())
        [(running_id, _, _)] = seeded.jobs_before["running"]
        jobs.transition(s, running_id, JobState.QUEUED, actor="test", reason_code="worker_lost")
        assert s.execute(select(JobAttempt)).first() is None
        verified = audit.verify(s)
        assert verified.ok, verified.describe()
