"""Time per stage of the worker pipeline for one CT study, with the shipped model, on the CPU.

    .venv/bin/python bench/pipeline.py                      # 512x512x300 CT (the issue's size; minutes)
    .venv/bin/python bench/pipeline.py --shape 96 256 256   # a quicker look

Stages: load (DICOM series -> volume), infer (preprocess + sliding window + signature), gate (OODM),
encode (DICOM-SEG), send (C-STORE to dcmtk's storescp on loopback). Prints each time and the share of
everything but inference (target: <= 15 % of the total). Never asserts: a benchmark reports.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_ct(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A CT-like volume of the given shape: the liver phantom resampled, so the model sees anatomy."""
    from scipy import ndimage

    from model.data.phantoms import phantom_study

    case = phantom_study("ct_liver", seed=seed)
    factors = [t / s for t, s in zip(shape, case.image.shape, strict=True)]
    vol = ndimage.zoom(case.image, factors, order=1).astype(np.float32)
    spacing = tuple(float(sp / f) for sp, f in zip(case.spacing, factors, strict=True))
    rng = np.random.default_rng(seed)
    vol += rng.normal(0, 10, vol.shape).astype(np.float32)
    return vol, spacing  # type: ignore[return-value]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], metavar=("Z", "Y", "X"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = ap.parse_args()

    import torch
    from pydicom import dcmread
    from pynetdicom import AE

    from specgate.synthetic import write_series
    from worker.seg import derive_uid, encode_seg, write_seg
    from worker.segmenter import Segmenter
    from worker.series import load_series

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    with tempfile.TemporaryDirectory(prefix="specgate-bench-") as tmp:
        root = Path(tmp)
        print(f"writing a {shape[0]}-slice {shape[1]}x{shape[2]} CT series ...", flush=True)
        vol, spacing = synthetic_ct(shape)  # type: ignore[arg-type]
        series = write_series(vol, spacing, "CT", root / "series")
        size_mb = sum(p.stat().st_size for p in series.paths) / 1e6
        del vol
        seg_model = Segmenter.open()
        print(f"model {seg_model.model_name} {seg_model.model_version} block {seg_model.block} "
              f"overlap {seg_model.overlap}, torch threads {torch.get_num_threads()}", flush=True)

        t: dict[str, float] = {}
        t0 = time.perf_counter()
        volume = load_series(series.paths)
        t["load"] = time.perf_counter() - t0

        out = seg_model.segment(volume.array, volume.modality, spacing=volume.spacing)
        t["infer"] = out.timings["preprocess"] + out.timings["infer"]
        t["gate"] = out.timings["gate"]

        t0 = time.perf_counter()
        ds = encode_seg(volume, out.mask, segment_label="Liver", category_code=("123037004", "SCT", "Anatomical Structure"),
                        type_code=("10200004", "SCT", "Liver"), algorithm_name=seg_model.model_name,
                        algorithm_version=seg_model.model_version, weights_sha256=seg_model.weights_sha256,
                        sop_instance_uid=derive_uid("bench", "seg"), series_instance_uid=derive_uid("bench", "series"))
        seg_path = root / "seg.dcm"
        write_seg(ds, seg_path)
        t["encode"] = time.perf_counter() - t0

        storescp = shutil.which("storescp")
        if storescp is None:
            raise SystemExit("dcmtk's storescp is needed for the send stage (apt-get install dcmtk)")
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out_dir = root / "received"
        out_dir.mkdir()
        env = {**os.environ, "TCP_NODELAY": "1"}
        proc = subprocess.Popen([storescp, "-od", str(out_dir), "-aet", "BENCH", str(port)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            ae = AE(ae_title="SPECGATE")
            from pynetdicom.sop_class import SegmentationStorage

            ae.add_requested_context(SegmentationStorage)
            for _ in range(50):
                assoc = ae.associate("127.0.0.1", port, ae_title="BENCH")
                if assoc.is_established:
                    break
                time.sleep(0.1)
            t0 = time.perf_counter()
            status = assoc.send_c_store(dcmread(seg_path))
            assoc.release()
            t["send"] = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(10)

    total = sum(t.values())
    other = total - t["infer"]
    print(f"\nseries {shape} ({size_mb:.0f} MB), foreground {int(out.mask.sum())} voxels, "
          f"OODM {out.oodm:.4f} tau {out.tau:.4f}, send status 0x{int(status.Status):04X}")
    print(f"{'stage':<8} {'seconds':>9} {'share':>7}")
    for k in ("load", "infer", "gate", "encode", "send"):
        print(f"{k:<8} {t[k]:>9.2f} {100 * t[k] / total:>6.1f}%")
    print(f"{'total':<8} {total:>9.2f}")
    print(f"everything but inference: {other:.2f} s = {100 * other / total:.1f}% of the total (target <= 15%)")
    print(f"SEG encode ({ds.NumberOfFrames} frames kept of {shape[0]}): {t['encode']:.2f} s (target <= 2 s)")


if __name__ == "__main__":
    main()
