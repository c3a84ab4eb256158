"""Drift alarms: per source and per model, a control chart on the gate's numbers, a watch on the series'
acquisition metadata, and a stop rule.

A **source** is (calling AE, station name, manufacturer, manufacturer's model name, software versions); a
**chart** is one source and one model (:class:`ledger.schema.DriftChart`). The worker records every
finished job (:func:`observe`, in the transaction that records its result): the series' metadata, the
OODM and tau, and the chart after it (:class:`ledger.schema.DriftObservation`).

**Why EWMA, not CUSUM.** Both are standard for small persistent shifts. An EWMA is one number per chart
that a committee reads off the picture as "a smoothed score against a line"; it catches a gradual drift
(a protocol changed bit by bit) about as fast as a CUSUM tuned to the shift, and it needs no assumed shift
size ``k``: a scanner update can move the OODM by any amount. Its in-control average run length (ARL)
for given ``(lambda, L)`` is computed exactly enough by the Markov chain of Brook & Evans (1972)
(:func:`ewma_arl`), which the tests compare with a simulation of the chart's own code.

Two charts per source and model, both one-sided upward (more unlike the training data is the danger;
a source whose studies become *more* typical is not):

- **OODM**: the score ``x = log(OODM / tau)`` (the OODM against the model's own threshold: one scale for
  every model; on the shipped bank's leave-one-out OODMs its skewness is -0.42, the OODM's 0.51), standardised by the baseline's mean and sd (sd at least ``sd_floor``), and
  ``E_t = max(0, lambda z_t + (1 - lambda) E_{t-1})`` (a reflecting barrier at 0, Crowder & Hamilton
  1989, so a long quiet stretch does not delay an alarm). Control limit ``L sqrt(lambda / (2 - lambda))``;
  stop limit ``L_stop sqrt(...)``.
- **OOD rate**: ``x`` = 1 when the gate held the study for its OODM, ``R_t = max(p0, lambda_r x_t + (1 -
  lambda_r) R_{t-1})``, ``p0 = (k + 0.5) / (n + 1)`` from the baseline's ``k`` of ``n`` (never 0, so a
  source that never had an OOD study can still alarm), limits ``p0 + L sqrt(p0 (1 - p0)) sqrt(lambda_r /
  (2 - lambda_r))``. A Bernoulli chart is not normal: its false-alarm rate is measured
  (``bench/drift_false_alarms.py``), not promised. It has no stop limit: with a rare event (the shipped
  bank's own rate above tau is 1.7 %) two held studies close together cross any normal-theory stop limit
  that is not absurdly high (a stop on it stopped 42 % of unchanged sources within 3,000 studies in the
  benchmark); the stop rule reads the OODM chart alone, which sees the same shift in finer steps.

**Baseline**: the chart's first ``baseline_studies`` observations, or (``baseline_until`` set) those
recorded from ``baseline_since`` up to ``baseline_until``; nothing is charted before it is complete.

**Metadata novelty** (kind ``metadata``): once a sender (calling AE) has a chart with a complete baseline
for the model, a study whose station, manufacturer, model name, software version or kernel that sender's
baselines never saw, or whose slice thickness, pixel spacing or kVp lies outside their range (by more than
``metadata_tolerance``, relative), raises an alarm. A new software version or a new station behind a
known sender is a new source (a new chart with its own baseline), and this alarm is how it is noticed.
Clearing it accepts the values. A new calling AE has no baseline to differ from: it must be added to
``allowed_callers`` by an administrator to send at all, and its charts start their own baselines.

**Alarms** (:class:`ledger.schema.DriftAlarm`, each opening audited ``drift.alarm_opened``): one open
alarm per chart and kind. ``oodm`` / ``ood_rate``: the EWMA past its control limit; ``stop``: the OODM
chart past its stop limit. While a ``stop`` alarm is open, :func:`observe` says so and the worker holds every result of that
chart (``held_for: drift_stop``) whatever its OODM, until an admin clears it (:func:`clear`, audited
``drift.alarm_cleared`` with who and why). Clearing a chart alarm restarts the chart's EWMA (the source
was looked at); ``rebaseline`` also gathers a new baseline (a change accepted as the new normal).

The chart's arithmetic is in plain functions (:func:`oodm_step`, :func:`rate_step`, :func:`limits`),
used the same way by :func:`observe` and by the benchmark:

    >>> cfg = DriftConfig(ewma_lambda=0.2, limit_l=3.0)
    >>> round(limits(cfg).oodm, 4), oodm_step(0.0, 10.0, cfg), oodm_step(0.5, -10.0, cfg)
    (1.0, 2.0, 0.0)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from . import audit
from .schema import DriftAlarm, DriftChart, DriftObservation, Job, Study, utcnow
from .sql import insert_ignore

__all__ = ["ALARM_KINDS", "AlarmView", "ChartLimits", "DriftConfig", "DriftError", "SeriesMetadata", "Watch",
           "chart_points", "charts_status", "clear", "ewma_arl", "limits", "observe", "oodm_step", "open_alarms",
           "rate_step", "score"]

log = logging.getLogger("specgate.ledger.drift")

ALARM_KINDS = ("oodm", "ood_rate", "stop", "metadata")
SOURCE_FIELDS = ("calling_ae", "station_name", "manufacturer", "manufacturer_model", "software_versions")
_TEXT_FIELDS = ("station_name", "manufacturer", "manufacturer_model", "software_versions", "convolution_kernel")
_NUMBER_FIELDS = ("slice_thickness", "pixel_spacing", "kvp")


class DriftError(ValueError):
    """A request the drift watch refuses (an unknown alarm, one already cleared, no reason given)."""


@dataclass(frozen=True)
class DriftConfig:
    """The drift watch's settings (``specgate.settings``: ``drift_*``). See the module docstring."""

    enabled: bool = True
    baseline_studies: int = 30
    baseline_since: datetime | None = None
    baseline_until: datetime | None = None
    ewma_lambda: float = 0.2
    rate_lambda: float = 0.05
    limit_l: float = 3.0
    stop_l: float = 4.5
    sd_floor: float = 0.05
    metadata_tolerance: float = 0.05
    notify_url: str | None = None
    notify_timeout_s: float = 5.0
    #: hold a chart's results while its ``metadata`` alarm is open, as while a ``stop`` alarm is
    hold_on_metadata: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.ewma_lambda <= 1.0 or not 0.0 < self.rate_lambda <= 1.0:
            raise ValueError(f"EWMA lambdas must be in (0, 1]: {self.ewma_lambda}, {self.rate_lambda}")
        if not 0.0 < self.limit_l < self.stop_l:
            raise ValueError(f"the stop limit L ({self.stop_l}) must be above the control limit L ({self.limit_l}) > 0")
        if self.baseline_studies < 2:
            raise ValueError(f"a baseline needs at least 2 studies, not {self.baseline_studies}")


