"""Bearer tokens and client-certificate principals on every front, over real servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as httpclient
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstmserve.client import LstmClient, MultiStream
from lstmserve.v1 import lstm_serve_pb2 as pb
from service.lenient import REFLECTION
from service.logs import CallerFilter
from service.server import SERVICE_NAME
from service.triton.grpc_front import SERVICE as TRITON_SERVICE
from tests.integration.conftest import ServerThread, make_config, metric, scrape, wait_for
from tests.integration.tls_certs import Authority

ALICE = "alice-3f9c1e7d2b8a4c6e"
BOB = "bob-0a1b2c3d4e5f6789"
WRONG = "wrong-5e4d3c2b1a0f9e8d"
NATIVE = pb.DESCRIPTOR.services_by_name["LstmServe"]
GUARDED: tuple[ServiceDescriptor, ...] = (NATIVE, TRITON_SERVICE, REFLECTION)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(f"# principal:token\nalice:{ALICE}\n\nbob:{BOB}\n")
    return path


@pytest.fixture(scope="module")
def auth_server(tiny_repo: Path, token_file: Path) -> Iterator[ServerThread]:
    srv = ServerThread(make_config(tiny_repo, auth_tokens=str(token_file))).start()
    yield srv
    srv.stop()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def _call(channel: grpc.aio.Channel, service: ServiceDescriptor, method: Any,
                metadata: Any) -> grpc.StatusCode:  # fmt: skip
    """Call `method` with an empty request (raw bytes): its status code."""
    path = f"/{service.full_name}/{method.name}"
    try:
        if method.client_streaming:  # written as LstmClient does (call.write, then read)
            make = channel.stream_stream if method.server_streaming else channel.stream_unary
            call = make(path)(metadata=metadata, timeout=5)
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
                await call.write(b"")
            if await call.code() != grpc.StatusCode.OK:
                raise grpc.aio.AioRpcError(
                    await call.code(),
                    await call.initial_metadata(),
                    await call.trailing_metadata(),
                    await call.details(),
                )
        elif method.server_streaming:
            async for _ in channel.unary_stream(path)(b"", metadata=metadata, timeout=5):
                break
        else:
            await channel.unary_unary(path)(b"", metadata=metadata, timeout=5)
    except grpc.aio.AioRpcError as exc:
        assert len(exc.details() or "") < 200
        for secret in (ALICE, BOB, WRONG):
            assert secret not in (exc.details() or "")
        return exc.code()
    return grpc.StatusCode.OK


def _codes(address: str, metadata: Any, only: tuple[str, ...] = ()) -> dict[str, grpc.StatusCode]:
    """{Service.Method: status} of an empty request to every guarded method (or those `only`)."""

    async def go() -> dict[str, grpc.StatusCode]:
        async with grpc.aio.insecure_channel(address) as channel:
            return {f"{s.name}.{m.name}": await _call(channel, s, m, metadata)
                    for s in GUARDED for m in s.methods
                    if not only or f"{s.name}.{m.name}" in only}  # fmt: skip

    return asyncio.run(go())


@pytest.mark.parametrize(
    "metadata",
    [None, bearer(WRONG), (("authorization", "Basic " + ALICE),), (("authorization", "Bearer"),),
     (("authorization", f"Bearer {ALICE} {BOB}"),), (("authorization", ALICE),)],
    ids=["none", "wrong", "basic", "empty", "two-words", "no-scheme"],
)  # fmt: skip
def test_every_rpc_without_a_valid_token_is_unauthenticated(
    auth_server: ServerThread, metadata: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        codes = _codes(auth_server.address, metadata)
    assert len(codes) == len(NATIVE.methods) + len(TRITON_SERVICE.methods) + 1
    assert set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}, codes
    assert "unauthenticated" in caplog.text
    for secret in (ALICE, BOB, WRONG):
        assert secret not in caplog.text


def test_health_needs_no_token(auth_server: ServerThread) -> None:
    async def go() -> None:
        async with grpc.aio.insecure_channel(auth_server.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", SERVICE_NAME, TRITON_SERVICE.full_name):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            async for reply in stub.Watch(health_pb2.HealthCheckRequest(service="")):
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                break

    asyncio.run(go())


def test_a_valid_token_works_on_unary_calls_streams_and_multi_streams(
    auth_server: ServerThread,
) -> None:
    async def go() -> None:
        async with LstmClient(auth_server.address, timeout_s=5, token=ALICE) as client:
            assert [m.name for m in await client.list_models()]
            session = await client.open_session("tiny-lstm")
            assert (await session.step([1, 2])).total_steps == 2
            await session.end()
            multi = client.multi_stream()
            opened = await multi.exchange([MultiStream.open("tiny-lstm")])
            assert opened[0].WhichOneof("kind") == "opened", opened
            await multi.close()

    asyncio.run(go())
    codes = _codes(auth_server.address, bearer(BOB),
                   ("LstmServe.ListModels", "GRPCInferenceService.ServerReady"))  # fmt: skip
    assert codes["LstmServe.ListModels"] == grpc.StatusCode.OK
    assert codes["GRPCInferenceService.ServerReady"] == grpc.StatusCode.OK


def test_the_triton_grpc_client_works_with_the_token_header(auth_server: ServerThread) -> None:
    client = tc.InferenceServerClient(auth_server.address)
    headers = {"authorization": f"Bearer {ALICE}"}
    assert client.is_server_ready(headers=headers)
    inp = tc.InferInput("tokens", [1, 3], "INT64")
    inp.set_data_from_numpy(np.array([[1, 2, 3]], dtype=np.int64))
    result = client.infer("tiny-lstm", [inp], headers=headers)
    assert result.as_numpy("probs") is not None
    with pytest.raises(Exception, match=r"UNAUTHENTICATED|credentials"):
        client.is_server_ready()
    client.close()


def _http(url: str, token: str | None = None, body: bytes | None = None,
          header: str | None = None) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if token is not None or header is not None:
        request.add_header("Authorization", header or f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_http_without_a_valid_token_is_401_except_health(auth_server: ServerThread) -> None:
    assert auth_server.app is not None
    base = f"http://127.0.0.1:{auth_server.app.http_port}"
    assert _http(base + "/v2/health/live")[0] == 200
    assert _http(base + "/v2/health/ready")[0] == 200
    infer = json.dumps({"inputs": [{"name": "tokens", "shape": [1, 2], "datatype": "INT64",
                                    "data": [1, 2]}]}).encode()  # fmt: skip
    routes = [("/v2", None), ("/v2/models/tiny-lstm", None), ("/v2/models/tiny-lstm/config", None),
              ("/v2/models/tiny-lstm/infer", infer), ("/v2/repository/index", b"{}"),
              ("/v2/no/such/route", None)]  # fmt: skip
    for path, body in routes:
        for token, header in ((None, None), (WRONG, None), (None, "Basic " + ALICE),
                              (None, f"Bearer {ALICE} x")):  # fmt: skip
            status, headers, data = _http(base + path, token, body, header)
            assert status == 401, (path, token, header)
            assert headers.get("WWW-Authenticate", "").startswith("Bearer")
            message = json.loads(data)["error"]
            assert all(secret not in message for secret in (ALICE, WRONG))
        assert _http(base + path, ALICE, body)[0] != 401, path
    status, _headers, data = _http(base + "/v2/models/tiny-lstm/infer", BOB, infer)
    assert status == 200 and json.loads(data)["outputs"]


def test_odd_spellings_of_the_health_routes_are_401_without_a_token(
    auth_server: ServerThread,
) -> None:
    assert auth_server.app is not None
    base = f"http://127.0.0.1:{auth_server.app.http_port}"
    for path in ("/v2/health%2Flive", "/v2/health%2fready", "/v2/%68ealth/live",
                 "/v2/health/live/", "//v2/health/live", "/v2/health/live%00"):  # fmt: skip
        status, headers, data = _http(base + path)
        assert status == 401, path
        assert headers.get("WWW-Authenticate", "").startswith("Bearer")
        assert "error" in json.loads(data)
    assert _http(base + "/v2/health/live?probe=1")[0] == 200


def test_the_tritonclient_http_works_with_the_token_header(auth_server: ServerThread) -> None:
    assert auth_server.app is not None
    client = httpclient.InferenceServerClient(f"127.0.0.1:{auth_server.app.http_port}")
    headers = {"Authorization": f"Bearer {BOB}"}
    assert client.is_server_ready(headers=headers)
    assert client.get_model_metadata("tiny-lstm", headers=headers)["name"] == "tiny-lstm"
    client.close()


def test_the_handler_runs_as_the_tokens_principal(
    auth_server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler's own log line (a malformed request) carries the principal of the token."""
    caplog.handler.addFilter(CallerFilter())

    async def malformed(token: str) -> None:
        async with grpc.aio.insecure_channel(auth_server.address) as channel:
            call = channel.unary_unary(f"/{NATIVE.full_name}/ListModels")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(b"\xff\xff\xff", metadata=bearer(token), timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    with caplog.at_level(logging.WARNING):
        asyncio.run(malformed(ALICE))
        asyncio.run(malformed(BOB))
    principals = [r.fields.get("principal") for r in caplog.records
                  if r.getMessage() == "malformed request"]  # fmt: skip
    assert principals == ["alice", "bob"]
    assert ALICE not in caplog.text and BOB not in caplog.text


def test_the_principal_is_a_metric_label_never_the_token(auth_server: ServerThread) -> None:
    assert auth_server.app is not None

    async def one() -> None:
        async with LstmClient(auth_server.address, timeout_s=5, token=BOB) as client:
            await client.list_models()

    before = metric(scrape(auth_server.metrics_url), "lstm_serve_caller_requests_total",
                    principal="bob", protocol="native")  # fmt: skip
    asyncio.run(one())
    _codes(auth_server.address, bearer(WRONG))
    with urllib.request.urlopen(auth_server.metrics_url, timeout=5) as response:
        page = response.read().decode()
    samples = scrape(auth_server.metrics_url)
    after = metric(samples, "lstm_serve_caller_requests_total", principal="bob", protocol="native")
    assert after == before + 1
    assert metric(samples, "lstm_serve_auth_failures_total", reason="unknown") > 0
    for secret in (ALICE, BOB, WRONG):
        assert secret not in page


@contextlib.asynccontextmanager
async def alice_and_bob(address: str) -> AsyncIterator[tuple[LstmClient, LstmClient]]:
    """A client with alice's token and one with bob's."""
    async with (
        LstmClient(address, timeout_s=5, failover_s=0, token=ALICE) as alice,
        LstmClient(address, timeout_s=5, failover_s=0, token=BOB) as bob,
    ):
        yield alice, bob


def test_sessions_belong_to_their_principal(auth_server: ServerThread) -> None:
    """A session alice opened reads as missing to bob (the session layer records the owner)."""
    pytest.importorskip("service.engine.session.quotas", reason="sessions owned by their principal")

    async def go() -> None:
        async with alice_and_bob(auth_server.address) as (alice, bob):
            session = await alice.open_session("tiny-lstm")
            await session.step([1, 2])
            await session.close()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await bob.resume_session(session.session_id)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            again = await alice.resume_session(session.session_id)
            assert (await again.step([3])).total_steps == 3
            await again.end()

    asyncio.run(go())


def test_an_ended_session_answers_a_resent_end_only_to_its_principal(
    auth_server: ServerThread,
) -> None:
    """A resent `end` is answered from the ended session (duplicate) for alice; for bob the
    session does not exist, ended or not."""

    async def go() -> tuple[pb.SessionResult, pb.SessionResult]:
        async with alice_and_bob(auth_server.address) as (alice, bob):
            session = await alice.open_session("tiny-lstm")
            await session.step([1, 2])
            await session.end()
            replies = []
            for client in (alice, bob):
                multi = client.multi_stream()
                replies.append((await multi.exchange([MultiStream.end(session.session_id)]))[0])
                await multi.close()
            return replies[0], replies[1]

    mine, theirs = asyncio.run(go())
    assert mine.WhichOneof("kind") == "ended" and mine.ended.duplicate
    assert mine.ended.total_steps == 2
    assert theirs.WhichOneof("kind") == "error" and theirs.error.code == "NOT_FOUND"


def test_token_file_reload_adds_and_removes_a_token_without_restart(
    tiny_repo: Path, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    srv = ServerThread(make_config(tiny_repo, auth_tokens=str(tokens))).start()
    carol = "carol-9f8e7d6c5b4a3210"

    def code(token: str) -> grpc.StatusCode:
        return _codes(srv.address, bearer(token), ("LstmServe.ListModels",))["LstmServe.ListModels"]

    try:
        assert code(BOB) == grpc.StatusCode.OK
        assert code(carol) == grpc.StatusCode.UNAUTHENTICATED
        staged = tmp_path / "tokens.new"
        staged.write_text(f"alice:{ALICE}\ncarol:{carol}\n")
        staged.replace(tokens)
        wait_for(lambda: code(carol) == grpc.StatusCode.OK, what="carol's new token")
        assert code(BOB) == grpc.StatusCode.UNAUTHENTICATED
        assert code(ALICE) == grpc.StatusCode.OK
        tokens.write_text("alice only, no colon\n")  # a bad edit keeps the previous tokens
        assert code(carol) == grpc.StatusCode.OK
        assert code(ALICE) == grpc.StatusCode.OK
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def cert_server(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    folder = tmp_path_factory.mktemp("pki")
    ca = Authority()
    cert, key = ca.issue("lstm-serve", server=True).write(folder, "server")
    config = make_config(tiny_repo, tls_cert=str(cert), tls_key=str(key),
                         tls_client_ca=str(ca.write(folder)), principal_from_cert=True)  # fmt: skip
    srv = ServerThread(config).start()
    yield srv, ca, folder
    srv.stop()


def test_principal_from_the_client_certificate_cn(cert_server: Any) -> None:
    import ssl

    srv, ca, folder = cert_server
    client_cert, client_key = ca.issue("svc-gateway", server=False).write(folder, "gateway")
    ca_file = folder / "ca.crt"

    async def go() -> None:
        async with LstmClient(srv.address, timeout_s=5, tls_ca=ca_file, tls_cert=client_cert,
                              tls_key=client_key) as client:  # fmt: skip
            assert [m.name for m in await client.list_models()]

    before = metric(scrape(srv.metrics_url), "lstm_serve_caller_requests_total",
                    principal="svc-gateway")  # fmt: skip
    asyncio.run(go())
    context = ssl.create_default_context(cafile=ca_file)
    context.load_cert_chain(client_cert, client_key)
    url = f"https://127.0.0.1:{srv.app.http_port}/v2"
    with urllib.request.urlopen(url, timeout=5, context=context) as response:
        assert response.status == 200
    after = metric(scrape(srv.metrics_url), "lstm_serve_caller_requests_total",
                   principal="svc-gateway")  # fmt: skip
    assert after == before + 2


# -- the HTTP middleware on its own: the handler sees the principal ---------------------------


def test_the_http_middleware_runs_the_handler_as_the_tokens_principal(token_file: Path) -> None:
    from aiohttp import ClientSession, web

    from service import principal
    from service.security.auth import Authenticator, TokenFile
    from service.security.http import auth_middleware

    async def whoami(request: web.Request) -> web.Response:
        await asyncio.sleep(0)  # still the request's task after a suspension
        return web.Response(text=principal.current())

    async def go() -> None:
        app = web.Application(middlewares=[auth_middleware(Authenticator(TokenFile(token_file)))])
        app.router.add_get("/whoami", whoami)
        app.router.add_get("/v2/health/live", whoami)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with ClientSession() as http:
                for token, expected in ((ALICE, "alice"), (BOB, "bob")):
                    headers = {"Authorization": f"Bearer {token}"}
                    async with http.get(base + "/whoami", headers=headers) as response:
                        assert (response.status, await response.text()) == (200, expected)
                async with http.get(base + "/whoami") as response:
                    assert response.status == 401
                    assert response.headers["WWW-Authenticate"].startswith("Bearer")
                    assert "error" in await response.json()
                async with http.get(base + "/v2/health/live") as response:
                    assert (response.status, await response.text()) == (200, "anonymous")
        finally:
            await runner.cleanup()

    asyncio.run(go())
    assert principal.current() == principal.ANONYMOUS


# -- the surface: reflection, the metrics address, secrets ------------------------------------


def test_no_reflection_removes_reflection(tiny_repo: Path) -> None:
    srv = ServerThread(make_config(tiny_repo, reflection=False)).start()
    path = f"/{REFLECTION.full_name}/ServerReflectionInfo"

    async def code() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            call = channel.stream_stream(path)(timeout=5)  # no write: grpc/grpc#36066
            return await call.code()

    try:
        assert asyncio.run(code()) == grpc.StatusCode.UNIMPLEMENTED
    finally:
        srv.stop()


def test_metrics_host_binds_the_metrics_endpoint_there(tiny_repo: Path) -> None:
    from service.config import config_from_args

    assert config_from_args(["--metrics-host", "127.0.0.1"], environ={}).metrics_host == "127.0.0.1"
    srv = ServerThread(make_config(tiny_repo, metrics_host="127.0.0.2")).start()
    try:
        assert srv.app is not None
        port = srv.app.metrics_port
        with urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5) as response:
            assert response.status == 200
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    finally:
        srv.stop()


def test_no_secret_in_help_the_config_repr_or_the_logs(
    tiny_repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from service.config import build_parser, config_from_args
    from service.errors import ConfigError
    from service.security.auth import parse_tokens

    ca = Authority()
    issued = ca.issue("lstm-serve", server=True)
    cert, key = issued.write(tmp_path, "server")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{ALICE}\n")
    snapshot_key = "k1:" + "c2VjcmV0LXNuYXBzaG90LWtleS0wMTIzNDU2Nzg5YWI="
    env = {"LSTM_SERVE_SNAPSHOT_KEY": snapshot_key, "LSTM_SERVE_AUTH_TOKENS": str(tokens)}
    argv = ["--model-repository", str(tiny_repo), "--tls-cert", str(cert), "--tls-key", str(key)]
    config = config_from_args(argv, environ=env)
    key_body = issued.key.decode().splitlines()[1]
    secrets = (ALICE, snapshot_key.partition(":")[2], key_body)
    with pytest.raises(SystemExit):
        build_parser(env).parse_args(["--help"])
    shown = capsys.readouterr().out + repr(config)
    assert "--auth-tokens" in shown and str(tokens) in repr(config)
    with pytest.raises(ConfigError) as err:
        parse_tokens(f"alice:{ALICE} trailing\n", "tokens")
    shown += str(err.value)
    with caplog.at_level(logging.DEBUG):
        srv = ServerThread(make_config(tiny_repo, tls_cert=str(cert), tls_key=str(key),
                                       auth_tokens=str(tokens))).start()  # fmt: skip
        srv.stop()
    shown += caplog.text
    for secret in secrets:
        assert secret not in shown


def test_the_token_rides_on_failover_reconnects(
    tiny_repo: Path, token_file: Path, redis_url: str
) -> None:
    """A session whose server dies continues on the next one as the same principal: the
    reconnect (a resume through the shared store) carries the token too."""
    import base64

    key = "k1:" + base64.b64encode(b"auth-failover-key-0123456789abcd").decode()
    config = make_config(tiny_repo, auth_tokens=str(token_file), snapshot_key=key,
                         session_store=redis_url)  # fmt: skip
    first, second = ServerThread(config).start(), ServerThread(config).start()

    async def go() -> int:
        async with LstmClient([first.address, second.address], timeout_s=5,
                              token=ALICE) as client:  # fmt: skip
            session = await client.open_session("tiny-lstm")
            await session.step([1, 2])
            assert first.app is not None
            stop = asyncio.run_coroutine_threadsafe(first.app.grpc.stop(0), first.loop)
            await asyncio.wrap_future(stop)
            result = await session.step([3])
            assert session.address == second.address and session.failovers == 1
            await session.end()
            return result.total_steps

    try:
        assert asyncio.run(go()) == 3
    finally:
        first.stop()
        second.stop()
