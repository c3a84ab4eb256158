"""The failure experiment (issue 20, item 3): does the gate hold the studies the model gets wrong?

A radiologist trusts a released result because the gate is meant to hold what the model cannot handle.
This experiment measures that on the shipped weights, and chooses the gate's design on the validation range
only:

1. **Spectra.** Every case goes through the production path's model grid, intensities and body crop
   (:func:`model.study_inference.prepare_study`) and its windows (:func:`model.infer.plan_windows`); forward
   hooks on every encoder and decoder stage of the SegNet accumulate, per stage, the Gram matrix of its
   feature map over the canvas and over the body (a coarser stage's map is read at its own resolution:
   each window contributes the cells whose centre it owns). One pass gives every design's signature.
   The DSC of the production probabilities against the truth is kept beside them.
2. **Cases** (:mod:`model.data.splits`): the bank is the shipped bank's composition (TRAIN range, each
   training phantom on its own grid and re-gridded to clinical geometries). Validation and test hold the
   same categories, from their own ranges: clean studies of the training kinds (own grid and clinical
   geometries), the same kinds under every shift of :mod:`model.data.shifts` at several strengths,
   near-OOD kinds, unseen kinds and the MNI152 MR (:mod:`model.data.mni`).
3. **Designs**: the layer (each stage), the spectrum (``sum``: the paper's plain singular values, which grow
   with the voxel count; ``mean``: the mean Gram; ``centred``: its log-spectrum minus its mean, invariant to
   a global gain), the voxels (``body`` mask or the whole ``canvas``), the bank (``native``: training
   phantoms on their own grid; ``regridded``: with their clinical re-griddings), the threshold (one
   ``pooled`` tau, or tau ``per_kind``, the kind of the nearest bank signature), and C in {2, 2.5, 3}.
4. **The choice** is the design with the largest J = (share of *bad* validation studies held) + (share of
   *good* ones released) (Youden's J plus one), where bad = DSC < 0.5, good = a clean study of a training
   kind with DSC >= 0.8; ties go to the paper's C = 2.5, then to a pooled threshold, the re-gridded bank,
   the earlier layer in :data:`LAYER_ORDER`, and the earlier spectrum and voxels in their lists. Only
   single-stage designs at the input's resolution can be shipped (the production windows' ownership of
   voxels is defined at that resolution), so the choice is made among those; every design's figures are
   reported.
5. **The report** on the test range, for the choice, the previous shipped design (version 2: last decoder,
   mean, body) and the paper's (last decoder, sum, every voxel): the share of bad studies held and of good
   ones released with 95 % bootstrap intervals, per category, the AUC per layer (the layer study), and
   OODM / tau against DSC as a scatter plot.

The shipped bank (``python -m model.weights.build bank``) is fitted through the chosen design.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model._atomic import atomic_write
from model.data.splits import SEED, TEST, TRAIN, VALIDATION, IndexRange
from model.experiments.report import bootstrap_ci, fmt, markdown_table, read_json, write_report

__all__ = ["LAYER_ORDER", "NAME", "SCALES", "CaseSpec", "Design", "Scale", "case_spectra", "choose", "render",
           "rerender", "run"]

NAME = "failures"
SPECTRA = ("centred", "mean", "sum")
VOXELS = ("canvas", "body")
BANKS = ("regridded", "native")
THRESHOLDS = ("pooled", "per_kind")
CS = (2.5, 2.0, 3.0)
#: every stage of the shipped SegNet (4 levels): the order ties are broken in
LAYER_ORDER = ("encoders.0", "decoders.2", "encoders.1", "decoders.1", "encoders.2", "decoders.0", "encoders.3")
SHIPPABLE = ("encoders.0", "decoders.2")  # at the input's resolution
BAD_DSC, GOOD_DSC = 0.5, 0.8
TRAINING = ("ct_liver", "ct_lung", "mr_prostate")


@dataclass(frozen=True)
class CaseSpec:
    """One case: a phantom (or the MNI152 MR, ``kind="mr_mni152"``), on its own grid (``variant=-1``) or
    re-gridded to clinical geometry ``variant``, optionally shifted."""

    kind: str
    index: int
    variant: int = -1
    shift: str = ""
    strength: float = 0.0

    @property
    def category(self) -> str:
        if self.shift:
            return f"{self.kind}+{self.shift}{self.strength:g}"
        if self.kind in TRAINING:
            return f"{self.kind} clean" + (" clinical" if self.variant >= 0 else "")
        return self.kind

    @property
    def clean_known(self) -> bool:
        return self.kind in TRAINING and not self.shift

    def make(self) -> Any:
        from model.data.clinical import clinical_case
        from model.data.phantoms import phantom_case

        if self.kind == "mr_mni152":
            from model.data.mni import mni_case

            case = mni_case(SEED, self.index)
        elif self.variant >= 0:
            case = clinical_case(self.kind, SEED, self.index, self.variant)[0]
        else:
            case = phantom_case(self.kind, SEED, self.index)
        if self.shift:
            from model.data.shifts import apply_shift

            case = apply_shift(case, self.shift, self.strength)
        return case


@dataclass(frozen=True)
class Scale:
    """One configuration of the experiment (see :data:`SCALES`)."""

    name: str
    bank_sizes: tuple[tuple[str, int], ...]  # (kind, TRAIN-range cases)
    bank_geometries: tuple[tuple[str, int], ...]  # (kind, clinical re-griddings of each)
    clean: int  # clean cases per training kind, on their own grid
    clinical: int  # clean cases per training kind re-gridded (one geometry each)
    shifted: int  # cases per (training kind, shift, strength)
    shifts: tuple[tuple[str, tuple[float, ...]], ...]
    others: int  # cases per near-OOD / unseen kind and of the MNI152 MR
    other_kinds: tuple[str, ...]
    workers: int = 2
    n_boot: int = 2000
    reduced: tuple[str, ...] = ()

    def record(self) -> dict[str, Any]:
        d = asdict(self)
        d["bank_sizes"], d["bank_geometries"] = dict(self.bank_sizes), dict(self.bank_geometries)
        d["shifts"] = {k: list(v) for k, v in self.shifts}
        return d

    def bank_specs(self) -> list[CaseSpec]:
        geo = dict(self.bank_geometries)
        return [CaseSpec(k, TRAIN.index(i), v) for k, n in self.bank_sizes for i in range(n)
                for v in range(-1, geo.get(k, 0))]

    def specs(self, split: IndexRange) -> list[CaseSpec]:
        out: list[CaseSpec] = []
        for k in TRAINING:
            out += [CaseSpec(k, i) for i in split.indices(self.clean)]
            out += [CaseSpec(k, i, j % 2) for j, i in enumerate(split.indices(self.clinical, 100))]
            off = 200
            for sh, strengths in self.shifts:
                for s in strengths:
                    out += [CaseSpec(k, i, -1, sh, s) for i in split.indices(self.shifted, off)]
                    off += self.shifted
        for k in self.other_kinds:
            out += [CaseSpec(k, i) for i in split.indices(self.others, 900)]
        return out


_ALL_SHIFTS = (("blur", (1.0, 1.5, 2.0)), ("thick", (6.0, 10.0)), ("noise", (0.25, 1.0)), ("gamma", (0.5, 2.0)),
               ("bias", (0.5, 1.0)), ("invert", (0.5, 1.0)), ("ghost", (0.2, 0.5)))
_OTHERS = ("mr_prostate_t1", "ct_head", "ct_liver_child", "mr_hippocampus", "pt_tumour", "mr_mni152")
_BANK = (("ct_liver", 48), ("ct_lung", 32), ("mr_prostate", 24))
_GEOMETRIES = (("ct_liver", 2), ("ct_lung", 2), ("mr_prostate", 6))
SCALES: dict[str, Scale] = {s.name: s for s in (
    Scale("tiny", (("ct_liver", 2), ("mr_prostate", 2)), (("mr_prostate", 1),), clean=1, clinical=0, shifted=1,
          shifts=(("blur", (2.0,)),), others=1, other_kinds=("mr_hippocampus",), workers=1, n_boot=200,
          reduced=("for tests only: 2 bank images of two kinds, one case per category; its numbers mean nothing",)),
    Scale("cpu", _BANK, _GEOMETRIES, clean=4, clinical=4, shifted=1, shifts=_ALL_SHIFTS, others=3,
          other_kinds=_OTHERS,
          reduced=("validation and test: 4 clean cases per training kind on their own grid and 4 on clinical "
                   "grids, 1 per (kind, shift, strength), 3 per other kind (gpu: 10, 10, 5, 8)",)),
    Scale("gpu", _BANK, _GEOMETRIES, clean=10, clinical=10, shifted=5, shifts=_ALL_SHIFTS, others=8,
          other_kinds=_OTHERS, workers=4),
)}


# ----------------------------------------------------------------------------------------------------
# spectra


def _strides(net: Any) -> dict[str, int]:
    n = len(net.encoders)
    out = {f"encoders.{k}": 2**k for k in range(n)}
    out.update({f"decoders.{i}": 2 ** (n - 2 - i) for i in range(len(net.decoders))})
    return out


def _eig(gram: np.ndarray, n: int) -> list[float]:
    g = gram / max(int(n), 1)
    e = np.linalg.eigvalsh((g + g.T) / 2.0)[::-1]
    return np.sqrt(np.clip(e, 0.0, None)).tolist()


def case_spectra(net: Any, image: np.ndarray, spacing: Sequence[float], modality: str, settings: Any,
                 label: np.ndarray | None = None) -> dict[str, Any]:
    """Singular values of every stage's mean Gram over the canvas and over the body, the voxel counts, and
    the DSC of the production probabilities (with ``label``). The last decoder's canvas spectrum through
    ``centred`` and the first encoder's are what :func:`model.study_inference.segment_volume` gives."""
    import torch

    from model.infer import _pad_to_window, plan_windows
    from model.scores import dice
    from model.study_inference import _to_source_grid, prepare_study

    prep = prepare_study(image, spacing, modality, settings)
    img = prep.image
    body = prep.signature_mask if prep.signature_mask is not None else np.ones(img.shape, bool)
    strides = _strides(net)
    caught: dict[str, Any] = {}
    hooks = [net.get_submodule(name).register_forward_hook(lambda _m, _i, o, name=name: caught.__setitem__(name, o))
             for name in strides]
    grams: dict[str, list[Any]] = {n: [np.zeros(0), np.zeros(0), 0, 0] for n in strides}
    probs = np.zeros((2, *img.shape), np.float32)
    windows = plan_windows(img.shape, settings.block, settings.overlap, int(net.divisor))
    padded = _pad_to_window(img[None], windows[0].size)
    try:
        with torch.inference_mode():
            for w in windows:
                x = torch.from_numpy(np.ascontiguousarray(padded[(slice(None), *w.read_slices())][None], np.float32))
                p = torch.softmax(net(x), 1)[0]
                probs[(slice(None), *w.own_slices())] = p[(slice(None), *w.local_own_slices())].numpy()
                for name, s in strides.items():
                    f = caught[name][0].double()
                    # the cells whose centre the window owns, at this stage's resolution
                    lo = [max(0, -(-(a - st - (s - 1) / 2) // s)) for a, st in zip(w.own_lo, w.start, strict=True)]
                    hi = [min(n, -(-(b - st - (s - 1) / 2) // s)) for b, st, n in
                          zip(w.own_hi, w.start, f.shape[1:], strict=True)]
                    lo, hi = [int(v) for v in lo], [int(v) for v in hi]
                    a = f[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].reshape(f.shape[0], -1)
                    centre = [np.clip(st + np.arange(l0, h0) * s + s // 2, 0, body.shape[ax] - 1)
                              for ax, (st, l0, h0) in enumerate(zip(w.start, lo, hi, strict=True))]
                    keep = torch.from_numpy(np.ascontiguousarray(body[np.ix_(*centre)]).reshape(-1))
                    g = grams[name]
                    ab = a[:, keep]
                    g[0] = (a @ a.T).numpy() + (g[0] if g[0].size else 0)
                    g[1] = (ab @ ab.T).numpy() + (g[1] if g[1].size else 0)
                    g[2] += int(a.shape[1])
                    g[3] += int(keep.sum())
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, Any] = {"windows": len(windows)}
    for name, (g_all, g_body, n_all, n_body) in grams.items():
        out[name] = {"canvas": _eig(g_all, n_all), "body": _eig(g_body, n_body), "n_canvas": n_all,
                     "n_body": n_body}
    if label is not None:
        pr = _to_source_grid(probs, prep.canvas, prep.grid, prep.resampled, prep.shape, prep.spacing, np.float32)
        out["dsc"] = float(dice(pr[1] >= 0.5, np.asarray(label) > 0))
    return out


_NET: Any = None


def _load(weights: str) -> tuple[Any, Any]:
    global _NET
    if _NET is None or _NET[0] != weights:
        import torch

        from model.study_inference import InferenceSettings
        from model.unet import load_weights

        torch.set_num_threads(1)
        net, meta = load_weights(weights)
        _NET = (weights, net, InferenceSettings.for_weights(meta))
    return _NET[1], _NET[2]


def _one(args: tuple[str, CaseSpec]) -> dict[str, Any]:
    weights, spec = args
    net, settings = _load(weights)
    case = spec.make()
    row = case_spectra(net, case.image, case.spacing, case.modality, settings, case.label)
    return {**asdict(spec), "category": spec.category, "clean_known": spec.clean_known,
            "modality": case.modality, **row}


def _collect(weights: str, specs: list[CaseSpec], workers: int, progress: bool, desc: str) -> list[dict[str, Any]]:
    jobs = [(weights, s) for s in specs]
    it: Iterator[dict[str, Any]]
    if workers <= 1:
        it = (_one(j) for j in jobs)
        ex = None
    else:
        ex = ProcessPoolExecutor(workers)
        it = ex.map(_one, jobs, chunksize=1)
    try:
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(jobs), desc=desc, unit="case")
        return list(it)
    finally:
        if ex is not None:
            ex.shutdown()


# ----------------------------------------------------------------------------------------------------
# designs


@dataclass(frozen=True)
class Design:
    layer: str
    spectrum: str
    voxels: str
    bank: str
    threshold: str
    c: float

    @property
    def label(self) -> str:
        return f"{self.layer} {self.spectrum} {self.voxels} {self.bank}-bank {self.threshold} C={self.c:g}"

    def sort_key(self) -> tuple[Any, ...]:
        return (CS.index(self.c), THRESHOLDS.index(self.threshold), BANKS.index(self.bank),
                LAYER_ORDER.index(self.layer) if self.layer in LAYER_ORDER else 99, SPECTRA.index(self.spectrum),
                VOXELS.index(self.voxels))


def signature(row: dict[str, Any], layer: str, spectrum: str, voxels: str) -> np.ndarray:
    """A design's signature of one case from its recorded spectra (:func:`model.ood.signature_from_singular_values`;
    ``sum``: the singular values of the un-averaged map, i.e. the mean's times ``sqrt(N)``)."""
    from model.ood import signature_from_singular_values

    s = np.asarray(row[layer][voxels], dtype=np.float64)
    if spectrum == "sum":
        return signature_from_singular_values(s * math.sqrt(max(row[layer][f"n_{voxels}"], 1)), "mean")
    return signature_from_singular_values(s, spectrum)


class FittedDesign:
    """A design's bank and thresholds; :meth:`ratio` is OODM / tau of a case (> 1: held)."""

    def __init__(self, design: Design, bank_rows: list[dict[str, Any]]) -> None:
        from model.ood import fit_threshold, leave_one_out_oodm

        rows = [r for r in bank_rows if design.bank == "regridded" or r["variant"] < 0]
        self.design = design
        self.bank = np.stack([signature(r, design.layer, design.spectrum, design.voxels) for r in rows])
        self.kinds = np.array([r["kind"] for r in rows])
        groups = np.array([f"{r['kind']}:{r['index']}" for r in rows])
        loo = leave_one_out_oodm(self.bank, groups if len(set(groups)) < len(groups) else None)
        if design.threshold == "pooled":
            t = fit_threshold(loo, design.c)
            self.tau = {k: t for k in set(self.kinds)}
        else:
            self.tau = {k: fit_threshold(loo[self.kinds == k], design.c) for k in set(self.kinds)}

    def ratio(self, row: dict[str, Any]) -> float:
        d = self.design
        s = signature(row, d.layer, d.spectrum, d.voxels)
        dist = np.linalg.norm(self.bank - s[None, :], axis=1)
        j = int(dist.argmin())
        tau = self.tau[str(self.kinds[j])]
        if tau <= 0:  # a bank of identical signatures: anything else is outside it
            return 0.0 if dist[j] == 0 else math.inf
        return float(dist[j] / tau)


def designs(layers: Sequence[str]) -> list[Design]:
    return [Design(*t) for t in itertools.product(layers, SPECTRA, VOXELS, BANKS, THRESHOLDS, CS)]


def _shares(ratios: np.ndarray, rows: list[dict[str, Any]], n_boot: int) -> dict[str, Any]:
    dsc = np.array([r["dsc"] for r in rows])
    bad = dsc < BAD_DSC
    good = (dsc >= GOOD_DSC) & np.array([bool(r["clean_known"]) for r in rows])
    held = ratios > 1.0
    out: dict[str, Any] = {"n_bad": int(bad.sum()), "n_good": int(good.sum())}
    for key, sel, val in (("held_bad", bad, held), ("released_good", good, ~held)):
        v = val[sel].astype(float)
        out[key] = float(v.mean()) if v.size else math.nan
        out[f"{key}_ci"] = list(bootstrap_ci(v, n_boot=n_boot)) if v.size else [math.nan, math.nan]
    out["j"] = (out["held_bad"] if bad.any() else 0.0) + (out["released_good"] if good.any() else 0.0)
    return out


def choose(bank_rows: list[dict[str, Any]], val_rows: list[dict[str, Any]], layers: Sequence[str],
           n_boot: int = 200) -> tuple[Design, list[dict[str, Any]]]:
    """Every design's J on the validation rows (best first) and the shippable design with the largest J
    (ties as the module doc says)."""
    table = []
    for d in designs(layers):
        f = FittedDesign(d, bank_rows)
        sh = _shares(np.array([f.ratio(r) for r in val_rows]), val_rows, n_boot)
        table.append({"design": asdict(d), "label": d.label, "shippable": d.layer in SHIPPABLE, **sh})
    order = sorted(range(len(table)), key=lambda i: (-round(table[i]["j"], 9), Design(**table[i]["design"]).sort_key()))
    table = [table[i] for i in order]
    pick = next(Design(**t["design"]) for t in table if t["shippable"])
    return pick, table


def _auc(ratios: np.ndarray, rows: list[dict[str, Any]]) -> float:
    from model.scores import roc_auc

    dsc = np.array([r["dsc"] for r in rows])
    good = (dsc >= GOOD_DSC) & np.array([bool(r["clean_known"]) for r in rows])
    bad = dsc < BAD_DSC
    return roc_auc(ratios[good], ratios[bad]) if good.any() and bad.any() else math.nan


# ----------------------------------------------------------------------------------------------------
# running


def _weights() -> str:
    from model.weights import WEIGHTS_PATH

    return str(WEIGHTS_PATH)


def run(scale: Scale, out: str | os.PathLike[str], *, seeds: Sequence[int] | None = None, device: str = "cpu",
        progress: bool = True, log: Callable[[str], None] | None = None,
        weights: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Run at ``scale`` and write ``out/failures.json``, ``out/failures.md`` and ``out/failures_scatter.png``.
    ``seeds`` is not used (nothing is trained: the shipped weights, or ``weights``); ``device``: CPU only."""
    t0, load0 = time.monotonic(), os.getloadavg()
    w = str(weights or _weights())
    from model.unet import load_weights

    net, _ = load_weights(w)
    layers = [name for name in LAYER_ORDER if name in _strides(net)] or list(_strides(net))
    bank = _collect(w, scale.bank_specs(), scale.workers, progress, "bank")
    val = _collect(w, scale.specs(VALIDATION), scale.workers, progress, "validation")
    test = _collect(w, scale.specs(TEST), scale.workers, progress, "test")
    pick, table = choose(bank, val, layers, scale.n_boot)
    if log is not None:
        log(f"chosen on validation: {pick.label}")
    last = f"decoders.{len(net.decoders) - 1}" if len(net.decoders) else "encoders.0"
    compared = {"chosen": pick, "version 2": Design(last, "mean", "body", "regridded", "pooled", 2.5),
                "paper": Design(last, "sum", "canvas", "regridded", "pooled", 2.5)}
    results: dict[str, Any] = {}
    per_case: list[dict[str, Any]] = [{k: r[k] for k in ("kind", "index", "variant", "shift", "strength", "category",
                                                          "modality")} | {"dsc": round(r["dsc"], 4)} for r in test]
    for name, d in compared.items():
        f = FittedDesign(d, bank)
        ratios = np.array([f.ratio(r) for r in test])
        vr = np.array([f.ratio(r) for r in val])
        results[name] = {"design": asdict(d), "label": d.label, "test": _shares(ratios, test, scale.n_boot),
                         "validation": _shares(vr, val, scale.n_boot), "auc_test": _auc(ratios, test),
                         "categories": _categories(ratios, test)}
        for row, rt in zip(per_case, ratios, strict=True):
            row[f"ratio_{name.replace(' ', '_')}"] = round(float(rt), 4)
    layer_study = []
    for layer in layers:
        d = Design(layer, pick.spectrum, pick.voxels, pick.bank, pick.threshold, pick.c)
        f = FittedDesign(d, bank)
        ratios = np.array([f.ratio(r) for r in test])
        layer_study.append({"layer": layer, "auc_test": _auc(ratios, test), **_shares(ratios, test, scale.n_boot)})
    data = {
        "experiment": NAME,
        "scale": scale.record(),
        "phantom_seed": SEED,
        "splits": {"bank": [TRAIN.first, TRAIN.stop - 1], "validation": [VALIDATION.first, VALIDATION.stop - 1],
                   "test": [TEST.first, TEST.stop - 1]},
        "weights": Path(w).name,
        "criteria": {"bad_dsc_below": BAD_DSC, "good_dsc_at_least": GOOD_DSC},
        "n": {"bank": len(bank), "validation": len(val), "test": len(test)},
        "chosen": {"design": asdict(pick), "label": pick.label},
        "designs_validation": table,
        "results": results,
        "layer_study": layer_study,
        "cases": per_case,
        "machine": {"cpus": os.cpu_count(), "load_before": [round(v, 2) for v in load0],
                    "load_after": [round(v, 2) for v in os.getloadavg()], "device": device},
        "wall_s": round(time.monotonic() - t0, 1),
    }
    write_report(Path(out), NAME, data, render)
    return rerender(out)


def _categories(ratios: np.ndarray, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for cat in dict.fromkeys(r["category"] for r in rows):
        idx = [i for i, r in enumerate(rows) if r["category"] == cat]
        dsc = np.array([rows[i]["dsc"] for i in idx])
        rt = ratios[idx]
        out.append({"category": cat, "n": len(idx), "dsc_mean": float(dsc.mean()), "n_bad": int((dsc < BAD_DSC).sum()),
                    "held": int((rt > 1).sum()), "held_bad": int(((rt > 1) & (dsc < BAD_DSC)).sum()),
                    "ratio_min": float(rt.min()), "ratio_max": float(rt.max())})
    return out


def rerender(out: str | os.PathLike[str]) -> dict[str, Any]:
    """``failures.md`` and the scatter plot again from ``out/failures.json`` alone."""
    out_dir = Path(out)
    data = read_json(out_dir / f"{NAME}.json")
    atomic_write(out_dir / f"{NAME}.md", render(data).encode())
    plot_scatter(data, out_dir / f"{NAME}_scatter.png")
    return data


def _pct(v: float | None, ci: Sequence[float | None] | None = None) -> str:
    if v is None:
        return "-"
    s = f"{100 * v:.0f} %"
    if ci and ci[0] is not None and ci[1] is not None:
        s += f" ({100 * ci[0]:.0f}-{100 * ci[1]:.0f})"
    return s


def render(data: dict[str, Any]) -> str:
    """The Markdown report, from the JSON data only."""
    sc = data["scale"]
    lines = [f"# The gate against the model's failures ({sc['name']} scale)", "",
             "Command: `specgate model experiment failures --scale " + sc["name"] + " --out DIR`; weights "
             f"`{data['weights']}`; phantom seed {data['phantom_seed']}; bank from the training range, the design "
             f"chosen on validation indices {data['splits']['validation'][0]}-{data['splits']['validation'][1]}, "
             f"reported on test indices {data['splits']['test'][0]}-{data['splits']['test'][1]}. Bad: DSC < "
             f"{data['criteria']['bad_dsc_below']}; good: a clean study of a training kind with DSC >= "
             f"{data['criteria']['good_dsc_at_least']}. Cases: {data['n']['bank']} bank signatures, "
             f"{data['n']['validation']} validation, {data['n']['test']} test. Wall time {data['wall_s']:.0f} s on "
             f"{data['machine']['cpus']} CPUs (load {data['machine']['load_before'][0]:.1f} before).", ""]
    for r in sc.get("reduced", []):
        lines.append(f"- reduced: {r}")
    lines += ["", f"**Chosen on validation:** {data['chosen']['label']}.", "", "## On the test range", ""]
    rows = []
    for name, r in data["results"].items():
        t, v = r["test"], r["validation"]
        rows.append([name, r["label"], _pct(t["held_bad"], t["held_bad_ci"]) + f" of {t['n_bad']}",
                     _pct(t["released_good"], t["released_good_ci"]) + f" of {t['n_good']}", fmt(r["auc_test"], 3),
                     _pct(v["held_bad"]), _pct(v["released_good"])])
    lines.append(markdown_table(["design", "", "bad held (95 % CI)", "good released (95 % CI)", "AUC",
                                 "validation: bad held", "validation: good released"], rows))
    lines += ["", "## Per category, test range (OODM / tau)", ""]
    names = list(data["results"])
    cats = data["results"][names[0]]["categories"]
    crow = []
    for i, c in enumerate(cats):
        cells = [c["category"], str(c["n"]), fmt(c["dsc_mean"], 2), str(c["n_bad"])]
        for name in names:
            cc = data["results"][name]["categories"][i]
            cells.append(f"{cc['held']}/{cc['n']} ({fmt(cc['ratio_min'], 2)}-{fmt(cc['ratio_max'], 2)})")
        crow.append(cells)
    lines.append(markdown_table(["category", "n", "DSC", "bad"] + [f"held: {n}" for n in names], crow))
    lines += ["", "## The layer study (chosen spectrum, voxels, bank and threshold; test range)", ""]
    lines.append(markdown_table(["layer", "AUC", "bad held", "good released"],
                                [[r["layer"], fmt(r["auc_test"], 3), _pct(r["held_bad"]), _pct(r["released_good"])]
                                 for r in data["layer_study"]]))
    lines += ["", "## Every design on the validation range (best 15 by J; the choice is the best shippable one)", ""]
    lines.append(markdown_table(["J", "bad held", "good released", "design", "shippable"],
                                [[fmt(t["j"], 3), _pct(t["held_bad"]), _pct(t["released_good"]), t["label"],
                                  "yes" if t["shippable"] else "no"] for t in data["designs_validation"][:15]]))
    lines += ["", "![OODM / tau against DSC](failures_scatter.png)", ""]
    return "\n".join(lines)


def plot_scatter(data: dict[str, Any], path: Path) -> Path:
    """OODM / tau of each test case against its DSC, for the chosen design and version 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("chosen", "version 2") if k in data["results"]]
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        col = f"ratio_{key.replace(' ', '_')}"
        groups: dict[str, list[tuple[float, float]]] = {}
        for c in data["cases"]:
            g = ("clean, training kind" if c["category"].endswith(("clean", "clinical"))
                 else "shifted" if c["shift"] else "other kind")
            groups.setdefault(g, []).append((c["dsc"], c[col]))
        for g, pts in groups.items():
            a = np.array(pts)
            ax.scatter(a[:, 0], a[:, 1], s=14, label=g, alpha=0.8)
        ax.axhline(1.0, color="k", lw=1, ls="--")
        ax.axvline(BAD_DSC, color="r", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("DSC")
        ax.set_ylabel("OODM / tau (held above 1)")
        ax.set_title(f"{key}: {data['results'][key]['label']}", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
