"""Tables V-VI of Karimi & Gholipour (2023): OOD detection by the spectral gate against the paper's
baselines, OODM histograms with tau, and the layer study (section IV, last paragraphs).

The protocol, on the phantoms (:mod:`model.data`), with the named index ranges of :mod:`model.data.splits`:

- **Training**: one multi-task model on the training kinds (:data:`model.data.phantoms.TRAINING_KINDS`),
  the first ``train_cases`` TRAIN-range cases of each (seed :data:`model.data.splits.SEED`). Besides it,
  as :mod:`model.baselines` needs: the same model with dropout 0.1 (UNC-Dropout), ``ensemble`` members
  (UNC-Ensemble: seeds 0 ... M-1, member 0 *is* the base model, trained once) and an Outlier Exposure
  model (``TrainConfig.outlier_weight``) whose outliers are TRAIN-range cases of the unseen kinds (the
  paper: "the other datasets"; so OE has seen *other images* of two of the OOD kinds, and none of the
  near-OOD kinds, the MNI MR or the shifts: the per-set table shows where that matters). Every model gets
  the same step budget.
- **Fitting**: the spectral bank through the production path (:func:`model.evaluate.fit_bank`, leave-one-
  out tau) and every baseline (:func:`model.baselines.fit_baseline`, tau by Eq. (2) over its training
  scores) on the same training studies, ``c`` = 2.5. Nothing is tuned: every hyperparameter is the
  published one (or the scale's reduction of it, listed in the report), so no validation case is used.
- **Test** (TEST range only): in-distribution = test cases of the training kinds; OOD = the unseen kinds
  (``mr_hippocampus``, ``pt_tumour``), the near-OOD kinds, MNI152 subjects (:func:`model.data.mni.mni_case`,
  a real MR) and shifted training-kind cases (:mod:`model.data.shifts`). Every study is scored by every
  method through :func:`model.baselines.observe_study` (the production grid, intensities and body crop),
  timed per study (preparation, the method's passes and its score).
- **Metrics** per method, all OOD sets pooled against the in-distribution test studies: accuracy,
  sensitivity (OOD flagged), specificity (in-distribution passed) at the method's tau, and AUC, each with
  a 95 % percentile bootstrap interval (studies resampled within the in-distribution and OOD groups,
  ``n_boot`` resamples, seed 0); per OOD set: AUC and the share flagged. The spectral gate's decision is
  OODM > tau alone (its modality rule, which holds an unseen modality whatever its OODM, is not counted).
- **Layer study**: the spectral signature of every encoder and decoder stage of the base model at its own
  resolution (:mod:`model.layer_signatures`), a bank per stage on the training studies (leave-one-out
  tau), the same test studies; accuracy, sensitivity, specificity and AUC per stage.
- **Histograms**: per method, the scores of the in-distribution test studies and of each OOD set with
  tau marked (as the paper's Figures 2, 7 and 8), ``oodm_<method>.png``, drawn from the JSON.

Scales (:data:`SCALES`): ``tiny`` for tests, ``cpu`` for a 2-core machine, ``gpu`` as close to the paper
as the phantoms allow; each lists what it reduces.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model._atomic import atomic_write
from model.baselines import fit_baseline, observe_study
from model.data.mni import mni_case
from model.data.phantoms import NEAR_OOD_KINDS, TRAINING_KINDS, UNSEEN_KINDS, PhantomCase, phantom_case
from model.data.shifts import shifted_case
from model.data.splits import SEED, TEST, TRAIN
from model.evaluate import fit_bank
from model.experiments.report import (
    bootstrap_ci,
    fmt,
    markdown_table,
    read_json,
    reduced_and_machine,
    write_report,
)
from model.layer_signatures import layer_names, layer_signatures, stage_strides
from model.ood import OODScorer, SpectralGate
from model.scores import ood_detection_metrics, roc_auc
from model.study_inference import InferenceSettings, prepare_study
from model.train import TrainConfig, TrainData, train
from model.unet import load_weights, save_weights

__all__ = ["GROUPS", "LABELS", "METHODS", "NAME", "SCALES", "Scale", "auc_ci", "plot_histograms", "render",
           "rerender", "run"]

NAME = "ood"
#: the methods in the order of the paper's tables (the spectral gate first)
METHODS = ("spectral", "mc_dropout", "ensemble", "outlier_exposure", "odin", "mahalanobis", "dknn",
           "max_softmax", "entropy")
LABELS = {"spectral": "Proposed (spectral)", "mc_dropout": "UNC-Dropout", "ensemble": "UNC-Ensemble",
          "outlier_exposure": "Outlier exposure", "odin": "ODIN", "mahalanobis": "Mah-Dist", "dknn": "DkNN",
          "max_softmax": "MSP", "entropy": "Entropy"}
#: the OOD sets, in the report's order
GROUPS = ("unseen", "near", "mni152", "shift")
METRICS = ("accuracy", "sensitivity", "specificity", "auc")
DECIMALS = 2  # as the paper's tables
#: the paper's Table V (in-distribution: eight datasets; OOD: Pancreas, Hippocampus, Spleen), for the
#: comparison column; None where the method is not in that table
PAPER_TABLE_V: dict[str, tuple[float, float, float, float] | None] = {
    "spectral": (1.00, 0.98, 1.00, 0.98), "mc_dropout": (0.55, 0.48, 0.63, 0.62),
    "dknn": (0.76, 0.67, 0.82, 0.79), "ensemble": (0.84, 0.87, 0.71, 0.82),
    "outlier_exposure": (0.83, 0.80, 0.86, 0.80), "odin": (0.70, 0.61, 0.68, 0.67),
    "mahalanobis": (0.74, 0.66, 0.80, 0.77), "max_softmax": None, "entropy": None}


@dataclass(frozen=True)
class Scale:
    """One configuration of the experiment (see :data:`SCALES`)."""

    name: str
    train_cases: int  # TRAIN-range cases per training kind (the training set and every bank)
    outlier_cases: int  # TRAIN-range cases per unseen kind: Outlier Exposure's outliers
    test_in: int  # TEST-range cases per training kind
    test_unseen: int  # per unseen kind
    test_near: int  # per near-OOD kind
    test_mni: int  # MNI152 subjects
    mni_spacing: float  # mm, isotropic
    shifts: tuple[tuple[str, float], ...]  # (shift, strength), applied to ``shift_cases`` cases of each training kind
    shift_cases: int
    seed: int
    iterations: int
    eval_every: int
    block: int
    lr: float
    base_features: int
    levels: int
    inference_block: int
    inference_overlap: int
    ensemble: int = 5
    mc_masks: int = 10
    dropout: float = 0.1
    outlier_weight: float = 0.5
    c: float = 2.5
    dknn_k: int = 75
    dknn_train_blocks: int = 100
    dknn_test_blocks: int = 10
    n_boot: int = 2000
    #: mm, isotropic, the grid every modality runs on in inference (None: each study's own grid, as trained)
    inference_spacing: float | None = None
    reduced: tuple[str, ...] = ()

    def train_config(self, seed: int, **changes: Any) -> TrainConfig:
        cfg = TrainConfig(block=self.block, batch_size=1, lr=self.lr, eval_every=self.eval_every, patience=10**9,
                          max_iterations=self.iterations, seed=seed, folds=1, base_features=self.base_features,
                          levels=self.levels)
        return replace(cfg, **changes)

    def params(self, method: str) -> dict[str, Any]:
        """The scorer's hyperparameters at this scale (the published ones unless :attr:`reduced` says)."""
        return {"mc_dropout": {"n_masks": self.mc_masks}, "ensemble": {"members": self.ensemble},
                "dknn": {"k": self.dknn_k, "train_blocks": self.dknn_train_blocks,
                         "test_blocks": self.dknn_test_blocks}}.get(method, {})

    def record(self) -> dict[str, Any]:
        d = asdict(self)
        d["shifts"] = [list(s) for s in self.shifts]
        return d


