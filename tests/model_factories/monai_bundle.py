"""A real MONAI bundle made with MONAI's own tools, for the adapter's tests and bench.

:func:`write_bundle` writes ``configs/metadata.json`` and ``configs/inference.json`` in the Model Zoo's
layout (the spleen bundle's: ``LoadImaged``, ``EnsureChannelFirstd``, ``Orientationd`` RAS, ``Spacingd``,
``ScaleIntensityRanged``, ``EnsureTyped``; ``SlidingWindowInferer``; ``Activationsd`` softmax, ``Invertd``,
``AsDiscreted`` argmax, ``SaveImaged``; a ``SupervisedEvaluator`` and a ``CheckpointLoader``), trains the
config's own ``network_def`` (a small MONAI ``UNet``) briefly on CT liver phantoms loaded through MONAI
transforms from NIfTI files, and saves ``models/model.pt`` as a state dict, as the zoo does.

Three labels besides background, so that multi-label paths are exercised: ``body`` (inside the body, not
liver), and the liver split at its centre along x into ``liver_part_1`` / ``liver_part_2``.

Training: 4 phantoms, random 32^3 crops, batch 2, Adam lr 1e-2, DiceCE, ``iterations`` steps; about
15 s of 2-core CPU for 120 steps, enough for the body and a rough liver (the tests compare the adapter
with the bundle, not with the truth).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

#: spacing the bundle resamples to (x, y, z mm) and its window
PIXDIM = (4.0, 4.0, 4.0)
ROI = (32, 32, 32)
LABELS = {"0": "background", "1": "body", "2": "liver_part_1", "3": "liver_part_2"}


def nifti_affine(spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """What dcm2niix writes for an axial series with identity direction cosines: LPS flipped to RAS."""
    sz, sy, sx = spacing_zyx
    return np.diag([-sx, -sy, sz, 1.0])


def write_nifti(image_zyx: np.ndarray, spacing_zyx: tuple[float, float, float], path: Path) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(image_zyx.transpose(2, 1, 0)), nifti_affine(spacing_zyx)), str(path))
    return path


def inference_config(*, mode: str = "gaussian", overlap: float = 0.25) -> dict[str, Any]:
    """inference.json, in the spleen bundle's layout."""
    return {
        "imports": ["$import glob", "$import numpy", "$import os"],
        "bundle_root": ".",
        "image_key": "image",
        "output_dir": "$@bundle_root + '/eval'",
        "output_ext": ".nii.gz",
        "output_dtype": "$numpy.uint8",
        "output_postfix": "seg",
        "separate_folder": False,
        "load_pretrain": True,
        "dataset_dir": "/workspace/data/phantoms",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": len(LABELS),
                        "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1, "norm": "batch"},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "@image_key"},
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "@image_key", "pixdim": list(PIXDIM), "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": -200, "a_max": 300,
             "b_min": 0, "b_max": 1, "clip": True},
            {"_target_": "EnsureTyped", "keys": "@image_key"},
        ]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(ROI), "sw_batch_size": 2,
                    "overlap": overlap, "mode": mode},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "@image_key",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_ext": "@output_ext",
             "output_dtype": "@output_dtype", "output_postfix": "@output_postfix",
             "separate_folder": "@separate_folder"},
        ]},
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": True},
        "checkpointloader": {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                             "load_dict": {"model": "@network"}},
        "initialize": ["$monai.utils.set_determinism(seed=123)",
                       "$@checkpointloader(@evaluator) if @load_pretrain else None"],
        "run": ["$@evaluator.run()"],
    }


def metadata() -> dict[str, Any]:
    return {
        "version": "0.1.0", "changelog": {"0.1.0": "phantom test bundle"},
        "monai_version": _version("monai"), "pytorch_version": _version("torch"), "numpy_version": np.__version__,
        "name": "specgate phantom liver CT", "task": "body and liver (split in two) on CT phantoms",
        "description": "a tiny UNet trained briefly on specgate's CT liver phantoms: for tests only",
        "authors": "specgate tests", "copyright": "none", "intended_use": "tests, never diagnosis",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": list(ROI), "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": len(LABELS),
                                 "spatial_shape": list(ROI), "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True, "channel_def": dict(LABELS)}},
        },
    }


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


def training_label(image: np.ndarray, liver: np.ndarray) -> np.ndarray:
    """0 air, 1 body (not liver), 2/3 the liver's halves along x (split at its centre)."""
    from model.preprocess import preprocess
    from model.study_inference import body_mask

    lab = body_mask(preprocess(image, "CT"), "CT").astype(np.uint8)
    xs = np.flatnonzero(liver.any(axis=(0, 1)))
    mid = (xs[0] + xs[-1] + 1) // 2 if xs.size else 0
    x = np.arange(image.shape[2])[None, None, :]
    lab[(liver > 0) & (x < mid)] = 2
    lab[(liver > 0) & (x >= mid)] = 3
    return lab


def write_bundle(root: Path, *, iterations: int = 120, seed: int = 0, n_cases: int = 4,
                 config: dict[str, Any] | None = None) -> Path:
    """A trained bundle at ``root`` (created); returns ``root``."""
    import torch
    from monai.bundle import ConfigParser
    from monai.data import CacheDataset, DataLoader
    from monai.losses import DiceCELoss
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        RandSpatialCropd,
        ScaleIntensityRanged,
        Spacingd,
    )

    from model.data.phantoms import phantom_case

    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(parents=True, exist_ok=True)
    cfg = config or inference_config()
    (root / "configs" / "inference.json").write_text(json.dumps(cfg, indent=2))
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata(), indent=2))

    data = []
    for i in range(n_cases):
        case = phantom_case("ct_liver", seed, i)
        img = write_nifti(case.image, case.spacing, root / "train" / f"img_{i}.nii.gz")
        lab = write_nifti(training_label(case.image, case.label), case.spacing, root / "train" / f"lab_{i}.nii.gz")
        data.append({"image": str(img), "label": str(lab)})
    keys = ["image", "label"]
    pre = Compose([LoadImaged(keys), EnsureChannelFirstd(keys), Orientationd(keys, axcodes="RAS"),
                   Spacingd(keys, pixdim=PIXDIM, mode=("bilinear", "nearest")),
                   ScaleIntensityRanged("image", a_min=-200, a_max=300, b_min=0, b_max=1, clip=True)])
    crop = RandSpatialCropd(keys, roi_size=ROI, random_size=False)
    crop.set_random_state(seed)
    ds = CacheDataset(data, Compose([pre, crop]), progress=False)
    loader = DataLoader(ds, batch_size=2, shuffle=True, num_workers=0,
                        generator=torch.Generator().manual_seed(seed))

    parser = ConfigParser(cfg)
    torch.manual_seed(seed)
    net = parser.get_parsed_content("network_def")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    net.train()
    step = 0
    while step < iterations:
        for batch in loader:
            opt.zero_grad()
            loss = loss_fn(net(batch["image"]), batch["label"])
            loss.backward()
            opt.step()
            step += 1
            if step >= iterations:
                break
    net.eval()
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root
