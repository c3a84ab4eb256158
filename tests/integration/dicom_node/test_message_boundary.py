"""One error boundary per DICOM message: a storage refusal answers that C-STORE 0xA700, an unexpected
error answers it 0xC000, each with an audit row, and the association goes on serving the next message.
Only transport failures end an association (tested in test_scp_hostile and test_faults).

The storage faults are real: a read-only spool folder (a read-only bind mount when the tests run as root,
who ignores permission bits; the permission bits otherwise) and the file size limit (RLIMIT_FSIZE, in
test_faults). The unexpected error is injected, since a bug cannot be caused on purpose."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import dicom_node.association
import dicom_node.receive
from tests.integration.dicom_node.helpers import Ledger, store
from tests.peers import write_ct_series


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """``folder`` read-only for the SCP (which runs in this process) while the block runs."""
    if os.geteuid() == 0:  # root ignores permission bits: a read-only bind mount of the folder on itself
        subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True)
            yield
        finally:
            subprocess.run(["umount", str(folder)], check=True)
    else:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(mode)


def _refusals(ledger: Ledger) -> list[tuple[str, str]]:
    return [(e.details["status"], e.details["reason"]) for e in ledger.audit("instance.refused")]


def test_read_only_temporary_folder_answers_a700_per_message(sqlite_ledger: Ledger, start_scp,
                                                             tmp_path: Path) -> None:
    """The data set cannot even be opened for writing: every C-STORE of the association is answered
    0xA700 (none aborts it), nothing is kept, and once the folder is writable the same SCP stores."""
    series = write_ct_series(tmp_path / "in", slices=3)
    scp = start_scp(sqlite_ledger)
    with read_only(scp.spool.tmp_dir):
        assert store(scp.address[1], series.paths) == [0xA700, 0xA700, 0xA700]
    assert _refusals(sqlite_ledger) == [("0xA700", "disk_write_failed")] * 3
    assert sqlite_ledger.count() == 0 and sqlite_ledger.spool_files() == []
    assert store(scp.address[1], series.paths) == [0, 0, 0]
    assert sqlite_ledger.count() == 3


def test_read_only_study_folder_answers_a700_and_the_next_study_is_stored(sqlite_ledger: Ledger, start_scp,
                                                                          tmp_path: Path) -> None:
    """The data set is written, but the spool refuses its final name (the study's folder is read-only):
    0xA700, the temporary file removed, and another study on the same association is stored."""
    refused = write_ct_series(tmp_path / "a", slices=2)
    other = write_ct_series(tmp_path / "b", slices=1, seed=1)
    scp = start_scp(sqlite_ledger)
    study_folder = scp.spool.root / refused.study_instance_uid
    study_folder.mkdir(parents=True)
    with read_only(study_folder):
        assert store(scp.address[1], [*refused.paths, *other.paths]) == [0xA700, 0xA700, 0]
    assert _refusals(sqlite_ledger) == [("0xA700", "storage_refused")] * 2
    assert [p.name for p in sqlite_ledger.spool_files()] == [f"{other.sop_instance_uids[0]}.dcm"]
    assert list(scp.spool.tmp_dir.iterdir()) == []
    assert store(scp.address[1], refused.paths) == [0, 0]
    assert sqlite_ledger.count() == 3


def test_unexpected_error_with_the_data_set_answers_c000_and_the_association_goes_on(
        sqlite_ledger: Ledger, start_scp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in handling one instance (injected once, after the data set arrived): 0xC000 with an audit
    row naming it, no file left, and the next instance on the same association is stored."""
    series = write_ct_series(tmp_path / "in", slices=3)
    scp = start_scp(sqlite_ledger)
    real = dicom_node.receive.InstanceReceiver._checked
    calls = []

    def fails_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(dicom_node.receive.InstanceReceiver, "_checked", fails_once)
    assert store(scp.address[1], series.paths) == [0, 0xC000, 0]
    assert _refusals(sqlite_ledger) == [("0xC000", "internal_error")]
    [event] = sqlite_ledger.audit("instance.refused")
    assert event.details["sop_instance_uid"] == series.sop_instance_uids[1]
    assert "RuntimeError" in event.details["detail"] and "injected" not in event.details["detail"]
    assert sqlite_ledger.count() == 2 and len(sqlite_ledger.spool_files()) == 2
    assert list(scp.spool.tmp_dir.iterdir()) == []


def test_unexpected_error_on_the_command_drops_its_data_set_then_answers_c000(
        sqlite_ledger: Ledger, start_scp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug when the C-STORE's command arrives, before its data set: the data set is read and dropped
    (the peer is still sending it), then answered 0xC000, and the association goes on."""
    series = write_ct_series(tmp_path / "in", slices=2, size=256)  # a data set of several PDUs
    scp = start_scp(sqlite_ledger)
    real = dicom_node.association.TempSink
    calls = []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(dicom_node.association, "TempSink", fails_once)
    assert store(scp.address[1], series.paths) == [0xC000, 0]
    assert _refusals(sqlite_ledger) == [("0xC000", "internal_error")]
    assert [p.name for p in sqlite_ledger.spool_files()] == [f"{series.sop_instance_uids[1]}.dcm"]
