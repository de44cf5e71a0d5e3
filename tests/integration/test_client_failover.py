"""The client carries sessions to the next address when their server dies: two in-process
servers share a real Redis (or only the snapshot key), one is stopped hard mid-stream, and every
reply must match one uninterrupted offline run with no chunk applied twice."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from lstmserve.client import LstmClient, MultiStream, StreamSession
from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from tests.integration.conftest import Reference, ServerThread, make_config, metric, scrape

KEY = "k1:" + base64.b64encode(b"one-key-for-the-whole-failover!!").decode()
WORD = np.array([8, 5, 12, 12, 15, 23, 15, 18, 12, 4, 19], dtype=np.int64)  # "helloworlds"
STOP_AT = 4  # the chunk (0-based) in flight when the first server dies
SLOW_MS = 200  # the doomed server's compute delay, so a chunk is in flight when it dies


async def on_server(server: ServerThread, work: Coroutine[Any, Any, Any]) -> Any:
    """Run `work` on the server's own loop without blocking this one."""
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, server.loop))


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait (without blocking the loop) until `condition` holds; fail after `timeout`."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)
    assert condition(), what


async def kill_mid_chunk(server: ServerThread) -> None:
    """Once a chunk is queued or running on `server`, stop its gRPC server at once (no drain,
    no final snapshots: every stream is cut, as by a crash)."""
    assert server.app is not None
    engine = server.app.engine
    await until(lambda: engine.inflight > 0, "a chunk in flight on the doomed server")
    await on_server(server, server.app.grpc.stop(0))


@pytest.fixture(scope="module")
def survivor(tiny_repo: Path, redis_url: str) -> Iterator[ServerThread]:
    srv = ServerThread(make_config(tiny_repo, snapshot_key=KEY, session_store=redis_url)).start()
    yield srv
    srv.stop()


@pytest.fixture
def doomed(tiny_repo: Path, redis_url: str) -> Iterator[ServerThread]:
    """A slow server sharing the survivor's Redis, stopped hard by the test."""
    config = make_config(tiny_repo, snapshot_key=KEY, session_store=redis_url)
    srv = ServerThread(config, run_delay_s=SLOW_MS / 1000).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def keyed_survivor(tiny_repo: Path) -> Iterator[ServerThread]:
    """A replica with the snapshot key and no shared store: only final snapshots carry over."""
    srv = ServerThread(make_config(tiny_repo, snapshot_key=KEY)).start()
    yield srv
    srv.stop()


async def _ping_pong(session: StreamSession, ids: np.ndarray, kill: Coroutine[Any, Any, None]
                     ) -> list[pb.ChunkResult]:  # fmt: skip
    """One token per chunk, each reply awaited; `kill` runs while chunk STOP_AT is in flight."""
    results = []
    for i, token in enumerate(ids):
        await session.send([int(token)])
        if i == STOP_AT:
            await kill
        results.append((await session.receive()).chunk)
    return results


def _check_every_step(reference: Reference, model: str, ids: np.ndarray,
                      results: list[pb.ChunkResult]) -> None:  # fmt: skip
    """Every reply equals the offline run at its step, and counts each step once."""
    _, step_probs = reference.run(model, ids)
    assert [r.total_steps for r in results] == list(range(1, len(ids) + 1))
    assert not any(r.HasField("error") for r in results)
    np.testing.assert_allclose(np.stack([r.probabilities for r in results]), step_probs, atol=1e-5)


def test_a_session_continues_on_the_next_server_when_its_server_dies_mid_chunk(
    doomed: ServerThread, survivor: ServerThread, reference: Reference
) -> None:
    async def scenario() -> tuple[list[pb.ChunkResult], pb.SessionEnded, StreamSession]:
        async with LstmClient([doomed.address, survivor.address]) as client:
            session = await client.open_session("tiny-lstm", version=1)
            assert session.address == doomed.address
            results = await _ping_pong(session, WORD, kill_mid_chunk(doomed))
            return results, await session.end(), session

    results, ended, session = asyncio.run(scenario())
    _check_every_step(reference, "tiny-lstm", WORD, results)
    assert ended.total_steps == len(WORD) and ended.last_applied_seq == len(WORD)
    assert session.address == survivor.address and session.failovers == 1


