"""The sequence batcher without a network: batches, ordering, cancellation, drain, padding."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.engine.compute.runtime import RunOutput
from service.engine.core import ChunkOutcome, ChunkWork, Engine
from service.engine.schedule.batcher import bucket_of, pad_chunks
from service.engine.schedule.pending import WaiterGroup
from service.engine.types import BatchPolicy, StreamOptions
from service.errors import InvalidInput, SequenceGap, SessionNotFound, SessionReplaced
from tests.unit.engines import load_engine


class GatedRun:
    """Wraps the tiny-gru runtime of engines: records lengths, holds each run until released."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()

    def attach(self, engine: Engine) -> Engine:
        runtime = engine.registry.get("tiny-gru").runtime
        inner = runtime.run

        def run(
            inputs: np.ndarray, lengths: np.ndarray, state: np.ndarray, *more: Any
        ) -> RunOutput:
            self.calls.append(lengths.tolist())
            self.gate.wait(30)
            return inner(inputs, lengths, state, *more)

        runtime.run = run  # type: ignore[method-assign]
        return engine


@pytest.fixture
def gated() -> Any:
    run = GatedRun()
    yield run
    run.gate.set()


async def until(condition: Any, timeout_s: float = 10.0) -> None:
    """Wait (polling the event loop) until `condition()` holds; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for a condition"
        await asyncio.sleep(0.001)


def make_engine(repo: Path, **policy: Any) -> Engine:
    return load_engine(repo, compute_threads=2, policy=BatchPolicy(**policy))


def tokens(*ids: int) -> np.ndarray:
    return np.array(ids, dtype=np.int64)


def test_bucket_and_padding() -> None:
    assert [bucket_of(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [0, 1, 2, 2, 3, 3, 4, 4, 5]
    batch, lengths = pad_chunks([tokens(1, 2, 3), tokens(4)])
    assert batch.tolist() == [[1, 2, 3], [4, 0, 0]] and lengths.tolist() == [3, 1]
    frames, _ = pad_chunks([np.ones((2, 5), np.float32), np.ones((1, 5), np.float32)])
    assert frames.shape == (2, 2, 5) and frames[1, 1].sum() == 0


def test_chunks_submitted_together_share_one_run_and_equal_single_runs(
    tiny_repo: Path, gated: GatedRun
) -> None:
    engine = gated.attach(make_engine(tiny_repo))
    lone = gated.attach(make_engine(tiny_repo, max_batch_size=1))
    chunks = [tokens(1, 2, 3), tokens(4), tokens(5, 6), tokens(7, 8, 9, 10)]

    async def main() -> tuple[list[ChunkOutcome], list[ChunkOutcome]]:
        sessions = [await engine.open_session("tiny-gru", 0, StreamOptions()) for _ in chunks]
        together = await asyncio.gather(
            *(engine.apply_chunk(s, 1, c) for s, c in zip(sessions, chunks, strict=True))
        )
        alone = []
        for c in chunks:
            session = await lone.open_session("tiny-gru", 0, StreamOptions())
            alone.append(await lone.apply_chunk(session, 1, c))
        return together, alone

    together, alone = asyncio.run(main())
    assert gated.calls[0] == [3, 4, 2, 1]  # one run: the oldest bucket (3-4), then shorter ones
    assert all(len(c) == 1 for c in gated.calls[1:])
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_allclose(a.result.probs, b.result.probs, atol=1e-6)  # type: ignore[union-attr]
    engine.close()
    lone.close()


def test_under_load_a_batch_fills_while_one_runs(tiny_repo: Path, gated: GatedRun) -> None:
    engine = gated.attach(make_engine(tiny_repo, max_batch_size=8, max_queue_delay_s=60.0))
    gated.gate.clear()

    async def main() -> None:
        sessions = [await engine.open_session("tiny-gru", 0, StreamOptions()) for _ in range(6)]
        first = asyncio.ensure_future(engine.apply_chunk(sessions[0], 1, tokens(1)))
        await until(lambda: gated.calls)  # the first chunk starts at once, alone
        rest = [asyncio.ensure_future(engine.apply_chunk(s, 1, tokens(2))) for s in sessions[1:]]
        await asyncio.sleep(0.01)
        assert len(gated.calls) == 1  # the others wait for the running batch (long delay)
        gated.gate.set()
        await asyncio.gather(first, *rest)

    asyncio.run(main())
    assert gated.calls == [[1], [1] * 5]
    engine.close()


def test_cancelled_chunk_leaves_its_session_untouched(tiny_repo: Path, gated: GatedRun) -> None:
    engine = gated.attach(make_engine(tiny_repo))
    gated.gate.clear()

    async def main() -> None:
        kept = await engine.open_session("tiny-gru", 0, StreamOptions())
        dropped = await engine.open_session("tiny-gru", 0, StreamOptions())
        before = dropped.read_state()
        keep = asyncio.ensure_future(engine.apply_chunk(kept, 1, tokens(1, 2)))
        drop = asyncio.ensure_future(engine.apply_chunk(dropped, 1, tokens(3, 4)))
        await until(lambda: gated.calls)
        drop.cancel()  # the client went away while its chunk was in the running batch
        gated.gate.set()
        await keep
        with pytest.raises(asyncio.CancelledError):
            await drop
        assert await engine.wait_idle(10)
        np.testing.assert_array_equal(dropped.read_state(), before)
        assert dropped.last_seq == 0 and dropped.total_steps == 0
        assert kept.last_seq == 1 and kept.total_steps == 2
        again = await engine.apply_chunk(dropped, 1, tokens(3, 4))  # the resend is applied
        assert not again.duplicate and again.total_steps == 2

    asyncio.run(main())
    assert gated.calls[0] == [2, 2]
    engine.close()


def test_wait_idle_waits_for_queued_and_running_chunks(tiny_repo: Path, gated: GatedRun) -> None:
    engine = gated.attach(make_engine(tiny_repo))
    gated.gate.clear()

    async def main() -> None:
        session = await engine.open_session("tiny-gru", 0, StreamOptions())
        task = asyncio.ensure_future(engine.apply_chunk(session, 1, tokens(1)))
        await until(lambda: gated.calls)
        assert engine.inflight == 1
        assert not await engine.wait_idle(0.01)
        gated.gate.set()
        assert await engine.wait_idle(10)
        assert (await task).total_steps == 1

    asyncio.run(main())
    engine.close()


def test_apply_chunks_answers_each_entry_in_place(tiny_repo: Path) -> None:
    engine = make_engine(tiny_repo)

    async def main() -> list[ChunkOutcome | Exception]:
        a, b, c = [await engine.open_session("tiny-gru", 0, StreamOptions()) for _ in range(3)]
        await engine.apply_chunk(b, 1, tokens(1))
        engine.store.end(c)
        work = [
            ChunkWork(a, 1, tokens(1, 2)),
            ChunkWork(b, 1, tokens(1)),  # resend
            ChunkWork(c, 1, tokens(1)),  # ended
        ]
        first = await engine.apply_chunks(work)
        return [*first, *await engine.apply_chunks([ChunkWork(a, 0, tokens(1))])]

    applied, duplicate, ended, bad_seq = asyncio.run(main())
    assert isinstance(applied, ChunkOutcome) and applied.total_steps == 2
    assert isinstance(duplicate, ChunkOutcome) and duplicate.duplicate
    assert isinstance(ended, SessionNotFound) and isinstance(bad_seq, InvalidInput)
    engine.close()


def test_apply_chunks_waits_for_a_session_busy_elsewhere(tiny_repo: Path) -> None:
    engine = make_engine(tiny_repo)

    async def main() -> None:
        busy, free = [await engine.open_session("tiny-gru", 0, StreamOptions()) for _ in range(2)]
        await busy.lock.acquire()  # e.g. a Stream applying its own chunk
        work = [ChunkWork(busy, 1, tokens(1)), ChunkWork(free, 1, tokens(2))]
        task = asyncio.ensure_future(engine.apply_chunks(work))
        await until(lambda: free.last_seq == 1)  # not held up by the busy session
        assert not task.done() and busy.last_seq == 0
        busy.lock.release()
        first, second = await task
        assert isinstance(first, ChunkOutcome) and first.total_steps == 1
        assert isinstance(second, ChunkOutcome) and second.total_steps == 1

    asyncio.run(main())
    engine.close()


def test_a_waiter_group_wakes_its_caller_once_every_waiter_is_answered() -> None:
    async def main() -> None:
        group = WaiterGroup()
        done, failed, dropped = group.waiter(), group.waiter(), group.waiter()
        everyone = group.all_done()
        result = object()
        done.set_result(result)  # type: ignore[arg-type]
        failed.set_exception(SessionNotFound("gone"))
        assert not everyone.done()  # one is still out
        assert dropped.cancel() and not dropped.cancel()  # the second: a no-op, as a future's
        await asyncio.wait_for(everyone, 1)
        assert done.result() is result and done.exception() is None
        assert isinstance(failed.exception(), SessionNotFound)
        with pytest.raises(SessionNotFound):
            failed.result()
        assert dropped.cancelled() and dropped.done()
        with pytest.raises(asyncio.CancelledError):
            dropped.exception()
        with pytest.raises(asyncio.InvalidStateError):
            done.set_result(result)  # type: ignore[arg-type]
        assert not done.cancel()
        assert WaiterGroup().all_done().done()  # nothing submitted: done at once

    asyncio.run(main())


def test_apply_chunks_answers_exactly_as_apply_chunks_of_the_same_batch(tiny_repo: Path) -> None:
    """apply_chunks (one group's waiters) and as many apply_chunk calls in one loop turn (a
    future each) form the same batches: every reply the same to the bit, in order, resends
    answered as duplicates and a gap refused in place."""
    engine = make_engine(tiny_repo)
    rng = np.random.default_rng(7)
    rounds = [[tokens(*rng.integers(1, 20, int(rng.integers(1, 5)))) for _ in range(6)]
              for _ in range(4)]  # fmt: skip

    async def main() -> None:
        grouped = [await engine.open_session("tiny-gru", 0, StreamOptions()) for _ in range(6)]
        single = [await engine.open_session("tiny-gru", 0, StreamOptions()) for _ in range(6)]
        for seq, chunks in enumerate(rounds, start=1):
            work = [ChunkWork(s, seq, c) for s, c in zip(grouped, chunks, strict=True)]
            a = await engine.apply_chunks(work)
            b = await asyncio.gather(*(engine.apply_chunk(s, seq, c)
                                       for s, c in zip(single, chunks, strict=True)))  # fmt: skip
            for x, y in zip(a, b, strict=True):
                assert isinstance(x, ChunkOutcome) and x.result is not None
                assert y.result is not None and (x.seq, x.total_steps) == (y.seq, y.total_steps)
                assert np.array_equal(x.result.probs, y.result.probs)  # to the bit
        resent = await engine.apply_chunks(
            [ChunkWork(grouped[0], 4, rounds[3][0]), ChunkWork(grouped[1], 6, tokens(1)),
             ChunkWork(grouped[2], 5, tokens(1))]
        )  # fmt: skip
        duplicate, gap, applied = resent
        assert isinstance(duplicate, ChunkOutcome) and duplicate.duplicate
        assert np.array_equal(duplicate.result.probs, a[0].result.probs)  # type: ignore[union-attr]
        assert isinstance(gap, SequenceGap) and grouped[1].last_seq == 4
        assert isinstance(applied, ChunkOutcome) and grouped[2].last_seq == 5

    asyncio.run(main())
    engine.close()


def test_a_cancelled_apply_chunks_leaves_its_sessions_untouched(
    tiny_repo: Path, gated: GatedRun
) -> None:
    engine = gated.attach(make_engine(tiny_repo))
    gated.gate.clear()

    async def main() -> None:
        sessions = [await engine.open_session("tiny-gru", 0, StreamOptions()) for _ in range(3)]
        before = [s.read_state() for s in sessions]
        task = asyncio.ensure_future(engine.apply_chunks([ChunkWork(s, 1, tokens(1, 2))
                                                          for s in sessions]))  # fmt: skip
        await until(lambda: gated.calls)
        task.cancel()  # the caller went away while its chunks were in the running batch
        gated.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await engine.wait_idle(10)
        for session, state in zip(sessions, before, strict=True):
            np.testing.assert_array_equal(session.read_state(), state)
            assert session.last_seq == 0 and not session.lock.locked()
        again = await engine.apply_chunks([ChunkWork(s, 1, tokens(1, 2)) for s in sessions])
        assert all(isinstance(o, ChunkOutcome) and o.total_steps == 2 for o in again)

    asyncio.run(main())
    assert gated.calls == [[2, 2, 2], [2, 2, 2]]
    engine.close()


def test_a_batch_gathers_its_states_into_a_finished_runs_buffer_with_the_same_answers(
    tiny_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches of 4, 3, 5 and 2 sessions: each after the first gathers into the buffer a
    finished run left (a bigger batch into a new one), with every answer, state and seq to the
    bit what an engine that gathers into a new array each time gives."""
    sizes = [4, 3, 5, 2]

    def run(engine: Engine) -> tuple[list[list[np.ndarray]], list[np.ndarray], list[int]]:
        batcher = engine.registry.get("tiny-gru").batcher
        buffers: list[int] = []

        async def main() -> tuple[list[list[np.ndarray]], list[np.ndarray]]:
            sessions = [await engine.open_session("tiny-gru", 0, StreamOptions())
                        for _ in range(max(sizes))]  # fmt: skip
            answers = []
            for seq, n in enumerate(sizes, start=1):
                work = [ChunkWork(s, seq, tokens(seq, i + 1)) for i, s in enumerate(sessions[:n])]
                done = await engine.apply_chunks(work)
                answers.append([o.result.probs for o in done])  # type: ignore[union-attr]
                buffers.extend(id(b) for b in batcher._spare.buffers)
                for s in sessions[n:]:  # the others keep in step (a batch of their own)
                    await engine.apply_chunk(s, seq, tokens(seq))
            return answers, [s.read_state() for s in sessions]

        answers, states = asyncio.run(main())
        engine.close()
        return answers, states, buffers

    pooled, pooled_states, buffers = run(make_engine(tiny_repo))
    assert buffers and len(set(buffers)) < len(buffers)  # a buffer served several batches
    monkeypatch.setattr("service.engine.schedule.batcher.SPARE_STATE_BYTES", 0)
    fresh, fresh_states, none = run(make_engine(tiny_repo))
    assert not none  # nothing kept: a new array per batch
    for a, b in zip(pooled, fresh, strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(np.array_equal(x, y) for x, y in zip(pooled_states, fresh_states, strict=True))


def test_batching_flags_make_the_policy() -> None:
    from service.config import config_from_args

    on = config_from_args(["--max-batch-size", "32", "--max-queue-delay-us", "250"], environ={})
    assert on.batching and on.batch_policy.max_batch_size == 32
    assert on.batch_policy.max_queue_delay_s == 0.00025
    off = config_from_args(["--no-batching", "--compute-threads", "3"], environ={})
    assert off.batch_policy.max_batch_size == 1 and off.batch_policy.max_concurrent == 3
    assert not config_from_args([], environ={"LSTM_SERVE_BATCHING": "0"}).batching


def test_a_chunk_in_flight_on_a_replaced_session_is_answered_aborted(
    tiny_repo: Path, gated: GatedRun
) -> None:
    engine = gated.attach(make_engine(tiny_repo))
    gated.gate.clear()

    async def main() -> None:
        old = await engine.open_session("tiny-gru", 0, StreamOptions())
        other = await engine.open_session("tiny-gru", 0, StreamOptions())
        running = asyncio.ensure_future(engine.apply_chunk(old, 1, tokens(1, 2)))
        await until(lambda: gated.calls)  # in the running batch
        queued = asyncio.ensure_future(engine.apply_chunk(other, 1, tokens(3)))
        await asyncio.sleep(0.01)
        worker = old.model
        newer = engine.store.adopt(worker, StreamOptions(), old.id, "anonymous", "g2")  # restored
        engine.store.adopt(worker, StreamOptions(), other.id, "anonymous", "g2")  # and queued one
        gated.gate.set()
        async with asyncio.timeout(5):
            for task in (running, queued):
                with pytest.raises(SessionReplaced, match="replaced by a newer copy"):
                    await task
        assert newer.last_seq == 0 and not newer.read_state().any()  # nothing committed into it
        assert await engine.wait_idle(5) and worker.sessions == 2

    asyncio.run(main())
    engine.close()


def test_results_own_their_arrays(tiny_repo: Path) -> None:
    engine = make_engine(tiny_repo)

    async def main() -> None:
        session = await engine.open_session("tiny-gru", 0, StreamOptions(every_step=True))
        outcome = await engine.apply_chunk(session, 1, tokens(1, 2, 3))
        result = outcome.result
        assert result is not None and result.step_probs is not None
        assert result.probs.base is None and result.step_probs.base is None  # no batch views
        [whole] = await engine.classify(session.model, [tokens(1, 2, 3)], with_steps=True)
        assert whole.probs.base is None and whole.step_probs is not None
        assert whole.step_probs.base is None

    asyncio.run(main())
    engine.close()


def test_a_dispatch_bug_fails_the_queued_chunks_instead_of_hanging(tiny_repo: Path) -> None:
    engine = make_engine(tiny_repo)

    async def main() -> None:
        session = await engine.open_session("tiny-gru", 0, StreamOptions())
        batcher = session.model.batcher

        def broken() -> list[Any]:
            raise KeyError("a bug")

        batcher._queue.take = broken  # type: ignore[method-assign]
        async with asyncio.timeout(5):
            with pytest.raises(RuntimeError):
                await engine.apply_chunk(session, 1, tokens(1))
        assert await engine.wait_idle(5)

    asyncio.run(main())
    engine.close()


def _broken(*args: Any) -> Any:
    raise KeyError("a bug")


@pytest.mark.parametrize("where", ["starting a taken batch", "committing a run"])
def test_a_bug_in_a_batch_answers_its_chunks_and_the_batcher_goes_on(
    tiny_repo: Path, where: str
) -> None:
    """Both chunks of the batch get the error (none waits forever) and nothing is applied; the
    same seqs then apply once the bug is gone."""
    engine = make_engine(tiny_repo)

    async def main() -> None:
        a = await engine.open_session("tiny-gru", 0, StreamOptions())
        b = await engine.open_session("tiny-gru", 0, StreamOptions())
        batcher = a.model.batcher
        owner, name = (batcher.state, "gather") if where.startswith("starting") else (
            batcher, "_commit")  # fmt: skip
        setattr(owner, name, _broken)
        async with asyncio.timeout(5):
            outcomes = await asyncio.gather(
                engine.apply_chunk(a, 1, tokens(1)), engine.apply_chunk(b, 1, tokens(2)),
                return_exceptions=True,
            )  # fmt: skip
        assert all(isinstance(o, KeyError) for o in outcomes), outcomes
        assert await engine.wait_idle(5)
        delattr(owner, name)  # the class's method again
        async with asyncio.timeout(5):
            done = await asyncio.gather(
                engine.apply_chunk(a, 1, tokens(1)), engine.apply_chunk(b, 1, tokens(2))
            )
        assert [d.total_steps for d in done] == [1, 1]

    asyncio.run(main())
    engine.close()


def test_text_chunks_share_a_settled_run_then_a_probe_run(tiny_repo: Path) -> None:
    """Streamed text of many sessions in one batch: one run of every settled part, then one
    run of every held tail from those states (not kept); each reply, every step of it too, is
    Classify of that session's text so far, and each state row holds only the settled steps."""
    from service.engine.text.inputs import tokens_from_stream
    from service.engine.text.textstream import held_change

    engine = make_engine(tiny_repo)
    runtime = engine.registry.get("tiny-lstm").runtime
    calls: list[list[int]] = []
    inner = runtime.run

    def run(inputs: np.ndarray, lengths: np.ndarray, *more: Any) -> RunOutput:
        calls.append(lengths.tolist())
        return inner(inputs, lengths, *more)

    runtime.run = run  # type: ignore[method-assign]
    texts = ["hello wor", "abc", "ab ", "e"]  # longest first: one batch (pending.py)

    async def main() -> None:
        options = StreamOptions(every_step=True)
        sessions = [await engine.open_session("tiny-lstm", 0, options) for _ in texts]
        work = []
        for session, text in zip(sessions, texts, strict=True):
            desc = session.model.description
            ids, after = tokens_from_stream(desc, session.held, text, 64, "text")
            work.append(ChunkWork(session, 1, ids, held_change(session.held, ids, after)))
        calls.clear()
        outcomes = await engine.apply_chunks(work)
        assert calls == [[8, 2, 3], [1, 1, 1]]  # the settled parts, then the held tails
        tokenizer = sessions[0].model.description.tokenizer
        assert tokenizer is not None
        wholes = await engine.classify(
            sessions[0].model, [np.array(tokenizer.encode(t)) for t in texts], True
        )
        for session, outcome, whole in zip(sessions, outcomes, wholes, strict=True):
            assert isinstance(outcome, ChunkOutcome) and outcome.result is not None
            np.testing.assert_allclose(outcome.result.probs, whole.probs, atol=1e-6)
            np.testing.assert_allclose(outcome.result.step_probs, whole.step_probs, atol=1e-6)
            assert session.settled_steps == len(whole.step_probs) - len(session.held.tail)

    try:
        asyncio.run(main())
    finally:
        engine.close()


def test_a_model_without_lengths_batches_text_chunks_of_equal_settled_and_held_steps() -> None:
    """Both runs of a batch must have one length each: chunks of 2 settled + 1 held steps do
    not share a batch with chunks of 1 + 2 or 3 + 0, however old."""
    from types import SimpleNamespace

    from service.engine.schedule.batcher import InflightCounter
    from service.engine.schedule.pending import Pending, PendingChunks
    from service.engine.text.textstream import NOTHING_HELD, HeldChange, HeldText

    async def main() -> list[list[tuple[int, int]]]:
        queue = PendingChunks(BatchPolicy(), InflightCounter(), equal_lengths=True)
        loop = asyncio.get_running_loop()
        for settled, held in ((2, 1), (1, 2), (2, 1), (3, 0), (2, 1)):
            change = HeldChange(NOTHING_HELD, HeldText("x", tail=(1,) * held)) if held else None
            session = SimpleNamespace(closed=None)
            queue.add(Pending(session, 1, tokens(*[1] * settled), loop.create_future(), change))  # type: ignore[arg-type]
        return [[item.key for item in queue.take()] for _ in range(3)]

    assert asyncio.run(main()) == [[(2, 1)] * 3, [(1, 2)], [(3, 0)]]
