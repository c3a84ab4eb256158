"""STOW-RS on the node (dicom_node.stow) against real clients over real TLS: dicomweb-client's
``store_instances``, httpx and a raw TLS socket for what a well-behaved client never sends. The ledger is
the real PostgreSQL server (and SQLite where the backend does not matter); the CA is made in the test.

What is shown: a stored instance has its spool file and ledger row (caller recorded as the calling AE is)
before the response; a study split between dcmtk storescu (C-STORE) and STOW-RS is one job; no
credential is 401, a token or certificate not allowed is 403 (audited) or a refused handshake; and hostile
bodies are refused with nothing half-written: no row, no spool file, no temporary file left.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from prometheus_client import CollectorRegistry
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select

from dicom_node.assembler import Assembler
from dicom_node.config import AssemblyConfig, SeriesRule
from dicom_node.prometheus import StowMetrics
from dicom_node.security import client_ssl_context
from dicom_node.sink import file_meta
from dicom_node.stow import StowServer
from dicom_node.uploader import Uploader
from ledger.schema import Instance, Job, utcnow
from specgate.health import run_checks
from specgate.settings import Settings
from store import instance_key, open_store
from tests.integration.dicom_node.helpers import (
    CALLER,
    PIXEL_BLOCK,
    Ledger,
    encode_dataset,
    explicit_long,
    image_header,
    repeated,
    stored_files,
    with_payload,
)
from tests.peers import SeaweedS3, dcmtk, free_port, wait_for, write_ct_series
from tests.pki import Pki, make_pki

TOKEN = "stow-token-for-the-ris"
CALLER_NAME = "RIS01"
BOUNDARY = "specgate-test-boundary"


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def start_stow(pki: Pki) -> Iterator[Any]:
    """start_stow(ledger, **settings) -> a running StowServer on a free port (stopped after the test)."""
    running: list[StowServer] = []

    def start(ledger: Ledger, *, metrics: StowMetrics | None = None, **overrides: Any) -> StowServer:
        values: dict[str, Any] = {"data_dir": ledger.data_dir, "database_url": ledger.url, "stow_port": free_port(),
                                  "stow_tls_cert": pki.server_cert, "stow_tls_key": pki.server_key,
                                  "stow_tls_ca": pki.ca, "stow_tls_callers": "client",
                                  "stow_tokens": f"{CALLER_NAME}:{_sha(TOKEN)}"}
        values.update(overrides)
        settings = Settings.load(**values)
        config = settings.stow_config()
        assert config is not None
        server = StowServer.for_node(config, settings.node_config(), ledger.sessions, metrics=metrics).start()
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


def _url(server: StowServer, study: str | None = None) -> str:
    host, port = server.address
    return f"https://{host}:{port}/studies" + (f"/{study}" if study else "")


def _multipart(parts: Sequence[bytes], *, close: bool = True) -> bytes:
    body = b""
    for part in parts:
        body += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
    return body + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


def _post(server: StowServer | str, pki: Pki, body: bytes | Any, *, study: str | None = None,
          token: str | None = TOKEN, content_type: str | None = None) -> httpx.Response:
    """POST ``body`` (bytes, or an iterator of bytes: sent chunked) to the server (or its base URL)."""
    url = _url(server, study) if isinstance(server, StowServer) else server + (f"/{study}" if study else "")
    headers = {"Content-Type": content_type or f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    with httpx.Client(verify=client_ssl_context(pki.ca), timeout=30) as client:
        return client.post(url, content=body, headers=headers)


def _nothing_half_written(ledger: Ledger) -> None:
    assert ledger.spool_files() == []
    assert list((ledger.settings.spool_dir / "tmp").iterdir()) == []


def _failed(response: httpx.Response) -> list[tuple[str | None, int]]:
    items = response.json().get("00081198", {}).get("Value", [])
    return [(item.get("00081155", {}).get("Value", [None])[0], item["00081197"]["Value"][0]) for item in items]


def _stored(response: httpx.Response) -> list[str]:
    return [item["00081155"]["Value"][0] for item in response.json().get("00081199", {}).get("Value", [])]


# ------------------------------------------------------------------------------------ real clients
def test_dicomweb_client_stores_a_study_durably(pg_ledger: Ledger, start_stow, pki: Pki,
                                                tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=4, size=32)
    registry = CollectorRegistry()
    server = start_stow(pg_ledger, metrics=StowMetrics(registry))
    session = requests.Session()
    session.trust_env = False  # else REQUESTS_CA_BUNDLE of the environment replaces the test CA
    session.verify = str(pki.ca)
    session.headers["Authorization"] = f"Bearer {TOKEN}"
    client = DICOMwebClient(url=_url(server).removesuffix("/studies"), session=session)
    response = client.store_instances([dcmread(p) for p in series.paths], series.study_instance_uid)
    assert sorted(str(i.ReferencedSOPInstanceUID) for i in response.ReferencedSOPSequence) == \
        sorted(series.sop_instance_uids)
    assert "FailedSOPSequence" not in response
    with pg_ledger.sessions() as s:
        rows = s.execute(select(Instance)).scalars().all()
    assert sorted(r.sop_instance_uid for r in rows) == sorted(series.sop_instance_uids)
    assert {r.calling_ae for r in rows} == {CALLER_NAME}
    for row in rows:  # the spool file holds the data set exactly as sent, behind our file meta
        path = pg_ledger.data_dir / row.spool_path
        assert dcmread(path).file_meta.SourceApplicationEntityTitle == CALLER_NAME
        assert hashlib.sha256(path.read_bytes()).hexdigest() == row.sha256
    # sent again: duplicates, answered as stored, nothing new
    again = client.store_instances([dcmread(p) for p in series.paths])
    assert len(again.ReferencedSOPSequence) == 4 and pg_ledger.count() == 4
    assert registry.get_sample_value("specgate_stow_instances_stored_total", {"modality": "CT"}) == 8
    session.close()  # (an idle keep-alive connection would hold the server's graceful stop)


def test_with_an_object_store_stow_instances_are_uploaded(pg_ledger: Ledger, start_stow, pki: Pki,
                                                         s3_server: SeaweedS3, tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=2, size=32)
    s3 = {"store": "s3", "s3_endpoint_url": s3_server.endpoint_url, "s3_bucket": s3_server.bucket,
          "s3_access_key": s3_server.access_key, "s3_secret_key": s3_server.secret_key,
          "s3_prefix": f"stow-{tmp_path.name[-12:]}"}
    server = start_stow(pg_ledger, **s3)
    assert _post(server, pki, _multipart([p.read_bytes() for p in series.paths])).status_code == 200
    with pg_ledger.sessions() as s:  # acknowledged from the spool; the upload sets the key
        assert list(s.execute(select(Instance.store_key)).scalars()) == [None, None]
    settings = Settings.load(data_dir=pg_ledger.data_dir, database_url=pg_ledger.url, **s3)
    files = open_store(settings.store_config(), settings.data_dir)
    assert Uploader(pg_ledger.sessions, files, settings.data_dir).run_once() == 2
    with pg_ledger.sessions() as s:
        rows = s.execute(select(Instance.store_key, Instance.sha256)).all()
    assert all(key == instance_key(sha) and files.exists(key) for key, sha in rows)


def test_many_parts_in_one_request_are_answered_in_order(sqlite_ledger: Ledger, start_stow, pki: Pki,
                                                         tmp_path: Path) -> None:
    """More parts than wait at once (they are decided while the body arrives), a junk one among them."""
    series = write_ct_series(tmp_path / "in", slices=40, size=16)
    parts = [p.read_bytes() for p in series.paths]
    parts.insert(20, b"junk" * 100)
    r = _post(start_stow(sqlite_ledger), pki, _multipart(parts))
    assert r.status_code == 202
    assert _stored(r) == series.sop_instance_uids and _failed(r) == [(None, 0xC000)]
    assert sqlite_ledger.count() == 40
    assert list((sqlite_ledger.settings.spool_dir / "tmp").iterdir()) == []


def test_client_certificate_authenticates_without_a_token(sqlite_ledger: Ledger, start_stow, pki: Pki,
                                                          tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=2, size=32)
    server = start_stow(sqlite_ledger)
    ctx = client_ssl_context(pki.ca, pki.client_cert, pki.client_key)
    with httpx.Client(verify=ctx, timeout=30) as client:
        r = client.post(_url(server), content=_multipart([p.read_bytes() for p in series.paths]),
                        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'})
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom+json"
    assert sorted(_stored(r)) == sorted(series.sop_instance_uids)
    with sqlite_ledger.sessions() as s:
        assert set(s.execute(select(Instance.calling_ae)).scalars()) == {"client"}  # the certificate's CN


def test_a_certificate_of_the_ca_whose_name_is_not_listed_is_refused_and_audited(sqlite_ledger: Ledger, start_stow,
                                                                                pki: Pki, tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=1, size=32)
    server = start_stow(sqlite_ledger, stow_tls_callers="MODALITY7")  # "client" is signed by the CA, not listed
    ctx = client_ssl_context(pki.ca, pki.client_cert, pki.client_key)
    with httpx.Client(verify=ctx, timeout=30) as client:
        r = client.post(_url(server), content=_multipart([series.paths[0].read_bytes()]),
                        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'})
    assert r.status_code == 403
    assert sqlite_ledger.count() == 0 and list((sqlite_ledger.settings.spool_dir / "tmp").iterdir()) == []
    [refused] = sqlite_ledger.audit("stow.request_refused")
    assert "'client', not an allowed caller" in json.dumps(refused.details)


def test_a_study_half_by_c_store_half_by_stow_is_one_job(pg_ledger: Ledger, start_scp, start_stow,
                                                         pki: Pki, tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=8, size=32)
    scp = start_scp(pg_ledger)
    stow = start_stow(pg_ledger)
    host, port = scp.address
    r = dcmtk("storescu", "-aet", CALLER, "-aec", "SPECGATE", host, str(port), *map(str, series.paths[:4]))
    assert r.returncode == 0, r.stderr
    response = _post(stow, pki, _multipart([p.read_bytes() for p in series.paths[4:]]),
                     study=series.study_instance_uid)
    assert response.status_code == 200, response.text
    queued: list[int] = []
    rules = (SeriesRule(name="ct", modalities=("CT",), min_slices=8),)
    assembler = Assembler(AssemblyConfig(quiet_seconds=30, rules=rules), pg_ledger.sessions,
                          on_job_queued=queued.append)
    [result] = assembler.run_once(utcnow() + timedelta(seconds=31))
    assert queued == [result.job_id]
    with pg_ledger.sessions() as s:
        job = s.get(Job, result.job_id)
        assert job is not None and job.series_instance_uid == series.series_instance_uid
        callers = dict(s.execute(select(Instance.sop_instance_uid, Instance.calling_ae)).all())
    assert callers == {**{u: CALLER for u in series.sop_instance_uids[:4]},
                       **{u: CALLER_NAME for u in series.sop_instance_uids[4:]}}


def test_specgate_scp_serves_stow_rs_to_curl(scp_process, sqlite_ledger: Ledger, pki: Pki,
                                             tmp_path: Path) -> None:
    stow_port = free_port()
    scp_process(stow_port=str(stow_port), stow_tls_cert=str(pki.server_cert), stow_tls_key=str(pki.server_key),
                stow_tokens=f"{CALLER_NAME}:{_sha(TOKEN)}")
    wait_for(lambda: _accepts(stow_port), timeout=30, what="specgate scp's STOW-RS port")
    series = write_ct_series(tmp_path / "in", slices=2, size=32)
    body, out = tmp_path / "body", tmp_path / "response.json"
    body.write_bytes(_multipart([p.read_bytes() for p in series.paths]))
    r = subprocess.run(["curl", "-sS", "--cacert", str(pki.ca), "-o", str(out), "-w", "%{http_code}",
                        "-H", f"Authorization: Bearer {TOKEN}",
                        "-H", f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}',
                        "--data-binary", f"@{body}", f"https://127.0.0.1:{stow_port}/studies/{series.study_instance_uid}"],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout == "200", r.stderr
    stored = json.loads(out.read_text())["00081199"]["Value"]
    assert sorted(item["00081155"]["Value"][0] for item in stored) == sorted(series.sop_instance_uids)
    with sqlite_ledger.sessions() as s:
        callers = dict(s.execute(select(Instance.sop_instance_uid, Instance.calling_ae)).all())
    assert {callers[u] for u in series.sop_instance_uids} == {CALLER_NAME}


def test_a_large_part_is_streamed_to_disk(scp_process, sqlite_ledger: Ledger, pki: Pki,
                                          tmp_path: Path) -> None:
    """A 64 MiB multi-frame sent chunked to ``specgate scp``: its peak memory does not grow with it."""
    stow_port = free_port()
    scp = scp_process(stow_port=str(stow_port), stow_tls_cert=str(pki.server_cert), stow_tls_key=str(pki.server_key),
                      stow_tokens=f"{CALLER_NAME}:{_sha(TOKEN)}")
    wait_for(lambda: _accepts(stow_port), timeout=30, what="specgate scp's STOW-RS port")
    url = f"https://127.0.0.1:{stow_port}/studies"
    warm = write_ct_series(tmp_path / "warm", slices=1, size=32)  # the first request imports what later ones use
    assert _post(url, pki, _multipart([warm.paths[0].read_bytes()])).status_code == 200
    frames = 128
    pixels = 512 * 512 * 2 * frames
    ds = image_header(frames=frames)
    head = (file_meta(CTImageStorage, ds.SOPInstanceUID, "1.2.840.10008.1.2.1", "ANY") + encode_dataset(ds)
            + explicit_long(0x7FE00010, b"OW", pixels))

    def body() -> Iterator[bytes]:
        yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + head
        yield from repeated(pixels, PIXEL_BLOCK)
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    with scp.memory() as memory:
        r = _post(url, pki, body())
    assert r.status_code == 200 and _stored(r) == [ds.SOPInstanceUID], r.text
    assert memory.grown_mib < 32, f"peak memory grew by {memory.grown_mib:.0f} MiB for a 64 MiB part"
    [path] = [f for f in stored_files(scp) if f.name == f"{ds.SOPInstanceUID}.dcm"]
    sent = len(encode_dataset(ds)) + 12 + pixels  # the data set as sent, behind the file meta we write
    assert path.stat().st_size == len(file_meta(CTImageStorage, ds.SOPInstanceUID, "1.2.840.10008.1.2.1",
                                                CALLER_NAME)) + sent


def test_health_reports_the_endpoint(sqlite_ledger: Ledger, start_stow, pki: Pki) -> None:
    server = start_stow(sqlite_ledger)
    settings = Settings.load(data_dir=sqlite_ledger.data_dir, database_url=sqlite_ledger.url,
                             stow_port=server.address[1], stow_tls_cert=pki.server_cert,
                             stow_tls_key=pki.server_key, stow_tokens=f"{CALLER_NAME}:{_sha(TOKEN)}")
    [check] = run_checks(settings, only=("stow",))
    assert check.ok and "401 without credentials" in check.detail and "TLSv1." in check.detail, check.detail
    assert sqlite_ledger.audit("stow.request_refused") == []  # a probe is not an audit event
    server.stop()
    [check] = run_checks(settings, only=("stow",), timeout_s=2)
    assert not check.ok and f":{settings.stow_port}" in check.detail, check.detail


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------- who calls
def test_no_credential_is_401_and_a_wrong_token_403_audited(pg_ledger: Ledger, start_stow, pki: Pki,
                                                            tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=1, size=32)
    registry = CollectorRegistry()
    server = start_stow(pg_ledger, metrics=StowMetrics(registry))
    body = _multipart([series.paths[0].read_bytes()])
    r = _post(server, pki, body, token=None)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    r = _post(server, pki, body, token="not-the-token")
    assert r.status_code == 403
    [event] = pg_ledger.audit("stow.request_refused")
    assert event.details["reason"] == "forbidden" and event.details["status"] == 403
    assert event.details["address"] == "127.0.0.1" and "not-the-token" not in str(event.details)
    for reason in ("unauthenticated", "forbidden"):
        assert registry.get_sample_value("specgate_stow_requests_refused_total", {"reason": reason}) == 1
    assert pg_ledger.count() == 0
    _nothing_half_written(pg_ledger)


def test_a_certificate_from_another_ca_fails_the_handshake(sqlite_ledger: Ledger, start_stow, pki: Pki,
                                                           tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=1, size=32)
    server = start_stow(sqlite_ledger)
    ctx = client_ssl_context(pki.ca, pki.rogue_cert, pki.rogue_key)
    with pytest.raises(httpx.HTTPError), httpx.Client(verify=ctx, timeout=10) as client:
        client.post(_url(server), content=_multipart([series.paths[0].read_bytes()]),
                    headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
                             "Authorization": f"Bearer {TOKEN}"})
    assert sqlite_ledger.count() == 0


# ----------------------------------------------------------------------------------- what is sent
def test_wrong_study_junk_and_bad_content_are_refused_per_part(pg_ledger: Ledger, start_stow, pki: Pki,
                                                               tmp_path: Path) -> None:
    good = write_ct_series(tmp_path / "good", slices=1, size=32)
    other = write_ct_series(tmp_path / "other", slices=1, size=32)
    # an element that declares 0xFFFFFFF0 bytes (over element_bytes): refused as it arrives, never written
    long_element = with_payload(other.paths[0], bytes.fromhex("0900 1010 4f42 0000 f0ffffff"),
                                tmp_path / "long.dcm")
    registry = CollectorRegistry()
    server = start_stow(pg_ledger, metrics=StowMetrics(registry))
    r = _post(server, pki, _multipart([good.paths[0].read_bytes(), other.paths[0].read_bytes(),
                                       b"this is not DICOM" * 20, long_element.read_bytes()]),
              study=good.study_instance_uid)
    assert r.status_code == 202, r.text
    assert _stored(r) == [good.sop_instance_uids[0]]
    assert _failed(r) == [(other.sop_instance_uids[0], 0xA900), (None, 0xC000),
                          (other.sop_instance_uids[0], 0xC000)]
    assert pg_ledger.count() == 1
    reasons = [e.details["reason"] for e in pg_ledger.audit("instance.refused")]
    assert reasons == ["study_mismatch", "not_part10", "element_too_long"]
    assert {(e.actor, e.object_type) for e in pg_ledger.audit("instance.refused")} == {(CALLER_NAME, "http_request")}
    refused = "specgate_stow_instances_refused_total"
    assert registry.get_sample_value(refused, {"reason": "study_mismatch", "status": "0xA900"}) == 1
    assert registry.get_sample_value(refused, {"reason": "element_too_long", "status": "0xC000"}) == 1
    # every part refused: 409
    r = _post(server, pki, _multipart([other.paths[0].read_bytes()]), study=good.study_instance_uid)
    assert r.status_code == 409 and _failed(r) == [(other.sop_instance_uids[0], 0xA900)]
    assert list((pg_ledger.settings.spool_dir / "tmp").iterdir()) == []


@pytest.mark.parametrize("case", ["truncated", "no closing boundary", "no parts", "wrong content type",
                                  "study not a UID"])
def test_malformed_requests_store_nothing(sqlite_ledger: Ledger, start_stow, pki: Pki, tmp_path: Path,
                                          case: str) -> None:
    series = write_ct_series(tmp_path / "in", slices=1, size=32)
    data = series.paths[0].read_bytes()
    server = start_stow(sqlite_ledger)
    study = None
    content_type = None
    expected = 400
    if case == "truncated":  # cut inside the part's pixel data
        body = _multipart([data])[:len(data) // 2]
    elif case == "no closing boundary":
        body = _multipart([data], close=False)
    elif case == "no parts":
        body = f"--{BOUNDARY}--\r\n".encode()
    elif case == "wrong content type":
        body, content_type, expected = data, "application/dicom", 415
    else:
        body, study = _multipart([data]), "1.2.03"
    r = _post(server, pki, body, study=study, content_type=content_type)
    assert r.status_code == expected, r.text
    assert sqlite_ledger.count() == 0
    _nothing_half_written(sqlite_ledger)


def test_past_the_request_bound_is_413(sqlite_ledger: Ledger, start_stow, pki: Pki, tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=1, size=32)
    bound = 1 << 20
    server = start_stow(sqlite_ledger, scp_max_instance_bytes=bound, scp_max_association_bytes=bound)
    # declared: 2 GB, refused before a byte of the body is read (raw TLS: no client sends a lie like this)
    ctx = client_ssl_context(pki.ca)
    host, port = server.address
    with socket.create_connection((host, port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        tls.sendall((f"POST /studies HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                     f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}\r\n'
                     "Content-Length: 2147483648\r\n\r\n").encode() + b"--" + BOUNDARY.encode())
        answer = tls.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413")
    # streamed (chunked, no length declared): refused once the bound is passed
    one = series.paths[0].read_bytes()

    def chunks() -> Iterator[bytes]:
        yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + one
        for _ in range(40):
            yield b"\0" * (64 << 10)

    r = _post(server, pki, chunks())
    assert r.status_code == 413
    assert [e.details["reason"] for e in sqlite_ledger.audit("stow.request_refused")] == ["too_large", "too_large"]
    assert sqlite_ledger.count() == 0
    _nothing_half_written(sqlite_ledger)


def test_a_silent_body_ends_with_408_and_nothing_kept(sqlite_ledger: Ledger, start_stow, pki: Pki,
                                                     tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=1, size=32)
    server = start_stow(sqlite_ledger, scp_network_timeout=1)
    ctx = client_ssl_context(pki.ca)
    host, port = server.address
    part = _multipart([series.paths[0].read_bytes()])
    half = part[:len(part) // 2]  # into the pixel data: a temporary file exists when the sender falls silent
    with socket.create_connection((host, port), timeout=30) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        tls.sendall((f"POST /studies HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                     f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}\r\n'
                     f"Content-Length: {len(part)}\r\n\r\n").encode() + half)
        answer = tls.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert [e.details["reason"] for e in sqlite_ledger.audit("stow.request_refused")] == ["timeout"]
    assert sqlite_ledger.count() == 0
    _nothing_half_written(sqlite_ledger)


def test_connections_past_the_association_limit_get_503(sqlite_ledger: Ledger, start_stow, pki: Pki,
                                                        tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=1, size=32)
    server = start_stow(sqlite_ledger, scp_max_associations=1)
    host, port = server.address
    part = _multipart([series.paths[0].read_bytes()])
    with socket.create_connection((host, port), timeout=30) as raw, \
            client_ssl_context(pki.ca).wrap_socket(raw, server_hostname=host) as busy:
        busy.sendall((f"POST /studies HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                      f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}\r\n'
                      f"Content-Length: {len(part)}\r\n\r\n").encode() + part[:100])
        assert _post(server, pki, part).status_code == 503
        busy.sendall(part[100:])  # the first one completes
        assert busy.recv(4096).startswith(b"HTTP/1.1 200")
    assert sqlite_ledger.count() == 1


def test_settings_refuse_an_endpoint_nobody_can_use(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(ValueError, match="stow_tls_cert and stow_tls_key"):
        Settings.load(data_dir=tmp_path, stow_port=free_port(), stow_tokens=f"A:{_sha('x')}")
    with pytest.raises(ValueError, match="stow_tokens or stow_tls_ca"):
        Settings.load(data_dir=tmp_path, stow_port=free_port(), stow_tls_cert=pki.server_cert,
                      stow_tls_key=pki.server_key)
    with pytest.raises(ValueError, match="stow_tls_ca and stow_tls_callers go together"):
        Settings.load(data_dir=tmp_path, stow_port=free_port(), stow_tls_cert=pki.server_cert,
                      stow_tls_key=pki.server_key, stow_tls_ca=pki.ca)
    with pytest.raises(ValueError, match="NAME:SHA256"):
        Settings.load(data_dir=tmp_path, stow_tokens="A:plain-token")
    assert Settings.load(data_dir=tmp_path).stow_config() is None


def test_full_spool_and_a_reused_uid_are_answered_as_for_c_store(pg_ledger: Ledger, start_stow, start_scp,
                                                                 pki: Pki, tmp_path: Path) -> None:
    first = write_ct_series(tmp_path / "first", slices=1, size=32)
    # the same SOP Instance UID in another study: 0xC409 uid_conflict, the first copy kept
    reused = dcmread(first.paths[0])
    reused.StudyInstanceUID, reused.SeriesInstanceUID = generate_uid(), generate_uid()
    reused.save_as(tmp_path / "reused.dcm")
    scp = start_scp(pg_ledger)
    assert dcmtk("storescu", "-aet", CALLER, "-aec", "SPECGATE", *map(str, scp.address),
                 str(first.paths[0])).returncode == 0
    r = _post(start_stow(pg_ledger), pki, _multipart([(tmp_path / "reused.dcm").read_bytes()]))
    assert r.status_code == 409 and _failed(r) == [(first.sop_instance_uids[0], 0xC409)]
    # the spool's disk above the watermark: 0xA700, nothing kept
    other = write_ct_series(tmp_path / "other", slices=1, size=32)
    r = _post(start_stow(pg_ledger, spool_disk_watermark_percent=0.001), pki,
              _multipart([other.paths[0].read_bytes()]))
    assert r.status_code == 409 and _failed(r) == [(other.sop_instance_uids[0], 0xA700)]
    assert [e.details["reason"] for e in pg_ledger.audit("instance.refused")] == ["uid_conflict", "disk_watermark"]
    assert pg_ledger.count() == 1 and len(pg_ledger.spool_files()) == 1


def test_sop_class_and_transfer_syntax_not_accepted(sqlite_ledger: Ledger, start_stow, pki: Pki,
                                                    tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=2, size=32)
    sr = dcmread(series.paths[0])
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID = generate_uid()
    sr.save_as(tmp_path / "sr.dcm")
    mpeg = dcmread(series.paths[1])
    mpeg.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video: never negotiated either
    mpeg.PixelData = encapsulate([b"\xff\xd8 not decoded: refused before \xff\xd9"])
    mpeg.save_as(tmp_path / "mpeg.dcm")
    server = start_stow(sqlite_ledger)
    r = _post(server, pki, _multipart([(tmp_path / "sr.dcm").read_bytes(), (tmp_path / "mpeg.dcm").read_bytes()]))
    assert r.status_code == 409
    assert [reason for _, reason in _failed(r)] == [0x0122, 0xC122]
    _nothing_half_written(sqlite_ledger)


def test_deflated_only_when_the_node_accepts_it(sqlite_ledger: Ledger, start_stow, pki: Pki,
                                                tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=1, size=64)
    ds = dcmread(series.paths[0])
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    body = _multipart([path.read_bytes()])
    r = _post(start_stow(sqlite_ledger), pki, body)  # scp_accept_deflated off: as C-STORE does not negotiate it
    assert r.status_code == 409 and _failed(r) == [(series.sop_instance_uids[0], 0xC122)]
    r = _post(start_stow(sqlite_ledger, scp_accept_deflated=True), pki, body)
    assert r.status_code == 200, r.text
    [stored] = sqlite_ledger.spool_files()
    raw = path.read_bytes()
    assert stored.read_bytes().endswith(raw[144 + int.from_bytes(raw[140:144], "little"):])  # as sent
    assert np.array_equal(dcmread(stored).pixel_array, dcmread(series.paths[0]).pixel_array)
