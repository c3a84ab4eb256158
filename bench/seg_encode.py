"""Time worker.dicom_seg.encode_seg on a 300-frame 512x512 CT with a binary mask (target: <= 2 s). Never asserts.

    .venv/bin/python bench/seg_encode.py [--slices 300] [--size 512] [--repeat 3] [--enhanced]

The source series is written as single-frame CT files (``--enhanced``: one Enhanced CT instance) and loaded with dicom_series.load_series, as the
worker does; the mask is a sphere that touches most slices (the expensive case: few empty frames).
Prints the load time, each encode time, the write time and the SEG's size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from dicom_factory import SeriesSpec, write_series  # noqa: E402

from dicom_series import load_series  # noqa: E402
from worker.atomic import write_dicom  # noqa: E402
from worker.dicom_seg import derive_uid, encode_seg  # noqa: E402
from worker.labels import GateEvidence, ModelIdentity, Release  # noqa: E402
from worker.segments import PHANTOM_SEGMENT  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--enhanced", action="store_true", help="one multi-frame Enhanced CT instance")
    args = parser.parse_args()

    spec = SeriesSpec(slices=args.slices, rows=args.size, cols=args.size, pixel_spacing=(0.7, 0.7), slice_spacing=1.0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        kind = "Enhanced CT instance" if args.enhanced else "CT series"
        print(f"writing a {args.slices}x{args.size}x{args.size} {kind} ...", flush=True)
        paths = write_series(spec, tmp_path / "ct", enhanced=args.enhanced)
        t0 = time.perf_counter()
        volume = load_series(paths)
        print(f"load_series: {time.perf_counter() - t0:.2f} s")

        z, y, x = np.ogrid[: args.slices, : args.size, : args.size]
        c = np.array(volume.shape) / 2
        r = 0.45 * min(volume.shape[1:])
        mask = ((z - c[0]) / (c[0] * 0.95)) ** 2 + ((y - c[1]) / r) ** 2 + ((x - c[2]) / r) ** 2 <= 1.0
        nonempty = int(mask.any(axis=(1, 2)).sum())
        print(f"mask: {nonempty} of {args.slices} frames non-empty, {mask.mean():.1%} foreground")

        times = []
        seg = None
        for i in range(args.repeat):
            t0 = time.perf_counter()
            seg = encode_seg(
                volume,
                mask,
                segments=(replace(PHANTOM_SEGMENT, label="sphere", description=None),),
                model=ModelIdentity("specgate-bench", "0", "0" * 64),
                evidence=GateEvidence(oodm=0.01, tau=0.05, c=2.5, is_ood=False),
                release=Release("gate"),
                sop_instance_uid=derive_uid("bench", "seg", str(i)),
                series_instance_uid=derive_uid("bench", "series"),
            )
            times.append(time.perf_counter() - t0)
            print(f"encode_seg run {i + 1}: {times[-1]:.3f} s", flush=True)
        t0 = time.perf_counter()
        out = write_dicom(seg, tmp_path / "seg.dcm")
        write_s = time.perf_counter() - t0
        print(f"encode_seg best {min(times):.3f} s, median {float(np.median(times)):.3f} s (target <= 2 s)")
        print(f"write_dicom: {write_s:.3f} s, {out.stat().st_size / 1e6:.1f} MB, {int(seg.NumberOfFrames)} frames")


if __name__ == "__main__":
    main()
