"""lstm-serve as a real process: SERVING after load, SIGTERM drain with a chunk in flight."""

from __future__ import annotations

import asyncio
import shutil
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from tests.e2e.conftest import ServerProcess

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DELAY_MS = 1500  # every model run (warm-up included) takes this long (tests/e2e/slow_serve.py)


def inflight_runs(metrics_port: int) -> float:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("lstm_serve_inflight_runs "):
                return float(line.split()[1])
    return 0.0


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.02)


async def drain_scenario(server: ServerProcess) -> dict[str, object]:
    seen: dict[str, object] = {}
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def status() -> int:
            return (await health.Check(health_pb2.HealthCheckRequest())).status

        seen["while_loading"] = await status()
        await until(lambda: _is(status, SERVING))
        stub = pb_grpc.LstmServeStub(channel)
        call = stub.Stream()
        await call.write(pb.StreamRequest(open=pb.OpenSession(model="tiny-gru")))
        await call.read()
        chunk = pb.Chunk(seq=1, input=pb.SequenceInput(text="hello "))  # all fed (ends in space)
        await call.write(pb.StreamRequest(chunk=chunk))
        await until(lambda: _true(inflight_runs(server.metrics_port) >= 1))
        server.terminate()
        await until(lambda: _is(status, NOT_SERVING))
        seen["after_sigterm"] = NOT_SERVING
        late = stub.Stream()
        try:  # refused as soon as the stream starts: the write itself may already fail
            await late.write(pb.StreamRequest(open=pb.OpenSession(model="tiny-gru")))
            await late.read()
        except grpc.aio.AioRpcError as exc:
            seen["new_session"] = exc.code()
        seen["inflight_reply"] = (await call.read()).chunk
        try:  # then the draining server ends the stream (no snapshot: no --snapshot-key)
            seen["after_reply"] = await call.read()
        except grpc.aio.AioRpcError as exc:
            seen["after_reply"] = exc.code()
    return seen


async def _is(status: Callable[[], Awaitable[int]], wanted: int) -> bool:
    return await status() == wanted


async def _true(value: bool) -> bool:
    return value


def test_serving_after_load_then_sigterm_drains_in_flight_chunk(
    tiny_repo: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "models"
    shutil.copytree(tiny_repo / "tiny-gru", repo / "tiny-gru")
    server = ServerProcess(repo, "--drain-grace-s", "20", run_delay_ms=DELAY_MS)
    try:
        seen = asyncio.run(drain_scenario(server))
        rc = server.proc.wait(20)
    finally:
        server.stop()
    assert seen["while_loading"] == NOT_SERVING
    assert seen["after_sigterm"] == NOT_SERVING
    assert seen["new_session"] == grpc.StatusCode.UNAVAILABLE
    reply = seen["inflight_reply"]
    assert isinstance(reply, pb.ChunkResult)
    assert reply.steps == 6 and len(reply.probabilities) == 3 and not reply.HasField("error")
    assert seen["after_reply"] == grpc.StatusCode.UNAVAILABLE
    assert rc == 0
    server.wait_event("stopped", timeout=1)


def test_bad_repository_exits_non_zero(tmp_path: Path) -> None:
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"not onnx")
    server = ServerProcess(tmp_path)
    assert server.proc.wait(30) == 1
    server.wait_event("model loading failed", timeout=1)


def test_unreachable_session_store_exits_non_zero_and_says_so(tiny_repo: Path) -> None:
    key = "k1:" + "YWFh" * 8
    server = ServerProcess(
        tiny_repo, "--session-store", "redis://127.0.0.1:1/0", "--snapshot-key", key
    )
    assert server.proc.wait(30) == 1
    event = server.wait_event("session store unreachable", timeout=1)
    assert "redis://127.0.0.1:1/0" in event["error"]
    assert key not in "".join(server.lines), "the key is never logged"
