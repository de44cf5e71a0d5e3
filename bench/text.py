"""Streamed text on langid-chars: model steps and server CPU per chunk, for one or two trees.

    python -m bench.text                                   # this tree: S in (1, 256), k in (1, 16)
    python -m bench.text --tree /tmp/before --tree .      # two trees, alternating, 3 rounds

Each session is a Stream sending k characters of text per chunk (sentences in the ten languages
of langid-chars, accents and all, cycled), ping-pong, with the batched server's flags of
bench/run.py. Per point: chunks/s, p50 latency, server CPU per chunk (microseconds; the
server's user + system time over the window / chunks answered), model steps per chunk and per
character (lstm_serve_steps_total over the window: a reply to held text runs its tail too) and
model runs per chunk. With several `--tree`s, each point runs on every tree's server back to
back (all up at once, so drifts in the machine's load hit them alike), `--rounds` times.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.load import Window, run_window, window_barrier
from bench.model import LANGID
from bench.procs import HOST, Process, free_port, model_samples, sample_value
from bench.run import BATCHED
from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc

MODEL = "langid-chars"
TEXT = " ".join([
    "the quick brown fox jumps over the lazy dog",  # english
    "der größte Fußgänger überquert die Straße",  # german
    "le café crème à côté de la fenêtre",  # french
    "el niño comió piña en la montaña",  # spanish
    "la città è più bella di così",  # italian
    "a ação do coração não é à toa",  # portuguese
    "het ijsje smelt in de zon",  # dutch
    "smörgåsbord och kött på bordet",  # swedish
    "zażółć gęślą jaźń w źródle",  # polish
    "rødgrød med fløde på bordet",  # danish
])  # fmt: skip


def start(tree: Path, repo: Path) -> Process:
    """lstm-serve from `tree` (its own code: -P keeps this directory off sys.path)."""
    port, metrics_port = free_port(), free_port()
    argv = [
        "env", f"PYTHONPATH={tree.resolve()}", sys.executable, "-P", "-m", "service.cli",
        "--model-repository", str(repo), "--host", HOST, "--grpc-port", str(port),
        "--metrics-port", str(metrics_port), "--log-level", "WARNING", "--http-port", "-1",
        *BATCHED,
    ]  # fmt: skip
    proc = Process(argv, port, metrics_port)
    deadline = time.monotonic() + 120
    while not _ready(proc):
        proc.check_alive()
        if time.monotonic() > deadline:
            proc.stop()
            raise TimeoutError(f"lstm-serve from {tree} did not start")
        time.sleep(0.2)
    return proc


def _ready(proc: Process) -> bool:
    try:
        return _scrape(proc)[0] >= 0
    except OSError:
        return False


def _scrape(proc: Process) -> tuple[float, float]:
    """(model steps, model runs) of langid-chars so far."""
    lines = model_samples(proc.metrics_port, MODEL)
    return (sample_value(lines, "lstm_serve_steps_total", 'rpc="Stream"'),
            sample_value(lines, "lstm_serve_batch_compute_seconds_count"))  # fmt: skip


async def _session(stub: Any, k: int, offset: int, window: Window, ready: Any) -> None:
    call = stub.Stream()
    await call.write(pb.StreamRequest(open=pb.OpenSession(model=MODEL)))
    await call.read()
    await ready()
    position = offset % len(TEXT)
    while TEXT[position] == " ":  # a text starting with nothing known is refused
        position += 1
    for seq in range(1, 1_000_001):
        if time.perf_counter() >= window.end:
            break
        piece = (TEXT + TEXT)[position : position + k]
        position = (position + k) % len(TEXT)
        sent = time.perf_counter()
        await call.write(
            pb.StreamRequest(chunk=pb.Chunk(seq=seq, input=pb.SequenceInput(text=piece)))
        )
        reply = await call.read()
        window.record(sent, time.perf_counter())
        if reply is grpc.aio.EOF or reply.chunk.HasField("error"):
            raise RuntimeError(f"stream failed: {reply}")
    await call.write(pb.StreamRequest(end=pb.End()))
    await call.read()
    await call.done_writing()


def measure(
    proc: Process, sessions: int, k: int, warmup_s: float, seconds: float
) -> dict[str, Any]:
    marks: dict[str, tuple[float, float, tuple[float, float]]] = {}

    async def on_window(edge: str) -> None:
        counts = await asyncio.to_thread(_scrape, proc)
        marks[edge] = (time.perf_counter(), proc.cpu_seconds(), counts)

    async def main() -> Window:
        window = Window(start=float("inf"), end=float("inf"))
        channels = [grpc.aio.insecure_channel(proc.address) for _ in range(max(1, sessions // 128))]
        ready, opened = window_barrier(window, sessions, warmup_s, seconds)
        loops = [
            _session(pb_grpc.LstmServeStub(channels[i % len(channels)]), k, 37 * i, window, ready)
            for i in range(sessions)
        ]
        return await run_window(loops, window, opened, on_window, channels)

    window = asyncio.run(main())
    (t0, cpu0, (s0, r0)), (t1, cpu1, (s1, r1)) = marks["start"], marks["end"]
    chunks = max(window.completed, 1)
    lat = np.array(window.latencies or [float("nan")]) * 1000
    return {
        "chunks_per_s": window.completed / (t1 - t0),
        "p50_ms": float(np.percentile(lat, 50)),
        "cpu_us_per_chunk": 1e6 * (cpu1 - cpu0) / chunks,
        "steps_per_chunk": (s1 - s0) / chunks,
        "steps_per_char": (s1 - s0) / (chunks * k),
        "runs_per_chunk": (r1 - r0) / chunks,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.text", description=__doc__)
    parser.add_argument("--tree", type=Path, action="append", help="a source tree (repeat)")
    parser.add_argument("--sessions", default="1,256")
    parser.add_argument("--chars", default="1,16", help="characters per chunk")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    args = parser.parse_args(argv)
    trees = args.tree or [Path(".")]
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        (repo / MODEL / "1").mkdir(parents=True)
        (repo / MODEL / "1" / "model.onnx").symlink_to(LANGID / "model.onnx")
        procs = [start(tree, repo) for tree in trees]
        rows: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
        try:
            for _ in range(args.rounds):
                for s in map(int, args.sessions.split(",")):
                    for k in map(int, args.chars.split(",")):
                        for tree, proc in zip(trees, procs, strict=True):
                            row = measure(proc, s, k, args.warmup, args.seconds)
                            rows.setdefault((str(tree), s, k), []).append(row)
                            print(str(tree), s, k, {n: round(v, 2) for n, v in row.items()},
                                  flush=True)  # fmt: skip
        finally:
            for proc in procs:
                proc.stop()
    print("\n| tree | S | k | chunks/s | p50 ms | server CPU us/chunk | steps/chunk | steps/char "
          "| runs/chunk |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for (tree, s, k), found in rows.items():
        med = {n: float(np.median([r[n] for r in found])) for n in found[0]}
        print(f"| {tree} | {s} | {k} | {med['chunks_per_s']:,.0f} | {med['p50_ms']:.2f} | "
              f"{med['cpu_us_per_chunk']:.0f} | {med['steps_per_chunk']:.2f} | "
              f"{med['steps_per_char']:.2f} | {med['runs_per_chunk']:.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
