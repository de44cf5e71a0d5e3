"""Chaos soak: lstm-serve replicas killed under live sessions; nothing may be lost or doubled.

    python -m bench.chaos --minutes 10                   # the soak of bench/README.md
    python -m bench.chaos --seconds 60 --sessions 60     # the short one tests/e2e runs

Three replicas (`python -m service.cli`, one shared --snapshot-key and Redis session store) and a
redis-server, all on 127.0.0.1. Hundreds of live sessions go through the failover client
(`lstmserve.client`): most on a Stream each (`StreamSession`), a share over a few StreamMulti
streams (`MultiStream`); each sends chunks of 1..4 random tokens, one reply awaited at a time,
with a random pause, and ends after a random number of chunks, when a new one opens in its
place. Every --kill-every-s seconds a random replica gets SIGKILL or SIGTERM and is started again
on the same port (at most one is down at a time). At the end every session's replies are
compared with offline onnxruntime on the same tokens: steps lost (acknowledged but missing from
the session's final state) and doubled (applied twice), replies whose probabilities or step
count differ. RSS per replica is sampled all along (psutil). Writes chaos.json and chaos.png
under --out; exits 1 if anything was lost, doubled, wrong or failed.

    python -m bench.chaos --seconds 150 --store sentinel --kill-redis-every-s 20

With `--store sentinel` the store is a Sentinel group (a master, a replica, three sentinels,
bench/redisfleet.py) and with --kill-redis-every-s its master is SIGKILLed now and then: the
sentinels promote the replica and the old master comes back as a replica. In strict mode
(--store-mode, the default) a chunk the store did not take is refused in-band UNAVAILABLE and the
drivers send it again (counted as `refused`); nothing acknowledged may be lost.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.model import BENCH_MODEL, LANGID, build_repository
from bench.procs import HOST, NATIVE_FRONT, free_port
from bench.redisfleet import SentinelFleet
from lstmserve.client import LstmClient, MultiStream, SessionLost, StreamSession
from lstmserve.v1 import lstm_serve_pb2 as pb

KEY = "chaos:" + base64.b64encode(b"chaos-soak-key-shared-by-3-pods!").decode()
ATOL = 1e-5  # per-step probabilities against offline onnxruntime
START_TIMEOUT_S = 60.0
DRAIN_GRACE_S = 3.0
OVERRUN_S = 20.0  # a SIGTERMed replica still alive this long after its drain grace fails the run
RETRY_PAUSE_S = 0.05  # before a chunk refused UNAVAILABLE (strict, store down) is sent again
MAX_RETRIES = 1200  # a minute of refusals: the session fails
MiB = 1024 * 1024


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    span = parser.add_mutually_exclusive_group()
    span.add_argument("--minutes", type=float, default=None, help="soak length (default 10)")
    span.add_argument("--seconds", type=float, default=None, help="soak length in seconds")
    parser.add_argument("--sessions", type=int, default=300, help="live sessions at any time")
    parser.add_argument(
        "--multi-share",
        type=float,
        default=0.2,
        help="share of the sessions carried over StreamMulti streams",
    )
    parser.add_argument("--multi-streams", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--kill-every-s", type=float, default=3.0)
    parser.add_argument(
        "--sigterm-share",
        type=float,
        default=0.5,
        help="share of the kills that are SIGTERM (drain), not SIGKILL",
    )
    parser.add_argument(
        "--think-ms",
        type=float,
        default=500.0,
        help="mean pause between a session's reply and its next chunk",
    )
    parser.add_argument(
        "--chunks",
        type=int,
        nargs=2,
        default=[20, 120],
        metavar=("MIN", "MAX"),
        help="chunks per session (uniform)",
    )
    parser.add_argument("--max-chunk-steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", choices=["auto", "langid-chars", BENCH_MODEL], default="auto")
    parser.add_argument("--rss-every-s", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/chaos"))
    parser.add_argument(
        "--store", choices=["single", "sentinel"], default="single",
        help="one redis-server, or a Sentinel group (master, replica, three sentinels)",
    )  # fmt: skip
    parser.add_argument("--store-mode", choices=["strict", "best-effort"], default="strict")
    parser.add_argument(
        "--native", action="store_true",
        help="each replica behind the native front (native/, make native); replicas are killed "
             "and restarted behind fronts that stay up",
    )  # fmt: skip
    parser.add_argument(
        "--kill-fronts", action="store_true",
        help="with --native: a kill takes the replica's front with it, as a pod's death would "
             "(SIGKILL both; SIGTERM both, as Kubernetes signals every container of a pod)",
    )  # fmt: skip
    parser.add_argument(
        "--kill-redis-every-s", type=float, default=0.0,
        help="with --store sentinel: SIGKILL the Redis master this often (0 = never)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.think_ms <= 0 or args.sessions < 1 or args.replicas < 2:
        parser.error("--think-ms must be > 0, --sessions >= 1, --replicas >= 2")
    if args.native and not NATIVE_FRONT.is_file():
        parser.error(f"--native needs the native front ({NATIVE_FRONT}): make native")
    if args.kill_fronts and not args.native:
        parser.error("--kill-fronts needs --native")
    if args.kill_redis_every_s and args.store != "sentinel":
        parser.error("--kill-redis-every-s needs --store sentinel")
    args.duration_s = args.seconds if args.seconds is not None else 60 * (args.minutes or 10)
    return args


# -- the fleet: redis + replicas ------------------------------------------------------------


class Redis:
    """redis-server on a free loopback port, no persistence."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        argv = [binary, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly",
                "no", "--dir", str(workdir)]  # fmt: skip
        self.popen = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ps = psutil.Process(self.popen.pid)

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                _, writer = await asyncio.open_connection(HOST, self.port)
                writer.close()
                return
            except OSError:
                if time.monotonic() > deadline or self.popen.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                await asyncio.sleep(0.02)

    def rss_mib(self) -> float:
        return float(self.ps.memory_info().rss / MiB)

    def cpu_s(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        self.popen.terminate()
        self.popen.wait(10)


class SentinelStore:
    """The Sentinel group as the soak sees it: its URL, RSS and CPU of the live Redis nodes."""

    def __init__(self, workdir: Path) -> None:
        self.fleet = SentinelFleet(workdir / "redis")
        self.url = self.fleet.url

    async def wait_ready(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.fleet.start)

    def _procs(self) -> list[psutil.Process]:
        procs = []
        for node in self.fleet.nodes:
            if node.alive():
                assert node.popen is not None
                with contextlib.suppress(psutil.Error):
                    procs.append(psutil.Process(node.popen.pid))
        return procs

    def rss_mib(self) -> float:
        return sum(p.memory_info().rss for p in self._procs()) / MiB

    def cpu_s(self) -> float:  # the live nodes' (a killed node's seconds are not counted)
        return sum(p.cpu_times().user + p.cpu_times().system for p in self._procs())

    def stop(self) -> None:
        self.fleet.stop()


async def kill_masters(
    store: SentinelStore, stop_at: float, every_s: float, kills: list[dict[str, Any]], t0: float
) -> None:
    """SIGKILL the Redis master every `every_s` s; after the failover, the old one comes back as
    a replica (the next kill waits until it has caught up)."""
    loop = asyncio.get_running_loop()
    fleet = store.fleet
    while True:
        await asyncio.sleep(every_s)
        if time.monotonic() >= stop_at - every_s / 2:
            return
        started = time.monotonic()
        old = fleet.kill_master()
        await loop.run_in_executor(None, fleet.wait_failover, old.port)
        promoted = time.monotonic()
        await loop.run_in_executor(None, fleet.restart_as_replica, old)
        kills.append({
            "t": round(started - t0, 3), "killed_port": old.port,
            "failover_s": round(promoted - started, 3),
            "replica_back_s": round(time.monotonic() - started, 3),
        })  # fmt: skip


@dataclass
class Replica:
    """One replica slot: a fixed port, restarted as a new process (generation) after a kill."""

    slot: int
    port: int
    argv: list[str]
    logs: Path
    generation: int = 0
    popen: subprocess.Popen[bytes] | None = None
    ps: psutil.Process | None = None
    cpu_s: float = 0.0  # CPU seconds of the generations that have exited
    # --native: the native front before it on `front_port` (clients use that); it stays up
    # while the replica behind it is killed and restarted, and reconnects to the new one.
    front_argv: list[str] | None = None
    front_port: int = 0
    front: subprocess.Popen[bytes] | None = None
    kill_front: bool = False  # --kill-fronts: a kill takes the front too (the whole pod)

    def cpu_now(self) -> float:
        """CPU seconds of every generation so far (the current one read now)."""
        current = 0.0
        with contextlib.suppress(psutil.Error):
            if self.ps is not None and self.alive():
                times = self.ps.cpu_times()
                current = times.user + times.system
        return self.cpu_s + current

    @property
    def address(self) -> str:
        return f"{HOST}:{self.front_port or self.port}"

    def spawn(self) -> None:
        self.check_front()
        if self.front_argv is not None and (self.front is None or self.front.poll() is not None):
            log = open(self.logs / f"front{self.slot}.log", "ab")  # noqa: SIM115
            self.front = subprocess.Popen(self.front_argv, stdout=subprocess.DEVNULL, stderr=log)
            log.close()
        self.generation += 1
        log = open(self.logs / f"replica{self.slot}.{self.generation}.log", "wb")  # noqa: SIM115
        self.popen = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=log)
        log.close()  # the child holds its own copy
        self.ps = psutil.Process(self.popen.pid)

    async def start(self) -> None:
        """Spawn and wait until health says SERVING; a busy port (the last one's sockets) is
        retried a few times."""
        for _ in range(5):
            self.spawn()
            if await self._wait_serving():
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"replica {self.slot} did not start; see {self.logs}")

    async def _wait_serving(self) -> bool:
        assert self.popen is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        request = health_pb2.HealthCheckRequest()
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                self.check_front()
                if self.popen.poll() is not None:
                    return False
                try:
                    reply = await stub.Check(request, timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return True
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError(f"replica {self.slot} not SERVING after {START_TIMEOUT_S} s"
                           f"{self._front_state()}")  # fmt: skip

    def check_front(self) -> None:
        """A front that stays up (--native without --kill-fronts) and exited on its own crashed:
        the run fails at once, rather than restarting it or waiting for health."""
        if self.kill_front or self.front is None or self.front.poll() is None:
            return
        raise RuntimeError(f"replica {self.slot}: the native front that stays up died"
                           f"{self._front_state()}")  # fmt: skip

    def _front_state(self) -> str:
        """With --native: whether the front is alive and its last log lines (what to look at
        when a replica behind it never answers)."""
        if self.front is None:
            return ""
        state = "running" if self.front.poll() is None else f"exited {self.front.returncode}"
        path = self.logs / f"front{self.slot}.log"
        tail = path.read_text(errors="replace").splitlines()[-5:] if path.exists() else []
        return f"; its native front {state}, log tail: {tail}"

    async def kill(self, sig: signal.Signals) -> tuple[int, bool]:
        """Send `sig` and wait for the process to exit -> (exit status, overran): a SIGTERMed one
        still alive OVERRUN_S after its drain grace has overrun and is SIGKILLed."""
        assert self.popen is not None
        self.cpu_s = self.cpu_now()  # read before it dies
        doomed = [self.popen]
        if self.kill_front and self.front is not None and self.front.poll() is None:
            doomed.append(self.front)  # the pod dies whole; spawn() starts a new front
        for proc in doomed:
            proc.send_signal(sig)
        deadline = time.monotonic() + DRAIN_GRACE_S + OVERRUN_S
        overran = False
        while any(proc.poll() is None for proc in doomed):
            if time.monotonic() > deadline and not overran:
                overran = True
                for proc in doomed:
                    proc.kill()
            await asyncio.sleep(0.02)
        codes = [int(proc.returncode) for proc in doomed]
        return next((c for c in codes if c != 0), 0), overran

    def rss_mib(self) -> float | None:
        """RSS of the current process; None while down (or exiting: 0 then)."""
        try:
            rss = self.ps.memory_info().rss if self.ps and self.alive() else 0
        except psutil.NoSuchProcess:
            rss = 0
        return rss / MiB if rss else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, generation: int, lines: int = 3) -> list[str]:
        """The last lines a generation logged (the drain deadline's abandoned-work line)."""
        path = self.logs / f"replica{self.slot}.{generation}.log"
        return path.read_text(errors="replace").splitlines()[-lines:]

    def stop(self) -> dict[str, Any] | None:
        """SIGTERM at the end of the run -> a kill-log entry if its drain failed (it overran
        or exited non-zero), else None."""
        try:
            return self._stop()
        finally:
            if self.front is not None and self.front.poll() is None:
                self.front.terminate()
                try:
                    self.front.wait(10)
                except subprocess.TimeoutExpired:
                    self.front.kill()

    def _stop(self) -> dict[str, Any] | None:
        if not self.alive():
            return None
        assert self.popen is not None
        started = time.monotonic()
        self.popen.terminate()
        overran = False
        try:
            code = self.popen.wait(DRAIN_GRACE_S + OVERRUN_S)
        except subprocess.TimeoutExpired:
            overran = True
            self.popen.kill()
            code = self.popen.wait(5)
        if code == 0 and not overran:
            return None
        return {"replica": self.slot, "generation": self.generation, "signal": "SIGTERM",
                "exit_code": code, "overran": overran, "at_the_end": True,
                "exit_s": round(time.monotonic() - started, 3),
                "log_tail": self.log_tail(self.generation)}  # fmt: skip


