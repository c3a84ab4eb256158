"""The DICOM node's Prometheus metrics: instances received and refused, associations rejected and open.

Where they are counted, and why this way: ``specgate scp`` is one listening parent and N receiver
processes (:mod:`dicom_node.handoff`); instances are received, and associations negotiated, in the
receivers. Each receiver counts in its own :class:`NodeMetrics`, in prometheus_client's *multiprocess
mode*: every process writes its counters to its own memory-mapped file in one directory
(``PROMETHEUS_MULTIPROC_DIR``, ``<data_dir>/metrics/scp``, emptied by the parent when it starts and set
in its environment before any receiver starts or any metric exists), and the parent's endpoint sums the
files at scrape time. A receiver that dies and is started again keeps its count: the dead process's file
stays, and a counter is a sum over files. The other choice, receivers reporting counts to the parent
over the hand-off socket, would add a protocol to a socket whose one job is the association limit, and
lose what a receiver counted between its last report and its death.

The number of open associations is not counted in the receivers: the parent already knows it (the
listener's own count, which enforces ``max_associations``), so it is a gauge the parent's endpoint asks
for at scrape time (:class:`AssociationsCollector`), with no multiprocess gauge to go stale when a
receiver is killed.

Label values come only from fixed sets written in our code: refusal reason codes
(:class:`dicom_node.receive.Refused`), statuses, association rejection reasons, and the modality folded
into :data:`MODALITIES` (anything else is ``other``: a peer cannot create series by sending odd values).
No UID, AE title, address or patient data is ever a label.

    >>> modality_label("CT"), modality_label("ct "), modality_label("<script>"), modality_label(None)
    ('CT', 'CT', 'other', 'unknown')
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["ABORT_REASONS", "MODALITIES", "REJECTION_REASONS", "STOW_REQUEST_REFUSALS", "AssociationsCollector",
           "NodeMetrics", "StowMetrics", "modality_label"]

#: DICOM modality codes kept as label values; any other value is "other", a missing one "unknown".
MODALITIES = frozenset({"CT", "MR", "PT", "NM", "US", "CR", "DX", "MG", "XA", "RF", "OT", "SEG", "SR"})

#: Association rejections by the words :mod:`dicom_node.association` audits -> their label value.
REJECTION_REASONS = {
    "calling AE title not recognised": "calling_ae",
    "called AE title not recognised": "called_ae",
    "application context name not supported": "application_context",
    "protocol version not supported": "protocol_version",
    "local limit exceeded (too many associations)": "association_limit",
    "a UID in the A-ASSOCIATE-RQ is not a UID": "invalid_uid",
}

#: Why the SCP aborts an association (:class:`dicom_node.ul.ProtocolError` ``code``): a fixed set.
ABORT_REASONS = frozenset({"protocol_error", "pdu_too_long", "command_too_long", "instance_too_large",
                           "association_too_large"})


#: Why the STOW-RS endpoint refuses a whole request (:mod:`dicom_node.stow`): a fixed set.
STOW_REQUEST_REFUSALS = frozenset({"unauthenticated", "forbidden", "unsupported_media_type", "malformed",
                                   "too_large", "timeout"})


def modality_label(modality: str | None) -> str:
    """A modality as a label value from a fixed set."""
    if modality is None or not modality.strip():
        return "unknown"
    value = modality.strip().upper()
    return value if value in MODALITIES else "other"


class NodeMetrics:
    """The counters one SCP process increments. ``registry``: where to register them (a process that
    exposes its own metrics); None in multiprocess mode, where the files are what is exported."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._received = Counter("specgate_instances_received", "Instances answered success (0x0000), "
                                 "duplicates included", ["modality"], registry=registry)
        self._refused = Counter("specgate_instances_refused", "C-STORE requests refused, by reason code and "
                                "DIMSE status", ["reason", "status"], registry=registry)
        self._rejected = Counter("specgate_associations_rejected", "Associations rejected (A-ASSOCIATE-RJ) "
                                 "or refused at the TLS handshake, by reason", ["reason"], registry=registry)
        self._aborted = Counter("specgate_associations_aborted", "Associations the SCP aborted (A-ABORT): a "
                                "broken protocol or a size bound passed, by reason", ["reason"], registry=registry)

    def instance_received(self, modality: str | None) -> None:
        self._received.labels(modality=modality_label(modality)).inc()

    def instance_refused(self, reason: str, status: int) -> None:
        """``reason``: a :class:`dicom_node.receive.Refused` reason code (a fixed set in our code)."""
        self._refused.labels(reason=reason, status=f"0x{status:04X}").inc()

    def association_rejected(self, reason: str) -> None:
        """``reason``: the words the SCP audits (:data:`REJECTION_REASONS`), or ``tls_handshake``."""
        self._rejected.labels(reason=REJECTION_REASONS.get(reason, reason if reason == "tls_handshake" else "other")).inc()


    def association_aborted(self, reason: str) -> None:
        """``reason``: a :class:`dicom_node.ul.ProtocolError` code (:data:`ABORT_REASONS`)."""
        self._aborted.labels(reason=reason if reason in ABORT_REASONS else "other").inc()


class StowMetrics:
    """The STOW-RS endpoint's counters (:mod:`dicom_node.stow`), beside the C-STORE ones: instances stored
    and refused (the same reason codes, and the STOW-RS Failure Reason), and requests refused as a whole
    (:data:`STOW_REQUEST_REFUSALS`)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._received = Counter("specgate_stow_instances_stored", "STOW-RS instances stored (duplicates "
                                 "included)", ["modality"], registry=registry)
        self._refused = Counter("specgate_stow_instances_refused", "STOW-RS instances refused, by reason code "
                                "and Failure Reason", ["reason", "status"], registry=registry)
        self._requests = Counter("specgate_stow_requests_refused", "STOW-RS requests refused as a whole, by "
                                 "reason", ["reason"], registry=registry)

    def instance_received(self, modality: str | None) -> None:
        self._received.labels(modality=modality_label(modality)).inc()

    def instance_refused(self, reason: str, status: int) -> None:
        self._refused.labels(reason=reason, status=f"0x{status:04X}").inc()

    def request_refused(self, reason: str) -> None:
        self._requests.labels(reason=reason if reason in STOW_REQUEST_REFUSALS else "other").inc()


class AssociationsCollector(Collector):
    """``specgate_associations_open``, asked at scrape time of the process that knows it (the listener,
    or the one SCP process when there are no receivers)."""

    def __init__(self, open_associations: Callable[[], int]) -> None:
        self.open_associations = open_associations

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("specgate_associations_open", "DICOM associations (connections) open now")

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("specgate_associations_open", "DICOM associations (connections) open now",
                                value=float(self.open_associations()))
