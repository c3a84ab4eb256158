"""One clinical-size CT through the nnU-Net v2 adapter and through nnU-Net's own ``nnUNetPredictor``, in
the same run: both times, their ratio, each one's peak memory, and whether the label maps are equal.

    .venv/bin/python bench/adapter_nnunet.py                          # 300x512x512 CT, 1.0 x 0.7 x 0.7 mm
    .venv/bin/python bench/adapter_nnunet.py --shape 120 512 512      # a quicker look
    .venv/bin/python bench/adapter_nnunet.py --model DIR --folds 0 1  # a trained model folder of your own
    .venv/bin/python bench/adapter_nnunet.py --no-mirroring           # both sides without test-time mirroring
    .venv/bin/python bench/adapter_nnunet.py --classes 16             # a 16-output head: memory with many labels

Without ``--model`` the phantom model of the tests is built first (nnU-Net's own planning and
preprocessing, a short training: ``tests/model_factories/nnunet_model.py``; 5 x 4 x 4 mm, 2 labels). The
CT is the held-out liver phantom re-gridded to the scanner geometry (``model.data.clinical``). Each side
runs in a fresh child process (``ru_maxrss`` is its own; the resident size after the imports and the
model load is printed too, so the share of one study is visible):

- specgate: ``NnUNetAdapter.open`` then ``predict`` (nnU-Net's preprocessing, sliding window with the
  signature hook, export by class; the gate's distance to a bank is not included: this model has none);
- nnU-Net: ``nnUNetPredictor.initialize_from_trained_model_folder`` then ``predict_single_npy_array``
  (its preprocessing, sliding window, ``convert_predicted_logits_to_segmentation_with_correct_shape``).

Same folds, step size, Gaussian and mirroring on both sides. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_mb() -> float:
    """Peak resident memory of this process since its ``exec`` (``VmHWM``; ``ru_maxrss`` would carry the
    parent's peak over from the fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def many_class_model(src: Path, dst: Path, n_classes: int) -> Path:
    """``src``'s network with a segmentation head of ``n_classes`` outputs: the trained background and
    first label, the others drawn (seed 0) at a tenth of their scale, so that the label map stays mostly the
    trained one while every class's logits exist (what memory and time depend on, as for
    TotalSegmentator's 105 outputs)."""
    import shutil

    import torch

    dst.mkdir(parents=True)
    ds = json.loads((src / "dataset.json").read_text())
    ds["labels"] = {"background": 0, **{f"class_{i}": i for i in range(1, n_classes)}}
    (dst / "dataset.json").write_text(json.dumps(ds))
    shutil.copy(src / "plans.json", dst / "plans.json")
    g = torch.Generator().manual_seed(0)
    for fold in sorted(p.parent.name for p in src.glob("fold_*/checkpoint_final.pth")):
        ck = torch.load(src / fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        w = ck["network_weights"]
        for k in [k for k in w if k.startswith("decoder.seg_layers.")]:
            old = w[k]
            new = torch.randn((n_classes, *old.shape[1:]), generator=g) * 0.1 * old.std()
            new[: old.shape[0]] = old
            w[k] = new
        ck["init_args"]["dataset_json"] = ds
        (dst / fold).mkdir()
        torch.save(ck, dst / fold / "checkpoint_final.pth")
    return dst


def child(side: str, model: Path, ct: Path, folds: list[int], threads: int, mirroring: bool, out: Path) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    image = np.load(ct / "image.npy", mmap_mode="r")
    spacing = json.loads((ct / "spacing.json").read_text())
    t0 = time.perf_counter()
    if side == "specgate":
        from model.adapters.nnunet import NnUNetAdapter

        adapter = NnUNetAdapter.open(model, folds=tuple(folds), use_mirroring=mirroring)
        loaded, t1 = _rss_mb(), time.perf_counter()
        pred = adapter.predict(np.asarray(image), spacing, "CT")
        labels, extra = pred.labels, {"stages": pred.timings, "windows": pred.evidence["windows"]}
    else:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                            perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
        p.initialize_from_trained_model_folder(str(model), use_folds=tuple(folds), checkpoint_name="checkpoint_final.pth")
        loaded, t1 = _rss_mb(), time.perf_counter()
        labels = p.predict_single_npy_array(np.asarray(image, np.float32)[None], {"spacing": spacing})
        extra = {}
    t2 = time.perf_counter()
    np.save(out / f"{side}.npy", labels)
    (out / f"{side}.json").write_text(json.dumps({"load_s": t1 - t0, "predict_s": t2 - t1, "rss_loaded_mb": loaded,
                                                  "peak_mb": _rss_mb(), **extra}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512])
    ap.add_argument("--spacing", type=float, nargs=3, default=[1.0, 0.7, 0.7])
    ap.add_argument("--model", type=Path, help="an nnU-Net v2 trained model folder (default: the tests' phantom model)")
    ap.add_argument("--folds", type=int, nargs="+", default=[0])
    ap.add_argument("--classes", type=int, default=0,
                    help="widen the model's segmentation head to this many outputs (memory with many labels)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-mirroring", action="store_true", help="both sides without test-time mirroring (8x fewer passes)")
    ap.add_argument("--child", nargs=4, metavar=("SIDE", "MODEL", "CT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        side, model, ct, out = args.child
        child(side, Path(model), Path(ct), args.folds, args.threads, not args.no_mirroring, Path(out))
        return

    import numpy as np

    from model.data.clinical import Geometry, clinical_case
    from model.weights.build import EVAL_FIRST_INDEX, SEED

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        model = args.model
        if model is None:
            from tests.model_factories.nnunet_model import build_nnunet_model

            print("building the phantom nnU-Net model (nnU-Net planning + preprocessing, short training) ...", flush=True)
            t = time.perf_counter()
            model = build_nnunet_model(tmp / "nnunet").model_dir
            print(f"  {time.perf_counter() - t:.0f} s", flush=True)
        if args.classes:
            model = many_class_model(model, tmp / "many", args.classes)
        shape, spacing = tuple(args.shape), tuple(args.spacing)
        print(f"writing a {shape} CT at {spacing} mm ...", flush=True)
        case, _ = clinical_case("ct_liver", SEED, EVAL_FIRST_INDEX, geometry=Geometry(shape, spacing, (0.0, 0.0, 0.0)))
        ct = tmp / "ct"
        ct.mkdir()
        np.save(ct / "image.npy", case.image.astype(np.float32))
        (ct / "spacing.json").write_text(json.dumps(list(case.spacing)))
        del case
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        res = {}
        for side in ("nnunet", "specgate"):
            print(f"running {side} ...", flush=True)
            subprocess.run([sys.executable, __file__, "--folds", *map(str, args.folds), "--threads", str(args.threads),
                            *(["--no-mirroring"] if args.no_mirroring else []),
                            "--child", side, str(model), str(ct), str(tmp)], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            res[side] = json.loads((tmp / f"{side}.json").read_text())
        equal = bool(np.array_equal(np.load(tmp / "specgate.npy"), np.load(tmp / "nnunet.npy")))
    n_out = args.classes or "the model's"
    print(f"\nCT {shape} at {spacing} mm, {n_out} classes, folds {args.folds}, mirroring {not args.no_mirroring}, "
          f"{args.threads} threads")
    for side in ("nnunet", "specgate"):
        r = res[side]
        print(f"  {side:9s} load {r['load_s']:6.1f} s   predict {r['predict_s']:6.1f} s   "
              f"peak RSS after load {r['rss_loaded_mb']:6.0f} MB, at the end {r['peak_mb']:6.0f} MB"
              + (f"   stages {json.dumps({k: round(v, 1) for k, v in r['stages'].items()})}" if "stages" in r else ""))
    ratio = res["specgate"]["predict_s"] / res["nnunet"]["predict_s"]
    print(f"  ratio specgate / nnU-Net (predict): {ratio:.2f}   peak share of one study: "
          f"specgate {res['specgate']['peak_mb'] - res['specgate']['rss_loaded_mb']:.0f} MB, "
          f"nnU-Net {res['nnunet']['peak_mb'] - res['nnunet']['rss_loaded_mb']:.0f} MB")
    print(f"  label maps equal voxel for voxel: {equal}")


if __name__ == "__main__":
    main()
