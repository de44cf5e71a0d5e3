"""Server Python per multi-session entry, in-process and with no network: StreamColumns vs
StreamMulti vs the native front's ticks (one client stream's message per entry), each message
parsed from bytes, answered by the session layer and serialized.

    python -m bench.inproc                     # 256 sessions, 1 step each, 100 messages per round
    python -m bench.inproc --text              # also the ticks' text chunks: packed vs entries
    python -m bench.inproc --lone              # one Stream session of the bench model, ping-pong
    python -m bench.inproc --lone --intra-op-threads 1
    python -m bench.inproc --lone --trace      # every message traced and exported
    python -m bench.inproc --lone --trace 0    # tracing on, nothing sampled
    python -m bench.inproc --lone --streams 64 # 64 such streams at once (their chunks batched)

The model is tiny-lstm (hidden 8), whose batch-256 run costs next to nothing, so the figure is
what the front, the session layer and the engine cost per entry. `--lone` is the lone client's
path instead: one session of the bench model (bench/model.py) on a `StreamConversation`, each
1-step message parsed, answered (the model run included) and its reply serialized; it prints
the p50 and mean microseconds per message, the event loop thread's CPU per message (all of the
work with --intra-op-threads 1, and what other processes' load barely changes), and the model
call alone for comparison. `--trace`
runs the server with --trace-otlp-endpoint (a sink in another process, so the server pays its
whole export path and nothing of the receiving end) and --trace-sample-ratio RATIO (default 1:
every message traced); the spans exported are counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from bench.model import BENCH_MODEL
from lstmserve.client import columns_request
from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import native_front_pb2 as npb
from service import codec
from service.config import ServerConfig
from service.native_front import NativeFrontServicer
from service.protocol.columns import ColumnsConversation
from service.protocol.multi import MultiConversation
from service.protocol.native import NativeStreams
from service.protocol.stream import StreamConversation
from service.server import create_server

MODEL = "tiny-lstm"


async def _nothing() -> AsyncIterator[Any]:
    return
    yield


async def _columns_round(layer: Any, n: int, messages: int) -> float:
    conversation = ColumnsConversation(layer, _nothing())
    opens = pb.ColumnsRequest(open=[pb.OpenSession(model=MODEL, version=1)] * n)
    opened = await conversation.answer(codec.columns_request(opens))
    handles = [item[0] for item in opened.attached if not isinstance(item, BaseException)]
    tokens = np.full((n, 1), 7, dtype=np.int64)
    started = time.perf_counter()
    for seq in range(1, messages + 1):
        data = columns_request(handles, [seq] * n, tokens).SerializeToString()
        message = codec.columns_request(pb.ColumnsRequest.FromString(data))
        codec.columns_response(await conversation.answer(message)).SerializeToString()
    return time.perf_counter() - started


async def _multi_round(layer: Any, n: int, messages: int) -> float:
    conversation = MultiConversation(layer, _nothing())
    opens = [pb.SessionRequest(open=pb.OpenSession(model=MODEL, version=1))] * n
    opened = await conversation.answer([codec.session_entry(e) for e in opens])
    ids = [r.session_id for r in opened.replies]
    started = time.perf_counter()
    for seq in range(1, messages + 1):
        chunk = pb.SequenceInput(tokens=pb.TokenIds(ids=[7]))
        request = pb.StreamMultiRequest(
            entries=[
                pb.SessionRequest(session_id=i, chunk=pb.Chunk(seq=seq, input=chunk)) for i in ids
            ]
        )
        parsed = pb.StreamMultiRequest.FromString(request.SerializeToString())
        reply = await conversation.answer([codec.session_entry(e) for e in parsed.entries])
        codec.multi_response(reply, 600.0).SerializeToString()
    return time.perf_counter() - started


async def _native_opened(layer: Any, n: int) -> tuple[NativeFrontServicer, NativeStreams]:
    """A ticks servicer whose front holds n streams (1..n), each with a session of MODEL
    opened by one tick."""
    servicer = NativeFrontServicer(layer, 600.0, None)
    streams_held = NativeStreams(layer)
    opens = npb.Tick(id=1)
    for i in range(n):
        entry = opens.entries.add(stream=i + 1, first=True)
        entry.request.open.model, entry.request.open.version = MODEL, 1
    await servicer.answer(streams_held, opens)
    return servicer, streams_held


async def _native_round(layer: Any, n: int, messages: int) -> float:
    """The native front's ticks (service/native_front.py): n streams' messages per tick, each
    tick parsed from bytes, answered and its reply serialized, as the ticks socket does."""
    servicer, streams_held = await _native_opened(layer, n)
    streams = np.arange(1, n + 1, dtype="<u8").tobytes()  # packed, as the front packs chunks
    offsets = np.arange(n + 1, dtype="<u4").tobytes()
    tokens = np.full(n, 7, dtype="<i8").tobytes()
    started = time.perf_counter()
    for seq in range(1, messages + 1):
        seqs = np.full(n, seq, dtype="<u8").tobytes()
        tick = npb.Tick(id=seq + 1, chunk_streams=streams, chunk_seqs=seqs,
                        chunk_offsets=offsets, chunk_tokens=tokens)  # fmt: skip
        reply = await servicer.answer(streams_held, npb.Tick.FromString(tick.SerializeToString()))
        reply.SerializeToString()
    return time.perf_counter() - started


async def _native_text_round(layer: Any, n: int, messages: int, packed: bool) -> float:
    """`_native_round` with one letter of text per message (tiny-lstm has a character
    tokenizer): packed as the front packs text (Tick.text_*), or each a TickEntry."""
    servicer, streams_held = await _native_opened(layer, n)
    streams = np.arange(1, n + 1, dtype="<u8").tobytes()
    offsets = np.arange(n + 1, dtype="<u4").tobytes()
    letters = bytes(ord("a") + i % 26 for i in range(n))
    started = time.perf_counter()
    for seq in range(1, messages + 1):
        tick = npb.Tick(id=seq + 1)
        if packed:
            tick.text_streams, tick.text_offsets, tick.text_bytes = streams, offsets, letters
            tick.text_seqs = np.full(n, seq, dtype="<u8").tobytes()
        else:
            for i in range(n):
                chunk = tick.entries.add(stream=i + 1).request.chunk
                chunk.seq, chunk.input.text = seq, chr(letters[i])
        reply = await servicer.answer(streams_held, npb.Tick.FromString(tick.SerializeToString()))
        reply.SerializeToString()
    return time.perf_counter() - started


@contextlib.asynccontextmanager
async def served(repo: Path, **settings: Any) -> AsyncIterator[Any]:
    """The server's objects on `repo`, loaded, with no port serving traffic; shut down after."""
    config = ServerConfig(model_repository=repo, host="127.0.0.1", grpc_port=0, metrics_port=0,
                          http_port=0, compute_threads=2, **settings)  # fmt: skip
    app, _ = create_server(config)
    await app.start()
    await app.wait_until_loaded(60)
    try:
        yield app
    finally:
        await app.shutdown(grace_s=0)


