"""The drift alarms as Prometheus gauges, asked of the ledger at scrape time (as :mod:`ledger.prometheus`):
``specgate_drift_alarms_open{kind, model}``, every kind of :data:`ledger.drift.ALARM_KINDS` for every model
that has a chart (zeros included, so a rule never sees an absent series), and
``specgate_drift_charts{model}``. Labels carry the alarm's kind and the model's name, never an AE title or
a station (a source is named on the reports page and by ``specgate drift status``).

    >>> sorted(m.name for m in DriftCollector(sessions=None).describe())
    ['specgate_drift_alarms_open', 'specgate_drift_charts']
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from .db import DatabaseUnavailable, session_scope
from .drift import ALARM_KINDS, open_counts
from .schema import DriftChart

__all__ = ["DriftCollector"]

log = logging.getLogger("specgate.ledger.prometheus")


class DriftCollector(Collector):
    """Open drift alarms by kind and model, and charts by model; the constructor does no I/O."""

    def __init__(self, sessions: sessionmaker[Session] | None) -> None:
        self.sessions = sessions

    def describe(self) -> Iterator[Metric]:
        yield from self._families(None, None)

    def collect(self) -> Iterator[Metric]:
        if self.sessions is None:
            raise RuntimeError("DriftCollector has no sessions to ask")
        try:
            with session_scope(self.sessions) as s:
                charts = {m: int(n) for m, n in s.execute(select(DriftChart.model, func.count())
                                                          .group_by(DriftChart.model)).all()}
                counts = open_counts(s)
        except DatabaseUnavailable as exc:  # specgate_ledger_up says so; these series are left out
            log.error("metrics: the ledger did not answer: %s", exc)
            yield from self._families(None, None)
            return
        yield from self._families(charts, counts)

    @staticmethod
    def _families(charts: dict[str, int] | None, counts: dict[tuple[str, str], int] | None) -> Iterator[Metric]:
        alarms = GaugeMetricFamily("specgate_drift_alarms_open",
                                   "Open drift alarms by kind (oodm, ood_rate, stop: the source's results are held, "
                                   "metadata) and model", labels=["kind", "model"])
        total = GaugeMetricFamily("specgate_drift_charts", "Drift control charts (source x model) by model",
                                  labels=["model"])
        if charts is not None and counts is not None:
            for model in sorted(set(charts) | {m for _, m in counts}):
                total.add_metric([model], float(charts.get(model, 0)))
                for kind in ALARM_KINDS:
                    alarms.add_metric([kind, model], float(counts.get((kind, model), 0)))
        yield alarms
        yield total
