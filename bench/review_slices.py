"""Study page slices: how long ``review.render.slice_png`` takes for a 512x512 CT slice, per overlay, and how
long a study takes to open (the first request of a study, before the cache holds it).

    .venv/bin/python bench/review_slices.py                   # 120 slices of 512x512, every 2nd slice timed
    .venv/bin/python bench/review_slices.py --slices 300      # a long CT
    .venv/bin/python bench/review_slices.py --repeats 3       # each slice drawn 3 times per overlay

The series is ``tests.peers.write_ct_series`` (a sphere of soft tissue in air with scanner-like noise,
uint16 with a rescale intercept, one file per slice) and the probability map is written by the worker's
own ``save_probability``: a smooth probability falling off around an ellipsoid, its mask at 0.5. The
study is opened once (timed: ``load_series`` of every file plus ``prob.npz``), then every overlay draws
the same slices in the default window (soft tissue); the lung window is timed once more with the mask.
The issue's target is a slice PNG in under 100 ms; times are printed with their ratio to it, never
asserted. On a shared machine, run it twice and read the second.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from review.render import OVERLAYS, StudyImages, slice_png, slice_with_most_foreground  # noqa: E402
from tests.peers import write_ct_series  # noqa: E402
from worker.objects import save_probability  # noqa: E402

TARGET_MS = 100.0


def write_probability(path: Path, shape: tuple[int, int, int]) -> None:
    """A probability map the shape of the series: a logistic fall-off around an off-centre ellipsoid
    (so the heat map has fringes, not a hard edge), its mask at 0.5, written as the worker writes it."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    r = np.sqrt(((z - shape[0] * 0.5) / (shape[0] * 0.25)) ** 2 + ((y - shape[1] * 0.45) / (shape[1] * 0.12)) ** 2
                + ((x - shape[2] * 0.55) / (shape[2] * 0.16)) ** 2).astype(np.float32)
    prob = 1.0 / (1.0 + np.exp((r - 1.0) * 12.0))
    save_probability(path, prob, prob >= 0.5)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=120)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--step", type=int, default=2, help="time every STEP-th slice")
    ap.add_argument("--repeats", type=int, default=1, help="times each slice is drawn per overlay")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="specgate-bench-") as tmp:
        root = Path(tmp)
        print(f"writing a {args.slices}-slice {args.size}x{args.size} CT series and its prob.npz ...", flush=True)
        series = write_ct_series(root / "series", slices=args.slices, size=args.size)
        shape = (args.slices, args.size, args.size)
        write_probability(root / "prob.npz", shape)
        size_mb = sum(p.stat().st_size for p in series.paths) / 1e6

        t0 = time.perf_counter()
        images = StudyImages.open(series.paths, root / "prob.npz")
        open_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        first = slice_with_most_foreground(images)
        first_ms = 1000 * (time.perf_counter() - t0)

        zs = list(range(0, images.n_slices, args.step))
        runs = [(overlay, None) for overlay in OVERLAYS] + [("mask", "lung")]
        results: dict[str, tuple[list[float], list[int]]] = {}
        for overlay, window in runs:
            slice_png(images, zs[0], window=window, overlay=overlay)  # warm-up: imports, the heat LUT
            times, sizes = [], []
            for _ in range(args.repeats):
                for z in zs:
                    t0 = time.perf_counter()
                    png = slice_png(images, z, window=window, overlay=overlay)
                    times.append(1000 * (time.perf_counter() - t0))
                    sizes.append(len(png))
            results[f"{overlay}/{window or images.default_window}"] = (times, sizes)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nseries {images.shape} (z, y, x), {images.modality}, {size_mb:.0f} MB of DICOM; "
          f"in memory {images.nbytes / 1e6:.0f} MB; {os.cpu_count()} CPUs, load average {load:.2f}")
    print(f"first open (load_series + prob.npz): {open_s:.2f} s; slice with most foreground: z={first} "
          f"({first_ms:.0f} ms, once per study)")
    print(f"\n{'overlay/window':<20} {'slices':>6} {'median ms':>10} {'p95 ms':>8} {'max ms':>8} "
          f"{'median/target':>14} {'p95/target':>11} {'median KB':>10}")
    for name, (times, sizes) in results.items():
        med, p95 = statistics.median(times), percentile(times, 95)
        print(f"{name:<20} {len(times):>6} {med:>10.1f} {p95:>8.1f} {max(times):>8.1f} "
              f"{med / TARGET_MS:>14.2f} {p95 / TARGET_MS:>11.2f} {statistics.median(sizes) / 1024:>10.0f}")
    print(f"(target: a 512x512 CT slice PNG in under {TARGET_MS:.0f} ms; ratios below 1 meet it)")


if __name__ == "__main__":
    main()