async def measure(
    repo: Path, n: int, messages: int, rounds: int, text: bool = False
) -> dict[str, Any]:
    """The best round of each (other processes on the machine only ever slow a round down);
    `text`: also the ticks' text chunks, packed and as entries."""
    best = {"columns": float("inf"), "multi": float("inf"), "native": float("inf")}
    if text:
        best |= {"native_text": float("inf"), "native_text_entries": float("inf")}
    async with served(repo, max_sessions=100_000) as app:
        for _ in range(rounds):
            best["columns"] = min(best["columns"], await _columns_round(app.layer, n, messages))
            best["multi"] = min(best["multi"], await _multi_round(app.layer, n, messages))
            best["native"] = min(best["native"], await _native_round(app.layer, n, messages))
            if text:
                for key, packed in (("native_text", True), ("native_text_entries", False)):
                    took = await _native_text_round(app.layer, n, messages, packed)
                    best[key] = min(best[key], took)
    per_entry = {k: 1e6 * v / (n * messages) for k, v in best.items()}
    return {"sessions_per_message": n, "messages": messages, "rounds": rounds,
            "us_per_entry": per_entry,
            "multi_over_columns": per_entry["multi"] / per_entry["columns"]}  # fmt: skip


async def lone_stream(layer: Any, messages: int, model: str = BENCH_MODEL) -> list[float]:
    """Seconds per message of one session's Stream, each message sent after the last reply."""
    inbox: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[Any]:
        while (data := await inbox.get()) is not None:
            yield codec.stream_request(pb.StreamRequest.FromString(data))

    replies = StreamConversation(layer, requests(), "Stream").replies()
    inbox.put_nowait(pb.StreamRequest(open=pb.OpenSession(model=model)).SerializeToString())
    await anext(replies)
    request = pb.StreamRequest(chunk=pb.Chunk(input=pb.SequenceInput(tokens=pb.TokenIds(ids=[7]))))
    times = []
    for seq in range(1, messages + 1):
        request.chunk.seq = seq
        started = time.perf_counter()
        inbox.put_nowait(request.SerializeToString())
        codec.stream_response(await anext(replies), 600.0).SerializeToString()
        times.append(time.perf_counter() - started)
    inbox.put_nowait(None)
    await replies.aclose()
    return times