@dataclass(frozen=True)
class SeriesMetadata:
    """What the series' headers say about how it was acquired (the first instance's; the series is one
    acquisition). Text trimmed to the ledger's column widths; numbers None when absent or unreadable."""

    station_name: str | None = None
    manufacturer: str | None = None
    manufacturer_model: str | None = None
    software_versions: str | None = None
    modality: str | None = None
    slice_thickness: float | None = None
    pixel_spacing: float | None = None
    kvp: float | None = None
    convolution_kernel: str | None = None

    @classmethod
    def from_headers(cls, headers: Sequence[Any], *, modality: str | None = None,
                     spacing: Sequence[float] | None = None) -> SeriesMetadata:
        """From pydicom datasets (``dicom_series.Volume.headers``); ``spacing`` (z, y, x) mm: the row
        spacing is recorded as the pixel spacing when the header has none.

            >>> from pydicom import Dataset
            >>> ds = Dataset(); ds.SoftwareVersions = ["VA40", "syngo"]; ds.KVP = "120"; ds.StationName = "CT1"
            >>> m = SeriesMetadata.from_headers([ds], modality="CT", spacing=(2.5, 0.7, 0.7))
            >>> m.software_versions, m.kvp, m.pixel_spacing, m.slice_thickness
            ('VA40\\\\syngo', 120.0, 0.7, None)
        """
        ds = headers[0] if headers else None

        def text(keyword: str, width: int = 64) -> str | None:
            value = getattr(ds, keyword, None) if ds is not None else None
            if value is None or value == "":
                return None
            items = list(value) if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue" else [value]
            joined = "\\".join(str(v).strip() for v in items).strip()
            return joined[:width] or None

        def number(keyword: str, index: int | None = None) -> float | None:
            value = getattr(ds, keyword, None) if ds is not None else None
            try:
                if index is not None:
                    value = value[index] if value is not None else None
                out = float(value) if value is not None and value != "" else None
            except (TypeError, ValueError, IndexError):
                return None
            return out if out is not None and math.isfinite(out) else None

        pixel = number("PixelSpacing", 0)
        if pixel is None and spacing is not None:
            pixel = float(spacing[1])
        return cls(station_name=text("StationName"), manufacturer=text("Manufacturer"),
                   manufacturer_model=text("ManufacturerModelName"),
                   software_versions=text("SoftwareVersions", 128), modality=modality or text("Modality", 16),
                   slice_thickness=number("SliceThickness"), pixel_spacing=pixel, kvp=number("KVP"),
                   convolution_kernel=text("ConvolutionKernel"))


