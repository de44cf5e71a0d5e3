"""lstm-serve beside TorchServe 0.12 and tritonserver 2.51: the same model, the same load, one run.

    python -m bench.peers --setup                        # once: .venv-peers (TorchServe, Triton)
    python -m bench.peers --seconds 5 --streams 1 16 64 --repeat 3
    python -m bench.peers --systems lstm-serve-native tritonserver torchserve-grpc --streams 64
                                                         # issue 25's peer targets alone
    python -m bench.peers --streams 1 64 256 --repeat 3  # every system and every target of
                                                         # issue 25 in one run

Each system is started here as a subprocess on 127.0.0.1 (free ports) and serves the bench model
of bench/model.py (2-layer LSTM 256, tokens in, 4 classes, the same ONNX file for all three);
all are up for the whole run and every point measures them back to back. The load is the same
for all: S concurrent sequences, one step per message, each sending the next message only after
the reply, for --seconds after a warm-up, through each system's own streaming client:

  lstm-serve       lstmserve.v1 Stream (grpc.aio), one stream per sequence (bench/load.py)
  lstm-serve-native  the same, through the native front (native/, `make native`) in front of
                   another lstm-serve with the same flags (CPU: both processes)
  tritonserver     tritonclient.grpc.aio stream_infer, one stream per sequence (bench/triton.py's
                   loop), Python backend, sequence batcher (direct), model.py on onnxruntime
  torchserve       HTTP POST /predictions/MODEL with the ts_request_sequence_id header, a
                   kept-alive connection per sequence (aiohttp), sequenceBatching, onnxruntime
  torchserve-grpc  the same TorchServe through gRPC StreamPredictions2, a stream per sequence
  echo             bench.echo: a grpc.aio server that answers each message with canned bytes of a
                   reply's size (no parsing, no model): what a Python gRPC server can reach
  floor            bench.echo --protocol: lstmserve.v1 Stream parsed and answered by grpc.aio,
                   no session and no model (the Python front's protocol floor)

`--client native` drives the four lstmserve.v1 systems (lstm-serve, lstm-serve-native, echo,
floor) with native/build/lstm-serve-load instead (`make native`; a sample of its replies checked
exact against offline onnxruntime); the peers keep their Python clients, so the peer targets are
then not judged (the clients differ), only the echo, floor and latency ones.

A peer whose install is missing is skipped with what to install; a server whose port another
process took before it bound is started again on fresh ports. Bounded: at most MAX_STREAMS
sequences, MAX_SECONDS per window, MAX_MESSAGES messages per sequence, loopback only.
Writes --out (JSON) and prints the table with lstm-serve's and the native front's ratios to
each system, then issue 25's target at S = 64 (the native front >= 5x torchserve-grpc, >= 3x
tritonserver), met or missed, and where measured issue 25's other targets: S = 256 the native
front >= 2x echo and lstm-serve >= 60 % of the floor, S = 1 the native front's p50 within 0.2 ms
of lstm-serve's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.load import Load, Window, drive, message_sizes, run_window, window_barrier
from bench.model import BENCH_MODEL, ROOT, build_repository
from bench.native_load import LOAD_BINARY, drive_native, verify_exact
from bench.procs import HOST, NATIVE_FRONT, free_port, start_echo, start_lstm_serve, start_native
from bench.run import BATCHED, VOCAB

PEERS_DIR = Path(__file__).resolve().parent / "peers"
PEER_HOME = ROOT / ".venv-peers"  # gitignored: the TorchServe venv and the unpacked pytriton wheel
PYTRITON = PEER_HOME / "pytriton"
MAX_RESTARTS = 3  # per server and run, after it died under load
MAX_STARTS = 3  # per start: a port another process took between free_port() and the bind
# what a server says when its port was taken (TorchServe, tritonserver, lstm-serve, the front)
PORT_TAKEN = ("already in use", "address is in use", "cannot listen on", "failed to bind")
LOGS = Path(tempfile.gettempdir()) / "lstm-bench-peers-logs"  # server logs of failed points
SYSTEMS = ("lstm-serve", "lstm-serve-native", "tritonserver", "torchserve", "torchserve-grpc",
           "echo", "floor")  # fmt: skip
OURS = ("lstm-serve", "lstm-serve-native", "echo", "floor")  # lstmserve.v1: --client native
EXACT = ("lstm-serve", "lstm-serve-native")  # their replies are the model's
SERVER = {"torchserve-grpc": "torchserve"}  # the same TorchServe process, its gRPC front
MAX_STREAMS = 1024
MAX_SECONDS = 600.0
MAX_MESSAGES = 1_000_000  # per sequence, whatever the window
MAX_BATCH = 256  # every system: at most 256 sequences in one model run (lstm-serve's flag)
QUEUE_DELAY_US = 1000  # every system: wait at most 1 ms for a batch to fill (lstm-serve default)
THREADS = 2  # onnxruntime intra-op threads everywhere (the machine has 2 cores)
SETUP = [
    "python3 -m venv .venv-peers",
    ".venv-peers/bin/pip install 'torchserve==0.12.*' 'torch-model-archiver==0.12.*' "
    "torch==2.13.0 pyyaml numpy onnxruntime",
    "apt-get update && apt-get install -y openjdk-17-jre-headless   # as root: Java for TorchServe",
    "pip download nvidia-pytriton==0.7.0 --no-deps -d .venv-peers/wheels && "
    "unzip -q .venv-peers/wheels/nvidia_pytriton-0.7.0-*.whl -d .venv-peers/pytriton",
]


# ---- configuration of the peers (pure) -------------------------------------------------------


def triton_config(
    model: str, max_batch: int, delay_us: int, threads: int, instances: int = 1
) -> str:
    """config.pbtxt: Python backend, sequence batcher, direct strategy, START/END controls."""
    return f"""name: "{model}"
