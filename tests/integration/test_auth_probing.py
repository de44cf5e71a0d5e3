"""What an unauthenticated caller can learn, over real servers: a client certificate whose CN
breaks the principal rules (300 characters, a newline, a bidi control) is refused on both fronts
with the reason and never becomes a principal, a metric label or a raw log line; unknown gRPC
methods and HTTP routes (an encoded slash too) answer UNAUTHENTICATED / 401 like every other
call, while health stays open."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import ssl
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.conftest import ServerThread, make_config, metric, scrape
from tests.integration.tls_certs import Authority

TOKEN = "carol-7d1e2f3a4b5c6d7e"
LIST_MODELS = "/lstmserve.v1.LstmServe/ListModels"
BAD_CNS = {  # CN -> what the refusal says about it (never the CN itself)
    "a" * 300: "300 characters (at most 64)",
    "svc\nadmin": "U+000A at position 4",
    "svc-\u202enimda": "U+202E at position 5",
    "-svc": "it starts with U+002D",
    "svc gateway": "U+0020 at position 4",
}


def issue_unchecked(ca: Authority, common_name: str, folder: Path, name: str) -> tuple[Path, Path]:
    """A client certificate whose CN is written as given (no length or charset check here)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    with warnings.catch_warnings():  # the library warns about a CN over 64 characters
        warnings.simplefilter("ignore", UserWarning)
        attribute = x509.NameAttribute(NameOID.COMMON_NAME, common_name, _validate=False)
    subject = x509.Name([attribute])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Authority, Path]:
    return Authority(), tmp_path_factory.mktemp("pki")


@pytest.fixture(scope="module")
def cert_server(tiny_repo: Path, pki: tuple[Authority, Path]) -> Iterator[ServerThread]:
    """mTLS, --principal-from-cert and a token file."""
    ca, folder = pki
    cert, key = ca.issue("lstm-serve", server=True).write(folder, "server")
    tokens = folder / "tokens"
    tokens.write_text(f"carol:{TOKEN}\n")
    config = make_config(tiny_repo, tls_cert=str(cert), tls_key=str(key),
                         tls_client_ca=str(ca.write(folder)), principal_from_cert=True,
                         auth_tokens=str(tokens))  # fmt: skip
    srv = ServerThread(config).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def token_server(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"carol:{TOKEN}\n")
    srv = ServerThread(make_config(tiny_repo, auth_tokens=str(tokens))).start()
    yield srv
    srv.stop()


def _grpc_status(channel: grpc.aio.Channel, path: str, kind: str, metadata: Any = None) -> Any:
    """(code, details) of a call of `kind` (unary, server-stream, stream) with raw bytes."""

    async def go() -> tuple[grpc.StatusCode, str]:
        try:
            if kind == "unary":
                await channel.unary_unary(path)(b"", metadata=metadata, timeout=5)
            elif kind == "server-stream":
                async for _ in channel.unary_stream(path)(b"", metadata=metadata, timeout=5):
                    pass
            else:
                call = channel.stream_stream(path)(metadata=metadata, timeout=5)
                await call.write(b"")
                await call.done_writing()
                async for _ in call:
                    pass
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""

    return go()


def _mtls_call(srv: ServerThread, ca: Authority, cert: Path, key: Path, **kw: Any) -> Any:
    async def go() -> tuple[grpc.StatusCode, str]:
        credentials = grpc.ssl_channel_credentials(ca.pem, key.read_bytes(), cert.read_bytes())
        async with grpc.aio.secure_channel(srv.address, credentials) as channel:
            return await _grpc_status(channel, LIST_MODELS, "unary", **kw)

    return asyncio.run(go())


def _https(srv: ServerThread, folder: Path, cert: Path, key: Path, path: str = "/v2") -> Any:
    context = ssl.create_default_context(cafile=folder / "ca.crt")
    context.load_cert_chain(cert, key)
    assert srv.app is not None
    url = f"https://127.0.0.1:{srv.app.http_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _caller_labels(srv: ServerThread) -> set[str]:
    samples = scrape(srv.metrics_url)
    return {key for key in samples if key.startswith("lstm_serve_caller_requests_total")}


