"""deploy/k8s exposes lstm-serve safely: TLS and tokens from mounted Secrets, placeholders that
never start a server, no reflection, probes on the plaintext health port only."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from service.config import config_from_args
from service.errors import ConfigError
from service.security.auth import parse_tokens
from service.security.tls import certificate_files

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


def test_tls_and_tokens_are_whole_secret_mounts_so_rotation_reaches_the_pod() -> None:
    spec = pod()
    (main,) = spec["containers"]
    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for setting in ("LSTM_SERVE_TLS_CERT", "LSTM_SERVE_TLS_KEY", "LSTM_SERVE_AUTH_TOKENS"):
        path = PurePosixPath(settings()[setting])
        mount = mounts[str(path.parent)]
        assert "subPath" not in mount, f"{setting}: a subPath mount is never updated"
        assert mount["readOnly"] is True
        secret_name = volumes[mount["name"]]["secret"]["secretName"]
        secrets = {load(f)["metadata"]["name"]: load(f) for f in ("secret-tls.yaml",
                                                                   "secret-auth.yaml")}  # fmt: skip
        assert path.name in secrets[secret_name]["stringData"], setting
    assert not {e["name"] for e in main.get("env", [])} & {"LSTM_SERVE_AUTH_TOKENS"}


def test_the_placeholders_never_start_a_server(tmp_path: Path) -> None:
    tls = load("secret-tls.yaml")["stringData"]
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_text(tls["tls.crt"])
    key.write_text(tls["tls.key"])
    assert "BEGIN" not in tls["tls.key"]
    with pytest.raises(ConfigError, match="--tls-cert"):
        certificate_files(str(cert), str(key))
    tokens = load("secret-auth.yaml")["stringData"]["tokens"]
    with pytest.raises(ConfigError, match="line"):
        parse_tokens(tokens, "tokens")


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
