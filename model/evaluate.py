"""Fitting the OOD bank and evaluating a model: what ``specgate model fit-ood`` / ``evaluate`` run.

Cases are anything with ``image`` (native units), ``modality``, ``spacing`` and optionally ``label``,
``label_map`` and ``name`` attributes: :class:`model.data.volumes.Case` or
:class:`model.data.phantoms.PhantomCase`.

One evaluation loop (:func:`evaluate_cases`) is fed by a per-case :data:`Predict` callable: a bare SegNet
through :func:`model.study_inference.segment_volume` with one :class:`model.study_inference.InferenceSettings`
(:func:`evaluate`, :func:`segnet_predict`), or any registered model through its adapter's
:meth:`~model.adapters.base.ModelAdapter.predict` (:func:`evaluate_adapter`, :func:`adapter_predict`):
in both cases the path the worker runs. Segmentation metrics are computed on each case's own (source)
grid; a model that names its labels also gets the DSC of each label: its value in the model's label
map against the ground truth's value of the same name, where the dataset names its labels
(``dataset.json`` ``labels``, :attr:`model.data.volumes.Case.label_names`; :func:`match_labels`), else
against the same value.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from model._atomic import atomic_write
from model.calibration import ece_mce, reliability_diagram
from model.ood import SpectralGate
from model.scores import assd, dice, hd95, ood_detection_metrics
from model.study_inference import InferenceSettings, StudyInference, segment_volume

if TYPE_CHECKING:
    from model.adapters.base import ModelAdapter
    from model.bank_fit import Regrids

__all__ = ["CaseOutput", "LabelMatch", "Predict", "adapter_predict", "bank_signatures", "evaluate", "evaluate_adapter",
           "evaluate_cases", "fit_bank", "gate_from_signatures",
           "format_report", "match_labels", "oodm_histogram", "run_case", "segnet_predict"]

DECIMALS = 4
#: the reason :meth:`model.ood.SpectralGate.verdict` gives for a study held for its modality alone
MODALITY_RULE = "modality_not_in_bank"


class Cases(Protocol):
    """Cases a dataset yields one at a time (a list, an :class:`model.data.volumes.MSDDataset`)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Any]: ...


def run_case(net: nn.Module, case: Any, settings: InferenceSettings,
             device: str | torch.device | None = None) -> StudyInference:
    """One case through the production path (:func:`model.study_inference.segment_volume`), float32 output."""
    return segment_volume(net, case.image, case.spacing, case.modality, settings, device=device,
                          out_dtype=np.float32)


@dataclass
class CaseOutput:
    """What the evaluation needs of one case through a model, on the case's own grid: the foreground
    probability (1 - P(background)), the signature, and the label map when the model makes one (then the
    segmentation is ``labels > 0`` and each label gets its DSC; else ``foreground >= 0.5``)."""

    foreground: np.ndarray
    signature: np.ndarray
    labels: np.ndarray | None = None


#: one case -> its :class:`CaseOutput`: what :func:`evaluate_cases` runs on every case
Predict = Callable[[Any], CaseOutput]


def segnet_predict(net: nn.Module, settings: InferenceSettings,
                   device: str | torch.device | None = None) -> Predict:
    """A bare SegNet through :func:`run_case` (float32 probabilities of every class on the source grid)."""
    def predict(case: Any) -> CaseOutput:
        r = run_case(net, case, settings, device)
        return CaseOutput(foreground=r.foreground, signature=r.signature)
    return predict


def adapter_predict(adapter: ModelAdapter) -> Predict:
    """A registered model through :meth:`~model.adapters.base.ModelAdapter.predict`, the worker's path:
    its label map and float16 foreground on the source grid."""
    def predict(case: Any) -> CaseOutput:
        r = adapter.predict(case.image, case.spacing, case.modality)
        return CaseOutput(foreground=r.foreground, signature=r.signature, labels=r.labels)
    return predict


@dataclass(frozen=True)
class LabelMatch:
    """The ground truth's value of each of the model's labels (model value -> truth value), how they were
    matched ("name" or "value"), and the names either side lacks."""

    truth_of: dict[int, int]
    by: str
    not_in_dataset: tuple[str, ...] = ()
    not_in_model: tuple[str, ...] = ()


