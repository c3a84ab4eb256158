"""A small nnU-Net v2 trained model folder made with nnU-Net's own tools, on phantoms, for the adapter tests.

1. A raw dataset in nnU-Net's layout (``imagesTr/phantom_XXX_0000.nii.gz``, ``labelsTr``, ``dataset.json``)
   from ``model.data.phantoms`` (``ct_liver``), written with SimpleITK (nnU-Net's default reader).
2. ``nnUNetv2_plan_and_preprocess -c 3d_fullres`` in a child process (nnU-Net reads ``nnUNet_raw``,
   ``nnUNet_preprocessed`` and ``nnUNet_results`` from the environment when it is imported, so a child
   with its own environment keeps the test process free of them).
3. The produced ``nnUNetPlans.json`` shrunk the way a team shrinks a model for a quick experiment: three
   stages, 4/8/16 features, patch 16 x 32 x 32 (so that a phantom needs several overlapping windows).
   Planning and preprocessing depend on spacing and intensities only, not on those fields.
4. Weights: nnU-Net's trainer needs torchvision (through ``timm``), which this environment does not
   install beside the CPU torch, so the network is built from the plans by
   ``nnunetv2.utilities.get_network_from_plans`` and trained a few iterations (Adam, cross-entropy +
   soft Dice) on random patches of the *preprocessed* cases read with ``nnUNetDatasetBlosc2``; it is
   saved in nnU-Net's checkpoint format (the keys of ``nnUNetTrainer.save_checkpoint``). A second fold is
   the same network trained a few more iterations, so fold ensembling is exercised.

The folder is ``<root>/results/Dataset901_SgPhantom/nnUNetTrainer__nnUNetPlans__3d_fullres``. Measured as
the tests' session fixture (30 iterations): the whole test file ran in 24 s on a quiet 2-core machine,
the fixture alone in 60 s (100 s at its busiest) while other runs shared it (load average 8); most of it
is the two child processes' imports and nnU-Net's planning.
The model segments the phantom liver (Dice > 0.5 on a held-out case, asserted by the tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DATASET_ID = 901
DATASET_NAME = f"Dataset{DATASET_ID}_SgPhantom"
TRAINER_FOLDER = "nnUNetTrainer__nnUNetPlans__3d_fullres"
N_CASES = 4
SEED = 0
PATCH = [16, 32, 32]
FEATURES = [4, 8, 16]


@dataclass(frozen=True)
class NnUNetTestModel:
    root: Path
    model_dir: Path
    raw_dir: Path


def _write_nifti(a: np.ndarray, spacing_zyx: tuple[float, float, float], path: Path) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(a)
    img.SetSpacing([float(s) for s in reversed(spacing_zyx)])
    sitk.WriteImage(img, str(path), useCompression=True)


def write_raw_dataset(raw: Path) -> Path:
    from model.data.phantoms import phantom_case

    ds = raw / DATASET_NAME
    (ds / "imagesTr").mkdir(parents=True, exist_ok=True)
    (ds / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i in range(N_CASES):
        case = phantom_case("ct_liver", SEED, i)
        _write_nifti(case.image.astype(np.float32), case.spacing, ds / "imagesTr" / f"phantom_{i:03d}_0000.nii.gz")
        _write_nifti(case.label.astype(np.uint8), case.spacing, ds / "labelsTr" / f"phantom_{i:03d}.nii.gz")
    (ds / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
        "numTraining": N_CASES, "file_ending": ".nii.gz", "name": DATASET_NAME}, indent=2))
    return ds


def nnunet_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"), nnUNet_def_n_proc="1", OMP_NUM_THREADS="2")
    return env


def _shrink_plans(plans: dict[str, Any]) -> dict[str, Any]:
    cfg = plans["configurations"]["3d_fullres"]
    kw = cfg["architecture"]["arch_kwargs"]
    n = len(FEATURES)
    cfg["patch_size"] = list(PATCH)
    cfg["batch_size"] = 2
    kw.update(n_stages=n, features_per_stage=list(FEATURES), kernel_sizes=[[3, 3, 3]] * n,
              strides=[[1, 1, 1]] + [[2, 2, 2]] * (n - 1), n_conv_per_stage=[1] * n,
              n_conv_per_stage_decoder=[1] * (n - 1))
    # only 3d_fullres is kept (the others would name the removed network sizes)
    plans["configurations"] = {"3d_fullres": cfg}
    return plans


_TRAIN = r'''
import json, sys, torch, numpy as np
torch.set_num_threads(2)
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
out, pre, its, seed, folds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
plans = json.load(open(out + "/plans.json")); cfg = plans["configurations"]["3d_fullres"]
a = cfg["architecture"]
torch.manual_seed(seed); rng = np.random.default_rng(seed)
net = get_network_from_plans(a["network_class_name"], a["arch_kwargs"], a["_kw_requires_import"], 1, 2,
                             allow_init=True, deep_supervision=False)
ds = nnUNetDatasetBlosc2(pre)
cases = [ds.load_case(k) for k in ds.identifiers]
cases = [(np.asarray(d[:]), np.asarray(s[:])) for d, s, _, _ in cases]
opt = torch.optim.Adam(net.parameters(), 3e-3)
ps = cfg["patch_size"]
def batch():
    xs, ys = [], []
    for _ in range(2):
        d, s = cases[rng.integers(len(cases))]
        st = [int(rng.integers(0, max(n - p, 0) + 1)) for n, p in zip(d.shape[1:], ps)]
        sl = tuple(slice(a, a + p) for a, p in zip(st, ps))
        x = np.zeros((1, *ps), np.float32); y = np.zeros((1, *ps), np.int64)
        xd, yd = d[(slice(None), *sl)], s[(slice(None), *sl)]
        x[(slice(None), *[slice(0, n) for n in xd.shape[1:]])] = xd
        y[(slice(None), *[slice(0, n) for n in yd.shape[1:]])] = np.maximum(yd, 0)
        xs.append(x); ys.append(y)
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))[:, 0]
def train(n):
    net.train()
    for _ in range(n):
        x, y = batch()
        logits = net(x)
        p = torch.softmax(logits, 1)[:, 1]; t = (y == 1).float()
        dice = (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
        loss = torch.nn.functional.cross_entropy(logits, y) + 1 - dice
        opt.zero_grad(); loss.backward(); opt.step()
    return float(loss)
dsj = json.load(open(out + "/dataset.json"))
def save(fold, epoch):
    import os
    os.makedirs(f"{out}/fold_{fold}", exist_ok=True)
    torch.save({"network_weights": net.state_dict(), "optimizer_state": opt.state_dict(),
                "grad_scaler_state": None, "logging": {}, "_best_ema": None, "current_epoch": epoch,
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": fold,
                              "dataset_json": dsj, "device": "cpu"},
                "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2)},
               f"{out}/fold_{fold}/checkpoint_final.pth")
print("fold 0 loss", train(its)); save(0, its)
if folds > 1:
    print("fold 1 loss", train(its // 3)); save(1, its + its // 3)
'''


def build_nnunet_model(root: Path, iterations: int = 60, *, folds: int = 2) -> NnUNetTestModel:
    """Raw dataset -> nnU-Net planning and preprocessing -> shrunk plans -> short training -> model folder
    with ``folds`` folds (1 or 2: a site that trained fold 0 only, or two folds to ensemble)."""
    if folds not in (1, 2):
        raise ValueError(f"folds must be 1 or 2, got {folds!r}")
    env = nnunet_env(root)
    ds = write_raw_dataset(root / "raw")
    py = sys.executable
    subprocess.run([py, "-c", "from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import "
                    "plan_and_preprocess_entry; plan_and_preprocess_entry()",
                    "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1", "-npfp", "1",
                    "--verify_dataset_integrity"],
                   env=env, check=True, capture_output=True, text=True)
    pre = root / "preprocessed" / DATASET_NAME
    plans = _shrink_plans(json.loads((pre / "nnUNetPlans.json").read_text()))
    out = root / "results" / DATASET_NAME / TRAINER_FOLDER
    out.mkdir(parents=True, exist_ok=True)
    (out / "plans.json").write_text(json.dumps(plans, indent=2))
    (out / "dataset.json").write_text((ds / "dataset.json").read_text())
    (out / "dataset_fingerprint.json").write_text((pre / "dataset_fingerprint.json").read_text())
    subprocess.run([py, "-c", _TRAIN, str(out), str(pre / "nnUNetPlans_3d_fullres"), str(iterations), str(SEED), str(folds)],
                   env=env, check=True, capture_output=True, text=True)
    return NnUNetTestModel(root=root, model_dir=out, raw_dir=ds)
