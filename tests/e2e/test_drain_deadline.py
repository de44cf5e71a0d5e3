"""A drain always ends: replicas as real processes get SIGTERM at random moments (during start-up,
while the store ping waits, under streams and store writes, during a store outage (killed or
frozen), with an HTTP body half sent, twice) and none may be alive 30 s later; each ends by its
own drain, not by the deadline. And a stop that never ends is cut at --drain-grace-s + the
margin (exit status 3), with what it abandoned in one log line (service/drain_deadline.py)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from service.drain_deadline import EXIT_MARGIN_S, EXIT_STATUS
from tests.conftest import _free_port
from tests.e2e.conftest import ROOT

GRACE_S = 2.0
ALIVE_LIMIT_S = 30.0  # after its SIGTERM, no process may still run
KEY = "drain:" + base64.b64encode(b"drain-deadline-test-key-32-bytes").decode()
MODEL = "tiny-gru"
SLOW_MS = 40  # each model run: chunks stay in flight (tests/e2e/slow_serve.py)
ENDED = (0, -signal.SIGTERM)  # drained, or killed by the default action before the handlers


class Replica:
    """lstm-serve as a subprocess that may be signalled at any moment, even before it listens."""

    def __init__(self, repo: Path, *flags: str, module: tuple[str, ...] = ("service.cli",)):
        cmd = [sys.executable, "-m", *module, "--log-json", "--host", "127.0.0.1",
               "--grpc-port", "0", "--metrics-port", "-1", "--http-port", "0",
               "--drain-grace-s", str(GRACE_S), "--model-repository", str(repo),
               *flags]  # fmt: skip
        self.popen = subprocess.Popen(
            cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        self.lines: list[str] = []
        self.events: dict[str, dict[str, Any]] = {}
        self.sigterm_at: float | None = None
        self.exited_at: float | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.lines.append(line)
            with contextlib.suppress(json.JSONDecodeError):
                event = json.loads(line)
                self.events.setdefault(str(event.get("event")), event)

    async def until(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while event not in self.events:
            assert self.popen.poll() is None, f"exited before {event!r}:\n{self.tail()}"
            assert time.monotonic() < deadline, f"no {event!r} line:\n{self.tail()}"
            await asyncio.sleep(0.02)
        return self.events[event]

    def sigterm(self) -> None:
        if self.sigterm_at is None:
            self.sigterm_at = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signal.SIGTERM)

    async def exit_code(self, limit_s: float = ALIVE_LIMIT_S) -> int | None:
        """Its exit status, or None if it was still alive `limit_s` after its SIGTERM (then
        SIGKILLed)."""
        assert self.sigterm_at is not None
        while self.popen.poll() is None:
            if time.monotonic() > self.sigterm_at + limit_s:
                self.popen.kill()
                self.popen.wait(10)
                return None
            await asyncio.sleep(0.05)
        return self.popen.returncode

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.events['listening']['grpc_port']}"

    def tail(self) -> str:
        return "".join(self.lines[-12:])


class RedisServer:
    """A redis-server of this module's own, on a fixed port: stopped and started again for the
    outage scenarios (the session's shared redis_url must stay up)."""

    def __init__(self, workdir: Path) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        self.port = _free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir)]  # fmt: skip
        self.popen = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            assert time.monotonic() < deadline and self.popen.poll() is None, "no redis-server"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)

    def freeze(self, frozen: bool) -> None:
        """SIGSTOP / SIGCONT: a store that takes connections and bytes but never answers."""
        assert self.popen is not None
        self.popen.send_signal(signal.SIGSTOP if frozen else signal.SIGCONT)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def gru_repo(tiny_repo: Path, tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    shutil.copytree(tiny_repo / MODEL, repo / MODEL)
    return repo


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A store URL whose port accepts connections and never answers: the start-up ping waits."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


# -- load ----------------------------------------------------------------------------------


async def drive(address: str, stop: asyncio.Event) -> None:
    """Sessions on one Stream after another, chunk after chunk, until `stop` or the server goes."""
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.LstmServeStub(channel)
            while not stop.is_set():
                call = stub.Stream()
                await call.write(pb.StreamRequest(open=pb.OpenSession(model=MODEL)))
                if await call.read() is grpc.aio.EOF:
                    return
                for seq in range(1, 40):
                    chunk = pb.Chunk(seq=seq, input=pb.SequenceInput(text="hello "))
                    await call.write(pb.StreamRequest(chunk=chunk))
                    if await call.read() is grpc.aio.EOF or stop.is_set():
                        return
                await call.done_writing()


async def stop_driving(stop: asyncio.Event, drivers: list[asyncio.Task[None]]) -> None:
    """Stop the drivers; one still waiting on a replica that does not answer is cancelled."""
    stop.set()
    _done, late = await asyncio.wait(drivers, timeout=ALIVE_LIMIT_S)
    for task in late:
        task.cancel()


def half_sent_http_body(port: int) -> socket.socket:
    """An HTTP infer whose body never arrives in full: aiohttp would wait 60 s for it."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        'Content-Length: 100000\r\n\r\n{"inputs": ['.encode()
    )
    return sock


# -- scenarios -------------------------------------------------------------------------------


@dataclass
class Moment:
    """One SIGTERM: what the replica was doing, and how it ended."""

    what: str
    replica: Replica
    code: int | None = None


async def during_startup(repo: Path, rng: random.Random, blackhole: str) -> list[Moment]:
    """SIGTERM a random moment after the spawn (before the handlers, or while it loads), while
    the models warm up (each run slowed), and while the store's start-up ping waits (the drain
    used to leave such a process idle forever)."""
    starting = [Replica(repo) for _ in range(2)]
    warming = [Replica(repo, module=("tests.e2e.slow_serve", "1000")) for _ in range(2)]
    waiting = [Replica(repo, "--session-store", blackhole, "--snapshot-key", KEY,
                       "--session-store-timeout-s", "30") for _ in range(2)]  # fmt: skip
    moments = []
    for replica in starting:
        await asyncio.sleep(rng.uniform(0.05, 2.0))
        replica.sigterm()
        moments.append(Moment("start-up", replica))
    for what, group in (("warm-up", warming), ("store ping waits", waiting)):
        for replica in group:
            await replica.until("listening")
            await asyncio.sleep(rng.uniform(0.0, 0.5))
            assert "ready" not in replica.events
            replica.sigterm()
            moments.append(Moment(what, replica))
    return moments


async def under_load(
    repo: Path, rng: random.Random, store: RedisServer, held: list[socket.socket]
) -> list[Moment]:
    """Streams and store writes in flight; one replica also has an HTTP body half sent (held
    open until every replica exited), one gets a second SIGTERM during its drain."""
    replicas = [_slow(repo, store.url) for _ in range(4)]
    for replica in replicas:
        await replica.until("ready")
    stop = asyncio.Event()
    drivers = [asyncio.create_task(drive(r.grpc_address, stop)) for r in replicas for _ in range(3)]
    held.append(half_sent_http_body(int(replicas[0].events["listening"]["http_port"])))
    moments = []
    try:
        for i, replica in enumerate(replicas):
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            replica.sigterm()
            what = ["streams + HTTP body half sent", "streams, SIGTERM twice"][i] if i < 2 else (
                "streams + store writes")  # fmt: skip
            if i == 1:
                await asyncio.sleep(rng.uniform(0.05, 0.5))
                replica.popen.send_signal(signal.SIGTERM)
            moments.append(Moment(what, replica))
    finally:
        await stop_driving(stop, drivers)
    return moments


async def store_outage(
    repo: Path, rng: random.Random, store: RedisServer, frozen: bool
) -> list[Moment]:
    """Streams live, then redis-server is killed (or frozen: SIGSTOP, its sockets still take
    bytes), then SIGTERM while store writes fail or hang."""
    replicas = [_slow(repo, store.url) for _ in range(3 if not frozen else 2)]
    for replica in replicas:
        await replica.until("ready")
    stop = asyncio.Event()
    drivers = [asyncio.create_task(drive(r.grpc_address, stop)) for r in replicas for _ in range(3)]
    moments = []
    what = "store frozen" if frozen else "store outage"
    try:
        await asyncio.sleep(0.5)
        store.freeze(True) if frozen else store.stop()
        for replica in replicas:
            await asyncio.sleep(rng.uniform(0.1, 0.8))
            replica.sigterm()
            moments.append(Moment(what, replica))
        if frozen:  # thawed once they are gone
            await asyncio.gather(*(m.replica.exit_code() for m in moments))
    finally:
        await stop_driving(stop, drivers)
        store.freeze(False) if frozen else store.start()
    return moments


def _slow(repo: Path, store_url: str) -> Replica:
    return Replica(repo, "--session-store", store_url, "--snapshot-key", KEY,
                   "--session-store-timeout-s", "0.5", module=("tests.e2e.slow_serve",
                   str(SLOW_MS)))  # fmt: skip


async def sigterm_soak(repo: Path, store: RedisServer, blackhole: str) -> list[Moment]:
    rng = random.Random(20260101)
    held: list[socket.socket] = []
    moments = await during_startup(repo, rng, blackhole)
    moments += await under_load(repo, rng, store, held)
    moments += await store_outage(repo, rng, store, frozen=False)
    moments += await store_outage(repo, rng, store, frozen=True)
    try:
        codes = await asyncio.gather(*(m.replica.exit_code() for m in moments))
    finally:
        for sock in held:
            sock.close()
    for moment, code in zip(moments, codes, strict=True):
        moment.code = code
    return moments


def test_no_replica_outlives_its_sigterm_at_any_moment(
    gru_repo: Path, redis_server: RedisServer, blackhole: str
) -> None:
    moments = asyncio.run(sigterm_soak(gru_repo, redis_server, blackhole))
    assert len(moments) >= 15
    alive = [m for m in moments if m.code is None]
    assert not alive, "alive 30 s after SIGTERM: " + "; ".join(
        f"{m.what}:\n{m.replica.tail()}" for m in alive
    )
    cut = [m for m in moments if m.code not in ENDED]
    assert not cut, "not ended by its own drain: " + "; ".join(
        f"{m.what} (exit {m.code}):\n{m.replica.tail()}" for m in cut
    )
    for m in moments:
        if m.code == 0:
            assert "stopped" in m.replica.events, m.replica.tail()
            assert m.replica.events["signal"]["signal"] == "SIGTERM"


def test_a_stop_that_never_ends_is_cut_at_the_deadline_saying_what_it_abandoned(
    gru_repo: Path,
) -> None:
    async def scenario() -> tuple[Replica, int | None]:
        replica = Replica(gru_repo, module=("tests.e2e.stuck_serve",))
        await replica.until("ready")
        stop = asyncio.Event()
        driver = asyncio.create_task(drive(replica.grpc_address, stop))
        await asyncio.sleep(0.3)
        replica.sigterm()
        code = await replica.exit_code()
        await stop_driving(stop, [driver])
        return replica, code

    replica, code = asyncio.run(scenario())
    assert replica.sigterm_at is not None
    took = time.monotonic() - replica.sigterm_at
    assert code == EXIT_STATUS, replica.tail()
    assert GRACE_S + EXIT_MARGIN_S - 0.5 < took < GRACE_S + EXIT_MARGIN_S + 5, took
    line = next(ln for ln in replica.lines if "drain deadline passed" in ln)
    abandoned = json.loads(line)
    assert abandoned["level"] == "WARNING" and abandoned["exit_status"] == EXIT_STATUS
    assert abandoned["stage"] == "closing"  # where the stop was stuck
    assert any("stuck_serve.py" in frame for frame in abandoned["main_thread"]), abandoned
    for field in ("inflight_chunks", "streams", "store_operations", "tasks", "threads"):
        assert field in abandoned
