"""The ledger's gauges (:mod:`ledger.prometheus`) on SQLite and PostgreSQL: jobs by state, the review queue's
depth and its oldest held result's age, against figures computed here from the seeded rows; the
``/metrics`` body the review app serves parses with Prometheus's own parser; a ledger that does not answer
leaves ``specgate_ledger_up`` at 0 instead of failing the scrape."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ledger.db import open_engine, session_scope, sessionmaker_for
from ledger.prometheus import LedgerCollector, render
from ledger.schema import Job, JobState, Study

NOW = datetime(2025, 3, 4, 12, 0, 0, tzinfo=UTC)

# (state, minutes before NOW of its last update): two studies' worth of versions in every kind of state
SEEDED = [
    (JobState.HELD, 250), (JobState.HELD, 30), (JobState.HELD, 1),
    (JobState.SUPERSEDED, 900),  # held once, then a newer version came: not in the queue any more
    (JobState.SENT, 600), (JobState.SENT, 5), (JobState.FAILED, 120), (JobState.QUEUED, 2),
    (JobState.RUNNING, 1), (JobState.REJECTED, 400), (JobState.RELEASED, 3),
]


def _families(body: bytes) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{family name: {sorted label pairs: value}} from a /metrics body, by Prometheus's text parser."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _seed(sessions) -> None:
    with session_scope(sessions) as s:
        studies = [Study(study_instance_uid=f"1.2.826.0.1.3680043.9.7.{i}", calling_ae="TESTSCU") for i in (1, 2)]
        s.add_all(studies)
        s.flush()
        for n, (state, minutes) in enumerate(SEEDED):
            study = studies[n % 2]
            s.add(Job(study_id=study.id, version=n + 1, state=state, updated_at=NOW - timedelta(minutes=minutes),
                      reason_code="missing_slices" if state == JobState.FAILED else None))


def test_ledger_gauges_match_the_seeded_jobs(migrated) -> None:
    _, _, sessions = migrated
    _seed(sessions)
    clock = NOW + timedelta(seconds=17)
    registry = CollectorRegistry()
    registry.register(LedgerCollector(sessions, clock=lambda: clock))
    got = _families(generate_latest(registry))

    expected_states = Counter(str(state) for state, _ in SEEDED)
    assert got["specgate_jobs"] == {(("state", str(s)),): float(expected_states.get(str(s), 0)) for s in JobState}
    held = [NOW - timedelta(minutes=m) for state, m in SEEDED if state == JobState.HELD]
    assert got["specgate_review_queue_depth"] == {(): float(len(held))}
    assert got["specgate_review_queue_oldest_seconds"] == {(): (clock - min(held)).total_seconds()}
    assert got["specgate_ledger_up"] == {(): 1.0}


def test_render_is_what_the_review_app_serves(migrated) -> None:
    """``render(sessions)``: a body Prometheus parses and its Content-Type; an empty queue is 0, not absent."""
    _, _, sessions = migrated
    body, content_type = render(sessions)
    assert content_type.startswith("text/plain")
    got = _families(body)
    assert got["specgate_review_queue_depth"] == {(): 0.0}
    assert got["specgate_review_queue_oldest_seconds"] == {(): 0.0}
    assert set(got["specgate_jobs"].values()) == {0.0} and len(got["specgate_jobs"]) == len(JobState)
    _seed(sessions)
    got = _families(render(sessions)[0])
    assert got["specgate_review_queue_depth"] == {(): 3.0}
    assert got["specgate_review_queue_oldest_seconds"][()] >= 250 * 60  # measured against the real clock
    for family in ("specgate_jobs", "specgate_review_queue_depth"):  # no UID, no AE title in any label
        assert all("1.2.826" not in repr(labels) and "TESTSCU" not in repr(labels) for labels in got[family])


def test_a_ledger_that_does_not_answer_reports_down_and_the_scrape_succeeds() -> None:
    engine = open_engine("postgresql+psycopg://root@127.0.0.1:1/nothing_listens_here",
                         connect_args={"connect_timeout": 2})
    try:
        got = _families(render(sessionmaker_for(engine))[0])
    finally:
        engine.dispose()
    assert got["specgate_ledger_up"] == {(): 0.0}
    assert "specgate_jobs" not in got and "specgate_review_queue_depth" not in got
