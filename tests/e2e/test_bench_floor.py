"""The benchmark's protocol floor (`python -m bench.echo --protocol`): a real subprocess driven by
the load generator's own `_stream_loop`, its replies read field by field (the report's floor
columns: tests/unit/test_bench_report.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from bench.echo import FLOOR_PROBABILITIES, FLOOR_SESSION_ID
from bench.load import Load, chunk_request, drive, message_sizes
from bench.model import BENCH_MODEL
from bench.procs import Process, start_echo
from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def floor() -> Iterator[Process]:
    proc = start_echo(protocol=True)
    yield proc
    proc.stop()


def test_load_generator_stream_loop_runs_unchanged_against_the_floor(floor: Process) -> None:
    edges: list[str] = []

    async def on_window(edge: str) -> None:
        edges.append(edge)

    load = Load("stream", 2, 1, 2)
    driven = drive(load, floor.address, "any-model", 1000, 0.05, 0.3, on_window)
    window = asyncio.run(asyncio.wait_for(driven, 10))
    assert edges == ["start", "end"]
    assert window.completed > 0  # _stream_loop raises on an error or a missing reply
    assert len(window.latencies) > 0
    floor.check_alive()


def test_bare_echo_mode_still_answers_the_echo_loop() -> None:
    echo = start_echo()
    try:
        load = Load("echo", 2, 1, 2, message_sizes(1, 1))
        driven = drive(load, echo.address, BENCH_MODEL, 1000, 0.05, 0.2, _no_sampling)
        assert asyncio.run(asyncio.wait_for(driven, 10)).completed > 0
    finally:
        echo.stop()


async def _no_sampling(edge: str) -> None:
    pass


async def _one_stream(address: str) -> list[Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.LstmServeStub(channel).Stream()
        replies = []
        for request in (
            pb.StreamRequest(open=pb.OpenSession(model="m")),
            pb.StreamRequest(chunk=chunk_request(1, [5, 6, 7])),
            pb.StreamRequest(chunk=chunk_request(2, [8])),
            pb.StreamRequest(reset=pb.Reset(seq=3)),
            pb.StreamRequest(end=pb.End()),
        ):
            await call.write(request)
            replies.append(await call.read())
        replies.append(await call.read())  # the stream closes after `ended`
        return replies


def test_floor_answers_open_chunks_reset_and_end_with_fresh_replies(floor: Process) -> None:
    opened, first, second, reset, ended, eof = asyncio.run(_one_stream(floor.address))
    assert opened.opened.session_id == FLOOR_SESSION_ID == opened.session_id
    assert opened.opened.model == "m" and len(opened.opened.labels) == 4
    assert (first.chunk.seq, first.chunk.steps, first.chunk.total_steps) == (1, 3, 3)
    assert (second.chunk.seq, second.chunk.steps, second.chunk.total_steps) == (2, 1, 4)
    assert list(second.chunk.probabilities) == pytest.approx(FLOOR_PROBABILITIES)
    assert [t.index for t in second.chunk.top] == [3]
    assert not second.chunk.HasField("error") and second.session_id == FLOOR_SESSION_ID
    assert reset.reset.seq == 3
    assert ended.WhichOneof("kind") == "ended" and ended.ended.total_steps == 4
    assert eof is grpc.aio.EOF
    # the same message sizes as lstm-serve's replies to this load (what echo is sized by)
    assert second.ByteSize() <= message_sizes(1, 1)[1]


async def _snapshot_call(address: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.LstmServeStub(channel).Stream()
        await call.write(pb.StreamRequest(snapshot=pb.TakeSnapshot()))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
        assert "snapshot" in (refused.value.details() or "")
        return refused.value.code()


def test_floor_refuses_what_it_does_not_serve_with_unimplemented(floor: Process) -> None:
    assert asyncio.run(_snapshot_call(floor.address)) == grpc.StatusCode.UNIMPLEMENTED
