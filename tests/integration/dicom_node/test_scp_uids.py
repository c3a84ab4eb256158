"""UIDs through the SCP: one rule (``dicom_node.spool.validate_uid``) at every entry: the A-ASSOCIATE-RQ's
syntaxes, the C-STORE request's Affected SOP Class/Instance UID, and the data set's SOP Class, SOP
Instance, Study and Series Instance UIDs (which become the file meta and the file's path). A UID is digits
and dots, no empty component, no leading zero, at most 64 characters, and may carry one trailing NUL, the
DICOM pad; anything else (a trailing newline or space, a control character, a NUL inside, a letter) is
refused: C-STORE 0xC000 ``invalid_uid`` with an audit row that names the field and shows the value, and no
file; an A-ASSOCIATE-RQ is rejected."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pynetdicom.sop_class import CTImageStorage

from tests.integration.dicom_node.helpers import (
    AssociationRefused,
    Ledger,
    RawPeer,
    associate_rq,
    encode_dataset,
    pdata,
    store,
    store_command,
)
from tests.peers import write_ct_series

C000 = 0xC000
BAD = {
    "trailing newline": "1.2.3\n",
    "trailing CR LF": "1.2.3\r\n",
    "trailing space": "1.2.3 ",
    "trailing tab": "1.2.3\t",
    "two NUL pads": "1.2.3\x00\x00",
    "leading space": " 1.2.3",
    "control character": "1.2\x013",
    "NUL inside": "1.2\x00.3",
    "letter": "1.2.3a",
    "empty component": "1..2",
    "leading dot": ".1.2",
    "trailing dot": "1.2.",
    "leading zero": "1.02",
    "65 characters": "1." + "2" * 63,
}
FIELDS = {  # where the bad value goes -> the words its refusal names
    "request SOP Instance": "Affected SOP Instance UID",
    "request SOP Class": "Affected SOP Class UID",
    "SOPInstanceUID": "SOP Instance UID",
    "SOPClassUID": "SOP Class UID",
    "StudyInstanceUID": "Study Instance UID",
    "SeriesInstanceUID": "Series Instance UID",
}


@pytest.fixture
def served(sqlite_ledger: Ledger, start_scp, tmp_path: Path):
    scp = start_scp(sqlite_ledger)
    series = write_ct_series(tmp_path / "in", slices=2)
    return sqlite_ledger, scp, series


def _send(port: int, rq_class: str | bytes, rq_instance: str | bytes, dataset: bytes) -> int | None:
    """A C-STORE on the CT context whose command carries exactly these UIDs (hand-written PDUs)."""
    with RawPeer(port) as peer:
        cx = peer.accepted[0]
        peer.send(pdata(cx, 0x03, store_command(rq_class, rq_instance)) + pdata(cx, 0x02, dataset))
        return peer.response()


def _with_raw_uid(ds: Dataset, keyword: str, value: bytes) -> bytes:
    """``ds`` encoded (Explicit VR Little Endian) with its ``keyword`` element's value exactly ``value``:
    pydicom would strip the whitespace and pad an odd length."""
    tag = int(Tag(keyword))
    del ds[tag]
    element = struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, b"UI", len(value)) + value
    return encode_dataset(ds[:tag]) + element + encode_dataset(ds[tag + 1:])


@pytest.mark.parametrize("field", list(FIELDS))
@pytest.mark.parametrize("case", list(BAD))
def test_a_value_that_is_not_a_uid_is_refused_wherever_it_comes(served, field: str, case: str) -> None:
    ledger, scp, series = served
    value = BAD[case]
    ds = dcmread(series.paths[0])
    rq_class, rq_instance = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    if field == "request SOP Instance":
        rq_instance = value.encode()
        data = encode_dataset(ds)
    elif field == "request SOP Class":
        rq_class = value.encode()
        data = encode_dataset(ds)
    else:
        data = _with_raw_uid(ds, field, value.encode())
    assert _send(scp.address[1], rq_class, rq_instance, data) == C000
    [event] = ledger.audit("instance.refused")
    assert event.details["reason"] == "invalid_uid" and event.details["status"] == "0xC000"
    assert FIELDS[field] in event.details["detail"] and "is not a UID" in event.details["detail"]
    assert ledger.count() == 0 and ledger.spool_files() == []
    assert list(scp.spool.tmp_dir.iterdir()) == []
    assert store(scp.address[1], series.paths[:1]) == [0]


def test_a_trailing_newline_is_not_filed_under_the_uid_without_it(served) -> None:
    """The case that was answered 0x0000 and filed as study ``1.2.3``: now 0xC000, no folder."""
    ledger, scp, series = served
    ds = dcmread(series.paths[0])
    data = _with_raw_uid(ds, "StudyInstanceUID", b"1.2.3\n")
    assert _send(scp.address[1], str(ds.SOPClassUID), str(ds.SOPInstanceUID), data) == C000
    assert not (scp.spool.root / "1.2.3").exists() and not (scp.spool.root / "1.2.3\n").exists()
    [event] = ledger.audit("instance.refused")
    assert "'1.2.3\\n'" in event.details["detail"]


def test_the_one_nul_pad_is_accepted_and_not_part_of_the_name(served) -> None:
    ledger, scp, series = served
    ds = dcmread(series.paths[0])
    data = _with_raw_uid(ds, "StudyInstanceUID", b"1.2.345\x00")
    rq_class = str(ds.SOPClassUID).encode() + b"\x00" * (len(ds.SOPClassUID) % 2 or 1)  # padded, even or odd
    assert _send(scp.address[1], rq_class, str(ds.SOPInstanceUID), data) == 0
    [path] = ledger.spool_files()
    assert path.parent.parent.name == "1.2.345"
    meta = dcmread(path).file_meta
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID and meta.MediaStorageSOPClassUID == CTImageStorage


@pytest.mark.parametrize("where", ["application context", "abstract syntax", "transfer syntax"])
@pytest.mark.parametrize("case", ["trailing newline", "trailing space", "letter", "leading zero"])
def test_an_associate_request_with_a_value_that_is_not_a_uid_is_rejected(served, where: str, case: str) -> None:
    """pynetdicom's decoder strips whitespace from these; read from the PDU's own bytes, the same rule
    applies: the association is rejected (permanent, service user, no reason given) and audited."""
    ledger, scp, series = served
    ct, explicit, app = b"1.2.840.10008.5.1.4.1.1.2", b"1.2.840.10008.1.2.1", b"1.2.840.10008.3.1.1.1"
    bad = {"trailing newline": b"\n", "trailing space": b" ", "letter": b"a", "leading zero": b".01"}[case]
    rq = associate_rq([(ct + bad if where == "abstract syntax" else ct,
                        [explicit + bad if where == "transfer syntax" else explicit])],
                      application_context=app + bad if where == "application context" else app)
    with pytest.raises(AssociationRefused) as refused:
        RawPeer(scp.address[1], associate_rq=rq)
    assert refused.value.rejection == (0x01, 0x01, 0x01)
    [event] = ledger.audit("association.rejected")
    assert event.details["reason"] == "a UID in the A-ASSOCIATE-RQ is not a UID"
    # the same request with valid UIDs is accepted
    with RawPeer(scp.address[1], associate_rq=associate_rq([(ct, [explicit])])) as peer:
        assert peer.accepted == [1]