# ----------------------------------------------------------------------------------------- the chart
@dataclass(frozen=True)
class ChartLimits:
    """Limits in the chart's units: ``oodm``/``stop_oodm`` for the standardised EWMA; the rate limits are
    offsets above ``p0`` (add the baseline's ``p0``)."""

    oodm: float
    stop_oodm: float
    rate_sigma: float  # sqrt(lambda_r / (2 - lambda_r)): times sqrt(p0 (1 - p0)) times L is the offset


def limits(cfg: DriftConfig) -> ChartLimits:
    """The asymptotic EWMA limits for ``cfg``."""
    k = math.sqrt(cfg.ewma_lambda / (2.0 - cfg.ewma_lambda))
    return ChartLimits(oodm=cfg.limit_l * k, stop_oodm=cfg.stop_l * k,
                       rate_sigma=math.sqrt(cfg.rate_lambda / (2.0 - cfg.rate_lambda)))


def score(oodm: float, tau: float) -> float:
    """``log(OODM / tau)``; an OODM of 0 (or less) counts as a millionth of tau."""
    return math.log(max(oodm, tau * 1e-6) / tau)


def oodm_step(previous: float, z: float, cfg: DriftConfig) -> float:
    """One step of the upward EWMA with a reflecting barrier at 0 (works on numpy arrays too)."""
    value = cfg.ewma_lambda * z + (1.0 - cfg.ewma_lambda) * previous
    return max(0.0, value) if isinstance(value, float) else value.clip(min=0.0)  # type: ignore[no-any-return]


def rate_step(previous: float, is_ood: float, p0: float, cfg: DriftConfig) -> float:
    """One step of the upward EWMA of the OOD indicator, never below ``p0``."""
    value = cfg.rate_lambda * is_ood + (1.0 - cfg.rate_lambda) * previous
    return max(p0, value) if isinstance(value, float) else value.clip(min=p0)  # type: ignore[no-any-return]


def p0_of(ood: int, n: int) -> float:
    """The baseline's OOD rate, shrunk off 0 and 1: ``(k + 0.5) / (n + 1)``."""
    return (ood + 0.5) / (n + 1.0)