_PAPER = ("data: three phantom kinds in distribution (CT liver, CT lungs, MR prostate), against the paper's "
          "eight clinical datasets; OOD: two unseen phantom kinds, three near-OOD kinds, MNI152 MR subjects "
          "and shifted training-kind studies, against the paper's Pancreas, Hippocampus and Spleen")
_SHIFTS_CPU = (("blur", 1.5), ("thick", 8.0), ("noise", 0.5), ("gamma", 2.0), ("bias", 1.0), ("invert", 1.0),
               ("ghost", 0.35))
SCALES: dict[str, Scale] = {s.name: s for s in (
    Scale("tiny", train_cases=3, outlier_cases=1, test_in=1, test_unseen=1, test_near=1, test_mni=1,
          mni_spacing=4.0, shifts=(("invert", 1.0),), shift_cases=1, seed=0, iterations=4,
          eval_every=2, block=16, lr=1e-3, base_features=4, levels=2, inference_block=32, inference_overlap=8,
          ensemble=2, mc_masks=2, dknn_k=5, dknn_train_blocks=3, dknn_test_blocks=2, n_boot=200,
          inference_spacing=8.0,
          reduced=("for tests only: 3 training cases per kind, 1 test case per set, 4 iterations, 4 features, "
                   "2 levels, inference on an 8 mm grid, an ensemble of 2, 2 dropout masks, DkNN k 5 on 3 "
                   "blocks; its numbers mean nothing",)),
    Scale("cpu", train_cases=8, outlier_cases=4, test_in=6, test_unseen=4, test_near=3, test_mni=4,
          mni_spacing=3.0, shifts=_SHIFTS_CPU, shift_cases=1, seed=0, iterations=1200, eval_every=300, block=24,
          lr=2e-3, base_features=4, levels=3, inference_block=32, inference_overlap=8, ensemble=3,
          dknn_k=25, dknn_train_blocks=20, n_boot=2000,
          reduced=(_PAPER,
                   "cases: 8 training cases per kind (the bank holds 24 signatures); test: 6 per training kind "
                   "(18 in distribution), 4 per unseen kind, 3 per near-OOD kind, 4 MNI subjects at 3 mm, one "
                   "case per training kind under each of 7 shifts at a strong setting (21): 63 OOD studies",
                   "network: 4 features in the first stage (paper: 14), 3 levels (paper: 4)",
                   "blocks: 24^3 in training, 32^3 with 8 voxels of overlap in inference (paper: 96^3, 24)",
                   "iterations: 1200 per model at lr 2e-3 (paper: until the loss stops improving, lr 1e-4)",
                   "UNC-Ensemble: 3 members (paper: 50; model.baselines: 5); each member is a full training run",
                   "DkNN: k 25 over 20 augmented blocks per training image (Papernot: k 75; paper: 100 blocks)",
                   "one torch thread")),
    Scale("gpu", train_cases=24, outlier_cases=8, test_in=15, test_unseen=10, test_near=8, test_mni=8,
          mni_spacing=1.5, shifts=_SHIFTS_CPU + (("blur", 1.0), ("thick", 6.0), ("noise", 0.25)), shift_cases=3,
          seed=0, iterations=4000, eval_every=500, block=64, lr=3e-4, base_features=14, levels=4,
          inference_block=96, inference_overlap=24, ensemble=5,
          reduced=(_PAPER,
                   "cases: 24 training cases per kind; test: 15 per training kind, 10 per unseen kind, 8 per "
                   "near-OOD kind, 8 MNI subjects at 1.5 mm, 3 cases per training kind under each of 10 shifts",
                   "training blocks: 64^3 (the phantoms are 28-56 voxels deep); inference 96^3, overlap 24",
                   "iterations: 4000 per model at lr 3e-4 (paper: until the loss stops improving, lr 1e-4)",
                   "UNC-Ensemble: 5 members (paper: 50; see model.baselines.EnsembleScorer)")),
)}


