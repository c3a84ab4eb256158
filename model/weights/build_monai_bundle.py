"""Build ``model/weights/monai_liver_ct``: a MONAI bundle made the way another team makes one, to show
the gate behind a model it did not come with (issue 19).

The bundle's ``configs/train.json`` and ``configs/inference.json`` follow the Model Zoo's
``spleen_ct_segmentation`` layout (a MONAI ``UNet``, ``DiceCELoss``, ``SupervisedTrainer`` with a
``ValidationHandler``, ``CheckpointSaver`` keeping the best validation mean Dice as ``models/model.pt``;
``SlidingWindowInferer``, ``Invertd``, ``AsDiscreted`` at inference). This script only writes the training
data and runs the bundle's own training, as its authors would::

    python -m monai.bundle run --config_file configs/train.json --meta_file configs/metadata.json \\
        --bundle_root BUNDLE --dataset_dir DATA

The data: CT liver phantoms (``model.data.phantoms``, kind ``ct_liver``) of seed :data:`SEED` (not the
shipped SegNet's), indices ``0 .. TRAIN + VAL - 1`` in the Decathlon layout (``imagesTr``/``labelsTr``,
one label: the liver); the bundle validates on the last :data:`VAL` of them. Nothing else: no lung, no
MR, no PET. Held-out indices from :data:`HELD_OUT_FIRST` on are never read here
(``bench/external_gate.py`` reports on them).

Run (CPU, 2 cores: about 7 s an epoch)::

    python -m model.weights.build_monai_bundle [--epochs 60] [--out model/weights/monai_liver_ct]

It rewrites ``models/model.pt``, ``configs/metadata.json`` (version, training figures) and
``docs/train_log.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

from model._atomic import atomic_write

SEED = 4242
TRAIN = 20
VAL = 4
HELD_OUT_FIRST = 1000
LABELS = {"0": "background", "1": "liver"}
BUNDLE = Path(__file__).resolve().parent / "monai_liver_ct"


def metadata(train_info: dict[str, object]) -> dict[str, object]:
    """``configs/metadata.json`` in the Model Zoo's schema."""
    return {
        "version": "0.1.0",
        "changelog": {"0.1.0": "trained on specgate CT liver phantoms"},
        "monai_version": version("monai"), "pytorch_version": version("torch"), "numpy_version": np.__version__,
        "required_packages_version": {"pytorch-ignite": version("pytorch-ignite"), "nibabel": version("nibabel")},
        "name": "Phantom liver CT segmentation",
        "task": "Liver segmentation on CT (specgate phantoms)",
        "description": "A MONAI UNet trained with the bundle's own train.json on CT liver phantoms; not for "
                       "clinical use. specgate ships it to show the OOD gate behind a model it did not come with.",
        "authors": "specgate", "copyright": "none",
        "data_source": f"model.data.phantoms ct_liver, seed {SEED}, indices 0-{TRAIN + VAL - 1}",
        "data_type": "nibabel",
        "intended_use": "demonstration and tests only, never diagnosis",
        "train_info": train_info,
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": [64, 64, 48], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 2,
                                 "spatial_shape": [64, 64, 48], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True, "channel_def": dict(LABELS)}},
        },
    }


def write_training_data(root: Path) -> Path:
    """The Decathlon folder the bundle's ``train.json`` globs (``dataset_dir``)."""
    from model.data.phantoms import write_msd_dataset

    return write_msd_dataset(root, "ct_liver", TRAIN + VAL, SEED, progress=True)


_VAL_DICE = re.compile(r"Epoch\[\d+\] Metrics -- val_mean_dice: ([0-9.]+)")
_EPOCH = re.compile(r"Epoch\[(\d+)\] Metrics")


def train(bundle: Path, data: Path, epochs: int) -> dict[str, object]:
    """Run the bundle's own ``train.json`` (``python -m monai.bundle run``); its log in ``docs/``."""
    import torch

    env = {**os.environ, "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "train.json"),
           "--meta_file", str(bundle / "configs" / "metadata.json"), "--bundle_root", str(bundle),
           "--dataset_dir", str(data), "--max_epochs", str(epochs)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - t0
    log = proc.stdout + proc.stderr
    (bundle / "docs").mkdir(exist_ok=True)
    if proc.returncode != 0:
        sys.stderr.write(log[-4000:])
        raise SystemExit(f"the bundle's training failed (exit {proc.returncode})")
    history = [float(m) for m in _VAL_DICE.findall(log)]
    info: dict[str, object] = {"epochs": epochs, "train_cases": TRAIN, "val_cases": VAL, "seed": SEED, "seconds": round(seconds, 1),
            "best_val_mean_dice": max(history) if history else None, "val_dice_history": history,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch_threads": torch.get_num_threads(),
            "command": "python -m monai.bundle run --config_file configs/train.json --meta_file "
                       "configs/metadata.json --bundle_root BUNDLE --dataset_dir DATA --max_epochs "
                       f"{epochs}"}
    lines = [ln for ln in log.splitlines() if _EPOCH.search(ln)]
    atomic_write(bundle / "docs" / "train_log.json", json.dumps({"info": info, "log": lines[-400:]}, indent=1).encode())
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=BUNDLE)
    ap.add_argument("--epochs", type=int, default=50)
    args = ap.parse_args(argv)
    bundle: Path = args.out
    (bundle / "models").mkdir(parents=True, exist_ok=True)
    (bundle / "configs").mkdir(exist_ok=True)
    if bundle.resolve() != BUNDLE:
        for name in ("train.json", "inference.json"):
            shutil.copyfile(BUNDLE / "configs" / name, bundle / "configs" / name)
    atomic_write(bundle / "configs" / "metadata.json", json.dumps(metadata({}), indent=4).encode())
    with tempfile.TemporaryDirectory() as tmp:
        data = write_training_data(Path(tmp))
        info = train(bundle, data, args.epochs)
    atomic_write(bundle / "configs" / "metadata.json", json.dumps(metadata(info), indent=4).encode())
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
