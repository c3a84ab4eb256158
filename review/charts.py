"""Charts for the reports page, drawn on the server as SVG (matplotlib; no CDN, no JavaScript).

Each function takes the rows of one report of :mod:`ledger.reports` and returns one ``<svg ...>`` element
as a string, without the XML prolog, to inline in HTML:

- :func:`ood_rate_chart`: rows of ``REPORTS["ood-rate"]``: the OOD rate per day, one line per modality
  and one for all results;
- :func:`turnaround_chart`: rows of ``REPORTS["turnaround-daily"]``: p50/p90/p99 per day, for results
  sent straight away and for results held for review;
- :func:`queue_age_chart`: rows of ``REPORTS["queue"]``: how long the held results have waited;
- :func:`gate_chart`: rows of ``REPORTS["gate-weekly"]`` (or ``gate-monthly``): the gate's scorecard over
  time, each share with its interval as an error bar.
- :func:`shadow_chart`: rows of ``REPORTS["shadow"]``: per shadow model, the two gates' decisions on the
  same studies (stacked) and the masks' mean DSC.

No rows gives a small chart that says "no data in this period". Text is kept as SVG text (not paths), so
the page's fonts draw it and a search finds it; matplotlib escapes it for XML, and mathtext is off, so an
AE title or station name with ``$`` or ``<`` is drawn as it is. Figures are made with
:class:`matplotlib.figure.Figure`, not pyplot: no global figure registry, no backend to select (the
import does nothing), safe in a threaded web server.

    >>> svg = queue_age_chart([])
    >>> svg.startswith("<svg") and "no data in this period" in svg
    True
"""

from __future__ import annotations

import io
import re
import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import date, datetime, time, timedelta
from typing import Any
from xml.sax.saxutils import quoteattr

__all__ = ["gate_chart", "ood_rate_chart", "queue_age_chart", "shadow_chart", "turnaround_chart"]

_SIZE = (7.5, 3.6)  # inches; at the SVG's 72 points per inch, 540 x 259
_RC: dict[Any, Any] = {"svg.fonttype": "none", "text.parse_math": False, "font.size": 9.0}
_NO_DATA = "no data in this period"


def _figure(size: tuple[float, float] = _SIZE) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=size, layout="constrained")


_ID = re.compile(r'\bid="([^"]+)"')


def _unique_ids(svg: str) -> str:
    """Prefix every id (and every reference to one) with a prefix of this chart's own: matplotlib names
    its groups ``figure_1``, ``axes_1``..., which two charts inlined in one page would share."""
    prefix = f"c{uuid.uuid4().hex[:10]}-"
    ids = set(_ID.findall(svg))
    if not ids:
        return svg
    ref = re.compile(r'(\bid="|url\(#|href="#)(' + "|".join(map(re.escape, sorted(ids, key=len, reverse=True)))
                     + r')(?=[")])')
    return ref.sub(lambda m: f"{m.group(1)}{prefix}{m.group(2)}", svg)


def _svg(fig: Any) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return _unique_ids(text[text.index("<svg"):])


def _draw(draw: Any, rows: Sequence[dict[str, Any]], title: str) -> str:
    import matplotlib

    with matplotlib.rc_context(_RC):  # text.parse_math is read when the text is made, fonttype when saved
        if not rows:
            fig = _figure((5.0, 1.6))
            fig.suptitle(title)
            fig.text(0.5, 0.4, _NO_DATA, ha="center", va="center", color="0.4")
        else:
            fig = _figure()
            ax = fig.subplots()
            draw(ax, rows)
            ax.set_title(title)
            ax.grid(True, color="0.9")
            ax.set_axisbelow(True)
        svg = _svg(fig)
    # a name for screen readers: the chart's title
    return svg.replace("<svg ", f"<svg role=\"img\" aria-label={quoteattr(title)} ", 1)


def _days(ax: Any, days: Sequence[date]) -> None:
    """Ticks on whole days (one a day up to ten days, then fewer), half a day of room at both ends."""
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter, DayLocator

    first, last = min(days), max(days)
    span = (last - first).days
    locator = DayLocator(interval=1 + span // 10) if span <= 60 else AutoDateLocator(minticks=3, maxticks=8)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    ax.set_xlim(datetime.combine(first, time()) - timedelta(hours=12),
                datetime.combine(last, time()) + timedelta(hours=12))
    ax.set_xlabel("day (UTC)")