backend: "python"
max_batch_size: {max_batch}
input [ {{ name: "tokens" data_type: TYPE_INT64 dims: [ -1 ] }} ]
output [ {{ name: "probs" data_type: TYPE_FP32 dims: [ 4 ] }} ]
sequence_batching {{
  max_sequence_idle_microseconds: 60000000
  direct {{ max_queue_delay_microseconds: {delay_us} minimum_slot_utilization: 0.0 }}
  control_input [
    {{ name: "START" control [ {{ kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0, 1 ] }} ] }},
    {{ name: "END" control [ {{ kind: CONTROL_SEQUENCE_END fp32_false_true: [ 0, 1 ] }} ] }},
    {{ name: "READY" control [ {{ kind: CONTROL_SEQUENCE_READY fp32_false_true: [ 0, 1 ] }} ] }}
  ]
}}
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
parameters [ {{ key: "intra_op_threads" value: {{ string_value: "{threads}" }} }} ]
"""


def ts_model_config(
    batch: int, delay_ms: int, threads: int, max_sequences: int, workers: int = 1
) -> str:
    """model-config.yaml of the archive: `workers` worker processes, sequence batching."""
    return (
        f"minWorkers: {workers}\nmaxWorkers: {workers}\n"
        f"batchSize: {batch}\nmaxBatchDelay: {delay_ms}\n"
        "sequenceBatching: true\nsequenceMaxIdleMSec: 60000\n"
        f"maxSequenceJobQueueSize: 4\nmaxNumSequence: {max_sequences}\n"
        f"responseTimeout: 120\nhandler:\n  intra_op_threads: {threads}\n"
    )


def peer_configs(workers: int, slots: int = MAX_BATCH) -> dict[str, str]:
    """The peers' configurations for `workers` model processes (TorchServe workers, Triton
    instances), the 2 onnxruntime threads shared out among them; `slots`: Triton's sequence
    slots per instance (its max_batch_size): as many as the largest S needs, at most 256 (2.51
    died with signal 11 at S = 64 with 256 slots and with 64 alike; see bench/README.md)."""
    threads = max(1, THREADS // workers)
    return {
        "tritonserver": triton_config(BENCH_MODEL, slots, QUEUE_DELAY_US, threads, workers),
        "torchserve": ts_model_config(
            MAX_BATCH, QUEUE_DELAY_US // 1000, threads, MAX_STREAMS, workers
        ),
    }


def ts_properties(ports: dict[str, int], store: Path) -> str:
    """config.properties: every listener on 127.0.0.1, no token auth, no config snapshots."""
    return "\n".join([
        f"inference_address=http://{HOST}:{ports['inference']}",
        f"management_address=http://{HOST}:{ports['management']}",
        f"metrics_address=http://{HOST}:{ports['metrics']}",
        f"grpc_inference_address={HOST}",
        f"grpc_management_address={HOST}",
        f"grpc_inference_port={ports['grpc']}",
        f"grpc_management_port={ports['grpc_management']}",
        f"model_store={store}",
        "disable_token_authorization=true",
        "default_workers_per_model=1",
        "install_py_dep_per_model=false",
        "disable_system_metrics=true",
        "vmargs=-Xmx1g -XX:+UseG1GC",
        "",
    ])  # fmt: skip


def missing(system: str, client: str = "python") -> str | None:
    """What to install for `system` (driven by `client`), or None when it is there."""
    if client == "native" and system in OURS and not LOAD_BINARY.is_file():
        return f"--client native: no {LOAD_BINARY}; run make native"
    if system in ("torchserve", "torchserve-grpc"):
        if not (PEER_HOME / "bin" / "torchserve").exists():
            return "TorchServe: no .venv-peers/bin/torchserve; run python -m bench.peers --setup"
        if shutil.which("java") is None:
            return "TorchServe: no java; apt-get install -y openjdk-17-jre-headless (as root)"
    if system == "lstm-serve-native" and not NATIVE_FRONT.is_file():
        return f"lstm-serve-native: no {NATIVE_FRONT}; run make native"
    if system == "tritonserver" and not triton_binary().exists():
        return f"tritonserver: no {triton_binary()}; run python -m bench.peers --setup"
    return None


def triton_slots(streams: list[int]) -> int:
    """Triton sequence slots per instance: enough for the largest S, at most MAX_BATCH."""
    return max(1, min(MAX_BATCH, max(streams)))


def triton_binary() -> Path:
    return PYTRITON / "pytriton" / "tritonserver" / "bin" / "tritonserver"


# ---- processes --------------------------------------------------------------------------------


class Tree:
    """A server started here with its children (TorchServe: launcher -> java -> worker; Triton:
    tritonserver -> Python backend stub): CPU of the whole tree, stopped as a whole."""

    def __init__(self, argv: list[str], port: int, log: Path, env: dict[str, str]) -> None:
        self.port = port
        self.grpc_port = -1
        self.stubs: Any = None  # TorchServe: its generated gRPC modules
        self.log = log
        with log.open("wb") as out:
            self.popen = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.ps = psutil.Process(self.popen.pid)
        self.known: dict[int, psutil.Process] = {self.popen.pid: self.ps}

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def members(self) -> list[psutil.Process]:
        try:
            for child in self.ps.children(recursive=True):
                self.known.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass
        return list(self.known.values())

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self.members():
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            text = self.log.read_text(errors="replace")
            errors = [line for line in text.splitlines() if line.startswith(("E", "Traceback"))]
            tail = "\n".join(errors[-10:]) + "\n" + text[-1500:]
            raise RuntimeError(f"{self.popen.args[0]} exited with {self.popen.returncode}: {tail}")

    def stop(self) -> None:
        procs = self.members()
        for proc in reversed(procs):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=15)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)


def wait_http(tree: Tree, url: str, ready: Callable[[bytes], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        tree.check_alive()
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200 and ready(response.read()):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            tree.stop()
            raise TimeoutError(f"{url} not ready in {timeout_s:.0f} s; log: {tree.log}")
        time.sleep(0.3)


def start_triton(work: Path, onnx: Path, args: argparse.Namespace) -> Tree:
    """tritonserver 2.51 from the pytriton wheel: the model repository and backend folder in
    `work`, the Python backend stub of this Python version, the wheel's libraries."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    server = triton_binary().parent.parent
    backends = work / "backends" / "python"
    backends.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (backends / name).symlink_to(server / "backends" / "python" / name)
    stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
    (backends / "triton_python_backend_stub").symlink_to(stub)
    model_dir = work / "triton" / BENCH_MODEL
    (model_dir / "1").mkdir(parents=True)
    config = peer_configs(args.peer_workers, triton_slots(args.streams))["tritonserver"]
    (model_dir / "config.pbtxt").write_text(config)
    site = ":".join(p for p in sys.path if p.endswith("site-packages"))
    (model_dir / "1" / "site_packages.txt").write_text(site)
    shutil.copy(PEERS_DIR / "triton_model.py", model_dir / "1" / "model.py")
    shutil.copy(PEERS_DIR / "lstm_states.py", model_dir / "1" / "lstm_states.py")
    shutil.copy(onnx, model_dir / "1" / "model.onnx")
    grpc_port, http_port = free_port(), free_port()
    libs = [str(PYTRITON / "nvidia_pytriton.libs"), str(server / "lib")]
    env = os.environ | {
        "LD_LIBRARY_PATH": ":".join([*libs, os.environ.get("LD_LIBRARY_PATH", "")]),
    }
    argv = [
        str(triton_binary()), "--model-repository", str(work / "triton"),
        "--backend-directory", str(work / "backends"), "--grpc-address", HOST,
        "--grpc-port", str(grpc_port), "--http-address", HOST, "--http-port", str(http_port),
        "--allow-metrics", "false", "--allow-gpu-metrics", "false", "--log-verbose", "0",
        "--exit-on-error", "true", "--strict-readiness", "true",
    ]  # fmt: skip
    tree = Tree(argv, grpc_port, work / "tritonserver.log", env)
    url = f"http://{HOST}:{http_port}/v2/models/{BENCH_MODEL}/ready"
    wait_http(tree, url, lambda _: True, 120)
    return tree


