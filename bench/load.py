"""The load generator: S concurrent sessions streaming k-step chunks ping-pong over asyncio gRPC.

Modes: `stream` (one Stream call per session), `multi` (StreamMulti: G streams, each message one
chunk for each of its S/G sessions), `columns` (StreamColumns: the same as packed arrays) and
`echo` (the bare echo server with the same message sizes).
Every loop is bounded by the measurement window's end and by `MAX_MESSAGES` per loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from bench.echo import METHOD as ECHO_METHOD
from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc

MAX_MESSAGES = 1_000_000  # per loop, whatever the window
SESSIONS_PER_CHANNEL = 128


@dataclass
class Window:
    """Warm-up, then the measured window; messages completed inside it are counted."""

    start: float = 0.0
    end: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, messages sent in the window
    completed: int = 0  # messages answered in the window

    def record(self, sent: float, done: float) -> None:
        if self.start <= sent and done <= self.end:
            self.latencies.append(done - sent)
        if self.start <= done <= self.end:
            self.completed += 1


@dataclass(frozen=True)
class Load:
    """One point of the sweep."""

    mode: str  # "stream", "multi", "columns" or "echo"
    sessions: int
    steps: int  # k: steps per chunk
    streams: int  # gRPC streams (= sessions, except for multi)
    echo_sizes: tuple[int, int] = (0, 0)  # (request, reply) bytes, echo only

    @property
    def per_message(self) -> int:
        """Chunks per message."""
        return self.sessions // self.streams


def chunk_request(seq: int, ids: list[int]) -> pb.Chunk:
    return pb.Chunk(seq=seq, input=pb.SequenceInput(tokens=pb.TokenIds(ids=ids)))


def columns_chunks(handles: list[int], seq: int, ids: np.ndarray, n: int) -> pb.ColumnsRequest:
    """One StreamColumns message: the same k token ids for each of n sessions, all at `seq`."""
    k = len(ids)
    return pb.ColumnsRequest(
        handles=np.asarray(handles, dtype="<u4").tobytes(),
        seqs=np.full(n, seq, dtype="<u8").tobytes(),
        offsets=(np.arange(n + 1, dtype="<u4") * k).tobytes(),
        tokens=np.tile(np.asarray(ids, dtype="<i8"), n).tobytes(),
    )


def message_sizes(
    sessions_per_message: int, steps: int, labels: int = 4, mode: str = "multi"
) -> tuple[int, int]:
    """Serialized (request, reply) bytes of one lstm-serve message of this load."""
    ids = [999] * steps
    result = pb.ChunkResult(
        seq=100_000, steps=steps, probabilities=[0.25] * labels, total_steps=1_000_000,
        top=[pb.LabelScore(label="class0", index=0, probability=0.25)],
    )  # fmt: skip
    sid = "f" * 32
    if sessions_per_message == 1:
        request = pb.StreamRequest(chunk=chunk_request(100_000, ids))
        reply = pb.StreamResponse(session_id=sid, chunk=result)
        return request.ByteSize(), reply.ByteSize()
    if mode == "columns":
        n = sessions_per_message
        request = columns_chunks(list(range(1, n + 1)), 100_000, np.array(ids), n)
        reply = pb.ColumnsResponse(
            model="bench-lstm", version=1, num_classes=labels, status=bytes(4 * n),
            probabilities=bytes(4 * n * labels), total_steps=bytes(8 * n), duplicate=bytes(n),
        )  # fmt: skip
        return request.ByteSize(), reply.ByteSize()
    entry = pb.SessionRequest(session_id=sid, chunk=chunk_request(100_000, ids))
    multi = pb.StreamMultiRequest(entries=[entry] * sessions_per_message)
    one = pb.SessionResult(session_id=sid, chunk=result)
    replies = pb.StreamMultiResponse(results=[one] * sessions_per_message)
    return multi.ByteSize(), replies.ByteSize()


async def _stream_loop(stub: Any, model: str, ids: list[int], window: Window, ready: Any) -> None:
    call = stub.Stream()
    await call.write(pb.StreamRequest(open=pb.OpenSession(model=model)))
    await call.read()
    await ready()
    request = pb.StreamRequest(chunk=chunk_request(0, ids))
    for seq in range(1, MAX_MESSAGES + 1):
        if time.perf_counter() >= window.end:
            break
        request.chunk.seq = seq
        sent = time.perf_counter()
        await call.write(request)
        reply = await call.read()
        window.record(sent, time.perf_counter())
        if reply is grpc.aio.EOF or reply.chunk.HasField("error"):
            raise RuntimeError(f"stream failed: {reply}")
    await call.write(pb.StreamRequest(end=pb.End()))
    await call.read()
    await call.done_writing()


async def _multi_loop(
    stub: Any, model: str, ids: list[int], n: int, window: Window, ready: Any
) -> None:
    call = stub.StreamMulti()
    opens = [pb.SessionRequest(open=pb.OpenSession(model=model)) for _ in range(n)]
    await call.write(pb.StreamMultiRequest(entries=opens))
    session_ids = [r.session_id for r in (await call.read()).results]
    await ready()
    request = pb.StreamMultiRequest(
        entries=[pb.SessionRequest(session_id=s, chunk=chunk_request(0, ids)) for s in session_ids]
    )
    for seq in range(1, MAX_MESSAGES + 1):
        if time.perf_counter() >= window.end:
            break
        for entry in request.entries:
            entry.chunk.seq = seq
        sent = time.perf_counter()
        await call.write(request)
        reply = await call.read()
        window.record(sent, time.perf_counter())
        if reply is grpc.aio.EOF or any(r.WhichOneof("kind") != "chunk" for r in reply.results):
            raise RuntimeError("multi stream failed")
    ends = [pb.SessionRequest(session_id=s, end=pb.End()) for s in session_ids]
    await call.write(pb.StreamMultiRequest(entries=ends))
    await call.read()
    await call.done_writing()


async def _columns_loop(
    stub: Any, model: str, ids: list[int], n: int, window: Window, ready: Any
) -> None:
    call = stub.StreamColumns()
    await call.write(pb.ColumnsRequest(open=[pb.OpenSession(model=model)] * n))
    handles = np.frombuffer((await call.read()).attached, dtype="<u4").tolist()
    await ready()
    tokens = np.asarray(ids, dtype=np.int64)
    for seq in range(1, MAX_MESSAGES + 1):
        if time.perf_counter() >= window.end:
            break
        request = columns_chunks(handles, seq, tokens, n)  # packing is part of the client's cost
        sent = time.perf_counter()
        await call.write(request)
        reply = await call.read()
        window.record(sent, time.perf_counter())
        if reply is grpc.aio.EOF or reply.errors or len(reply.status) != 4 * n:
            raise RuntimeError(f"columns stream failed: {reply}")
        np.frombuffer(reply.probabilities, dtype="<f4").reshape(n, -1)  # what a gateway reads
    await call.write(pb.ColumnsRequest(end=np.asarray(handles, dtype="<u4").tobytes()))
    await call.read()
    await call.done_writing()


async def _echo_loop(channel: Any, sizes: tuple[int, int], window: Window, ready: Any) -> None:
    method = channel.stream_stream(ECHO_METHOD)
    call = method(metadata=(("reply-size", str(sizes[1])),))
    payload = b"\x01" * sizes[0]
    await ready()
    for _ in range(MAX_MESSAGES):
        if time.perf_counter() >= window.end:
            break
        sent = time.perf_counter()
        await call.write(payload)
        await call.read()
        window.record(sent, time.perf_counter())
    await call.done_writing()


async def drive(
    load: Load,
    address: str,
    model: str,
    vocab: int,
    warmup_s: float,
    seconds: float,
    on_window: Callable[[str], Awaitable[None]],
) -> Window:
    """Open every stream, warm up, measure `seconds`; `on_window("start"/"end")` samples."""
    window = Window(start=float("inf"), end=float("inf"))
    channels = [
        grpc.aio.insecure_channel(address)
        for _ in range(max(1, min(8, load.streams // SESSIONS_PER_CHANNEL)))
    ]
    ids = np.random.default_rng(load.sessions).integers(1, vocab, size=load.steps).tolist()

    ready, opened = window_barrier(window, load.streams, warmup_s, seconds)

    loops = []
    for i in range(load.streams):
        channel = channels[i % len(channels)]
        if load.mode == "echo":
            loops.append(_echo_loop(channel, load.echo_sizes, window, ready))
        elif load.mode == "columns":
            stub = pb_grpc.LstmServeStub(channel)
            loops.append(_columns_loop(stub, model, ids, load.per_message, window, ready))
        elif load.mode == "multi":
            stub = pb_grpc.LstmServeStub(channel)
            loops.append(_multi_loop(stub, model, ids, load.per_message, window, ready))
        else:
            loops.append(_stream_loop(pb_grpc.LstmServeStub(channel), model, ids, window, ready))
    return await run_window(loops, window, opened, on_window, channels)


async def run_window(
    loops: Iterable[Awaitable[None]], window: Window, opened: asyncio.Event,
    on_window: Callable[[str], Awaitable[None]], closing: Iterable[Any] = (),
) -> Window:  # fmt: skip
    """Run every loop with `on_window` called at the window's edges; close each of `closing`
    (channels, clients) after, whatever happened."""
    sampler = asyncio.ensure_future(sample(window, opened, on_window))
    try:
        await asyncio.gather(*loops)
        await sampler
    finally:
        sampler.cancel()
        for item in closing:
            await item.close()
    return window


def window_barrier(
    window: Window, count: int, warmup_s: float, seconds: float
) -> tuple[Callable[[], Awaitable[None]], asyncio.Event]:
    """`ready()` for each of `count` loops to await once attached: the last to arrive sets the
    window (warm-up, then `seconds`) and lets them all go; `opened` is set then."""
    opened = asyncio.Event()
    arrived = 0

    async def ready() -> None:
        nonlocal arrived
        arrived += 1
        if arrived == count:
            now = time.perf_counter()
            window.start, window.end = now + warmup_s, now + warmup_s + seconds
            opened.set()
        await opened.wait()

    return ready, opened


async def sample(
    window: Window, opened: asyncio.Event, on_window: Callable[[str], Awaitable[None]]
) -> None:
    """Call `on_window("start")` and `on_window("end")` at the window's edges."""
    await opened.wait()
    await asyncio.sleep(max(0.0, window.start - time.perf_counter()))
    await on_window("start")
    await asyncio.sleep(max(0.0, window.end - time.perf_counter()))
    await on_window("end")
