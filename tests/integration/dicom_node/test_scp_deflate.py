"""Deflated Explicit VR Little Endian (1.2.840.10008.1.2.1.99): refused at negotiation unless
SPECGATE_SCP_ACCEPT_DEFLATED is on, and then inflated as it arrives with a hard cap
(SPECGATE_SCP_MAX_INFLATED_BYTES): a data set of half a megabyte on the wire whose pixel data inflates to
512 MiB is refused with 0xC000 while the SCP process's memory stays flat (it used to climb from 120 MiB to
1.1 GiB before the refusal), and a legitimate deflated data set is stored as it was sent."""

from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom.sop_class import CTImageStorage

from tests.integration.dicom_node.helpers import (
    C000,
    SUCCESS,
    MiB,
    RawPeer,
    encode_dataset,
    explicit_long,
    image_header,
    nothing_left,
    still_serving,
    stored_files,
)
from tests.peers import write_ct_series

BOMB_PIXELS = 512 * MiB


def _deflated(ds: Dataset, tail: Iterator[bytes]) -> bytes:
    """``ds`` and then ``tail``'s pieces as one deflated data set (raw deflate, PS3.5 A.5)."""
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [z.compress(encode_dataset(ds))]
    out += [z.compress(piece) for piece in tail]
    out.append(z.flush())
    data = b"".join(out)
    return data + b"\0" * (len(data) % 2)


@functools.cache
def _bomb(kind: str) -> tuple[str, bytes]:
    """(SOP Instance UID, a deflated data set of about half a megabyte that inflates to 512 MiB of zeros):
    ``pixels``: as the pixel data of a 16384 x 16384 image (what the issue measured: 120 MiB -> 1.1 GiB);
    ``elements``: as 512 private elements of 1 MiB each, none of which declares much."""
    zeros = bytes(MiB)
    if kind == "pixels":
        ds = image_header(rows=16384, columns=16384)  # 16384 x 16384 x 2 bytes = 512 MiB
        tail = [explicit_long(0x7FE00010, b"OW", BOMB_PIXELS), *(zeros for _ in range(BOMB_PIXELS // MiB))]
    else:
        ds = image_header()
        tail = [struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", 8) + b"SPECGATE"]
        tail += [explicit_long(0x00091000 | (i % 0x100), b"OB", MiB - 12) + zeros[12:] for i in range(512)]
    return str(ds.SOPInstanceUID), _deflated(ds, iter(tail))


def test_deflate_is_not_negotiated_by_default(scp_process) -> None:
    """A context that offers only the deflated syntax is rejected (transfer syntaxes not supported); one
    that offers it beside Explicit VR Little Endian is accepted with the latter."""
    scp = scp_process()
    with RawPeer(scp.port, transfer_syntax=DeflatedExplicitVRLittleEndian) as peer:
        assert peer.accepted == []
    from pynetdicom import AE

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, [DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="SPECGATE")
    try:
        assert assoc.is_established
        assert [cx.transfer_syntax[0] for cx in assoc.accepted_contexts] == [ExplicitVRLittleEndian]
    finally:
        assoc.release()


def test_a_deflate_bomb_is_refused_with_flat_memory(scp_process, tmp_path: Path) -> None:
    """Deflate accepted: each bomb passes SPECGATE_SCP_MAX_INFLATED_BYTES (256 MiB), from the pixel data's
    header (it declares 512 MiB) or as the inflated bytes pass it (512 elements of 1 MiB), and the instance
    is refused with 0xC000 ``inflated_too_large`` (a data set we will not take at any time: not 0xA700,
    which invites the sender to try again), audited, nothing written; memory measured in the SCP process.
    A legitimate deflated data set is then stored, byte for byte as sent."""
    scp = scp_process(scp_accept_deflated="true")
    for kind in ("pixels", "elements"):
        sop, bomb = _bomb(kind)
        assert len(bomb) < MiB
        with scp.memory() as mem:
            with RawPeer(scp.port, transfer_syntax=DeflatedExplicitVRLittleEndian) as peer:
                assert peer.accepted, "deflate was not accepted"
                assert peer.send_store(peer.accepted[0], CTImageStorage, sop, [bomb])
                assert peer.response() == C000
        assert mem.grown_mib < 32, f"the SCP's peak memory grew by {mem.grown_mib:.1f} MiB ({kind})"
    events = scp.ledger.audit("instance.refused")
    assert [(e.details["reason"], e.details["status"]) for e in events] == [("inflated_too_large", "0xC000")] * 2
    assert all(str(256 * MiB) in e.details["detail"] for e in events)
    nothing_left(scp)

    # a real deflated CT slice, written by pydicom
    series = write_ct_series(tmp_path / "in", slices=1, size=256, seed=4)
    ds = dcmread(series.paths[0])
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    meta_end = 132 + 12 + int(dcmread(path).file_meta.FileMetaInformationGroupLength)
    with RawPeer(scp.port, transfer_syntax=DeflatedExplicitVRLittleEndian) as peer:
        assert peer.send_store(peer.accepted[0], CTImageStorage, ds.SOPInstanceUID, [raw[meta_end:]])
        assert peer.response() == SUCCESS
    [stored] = stored_files(scp)
    assert stored.read_bytes().endswith(raw[meta_end:])
    back = dcmread(stored)
    assert back.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert np.array_equal(back.pixel_array, dcmread(series.paths[0]).pixel_array)
    still_serving(scp, tmp_path)
