"""The Kubernetes manifests: valid against the Kubernetes 1.30 schemas (strict) and consistent with
the launcher's configuration, the Dockerfile and the Zero to JupyterHub example values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from consumer.config import ENV_PREFIX, Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
MANIFESTS = sorted(p for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / name).read_text())


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    return load("deployment.yaml")


@pytest.fixture(scope="module")
def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_each_manifest_is_valid_against_the_kubernetes_1_30_schemas_strictly(path: Path) -> None:
    for document in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(document, "1.30.0", strict=True)


def test_strict_validation_refuses_a_mistyped_field() -> None:
    broken = load("deployment.yaml")
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.30.0", strict=True)


def test_the_kustomization_lists_every_manifest() -> None:
    kustomization = load("kustomization.yaml")
    assert sorted(kustomization["resources"]) == [p.name for p in MANIFESTS]


def test_the_configmap_is_a_config_the_launcher_loads_and_the_pod_matches_it(
    tmp_path: Path, deployment: dict[str, Any]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(load("configmap.yaml")["data"]["config.yaml"])
    settings = load_settings(config, environ={"LAUNCHER_JUPYTERHUB_API_TOKEN": "x"})
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    # Running commands get shutdown_grace after SIGTERM, and the kubelet waits longer than that.
    assert pod["terminationGracePeriodSeconds"] > settings.shutdown_grace
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["health"] == settings.health_port
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert container["args"] == ["run", "--config", f"{mount['mountPath']}/config.yaml"]
    # The hub's own Service address: not through the proxy.
    assert str(settings.jupyterhub_url).rstrip("/") == "http://hub:8081"


def test_the_secret_holds_only_keys_the_launcher_reads(deployment: dict[str, Any]) -> None:
    secret = load("secret.yaml")
    for name in secret["stringData"]:
        assert name.startswith(ENV_PREFIX) and name[len(ENV_PREFIX) :].lower() in Settings.model_fields
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert {"secretRef": {"name": secret["metadata"]["name"]}} in container["envFrom"]


def test_pods_run_as_the_images_non_root_user_with_a_read_only_root(deployment: dict[str, Any]) -> None:
    pod = deployment["spec"]["template"]["spec"]
    dockerfile_user = next(
        line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("USER ")
    )
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == dockerfile_user
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert set(container["resources"]) == {"requests", "limits"}
    assert deployment["spec"]["replicas"] >= 2


def test_every_selector_picks_the_launchers_pods(deployment: dict[str, Any], pod_labels: dict[str, str]) -> None:
    selectors = {
        "deployment": deployment["spec"]["selector"]["matchLabels"],
        "service": load("service.yaml")["spec"]["selector"],
        "pdb": load("poddisruptionbudget.yaml")["spec"]["selector"]["matchLabels"],
        "networkpolicy": load("networkpolicy.yaml")["spec"]["podSelector"]["matchLabels"],
    }
    for name, selector in selectors.items():
        assert selector.items() <= pod_labels.items(), name


def test_the_metrics_service_is_annotated_for_prometheus_on_the_health_port(deployment: dict[str, Any]) -> None:
    service = load("service.yaml")
    annotations = service["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert service["spec"]["ports"][0]["targetPort"] == "health"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    health_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "health")
    assert annotations["prometheus.io/port"] == str(health_port)


def test_the_network_policy_lets_in_only_scrapes_and_out_only_hub_broker_and_dns() -> None:
    policy = load("networkpolicy.yaml")["spec"]
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == [8090]
    egress_ports = sorted({p["port"] for rule in policy["egress"] for p in rule["ports"]})
    assert egress_ports == [53, 5671, 5672, 8081]


def test_the_zero_to_jupyterhub_values_give_the_launcher_what_the_manifests_expect(pod_labels: dict[str, str]) -> None:
    values = yaml.safe_load((ROOT / "examples" / "z2jh-values.yaml").read_text())
    hub = values["hub"]
    # The Secret's hub token is this service's apiToken; the service needs these scopes.
    assert "apiToken" in hub["services"]["launcher"]
    role = hub["loadRoles"]["launcher"]
    assert role["services"] == ["launcher"]
    assert {"admin:users", "servers", "tokens"} <= set(role["scopes"])
    # The chart's hub NetworkPolicy admits pods that carry this label.
    assert pod_labels.get("hub.jupyter.org/network-access-hub") == "true"
