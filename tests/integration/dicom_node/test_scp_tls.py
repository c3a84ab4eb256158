"""TLS on the SCP, with mutual TLS on: a client with a certificate from the configured CA stores; one with
no certificate or an untrusted one is refused during the handshake, audited, and nothing is stored."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_node.security import client_ssl_context
from tests.integration.dicom_node.helpers import CALLER, Ledger
from tests.peers import wait_for, write_ct_series
from tests.pki import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_scp(sqlite_ledger: Ledger, start_scp, pki: Pki):
    return start_scp(sqlite_ledger, scp_tls_cert=pki.server_cert, scp_tls_key=pki.server_key,
                     scp_tls_ca=pki.ca, scp_tls_require_client_cert=True)


def _store_tls(port: int, ctx: ssl.SSLContext, paths: list[Path]) -> list[int] | None:
    ae = AE(ae_title=CALLER)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="SPECGATE", tls_args=(ctx, "127.0.0.1"))
    if not assoc.is_established:
        return None
    try:
        return [int(assoc.send_c_store(p).Status) for p in paths]
    finally:
        assoc.release()


def test_trusted_client_certificate_stores(tls_scp, sqlite_ledger: Ledger, pki: Pki, tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=3)
    ctx = client_ssl_context(pki.ca, pki.client_cert, pki.client_key)
    assert _store_tls(tls_scp.address[1], ctx, series.paths) == [0, 0, 0]
    assert sqlite_ledger.count() == 3


@pytest.mark.parametrize("which", ["no certificate", "untrusted certificate"])
def test_client_without_a_trusted_certificate_is_refused(tls_scp, sqlite_ledger: Ledger, pki: Pki,
                                                          tmp_path: Path, which: str) -> None:
    series = write_ct_series(tmp_path / "in", slices=2)
    if which == "no certificate":
        ctx = client_ssl_context(pki.ca)
    else:
        ctx = client_ssl_context(pki.ca, pki.rogue_cert, pki.rogue_key)
    assert _store_tls(tls_scp.address[1], ctx, series.paths) is None
    assert sqlite_ledger.count() == 0 and sqlite_ledger.spool_files() == []
    # the server notices the failed handshake in its own thread, possibly after the client gave up
    [event] = wait_for(lambda: sqlite_ledger.audit("association.tls_refused"), timeout=10,
                       what="the audit event of the refused handshake")
    assert event.details["address"] == "127.0.0.1"
    # a plain-TCP client gets nowhere either
    ae = AE(ae_title=CALLER)
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    assert not ae.associate("127.0.0.1", tls_scp.address[1], ae_title="SPECGATE").is_established
    # and the server still serves a trusted client afterwards
    good = client_ssl_context(pki.ca, pki.client_cert, pki.client_key)
    assert _store_tls(tls_scp.address[1], good, series.paths) == [0, 0]


def test_client_must_trust_the_server(tls_scp, pki: Pki, tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "in", slices=1)
    d = pki.ca.parent
    ctx = client_ssl_context(d / "rogue-ca.pem", pki.client_cert, pki.client_key)
    assert _store_tls(tls_scp.address[1], ctx, series.paths) is None
