"""Models, limits, idle expiry, metrics, health and reflection over a real server."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from lstmserve.client import LstmClient
from lstmserve.v1 import lstm_serve_pb2 as pb
from service.server import SERVICE_NAME
from tests.integration.conftest import ServerThread, metric, scrape, wait_for


def test_list_and_get_models_describe_every_version(server: ServerThread) -> None:
    async def main() -> tuple[list[pb.ModelInfo], pb.ModelInfo]:
        async with LstmClient(server.address) as client:
            return await client.list_models(), await client.get_model("tiny-lstm")

    models, latest = asyncio.run(main())
    keys = [(m.name, m.version) for m in models]
    assert ("tiny-lstm", 1) in keys and ("tiny-lstm", 2) in keys and len(keys) == 7
    assert latest.version == 2 and latest.latest
    by_key = {(m.name, m.version): m for m in models}
    lstm = by_key[("tiny-lstm", 1)]
    assert not lstm.latest and lstm.input_kind == "tokens" and lstm.vocab_size == 28
    assert lstm.tokenizer.vocab[1] == "a" and lstm.streamable
    assert (lstm.state_rows, lstm.hidden_size) == (4, 8) and len(lstm.state_row_names) == 4
    assert lstm.provider == "CPUExecutionProvider" and lstm.providers[-1] == "CPUExecutionProvider"
    assert list(lstm.labels) == ["class0", "class1", "class2"]
    assert json.loads(lstm.architecture_json)
    frames = by_key[("tiny-peephole-frames", 1)]
    assert frames.feature_dim == 5 and frames.input_kind == "features"
    assert not frames.HasField("tokenizer")
    assert list(frames.cpu_fallback) == []  # runs on the CPU: nothing falls back
    assert not by_key[("tiny-bilstm", 1)].streamable


def test_session_limit_is_resource_exhausted(small_server: ServerThread) -> None:
    store = small_server.app.engine.store  # type: ignore[union-attr]
    wait_for(lambda: len(store) == 0, what="earlier sessions to expire")

    async def main() -> grpc.StatusCode:
        async with LstmClient(small_server.address) as client:
            sessions = [await client.open_session("tiny-gru") for _ in range(3)]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.open_session("tiny-gru")
            await sessions[0].end()
            extra = await client.open_session("tiny-gru")  # room again
            for session in [*sessions[1:], extra]:
                await session.end()
            return info.value.code()

    name = "lstm_serve_session_events_total"
    before = metric(scrape(small_server.metrics_url), name, model="tiny-gru", event="rejected")
    assert asyncio.run(main()) == grpc.StatusCode.RESOURCE_EXHAUSTED
    after = metric(scrape(small_server.metrics_url), name, model="tiny-gru", event="rejected")
    assert after == before + 1


def test_idle_session_expires_and_its_id_says_so(small_server: ServerThread) -> None:
    async def open_one() -> str:
        async with LstmClient(small_server.address) as client:
            session = await client.open_session("tiny-gru")
            await session.step("abc")
            await session.close()
            return session.session_id

    async def resume(session_id: str) -> tuple[grpc.StatusCode, str]:
        async with LstmClient(small_server.address) as client:
            try:
                session = await client.resume_session(session_id)
            except grpc.aio.AioRpcError as exc:
                return exc.code(), exc.details() or ""
            await session.close()
            return grpc.StatusCode.OK, ""

    name = "lstm_serve_session_events_total"
    before = metric(scrape(small_server.metrics_url), name, model="tiny-gru", event="expired")
    session_id = asyncio.run(open_one())
    wait_for(
        lambda: (
            metric(scrape(small_server.metrics_url), name, model="tiny-gru", event="expired")
            > before
        ),
        what="the idle session to expire",
    )
    code, details = asyncio.run(resume(session_id))
    assert code == grpc.StatusCode.NOT_FOUND and "expired" in details


def test_metrics_move(server: ServerThread) -> None:
    url = server.metrics_url
    before = scrape(url)

    async def main() -> dict[str, float]:
        async with LstmClient(server.address) as client:
            await client.classify("tiny-gru", ["abc", "de"])
            session = await client.open_session("tiny-rnn-frames")
            await session.step([[0.5] * 5] * 4)
            during = scrape(url)
            await session.end()
            return during

    during = asyncio.run(main())
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("lstm_serve_requests_total", rpc="Classify", model="tiny-gru", code="OK") == 1
    assert delta("lstm_serve_requests_total", rpc="Stream", model="tiny-rnn-frames", code="OK") == 1
    assert delta("lstm_serve_requests_total", rpc="Stream.chunk", code="OK") >= 1
    assert delta("lstm_serve_steps_total", model="tiny-gru", rpc="Classify") == 5
    assert delta("lstm_serve_steps_total", model="tiny-rnn-frames", rpc="Stream") == 4
    for stage in ("queue", "compute", "total"):
        assert delta("lstm_serve_chunk_seconds_count", model="tiny-rnn-frames", stage=stage) == 1
    for event in ("opened", "ended"):
        assert delta("lstm_serve_session_events_total", model="tiny-rnn-frames", event=event) == 1
    gauge = "lstm_serve_active_sessions"
    assert (
        metric(during, gauge, model="tiny-rnn-frames")
        == metric(after, gauge, model="tiny-rnn-frames") + 1
    )
    assert metric(during, "lstm_serve_state_memory_bytes", model="tiny-rnn-frames", kind="used") > 0
    assert (
        metric(after, "lstm_serve_state_memory_bytes", model="tiny-rnn-frames", kind="allocated")
        > 0
    )
    info = metric(
        after, "lstm_serve_model_info", model="tiny-cifg-frames", provider="CPUExecutionProvider"
    )
    assert info == 1
    assert metric(after, "lstm_serve_model_load_seconds", model="tiny-gru") > 0
    labels = [key.partition("{")[2] for key in after]  # the label part of each series
    assert all("session" not in part for part in labels)  # never a session id label


def test_health_is_serving_once_loaded(server: ServerThread) -> None:
    async def main() -> list[int]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return [
                (await stub.Check(health_pb2.HealthCheckRequest(service=name))).status
                for name in ("", SERVICE_NAME)
            ]

    assert asyncio.run(main()) == [health_pb2.HealthCheckResponse.SERVING] * 2


def test_reflection_lists_the_service(server: ServerThread) -> None:
    channel = grpc.insecure_channel(server.address)
    try:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    finally:
        channel.close()
    assert SERVICE_NAME in services and "grpc.health.v1.Health" in services


def test_a_stream_closed_without_end_counts_as_ok_not_cancelled(server: ServerThread) -> None:
    url = server.metrics_url
    before = scrape(url)

    async def main() -> None:
        async with LstmClient(server.address) as client:
            session = await client.open_session("tiny-lstm")
            await session.step([1, 2])
            await session.close()  # lstm-client stream --keep: the session stays

    asyncio.run(main())
    wait_for(
        lambda: metric(scrape(url), "lstm_serve_requests_total", rpc="Stream", model="tiny-lstm",
                       code="OK") > metric(before, "lstm_serve_requests_total", rpc="Stream",
                                           model="tiny-lstm", code="OK"),
        what="the stream counted OK",
    )  # fmt: skip
    after = scrape(url)
    cancelled = {"rpc": "Stream", "model": "tiny-lstm", "code": "CANCELLED"}
    assert metric(after, "lstm_serve_requests_total", **cancelled) == metric(
        before, "lstm_serve_requests_total", **cancelled
    )