def native_front(replica: Replica, folder: Path) -> None:
    """The replica behind a native front (native/): clients connect to the front."""
    replica.argv += ["--native-front-dir", str(folder)]
    replica.front_port = free_port()
    replica.front_argv = [str(NATIVE_FRONT), "--listen", f"{HOST}:{replica.front_port}",
                          "--dir", str(folder)]  # fmt: skip


def replica_argv(repo: Path, port: int, store_url: str, mode: str = "strict") -> list[str]:
    return [
        sys.executable, "-m", "service.cli", "--model-repository", str(repo), "--host", HOST,
        "--grpc-port", str(port), "--metrics-port", "0", "--http-port", "-1", "--log-json",
        "--log-level", "WARNING",
        "--snapshot-key", KEY, "--session-store", store_url, "--drain-grace-s", str(DRAIN_GRACE_S),
        "--compute-threads", "1", "--intra-op-threads", "1", "--inter-op-threads", "1",
        "--session-store-mode", mode, "--session-store-timeout-s", "0.5",
    ]  # fmt: skip


# -- what the sessions did -------------------------------------------------------------------


@dataclass
class Record:
    """One session as its driver saw it: tokens sent and every reply (cumulative steps, the
    server's step count, probabilities)."""

    kind: str
    tokens: array = field(default_factory=lambda: array("q"))
    ends: array = field(default_factory=lambda: array("I"))  # steps acknowledged after reply i
    totals: array = field(default_factory=lambda: array("Q"))  # the reply's total_steps
    duplicates: array = field(default_factory=lambda: array("b"))
    probs: array = field(default_factory=lambda: array("f"))  # C per reply
    sent_steps: int = 0
    final_total: int | None = None  # SessionEnded.total_steps
    error: str | None = None

    def sent(self, chunk: list[int]) -> None:
        self.sent_steps += len(chunk)

    def answered(self, chunk: list[int], result: pb.ChunkResult, classes: int) -> bool:
        """A chunk's reply; its tokens count as acknowledged once answered without error. False:
        refused UNAVAILABLE (strict mode, the store did not take it): send it again."""
        if result.HasField("error"):
            if result.error.code == "UNAVAILABLE":
                return False
            self.error = f"chunk refused: {result.error.code} {result.error.message}"
            return True
        self.tokens.extend(chunk)
        self.ends.append(len(self.tokens))
        self.totals.append(result.total_steps)
        self.duplicates.append(int(result.duplicate))
        probs = list(result.probabilities) or [float("nan")] * classes  # older resends: none
        self.probs.extend(probs)
        return True


