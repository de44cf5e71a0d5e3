"""One closed loop, three protocols: native Stream, tritonclient's gRPC stream, tritonclient.http.

    python -m bench.triton --seconds 10                  # 64 sequences x 8 steps per request
    python -m bench.triton --seconds 3 --sequences 16 --steps 1 --out /tmp/triton.json

Starts one lstm-serve (subprocess, 127.0.0.1, the bench model of bench/model.py, the batched
flags of bench/run.py, the HTTP front on a free port) and drives it from this process with N
concurrent sequences, each sending a K-step request and the next one only after the reply, for
D seconds per protocol, one protocol after the other against the same server:

  native       lstmserve.v1 Stream (grpc.aio), one stream per session (bench/load.py)
  triton-grpc  tritonclient.grpc.aio stream_infer (ModelStreamInfer), one stream per sequence,
               sequence_id / sequence_start / sequence_end
  triton-http  tritonclient.http.aio infer (POST /v2/models/NAME/infer, binary tensor data),
               one request at a time per sequence, a pooled connection each

Prints a table (steps/s, p50/p99 latency per request, server CPU) and writes --out (JSON).
Bounded: at most MAX_SEQUENCES sequences, MAX_STEPS steps per request, MAX_SECONDS per window and
MAX_MESSAGES requests per sequence; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http as httpclient
import tritonclient.http.aio as http_aio

from bench.load import Load, Window, drive, run_window, window_barrier
from bench.model import BENCH_MODEL, build_repository
from bench.procs import HOST, Process, free_port, start_lstm_serve
from bench.run import BATCHED, VOCAB

MAX_SEQUENCES = 1024
MAX_STEPS = 1024
MAX_SECONDS = 600.0
MAX_MESSAGES = 1_000_000  # per sequence, whatever the window
PROTOCOLS = ("native", "triton-grpc", "triton-http")
SEQUENCES_PER_CLIENT = 64  # gRPC channels (HTTP connection pools) are shared by this many
Ready = Callable[[], Awaitable[None]]


def fail_on(error: object, what: str) -> None:
    if error is not None:
        raise RuntimeError(f"{what} failed: {error}")


async def grpc_sequence(
    client: grpc_aio.InferenceServerClient, model: str, ids: np.ndarray, sequence_id: int,
    window: Window, ready: Ready,
) -> None:  # fmt: skip
    """One sequence on its own ModelStreamInfer stream, request after reply."""
    tokens = grpcclient.InferInput("tokens", [1, len(ids)], "INT64")
    tokens.set_data_from_numpy(ids[None])
    outputs = [grpcclient.InferRequestedOutput("probs")]
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    async def requests() -> Any:
        while (item := await queue.get()) is not None:
            yield item

    def request(start: bool = False, end: bool = False) -> dict[str, Any]:
        return {"model_name": model, "inputs": [tokens], "outputs": outputs,
                "sequence_id": sequence_id, "sequence_start": start,
                "sequence_end": end}  # fmt: skip

    replies = client.stream_infer(requests())
    await queue.put(request(start=True))
    fail_on((await anext(replies))[1], "sequence start")
    await ready()
    for _ in range(MAX_MESSAGES):
        if time.perf_counter() >= window.end:
            break
        sent = time.perf_counter()
        await queue.put(request())
        _, error = await anext(replies)
        window.record(sent, time.perf_counter())
        fail_on(error, "stream request")
    await queue.put(request(end=True))
    fail_on((await anext(replies))[1], "sequence end")
    await queue.put(None)


async def http_sequence(
    client: http_aio.InferenceServerClient, model: str, ids: np.ndarray, sequence_id: int,
    window: Window, ready: Ready,
) -> None:  # fmt: skip
    """One sequence over HTTP/REST (binary tensor data), request after reply."""
    tokens = httpclient.InferInput("tokens", [1, len(ids)], "INT64")
    tokens.set_data_from_numpy(ids[None], binary_data=True)
    outputs = [httpclient.InferRequestedOutput("probs", binary_data=True)]

    async def infer(start: bool = False, end: bool = False) -> None:
        result = await client.infer(model, [tokens], outputs=outputs, sequence_id=sequence_id,
                                    sequence_start=start, sequence_end=end)  # fmt: skip
        if result.as_numpy("probs") is None:
            raise RuntimeError("an HTTP reply without probs")

    await infer(start=True)
    await ready()
    for _ in range(MAX_MESSAGES):
        if time.perf_counter() >= window.end:
            break
        sent = time.perf_counter()
        await infer()
        window.record(sent, time.perf_counter())
    await infer(end=True)


async def drive_triton(
    protocol: str, proc: Process, http_port: int, model: str, load: Load, warmup_s: float,
    seconds: float, on_window: Callable[[str], Awaitable[None]],
) -> Window:  # fmt: skip
    """N sequences of one Triton protocol: start each, warm up, measure `seconds`."""
    window = Window(start=float("inf"), end=float("inf"))

    ready, opened = window_barrier(window, load.sessions, warmup_s, seconds)

    n_clients = max(1, -(-load.sessions // SEQUENCES_PER_CLIENT))
    ids = np.random.default_rng(load.sessions).integers(1, VOCAB[model], size=load.steps)
    if protocol == "triton-grpc":
        clients: list[Any] = [
            grpc_aio.InferenceServerClient(proc.address) for _ in range(n_clients)
        ]
        run: Any = grpc_sequence
    else:
        clients = [http_aio.InferenceServerClient(f"{HOST}:{http_port}",
                                                  conn_limit=SEQUENCES_PER_CLIENT)
                   for _ in range(n_clients)]  # fmt: skip
        run = http_sequence
    loops = [run(clients[i % n_clients], model, ids, 1 + i, window, ready)
             for i in range(load.sessions)]  # fmt: skip
    return await run_window(loops, window, opened, on_window, clients)


def measure(
    protocol: str, proc: Process, http_port: int, load: Load, timing: tuple[float, float]
) -> dict[str, Any]:
    """One protocol's window: requests and steps per second, latency, server CPU."""
    marks: dict[str, tuple[float, float, float]] = {}
    me = psutil.Process()

    async def on_window(edge: str) -> None:
        marks[edge] = (time.perf_counter(), proc.cpu_seconds(), sum(me.cpu_times()[:2]))

    if protocol == "native":
        work = drive(load, proc.address, BENCH_MODEL, VOCAB[BENCH_MODEL], *timing, on_window)
    else:
        work = drive_triton(protocol, proc, http_port, BENCH_MODEL, load, *timing, on_window)
    window = asyncio.run(work)
    (t0, cpu0, me0), (t1, cpu1, me1) = marks["start"], marks["end"]
    elapsed = t1 - t0
    lat = np.array(window.latencies or [float("nan")]) * 1000
    requests = window.completed / elapsed
    return {
        "protocol": protocol, "sequences": load.sessions, "steps": load.steps,
        "requests_per_s": requests, "steps_per_s": requests * load.steps,
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
        "server_cpu_pct": 100 * (cpu1 - cpu0) / elapsed,
        "client_cpu_pct": 100 * (me1 - me0) / elapsed, "seconds": elapsed,
    }  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    native = next((r["steps_per_s"] for r in rows if r["protocol"] == "native"), 0.0)
    lines = [
        "| protocol | N | K | steps/s | requests/s | vs native | p50 / p99 ms | server CPU | "
        "client CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = f"{100 * r['steps_per_s'] / native:.0f} %" if native else "-"
        lines.append(
            f"| {r['protocol']} | {r['sequences']} | {r['steps']} | {r['steps_per_s']:,.0f} | "
            f"{r['requests_per_s']:,.0f} | {share} | {r['p50_ms']:.2f} / {r['p99_ms']:.2f} | "
            f"{r['server_cpu_pct']:.0f} % | {r['client_cpu_pct']:.0f} % |"
        )
    return "\n".join(lines)


def bounded(kind: Any, low: float, high: float) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        value = kind(raw)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{raw} is not in [{low}, {high}]")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sequences", type=bounded(int, 1, MAX_SEQUENCES), default=64)
    parser.add_argument("--steps", type=bounded(int, 1, MAX_STEPS), default=8)
    parser.add_argument("--seconds", type=bounded(float, 0.5, MAX_SECONDS), default=10.0)
    parser.add_argument("--warmup", type=bounded(float, 0.0, 60.0), default=1.0)
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--out", type=Path, default=Path("bench/results/triton.json"))
    args = parser.parse_args(argv)
    protocols = [p for p in args.protocols.split(",") if p]
    if not set(protocols) <= set(PROTOCOLS):
        parser.error(f"--protocols: choose among {','.join(PROTOCOLS)}")
    load = Load("stream", args.sequences, args.steps, args.sequences)
    started = time.perf_counter()
    http_port = free_port()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lstm-bench-triton-") as tmp:
        build_repository(Path(tmp))
        proc = start_lstm_serve(Path(tmp), [*BATCHED, "--http-port", str(http_port)])
        try:
            for protocol in protocols:
                rows.append(measure(protocol, proc, http_port, load, (args.warmup, args.seconds)))
                print(f"{protocol:>12}: {rows[-1]['steps_per_s']:>9,.0f} steps/s  p50 "
                      f"{rows[-1]['p50_ms']:.2f} ms", flush=True)  # fmt: skip
        finally:
            proc.stop()
    results = {
        "command": "python -m bench.triton " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version()},
        "model": BENCH_MODEL, "server_flags": BATCHED,
        "timing": {"warmup_s": args.warmup, "seconds": args.seconds},
        "rows": rows, "total_seconds": time.perf_counter() - started,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
