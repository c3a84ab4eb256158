"""Multi-dataset ("multi-task") training, paper sections III-B and III-C.

- Several datasets at once, one segmentation head, no input naming the organ or modality. Dataset ``i``
  is drawn with probability ``sqrt(n_i) / sum_j sqrt(n_j)`` (:func:`sampling_probabilities`; the paper's
  example: 10 and 100 images -> 0.24 and 0.76), then a case uniformly within it.
- Random blocks (``block`` voxels, 96 in the paper; a parameter, CPU runs use smaller ones), random
  flips and 90-degree rotations in all planes, additive Gaussian noise; batch of one block by default.
- Negative soft Dice loss on the foreground; Adam at 1e-4.
- Every ``eval_every`` iterations (2000) the loss is evaluated (on fixed validation blocks when a
  validation fold exists, else the mean training loss of the interval). Without improvement the learning
  rate is multiplied by 0.9; after ``patience`` (2) evaluations in a row without improvement training stops.
- Outlier Exposure (Hendrycks, Mazeika & Dietterich, ICLR 2019; the paper's baseline (d)), when
  ``TrainConfig.outlier_weight`` > 0: each step also draws a block of an *outlier* dataset (``train(...,
  outliers=...)``: the paper uses every dataset other than the in-distribution ones) and adds
  ``outlier_weight * outlier_exposure_loss`` on it, which pushes its predictions towards uniform.
- Patient-wise k-fold splits (:func:`kfold_splits`); a seed that makes runs repeatable; a checkpoint at
  every evaluation and ``resume``; a progress bar.

Randomness is drawn from one ``numpy.random.Generator`` (seeded by ``TrainConfig.seed``); draws are kept
apart from the computation (:func:`draw_augmentation` -> :func:`apply_augmentation`). The generator's
state is saved in the checkpoint, so a resumed run continues the same sequence.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model._atomic import atomic_write
from model.preprocess import preprocess
from model.unet import SegNet, save_weights

__all__ = [
    "AugmentParams",
    "DatasetSampler",
    "TrainConfig",
    "TrainData",
    "TrainResult",
    "apply_augmentation",
    "dice_loss",
    "draw_augmentation",
    "kfold_splits",
    "outlier_exposure_loss",
    "sampling_probabilities",
    "train",
]


# ----------------------------------------------------------------------------------------------------
# sampling


def sampling_probabilities(sizes: Sequence[int]) -> np.ndarray:
    """Probability of drawing each dataset: proportional to the square root of its size."""
    n = np.asarray(sizes, dtype=np.float64)
    if n.ndim != 1 or n.size == 0 or np.any(n < 1):
        raise ValueError(f"dataset sizes must be positive integers, got {list(sizes)}")
    w = np.sqrt(n)
    return w / w.sum()


class DatasetSampler:
    """Draws ``(dataset index, case index)``: dataset by :func:`sampling_probabilities`, case uniformly."""

    def __init__(self, sizes: Sequence[int]) -> None:
        self.sizes = [int(s) for s in sizes]
        self.p = sampling_probabilities(self.sizes)

    def draw(self, rng: np.random.Generator) -> tuple[int, int]:
        d = int(rng.choice(len(self.sizes), p=self.p))
        return d, int(rng.integers(self.sizes[d]))


def kfold_splits(
    names: Sequence[str],
    k: int,
    seed: int,
    patient_of: Callable[[str], str] | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Patient-wise k-fold: ``[(train indices, validation indices)] * k``.

    All cases of one patient (``patient_of(name)``, default: the name itself) fall in the same fold.
    Patients are shuffled with ``seed`` and dealt round-robin to the folds.
    """
    if k < 2:
        raise ValueError(f"k must be >= 2 for a k-fold split, got {k}")
    key = patient_of or (lambda s: s)
    patients = sorted({key(n) for n in names})
    if len(patients) < k:
        raise ValueError(f"{len(patients)} patients cannot fill {k} folds")
    order = np.random.default_rng(seed).permutation(len(patients))
    fold_of = {patients[p]: i % k for i, p in enumerate(order)}
    splits = []
    for f in range(k):
        val = [i for i, n in enumerate(names) if fold_of[key(n)] == f]
        tr = [i for i, n in enumerate(names) if fold_of[key(n)] != f]
        splits.append((tr, val))
    return splits


# ----------------------------------------------------------------------------------------------------
# augmentation


