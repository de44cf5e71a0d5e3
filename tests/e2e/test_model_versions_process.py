"""Model control with the real server process: poll mode loads, reports, drains and retires
versions without a restart; SIGHUP re-scans in any mode."""

from __future__ import annotations

import asyncio
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstmserve.client import LstmClient
from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from tests.e2e.conftest import ServerProcess
from tests.integration.conftest import Reference

WORD = np.array([8, 5, 12, 12, 15, 23, 15, 18], dtype=np.int64)


@pytest.fixture
def repo(tiny_repo: Path, tmp_path: Path) -> Path:
    """tiny-gru version 1 only."""
    shutil.copytree(tiny_repo / "tiny-gru" / "1", tmp_path / "models" / "tiny-gru" / "1")
    return tmp_path / "models"


@pytest.fixture
def polling(repo: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(repo, "--model-control", "poll", "--repository-poll-s", "0.2")
    server.wait_event("ready")
    yield server
    server.stop()


def wait_loaded(server: ServerProcess, version: int) -> None:
    while server.wait_event("model loaded")["version"] != version:
        pass


async def models(address: str) -> dict[int, pb.ModelInfo]:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await pb_grpc.LstmServeStub(channel).ListModels(pb.ListModelsRequest())
        return {m.version: m for m in reply.models if m.name == "tiny-gru"}


async def serving(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        return (await health.Check(health_pb2.HealthCheckRequest())).status


def test_poll_loads_a_new_version_while_a_live_session_goes_on_exactly(
    polling: ServerProcess, repo: Path, tiny_repo: Path
) -> None:
    # Version 2 is another network (an LSTM) under the same name: the folder names the model.
    shutil.copytree(tiny_repo / "tiny-lstm" / "1", repo / "tiny-gru" / "2")

    async def scenario() -> tuple[list[np.ndarray], int, int]:
        async with LstmClient(polling.address) as client:
            old = await client.open_session("tiny-gru")
            probs = [np.array((await old.step([int(t)])).probabilities) for t in WORD[:4]]
            await asyncio.to_thread(wait_loaded, polling, 2)
            new = await client.open_session("tiny-gru")
            probs += [np.array((await old.step([int(t)])).probabilities) for t in WORD[4:]]
            await old.end()
            await new.end()
            return probs, old.opened.version, new.opened.version

    probs, old_version, new_version = asyncio.run(scenario())
    assert (old_version, new_version) == (1, 2)
    _, offline = Reference(repo).run("tiny-gru", WORD, version=1)
    np.testing.assert_allclose(np.stack(probs), offline, atol=1e-5)  # exactly v1 throughout


def test_a_truncated_newer_version_leaves_the_old_one_serving(
    polling: ServerProcess, repo: Path
) -> None:
    target = repo / "tiny-gru" / "2"
    target.mkdir()
    data = (repo / "tiny-gru" / "1" / "model.onnx").read_bytes()
    (target / "model.onnx").write_bytes(data[: len(data) // 3])
    failed = polling.wait_event("model version failed to load")
    assert failed["version"] == 2 and str(target / "model.onnx") in failed["error"]
    held = asyncio.run(models(polling.address))
    assert held[1].state == pb.MODEL_STATE_READY and held[1].latest
    assert held[2].state == pb.MODEL_STATE_UNAVAILABLE and "model.onnx" in held[2].reason
    assert asyncio.run(serving(polling.address)) == health_pb2.HealthCheckResponse.SERVING
    assert polling.proc.poll() is None


def test_a_removed_version_retires_after_its_sessions_end(
    polling: ServerProcess, repo: Path
) -> None:
    shutil.copytree(repo / "tiny-gru" / "1", repo / "tiny-gru" / "2")
    wait_loaded(polling, 2)

    async def scenario() -> None:
        async with LstmClient(polling.address) as client:
            session = await client.open_session("tiny-gru", version=2)
            await session.step([1, 2])
            shutil.rmtree(repo / "tiny-gru" / "2")
            await asyncio.to_thread(polling.wait_event, "model version draining")
            held = await models(polling.address)
            assert held[2].state == pb.MODEL_STATE_DRAINING and held[2].sessions == 1
            assert held[1].latest
            assert (await session.step([3])).total_steps == 3  # goes on while draining
            await session.end()
        retired = await asyncio.to_thread(polling.wait_event, "model version retired")
        assert retired["version"] == 2
        assert 2 not in await models(polling.address)

    asyncio.run(scenario())


def test_sighup_rescans_the_repository(repo: Path) -> None:
    server = ServerProcess(repo)  # --model-control none: no polling
    try:
        server.wait_event("ready")
        shutil.copytree(repo / "tiny-gru" / "1", repo / "tiny-gru" / "2")
        server.proc.send_signal(signal.SIGHUP)
        wait_loaded(server, 2)
        assert asyncio.run(models(server.address))[2].latest
        assert server.proc.poll() is None
    finally:
        server.stop()


def test_explicit_mode_starts_not_serving_until_a_model_is_loaded(repo: Path) -> None:
    server = ServerProcess(repo, "--model-control", "explicit")
    try:
        server.wait_event("ready")
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING

        async def scenario() -> None:
            assert await serving(server.address) == not_serving
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.LstmServeStub(channel)
                index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
                assert [(m.name, m.state) for m in index.models] == [
                    ("tiny-gru", pb.MODEL_STATE_UNAVAILABLE)
                ]
                loaded = await stub.LoadModel(pb.LoadModelRequest(name="tiny-gru"))
                assert [m.version for m in loaded.models] == [1]
                assert await serving(server.address) == health_pb2.HealthCheckResponse.SERVING
                with pytest.raises(grpc.aio.AioRpcError) as missing:
                    await stub.LoadModel(pb.LoadModelRequest(name="nope"))
                assert missing.value.code() == grpc.StatusCode.NOT_FOUND
                unloaded = await stub.UnloadModel(pb.UnloadModelRequest(name="tiny-gru"))
                assert list(unloaded.draining) == ["tiny-gru@1"]

        asyncio.run(scenario())
    finally:
        server.stop()


def test_load_model_is_refused_without_explicit_mode(polling: ServerProcess) -> None:
    async def scenario() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(polling.address) as channel:
            stub = pb_grpc.LstmServeStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.LoadModel(pb.LoadModelRequest(name="tiny-gru"))
            return refused.value

    error = asyncio.run(scenario())
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--model-control explicit" in (error.details() or "")
