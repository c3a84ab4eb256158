"""The drift control chart of one source and model, as SVG for the reports page (the helpers of
:mod:`review.charts`: matplotlib's object API, text kept as text, ids made unique per chart).

Two panels over the chart's studies in order (baseline studies shaded): the EWMA of the standardised
``log(OODM / tau)`` against its control and stop limits, and the EWMA of the OOD rate against its control limit;
a study the gate held for its OODM is marked with a red tick.

    >>> svg = drift_chart([], "CT_EAST / CT-EAST-1, model default")
    >>> svg.startswith("<svg") and "no studies yet" in svg
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from xml.sax.saxutils import quoteattr

from .charts import _RC, _figure, _svg

__all__ = ["drift_chart"]


def drift_chart(points: Sequence[dict[str, Any]], title: str) -> str:
    """``points``: :func:`ledger.drift.chart_points` of one chart, oldest first."""
    import matplotlib

    with matplotlib.rc_context(_RC):
        if not points:
            fig = _figure((5.0, 1.6))
            fig.suptitle(title)
            fig.text(0.5, 0.4, "no studies yet", ha="center", va="center", color="0.4")
        else:
            fig = _figure((7.5, 4.6))
            top, bottom = fig.subplots(2, 1, sharex=True)
            _panel(top, points, "ewma_oodm", "limit_oodm", "stop_oodm", "EWMA of log(OODM/tau), sd")
            _panel(bottom, points, "ewma_rate", "limit_rate", None, "EWMA of OOD rate")
            ood = [i + 1 for i, p in enumerate(points) if p["is_ood"]]
            if ood:
                bottom.plot(ood, [0.0] * len(ood), linestyle="none", marker="|", markersize=9, color="tab:red",
                            label="held by the gate (OODM > tau)")
            bottom.set_xlabel("study of this source and model (oldest first)")
            top.set_title(title)
            fig.legend(loc="outside right upper", fontsize=8, frameon=False)
        svg = _svg(fig)
    return svg.replace("<svg ", f"<svg role=\"img\" aria-label={quoteattr(title)} ", 1)


def _panel(ax: Any, points: Sequence[dict[str, Any]], value: str, limit: str, stop: str | None, label: str) -> None:
    xs = list(range(1, len(points) + 1))
    base = [x for x, p in zip(xs, points, strict=True) if p["in_baseline"]]
    if base:
        ax.axvspan(min(base) - 0.5, max(base) + 0.5, color="0.92",
                   label="baseline" if value == "ewma_oodm" else None)
    charted = [(x, p) for x, p in zip(xs, points, strict=True) if p[value] is not None]
    if charted:
        cx = [x for x, _ in charted]
        ax.plot(cx, [p[value] for _, p in charted], marker="o", markersize=3, color="black",
                label="EWMA" if value == "ewma_oodm" else None)
        ax.step(cx, [p[limit] for _, p in charted], where="mid", linestyle="--", color="tab:orange",
                label="control limit" if value == "ewma_oodm" else None)
        if stop is not None:  # the stop rule reads the OODM chart alone (ledger.drift)
            ax.step(cx, [p[stop] for _, p in charted], where="mid", linestyle=":", color="tab:red",
                    label="stop limit")
    ax.set_xlim(0.5, len(points) + 0.5)
    ax.set_ylim(bottom=0)
    ax.set_ylabel(label)
    ax.grid(True, color="0.9")
    ax.set_axisbelow(True)