# ----------------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class _Study:
    """A test study and where it belongs: ``group`` is ``in`` or one of :data:`GROUPS`."""

    case: PhantomCase
    group: str
    name: str


def _training_cases(scale: Scale) -> dict[str, list[PhantomCase]]:
    return {k: [phantom_case(k, SEED, i) for i in TRAIN.indices(scale.train_cases)] for k in TRAINING_KINDS}


def _test_studies(scale: Scale) -> list[_Study]:
    out = [_Study(phantom_case(k, SEED, i), "in", f"{k}_{i}") for k in TRAINING_KINDS
           for i in TEST.indices(scale.test_in)]
    out += [_Study(phantom_case(k, SEED, i), "unseen", f"{k}_{i}") for k in UNSEEN_KINDS
            for i in TEST.indices(scale.test_unseen)]
    out += [_Study(phantom_case(k, SEED, i), "near", f"{k}_{i}") for k in NEAR_OOD_KINDS
            for i in TEST.indices(scale.test_near)]
    sp = (scale.mni_spacing,) * 3
    out += [_Study(mni_case(SEED, i, sp), "mni152", f"mr_mni152_{i}") for i in TEST.indices(scale.test_mni)]
    # shifted cases come from their own part of the TEST range (offset 1000), apart from the clean ones
    for shift, strength in scale.shifts:
        for k in TRAINING_KINDS:
            for i in TEST.indices(scale.shift_cases, offset=1000):
                c = shifted_case(k, SEED, i, shift, strength)
                out.append(_Study(c, "shift", f"{c.kind}_{i}"))
    return out


