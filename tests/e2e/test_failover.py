"""Several replicas as real processes: one is stopped mid-stream (SIGTERM: drain with a final
snapshot; SIGKILL: the Redis session store), and the Python client (StreamSession, MultiStream,
lstm-client) carries the sessions to another by itself. The per-step probabilities must equal
one uninterrupted offline run, with every step applied once (total_steps)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from lstmserve.client import LstmClient, MultiStream
from lstmserve.v1 import lstm_serve_pb2 as pb
from tests.e2e.conftest import ServerProcess, run_client
from tests.integration.conftest import Reference, metric, scrape

KEY = "fleet:" + base64.b64encode(b"the-whole-fleet-shares-this-key!").decode()
WORD = np.array([3, 15, 14, 20, 9, 14, 21, 9, 20, 25, 19, 20, 1, 20, 5], np.int64)  # 15 steps
STOP_AFTER = 6  # chunks answered by the first replica before it is stopped
SLOW_MS = 300  # the first replica's model runs: a chunk is in flight when it is stopped


def _samples(server: ServerProcess) -> dict[str, float]:
    return scrape(f"http://127.0.0.1:{server.metrics_port}/metrics")


async def _until_in_flight(server: ServerProcess, timeout: float = 10.0) -> None:
    """Wait until `server` has a chunk queued or running (its metrics say so)."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout
    while (
        metric(await loop.run_in_executor(None, _samples, server), "lstm_serve_inflight_runs") < 1
    ):
        assert time.monotonic() < deadline, "no chunk in flight on the first replica"
        await asyncio.sleep(0.01)


@contextlib.contextmanager
def _pair(repo: Path, *flags: str) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """(slow first replica, second replica), both with `flags`, both ready; stopped after."""
    first = ServerProcess(repo, *flags, run_delay_ms=SLOW_MS)
    second = ServerProcess(repo, *flags)
    try:
        first.wait_event("ready")
        second.wait_event("ready")
        yield first, second
    finally:
        first.stop()
        second.stop()


async def _stream_through_failover(
    first: ServerProcess, second: ServerProcess, stop_first: Callable[[], None]
) -> tuple[list[pb.ChunkResult], pb.SessionEnded, str]:
    """Ping-pong one token per chunk; stop the first replica while chunk STOP_AFTER+1 runs."""
    results = []
    async with LstmClient([first.address, second.address]) as client:
        session = await client.open_session("tiny-lstm", version=1)
        for i, token in enumerate(WORD):
            await session.send([int(token)])
            if i == STOP_AFTER:
                await _until_in_flight(first)
                stop_first()
            results.append((await session.receive()).chunk)
        ended = await session.end()
    return results, ended, session.address


def _check(reference: Reference, results: list[pb.ChunkResult], ended: pb.SessionEnded) -> None:
    assert not any(r.duplicate for r in results), "every chunk applied once, none resent"
    assert [r.total_steps for r in results] == list(range(1, len(WORD) + 1))
    assert ended.total_steps == len(WORD), "no step lost, none applied twice"
    _, step_probs = reference.run("tiny-lstm", WORD)
    np.testing.assert_allclose(np.stack([r.probabilities for r in results]), step_probs, atol=1e-5)


def test_sigterm_drain_hands_the_session_over_by_final_snapshot(tiny_repo: Path) -> None:
    with _pair(tiny_repo, "--snapshot-key", KEY) as (slow, other):
        results, ended, last = asyncio.run(_stream_through_failover(slow, other, slow.terminate))
        assert slow.proc.wait(20) == 0, "the drained replica exits cleanly"
        assert last == other.address
        assert metric(_samples(other), "lstm_serve_snapshots_total", event="restored") == 1
        stopped = [e for e in _events(slow) if e.get("event") == "stopped"]
        assert stopped and stopped[0].get("drained") is True
    _check(Reference(tiny_repo), results, ended)


@pytest.fixture
def redis_flags(redis_url: str) -> tuple[str, ...]:
    return ("--snapshot-key", KEY, "--session-store", redis_url)


def test_sigkill_with_the_redis_store_resumes_the_session_elsewhere_by_id(
    tiny_repo: Path, redis_flags: tuple[str, ...]
) -> None:
    with _pair(tiny_repo, *redis_flags) as (doomed, survivor):
        stream = _stream_through_failover(doomed, survivor, doomed.proc.kill)
        results, ended, last = asyncio.run(stream)
        assert doomed.proc.wait(20) != 0, "killed, no drain"
        assert last == survivor.address
        samples = _samples(survivor)
        assert metric(samples, "lstm_serve_session_events_total", event="resumed") == 1
        assert metric(samples, "lstm_serve_session_events_total", event="restored") == 1
    _check(Reference(tiny_repo), results, ended)