@dataclass
class Stats:
    """Live counters shared by the drivers (the event loop is single-threaded)."""

    answered: int = 0
    refused: int = 0  # chunks answered UNAVAILABLE in-band (strict mode) and sent again
    opens_refused: int = 0  # opens answered UNAVAILABLE (strict, the store down): opened again
    records: list[Record] = field(default_factory=list)
    streams: list[StreamSession | MultiStream] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def failovers(self) -> int:
        return sum(s.failovers for s in self.streams)

    def resent(self) -> int:
        return sum(s.resent for s in self.streams)


@dataclass
class Load:
    """What the drivers send: chunk sizes, session lengths, pauses."""

    model: str
    vocab: int
    classes: int
    chunks: tuple[int, int]
    max_steps: int
    think_s: float

    def chunk(self, rng: random.Random) -> list[int]:
        return [rng.randrange(1, self.vocab) for _ in range(rng.randint(1, self.max_steps))]

    def length(self, rng: random.Random) -> int:
        return rng.randint(*self.chunks)

    async def pause(self, rng: random.Random, stop: asyncio.Event) -> None:
        """A random think time (exponential, mean think_s), cut short by `stop`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.expovariate(1 / self.think_s))


# -- drivers ---------------------------------------------------------------------------------


async def drive_streams(
    client: LstmClient, load: Load, stats: Stats, stop: asyncio.Event, rng: random.Random
) -> None:
    """Sessions one after another, each on its own Stream, until `stop`."""
    await load.pause(rng, stop)  # spread the starts
    while not stop.is_set():
        record = Record("stream")
        stats.records.append(record)
        try:
            await _one_stream_session(client, load, stats, stop, rng, record)
        except (SessionLost, grpc.aio.AioRpcError) as exc:
            record.error = f"{type(exc).__name__}: {exc}"[:500]
            stats.errors.append(record.error)


async def _one_stream_session(
    client: LstmClient, load: Load, stats: Stats, stop: asyncio.Event, rng: random.Random,
    record: Record,
) -> None:  # fmt: skip
    for _ in range(MAX_RETRIES):
        try:
            session = await client.open_session(load.model)
            break
        except grpc.aio.AioRpcError as exc:  # strict: no replica could store it just now
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            stats.opens_refused += 1
            await asyncio.sleep(RETRY_PAUSE_S)
    else:
        raise SessionLost(f"open refused UNAVAILABLE {MAX_RETRIES} times")
    stats.streams.append(session)
    for _ in range(load.length(rng)):
        chunk = load.chunk(rng)
        record.sent(chunk)
        for _ in range(MAX_RETRIES):
            if record.answered(chunk, await session.step(chunk), load.classes):
                break
            stats.refused += 1
            await asyncio.sleep(RETRY_PAUSE_S)
        else:
            record.error = f"chunk refused UNAVAILABLE {MAX_RETRIES} times"
        stats.answered += 1
        if stop.is_set() or record.error:
            break
        await load.pause(rng, stop)
    record.final_total = (await session.end()).total_steps


@dataclass
class Slot:
    """One session place on a MultiStream."""

    record: Record | None = None
    session_id: str = ""
    left: int = 0  # chunks still to send
    seq: int = 0
    chunk: list[int] = field(default_factory=list)
    retries: int = 0  # the chunk was refused UNAVAILABLE this many times: sent again


async def drive_multi(
    client: LstmClient, sessions: int, load: Load, stats: Stats, stop: asyncio.Event,
    rng: random.Random,
) -> None:  # fmt: skip
    """`sessions` places over one MultiStream: each message carries a chunk for every live
    session, an `end` for each finished one and an `open` for each empty place."""
    multi = client.multi_stream()
    stats.streams.append(multi)
    slots = [Slot() for _ in range(sessions)]
    try:
        while not stop.is_set():
            await _multi_round(multi, slots, load, stats, rng, finishing=False)
            await load.pause(rng, stop)
        for _ in range(MAX_RETRIES):  # end every session (a refused chunk is sent again first)
            await _multi_round(multi, slots, load, stats, rng, finishing=True)
            if all(slot.record is None for slot in slots):
                break
            await asyncio.sleep(RETRY_PAUSE_S)
    except (SessionLost, grpc.aio.AioRpcError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:500]
        stats.errors.append(error)
        for slot in slots:
            if slot.record is not None and slot.record.final_total is None:
                slot.record.error = error
    finally:
        await multi.close()


async def _multi_round(
    multi: MultiStream, slots: list[Slot], load: Load, stats: Stats, rng: random.Random,
    finishing: bool,
) -> None:  # fmt: skip
    entries = [_entry(slot, load, rng, finishing) for slot in slots]
    wanted = [(s, e) for s, e in zip(slots, entries, strict=True) if e is not None]
    if not wanted:
        return
    results = await multi.exchange([e for _, e in wanted])
    if len(results) != len(wanted):
        raise SessionLost(f"{len(results)} results for {len(wanted)} entries")
    for (slot, entry), result in zip(wanted, results, strict=True):
        _multi_result(slot, entry, result, load, stats, rng)


def _entry(slot: Slot, load: Load, rng: random.Random, finishing: bool) -> pb.SessionRequest | None:
    """The entry this place sends now: open, a chunk, end, or (finishing, empty) nothing."""
    if slot.record is None:
        return None if finishing else MultiStream.open(load.model)
    if slot.retries:  # refused UNAVAILABLE: the same chunk again (it may have been applied)
        return MultiStream.chunk(slot.session_id, slot.seq, slot.chunk)
    if slot.left == 0 or finishing:
        return MultiStream.end(slot.session_id)
    slot.seq += 1
    slot.chunk = load.chunk(rng)
    slot.record.sent(slot.chunk)
    return MultiStream.chunk(slot.session_id, slot.seq, slot.chunk)


def _multi_result(
    slot: Slot, entry: pb.SessionRequest, result: pb.SessionResult, load: Load, stats: Stats,
    rng: random.Random,
) -> None:  # fmt: skip
    kind = entry.WhichOneof("kind")
    if kind == "open":
        if result.WhichOneof("kind") != "opened" and result.error.code == "UNAVAILABLE":
            stats.opens_refused += 1  # strict, the store down: the place opens again next round
            return
        if result.WhichOneof("kind") != "opened":
            stats.errors.append(f"multi open failed: {result.error.code} {result.error.message}")
            return
        slot.record, slot.session_id = Record("multi"), result.session_id
        slot.left, slot.seq = load.length(rng), 0
        stats.records.append(slot.record)
        return
    assert slot.record is not None
    if result.session_id != slot.session_id:
        slot.record.error = f"a result for {result.session_id} in the place of {slot.session_id}"
    elif kind == "chunk" and result.WhichOneof("kind") == "chunk":
        if not slot.record.answered(slot.chunk, result.chunk, load.classes):
            stats.refused += 1
            slot.retries += 1
            if slot.retries < MAX_RETRIES:
                return
            slot.record.error = f"chunk refused UNAVAILABLE {MAX_RETRIES} times"
        slot.retries = 0
        stats.answered += 1
        slot.left -= 1
        if slot.record.error is None:
            return
    elif kind == "end" and result.WhichOneof("kind") == "ended":
        slot.record.final_total = result.ended.total_steps
    elif kind == "end" and result.error.code == "UNAVAILABLE":
        stats.refused += 1  # strict, the store down: the end is sent again next round
        return
    else:
        slot.record.error = f"{kind}: {result.error.code} {result.error.message}"
    if slot.record.error:
        stats.errors.append(slot.record.error)
    slot.record = None  # ended (or failed): the place opens a new session next
    slot.retries = 0  # nothing of the dropped session is sent again


# -- chaos and sampling ----------------------------------------------------------------------


async def chaos(
    replicas: list[Replica], stop_at: float, every_s: float, sigterm_share: float,
    rng: random.Random, kills: list[dict[str, Any]], t0: float,
) -> None:  # fmt: skip
    """Kill a random replica every `every_s` seconds (SIGTERM or SIGKILL) and restart it; the
    next kill waits until it serves again (at most one replica down at a time)."""
    next_kill = time.monotonic() + every_s
    while True:
        await asyncio.sleep(max(0.0, next_kill - time.monotonic()))
        if time.monotonic() >= stop_at:
            return
        replica = rng.choice(replicas)
        sig = signal.SIGTERM if rng.random() < sigterm_share else signal.SIGKILL
        started = time.monotonic()
        generation = replica.generation
        code, overran = await replica.kill(sig)
        exited = time.monotonic()
        await replica.start()
        kill = {
            "t": round(started - t0, 3), "replica": replica.slot, "signal": sig.name,
            "exit_code": code, "exit_s": round(exited - started, 3), "overran": overran,
            "down_s": round(time.monotonic() - started, 3), "generation": generation,
        }  # fmt: skip
        if sig == signal.SIGTERM and (overran or code != 0):
            kill["log_tail"] = replica.log_tail(generation)
        kills.append(kill)
        next_kill = max(started + every_s, time.monotonic())


async def sample(
    replicas: list[Replica], redis: Redis | SentinelStore, stats: Stats, every_s: float,
    stop: asyncio.Event, series: dict[str, list[Any]], t0: float,
) -> None:  # fmt: skip
    """RSS per replica (MiB; None while down), Redis's and this client's, and replies/s."""
    me = psutil.Process()
    last_answered, last_t = 0, time.monotonic()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
        now = time.monotonic()
        series["t"].append(round(now - t0, 2))
        for replica in replicas:
            series[f"replica{replica.slot}"].append(_round(replica.rss_mib()))
        series["redis"].append(_round(redis.rss_mib()))
        series["client"].append(_round(me.memory_info().rss / MiB))
        series["replies_per_s"].append(round((stats.answered - last_answered) / (now - last_t), 1))
        series["failovers"].append(stats.failovers())
        last_answered, last_t = stats.answered, now


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def progress(stats: Stats, kills: list[dict[str, Any]], t0: float) -> str:
    live = sum(1 for r in stats.records if r.final_total is None and r.error is None)
    return (
        f"t={time.monotonic() - t0:6.1f}s replies={stats.answered} live={live} "
        f"kills={len(kills)} failovers={stats.failovers()} errors={len(stats.errors)}"
    )


# -- verification ----------------------------------------------------------------------------


def verify(records: list[Record], model_path: Path, classes: int) -> dict[str, Any]:
    """Every session's replies against offline onnxruntime on its tokens (one batched run of
    64 sessions at a time, from zero states)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    state_shape = {i.name: i for i in sess.get_inputs()}["state"].shape[1:]
    totals = {"replies": 0, "mismatched": 0, "wrong_totals": 0, "max_abs_diff": 0.0,
              "unverifiable_duplicates": 0, "final_mismatched": 0}  # fmt: skip
    checked = sorted((r for r in records if len(r.tokens)), key=lambda r: len(r.tokens))
    for start in range(0, len(checked), 64):
        batch = checked[start : start + 64]
        step_probs = _offline(sess, batch, state_shape)
        for record, expected in zip(batch, step_probs, strict=True):
            _compare(record, expected, classes, totals)
    return totals


