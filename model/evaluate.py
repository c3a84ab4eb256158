"""Fitting the OOD bank and evaluating a model: what ``specgate model fit-ood`` / ``evaluate`` run.

Cases are anything with ``image`` (native units), ``modality``, ``spacing`` and optionally ``label`` and
``name`` attributes: :class:`model.data.volumes.Case` or :class:`model.data.phantoms.PhantomCase`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.calibration import ece_mce, reliability_diagram
from model.infer import InferenceResult, sliding_window
from model.metrics import assd, dice, hd95, ood_detection_metrics
from model.ood import SpectralGate
from model.preprocess import preprocess

__all__ = ["evaluate", "fit_bank", "format_report", "oodm_histogram", "run_case"]

DECIMALS = 4


def run_case(net: nn.Module, case: Any, block: int = 96, overlap: int = 24,
             device: str | torch.device | None = None, batch_size: int = 1) -> InferenceResult:
    """Preprocess one case by its modality and run the sliding window."""
    return sliding_window(net, preprocess(case.image, case.modality), block=block, overlap=overlap,
                          device=device, batch_size=batch_size)


def _progress(items: Sequence[Any], on: bool, desc: str) -> Iterable[Any]:
    if not on:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="case")


def fit_bank(net: nn.Module, cases: Sequence[Any], weights_sha256: str | None, c: float = 2.5,
             block: int = 96, overlap: int = 24, device: str | torch.device | None = None,
             progress: bool = False, meta: dict[str, Any] | None = None) -> SpectralGate:
    """Signatures of the training cases -> a fitted :class:`SpectralGate` tied to ``weights_sha256``."""
    sigs = [run_case(net, cs, block, overlap, device).signature for cs in _progress(cases, progress, "signatures")]
    m = {"n": len(sigs), "block": block, "overlap": overlap, **(meta or {})}
    return SpectralGate.fit(np.stack(sigs), c=c, weights_sha256=weights_sha256, meta=m)


def _r(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), DECIMALS)


def _nanmean(v: list[float]) -> float:
    a = np.asarray(v, dtype=np.float64)
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


def evaluate(
    net: nn.Module,
    gate: SpectralGate,
    datasets: Mapping[str, Sequence[Any]],
    ood_datasets: Mapping[str, Sequence[Any]] | None = None,
    block: int = 96,
    overlap: int = 24,
    device: str | torch.device | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    band: int = 10,
    bins: int = 10,
    progress: bool = False,
) -> dict[str, Any]:
    """Segmentation (DSC, HD95, ASSD, ECE, MCE: per-dataset means) and OOD detection metrics.

    ``datasets`` are in distribution, ``ood_datasets`` are not. With ``out_dir``, writes
    ``oodm_histogram.png`` and one ``reliability_<dataset>.png`` per labelled dataset.
    Floats are rounded to 4 decimals; NaN/undefined values are ``None``.
    """
    ood_datasets = ood_datasets or {}
    seg: dict[str, Any] = {}
    oodm: dict[str, list[float]] = {}
    scores_in: list[float] = []
    scores_out: list[float] = []
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for is_ood, group in ((False, datasets), (True, ood_datasets)):
        for name, cases in group.items():
            rows: dict[str, list[float]] = {"dsc": [], "hd95": [], "assd": [], "ece": [], "mce": []}
            probs, labels, scores = [], [], []
            for cs in _progress(cases, progress, name):
                r = run_case(net, cs, block, overlap, device)
                s = gate.score(gate.observe(r))
                scores.append(s)
                lab = getattr(cs, "label", None)
                if lab is not None:
                    p = r.foreground
                    pred = p >= 0.5
                    rows["dsc"].append(dice(pred, lab))
                    rows["hd95"].append(hd95(pred, lab, cs.spacing))
                    rows["assd"].append(assd(pred, lab, cs.spacing))
                    e, m = ece_mce(p, lab, band=band, bins=bins)
                    rows["ece"].append(e)
                    rows["mce"].append(m)
                    if out is not None:
                        probs.append(np.asarray(p, dtype=np.float32))
                        labels.append(np.asarray(lab, dtype=bool))
            oodm[name] = [_r(s) for s in scores]  # type: ignore[misc]
            (scores_out if is_ood else scores_in).extend(scores)
            entry: dict[str, Any] = {"n": len(cases), "in_distribution": not is_ood}
            if rows["dsc"]:
                entry.update({k: _r(_nanmean(v)) for k, v in rows.items()})
            entry["flagged_ood"] = int(sum(s > gate.tau for s in scores))
            seg[name] = entry
            if out is not None and probs:
                reliability_diagram(probs, labels, out / f"reliability_{name}.png", band=band, bins=bins, title=name)
    result: dict[str, Any] = {
        "inference": {"block": block, "overlap": overlap, "band": band, "bins": bins},
        "gate": {"tau": _r(gate.tau), "c": gate.c, "bank_size": int(gate.bank.shape[0])},
        "datasets": seg,
        "oodm": oodm,
    }
    if scores_in and scores_out:
        result["ood"] = {k: _r(v) for k, v in ood_detection_metrics(scores_in, scores_out, gate.tau).items()}
        result["ood"].update({"n_in": len(scores_in), "n_out": len(scores_out)})
    if out is not None:
        oodm_histogram({k: v for k, v in oodm.items() if k in datasets},
                       {k: v for k, v in oodm.items() if k in ood_datasets}, gate.tau, out / "oodm_histogram.png")
        (out / "metrics.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    return result


def oodm_histogram(in_scores: dict[str, list[float]], out_scores: dict[str, list[float]], tau: float,
                   path: str | os.PathLike[str]) -> None:
    """Histogram of OODM per dataset (in-distribution solid, OOD hatched) with the threshold tau."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    allv = [v for d in (in_scores, out_scores) for vs in d.values() for v in vs] + [tau]
    edges = np.linspace(0, max(allv) * 1.05 + 1e-9, 30)
    for name, vs in in_scores.items():
        ax.hist(vs, bins=edges.tolist(), alpha=0.6, label=f"{name} (in)")
    for name, vs in out_scores.items():
        ax.hist(vs, bins=edges.tolist(), alpha=0.6, hatch="//", label=f"{name} (OOD)")
    ax.axvline(tau, color="k", ls="--", label=f"tau = {tau:.4f}")
    ax.set_xlabel("OODM (distance to nearest training signature)")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")


