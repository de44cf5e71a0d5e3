"""Hostile-load checks against a real lstm-serve process: what small requests cost.

    python -m bench.hostile                      # every scenario, JSON lines on stdout
    python -m bench.hostile --only classify      # one of: classify unread lanes deadline every_step
    python -m bench.hostile --flags="--classify-slice-row-steps 0"   # extra server flags

Each scenario starts its own server on the shipped models (models/, langid-chars/1: LSTM 256)
and reports what the robustness issue's "done when" asks, measured here:
  classify    Classify 16 x 16,384 tokens twice: refused, or peak RSS growth and RSS 10 s later
  multi       one StreamMulti message of 64 x 4,096-token chunks: peak RSS growth, 10 s later
  unread      two streams that never read their replies, each sending 4 MB messages: RSS growth
              at the peak (allocator churn, noisy) and held while the streams stay open
  lanes       p99 of 8-step stream chunks beside four concurrent Classify 8 x 8,192
  deadline    a Classify 16 x 16,384 with a 0.3 s deadline: seconds until the server's CPU idles
  every_step  1,000 every_step sessions after one 4,096-step chunk each: bytes per session
              beyond the state
Loopback only; each scenario is bounded in time and count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

from bench.procs import Process, start_lstm_serve
from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc

MODELS = Path(__file__).resolve().parent.parent / "models"
MODEL = "langid-chars"
MiB = 1024 * 1024
EVERY_STEP = True


def rss(proc: Process) -> int:
    return int(psutil.Process(proc.popen.pid).memory_info().rss)


def tokens(n: int, seed: int) -> pb.SequenceInput:
    ids = np.random.default_rng(seed).integers(1, 60, size=n)
    return pb.SequenceInput(tokens=pb.TokenIds(ids=ids.tolist()))


class RssSampler:
    """The server's RSS every 50 ms, in the background; the peak seen."""

    def __init__(self, proc: Process) -> None:
        self.proc = proc
        self.peak = rss(proc)
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss(self.proc))
            await asyncio.sleep(0.05)

    def __enter__(self) -> RssSampler:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def classify_big(proc: Process) -> dict[str, Any]:
    request = pb.ClassifyRequest(model=MODEL, sequences=[tokens(16_384, i) for i in range(16)])
    start = rss(proc)
    outcome = "ok"
    async with grpc.aio.insecure_channel(proc.address, options=_big()) as channel:
        stub = pb_grpc.LstmServeStub(channel)
        with RssSampler(proc) as sampler:
            for _ in range(2):
                try:
                    await stub.Classify(request, timeout=120)
                except grpc.aio.AioRpcError as exc:
                    outcome = f"{exc.code().name}: {(exc.details() or '')[:200]}"
    await asyncio.sleep(10)
    return {"scenario": "classify", "outcome": outcome,
            "peak_growth_mib": round((sampler.peak - start) / MiB, 1),
            "growth_after_10s_mib": round((rss(proc) - start) / MiB, 1)}  # fmt: skip


async def unread(proc: Process) -> dict[str, Any]:
    filler = pb.StreamRequest(chunk=pb.Chunk(seq=1, input=pb.SequenceInput(text="a" * 4_000_000)))
    async with grpc.aio.insecure_channel(proc.address, options=_big()) as channel:
        stub = pb_grpc.LstmServeStub(channel)
        calls = []
        every = pb.StreamOptions(every_step=True)
        for i in range(2):
            call = stub.Stream()
            await call.write(pb.StreamRequest(open=pb.OpenSession(model=MODEL, options=every)))
            await call.read()
            for seq in range(1, 4):  # ~160 KB replies, never read: the server's writes block
                chunk = pb.Chunk(seq=seq, input=tokens(4096, i))
                await call.write(pb.StreamRequest(chunk=chunk))
            calls.append(call)
        await asyncio.sleep(2)  # their runs are done (the model's arena has its working size)
        start = rss(proc)
        with RssSampler(proc) as sampler:
            written = [0]

            async def flood(call: Any) -> None:
                for _ in range(100):  # never reads a reply
                    await call.write(filler)
                    written[0] += 1

            with contextlib.suppress(TimeoutError):  # flow control stopped the writers: good
                await asyncio.wait_for(asyncio.gather(*(flood(c) for c in calls)), 20)
            await asyncio.sleep(2)
            held = rss(proc) - start  # the streams still open, their replies unread
        for call in calls:
            call.cancel()
    return {"scenario": "unread", "peak_growth_mib": round((sampler.peak - start) / MiB, 1),
            "held_growth_mib": round(held / MiB, 1), "messages_written": written[0]}  # fmt: skip