def _offline(sess: Any, batch: list[Record], state_shape: list[int]) -> list[np.ndarray]:
    lengths = np.array([len(r.tokens) for r in batch], dtype=np.int64)
    tokens = np.zeros((len(batch), int(lengths.max())), dtype=np.int64)
    for i, record in enumerate(batch):
        tokens[i, : lengths[i]] = np.frombuffer(record.tokens, dtype=np.int64)
    state = np.zeros((len(batch), *state_shape), dtype=np.float32)
    step_probs, _, _ = sess.run(None, {"tokens": tokens, "lengths": lengths, "state": state})
    return [step_probs[i, : lengths[i]] for i in range(len(batch))]


def _compare(record: Record, expected: np.ndarray, classes: int, totals: dict[str, Any]) -> None:
    ends = np.frombuffer(record.ends, dtype=np.uint32).astype(np.int64)
    got = np.frombuffer(record.probs, dtype=np.float32).reshape(-1, classes)
    want = expected[ends - 1]
    known = ~np.isnan(got).any(axis=1)
    diff = np.abs(got[known] - want[known]).max(axis=1) if known.any() else np.zeros(0)
    server_totals = np.frombuffer(record.totals, dtype=np.uint64).astype(np.int64)
    totals["replies"] += len(ends)
    totals["unverifiable_duplicates"] += int((~known).sum())
    totals["mismatched"] += int((diff > ATOL).sum())
    totals["max_abs_diff"] = max(totals["max_abs_diff"], float(diff.max(initial=0.0)))
    # one reply awaited at a time: even a resend's reply counts exactly the steps sent so far
    totals["wrong_totals"] += int((server_totals != ends).sum())
    if known[-1] and np.abs(got[-1] - expected[-1]).max() > ATOL:
        totals["final_mismatched"] += 1


