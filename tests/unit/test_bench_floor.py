"""The benchmark's protocol floor (`python -m bench.echo --protocol`): a real subprocess driven by
the load generator's own `_stream_loop`, its replies read field by field, and the report's
floor columns and target line on a small synthetic results dict."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from bench import report
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


def _row(server: str, mode: str, s: int, k: int, msgs: float) -> dict[str, Any]:
    per = 256 if mode == "multi" else 1
    return {"server": server, "mode": mode, "sessions": s, "steps": k, "model": BENCH_MODEL,
            "messages_per_s": msgs, "steps_per_s": msgs * per * k, "p50_ms": 1.0,
            "p99_ms": 2.0, "mean_batch": None, "server_cpu_pct": 90.0}  # fmt: skip


def _results() -> dict[str, Any]:
    points = [_row("batched", "stream", 256, 1, 6000), _row("naive", "stream", 256, 1, 2000),
              _row("echo", "stream", 256, 1, 12000), _row("floor", "stream", 256, 1, 8000),
              _row("batched", "multi", 1024, 1, 80), _row("echo", "multi", 1024, 1, 10000),
              _row("floor", "stream", 64, 1, 9000)]  # fmt: skip
    return {"points": points, "ceilings": [], "memory": None}


def test_report_table_has_floor_columns_and_dashes_where_no_floor_ran() -> None:
    lines = report.table(_results(), BENCH_MODEL).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[head.index("% echo") + 1 : head.index("% echo") + 3] == ["floor msg/s", "% floor"]
    assert len(lines[1].split("|")) == len(lines[0].split("|"))  # the separator has every column
    cells = {line.split("|")[1].strip(): line.split("|")[1:-1] for line in lines[2:]}
    stream, multi = (
        [c.strip() for c in cells[m]][head.index("floor msg/s") :][:2] for m in ("stream", "multi")
    )
    assert stream == ["8,000", "75 %"]  # batched 6,000 / floor 8,000
    assert multi == ["-", "-"]
    assert len(lines) == 4  # a floor row alone (S=64) makes no line: _keys skips non-batched


def test_target_line_gives_the_floors_own_share_of_echo() -> None:
    text = report.targets(_results())
    assert "MISSED: S=256 k=1 6,000 msg/s = 50 % of echo 12,000 (>= 80 %)" in text
    assert "(the protocol floor reaches 67 % of echo: 8,000 msg/s)" in text
