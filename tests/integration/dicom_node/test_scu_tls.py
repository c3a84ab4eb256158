"""C-STORE and C-ECHO over TLS to a real TLS peer, dcmtk's ``storescp +tls``: a SEG delivered with the right
CA arrives; a peer whose certificate comes from another CA, or names another host, ends each attempt with
a reason naming it (``tls_verify_failed: ...``), is retried with back-off and never marked sent; mutual
TLS where the peer requires our client certificate; the settings refuse a destination whose files are
missing."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_node.config import Destination
from dicom_node.scu import RetryPolicy, deliver, echo
from ledger.db import session_scope
from ledger.schema import Delivery, DeliveryState, Job, JobState, Result, Study
from specgate.settings import Settings, SettingsError
from tests.integration.dicom_node.helpers import Ledger
from tests.peers import TlsStoreSCP, free_port, write_ct_series
from tests.pki import Pki, make_pki

FAST = RetryPolicy(max_attempts=3, backoff_s=0.5, backoff_max_s=10, timeout_s=5)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), servers=True)


def seg_result(ledger: Ledger, folder: Path) -> tuple[int, str]:
    """A job with a result whose SEG is a real DICOM-SEG (highdicom) over a 2-slice CT: (result id, SEG UID)."""
    series = write_ct_series(folder / "ct", slices=2, size=16)
    sources = [dcmread(p) for p in series.paths]
    for ds in sources:  # the patient module's type 2 elements a SEG copies
        ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName = "", "", ""
    mask = np.zeros((2, 16, 16), dtype=bool)
    mask[:, 4:12, 4:12] = True
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[hd.seg.SegmentDescription(
            segment_number=1, segment_label="organ", segmented_property_category=codes.SCT.Organ,
            segmented_property_type=codes.SCT.Liver, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)],
        series_instance_uid=generate_uid(), series_number=9001, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer="specgate-test", manufacturer_model_name="test", software_versions="0", device_serial_number="0")
    path = folder / "seg.dcm"
    seg.save_as(path)
    with session_scope(ledger.sessions) as s:
        study = Study(study_instance_uid=series.study_instance_uid, calling_ae="PACS")
        s.add(study)
        s.flush()
        job = Job(study_id=study.id, version=1, state=JobState.RELEASED)
        s.add(job)
        s.flush()
        res = Result(job_id=job.id, seg_path=str(path), seg_sop_instance_uid=str(seg.SOPInstanceUID),
                     seg_series_instance_uid=str(seg.SeriesInstanceUID), oodm=0.1, tau=0.5, is_ood=False,
                     model_id="m", weights_sha256="0" * 64)
        s.add(res)
        s.flush()
        return res.id, str(seg.SOPInstanceUID)


def _row(ledger: Ledger, result_id: int) -> Delivery:
    with ledger.sessions() as s:
        return s.execute(select(Delivery).where(Delivery.result_id == result_id)).scalar_one()


def _dest(peer: TlsStoreSCP, **tls: object) -> Destination:
    return Destination(name="pacs-tls", ae_title=peer.aet, host="127.0.0.1", port=peer.port, **tls)


def test_seg_delivered_over_tls_arrives(sqlite_ledger: Ledger, pki: Pki, tmp_path: Path) -> None:
    result_id, seg_uid = seg_result(sqlite_ledger, tmp_path)
    with TlsStoreSCP(tmp_path / "peer", pki.server_cert, pki.server_key, pki.ca) as peer:
        dest = _dest(peer, tls_ca=pki.ca)
        assert echo(dest, timeout_s=5).ok
        [out] = deliver(sqlite_ledger.sessions, result_id, [dest], actor="worker", retry_policy=FAST)
        assert out.sent and out.attempts == 1 and out.last_status == 0
        assert peer.received_uids() == {seg_uid}
        assert dcmread(next(peer.received.iterdir())).Modality == "SEG"
    [event] = sqlite_ledger.audit("delivery.sent")
    assert event.details["tls"] is True and event.details["destination"] == "pacs-tls"


@pytest.mark.parametrize("peer_cert", ["another CA", "another host"])
def test_certificate_that_does_not_verify_fails_each_attempt_with_its_reason(ledger: Ledger, pki: Pki, tmp_path: Path,
                                                                             peer_cert: str) -> None:
    result_id, _ = seg_result(ledger, tmp_path)
    cert, key = ((pki.rogue_server_cert, pki.rogue_server_key) if peer_cert == "another CA"
                 else (pki.other_host_cert, pki.other_host_key))
    reason = ("tls_verify_failed: certificate verify failed: " +
              ("unable to get local issuer certificate" if peer_cert == "another CA"
               else "IP address mismatch, certificate is not valid for '127.0.0.1'."))
    with TlsStoreSCP(tmp_path / "peer", cert, key, pki.ca) as peer:
        dest = _dest(peer, tls_ca=pki.ca)
        waits: list[float] = []
        [out] = deliver(ledger.sessions, result_id, [dest], actor="worker", retry_policy=FAST, sleep=waits.append)
        assert (out.state, out.attempts, waits) == (DeliveryState.FAILED, 3, [0.5, 1.0])
        assert out.error == reason
        assert peer.received_uids() == set()
        assert not echo(dest, timeout_s=5).ok and reason in echo(dest, timeout_s=5).describe(dest)
    row = _row(ledger, result_id)
    assert (row.state, row.attempts, row.sent_at, row.last_error) == (DeliveryState.FAILED, 3, None, reason)
    attempts = ledger.audit("delivery.attempt_failed")
    assert [e.details["error"] for e in attempts] == [reason, reason]
    assert ledger.audit("delivery.failed")[0].details["error"] == reason and not ledger.audit("delivery.sent")
    if peer_cert == "another host":  # the operator may turn the host name check off, and then it goes
        with TlsStoreSCP(tmp_path / "peer2", cert, key, pki.ca) as peer:
            lenient = _dest(peer, tls_ca=pki.ca, tls_verify_hostname=False)
            result2, seg2 = seg_result(ledger, tmp_path / "second")
            [ok] = deliver(ledger.sessions, result2, [lenient], actor="worker", retry_policy=FAST)
            assert ok.sent and peer.received_uids() == {seg2}


def test_mutual_tls_the_peer_requires_our_client_certificate(sqlite_ledger: Ledger, pki: Pki, tmp_path: Path) -> None:
    result_id, seg_uid = seg_result(sqlite_ledger, tmp_path)
    with TlsStoreSCP(tmp_path / "peer", pki.server_cert, pki.server_key, pki.ca, require_client_cert=True) as peer:
        without = _dest(peer, tls_ca=pki.ca)
        [refused] = deliver(sqlite_ledger.sessions, result_id, [without], actor="worker",
                            retry_policy=RetryPolicy(max_attempts=2, backoff_s=0, timeout_s=5), sleep=lambda _: None)
        assert (refused.state, refused.attempts) == (DeliveryState.FAILED, 2)
        assert refused.error.startswith("tls_failed: TLSV13_ALERT_CERTIFICATE_REQUIRED")
        rogue = _dest(peer, tls_ca=pki.ca, tls_cert=pki.rogue_cert, tls_key=pki.rogue_key)
        assert "TLSV1_ALERT_UNKNOWN_CA" in (echo(rogue, timeout_s=5).error or "")
        assert peer.received_uids() == set()

        with_cert = _dest(peer, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key)
        assert echo(with_cert, timeout_s=5).ok
        second, seg2 = seg_result(sqlite_ledger, tmp_path / "second")
        [out] = deliver(sqlite_ledger.sessions, second, [with_cert], actor="worker", retry_policy=FAST)
        assert out.sent and peer.received_uids() == {seg2}
    assert _row(sqlite_ledger, result_id).state == DeliveryState.FAILED and seg_uid not in peer.received_uids()


def test_tls_files_gone_since_start_up_fail_the_attempt_with_the_reason(sqlite_ledger: Ledger, pki: Pki,
                                                                        tmp_path: Path) -> None:
    result_id, _ = seg_result(sqlite_ledger, tmp_path)
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pki.ca.read_bytes())
    dest = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=free_port(), tls_ca=ca)
    ca.unlink()
    [out] = deliver(sqlite_ledger.sessions, result_id, [dest], actor="worker",
                    retry_policy=RetryPolicy(max_attempts=2, backoff_s=0, timeout_s=5), sleep=lambda _: None)
    assert (out.state, out.attempts) == (DeliveryState.FAILED, 2)
    assert out.error is not None and out.error.startswith("tls_failed: the destination's TLS files do not load: ")


def test_settings_refuse_missing_or_unloadable_tls_files(pki: Pki, tmp_path: Path) -> None:
    port = free_port()
    ok = Settings.load(destinations=f"pacs=PACS@127.0.0.1:{port}?tls_ca={pki.ca}&tls_cert={pki.client_cert}"
                                    f"&tls_key={pki.client_key}")
    assert ok.destinations[0].tls and ok.destinations[0].tls_cert == pki.client_cert
    with pytest.raises(SettingsError, match=r"destination 'pacs': tls_ca '/nonexistent/ca.pem' is not a file"):
        Settings.load(destinations=f"pacs=PACS@127.0.0.1:{port}?tls_ca=/nonexistent/ca.pem")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(SettingsError, match=r"destination 'pacs': its TLS files do not load"):
        Settings.load(destinations=f"pacs=PACS@127.0.0.1:{port}?tls_ca={not_pem}")
    with pytest.raises(SettingsError, match=r"tls_cert and tls_key must be set together"):
        Settings.load(destinations=f"pacs=PACS@127.0.0.1:{port}?tls_ca={pki.ca}&tls_cert={pki.client_cert}")
