"""Compressed transfer syntaxes in: dcmtk ``storescu`` proposing only the compressed syntax of each file
(a negotiation profile of its own), the files stored byte for byte as sent; a sender offering Explicit VR
Little Endian beside a compressed syntax gets the former; hostile codestream headers refused with 0xC000,
their reason audited, nothing written, the SCP process's memory flat."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select

from ledger.schema import Instance
from tests.compressed import LOSSLESS, LOSSY, compress_file, j2k_header, rewrap
from tests.integration.dicom_node.helpers import (
    C000,
    CALLER,
    SUCCESS,
    RawPeer,
    nothing_left,
    still_serving,
    stored_files,
)
from tests.peers import dcmtk, write_ct_series

J2K = "1.2.840.10008.1.2.4.90"
HTJ2K = ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203")


def _profile(path: Path, syntaxes: tuple[str, ...]) -> Path:
    """A storescu negotiation profile: CT Image Storage in one presentation context per syntax, each
    offering that syntax alone (no uncompressed fallback)."""
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(syntaxes):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Compressed]"]
    lines += [f"PresentationContext{i + 1} = {CTImageStorage}\\TS{i}" for i in range(len(syntaxes))]
    lines += ["[[Profiles]]", "[OnlyCompressed]", "PresentationContexts = Compressed"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _dataset_part(path: Path) -> bytes:
    return path.read_bytes()[132 + 12 + int(dcmread(path, stop_before_pixels=True).file_meta.FileMetaInformationGroupLength):]


def test_storescu_sends_each_compressed_syntax_stored_as_sent(scp_process, tmp_path: Path) -> None:
    """Nine syntaxes, each encoded by a real encoder and proposed alone: every file answered 0x0000 and
    stored with its syntax, its data set byte for byte the sender's (never transcoded)."""
    scp = scp_process()
    syntaxes = LOSSLESS + LOSSY
    series = write_ct_series(tmp_path / "plain", slices=len(syntaxes), size=32)
    sent = {ts: compress_file(p, ts, tmp_path / "sent" / f"{ts}.dcm")
            for ts, p in zip(syntaxes, series.paths, strict=True)}
    profile = _profile(tmp_path / "storescu.cfg", syntaxes)
    r = dcmtk("storescu", "-xf", profile, "OnlyCompressed", "-aet", CALLER, "-aec", "SPECGATE", "127.0.0.1",
              str(scp.port), *sent.values())
    assert r.returncode == 0, r.stderr
    with scp.ledger.sessions() as s:
        rows = {i.sop_instance_uid: i.transfer_syntax_uid for i in s.execute(select(Instance)).scalars()}
    stored = {dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in stored_files(scp)}
    assert len(stored) == len(syntaxes)
    for ts, path in sent.items():
        sop = dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert rows[sop] == ts
        assert str(dcmread(stored[sop], stop_before_pixels=True).file_meta.TransferSyntaxUID) == ts
        assert _dataset_part(stored[sop]) == _dataset_part(path), ts
    assert scp.ledger.audit("instance.refused") == []


