"""Table II of Karimi & Gholipour (2023): one model trained on every dataset ("multi-task") against one
model per dataset ("single-task"), in segmentation accuracy and calibration.

The protocol (paper sections III-A, III-C, III-E and IV-A), on the hard phantoms (:mod:`model.data.hard`):

- **Data**: for each training kind, the first ``n`` cases of the TRAIN range (:data:`model.data.splits.TRAIN`,
  seed :data:`model.data.splits.SEED`), made hard at the scale's difficulty. Unequal sizes, as the
  paper's datasets are.
- **Patient-wise 3-fold cross-validation** per dataset (:func:`model.train.kfold_splits`, split seed
  ``SEED``, the same folds for every seed): every case is tested once per seed, by models that never saw it.
- **Models, per seed and fold**: one single-task model per kind, trained on that kind's training folds;
  one multi-task model trained on all kinds' training folds at once (sqrt(n) sampling). **The same step
  budget for every model**: ``iterations`` optimizer steps each, no early stop (the paper's rule of
  multiplying the learning rate by 0.9 after an interval without improvement is kept; the weights of the
  interval with the lowest training loss are used: no held-out case takes part in any choice).
- **Evaluation through the production path**: each held-out case through
  :func:`model.study_inference.segment_volume` with :meth:`InferenceSettings.for_weights` of the trained
  weights (block and overlap from the weights' metadata; native resolution, as they were trained).
- **Metrics** per case: DSC, HD95 and ASSD (mm) of ``P(foreground) >= 0.5`` on the case's own grid
  (:mod:`model.scores`); ECE and MCE with ``bins`` bins inside a band of ``band`` voxels either side of the
  ground-truth surface (:mod:`model.calibration`; the band in millimetres is in the report, per dataset).
- **Statistics**: a case's value is its mean over seeds (the cases are the independent units, as the
  paper's images are); mean +- sd over cases; a two-sided paired t-test (multi against single) per
  dataset and metric, significant at p < 0.01 as in the paper; a 95 % bootstrap interval of the mean
  difference (multi - single). Per-seed, per-case values are all in the JSON.
- **Reliability diagrams**: per dataset, single against multi, the band's voxels of every held-out case
  and seed pooled; drawn from the bins stored in the JSON.

Scales (:data:`SCALES`): ``tiny`` for tests (seconds), ``cpu`` for a 2-core machine (well under an hour),
``gpu`` as close to the paper as the phantoms allow; each scale lists what it reduces against the paper.
"""

from __future__ import annotations

import math
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

from model._atomic import atomic_write
from model.calibration import CalibrationBins, calibration_bins, draw_reliability
from model.data.hard import difficulty as resolve_difficulty
from model.data.hard import hard_case
from model.data.phantoms import PhantomCase
from model.data.splits import SEED, TRAIN
from model.experiments.report import (
    bootstrap_ci,
    fmt,
    fmt_mean_sd,
    markdown_table,
    mean_sd,
    paired_t,
    read_json,
    reduced_and_machine,
    write_report,
)
from model.scores import assd, dice, hd95
from model.study_inference import InferenceSettings, segment_volume
from model.train import TrainConfig, TrainData, kfold_splits, train
from model.unet import load_weights, save_weights

__all__ = ["ALPHA", "METRICS", "NAME", "SCALES", "Scale", "plot_reliability", "render", "rerender", "run"]

NAME = "calibration"
METRICS = ("dsc", "hd95", "assd", "ece", "mce")
LABELS = {"dsc": "DSC", "hd95": "HD95 (mm)", "assd": "ASSD (mm)", "ece": "ECE", "mce": "MCE"}
HIGHER_IS_BETTER = {"dsc": True, "hd95": False, "assd": False, "ece": False, "mce": False}
DECIMALS = {"dsc": 3, "hd95": 2, "assd": 2, "ece": 3, "mce": 3}
ALPHA = 0.01  # the paper's significance level
MODELS = ("single", "multi")


@dataclass(frozen=True)
class Scale:
    """One configuration of the experiment (see :data:`SCALES`)."""

    name: str
    cases: tuple[tuple[str, int], ...]  # (kind, number of TRAIN-range cases)
    seeds: tuple[int, ...]
    iterations: int  # optimizer steps of every model (single- and multi-task alike)
    eval_every: int
    block: int
    lr: float
    base_features: int
    levels: int
    inference_block: int
    inference_overlap: int
    folds: int = 3
    batch_size: int = 1
    difficulty: str = "hard"
    band: int = 10  # voxels, the paper's
    bins: int = 10
    reduced: tuple[str, ...] = ()  # what this scale changes against the paper

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(block=self.block, batch_size=self.batch_size, lr=self.lr, eval_every=self.eval_every,
                           patience=10**9, max_iterations=self.iterations, seed=seed, folds=1,
                           base_features=self.base_features, levels=self.levels)

    def record(self) -> dict[str, Any]:
        d = asdict(self)
        d["cases"] = dict(self.cases)
        return d


