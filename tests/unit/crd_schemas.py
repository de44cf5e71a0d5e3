"""Offline validation of the custom resources deploy/ ships (PrometheusRule, PodMonitor, KServe's
ClusterServingRuntime and InferenceService), for the deployment tests.

The schemas below are written here from the published CustomResourceDefinitions and API types
(not vendored copies): prometheus-operator's monitoring.coreos.com_prometheusrules.yaml (operator
0.82) and its PodMonitor, KServe's `ServingRuntimeSpec` (serving.kserve.io/v1alpha1) and
`PredictorSpec` / `ModelSpec` / `ComponentExtensionSpec` (serving.kserve.io/v1beta1). They hold
the fields those name, their types, patterns and required fields, and are stricter in one way:
an unknown field is an error here, where the API server would silently prune it. The Kubernetes
types the CRDs embed (Container, the PodSpec fields, ObjectMeta) are checked by
kubernetes-validate against the core schemas, as the CRDs embed those very schemas.
"""

from __future__ import annotations

from typing import Any

import pytest

jsonschema = pytest.importorskip(
    "jsonschema", reason="pip install kubernetes-validate (test extra)"
)
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="pip install kubernetes-validate (the test extra)"
)

KUBERNETES_VERSION = "1.37.0"  # as tests/unit/test_deploy_k8s.py
# The operator's duration pattern (for, interval, keep_firing_for, query_offset, intervals).
DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
    r"(([0-9]+)ms)?)$",
}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
ANY_OBJECT = {"type": "object"}

RULE = {
    "type": "object",
    "required": ["expr"],
    "additionalProperties": False,
    "properties": {
        "alert": {"type": "string"},
        "record": {"type": "string"},
        "expr": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        "for": DURATION,
        "keep_firing_for": {**DURATION, "minLength": 1},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],  # "only one of"
}
RULE_GROUP = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "interval": DURATION,
        "labels": STRING_MAP,
        "limit": {"type": "integer"},
        "partial_response_strategy": {"type": "string", "pattern": r"^(?i)(abort|warn)?$"},
        "query_offset": DURATION,
        "rules": {"type": "array", "items": RULE},
    },
}
PROMETHEUS_RULE_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"groups": {"type": "array", "items": RULE_GROUP}},
}
POD_METRICS_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "port": {"type": "string"},
        "portNumber": {"type": "integer", "minimum": 1, "maximum": 65535},
        "path": {"type": "string", "pattern": "^/"},
        "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
        "interval": DURATION,
        "scrapeTimeout": DURATION,
        "honorLabels": {"type": "boolean"},
        "relabelings": {"type": "array"},
        "metricRelabelings": {"type": "array"},
    },
    "anyOf": [{"required": ["port"]}, {"required": ["portNumber"]}],
}
POD_MONITOR_SPEC = {
    "type": "object",
    "required": ["selector"],
    "additionalProperties": False,
    "properties": {
        "selector": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"matchLabels": STRING_MAP, "matchExpressions": {"type": "array"}},
        },
        "podMetricsEndpoints": {"type": "array", "items": POD_METRICS_ENDPOINT},
        "namespaceSelector": ANY_OBJECT,
        "jobLabel": {"type": "string"},
        "podTargetLabels": {"type": "array", "items": {"type": "string"}},
    },
}