def ewma_arl(cfg: DriftConfig, *, l_value: float | None = None, shift: float = 0.0, states: int = 300) -> float:
    """Average run length of the upward standardised EWMA (reflecting at 0, asymptotic limit ``L`` =
    ``l_value`` or ``cfg.limit_l``) for normal scores shifted by ``shift`` sd, by the Markov chain of Brook
    & Evans (``states`` intervals of [0, h]), started at 0.

        >>> 300 < ewma_arl(DriftConfig()) < 3000 and ewma_arl(DriftConfig(), shift=2.0) < 10
        True
    """
    import numpy as np
    from scipy.stats import norm

    lam = cfg.ewma_lambda
    h = (cfg.limit_l if l_value is None else l_value) * math.sqrt(lam / (2.0 - lam))
    w = h / states
    centres = (np.arange(states) + 0.5) * w
    edges = np.arange(states + 1) * w  # state j holds [edges[j], edges[j+1]); state 0 also the barrier
    # next = lam z + (1 - lam) c  ->  z = (next - (1 - lam) c) / lam
    z_edges = (edges[None, :] - (1.0 - lam) * centres[:, None]) / lam
    cdf = norm.cdf(z_edges - shift)
    q = np.diff(cdf, axis=1)
    q[:, 0] += cdf[:, 0]  # everything below 0 reflects to the barrier, in state 0
    arl = np.linalg.solve(np.eye(states) - q, np.ones(states))
    # start at exactly 0: one step from 0 lands like a step from a state at 0
    start = norm.cdf((edges[1:] - 0.0) / lam - shift) - norm.cdf((edges[:-1]) / lam - shift)
    start[0] += norm.cdf(0.0 - shift)
    return float(1.0 + start @ arl)


# ------------------------------------------------------------------------------------------ observing
@dataclass(frozen=True)
class OpenedAlarm:
    id: int
    kind: str
    chart_id: int
    model: str
    calling_ae: str
    station_name: str | None
    statistic: float | None
    threshold: float | None
    first_job_id: int
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Watch:
    """What :func:`observe` found: the open ``stop`` alarm of the source, if any (the result must be held),
    and the alarms this study opened (to notify once the transaction has committed)."""

    stop_alarm_id: int | None = None
    opened: tuple[OpenedAlarm, ...] = ()
    #: the chart's open ``metadata`` alarm when the settings hold on one (``hold_on_metadata``), else None
    metadata_alarm_id: int | None = None

    @property
    def hold(self) -> tuple[int, str] | None:
        """(alarm id, ``held_for``) when the result must be held: a ``stop`` alarm first, then a held-on
        ``metadata`` alarm; None otherwise."""
        if self.stop_alarm_id is not None:
            return self.stop_alarm_id, "drift_stop"
        if self.metadata_alarm_id is not None:
            return self.metadata_alarm_id, "drift_metadata"
        return None


def source_key(calling_ae: str, meta: SeriesMetadata, model: str) -> str:
    fields = [calling_ae, meta.station_name, meta.manufacturer, meta.manufacturer_model, meta.software_versions,
              model]
    return hashlib.sha256(json.dumps(fields, separators=(",", ":")).encode()).hexdigest()


def _chart(s: Session, calling_ae: str, meta: SeriesMetadata, model: str) -> DriftChart:
    """The source's chart, made on its first study; locked for this transaction (PostgreSQL: FOR UPDATE;
    SQLite's transactions are IMMEDIATE) so two workers finishing studies of one source chart in turn."""
    key = source_key(calling_ae, meta, model)
    now = utcnow()
    insert_ignore(s, DriftChart, {
        "source_key": key, "model": model[:64], "calling_ae": calling_ae[:16], "station_name": meta.station_name,
        "manufacturer": meta.manufacturer, "manufacturer_model": meta.manufacturer_model,
        "software_versions": meta.software_versions, "baseline_n": 0, "baseline_sum": 0.0, "baseline_sumsq": 0.0,
        "baseline_ood": 0, "baseline_done": False, "baseline_metadata": {}, "ewma_oodm": 0.0, "ewma_rate": None,
        "charted": 0, "observations": 0, "created_at": now, "updated_at": now})
    return s.execute(select(DriftChart).where(DriftChart.source_key == key).with_for_update()).scalar_one()


def _widen(seen: dict[str, Any], meta: SeriesMetadata) -> dict[str, Any]:
    out = {k: list(v) for k, v in seen.items()}
    for name in _TEXT_FIELDS:
        value = getattr(meta, name)
        if value is not None and value not in out.setdefault(name, []):
            out[name] = sorted([*out[name], value])
    for name in _NUMBER_FIELDS:
        value = getattr(meta, name)
        if value is not None:
            lo, hi = out.get(name) or [value, value]
            out[name] = [min(lo, value), max(hi, value)]
    return out