def start_torchserve(work: Path, onnx: Path, args: argparse.Namespace) -> Tree:
    """TorchServe 0.12 (the .venv-peers launcher, --foreground) with an archive built here."""
    store = work / "store"
    store.mkdir()
    config = work / "model-config.yaml"
    config.write_text(peer_configs(args.peer_workers)["torchserve"])
    shutil.copy(onnx, work / "model.onnx")
    shutil.copy(PEERS_DIR / "lstm_states.py", work / "lstm_states.py")
    archiver = [
        str(PEER_HOME / "bin" / "torch-model-archiver"), "--model-name", BENCH_MODEL,
        "--version", "1.0", "--handler", str(PEERS_DIR / "ts_handler.py"),
        "--extra-files", f"{work / 'model.onnx'},{work / 'lstm_states.py'}",
        "--config-file", str(config), "--export-path", str(store), "--archive-format", "no-archive",
    ]  # fmt: skip
    subprocess.run(archiver, check=True, capture_output=True, timeout=120)
    ports = {k: free_port() for k in ("inference", "management", "metrics", "grpc")}
    ports["grpc_management"] = free_port()
    props = work / "config.properties"
    props.write_text(ts_properties(ports, store))
    # ours alone: the launcher's pid file (TMPDIR) and the worker's socket, .ts.sock.9000 in the
    # JVM's java.io.tmpdir (TEMP): /tmp by default, where a second run's TorchServe would take it
    tmp = work / "tmp"
    tmp.mkdir()
    env = os.environ | {"TMPDIR": str(tmp), "TEMP": str(tmp), "TS_CONFIG_FILE": str(props),
                        "LOG_LOCATION": str(work), "METRICS_LOCATION": str(work)}  # fmt: skip
    env["PATH"] = f"{PEER_HOME / 'bin'}:{env.get('PATH', '')}"
    argv = [
        str(PEER_HOME / "bin" / "torchserve"), "--foreground", "--no-config-snapshots",
        "--disable-token-auth", "--model-store", str(store), "--ts-config", str(props),
        "--models", f"{BENCH_MODEL}={BENCH_MODEL}",
    ]  # fmt: skip
    tree = Tree(argv, ports["inference"], work / "torchserve.log", env)
    tree.grpc_port = ports["grpc"]

    def ready(body: bytes) -> bool:
        workers = json.loads(body)[0].get("workers", [])
        return any(w.get("status") == "READY" for w in workers)

    wait_http(tree, f"http://{HOST}:{ports['management']}/models/{BENCH_MODEL}", ready, 180)
    return tree