# ----------------------------------------------------------------------------------------------------
# models


@dataclass
class _Model:
    net: nn.Module
    settings: InferenceSettings
    sha256: str
    info: dict[str, Any]


def _train_one(role: str, datasets: dict[str, list[PhantomCase]], cfg: TrainConfig, scale: Scale, folder: Path,
               device: str, outliers: dict[str, list[PhantomCase]] | None = None) -> _Model:
    t0 = time.monotonic()
    out = None if outliers is None else TrainData.from_cases(outliers, block=cfg.block, device=device)
    res = train(TrainData.from_cases(datasets, block=cfg.block, device=device), folder, cfg, device=device,
                progress=False, outliers=out)
    net, meta = load_weights(res.weights, device)
    sp = scale.inference_spacing
    meta.update({"inference_block": scale.inference_block, "inference_overlap": scale.inference_overlap,
                 # trained on each image's own grid: inference at native resolution, unless the scale says
                 "inference_spacing": {} if sp is None else {m: [sp] * 3 for m in ("CT", "MR", "PT")}})
    sha = save_weights(net, res.weights, meta)
    net, meta = load_weights(res.weights, device)
    info = {"model": role, "seed": cfg.seed, "dropout": cfg.dropout, "outlier_weight": cfg.outlier_weight,
            "iterations": res.iterations, "best_loss": res.best_loss, "seconds": round(time.monotonic() - t0, 2)}
    return _Model(net, InferenceSettings.for_weights(meta, device=device), sha, info)


def _train_models(scale: Scale, cases: dict[str, list[PhantomCase]], folder: Path, device: str,
                  log: Callable[[str], None] | None, tick: Callable[[str], None]) -> dict[str, list[_Model]]:
    """``{"base": [m], "dropout": [m], "ensemble": [m0 = base, m1, ...], "oe": [m]}``."""
    outliers = {k: [phantom_case(k, SEED, i) for i in TRAIN.indices(scale.outlier_cases)] for k in UNSEEN_KINDS}
    plan: list[tuple[str, TrainConfig, dict[str, list[PhantomCase]] | None]] = [
        ("base", scale.train_config(scale.seed), None),
        ("dropout", scale.train_config(scale.seed, dropout=scale.dropout), None)]
    plan += [(f"ensemble_{m}", scale.train_config(scale.seed + m), None) for m in range(1, scale.ensemble)]
    plan.append(("oe", scale.train_config(scale.seed, outlier_weight=scale.outlier_weight), outliers))
    trained: dict[str, _Model] = {}
    for role, cfg, out in plan:
        tick(f"train {role}")
        trained[role] = _train_one(role, cases, cfg, scale, folder / role, device, out)
        if log is not None:
            i = trained[role].info
            log(f"{role}: {i['iterations']} iterations in {i['seconds']} s, best training loss {i['best_loss']:.3f}")
    return {"base": [trained["base"]], "dropout": [trained["dropout"]], "oe": [trained["oe"]],
            "ensemble": [trained["base"]] + [trained[f"ensemble_{m}"] for m in range(1, scale.ensemble)]}


_NETS_OF = {"mc_dropout": "dropout", "ensemble": "ensemble", "outlier_exposure": "oe"}


# ----------------------------------------------------------------------------------------------------
# statistics