def _known(s: Session, chart: DriftChart) -> tuple[dict[str, Any], bool]:
    """What the sender's baselined charts of this model saw (their baselines, and values accepted by a
    cleared metadata alarm), and whether it has any."""
    rows = s.execute(select(DriftChart).where(DriftChart.model == chart.model, DriftChart.baseline_done,
                                              DriftChart.calling_ae == chart.calling_ae)).scalars()
    known: dict[str, Any] = {}
    have = False
    for other in [*rows, chart]:  # this chart's own baseline and accepted values count too
        have = have or other.baseline_done
        for k, v in (other.baseline_metadata or {}).items():
            if k in _TEXT_FIELDS:
                known[k] = sorted(set(known.get(k, [])) | set(v))
            elif k in _NUMBER_FIELDS:
                lo, hi = known.get(k) or v
                known[k] = [min(lo, v[0]), max(hi, v[1])]
    return known, have


def _novel(s: Session, chart: DriftChart, meta: SeriesMetadata, tolerance: float) -> dict[str, Any]:
    """The metadata fields of this study that the sender's baselines never saw: ``{field: value}``."""
    known, have = _known(s, chart)
    if not have:
        return {}
    novel: dict[str, Any] = {}
    for name in _TEXT_FIELDS:
        value = getattr(meta, name)
        if value is not None and value not in known.get(name, []):
            novel[name] = value
    for name in _NUMBER_FIELDS:
        value, seen = getattr(meta, name), known.get(name)
        if value is None:
            continue
        if seen is None:
            novel[name] = value
        elif not seen[0] * (1.0 - tolerance) <= value <= seen[1] * (1.0 + tolerance):
            novel[name] = value
    return novel


def _open_kinds(s: Session, chart_id: int) -> dict[str, int]:
    rows = s.execute(select(DriftAlarm.kind, DriftAlarm.id).where(DriftAlarm.chart_id == chart_id,
                                                                  DriftAlarm.state == "open")).all()
    return {kind: alarm_id for kind, alarm_id in rows}


def _raise(s: Session, chart: DriftChart, kind: str, job_id: int, *, statistic: float | None,
           threshold: float | None, detail: dict[str, Any], actor: str) -> OpenedAlarm:
    alarm = DriftAlarm(chart_id=chart.id, kind=kind, state="open", statistic=statistic, threshold=threshold,
                       detail=detail, first_job_id=job_id, opened_at=utcnow())
    s.add(alarm)
    s.flush()
    audit.append(s, actor=actor, action="drift.alarm_opened", object_type="drift_alarm", object_id=alarm.id,
                 details={"kind": kind, "chart_id": chart.id, "model": chart.model, "calling_ae": chart.calling_ae,
                          "station_name": chart.station_name, "software_versions": chart.software_versions,
                          "statistic": statistic, "threshold": threshold, "first_job_id": job_id, **detail})
    log.warning("drift alarm %s (%s) on chart %s, model %s: statistic %s, limit %s", alarm.id, kind, chart.id,
                chart.model, statistic, threshold)
    return OpenedAlarm(alarm.id, kind, chart.id, chart.model, chart.calling_ae, chart.station_name, statistic,
                       threshold, job_id, detail)


def _in_baseline(chart: DriftChart, cfg: DriftConfig, now: datetime) -> bool | None:
    """True: this study joins the baseline; False: the baseline is complete (chart it); None: before the
    baseline's date range (neither)."""
    if chart.baseline_done:
        return False
    if cfg.baseline_until is None:
        return True
    if cfg.baseline_since is not None and now < cfg.baseline_since:
        return None
    return now < cfg.baseline_until


