"""dicom_node.spool: UIDs as path components, durable no-clobber commit, sweeping, the disk watermark."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dicom_node.spool import InvalidUID, Spool, validate_uid

STUDY, SERIES, SOP = "1.2.3", "1.2.3.4", "1.2.3.4.5"


@pytest.mark.parametrize("value", [
    "1.2.840.10008.5.1.4.1.1.2", "1.2.3\x00", "0.1", "2.25.329800735698586629295641978511506172918",
])
def test_valid_uids_pass(value: str) -> None:
    assert validate_uid(value, what="UID") == value.rstrip("\x00 ")
    assert validate_uid(value.encode(), what="UID") == value.rstrip("\x00 ")  # the raw bytes: the same


@pytest.mark.parametrize("value", [
    "", "../../etc/passwd", "1.2/3", "1.2.3/../4", "1..2", ".1.2", "1.2.", "1.02", "1.2.a",
    "1." + "2" * 63, "1.2.3 4", None,
    # padding is one NUL and nothing else: `$` once let a trailing newline through, rstrip spaces
    "1.2.3\n", "1.2.3 ", "1.2.3\t", "1.2.3\r\n", "1.2.3\x00\x00", " 1.2.3", "1.2\x003", "1.2\x013",
    b"1.2.3\n", b"1.2.\xc3\xa93", "\x00",
])
def test_invalid_uids_are_refused_naming_the_value(value: str | bytes | None) -> None:
    with pytest.raises(InvalidUID, match="Study Instance UID"):
        validate_uid(value, what="Study Instance UID")


def _temp(spool: Spool, content: bytes) -> Path:
    path = spool.tmp_dir / f"t{time.monotonic_ns()}.dcm"
    path.write_bytes(content)
    return path


def test_commit_links_into_place_and_never_replaces(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", watermark_percent=99.9).open()
    first = spool.commit(_temp(spool, b"first"), STUDY, SERIES, SOP)
    assert first.created and first.path == tmp_path / "spool" / STUDY / SERIES / f"{SOP}.dcm"
    assert first.path.read_bytes() == b"first" and first.size_bytes == 5
    second_temp = _temp(spool, b"second")
    second = spool.commit(second_temp, STUDY, SERIES, SOP)
    assert not second.created and second.path == first.path
    assert first.path.read_bytes() == b"first" and second_temp.exists()  # the caller decides
    replaced = spool.replace(second_temp, second.path)
    assert replaced.path.read_bytes() == b"second" and not second_temp.exists()
    assert list(spool.tmp_dir.iterdir()) == []


def test_commit_refuses_a_uid_that_is_a_path(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", watermark_percent=99.9).open()
    temp = _temp(spool, b"x")
    with pytest.raises(InvalidUID):
        spool.commit(temp, "../../evil", SERIES, SOP)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spool"]


def test_sweep_removes_only_old_temporary_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", watermark_percent=99.9).open()
    old, new = _temp(spool, b"old"), _temp(spool, b"new")
    past = time.time() - 3600
    os.utime(old, (past, past))
    assert spool.sweep_temp(600) == 1
    assert not old.exists() and new.exists()


def test_watermark(tmp_path: Path) -> None:
    used = Spool(tmp_path, watermark_percent=100).usage_percent()
    assert Spool(tmp_path, watermark_percent=100).has_room()
    assert not Spool(tmp_path, watermark_percent=max(used - 1, 0.01)).has_room()
