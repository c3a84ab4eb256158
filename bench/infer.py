"""Inference benchmarks for model/: prints figures and ratios, never asserts.

(a) CPU: our sliding window (probabilities + streaming signature) against MONAI's
    ``sliding_window_inference`` (logits only, averaging) with the same network, volume, window and
    overlap (24/96). Ratio ours/MONAI; the issue's target is <= 1.0. Needs ``pip install monai`` (the
    ``bench`` extra).
(b) the signature and gate cost as a share of inference time (target <= 2 %).
(c) peak memory (max RSS of a fresh process) for a CT of 512x512x300 on CPU (target <= 3 GB).
(d) GPU, when one is present: blocks of 96^3 per second of the default network with bf16 autocast
    (target >= 200), and the card it ran on.

    python bench/infer.py --parts a,b          # quick
    python bench/infer.py --parts c --ct-shape 300,512,512
    python bench/infer.py --parts d
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.infer import _accumulate, plan_windows, sliding_window  # noqa: E402
from model.ood import SpectralGate, signature_from_gram  # noqa: E402
from model.preprocess import preprocess  # noqa: E402
from model.unet import SegNet  # noqa: E402


def _net(device: str = "cpu") -> SegNet:
    torch.manual_seed(0)
    return SegNet(base_features=14, levels=4).to(device).eval()


def part_a(shape: tuple[int, int, int], repeats: int) -> dict[str, float]:
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        print("(a) skipped: monai is not installed (pip install monai)")
        return {}
    net = _net()
    vol = np.random.default_rng(0).random(shape, dtype=np.float32)
    x = torch.from_numpy(vol)[None, None]
    n_win = len(plan_windows(shape, 96, 24, net.divisor))
    sliding_window(net, vol[:32, :32, :32], block=32, overlap=8)  # warm-up, and sets channels_last
    ours, theirs = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        sliding_window(net, vol, block=96, overlap=24)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        with torch.inference_mode():
            sliding_window_inference(x, (96, 96, 96), 1, net, overlap=24 / 96, mode="constant")
        theirs.append(time.perf_counter() - t)
    r = {"shape": shape, "windows": n_win, "ours_s": min(ours), "monai_s": min(theirs),
         "ratio": min(ours) / min(theirs)}
    print(f"(a) CPU {shape}, {n_win} windows of 96^3, overlap 24: ours {r['ours_s']:.2f} s "
          f"(probabilities + signature), MONAI {r['monai_s']:.2f} s (logits) -> ratio {r['ratio']:.3f}")
    return r


def part_b(shape: tuple[int, int, int]) -> dict[str, float]:
    net = _net()
    vol = np.random.default_rng(1).random(shape, dtype=np.float32)
    sliding_window(net, vol[:32, :32, :32], block=32, overlap=8)
    t = time.perf_counter()
    sliding_window(net, vol, block=96, overlap=24)
    total = time.perf_counter() - t
    # the signature work, replayed with the same function on tensors of the same sizes: per-window float64
    # Gram and class sums, then the eigen-decomposition and the gate's nearest-neighbour search (bank of 200)
    wins = plan_windows(shape, 96, 24, net.divisor)
    feats = torch.rand(14, 96, 96, 96)
    probs = torch.rand(2, 96, 96, 96)
    gate = SpectralGate.fit(np.random.default_rng(0).normal(size=(200, 14)))

    def replay() -> None:
        gram = torch.zeros(14, 14, dtype=torch.float64)
        sums = torch.zeros(2, 14, dtype=torch.float64)
        counts = torch.zeros(2, dtype=torch.float64)
        for w in wins:
            sl = (slice(None), *w.local_own_slices())
            p = probs[sl]
            _accumulate(feats[sl], p[1] > p[0], gram, sums, counts)
        gate.is_ood(signature_from_gram(gram.numpy(), 96**3))

    replay()  # warm-up
    times = []
    for _ in range(5):  # best of 5: the replay is short, so a busy machine would skew a single run
        t = time.perf_counter()
        replay()
        times.append(time.perf_counter() - t)
    sig = min(times)
    print(f"(b) signature + gate: {sig * 1e3:.1f} ms of {total:.2f} s inference = {100 * sig / total:.2f} %")
    return {"signature_s": sig, "inference_s": total, "share": sig / total}


def _peak_child(shape: tuple[int, int, int]) -> None:
    net = _net()
    hu = (np.random.default_rng(2).integers(-1000, 1500, size=shape, dtype=np.int16))
    t = time.perf_counter()
    res = sliding_window(net, preprocess(hu, "CT"), block=96, overlap=24)
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"peak_rss_bytes": peak, "seconds": dt, "windows": res.n_windows}))


def part_c(shape: tuple[int, int, int]) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child-peak", ",".join(map(str, shape))],
        check=True, capture_output=True, text=True,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    feat_gb = 14 * 4 * np.prod(shape) / 1e9
    print(f"(c) CPU {shape} CT ({r['windows']} windows, {r['seconds']:.0f} s): peak RSS "
          f"{r['peak_rss_bytes'] / 1e9:.2f} GB (a stitched 14-channel float32 feature map alone: {feat_gb:.1f} GB)")
    return r


def part_d(batch_sizes: tuple[int, ...] = (1, 2, 4, 8), seconds: float = 3.0) -> dict[str, object]:
    if not torch.cuda.is_available():
        print("(d) skipped: no CUDA device")
        return {}
    torch.backends.cudnn.benchmark = True
    card = torch.cuda.get_device_name(0)
    res: dict[str, object] = {"card": card, "torch": torch.__version__}
    for bs, cl in [(b, True) for b in batch_sizes] + [(2, False), (4, False)]:
        fmt = torch.channels_last_3d if cl else torch.contiguous_format
        net = _net("cuda").to(memory_format=fmt)
        x = torch.randn(bs, 1, 96, 96, 96, device="cuda").contiguous(memory_format=fmt)
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
            for _ in range(5):
                net(x, return_features=True)
            torch.cuda.synchronize()
            n, t = 0, time.perf_counter()
            while time.perf_counter() - t < seconds:
                net(x, return_features=True)
                n += bs
            torch.cuda.synchronize()
            rate = n / (time.perf_counter() - t)
        res[f"blocks_per_s_bs{bs}{'_channels_last' if cl else ''}"] = rate
        print(f"(d) {card}: default SegNet, 96^3 blocks, bf16 autocast, batch {bs}, "
              f"{'channels_last_3d' if cl else 'contiguous'}: {rate:.0f} blocks/s")
    net = _net("cuda")
    vol = np.random.default_rng(3).random((300, 512, 512), dtype=np.float32)
    for bs in (4,):
        sliding_window(net, vol[:96, :192, :192], batch_size=bs)
        torch.cuda.synchronize()
        t = time.perf_counter()
        r = sliding_window(net, vol, batch_size=bs)
        dt = time.perf_counter() - t
        res[f"sliding_window_512x512x300_s_bs{bs}"] = dt
        print(f"(d) {card}: sliding_window on 300x512x512 ({r.n_windows} windows, batch {bs}, bf16, "
              f"probabilities to host + signature): {dt:.2f} s = {r.n_windows / dt:.0f} windows/s")
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="a,b,c,d")
    ap.add_argument("--shape", default="128,160,160", help="z,y,x of the volume for (a) and (b)")
    ap.add_argument("--ct-shape", default="300,512,512", help="z,y,x of the CT for (c)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--child-peak", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.child_peak:
        _peak_child(tuple(int(v) for v in a.child_peak.split(",")))  # type: ignore[arg-type]
        return
    shape = tuple(int(v) for v in a.shape.split(","))
    parts = set(a.parts.split(","))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {os.cpu_count()} CPUs")
    out: dict[str, object] = {}
    if "a" in parts:
        out["a"] = part_a(shape, a.repeats)  # type: ignore[arg-type]
    if "b" in parts:
        out["b"] = part_b(shape)  # type: ignore[arg-type]
    if "c" in parts:
        out["c"] = part_c(tuple(int(v) for v in a.ct_shape.split(",")))  # type: ignore[arg-type]
    if "d" in parts:
        out["d"] = part_d()
    if a.json:
        a.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
