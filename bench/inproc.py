"""Server Python per multi-session entry, in-process and with no network: StreamColumns vs
StreamMulti, each message parsed from bytes, answered by the session layer and serialized.

    python -m bench.inproc                     # 256 sessions, 1 step each, 100 messages per round

The model is tiny-lstm (hidden 8), whose batch-256 run costs next to nothing, so the figure is
what the front, the session layer and the engine cost per entry.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from lstmserve.client import columns_request
from lstmserve.v1 import lstm_serve_pb2 as pb
from service import codec
from service.config import ServerConfig
from service.protocol.columns import ColumnsConversation
from service.protocol.multi import MultiConversation
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


async def measure(repo: Path, n: int, messages: int, rounds: int) -> dict[str, Any]:
    """The best round of each (other processes on the machine only ever slow a round down)."""
    config = ServerConfig(model_repository=repo, host="127.0.0.1", grpc_port=0, metrics_port=0,
                          http_port=0, compute_threads=2, max_sessions=100_000)  # fmt: skip
    app, _ = create_server(config)
    await app.start()
    await app.wait_until_loaded(60)
    best = {"columns": float("inf"), "multi": float("inf")}
    try:
        for _ in range(rounds):
            best["columns"] = min(best["columns"], await _columns_round(app.layer, n, messages))
            best["multi"] = min(best["multi"], await _multi_round(app.layer, n, messages))
    finally:
        await app.shutdown(grace_s=0)
    per_entry = {k: 1e6 * v / (n * messages) for k, v in best.items()}
    return {"sessions_per_message": n, "messages": messages, "rounds": rounds,
            "us_per_entry": per_entry,
            "multi_over_columns": per_entry["multi"] / per_entry["columns"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inproc", description=__doc__)
    parser.add_argument("--sessions", type=int, default=256)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    from export.tiny import write_tiny_repository

    with tempfile.TemporaryDirectory(prefix="lstm-inproc-") as tmp:
        write_tiny_repository(Path(tmp))
        figures = asyncio.run(measure(Path(tmp), args.sessions, args.messages, args.rounds))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