def test_pipelined_chunks_are_resent_and_each_applied_once(
    doomed: ServerThread, survivor: ServerThread, reference: Reference
) -> None:
    async def scenario() -> tuple[list[pb.ChunkResult], pb.SessionEnded]:
        async with LstmClient([doomed.address, survivor.address]) as client:
            session = await client.open_session("tiny-gru")
            for token in WORD:
                await session.send([int(token)])
            results = [(await session.receive()).chunk for _ in range(2)]
            await kill_mid_chunk(doomed)
            results += [(await session.receive()).chunk for _ in range(len(WORD) - 2)]
            return results, await session.end()

    results, ended = asyncio.run(scenario())
    assert [r.seq for r in results] == list(range(1, len(WORD) + 1))
    for i, r in enumerate(results):  # applied here, or already applied and not again
        assert r.total_steps >= i + 1 if r.duplicate else r.total_steps == i + 1
    assert ended.total_steps == len(WORD), "no step lost, none applied twice"
    final, _ = reference.run("tiny-gru", WORD)
    np.testing.assert_allclose(results[-1].probabilities, final, atol=1e-5)


def test_resume_by_id_skips_a_dead_address(
    doomed: ServerThread, survivor: ServerThread, reference: Reference
) -> None:
    async def scenario() -> tuple[list[pb.ChunkResult], StreamSession]:
        async with LstmClient(doomed.address) as first:
            session = await first.open_session("tiny-gru")
            results = [await session.step([int(t)]) for t in WORD[:3]]
            await session.close()  # kept: the session stays, in Redis too
        await on_server(doomed, doomed.app.grpc.stop(0))
        async with LstmClient([doomed.address, survivor.address]) as client:
            again = await client.resume_session(session.session_id)
            assert again.opened.last_applied_seq == 3 and again.opened.total_steps == 3
            results += [await again.step([int(t)]) for t in WORD[3:]]
            await again.end()
            return results, again

    results, again = asyncio.run(scenario())
    _check_every_step(reference, "tiny-gru", WORD, results)
    assert again.address == survivor.address


def test_a_session_keeps_its_options_on_the_next_server(
    doomed: ServerThread, survivor: ServerThread, reference: Reference
) -> None:
    async def scenario() -> list[pb.ChunkResult]:
        async with LstmClient([doomed.address, survivor.address]) as client:
            session = await client.open_session("tiny-lstm", version=1, top_k=3, every_step=True)
            chunks = [WORD[:2], WORD[2:5], WORD[5:8], WORD[8:]]
            results = []
            for i, chunk in enumerate(chunks):
                await session.send(chunk)
                if i == 2:
                    await kill_mid_chunk(doomed)
                results.append((await session.receive()).chunk)
            await session.end()
            return results

    results = asyncio.run(scenario())
    _, step_probs = reference.run("tiny-lstm", WORD)
    every = [np.array(s.values) for r in results for s in r.step_probabilities]
    np.testing.assert_allclose(np.stack(every), step_probs, atol=1e-5)
    assert all(len(r.top) == 3 for r in results), "top_k=3 after the failover too"


def test_an_end_after_which_no_replica_knows_the_session_counts_as_ended(
    doomed: ServerThread, survivor: ServerThread
) -> None:
    """The end's reply is lost with its replica and the session is gone everywhere (ended):
    end() answers from what the client last saw instead of SessionLost."""

    async def scenario() -> pb.SessionEnded:
        async with LstmClient([doomed.address, survivor.address], failover_s=0.5) as client:
            session = await client.open_session("tiny-gru")
            for token in WORD[:3]:
                await session.step([int(token)])
            async with LstmClient(survivor.address) as other:  # as if the end had applied
                await (await other.resume_session(session.session_id)).end()
            await on_server(doomed, doomed.app.grpc.stop(0))
            return await session.end()

    ended = asyncio.run(scenario())
    assert ended.total_steps == 3 and ended.last_applied_seq == 3


def test_open_session_skips_an_unreachable_address(survivor: ServerThread) -> None:
    async def scenario() -> str:
        async with LstmClient(["127.0.0.1:1", survivor.address]) as client:
            session = await client.open_session("tiny-gru")
            await session.end()
            return session.address

    assert asyncio.run(scenario()) == survivor.address


