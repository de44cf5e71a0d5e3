"""deploy/k8s exposes lstm-serve safely: TLS and tokens from mounted Secrets that no overlay
renders (deploy/k8s/create-secrets.sh makes them: tests/e2e/test_deploy_k8s_secrets.py), no
reflection, probes on the plaintext health port only."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from service.config import config_from_args

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "k8s" / "base"


def load(name: str) -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all((BASE / name).read_text()) if d]
    return doc


def pod() -> dict[str, Any]:
    return load("deployment.yaml")["spec"]["template"]["spec"]


def settings() -> dict[str, str]:
    return load("configmap.yaml")["data"]


def test_the_manifests_turn_on_tls_tokens_and_turn_off_reflection() -> None:
    config = config_from_args([], environ=settings())
    assert config.tls_cert and config.tls_key and config.auth_tokens
    assert config.reflection is False
    assert config.health_port not in (-1, config.grpc_port, config.http_port)


# The file each setting names, in which Secret (deploy/k8s/create-secrets.sh creates them).
SECRET_FILES = {
    "LSTM_SERVE_TLS_CERT": ("lstm-serve-tls", "tls.crt"),
    "LSTM_SERVE_TLS_KEY": ("lstm-serve-tls", "tls.key"),
    "LSTM_SERVE_AUTH_TOKENS": ("lstm-serve-auth", "tokens"),
}


def test_tls_and_tokens_are_whole_secret_mounts_so_rotation_reaches_the_pod() -> None:
    spec = pod()
    (main,) = spec["containers"]
    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for setting, (secret, key) in SECRET_FILES.items():
        path = PurePosixPath(settings()[setting])
        mount = mounts[str(path.parent)]
        assert "subPath" not in mount, f"{setting}: a subPath mount is never updated"
        assert mount["readOnly"] is True
        assert volumes[mount["name"]]["secret"]["secretName"] == secret, setting
        assert path.name == key, setting
    assert not {e["name"] for e in main.get("env", [])} & {"LSTM_SERVE_AUTH_TOKENS"}


def test_no_secret_is_committed_or_rendered() -> None:
    """A rendered placeholder would overwrite the real Secret on every apply."""
    for path in (ROOT / "deploy" / "k8s").rglob("*.yaml"):
        kinds = {d.get("kind") for d in yaml.safe_load_all(path.read_text()) if d}
        assert "Secret" not in kinds, f"{path.relative_to(ROOT)}: a Secret in the manifests"
    listed = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert "secretGenerator" not in listed


def test_probes_use_the_health_port_which_no_service_exposes() -> None:
    (main,) = pod()["containers"]
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    health = int(settings()["LSTM_SERVE_HEALTH_PORT"])
    assert ports["health"] == health
    for probe in ("startupProbe", "livenessProbe"):
        assert main[probe]["grpc"]["port"] == health
    assert main["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    for name in ("service.yaml", "service-headless.yaml"):
        targets = {p["targetPort"] for p in load(name)["spec"]["ports"]}
        assert "health" not in targets and health not in targets, name