def auc_ci(s_in: Sequence[float], s_out: Sequence[float], *, n_boot: int = 2000, level: float = 0.95,
           seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC (:func:`model.scores.roc_auc`), the in-distribution and
    OOD scores resampled apart (each group keeps its size), ``numpy.random.default_rng(seed)``.

    >>> auc_ci([0.1, 0.2, 0.3], [0.7, 0.8])
    (1.0, 1.0)
    """
    a, b = np.asarray(s_in, np.float64), np.asarray(s_out, np.float64)
    rng = np.random.default_rng(seed)
    vals = [roc_auc(a[rng.integers(0, a.size, a.size)], b[rng.integers(0, b.size, b.size)]) for _ in range(n_boot)]
    lo, hi = np.quantile(vals, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _detection(s_in: Sequence[float], s_out: Sequence[float], tau: float, n_boot: int) -> dict[str, Any]:
    """Accuracy, sensitivity, specificity at ``tau`` and AUC, each with its 95 % bootstrap interval."""
    m = ood_detection_metrics(s_in, s_out, tau)
    flagged_out = (np.asarray(s_out) > tau).astype(float)
    passed_in = (np.asarray(s_in) <= tau).astype(float)
    out: dict[str, Any] = {k: {"value": v} for k, v in m.items()}
    out["accuracy"]["ci95"] = list(bootstrap_ci(np.concatenate([flagged_out, passed_in]), n_boot=n_boot))
    out["sensitivity"]["ci95"] = list(bootstrap_ci(flagged_out, n_boot=n_boot))
    out["specificity"]["ci95"] = list(bootstrap_ci(passed_in, n_boot=n_boot))
    out["auc"]["ci95"] = list(auc_ci(s_in, s_out, n_boot=n_boot))
    out["n_in"], out["n_out"] = len(s_in), len(s_out)
    return out


# ----------------------------------------------------------------------------------------------------
# running


def _fit_all(scale: Scale, models: dict[str, list[_Model]], cases: dict[str, list[PhantomCase]], device: str,
             tick: Callable[[str], None]) -> tuple[dict[str, OODScorer], dict[str, Any]]:
    flat: list[Any] = [c for k in TRAINING_KINDS for c in cases[k]]
    labels = [c.kind for c in flat]
    base = models["base"][0]
    fitted: dict[str, OODScorer] = {}
    info: dict[str, Any] = {}
    for method in METHODS:
        tick(f"fit {method}")
        t0 = time.monotonic()
        role = _NETS_OF.get(method, "base")
        nets = [m.net for m in models[role]]
        settings = models[role][0].settings
        if method == "spectral":
            fitted[method] = fit_bank(base.net, flat, base.sha256, settings, c=scale.c, device=device)
        else:
            fitted[method] = fit_baseline(method, nets, flat, settings, c=scale.c, device=device,
                                          labels=labels if method == "dknn" else None, **scale.params(method))
        info[method] = {"tau": fitted[method].tau, "networks": role, "n_networks": len(nets),
                        "params": scale.params(method), "fit_seconds": round(time.monotonic() - t0, 2)}
    return fitted, info


def _score_study(fitted: dict[str, OODScorer], models: dict[str, list[_Model]], study: _Study,
                 device: str) -> dict[str, Any]:
    c = study.case
    row: dict[str, Any] = {"name": study.name, "group": study.group, "kind": c.kind, "index": c.index,
                           "modality": c.modality, "shape": list(c.image.shape), "spacing": list(c.spacing),
                           "scores": {}, "seconds": {}}
    for method in METHODS:
        role = _NETS_OF.get(method, "base")
        nets = [m.net for m in models[role]]
        t0 = time.perf_counter()
        obs = observe_study(fitted[method], nets, c.image, c.spacing, c.modality, models[role][0].settings,
                            device=device)
        row["scores"][method] = float(fitted[method].score(obs))
        row["seconds"][method] = time.perf_counter() - t0
    return row


def _layer_rows(models: dict[str, list[_Model]], studies: Sequence[PhantomCase], device: str) -> list[dict[str, list[float]]]:
    base = models["base"][0]
    out = []
    for c in studies:
        prep = prepare_study(c.image, c.spacing, c.modality, base.settings)
        sig = layer_signatures(base.net, prep, base.settings, device)
        out.append({k: v.tolist() for k, v in sig.items()})
    return out


def _layer_study(net: nn.Module, train_sigs: list[dict[str, list[float]]], test_sigs: list[dict[str, list[float]]],
                 groups: list[str], c: float, n_boot: int, production: str) -> list[dict[str, Any]]:
    strides = stage_strides(net)
    widths = {name: len(train_sigs[0][name]) for name in layer_names(net)}
    rows = []
    names = layer_names(net)
    for name in names:
        gate = SpectralGate.fit(np.array([s[name] for s in train_sigs]), c=c)
        sc = np.array([gate.score(np.array(s[name])) for s in test_sigs])
        is_in = np.array([g == "in" for g in groups])
        det = _detection(sc[is_in].tolist(), sc[~is_in].tolist(), gate.tau, n_boot)
        rows.append({"layer": name, "channels": widths[name], "stride": strides[name], "tau": gate.tau,
                     "production": name == production, "scores": sc.tolist(), **det})
    return rows


def _machine(device: str, load0: tuple[float, float, float]) -> dict[str, Any]:
    return {"device": device,
            "device_name": torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda")
            else platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average_start": [round(v, 2) for v in load0],
            "load_average_end": [round(v, 2) for v in os.getloadavg()]}


def run(scale: Scale, out: str | os.PathLike[str], *, seeds: Sequence[int] | None = None, device: str = "cpu",
        progress: bool = True, workdir: str | os.PathLike[str] | None = None,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the experiment at ``scale``; write ``out/ood.json``, ``out/ood.md`` and ``out/oodm_<method>.png``.
    ``seeds``: one seed, the base model's (ensemble member ``m`` is trained with ``seed + m``). Trained
    weights live in a temporary folder (under ``workdir``) and are removed. Returns the JSON data."""
    if seeds is not None:
        if len(seeds) != 1:
            raise ValueError(f"the ood experiment trains one model set: give one seed, got {list(seeds)}")
        scale = replace(scale, seed=int(seeds[0]))
    t0, load0 = time.monotonic(), os.getloadavg()
    cases = _training_cases(scale)
    studies = _test_studies(scale)
    n_train = sum(len(v) for v in cases.values())
    total = (3 + scale.ensemble) + len(METHODS) + 2 * (n_train + len(studies))
    bar: Any = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="ood", unit="step")

    def tick(what: str) -> None:
        if bar is not None:
            bar.set_postfix_str(what)
            bar.update(1)

    with tempfile.TemporaryDirectory(prefix="specgate-ood-", dir=workdir) as tmp:
        models = _train_models(scale, cases, Path(tmp), device, log, tick)
        fitted, fits = _fit_all(scale, models, cases, device, tick)
        rows = []
        for st in studies:
            tick(f"score {st.name}")
            rows.append(_score_study(fitted, models, st, device))
        flat = [c for k in TRAINING_KINDS for c in cases[k]]
        train_sigs = _layer_rows(models, flat, device)
        for _ in flat:
            tick("layer signatures")
        test_sigs = _layer_rows(models, [s.case for s in studies], device)
        for _ in studies:
            tick("layer signatures")
        base_net = models["base"][0].net
        runs = [m.info for role in ("base", "dropout", "oe") for m in models[role]]
        runs += [m.info for m in models["ensemble"][1:]]
        inference = models["base"][0].settings.record()
        groups = [r["group"] for r in rows]
        layers = _layer_study(base_net, train_sigs, test_sigs, groups, scale.c, scale.n_boot,
                              models["base"][0].settings.signature_layer)
    if bar is not None:
        bar.close()
    summary = {}
    for method in METHODS:
        s_in = [r["scores"][method] for r in rows if r["group"] == "in"]
        s_out = [r["scores"][method] for r in rows if r["group"] != "in"]
        tau = fits[method]["tau"]
        entry = _detection(s_in, s_out, tau, scale.n_boot)
        entry["per_group"] = {}
        for g in GROUPS:
            s_g = [r["scores"][method] for r in rows if r["group"] == g]
            if s_g:  # Table VI's form for each OOD set alone: accuracy, sensitivity, specificity, AUC
                entry["per_group"][g] = {"n": len(s_g), "flagged": float(np.mean(np.asarray(s_g) > tau)),
                                         **_detection(s_in, s_g, tau, scale.n_boot)}
        entry["seconds_per_study"] = float(np.mean([r["seconds"][method] for r in rows]))
        summary[method] = entry
    data = {
        "experiment": NAME,
        "paper": "Karimi & Gholipour 2023, Tables V-VI: OOD detection of the spectral gate against baselines",
        "scale": scale.record(),
        "phantom_seed": SEED,
        "training": {k: [c.index for c in v] for k, v in cases.items()},
        "outliers": {k: TRAIN.indices(scale.outlier_cases) for k in UNSEEN_KINDS},
        "inference": inference,
        "decimals": DECIMALS,
        "methods": list(METHODS),
        "fits": fits,
        "summary": summary,
        "layers": layers,
        "paper_table_v": PAPER_TABLE_V,
        "runs": runs,
        "rows": rows,
        "machine": _machine(device, load0),
        "wall_s": round(time.monotonic() - t0, 1),
    }
    write_report(out, NAME, data, render)
    _plots(read_json(Path(out) / f"{NAME}.json"), Path(out))
    return data


