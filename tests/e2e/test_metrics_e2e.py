"""``/metrics`` of the real services: ``specgate scp`` (two receiver processes) and ``specgate worker``
(its task runs in Celery's prefork child) on PostgreSQL, Redis and an Orthanc destination (the stack of
:mod:`tests.e2e.test_pipeline_e2e`, its SCP started again with a metrics port).

Each scrape is parsed with Prometheus's own text parser. The counters are incremented in child
processes and read at the parents' endpoints, so these tests are also the proof that the multiprocess
wiring works: a study goes through and the instances received, the refusals (an undecodable data set,
a wrong called AE title), the inference histogram, the gate's decision, the delivery attempts and the
ledger's jobs by state move by exactly what went through. A delivery that fails ends the job failed: the
failed-jobs counter moves and the job's ``job.failed`` audit row, the event alerts are built on, is there.
"""

from __future__ import annotations

import signal
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select

from ledger.schema import AuditEvent
from tests.e2e import test_pipeline_e2e as pipeline_e2e
from tests.e2e.test_pipeline_e2e import CALLER, Stack, _port_open, _study
from tests.integration.dicom_node.helpers import raw_store
from tests.peers import free_port, wait_for

pytestmark = pytest.mark.slow

stack = pipeline_e2e.stack  # the e2e stack fixture (PostgreSQL, Redis, Orthanc, specgate scp), shared

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Scrape:
    """One /metrics answer: its text, and {sample name: {sorted label pairs: value}}."""

    text: str
    samples: dict[str, dict[Labels, float]]

    def value(self, name: str, **labels: str) -> float:
        """A sample's value; 0 for a labelled counter not incremented yet (prometheus_client shows none)."""
        return self.samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def total(self, name: str) -> float:
        return sum(self.samples.get(name, {}).values())


def scrape(port: int) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as rsp:
        assert rsp.status == 200
        text = rsp.read().decode()
    samples: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return Scrape(text, samples)


@dataclass
class Metered:
    stack: Stack
    scp_port: int  # of the SCP's /metrics
    worker_port: int

    def start_worker(self) -> None:
        self.stack.start("worker", "worker")
        wait_for(lambda: _port_open(self.worker_port), timeout=60, what="the worker's /metrics")


@pytest.fixture
def metered(stack: Stack) -> Iterator[Metered]:
    """The e2e stack with metrics on: its SCP started again with a metrics port and two receivers; a
    worker started by the test gets its own metrics port."""
    m = Metered(stack, free_port(), free_port())
    stack.kill("scp", signal.SIGTERM)
    stack.env.update({"SPECGATE_SCP_METRICS_PORT": str(m.scp_port), "SPECGATE_WORKER_METRICS_PORT": str(m.worker_port),
                      "SPECGATE_SCP_PROCESSES": "2"})
    stack.start("scp", "scp")
    wait_for(lambda: _port_open(stack.scp_port) and _port_open(m.scp_port), timeout=60,
             what="specgate scp and its /metrics")
    yield m


def _last_refusal_reason(stack: Stack) -> str:
    with stack.sessions() as s:  # type: ignore[operator]
        row = s.execute(select(AuditEvent).where(AuditEvent.action == "instance.refused")
                        .order_by(AuditEvent.id.desc()).limit(1)).scalar_one()
        return str(row.details["reason"])


