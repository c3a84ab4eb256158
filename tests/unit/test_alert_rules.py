"""``deploy/prometheus/specgate-alerts.yml`` is a Prometheus rule file: valid YAML of the rule-file shape,
every rule complete, and every metric and label it names one that specgate exports (taken from the
metric definitions themselves, so renaming a metric without its alert fails here).

The YAML is read by PyYAML (a dev dependency); ``promtool check rules`` also runs when it is installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from dicom_node.prometheus import AssociationsCollector, NodeMetrics, StowMetrics
from ledger.drift_prometheus import DriftCollector
from ledger.prometheus import LedgerCollector
from worker.prometheus import WorkerMetrics

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "specgate-alerts.yml"


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _exported() -> tuple[set[str], set[str]]:
    """(sample names, label names) that specgate's metrics expose: each metric used once through its
    public method, then collected; the scrape-time gauges from their collectors' descriptions."""
    registry = CollectorRegistry()
    worker, node = WorkerMetrics(registry), NodeMetrics(registry)
    worker.inference(1.0, model="default", modality="CT")
    worker.ood_decision(is_ood=True, reason="oodm_above_tau", model="default", modality="CT")
    worker.delivery_observer("result")("pacs", False, True)
    worker.job_failed("error")
    node.instance_received("CT")
    node.instance_refused("undecodable", 0xC000)
    node.association_rejected("called AE title not recognised")
    stow = StowMetrics(registry)
    stow.instance_received("CT")
    stow.instance_refused("study_mismatch", 0xA900)
    stow.request_refused("forbidden")
    names: set[str] = set()
    labels = {"state", "kind"}  # specgate_jobs's (LedgerCollector), specgate_drift_alarms_open's (DriftCollector)
    for family in registry.collect():
        for sample in family.samples:
            if not sample.name.endswith("_created"):  # not in multiprocess mode, which the services use
                names.add(sample.name)
                labels.update(sample.labels)
    for collector in (LedgerCollector(sessions=None), AssociationsCollector(lambda: 0), DriftCollector(sessions=None)):
        names.update(family.name for family in collector.describe())  # gauges: the family's name is the sample's
    return names, labels


def test_the_alert_rules_are_a_valid_prometheus_rule_file() -> None:
    doc = _load_yaml(RULES)
    assert set(doc) == {"groups"} and isinstance(doc["groups"], list) and doc["groups"]
    names, label_names = _exported()
    alerts: list[str] = []
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            alert = rule["alert"]
            assert re.fullmatch(r"Specgate[A-Za-z]+", alert), alert
            assert rule["labels"]["severity"] in {"warning", "critical"}, alert
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], alert
            if "for" in rule:
                assert re.fullmatch(r"\d+[smh]", rule["for"]), (alert, rule["for"])
            expr = rule["expr"]
            assert isinstance(expr, str) and expr.count("(") == expr.count(")"), alert
            used = set(re.findall(r"\bspecgate_[a-z_]+", expr))
            assert used or "up{" in expr, f"{alert} names no specgate metric"
            assert used <= names, f"{alert} names metrics specgate does not export: {sorted(used - names)}"
            for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
                for label in (x.strip() for x in clause.split(",")):
                    assert label in label_names | {"instance", "job"}, f"{alert}: unknown label {label!r}"
            alerts.append(alert)
    assert len(alerts) == len(set(alerts))
    for wanted in ("SpecgateJobsFailed", "SpecgateReviewQueueStale", "SpecgateDeliveryFailed",
                   "SpecgateScpRefusalsSpike", "SpecgateNoWorker"):
        assert wanted in alerts
    promtool = shutil.which("promtool")
    if promtool:  # the real checker, where it is installed
        out = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