class Failing(pb_grpc.LstmServeServicer):
    """A replica whose every Stream ends at once with `code` (CANCELLED: as when it stops)."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self.code = code
        self.calls = 0

    async def Stream(self, requests: Any, context: grpc.aio.ServicerContext) -> Any:
        self.calls += 1
        await context.abort(self.code, self.code.name)
        yield pb.StreamResponse()  # never reached: makes this a stream handler


async def failing(code: grpc.StatusCode) -> tuple[grpc.aio.Server, str, Failing]:
    """A Failing replica on this loop: (server, address, servicer)."""
    server, servicer = grpc.aio.server(), Failing(code)
    pb_grpc.add_LstmServeServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}", servicer


def test_open_session_moves_on_past_a_stream_cancelled_under_it(survivor: ServerThread) -> None:
    async def scenario() -> str:
        server, address, _ = await failing(grpc.StatusCode.CANCELLED)
        try:
            async with LstmClient([address, survivor.address]) as client:
                session = await client.open_session("tiny-gru")
                await session.step([1, 2])
                await session.end()
                return session.address
        finally:
            await server.stop(None)

    assert asyncio.run(scenario()) == survivor.address


def test_an_open_no_address_takes_is_asked_again_then_answered_with_the_servers_status() -> None:
    """A dead address and a replica answering UNAVAILABLE (its store failing over): the open is
    tried again for failover_s, then raises the replica's UNAVAILABLE, not SessionLost."""

    async def scenario() -> tuple[grpc.StatusCode | None, int]:
        server, address, servicer = await failing(grpc.StatusCode.UNAVAILABLE)
        try:
            async with LstmClient(["127.0.0.1:1", address], failover_s=0.5) as client:
                try:
                    await client.open_session("tiny-gru")
                except grpc.aio.AioRpcError as exc:
                    return exc.code(), servicer.calls
                return None, servicer.calls
        finally:
            await server.stop(None)

    code, calls = asyncio.run(scenario())
    assert code == grpc.StatusCode.UNAVAILABLE and calls > 1


WORDS = [WORD[:6], WORD[2:9], WORD[4:11]]


async def _multi_rounds(multi: MultiStream, kill: Coroutine[Any, Any, None]
                        ) -> tuple[dict[str, list[pb.SessionResult]], list[str]]:  # fmt: skip
    """Open a session per word, one token per session per message, then end them; `kill` runs
    while the message of round STOP_AT is in flight. Results by session, and the ids."""
    opened = await multi.exchange([MultiStream.open("tiny-gru") for _ in WORDS])
    ids = [r.session_id for r in opened]
    by_session: dict[str, list[pb.SessionResult]] = {i: [] for i in ids}
    for step in range(max(map(len, WORDS))):
        entries = [MultiStream.chunk(i, step + 1, [int(w[step])])
                   for i, w in zip(ids, WORDS, strict=True) if step < len(w)]  # fmt: skip
        await multi.send(entries)
        if step == STOP_AT:
            await kill
        results = await multi.receive()
        assert [r.session_id for r in results] == [e.session_id for e in entries], "in order"
        for r in results:
            by_session[r.session_id].append(r)
    ended = await multi.exchange([MultiStream.end(i) for i in ids])
    assert [r.ended.total_steps for r in ended] == [len(w) for w in WORDS], "each step once"
    await multi.close()
    return by_session, ids


def _check_multi(reference: Reference, by_session: dict[str, list[pb.SessionResult]],
                 ids: list[str]) -> None:  # fmt: skip
    for session_id, word in zip(ids, WORDS, strict=True):
        _check_every_step(reference, "tiny-gru", word, [r.chunk for r in by_session[session_id]])


def test_a_multi_stream_carries_its_sessions_to_the_next_server(
    doomed: ServerThread, survivor: ServerThread, reference: Reference
) -> None:
    async def scenario() -> tuple[dict[str, list[pb.SessionResult]], list[str], MultiStream]:
        async with LstmClient([doomed.address, survivor.address]) as client:
            multi = client.multi_stream()
            by_session, ids = await _multi_rounds(multi, kill_mid_chunk(doomed))
            return by_session, ids, multi

    by_session, ids, multi = asyncio.run(scenario())
    _check_multi(reference, by_session, ids)
    assert multi.address == survivor.address and multi.failovers == 1


