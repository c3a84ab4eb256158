"""Hostile and broken input: each gets its precise status, nothing is written outside the spool (and no
file or row for a refused instance), and the SCP keeps serving afterwards."""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.integration.dicom_node.helpers import (
    CALLER,
    Ledger,
    RawPeer,
    echo,
    encode_dataset,
    nothing_left,
    pdata,
    raw_request,
    raw_store,
    store,
    store_command,
    stored_files,
    with_payload,
)
from tests.peers import wait_for, write_ct_series

A900, C000 = 0xA900, 0xC000


@pytest.fixture
def served(sqlite_ledger: Ledger, start_scp, tmp_path: Path):
    scp = start_scp(sqlite_ledger, scp_network_timeout=2, scp_acse_timeout=2)
    series = write_ct_series(tmp_path / "in", slices=2)
    return sqlite_ledger, scp, series


def _assert_nothing_kept_and_still_serving(ledger: Ledger, port: int, good: Path, tmp_path: Path) -> None:
    assert ledger.count() == 0
    assert ledger.spool_files() == []
    # nothing was written outside the data folder: only our own inputs and the data folder in tmp_path
    assert {p.name for p in tmp_path.iterdir()} <= {"data", "hostile", "in", "ledger.db", "ledger.db-wal",
                                                    "ledger.db-shm"}
    assert store(port, [good]) == [0]
    assert ledger.count() == 1


def _save(ds: Dataset, path: Path, *, meta_sop: str | None = None) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = meta_sop or ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=False)
    return path


def test_truncated_dataset(served, tmp_path: Path) -> None:
    ledger, scp, series = served
    good = series.paths[0]
    raw = good.read_bytes()
    meta_end = 132 + 12 + int(dcmread(good).file_meta.FileMetaInformationGroupLength)
    bad = with_payload(good, raw[meta_end:len(raw) - 3000], tmp_path / "hostile" / "truncated.dcm")
    assert store(scp.address[1], [bad], raw=True) == [C000]
    [event] = ledger.audit("instance.refused")
    assert event.details["reason"] == "truncated" and event.details["status"] == "0xC000"
    _assert_nothing_kept_and_still_serving(ledger, scp.address[1], good, tmp_path)


def test_random_bytes(served, tmp_path: Path) -> None:
    ledger, scp, series = served
    import numpy as np

    noise = np.random.default_rng(7).integers(0, 256, 20000, dtype=np.uint8).tobytes()
    bad = with_payload(series.paths[0], noise, tmp_path / "hostile" / "noise.dcm")
    assert store(scp.address[1], [bad], raw=True) == [C000]
    _assert_nothing_kept_and_still_serving(ledger, scp.address[1], series.paths[0], tmp_path)


def test_image_without_pixel_data(served, tmp_path: Path) -> None:
    ledger, scp, series = served
    ds = dcmread(series.paths[0])
    del ds.PixelData
    assert store(scp.address[1], [ds]) == [A900]
    [event] = ledger.audit("instance.refused")
    assert event.details["reason"] == "no_pixel_data"
    _assert_nothing_kept_and_still_serving(ledger, scp.address[1], series.paths[0], tmp_path)


