"""A small load generator: N concurrent sessions streaming one-step chunks, pipelined.

    python tools/loadgen.py --address 127.0.0.1:8001 --model tiny-gru --sessions 16 --chunks 200

Prints chunks/s and client-side latency percentiles (a baseline for the cross-session batcher).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

from lstmserve.client import LstmClient, Steps


async def one_session(
    client: LstmClient, model: str, chunks: int, depth: int, step: Steps
) -> list[float]:
    """Stream `chunks` one-step chunks keeping up to `depth` in flight; per-chunk latencies."""
    session = await client.open_session(model)
    latencies: list[float] = []
    sent_at: list[float] = []
    for _ in range(chunks):
        if len(sent_at) - len(latencies) >= depth:
            await session.receive()
            latencies.append(time.perf_counter() - sent_at[len(latencies)])
        sent_at.append(time.perf_counter())
        await session.send(step)
    while len(latencies) < chunks:
        await session.receive()
        latencies.append(time.perf_counter() - sent_at[len(latencies)])
    await session.end()
    return latencies


async def main(args: argparse.Namespace) -> None:
    async with LstmClient(args.address) as client:
        info = await client.get_model(args.model)
        step: Steps = [1] if info.input_kind == "tokens" else np.zeros((1, info.feature_dim))
        started = time.perf_counter()
        results = await asyncio.gather(
            *(one_session(client, args.model, args.chunks, args.depth, step)
              for _ in range(args.sessions))
        )  # fmt: skip
        elapsed = time.perf_counter() - started
    latencies = np.concatenate(results) * 1000
    total = args.sessions * args.chunks
    print(
        f"{total} chunks in {elapsed:.2f} s = {total / elapsed:.0f} chunks/s; latency ms "
        f"p50 {np.percentile(latencies, 50):.2f} p99 {np.percentile(latencies, 99):.2f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:8001")
    parser.add_argument("--model", required=True)
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--depth", type=int, default=1, help="chunks in flight per session")
    asyncio.run(main(parser.parse_args()))
