"""Sending results: deliver() to an Orthanc PACS and to scripted pynetdicom peers; retries, back-off,
permanent refusals, warnings, idempotency; a destination that accepts the association and then never
answers (through :class:`tests.dicom_proxy.DicomProxy`); ``specgate echo``."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from dicom_node.scu import RetryPolicy, deliver
from ledger.db import session_scope
from ledger.schema import Delivery, DeliveryState, Job, JobState, Result, Study
from specgate.settings import Destination
from tests.dicom_proxy import P_DATA_TF, DicomProxy
from tests.integration.dicom_node.helpers import Ledger
from tests.peers import Orthanc, free_port, write_ct_series


def _result(ledger: Ledger, tmp_path: Path, size: int = 64) -> tuple[int, str]:
    """A job with a result whose file is a DICOM object (a CT slice of ``size``² stands in for the SEG)."""
    series = write_ct_series(tmp_path / "seg", slices=1, size=size)
    with session_scope(ledger.sessions) as s:
        study = Study(study_instance_uid=series.study_instance_uid, calling_ae="PACS")
        s.add(study)
        s.flush()
        job = Job(study_id=study.id, version=1, state=JobState.RELEASED)
        s.add(job)
        s.flush()
        res = Result(job_id=job.id, seg_path=str(series.paths[0]), seg_sop_instance_uid=series.sop_instance_uids[0],
                     seg_series_instance_uid=series.series_instance_uid, oodm=0.1, tau=0.5, is_ood=False,
                     model_id="m", weights_sha256="0" * 64)
        s.add(res)
        s.flush()
        return res.id, series.sop_instance_uids[0]


def _row(ledger: Ledger, result_id: int) -> Delivery:
    with ledger.sessions() as s:
        return s.execute(select(Delivery).where(Delivery.result_id == result_id)).scalar_one()


FAST = RetryPolicy(max_attempts=3, backoff_s=0.5, backoff_max_s=10, timeout_s=5)


def test_deliver_to_orthanc_and_read_it_back(ledger: Ledger, tmp_path: Path) -> None:
    result_id, sop = _result(ledger, tmp_path)
    with Orthanc(tmp_path / "orthanc") as orthanc:
        dest = Destination(name="pacs", ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port)
        [out] = deliver(ledger.sessions, result_id, [dest], actor="worker", retry_policy=FAST)
        assert out.sent and out.attempts == 1 and out.last_status == 0
        assert orthanc.instance_uids() == {sop}
        [oid] = orthanc.get("/instances")
        assert dcmread(__import__("io").BytesIO(orthanc.get(f"/instances/{oid}/file"))).SOPInstanceUID == sop
        # idempotent: a delivery already sent is not sent again
        [again] = deliver(ledger.sessions, result_id, [dest], actor="worker", retry_policy=FAST)
        assert again.already_sent and again.attempts == 1
    row = _row(ledger, result_id)
    assert (row.state, row.attempts, row.last_status, row.ae_title) == (DeliveryState.SENT, 1, 0, "ORTHANC")
    assert row.sent_at is not None
    [event] = ledger.audit("delivery.sent")
    assert event.details["destination"] == "pacs" and event.actor == "worker"


def test_nobody_listening_retries_with_backoff_then_fails(ledger: Ledger, tmp_path: Path) -> None:
    result_id, _ = _result(ledger, tmp_path)
    dest = Destination(name="down", ae_title="NOBODY", host="127.0.0.1", port=free_port())
    waits: list[float] = []
    [out] = deliver(ledger.sessions, result_id, [dest], actor="worker", retry_policy=FAST, sleep=waits.append)
    assert waits == [0.5, 1.0]
    assert (out.state, out.attempts, out.last_status) == (DeliveryState.FAILED, 3, None)
    assert "could not connect" in out.error
    assert len(ledger.audit("delivery.attempt_failed")) == 2 and len(ledger.audit("delivery.failed")) == 1
    row = _row(ledger, result_id)
    assert (row.state, row.attempts) == (DeliveryState.FAILED, 3)


def test_calling_ae_not_recognised_stops_at_once(ledger: Ledger, start_scp, tmp_path: Path) -> None:
    result_id, _ = _result(ledger, tmp_path)
    peer = start_scp(ledger, allowed_callers="SOMEONE_ELSE@127.0.0.1")  # our own SCP, not allowing us
    dest = Destination(name="strict", ae_title="SPECGATE", host="127.0.0.1", port=peer.address[1])
    waits: list[float] = []
    [out] = deliver(ledger.sessions, result_id, [dest], actor="worker", retry_policy=FAST, sleep=waits.append)
    assert (out.state, out.attempts, waits) == (DeliveryState.FAILED, 1, [])
    assert "calling AE title not recognised" in out.error and "permanent" in out.error


class ScriptedPeer:
    """A pynetdicom Storage SCP that answers the statuses it is given, in order (then the last one)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.received: list[str] = []
        self.ae = AE(ae_title="PEER")
        self.ae.add_supported_context(CTImageStorage)
        self.ae.add_supported_context(Verification)
        self.port = free_port()
        self.lock = threading.Lock()

    def _store(self, event: evt.Event) -> int:
        with self.lock:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
            return self.statuses[min(len(self.received), len(self.statuses)) - 1]

    def __enter__(self) -> ScriptedPeer:
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()

    @property
    def destination(self) -> Destination:
        return Destination(name="peer", ae_title="PEER", host="127.0.0.1", port=self.port)