_PAPER = ("datasets: three phantom kinds (CT liver, CT lungs, MR prostate) made hard (model.data.hard), "
          "against the paper's twelve clinical datasets")
SCALES: dict[str, Scale] = {s.name: s for s in (
    Scale("tiny", (("ct_liver", 3), ("ct_lung", 3), ("mr_prostate", 3)), seeds=(0, 1), iterations=4,
          eval_every=2, block=16, lr=1e-3, base_features=4, levels=2, inference_block=32, inference_overlap=8,
          reduced=("for tests only: 3 cases per dataset, 4 iterations, 4 features, 2 levels, 16^3 blocks; "
                   "its numbers mean nothing",)),
    Scale("cpu", (("ct_liver", 9), ("ct_lung", 9), ("mr_prostate", 6)), seeds=(0, 1), iterations=1200,
          eval_every=300, block=24, lr=2e-3, base_features=4, levels=3, inference_block=32, inference_overlap=8,
          reduced=(_PAPER,
                   "cases: 9, 9 and 6 per dataset, two thirds of them training each fold (paper: 15-400 per dataset)",
                   "network: 4 features in the first stage (paper: 14), 3 levels",
                   "blocks: 24^3 voxels in training, 32^3 with 8 voxels of overlap in inference (paper: 96^3, 24)",
                   "iterations: 1200 per model at learning rate 2e-3, evaluations every 300 (paper: until the "
                   "loss stops improving, lr 1e-4, evaluations every 2000); the models are far from converged, "
                   "and the multi-task model sees each dataset about a third as often as its single-task model",
                   "seeds: 2; one torch thread (two threads on a machine shared with other work ran 5-10 times "
                   "slower)")),
    Scale("gpu", (("ct_liver", 30), ("ct_lung", 24), ("mr_prostate", 15)), seeds=(0, 1), iterations=4000,
          eval_every=500, block=64, lr=3e-4, base_features=14, levels=4, inference_block=96, inference_overlap=24,
          reduced=(_PAPER,
                   "cases: 30, 24 and 15 per dataset (paper: 15-400)",
                   "training blocks: 64^3 voxels (the phantoms are 28-56 voxels deep; 96^3 would be mostly "
                   "padding); inference 96^3 with 24 voxels of overlap, as the paper",
                   "iterations: 4000 per model at lr 3e-4 (paper: until the loss stops improving, lr 1e-4)",
                   "seeds: 2")),
)}


# ----------------------------------------------------------------------------------------------------
# running


class _Bins:
    """Reliability bins pooled over cases: counts and sums of accuracy and confidence."""

    def __init__(self, bins: int) -> None:
        self.counts = np.zeros(bins, np.int64)
        self.acc = np.zeros(bins)
        self.conf = np.zeros(bins)

    def add(self, b: CalibrationBins) -> None:
        self.counts += b.counts
        self.acc += np.nan_to_num(b.accuracy) * b.counts
        self.conf += np.nan_to_num(b.confidence) * b.counts

    def record(self) -> dict[str, Any]:
        with np.errstate(invalid="ignore", divide="ignore"):
            acc, conf = self.acc / self.counts, self.conf / self.counts
        pooled = CalibrationBins(np.linspace(0, 1, self.counts.size + 1), self.counts, acc, conf)
        return {"counts": self.counts.tolist(), "accuracy": acc.tolist(), "confidence": conf.tolist(),
                "ece": pooled.ece, "mce": pooled.mce}


def _case_name(c: PhantomCase) -> str:
    return f"{c.kind}_{c.index}"


def _make_cases(scale: Scale, progress: bool) -> dict[str, list[PhantomCase]]:
    spec = [(k, i) for k, n in scale.cases for i in TRAIN.indices(n)]
    it: Any = spec
    if progress:
        from tqdm import tqdm

        it = tqdm(spec, desc=f"hard phantoms ({scale.difficulty})", unit="case")
    out: dict[str, list[PhantomCase]] = {k: [] for k, _ in scale.cases}
    for k, i in it:
        out[k].append(hard_case(k, SEED, i, scale.difficulty))
    return out