# ---- load -------------------------------------------------------------------------------------


async def drive_torchserve(
    port: int, load: Load, warmup_s: float, seconds: float,
    on_window: Callable[[str], Awaitable[None]],
) -> Window:  # fmt: skip
    """S sequences over HTTP, one kept-alive connection each, request after reply."""
    import aiohttp

    window = Window(start=float("inf"), end=float("inf"))
    url = f"http://{HOST}:{port}/predictions/{BENCH_MODEL}"
    ids = np.random.default_rng(load.sessions).integers(1, VOCAB[BENCH_MODEL], size=load.steps)
    body = ids.astype("<i8").tobytes()

    ready, opened = window_barrier(window, load.sessions, warmup_s, seconds)

    async def post(http: Any, headers: dict[str, str]) -> None:
        async with http.post(url, data=body, headers=headers) as response:
            text = await response.text()
            if response.status != 200 or len(json.loads(text)) != 4:
                raise RuntimeError(f"torchserve replied {response.status}: {text[:200]}")

    async def sequence(index: int) -> None:
        headers = {"ts_request_sequence_id": f"seq-{os.getpid()}-{load.sessions}-{index}",
                   "Content-Type": "application/octet-stream"}  # fmt: skip
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as http:
            await post(http, headers)
            await ready()
            for _ in range(MAX_MESSAGES):
                if time.perf_counter() >= window.end:
                    break
                sent = time.perf_counter()
                await post(http, headers)
                window.record(sent, time.perf_counter())
            await post(http, headers | {"ts_request_sequence_end": "true"})

    return await run_window((sequence(i) for i in range(load.sessions)), window, opened, on_window)


def torchserve_stubs(work: Path) -> tuple[Any, Any]:
    """inference_pb2 / inference_pb2_grpc generated here (grpcio-tools) from the inference.proto
    that TorchServe's own model-server.jar carries."""
    import importlib
    import zipfile

    from grpc_tools import protoc

    jar = next((PEER_HOME / "lib").glob("python3*/site-packages/ts/frontend/model-server.jar"))
    protos = work / "proto"
    with zipfile.ZipFile(jar) as archive:
        for name in ("inference.proto", "google/rpc/status.proto"):
            (protos / name).parent.mkdir(parents=True, exist_ok=True)
            (protos / name).write_bytes(archive.read(name))
    include = Path(protoc.__file__).parent / "_proto"
    out = work / "stubs"
    out.mkdir(exist_ok=True)
    argv = ["protoc", f"-I{protos}", f"-I{include}", f"--python_out={out}",
            f"--grpc_python_out={out}", str(protos / "inference.proto"),
            str(protos / "google/rpc/status.proto")]  # fmt: skip
    if protoc.main(argv) != 0:
        raise RuntimeError("protoc failed on TorchServe's inference.proto")
    sys.path.insert(0, str(out))
    return importlib.import_module("inference_pb2"), importlib.import_module("inference_pb2_grpc")


