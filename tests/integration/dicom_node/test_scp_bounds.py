"""What one peer may make the SCP read, hold or store, each bound tried through a real socket by a raw peer
(:class:`RawPeer`, bytes written by hand) against ``specgate scp`` in a process of its own, whose resident
memory is measured from /proc while the peer misbehaves.

Each refusal is checked for its answer (the A-ABORT's source and reason, or the C-STORE status), its audit
row, that nothing of it is left in the spool or its temporary folder, the SCP process's peak memory, and
that the SCP goes on serving. The answers (CONFORMANCE.md, "Limits"):

* the stream itself breaks a bound (a PDU over the maximum we announced, a command set over its bound, a
  data set or an association over its byte cap): A-ABORT, because the message cannot be answered without
  reading what the bound is there to refuse;
* the data set's content breaks one (an element that declares more than the element bound or the
  instance cap, sequences nested too deep): 0xC000 once the rest of the data set was read and dropped,
  since the instance is what is refused, not the association.
"""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import CTImageStorage, MultiFrameGrayscaleWordSecondaryCaptureImageStorage

from dicom_node import ul
from tests.integration.dicom_node.helpers import (
    C000,
    PIXEL_BLOCK,
    SUCCESS,
    MiB,
    RawPeer,
    ScpProcess,
    encode_dataset,
    explicit_long,
    image_header,
    nothing_left,
    pdata,
    repeated,
    still_serving,
    store_command,
    stored_files,
)
from tests.peers import wait_for, write_ct_series

ABORT_PROVIDER = 0x02
INVALID_PARAMETER, NOT_SPECIFIED = 0x06, 0x00


def _aborts(scp: ScpProcess) -> list[tuple[str, str]]:
    return [(e.details["reason"], e.details["abort"]) for e in scp.ledger.audit("association.aborted")]


# ------------------------------------------------------------------------------------------------ PDUs
def test_a_pdu_declaring_4_gib_is_aborted_before_it_is_read(scp_process, tmp_path: Path) -> None:
    """A P-DATA-TF whose header declares 0xFFFFFFFF bytes (the SCP announced 1 MiB) is aborted as soon
    as its header arrives (A-ABORT, provider, invalid-PDU-parameter value); so is an A-ASSOCIATE-RQ that
    declares as much. A PDU of exactly the announced maximum is taken."""
    scp = scp_process()
    with scp.memory() as mem:
        peer = RawPeer(scp.port)
        peer.sock.settimeout(8)  # under the SCP's 10 s network timeout: the abort must not be a timeout
        assert peer.max_pdu == MiB
        cx = peer.accepted[0]
        ds = image_header()
        peer.send(pdata(cx, 0x03, store_command(CTImageStorage, ds.SOPInstanceUID)))
        head = struct.pack(">BBI", ul.P_DATA_TF, 0, 0xFFFFFFFF) + struct.pack(">IBB", 0xFFFFFFFF - 4, cx, 0x00)
        peer.try_send(head + encode_dataset(ds) + explicit_long(0x7FE00010, b"OW", 64 * MiB))
        for piece in repeated(4 * MiB, PIXEL_BLOCK):
            if not peer.try_send(piece):
                break
        assert peer.abort_received() == (ABORT_PROVIDER, INVALID_PARAMETER)
        peer.sock.close()
        with socket.create_connection(("127.0.0.1", scp.port), timeout=8) as sock:
            sock.sendall(struct.pack(">BBI", ul.A_ASSOCIATE_RQ, 0, 0xFFFFFFFF) + bytes(4096))
            assert sock.recv(10) == ul.encode_abort(ABORT_PROVIDER, INVALID_PARAMETER)
    assert mem.grown_mib < 32, f"the SCP's peak memory grew by {mem.grown_mib:.1f} MiB"
    assert _aborts(scp) == [("pdu_too_long", "0x02/0x06")] * 2
    first = scp.ledger.audit("association.aborted")[0]
    assert first.actor == "TESTSCU" and "4294967295" in first.details["detail"]
    assert first.details["sop_instance_uid"] == ds.SOPInstanceUID  # the C-STORE it cut short
    nothing_left(scp)
    # exactly the maximum: a 3 MiB data set in PDUs of 1 MiB each (PDV header included)
    with RawPeer(scp.port) as peer:
        ds = image_header(rows=1024, columns=1536)
        data = [encode_dataset(ds), explicit_long(0x7FE00010, b"OW", 3 * MiB), *repeated(3 * MiB, PIXEL_BLOCK)]
        assert peer.send_store(peer.accepted[0], CTImageStorage, ds.SOPInstanceUID, data, max_pdu=MiB)
        assert peer.response() == SUCCESS
    still_serving(scp, tmp_path)


