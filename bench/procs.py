"""Server processes for the benchmark (lstm-serve, echo, the protocol floor), their CPU time and
their metrics."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

HOST = "127.0.0.1"  # the benchmark never sends traffic anywhere else


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Process:
    """A server subprocess on 127.0.0.1, with its CPU seconds and (lstm-serve) metrics port."""

    def __init__(self, argv: list[str], port: int, metrics_port: int = -1) -> None:
        self.port = port
        self.metrics_port = metrics_port
        self.popen = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.ps = psutil.Process(self.popen.pid)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the process and its threads so far."""
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            err = self.popen.stderr.read().decode() if self.popen.stderr else ""
            raise RuntimeError(f"server exited with {self.popen.returncode}: {err[-2000:]}")


def serving(stub: health_pb2_grpc.HealthStub) -> bool:
    """One health check (1 s at most): whether it says SERVING."""
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def start_lstm_serve(repo: Path, flags: list[str], timeout_s: float = 120.0) -> Process:
    """lstm-serve on free ports; returns once health says SERVING (models loaded and warmed)."""
    port, metrics_port = free_port(), free_port()
    argv = [
        sys.executable, "-m", "service.cli", "--model-repository", str(repo), "--host", HOST,
        "--grpc-port", str(port), "--metrics-port", str(metrics_port), "--log-level", "WARNING",
        "--drain-grace-s", "1", "--http-port", "-1", *flags,
    ]  # fmt: skip
    proc = Process(argv, port, metrics_port)
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(proc.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            proc.check_alive()
            if serving(stub):
                return proc
            if time.monotonic() > deadline:
                proc.stop()
                raise TimeoutError("lstm-serve did not become SERVING")
            time.sleep(0.1)


NATIVE_FRONT = Path(__file__).resolve().parent.parent / "native" / "build" / "lstm-serve-front"


class FrontedProcess(Process):
    """lstm-serve behind the native front (native/): clients use the front's port; CPU is both
    processes'; metrics are lstm-serve's."""

    def __init__(self, server: Process, front: subprocess.Popen[bytes], port: int) -> None:
        self.server = server
        self.front = front
        self.port = port
        self.metrics_port = server.metrics_port
        self.popen = front
        self.ps = psutil.Process(front.pid)

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system) + self.server.cpu_seconds()

    def front_cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        super().stop()
        self.server.stop()


def start_front(folder: Path, flags: Sequence[str] = ()) -> Process:
    """The native front (with `flags`) on a free port before the sockets in `folder`; returns
    once it accepts connections."""
    port = free_port()
    argv = [str(NATIVE_FRONT), "--listen", f"{HOST}:{port}", "--dir", str(folder), *flags]
    return listening(Process(argv, port), 30.0, "the native front")


def start_native(
    repo: Path, flags: list[str], folder: Path, front_flags: Sequence[str] = ()
) -> FrontedProcess:
    """lstm-serve with --native-front-dir `folder`, then the native front on a free port."""
    server = start_lstm_serve(repo, [*flags, "--native-front-dir", str(folder)])
    try:
        front = start_front(folder, front_flags)
    except Exception:
        server.stop()
        raise
    return FrontedProcess(server, front.popen, front.port)


def start_echo(protocol: bool = False, timeout_s: float = 30.0) -> Process:
    """The echo server (bench.echo), or with `protocol` the protocol floor; returns once it
    accepts connections."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.echo", "--port", str(port)]
    proc = Process([*argv, "--protocol"] if protocol else argv, port)
    return listening(proc, timeout_s, "floor server" if protocol else "echo server")


def listening(proc: Process, timeout_s: float, what: str) -> Process:
    """`proc` once its port accepts connections; stopped and TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        proc.check_alive()
        with socket.socket() as sock:
            if sock.connect_ex((HOST, proc.port)) == 0:
                return proc
        if time.monotonic() > deadline:
            proc.stop()
            raise TimeoutError(f"{what} did not start")
        time.sleep(0.05)


def model_samples(metrics_port: int, model: str) -> list[str]:
    """The exposition lines of one model's series on a server's metrics port."""
    url = f"http://{HOST}:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return [line for line in text.splitlines() if f'model="{model}"' in line]


def sample_value(lines: list[str], name: str, *labels: str) -> float:
    """The value of the first line of series `name` carrying every one of `labels` (0: none)."""
    for line in lines:
        if line.startswith(name) and all(label in line for label in labels):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def scrape_batches(metrics_port: int, model: str) -> tuple[float, float]:
    """(batched runs, chunks in them) so far, from lstm_serve_batch_size."""
    lines = model_samples(metrics_port, model)
    return (sample_value(lines, "lstm_serve_batch_size_count"),
            sample_value(lines, "lstm_serve_batch_size_sum"))  # fmt: skip