def _train_one(datasets: dict[str, list[PhantomCase]], scale: Scale, seed: int, folder: Path,
               device: str) -> tuple[torch.nn.Module, InferenceSettings, dict[str, Any]]:
    """Train one model; write the inference settings into its weights' metadata; open it as production does."""
    cfg = scale.train_config(seed)
    t0 = time.monotonic()
    res = train(TrainData.from_cases(datasets, block=cfg.block, device=device), folder, cfg, device=device,
                progress=False)
    net, meta = load_weights(res.weights, device)
    meta.update({"inference_block": scale.inference_block, "inference_overlap": scale.inference_overlap,
                 "inference_spacing": {}})  # trained on each image's own grid: inference at native resolution
    save_weights(net, res.weights, meta)
    net, meta = load_weights(res.weights, device)
    settings = InferenceSettings.for_weights(meta, device=device)
    info = {"datasets": {k: len(v) for k, v in datasets.items()}, "iterations": res.iterations,
            "best_loss": res.best_loss, "stopped": res.stopped, "seconds": round(time.monotonic() - t0, 2)}
    return net, settings, info


def _evaluate_case(net: torch.nn.Module, case: PhantomCase, settings: InferenceSettings, device: str,
                   scale: Scale) -> tuple[dict[str, float], CalibrationBins]:
    r = segment_volume(net, case.image, case.spacing, case.modality, settings, device=device, out_dtype=np.float32)
    fg = r.foreground
    pred = fg >= 0.5
    b = calibration_bins(fg, case.label, band=scale.band, bins=scale.bins)
    return {"dsc": dice(pred, case.label), "hd95": hd95(pred, case.label, case.spacing),
            "assd": assd(pred, case.label, case.spacing), "ece": b.ece, "mce": b.mce}, b