def observe(s: Session, job_id: int, *, model: str, meta: SeriesMetadata, oodm: float, tau: float, is_ood: bool,
            cfg: DriftConfig, actor: str = "worker") -> Watch:
    """Record a finished job on its source's chart, inside the caller's transaction (the one that records
    its result), and open the alarms it calls for. A job already observed (an attempt that died after its
    result was recorded and ran again) is not counted twice: its open stop alarm is still reported."""
    job = s.get(Job, job_id)
    if job is None:
        raise LookupError(f"job {job_id} does not exist")
    calling_ae = s.execute(select(Study.calling_ae).where(Study.id == job.study_id)).scalar_one()
    chart = _chart(s, calling_ae, meta, model)
    already = s.execute(select(DriftObservation.id).where(DriftObservation.job_id == job_id)).scalar()
    if already is not None:
        return _watch(_open_kinds(s, chart.id), (), cfg)
    now = utcnow()
    x = score(oodm, tau)
    row = DriftObservation(job_id=job_id, chart_id=chart.id, model=model[:64], calling_ae=calling_ae,
                           station_name=meta.station_name, manufacturer=meta.manufacturer,
                           manufacturer_model=meta.manufacturer_model, software_versions=meta.software_versions,
                           modality=meta.modality, slice_thickness=meta.slice_thickness,
                           pixel_spacing=meta.pixel_spacing, kvp=meta.kvp, convolution_kernel=meta.convolution_kernel,
                           metadata_={k: v for k, v in asdict(meta).items() if v is not None},
                           oodm=oodm, tau=tau, is_ood=is_ood, created_at=now)
    opened: list[OpenedAlarm] = []
    open_kinds = _open_kinds(s, chart.id)
    novel = _novel(s, chart, meta, cfg.metadata_tolerance)
    if novel and "metadata" not in open_kinds:
        opened.append(_raise(s, chart, "metadata", job_id, statistic=None, threshold=None,
                             detail={"novel": novel}, actor=actor))
    phase = _in_baseline(chart, cfg, now)
    if phase is True:
        row.in_baseline = True
        chart.baseline_n += 1
        chart.baseline_sum += x
        chart.baseline_sumsq += x * x
        chart.baseline_ood += int(is_ood)
        chart.baseline_metadata = _widen(chart.baseline_metadata or {}, meta)
        if cfg.baseline_until is None and chart.baseline_n >= cfg.baseline_studies:
            chart.baseline_done = True
    elif phase is False:
        if not chart.baseline_done:  # a date-range baseline ends with the first study after it
            chart.baseline_done = chart.baseline_n >= 2
        if chart.baseline_done:
            opened.extend(_chart_step(s, chart, row, x, is_ood, cfg, job_id, open_kinds, actor))
    chart.observations += 1
    chart.updated_at = now
    s.add(row)
    s.flush()
    audit.append(s, actor=actor, action="drift.observed", object_type="job", object_id=job_id,
                 details={"chart_id": chart.id, "model": model, "score": round(x, 6), "in_baseline": row.in_baseline,
                          "ewma_oodm": row.ewma_oodm, "ewma_rate": row.ewma_rate,
                          "metadata": row.metadata_})
    return _watch(_open_kinds(s, chart.id), tuple(opened), cfg)


def _watch(open_kinds: Mapping[str, int], opened: tuple[OpenedAlarm, ...], cfg: DriftConfig) -> Watch:
    return Watch(open_kinds.get("stop"), opened, open_kinds.get("metadata") if cfg.hold_on_metadata else None)


def baseline_stats(chart: DriftChart, cfg: DriftConfig) -> tuple[float, float, float]:
    """(mean, sd, p0) of the chart's baseline."""
    n = max(chart.baseline_n, 1)
    mean = chart.baseline_sum / n
    var = (chart.baseline_sumsq - n * mean * mean) / (n - 1) if n > 1 else 0.0
    return mean, max(math.sqrt(max(var, 0.0)), cfg.sd_floor), p0_of(chart.baseline_ood, chart.baseline_n)