def _legend(fig: Any, **kwargs: Any) -> None:
    """The legend beside the plot, where it hides no line."""
    fig.legend(loc="outside right upper", fontsize=8, frameon=False, **kwargs)


def ood_rate_chart(rows: Sequence[dict[str, Any]]) -> str:
    """The OOD rate per day (``ood-rate`` rows): one line per modality, a heavier one for all results."""
    def draw(ax: Any, rows: Sequence[dict[str, Any]]) -> None:
        from matplotlib.ticker import PercentFormatter

        counts: dict[str, dict[date, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
        for r in rows:
            day = date.fromisoformat(r["day"])
            for key in ("all results", r["modality"] or "no modality"):
                counts[key][day][0] += r["ood"]
                counts[key][day][1] += r["results"]
        for key in sorted(counts, key=lambda k: (k != "all results", k)):
            days = sorted(counts[key])
            rates = [counts[key][d][0] / counts[key][d][1] for d in days]
            heavy = key == "all results"
            ax.plot(days, rates, marker="o", markersize=4 if heavy else 3, linewidth=2.2 if heavy else 1.2,
                    color="black" if heavy else None, label=key)
        ax.set_ylim(0, 1.05)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_ylabel("results out of distribution")
        _days(ax, [date.fromisoformat(r["day"]) for r in rows])
        _legend(ax.figure)

    return _draw(draw, rows, "Out-of-distribution rate per day")


def _unit(seconds: float) -> tuple[str, float]:
    """A unit that keeps the numbers of a time axis short.

        >>> _unit(90.0), _unit(3000.0), _unit(20000.0)
        (('s', 1.0), ('min', 60.0), ('h', 3600.0))
    """
    if seconds < 120.0:
        return "s", 1.0
    if seconds < 2 * 3600.0:
        return "min", 60.0
    return "h", 3600.0


def turnaround_chart(rows: Sequence[dict[str, Any]]) -> str:
    """Turnaround p50/p90/p99 per day (``turnaround-daily`` rows): solid, dashed and dotted lines, one
    colour for results sent straight away, another for results held for review."""
    def draw(ax: Any, rows: Sequence[dict[str, Any]]) -> None:
        top = max(r[k] for r in rows for k in ("p50_s", "p90_s", "p99_s") if r[k] is not None)
        unit, scale = _unit(top)
        styles = {"p50_s": ("p50", "-"), "p90_s": ("p90", "--"), "p99_s": ("p99", ":")}
        for held, colour, route in ((False, "tab:blue", "sent straight away"), (True, "tab:orange", "reviewed")):
            mine = sorted((r for r in rows if bool(r["held"]) == held), key=lambda r: r["day"])
            if not mine:
                continue
            days = [date.fromisoformat(r["day"]) for r in mine]
            for key, (name, style) in styles.items():
                ax.plot(days, [r[key] / scale for r in mine], linestyle=style, marker="o", markersize=3,
                        color=colour, label=f"{route}, {name}")
        ax.set_ylim(bottom=0)
        ax.set_ylabel(f"last instance to delivery ({unit})")
        _days(ax, [date.fromisoformat(r["day"]) for r in rows])
        _legend(ax.figure)

    return _draw(draw, rows, "Turnaround: last instance received to delivery")


def queue_age_chart(rows: Sequence[dict[str, Any]]) -> str:
    """How long the held results have waited (``queue`` rows): a histogram of ages, stacked by modality."""
    def draw(ax: Any, rows: Sequence[dict[str, Any]]) -> None:
        from matplotlib.ticker import MaxNLocator

        ages = [max(float(r["age_s"]), 0.0) for r in rows]
        unit, scale = _unit(max(ages))
        by: dict[str, list[float]] = defaultdict(list)
        for r, age in zip(rows, ages, strict=True):
            by[r["modality"] or "no modality"].append(age / scale)
        names = sorted(by)
        top = max(ages) / scale
        ax.hist([by[n] for n in names], bins=min(20, max(1, len(ages))), range=(0.0, top if top > 0 else 1.0),
                stacked=True, label=names)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(f"time in the queue ({unit})")
        ax.set_ylabel("held results")
        ax.legend(title=f"{len(ages)} waiting, oldest {top:.1f} {unit}", loc="upper right", fontsize=8,
                  title_fontsize=8, frameon=False)

    return _draw(draw, rows, "Review queue: age of held results")


#: the scorecard's shares (ledger.scorecard.PROPORTIONS) as the chart draws them
_GATE_SERIES = (("held_right", "held, rejected by a radiologist (gate right)", "tab:green"),
                ("retracted_rate", "released, retracted for quality", "tab:red"),
                ("audit_miss", "blind audit: released, rejected", "tab:purple"))


def gate_chart(rows: Sequence[dict[str, Any]]) -> str:
    """The gate's scorecard per period (``gate-weekly`` or ``gate-monthly`` rows): for each model (its own
    line style) the share of held results a radiologist rejected, of released results retracted for
    quality and of blind-audited releases rejected, each a point at the period's first day with its 95%
    interval as an error bar (the three side by side, a tenth of a period apart, so the bars do not hide
    each other). A share of nothing (no decided result of that kind) is not drawn."""
    def draw(ax: Any, rows: Sequence[dict[str, Any]]) -> None:
        from matplotlib.ticker import PercentFormatter

        styles = ("-", "--", ":", "-.")
        models = sorted({str(r["model_id"]) for r in rows})
        starts = sorted({date.fromisoformat(r["period"]) for r in rows})
        gap = min((b - a for a, b in zip(starts, starts[1:], strict=False)), default=timedelta(days=7))
        dodge = gap / 10  # the three shares of a period side by side, a tenth of a period apart
        drawn = 0
        for m, model in enumerate(models):
            mine = sorted((r for r in rows if str(r["model_id"]) == model), key=lambda r: r["period"])
            for i, (key, label, colour) in enumerate(_GATE_SERIES):
                pts = [r for r in mine if r[key] is not None]
                if not pts:
                    continue
                x = [datetime.combine(date.fromisoformat(r["period"]), time()) + dodge * (i - 1) for r in pts]
                y = [r[key] for r in pts]
                err = [[v - r[f"{key}_lo"] for v, r in zip(y, pts, strict=True)],
                       [r[f"{key}_hi"] - v for v, r in zip(y, pts, strict=True)]]
                ax.errorbar(x, y, yerr=err, color=colour, linestyle=styles[m % len(styles)], marker="o",
                            markersize=4, capsize=3, linewidth=1.2,
                            label=label if len(models) == 1 else f"{model}: {label}")
                drawn += 1
        ax.set_ylim(-0.02, 1.05)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_ylabel("share, with 95% Wilson interval")
        _days(ax, starts)
        margin = dodge + timedelta(hours=12)  # room for the shares drawn beside the first and last periods
        ax.set_xlim(datetime.combine(starts[0], time()) - margin, datetime.combine(starts[-1], time()) + margin)
        ax.set_xlabel("period starting (UTC)")
        if drawn:
            _legend(ax.figure)
        else:  # results, but none decided, retracted or audited yet
            ax.text(0.5, 0.5, "no labelled results in this period", transform=ax.transAxes, ha="center",
                    va="center", color="0.4")

    return _draw(draw, rows, "The gate's scorecard over time")


#: the cells of the shadow report's 2x2 table of OOD decisions, in the order they are stacked
_AGREEMENT = (("both_in", "both in distribution", "#4caf50"), ("both_ood", "both OOD", "#9e9e9e"),
              ("live_in_shadow_ood", "live in, shadow OOD", "#ff9800"),
              ("live_ood_shadow_in", "live OOD, shadow in", "#e53935"))


def shadow_chart(rows: Sequence[dict[str, Any]]) -> str:
    """Each shadow model against its live model (``shadow`` rows): one bar of studies, stacked by the two
    gates' decisions (agreeing in green and grey, disagreeing in orange and red), the masks' mean DSC in
    the bar's name."""
    def draw(ax: Any, rows: Sequence[dict[str, Any]]) -> None:
        from matplotlib.ticker import MaxNLocator

        names = [f"{r['shadow_model']} vs {r['live_model']}\nDSC " +
                 (f"{r['dsc_mean']:.3f}" if r["dsc_mean"] is not None else "n/a") for r in rows]
        left = [0] * len(rows)
        for key, label, color in _AGREEMENT:
            counts = [int(r[key]) for r in rows]
            ax.barh(names, counts, left=left, color=color, label=label)
            left = [a + b for a, b in zip(left, counts, strict=True)]
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("studies both models ran on")
        ax.invert_yaxis()
        _legend(ax.figure)

    return _draw(draw, rows, "Shadow models: the two gates' decisions on the same studies")
