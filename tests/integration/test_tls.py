"""TLS and mTLS on both ports with real certificates, and rotation without a restart."""

from __future__ import annotations

import asyncio
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstmserve.client import LstmClient
from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from service.config import ServerConfig
from service.errors import ConfigError
from service.security.tls import certificate_files
from service.server import SERVICE_NAME
from tests.integration.conftest import ServerThread, make_config, wait_for
from tests.integration.tls_certs import Authority, serial_of


@pytest.fixture(scope="module")
def ca() -> Authority:
    return Authority()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory, ca: Authority) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    server_cert, server_key = ca.issue("lstm-serve", server=True).write(folder, "server")
    client_cert, client_key = ca.issue("alice", server=False).write(folder, "alice")
    other = Authority("some other CA")
    rogue_cert, rogue_key = other.issue("mallory", server=False).write(folder, "mallory")
    return {"ca": ca.write(folder), "cert": server_cert, "key": server_key,
            "client_cert": client_cert, "client_key": client_key,
            "rogue_cert": rogue_cert, "rogue_key": rogue_key}  # fmt: skip


def _start(config: ServerConfig) -> ServerThread:
    return ServerThread(config).start()


@pytest.fixture(scope="module")
def tls_server(tiny_repo: Path, pki: dict[str, Path]) -> Iterator[ServerThread]:
    srv = _start(make_config(tiny_repo, tls_cert=str(pki["cert"]), tls_key=str(pki["key"])))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def mtls_server(tiny_repo: Path, pki: dict[str, Path]) -> Iterator[ServerThread]:
    config = make_config(tiny_repo, tls_cert=str(pki["cert"]), tls_key=str(pki["key"]),
                         tls_client_ca=str(pki["ca"]), health_port=0)  # fmt: skip
    srv = _start(config)
    yield srv
    srv.stop()


def _list(address: str, **tls: object) -> list[str]:
    async def go() -> list[str]:
        async with LstmClient(address, timeout_s=5, failover_s=0, **tls) as client:  # type: ignore[arg-type]
            return [m.name for m in await client.list_models()]

    return asyncio.run(go())


def _https(url: str, context: ssl.SSLContext | None) -> int:
    with urllib.request.urlopen(url, timeout=5, context=context) as response:
        return int(response.status)


def _client_context(pki: dict[str, Path], cert: str = "") -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki["ca"])
    if cert:
        context.load_cert_chain(pki[f"{cert}_cert"], pki[f"{cert}_key"])
    return context


def test_grpc_tls_client_works_and_plaintext_fails(
    tls_server: ServerThread, pki: dict[str, Path]
) -> None:
    assert _list(tls_server.address, tls_ca=pki["ca"])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _list(tls_server.address)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_grpc_tls_client_not_trusting_the_ca_fails(tls_server: ServerThread) -> None:
    other = Authority("not the server's CA")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _list(tls_server.address, tls_ca=other.pem)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_http_tls_client_works_and_plaintext_fails(
    tls_server: ServerThread, pki: dict[str, Path]
) -> None:
    assert tls_server.app is not None
    port = tls_server.app.http_port
    assert _https(f"https://127.0.0.1:{port}/v2/health/ready", _client_context(pki)) == 200
    assert _https(f"https://localhost:{port}/v2", _client_context(pki)) == 200
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        _https(f"http://127.0.0.1:{port}/v2/health/ready", None)


def test_grpc_mtls_needs_a_certificate_signed_by_the_client_ca(
    mtls_server: ServerThread, pki: dict[str, Path]
) -> None:
    address = mtls_server.address
    assert _list(address, tls_ca=pki["ca"], tls_cert=pki["client_cert"],
                 tls_key=pki["client_key"])  # fmt: skip
    rogue = {"tls_ca": pki["ca"], "tls_cert": pki["rogue_cert"], "tls_key": pki["rogue_key"]}
    for tls in ({"tls_ca": pki["ca"]}, rogue):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            _list(address, **tls)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_http_mtls_needs_a_certificate_signed_by_the_client_ca(
    mtls_server: ServerThread, pki: dict[str, Path]
) -> None:
    assert mtls_server.app is not None
    url = f"https://127.0.0.1:{mtls_server.app.http_port}/v2"
    assert _https(url, _client_context(pki, "client")) == 200
    for context in (_client_context(pki), _client_context(pki, "rogue")):
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError, OSError)):
            _https(url, context)


def _presented_serial(port: int, ca: Path, alpn: str) -> int:
    """The serial of the certificate a new TLS connection to 127.0.0.1:port is shown."""
    context = ssl.create_default_context(cafile=ca)
    context.set_alpn_protocols([alpn])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return serial_of(ssl.DER_cert_to_PEM_cert(der).encode())


def test_rotated_certificate_reaches_new_connections_and_open_streams_go_on(
    tiny_repo: Path, tmp_path: Path, ca: Authority
) -> None:
    first = ca.issue("lstm-serve", server=True)
    cert, key = first.write(tmp_path, "server")
    ca_file = ca.write(tmp_path)
    srv = _start(make_config(tiny_repo, tls_cert=str(cert), tls_key=str(key)))
    assert srv.app is not None
    http_port = srv.app.http_port
    assert http_port

    async def scenario() -> None:
        async with LstmClient(srv.address, timeout_s=5, failover_s=0, tls_ca=ca_file) as client:
            session = await client.open_session("tiny-lstm")
            await session.step([1, 2])
            assert _presented_serial(srv.port, ca_file, "h2") == first.serial
            assert _presented_serial(http_port, ca_file, "http/1.1") == first.serial
            second = ca.issue("lstm-serve", server=True)
            second.write(tmp_path, "rotating")
            # cert-manager / kubelet swap the files: write both, then rename into place.
            (tmp_path / "rotating.key").replace(key)
            (tmp_path / "rotating.crt").replace(cert)
            wait_for(lambda: _presented_serial(srv.port, ca_file, "h2") == second.serial,
                     timeout=10, what="the gRPC port to present the new certificate")  # fmt: skip
            assert _presented_serial(http_port, ca_file, "http/1.1") == second.serial
            result = await session.step([3, 1])  # the stream opened before the rotation
            assert result.total_steps == 4
            await session.end()
            assert [m.name for m in await client.list_models()]

    try:
        asyncio.run(scenario())
    finally:
        srv.stop()


def test_a_mismatched_pair_is_refused_at_start_naming_the_flags(
    tmp_path: Path, ca: Authority
) -> None:
    cert, _key = ca.issue("a", server=True).write(tmp_path, "a")
    _cert, other_key = ca.issue("b", server=True).write(tmp_path, "b")
    with pytest.raises(ConfigError, match=r"--tls-cert .* --tls-key"):
        certificate_files(str(cert), str(other_key))
    with pytest.raises(ConfigError, match="--tls-cert and --tls-key go together"):
        certificate_files(str(cert), "")


def test_the_health_port_answers_probes_in_plaintext_and_serves_nothing_else(
    mtls_server: ServerThread,
) -> None:
    """Kubernetes' gRPC probes cannot present a client certificate: --health-port serves them."""
    assert mtls_server.app is not None and mtls_server.app.health_port

    async def go() -> None:
        address = f"127.0.0.1:{mtls_server.app.health_port}"  # type: ignore[union-attr]
        async with grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", SERVICE_NAME):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.LstmServeStub(channel).ListModels(pb.ListModelsRequest())
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED

    asyncio.run(go())