def _chart_step(s: Session, chart: DriftChart, row: DriftObservation, x: float, is_ood: bool, cfg: DriftConfig,
                job_id: int, open_kinds: Mapping[str, int], actor: str) -> list[OpenedAlarm]:
    mean, sd, p0 = baseline_stats(chart, cfg)
    lim = limits(cfg)
    rate_sd = math.sqrt(p0 * (1.0 - p0)) * lim.rate_sigma
    chart.ewma_oodm = oodm_step(chart.ewma_oodm or 0.0, (x - mean) / sd, cfg)
    chart.ewma_rate = rate_step(chart.ewma_rate if chart.ewma_rate is not None else p0, float(is_ood), p0, cfg)
    chart.charted += 1
    row.ewma_oodm, row.limit_oodm, row.stop_oodm = chart.ewma_oodm, lim.oodm, lim.stop_oodm
    row.ewma_rate = chart.ewma_rate
    row.limit_rate = p0 + cfg.limit_l * rate_sd  # no stop limit: the stop rule reads the OODM chart
    detail = {"baseline_mean": round(mean, 6), "baseline_sd": round(sd, 6), "baseline_p0": round(p0, 6),
              "baseline_n": chart.baseline_n, "charted": chart.charted}
    opened = []
    checks = (("oodm", chart.ewma_oodm, row.limit_oodm), ("ood_rate", chart.ewma_rate, row.limit_rate))
    for kind, stat, limit in checks:
        if stat > limit and kind not in open_kinds:
            opened.append(_raise(s, chart, kind, job_id, statistic=stat, threshold=limit, detail=detail, actor=actor))
    if "stop" not in open_kinds and chart.ewma_oodm > lim.stop_oodm:
        opened.append(_raise(s, chart, "stop", job_id, statistic=chart.ewma_oodm, threshold=lim.stop_oodm,
                             detail={**detail, "chart": "oodm"}, actor=actor))
    return opened


# -------------------------------------------------------------------------------------------- clearing
def clear(s: Session, alarm_id: int, *, user: str, reason: str, rebaseline: bool = False) -> DriftAlarm:
    """An admin clears an open alarm, saying why; audited ``drift.alarm_cleared`` with who and why.
    A chart alarm (``oodm``, ``ood_rate``, ``stop``) restarts the chart's EWMA; ``rebaseline`` also starts
    a new baseline from the source's next studies. A ``metadata`` alarm's novel values are accepted: they
    join the chart's baseline metadata."""
    reason = (reason or "").strip()
    if not reason:
        raise DriftError("clearing an alarm needs a reason")
    alarm = s.execute(select(DriftAlarm).where(DriftAlarm.id == alarm_id).with_for_update()).scalar_one_or_none()
    if alarm is None:
        raise DriftError(f"no drift alarm {alarm_id}")
    if alarm.state != "open":
        raise DriftError(f"drift alarm {alarm_id} was already cleared by {alarm.cleared_by} at {alarm.cleared_at}")
    chart = s.execute(select(DriftChart).where(DriftChart.id == alarm.chart_id).with_for_update()).scalar_one()
    now = utcnow()
    alarm.state, alarm.cleared_at, alarm.cleared_by, alarm.clear_reason = "cleared", now, user[:128], reason[:2000]
    restarted = False
    if alarm.kind == "metadata":
        novel = (alarm.detail or {}).get("novel", {})
        accepted = SeriesMetadata(**{k: v for k, v in novel.items() if k in _TEXT_FIELDS + _NUMBER_FIELDS})
        chart.baseline_metadata = _widen(chart.baseline_metadata or {}, accepted)
    else:
        chart.ewma_oodm, chart.ewma_rate, chart.charted = 0.0, None, 0
        restarted = True
        if rebaseline:
            chart.baseline_n, chart.baseline_sum, chart.baseline_sumsq, chart.baseline_ood = 0, 0.0, 0.0, 0
            chart.baseline_done, chart.baseline_metadata = False, {}
    chart.updated_at = now
    s.flush()
    audit.append(s, actor=user, action="drift.alarm_cleared", object_type="drift_alarm", object_id=alarm.id,
                 details={"kind": alarm.kind, "chart_id": chart.id, "model": chart.model, "reason": reason[:2000],
                          "restarted": restarted, "rebaseline": bool(rebaseline and restarted)})
    return alarm


# --------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class AlarmView:
    id: int
    kind: str
    state: str
    chart_id: int
    model: str
    calling_ae: str
    station_name: str | None
    manufacturer: str | None
    manufacturer_model: str | None
    software_versions: str | None
    statistic: float | None
    threshold: float | None
    first_job_id: int
    opened_at: datetime
    detail: dict[str, Any]
    cleared_at: datetime | None = None
    cleared_by: str | None = None
    clear_reason: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in asdict(self).items()}