def run(scale: Scale, out: str | os.PathLike[str], *, seeds: Sequence[int] | None = None, device: str = "cpu",
        progress: bool = True, workdir: str | os.PathLike[str] | None = None,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the experiment at ``scale`` and write ``out/calibration.json``, ``out/calibration.md`` and one
    ``out/reliability_<kind>.png`` per dataset. Trained weights live in a temporary folder (under
    ``workdir``) and are removed. Returns the JSON data."""
    if seeds is not None:
        scale = replace(scale, seeds=tuple(int(s) for s in seeds))
    if len(scale.seeds) < 1 or len(set(scale.seeds)) != len(scale.seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {scale.seeds}")
    t0, load0 = time.monotonic(), os.getloadavg()
    cases = _make_cases(scale, progress)
    kinds = list(cases)
    folds = {k: kfold_splits([_case_name(c) for c in cases[k]], scale.folds, SEED) for k in kinds}
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    inference: dict[str, Any] = {}
    pooled = {k: {m: _Bins(scale.bins) for m in MODELS} for k in kinds}
    n_cases = sum(len(v) for v in cases.values())
    total = len(scale.seeds) * (scale.folds * (len(kinds) + 1) + 2 * n_cases)
    bar: Any = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="calibration", unit="step")
    with tempfile.TemporaryDirectory(prefix="specgate-calibration-", dir=workdir) as tmp:
        for seed in scale.seeds:
            for f in range(scale.folds):
                train_sets = {k: [cases[k][i] for i in folds[k][f][0]] for k in kinds}
                test_sets = {k: [cases[k][i] for i in folds[k][f][1]] for k in kinds}
                plan: list[tuple[str, dict[str, list[PhantomCase]], list[str]]] = [
                    ("single", {k: train_sets[k]}, [k]) for k in kinds]
                plan.append(("multi", train_sets, kinds))
                for role, train_on, tested in plan:
                    tag = f"seed {seed} fold {f} {role}" + (f" {tested[0]}" if role == "single" else "")
                    if bar is not None:
                        bar.set_postfix_str(f"train {tag}")
                    folder = Path(tmp) / f"s{seed}_f{f}_{role}_{'-'.join(train_on)}"
                    net, settings, info = _train_one(train_on, scale, seed, folder, device)
                    runs.append({"seed": seed, "fold": f, "model": role, **info})
                    inference = settings.record()
                    if log is not None:
                        log(f"{tag}: {info['iterations']} iterations in {info['seconds']} s, "
                            f"best training loss {info['best_loss']:.3f}")
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix_str(f"evaluate {tag}")
                    for k in tested:
                        for case in test_sets[k]:
                            values, b = _evaluate_case(net, case, settings, device, scale)
                            pooled[k][role].add(b)
                            rows.append({"dataset": k, "index": case.index, "seed": seed, "fold": f,
                                         "model": role, **values})
                            if bar is not None:
                                bar.update(1)
    if bar is not None:
        bar.close()
    data = {
        "experiment": NAME,
        "paper": "Karimi & Gholipour 2023, Table II: multi-task against single-task models",
        "scale": scale.record(),
        "difficulty": resolve_difficulty(scale.difficulty).record(),
        "phantom_seed": SEED,
        "indices": {k: [c.index for c in v] for k, v in cases.items()},
        "folds": {k: [[_case_name(cases[k][i]) for i in te] for _, te in folds[k]] for k in kinds},
        "band_mm": _band_mm(cases, scale.band),
        "inference": inference,
        "alpha": ALPHA,
        "decimals": DECIMALS,
        "summary": _summarise(rows, kinds),
        "reliability": {k: {m: pooled[k][m].record() for m in MODELS} for k in kinds},
        "runs": runs,
        "rows": rows,
        "machine": _machine(device, load0),
        "wall_s": round(time.monotonic() - t0, 1),
    }
    out_dir = Path(out)
    write_report(out_dir, NAME, data, render)
    return rerender(out_dir)


def rerender(out: str | os.PathLike[str]) -> dict[str, Any]:
    """``calibration.md`` and the reliability diagrams again, from ``out/calibration.json`` alone."""
    out_dir = Path(out)
    data = read_json(out_dir / f"{NAME}.json")
    atomic_write(out_dir / f"{NAME}.md", render(data).encode())
    for k, rel in data["reliability"].items():
        plot_reliability(rel, out_dir / f"reliability_{k}.png", k)
    return data


def _band_mm(cases: dict[str, list[PhantomCase]], band: int) -> dict[str, dict[str, list[float]]]:
    """The band's reach in mm along each axis (band x voxel edge), smallest and largest over the cases."""
    out = {}
    for k, cs in cases.items():
        sp = np.array([c.spacing for c in cs])
        out[k] = {axis: [round(band * float(sp[:, a].min()), 2), round(band * float(sp[:, a].max()), 2)]
                  for a, axis in enumerate(("z", "y", "x"))}
    return out


def _machine(device: str, load0: tuple[float, float, float]) -> dict[str, Any]:
    dev = torch.cuda.get_device_name(0) if device.startswith("cuda") else (platform.processor() or platform.machine())
    return {"device": device, "device_name": dev, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average_start": [round(v, 2) for v in load0],
            "load_average_end": [round(v, 2) for v in os.getloadavg()]}


def _summarise(rows: list[dict[str, Any]], kinds: list[str]) -> dict[str, Any]:
    """Per dataset and metric: mean +- sd over cases (each the mean over seeds), the paired t-test of multi
    against single, the bootstrap interval of the mean difference, and which model is significantly better."""
    out: dict[str, Any] = {}
    for k in kinds:
        per_case: dict[str, dict[int, dict[str, list[float]]]] = {m: {} for m in MODELS}
        for r in rows:
            if r["dataset"] == k:
                d = per_case[r["model"]].setdefault(r["index"], {m: [] for m in METRICS})
                for m in METRICS:
                    d[m].append(math.nan if r[m] is None else r[m])
        idx = sorted(set(per_case["single"]) & set(per_case["multi"]))
        out[k] = {"n_cases": len(idx)}
        for m in METRICS:
            vals = {mod: np.array([_nanmean(per_case[mod][i][m]) for i in idx]) for mod in MODELS}
            entry: dict[str, Any] = {}
            for mod in MODELS:
                mu, sd, n = mean_sd(vals[mod])
                entry[mod] = {"mean": mu, "sd": sd, "n": n}
            t = paired_t(vals["multi"], vals["single"])
            diff = vals["multi"] - vals["single"]
            lo, hi = bootstrap_ci(diff, seed=SEED)
            better = None
            if math.isfinite(t.p) and t.p < ALPHA and t.mean_diff != 0:
                better = "multi" if (t.mean_diff > 0) == HIGHER_IS_BETTER[m] else "single"
            entry.update({"t_test": t.record(), "diff_ci95": [lo, hi], "better": better})
            out[k][m] = entry
    return out


def _nanmean(v: list[float]) -> float:
    a = np.asarray(v, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else math.nan


# ----------------------------------------------------------------------------------------------------
# the report


def render(data: dict[str, Any]) -> str:
    """The Markdown report, from the JSON data alone."""
    sc, dec, summ = data["scale"], data["decimals"], data["summary"]
    kinds = list(summ)
    lines = [f"# Calibration: multi-task against single-task models (paper Table II), scale `{sc['name']}`", ""]
    lines.append(f"Hard phantoms (`model.data.hard`, difficulty `{sc['difficulty']}`), phantom seed "
                 f"{data['phantom_seed']}, TRAIN-range indices; {sc['folds']}-fold patient-wise cross-validation, "
                 f"seeds {', '.join(str(s) for s in sc['seeds'])}; every model {sc['iterations']} iterations. "
                 f"Mean ± sd over cases (each case's value is its mean over seeds); **bold**: the better model "
                 f"where the paired t-test gives p < {data['alpha']}.")
    lines.append("")
    lines.append(f"Command: `specgate model experiment calibration --scale {sc['name']} --seeds "
                 f"{','.join(str(s) for s in sc['seeds'])} --device {data['machine']['device']} --out DIR`.")
    lines.append("")
    headers = ["Training", "Data", "n"] + [LABELS[m] for m in METRICS]
    rows = []
    for mod, title in (("single", "one model per dataset"), ("multi", "one model for all datasets")):
        for k in kinds:
            cells = [title, k, str(summ[k]["n_cases"])]
            for m in METRICS:
                e = summ[k][m]
                cell = fmt_mean_sd(e[mod]["mean"], e[mod]["sd"], dec[m])
                cells.append(f"**{cell}**" if e["better"] == mod else cell)
            rows.append(cells)
    lines.append(markdown_table(headers, rows))
    lines.append("Paired t-tests, multi-task minus single-task (p; mean difference [95 % bootstrap interval]):")
    lines.append("")
    rows = []
    for k in kinds:
        cells = [k]
        for m in METRICS:
            e = summ[k][m]
            lo, hi = e["diff_ci95"]
            cells.append(f"p={fmt(e['t_test']['p'], 4)}; {fmt(e['t_test']['mean_diff'], dec[m])} "
                         f"[{fmt(lo, dec[m])}, {fmt(hi, dec[m])}]")
        rows.append(cells)
    lines.append(markdown_table(["Data"] + [LABELS[m] for m in METRICS], rows))
    for m in METRICS:
        wins = {mod: sum(1 for k in kinds if summ[k][m]["better"] == mod) for mod in MODELS}
        lines.append(f"- {LABELS[m]}: multi-task significantly better on {wins['multi']} of {len(kinds)} "
                     f"datasets, single-task on {wins['single']}.")
    lines.append("")
    lines.append(f"ECE and MCE: {sc['bins']} bins, a band of {sc['band']} voxels either side of the ground-truth "
                 "surface; in millimetres (band x voxel edge, smallest-largest over the cases):")
    lines.append("")
    for k, b in data["band_mm"].items():
        lines.append(f"- {k}: z {b['z'][0]}-{b['z'][1]} mm, y {b['y'][0]}-{b['y'][1]} mm, "
                     f"x {b['x'][0]}-{b['x'][1]} mm")
    lines.append("")
    lines.append("Pooled reliability (every held-out case and seed): " + "; ".join(
        f"{k} ECE {fmt(data['reliability'][k]['single']['ece'], 3)} single / "
        f"{fmt(data['reliability'][k]['multi']['ece'], 3)} multi" for k in kinds)
        + ". Diagrams: " + ", ".join(f"`reliability_{k}.png`" for k in kinds) + ".")
    lines.append("")
    lines += reduced_and_machine(data, "", "the wall time is longer than the same run alone would take.")
    return "\n".join(lines) + "\n"


def plot_reliability(rel: dict[str, Any], path: Path, title: str) -> Path:
    """Single-task and multi-task reliability diagrams side by side (PNG), from the JSON's bins."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), dpi=80)
    FigureCanvasAgg(fig)
    for j, mod in enumerate(MODELS):
        b = rel[mod]
        counts = np.asarray(b["counts"])
        acc = np.asarray([np.nan if v is None else v for v in b["accuracy"]], dtype=float)
        conf = np.asarray([np.nan if v is None else v for v in b["confidence"]], dtype=float)
        ax = fig.add_subplot(1, 2, j + 1)
        draw_reliability(ax, (np.arange(counts.size) + 0.5) / counts.size, acc, conf, counts, "gap to confidence")
        ece, mce = b["ece"], b["mce"]
        ax.set_title(f"{title}, {mod}-task\nECE {fmt(ece, 3)}  MCE {fmt(mce, 3)}", fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
    return path