def match_labels(model: Mapping[int, str], dataset: Mapping[int, str] | None) -> LabelMatch:
    """The model's labels (value -> name) matched to the dataset's by name, whatever the case and the
    separators (:func:`model.adapters.base.normalise_name`, as a rule names labels); by value when the dataset
    names none, or when each has one label and their names differ. A model label the dataset lacks gets no
DSC; a dataset label the model lacks is listed.

    >>> m = match_labels({1: "liver", 2: "spleen", 3: "Kidney_Left"}, {1: "Spleen", 2: "liver", 4: "pancreas"})
    >>> m.truth_of, m.not_in_dataset, m.not_in_model
    ({1: 2, 2: 1}, ('Kidney_Left',), ('pancreas',))
    >>> match_labels({1: "liver"}, None)
    LabelMatch(truth_of={1: 1}, by='value', not_in_dataset=(), not_in_model=())
    >>> match_labels({1: "organ"}, {1: "liver"})  # one label each, named differently: foreground to foreground
    LabelMatch(truth_of={1: 1}, by='value-one-label', not_in_dataset=(), not_in_model=())
    """
    from model.adapters.base import normalise_name

    if not dataset:
        return LabelMatch({v: v for v in model}, "value")
    by_name: dict[str, list[int]] = {}
    for value, name in dataset.items():
        by_name.setdefault(normalise_name(name), []).append(value)
    twice = {k: v for k, v in by_name.items() if len(v) > 1}
    if twice:
        raise ValueError(f"the dataset names several labels alike: {twice} (its labels: {dict(dataset)})")
    truth_of = {v: by_name[normalise_name(n)][0] for v, n in model.items() if normalise_name(n) in by_name}
    if not truth_of and len(model) == 1 and len(dataset) == 1:
        # one label each and no name in common (the shipped model's "organ" against a dataset's "liver"):
        # the foreground against the foreground, and the report says the names differ
        return LabelMatch({v: next(iter(dataset)) for v in model}, "value-one-label")
    matched = set(truth_of.values())
    return LabelMatch(truth_of, "name", tuple(n for v, n in model.items() if v not in truth_of),
                      tuple(n for v, n in dataset.items() if v not in matched))


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
             meta: dict[str, Any] | None = None, regrids: Regrids | None = None,
             total: int | None = None) -> SpectralGate:
    """Signatures of the training cases through the production path -> a :class:`SpectralGate`.

    The gate is tied to ``weights_sha256`` and records ``settings`` (``meta["inference"]``); tau is fitted
    leaving out, for each signature, every signature of the same training image (:func:`case_group`).
    ``regrids``: each case also re-gridded to the site's scanner geometries, as
    :func:`model.bank_fit.fit_adapter_bank` does (recorded as ``meta["regrids"]``); ``total``: the number
    of signatures, for the progress bar (default: ``len(cases)`` without re-griddings).
    """
    from collections import Counter

    from model.bank_fit import bank_cases

    used: Counter[int] = Counter()
    items: Iterable[Any] = bank_cases(cases, regrids, used)
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="signatures", unit="signature",
                     total=total if total is not None or regrids is not None else len(cases))
    sigs, groups, modalities = bank_signatures(net, items, settings, device)
    m = dict(meta or {})
    if regrids is not None:
        m["regrids"] = regrids.record(used)
    return gate_from_signatures(sigs, groups, modalities, settings, weights_sha256, c, m)


def bank_signatures(net: nn.Module, cases: Iterable[Any], settings: InferenceSettings,
                    device: str | torch.device | None = None) -> tuple[list[np.ndarray], list[str], set[str]]:
    """The signature, the training image (:func:`case_group`) and the modality of each case, one case at a
    time (cases may be generated lazily)."""
    sigs, groups, modalities = [], [], set()
    for cs in cases:
        sigs.append(run_case(net, cs, settings, device).signature)
        groups.append(case_group(cs))
        modalities.add(str(cs.modality).upper())
    return sigs, groups, modalities


def gate_from_signatures(sigs: list[np.ndarray], groups: list[str], modalities: set[str],
                         settings: InferenceSettings, weights_sha256: str | None, c: float = 2.5,
                         meta: dict[str, Any] | None = None) -> SpectralGate:
    """The gate of :func:`fit_bank` from signatures already made (e.g. by several processes)."""
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


def _segmentation_metrics(p: np.ndarray, lab: np.ndarray, spacing: Any, band: int, bins: int,
                          pred: np.ndarray | None = None) -> dict[str, float]:
    """DSC, HD95, ASSD of ``pred`` (default ``p >= 0.5``) against ``lab``, and ECE, MCE of the
    probabilities ``p``."""
    if pred is None:
        pred = p >= 0.5
    metrics = {"dsc": dice(pred, lab), "hd95": hd95(pred, lab, spacing), "assd": assd(pred, lab, spacing)}
    metrics["ece"], metrics["mce"] = ece_mce(p, lab, band=band, bins=bins)
    return metrics


