"""What every experiment's report shares: summary statistics, paired tests, bootstrap intervals, and the
two files an experiment writes, ``<name>.json`` (every number) and ``<name>.md`` (tables made from it).

The Markdown is never written from the numbers in memory: :func:`write_report` writes the JSON, reads it
back from disk, and hands what it read to the experiment's renderer. A number in a table is therefore a
number in the JSON, rounded to the decimals the JSON names (a test parses the tables back and checks).
Both files are published whole (:func:`model._atomic.atomic_write`).

>>> mean_sd([1.0, 2.0, 3.0, float("nan")])
(2.0, 1.0, 3)
>>> t = paired_t([0.80, 0.82, 0.85, 0.90], [0.78, 0.80, 0.84, 0.86])
>>> round(t.t, 4), round(t.p, 4), t.n
(3.5762, 0.0374, 4)
>>> fmt_mean_sd(0.8123, 0.0456, 2)
'0.81 ± 0.05'
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model._atomic import atomic_write

__all__ = ["PairedT", "bootstrap_ci", "fmt", "fmt_mean_sd", "jsonable", "markdown_table", "mean_sd",
           "paired_t", "read_json", "reduced_and_machine", "write_report"]


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    return a[np.isfinite(a)]


def mean_sd(values: Sequence[float] | np.ndarray) -> tuple[float, float, int]:
    """``(mean, sample standard deviation (ddof 1), n)`` of the finite values (NaN and None left out);
    the sd is NaN for fewer than 2 values, both are NaN for none."""
    a = _finite(values)
    if a.size == 0:
        return math.nan, math.nan, 0
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else math.nan, int(a.size)


@dataclass(frozen=True)
class PairedT:
    """A paired t-test of ``a - b``: statistic, two-sided p, the number of pairs, the mean difference."""

    t: float
    p: float
    n: int
    mean_diff: float

    def record(self) -> dict[str, float | int | None]:
        return jsonable({"t": self.t, "p": self.p, "n": self.n, "mean_diff": self.mean_diff})


def paired_t(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> PairedT:
    """Two-sided paired t-test (:func:`scipy.stats.ttest_rel`) over the pairs where both are finite.

    Where every difference is the same, ``ttest_rel`` answers NaN (0 / 0); the limits are used instead:
    all differences zero -> t 0, p 1 (no evidence of a difference); all equal and non-zero -> t +-inf,
    p 0. Fewer than 2 pairs: t and p NaN.
    """
    from scipy import stats

    x = np.asarray([np.nan if v is None else v for v in a], dtype=np.float64)
    y = np.asarray([np.nan if v is None else v for v in b], dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    d = x[keep] - y[keep]
    n = int(d.size)
    if n < 2:
        return PairedT(math.nan, math.nan, n, float(d.mean()) if n else math.nan)
    if np.all(d == d[0]):
        if d[0] == 0:
            return PairedT(0.0, 1.0, n, 0.0)
        return PairedT(math.copysign(math.inf, d[0]), 0.0, n, float(d[0]))
    r = stats.ttest_rel(x[keep], y[keep])
    return PairedT(float(r.statistic), float(r.pvalue), n, float(d.mean()))


def bootstrap_ci(values: Sequence[float] | np.ndarray, *, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of the finite values, from ``n_boot`` resamples drawn
    with ``numpy.random.default_rng(seed)``. NaN for no values.

    >>> bootstrap_ci([1.0, 1.0, 1.0])
    (1.0, 1.0)
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    a = _finite(values)
    if a.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, a.size, size=(n_boot, a.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def jsonable(obj: Any) -> Any:
    """``obj`` with NaN and infinities as ``None``, NumPy scalars and arrays as Python numbers and lists,
    tuples as lists (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def fmt(value: float | None, decimals: int) -> str:
    """A number as the tables show it; ``-`` for a missing one."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{decimals}f}"


def fmt_mean_sd(mean: float | None, sd: float | None, decimals: int) -> str:
    return f"{fmt(mean, decimals)} ± {fmt(sd, decimals)}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    if any(len(r) != len(headers) for r in rows):
        raise ValueError(f"every row needs {len(headers)} cells")
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def write_report(out: str | os.PathLike[str], name: str, data: dict[str, Any],
                 render: Callable[[dict[str, Any]], str]) -> tuple[Path, Path]:
    """Write ``out/<name>.json``, read it back, and write ``out/<name>.md`` = ``render(what was read)``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    js = atomic_write(folder / f"{name}.json",
                      (json.dumps(jsonable(data), indent=1, allow_nan=False) + "\n").encode())
    md = atomic_write(folder / f"{name}.md", render(read_json(js)).encode())
    return js, md


def reduced_and_machine(data: dict[str, Any], timing: str, shared: str) -> list[str]:
    """The closing lines every report shares: what the scale reduced against the paper, then the wall time
    and the machine (``data["scale"]["reduced"]``, ``data["machine"]``, ``data["wall_s"]``). ``timing``
    follows the machine's sentence; ``shared`` is said when the load average exceeded the CPU count."""
    mc = data["machine"]
    busy = max(mc["load_average_start"][0], mc["load_average_end"][0]) > mc["cpu_count"]
    return ["Reduced against the paper:", "", *[f"- {r}" for r in data["scale"]["reduced"]], "",
            f"Wall time {data['wall_s']:.0f} s on {mc['device']} ({mc['device_name']}, {mc['cpu_count']} CPUs, "
            f"{mc['torch_threads']} torch threads; load average {mc['load_average_start'][0]} at the start, "
            f"{mc['load_average_end'][0]} at the end), torch {mc['torch']}." + timing
            + (" The machine was shared with other work (a load average above its CPU count): " + shared
               if busy else "")]
