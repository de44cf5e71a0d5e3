"""Cross-session batching over a real server: batched streams == offline, StreamMulti semantics."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from service.engine.compute.runtime import RunOutput
from tests.integration.conftest import Reference, ServerThread, make_config, metric, scrape
from tests.integration.test_stream import STREAMABLE, random_sequence, stream_one


class RecordingRun:
    """Wraps a model runtime's run() and records the `lengths` of every call."""

    def __init__(self, runtime: Any) -> None:
        self.inner = runtime.run
        self.calls: list[list[int]] = []

    def __call__(
        self, inputs: np.ndarray, lengths: np.ndarray, state: np.ndarray, *more: Any
    ) -> RunOutput:
        self.calls.append(lengths.tolist())
        return self.inner(inputs, lengths, state, *more)


@pytest.fixture(scope="module")
def batching_server(tiny_repo: Path) -> Iterator[ServerThread]:
    """Batching on; each run takes >= 3 ms so concurrent sessions' chunks pile up and batch."""
    config = make_config(
        tiny_repo, max_batch_size=16, max_queue_delay_us=500, max_concurrent_batches=2,
    )  # fmt: skip
    srv = ServerThread(config, run_delay_s=0.003).start()
    yield srv
    srv.stop()


def record(server: ServerThread, model: str) -> RecordingRun:
    registry = server.app.engine.registry  # type: ignore[union-attr]
    runtime = registry.get(model, 1).runtime
    recorder = RecordingRun(runtime)
    runtime.run = recorder  # type: ignore[method-assign]
    return recorder


def test_batched_concurrent_streams_with_mixed_lengths_match_offline(
    batching_server: ServerThread, reference: Reference
) -> None:
    rng = np.random.default_rng(1)
    jobs = []
    for i in range(24):
        model = sorted(STREAMABLE)[i % len(STREAMABLE)]
        jobs.append((model, random_sequence(rng, model, int(rng.integers(10, 40)))))
    recorders = {m: record(batching_server, m) for m in STREAMABLE}

    async def main() -> list[list[np.ndarray]]:
        return await asyncio.gather(
            *(stream_one(batching_server.address, m, s, seed) for seed, (m, s) in enumerate(jobs))
        )

    for (model, seq), got in zip(jobs, asyncio.run(main()), strict=True):
        probs, step_probs = reference.run(model, seq)
        np.testing.assert_allclose(np.stack(got[:-1]), step_probs, atol=1e-5)
        np.testing.assert_allclose(got[-1], probs, atol=1e-5)
    calls = [c for r in recorders.values() for c in r.calls]
    assert all(min(c) >= 1 for c in calls)  # a row with no steps is never run
    assert any(len(set(c)) > 1 for c in calls), "no batch mixed chunk lengths"
    assert max(len(c) for c in calls) > 1, "no batch held more than one session"
    samples = scrape(batching_server.metrics_url)
    runs = metric(samples, "lstm_serve_batch_size_count", model="tiny-lstm")
    chunks = metric(samples, "lstm_serve_batch_size_sum", model="tiny-lstm")
    assert 0 < runs < chunks
    assert metric(samples, "lstm_serve_batch_compute_seconds_count", model="tiny-lstm") == runs
    assert metric(samples, "lstm_serve_batch_queue_seconds_count", model="tiny-lstm") == runs


def entry(session_id: str = "", **kind: Any) -> pb.SessionRequest:
    return pb.SessionRequest(session_id=session_id, **kind)


def chunk(seq: int, ids: list[int]) -> pb.Chunk:
    return pb.Chunk(seq=seq, input=pb.SequenceInput(tokens=pb.TokenIds(ids=ids)))


async def exchange(call: Any, entries: list[pb.SessionRequest]) -> list[pb.SessionResult]:
    await call.write(pb.StreamMultiRequest(entries=entries))
    return list((await call.read()).results)