def test_a_command_set_over_its_bound_is_aborted(scp_process, tmp_path: Path) -> None:
    """Command fragments that never end (no 'last' bit) are aborted once they pass
    SPECGATE_SCP_MAX_COMMAND_BYTES (A-ABORT, provider, invalid-PDU-parameter value): a command cannot be
    answered before it is whole, and it is the part of a message held in memory."""
    scp = scp_process(scp_max_command_bytes="4096")
    with scp.memory() as mem:
        peer = RawPeer(scp.port)
        peer.sock.settimeout(8)
        cx = peer.accepted[0]
        command = store_command(CTImageStorage, generate_uid())
        sent = 0
        while sent < 64 * 1024 and peer.try_send(pdata(cx, 0x01, command + bytes(1024 - len(command)))):
            sent += 1024
        assert peer.abort_received() == (ABORT_PROVIDER, INVALID_PARAMETER)
        peer.sock.close()
    assert mem.grown_mib < 32, f"the SCP's peak memory grew by {mem.grown_mib:.1f} MiB"
    assert _aborts(scp) == [("command_too_long", "0x02/0x06")]
    nothing_left(scp)
    still_serving(scp, tmp_path)


# -------------------------------------------------------------------------------------------- elements
def _implicit(tag: int, value: bytes, length: int | None = None) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value) if length is None else length) + value


def test_an_element_declaring_more_than_the_element_bound_is_refused_before_it_is_read(
        scp_process, tmp_path: Path) -> None:
    """Implicit VR: the Study Instance UID declares 160 MiB (over the 64 MiB element bound) and the peer
    really sends them. The SCP refuses when it reads the element's header (0xC000 ``element_too_long``,
    answered once the rest of the data set has been read and dropped): nothing of the value is held
    (pydicom, asked for the UID, would have read all of it into memory) and nothing is written."""
    scp = scp_process()
    sop = generate_uid()
    declared = 160 * MiB
    head = (_implicit(0x00080016, CTImageStorage.encode() + b"\0") + _implicit(0x00080018, sop.encode() + b"\0")
            + struct.pack("<HHI", 0x0020, 0x000D, declared))
    tail = _implicit(0x0020000E, b"1.2.3.4\0") + _implicit(0x00280010, struct.pack("<H", 4)) \
        + _implicit(0x7FE00010, bytes(32))
    with scp.memory() as mem:
        peer = RawPeer(scp.port, transfer_syntax=ImplicitVRLittleEndian)
        cx = peer.accepted[0]
        assert peer.send_store(cx, CTImageStorage, sop, [head, *repeated(declared, b"1" * MiB), tail])
        assert peer.response() == C000
        peer.release()
    assert mem.grown_mib < 32, f"the SCP's peak memory grew by {mem.grown_mib:.1f} MiB"
    [event] = scp.ledger.audit("instance.refused")
    assert event.details["reason"] == "element_too_long" and event.details["status"] == "0xC000"
    assert "(0020,000D)" in event.details["detail"] and str(declared) in event.details["detail"]
    nothing_left(scp)
    still_serving(scp, tmp_path)