@dataclass
class _DatasetRun:
    """One dataset through the model and the gate, case by case."""

    rows: dict[str, list[float]] = field(  # segmentation metrics of the labelled cases
        default_factory=lambda: {"dsc": [], "hd95": [], "assd": [], "ece": [], "mce": []})
    per_label: dict[str, list[float]] = field(default_factory=dict)  # DSC of each of the model's labels
    matched_by: set[str] = field(default_factory=set)  # "name" / "value": how the labels were matched
    not_in_dataset: dict[str, None] = field(default_factory=dict)  # model labels no case's truth names
    not_in_model: dict[str, None] = field(default_factory=dict)  # truth labels the model lacks
    scores: list[float] = field(default_factory=list)  # OODM
    reasons: list[str | None] = field(default_factory=list)  # the gate's reason to hold each case (None: released)
    spacings: list[tuple[float, ...]] = field(default_factory=list)  # (z, y, x) mm of the labelled cases
    probs: list[np.ndarray] = field(default_factory=list)  # foreground maps, for the reliability diagram
    labels: list[np.ndarray] = field(default_factory=list)


def _run_dataset(predict: Predict, gate: SpectralGate, name: str, cases: Cases, band: int, bins: int,
                 keep_maps: bool, progress: bool, label_names: Mapping[int, str] | None = None) -> _DatasetRun:
    """Every case of ``cases`` through ``predict`` and the gate; ``keep_maps``: keep the foreground
    probabilities and labels of the labelled cases; ``label_names``: the model's labels (value -> name),
    each scored by its DSC where the model makes a label map."""
    run = _DatasetRun(per_label={n: [] for n in (label_names or {}).values()})
    for i, cs in enumerate(_progress(cases, progress, name)):
        try:
            r = predict(cs)
        except Exception as exc:  # re-raised, with the case it failed on
            exc.add_note(f"dataset {name!r}, case {getattr(cs, 'name', i)!r} ({cs.modality}, shape {cs.image.shape})")
            raise
        s, _held, why = gate.verdict(gate.observe(r), cs.modality)
        run.scores.append(s)
        run.reasons.append(why)
        lab = getattr(cs, "label", None)
        if lab is None:
            continue
        p = np.asarray(r.foreground, dtype=np.float32)
        run.spacings.append(tuple(float(v) for v in cs.spacing))
        pred = None if r.labels is None else np.asarray(r.labels) > 0
        for k, v in _segmentation_metrics(p, lab, cs.spacing, band, bins, pred).items():
            run.rows[k].append(v)
        if r.labels is not None and label_names:
            truth = getattr(cs, "label_map", None)
            truth = np.asarray(lab if truth is None else truth)
            match = match_labels(label_names, getattr(cs, "label_names", None))
            run.matched_by.add(match.by)
            run.not_in_dataset.update(dict.fromkeys(match.not_in_dataset))
            run.not_in_model.update(dict.fromkeys(match.not_in_model))
            for value, label in label_names.items():
                if value in match.truth_of:
                    run.per_label[label].append(dice(r.labels == value, truth == match.truth_of[value]))
        if keep_maps:
            run.probs.append(p)
            run.labels.append(np.asarray(lab, dtype=bool))
    return run


def _dataset_entry(run: _DatasetRun, n: int, is_ood: bool, tau: float, band: int) -> dict[str, Any]:
    """A dataset's line of the report: size, role, mean segmentation metrics, cases flagged.

    ``ece_band_mm``: the calibration band's half-width in millimetres, smallest and largest over the
    dataset's axes and cases (``band`` voxels on each case's own grid: 10 voxels are 16 mm across a
    1.6 mm MR pixel and 50 mm along a 5 mm CT slice, so ECEs of datasets on different grids are not
    measured over the same tissue)."""
    entry: dict[str, Any] = {"n": n, "in_distribution": not is_ood}
    if run.rows["dsc"]:
        entry.update({k: _r(_nanmean(v)) for k, v in run.rows.items()})
        entry["ece_band_mm"] = [_r(band * min(min(sp) for sp in run.spacings)),
                                _r(band * max(max(sp) for sp in run.spacings))]
        if run.per_label:
            entry["dsc_per_label"] = {k: _r(_nanmean(v)) for k, v in run.per_label.items() if v}
        if run.matched_by:
            entry["labels_matched_by"] = "/".join(sorted(run.matched_by))
        if run.not_in_dataset:
            entry["labels_not_in_dataset"] = list(run.not_in_dataset)
        if run.not_in_model:
            entry["dataset_labels_not_in_model"] = list(run.not_in_model)
    # what the worker does (OODM above tau, or a modality the bank never saw), and the OODM alone
    entry["flagged_ood"] = int(sum(why is not None for why in run.reasons))
    entry["oodm_above_tau"] = int(sum(s > tau for s in run.scores))
    if MODALITY_RULE in run.reasons:
        entry["held_for_modality"] = int(sum(why == MODALITY_RULE for why in run.reasons))
    return entry


