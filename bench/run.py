"""The benchmark sweep: batched/batching-off lstm-serve, echo, protocol floor, ceilings, memory.

    python -m bench.run --out bench/results           # the full run (about 5 minutes here)
    python -m bench.run --out /tmp/bench --quick      # a few seconds per point
    python -m bench.run --out /tmp/cols --modes multi,columns --no-memory   # the multi-session RPCs

    python -m bench.run --out /tmp/n --modes stream --sessions 256 --steps 1 --client native

Writes results.json, table.md and throughput.png under --out and prints the table. Every server
is a subprocess on 127.0.0.1; the load generator is this process (asyncio gRPC), or with
`--client native` native/build/lstm-serve-load (`make native`) for the stream and echo points
(multi and columns points stay with this process), its sampled replies checked against offline
onnxruntime at every lstm-serve point.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.load import Load, drive, message_sizes
from bench.model import BENCH_MODEL, build_repository
from bench.native_load import LOAD_BINARY, NativeWindow, drive_native, verify_exact
from bench.procs import (
    NATIVE_FRONT,
    Process,
    scrape_batches,
    start_echo,
    start_lstm_serve,
    start_native,
)
from bench.report import write_report
from export.ceiling import compute_ceiling

SESSIONS = (1, 16, 64, 256, 1024)
STEPS = (1, 16)
MULTI_SESSIONS, MULTI_STREAMS = 1024, 4
VOCAB = {BENCH_MODEL: 1000, "langid-chars": 28}  # token ids are drawn from [1, VOCAB)
INTRA_OP_THREADS = 2
BATCHED = ["--intra-op-threads", str(INTRA_OP_THREADS), "--inter-op-threads", "1",
           "--compute-threads", "2", "--max-concurrent-batches", "1", "--max-batch-size", "256",
           "--max-sessions", "20000"]  # fmt: skip
NAIVE = [*BATCHED, "--no-batching"]  # the same server, one chunk per model run
# Measured in this order at every point; "native" (lstm-serve behind the native front, the
# batched flags) where native/build/lstm-serve-front is built (`make native`).
SERVERS = ("batched", "native", "naive", "echo", "floor")


def measure(
    proc: Process, load: Load, model: str, vocab: int, warmup_s: float, seconds: float,
    client: str = "python",
) -> dict[str, Any]:  # fmt: skip
    """One point: throughput, latency percentiles, server CPU, client CPU, mean batch size;
    `client` "native": measured by the native load generator (stream and echo loads)."""
    marks: dict[str, tuple[float, float, float, tuple[float, float]]] = {}
    me = psutil.Process()

    async def on_window(edge: str) -> None:
        batches = (0.0, 0.0)
        if proc.metrics_port > 0:
            batches = await asyncio.to_thread(scrape_batches, proc.metrics_port, model)
        client = sum(me.cpu_times()[:2])
        marks[edge] = (time.perf_counter(), proc.cpu_seconds(), client, batches)

    if client == "native":
        native = asyncio.run(
            drive_native(load, proc.address, model, vocab, warmup_s, seconds, on_window)
        )
    else:
        window = asyncio.run(drive(load, proc.address, model, vocab, warmup_s, seconds, on_window))
    (t0, cpu0, me0, b0), (t1, cpu1, me1, b1) = marks["start"], marks["end"]
    elapsed = t1 - t0
    if client == "native":  # its window, timed in the binary
        completed, client_cpu, window_s = native.completed, native.client_cpu_s, native.seconds
        percentiles = [native.p50_ms, native.p95_ms, native.p99_ms]
    else:
        lat = np.array(window.latencies or [float("nan")]) * 1000
        completed, client_cpu, window_s = window.completed, me1 - me0, elapsed
        percentiles = [float(np.percentile(lat, q)) for q in (50, 95, 99)]
    msgs = completed / window_s
    runs, chunks = b1[0] - b0[0], b1[1] - b0[1]
    row = asdict(load) | {
        "model": model,
        "client": client,
        "messages_per_s": msgs,
        "chunks_per_s": msgs * load.per_message,
        "steps_per_s": msgs * load.per_message * load.steps,
        "p50_ms": percentiles[0],
        "p95_ms": percentiles[1],
        "p99_ms": percentiles[2],
        "server_cpu_pct": 100 * (cpu1 - cpu0) / elapsed,
        "client_cpu_pct": 100 * client_cpu / elapsed,
        "client_us_per_msg": 1e6 * client_cpu / max(completed, 1),
        "mean_batch": chunks / runs if runs else None,
        "seconds": elapsed,
    }
    if client == "native":
        row["native_sample"] = native
    return row


def native_client(load: Load) -> bool:
    """Whether `--client native` measures this load (the native generator's modes)."""
    return load.mode in ("stream", "echo")


def sweep_points(langid: bool) -> list[tuple[str, Load]]:
    """(model, load) of every point: S x k streams and multi for the bench model, a few langid."""
    points = [(BENCH_MODEL, Load("stream", s, k, s)) for s in SESSIONS for k in STEPS]
    points += [(BENCH_MODEL, Load("multi", MULTI_SESSIONS, k, MULTI_STREAMS)) for k in STEPS]
    points += [(BENCH_MODEL, Load("columns", MULTI_SESSIONS, k, MULTI_STREAMS)) for k in STEPS]
    if langid:
        points += [("langid-chars", Load("stream", s, k, s)) for s in (1, 256) for k in STEPS]
    return points


def sweep(
    repo: Path, paths: dict[str, Path], points: list[tuple[str, Load]],
    timing: tuple[float, float], client: str = "python",
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:  # fmt: skip
    """Every point on the batched server, the batching-off server, the echo server and (stream
    points) the protocol floor back to back (all four up at once, so slow drifts in the
    machine's load hit them alike), then its compute ceiling. With `client` "native", stream
    and echo loads are driven by the native load generator and its sample of every lstm-serve
    point is checked against offline onnxruntime."""
    procs = {"batched": start_lstm_serve(repo, BATCHED), "naive": start_lstm_serve(repo, NAIVE)}
    if NATIVE_FRONT.is_file():
        procs["native"] = start_native(repo, BATCHED, repo.parent / f"{repo.name}-native")
    else:
        print(f"native front not built ({NATIVE_FRONT}: make native): not measured", flush=True)
    procs["echo"] = start_echo()
    procs["floor"] = start_echo(protocol=True)
    rows: list[dict[str, Any]] = []
    limits: list[dict[str, Any]] = []
    try:
        for model, load in points:
            vocab = VOCAB[model]
            batched: dict[str, Any] = {}
            for label in SERVERS:
                if label not in procs or not _serves(label, model, load):
                    continue
                run_load = load
                if label == "echo":
                    sizes = message_sizes(load.per_message, load.steps, mode=load.mode)
                    run_load = Load("echo", load.sessions, load.steps, load.streams, sizes)
                by = client if native_client(run_load) else "python"
                row = measure(procs[label], run_load, model, vocab, *timing, client=by)
                row |= {"server": label, "mode": load.mode}
                sample: NativeWindow | None = row.pop("native_sample", None)
                if sample is not None and label in LSTM_SERVE:
                    row["exact"] = verify_exact(sample.sample, repo, model, load.steps)
                print(_progress(row), flush=True)
                rows.append(row)
                batched = row if label == "batched" else batched
            limits.append(ceiling(paths[model], batched, timing))
    finally:
        for proc in procs.values():
            proc.stop()
    return rows, limits


LSTM_SERVE = ("batched", "native", "naive")  # the servers whose replies are the model's


def _serves(label: str, model: str, load: Load) -> bool:
    """Echo runs every point of the bench model; the floor (lstmserve.v1 Stream only) its stream
    points; lstm-serve every point."""
    if label == "echo":
        return model == BENCH_MODEL
    if label == "floor":
        return model == BENCH_MODEL and load.mode == "stream"
    if label == "native":  # Stream is what it serves natively (the rest passes through)
        return load.mode == "stream"
    return True


def ceiling(path: Path, row: dict[str, Any], timing: tuple[float, float]) -> dict[str, Any]:
    """Raw onnxruntime at the batched point's mean batch size and chunk length (server threads
    and one thread)."""
    batch = max(1, round(row["mean_batch"] or 1))
    seconds = timing[1] / 2
    two = compute_ceiling(path, batch, row["steps"], INTRA_OP_THREADS, seconds)
    one = compute_ceiling(path, batch, row["steps"], 1, seconds)
    return {"mode": row["mode"], "sessions": row["sessions"], "steps": row["steps"],
            "model": row["model"], "batch": batch, **two,
            "steps_per_s_1_thread": one["steps_per_s"]}  # fmt: skip


def remeasure(
    paths: dict[str, Path], limits: list[dict[str, Any]], timing: tuple[float, float]
) -> list[dict[str, Any]]:
    """Every ceiling shape once more, with no server running (best_ceilings keeps the best)."""
    again, seen = [], set()
    for c in limits:
        key = (c["model"], c["batch"], c["steps"])
        if key in seen:
            continue
        seen.add(key)
        row = {"mode": c["mode"], "sessions": c["sessions"], "steps": c["steps"],
               "model": c["model"], "mean_batch": c["batch"]}  # fmt: skip
        again.append(ceiling(paths[c["model"]], row, timing))
    return again


def best_ceilings(limits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points of the same model, batch and chunk length share the best ceiling measured for
    that shape (other processes on the machine can only ever have slowed a measurement down)."""
    best: dict[tuple[str, int, int], dict[str, float]] = {}
    for c in limits:
        key = (c["model"], c["batch"], c["steps"])
        top = best.setdefault(key, {"steps_per_s": 0.0, "steps_per_s_1_thread": 0.0})
        for field in top:
            top[field] = max(top[field], c[field])
    out = []
    for c in limits:
        top = best[(c["model"], c["batch"], c["steps"])]
        ms = 1000 * c["batch"] * c["steps"] / top["steps_per_s"]
        out.append(c | top | {"ms_per_run": ms})
    return out


def memory(repo: Path, sessions: int) -> dict[str, Any]:
    """The idle-session memory check, in a fresh process."""
    argv = [sys.executable, "-m", "bench.memory", "--sessions", str(sessions), "--repo", str(repo)]
    done = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=300)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ints(text: str) -> set[int]:
    return {int(v) for v in text.split(",") if v.strip()}


def _progress(row: dict[str, Any]) -> str:
    exact = row.get("exact")
    check = ""
    if exact is not None:
        check = f" exact {exact['replies'] - exact['mismatched']}/{exact['replies']}" + (
            "" if not exact["mismatched"] else f" (max |diff| {exact['max_abs_diff']:.2e})"
        )
    return (
        f"{row['server']:>8} {row['model']:>12} {row['mode']:>6} S={row['sessions']:<5} "
        f"k={row['steps']:<3} {row['steps_per_s']:>9.0f} steps/s {row['messages_per_s']:>7.0f} "
        f"msg/s p50 {row['p50_ms']:.2f} ms cpu {row['server_cpu_pct']:.0f}% "
        f"batch {row['mean_batch'] or 0:.1f} client {row['client']} "
        f"{row['client_us_per_msg']:.1f} µs/msg{check}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--quick", action="store_true", help="short points (~2 s each)")
    parser.add_argument("--memory-sessions", type=int, default=100_000)
    parser.add_argument(
        "--modes", default="", help="only these modes, comma-separated (e.g. multi,columns)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the idle-session check")
    parser.add_argument("--sessions", default="", help="only these S, comma-separated")
    parser.add_argument("--steps", default="", help="only these k, comma-separated")
    parser.add_argument("--bench-model-only", action="store_true", help="no langid points")
    parser.add_argument(
        "--client", choices=("python", "native"), default="python",
        help="the load generator: this process (asyncio gRPC) or native/build/lstm-serve-load "
        "(stream and echo points; `make native`)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.client == "native" and not LOAD_BINARY.is_file():
        parser.error(f"the native load generator is not built ({LOAD_BINARY}): make native")
    timing = (0.3, 1.2) if args.quick else (0.8, 3.0)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lstm-bench-") as tmp:
        repo = Path(tmp)
        paths = build_repository(repo)
        points = sweep_points("langid-chars" in paths)
        if args.modes:
            points = [p for p in points if p[1].mode in args.modes.split(",")]
        if args.sessions:
            points = [p for p in points if p[1].sessions in _ints(args.sessions)]
        if args.steps:
            points = [p for p in points if p[1].steps in _ints(args.steps)]
        if args.bench_model_only:
            points = [p for p in points if p[0] == BENCH_MODEL]
        rows, limits = sweep(repo, paths, points, timing, args.client)
        limits = best_ceilings(limits + remeasure(paths, limits, timing))[: len(limits)]
        mem = None if args.no_memory else memory(repo, args.memory_sessions)
    results = {
        "command": "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version()},
        "client": args.client,
        "server_flags": {"batched": BATCHED, "naive": NAIVE},
        "timing": {"warmup_s": timing[0], "seconds": timing[1]},
        "points": rows,
        "ceilings": limits,
        "memory": mem,
    }
    results["total_seconds"] = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(write_report(results, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