def test_out_of_resources_is_retried_until_success(ledger: Ledger, tmp_path: Path) -> None:
    result_id, sop = _result(ledger, tmp_path)
    with ScriptedPeer([0xA700, 0x0000]) as peer:
        waits: list[float] = []
        [out] = deliver(ledger.sessions, result_id, [peer.destination], actor="worker", retry_policy=FAST,
                        sleep=waits.append)
    assert (out.state, out.attempts, out.last_status, waits) == (DeliveryState.SENT, 2, 0, [0.5])
    assert peer.received == [sop, sop]


def test_out_of_resources_every_time_is_retried_up_to_the_cap_then_failed(ledger: Ledger, tmp_path: Path) -> None:
    result_id, sop = _result(ledger, tmp_path)
    with ScriptedPeer([0xA700]) as peer:
        waits: list[float] = []
        [out] = deliver(ledger.sessions, result_id, [peer.destination], actor="worker", retry_policy=FAST,
                        sleep=waits.append)
    assert (out.state, out.attempts, out.last_status, waits) == (DeliveryState.FAILED, 3, 0xA700, [0.5, 1.0])
    assert peer.received == [sop, sop, sop] and "out of resources" in out.error
    row = _row(ledger, result_id)
    assert (row.state, row.attempts, row.last_status, row.sent_at) == (DeliveryState.FAILED, 3, 0xA700, None)
    assert [e.details["status"] for e in ledger.audit("delivery.attempt_failed")] == ["0xA700", "0xA700"]
    [final] = ledger.audit("delivery.failed")
    assert (final.details["attempt"], final.details["status"], final.details["permanent"]) == (3, "0xA700", False)


