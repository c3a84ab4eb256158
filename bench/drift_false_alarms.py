"""The drift chart's false-alarm rate on unchanged sources over a long run, and how fast it catches a
change. Prints, never asserts.

    .venv/bin/python bench/drift_false_alarms.py                    # defaults: the settings' defaults
    .venv/bin/python bench/drift_false_alarms.py --sources 400 --studies 5000 --baseline 30

In-control OODMs are drawn with replacement from the shipped model's OOD bank's own leave-one-out OODMs
(``Segmenter.open().gate.loo_oodm``: each training image scored against the bank without itself, the
distribution the gate's tau is set on; 0.6 to 3.8 hundredths, tau 0.0315), and a study is OOD when its
OODM is above tau, as the gate decides. Every simulated source gathers its own baseline from its first
``--baseline`` draws (the in-control mean and sd are *estimated*, as in production: the main reason the
false-alarm rate is above the known-parameter figure), then is charted for ``--studies`` more draws with
the chart's own arithmetic (:func:`ledger.drift.oodm_step`, :func:`ledger.drift.rate_step`,
:func:`ledger.drift.baseline_stats`, :func:`ledger.drift.limits`). An alarm is counted and the chart
restarted, as an admin's clear does; a stop alarm likewise.

Reported per chart kind (oodm, ood_rate, stop): alarms per 1,000 in-control studies, the share of sources
with at least one alarm within the run, and the median studies to a source's first alarm; beside them the
known-parameter in-control ARL of the OODM chart (Markov chain, :func:`ledger.drift.ewma_arl`). Then the
studies to the first alarm for shifts of the score by 0.5, 1, 2 and 5 in-control sd (5 sd: about what a
Gaussian blur of one voxel does to the shipped model's OODM on the CT phantoms, from -1.0 to +0.4 in
log(OODM/tau) with sd about 0.25).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ledger.drift import (  # noqa: E402
    DriftConfig,
    baseline_stats,
    ewma_arl,
    limits,
    oodm_step,
    rate_step,
    score,
)


def _baselines(draws: np.ndarray, ood: np.ndarray, cfg: DriftConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, sd, p0) per source from its first ``cfg.baseline_studies`` draws, through baseline_stats."""
    n = cfg.baseline_studies
    stats = [baseline_stats(SimpleNamespace(baseline_n=n, baseline_sum=float(x.sum()),  # type: ignore[arg-type]
                                            baseline_sumsq=float((x * x).sum()), baseline_ood=int(o.sum())), cfg)
             for x, o in zip(draws[:, :n], ood[:, :n], strict=True)]
    mean, sd, p0 = (np.array(v) for v in zip(*stats, strict=True))
    return mean, sd, p0