PROTOCOLS = ["v1", "v2", "grpc-v1", "grpc-v2"]  # constants.InferenceServiceProtocol
# ServingRuntimePodSpec: the Kubernetes fields, checked as a Pod's.
RUNTIME_POD_FIELDS = (
    "containers", "volumes", "nodeSelector", "affinity", "tolerations", "imagePullSecrets",
    "hostIPC",
)  # fmt: skip
SERVING_RUNTIME_SPEC = {
    "type": "object",
    "required": ["containers"],
    "additionalProperties": False,
    "properties": {
        "supportedModelFormats": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "version": {"type": "string"},
                    "autoSelect": {"type": "boolean"},
                    "priority": {"type": "integer", "minimum": 1},
                },
            },
        },
        "multiModel": {"type": "boolean"},
        "disabled": {"type": "boolean"},
        "protocolVersions": {"type": "array", "items": {"enum": PROTOCOLS}},
        "workerSpec": ANY_OBJECT,
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
        "grpcEndpoint": {"type": "string"},
        "grpcDataEndpoint": {"type": "string"},
        "httpDataEndpoint": {"type": "string"},
        "replicas": {"type": "integer", "minimum": 0, "maximum": 65535},
        "storageHelper": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"disabled": {"type": "boolean"}},
        },
        "builtInAdapter": ANY_OBJECT,
        **{field: {} for field in RUNTIME_POD_FIELDS},  # kubernetes-validate checks these
        "containers": {"type": "array", "minItems": 1},
    },
}
# PredictorSpec: exactly one implementation, the component extension, the rest a PodSpec.
IMPLEMENTATIONS = (
    "sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "huggingface", "pmml",
    "lightgbm", "paddle", "model",
)  # fmt: skip
COMPONENT_EXTENSION = {
    "minReplicas": {"type": "integer", "minimum": 0},
    "maxReplicas": {"type": "integer", "minimum": 0},
    "scaleTarget": {"type": "integer"},
    "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
    "containerConcurrency": {"type": "integer", "minimum": 0},
    "timeout": {"type": "integer"},
    "canaryTrafficPercent": {"type": "integer"},
    "logger": ANY_OBJECT,
    "batcher": ANY_OBJECT,
    "labels": STRING_MAP,
    "annotations": STRING_MAP,
    "deploymentStrategy": ANY_OBJECT,
}
MODEL_SPEC_OWN = {
    "modelFormat": {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {"name": {"type": "string", "minLength": 1}, "version": {"type": "string"}},
    },
    "runtime": {"type": "string"},
    "storageUri": {"type": "string", "minLength": 1},
    "runtimeVersion": {"type": "string"},
    "protocolVersion": {"enum": PROTOCOLS},
    "storage": ANY_OBJECT,
}
ISVC_NAME = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"  # KServe's IsvcNameFmt
DEPLOYMENT_MODES = {"RawDeployment", "Standard", "Serverless", "Knative", "ModelMesh"}
AUTOSCALER_CLASSES = {"hpa", "external", "keda", "none"}


def schema_errors(instance: Any, schema: dict[str, Any]) -> list[str]:
    """Every violation, as 'path: message'."""
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{'/'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
        for error in validator.iter_errors(instance)
    ]


def core_errors(doc: dict[str, Any]) -> list[str]:
    """kubernetes-validate's verdict on a core object (strict: unknown fields too)."""
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{doc['kind']}: {exc.message}"]
    return []


def metadata_errors(metadata: dict[str, Any], namespaced: bool) -> list[str]:
    """ObjectMeta as the core schema has it (checked on a ConfigMap carrying it)."""
    errors = core_errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata})
    if not metadata.get("name"):
        errors.append("metadata.name is required")
    if not namespaced and "namespace" in metadata:
        errors.append("a cluster-scoped object has no metadata.namespace")
    return errors


def pod_errors(pod_fields: dict[str, Any], where: str) -> list[str]:
    """PodSpec fields (containers included) as a Pod's, against the core schema."""
    spec = {"containers": [{"name": "placeholder", "image": "placeholder"}], **pod_fields}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": spec}
    return [f"{where}: {e}" for e in core_errors(pod)]


def check_header(doc: dict[str, Any], api_version: str, kind: str) -> list[str]:
    errors = []
    if doc.get("apiVersion") != api_version or doc.get("kind") != kind:
        errors.append(
            f"expected {api_version} {kind}, got {doc.get('apiVersion')} {doc.get('kind')}"
        )
    unknown = set(doc) - {"apiVersion", "kind", "metadata", "spec"}
    if unknown:
        errors.append(f"unknown top-level fields {sorted(unknown)}")
    return errors


def prometheus_rule_errors(doc: dict[str, Any]) -> list[str]:
    errors = check_header(doc, "monitoring.coreos.com/v1", "PrometheusRule")
    errors += metadata_errors(doc.get("metadata", {}), namespaced=True)
    errors += schema_errors(doc.get("spec"), PROMETHEUS_RULE_SPEC)
    names = [g.get("name") for g in doc.get("spec", {}).get("groups", [])]
    if len(names) != len(set(names)):  # x-kubernetes-list-map-keys: [name]
        errors.append(f"group names repeat: {names}")
    return errors