def step_counts(records: list[Record]) -> dict[str, int]:
    """Steps sent, acknowledged, applied (the sessions' final totals), lost and doubled."""
    out = {"sent": 0, "acknowledged": 0, "applied": 0, "lost": 0, "doubled": 0,
           "sessions_failed": 0, "steps_of_failed_sessions": 0}  # fmt: skip
    for record in records:
        acked = len(record.tokens)
        out["sent"] += record.sent_steps
        out["acknowledged"] += acked
        if record.error is not None or record.final_total is None:
            out["sessions_failed"] += 1
            out["steps_of_failed_sessions"] += acked
            out["lost"] += acked  # nothing shows they are anywhere
            continue
        out["applied"] += record.final_total
        out["lost"] += max(0, acked - record.final_total)
        out["doubled"] += max(0, record.final_total - acked)
    return out


# -- the run ---------------------------------------------------------------------------------


def model_repository(choice: str, workdir: Path) -> tuple[str, Path]:
    """(model name, repository): a copy of models/langid-chars/1, or the bench model."""
    repo = workdir / "models"
    if choice in ("auto", "langid-chars") and (LANGID / "model.onnx").exists():
        target = repo / "langid-chars" / "1"
        target.mkdir(parents=True)
        shutil.copy(LANGID / "model.onnx", target / "model.onnx")
        return "langid-chars", repo
    if choice == "langid-chars":
        raise SystemExit(f"{LANGID} has no model.onnx")
    build_repository(repo)
    shutil.rmtree(repo / "langid-chars", ignore_errors=True)
    return BENCH_MODEL, repo