def _f(x: Any, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def format_report(m: dict[str, Any]) -> str:
    """The table ``specgate model evaluate`` prints (and the model card embeds)."""
    lines = [
        f"{'dataset':<18} {'role':<4} {'n':>3} {'DSC':>6} {'HD95mm':>7} {'ASSDmm':>7} {'ECE':>6} {'MCE':>6} {'OOD':>5}",
    ]
    for name, d in m["datasets"].items():
        lines.append(
            f"{name:<18} {'in' if d['in_distribution'] else 'OOD':<4} {d['n']:>3} {_f(d.get('dsc')):>6} "
            f"{_f(d.get('hd95'), 2):>7} {_f(d.get('assd'), 2):>7} {_f(d.get('ece')):>6} {_f(d.get('mce')):>6} "
            f"{d['flagged_ood']:>2}/{d['n']}"
        )
    g = m["gate"]
    lines.append(f"gate: tau={_f(g['tau'], 4)} (c={g['c']}, bank of {g['bank_size']})")
    if "ood" in m:
        o = m["ood"]
        lines.append(
            f"OOD detection: accuracy={_f(o['accuracy'])} sensitivity={_f(o['sensitivity'])} "
            f"specificity={_f(o['specificity'])} AUC={_f(o['auc'])} (in={o['n_in']}, OOD={o['n_out']})"
        )
    return "\n".join(lines)