async def measure_lone(repo: Path, messages: int, intra_op_threads: int, streams: int = 1,
                       **settings: Any) -> dict[str, Any]:  # fmt: skip
    """The lone client's in-process path (or `streams` of them at once, so that their chunks
    share batches), p50 and mean per message (the first 10 % dropped as warm-up), the CPU per
    message of the loop thread and of the whole process (the trace exporter's thread
    included), beside one model call of the same shape."""
    async with served(repo, intra_op_threads=intra_op_threads, inter_op_threads=1,
                      **settings) as app:  # fmt: skip
        cpu, process = time.thread_time(), time.process_time()
        each = await asyncio.gather(*(lone_stream(app.layer, messages) for _ in range(streams)))
        cpu, process = time.thread_time() - cpu, time.process_time() - process
        runtime = app.engine.registry.get(BENCH_MODEL).runtime
        desc = runtime.description
        one = (np.ones((1, 1), np.int64), np.ones(1, np.int64),
               np.zeros((1, desc.state_rows, desc.hidden_size), np.float32))  # fmt: skip
        runs = []
        for _ in range(messages // 2):
            started = time.perf_counter()
            runtime.run(*one, steps=False)
            runs.append(time.perf_counter() - started)
    kept = np.array([t for times in each for t in times[messages // 10 :]]) * 1e6
    total = messages * streams
    return {"model": BENCH_MODEL, "intra_op_threads": intra_op_threads, "streams": streams,
            "messages": messages, "p50_us": float(np.percentile(kept, 50)),
            "mean_us": float(kept.mean()), "loop_cpu_us": 1e6 * cpu / total,
            "process_cpu_us": 1e6 * process / total,
            "model_run_p50_us": float(np.percentile(np.array(runs) * 1e6, 50))}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inproc", description=__doc__)
    parser.add_argument("--sessions", type=int, default=256)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lone", action="store_true", help="the lone client's Stream path")
    parser.add_argument(
        "--text", action="store_true", help="also the native front's text chunks (one letter "
        "per message), packed and as entries",
    )  # fmt: skip
    parser.add_argument("--intra-op-threads", type=int, default=2, help="with --lone")
    parser.add_argument(
        "--streams", type=int, default=1, help="with --lone: this many streams at once"
    )
    parser.add_argument(
        "--trace",
        type=float,
        nargs="?",
        const=1.0,
        metavar="RATIO",
        help="with --lone: tracing on, this share of messages sampled (default 1: every one) "
        "and exported (the tracing extra)",
    )
    args = parser.parse_args(argv)
    if args.lone:
        with tempfile.TemporaryDirectory(prefix="lstm-inproc-") as tmp:
            print(json.dumps(_lone(Path(tmp), args)))
        return 0
    from export.tiny import write_tiny_repository

    with tempfile.TemporaryDirectory(prefix="lstm-inproc-") as tmp:
        write_tiny_repository(Path(tmp))
        figures = asyncio.run(
            measure(Path(tmp), args.sessions, args.messages, args.rounds, args.text)
        )
    print(json.dumps(figures))
    return 0


def _lone(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    from bench.model import build_repository

    build_repository(tmp)
    messages = max(args.messages, 3000 // args.streams)
    threads, streams = args.intra_op_threads, args.streams
    if args.trace is None:
        return asyncio.run(measure_lone(tmp, messages, threads, streams)) | {"trace": None}
    from bench.otlp_sink import Sink

    with Sink() as sink:
        figures = asyncio.run(measure_lone(tmp, messages, threads, streams,
                                           trace_otlp_endpoint=sink.endpoint,
                                           trace_sample_ratio=args.trace))  # fmt: skip
    return figures | {"trace": args.trace, "spans_exported": sink.spans}


if __name__ == "__main__":
    sys.exit(main())
