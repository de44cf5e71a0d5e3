"""Several replicas as real processes: one is stopped mid-stream (SIGTERM: drain with a final
snapshot; SIGKILL: the Redis session store), and the Python client carries the session to
another by itself. The per-step probabilities must equal one uninterrupted offline run."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lstmserve.client import LstmClient
from tests.e2e.conftest import ServerProcess
from tests.integration.conftest import Reference, metric, scrape

KEY = "fleet:" + base64.b64encode(b"the-whole-fleet-shares-this-key!").decode()
WORD = np.array([3, 15, 14, 20, 9, 14, 21, 9, 20, 25, 19, 20, 1, 20, 5], np.int64)  # 15 steps
STOP_AFTER = 6  # chunks answered by the first replica before it is stopped


async def _stream_through_failover(
    addresses: list[str], stop_first: Callable[[], None]
) -> tuple[list[np.ndarray], list[bool], str]:
    """Ping-pong one token per chunk; stop the first replica while chunk STOP_AFTER+1 runs."""
    probs, duplicates = [], []
    async with LstmClient(addresses) as client:
        session = await client.open_session("tiny-lstm", version=1)
        for i, token in enumerate(WORD):
            await session.send([int(token)])
            if i == STOP_AFTER:
                await asyncio.sleep(0.05)  # the chunk has reached the slow first replica
                stop_first()
            result = (await session.receive()).chunk
            duplicates.append(result.duplicate)
            probs.append(np.array(result.probabilities))
        last_address = client.addresses[client._index]
        await session.end()
    return probs, duplicates, last_address


def _check(reference: Reference, probs: list[np.ndarray], duplicates: list[bool]) -> None:
    assert not any(duplicates), "every chunk was applied exactly once, none answered as resent"
    _, step_probs = reference.run("tiny-lstm", WORD)
    np.testing.assert_allclose(np.stack(probs), step_probs, atol=1e-5)


def test_sigterm_drain_hands_the_session_over_by_final_snapshot(tiny_repo: Path) -> None:
    slow = ServerProcess(tiny_repo, "--snapshot-key", KEY, "--debug-compute-delay-ms", "300")
    other = ServerProcess(tiny_repo, "--snapshot-key", KEY)
    try:
        slow.wait_event("ready")
        other.wait_event("ready")
        probs, duplicates, last = asyncio.run(
            _stream_through_failover([slow.address, other.address], slow.terminate)
        )
        assert slow.proc.wait(20) == 0, "the drained replica exits cleanly"
        assert last == other.address
        samples = scrape(f"http://127.0.0.1:{other.metrics_port}/metrics")
        assert metric(samples, "lstm_serve_snapshots_total", event="restored") == 1
        snapshots = [e for e in _events(slow) if e.get("event") == "stopped"]
        assert snapshots and snapshots[0].get("drained") is True
    finally:
        slow.stop()
        other.stop()
    _check(Reference(tiny_repo), probs, duplicates)


def test_sigkill_with_the_redis_store_resumes_the_session_elsewhere_by_id(
    tiny_repo: Path, redis_url: str
) -> None:
    shared = ("--snapshot-key", KEY, "--session-store", redis_url)
    doomed = ServerProcess(tiny_repo, *shared, "--debug-compute-delay-ms", "300")
    survivor = ServerProcess(tiny_repo, *shared)
    try:
        doomed.wait_event("ready")
        survivor.wait_event("ready")
        probs, duplicates, last = asyncio.run(
            _stream_through_failover([doomed.address, survivor.address], doomed.proc.kill)
        )
        assert doomed.proc.wait(20) != 0, "killed, no drain"
        assert last == survivor.address
        samples = scrape(f"http://127.0.0.1:{survivor.metrics_port}/metrics")
        assert metric(samples, "lstm_serve_session_events_total", event="resumed") == 1
        assert metric(samples, "lstm_serve_session_events_total", event="restored") == 1
    finally:
        doomed.stop()
        survivor.stop()
    _check(Reference(tiny_repo), probs, duplicates)


def _events(server: ServerProcess) -> list[dict]:
    import json

    out = []
    for line in server.lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