def test_stream_multi_many_sessions_match_offline_with_in_band_errors(
    batching_server: ServerThread, reference: Reference
) -> None:
    rng = random.Random(5)
    seqs = [np.array([rng.randint(1, 27) for _ in range(rng.randint(6, 20))]) for _ in range(12)]

    async def main() -> dict[str, Any]:
        async with grpc.aio.insecure_channel(batching_server.address) as channel:
            call = pb_grpc.LstmServeStub(channel).StreamMulti()
            opens = [entry(open=pb.OpenSession(model="tiny-lstm", version=1)) for _ in seqs]
            opened = await exchange(call, [*opens, entry(open=pb.OpenSession(model="nope"))])
            ids = [r.session_id for r in opened[:-1]]
            done = [0] * len(seqs)
            last: list[pb.ChunkResult | None] = [None] * len(seqs)
            next_seq = [1] * len(seqs)  # each session's seqs are consecutive
            while any(d < len(s) for d, s in zip(done, seqs, strict=True)):
                entries, who = [], []
                for i, s in enumerate(seqs):
                    for _ in range(rng.randint(0, 2)):  # 0, 1 or 2 chunks of a session
                        if done[i] < len(s):
                            n = rng.randint(1, 5)
                            part = s[done[i] : done[i] + n].tolist()
                            entries.append(entry(ids[i], chunk=chunk(next_seq[i], part)))
                            who.append(i)
                            done[i] = min(len(s), done[i] + n)
                            next_seq[i] += 1
                for i, result in zip(who, await exchange(call, entries), strict=True):
                    assert result.session_id == ids[i] and not result.chunk.HasField("error")
                    last[i] = result.chunk
            extra = await exchange(call, [
                entry(ids[0], chunk=chunk(1, [1])),  # a resend: duplicate
                entry(ids[1], chunk=chunk(next_seq[1], [99])),  # out of range: in-band error
                entry("0" * 32, chunk=chunk(1, [1])),  # unknown session: entry error
                entry(ids[2], reset=pb.Reset(seq=next_seq[2])),
                entry(ids[2], chunk=chunk(next_seq[2] + 1, [1, 2])),  # after the reset
                entry(ids[3], end=pb.End()),
                entry(ids[3], chunk=chunk(next_seq[3], [1])),  # after its end: entry error
                entry(ids[4]),  # empty entry
                entry(ids[5], chunk=chunk(next_seq[5] + 1, [1])),  # a gap: refused in-band
            ])  # fmt: skip
            await call.done_writing()
            return {"opened": opened, "last": last, "extra": extra}

    got = asyncio.run(main())
    assert got["opened"][-1].error.code == "NOT_FOUND" and not got["opened"][-1].session_id
    for s, result in zip(seqs, got["last"], strict=True):
        assert result.total_steps == len(s)
        np.testing.assert_allclose(
            result.probabilities, reference.run("tiny-lstm", s)[0], atol=1e-5
        )
    dup, bad, unknown, reset, after, ended, gone, empty, gap = got["extra"]
    assert dup.chunk.duplicate and dup.chunk.total_steps == len(seqs[0])
    assert bad.chunk.error.code == "INVALID_ARGUMENT" and "99" in bad.chunk.error.message
    assert bad.chunk.total_steps == len(seqs[1])
    assert unknown.error.code == "NOT_FOUND"
    assert not reset.reset.duplicate and after.chunk.total_steps == 2
    expected = reference.run("tiny-lstm", np.array([1, 2]))[0]
    np.testing.assert_allclose(after.chunk.probabilities, expected, atol=1e-5)
    assert ended.ended.total_steps == len(seqs[3]) and gone.error.code == "NOT_FOUND"
    assert empty.error.code == "FAILED_PRECONDITION"
    assert gap.chunk.error.code == "FAILED_PRECONDITION" and "takes seq" in gap.chunk.error.message
    assert gap.chunk.total_steps == len(seqs[5])


def test_client_multi_stream_resume_and_end(
    batching_server: ServerThread, reference: Reference
) -> None:
    from lstmserve.client import LstmClient, MultiStream

    async def main() -> tuple[list[pb.SessionResult], list[pb.SessionResult]]:
        async with LstmClient(batching_server.address) as client:
            multi = client.multi_stream()
            opened = await multi.exchange([MultiStream.open("tiny-gru") for _ in range(3)])
            ids = [r.session_id for r in opened]
            await multi.exchange([MultiStream.chunk(s, 1, [1, 2]) for s in ids])  # "ab"
            await multi.close()
            again = client.multi_stream()  # the sessions outlived the first stream
            resumed = await again.exchange([MultiStream.resume(ids[0])])
            last = await again.exchange(
                [MultiStream.chunk(s, 2, [i]) for s, i in zip(ids, [3, 4, 5], strict=True)]
                + [MultiStream.end(s) for s in ids]
            )
            await again.close()
            return resumed, last

    resumed, last = asyncio.run(main())
    assert resumed[0].opened.resumed and resumed[0].opened.last_applied_seq == 1
    for text, result in zip(["abc", "abd", "abe"], last[:3], strict=True):
        ids = np.array([ord(c) - 96 for c in text], dtype=np.int64)
        expected = reference.run("tiny-gru", ids)[0]
        np.testing.assert_allclose(result.chunk.probabilities, expected, atol=1e-5)
    assert [r.ended.total_steps for r in last[3:]] == [3, 3, 3]


def test_a_rejected_multi_entry_reports_the_session_as_of_that_entry(
    batching_server: ServerThread,
) -> None:
    async def main() -> list[pb.SessionResult]:
        async with grpc.aio.insecure_channel(batching_server.address) as channel:
            call = pb_grpc.LstmServeStub(channel).StreamMulti()
            (opened,) = await exchange(call, [entry(open=pb.OpenSession(model="tiny-lstm"))])
            sid = opened.session_id
            results = await exchange(call, [
                entry(sid, chunk=chunk(1, [1, 2])),  # applied: 2 steps
                entry(sid, chunk=chunk(3, [1])),  # a gap: refused with the session at 2
                entry(sid, chunk=chunk(2, [3, 4])),  # applied: 4 steps
                entry(sid, chunk=chunk(3, [99])),  # out of range: refused at 4
            ])  # fmt: skip
            await call.done_writing()
            return results

    first, gap, second, bad = asyncio.run(main())
    assert first.chunk.total_steps == 2 and second.chunk.total_steps == 4
    assert gap.chunk.error.code == "FAILED_PRECONDITION" and gap.chunk.total_steps == 2
    assert bad.chunk.error.code == "INVALID_ARGUMENT" and bad.chunk.total_steps == 4
