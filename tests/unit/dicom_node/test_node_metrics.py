"""The DICOM node's metric labels come from fixed sets: every rejection reason the association audits has
its own label value, and values a peer controls (the modality) are folded into a fixed set."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from dicom_node import association
from dicom_node.prometheus import ABORT_REASONS, MODALITIES, REJECTION_REASONS, NodeMetrics


def test_every_rejection_reason_has_its_own_label() -> None:
    reasons = set(association._RJ_REASONS.values())
    assert reasons == set(REJECTION_REASONS)
    assert len(set(REJECTION_REASONS.values())) == len(REJECTION_REASONS)
    assert "other" not in REJECTION_REASONS.values()


def test_labels_a_peer_controls_stay_in_a_fixed_set() -> None:
    registry = CollectorRegistry()
    m = NodeMetrics(registry)
    for modality in ("CT", "mr", "1.2.840.10008.5.1.4.1.1.2", "DOE^JOHN", "", None):
        m.instance_received(modality)
    m.association_rejected("some words nobody wrote")
    m.association_rejected("called AE title not recognised")
    m.instance_refused("undecodable", 0xC000)
    m.association_aborted("instance_too_large")
    m.association_aborted("words a peer chose")
    labels = {tuple(s.labels.values()) for metric in registry.collect() for s in metric.samples}
    values = {v for t in labels for v in t}
    assert values <= MODALITIES | {"other", "unknown", "called_ae", "undecodable", "0xC000", "instance_too_large"}
    get = registry.get_sample_value
    assert get("specgate_instances_received_total", {"modality": "other"}) == 2
    assert get("specgate_instances_received_total", {"modality": "unknown"}) == 2
    assert get("specgate_instances_received_total", {"modality": "MR"}) == 1
    assert get("specgate_associations_rejected_total", {"reason": "other"}) == 1
    assert get("specgate_instances_refused_total", {"reason": "undecodable", "status": "0xC000"}) == 1
    assert get("specgate_associations_aborted_total", {"reason": "instance_too_large"}) == 1
    assert get("specgate_associations_aborted_total", {"reason": "other"}) == 1


def test_every_abort_code_the_node_raises_has_its_own_label() -> None:
    import re
    from pathlib import Path

    import dicom_node

    source = "".join(p.read_text() for p in Path(dicom_node.__file__).parent.glob("*.py"))
    codes = set(re.findall(r'code="([a-z_]+)"', source)) | {"protocol_error"}
    assert codes == set(ABORT_REASONS)