@dataclass(frozen=True)
class AugmentParams:
    """One draw of the augmentation: applied in this order (flips, rotations, noise)."""

    flips: tuple[bool, bool, bool]
    rotations: tuple[int, int, int]  # quarter turns in the (y,x), (z,x), (z,y) planes
    noise_std: float
    noise_seed: int


def draw_augmentation(rng: np.random.Generator, noise_max: float = 0.05) -> AugmentParams:
    return AugmentParams(
        flips=tuple(bool(b) for b in rng.integers(0, 2, 3)),  # type: ignore[arg-type]
        rotations=tuple(int(r) for r in rng.integers(0, 4, 3)),  # type: ignore[arg-type]
        noise_std=float(rng.uniform(0.0, noise_max)),
        noise_seed=int(rng.integers(2**31)),
    )


_PLANES = ((-2, -1), (-3, -1), (-3, -2))


def apply_augmentation(x: torch.Tensor, y: torch.Tensor, a: AugmentParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``a`` to an image block ``x`` and its label ``y`` (``(..., z, y, x)``, cubic for rotations)."""
    dims = [d for d, f in zip((-3, -2, -1), a.flips, strict=True) if f]
    if dims:
        x, y = torch.flip(x, dims), torch.flip(y, dims)
    for k, plane in zip(a.rotations, _PLANES, strict=True):
        if k:
            x, y = torch.rot90(x, k, plane), torch.rot90(y, k, plane)
    if a.noise_std > 0:
        g = torch.Generator(device=x.device).manual_seed(a.noise_seed)
        x = x + a.noise_std * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
    return x, y


# ----------------------------------------------------------------------------------------------------
# loss


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Negative soft Dice of the foreground probability (per block, averaged over the batch)."""
    p = torch.softmax(logits.float(), dim=1)[:, 1]
    t = target.float()
    dims = tuple(range(1, p.ndim))
    inter = (p * t).sum(dims)
    return -((2 * inter + smooth) / (p.sum(dims) + t.sum(dims) + smooth)).mean()


def outlier_exposure_loss(logits: torch.Tensor) -> torch.Tensor:
    """Outlier Exposure's term (Hendrycks et al. 2019, Eq. 1 with their classification choice): the
    cross-entropy from the uniform distribution ``U`` to the softmax of every voxel, less its minimum
    ``log K``, i.e. ``KL(U || p) = -(1/K) sum_k log p_k - log K``, averaged over the voxels and the batch.

    Zero exactly when every voxel's prediction is uniform, positive otherwise; its gradient is the
    cross-entropy's (the constant changes nothing in training, only makes the term read as a distance).

    >>> float(outlier_exposure_loss(torch.zeros(1, 2, 2, 2, 2)))
    0.0
    """
    logp = torch.log_softmax(logits.float(), dim=1)
    return -logp.mean(dim=1).mean() - math.log(logits.shape[1])


# ----------------------------------------------------------------------------------------------------
# data


@dataclass
class TrainData:
    """Preprocessed cases of several datasets, held as tensors (on the training device)."""

    names: list[str]  # dataset names
    images: list[list[torch.Tensor]]  # per dataset, per case: (z, y, x) float32, padded to >= block
    labels: list[list[torch.Tensor]]  # same shapes, uint8
    case_names: list[list[str]]

    @classmethod
    def from_cases(
        cls,
        datasets: Mapping[str, Sequence[Any]],
        block: int,
        device: str | torch.device = "cpu",
    ) -> TrainData:
        """``datasets``: name -> cases with ``image``, ``label``, ``modality`` and ``name`` attributes
        (:class:`model.data.volumes.Case` or :class:`model.data.phantoms.PhantomCase`)."""
        names, images, labels, case_names = [], [], [], []
        for dname, cases in datasets.items():
            if len(cases) == 0:
                raise ValueError(f"dataset {dname!r} has no cases")
            imgs: list[torch.Tensor] = []
            labs: list[torch.Tensor] = []
            cn: list[str] = []
            for c in cases:
                if c.label is None:
                    raise ValueError(f"dataset {dname!r}: case without a label")
                img = preprocess(c.image, c.modality)
                lab = np.asarray(c.label, dtype=np.uint8)
                pad = [(0, max(0, block - n)) for n in img.shape]
                if any(p[1] for p in pad):
                    img, lab = np.pad(img, pad), np.pad(lab, pad)
                imgs.append(torch.from_numpy(np.ascontiguousarray(img)).to(device))
                labs.append(torch.from_numpy(np.ascontiguousarray(lab)).to(device))
                cn.append(str(getattr(c, "name", None) or f"{getattr(c, 'kind', dname)}_{getattr(c, 'index', len(cn))}"))
            names.append(dname)
            images.append(imgs)
            labels.append(labs)
            case_names.append(cn)
        return cls(names, images, labels, case_names)

    def subset(self, keep: list[list[int]]) -> TrainData:
        return TrainData(
            self.names,
            [[im[i] for i in k] for im, k in zip(self.images, keep, strict=True)],
            [[lb[i] for i in k] for lb, k in zip(self.labels, keep, strict=True)],
            [[cn[i] for i in k] for cn, k in zip(self.case_names, keep, strict=True)],
        )

    @property
    def sizes(self) -> list[int]:
        return [len(x) for x in self.images]


def _crop(img: torch.Tensor, lab: torch.Tensor, block: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = [int(rng.integers(0, n - block + 1)) for n in img.shape]
    sl = tuple(slice(s, s + block) for s in starts)
    return img[sl], lab[sl]


# ----------------------------------------------------------------------------------------------------
# training


@dataclass
class TrainConfig:
    block: int = 96
    batch_size: int = 1
    lr: float = 1e-4
    lr_decay: float = 0.9
    eval_every: int = 2000
    patience: int = 2
    max_iterations: int = 100_000
    max_minutes: float | None = None
    seed: int = 0
    folds: int = 1  # 1: no split, train on everything; >= 2: patient-wise k-fold
    fold: int = 0
    val_blocks: int = 4  # fixed validation blocks per validation case
    noise_max: float = 0.05
    amp: bool | None = None  # bf16 autocast; default: on CUDA
    base_features: int = 14
    levels: int = 4
    dropout: float = 0.0
    #: Outlier Exposure: the weight of :func:`outlier_exposure_loss` on outlier blocks (0: off; Hendrycks
    #: et al. use 0.5 for classification)
    outlier_weight: float = 0.0


@dataclass
class TrainResult:
    weights: Path
    weights_sha256: str
    iterations: int
    best_loss: float
    history: list[dict[str, float]] = field(default_factory=list)
    stopped: str = ""


def _rng_state(rng: np.random.Generator) -> str:
    return json.dumps(rng.bit_generator.state)


def _evaluate(net: SegNet, blocks: list[tuple[torch.Tensor, torch.Tensor]], amp: bool) -> float:
    was = net.training
    net.eval()
    losses = []
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=amp):
        for x, y in blocks:
            losses.append(float(dice_loss(net(x[None, None]), y[None])))
    net.train(was)
    return float(np.mean(losses))


def _use_amp(cfg: TrainConfig, dev: torch.device) -> bool:
    """Whether to train under bf16 autocast; refuses settings that cannot run."""
    amp = (dev.type == "cuda") if cfg.amp is None else cfg.amp
    if amp and dev.type != "cuda":
        raise ValueError("mixed precision training is supported on CUDA only")
    if cfg.block % 2 ** (cfg.levels - 1):
        raise ValueError(f"block {cfg.block} must be a multiple of {2 ** (cfg.levels - 1)} for levels={cfg.levels}")
    return amp


def _split(data: TrainData, cfg: TrainConfig) -> tuple[TrainData, TrainData | None]:
    """(training data, validation data): fold ``cfg.fold`` of a patient-wise split per dataset, or all
    the data and no validation when ``cfg.folds`` < 2."""
    if cfg.folds < 2:
        return data, None
    keep_tr, keep_val = [], []
    for cn in data.case_names:
        tr, val = kfold_splits(cn, cfg.folds, cfg.seed)[cfg.fold]
        keep_tr.append(tr)
        keep_val.append(val)
    return data.subset(keep_tr), data.subset(keep_val)


def _validation_blocks(val_data: TrainData | None, cfg: TrainConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``cfg.val_blocks`` fixed random blocks per validation case, from a generator of their own."""
    blocks: list[tuple[torch.Tensor, torch.Tensor]] = []
    if val_data is None:
        return blocks
    vrng = np.random.default_rng([cfg.seed, 1])
    for imgs, labs in zip(val_data.images, val_data.labels, strict=True):
        for im, lb in zip(imgs, labs, strict=True):
            blocks += [_crop(im, lb, cfg.block, vrng) for _ in range(cfg.val_blocks)]
    return blocks


class _Run:
    """One training run: the network, its optimizer and generators, and how far it has come (what the
    checkpoint holds)."""

    def __init__(self, cfg: TrainConfig, dev: torch.device, amp: bool, train_data: TrainData,
                 val_blocks: list[tuple[torch.Tensor, torch.Tensor]], rng: np.random.Generator,
                 out_dir: Path, outliers: TrainData | None = None) -> None:
        self.cfg, self.dev, self.amp, self.rng = cfg, dev, amp, rng
        self.train_data, self.val_blocks = train_data, val_blocks
        self.outliers = outliers
        self.outlier_sampler = DatasetSampler(outliers.sizes) if outliers is not None else None
        self.net = SegNet(1, 2, cfg.base_features, cfg.levels, cfg.dropout).to(dev)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        self.sampler = DatasetSampler(train_data.sizes)
        self.checkpoint_path = out_dir / "checkpoint.pt"
        self.best_path = out_dir / "best.pt"
        self.meta: dict[str, Any] = {"datasets": dict(zip(train_data.names, train_data.sizes, strict=True)),
                                     "config": asdict(cfg)}
        if outliers is not None:
            self.meta["outliers"] = dict(zip(outliers.names, outliers.sizes, strict=True))
        self.iteration, self.best, self.bad = 0, math.inf, 0  # bad: evaluations in a row without improvement
        self.history: list[dict[str, float]] = []

    def resume(self) -> None:
        """Continue from the checkpoint; refused when it was written with other settings (the iteration
        and time budgets may change)."""
        ckpt = self.checkpoint_path
        if not ckpt.is_file():
            raise FileNotFoundError(f"cannot resume: {ckpt} does not exist")
        st = torch.load(ckpt, map_location=self.dev, weights_only=True)
        saved, now = json.loads(st["config"]), asdict(self.cfg)
        saved.setdefault("outlier_weight", 0.0)  # checkpoints from before Outlier Exposure trained without it
        for k in ("max_iterations", "max_minutes"):  # the budget may change on resume, nothing else
            saved.pop(k, None)
            now.pop(k, None)
        if saved != now:
            diff = sorted(k for k in now if saved.get(k) != now[k])
            raise ValueError(f"cannot resume: the checkpoint was written with other settings ({', '.join(diff)})")
        self.net.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.rng.bit_generator.state = json.loads(st["rng"])
        torch.set_rng_state(st["torch_rng"])
        self.iteration, self.best, self.bad = int(st["iteration"]), float(st["best"]), int(st["bad"])
        self.history = json.loads(st["history"])

    def step(self) -> float:
        """One optimizer step on a batch of random, augmented blocks; return its loss."""
        cfg, rng, data = self.cfg, self.rng, self.train_data
        xs, ys = [], []
        for _ in range(cfg.batch_size):
            d, i = self.sampler.draw(rng)
            x, y = _crop(data.images[d][i], data.labels[d][i], cfg.block, rng)
            x, y = apply_augmentation(x, y, draw_augmentation(rng, cfg.noise_max))
            xs.append(x)
            ys.append(y)
        n_out = 0
        if self.outliers is not None and self.outlier_sampler is not None:  # Outlier Exposure
            n_out = cfg.batch_size
            for _ in range(n_out):
                d, i = self.outlier_sampler.draw(rng)
                x, y = _crop(self.outliers.images[d][i], self.outliers.labels[d][i], cfg.block, rng)
                xs.append(apply_augmentation(x, y, draw_augmentation(rng, cfg.noise_max))[0])
        xb = torch.stack(xs)[:, None]
        yb = torch.stack(ys)
        with torch.autocast("cuda", torch.bfloat16, enabled=self.amp):
            logits = self.net(xb)  # instance normalisation: each block is normalised on its own
        loss = dice_loss(logits[: len(ys)], yb)
        if n_out:
            loss = loss + cfg.outlier_weight * outlier_exposure_loss(logits[len(ys):])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.iteration += 1
        return float(loss.detach())

    def evaluate(self, interval: list[float], t0: float) -> None:
        """End of an interval: keep the best weights, or decay the learning rate; record the interval
        (``t0``: when this call of :func:`train` started)."""
        score = _evaluate(self.net, self.val_blocks, self.amp) if self.val_blocks else float(np.mean(interval))
        lr = self.opt.param_groups[0]["lr"]
        if score < self.best:
            self.best, self.bad = score, 0
            save_weights(self.net, self.best_path, {**self.meta, "iteration": self.iteration, "loss": score})
        else:
            self.bad += 1
            for g in self.opt.param_groups:
                g["lr"] = lr * self.cfg.lr_decay
        self.history.append({"iteration": self.iteration, "train_loss": float(np.mean(interval)),
                             "eval_loss": score, "lr": lr, "minutes": (time.monotonic() - t0) / 60})

    def save_checkpoint(self) -> None:
        state = {
            "model": self.net.state_dict(),
            "optimizer": self.opt.state_dict(),
            "rng": _rng_state(self.rng),
            "torch_rng": torch.get_rng_state(),
            "iteration": self.iteration,
            "best": self.best,
            "bad": self.bad,
            "history": json.dumps(self.history),
            "config": json.dumps(asdict(self.cfg)),
        }
        atomic_write(self.checkpoint_path, partial(torch.save, state))


def train(
    data: TrainData,
    out: str | os.PathLike[str],
    config: TrainConfig | None = None,
    device: str | torch.device = "cpu",
    resume: bool = False,
    progress: bool = True,
    outliers: TrainData | None = None,
) -> TrainResult:
    """Train a :class:`SegNet` on ``data``; write ``checkpoint.pt``, ``best.pt`` (weights) and
    ``train_log.json`` into ``out``. With ``resume``, continue from ``out/checkpoint.pt``.

    ``outliers``: the Outlier Exposure datasets (their labels are not used), required exactly when
    ``config.outlier_weight`` > 0.
    """
    cfg = config or TrainConfig()
    if cfg.outlier_weight < 0 or not math.isfinite(cfg.outlier_weight):
        raise ValueError(f"outlier_weight must be >= 0, got {cfg.outlier_weight}")
    if cfg.outlier_weight > 0 and outliers is None:
        raise ValueError(f"outlier_weight {cfg.outlier_weight} needs outlier datasets: train(..., outliers=...)")
    if outliers is not None and cfg.outlier_weight == 0:
        raise ValueError("outlier datasets were given but outlier_weight is 0: set TrainConfig.outlier_weight")
    dev = torch.device(device)
    amp = _use_amp(cfg, dev)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    train_data, val_data = _split(data, cfg)
    run = _Run(cfg, dev, amp, train_data, _validation_blocks(val_data, cfg), rng, out_dir, outliers)
    if resume:
        run.resume()

    t0 = time.monotonic()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_iterations, initial=run.iteration, desc="train", unit="it")
    stopped = "max_iterations"
    interval: list[float] = []
    run.net.train()
    while run.iteration < cfg.max_iterations:
        interval.append(run.step())
        it = run.iteration
        if bar is not None:
            bar.update(1)
            if it % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(interval[-50:]):.3f}", lr=f"{run.opt.param_groups[0]['lr']:.1e}")
        out_of_time = cfg.max_minutes is not None and (time.monotonic() - t0) / 60 > cfg.max_minutes
        if it % cfg.eval_every == 0 or out_of_time or it == cfg.max_iterations:
            run.evaluate(interval, t0)
            interval = []
            run.save_checkpoint()
            if run.bad >= cfg.patience:
                stopped = f"no improvement in {cfg.patience} evaluations"
                break
            if out_of_time:
                stopped = "max_minutes"
                break
    if bar is not None:
        bar.close()
    return _finish(run, out_dir, stopped)


def _finish(run: _Run, out_dir: Path, stopped: str) -> TrainResult:
    """The result, and ``train_log.json``; best weights are written even when no evaluation happened."""
    if not run.best_path.is_file():  # no evaluation happened (max_iterations < eval_every and 0 iterations)
        save_weights(run.net, run.best_path, {**run.meta, "iteration": run.iteration})
    from model.ood import sha256_file

    result = TrainResult(run.best_path, sha256_file(run.best_path), run.iteration, run.best, run.history, stopped)
    atomic_write(out_dir / "train_log.json", json.dumps(
        {"config": asdict(run.cfg), "datasets": run.meta["datasets"], "iterations": run.iteration,
         "best_loss": run.best, "stopped": stopped, "history": run.history,
         "weights_sha256": result.weights_sha256}, indent=2).encode())
    return result