def _decision_metrics(held_in: list[bool], held_out: list[bool]) -> dict[str, Any]:
    """Accuracy, sensitivity (OOD held), specificity (in-distribution released) of the gate's decisions."""
    tp, tn = sum(held_out), sum(not h for h in held_in)
    return {"accuracy": _r((tp + tn) / (len(held_in) + len(held_out))), "sensitivity": _r(tp / len(held_out)),
            "specificity": _r(tn / len(held_in)), "n_in": len(held_in), "n_out": len(held_out)}


def evaluate_cases(
    predict: Predict,
    gate: SpectralGate,
    datasets: Mapping[str, Cases],
    ood_datasets: Mapping[str, Cases] | None = None,
    inference: Mapping[str, Any] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    band: int = 10,
    bins: int = 10,
    progress: bool = False,
    label_names: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """Segmentation (DSC, HD95, ASSD, ECE, MCE: per-dataset means; DSC per label with ``label_names``)
    and OOD detection metrics of every case through ``predict`` and ``gate``.

    ``datasets`` are in distribution, ``ood_datasets`` are not. ``inference``: how the cases were run,
    reported as ``result["inference"]`` (with ``band`` and ``bins``).

    Two figures of the gate, kept apart: ``result["spectral"]`` is the spectral detector alone (accuracy,
    sensitivity, specificity at tau and the AUC, all from the OODM); ``result["decisions"]`` is what the
    worker does with each case (held when the OODM is above tau *or* the bank never saw its modality,
    :meth:`model.ood.SpectralGate.verdict`), with ``held_for_modality``, the OOD cases the modality rule
    alone held. A modality rule is no evidence of the signature's ranking, so it never enters the AUC.
    Per dataset, ``flagged_ood`` counts the gate's holds and ``oodm_above_tau`` the OODM's.

    With ``out_dir``, writes
    ``metrics.json``, ``oodm_histogram.png`` and one ``reliability_<dataset>.png`` per labelled dataset.
    Floats are rounded to 4 decimals; NaN/undefined values are ``None``.
    """
    ood_datasets = ood_datasets or {}
    seg: dict[str, Any] = {}
    oodm: dict[str, list[float]] = {}
    scores_in: list[float] = []
    scores_out: list[float] = []
    held_in: list[bool] = []
    held_out: list[bool] = []
    modality_only = 0  # OOD cases held by the modality rule with an OODM at or below tau
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for is_ood, group in ((False, datasets), (True, ood_datasets)):
        for name, cases in group.items():
            run = _run_dataset(predict, gate, name, cases, band, bins, out is not None, progress, label_names)
            oodm[name] = [_r(s) for s in run.scores]  # type: ignore[misc]
            (scores_out if is_ood else scores_in).extend(run.scores)
            (held_out if is_ood else held_in).extend(why is not None for why in run.reasons)
            if is_ood:
                modality_only += sum(why == MODALITY_RULE for why in run.reasons)
            seg[name] = _dataset_entry(run, len(cases), is_ood, gate.tau, band)
            if out is not None and run.probs:
                reliability_diagram(run.probs, run.labels, out / f"reliability_{name}.png", band=band, bins=bins,
                                    title=name)
    result: dict[str, Any] = {
        "inference": {**(inference or {}), "band": band, "bins": bins},
        "gate": {"tau": _r(gate.tau), "c": gate.c, "bank_size": int(gate.bank.shape[0])},
        "datasets": seg,
        "oodm": oodm,
    }
    if scores_in and scores_out:
        result["spectral"] = {k: _r(v) for k, v in ood_detection_metrics(scores_in, scores_out, gate.tau).items()}
        result["spectral"].update({"n_in": len(scores_in), "n_out": len(scores_out)})
        result["decisions"] = {**_decision_metrics(held_in, held_out), "held_for_modality": modality_only}
    if out is not None:
        oodm_histogram({k: v for k, v in oodm.items() if k in datasets},
                       {k: v for k, v in oodm.items() if k in ood_datasets}, gate.tau, out / "oodm_histogram.png")
        atomic_write(out / "metrics.json", json.dumps(result, indent=2, sort_keys=True).encode())
    return result


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
    """:func:`evaluate_cases` of a bare SegNet (:func:`segnet_predict`).

    ``settings``: the inference path (default: the one the gate's bank was fitted through; refused when
    the bank was fitted through another).
    """
    settings = _resolve_settings(gate, settings)
    inference = {"block": settings.block, "overlap": settings.overlap, "spacing": settings.record()["spacing"]}
    return evaluate_cases(segnet_predict(net, settings, device), gate, datasets, ood_datasets, inference,
                          out_dir, band, bins, progress)


def evaluate_adapter(
    adapter: ModelAdapter,
    gate: SpectralGate,
    datasets: Mapping[str, Cases],
    ood_datasets: Mapping[str, Cases] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    band: int = 10,
    bins: int = 10,
    progress: bool = False,
) -> dict[str, Any]:
    """:func:`evaluate_cases` of any model through its adapter (:func:`adapter_predict`), with the DSC of
    each of its labels by name. ``gate``: the model's own bank; refused
    (:class:`model.ood.BankMismatchError`) when it was fitted through other signature settings."""
    gate.check_inference(adapter.signature_settings(), "this evaluation")
    inference = {"model": {k: v for k, v in adapter.record().items() if k in ("format", "name", "version", "layer")},
                 "signature": adapter.signature_settings()}
    return evaluate_cases(adapter_predict(adapter), gate, datasets, ood_datasets, inference, out_dir, band, bins,
                          progress, label_names={lab.value: lab.name for lab in adapter.labels})


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
        f"{'ECEbandmm':>9} {'OOD':>5}  OODM/tau",
    ]
    # in-distribution datasets first, each role in the order given (a metrics.json read back is sorted by name)
    for name, d in sorted(m["datasets"].items(), key=lambda item: not item[1]["in_distribution"]):
        scores = [v for v in m["oodm"].get(name, []) if v is not None]
        spread = f"{min(scores) / g['tau']:.2f}-{max(scores) / g['tau']:.2f}" if scores and g["tau"] else "-"
        bmm = d.get("ece_band_mm")
        band_mm = f"{bmm[0]:.1f}-{bmm[1]:.1f}" if bmm else "-"
        lines.append(
            f"{name:<{width}} {'in' if d['in_distribution'] else 'OOD':<4} {d['n']:>3} {_f(d.get('dsc')):>6} "
            f"{_f(d.get('hd95'), 2):>7} {_f(d.get('assd'), 2):>7} {_f(d.get('ece')):>6} {_f(d.get('mce')):>6} "
            f"{band_mm:>9} {d['flagged_ood']:>2}/{d['n']:<2} {spread}"
        )
        if d.get("dsc_per_label"):
            by = {"name": "labels matched by name", "value": "labels matched by value: the dataset names none",
                  "value-one-label": "one label each, named differently: matched by value"}.get(
                d.get("labels_matched_by", ""), f"labels matched by {d.get('labels_matched_by')}")
            lines.append(f"{'':<{width}}   DSC per label: "
                         + ", ".join(f"{k}={_f(v)}" for k, v in d["dsc_per_label"].items()) + f" ({by})")
        if d.get("labels_not_in_dataset"):
            lines.append(f"{'':<{width}}   not in the dataset (no DSC): {', '.join(d['labels_not_in_dataset'])}")
        if d.get("dataset_labels_not_in_model"):
            lines.append(f"{'':<{width}}   the dataset's labels the model lacks: "
                         f"{', '.join(d['dataset_labels_not_in_model'])}")
    lines.append(f"gate: tau={_f(g['tau'], 4)} (c={g['c']}, bank of {g['bank_size']})")
    if "spectral" in m:
        o = m["spectral"]
        lines.append(
            f"spectral OOD detection (OODM alone): accuracy={_f(o['accuracy'])} sensitivity={_f(o['sensitivity'])} "
            f"specificity={_f(o['specificity'])} AUC={_f(o['auc'])} (in={o['n_in']}, OOD={o['n_out']})"
        )
    if "decisions" in m:
        o = m["decisions"]
        lines.append(
            f"gate decisions (OODM > tau or modality not in the bank): accuracy={_f(o['accuracy'])} "
            f"sensitivity={_f(o['sensitivity'])} specificity={_f(o['specificity'])} "
            f"(held for the modality alone: {o['held_for_modality']} of {o['n_out']} OOD)"
        )
    return "\n".join(lines)
