"""Fitting the OOD bank and evaluating a model: what ``specgate model fit-ood`` / ``evaluate`` run.

Cases are anything with ``image`` (native units), ``modality``, ``spacing`` and optionally ``label`` and
``name`` attributes: :class:`model.data.volumes.Case` or :class:`model.data.phantoms.PhantomCase`.

Both go through :func:`model.segment.segment_volume` with one :class:`model.segment.InferenceSettings`:
the path the worker runs. Segmentation metrics are computed on each case's own (source) grid.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from model._atomic import atomic_write
from model.calibration import ece_mce, reliability_diagram
from model.metrics import assd, dice, hd95, ood_detection_metrics
from model.ood import SpectralGate
from model.segment import InferenceSettings, StudyInference, segment_volume

__all__ = ["evaluate", "fit_bank", "format_report", "oodm_histogram", "run_case"]

DECIMALS = 4


class Cases(Protocol):
    """Cases a dataset yields one at a time (a list, an :class:`model.data.volumes.MSDDataset`)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Any]: ...


def run_case(net: nn.Module, case: Any, settings: InferenceSettings,
             device: str | torch.device | None = None) -> StudyInference:
    """One case through the production path (:func:`model.segment.segment_volume`), float32 output."""
    return segment_volume(net, case.image, case.spacing, case.modality, settings, device=device,
                          out_dtype=np.float32)


def _progress(items: Cases, on: bool, desc: str) -> Iterable[Any]:
    if not on:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="case")


def case_group(case: Any) -> str:
    """The training image a case comes from (one group however many geometries it was re-gridded to)."""
    group = getattr(case, "group", None)
    if group is not None:
        return str(group)
    if hasattr(case, "kind") and hasattr(case, "index"):
        return f"{case.kind}:{case.seed}:{case.index}"
    return str(getattr(case, "name", id(case)))


def fit_bank(net: nn.Module, cases: Cases, weights_sha256: str | None, settings: InferenceSettings,
             c: float = 2.5, device: str | torch.device | None = None, progress: bool = False,
             meta: dict[str, Any] | None = None) -> SpectralGate:
    """Signatures of the training cases through the production path -> a :class:`SpectralGate`.

    The gate is tied to ``weights_sha256`` and records ``settings`` (``meta["inference"]``); tau is fitted
    leaving out, for each signature, every signature of the same training image (:func:`case_group`).
    """
    sigs, groups, modalities = [], [], set()
    for cs in _progress(cases, progress, "signatures"):  # one case at a time: cases may be generated lazily
        sigs.append(run_case(net, cs, settings, device).signature)
        groups.append(case_group(cs))
        modalities.add(str(cs.modality).upper())
    m = {"n": len(sigs), "images": len(set(groups)), **(meta or {}), "inference": settings.record(),
         "modalities": sorted(modalities)}
    return SpectralGate.fit(np.stack(sigs), c=c, weights_sha256=weights_sha256, meta=m,
                            groups=groups if len(set(groups)) < len(groups) else None)


def _r(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), DECIMALS)


def _nanmean(v: list[float]) -> float:
    a = np.asarray(v, dtype=np.float64)
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


def _resolve_settings(gate: SpectralGate, settings: InferenceSettings | None) -> InferenceSettings:
    """``settings``, or the ones the gate's bank was fitted through; refused when the bank does not match."""
    if settings is None:
        if gate.inference is None:
            raise ValueError("the bank records no inference settings; pass settings= or refit the bank")
        settings = InferenceSettings.from_record(gate.inference)
    gate.check_inference(settings.signature_settings(), "this evaluation")
    return settings


def _segmentation_metrics(p: np.ndarray, lab: np.ndarray, spacing: Any, band: int, bins: int) -> dict[str, float]:
    """DSC, HD95, ASSD of ``p >= 0.5`` against ``lab``, and ECE, MCE of the probabilities ``p``."""
    pred = p >= 0.5
    metrics = {"dsc": dice(pred, lab), "hd95": hd95(pred, lab, spacing), "assd": assd(pred, lab, spacing)}
    metrics["ece"], metrics["mce"] = ece_mce(p, lab, band=band, bins=bins)
    return metrics


@dataclass
class _DatasetRun:
    """One dataset through the model and the gate, case by case."""

    rows: dict[str, list[float]] = field(  # segmentation metrics of the labelled cases
        default_factory=lambda: {"dsc": [], "hd95": [], "assd": [], "ece": [], "mce": []})
    scores: list[float] = field(default_factory=list)  # OODM
    decisions: list[float] = field(default_factory=list)  # OODM, inf for a modality the bank never saw
    probs: list[np.ndarray] = field(default_factory=list)  # foreground maps, for the reliability diagram
    labels: list[np.ndarray] = field(default_factory=list)


