"""One clinical-size CT through a MONAI bundle: specgate's adapter against the bundle's own run, same volume,
same machine, same invocation: time, ratio, peak memory and whether the label maps agree.

    .venv/bin/python bench/adapter_monai.py                      # 300x512x512 CT, 1.0 x 0.703125 x 0.703125 mm
    .venv/bin/python bench/adapter_monai.py --shape 120 512 512  # a quicker look
    .venv/bin/python bench/adapter_monai.py --bundle DIR         # another bundle (default: the tests' phantom one)

The CT is the held-out liver phantom re-gridded to the scanner geometry (``model.data.clinical``), kept as
a ``.npy`` for the adapter and as an uncompressed NIfTI (the affine ``dcm2niix`` would write) for the
bundle. The default bundle is the tests' (``tests/model_factories/monai_bundle.py``: a small MONAI UNet at
4 mm, 32^3 windows, trained briefly here); the spacing 0.703125 mm is exact in a NIfTI's float32 affine.

Each side runs in a fresh child process (its peak resident memory is its own ``ru_maxrss``):

- ``adapter``: ``MonaiBundleAdapter.open`` then ``predict`` on the array (preprocessing without
  ``LoadImaged``, the inferer with the signature hook, the postprocessing without ``SaveImaged``, the
  inversion one channel at a time). The gate's OODM (a distance to the bank) is not included: this
  bundle has no bank, and it is microseconds next to the rest.
- ``bundle``: ``monai.bundle.ConfigWorkflow`` on ``configs/inference.json`` as its authors run it
  (``initialize`` then ``run``: LoadImaged of the NIfTI, the evaluator, SaveImaged with ``output_ext``
  ``.nii``, so that gzip does not count against it).

Printed, never asserted. Measured (2026-12-05, the tests' bundle, 2 torch threads on a shared 2-core machine
under load, so the seconds are loose and the ratio is the number to read), 300x512x512 at 1.0 x 0.703 x 0.703 mm:
adapter 60.3 s (preprocess 13.0, infer 9.5, postprocess 32.6), bundle run 58.6 s, ratio 1.03; peak
5065 MB vs 4754 MB; 0 of 78,643,200 voxels differ. Both are dominated by ``Invertd`` bringing the
per-class probabilities back onto the 78.6 M source voxels (MONAI builds a resampling grid over all of
them, about 35 bytes a voxel): the adapter keeps the bundle's own inversion, so it keeps its cost.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_ct(root: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
    import numpy as np

    from model.data.clinical import Geometry, clinical_case
    from model.weights.build import EVAL_FIRST_INDEX, SEED
    from tests.model_factories.monai_bundle import write_nifti

    case, _ = clinical_case("ct_liver", SEED, EVAL_FIRST_INDEX, geometry=Geometry(shape, spacing, (0.0, 0.0, 0.0)))
    np.save(root / "ct.npy", case.image.astype(np.float32))
    (root / "ct.json").write_text(json.dumps({"spacing": list(case.spacing)}))
    write_nifti(case.image.astype(np.float32), case.spacing, root / "nifti" / "ct.nii")


def child_adapter(bundle: Path, root: Path, threads: int) -> None:
    import numpy as np
    import torch

    from model.adapters.monai_bundle import MonaiBundleAdapter

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    adapter = MonaiBundleAdapter.open(bundle)
    t_open = time.perf_counter() - t0
    image = np.load(root / "ct.npy")
    spacing = json.loads((root / "ct.json").read_text())["spacing"]
    t0 = time.perf_counter()
    pred = adapter.predict(image, spacing, "CT")
    t_predict = time.perf_counter() - t0
    np.save(root / "adapter_labels.npy", pred.labels)
    report = {"open": t_open, "predict": t_predict, "timings": pred.timings, "evidence": pred.evidence,
              "signature_voxels": pred.n_signature_voxels, "threads": torch.get_num_threads(),
              "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    (root / "adapter.json").write_text(json.dumps(report, default=str))


def child_bundle(bundle: Path, root: Path, threads: int) -> None:
    import torch
    from monai.bundle import ConfigWorkflow

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    wf = ConfigWorkflow(config_file=str(bundle / "configs" / "inference.json"),
                        meta_file=str(bundle / "configs" / "metadata.json"), workflow_type="infer",
                        bundle_root=str(bundle), datalist=[str(root / "nifti" / "ct.nii")], output_dir=str(root / "bundle_out"),
                        output_ext=".nii")
    wf.initialize()
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    wf.run()
    t_run = time.perf_counter() - t0
    wf.finalize()
    report = {"open": t_open, "run": t_run, "threads": torch.get_num_threads(),
              "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    (root / "bundle.json").write_text(json.dumps(report))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], metavar=("Z", "Y", "X"))
    ap.add_argument("--spacing", type=float, nargs=3, default=[1.0, 0.703125, 0.703125], metavar=("Z", "Y", "X"))
    ap.add_argument("--bundle", type=Path, default=None, help="a bundle folder (default: build the tests' one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=3, metavar=("WHICH", "BUNDLE", "ROOT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        which, bundle, root = args.child
        (child_adapter if which == "adapter" else child_bundle)(Path(bundle), Path(root), args.threads)
        return

    import nibabel as nib
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="specgate-bench-monai-") as tmp:
        root = Path(tmp)
        bundle = args.bundle
        if bundle is None:
            from tests.model_factories.monai_bundle import write_bundle

            print("training the tests' phantom bundle (a small UNet, 32 steps) ...", flush=True)
            bundle = write_bundle(root / "bundle", iterations=32)
        shape = tuple(args.shape)
        print(f"writing a {shape} CT at {tuple(args.spacing)} mm (npy + NIfTI) ...", flush=True)
        write_ct(root, shape, tuple(args.spacing))  # type: ignore[arg-type]
        walls = {}
        peaks = {}
        for which in ("adapter", "bundle"):
            print(f"running {which} in a child process ...", flush=True)
            t0 = time.perf_counter()
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            subprocess.run([sys.executable, __file__, "--child", which, str(bundle), str(root),
                            "--threads", str(args.threads)], check=True)
            walls[which] = time.perf_counter() - t0
            peaks[which] = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
        a = json.loads((root / "adapter.json").read_text())
        b = json.loads((root / "bundle.json").read_text())
        ours = np.load(root / "adapter_labels.npy")
        out = next((root / "bundle_out").rglob("*.nii"))
        img = nib.load(str(out))
        assert isinstance(img, nib.Nifti1Image)
        theirs = np.asarray(img.dataobj).transpose(2, 1, 0)
        differ = int((ours != theirs).sum()) if ours.shape == theirs.shape else -1

    ev = a["evidence"]
    print(f"\nCT {shape} at {tuple(args.spacing)} mm; network grid {tuple(ev['network_grid'])}, "
          f"{ev['windows']} windows, layer {ev['layer']}, {a['signature_voxels']} body voxels in the signature; "
          f"torch threads {a['threads']}")
    print(f"{'':<26} {'seconds':>8}")
    for k, v in a["timings"].items():
        print(f"  adapter {k:<17} {v:>8.2f}")
    print(f"{'adapter predict':<26} {a['predict']:>8.2f}   (open {a['open']:.2f} s, once per worker)")
    print(f"{'bundle run (ConfigWorkflow)':<26} {b['run']:>8.2f}   (initialize {b['open']:.2f} s; includes NIfTI "
          "read and write)")
    print(f"ratio adapter / bundle: {a['predict'] / b['run']:.2f}")
    print(f"peak memory: adapter {a['peak_mb']:.0f} MB, bundle {b['peak_mb']:.0f} MB (child ru_maxrss)")
    print(f"label maps: {differ} voxels differ of {ours.size}" if differ >= 0 else
          f"label maps: shapes differ {ours.shape} vs {theirs.shape}")


if __name__ == "__main__":
    main()
