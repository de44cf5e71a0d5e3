"""The native front (native/) against the Python front: one lstm-serve process behind both.

    python -m bench.native compare --sessions 1 64 256 --seconds 3 --rounds 2
    python -m bench.native compare --client both     # each point by both load generators
    python -m bench.native memory --streams 4000     # RSS per idle stream, each front
    python -m bench.native hop --messages 3000       # the front's own latency (canned replies)
    python -m bench.native heap --streams 1000       # the front's heap per idle stream, by site
    python -m bench.native compare --client native --front-flags '--max-ticks-in-flight 2'
    python -m bench.native compare --client native --text   # chunks of text, langid-chars
    python -m bench.native compare --multi 4 --sessions 256 1024   # StreamMulti: S over 4 calls

`compare` starts lstm-serve (bench.run's batched flags) with --native-front-dir and the front,
then drives the same load (bench.load: S streams, one step per message, ping-pong) through the
Python front's port and the native front's port back to back, and prints messages/s, latency
and CPU per message of each process. `--client native` drives it from native/build/lstm-serve-load
instead of this process (its sampled replies checked against offline onnxruntime), `both`
from each in turn. `--multi G` drives StreamMulti instead (bench.load's multi mode, this
process only: S sessions over G calls, each message one 1-step chunk per session of its call)
and prints steps/s beside messages/s. `hop` puts the front before a Python Ticks server that
answers every message with a canned reply, beside a Python server answering Stream the same
way: the difference is the front's own cost. Loopback only; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

from bench.load import Load, drive
from bench.model import BENCH_MODEL, build_repository
from bench.native_load import LOAD_BINARY, drive_native, verify_exact
from bench.procs import (
    HOST,
    NATIVE_FRONT,
    FrontedProcess,
    Process,
    free_port,
    listening,
    start_front,
    start_lstm_serve,
    start_native,
)
from bench.run import BATCHED, VOCAB
from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from lstmserve.v1 import native_front_pb2 as npb
from service.native_front import FRAME

TEXT_MODEL = "langid-chars"  # compare --text: a character tokenizer

MAX_STREAMS = 20_000
MAX_MESSAGES = 100_000


def _cpu(ps: psutil.Process) -> float:
    times = ps.cpu_times()
    return float(times.user + times.system)


def compare(
    proc: FrontedProcess, sessions: int, timing: tuple[float, float], client: str = "python",
    repo: Path | None = None, text: bool = False, multi: int = 0,
) -> list[dict]:  # fmt: skip
    """One point through each front: msg/s, p50 / p99, CPU µs per message of each process
    (the client's too); with the native client and `repo`, its sample checked for exactness.
    `text` (the native client only): each chunk one random letter of text, on langid-chars
    (no exactness check: the sample holds token ids). `multi` > 0: StreamMulti, the S sessions
    over that many calls (the Python client)."""
    model = TEXT_MODEL if text else BENCH_MODEL
    rows = []
    for label, address in (("python", proc.server.address), ("native", proc.address)):
        marks: dict[str, tuple[float, float, float, float]] = {}
        me = psutil.Process()

        async def on_window(edge: str, marks: dict = marks, me: psutil.Process = me) -> None:
            marks[edge] = (time.perf_counter(), _cpu(proc.server.ps), _cpu(proc.ps), _cpu(me))

        load = Load("multi", sessions, 1, multi) if multi else Load("stream", sessions, 1, sessions)
        args = (load, address, model, VOCAB[model], *timing, on_window)
        if client == "native":
            native = asyncio.run(drive_native(*args, sample=0, text=True) if text else
                                 drive_native(*args))  # fmt: skip
            completed, client_cpu = native.completed, native.client_cpu_s
            p50, p99 = native.p50_ms, native.p99_ms
        else:
            window = asyncio.run(drive(*args))
            lat = np.array(window.latencies or [float("nan")]) * 1000
            completed = window.completed
            p50, p99 = float(np.percentile(lat, 50)), float(np.percentile(lat, 99))
        (t0, s0, f0, c0), (t1, s1, f1, c1) = marks["start"], marks["end"]
        client_cpu = client_cpu if client == "native" else c1 - c0
        window_s = native.seconds if client == "native" else t1 - t0  # the binary times its own
        done = max(completed, 1)
        row = {
            "front": label, "client": client, "sessions": sessions,
            "messages_per_s": completed / window_s, "p50_ms": p50, "p99_ms": p99,
            "steps_per_s": completed * load.per_message * load.steps / window_s,
            "server_us_per_msg": 1e6 * (s1 - s0) / done,
            "front_us_per_msg": 1e6 * (f1 - f0) / done if label == "native" else 0.0,
            "client_us_per_msg": 1e6 * client_cpu / done,
        }  # fmt: skip
        if client == "native" and repo is not None and not text:
            row["exact"] = verify_exact(native.sample, repo, BENCH_MODEL, load.steps)
        rows.append(row)
    return rows


def _compare_line(round_: int, s: int, row: dict) -> str:
    exact = row.get("exact")
    check = ""
    if exact is not None:
        check = f" exact {exact['replies'] - exact['mismatched']:,}/{exact['replies']:,}"
        check += "" if not exact["mismatched"] else f" (max |diff| {exact['max_abs_diff']:.2e})"
    return (
        f"round {round_} S={s:<4} {row['front']:>6} front, {row['client']:>6} client "
        f"{row['messages_per_s']:>8,.0f} msg/s {row['steps_per_s']:>9,.0f} steps/s "
        f"p50 {row['p50_ms']:.2f} p99 {row['p99_ms']:.2f} ms "
        f"CPU/msg server {row['server_us_per_msg']:.0f} µs front {row['front_us_per_msg']:.0f} µs "
        f"client {row['client_us_per_msg']:.1f} µs{check}"
    )


async def hold_idle(address: str, streams: int) -> list[Any]:
    """`streams` Stream calls, each with an open session, left idle (the calls returned)."""
    channels = [grpc.aio.insecure_channel(address) for _ in range(max(1, streams // 100))]
    calls = []
    for i in range(streams):
        gate: asyncio.Event = asyncio.Event()

        async def requests(gate: asyncio.Event = gate) -> Any:
            yield pb.StreamRequest(open=pb.OpenSession(model=BENCH_MODEL))
            await gate.wait()

        call = pb_grpc.LstmServeStub(channels[i % len(channels)]).Stream(requests())
        await call.read()
        calls.append((call, gate))
    return [channels, calls]


def memory(proc: FrontedProcess, streams: int) -> dict[str, float]:
    """RSS per idle stream in the server, through each front, and in the front."""
    out: dict[str, float] = {}
    for label, address in (("python", proc.server.address), ("native", proc.address)):
        loop = asyncio.new_event_loop()
        loop.run_until_complete(hold_idle(address, min(200, streams)))  # warm: pools, arenas
        time.sleep(1)
        server0, front0 = proc.server.ps.memory_info().rss, proc.ps.memory_info().rss
        held = loop.run_until_complete(hold_idle(address, streams))
        time.sleep(2)
        out[f"{label}_server_bytes"] = (proc.server.ps.memory_info().rss - server0) / streams
        if label == "native":
            out["native_front_bytes"] = (proc.ps.memory_info().rss - front0) / streams
        del held
        loop.close()
    return out


def heap(repo: Path, folder: Path, streams: int) -> list[str]:
    """Where the front's heap goes per idle stream: the front under valgrind's massif, holding
    `streams` idle Stream calls (each with an open session); the peak snapshot's allocation
    sites, in bytes per stream."""
    if shutil.which("valgrind") is None or shutil.which("ms_print") is None:
        raise SystemExit("heap needs valgrind (apt-get install valgrind)")
    server = start_lstm_serve(repo, [*BATCHED, "--native-front-dir", str(folder)])
    out = folder.parent / "massif.out"
    try:
        port = free_port()
        argv = ["valgrind", "--tool=massif", f"--massif-out-file={out}", "--threshold=1.0",
                str(NATIVE_FRONT), "--listen", f"{HOST}:{port}", "--dir", str(folder)]  # fmt: skip
        front = listening(Process(argv, port), 120.0, "the native front under valgrind")
        loop = asyncio.new_event_loop()
        held = loop.run_until_complete(hold_idle(front.address, streams))
        time.sleep(3)
        front.stop()  # SIGTERM: massif writes its snapshots
        del held
        loop.close()
    finally:
        server.stop()
    text = subprocess.run(["ms_print", str(out)], capture_output=True, text=True, check=True)
    number = re.search(r"(\d+) \(peak\)", text.stdout)
    if number is None:
        raise SystemExit(f"no peak snapshot in {out}")
    header = re.compile(rf"^ *{number.group(1)} +[\d,]+ +[\d,]+ ", re.M)
    peak = text.stdout[header.search(text.stdout).end() :]  # type: ignore[union-attr]
    following = re.search(r"^ *\d+ +[\d,]+ +[\d,]+ +[\d,]+ +[\d,]+ +\d+ *$", peak, re.M)
    peak = peak[: following.start()] if following else peak
    sites = re.findall(r"^([| ]*)->\d+\.\d+% \(([\d,]+)B\) (?:0x[0-9A-F]+: )?(.*)$", peak, re.M)
    lines = []
    for indent, size, where in sites:  # the callers of each allocator, and large sites below
        depth, per = len(indent) // 2, int(size.replace(",", "")) / streams
        if depth <= 1 or (depth <= 4 and per >= 1000):
            lines.append(f"{'  ' * depth}{per:8,.0f} B/stream  {where[:110]}")
    return lines


class CannedTicks(asyncio.Protocol):
    """The ticks socket's framing (service/native_front.py), every message answered with the
    same small chunk reply."""

    def connection_made(self, transport: Any) -> None:
        self.transport, self.buffer = transport, bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= FRAME.size:
            (size,) = FRAME.unpack_from(self.buffer)
            if len(self.buffer) < FRAME.size + size:
                return
            tick = npb.Tick.FromString(bytes(self.buffer[FRAME.size : FRAME.size + size]))
            del self.buffer[: FRAME.size + size]
            reply = npb.TickReply(tick=tick.id)
            seqs = [e.request.chunk.seq for e in tick.entries]  # then the packed chunks'
            for packed in (tick.chunk_seqs, tick.frame_seqs, tick.text_seqs):
                seqs += np.frombuffer(packed, "<u8").tolist()
            for i, seq in enumerate(seqs):
                out = reply.outcomes.add(index=i)
                out.reply.CopyFrom(canned(seq))
            data = reply.SerializeToString()
            self.transport.write(FRAME.pack(len(data)) + data)


class CannedStream(pb_grpc.LstmServeServicer):
    async def Stream(self, request_iterator: Any, context: Any) -> Any:
        async for request in request_iterator:
            yield canned(request.chunk.seq)


def canned(seq: int) -> pb.StreamResponse:
    reply = pb.StreamResponse(session_id="0" * 32)
    reply.chunk.seq, reply.chunk.steps, reply.chunk.total_steps = seq, 1, seq
    reply.chunk.probabilities.extend([0.25] * 4)
    return reply


async def ping_pong(address: str, messages: int) -> float:
    """p50 ms of one stream sending a one-token chunk and waiting for the reply."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.LstmServeStub(channel).Stream()
        lat = []
        for seq in range(1, messages + 1):
            chunk = pb.Chunk(seq=seq, input=pb.SequenceInput(tokens=pb.TokenIds(ids=[1])))
            start = time.perf_counter()
            await call.write(pb.StreamRequest(chunk=chunk))
            await call.read()
            lat.append(time.perf_counter() - start)
        await call.done_writing()
    return float(np.percentile(lat[messages // 5 :], 50) * 1000)


async def hop(messages: int, rounds: int) -> list[tuple[float, float]]:
    """(Python p50, through the front p50) per round, both with canned replies."""
    folder = Path(tempfile.mkdtemp(prefix="lstm-native-hop-"))
    os.chmod(folder, 0o700)
    ticks = await asyncio.get_running_loop().create_unix_server(CannedTicks, f"{folder}/ticks.sock")
    server = grpc.aio.server()
    pb_grpc.add_LstmServeServicer_to_server(CannedStream(), server)
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    front = await asyncio.to_thread(start_front, folder)
    out = []
    try:
        for _ in range(rounds):  # the client is this process: each measured alone
            direct = await ping_pong(f"{HOST}:{port}", messages)
            out.append((direct, await ping_pong(front.address, messages)))
    finally:
        front.stop()
        await server.stop(0)
        ticks.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("what", choices=("compare", "memory", "hop", "heap"))
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--streams", type=int, default=4000)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument(
        "--front-flags",
        default="",
        help="extra flags for the front, e.g. '--max-ticks-in-flight 2'",
    )
    parser.add_argument(
        "--client", choices=("python", "native", "both"), default="python",
        help="compare's load generator: this process (asyncio gRPC), "
        "native/build/lstm-serve-load, or each in turn at every point",
    )  # fmt: skip
    parser.add_argument(
        "--text", action="store_true",
        help=f"compare's chunks as text (one random letter each) on {TEXT_MODEL}: "
        "--client native only, no exactness check",
    )  # fmt: skip
    parser.add_argument(
        "--multi", type=int, default=0, metavar="G",
        help="compare StreamMulti: each point's S sessions over G calls (the Python client)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.text and args.client != "native":
        print("--text needs --client native", file=sys.stderr)
        return 2
    if args.multi and args.client != "python":
        print("--multi drives StreamMulti from this process: --client python", file=sys.stderr)
        return 2
    if args.client != "python" and not LOAD_BINARY.is_file():
        print(f"the native load generator is not built ({LOAD_BINARY}): make native",
              file=sys.stderr)  # fmt: skip
        return 1
    if not NATIVE_FRONT.is_file():
        print(f"the native front is not built ({NATIVE_FRONT}): make native", file=sys.stderr)
        return 1
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    if args.what == "hop":
        for direct, fronted in asyncio.run(hop(min(args.messages, MAX_MESSAGES), args.rounds)):
            print(f"p50 Python {direct:.3f} ms, through the front {fronted:.3f} ms "
                  f"(+{fronted - direct:.3f})")  # fmt: skip
        return 0
    with tempfile.TemporaryDirectory(prefix="lstm-bench-native-") as tmp:
        repo = Path(tmp) / "repo"
        models = build_repository(repo)
        if args.text and TEXT_MODEL not in models:
            print(f"--text needs {TEXT_MODEL} (models/{TEXT_MODEL}/1)", file=sys.stderr)
            return 2
        if args.what == "heap":
            print("\n".join(heap(repo, Path(tmp) / "sockets", min(args.streams, MAX_STREAMS))))
            return 0
        clients = ("python", "native") if args.client == "both" else (args.client,)
        proc = start_native(repo, BATCHED, Path(tmp) / "sockets", args.front_flags.split())
        try:
            if args.what == "memory":
                print(memory(proc, min(args.streams, MAX_STREAMS)))
                return 0
            for round_ in range(args.rounds):
                for s in args.sessions:
                    for client in clients:
                        timing = (args.warmup, args.seconds)
                        point = (proc, min(s, MAX_STREAMS), timing, client, repo, args.text,
                                 args.multi)  # fmt: skip
                        for row in compare(*point):
                            print(_compare_line(round_, s, row), flush=True)
        finally:
            proc.stop()
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