async def describe(address: str, model: str) -> pb.ModelInfo:
    async with LstmClient(address) as client:
        return await client.get_model(model)


async def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    model, repo = model_repository(args.model, workdir)
    logs = workdir / "logs"
    logs.mkdir()
    redis: Redis | SentinelStore = SentinelStore(workdir) if args.store == "sentinel" else (
        Redis(workdir))  # fmt: skip
    await redis.wait_ready()
    replicas = [Replica(i, port, replica_argv(repo, port, redis.url, args.store_mode), logs)
                for i, port in enumerate(free_port() for _ in range(args.replicas))]  # fmt: skip
    if args.native:
        for replica in replicas:
            native_front(replica, workdir / f"sockets{replica.slot}")
            replica.kill_front = args.kill_fronts
    try:
        await asyncio.gather(*(r.start() for r in replicas))
        info = await describe(replicas[0].address, model)
        load = Load(model, info.vocab_size, len(info.labels), tuple(args.chunks),
                    args.max_chunk_steps, args.think_ms / 1000)  # fmt: skip
        result = await _run(args, replicas, redis, load)
        for replica in replicas:
            replica.check_front()  # died since its replica's last restart
        result["cpu_s"] = cpu_seconds(replicas, redis)
    finally:
        final_stops = [replica.stop() for replica in replicas]
        redis.stop()
    result["final_stop_failures"] = [stop for stop in final_stops if stop is not None]
    result["server_warnings"] = server_warnings(logs)
    result["model"] = model
    result["verify"] = verify(result.pop("records"), repo / model / "1" / "model.onnx",
                              load.classes)  # fmt: skip
    return result


