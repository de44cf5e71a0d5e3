"""The deploy blocks of the README and docs/OPERATIONS.md, followed literally, deploy what they
build: the image they build and push is the one the cpu overlay deploys, the namespace exists
before the Secrets are created in it, the files they run exist, and the README describes the
probes and the replica count as the manifests set them."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "OPERATIONS.md"


def section(doc: Path, heading: str) -> str:
    text = doc.read_text(encoding="utf-8")
    start = text.index(f"\n{heading}\n")
    level = heading.split()[0]
    end = text.find(f"\n{level} ", start + len(heading) + 2)
    return text[start : end if end > 0 else None]


def first_block(text: str) -> list[str]:
    """The first fenced block's command lines, comments and blank lines dropped."""
    body = re.search(r"^```\w*\n(.*?)^```", text, re.S | re.M)
    assert body is not None
    lines = [line.split("  #")[0].strip() for line in body[1].splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def load(path: Path) -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    return doc


def deployed_image(overlay: str = "cpu") -> str:
    (image,) = load(K8S / "overlays" / overlay / "kustomization.yaml")["images"]
    return f"{image['newName']}:{image['newTag']}"


BLOCKS = {
    "README": lambda: first_block(section(README, "## Deployment (Docker, Kubernetes)")),
    "OPERATIONS": lambda: first_block(section(GUIDE, "### Deploy")),
}


@pytest.mark.parametrize("doc", sorted(BLOCKS))
def test_the_block_builds_and_pushes_the_image_the_overlay_deploys(doc: str) -> None:
    lines = BLOCKS[doc]()
    (assignment,) = [line for line in lines if line.startswith("IMAGE=")]
    assert assignment == f"IMAGE={deployed_image()}", "build what deploy/k8s/overlays/cpu pulls"
    assert "docker build -t $IMAGE . && docker push $IMAGE" in lines


@pytest.mark.parametrize("doc", sorted(BLOCKS))
def test_the_namespace_and_secrets_come_before_the_overlay(doc: str) -> None:
    lines = BLOCKS[doc]()
    order = [
        "kubectl apply -f deploy/k8s/base/namespace.yaml",
        "deploy/k8s/create-secrets.sh",
        "kubectl apply -k deploy/k8s/overlays/cpu",
    ]
    assert [line for line in lines if line in order] == order
    namespace = load(K8S / "base" / "namespace.yaml")
    assert namespace["kind"] == "Namespace"
    for overlay in ("cpu", "gpu", "redis-sentinel"):
        spec = load(K8S / "overlays" / overlay / "kustomization.yaml")
        assert spec["namespace"] == namespace["metadata"]["name"], overlay
    assert os.access(K8S / "create-secrets.sh", os.X_OK)
    assert not [line for line in lines if re.search(r"\bscale\b.*--replicas", line)], "HPA"


def test_the_readme_describes_the_probes_as_the_deployment_sets_them() -> None:
    text = " ".join(section(README, "## Deployment (Docker, Kubernetes)").split())
    deployment = load(K8S / "base" / "deployment.yaml")
    (main,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    grpc = re.search(r"startup and liveness probes ask gRPC health on the plaintext health "
                     r"port (\d+)", text)  # fmt: skip
    assert grpc is not None, "the README says how startup and liveness are probed"
    for probe in ("startupProbe", "livenessProbe"):
        assert main[probe]["grpc"]["port"] == int(grpc[1]) == ports["health"], probe
    ready = re.search(r"readiness probe asks `GET (\S+)` over (HTTPS|HTTP) on (\d+)", text)
    assert ready is not None, "the README says how readiness is probed"
    get = main["readinessProbe"]["httpGet"]
    assert (get["path"], get["scheme"], ports[get["port"]]) == (ready[1], ready[2], int(ready[3]))
    assert "gRPC readiness" not in text and "gRPC startup/readiness" not in text
    hpa = load(K8S / "base" / "hpa.yaml")["spec"]
    span = re.search(r"an HPA that owns the replica count \((\d+)-(\d+)\)", text)
    assert span is not None and (int(span[1]), int(span[2])) == (
        hpa["minReplicas"], hpa["maxReplicas"]
    )  # fmt: skip
    assert "replicas" not in deployment["spec"]