async def multi(proc: Process) -> dict[str, Any]:
    start = rss(proc)
    async with grpc.aio.insecure_channel(proc.address, options=_big()) as channel:
        call = pb_grpc.LstmServeStub(channel).StreamMulti()
        opens = [pb.SessionRequest(open=pb.OpenSession(model=MODEL)) for _ in range(64)]
        await call.write(pb.StreamMultiRequest(entries=opens))
        ids = [r.session_id for r in (await call.read()).results]
        with RssSampler(proc) as sampler:
            chunks = [
                pb.SessionRequest(session_id=sid, chunk=pb.Chunk(seq=1, input=tokens(4096, i)))
                for i, sid in enumerate(ids)
            ]
            await call.write(pb.StreamMultiRequest(entries=chunks))
            reply = await call.read()
        await call.done_writing()
    await asyncio.sleep(10)
    applied = sum(r.chunk.total_steps == 4096 for r in reply.results)
    return {"scenario": "multi", "applied": applied,
            "peak_growth_mib": round((sampler.peak - start) / MiB, 1),
            "growth_after_10s_mib": round((rss(proc) - start) / MiB, 1)}  # fmt: skip


async def lanes(proc: Process) -> dict[str, Any]:
    big = pb.ClassifyRequest(model=MODEL, sequences=[tokens(8192, i) for i in range(8)])
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(proc.address, options=_big()) as channel:
        stub = pb_grpc.LstmServeStub(channel)
        call = stub.Stream()
        await call.write(pb.StreamRequest(open=pb.OpenSession(model=MODEL)))
        await call.read()
        classify = [asyncio.ensure_future(stub.Classify(big, timeout=120)) for _ in range(4)]
        seq = 0
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and not all(c.done() for c in classify):
            seq += 1
            sent = time.perf_counter()
            await call.write(pb.StreamRequest(chunk=pb.Chunk(seq=seq, input=tokens(8, seq))))
            await call.read()
            latencies.append(time.perf_counter() - sent)
        call.cancel()
        for c in classify:
            c.cancel()
    p = np.percentile(np.array(latencies) * 1000, [50, 99])
    return {"scenario": "lanes", "chunks": len(latencies), "p50_ms": round(float(p[0]), 2),
            "p99_ms": round(float(p[1]), 2)}  # fmt: skip


async def deadline(proc: Process) -> dict[str, Any]:
    request = pb.ClassifyRequest(model=MODEL, sequences=[tokens(16_384, i) for i in range(16)])
    ps = psutil.Process(proc.popen.pid)
    async with grpc.aio.insecure_channel(proc.address, options=_big()) as channel:
        stub = pb_grpc.LstmServeStub(channel)
        try:
            await stub.Classify(request, timeout=0.3)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
    expired = time.monotonic()
    ps.cpu_percent(None)
    idle_after = None
    while time.monotonic() - expired < 30:
        await asyncio.sleep(0.1)
        if ps.cpu_percent(None) < 10:
            idle_after = time.monotonic() - expired
            break
    return {"scenario": "deadline", "code": code,
            "cpu_idle_after_deadline_s": round(idle_after, 2) if idle_after else None}  # fmt: skip


async def every_step(proc: Process) -> dict[str, Any]:
    """RSS per session after warming up (the arena and the heap reach their working size on the
    first sessions; what then grows with every session is what a session keeps)."""
    sessions, warm = 1000, 50
    async with grpc.aio.insecure_channel(proc.address, options=_big()) as channel:
        stub = pb_grpc.LstmServeStub(channel)
        for i in range(warm):
            await _one_every_step_session(stub, i)
        await asyncio.sleep(1)
        start = rss(proc)
        for i in range(sessions):
            await _one_every_step_session(stub, warm + i)
        await asyncio.sleep(2)
        grown = rss(proc) - start
    state = 2 * 256 * 4  # langid-chars: S x H float32
    return {"scenario": "every_step", "sessions": sessions, "every_step": EVERY_STEP,
            "bytes_per_session_beyond_state": int(grown / sessions - state)}  # fmt: skip


async def _one_every_step_session(stub: pb_grpc.LstmServeStub, seed: int) -> None:
    """Open, one 4,096-step chunk, close the stream (the session stays, resumable)."""
    call = stub.Stream()
    opts = pb.StreamOptions(every_step=EVERY_STEP)
    await call.write(pb.StreamRequest(open=pb.OpenSession(model=MODEL, options=opts)))
    await call.read()
    await call.write(pb.StreamRequest(chunk=pb.Chunk(seq=1, input=tokens(4096, seed))))
    await call.read()
    await call.done_writing()
    await call.code()


def _big() -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", 64 * MiB),
            ("grpc.max_receive_message_length", 64 * MiB)]  # fmt: skip


SCENARIOS: dict[str, Callable[[Process], Any]] = {
    "classify": classify_big, "multi": multi, "unread": unread, "lanes": lanes,
    "deadline": deadline, "every_step": every_step,
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SCENARIOS))
    parser.add_argument("--flags", default="", help="extra lstm-serve flags, one string")
    args = parser.parse_args(argv)
    for name in [args.only] if args.only else list(SCENARIOS):
        proc = start_lstm_serve(MODELS, shlex.split(args.flags))
        try:
            result = asyncio.run(SCENARIOS[name](proc))
        finally:
            proc.stop()
        print(json.dumps({**result, "flags": args.flags}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
