"""The whole worker pipeline on one clinical-size CT, with the shipped model, on the CPU: time per stage
and peak memory; then the same CT through a synthetic 105-class model (``--classes``).

    .venv/bin/python bench/pipeline.py                      # 300x512x512 CT, 1.0 x 0.7 x 0.7 mm (the issue's)
    .venv/bin/python bench/pipeline.py --shape 120 512 512  # a quicker look
    .venv/bin/python bench/pipeline.py --classes 0          # the shipped model only

The series is the held-out liver phantom re-gridded to the scanner geometry (``model.data.clinical``),
written as DICOM by the parent process. A fresh child process then runs what the worker runs for one
study, in the worker's order: load (DICOM series -> volume, int16 when the model takes it), segment
(resample to the model's grid, body crop, sliding window and signature, label map and foreground back onto
the source grid), gate (OODM), keep (the probability map with the review arrays, and the preview PNG, the
pixels' last use), encode (the DICOM-SEG and its SR, ``worker.objects.write_objects``, on the volume
without its pixels), send (C-STORE to dcmtk's ``storescp`` on loopback). Its peak resident
memory is the child's ``VmHWM``. It then says what the peak is made of (what stays resident once the
study's arrays are freed: interpreter, libraries, their caches; the arrays; the rest, transient) and runs
the same study again in the same process (a warm worker, its caches loaded; peak counted from there).
Targets from issue 19 (printed, never asserted): under 3 s for segment + gate + keep and under 1 GB peak on
2 cores.

The many-class case (TotalSegmentator has 105 classes with background) runs the worker's path
(:func:`model.study_inference.segment_labels`: model grid, body crop, window, signature, label map and float16
foreground back on the source grid) on the same series in its own child, with :class:`BlobNet`, a
stand-in network whose logits are 104 organ-sized blobs placed over the body (an untrained network's
per-voxel noise would be the worst case of the running argmax, not a segmentation). What it measures is
specgate's share: the per-class probabilities held on the model's grid and the label map brought back
without float32 probabilities of every class at full resolution.
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _peak_mb() -> float:
    """This process image's peak resident memory (``VmHWM``). Not ``ru_maxrss``: Linux carries that
    across ``exec`` from the process that spawned it, here the parent holding the generated phantom
    (770 MB), which every child then reported as its own floor."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_ct(root: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Path:
    from model.data.clinical import Geometry, clinical_case
    from model.weights.build import EVAL_FIRST_INDEX, SEED
    from specgate.synthetic import write_series

    case, _ = clinical_case("ct_liver", SEED, EVAL_FIRST_INDEX, geometry=Geometry(shape, spacing, (0.0, 0.0, 0.0)))
    write_series(case.image, case.spacing, "CT", root / "series")
    return root / "series"