WORDS = [WORD[:9], WORD[3:15], WORD[5:12]]


async def _multi_through_failover(
    first: ServerProcess, second: ServerProcess, stop_first: Callable[[], None]
) -> tuple[dict[str, list[pb.ChunkResult]], list[pb.SessionEnded], MultiStream]:
    """Three sessions over one StreamMulti, a token each per message (those still going); the
    first replica is stopped while message STOP_AFTER+1 runs."""
    async with LstmClient([first.address, second.address]) as client:
        multi = client.multi_stream()
        ids = [r.session_id for r in await multi.exchange([MultiStream.open("tiny-gru")] * 3)]
        got: dict[str, list[pb.ChunkResult]] = {i: [] for i in ids}
        for step in range(max(map(len, WORDS))):
            live = [(i, w) for i, w in zip(ids, WORDS, strict=True) if step < len(w)]
            await multi.send([MultiStream.chunk(i, step + 1, [int(w[step])]) for i, w in live])
            if step == STOP_AFTER:
                await _until_in_flight(first)
                stop_first()
            results = await multi.receive()
            assert [r.session_id for r in results] == [i for i, _ in live], "answered in order"
            for r in results:
                got[r.session_id].append(r.chunk)
        ended = [r.ended for r in await multi.exchange([MultiStream.end(i) for i in ids])]
        await multi.close()
    return {i: got[i] for i in ids}, ended, multi


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_a_multi_stream_fails_over_with_every_entry_answered_once(
    tiny_repo: Path, redis_url: str, how: str
) -> None:
    """SIGKILL: the sessions are resumed from Redis; SIGTERM (no store): restored from the
    draining replica's final snapshots."""
    store = ("--session-store", redis_url) if how == "sigkill" else ()
    with _pair(tiny_repo, "--snapshot-key", KEY, *store) as (doomed, survivor):
        stop = doomed.proc.kill if how == "sigkill" else doomed.terminate
        got, ended, multi = asyncio.run(_multi_through_failover(doomed, survivor, stop))
        samples = _samples(survivor)
    assert multi.address == survivor.address and multi.failovers == 1
    if how == "sigkill":
        assert metric(samples, "lstm_serve_session_events_total", event="resumed") == 3
    else:
        assert metric(samples, "lstm_serve_snapshots_total", event="restored") == 3
    reference = Reference(tiny_repo)
    for (session_id, results), word, end in zip(got.items(), WORDS, ended, strict=True):
        assert [r.total_steps for r in results] == list(range(1, len(word) + 1)), session_id
        assert end.total_steps == len(word), "no step lost, none applied twice"
        _, step_probs = reference.run("tiny-gru", word)
        np.testing.assert_allclose(np.stack([r.probabilities for r in results]), step_probs,
                                   atol=1e-5)  # fmt: skip


def _printed_steps(stdout: str) -> list[tuple[str, str, str]]:
    """(prefix, label, probability) of each step line lstm-client printed."""
    out = []
    for line in stdout.splitlines():
        if line.startswith("'"):
            prefix, _, rest = line[1:].partition("'")
            label, prob = rest.split()[:2]
            out.append((prefix, label, prob))
    return out


def test_lstm_client_resumes_a_kept_session_on_the_second_address_after_sigkill(
    tiny_repo: Path, redis_flags: tuple[str, ...]
) -> None:
    a = ServerProcess(tiny_repo, *redis_flags)
    b = ServerProcess(tiny_repo, *redis_flags)
    try:
        a.wait_event("ready")
        b.wait_event("ready")
        both = ("--address", a.address, "--address", b.address)
        first = run_client(*both, "stream", "tiny-gru", "--text", "hel", "--keep")
        assert first.returncode == 0, first.stderr
        session_id = first.stdout.split()[1]
        a.proc.kill()
        assert a.proc.wait(20) != 0
        second = run_client(*both, "stream", "--session", session_id, "--text", "lo")
    finally:
        a.stop()
        b.stop()
    assert second.returncode == 0, second.stderr
    assert f"session resumed on {b.address}" in second.stderr
    assert second.stdout.splitlines()[-1] == "ended after 5 steps"
    _, step_probs = Reference(tiny_repo).run("tiny-gru", np.array([8, 5, 12, 12, 15]))
    expected = [(f"class{p.argmax()}", f"{p.max():.3f}") for p in step_probs]
    printed = _printed_steps(first.stdout) + _printed_steps(second.stdout)
    # Each line answers all the text sent so far; the kept session held "l" (an accent may
    # follow it) over to the second run, which settles it with its own "l".
    assert [p for p, _, _ in printed] == ["h", "he", "hel", "…l", "…lo"]
    assert [(label, prob) for _, label, prob in printed] == expected


def _events(server: ServerProcess) -> list[dict]:
    out = []
    for line in server.lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