def test_counters_move_by_what_went_through(metered: Metered, tmp_path: Path) -> None:
    stack = metered.stack
    metered.start_worker()
    scp0, worker0 = scrape(metered.scp_port), scrape(metered.worker_port)
    assert scp0.value("specgate_ledger_up") == 1 and scp0.value("specgate_associations_open") == 0

    study = _study(tmp_path, "ct_liver", "known", seed=21)
    assert set(stack.send(study.paths)) == {0}
    ae = AE(ae_title=CALLER)
    ae.add_requested_context(CTImageStorage)
    wrong = ae.associate("127.0.0.1", stack.scp_port, ae_title="NOT-SPECGATE")
    assert wrong.is_rejected
    assert raw_store(stack.scp_port, CTImageStorage, generate_uid(), b"\xff" * 64) == 0xC000
    reason = _last_refusal_reason(stack)

    job = stack.wait_state(study.study_instance_uid, {"sent", "failed", "held"})
    assert str(job.state) == "sent", (job.reason_code, job.reason_detail)
    scp1 = wait_for(lambda: (s := scrape(metered.scp_port)).value("specgate_associations_open") == 0 and s,
                    timeout=30, what="every association closed")
    worker1 = scrape(metered.worker_port)

    def moved(a: Scrape, b: Scrape, name: str, **labels: str) -> float:
        return b.value(name, **labels) - a.value(name, **labels)

    # the SCP: counted in its receiver processes, summed at the listener's endpoint
    assert moved(scp0, scp1, "specgate_instances_received_total", modality="CT") == len(study.paths)
    assert scp1.total("specgate_instances_received_total") - scp0.total("specgate_instances_received_total") \
        == len(study.paths)
    assert moved(scp0, scp1, "specgate_instances_refused_total", reason=reason, status="0xC000") == 1
    assert scp1.total("specgate_instances_refused_total") - scp0.total("specgate_instances_refused_total") == 1
    assert moved(scp0, scp1, "specgate_associations_rejected_total", reason="called_ae") == 1
    # the ledger, asked at scrape time
    assert scp1.value("specgate_jobs", state="sent") == 1
    assert sum(scp1.samples["specgate_jobs"].values()) == 1
    assert scp1.value("specgate_review_queue_depth") == 0
    # the worker: counted in Celery's child, summed at the parent's endpoint
    model = {"model": "default", "modality": "CT"}
    assert moved(worker0, worker1, "specgate_inference_seconds_count", **model) == 1
    assert moved(worker0, worker1, "specgate_inference_seconds_bucket", le="+Inf", **model) == 1
    assert moved(worker0, worker1, "specgate_ood_decisions_total", decision="in_distribution", reason="none",
                 **model) == 1
    assert worker1.total("specgate_ood_decisions_total") - worker0.total("specgate_ood_decisions_total") == 1
    assert moved(worker0, worker1, "specgate_delivery_attempts_total", destination="pacs", object="result") == 1
    assert worker1.total("specgate_delivery_attempt_failures_total") == 0
    assert worker1.total("specgate_jobs_failed_total") == 0
    # nothing that identifies a study or a patient, in any label
    for text in (scp1.text, worker1.text):
        assert study.study_instance_uid not in text and "TEST-E2E" not in text and CALLER not in text


@pytest.mark.refusing_destination
def test_a_failed_delivery_is_counted_and_audited_and_a_held_result_waits_in_the_queue(
        metered: Metered, tmp_path: Path) -> None:
    stack = metered.stack
    metered.start_worker()
    known = _study(tmp_path, "ct_liver", "known", seed=22)
    unseen = _study(tmp_path, "mr_hippocampus", "unseen", seed=23)
    assert set(stack.send(known.paths)) == {0}
    assert set(stack.send(unseen.paths)) == {0}
    failed = stack.wait_state(known.study_instance_uid, {"sent", "failed", "held"})
    assert (str(failed.state), failed.reason_code) == ("failed", "delivery_failed")
    held = stack.wait_state(unseen.study_instance_uid, {"sent", "failed", "held"})
    assert str(held.state) == "held", (held.reason_code, held.reason_detail)

    worker = scrape(metered.worker_port)
    sent_to = {"destination": "pacs", "object": "result"}
    assert worker.value("specgate_delivery_attempts_total", **sent_to) == 3  # SPECGATE_SCU_MAX_ATTEMPTS
    assert worker.value("specgate_delivery_attempt_failures_total", **sent_to) == 3
    assert worker.value("specgate_deliveries_failed_total", **sent_to) == 1
    assert worker.samples["specgate_jobs_failed_total"] == {(("reason", "delivery_failed"),): 1.0}
    ood = {k: v for k, v in worker.samples["specgate_ood_decisions_total"].items() if ("decision", "ood") in k}
    assert list(ood.values()) == [1.0] and ("modality", "MR") in next(iter(ood))
    assert worker.value("specgate_inference_seconds_count", model="default", modality="MR") == 1

    scp = scrape(metered.scp_port)
    assert scp.value("specgate_jobs", state="failed") == 1 and scp.value("specgate_jobs", state="held") == 1
    assert scp.value("specgate_review_queue_depth") == 1
    assert scp.value("specgate_review_queue_oldest_seconds") >= 0

    with stack.sessions() as s:  # type: ignore[operator]
        rows = s.execute(select(AuditEvent).where(AuditEvent.action == "job.failed",
                                                  AuditEvent.object_id == str(failed.id))).scalars().all()
    assert len(rows) == 1
    assert rows[0].details["reason_code"] == "delivery_failed" and rows[0].details["to"] == "failed"
    assert rows[0].details["attempts"] == failed.attempts and rows[0].details["max_attempts"] == failed.max_attempts
