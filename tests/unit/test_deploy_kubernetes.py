"""``deploy/kubernetes``: every manifest passes kubernetes-validate (the Kubernetes OpenAPI schemas shipped
inside the PyPI package: offline) for a pinned Kubernetes version, strictly (an unknown field fails), and
describes the issue's topology: the SCP a StatefulSet whose spool is its own volume claim, the workers
Deployments with an emptyDir cache and no shared volume (the GPU one requesting ``nvidia.com/gpu``), the
review app two replicas reading one session key from the Secret, the migration a Job that every service Pod
waits for, health probes on every specgate container, and Redis configured by ``deploy/redis/redis.conf``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from specgate.settings import Settings
from tests.unit.test_deploy_compose import settings_from_environment

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "kubernetes"
KUBERNETES_VERSION = "1.33.0"  # pinned: the schemas inside kubernetes-validate, no network
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
SPECGATE_WORKLOADS = ("specgate-scp", "specgate-worker-gpu", "specgate-worker-deliver", "specgate-review")


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def _all() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for p in MANIFESTS for d in _docs(p)}


def _pod(kind: str, name: str) -> dict[str, Any]:
    return _all()[(kind, name)]["spec"]["template"]["spec"]


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_every_manifest_passes_the_kubernetes_schema(manifest: Path) -> None:
    docs = _docs(manifest)
    assert docs, f"{manifest.name} holds no resource"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{manifest.name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} "
                                 f"at {'.'.join(map(str, exc.path))}") from exc


def test_the_schema_check_refuses_a_broken_manifest() -> None:
    (review,) = [d for d in _docs(K8S / "review.yaml") if d["kind"] == "Deployment"]
    review["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(review, KUBERNETES_VERSION, strict=True)
    review["spec"]["replicas"] = 2
    review["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1  # no such field: strict refuses it
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(review, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in MANIFESTS if p.name != "secret.example.yaml")


def test_the_topology() -> None:
    resources = _all()
    scp = resources[("StatefulSet", "specgate-scp")]
    (claim,) = scp["spec"]["volumeClaimTemplates"]
    (container,) = scp["spec"]["template"]["spec"]["containers"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/var/lib/specgate"} in container["volumeMounts"]
    service = resources[("Service", "specgate-scp")]
    assert service["spec"]["ports"][0]["port"] == 11112

    for name in ("specgate-worker-gpu", "specgate-worker-deliver"):
        pod = _pod("Deployment", name)
        for volume in pod["volumes"]:
            assert "persistentVolumeClaim" not in volume and "nfs" not in volume, f"{name}: shared {volume}"
        assert any(v["name"] == "cache" and "emptyDir" in v for v in pod["volumes"]), name
        assert {"name": "cache", "mountPath": "/var/cache/specgate"} in pod["containers"][0]["volumeMounts"]
    gpu = _pod("Deployment", "specgate-worker-gpu")["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1 and gpu["image"].endswith(":cuda")
    assert gpu["args"][:2] == ["worker", "--models"]
    assert _pod("Deployment", "specgate-worker-deliver")["containers"][0]["args"] == ["worker", "--queues", "deliver"]

    review = resources[("Deployment", "specgate-review")]
    assert review["spec"]["replicas"] == 2
    pod = review["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    key = Path(env["SPECGATE_REVIEW_SECRET_FILE"])
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == str(key.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "specgate"
    assert volume["secret"]["items"] == [{"key": "review-session-key", "path": key.name}]

    job = resources[("Job", "specgate-migrate")]
    command = " ".join(job["spec"]["template"]["spec"]["containers"][0]["command"])
    assert command.index("db upgrade") < command.index("db roles")
    owner = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert owner["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "pg-owner-password"
    for name in SPECGATE_WORKLOADS:
        kind = "StatefulSet" if name == "specgate-scp" else "Deployment"
        pod = _pod(kind, name)
        assert [c["name"] for c in pod.get("initContainers", [])] == ["wait-for-migration"], name
        assert "db current" in " ".join(pod["initContainers"][0]["command"])
        for c in pod["containers"]:
            assert "readinessProbe" in c and "livenessProbe" in c, f"{name}/{c['name']}: no probes"
            envs = {e["name"]: e for e in c["env"]}
            assert envs["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "pg-app-password", name
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
    probe = _pod("StatefulSet", "specgate-scp")["containers"][0]["readinessProbe"]
    assert probe["exec"]["command"] == ["specgate-entrypoint", "health"]


def test_redis_and_the_settings() -> None:
    resources = _all()
    conf = resources[("ConfigMap", "redis-config")]["data"]["redis.conf"]
    assert conf == (DEPLOY / "redis" / "redis.conf").read_text(), (
        "the redis-config ConfigMap differs from deploy/redis/redis.conf: copy the file into it")
    known = set(Settings.model_fields)
    for key in resources[("ConfigMap", "specgate")]["data"]:
        assert key.startswith("SPECGATE_") and key.removeprefix("SPECGATE_").lower() in known, key
    for doc in resources.values():
        for pod in ([doc["spec"]["template"]["spec"]] if "template" in doc.get("spec", {}) else []):
            for c in pod["containers"] + pod.get("initContainers", []):
                for e in c.get("env", []):
                    if e["name"].startswith("SPECGATE_"):
                        assert e["name"].removeprefix("SPECGATE_").lower() in known, e["name"]
                    assert "password" not in str(e.get("value", "")).lower(), e["name"]


@pytest.mark.parametrize("workload", ["Job/specgate-migrate", *(f"{'StatefulSet' if n == 'specgate-scp' else 'Deployment'}/{n}"
                                                               for n in SPECGATE_WORKLOADS)])
def test_each_workload_starts_with_valid_settings(workload: str, monkeypatch: pytest.MonkeyPatch) -> None:
    kind, name = workload.split("/")
    resources = _all()
    env = dict(resources[("ConfigMap", "specgate")]["data"])
    for c in resources[(kind, name)]["spec"]["template"]["spec"]["containers"]:
        env.update({e["name"]: e["value"] for e in c["env"] if "value" in e})
    settings = settings_from_environment(env, monkeypatch)
    assert settings.db_url.startswith("postgresql+psycopg://specgate_")
