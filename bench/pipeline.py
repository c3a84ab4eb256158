"""The whole worker pipeline on one clinical-size CT, with the shipped model, on the CPU: time per stage
and peak memory.

    .venv/bin/python bench/pipeline.py                      # 300x512x512 CT, 1.0 x 0.7 x 0.7 mm (the issue's)
    .venv/bin/python bench/pipeline.py --shape 120 512 512  # a quicker look

The series is the held-out liver phantom re-gridded to the scanner geometry (``model.data.clinical``),
written as DICOM by the parent process. A fresh child process then runs what the worker runs for one
study: load (DICOM series -> volume), segment (resample to the model's grid, body crop, sliding window and
signature, probabilities back onto the source grid), gate (OODM), encode (DICOM-SEG written), keep (the
probability map and the preview PNG), send (C-STORE to dcmtk's ``storescp`` on loopback). Its peak
resident memory is the child's ``ru_maxrss``. Targets from the issue (printed, never asserted): under 60 s
without the send on a 2-core machine, peak memory <= 3 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_ct(root: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Path:
    from model.data.clinical import Geometry, clinical_case
    from model.weights.build import EVAL_FIRST_INDEX, SEED
    from specgate.synthetic import write_series

    case, _ = clinical_case("ct_liver", SEED, EVAL_FIRST_INDEX, geometry=Geometry(shape, spacing, (0.0, 0.0, 0.0)))
    write_series(case.image, case.spacing, "CT", root / "series")
    return root / "series"


def run_child(series_dir: Path, out: Path, threads: int | None) -> None:
    """The measured part: one study as the worker runs it (fresh process, so ru_maxrss is its own)."""
    import numpy as np
    import torch
    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.sop_class import SegmentationStorage

    from dicom_node.config import SeriesRule
    from dicom_series import load_series
    from tests.peers import dcmtk_path, wait_for
    from worker.atomic import write_dicom
    from worker.labels import GateEvidence, ModelIdentity, Release
    from worker.objects import save_probability
    from worker.preview import write_preview
    from worker.seg import derive_uid, encode_seg
    from worker.segmenter import Segmenter

    if threads:
        torch.set_num_threads(threads)
    seg_model = Segmenter.open()
    paths = sorted(series_dir.iterdir())
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    volume = load_series(paths)
    t["load"] = time.perf_counter() - t0
    o = seg_model.segment(volume.array, volume.modality, spacing=volume.spacing)
    t.update({"resample": o.timings["resample"], "preprocess": o.timings["preprocess"], "infer": o.timings["infer"],
              "restore": o.timings["restore"], "gate": o.timings["gate"]})
    t0 = time.perf_counter()
    ds = encode_seg(volume, o.mask, rule=SeriesRule(name="bench", segment_label="Liver",
                                                    type_code=("10200004", "SCT", "Liver")),
                    model=ModelIdentity(seg_model.model_name, seg_model.model_version, seg_model.weights_sha256),
                    evidence=GateEvidence(oodm=o.oodm, tau=o.tau, c=None, is_ood=o.is_ood, gate_reason=o.gate_reason),
                    release=Release("gate"),
                    sop_instance_uid=derive_uid("bench", "seg"), series_instance_uid=derive_uid("bench", "series"))
    seg_path = out / "seg.dcm"
    write_dicom(ds, seg_path)
    t["encode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    save_probability(out / "probability.npz", o.prob_fg, o.mask)
    write_preview(out / "preview.png", volume.array, o.prob_fg, o.mask, modality=volume.modality,
                  title=f"bench: OODM {o.oodm:.4f} vs tau {o.tau:.4f}")
    t["keep"] = time.perf_counter() - t0

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    received = out / "received"
    received.mkdir()
    proc = subprocess.Popen([dcmtk_path("storescp"), "-od", str(received), "-aet", "BENCH", str(port)],
                            env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        ae = AE(ae_title="SPECGATE")
        ae.add_requested_context(SegmentationStorage)
        # storescp listens a moment after it starts: retry the association until it is accepted
        assoc = wait_for(lambda: (a := ae.associate("127.0.0.1", port, ae_title="BENCH")).is_established and a,
                         timeout=10, what="dcmtk's storescp to accept an association")
        t0 = time.perf_counter()
        status = assoc.send_c_store(dcmread(seg_path))
        assoc.release()
        t["send"] = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(10)
    report = {"timings": t, "shape": list(volume.shape), "spacing": list(volume.spacing), "grid": o.grid,
              "oodm": o.oodm, "tau": o.tau, "held": o.is_ood, "foreground_voxels": int(np.count_nonzero(o.mask)),
              "frames": int(ds.NumberOfFrames), "send_status": int(status.Status),
              "threads": torch.get_num_threads(), "model": f"{seg_model.model_name} {seg_model.model_version}"}
    (out / "report.json").write_text(json.dumps(report))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], metavar=("Z", "Y", "X"))
    ap.add_argument("--spacing", type=float, nargs=3, default=[1.0, 0.703125, 0.703125], metavar=("Z", "Y", "X"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--child", nargs=2, metavar=("SERIES", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_child(Path(args.child[0]), Path(args.child[1]), args.threads)
        return
    shape = tuple(args.shape)
    with tempfile.TemporaryDirectory(prefix="specgate-bench-") as tmp:
        root = Path(tmp)
        print(f"writing a {shape[0]}-slice {shape[1]}x{shape[2]} CT series ...", flush=True)
        series = write_ct(root, shape, tuple(args.spacing))  # type: ignore[arg-type]
        size_mb = sum(p.stat().st_size for p in series.iterdir()) / 1e6
        out = root / "out"
        out.mkdir()
        cmd = [sys.executable, __file__, "--child", str(series), str(out)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        r = json.loads((out / "report.json").read_text())
    t = r["timings"]
    work = sum(v for k, v in t.items() if k != "send")
    print(f"\nseries {tuple(r['shape'])} at {tuple(round(s, 3) for s in r['spacing'])} mm ({size_mb:.0f} MB); "
          f"model grid {tuple(r['grid']['model_grid_shape'])}, crop {r['grid']['crop']}, "
          f"{r['grid']['windows']} window(s); {r['model']}, torch threads {r['threads']}")
    print(f"OODM {r['oodm']:.4f} tau {r['tau']:.4f} ({'held' if r['held'] else 'released'}), "
          f"{r['foreground_voxels']} foreground voxels, SEG {r['frames']} frames, send 0x{r['send_status']:04X}")
    print(f"{'stage':<11} {'seconds':>8} {'share':>7}")
    for k, v in t.items():
        print(f"{k:<11} {v:>8.2f} {100 * v / work:>6.1f}%" if k != "send" else f"{k:<11} {v:>8.2f}")
    print(f"{'pipeline':<11} {work:>8.2f}   (load to kept results; target < 60 s on 2 cores)")
    print(f"child process: {wall:.1f} s wall including start-up and model load; "
          f"peak memory {peak_mb:.0f} MB (target <= 3072 MB)")


if __name__ == "__main__":
    main()