def _run_dataset(net: nn.Module, gate: SpectralGate, name: str, cases: Cases, settings: InferenceSettings,
                 device: str | torch.device | None, band: int, bins: int, keep_maps: bool,
                 progress: bool) -> _DatasetRun:
    """Every case of ``cases`` through the production path and the gate; ``keep_maps``: keep the foreground
    probabilities and labels of the labelled cases."""
    run = _DatasetRun()
    for cs in _progress(cases, progress, name):
        r = run_case(net, cs, settings, device)
        s, _flagged, why = gate.verdict(gate.observe(r), cs.modality)
        run.scores.append(s)
        # for detection metrics a modality the bank never saw ranks above every OODM
        run.decisions.append(float("inf") if why == "modality_not_in_bank" else s)
        lab = getattr(cs, "label", None)
        if lab is None:
            continue
        p = r.foreground
        for k, v in _segmentation_metrics(p, lab, cs.spacing, band, bins).items():
            run.rows[k].append(v)
        if keep_maps:
            run.probs.append(np.asarray(p, dtype=np.float32))
            run.labels.append(np.asarray(lab, dtype=bool))
    return run


def _dataset_entry(run: _DatasetRun, n: int, is_ood: bool, tau: float) -> dict[str, Any]:
    """A dataset's line of the report: size, role, mean segmentation metrics, cases flagged."""
    entry: dict[str, Any] = {"n": n, "in_distribution": not is_ood}
    if run.rows["dsc"]:
        entry.update({k: _r(_nanmean(v)) for k, v in run.rows.items()})
    entry["flagged_ood"] = int(sum(d > tau for d in run.decisions))
    if any(d == float("inf") for d in run.decisions):
        entry["held_for_modality"] = int(sum(d == float("inf") for d in run.decisions))
    return entry


def evaluate(
    net: nn.Module,
    gate: SpectralGate,
    datasets: Mapping[str, Cases],
    ood_datasets: Mapping[str, Cases] | None = None,
    settings: InferenceSettings | None = None,
    device: str | torch.device | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    band: int = 10,
    bins: int = 10,
    progress: bool = False,
) -> dict[str, Any]:
    """Segmentation (DSC, HD95, ASSD, ECE, MCE: per-dataset means) and OOD detection metrics.

    ``datasets`` are in distribution, ``ood_datasets`` are not. ``settings``: the inference path (default:
    the one the gate's bank was fitted through). With ``out_dir``, writes
    ``oodm_histogram.png`` and one ``reliability_<dataset>.png`` per labelled dataset.
    Floats are rounded to 4 decimals; NaN/undefined values are ``None``.
    """
    ood_datasets = ood_datasets or {}
    settings = _resolve_settings(gate, settings)
    seg: dict[str, Any] = {}
    oodm: dict[str, list[float]] = {}
    scores_in: list[float] = []
    scores_out: list[float] = []
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for is_ood, group in ((False, datasets), (True, ood_datasets)):
        for name, cases in group.items():
            run = _run_dataset(net, gate, name, cases, settings, device, band, bins, out is not None, progress)
            oodm[name] = [_r(s) for s in run.scores]  # type: ignore[misc]
            (scores_out if is_ood else scores_in).extend(run.decisions)
            seg[name] = _dataset_entry(run, len(cases), is_ood, gate.tau)
            if out is not None and run.probs:
                reliability_diagram(run.probs, run.labels, out / f"reliability_{name}.png", band=band, bins=bins,
                                    title=name)
    result: dict[str, Any] = {
        "inference": {"block": settings.block, "overlap": settings.overlap, "band": band, "bins": bins,
                      "spacing": settings.record()["spacing"]},
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
        atomic_write(out / "metrics.json", json.dumps(result, indent=2, sort_keys=True).encode())
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
    atomic_write(path, lambda fh: fig.savefig(fh, format="png"))


def _f(x: Any, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def format_report(m: dict[str, Any]) -> str:
    """The table ``specgate model evaluate`` prints (and the model card embeds)."""
    g = m["gate"]
    width = max([18] + [len(n) for n in m["datasets"]])
    lines = [
        f"{'dataset':<{width}} {'role':<4} {'n':>3} {'DSC':>6} {'HD95mm':>7} {'ASSDmm':>7} {'ECE':>6} {'MCE':>6} "
        f"{'OOD':>5}  OODM/tau",
    ]
    for name, d in m["datasets"].items():
        scores = [v for v in m["oodm"].get(name, []) if v is not None]
        spread = f"{min(scores) / g['tau']:.2f}-{max(scores) / g['tau']:.2f}" if scores and g["tau"] else "-"
        lines.append(
            f"{name:<{width}} {'in' if d['in_distribution'] else 'OOD':<4} {d['n']:>3} {_f(d.get('dsc')):>6} "
            f"{_f(d.get('hd95'), 2):>7} {_f(d.get('assd'), 2):>7} {_f(d.get('ece')):>6} {_f(d.get('mce')):>6} "
            f"{d['flagged_ood']:>2}/{d['n']:<2} {spread}"
        )
    lines.append(f"gate: tau={_f(g['tau'], 4)} (c={g['c']}, bank of {g['bank_size']})")
    if "ood" in m:
        o = m["ood"]
        lines.append(
            f"OOD detection: accuracy={_f(o['accuracy'])} sensitivity={_f(o['sensitivity'])} "
            f"specificity={_f(o['specificity'])} AUC={_f(o['auc'])} (in={o['n_in']}, OOD={o['n_out']})"
        )
    return "\n".join(lines)
