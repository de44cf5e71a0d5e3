"""deploy/kserve: the ClusterServingRuntime, the InferenceService, its sessions HPA and PodMonitor
valid for their CRDs (tests/unit/crd_schemas.py) and for Kubernetes, and consistent with the
server: flags that parse, the ports and probes the server opens, KServe's model mount, the
drain timing, the autoscaling of deploy/k8s/autoscaling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import config_from_args
from tests.unit.crd_schemas import custom_resource_errors
from tests.unit.deploy_reference import ROOT

KSERVE = ROOT / "deploy" / "kserve"
MODEL_MOUNT = "/mnt/models"  # where KServe's storage initializer puts the storageUri
KSERVE_CONTAINER = "kserve-container"  # the name KServe merges the predictor's fields into
STORAGE_SCHEMES = ("s3://", "gs://", "pvc://", "hdfs://", "webhdfs://", "oci://", "https://",
                   "http://", "hf://")  # fmt: skip
A_KEY = "k1:" + "A" * 44  # the snapshot key the Secret would hold
PRESTOP_TO_SIGKILL_MARGIN_S = 5  # as tests/unit/test_deploy_k8s.py


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((KSERVE / name).read_text(encoding="utf-8"))


def runtime_container() -> dict[str, Any]:
    (container,) = load("clusterservingruntime.yaml")["spec"]["containers"]
    return container


def predictor() -> dict[str, Any]:
    return load("inferenceservice.yaml")["spec"]["predictor"]


def merged_environment() -> dict[str, str]:
    """The container's environment once KServe merges the predictor's env into the runtime's
    (the Secret's value stands in for its reference)."""
    env = {e["name"]: e["value"] for e in runtime_container()["env"]}
    for entry in predictor()["model"]["env"]:
        env[entry["name"]] = entry.get("value", A_KEY if "valueFrom" in entry else "")
    return env


@pytest.mark.parametrize("path", sorted(KSERVE.glob("*.yaml")), ids=lambda p: p.name)
def test_every_object_is_valid_for_its_schema(path: Path) -> None:
    (doc,) = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    errors = custom_resource_errors(doc)
    assert not errors, f"{path.relative_to(ROOT)}: {errors}"


def test_the_runtime_serves_the_v2_protocol_over_http_and_grpc() -> None:
    spec = load("clusterservingruntime.yaml")["spec"]
    assert {"v2", "grpc-v2"} <= set(spec["protocolVersions"])
    container = runtime_container()
    assert container["name"] == KSERVE_CONTAINER
    config = config_from_args(container["args"], environ=merged_environment())
    assert str(config.model_repository) == MODEL_MOUNT
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": config.http_port, "grpc": config.grpc_port,
                     "metrics": config.metrics_port}  # fmt: skip
    assert container["ports"][0]["name"] == "http", "KServe maps the first port to :80 (HTTP)"
    annotations = spec["annotations"]
    assert int(annotations["prometheus.kserve.io/port"]) == config.metrics_port


def test_the_runtime_probes_ask_what_the_server_answers() -> None:
    container = runtime_container()
    config = config_from_args(container["args"], environ=merged_environment())
    assert container["readinessProbe"]["httpGet"] == {
        "path": "/v2/health/ready", "port": config.http_port,
    }  # fmt: skip
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == config.health_port, probe
    assert container["securityContext"]["runAsNonRoot"] is True


def test_the_inference_service_uses_the_runtime_and_a_model_repository() -> None:
    runtime = load("clusterservingruntime.yaml")
    model = predictor()["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["storageUri"].startswith(STORAGE_SCHEMES), model["storageUri"]


def test_sequences_survive_replicas_the_service_shares_a_store_and_a_key() -> None:
    """KServe balances requests: every replica needs the shared store and the same key so
    that any of them continues a Triton sequence (docs/COMING_FROM_TRITON.md "Sequences")."""
    env = merged_environment()
    config = config_from_args(runtime_container()["args"], environ=env)
    assert config.session_store.startswith(("redis", "rediss", "unix")), config.session_store
    assert config.session_store_mode == "strict"
    (key,) = [e for e in predictor()["model"]["env"] if e["name"] == "LSTM_SERVE_SNAPSHOT_KEY"]
    assert key["valueFrom"]["secretKeyRef"]["name"] == "lstm-serve-snapshot-key"


def test_the_drain_fits_the_termination_grace_period() -> None:
    container = runtime_container()
    config = config_from_args(container["args"], environ=merged_environment())
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = predictor()["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + config.drain_grace_s + PRESTOP_TO_SIGKILL_MARGIN_S


def test_kserve_leaves_scaling_to_the_sessions_hpa() -> None:
    service = load("inferenceservice.yaml")
    annotations = service["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert annotations["serving.kserve.io/autoscalerClass"] == "external"
    hpa = load("hpa-sessions.yaml")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "name": f"{service['metadata']['name']}-predictor",
    }  # fmt: skip
    assert hpa["metadata"]["namespace"] == service["metadata"]["namespace"]
    bounds = (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"])
    assert bounds == (predictor()["minReplicas"], predictor()["maxReplicas"])
    component = yaml.safe_load(
        (ROOT / "deploy" / "k8s" / "autoscaling" / "kustomization.yaml").read_text("utf-8")
    )
    operations = yaml.safe_load(component["patches"][0]["patch"])
    by_path = {op["path"]: op["value"] for op in operations}
    assert hpa["spec"]["metrics"] == by_path["/spec/metrics"], "same metrics as the Deployment's"
    assert hpa["spec"]["behavior"] == by_path["/spec/behavior"]


def test_the_pod_monitor_scrapes_the_predictor_pods() -> None:
    monitor = load("podmonitor.yaml")
    service = load("inferenceservice.yaml")
    assert monitor["spec"]["selector"]["matchLabels"] == {
        "serving.kserve.io/inferenceservice": service["metadata"]["name"]
    }
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in runtime_container()["ports"]}
