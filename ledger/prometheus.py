"""What the ledger says at scrape time, as Prometheus gauges: jobs by state, the review queue's depth and
the age of its oldest held result.

These numbers are facts of the SQL ledger (the source of truth), not of any process, so they are not
counted as events: a :class:`LedgerCollector` asks the ledger when Prometheus scrapes, in one
``SELECT state, count(*), min(updated_at) FROM jobs GROUP BY state`` (served by the index on
``(state, updated_at)``). A held job's ``updated_at`` is the moment it was held, as on the review queue's
page (nothing else updates a held job). Whoever exposes ``/metrics`` registers the collector in its own
registry: ``specgate scp`` does on its metrics port, and the review app mounts :func:`render`::

    body, content_type = render(sessions)       # the /metrics answer of the review app

Only fixed label sets: ``state`` is one of :class:`ledger.schema.JobState` (every state is reported,
zeros included, so a rule on ``specgate_jobs{state="failed"}`` never sees an absent series). No patient
data, no UID, no AE title.

A ledger that does not answer does not fail the scrape: ``specgate_ledger_up`` is 0 and the ledger's
gauges are left out (an absent series, which an alert can test for), and the error is logged.

    >>> sorted(m.name for m in LedgerCollector(sessions=None).describe())  # doctest: +NORMALIZE_WHITESPACE
    ['specgate_instances_not_stored', 'specgate_jobs', 'specgate_ledger_up', 'specgate_review_queue_depth',
     'specgate_review_queue_oldest_seconds']

prometheus_client keeps no state of ours at module level here: the collector is an object that the
exposing process builds and registers in its own :class:`~prometheus_client.CollectorRegistry`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from .db import DatabaseUnavailable, session_scope
from .schema import Instance, Job, JobState, utcnow

__all__ = ["LedgerCollector", "LedgerSnapshot", "ledger_registry", "render", "snapshot"]

log = logging.getLogger("specgate.ledger.prometheus")


@dataclass(frozen=True)
class LedgerSnapshot:
    """Jobs by state (every state, zeros included) and the review queue at one moment."""

    jobs_by_state: dict[str, int]
    queue_depth: int
    oldest_held_seconds: float  # 0 when nothing is held
    instances_not_stored: int = 0  # received, not in the object store yet (the SCP's upload backlog)


def _aware(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts  # SQLite gives back naive UTC


def snapshot(session: Session, *, now: datetime | None = None) -> LedgerSnapshot:
    """The numbers behind the gauges, in one GROUP BY."""
    counts = {str(s): 0 for s in JobState}
    oldest_held: datetime | None = None
    # shadow jobs (ledger.shadow) stay released or held for good, and nobody reviews them: not counted here
    rows = session.execute(select(Job.state, func.count(), func.min(Job.updated_at)).where(Job.shadow.is_(False))
                           .group_by(Job.state)).all()
    for state, count, first in rows:
        counts[str(JobState(state))] = int(count)
        if JobState(state) == JobState.HELD and first is not None:
            oldest_held = _aware(first)
    now = now or utcnow()
    age = max(0.0, (now - oldest_held).total_seconds()) if oldest_held is not None else 0.0
    backlog = int(session.execute(select(func.count()).select_from(Instance)
                                  .where(Instance.store_key.is_(None))).scalar_one())
    return LedgerSnapshot(jobs_by_state=counts, queue_depth=counts[str(JobState.HELD)], oldest_held_seconds=age,
                          instances_not_stored=backlog)


class LedgerCollector(Collector):
    """A custom collector: asks the ledger at every scrape (:func:`snapshot`). ``clock`` gives "now"
    (a test passes a fixed one); the constructor does no I/O."""

    def __init__(self, sessions: sessionmaker[Session] | None, *,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.sessions = sessions
        self.clock = clock

    def describe(self) -> Iterator[Metric]:
        """The metrics this collector yields, without asking the ledger (registration calls this)."""
        yield from self._families(None)

    def collect(self) -> Iterator[Metric]:
        if self.sessions is None:
            raise RuntimeError("LedgerCollector has no sessions to ask")
        snap: LedgerSnapshot | None
        try:
            with session_scope(self.sessions) as s:
                snap = snapshot(s, now=self.clock())
        except DatabaseUnavailable as exc:
            log.error("metrics: the ledger did not answer: %s", exc)
            snap = None
        yield from self._families(snap)

    @staticmethod
    def _families(snap: LedgerSnapshot | None) -> Iterator[Metric]:
        up = GaugeMetricFamily("specgate_ledger_up", "1 when the ledger answered this scrape, 0 when it did not")
        up.add_metric([], 0.0 if snap is None else 1.0)
        yield up
        jobs = GaugeMetricFamily("specgate_jobs", "Jobs in the ledger by state (the latest and all earlier "
                                                  "versions of every study)", labels=["state"])
        depth = GaugeMetricFamily("specgate_review_queue_depth", "Results held for a radiologist's review")
        oldest = GaugeMetricFamily("specgate_review_queue_oldest_seconds",
                                   "Seconds the oldest held result has waited for review (0: none waits)")
        backlog = GaugeMetricFamily("specgate_instances_not_stored",
                                    "Received instances not in the object store yet (store = s3: the SCP's upload "
                                    "backlog; their studies wait for it). Always 0 with fs")
        if snap is not None:
            for state, n in snap.jobs_by_state.items():
                jobs.add_metric([state], float(n))
            depth.add_metric([], float(snap.queue_depth))
            oldest.add_metric([], snap.oldest_held_seconds)
            backlog.add_metric([], float(snap.instances_not_stored))
        yield jobs
        yield depth
        yield oldest
        yield backlog


def ledger_registry(sessions: sessionmaker[Session], *, clock: Callable[[], datetime] = utcnow) -> CollectorRegistry:
    """A registry holding only the ledger's gauges and its drift alarms' (what the review app's ``/metrics``
    shows)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(LedgerCollector(sessions, clock=clock))
    from .drift_prometheus import DriftCollector  # the drift alarms (ledger.drift)

    registry.register(DriftCollector(sessions))
    return registry


def render(sessions: sessionmaker[Session]) -> tuple[bytes, str]:
    """The body and Content-Type of a ``/metrics`` answer with the ledger's gauges, asked now.

    The review app: ``Route("/metrics", ...)`` answering ``Response(body, media_type=content_type)``.
    """
    return generate_latest(ledger_registry(sessions)), CONTENT_TYPE_LATEST
