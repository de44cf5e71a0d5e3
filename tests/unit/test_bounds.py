"""Bounded under hostile load, without a network: Classify in slices (exact, cancellable,
budgeted), batches capped in rows x steps, read-ahead bounded in bytes, what a session keeps."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.engine.core import Engine
from service.engine.schedule.batcher import InflightCounter
from service.engine.schedule.pending import Pending, PendingChunks
from service.engine.types import BatchPolicy, ClassifyPolicy, StreamOptions
from service.errors import BudgetExceeded, InvalidInput
from service.protocol.inbox import EOF, Inbox, ReadAhead
from tests.unit.engines import load_engine

RNG = np.random.default_rng(7)


def sequences(*lengths: int) -> list[np.ndarray]:
    return [RNG.integers(0, 28, size=n).astype(np.int64) for n in lengths]


def test_sliced_classify_equals_one_run_exactly(tiny_repo: Path) -> None:
    sliced = load_engine(tiny_repo, classify_policy=ClassifyPolicy(slice_row_steps=7))
    whole = load_engine(tiny_repo, classify_policy=ClassifyPolicy(slice_row_steps=0))
    seqs = sequences(1, 5, 40, 17, 3)

    async def run(engine: Engine) -> list[Any]:
        return await engine.classify(engine.registry.get("tiny-lstm", 1), seqs, with_steps=True)

    for a, b in zip(asyncio.run(run(sliced)), asyncio.run(run(whole)), strict=True):
        assert a.steps == b.steps
        np.testing.assert_array_equal(a.probs, b.probs)
        np.testing.assert_array_equal(a.step_probs, b.step_probs)
    sliced.close()
    whole.close()


def test_a_request_over_the_budget_is_refused_before_any_run(tiny_repo: Path) -> None:
    engine = load_engine(tiny_repo, classify_policy=ClassifyPolicy(max_request_row_steps=50))
    worker = engine.registry.get("tiny-gru")
    runs: list[int] = []
    inner = worker.runtime.run
    worker.runtime.run = lambda *a, **k: runs.append(1) or inner(*a, **k)  # type: ignore[method-assign]
    with pytest.raises(BudgetExceeded, match=r"51 steps.*budget of 50.*--max-request-row-steps"):
        asyncio.run(engine.classify(worker, sequences(25, 26), with_steps=False))
    assert runs == []
    assert len(asyncio.run(engine.classify(worker, sequences(25, 25), with_steps=False))) == 2
    engine.close()


def test_a_cancelled_classify_stops_after_the_slice_in_progress(tiny_repo: Path) -> None:
    engine = load_engine(tiny_repo, classify_policy=ClassifyPolicy(slice_row_steps=10))
    worker = engine.registry.get("tiny-gru")
    started, release = threading.Event(), threading.Event()
    runs: list[int] = []
    inner = worker.runtime.run

    def gated(*args: Any, **kwargs: Any) -> Any:
        runs.append(1)
        started.set()
        release.wait(10)
        return inner(*args, **kwargs)

    worker.runtime.run = gated  # type: ignore[method-assign]

    async def main() -> None:
        task = asyncio.ensure_future(engine.classify(worker, sequences(200), with_steps=False))
        await asyncio.to_thread(started.wait, 10)
        task.cancel()  # the client's deadline passed during the first of 20 slices
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await engine.wait_idle(10)

    asyncio.run(main())
    assert runs == [1]
    engine.close()


def pending(steps: int) -> Pending:
    future: asyncio.Future[Any] = asyncio.get_event_loop_policy().new_event_loop().create_future()

    class Session:  # the queue only reads `closed` and identity
        closed = None

    return Pending(Session(), 1, np.zeros(steps, np.int64), future)  # type: ignore[arg-type]


def test_a_batch_is_capped_in_rows_times_steps() -> None:
    queue = PendingChunks(BatchPolicy(max_batch_row_steps=8192), InflightCounter())
    for _ in range(5):
        queue.add(pending(4096))
    queue.add(pending(1))
    first = queue.take()
    assert [p.steps for p in first] == [4096, 4096] and len(queue) == 4
    queue.add(pending(10_000))  # alone over the cap: still runs, alone
    sizes = [[p.steps for p in queue.take()] for _ in range(3)]
    assert sizes == [[4096, 4096], [4096, 1], [10_000]] and len(queue) == 0


def test_read_ahead_stops_reading_beyond_its_bytes_and_goes_on_when_taken() -> None:
    async def main() -> None:
        read: list[int] = []

        async def requests() -> AsyncIterator[int]:
            for i in range(5):
                read.append(i)
                yield i

        budget = ReadAhead(per_stream=100, total=1000)
        inbox: Inbox[int] = Inbox(requests(), asyncio.Event(), budget, lambda _: 60)
        await asyncio.sleep(0.05)
        assert read == [0, 1]  # one held (60 bytes); the second waits for room, not queued
        assert budget.used == 60
        assert await inbox.next() == 0
        await asyncio.sleep(0.05)
        assert await inbox.next() == 1 and budget.used <= 60
        assert [await inbox.next() for _ in range(3)] == [2, 3, 4]
        assert await inbox.next() is EOF and budget.used == 0
        inbox.close()

    asyncio.run(main())


def test_a_session_keeps_only_final_probabilities_for_a_resend(tiny_repo: Path) -> None:
    engine = load_engine(tiny_repo)

    async def main() -> None:
        session = await engine.open_session("tiny-gru", 0, StreamOptions(every_step=True))
        reply = await engine.apply_chunk(session, 1, sequences(300)[0])
        assert reply.result is not None and reply.result.step_probs is not None
        assert session.last_result is not None and session.last_result.step_probs is None
        resend = await engine.apply_chunk(session, 1, sequences(300)[0])
        assert resend.duplicate and resend.result is session.last_result
        np.testing.assert_array_equal(resend.result.probs, reply.result.probs)

    asyncio.run(main())
    engine.close()


def test_a_huge_text_is_refused_before_it_is_copied(tiny_repo: Path) -> None:
    from service.engine.text.inputs import tokens_from_text

    desc = load_engine(tiny_repo).registry.get("tiny-gru").description
    with pytest.raises(InvalidInput, match=r"4000000 characters: more than the maximum 4096"):
        tokens_from_text(desc, "a" * 4_000_000, 4096, "chunk.input.text")
