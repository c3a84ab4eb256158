"""A large multi-frame instance is received to disk in chunks: the receiving process's peak memory grows
by a small fraction of the instance's size, and the stored data set is the sender's, byte for byte."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    generate_uid,
)
from sqlalchemy import select

from ledger.paths import from_ledger
from ledger.schema import Instance
from tests.integration.dicom_node.helpers import CALLER, Ledger, store
from tests.peers import free_port, wait_for

FRAMES, SIZE = 400, 512  # 400 frames of 512x512 16-bit: 210 MB


def _multiframe(path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    ds.PatientName, ds.PatientID = "Large^Test", "LARGE-1"
    ds.NumberOfFrames = FRAMES
    ds.Rows = ds.Columns = SIZE
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.random.default_rng(3).integers(0, 4096, (FRAMES, SIZE, SIZE), dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_large_multiframe_is_received_in_chunks(sqlite_ledger: Ledger, tmp_path: Path) -> None:
    big = _multiframe(tmp_path / "big.dcm")
    size = big.stat().st_size
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECGATE_")}
    env.update({"SPECGATE_DATA_DIR": str(sqlite_ledger.data_dir), "SPECGATE_DATABASE_URL": sqlite_ledger.url,
                "SPECGATE_SCP_PORT": str(port), "SPECGATE_ALLOWED_CALLERS": f"{CALLER}@127.0.0.1",
                "SPECGATE_SCP_PROCESSES": "1"})
    proc = subprocess.Popen([str(Path(sys.executable).with_name("specgate")), "scp"], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "scp.log", "ab"))
    try:
        from tests.integration.dicom_node.helpers import echo

        wait_for(lambda: echo(port) == 0, timeout=30, what="specgate scp to answer")
        before = _peak_rss_kib(proc.pid)
        assert store(port, [big], raw=True) == [0]
        grown_mib = (_peak_rss_kib(proc.pid) - before) / 1024
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert grown_mib < 0.25 * size / 2**20, f"peak memory grew by {grown_mib:.0f} MiB for {size / 2**20:.0f} MiB"
    with sqlite_ledger.sessions() as s:
        row = s.execute(select(Instance)).scalar_one()
    stored = from_ledger(row.spool_path, sqlite_ledger.data_dir)
    assert row.size_bytes == stored.stat().st_size
    assert _dataset_digest(stored) == _dataset_digest(big)  # the data set as sent (the file meta is ours)


def _dataset_digest(path: Path) -> tuple[int, str]:
    """(length, SHA-256) of the bytes after the file meta information, read in chunks."""
    from pydicom.filereader import read_file_meta_info

    meta_end = 132 + 12 + int(read_file_meta_info(path).FileMetaInformationGroupLength)
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        f.seek(meta_end)
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()
