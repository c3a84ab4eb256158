"""ledger.paths: what the ledger stores for a file, and the file a stored path names."""

from __future__ import annotations

from pathlib import Path

import pytest

from ledger.paths import from_ledger, to_ledger


def test_stored_relative_to_the_resolved_data_dir_and_resolved_back(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    (data / "spool" / "1.2").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    # the SCP of `make demo`: a data dir relative to the folder it was started in
    assert to_ledger(Path("data/spool/1.2/3.dcm"), Path("./data")) == "spool/1.2/3.dcm"
    assert to_ledger(data / "spool" / "1.2" / "3.dcm", data) == "spool/1.2/3.dcm"
    link = tmp_path / "link"
    link.symlink_to(data)
    assert to_ledger(link / "results" / "seg.dcm", data) == "results/seg.dcm"
    assert from_ledger("spool/1.2/3.dcm", tmp_path / "mnt") == tmp_path / "mnt" / "spool" / "1.2" / "3.dcm"
    monkeypatch.chdir(data)
    assert from_ledger("results/seg.dcm", Path(".")) == data / "results" / "seg.dcm"


def test_a_path_outside_the_data_dir_is_refused_naming_both(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"/elsewhere/seg\.dcm.*outside the data directory.*/data"):
        to_ledger(tmp_path / "elsewhere" / "seg.dcm", tmp_path / "data")
    with pytest.raises(ValueError, match="outside"):
        to_ledger(tmp_path / "data" / ".." / "x.dcm", tmp_path / "data")


def test_absolute_rows_of_earlier_versions_and_no_data_dir_are_read_as_they_are(tmp_path: Path) -> None:
    assert from_ledger("/var/lib/specgate/spool/a.dcm", tmp_path) == Path("/var/lib/specgate/spool/a.dcm")
    assert from_ledger("specgate-data/spool/a.dcm", None) == Path("specgate-data/spool/a.dcm")
    assert to_ledger(Path("/x/y.dcm"), None) == "/x/y.dcm"
