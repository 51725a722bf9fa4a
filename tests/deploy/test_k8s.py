"""deploy/k8s: every manifest passes kubernetes-validate (strict: unknown fields are
errors) against the Kubernetes versions below, the kustomize base builds (in Python:
kustomize is not installed), and the manifests agree with phasewatch: settings, routes,
port, commands, and a grace period that fits the graceful stop."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from consumer.service import Service
from consumer.settings import Settings
from consumer.sources.webhook import WEBHOOK_PATH
from tests.deploy.support import (
    K8S,
    KUBERNETES_VERSIONS,
    find,
    grace_budget_s,
    kustomization,
    kustomize_build,
    load_documents,
    not_settings,
    pod_containers,
    pod_spec,
    pre_stop_sleep_s,
    secret_setting_names,
)

MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def validate(resource: dict[str, Any], version: str) -> None:
    """kubernetes-validate's Python API: a kind it has no schema for raises too (its CLI
    only warns), so nothing passes unchecked."""
    kubernetes_validate.validate(resource, version, strict=True)


def deployment() -> dict[str, Any]:
    return find(kustomize_build(), "Deployment")


def container(resource: dict[str, Any]) -> dict[str, Any]:
    containers = pod_containers(resource)
    assert len(containers) == 1
    return containers[0]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_passes_kubernetes_validate(path: Path, version: str) -> None:
    documents = load_documents(path)
    assert documents, f"{path.name} holds no resource"
    for resource in documents:
        validate(resource, version)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_built_kustomization_passes_kubernetes_validate(version: str) -> None:
    for resource in kustomize_build():
        validate(resource, version)


def test_strict_validation_rejects_an_unknown_field() -> None:
    """Strict mode is on: a misspelt field is an error, not ignored by the API server."""
    broken = copy.deepcopy(deployment())
    probe = broken["spec"]["template"]["spec"]["containers"][0]
    probe["readinesProbe"] = probe.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken, KUBERNETES_VERSIONS[-1])


def test_kustomization_lists_every_file_and_nothing_missing() -> None:
    listed = kustomization()["resources"]
    assert len(listed) == len(set(listed)), "a resource listed twice"
    for entry in listed:
        assert (K8S / entry).is_file(), f"kustomization.yaml lists {entry}: missing"
    on_disk = {p.name for p in K8S.iterdir() if p.name != "kustomization.yaml"}
    assert on_disk == set(listed), f"in deploy/k8s but not listed: {on_disk - set(listed)}"


def test_built_resources_are_unique_and_references_resolve() -> None:
    resources = kustomize_build()
    ids = [(r["kind"], r["metadata"]["name"]) for r in resources]
    assert len(ids) == len(set(ids)), ids
    names = set(ids)
    for resource in resources:
        spec = pod_spec(resource)
        if spec is None:
            continue
        account = spec.get("serviceAccountName")
        if account:
            assert ("ServiceAccount", account) in names
        for box in pod_containers(resource):
            assert box["image"] == "phasewatch:local", "the images override applied"
            for source in box.get("envFrom", []):
                if "configMapRef" in source:
                    assert ("ConfigMap", source["configMapRef"]["name"]) in names
                if "secretRef" in source:
                    assert ("Secret", source["secretRef"]["name"]) in names
    pods = deployment()["spec"]["template"]["metadata"]["labels"]
    assert deployment()["spec"]["selector"]["matchLabels"].items() <= pods.items()
    service = find(resources, "Service")
    assert service["spec"]["selector"].items() <= pods.items()
    budget = find(resources, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pods.items()
    assert budget["spec"]["minAvailable"] == 1


def test_configmap_and_secret_hold_real_settings_each_in_its_place() -> None:
    resources = kustomize_build()
    secrets = secret_setting_names()
    config = set(find(resources, "ConfigMap")["data"])
    assert not not_settings(config), not_settings(config)
    assert not config & secrets, f"secrets in the ConfigMap: {config & secrets}"
    secret = find(resources, "Secret")
    values = secret.get("stringData", {}) | secret.get("data", {})
    assert set(values) <= secrets, f"not secret settings: {set(values) - secrets}"
    assert not not_settings(set(values))
    assert all("CHANGE-ME" in str(v) for v in values.values()), "placeholders only"
    assert "EXAMPLE" in (K8S / "secret.example.yaml").read_text()
    # The ConfigMap's values are what phasewatch itself accepts.
    data = find(resources, "ConfigMap")["data"]
    settings = Settings.model_validate(
        {k.removeprefix("PHASEWATCH_").lower(): v for k, v in data.items()}
    )
    assert settings.database_url.startswith("postgresql://")
    assert settings.database_migrate is False
    assert settings.http_host == "0.0.0.0"


def test_probes_and_port_are_the_apps() -> None:
    service = Service.from_settings(Settings(database_url="memory://"))
    routes = {(r.method, r.resource.canonical) for r in service.app.router.routes() if r.resource}
    box = container(deployment())
    port = box["ports"][0]
    data = find(kustomize_build(), "ConfigMap")["data"]
    assert str(port["containerPort"]) == data["PHASEWATCH_HTTP_PORT"]
    probes = {kind: box[kind] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    for kind, probe in probes.items():
        path = probe["httpGet"]["path"]
        assert ("GET", path) in routes, f"{kind} {path}: no such route"
        assert probe["httpGet"]["port"] in (port["name"], port["containerPort"]), kind
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert ("POST", WEBHOOK_PATH) in routes
    svc = find(kustomize_build(), "Service")["spec"]["ports"][0]
    assert svc["targetPort"] in (port["name"], port["containerPort"])
    # A loop stuck past PHASEWATCH_LIVENESS_MAX_LAG_S is what liveness checks for: the
    # probe's timeout must let a slow-but-alive answer through.
    assert probes["livenessProbe"]["timeoutSeconds"] >= 2


def test_deployment_runs_two_hardened_replicas() -> None:
    dep = deployment()
    assert dep["spec"]["replicas"] == 2
    spec = dep["spec"]["template"]["spec"]
    box = container(dep)
    assert box["command"] == ["phasewatch", "serve"]
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(box["resources"][part]), part
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    context = box["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    spread = spec["topologySpreadConstraints"][0]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    # PHASEWATCH_DATABASE_MIGRATE=false comes from the ConfigMap the pods read.
    sources = [s.get("configMapRef", {}).get("name") for s in box["envFrom"]]
    config = find(kustomize_build(), "ConfigMap")
    assert config["metadata"]["name"] in sources
    assert config["data"]["PHASEWATCH_DATABASE_MIGRATE"] == "false"


def test_grace_period_fits_the_graceful_stop() -> None:
    spec = deployment()["spec"]["template"]["spec"]
    grace = spec["terminationGracePeriodSeconds"]
    sleep = pre_stop_sleep_s(container(deployment()))
    assert sleep >= 3, "the endpoint must be gone from the Service before SIGTERM"
    # The preStop hook's time counts against the grace period.
    assert grace - sleep >= grace_budget_s(), (
        f"terminationGracePeriodSeconds {grace} - preStop {sleep} s < {grace_budget_s()} s"
    )


def test_migration_job_runs_phasewatch_migrate() -> None:
    job = find(kustomize_build(), "Job")
    box = container(job)
    assert box["command"] + box.get("args", []) == ["phasewatch", "migrate"]
    assert job["spec"]["backoffLimit"] >= 1
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    assert job["spec"]["template"]["spec"]["restartPolicy"] in {"Never", "OnFailure"}
    # The same configuration as the replicas.
    assert box["envFrom"] == container(deployment())["envFrom"]
    assert box["securityContext"]["readOnlyRootFilesystem"] is True