def _status_mb(key: str) -> float:
    """A ``/proc/self/status`` figure in MB (``VmRSS``, ``RssAnon``, ``RssFile``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    """Start ``VmHWM`` again from the current resident size (Linux: ``clear_refs`` 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def run_child(series_dir: Path, out: Path, threads: int | None) -> None:
    """The measured part: one study as the worker runs it (fresh process, so the peak is its own); then
    what stays resident once the study's arrays are gone, and the same study once more in the same
    process (a warm worker: the libraries' caches already loaded)."""
    import gc

    import numpy as np
    import torch
    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.sop_class import SegmentationStorage

    from dicom_series import load_series
    from model.study_inference import release_freed_memory
    from tests.peers import dcmtk_path, wait_for
    from worker.labels import GateEvidence, ModelIdentity, Release
    from worker.model_runtime import Segmenter
    from worker.objects import ObjectUIDs, save_probability, write_objects
    from worker.preview import write_preview
    from worker.segments import PHANTOM_SEGMENT, RuleOf, review_arrays, segments_for

    if threads:
        torch.set_num_threads(threads)
    t_open = time.perf_counter()
    seg_model = Segmenter.open()
    t_open = time.perf_counter() - t_open
    paths = sorted(series_dir.iterdir())
    rule = RuleOf("bench")

    def study(t: dict[str, float], rss: dict[str, float], held: dict[str, float]) -> tuple[Any, Any, int]:
        """One study as ``worker.pipeline.run_job`` runs it: load, segment and gate, the probability file
        with the review arrays and the preview, then the SEG and its SR (``write_objects``) on the volume
        without its pixels."""
        t0 = time.perf_counter()
        volume = load_series(paths, compact=seg_model.takes_int16)
        t["load"] = time.perf_counter() - t0
        rss["load"] = _peak_mb()
        o = seg_model.segment(volume.array, volume.modality, spacing=volume.spacing)
        t.update({k: o.timings[k] for k in ("resample", "preprocess", "infer", "restore", "gate")})
        rss["segment"] = _peak_mb()
        label_map = o.labels if o.labels is not None else o.mask.astype(np.uint8)
        segments = segments_for(rule, seg_model.labels, codes=seg_model.codes, segment=PHANTOM_SEGMENT)
        t0 = time.perf_counter()
        save_probability(out / "probability.npz", o.prob_fg, o.mask, extra=review_arrays(label_map, segments))
        t["keep_prob"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        write_preview(out / "preview.png", volume.array, o.prob_fg, o.mask, modality=volume.modality,
                      title=f"bench: OODM {o.oodm:.4f} vs tau {o.tau:.4f}")
        t["keep_preview"] = time.perf_counter() - t0
        rss["keep"] = _peak_mb()
        held["series"] = volume.array.nbytes / 2**20
        volume = volume.without_pixels()  # as the worker does once the preview is written
        t0 = time.perf_counter()
        write_objects(out / "seg.dcm", out / "sr.dcm", volume, label_map,
                      model=ModelIdentity(seg_model.model_name, seg_model.model_version, seg_model.weights_sha256),
                      evidence=GateEvidence(oodm=o.oodm, tau=o.tau, c=None, is_ood=o.is_ood, gate_reason=o.gate_reason),
                      release=Release("gate"), uids=ObjectUIDs.for_job("BENCH", volume.study_instance_uid, 1, 1),
                      segments=segments)
        release_freed_memory()  # as the worker does after its SEG and SR
        t["encode"] = time.perf_counter() - t0
        rss["encode"] = _peak_mb()
        held.update({"labels": label_map.nbytes / 2**20,
                     "foreground": o.prob_fg.nbytes / 2**20})
        return volume, o, int(dcmread(out / "seg.dcm", stop_before_pixels=True).NumberOfFrames)

    t: dict[str, float] = {}
    rss: dict[str, float] = {"start": _peak_mb()}
    held: dict[str, float] = {}
    volume, o, frames = study(t, rss, held)
    peak = _peak_mb()
    report: dict[str, Any] = {
        "shape": list(volume.shape), "spacing": list(volume.spacing), "grid": o.grid, "oodm": o.oodm, "tau": o.tau,
        "held": o.is_ood, "foreground_voxels": int(np.count_nonzero(o.mask)), "frames": frames,
        "series_dtype": str(volume.array.dtype)}  # the stand-in keeps the dtype
    del volume, o
    gc.collect()
    release_freed_memory()
    floor = {"rss": _status_mb("VmRSS"), "anon": _status_mb("RssAnon"), "file": _status_mb("RssFile")}
    _reset_peak()
    t_warm: dict[str, float] = {}
    rss_warm: dict[str, float] = {"start": _peak_mb()}
    study(t_warm, rss_warm, {})
    warm_peak = _peak_mb()

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
        status = assoc.send_c_store(dcmread(out / "seg.dcm"))
        assoc.release()
        t["send"] = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(10)
    report.update({"timings": t, "send_status": int(status.Status),
                   "threads": torch.get_num_threads(), "model": f"{seg_model.model_name} {seg_model.model_version}",
                   "open_s": t_open, "rss": rss, "prob_mb": (out / "probability.npz").stat().st_size / 1e6,
                   "peak_mb": peak, "held_mb": held, "floor_mb": floor, "warm": {"timings": t_warm, "rss": rss_warm,
                                                                                  "peak_mb": warm_peak}})
    (out / "report.json").write_text(json.dumps(report))


class BlobNet:
    """A stand-in ``classes``-class network (see the module doc): class ``c >= 1`` is a ball of radius
    ``r`` voxels around a centre drawn (seed 0) inside the window, background elsewhere; 14 feature
    channels (the input, scaled). ``divisor`` 1; called as SegNet is (``return_features=True``)."""

    divisor = 1

    def __init__(self, classes: int, radius: float = 6.0) -> None:
        self.classes, self.radius = classes, radius

    def parameters(self):  # type: ignore[no-untyped-def]
        import torch

        return iter([torch.zeros(1)])

    def __call__(self, x, return_features: bool = True):  # type: ignore[no-untyped-def]
        import numpy as np
        import torch

        shape = x.shape[2:]
        rng = np.random.default_rng(0)
        centres = rng.uniform(0.15, 0.85, size=(self.classes - 1, 3)) * np.array(shape)
        zz, yy, xx = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
        logits = np.empty((1, self.classes, *shape), np.float32)
        logits[0, 0] = 0.0
        for c, (cz, cy, cx) in enumerate(centres, start=1):
            d2 = (zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2
            logits[0, c] = 4.0 * (1.0 - d2 / self.radius ** 2)
        return torch.from_numpy(logits), x.repeat(1, 14, 1, 1, 1) * torch.linspace(0.5, 1.5, 14).view(1, 14, 1, 1, 1)


def run_classes_child(series_dir: Path, out: Path, threads: int | None, classes: int) -> None:
    """The worker's path (``segment_labels``) with :class:`BlobNet` on the same series, its own process."""
    import numpy as np
    import torch

    from dicom_series import load_series
    from model.study_inference import InferenceSettings, segment_labels

    if threads:
        torch.set_num_threads(threads)
    volume = load_series(sorted(series_dir.iterdir()), compact=True)
    rss_loaded = _peak_mb()
    settings = InferenceSettings(block=96, overlap=24, spacing=(("CT", (4.0, 4.0, 4.0)),))
    t0 = time.perf_counter()
    r = segment_labels(BlobNet(classes), volume.array, volume.spacing, volume.modality, settings)  # type: ignore[arg-type]
    wall = time.perf_counter() - t0
    (out / "classes.json").write_text(json.dumps({
        "classes": classes, "timings": r.timings, "wall": wall, "labels_present": int(np.unique(r.labels).size),
        "label_dtype": str(r.labels.dtype), "model_shape": list(r.model_shape), "crop": [list(c) for c in r.crop],
        "rss_after_load_mb": rss_loaded, "peak_mb": _peak_mb(),
        "full_float32_mb": classes * int(np.prod(volume.shape)) * 4 / 2**20}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], metavar=("Z", "Y", "X"))
    ap.add_argument("--spacing", type=float, nargs=3, default=[1.0, 0.703125, 0.703125], metavar=("Z", "Y", "X"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--classes", type=int, default=105, help="the many-class case's classes (0: skip it)")
    ap.add_argument("--child", nargs=2, metavar=("SERIES", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--classes-child", nargs=2, metavar=("SERIES", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_child(Path(args.child[0]), Path(args.child[1]), args.threads)
        return
    if args.classes_child:
        run_classes_child(Path(args.classes_child[0]), Path(args.classes_child[1]), args.threads, args.classes)
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
        r = json.loads((out / "report.json").read_text())
        many = None
        if args.classes:
            cmd = [sys.executable, __file__, "--classes-child", str(series), str(out), "--classes", str(args.classes)]
            subprocess.run(cmd + (["--threads", str(args.threads)] if args.threads else []), check=True)
            many = json.loads((out / "classes.json").read_text())
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
    share = sum(v for k, v in t.items() if k not in ("send", "load", "encode"))
    print(f"{'pipeline':<11} {work:>8.2f}   (load to kept results)")
    print(f"{'segment+gate+keep':<17} {share:>5.2f} s   (issue 19 target < 3 s on 2 cores); probability file "
          f"{r['prob_mb']:.1f} MB; model opened in {r['open_s']:.1f} s")
    print(f"child process: {wall:.1f} s wall including start-up, model load and a second study; "
          f"peak memory {r['peak_mb']:.0f} MB (target < 1024 MB); peak after each stage: "
          + ", ".join(f"{k} {v:.0f}" for k, v in r["rss"].items()) + " MB")
    h, fl, w = r["held_mb"], r["floor_mb"], r["warm"]

    def reached(rss: dict[str, float], peak: float) -> str:
        return next(k for k, v in rss.items() if v >= peak - 0.5)

    print(f"the same study again in the same process (a warm worker): peak {w['peak_mb']:.0f} MB; "
          f"segment+gate+keep {sum(v for k, v in w['timings'].items() if k not in ('load', 'encode')):.2f} s; "
          "peak after each stage: " + ", ".join(f"{k} {v:.0f}" for k, v in w["rss"].items()) + " MB")
    # a warm worker's peak, part by part: what the first study loaded as it went is all resident by then
    stage = reached(w["rss"], w["peak_mb"])
    held = {k: v for k, v in h.items() if k != "series" or stage != "encode"}  # the SEG and SR run without it
    arrays = sum(held.values())
    print(f"what the warm peak is made of (reached in {stage}; the first study's in {reached(r['rss'], r['peak_mb'])}): "
          f"{fl['rss']:.0f} MB that stays resident between studies (interpreter, torch, the model, SimpleITK, "
          f"highdicom's DICOM tables, matplotlib; {fl['file']:.0f} MB of it file-backed library pages) + the study's "
          f"arrays then {arrays:.0f} MB (" + ", ".join(f"{k} {v:.0f}" for k, v in held.items())
          + f"; series {r['series_dtype']}) + {w['peak_mb'] - fl['rss'] - arrays:.0f} MB transient")
    if many is not None:
        mt = many["timings"]
        print(f"\n{many['classes']} classes (BlobNet, the same series): model grid {tuple(many['model_shape'])}, "
              f"{many['labels_present']} labels in the map ({many['label_dtype']}); "
              + ", ".join(f"{k} {v:.2f} s" for k, v in mt.items()) + f"; {many['wall']:.2f} s in all")
        print(f"peak memory {many['peak_mb']:.0f} MB ({many['rss_after_load_mb']:.0f} MB once the series was loaded); "
              f"float32 probabilities of every class at full resolution would be {many['full_float32_mb']:.0f} MB")


if __name__ == "__main__":
    main()