def _alarm_views(rows: Iterable[tuple[DriftAlarm, DriftChart]]) -> list[AlarmView]:
    return [AlarmView(a.id, a.kind, a.state, c.id, c.model, c.calling_ae, c.station_name, c.manufacturer,
                      c.manufacturer_model, c.software_versions, a.statistic, a.threshold, a.first_job_id,
                      a.opened_at, dict(a.detail or {}), a.cleared_at, a.cleared_by, a.clear_reason)
            for a, c in rows]


def open_alarms(s: Session) -> list[AlarmView]:
    """Every open alarm, stop alarms first, then the oldest first."""
    rows = s.execute(select(DriftAlarm, DriftChart).join(DriftChart, DriftChart.id == DriftAlarm.chart_id)
                     .where(DriftAlarm.state == "open").order_by(DriftAlarm.opened_at, DriftAlarm.id)).all()
    views = _alarm_views((a, c) for a, c in rows)
    return sorted(views, key=lambda v: v.kind != "stop")


def charts_status(s: Session, cfg: DriftConfig) -> list[dict[str, Any]]:
    """One row per chart: its source, model, baseline, statistics against their limits, open alarms."""
    lim = limits(cfg)
    alarms: dict[int, list[str]] = {}
    for chart_id, kind, alarm_id in s.execute(select(DriftAlarm.chart_id, DriftAlarm.kind, DriftAlarm.id)
                                              .where(DriftAlarm.state == "open").order_by(DriftAlarm.id)):
        alarms.setdefault(chart_id, []).append(f"{alarm_id}:{kind}")
    out = []
    for c in s.execute(select(DriftChart).order_by(DriftChart.calling_ae, DriftChart.station_name,
                                                   DriftChart.model, DriftChart.id)).scalars():
        mean, sd, p0 = baseline_stats(c, cfg)
        rate_sd = math.sqrt(p0 * (1.0 - p0)) * lim.rate_sigma
        out.append({"chart": c.id, "model": c.model, **{f: getattr(c, f) for f in SOURCE_FIELDS},
                    "studies": c.observations, "baseline_n": c.baseline_n, "baseline_done": c.baseline_done,
                    "baseline_mean": round(mean, 4) if c.baseline_n else None,
                    "baseline_sd": round(sd, 4) if c.baseline_n else None,
                    "baseline_p0": round(p0, 4), "ewma_oodm": round(c.ewma_oodm, 4),
                    "limit_oodm": round(lim.oodm, 4), "stop_oodm": round(lim.stop_oodm, 4),
                    "ewma_rate": None if c.ewma_rate is None else round(c.ewma_rate, 4),
                    "limit_rate": round(p0 + cfg.limit_l * rate_sd, 4),
                    "open_alarms": alarms.get(c.id, [])})
    return out


def chart_points(s: Session, chart_id: int, *, last: int = 500) -> list[dict[str, Any]]:
    """The chart's last ``last`` observations, oldest first: what its SVG draws."""
    rows = s.execute(select(DriftObservation).where(DriftObservation.chart_id == chart_id)
                     .order_by(DriftObservation.id.desc()).limit(last)).scalars().all()
    return [{"job_id": r.job_id, "at": r.created_at, "oodm": r.oodm, "tau": r.tau, "is_ood": r.is_ood,
             "in_baseline": r.in_baseline, "ewma_oodm": r.ewma_oodm, "limit_oodm": r.limit_oodm,
             "stop_oodm": r.stop_oodm, "ewma_rate": r.ewma_rate, "limit_rate": r.limit_rate,
             } for r in reversed(rows)]


def open_counts(s: Session) -> dict[tuple[str, str], int]:
    """Open alarms by (kind, model), for the Prometheus gauge."""
    out: dict[tuple[str, str], int] = {}
    rows = s.execute(select(DriftAlarm.kind, DriftChart.model).join(DriftChart, DriftChart.id == DriftAlarm.chart_id)
                     .where(DriftAlarm.state == "open")).all()
    for kind, model in rows:
        out[(kind, model)] = out.get((kind, model), 0) + 1
    return out