async def _run(
    args: argparse.Namespace, replicas: list[Replica], redis: Redis | SentinelStore, load: Load
) -> dict[str, Any]:
    rng = random.Random(args.seed)
    addresses = [r.address for r in replicas]
    clients = [LstmClient(addresses[i:] + addresses[:i], failover_s=10.0)
               for i in range(len(addresses))]  # fmt: skip
    stats, kills, stop = Stats(), [], asyncio.Event()
    redis_kills: list[dict[str, Any]] = []
    series: dict[str, list[Any]] = {k: [] for k in ["t", "redis", "client", "replies_per_s",
                                                    "failovers"]}  # fmt: skip
    series.update({f"replica{r.slot}": [] for r in replicas})
    n_multi = round(args.sessions * args.multi_share) if args.multi_streams else 0
    t0 = time.monotonic()
    stop_at = t0 + args.duration_s
    drivers = [
        drive_streams(clients[i % len(clients)], load, stats, stop, random.Random(rng.random()))
        for i in range(args.sessions - n_multi)
    ]
    places = [len(p) for p in np.array_split(np.arange(n_multi), max(1, args.multi_streams))]
    drivers += [
        drive_multi(clients[i % len(clients)], n, load, stats, stop, random.Random(rng.random()))
        for i, n in enumerate(places)
        if n
    ]
    tasks = [asyncio.create_task(d) for d in drivers]
    sampler = asyncio.create_task(
        sample(replicas, redis, stats, args.rss_every_s, stop, series, t0)
    )
    killer = asyncio.create_task(
        chaos(replicas, stop_at, args.kill_every_s, args.sigterm_share, rng, kills, t0)
    )
    master_killer = None
    if isinstance(redis, SentinelStore) and args.kill_redis_every_s:
        master_killer = asyncio.create_task(
            kill_masters(redis, stop_at, args.kill_redis_every_s, redis_kills, t0)
        )
    while not killer.done():
        await asyncio.wait([killer], timeout=30)
        print(progress(stats, kills, t0), flush=True)
    killer.result()
    if master_killer is not None:
        await master_killer  # the last failover is over, its old master back as a replica
    stop.set()  # every driver ends its session, with every replica up
    done, late = await asyncio.wait(tasks, timeout=60)
    for task in late:
        task.cancel()
    for task in done:
        if task.exception() is not None:
            stats.errors.append(f"driver crashed: {task.exception()!r}")
    await sampler
    for client in clients:
        await client.close()
    return {
        "duration_s": round(time.monotonic() - t0, 1), "kills": kills, "series": series,
        "records": stats.records, "replies": stats.answered, "failovers": stats.failovers(),
        "resent": stats.resent(), "errors": stats.errors[:50], "error_count": len(stats.errors),
        "drivers_not_finished": len(late), "multi_sessions": n_multi,
        "redis_kills": redis_kills, "refused": stats.refused, "store": args.store,
        "opens_refused": stats.opens_refused,
        "store_mode": args.store_mode,
        "duplicates": sum(sum(r.duplicates) for r in stats.records),
        "sessions": len(stats.records), "steps": step_counts(stats.records),
    }  # fmt: skip


def cpu_seconds(replicas: list[Replica], redis: Redis | SentinelStore) -> dict[str, float]:
    """CPU seconds so far: every replica generation, Redis, this process (the client)."""
    me = psutil.Process().cpu_times()
    return {
        "replicas": round(sum(r.cpu_now() for r in replicas), 1),
        "redis": round(redis.cpu_s(), 1),
        "client": round(me.user + me.system, 1),
    }