async def drive_torchserve_grpc(
    port: int, stubs: tuple[Any, Any], load: Load, warmup_s: float, seconds: float,
    on_window: Callable[[str], Awaitable[None]],
) -> Window:  # fmt: skip
    """S sequences, each its own StreamPredictions2 bidi stream, request after reply."""
    import grpc

    pb2, pb2_grpc = stubs
    window = Window(start=float("inf"), end=float("inf"))
    ids = np.random.default_rng(load.sessions).integers(1, VOCAB[BENCH_MODEL], size=load.steps)
    body = ids.astype("<i8").tobytes()
    channels = [grpc.aio.insecure_channel(f"{HOST}:{port}")
                for _ in range(max(1, -(-load.sessions // 64)))]  # fmt: skip

    ready, opened = window_barrier(window, load.sessions, warmup_s, seconds)

    async def sequence(index: int) -> None:
        stub = pb2_grpc.InferenceAPIsServiceStub(channels[index % len(channels)])
        call = stub.StreamPredictions2()
        request = pb2.PredictionsRequest(
            model_name=BENCH_MODEL, input={"data": body},
            sequence_id=f"g-{os.getpid()}-{load.sessions}-{index}",
        )  # fmt: skip

        async def one() -> None:
            await call.write(request)
            reply = await call.read()
            if reply is grpc.aio.EOF or reply.status.code != 0 or not reply.prediction:
                raise RuntimeError(f"StreamPredictions2 replied {reply}")

        await one()
        await ready()
        for _ in range(MAX_MESSAGES):
            if time.perf_counter() >= window.end:
                break
            sent = time.perf_counter()
            await one()
            window.record(sent, time.perf_counter())
        await call.done_writing()  # the end of the stream ends the sequence

    loops = (sequence(i) for i in range(load.sessions))
    return await run_window(loops, window, opened, on_window, channels)


_sequence_ids = iter(range(1, 2**62))  # Triton correlation ids, never reused within a run


async def drive_tritonserver(
    address: str, load: Load, warmup_s: float, seconds: float,
    on_window: Callable[[str], Awaitable[None]],
) -> Window:  # fmt: skip
    """bench/triton.py's stream_infer loop per sequence, with correlation ids not reused across
    points (bench/triton.py numbers each point's sequences from 1)."""
    import tritonclient.grpc.aio as grpc_aio

    from bench.triton import SEQUENCES_PER_CLIENT, grpc_sequence

    window = Window(start=float("inf"), end=float("inf"))

    ready, opened = window_barrier(window, load.sessions, warmup_s, seconds)

    n = max(1, -(-load.sessions // SEQUENCES_PER_CLIENT))
    clients = [grpc_aio.InferenceServerClient(address) for _ in range(n)]
    ids = np.random.default_rng(load.sessions).integers(1, VOCAB[BENCH_MODEL], size=load.steps)
    loops = [grpc_sequence(clients[i % n], BENCH_MODEL, ids, next(_sequence_ids), window, ready)
             for i in range(load.sessions)]  # fmt: skip
    return await run_window(loops, window, opened, on_window, clients)


def measure(
    system: str, proc: Any, load: Load, timing: tuple[float, float], client: str = "python",
    repo: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One system, one S: messages/s, latency percentiles, server (tree) CPU, client CPU;
    `client` "native": an lstmserve.v1 system driven by the native load generator (its sampled
    replies checked exact against onnxruntime on the model `repo` for lstm-serve's)."""
    marks: dict[str, tuple[float, float, float]] = {}
    me = psutil.Process()

    async def on_window(edge: str) -> None:
        marks[edge] = (time.perf_counter(), proc.cpu_seconds(), sum(me.cpu_times()[:2]))

    if system == "echo":  # canned replies of an lstm-serve reply's size
        load = Load("echo", load.sessions, load.steps, load.streams,
                    message_sizes(1, load.steps, mode="stream"))  # fmt: skip
    native = client == "native" and system in OURS
    vocab = VOCAB[BENCH_MODEL]
    if native:
        work: Awaitable[Any] = drive_native(load, proc.address, BENCH_MODEL, vocab, *timing,
                                            on_window)  # fmt: skip
    elif system in OURS:
        work = drive(load, proc.address, BENCH_MODEL, vocab, *timing, on_window)
    elif system == "tritonserver":
        work = drive_tritonserver(proc.address, load, *timing, on_window)
    elif system == "torchserve-grpc":
        work = drive_torchserve_grpc(proc.grpc_port, proc.stubs, load, *timing, on_window)
    else:
        work = drive_torchserve(proc.port, load, *timing, on_window)
    window = asyncio.run(work)
    (t0, cpu0, me0), (t1, cpu1, me1) = marks["start"], marks["end"]
    row: dict[str, Any] = {
        "system": system, "streams": load.sessions, "steps": load.steps,
        "client": "native" if native else "python",
        "server_cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0), "seconds": t1 - t0,
    }  # fmt: skip
    if native:  # its window and latencies, timed in the binary
        row |= {
            "messages_per_s": window.completed / window.seconds,
            "p50_ms": window.p50_ms, "p99_ms": window.p99_ms,
            "client_cpu_pct": 100 * window.client_cpu_s / window.seconds,
        }  # fmt: skip
        if system in EXACT and repo is not None:
            row["exact"] = verify_exact(window.sample, repo, BENCH_MODEL, load.steps)
        return row
    lat = np.array(window.latencies or [float("nan")]) * 1000
    return row | {
        "messages_per_s": window.completed / (t1 - t0),
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
        "client_cpu_pct": 100 * (me1 - me0) / (t1 - t0),
    }  # fmt: skip


def idle_cpu(procs: dict[str, Any], seconds: float = 2.0) -> dict[str, float]:
    """CPU % of each server while nobody sends anything (they are all up during every point)."""
    before = {name: proc.cpu_seconds() for name, proc in procs.items()}
    time.sleep(seconds)
    return {
        name: 100 * (proc.cpu_seconds() - before[name]) / seconds for name, proc in procs.items()
    }


# ---- results (pure) ---------------------------------------------------------------------------


BASELINES = {"lstm-serve": "x_lstm_serve", "lstm-serve-native": "x_native"}  # ratio keys
# Issue 25's targets, each (S, the system measured against, the ratio key, the least ratio):
# at S = 64 the native front against the peers, at S = 256 against the echo server, and the
# Python front's guard against the protocol floor.
TARGETS = (
    (64, "tritonserver", "x_native", 3.0),
    (64, "torchserve-grpc", "x_native", 5.0),
    (256, "echo", "x_native", 2.0),
    (256, "floor", "x_lstm_serve", 0.6),
)
P50_TARGET_MS = 0.2  # S = 1: the native front's p50 at most this much above lstm-serve's
WHO = {"x_native": "native front", "x_lstm_serve": "lstm-serve"}


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per S and system: median messages/s and latency over the repeats, the spread, and the
    ratio of lstm-serve's median to each system's, the native front's likewise (the ratio of
    each round's own figures too)."""
    out = []
    rows = [r for r in rows if "error" not in r]
    for s in sorted({r["streams"] for r in rows}):
        at = [r for r in rows if r["streams"] == s]
        for system in SYSTEMS:
            mine = [r for r in at if r["system"] == system]
            if not mine:
                continue
            rates = [r["messages_per_s"] for r in mine]
            row = {
                "streams": s, "system": system, "runs": len(mine),
                "messages_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
                "p50_ms": statistics.median(r["p50_ms"] for r in mine),
                "p99_ms": statistics.median(r["p99_ms"] for r in mine),
                "server_cpu_pct": statistics.median(r["server_cpu_pct"] for r in mine),
                "client_cpu_pct": statistics.median(r.get("client_cpu_pct", 0.0) for r in mine),
                "client": mine[0].get("client", "python"),
            }  # fmt: skip
            exact = [r["exact"] for r in mine if "exact" in r]
            if exact:  # the native client's sampled replies against onnxruntime
                row["mismatched"] = sum(e["mismatched"] for e in exact)
                row["max_abs_diff"] = max(e["max_abs_diff"] for e in exact)
            for baseline, key in BASELINES.items():
                if system != baseline:
                    row |= ratios(at, baseline, mine, key)
            out.append(row)
    return out


def ratios(
    at: list[dict[str, Any]], baseline: str, mine: list[dict[str, Any]], key: str
) -> dict[str, Any]:
    """{key: the baseline's median over this system's, key's per-round list: the same ratio in
    each round both were measured}; {} where the baseline has no figure at this S."""
    theirs = {r["round"]: r["messages_per_s"] for r in at if r["system"] == baseline}
    per_round = [theirs[r["round"]] / r["messages_per_s"] for r in mine
                 if r["round"] in theirs and r["messages_per_s"] > 0]  # fmt: skip
    if not theirs or not per_round:
        return {}
    median = statistics.median(r["messages_per_s"] for r in mine)
    rounds = "x_per_round" if key == "x_lstm_serve" else f"{key}_per_round"
    return {key: statistics.median(theirs.values()) / median,
            rounds: [round(x, 2) for x in per_round]}  # fmt: skip


def targets(summary: list[dict[str, Any]]) -> list[str]:
    """Issue 25's targets this run measured, one line each: the ratio (median and per round),
    met or missed; a target against a peer driven by another client is not judged; nothing
    where either side was not measured."""
    at = {(r["streams"], r["system"]): r for r in summary}
    lines = []
    for s, system, key, goal in TARGETS:
        r = at.get((s, system))
        if r is None or key not in r:
            continue
        mine = at[(s, "lstm-serve-native" if key == "x_native" else "lstm-serve")]
        rounds = ", ".join(f"{x:.1f}" for x in r[f"{key}_per_round" if key != "x_lstm_serve"
                                                  else "x_per_round"])  # fmt: skip
        verdict = "met" if r[key] >= goal else "missed"
        if mine["client"] != r["client"]:
            verdict = f"not judged: {mine['client']} client against {r['client']} client"
        lines.append(f"target S={s}: {WHO[key]} >= {goal:g}x {system}: {r[key]:.2f}x "
                     f"(rounds {rounds}): {verdict}")  # fmt: skip
    native, python = at.get((1, "lstm-serve-native")), at.get((1, "lstm-serve"))
    if native is not None and python is not None:
        extra = native["p50_ms"] - python["p50_ms"]
        verdict = "met" if extra <= P50_TARGET_MS else "missed"
        lines.append(f"target S=1: native front p50 within {P50_TARGET_MS} ms of lstm-serve's: "
                     f"{native['p50_ms']:.2f} vs {python['p50_ms']:.2f} ms ({extra:+.2f}): "
                     f"{verdict}")  # fmt: skip
    return lines


def table(summary: list[dict[str, Any]]) -> str:
    lines = [
        "| S | system | messages/s (median) | min - max | lstm-serve is | per round | "
        "native is | per round | p50 / p99 ms | server CPU | client CPU | client | max diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        cells = []
        for key, rounds in (("x_lstm_serve", "x_per_round"), ("x_native", "x_native_per_round")):
            cells.append(f"{r[key]:.1f}x" if key in r else "-")
            cells.append(", ".join(f"{x:.1f}" for x in r.get(rounds, [])) or "-")
        lines.append(
            f"| {r['streams']} | {r['system']} | {r['messages_per_s']:,.0f} | "
            f"{r['min']:,.0f} - {r['max']:,.0f} | {' | '.join(cells)} | "
            f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} | {r['server_cpu_pct']:.0f} % | "
            f"{r['client_cpu_pct']:.0f} % | {r['client']} | "
            f"{r.get('max_abs_diff', '-')} |"
        )
    return "\n".join(lines)


# ---- main -------------------------------------------------------------------------------------


def setup() -> int:
    """Install the peers into .venv-peers (what SETUP lists, less Java)."""
    home = PEER_HOME
    if not (home / "bin" / "pip").exists():
        subprocess.run([sys.executable, "-m", "venv", str(home)], check=True)
    pip = [str(home / "bin" / "pip"), "install", "-q"]
    # torch pinned: unpinned, pip may pick a CUDA build of several GB
    subprocess.run([*pip, "torchserve==0.12.*", "torch-model-archiver==0.12.*", "torch==2.13.0",
                    "pyyaml", "numpy", "onnxruntime"], check=True)  # fmt: skip
    if not triton_binary().exists():
        wheels = home / "wheels"
        subprocess.run([str(home / "bin" / "pip"), "download", "nvidia-pytriton==0.7.0",
                        "--no-deps", "-d", str(wheels)], check=True)  # fmt: skip
        import zipfile

        with zipfile.ZipFile(next(wheels.glob("nvidia_pytriton-0.7.0-*.whl"))) as wheel:
            wheel.extractall(PYTRITON)
        for path in (PYTRITON / "pytriton" / "tritonserver").rglob("*"):
            if path.is_file() and (path.parent.name == "bin" or path.name.endswith("_stub")):
                path.chmod(0o755)
    if shutil.which("java") is None:
        print("still missing: Java 17: apt-get install -y openjdk-17-jre-headless (as root)")
    return 0


def bounded(kind: Any, low: float, high: float) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        value = kind(raw)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{raw} is not in [{low}, {high}]")
        return value

    return parse


STARTERS = {"lstm-serve": lambda work, onnx, _: start_lstm_serve(work.parent / "repo", BATCHED),
            "lstm-serve-native": lambda work, onnx, _: start_native(
                work.parent / "repo", BATCHED, work / "sockets"),
            "tritonserver": start_triton, "torchserve": start_torchserve,
            "echo": lambda work, onnx, _: start_echo(),
            "floor": lambda work, onnx, _: start_echo(protocol=True)}  # fmt: skip


def port_taken(error: BaseException, work: Path) -> bool:
    """Whether a start failed because a port it was given was bound by someone else first (the
    machine is shared: any process may take a free port before the server binds it)."""
    texts = [str(error), *(log.read_text(errors="replace") for log in work.glob("*.log"))]
    return any(mark in text.lower() for text in texts for mark in PORT_TAKEN)


def start_server(server: str, tmp: Path, onnx: Path, args: argparse.Namespace) -> Any:
    """`server` started in a fresh folder under `tmp`, again on fresh ports (at most MAX_STARTS
    times) when a port was taken before it bound; a failed start's logs are kept in LOGS."""
    for attempt in range(1, MAX_STARTS + 1):
        work = Path(tempfile.mkdtemp(prefix=f"{server}-", dir=tmp))
        try:
            return STARTERS[server](work, onnx, args)
        except Exception as error:
            LOGS.mkdir(parents=True, exist_ok=True)
            for log in work.glob("*.log"):
                shutil.copy(log, LOGS / f"{server}-start{attempt}-{log.name}")
            if attempt == MAX_STARTS or not port_taken(error, work):
                raise
            print(f"{server}: a port was taken before it bound; starting it again on fresh ports "
                  f"(logs in {LOGS})", flush=True)  # fmt: skip
    raise AssertionError("unreachable")


def point(system: str, proc: Any, s: int, round_: int, args: argparse.Namespace) -> dict[str, Any]:
    """One measured point; a failure (a server that died, an error reply) is kept as a row with
    the error and the server's log copied to LOGS, and that system is not measured again."""
    began = time.perf_counter()
    try:
        row = measure(system, proc, Load("stream", s, 1, s), (args.warmup, args.seconds),
                      args.client, args.repo)  # fmt: skip
    except Exception as error:  # the run goes on with the other systems
        LOGS.mkdir(parents=True, exist_ok=True)
        log = getattr(proc, "log", None)
        if log is not None and log.exists():
            shutil.copy(log, LOGS / f"{system}-S{s}-round{round_}.log")
        print(f"round {round_} {system:>12} S={s:<4} FAILED: {error!r:.300} (logs in {LOGS})")
        return {"system": system, "streams": s, "steps": 1, "round": round_,
                "error": f"{error!r:.500}"}  # fmt: skip
    if row.get("exact", {}).get("mismatched"):  # a wrong reply is a failure, not a figure
        print(f"round {round_} {system:>12} S={s:<4} replies differ from onnxruntime: "
              f"{row['exact']}")  # fmt: skip
        return {"system": system, "streams": s, "steps": 1, "round": round_,
                "error": f"replies differ from onnxruntime: {row['exact']}"}  # fmt: skip
    print(f"round {round_} {system:>12} S={s:<4} {row['messages_per_s']:>8,.0f} msg/s "
          f"p50 {row['p50_ms']:.2f} ms p99 {row['p99_ms']:.2f} ms "
          f"cpu {row['server_cpu_pct']:.0f} % client {row['client_cpu_pct']:.0f} %",
          flush=True)  # fmt: skip
    wall_s = time.perf_counter() - began  # the window, its warm-up, opening and closing
    return row | {"round": round_, "load_average": os.getloadavg()[0], "wall_s": wall_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--setup", action="store_true", help="install the peers, then exit")
    parser.add_argument("--seconds", type=bounded(float, 0.5, MAX_SECONDS), default=5.0)
    parser.add_argument("--warmup", type=bounded(float, 0.0, 60.0), default=1.0)
    parser.add_argument("--streams", type=bounded(int, 1, MAX_STREAMS), nargs="+",
                        default=[1, 16, 64])  # fmt: skip
    parser.add_argument("--repeat", type=bounded(int, 1, 20), default=1)
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--client", choices=("python", "native"), default="python",
                        help="what drives lstmserve.v1's systems (peers: Python)")  # fmt: skip
    parser.add_argument("--peer-workers", type=bounded(int, 1, 2), default=1,
                        help="TorchServe workers / Triton instances")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench/results/peers.json"))
    args = parser.parse_args(argv)
    if args.setup:
        return setup()
    started = time.perf_counter()
    skipped = {s: why for s in args.systems if (why := missing(s, args.client))}
    for why in skipped.values():
        print(f"skipped: {why}", flush=True)
    systems = [s for s in args.systems if s not in skipped]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lstm-bench-peers-") as tmp:
        repo = Path(tmp) / "repo"
        onnx = build_repository(repo)[BENCH_MODEL]
        args.repo = repo
        procs: dict[str, Any] = {}
        idle: dict[str, float] = {}
        failed: set[str] = set()
        crashes: dict[str, list[str]] = {}  # server -> the points where it died
        start_s: dict[str, float] = {}  # server -> seconds from launch to ready (first start)
        try:
            for system in systems:  # all up at once: every point measures them back to back
                server = SERVER.get(system, system)
                if server not in procs:
                    began = time.perf_counter()
                    procs[server] = start_server(server, Path(tmp), onnx, args)
                    start_s[server] = round(time.perf_counter() - began, 1)
                    print(f"{server} up in {start_s[server]:.1f} s", flush=True)
                if system == "torchserve-grpc":
                    procs[server].stubs = torchserve_stubs(Path(tempfile.mkdtemp(dir=tmp)))
            idle = idle_cpu(procs)
            for round_ in range(args.repeat):
                for s in args.streams:
                    for system in systems:
                        if system in failed:
                            continue
                        server = SERVER.get(system, system)
                        row = point(system, procs[server], s, round_, args)
                        rows.append(row)
                        if "error" not in row:
                            continue
                        if not isinstance(procs[server], Tree) or procs[server].alive():
                            failed.add(system)  # an error reply: not measured again
                        elif len(crashes.setdefault(server, [])) >= MAX_RESTARTS:
                            failed.add(system)
                        else:  # the server died (tritonserver 2.51: signal 11): a fresh one
                            crashes[server].append(f"S={s} round {round_}")
                            stubs = getattr(procs[server], "stubs", None)
                            procs[server].stop()
                            procs[server] = start_server(server, Path(tmp), onnx, args)
                            if stubs is not None:  # the same TorchServe jar: the same stubs
                                procs[server].stubs = stubs
        finally:
            for proc in procs.values():
                proc.stop()
    summary = summarize(rows)
    results = {
        "command": "python -m bench.peers " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {
            "cpus": psutil.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_end": os.getloadavg(),
        },
        "model": BENCH_MODEL,
        "lstm_serve_flags": BATCHED,
        "skipped": skipped,
        "peer_workers": args.peer_workers,
        "peer_configs": peer_configs(args.peer_workers, triton_slots(args.streams)),
        "timing": {"warmup_s": args.warmup, "seconds": args.seconds, "repeat": args.repeat},
        "client": args.client,
        "idle_cpu_pct": idle,
        "start_seconds": start_s,
        "crashes": crashes,
        "rows": rows,
        "summary": summary,
        "targets": targets(summary),
        "total_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(summary))
    print("\n".join(results["targets"]))
    for server, where in crashes.items():
        print(f"{server} died and was restarted at: {', '.join(where)} (logs in {LOGS})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