@pytest.mark.parametrize("size", [64, 4096], ids=["small-object", "object-larger-than-socket-buffers"])
def test_destination_that_accepts_and_never_answers_times_out_retries_and_fails(sqlite_ledger: Ledger,
                                                                                tmp_path: Path, size: int) -> None:
    """The destination accepts the association, then reads nothing more and answers nothing (a hung PACS,
    played by a proxy in front of a real SCP that stops after the A-ASSOCIATE-AC). A small object fits in
    the socket buffers and waits for its C-STORE response: the DIMSE timeout. A 33 MB one (a large SEG)
    blocks the sending thread in the socket write itself. Either way every attempt ends after the SCU
    timeout, is retried with back-off, and the delivery ends failed; nothing reached the destination."""
    result_id, _ = _result(sqlite_ledger, tmp_path, size=size)
    policy = RetryPolicy(max_attempts=3, backoff_s=0.5, backoff_max_s=10, timeout_s=1)
    waits: list[float] = []
    outcomes = []
    with ScriptedPeer([0x0000]) as peer, DicomProxy(("127.0.0.1", peer.port), hold=P_DATA_TF, hold_once=False) as hung:
        dest = Destination(name="hung", ae_title="PEER", host="127.0.0.1", port=hung.port)
        sender = threading.Thread(target=lambda: outcomes.extend(
            deliver(sqlite_ledger.sessions, result_id, [dest], actor="worker", retry_policy=policy,
                    sleep=waits.append)), daemon=True)
        sender.start()
        sender.join(120)  # a guard against hanging for ever, not a measurement
        assert not sender.is_alive(), "the delivery to a destination that never answers did not end"
    [out] = outcomes
    assert hung.associations == 3 and peer.received == []
    assert (out.state, out.attempts, out.last_status, waits) == (DeliveryState.FAILED, 3, None, [0.5, 1.0])
    assert "no C-STORE response" in out.error
    row = _row(sqlite_ledger, result_id)
    assert (row.state, row.attempts, row.sent_at) == (DeliveryState.FAILED, 3, None)
    assert len(sqlite_ledger.audit("delivery.attempt_failed")) == 2 and len(sqlite_ledger.audit("delivery.failed")) == 1


@pytest.mark.parametrize("status", [0xB000, 0xB007, 0xA900, 0xC000])
def test_warning_or_refusal_is_recorded_not_sent_and_not_retried(ledger: Ledger, tmp_path: Path,
                                                                 status: int) -> None:
    result_id, _ = _result(ledger, tmp_path)
    with ScriptedPeer([status]) as peer:
        [out] = deliver(ledger.sessions, result_id, [peer.destination], actor="worker", retry_policy=FAST,
                        sleep=lambda s: None)
    assert (out.state, out.attempts, out.last_status) == (DeliveryState.FAILED, 1, status)
    row = _row(ledger, result_id)
    assert (row.state, row.last_status) == (DeliveryState.FAILED, status)
    [event] = ledger.audit("delivery.failed")
    assert event.details["status"] == f"0x{status:04X}"


def test_two_deliveries_at_once_send_once(ledger: Ledger, tmp_path: Path) -> None:
    result_id, sop = _result(ledger, tmp_path)
    outcomes = []
    with ScriptedPeer([0x0000]) as peer:
        def run() -> None:
            outcomes.extend(deliver(ledger.sessions, result_id, [peer.destination], actor="worker",
                                    retry_policy=FAST))

        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert peer.received == [sop]
    sent = [o for o in outcomes if o.sent and not o.already_sent]
    [other] = [o for o in outcomes if o is not sent[0]]
    assert len(sent) == 1 and sent[0].attempts == 1
    assert other.busy or other.already_sent  # it saw the other sending, or already sent
    assert _row(ledger, result_id).state == DeliveryState.SENT


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    with Orthanc(tmp_path / "orthanc") as o:
        yield o


def _echo_cli(tmp_path: Path, destinations: str, *args: str):
    from specgate.cli import main

    env = {"SPECGATE_DATA_DIR": str(tmp_path / "data"), "SPECGATE_DESTINATIONS": destinations}
    return CliRunner().invoke(main, ["echo", *args], env=env, catch_exceptions=False)


def test_specgate_echo(orthanc: Orthanc, tmp_path: Path) -> None:
    dests = f"pacs=ORTHANC@127.0.0.1:{orthanc.dicom_port},down=NOBODY@127.0.0.1:{free_port()}"
    ok = _echo_cli(tmp_path, dests, "pacs")
    assert ok.exit_code == 0 and "answered C-ECHO with status 0x0000" in ok.output, ok.output
    down = _echo_cli(tmp_path, dests, "down", "--timeout", "3")
    assert down.exit_code == 1 and "did NOT answer C-ECHO" in down.output, down.output
    unknown = _echo_cli(tmp_path, dests, "nope")
    assert unknown.exit_code == 2 and "unknown destination 'nope'" in unknown.output
