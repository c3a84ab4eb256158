"""DICOMweb out: results sent by STOW-RS (dicomweb-client) to a real server, Orthanc with Debian's DICOMweb
plugin and HTTP basic authentication, with the claim, retries, back-off, idempotence and audit trail of
a C-STORE destination; the password never reaches the ledger, the audit trail or a log; ``specgate echo``
asks the server a QIDO-RS query."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update

from dicom_node.config import Destination
from dicom_node.scu import RetryPolicy, deliver, send
from ledger.db import session_scope
from ledger.schema import AuditEvent, Delivery, DeliveryState, Result, utcnow
from tests.integration.dicom_node.helpers import Ledger
from tests.integration.dicom_node.test_scu_tls import seg_result
from tests.peers import Orthanc, TlsTerminator, free_port
from tests.pki import Pki, make_pki

FAST = RetryPolicy(max_attempts=3, backoff_s=0.5, backoff_max_s=10, timeout_s=10)
PASSWORD = "pw-9f3c1e"  # noqa: S105 - a test server's


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    with Orthanc(tmp_path / "orthanc", dicomweb=True, users={"specgate": PASSWORD}) as o:
        yield o


def _dest(orthanc: Orthanc, tmp_path: Path, password: str = PASSWORD) -> Destination:
    secret = tmp_path / f"password-{password}"
    secret.write_text(password + "\n")
    return Destination(name="web", url=orthanc.dicomweb_url, username="specgate", password_file=secret)


def _row(ledger: Ledger, result_id: int) -> Delivery:
    with ledger.sessions() as s:
        return s.execute(select(Delivery).where(Delivery.result_id == result_id)).scalar_one()


def _nothing_holds_the_password(ledger: Ledger, caplog: pytest.LogCaptureFixture) -> None:
    with ledger.sessions() as s:
        rows = [*s.execute(select(Delivery)).scalars(), *s.execute(select(AuditEvent)).scalars()]
        assert rows and not any(PASSWORD in repr(vars(r)) for r in rows)
    assert caplog.records and not any(PASSWORD in r.getMessage() for r in caplog.records)


def test_result_sent_by_stow_rs_appears_in_orthanc_once(ledger: Ledger, orthanc: Orthanc, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    result_id, seg_uid = seg_result(ledger, tmp_path)
    dest = _dest(orthanc, tmp_path)
    [out] = deliver(ledger.sessions, result_id, [dest], actor="worker", retry_policy=FAST)
    assert out.sent and (out.attempts, out.last_status) == (1, 200)
    assert orthanc.instance_uids() == {seg_uid}
    [oid] = orthanc.get("/instances")
    assert orthanc.get(f"/instances/{oid}/simplified-tags")["Modality"] == "SEG"
    [again] = deliver(ledger.sessions, result_id, [dest], actor="worker", retry_policy=FAST)
    assert again.already_sent and again.attempts == 1
    row = _row(ledger, result_id)
    assert (row.state, row.attempts, row.last_status, row.host, row.port, row.ae_title) == \
        (DeliveryState.SENT, 1, 200, "127.0.0.1", orthanc.http_port, "")
    [event] = ledger.audit("delivery.sent")
    assert event.details["protocol"] == "STOW-RS" and event.details["url"] == orthanc.dicomweb_url
    assert event.details["status"] == "HTTP 200"
    _nothing_holds_the_password(ledger, caplog)


def test_wrong_password_fails_with_the_reason_and_is_not_sent(ledger: Ledger, orthanc: Orthanc, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    result_id, _ = seg_result(ledger, tmp_path)
    waits: list[float] = []
    [out] = deliver(ledger.sessions, result_id, [_dest(orthanc, tmp_path, "wrong")], actor="worker",
                    retry_policy=FAST, sleep=waits.append)
    assert (out.state, out.attempts, out.last_status, waits) == (DeliveryState.FAILED, 1, 401, [])
    assert out.error == "STOW-RS authentication refused (HTTP 401): check the destination's credentials"
    assert orthanc.get("/instances") == []
    row = _row(ledger, result_id)
    assert (row.state, row.sent_at, row.last_error) == (DeliveryState.FAILED, None, out.error)
    [event] = ledger.audit("delivery.failed")
    assert event.details["permanent"] is True and event.details["status"] == "HTTP 401"
    assert not any("wrong" in repr(vars(e)) for e in ledger.audit("delivery.failed"))


def test_server_stopped_is_retried_then_sent_once_it_is_back(sqlite_ledger: Ledger, orthanc: Orthanc,
                                                             tmp_path: Path) -> None:
    result_id, seg_uid = seg_result(sqlite_ledger, tmp_path)
    dest = _dest(orthanc, tmp_path)
    orthanc.stop()
    waits: list[float] = []

    def back_after_the_first_wait(seconds: float) -> None:  # the outage ends during the back-off
        waits.append(seconds)
        orthanc.start()

    [out] = deliver(sqlite_ledger.sessions, result_id, [dest], actor="worker", retry_policy=FAST,
                    sleep=back_after_the_first_wait)
    assert (out.state, out.attempts, waits) == (DeliveryState.SENT, 2, [0.5])
    [failed] = sqlite_ledger.audit("delivery.attempt_failed")
    assert failed.details["error"] == f"could not connect to {orthanc.dicomweb_url} (ConnectionError)"
    assert failed.details["status"] is None
    assert orthanc.instance_uids() == {seg_uid} and len(orthanc.get("/instances")) == 1
    orthanc.stop()
    orthanc.start()  # and again: what was sent is there, and nothing is sent twice
    [again] = deliver(sqlite_ledger.sessions, result_id, [dest], actor="worker", retry_policy=FAST)
    assert again.already_sent and len(orthanc.get("/instances")) == 1


def test_a_stow_rs_delivery_left_sending_is_taken_over_and_stored_once(ledger: Ledger, orthanc: Orthanc,
                                                                      tmp_path: Path) -> None:
    """A sender that died after the server stored the SEG and before it wrote that down leaves the row
    ``sending``: left alone while it may be alive, taken over after the SCU timeout, and the resend (the same
    SOP Instance UID) leaves one instance on the server."""
    result_id, seg_uid = seg_result(ledger, tmp_path)
    dest = _dest(orthanc, tmp_path)
    with session_scope(ledger.sessions) as s:  # what the dead sender left: its row, and the stored object
        res = s.get(Result, result_id)
        s.add(Delivery(job_id=res.job_id, result_id=result_id, destination="web", ae_title="", host="127.0.0.1",
                       port=orthanc.http_port, state=DeliveryState.SENDING, attempts=0))
    assert send([tmp_path / "seg.dcm"], dest, timeout_s=10).ok and orthanc.instance_uids() == {seg_uid}

    [busy] = deliver(ledger.sessions, result_id, [dest], actor="worker", retry_policy=FAST)
    assert busy.busy and _row(ledger, result_id).state == DeliveryState.SENDING
    with session_scope(ledger.sessions) as s:  # the SCU timeout passes without a refresh of the row
        s.execute(update(Delivery).where(Delivery.result_id == result_id)
                  .values(updated_at=utcnow() - timedelta(seconds=FAST.sending_stale_s + 1)))
    [out] = deliver(ledger.sessions, result_id, [dest], actor="worker", retry_policy=FAST)
    assert out.sent and out.attempts == 1 and len(orthanc.get("/instances")) == 1


def test_specgate_echo_asks_a_qido_rs_query(orthanc: Orthanc, tmp_path: Path) -> None:
    from specgate.cli import main

    secret = tmp_path / "pw"
    secret.write_text(PASSWORD)
    wrong = tmp_path / "wrong"
    wrong.write_text("nope")
    base = f"{orthanc.dicomweb_url}?username=specgate&password_file="
    env = {"SPECGATE_DATA_DIR": str(tmp_path / "data"),
           "SPECGATE_DESTINATIONS": f"web={base}{secret},bad={base}{wrong},"
                                    f"down=http://127.0.0.1:{free_port()}/dicom-web"}
    ok = CliRunner().invoke(main, ["echo", "web"], env=env, catch_exceptions=False)
    assert ok.exit_code == 0 and "answered QIDO-RS with HTTP 200" in ok.output, ok.output
    bad = CliRunner().invoke(main, ["echo", "bad"], env=env, catch_exceptions=False)
    assert bad.exit_code == 1 and "HTTP 401: authentication refused" in bad.output, bad.output
    down = CliRunner().invoke(main, ["echo", "down"], env=env, catch_exceptions=False)
    assert down.exit_code == 1 and "did NOT answer QIDO-RS: could not connect" in down.output, down.output


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_https_with_the_destinations_ca_and_client_certificate(sqlite_ledger: Ledger, pki: Pki, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """https through a TLS front (socat) that requires a client certificate: the destination's CA is the one
    trusted (not the environment's bundle, which requests would otherwise let win), and ours is presented."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.rogue_ca))
    once = RetryPolicy(max_attempts=2, backoff_s=0, timeout_s=10)
    with Orthanc(tmp_path / "orthanc", dicomweb=True) as orthanc, \
            TlsTerminator(tmp_path / "tls", pki.server_cert, pki.server_key, orthanc.http_port,
                          client_ca=pki.ca) as front:
        url = f"https://127.0.0.1:{front.port}/dicom-web"
        cases = [("other CA", {"tls_ca": pki.rogue_ca, "tls_cert": pki.client_cert, "tls_key": pki.client_key},
                  "tls_verify_failed: certificate verify failed: "),
                 ("no client certificate", {"tls_ca": pki.ca}, "tls_failed: ")]
        for what, tls, reason in cases:
            result_id, _ = seg_result(sqlite_ledger, tmp_path / what)
            [out] = deliver(sqlite_ledger.sessions, result_id, [Destination(name=what.replace(" ", "-"), url=url,
                                                                            **tls)],
                            actor="worker", retry_policy=once, sleep=lambda _: None)
            assert (out.state, out.attempts) == (DeliveryState.FAILED, 2), what
            assert out.error is not None and out.error.startswith(reason), (what, out.error)
        assert orthanc.get("/instances") == []
        result_id, seg_uid = seg_result(sqlite_ledger, tmp_path / "good")
        good = Destination(name="good", url=url, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key)
        [out] = deliver(sqlite_ledger.sessions, result_id, [good], actor="worker", retry_policy=once)
        assert out.sent and orthanc.instance_uids() == {seg_uid}