def test_htj2k_is_negotiated_and_uncompressed_is_preferred(scp_process) -> None:
    """HTJ2K (no encoder installs here: its frames are decoded by OpenJPEG) is accepted alone; a context
    that offers JPEG-LS before Explicit VR Little Endian is accepted with Explicit VR Little Endian (the
    SCP's preference, not the order offered)."""
    scp = scp_process()
    for ts in HTJ2K:
        with RawPeer(scp.port, transfer_syntax=ts) as peer:
            assert peer.accepted, ts
    ae = AE(ae_title=CALLER)
    ae.add_requested_context(CTImageStorage, [JPEGLSLossless, ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="SPECGATE")
    try:
        assert assoc.is_established
        assert [cx.transfer_syntax[0] for cx in assoc.accepted_contexts] == [ExplicitVRLittleEndian]
    finally:
        assoc.release()


def _encoded(ds) -> bytes:  # type: ignore[no-untyped-def]
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


@pytest.mark.parametrize(("rows", "columns", "frames", "declared", "reason", "needle"), [
    (32, 32, None, (60000, 60000), "codestream_mismatch", "declares 60000 x 60000 pixels"),
    (65535, 65535, "1000", (65535, 65535), "codestream_too_large", str(65535 * 65535 * 1000 * 2)),
])
def test_a_hostile_codestream_header_is_refused_before_any_decode(scp_process, tmp_path: Path, rows: int,
                                                                  columns: int, frames: str | None,
                                                                  declared: tuple[int, int], reason: str,
                                                                  needle: str) -> None:
    """A JPEG 2000 frame whose SIZ declares 60000 x 60000 under Rows 32 (a decoder would allocate 6.7 GiB),
    and a data set of 65535 x 65535 x 1000 frames whose codestream agrees (8.6 TB decoded, over the
    2 GiB instance bound): 0xC000 with the reason, one audit row, no file, no row, memory flat; the
    association's next instance is stored."""
    scp = scp_process()
    ds = dcmread(write_ct_series(tmp_path / "one", slices=1, size=32).paths[0])
    ds.Rows, ds.Columns = rows, columns
    if frames is not None:
        ds.NumberOfFrames = frames
    rewrap(ds, [j2k_header(*declared) + bytes(64 * 1024)], J2K)
    with scp.memory() as mem:
        with RawPeer(scp.port, transfer_syntax=J2K) as peer:
            assert peer.send_store(peer.accepted[0], CTImageStorage, ds.SOPInstanceUID, [_encoded(ds)])
            assert peer.response() == C000
    assert mem.grown_mib < 32, f"the SCP's peak memory grew by {mem.grown_mib:.1f} MiB"
    [event] = scp.ledger.audit("instance.refused")
    assert (event.details["status"], event.details["reason"]) == ("0xC000", reason)
    assert needle in event.details["detail"] and event.details["sop_instance_uid"] == ds.SOPInstanceUID
    nothing_left(scp)
    still_serving(scp, tmp_path)


def test_a_good_and_a_hostile_frame_on_one_association(scp_process, tmp_path: Path) -> None:
    """The refusal is that message's: on the same association a real JPEG 2000 slice before and after a
    hostile one are stored (0x0000), the hostile one answered 0xC000."""
    scp = scp_process()
    series = write_ct_series(tmp_path / "in", slices=3, size=32)
    good = [dcmread(compress_file(p, J2K, tmp_path / f"g{i}.dcm")) for i, p in enumerate(series.paths[:2])]
    bad = dcmread(series.paths[2])
    rewrap(bad, [j2k_header(31, 32)], J2K)
    with RawPeer(scp.port, transfer_syntax=J2K) as peer:
        statuses = []
        for i, ds in enumerate((good[0], bad, good[1])):
            assert peer.send_store(peer.accepted[0], CTImageStorage, ds.SOPInstanceUID, [_encoded(ds)],
                                   message_id=i + 1)
            statuses.append(peer.response())
    assert statuses == [SUCCESS, C000, SUCCESS]
    assert [e.details["reason"] for e in scp.ledger.audit("instance.refused")] == ["codestream_mismatch"]
    nothing_left(scp, stored=2)


def test_orthanc_forwards_compressed_instances_as_stored(sqlite_ledger, start_scp, tmp_path: Path) -> None:
    """An Orthanc PACS holding JPEG 2000, JPEG-LS and JPEG Lossless instances sends them on (REST
    ``/modalities/.../store``): they arrive in their own syntaxes, pixel data byte for byte (Orthanc's DCMTK
    writes the data set again, so only the compressed frames are compared), nothing transcoded."""
    from tests.peers import Orthanc

    syntaxes = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.70")
    series = write_ct_series(tmp_path / "plain", slices=len(syntaxes), size=32)
    packed = [compress_file(p, ts, tmp_path / "sent" / f"{ts}.dcm") for ts, p in zip(syntaxes, series.paths, strict=True)]
    sent = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in packed}
    scp = start_scp(sqlite_ledger, allowed_callers="ORTHANC@127.0.0.1")
    host, port = scp.address
    with Orthanc(tmp_path / "orthanc", modalities={"specgate": ("SPECGATE", host, port)}) as orthanc:
        orthanc.upload(list(sent.values()))
        [study_id] = orthanc.get("/studies")
        job = orthanc.post("/modalities/specgate/store", {"Resources": [study_id], "Synchronous": True})
        assert job.get("FailedInstancesCount", 0) == 0, job
    with sqlite_ledger.sessions() as s:
        rows = {i.sop_instance_uid: i for i in s.execute(select(Instance)).scalars()}
    assert set(rows) == set(sent)
    from ledger.paths import from_ledger

    for sop, path in sent.items():
        stored = dcmread(from_ledger(rows[sop].spool_path, sqlite_ledger.data_dir))
        original = dcmread(path)
        assert rows[sop].transfer_syntax_uid == str(original.file_meta.TransferSyntaxUID)
        assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert stored.PixelData == original.PixelData