def test_a_draining_server_hands_a_multi_stream_over_by_its_final_snapshots(
    tiny_repo: Path, keyed_survivor: ServerThread, reference: Reference
) -> None:
    draining = ServerThread(
        make_config(tiny_repo, snapshot_key=KEY), run_delay_s=SLOW_MS / 1000
    ).start()

    stopping: list[asyncio.Future[None]] = []

    async def drain() -> None:
        """SIGTERM's drain, started while a chunk runs; the client goes on meanwhile."""
        await until(lambda: draining.app.engine.inflight > 0, "a chunk in flight")
        stopping.append(asyncio.ensure_future(on_server(draining, draining.app.shutdown(5.0))))

    async def scenario() -> tuple[dict[str, list[pb.SessionResult]], list[str], MultiStream]:
        async with LstmClient([draining.address, keyed_survivor.address]) as client:
            multi = client.multi_stream()
            by_session, ids = await _multi_rounds(multi, drain())
            await stopping[0]
            return by_session, ids, multi

    try:
        before = metric(scrape(keyed_survivor.metrics_url), "lstm_serve_snapshots_total",
                        event="restored")  # fmt: skip
        by_session, ids, multi = asyncio.run(scenario())
    finally:
        draining.stop()
    _check_multi(reference, by_session, ids)
    assert multi.address == keyed_survivor.address and not multi.final_snapshots
    restored = metric(scrape(keyed_survivor.metrics_url), "lstm_serve_snapshots_total",
                      event="restored")  # fmt: skip
    assert restored - before == len(WORDS), "carried over by the final snapshots, no store"


def test_a_final_snapshot_the_store_has_moved_past_falls_back_to_resume_by_id(
    survivor: ServerThread, reference: Reference
) -> None:
    """A restore refused as stale (the shared store holds a newer copy) continues the session
    by id instead of losing it."""

    async def main() -> tuple[pb.SessionOpened, pb.ChunkResult]:
        async with LstmClient([survivor.address]) as client:
            session = await client.open_session("tiny-gru")
            await session.step([1, 2])
            old = (await session.snapshot()).data
            await session.step([3])  # the store now holds seq 2
            session.final_snapshot = old  # as if a draining server had sent this one
            await session.reconnect()
            reply = await session.step([4])
            await session.end()
            return session.opened, reply

    opened, reply = asyncio.run(main())
    assert opened.last_applied_seq == 2 and opened.total_steps == 3
    expected = reference.run("tiny-gru", np.array([1, 2, 3, 4]))[0]
    np.testing.assert_allclose(reply.probabilities, expected, atol=1e-5)


def test_a_multi_stream_continues_a_session_its_replica_holds_a_stale_copy_of(
    doomed: ServerThread, survivor: ServerThread, reference: Reference
) -> None:
    """Replica A holds session S at seq 1 on a MultiStream while B advances S to seq 2: A's
    answer to the stream's chunk 2 would be ABORTED in band (its copy is stale). The stream
    resumes S on A and sends the chunk again: answered as B applied it (duplicate), the other
    session's entry untouched, a message pipelined behind it answered after it, S's options
    kept and its next chunk applied once."""
    a, b = doomed, survivor

    async def scenario() -> tuple[list[pb.SessionResult], pb.SessionResult, MultiStream]:
        async with LstmClient(a.address) as ca, LstmClient(b.address) as cb:
            multi = ca.multi_stream()
            opened = await multi.exchange([MultiStream.open("tiny-gru", top_k=2)] * 2)
            s, other = (r.session_id for r in opened)
            await multi.exchange(
                [MultiStream.chunk(s, 1, WORD[:1]), MultiStream.chunk(other, 1, WORD[:1])]
            )
            on_b = await cb.resume_session(s)
            await on_b.step(WORD[1:2])  # seq 2, applied on B: A's copy is now stale
            await on_b.close()
            await multi.send(
                [MultiStream.chunk(s, 2, WORD[1:2]), MultiStream.chunk(other, 2, WORD[1:2])]
            )
            await multi.send([MultiStream.chunk(other, 3, WORD[2:3])])  # pipelined behind it
            results = await multi.receive()
            (behind,) = await multi.receive()
            assert behind.chunk.seq == 3 and behind.chunk.total_steps == 3, "in order"
            (third,) = await multi.exchange([MultiStream.chunk(s, 3, WORD[2:3])])
            await multi.exchange([MultiStream.end(s), MultiStream.end(other)])
            await multi.close()
            return results, third, multi

    results, third, multi = asyncio.run(scenario())
    assert [r.WhichOneof("kind") for r in results] == ["chunk", "chunk"], results
    resent, other = results[0].chunk, results[1].chunk
    assert resent.seq == 2 and resent.duplicate and resent.total_steps == 2
    assert other.seq == 2 and not other.duplicate and other.total_steps == 2
    for result in (resent, other):
        expected, _ = reference.run("tiny-gru", WORD[:2])
        np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
    assert third.chunk.total_steps == 3 and not third.chunk.duplicate
    assert len(third.chunk.top) == 2, "the session's options (top_k=2) kept by the resume"
    np.testing.assert_allclose(
        third.chunk.probabilities, reference.run("tiny-gru", WORD[:3])[0], atol=1e-5
    )
    assert multi.failovers == 0, "continued on the same stream"