def run(scores: np.ndarray, ood: np.ndarray, cfg: DriftConfig, shift_sd: float = 0.0) -> dict[str, dict[str, float]]:
    """Chart every source (row) of ``scores``/``ood`` after its baseline; ``shift_sd``: the charted scores
    moved up by that many of the source's own baseline sd (0: in control)."""
    sources, total = scores.shape
    mean, sd, p0 = _baselines(scores, ood, cfg)
    lim = limits(cfg)
    rate_sd = np.sqrt(p0 * (1 - p0)) * lim.rate_sigma
    bounds = {"oodm": lim.oodm, "ood_rate": p0 + cfg.limit_l * rate_sd}
    stop_oodm = lim.stop_oodm
    e_oodm, e_rate = np.zeros(sources), p0.copy()
    alarms = {k: np.zeros(sources, dtype=np.int64) for k in ("oodm", "ood_rate", "stop")}
    first = {k: np.full(sources, -1, dtype=np.int64) for k in alarms}
    open_ = {k: np.zeros(sources, dtype=bool) for k in alarms}
    for t in range(cfg.baseline_studies, total):
        z = (scores[:, t] + shift_sd * sd - mean) / sd
        e_oodm = oodm_step(e_oodm, z, cfg)  # type: ignore[arg-type]
        e_rate = rate_step(e_rate, ood[:, t].astype(float), p0, cfg)  # type: ignore[arg-type]
        step = t - cfg.baseline_studies + 1
        hits = {"oodm": e_oodm > bounds["oodm"], "ood_rate": e_rate > bounds["ood_rate"],
                "stop": e_oodm > stop_oodm}  # the stop rule reads the OODM chart (ledger.drift)
        restart = np.zeros(sources, dtype=bool)
        for kind, hit in hits.items():
            new = hit & ~open_[kind]
            alarms[kind] += new
            first[kind][new & (first[kind] < 0)] = step
            open_[kind] |= new
            restart |= new
        # an admin clears every alarm the moment it opens: the chart restarts
        e_oodm = np.where(restart, 0.0, e_oodm)
        e_rate = np.where(restart, p0, e_rate)
        for kind in open_:
            open_[kind] &= ~restart
    charted = total - cfg.baseline_studies
    out = {}
    for kind in alarms:
        hit = first[kind][first[kind] > 0]
        out[kind] = {"per_1000": 1000.0 * alarms[kind].sum() / (sources * charted),
                     "sources_alarmed": float((first[kind] > 0).mean()),
                     "median_first": float(np.median(hit)) if hit.size else float("nan")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", type=int, default=300, help="independent unchanged sources")
    ap.add_argument("--studies", type=int, default=3000, help="charted studies per source after its baseline")
    defaults = DriftConfig()
    ap.add_argument("--baseline", type=int, default=defaults.baseline_studies)
    ap.add_argument("--lam", type=float, default=defaults.ewma_lambda)
    ap.add_argument("--rate-lam", type=float, default=defaults.rate_lambda)
    ap.add_argument("--L", type=float, default=defaults.limit_l)
    ap.add_argument("--stop-L", type=float, default=defaults.stop_l)
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args()
    cfg = DriftConfig(baseline_studies=args.baseline, ewma_lambda=args.lam, rate_lambda=args.rate_lam,
                      limit_l=args.L, stop_l=args.stop_L)

    from worker.model_runtime import Segmenter

    gate = Segmenter.open().gate
    loo, tau = np.asarray(gate.loo_oodm, dtype=float), float(gate.tau)
    pool = np.array([score(o, tau) for o in loo])
    from scipy.stats import skew

    print(f"shipped bank: {loo.size} leave-one-out OODMs, tau {tau:.4f}; log(OODM/tau) mean {pool.mean():.3f} "
          f"sd {pool.std(ddof=1):.3f}; above tau {np.mean(loo > tau):.2%}; skewness of the OODM {skew(loo):.2f}, "
          f"of log(OODM/tau) {skew(pool):.2f}")
    print(f"chart: lambda {cfg.ewma_lambda}, rate lambda {cfg.rate_lambda}, L {cfg.limit_l}, stop L {cfg.stop_l}, "
          f"baseline {cfg.baseline_studies} studies, sd floor {cfg.sd_floor}")
    print(f"known-parameter in-control ARL (Markov chain): control {ewma_arl(cfg):.0f} studies, "
          f"stop {ewma_arl(cfg, l_value=cfg.stop_l):.0f}")
    rng = np.random.default_rng(args.seed)
    total = cfg.baseline_studies + args.studies
    idx = rng.integers(0, loo.size, size=(args.sources, total))
    scores, ood = pool[idx], loo[idx] > tau
    t0 = time.perf_counter()
    res = run(scores, ood, cfg)
    print(f"\nin control: {args.sources} sources x {args.studies} charted studies "
          f"({args.sources * args.studies:,} studies, {time.perf_counter() - t0:.1f} s)")
    print(f"{'kind':<10}{'alarms/1000':>12}{'sources alarmed':>17}{'median 1st':>12}")
    for kind, r in res.items():
        print(f"{kind:<10}{r['per_1000']:>12.3f}{r['sources_alarmed']:>17.1%}{r['median_first']:>12.0f}")
    print("\nshifted by k in-control sd (studies to the first alarm, median over sources):")
    for k in (0.5, 1.0, 2.0, 5.0):
        short = run(scores[:, : cfg.baseline_studies + 200], ood[:, : cfg.baseline_studies + 200], cfg, shift_sd=k)
        print(f"  {k:>3} sd: oodm {short['oodm']['median_first']:.0f}, stop {short['stop']['median_first']:.0f} "
              f"(alarmed within 200: {short['oodm']['sources_alarmed']:.0%}, stopped {short['stop']['sources_alarmed']:.0%})")


if __name__ == "__main__":
    main()
