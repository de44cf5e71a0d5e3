"""Budgets and lanes over a real server: over-budget requests are refused before any work,
streaming chunks are answered while the Classify lane is busy."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from lstmserve.client import LstmClient
from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from tests.integration.conftest import Reference, ServerThread, make_config

BUDGET = 100


@pytest.fixture(scope="module")
def budgeted(tiny_repo: Path) -> Iterator[ServerThread]:
    config = make_config(tiny_repo, max_request_row_steps=BUDGET, classify_slice_row_steps=16)
    srv = ServerThread(config).start()
    yield srv
    srv.stop()


def ids(n: int, seed: int = 0) -> pb.SequenceInput:
    values = np.random.default_rng(seed).integers(1, 28, size=n).tolist()
    return pb.SequenceInput(tokens=pb.TokenIds(ids=values))


def test_an_over_budget_classify_is_resource_exhausted_naming_the_flag(
    budgeted: ServerThread,
) -> None:
    async def main() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(budgeted.address) as channel:
            stub = pb_grpc.LstmServeStub(channel)
            request = pb.ClassifyRequest(model="tiny-gru", sequences=[ids(60), ids(41)])
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Classify(request)
            ok = await stub.Classify(pb.ClassifyRequest(model="tiny-gru", sequences=[ids(100)]))
            assert ok.results[0].length == 100
            return refused.value

    error = asyncio.run(main())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "101 steps" in (error.details() or "")
    assert "--max-request-row-steps" in (error.details() or "")


def test_an_over_budget_multi_message_is_refused_in_band_and_nothing_applied(
    budgeted: ServerThread,
) -> None:
    async def main() -> tuple[list[pb.SessionResult], list[pb.SessionResult]]:
        async with grpc.aio.insecure_channel(budgeted.address) as channel:
            call = pb_grpc.LstmServeStub(channel).StreamMulti()
            opens = [pb.SessionRequest(open=pb.OpenSession(model="tiny-gru")) for _ in range(2)]
            await call.write(pb.StreamMultiRequest(entries=opens))
            sids = [r.session_id for r in (await call.read()).results]
            big = [pb.SessionRequest(session_id=s, chunk=pb.Chunk(seq=1, input=ids(60)))
                   for s in sids]  # fmt: skip
            await call.write(pb.StreamMultiRequest(entries=big))
            refused = list((await call.read()).results)
            fits = [pb.SessionRequest(session_id=s, chunk=pb.Chunk(seq=1, input=ids(50)))
                    for s in sids]  # fmt: skip
            await call.write(pb.StreamMultiRequest(entries=fits))
            applied = list((await call.read()).results)
            await call.done_writing()
            return refused, applied

    refused, applied = asyncio.run(main())
    for result in refused:
        assert result.WhichOneof("kind") == "error"
        assert result.error.code == "RESOURCE_EXHAUSTED"
        assert "--max-request-row-steps" in result.error.message
    assert [r.chunk.total_steps for r in applied] == [50, 50]  # the refused chunks left no trace


def test_streaming_is_answered_while_the_classify_lane_is_busy(
    budgeted: ServerThread, reference: Reference
) -> None:
    assert budgeted.app is not None
    worker = budgeted.app.engine.registry.get("tiny-gru")
    release = threading.Event()
    held = threading.Event()
    inner = worker.runtime.run

    def slow_classify(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name.startswith("lstm-classify"):
            held.set()
            release.wait(20)  # the Classify lane is stuck in a slice
        return inner(*args, **kwargs)

    worker.runtime.run = slow_classify  # type: ignore[method-assign]
    tokens = np.array([3, 1, 4, 1, 5], dtype=np.int64)

    async def main() -> list[float]:
        async with LstmClient(budgeted.address) as client:
            classify = asyncio.ensure_future(client.classify("tiny-gru", ["abcdefghij" * 9]))
            await asyncio.to_thread(held.wait, 10)
            session = await client.open_session("tiny-gru", version=1)
            probs = list((await session.step(tokens)).probabilities)  # not behind the lane
            await session.end()
            assert not classify.done()
            release.set()
            await classify
            return probs

    try:
        probs = asyncio.run(main())
    finally:
        release.set()
        del worker.runtime.run
    np.testing.assert_allclose(probs, reference.run("tiny-gru", tokens)[0], atol=1e-6)