def server_warnings(logs: Path) -> dict[str, dict[str, Any]]:
    """WARNING and ERROR log lines of every replica generation: count and first line, by
    message."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(logs.glob("*.log"), key=lambda p: p.stat().st_mtime):
        for line in path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                key = line[:120]  # grpc's C-core lines, tracebacks
            else:
                key = f"{event.get('level', '?')}: {event.get('event', event.get('message', ''))}"
            entry = found.setdefault(key, {"count": 0, "first": f"{path.name}: {line[:600]}"})
            entry["count"] += 1
    return dict(sorted(found.items(), key=lambda kv: -kv[1]["count"]))


def summary(result: dict[str, Any]) -> list[str]:
    steps, check = result["steps"], result["verify"]
    kills = result["kills"]
    by_signal = {s: sum(1 for k in kills if k["signal"] == s) for s in ("SIGKILL", "SIGTERM")}
    down = [k["down_s"] for k in kills] or [0.0]
    drains = [k for k in kills if k["signal"] == "SIGTERM"]
    return [
        f"chaos soak: {result['duration_s']} s, model {result['model']}, {result['sessions']} "
        f"sessions ({result['multi_sessions']} places over StreamMulti)",
        f"kills: {by_signal['SIGKILL']} SIGKILL + {by_signal['SIGTERM']} SIGTERM, down "
        f"{np.mean(down):.2f} s mean / {max(down):.2f} s max (restart until SERVING)",
        f"SIGTERM exits: {sum(1 for k in drains if k['exit_code'] == 0)} of {len(drains)} "
        f"exited 0, {_span(drains, 'exit_s')} s after the signal; drains failed "
        f"{len(drain_failures(result))} (outlived the {DRAIN_GRACE_S:.0f} s grace by "
        f"{OVERRUN_S:.0f} s, or exited non-zero)",
        f"replies {result['replies']}, failovers {result['failovers']}, messages resent "
        f"{result['resent']}, answered as duplicates {result['duplicates']}",
        f"steps sent {steps['sent']}, acknowledged {steps['acknowledged']}, applied "
        f"{steps['applied']}, lost {steps['lost']}, doubled {steps['doubled']}",
        f"sessions failed {steps['sessions_failed']}, client errors {result['error_count']}",
        f"store {result['store']} ({result['store_mode']}): {len(result['redis_kills'])} master "
        f"kills (failover {_span(result['redis_kills'], 'failover_s')} s), chunks refused "
        f"UNAVAILABLE and sent again {result['refused']}, opens {result['opens_refused']}",
        "CPU seconds: " + ", ".join(f"{k} {v}" for k, v in result["cpu_s"].items())
        + f" ({sum(result['cpu_s'].values()) / max(1, result['replies']) * 1e3:.2f} ms per reply)",
        f"replies checked {check['replies']}: mismatched {check['mismatched']} (max |diff| "
        f"{check['max_abs_diff']:.2e}), wrong step counts {check['wrong_totals']}, final "
        f"probabilities wrong {check['final_mismatched']}, duplicates without probabilities "
        f"{check['unverifiable_duplicates']}",
        "peak RSS MiB: " + ", ".join(f"{k} {_peak(v):.0f}" for k, v in result["series"].items()
                                      if k.startswith("replica") or k in ("redis", "client")),
    ]  # fmt: skip


def _span(kills: list[dict[str, Any]], key: str) -> str:
    values = [k[key] for k in kills] or [0.0]
    return f"{np.mean(values):.2f} mean / {max(values):.2f} max"


def _peak(values: list[float | None]) -> float:
    return max((v for v in values if v is not None), default=0.0)


def drain_failures(result: dict[str, Any]) -> list[str]:
    """One line per SIGTERMed replica that outlived its grace by OVERRUN_S or exited non-zero
    (3: its drain deadline ended it, service/drain_deadline.py)."""
    lines = []
    for kill in [*result["kills"], *result["final_stop_failures"]]:
        if kill["signal"] != "SIGTERM" or not (kill["overran"] or kill["exit_code"]):
            continue
        who = f"replica {kill['replica']} (generation {kill['generation']})"
        when = "at the end of the run" if kill.get("at_the_end") else f"at t={kill['t']} s"
        what = (f"still alive {OVERRUN_S:.0f} s after its {DRAIN_GRACE_S:.0f} s drain grace: "
                "SIGKILLed" if kill["overran"] else f"exited {kill['exit_code']}")  # fmt: skip
        lines.append(f"DRAIN FAILED: {who} SIGTERMed {when}, {what}; log: "
                     + " | ".join(kill.get("log_tail", []))[-600:])  # fmt: skip
    return lines


def passed(result: dict[str, Any]) -> bool:
    steps, check = result["steps"], result["verify"]
    return not (steps["lost"] or steps["doubled"] or steps["sessions_failed"]
                or check["mismatched"] or check["wrong_totals"] or check["final_mismatched"]
                or result["error_count"] or result["drivers_not_finished"]
                or drain_failures(result))  # fmt: skip


def plot(result: dict[str, Any], path: Path) -> None:
    """RSS per replica and replies/s over time, each kill marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = result["series"]
    t = series["t"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    for key in sorted(k for k in series if k.startswith("replica")):
        top.plot(t, [np.nan if v is None else v for v in series[key]], label=key, lw=1)
    top.set_ylabel("RSS MiB")
    top.legend(loc="upper left", fontsize=8)
    bottom.plot(t, series["replies_per_s"], color="black", lw=0.8)
    bottom.set_ylabel("replies / s (all sessions)")
    moved = bottom.twinx()
    moved.plot(t, series["failovers"], color="tab:blue", lw=0.8)
    moved.set_ylabel("failovers so far", color="tab:blue")
    bottom.set_xlabel("seconds")
    for kill in result["kills"]:
        style = {"color": "red", "ls": "-"} if kill["signal"] == "SIGKILL" else {
            "color": "tab:orange", "ls": "--"}  # fmt: skip
        for axis in (top, bottom):
            axis.axvline(kill["t"], lw=0.5, alpha=0.5, **style)
    steps = result["steps"]
    top.set_title(
        f"chaos soak, {result['model']}: {len(result['kills'])} kills (red SIGKILL, orange "
        f"SIGTERM); steps lost {steps['lost']}, doubled {steps['doubled']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lstm-chaos-") as tmp:
        result = asyncio.run(soak(args, Path(tmp)))
    given = argv if argv is not None else sys.argv[1:]
    result["command"] = " ".join(["python -m bench.chaos", *given])
    result["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result["passed"] = passed(result)
    (args.out / "chaos.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / "chaos.png")
    lines = summary(result) + drain_failures(result)
    print("\n".join(lines))
    print(("PASSED" if result["passed"] else "FAILED") + f": {args.out / 'chaos.json'}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