@pytest.mark.parametrize("field", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
@pytest.mark.parametrize("value", ["1.2.3/../../../../../tmp/evil", "../../evil", "1.2.3/4",
                                   "1." + "2" * 70])
def test_uid_that_is_a_path_or_too_long(served, tmp_path: Path, field: str, value: str) -> None:
    """Sent as hand-written PDUs: pynetdicom (rightly) will not put such a UID in a request itself."""
    ledger, scp, series = served
    ds = dcmread(series.paths[0])
    setattr(ds, field, value)
    status = raw_store(scp.address[1], ds.SOPClassUID, ds.SOPInstanceUID, encode_dataset(ds))
    # Also when the request itself carries the bad SOP Instance UID: the response then leaves the
    # Affected SOP Instance UID out (it is optional in a response) rather than echo a value that is not
    # a UID, and the refusal is a status, not an aborted association.
    assert status == C000
    [event] = ledger.audit("instance.refused")
    assert event.details["reason"] == "invalid_uid"
    assert list(scp.spool.tmp_dir.iterdir()) == []
    # where the spool would have written, had it used the value as a path: <study>/<series>/<sop>.dcm
    # under the spool, each with the hostile value in its place, resolved as the kernel would
    root = scp.spool.root
    study, series_uid, sop = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    targets = [Path(os.path.normpath(p)) for p in
               (root / study, root / study / series_uid, root / study / series_uid / f"{sop}.dcm")]
    for target in targets:
        assert not target.exists(), f"{target} was written"
    assert not list(tmp_path.rglob("*evil*"))
    _assert_nothing_kept_and_still_serving(ledger, scp.address[1], series.paths[0], tmp_path)


def test_request_and_dataset_uids_differ(served, tmp_path: Path) -> None:
    ledger, scp, series = served
    ds = dcmread(series.paths[0])
    bad = _save(ds, tmp_path / "hostile" / "mismatch.dcm", meta_sop=generate_uid())
    assert store(scp.address[1], [bad], raw=True) == [A900]
    [event] = ledger.audit("instance.refused")
    assert event.details["reason"] == "sop_instance_mismatch"
    _assert_nothing_kept_and_still_serving(ledger, scp.address[1], series.paths[0], tmp_path)


def _nested(depth: int) -> bytes:
    """(0009,1010) SQ nested ``depth`` levels deep, undefined lengths, written by hand (pydicom's own
    writer recurses and cannot write it)."""
    sq_open = struct.pack("<HH2sHI", 0x0009, 0x1010, b"SQ", 0, 0xFFFFFFFF)
    item_open = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_close = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    sq_close = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    creator = struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", 8) + b"SPECGATE"
    return creator + (sq_open + item_open) * depth + (item_close + sq_close) * depth


def test_deeply_nested_sequence(scp_process, tmp_path: Path) -> None:
    """100 000 levels of undefined-length sequences: refused when the 33rd opens (the bound,
    SPECGATE_SCP_MAX_SEQUENCE_DEPTH, is 32), 0xC000 ``sequence_too_deep`` once the rest of the data set
    was read and dropped; audited, nothing kept, memory flat in the SCP process. The answer is 0xC000 and
    not an A-ABORT because the data set is what is wrong, not the association. 32 levels are stored,
    byte for byte."""
    scp = scp_process()
    series = write_ct_series(tmp_path / "in", slices=2)
    ds = dcmread(series.paths[0])
    payload = encode_dataset(ds[:0x00090000]) + _nested(100_000) + encode_dataset(ds[0x00090000:])
    with scp.memory() as mem:
        with RawPeer(scp.port) as peer:
            assert peer.send_store(peer.accepted[0], CTImageStorage, ds.SOPInstanceUID, [payload])
            assert peer.response() == C000
    assert mem.grown_mib < 32, f"the SCP's peak memory grew by {mem.grown_mib:.1f} MiB"
    [event] = scp.ledger.audit("instance.refused")
    assert event.details["reason"] == "sequence_too_deep" and event.details["status"] == "0xC000"
    assert "32" in event.details["detail"]
    nothing_left(scp)
    ds = dcmread(series.paths[1])
    payload = encode_dataset(ds[:0x00090000]) + _nested(32) + encode_dataset(ds[0x00090000:])
    with RawPeer(scp.port) as peer:
        assert peer.send_store(peer.accepted[0], CTImageStorage, ds.SOPInstanceUID, [payload])
        assert peer.response() == 0
    [stored] = stored_files(scp)
    assert stored.read_bytes().endswith(payload)


def test_unknown_calling_ae_is_rejected_and_audited(served, tmp_path: Path) -> None:
    ledger, scp, series = served
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", scp.address[1], ae_title="SPECGATE")
    assert assoc.is_rejected
    prim = assoc.acceptor.primitive
    assert (prim.result, prim.result_source, prim.diagnostic) == (0x01, 0x01, 0x03)
    [event] = ledger.audit("association.rejected")
    assert event.actor == "STRANGER"
    assert event.details == {"calling_ae": "STRANGER", "called_ae": "SPECGATE", "address": "127.0.0.1",
                             "reason": "calling AE title not recognised"}
    # a known AE title from another host is not on the list either
    _assert_nothing_kept_and_still_serving(ledger, scp.address[1], series.paths[0], tmp_path)


def test_known_ae_from_another_host_is_rejected(sqlite_ledger: Ledger, start_scp) -> None:
    scp = start_scp(sqlite_ledger, allowed_callers=f"{CALLER}@10.1.2.3")
    assert echo(scp.address[1]) is None
    [event] = sqlite_ledger.audit("association.rejected")
    assert event.details["address"] == "127.0.0.1"


def test_wrong_called_ae_is_rejected_when_checked(sqlite_ledger: Ledger, start_scp) -> None:
    scp = start_scp(sqlite_ledger)
    assert echo(scp.address[1], called="SOMEONE") is None
    [event] = sqlite_ledger.audit("association.rejected")
    assert event.details["reason"] == "called AE title not recognised"
    off = start_scp(sqlite_ledger, scp_require_called_ae=False)
    assert echo(off.address[1], called="SOMEONE") == 0


def test_more_associations_than_allowed(sqlite_ledger: Ledger, start_scp, tmp_path: Path) -> None:
    scp = start_scp(sqlite_ledger, scp_max_associations=2)
    ae = AE(ae_title=CALLER)
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", scp.address[1], ae_title="SPECGATE") for _ in range(2)]
    assert all(a.is_established for a in held)
    third = ae.associate("127.0.0.1", scp.address[1], ae_title="SPECGATE")
    assert third.is_rejected
    prim = third.acceptor.primitive
    assert (prim.result, prim.result_source, prim.diagnostic) == (0x02, 0x03, 0x02)  # transient, local limit
    assert [e.details["reason"] for e in sqlite_ledger.audit("association.rejected")] == \
        ["local limit exceeded (too many associations)"]
    for a in held:
        a.release()
    wait_for(lambda: scp.active_associations() == 0, timeout=10, what="associations to close")
    assert echo(scp.address[1]) == 0


def test_peer_connects_and_says_nothing(served, tmp_path: Path) -> None:
    ledger, scp, series = served
    t0 = time.monotonic()
    with socket.create_connection(scp.address, timeout=10) as sock:
        assert echo(scp.address[1]) == 0  # the silent peer does not block others
        assert sock.recv(1024) == b""  # closed by the SCP after its ACSE timeout (2 s)
    assert time.monotonic() - t0 < 8
    _assert_nothing_kept_and_still_serving(ledger, scp.address[1], series.paths[0], tmp_path)


def test_peer_goes_silent_mid_dataset(served, tmp_path: Path) -> None:
    """The peer sends a C-STORE request and half its dataset, then nothing: the SCP aborts the association
    after its network timeout; no row, no spool file, and the partial temporary file is removed."""
    ledger, scp, series = served
    ae = AE(ae_title=CALLER)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.address[1], ae_title="SPECGATE")
    assert assoc.is_established
    cx = assoc.accepted_contexts[0]
    sock = assoc.dul.socket.socket
    raw = series.paths[0].read_bytes()
    meta_end = 132 + 12 + int(dcmread(series.paths[0]).file_meta.FileMetaInformationGroupLength)
    command = store_command(CTImageStorage, series.sop_instance_uids[0])
    # the data set's first 4000 bytes (its header and the start of its pixel data): a valid beginning
    sock.sendall(pdata(cx.context_id, 0x03, command) + pdata(cx.context_id, 0x00, raw[meta_end:meta_end + 4000]))
    wait_for(lambda: list((ledger.settings.spool_dir / "tmp").iterdir()), timeout=5, what="a partial temp file")
    t0 = time.monotonic()
    # the SCP sends an A-ABORT after its 2 s network timeout; pynetdicom (the peer's side) sees it
    wait_for(lambda: assoc.is_aborted, timeout=10, what="the SCP to abort the silent association")
    assert time.monotonic() - t0 < 8
    assert ledger.count() == 0 and ledger.spool_files() == []
    wait_for(lambda: scp.active_associations() == 0, timeout=10, what="the aborted association to end")
    assert list(scp.spool.tmp_dir.iterdir()) == []
    _assert_nothing_kept_and_still_serving(ledger, scp.address[1], series.paths[0], tmp_path)


def test_an_operation_we_do_not_perform_gets_0211(served, tmp_path: Path) -> None:
    """A C-FIND-RQ (with its identifier) on the CT context: C-FIND-RSP 0x0211 'unrecognised operation',
    the identifier is read and dropped, nothing is stored, and the SCP goes on."""
    from pynetdicom.dsutils import encode

    ledger, scp, series = served
    cs = Dataset()
    cs.AffectedSOPClassUID = CTImageStorage
    cs.CommandField = 0x0020  # C-FIND-RQ
    cs.MessageID = 5
    cs.Priority = 0
    cs.CommandDataSetType = 0x0001
    body = encode(cs, True, True)
    group = Dataset()
    group.CommandGroupLength = len(body)
    command = encode(group, True, True) + body
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    status = raw_request(scp.address[1], CTImageStorage,
                         lambda cx: pdata(cx, 0x03, command) + pdata(cx, 0x02, encode_dataset(identifier)))
    assert status == 0x0211
    _assert_nothing_kept_and_still_serving(ledger, scp.address[1], series.paths[0], tmp_path)