# ----------------------------------------------------------------------------------------------------
# the report


def _cell(entry: dict[str, Any], dec: int) -> str:
    """``value [lo, hi]`` of a metric's entry."""
    lo, hi = entry["ci95"]
    return f"{fmt(entry['value'], dec)} [{fmt(lo, dec)}, {fmt(hi, dec)}]"


def _group_label(g: str) -> str:
    return {"unseen": "unseen kinds", "near": "near-OOD kinds", "mni152": "MNI152 MR", "shift": "shifted"}[g]


def render(data: dict[str, Any]) -> str:
    """The Markdown report, from the JSON data alone."""
    sc, dec, summ, fits = data["scale"], data["decimals"], data["summary"], data["fits"]
    methods = data["methods"]
    rows = data["rows"]
    n_in = sum(1 for r in rows if r["group"] == "in")
    counts = {g: sum(1 for r in rows if r["group"] == g) for g in GROUPS}
    lines = [f"# OOD detection: the spectral gate against the baselines (paper Tables V-VI), scale `{sc['name']}`",
             ""]
    lines.append(
        f"Phantom seed {data['phantom_seed']}; training: {sc['train_cases']} TRAIN-range cases of each of "
        f"{', '.join(data['training'])}; base seed {sc['seed']}, every model {sc['iterations']} iterations. "
        f"Test (TEST range): {n_in} in-distribution studies against "
        + ", ".join(f"{counts[g]} studies of {_group_label(g)}" for g in GROUPS)
        + f" ({sum(counts.values())} OOD). Every threshold by Eq. (2) at C = {sc['c']} on the training studies; "
        "nothing tuned. Intervals: 95 % bootstrap.")
    lines.append("")
    lines.append(f"Command: `specgate model experiment ood --scale {sc['name']} --seeds {sc['seed']} "
                 f"--device {data['machine']['device']} --out DIR`.")
    lines.append("")
    headers = ["Method", "accuracy", "sensitivity", "specificity", "AUC", "tau", "s/study", "paper (Table V)"]
    table = []
    for m in methods:
        e = summ[m]
        paper = data["paper_table_v"].get(m)
        table.append([LABELS[m]] + [_cell(e[k], dec) for k in METRICS]
                     + [f"{fits[m]['tau']:.4g}", fmt(e["seconds_per_study"], 2),
                        "-" if paper is None else " / ".join(f"{v:.2f}" for v in paper)])
    lines.append(markdown_table(headers, table))
    lines.append("Paper column: its Table V (accuracy / sensitivity / specificity / AUC; eight clinical datasets "
                 "in distribution, Pancreas, Hippocampus and Spleen OOD), for comparison only: other data.")
    lines.append("")
    lines.append("Per OOD set: AUC against the in-distribution test studies, and the share flagged at tau:")
    lines.append("")
    present = [g for g in GROUPS if counts[g]]
    table = []
    for m in methods:
        pg = summ[m]["per_group"]
        table.append([LABELS[m]] + [f"{fmt(pg[g]['auc']['value'], dec)} ({fmt(pg[g]['flagged'], dec)})"
                                    for g in present])
    lines.append(markdown_table(["Method"] + [f"{_group_label(g)} (n={counts[g]})" for g in present], table))
    if counts["near"]:
        lines.append("### Near-OOD alone (the question of the paper's Table VI)")
        lines.append("")
        lines.append("The paper's Table VI asks whether a model trained on one cortical-plate age group flags the "
                     "other age groups: OOD that is close to the training data. Ours: the near-OOD kinds alone "
                     f"({', '.join(sorted({r['kind'] for r in rows if r['group'] == 'near'}))}: a training organ in "
                     "another contrast or at a child's size, a CT of another body region) against the same "
                     "in-distribution test studies, with the same models (not a model trained on one kind).")
        lines.append("")
        table = []
        for m in methods:
            e = summ[m]["per_group"]["near"]
            table.append([LABELS[m]] + [_cell(e[k], dec) for k in METRICS])
        lines.append(markdown_table(["Method (near-OOD)", "accuracy", "sensitivity", "specificity", "AUC"], table))
    lines.append("Networks: UNC-Dropout a model trained with dropout "
                 f"{sc['dropout']} ({sc['mc_masks']} masks); UNC-Ensemble {sc['ensemble']} models (seeds "
                 f"{sc['seed']}-{sc['seed'] + sc['ensemble'] - 1}; the first is the base model); Outlier exposure a "
                 f"model trained with outlier_weight {sc['outlier_weight']} on outlier blocks of "
                 + ", ".join(f"{k} (TRAIN indices {v[0]}-{v[-1]})" for k, v in data["outliers"].items())
                 + ": it has seen other images of the unseen kinds. The spectral gate's figures are OODM > tau "
                 "alone; its modality rule (which holds an unseen modality whatever its OODM) is not counted.")
    lines.append("")
    lines.append("## Layer study")
    lines.append("")
    lines.append("The spectral signature of each stage of the base model, at the stage's resolution "
                 "(`model.layer_signatures`), a bank per stage on the same training studies, the same test "
                 "studies. The production signature's stage is marked (the cpu outputs in docs/evidence/ood were "
                 "computed before bank version 3, with the last decoder stage's mean spectrum over the body).")
    lines.append("")
    table = []
    for r in data["layers"]:
        table.append([r["layer"] + (" (production)" if r["production"] else ""), str(r["channels"]),
                      str(r["stride"])] + [_cell(r[k], dec) for k in METRICS])
    lines.append(markdown_table(["Stage", "channels", "stride", "accuracy", "sensitivity", "specificity", "AUC"],
                                table))
    lines.append("Paper (section IV, Table V's experiment): accuracy / sensitivity / specificity 0.92 / 0.89 / 0.92 "
                 "on the 2nd deepest map, 0.90 / 0.88 / 0.91 on the 3rd, 0.84 / 0.83 / 0.86 on the coarsest "
                 "(the last encoder map), against 1.00 / 0.98 / 1.00 on the last.")
    lines.append("")
    lines.append("Histograms (in-distribution test studies and each OOD set, tau marked): "
                 + ", ".join(f"`oodm_{m}.png`" for m in methods) + ".")
    lines.append("")
    lines += reduced_and_machine(data, " Time per study: preparation (grid, intensities, body crop), the method's "
                                 "passes and its score, averaged over the test studies.",
                                 "times are longer than the same run alone would take.")
    return "\n".join(lines) + "\n"


