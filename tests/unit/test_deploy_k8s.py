"""deploy/k8s: schema-valid manifests, consistent probes/drain/ports/labels (the overlays built
with kubectl: tests/e2e/test_deploy_k8s_overlays.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from lstmserve.v1 import lstm_serve_pb2 as pb
from service.config import ENV_PREFIX, FLAGS, config_from_args

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="pip install kubernetes-validate (the test extra)"
)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = sorted(p for p in (K8S / "overlays").iterdir() if p.is_dir())
KUBERNETES_VERSION = "1.37.0"  # the schemas kubernetes-validate checks against
GRPC_SERVICE = pb.DESCRIPTOR.services_by_name["LstmServe"].full_name
# Settings the manifests pass before the server reads them (session snapshots, next change).
PLANNED_ENV = {"LSTM_SERVE_SNAPSHOT_KEY"}
PRESTOP_TO_SIGKILL_MARGIN_S = 5


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def manifests() -> dict[Path, dict[str, Any]]:
    """Every Kubernetes object in deploy/k8s (not kustomizations): path -> object."""
    found = {}
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name != "kustomization.yaml":
            (doc,) = documents(path)
            found[path] = doc
    return found


def base_objects() -> dict[str, dict[str, Any]]:
    """The base's objects by 'Kind/name'."""
    return {
        f"{d['kind']}/{d['metadata']['name']}": d
        for p, d in manifests().items()
        if p.parent == BASE
    }


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (main,) = deployment["spec"]["template"]["spec"]["containers"]
    return main


def validate(doc: dict[str, Any], where: str) -> None:
    if doc["kind"] == "ServiceMonitor":
        check_service_monitor(doc, where)
        return
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{where}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}")


def check_service_monitor(doc: dict[str, Any], where: str) -> None:
    """The CRD is not in the core schemas: the fields the Prometheus Operator requires."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1", where
    assert doc["metadata"]["name"], where
    spec = doc["spec"]
    assert isinstance(spec["selector"]["matchLabels"], dict), where
    assert spec["endpoints"], f"{where}: no endpoints"
    for endpoint in spec["endpoints"]:
        assert isinstance(endpoint["port"], str), f"{where}: endpoints need a named port"
        assert endpoint.get("path", "/metrics").startswith("/"), where
        for key in ("interval", "scrapeTimeout"):
            assert str(endpoint.get(key, "1s"))[-1] in "sm", f"{where}: {key} needs a unit"
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}, where


def test_every_manifest_is_valid_for_the_pinned_kubernetes() -> None:
    found = manifests()
    assert len(found) >= 10
    for path, doc in found.items():
        if doc["kind"] in ("Deployment", "HorizontalPodAutoscaler") and "overlays" in path.parts:
            continue  # partial patches, validated after kustomize merges them (below)
        validate(doc, str(path.relative_to(ROOT)))


def test_kustomizations_reference_existing_files() -> None:
    for folder in [BASE, *OVERLAYS]:
        kustomization = folder / "kustomization.yaml"
        (spec,) = documents(kustomization)
        here = kustomization.parent
        paths = list(spec.get("resources", [])) + [p["path"] for p in spec.get("patches", [])]
        assert paths, f"{kustomization} lists nothing"
        for rel in paths:
            target = (here / rel).resolve()
            assert target.exists(), f"{kustomization.relative_to(ROOT)}: {rel} does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").exists(), f"{rel} is no kustomization"
    listed = set(documents(BASE / "kustomization.yaml")[0]["resources"])
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, "base files and base resources differ"


def test_probes_ask_grpc_health_and_the_v2_ready_endpoint() -> None:
    main = container(base_objects()["Deployment/lstm-serve"])
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    config = config_from_args([], environ=base_objects()["ConfigMap/lstm-serve-config"]["data"])
    assert ports == {
        "http": config.http_port, "grpc": config.grpc_port, "metrics": config.metrics_port,
        "health": config.health_port,
    }  # fmt: skip
    assert (config.http_port, config.grpc_port, config.metrics_port) == (8000, 8001, 8002)
    for probe in ("startupProbe", "livenessProbe"):
        grpc_probe = main[probe]["grpc"]
        # The plaintext health port: the gRPC port needs TLS (the kubelet's probes cannot).
        assert grpc_probe["port"] == config.health_port, probe
        # The server registers health for "" and the LstmServe service (service/server.py).
        assert grpc_probe.get("service", "") in ("", GRPC_SERVICE), probe
    # Readiness: the Open Inference Protocol's endpoint (service/triton/http_front.py), over
    # HTTPS when the server serves TLS.
    ready = main["readinessProbe"]["httpGet"]
    assert ready["path"] == "/v2/health/ready"
    assert ports[ready["port"]] == config.http_port
    assert ready.get("scheme", "HTTP") == ("HTTPS" if config.tls_cert else "HTTP")


def test_the_service_exposes_tritons_three_ports() -> None:
    service = base_objects()["Service/lstm-serve"]
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {"http": (8000, "http"), "grpc": (8001, "grpc"), "metrics": (8002, "metrics")}


def test_termination_grace_covers_prestop_and_server_drain() -> None:
    deployment = base_objects()["Deployment/lstm-serve"]
    data = base_objects()["ConfigMap/lstm-serve-config"]["data"]
    drain_s = config_from_args([], environ=data).drain_grace_s
    pre_stop_s = container(deployment)["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace_s = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pre_stop_s >= 1, "preStop gives endpoints time to drop the pod before SIGTERM"
    assert grace_s >= pre_stop_s + drain_s + PRESTOP_TO_SIGKILL_MARGIN_S


def test_configmap_holds_only_real_server_settings() -> None:
    data = base_objects()["ConfigMap/lstm-serve-config"]["data"]
    known = {ENV_PREFIX + name.upper() for name in FLAGS}
    assert set(data) <= known, f"unknown settings: {sorted(set(data) - known)}"
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values must be strings"
    config = config_from_args([], environ=data)  # raises on an invalid value
    assert config.log_json and config.model_repository == Path("/app/models")
    env = {e["name"] for e in container(base_objects()["Deployment/lstm-serve"])["env"]}
    assert env <= known | PLANNED_ENV


def test_pod_runs_non_root_read_only_without_capabilities() -> None:
    pod = base_objects()["Deployment/lstm-serve"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    main = container(base_objects()["Deployment/lstm-serve"])
    context = main["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert {m["mountPath"] for m in main["volumeMounts"]} >= {"/tmp"}
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(main["resources"][kind]), kind


def test_services_select_the_pods_and_the_monitor_scrapes_one_service() -> None:
    objects = base_objects()
    pod_labels = objects["Deployment/lstm-serve"]["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"] for p in container(objects["Deployment/lstm-serve"])["ports"]}
    services = [d for d in objects.values() if d["kind"] == "Service"]
    for service in services:
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    headless = objects["Service/lstm-serve-headless"]["spec"]
    assert headless["clusterIP"] == "None"
    (monitor_doc,) = documents(K8S / "monitoring" / "servicemonitor.yaml")
    monitor = monitor_doc["spec"]
    wanted = monitor["selector"]["matchLabels"].items()
    scraped = [s for s in services if wanted <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in scraped] == ["lstm-serve"], "scrape pods once"
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] in {p["name"] for p in scraped[0]["spec"]["ports"]}
    for name in ("HorizontalPodAutoscaler/lstm-serve", "PodDisruptionBudget/lstm-serve"):
        assert name in objects
