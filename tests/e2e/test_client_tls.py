"""lstm-client (a real process) with TLS and a bearer token against a TLS + auth lstm-serve."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import ROOT, ServerProcess
from tests.integration.tls_certs import Authority

TOKEN = "gw-7d1e5c9a3b2f4e68a0c1"


@pytest.fixture(scope="module")
def secure_server(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    folder = tmp_path_factory.mktemp("secure")
    ca = Authority()
    cert, key = ca.issue("lstm-serve", server=True).write(folder, "server")
    tokens = folder / "tokens"
    tokens.write_text(f"# callers\ngateway:{TOKEN}\n")
    server = ServerProcess(tiny_repo, "--tls-cert", str(cert), "--tls-key", str(key),
                           "--auth-tokens", str(tokens), "--no-reflection")  # fmt: skip
    server.wait_event("ready")
    yield server, ca.write(folder)
    server.stop()
    assert TOKEN not in "".join(server.lines)  # the server never logged the token


def lstm_client(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LSTM_SERVE_TOKEN"}
    if token is not None:
        env["LSTM_SERVE_TOKEN"] = token
    out = subprocess.run(
        [sys.executable, "-m", "lstmserve.client_cli", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert TOKEN not in out.stdout + out.stderr
    return out


def test_list_and_stream_with_tls_ca_and_the_token_from_the_environment(secure_server: Any) -> None:
    server, ca = secure_server
    out = lstm_client("--address", server.address, "--tls-ca", str(ca), "list", token=TOKEN)
    assert out.returncode == 0, out.stderr
    assert "tiny-lstm v2 (latest)" in out.stdout
    out = lstm_client("--address", server.address, "--tls-ca", str(ca), "--token", TOKEN,
                      "stream", "tiny-lstm", "--text", "secure")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "ended after 6 steps"


def test_without_the_token_or_without_tls_the_client_fails_clearly(secure_server: Any) -> None:
    server, ca = secure_server
    out = lstm_client("--address", server.address, "--tls-ca", str(ca), "list")
    assert out.returncode == 1
    assert "UNAUTHENTICATED" in out.stderr
    out = lstm_client("--address", server.address, "--tls-ca", str(ca), "--token", "nope", "list")
    assert out.returncode == 1 and "UNAUTHENTICATED" in out.stderr and "nope" not in out.stderr
    out = lstm_client("--timeout", "3", "--address", server.address, "list", token=TOKEN)
    assert out.returncode == 1 and "UNAVAILABLE" in out.stderr


def test_help_never_shows_the_token(secure_server: Any) -> None:
    out = lstm_client("--help", token=TOKEN)
    assert out.returncode == 0 and "--token" in out.stdout and "LSTM_SERVE_TOKEN" in out.stdout


SERVICE = "lstm-serve.serving.svc.cluster.local"


@pytest.fixture(scope="module")
def service_named_server(
    tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, Path]]:
    """A TLS server whose certificate names its Kubernetes Service only (not 127.0.0.1): what
    `kubectl port-forward` to localhost reaches."""
    folder = tmp_path_factory.mktemp("service-named")
    ca = Authority()
    cert, key = ca.issue("lstm-serve", server=True, dns_names=[SERVICE]).write(folder, "server")
    server = ServerProcess(tiny_repo, "--tls-cert", str(cert), "--tls-key", str(key))
    server.wait_event("ready")
    yield server, ca.write(folder)
    server.stop()


def test_server_name_checks_the_certificate_against_the_service_name(
    service_named_server: tuple[ServerProcess, Path],
) -> None:
    server, ca = service_named_server
    tls = ("--address", server.address, "--tls-ca", str(ca))
    refused = lstm_client("--timeout", "5", *tls, "list")
    assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr  # 127.0.0.1 is not named
    out = lstm_client(*tls, "--server-name", SERVICE, "list")
    assert out.returncode == 0, out.stderr
    assert "tiny-lstm v2 (latest)" in out.stdout
    out = lstm_client(*tls, "--server-name", SERVICE, "stream", "tiny-lstm", "--tokens", "1 2 3")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "ended after 3 steps"
    wrong = lstm_client("--timeout", "5", *tls, "--server-name", "other.example", "list")
    assert wrong.returncode == 1 and "UNAVAILABLE" in wrong.stderr


def test_server_name_without_tls_is_refused_in_one_line(
    service_named_server: tuple[ServerProcess, Path],
) -> None:
    out = lstm_client("--address", service_named_server[0].address, "--server-name", SERVICE,
                      "list")  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "lstm-client: --server-name names the server's TLS certificate: give --tls or --tls-ca too"
    )