_COLOURS = {"in": "#4c72b0", "unseen": "#c44e52", "near": "#dd8452", "mni152": "#8172b3", "shift": "#55a868"}


def plot_histograms(data: dict[str, Any], method: str, path: Path) -> Path:
    """One method's scores: in-distribution test studies and each OOD set, tau as a vertical line (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = data["rows"]
    tau = data["fits"][method]["tau"]
    fig = Figure(figsize=(6, 3.6), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    allv = np.array([r["scores"][method] for r in rows] + [tau], dtype=float)
    allv = allv[np.isfinite(allv)]
    lo, hi = float(allv.min()), float(allv.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-9, 31)
    for g in ("in", *GROUPS):
        v = [r["scores"][method] for r in rows if r["group"] == g]
        if v:
            ax.hist(v, bins=bins.tolist(), alpha=0.6, color=_COLOURS[g], label=f"{'in distribution' if g == 'in' else _group_label(g)} "
                                                                     f"(n={len(v)})")
    ax.axvline(tau, color="black", lw=1.5, label=f"tau = {tau:.4g}")
    ax.set_xlabel("OODM" if method == "spectral" else "score")
    ax.set_ylabel("studies")
    auc = data["summary"][method]["auc"]["value"]
    ax.set_title(f"{LABELS[method]}: AUC {fmt(auc, 2)}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
    return path


def _plots(data: dict[str, Any], out: Path) -> list[Path]:
    return [plot_histograms(data, m, out / f"oodm_{m}.png") for m in data["methods"]]


def rerender(out: str | os.PathLike[str]) -> dict[str, Any]:
    """``ood.md`` and the histograms again from ``out/ood.json``; returns the JSON data."""
    folder = Path(out)
    data = read_json(folder / f"{NAME}.json")
    atomic_write(folder / f"{NAME}.md", render(data).encode())
    _plots(data, folder)
    return data
