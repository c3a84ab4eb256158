"""The store (``store``): the data directory and a real S3 server (SeaweedFS), the same promises on both."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from store import FsStore, HashMismatch, LocalCache, S3Store, Store, StoreError, instance_key, open_store


@pytest.fixture(params=["fs", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "fs":
        return FsStore(tmp_path / "data")
    cfg = request.getfixturevalue("s3_store_config")
    return open_store(cfg, tmp_path / "worker-data")


def _file(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_bytes(data)
    return p


def test_put_then_read_exists_and_delete(store: Store, tmp_path: Path) -> None:
    src = _file(tmp_path / "src", "seg.dcm", b"DICM" * 1000)
    key = "results/job-00000001-v1/seg.dcm"
    assert not store.exists(key)
    store.put(key, src)
    assert store.exists(key)
    assert store.path(key).read_bytes() == src.read_bytes()
    store.delete(key)
    assert not store.exists(key)
    store.delete(key)  # gone already: no error
    store.check()


def test_a_result_written_in_scratch_and_put_is_read_back_fresh_after_a_rewrite(store: Store) -> None:
    key = "results/job-00000002-v1/sr.dcm"
    p = store.scratch(key)
    p.write_bytes(b"first")
    store.put(key, p)
    assert store.path(key).read_bytes() == b"first"
    p.write_bytes(b"second, longer")  # an approval writes the SR again under the same key
    store.put(key, p)
    assert store.path(key, fresh=True).read_bytes() == b"second, longer"


def test_a_corrupted_local_copy_is_refused_then_fetched_again(store: Store, tmp_path: Path) -> None:
    data = os.urandom(5000)
    sha = hashlib.sha256(data).hexdigest()
    key = instance_key(sha) if store.remote else "spool/1.2/3.4/5.6.dcm"
    src = _file(tmp_path / "src", "i.dcm", data)
    if store.remote:
        store.put(key, src)
    else:
        store.put(key, src)
    first = store.verified_path(key, sha)
    first.write_bytes(b"X" + data[1:])  # a bit flipped on this host's disk
    with pytest.raises(HashMismatch) as err:
        store.verified_path(key, sha)
    assert err.value.expected == sha and err.value.got != sha
    if store.remote:  # the bad copy was dropped: asking again fetches the store's good one
        assert store.verified_path(key, sha).read_bytes() == data
    else:  # the data directory is the only copy: it stays refused
        with pytest.raises(HashMismatch):
            store.verified_path(key, sha)


def test_keys_that_leave_the_store_are_refused(store: Store) -> None:
    for bad in ("../etc/passwd", "results/../../x", "a/./b", "a\\b", "a\x00b"):
        with pytest.raises((StoreError, ValueError)):
            store.path(bad, fresh=True)


def test_s3_unreachable_is_a_store_error_naming_the_endpoint(tmp_path: Path, s3_store_config) -> None:
    from dataclasses import replace

    from tests.peers import free_port

    cfg = replace(s3_store_config, endpoint_url=f"http://127.0.0.1:{free_port()}", connect_timeout_s=0.5)
    s = S3Store(cfg, tmp_path)
    with pytest.raises(StoreError, match=f"s3:{cfg.endpoint_url}"):
        s.check()
    with pytest.raises(StoreError, match="cannot fetch results/x"):
        s.path("results/x")
    assert not list((tmp_path / "cache").rglob("*")) or all(p.is_dir() for p in (tmp_path / "cache").rglob("*"))


def test_s3_wrong_credentials_are_a_store_error(tmp_path: Path, s3_store_config) -> None:
    from dataclasses import replace

    s = S3Store(replace(s3_store_config, secret_key="not-the-secret"), tmp_path)
    with pytest.raises(StoreError, match="probe failed"):
        s.check()


def test_the_cache_drops_least_recently_used_files_but_not_those_in_use(tmp_path: Path) -> None:
    cache = LocalCache(tmp_path / "c", max_bytes=250)
    a = cache.get("sha256/a", lambda d: d.write_bytes(b"a" * 100))
    os.utime(a, (1, 1))  # used long ago
    b = cache.get("sha256/b", lambda d: d.write_bytes(b"b" * 100))
    os.utime(b, (2, 2))
    cache.get("sha256/a", lambda d: pytest.fail("a is cached: no fetch"))  # a hit makes a recent again
    c = cache.get("sha256/c", lambda d: d.write_bytes(b"c" * 100))
    assert a.exists() and c.exists() and not b.exists()  # b was the least recently used
    pinned = LocalCache.now()
    d = cache.get("sha256/d", lambda p: p.write_bytes(b"d" * 100), pinned_since=pinned)
    e = cache.get("sha256/e", lambda p: p.write_bytes(b"e" * 100), pinned_since=pinned)
    assert d.exists() and e.exists()  # the series being staged is never evicted, even over the bound
    assert not list((tmp_path / "c").rglob("*.part"))


def test_a_failed_fetch_leaves_no_partial_file(tmp_path: Path) -> None:
    cache = LocalCache(tmp_path / "c", max_bytes=0)

    def broken(dest: Path) -> None:
        dest.write_bytes(b"half")
        raise OSError("connection reset")

    with pytest.raises(OSError):
        cache.get("keys/results/x", broken)
    assert [p for p in (tmp_path / "c").rglob("*") if p.is_file()] == []


def test_a_connection_the_store_closes_mid_request_is_a_store_error(tmp_path: Path, s3_store_config) -> None:
    """An S3 server killed mid-upload: botocore's ConnectionClosedError carries ``response = None``, which
    once turned the StoreError into an AttributeError that ended the SCP's uploader thread for good."""
    import socket
    import threading
    from dataclasses import replace

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def close_each() -> None:  # accept, read the request's head, close without a word
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.recv(65536)
            conn.close()

    thread = threading.Thread(target=close_each, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        s = S3Store(replace(s3_store_config, endpoint_url=endpoint, connect_timeout_s=1.0, read_timeout_s=2.0),
                    tmp_path)
        with pytest.raises(StoreError, match="cannot store instances/x.dcm: ConnectionClosedError"):
            s.put("instances/x.dcm", _file(tmp_path, "x.dcm", b"DICM"))
    finally:
        stop.set()
        thread.join(5)
        listener.close()