@pytest.mark.parametrize("cn", list(BAD_CNS), ids=["300-chars", "newline", "bidi", "dash", "space"])
def test_a_certificate_cn_that_is_no_valid_principal_is_refused_on_both_fronts(
    cert_server: ServerThread, pki: tuple[Authority, Path], cn: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    ca, folder = pki
    cert, key = issue_unchecked(ca, cn, folder, f"bad{list(BAD_CNS).index(cn)}")
    failures = "lstm_serve_auth_failures_total"
    before = metric(scrape(cert_server.metrics_url), failures, reason="bad_certificate_name")
    with caplog.at_level(logging.WARNING, logger="service.security"):
        code, details = _mtls_call(cert_server, ca, cert, key)
        status, body = _https(cert_server, folder, cert, key)
    assert code == grpc.StatusCode.UNAUTHENTICATED and BAD_CNS[cn] in details, details
    assert status == 401 and BAD_CNS[cn] in json.loads(body)["error"]
    assert cn not in details and cn not in body.decode()
    warnings = [r for r in caplog.records if r.getMessage() == "unauthenticated"]
    assert len(warnings) == 2
    for record in warnings:
        fields = record.fields  # type: ignore[attr-defined]
        assert fields["reason"] == "bad_certificate_name" and BAD_CNS[cn] in fields["detail"]
    assert cn not in caplog.text and "\u202e" not in caplog.text
    after = metric(scrape(cert_server.metrics_url), failures, reason="bad_certificate_name")
    assert after == before + 2
    assert not any(cn in label or "\\n" in label for label in _caller_labels(cert_server))


def test_a_bad_cn_with_a_valid_token_is_the_tokens_principal(
    cert_server: ServerThread, pki: tuple[Authority, Path]
) -> None:
    ca, folder = pki
    cert, key = issue_unchecked(ca, "svc\nadmin", folder, "bad-with-token")
    bearer = (("authorization", f"Bearer {TOKEN}"),)
    code, details = _mtls_call(cert_server, ca, cert, key, metadata=bearer)
    assert code == grpc.StatusCode.OK, details


def test_a_valid_cn_is_the_principal(
    cert_server: ServerThread, pki: tuple[Authority, Path]
) -> None:
    ca, folder = pki
    cert, key = issue_unchecked(ca, "svc-gateway.eu@corp", folder, "good")
    assert _mtls_call(cert_server, ca, cert, key)[0] == grpc.StatusCode.OK
    assert _https(cert_server, folder, cert, key)[0] == 200
    assert any('principal="svc-gateway.eu@corp"' in k for k in _caller_labels(cert_server))


@pytest.mark.parametrize("kind", ["unary", "server-stream", "stream"])
@pytest.mark.parametrize("path", ["/lstmserve.v1.LstmServe/NoSuchMethod", "/no.such.Service/Call",
                                  "/inference.GRPCInferenceService/NoSuch"])  # fmt: skip
def test_unknown_grpc_methods_are_unauthenticated_before_a_token_and_unimplemented_after(
    token_server: ServerThread, path: str, kind: str
) -> None:
    async def go() -> tuple[Any, Any]:
        async with grpc.aio.insecure_channel(token_server.address) as channel:
            anonymous = await _grpc_status(channel, path, kind)
            known = await _grpc_status(channel, path, kind, (("authorization", f"Bearer {TOKEN}"),))
            return anonymous, known

    anonymous, known = asyncio.run(go())
    assert anonymous[0] == grpc.StatusCode.UNAUTHENTICATED, anonymous
    assert known[0] == grpc.StatusCode.UNIMPLEMENTED, known


def test_health_stays_open_and_a_known_method_is_refused_as_before(
    token_server: ServerThread,
) -> None:
    async def go() -> tuple[Any, Any, int]:
        async with grpc.aio.insecure_channel(token_server.address) as channel:
            unknown_health = await _grpc_status(channel, "/grpc.health.v1.Health/NoSuch", "unary")
            known = await _grpc_status(channel, LIST_MODELS, "unary")
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest())
            return unknown_health, known, reply.status

    unknown_health, known, status = asyncio.run(go())
    assert unknown_health[0] == grpc.StatusCode.UNIMPLEMENTED  # health is open: nothing to hide
    assert known[0] == grpc.StatusCode.UNAUTHENTICATED
    assert status == health_pb2.HealthCheckResponse.SERVING


def _http(srv: ServerThread, path: str, method: str = "GET", token: str | None = None) -> int:
    assert srv.app is not None
    request = urllib.request.Request(f"http://127.0.0.1:{srv.app.http_port}{path}", method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.mark.parametrize(
    ("path", "method", "with_token"),
    [("/v2/health%2Flive", "GET", 404), ("/v2/health%2fready", "GET", 404),
     ("/v2%2Fhealth/live", "GET", 404), ("/v2/health/live", "POST", 405),
     ("/v2/health/live/", "GET", 404), ("/v2/no/such/route", "GET", 404)],
)  # fmt: skip
def test_unknown_http_routes_and_methods_are_401_before_a_token(
    token_server: ServerThread, path: str, method: str, with_token: int
) -> None:
    assert _http(token_server, path, method) == 401
    assert _http(token_server, path, method, TOKEN) == with_token


def test_http_health_stays_open(token_server: ServerThread) -> None:
    assert _http(token_server, "/v2/health/live") == 200
    assert _http(token_server, "/v2/health/ready") == 200