def pod_monitor_errors(doc: dict[str, Any]) -> list[str]:
    errors = check_header(doc, "monitoring.coreos.com/v1", "PodMonitor")
    errors += metadata_errors(doc.get("metadata", {}), namespaced=True)
    return errors + schema_errors(doc.get("spec"), POD_MONITOR_SPEC)


def serving_runtime_errors(doc: dict[str, Any]) -> list[str]:
    errors = check_header(doc, "serving.kserve.io/v1alpha1", "ClusterServingRuntime")
    errors += metadata_errors(doc.get("metadata", {}), namespaced=False)
    spec = doc.get("spec", {})
    errors += schema_errors(spec, SERVING_RUNTIME_SPEC)
    pod_fields = {k: v for k, v in spec.items() if k in RUNTIME_POD_FIELDS}
    return errors + pod_errors(pod_fields, "spec (ServingRuntimePodSpec)")


def inference_service_errors(doc: dict[str, Any]) -> list[str]:
    errors = check_header(doc, "serving.kserve.io/v1beta1", "InferenceService")
    metadata = doc.get("metadata", {})
    errors += metadata_errors(metadata, namespaced=True)
    errors += schema_errors(metadata.get("name", ""), {"type": "string", "pattern": ISVC_NAME})
    annotations = metadata.get("annotations", {})
    mode = annotations.get("serving.kserve.io/deploymentMode")
    if mode is not None and mode not in DEPLOYMENT_MODES:
        errors.append(f"unknown deploymentMode {mode!r}")
    scaler = annotations.get("serving.kserve.io/autoscalerClass")
    if scaler is not None and scaler not in AUTOSCALER_CLASSES:
        errors.append(f"unknown autoscalerClass {scaler!r}")
    spec = doc.get("spec", {})
    if set(spec) - {"predictor", "transformer", "explainer"} or "predictor" not in spec:
        return [*errors, f"spec needs a predictor (and only components): {sorted(spec)}"]
    return errors + predictor_errors(spec["predictor"])


def predictor_errors(predictor: dict[str, Any]) -> list[str]:
    implementations = [k for k in IMPLEMENTATIONS if k in predictor]
    if len(implementations) != 1:
        return [f"exactly one predictor implementation, got {implementations}"]
    (implementation,) = implementations
    extension = {k: v for k, v in predictor.items() if k in COMPONENT_EXTENSION}
    errors = schema_errors(
        extension, {"type": "object", "properties": COMPONENT_EXTENSION}
    )  # fmt: skip
    pod_fields = {
        k: v for k, v in predictor.items()
        if k not in COMPONENT_EXTENSION and k not in (implementation, "storageUris", "workerSpec")
    }  # fmt: skip
    errors += pod_errors(pod_fields, "spec.predictor (PodSpec)")
    if implementation == "model":
        errors += model_spec_errors(predictor["model"])
    return errors


def model_spec_errors(model: dict[str, Any]) -> list[str]:
    """ModelSpec: its own fields, the rest a Container (without a name: KServe refuses one)."""
    own = {k: v for k, v in model.items() if k in MODEL_SPEC_OWN}
    errors = schema_errors(
        own, {"type": "object", "required": ["modelFormat"], "properties": MODEL_SPEC_OWN}
    )
    container = {k: v for k, v in model.items() if k not in MODEL_SPEC_OWN}
    if "name" in container:
        errors.append("spec.predictor.model: the 'name' field is not allowed")
    container = {"name": "kserve-container", "image": "placeholder", **container}
    return errors + pod_errors({"containers": [container]}, "spec.predictor.model (Container)")


CHECKS = {
    "PrometheusRule": prometheus_rule_errors,
    "PodMonitor": pod_monitor_errors,
    "ClusterServingRuntime": serving_runtime_errors,
    "InferenceService": inference_service_errors,
}


def custom_resource_errors(doc: dict[str, Any]) -> list[str]:
    """The violations of one custom resource of a kind above (core kinds: kubernetes-validate)."""
    check = CHECKS.get(doc.get("kind", ""))
    return check(doc) if check is not None else core_errors(doc)