def test_an_element_declaring_more_than_the_instance_cap_is_refused(scp_process, tmp_path: Path) -> None:
    """With SPECGATE_SCP_MAX_INSTANCE_BYTES at 8 MiB: pixel data that declares 0xFFFFFFF0 bytes, and a
    private OB element that declares 16 MiB (under the element bound, over what is left of the instance
    cap), are each refused from their header (0xC000 ``element_too_long``) and nothing is kept."""
    scp = scp_process(scp_max_instance_bytes=str(8 * MiB))
    with scp.memory() as mem:
        with RawPeer(scp.port) as peer:
            cx = peer.accepted[0]
            ds = image_header()
            assert peer.send_store(cx, CTImageStorage, ds.SOPInstanceUID,
                                   [encode_dataset(ds), explicit_long(0x7FE00010, b"OW", 0xFFFFFFF0), PIXEL_BLOCK[:4096]])
            assert peer.response() == C000
            ds = image_header()
            private = struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", 8) + b"SPECGATE" \
                + explicit_long(0x00091001, b"OB", 16 * MiB)
            assert peer.send_store(cx, CTImageStorage, ds.SOPInstanceUID,
                                   [encode_dataset(ds[:0x00090000]), private, PIXEL_BLOCK[:4096]], message_id=2)
            assert peer.response() == C000
    assert mem.grown_mib < 32, f"the SCP's peak memory grew by {mem.grown_mib:.1f} MiB"
    events = scp.ledger.audit("instance.refused")
    assert [e.details["reason"] for e in events] == ["element_too_long"] * 2
    assert "(7FE0,0010)" in events[0].details["detail"] and "4294967280" in events[0].details["detail"]
    assert "(0009,1001)" in events[1].details["detail"]
    nothing_left(scp)
    still_serving(scp, tmp_path)


