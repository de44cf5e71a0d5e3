"""The shared session store at fleet scale, all real processes on 127.0.0.1: lstm-serve replicas
(`python -m service.cli`) and redis-server (one node, a Sentinel group, a Cluster, TLS).

- Sentinel, strict: the Redis master SIGKILLed mid-stream, then the replica holding the sessions
  SIGKILLed: every session continues, no acknowledged step lost or doubled, outputs = offline.
- A store outage (redis-server SIGKILLed, then started again on its port) in strict mode: chunks
  refused in-band UNAVAILABLE (Stream and StreamMulti), state unchanged, health SERVING, the
  metric and the log line; once it answers the retried chunk applies and nothing is lost.
- The same outage in best-effort mode: chunks acknowledged during it, and a replica killed then
  loses exactly those (its sessions resume at their last stored seq); nothing acknowledged after
  the store answers again is lost.
- Redis Cluster and TLS (rediss://, CA file, password file): a session continued on another
  replica after a SIGKILL.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.redisfleet import ClusterFleet, RedisNode, SentinelFleet
from lstmserve.client import LstmClient, MultiStream, StreamSession
from lstmserve.v1 import lstm_serve_pb2 as pb
from tests.e2e.conftest import ServerProcess
from tests.integration.conftest import Reference, metric, scrape

KEY = "fleet:" + base64.b64encode(b"the-whole-fleet-shares-this-key!").decode()
WORD = np.array([3, 15, 14, 20, 9, 14, 21, 9, 20, 25, 19, 20, 1, 20, 5], np.int64)  # 15 steps
MODEL = "tiny-lstm"


def _servers(repo: Path, url: str, *flags: str) -> tuple[ServerProcess, ServerProcess]:
    args = ("--snapshot-key", KEY, "--session-store", url, "--session-store-timeout-s", "0.5")
    first, second = ServerProcess(repo, *args, *flags), ServerProcess(repo, *args, *flags)
    first.wait_event("ready")
    second.wait_event("ready")
    return first, second


@pytest.fixture
def stop_after() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(10)


def _samples(server: ServerProcess) -> dict[str, float]:
    return scrape(f"http://127.0.0.1:{server.metrics_port}/metrics")


def _store_up(server: ServerProcess) -> float:
    return metric(_samples(server), "lstm_serve_session_store_up")


async def _wait_store_up(server: ServerProcess, timeout_s: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout_s
    while await loop.run_in_executor(None, _store_up, server) != 1:
        assert time.monotonic() < deadline, "the store was never reported back up"
        await asyncio.sleep(0.05)


async def _step(session: StreamSession, token: int, refused: list[str]) -> pb.ChunkResult:
    """One chunk; an in-band UNAVAILABLE (strict: the store did not take it) is retried."""
    deadline = time.monotonic() + 40
    while True:
        result = await session.step([token])
        if not result.HasField("error"):
            return result
        assert result.error.code == "UNAVAILABLE", result.error
        refused.append(result.error.message)
        assert time.monotonic() < deadline, f"refused for 40 s: {result.error.message}"
        await asyncio.sleep(0.05)


def _check(reference: Reference, results: list[pb.ChunkResult]) -> None:
    """Every step applied once, in order, each reply equal to offline onnxruntime."""
    assert [r.total_steps for r in results] == list(range(1, len(results) + 1))
    _, step_probs = reference.run(MODEL, WORD[: len(results)])
    np.testing.assert_allclose(np.stack([r.probabilities for r in results]), step_probs, atol=1e-5)


def _serving(server: ServerProcess) -> bool:
    with grpc.insecure_channel(server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _story(fleet: SentinelFleet) -> str:
    return "\n".join(fleet.switches())


def _recover(fleet: SentinelFleet, old: RedisNode) -> None:
    """After a master kill: wait for the failover, then bring the old master back as a replica
    (strict mode waits for one replica per save: without it, saves are refused)."""
    fleet.wait_failover(old.port)
    fleet.restart_as_replica(old)


def test_sentinel_master_killed_mid_stream_strict_loses_nothing(
    tiny_repo: Path, tmp_path: Path, stop_after: list[ServerProcess]
) -> None:
    fleet = SentinelFleet(tmp_path).start()
    try:
        first, second = _servers(tiny_repo, fleet.url, "--session-store-mode", "strict")
        stop_after += [first, second]
        refused: list[str] = []

        async def scenario() -> list[list[pb.ChunkResult]]:
            async with LstmClient([first.address, second.address]) as client:
                sessions = [await client.open_session(MODEL, version=1) for _ in range(4)]
                results: list[list[pb.ChunkResult]] = [[] for _ in sessions]
                failover: threading.Thread | None = None
                for t, token in enumerate(WORD):
                    if t == 5:  # the master dies; sentinels promote the replica
                        old = fleet.kill_master()
                        failover = threading.Thread(target=_recover, args=(fleet, old))
                        failover.start()
                    if t == 10:  # the replica holding every session dies too
                        assert failover is not None
                        await asyncio.get_running_loop().run_in_executor(None, failover.join)
                        first.proc.kill()
                    for session, got in zip(sessions, results, strict=True):
                        got.append(await _step(session, int(token), refused))
                for session in sessions:
                    ended = await session.end()
                    assert ended.total_steps == len(WORD)
                    assert session.address == second.address
                return results

        try:
            results = asyncio.run(scenario())
        except Exception as exc:  # with what the sentinels did, whatever broke
            raise AssertionError(f"{exc}\nthe sentinels' log:\n" + _story(fleet)) from exc
        assert fleet.failovers == 1
        assert refused, "strict: chunks were refused while no master answered"
        assert all("session store" in m for m in refused), refused[:3]
        reference = Reference(tiny_repo)
        for got in results:  # a refused chunk may have reached the master: its retry is then
            _check(reference, got)  # answered as a duplicate, with the very same result
        duplicates = sum(r.duplicate for got in results for r in got)
        assert duplicates <= len(refused)
    finally:
        fleet.stop()


def _durable_redis(tmp_path: Path) -> RedisNode:
    """A redis-server that keeps its data across a SIGKILL (AOF, fsync always)."""
    node = RedisNode(tmp_path, "redis")
    return node.start("--appendonly", "yes", "--appendfsync", "always")


def test_store_outage_strict_refuses_in_band_and_loses_nothing(
    tiny_repo: Path, tmp_path: Path, stop_after: list[ServerProcess]
) -> None:
    redis = _durable_redis(tmp_path)
    url = f"redis://127.0.0.1:{redis.port}/0"
    try:
        first, second = _servers(tiny_repo, url, "--session-store-mode", "strict")
        stop_after += [first, second]

        async def scenario() -> list[pb.ChunkResult]:
            async with LstmClient([first.address, second.address]) as client:
                session = await client.open_session(MODEL, version=1)
                multi = client.multi_stream()
                (opened,) = await multi.exchange([MultiStream.open(MODEL)])
                results = [await _step(session, int(tok), []) for tok in WORD[:3]]
                redis.kill()
                refused = await session.step([int(WORD[3])])
                assert refused.error.code == "UNAVAILABLE", refused
                assert "not acknowledged" in refused.error.message
                (entry,) = await multi.exchange([MultiStream.chunk(opened.session_id, 1, [3])])
                assert entry.chunk.error.code == "UNAVAILABLE", entry
                assert _serving(first), "health stays SERVING during a store outage"
                assert _store_up(first) == 0
                redis.start()
                await _wait_store_up(first)
                results += [await _step(session, int(tok), []) for tok in WORD[3:8]]
                first.proc.kill()  # every acknowledged chunk is in the store
                results += [await _step(session, int(tok), []) for tok in WORD[8:]]
                ended = await session.end()
                assert ended.total_steps == len(WORD) and session.address == second.address
                await multi.close()
                return results

        results = asyncio.run(scenario())
        _check(Reference(tiny_repo), results)
        events = [e.get("event") for e in _events(first)]
        assert events.count("session store down") == 1, "one log line per outage"
        assert "session store back" in events
    finally:
        redis.stop()


def _events(server: ServerProcess) -> list[dict[str, object]]:
    import json

    out = []
    for line in server.lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def test_store_outage_best_effort_loses_only_the_chunks_it_could_not_store(
    tiny_repo: Path, tmp_path: Path, stop_after: list[ServerProcess]
) -> None:
    redis = _durable_redis(tmp_path)
    url = f"redis://127.0.0.1:{redis.port}/0"
    try:
        first, second = _servers(tiny_repo, url, "--session-store-mode", "best-effort")
        stop_after += [first, second]

        async def scenario() -> tuple[pb.SessionOpened, pb.SessionOpened]:
            async with LstmClient([first.address]) as client:
                idle = await client.open_session(MODEL, version=1)  # nothing after the outage
                busy = await client.open_session(MODEL, version=1)  # a chunk after it
                for tok in WORD[:3]:
                    assert not (await idle.step([int(tok)])).HasField("error")
                    assert not (await busy.step([int(tok)])).HasField("error")
                redis.kill()
                for tok in WORD[3:5]:  # acknowledged, not stored
                    assert (await idle.step([int(tok)])).total_steps > 0
                    assert not (await busy.step([int(tok)])).HasField("error")
                assert _store_up(first) == 0
                redis.start()
                await _wait_store_up(first)
                assert (await busy.step([int(WORD[5])])).total_steps == 6
                first.proc.kill()
            async with LstmClient([second.address]) as elsewhere:
                a = await elsewhere.resume_session(idle.session_id)
                b = await elsewhere.resume_session(busy.session_id)
                opened = a.opened, b.opened
                await a.close()
                await b.close()
            return opened

        idle, busy = asyncio.run(scenario())
        assert (idle.last_applied_seq, idle.total_steps) == (3, 3), "lost: the 2 unstored chunks"
        assert (busy.last_applied_seq, busy.total_steps) == (6, 6), "nothing lost once back"
    finally:
        redis.stop()


def _tls_redis(tmp_path: Path) -> tuple[RedisNode, str, Path, Path]:
    """redis-server with TLS only and a password; (node, rediss URL, CA file, password file)."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem",
         "-out", "cert.pem", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    password = tmp_path / "password"
    password.write_text("s3cret-store-password\n")
    node = RedisNode(tmp_path, "tls")
    node.ssl_ca, port = str(tmp_path / "cert.pem"), node.port
    node.start(
        "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tmp_path / "cert.pem"),
        "--tls-key-file", str(tmp_path / "key.pem"), "--tls-ca-cert-file",
        str(tmp_path / "cert.pem"), "--tls-auth-clients", "no",
        "--requirepass", "s3cret-store-password",
    )  # fmt: skip
    return node, f"rediss://127.0.0.1:{port}/0", tmp_path / "cert.pem", password


@pytest.mark.parametrize("kind", ["cluster", "tls"])
def test_a_session_continues_on_another_replica_through(
    kind: str, tiny_repo: Path, tmp_path: Path, stop_after: list[ServerProcess]
) -> None:
    if kind == "cluster":
        store = ClusterFleet(tmp_path).start()
        url, flags = store.url, ()
    else:
        node, url, ca, password = _tls_redis(tmp_path)
        store = node
        flags = ("--session-store-tls-ca", str(ca), "--session-store-password-file", str(password))
    try:
        first, second = _servers(tiny_repo, url, *flags)
        stop_after += [first, second]

        async def scenario() -> list[pb.ChunkResult]:
            async with LstmClient([first.address, second.address]) as client:
                session = await client.open_session(MODEL, version=1)
                results = [await _step(session, int(tok), []) for tok in WORD[:6]]
                first.proc.kill()
                results += [await _step(session, int(tok), []) for tok in WORD[6:]]
                assert session.address == second.address
                assert (await session.end()).total_steps == len(WORD)
                return results

        _check(Reference(tiny_repo), asyncio.run(scenario()))
        assert not any("s3cret" in line for line in first.lines + second.lines)
    finally:
        store.stop()
