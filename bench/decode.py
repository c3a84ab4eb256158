"""Decoding a compressed CT in the worker: ``dicom_series.load_series`` (pydicom's handlers, one decoder
plugin per syntax) on the same CT in each compressed syntax an encoder here writes, against the
uncompressed load, in one process, one after another.

    .venv/bin/python bench/decode.py                         # 300x512x512 CT, 1.0 x 0.703125 x 0.703125 mm
    .venv/bin/python bench/decode.py --shape 40 512 512      # a quicker look
    .venv/bin/python bench/decode.py --repeat 3              # best of three loads each

The CT is the held-out liver phantom on the scanner grid (``model.data.clinical``), one file per slice
(``model.data.series_writer``), encoded by the test suite's encoders (``tests/compressed.py``: pydicom's RLE,
pyjpegls, OpenJPEG; dcmtk's ``dcmcjpeg`` for JPEG Lossless, Baseline, Extended). HTJ2K has no encoder here.

Printed per syntax: bytes on disk and the ratio to the uncompressed files, the load's seconds (best of
``--repeat``) and its ratio to the uncompressed load, and whether the voxels equal the uncompressed ones
(lossless) or their largest difference in HU (lossy). Printed, never asserted: the seconds depend on the
machine and its load; read the ratios.

Measured (2026-12-06, 300x512x512, one run, one thread, the shared 2-core machine otherwise quiet, load
1.3): uncompressed 1.36 s (158 MB). Lossless, voxel for voxel equal: RLE 2.84 s (x2.1, 0.54 of the bytes),
JPEG Lossless SV1 4.78 s (x3.5, 0.45), Process 14 4.88 s (x3.6), JPEG-LS 2.65 s (x1.9, 0.43), JPEG 2000
11.19 s (x8.2, 0.43). Lossy: JPEG-LS near-lossless (NEAR 3) 3.06 s, at most 3 HU off; JPEG 2000 20:1
2.79 s, 108 HU; JPEG Extended 3.39 s, 23 HU. So a CT sent as JPEG 2000 spends some 10 s decoding in the
worker, more than the rest of the job on this machine (about 7 s for the whole worker on a 300x512x512 CT,
``bench/pipeline.py``); the decoders hold the GIL (two threads decode no faster than one), and a Celery
prefork child may not start processes, so decoding in parallel is left to a later change.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SYNTAXES = {
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless P14",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000 (20:1)",
    "1.2.840.10008.1.2.4.51": "JPEG Extended",
}


def _load(paths: list[Path], repeat: int):  # type: ignore[no-untyped-def]
    from dicom_series import load_series

    best, volume = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        volume = load_series(paths, compact=True)
        best = min(best, time.perf_counter() - t0)
    return best, volume


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), metavar=("Z", "Y", "X"))
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()

    import numpy as np
    from tqdm import tqdm

    from model.data.clinical import Geometry, clinical_case
    from model.data.series_writer import write_series
    from model.weights.build import EVAL_FIRST_INDEX, SEED
    from tests.compressed import compress_file

    shape = tuple(args.shape)
    case, _ = clinical_case("ct_liver", SEED, EVAL_FIRST_INDEX,
                            geometry=Geometry(shape, (1.0, 0.703125, 0.703125), (0.0, 0.0, 0.0)))  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plain = write_series(case.image, case.spacing, "CT", root / "plain").paths
        plain_bytes = sum(p.stat().st_size for p in plain)
        plain_s, reference = _load(plain, args.repeat)
        print(f"CT {shape[0]}x{shape[1]}x{shape[2]}, {plain_bytes / 1e6:.1f} MB uncompressed; load {plain_s:.2f} s")
        print(f"{'syntax':24s} {'MB':>8s} {'size':>6s} {'load s':>8s} {'x plain':>8s}  voxels")
        for uid, name in SYNTAXES.items():
            packed = [compress_file(p, uid, root / uid / p.name)
                      for p in tqdm(plain, desc=f"encoding {name}", leave=False)]
            size = sum(p.stat().st_size for p in packed)
            seconds, volume = _load(packed, args.repeat)
            diff = np.abs(volume.array.astype(np.int32) - reference.array.astype(np.int32))
            voxels = "equal" if not diff.any() else f"max |diff| {int(diff.max())} HU"
            print(f"{name:24s} {size / 1e6:8.1f} {size / plain_bytes:6.2f} {seconds:8.2f} {seconds / plain_s:8.2f}  "
                  f"{voxels}")


if __name__ == "__main__":
    main()