# ------------------------------------------------------------------------------------ instances, associations
def test_a_data_set_that_never_ends_is_aborted_at_the_instance_cap(scp_process, tmp_path: Path) -> None:
    """Encapsulated pixel data whose fragments keep coming, the 'last' bit never set: the association is
    aborted (A-ABORT, provider, reason not specified) when the data set passes
    SPECGATE_SCP_MAX_INSTANCE_BYTES (32 MiB here), its partial file removed, memory flat."""
    cap = 32 * MiB
    scp = scp_process(scp_max_instance_bytes=str(cap))
    ds = image_header()
    with scp.memory() as mem:
        peer = RawPeer(scp.port)
        peer.sock.settimeout(8)
        cx = peer.accepted[0]
        peer.send(pdata(cx, 0x03, store_command(CTImageStorage, ds.SOPInstanceUID)))
        peer.send(pdata(cx, 0x00, encode_dataset(ds) + explicit_long(0x7FE00010, b"OB", 0xFFFFFFFF)
                        + struct.pack("<HHI", 0xFFFE, 0xE000, 0)))
        sent = 0
        fragment = struct.pack("<HHI", 0xFFFE, 0xE000, len(PIXEL_BLOCK) - 8) + PIXEL_BLOCK[8:]
        wait_for(lambda: list(scp.tmp_dir.iterdir()), timeout=10, what="the partial file")
        while sent < 4 * cap and peer.try_send(pdata(cx, 0x00, fragment[:MiB // 2])) \
                and peer.try_send(pdata(cx, 0x00, fragment[MiB // 2:])):
            sent += len(fragment)
        assert sent < cap + 16 * MiB, f"{sent} bytes were taken"  # (what the sockets' buffers hold)
        assert peer.abort_received() == (ABORT_PROVIDER, NOT_SPECIFIED)
        peer.sock.close()
    assert mem.grown_mib < 32, f"the SCP's peak memory grew by {mem.grown_mib:.1f} MiB"
    assert _aborts(scp) == [("instance_too_large", "0x02/0x00")]
    [event] = scp.ledger.audit("association.aborted")
    assert event.details["sop_instance_uid"] == ds.SOPInstanceUID and str(cap) in event.details["detail"]
    nothing_left(scp)
    still_serving(scp, tmp_path)


def test_an_association_over_its_byte_cap_is_aborted_and_keeps_what_was_acknowledged(
        scp_process, tmp_path: Path) -> None:
    """Instances of 10 MiB on one association with SPECGATE_SCP_MAX_ASSOCIATION_BYTES at 48 MiB: four are
    stored (0x0000), the fifth passes the cap on its way in and the association is aborted (provider,
    reason not specified); the four acknowledged stay, nothing of the fifth is left."""
    scp = scp_process(scp_max_association_bytes=str(48 * MiB), scp_max_instance_bytes=str(16 * MiB))
    statuses = []
    with scp.memory() as mem:
        peer = RawPeer(scp.port)
        peer.sock.settimeout(8)
        cx = peer.accepted[0]
        for i in range(5):
            ds = image_header(rows=2048, columns=2560)  # 10 MiB of pixels
            sent = peer.send_store(cx, CTImageStorage, ds.SOPInstanceUID,
                                   [encode_dataset(ds), explicit_long(0x7FE00010, b"OW", 10 * MiB),
                                    *repeated(10 * MiB, PIXEL_BLOCK)], message_id=i + 1)
            if not sent:
                break
            status = peer.response()
            statuses.append(status)
            if status is None:
                break
        abort = peer.abort_received()
        peer.sock.close()
    assert statuses[:4] == [SUCCESS] * 4 and statuses[4:] in ([], [None])
    assert abort == (ABORT_PROVIDER, NOT_SPECIFIED)
    assert mem.grown_mib < 32, f"the SCP's peak memory grew by {mem.grown_mib:.1f} MiB"
    assert _aborts(scp) == [("association_too_large", "0x02/0x00")]
    nothing_left(scp, stored=4)
    still_serving(scp, tmp_path)


def test_twenty_associations_each_sending_a_large_multiframe_at_once(scp_process, tmp_path: Path) -> None:
    """Twenty peers at once, each a 40 MiB multi-frame (80 frames of 512x512, 16 bits) streamed to the
    SCP's one process: all stored, byte counts right, and the process's peak memory grows by a bounded
    amount per association (its read buffer and little else), not by what the instances weigh (800 MiB)."""
    frames, n = 80, 20
    size = frames * 512 * 512 * 2
    scp = scp_process(scp_max_associations=str(n))
    statuses: dict[int, int | None] = {}

    def send(i: int) -> None:
        ds = image_header(sop_class=MultiFrameGrayscaleWordSecondaryCaptureImageStorage, frames=frames)
        try:
            with RawPeer(scp.port, [MultiFrameGrayscaleWordSecondaryCaptureImageStorage]) as peer:
                peer.sock.settimeout(120)
                ok = peer.send_store(peer.accepted[0], ds.SOPClassUID, ds.SOPInstanceUID,
                                     [encode_dataset(ds), explicit_long(0x7FE00010, b"OW", size),
                                      *repeated(size, PIXEL_BLOCK)])
                statuses[i] = peer.response() if ok else None
        except OSError:
            statuses[i] = None

    with scp.memory() as mem:
        threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
    assert statuses == {i: SUCCESS for i in range(n)}
    assert mem.grown_mib < 96, f"the SCP's peak memory grew by {mem.grown_mib:.1f} MiB for {n} associations"
    print(f"\n20 x {size / MiB:.0f} MiB at once: SCP peak memory grew by {mem.grown_mib:.1f} MiB "
          f"(baseline {mem.baseline_kib / 1024:.0f} MiB)")
    files = stored_files(scp)
    assert len(files) == n and all(f.stat().st_size > size for f in files)
    for f in files:  # 800 MiB: not left behind for pytest's kept temporary folders
        f.unlink()
    assert list(scp.tmp_dir.iterdir()) == []


def test_data_sets_are_stored_as_sent_through_the_checks(scp_process, tmp_path: Path) -> None:
    """The checks read the stream, they do not change it: a CT slice in Explicit VR Little Endian, Implicit
    VR Little Endian and Explicit VR Big Endian, each sent in PDUs of 16 KiB, is stored byte for byte."""
    from pydicom import dcmread

    scp = scp_process()
    series = write_ct_series(tmp_path / "in", slices=3, size=128)
    sent = {}
    for path, syntax in zip(series.paths, (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian),
                            strict=True):
        ds = dcmread(path)
        del ds.file_meta
        data = encode_dataset(ds, implicit_vr=syntax == ImplicitVRLittleEndian,
                              little_endian=syntax != ExplicitVRBigEndian)
        with RawPeer(scp.port, transfer_syntax=syntax) as peer:
            assert peer.send_store(peer.accepted[0], CTImageStorage, ds.SOPInstanceUID, [data], max_pdu=16384)
            assert peer.response() == SUCCESS, syntax
        sent[f"{ds.SOPInstanceUID}.dcm"] = data
    stored = {f.name: f.read_bytes() for f in stored_files(scp)}
    assert stored.keys() == sent.keys()
    for name, data in sent.items():
        assert stored[name].endswith(data)
