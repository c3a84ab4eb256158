"""``v_delivery_failures`` and ``specgate report delivery-failures`` (migration 0011) on both ledger backends:
rows written by real failed deliveries (a STOW-RS 401 from Orthanc, a DICOMweb server that is down, a
C-STORE peer whose TLS certificate does not verify, a C-STORE peer that is down) each show their own
status and class; the migration goes down and up again."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from dicom_node.config import Destination
from dicom_node.scu import RetryPolicy, deliver
from ledger import migrations
from ledger.reports import REPORTS
from tests.integration.dicom_node.helpers import Ledger
from tests.integration.dicom_node.test_scu_tls import seg_result
from tests.peers import Orthanc, TlsStoreSCP, free_port
from tests.pki import make_pki

ONCE = RetryPolicy(max_attempts=1, timeout_s=5)


def _view(ledger: Ledger) -> dict[str, tuple[str | None, str]]:
    with ledger.sessions() as s:
        rows = s.execute(text("SELECT destination, status_hex, error_class FROM v_delivery_failures")).all()
    return {r[0]: (r[1], r[2]) for r in rows}


def test_dicomweb_and_tls_failures_have_their_own_status_and_class(ledger: Ledger, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", servers=True)
    wrong = tmp_path / "wrong"
    wrong.write_text("wrong")
    with Orthanc(tmp_path / "orthanc", dicomweb=True, users={"specgate": "right"}) as orthanc, \
            TlsStoreSCP(tmp_path / "tls", pki.rogue_server_cert, pki.rogue_server_key, pki.ca) as rogue:
        dests = [Destination(name="web-auth", url=orthanc.dicomweb_url, username="specgate", password_file=wrong),
                 Destination(name="web-down", url=f"http://127.0.0.1:{free_port()}/dicom-web"),
                 Destination(name="pacs-tls", ae_title=rogue.aet, host="127.0.0.1", port=rogue.port, tls_ca=pki.ca),
                 Destination(name="pacs-down", ae_title="PACS", host="127.0.0.1", port=free_port())]
        result_id, _ = seg_result(ledger, tmp_path)
        outcomes = deliver(ledger.sessions, result_id, dests, actor="worker", retry_policy=ONCE)
    assert [o.sent for o in outcomes] == [False] * 4
    want = {"web-auth": ("HTTP 401", "authentication refused"), "web-down": (None, "no connection"),
            "pacs-tls": (None, "tls certificate not verified"), "pacs-down": (None, "no connection")}
    assert _view(ledger) == want
    with ledger.sessions() as s:
        report = REPORTS["delivery-failures"].run(s, None, None)
    assert {(r["destination"], r["status"], r["error_class"]) for r in report} == {(k, *v) for k, v in want.items()}

    migrations.downgrade(ledger.url, "0010")  # the view as it was: a 401 read as a DIMSE status
    assert _view(ledger)["web-auth"] == ("0x0191", "refused") and _view(ledger)["pacs-tls"] == (None, "other")
    migrations.upgrade(ledger.url)
    assert _view(ledger) == want
