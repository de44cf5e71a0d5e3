"""The chunks waiting for a batch of one model version, in buckets by length.

Chunks are queued in buckets by length (1, 2, 3-4, 5-8, ... steps; one bucket per exact length,
and no filling with shorter chunks, for a model that takes no lengths). A batch takes the bucket of
the oldest pending chunk and fills any room left with shorter chunks (never longer ones, which
would raise Tmax and pad every row), up to max_batch_size chunks and max_batch_row_steps
B x Tmax steps. A chunk whose waiter is gone or whose session was closed is answered (or
dropped) here, never run.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from service.engine.types import BatchPolicy, StepResult

if TYPE_CHECKING:
    from service.engine.schedule.batcher import InflightCounter
    from service.engine.session.sessions import Session
    from service.engine.text.textstream import HeldChange


class Waiter:
    """How a chunk submitted with others (`ChunkApply.apply_chunks`) is answered: the part of
    an asyncio.Future the batcher and its caller use (done, set_result, set_exception, cancel,
    result, exception), with no future, done-callback and event loop callback per chunk; its
    group's one future is done once every waiter of the group is."""

    __slots__ = ("_group", "_state", "_value")

    _PENDING, _RESULT, _ERROR, _CANCELLED = range(4)

    def __init__(self, group: WaiterGroup) -> None:
        self._group = group
        self._state = Waiter._PENDING
        self._value: Any = None

    def done(self) -> bool:
        return self._state != Waiter._PENDING

    def cancelled(self) -> bool:
        return self._state == Waiter._CANCELLED

    def set_result(self, result: StepResult) -> None:
        self._settle(Waiter._RESULT, result)

    def set_exception(self, exc: BaseException) -> None:
        self._settle(Waiter._ERROR, exc)

    def cancel(self) -> bool:
        """As Future.cancel: False if already done (then a no-op)."""
        if self._state != Waiter._PENDING:
            return False
        self._settle(Waiter._CANCELLED, None)
        return True

    def result(self) -> StepResult:
        if self._state == Waiter._RESULT:
            return self._value  # type: ignore[no-any-return]
        raise self._raised()

    def exception(self) -> BaseException | None:
        if self._state == Waiter._RESULT:
            return None
        if self._state == Waiter._ERROR:
            return self._value  # type: ignore[no-any-return]
        raise self._raised()

    def _raised(self) -> BaseException:
        if self._state == Waiter._ERROR:
            return self._value  # type: ignore[no-any-return]
        if self._state == Waiter._CANCELLED:
            return asyncio.CancelledError()
        return asyncio.InvalidStateError("the chunk is not answered yet")

    def _settle(self, state: int, value: Any) -> None:
        if self._state != Waiter._PENDING:
            raise asyncio.InvalidStateError("the chunk was answered already")
        self._state, self._value = state, value
        self._group.one_done()


class WaiterGroup:
    """The waiters of chunks submitted together, and one future done when all of them are."""

    __slots__ = ("_future", "_left")

    def __init__(self) -> None:
        self._left = 0
        self._future: asyncio.Future[None] | None = None

    def waiter(self) -> Waiter:
        self._left += 1
        return Waiter(self)

    def one_done(self) -> None:
        self._left -= 1
        if self._left == 0 and self._future is not None and not self._future.done():
            self._future.set_result(None)

    def all_done(self) -> Awaitable[None]:
        """A future done once every waiter made so far is (at once if they are)."""
        future = self._future = asyncio.get_running_loop().create_future()
        if self._left == 0:
            future.set_result(None)
        return future


Answer: TypeAlias = "asyncio.Future[StepResult] | Waiter"  # how a submitted chunk is answered


class Pending:
    """One submitted chunk waiting for (or inside) a batch: the steps it settles (`chunk`,
    kept in the session's state row) and, for streamed text, the held text's tail run after
    them as a probe (its state not kept): `steps` counts both."""

    __slots__ = ("change", "chunk", "enqueued", "future", "seq", "session", "settled", "steps",
                 "tail", "trace")  # fmt: skip

    def __init__(
        self, session: Session, seq: int, chunk: np.ndarray,
        future: Answer, change: HeldChange | None = None,
    ) -> None:  # fmt: skip
        self.session = session
        self.seq = seq
        self.chunk = chunk  # (T,) or (T, F)
        self.change = change  # a text chunk's change to the held text; None: not text
        self.settled = self.steps = int(chunk.shape[0])
        self.tail = None
        if change is not None and (tail := change.after.tail):
            self.tail = np.asarray(tail, dtype=np.int64)  # (T',)
            self.steps += len(tail)
        self.future = future
        self.enqueued = time.perf_counter()
        self.trace: object | None = None  # its request's span (EngineTracer.current), if traced

    @property
    def key(self) -> tuple[int, int]:
        """Its settled and probe steps: a model that takes no lengths batches equal keys."""
        return self.settled, self.steps - self.settled

    def resolve_closed(self) -> bool:
        """Answer the chunk with its session's close reason if the session is gone."""
        if self.session.closed is None:
            return False
        if not self.future.done():
            self.future.set_exception(self.session.closed_error())
        return True


def bucket_of(steps: int) -> int:
    """Length bucket: 0 for 1 step, 1 for 2, 2 for 3-4, 3 for 5-8, ..."""
    return (steps - 1).bit_length()


class PendingChunks:
    """The queue of one batcher: add, take the next batch, fail all."""

    def __init__(self, policy: BatchPolicy, inflight: InflightCounter,
                 equal_lengths: bool = False) -> None:  # fmt: skip
        self.policy = policy
        # A model without a lengths input: one bucket per exact length, a batch from one bucket
        # (padding a shorter chunk would run it into the model's state).
        self.equal_lengths = equal_lengths
        self._inflight = inflight
        self._buckets: dict[Any, deque[Pending]] = {}  # by bucket_of, or by key
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, item: Pending) -> None:
        self.add_all([item])

    def add_all(self, items: list[Pending]) -> None:
        buckets, equal = self._buckets, self.equal_lengths
        for item in items:
            key = item.key if equal else (item.steps - 1).bit_length()  # bucket_of, inlined
            queue = buckets.get(key)
            if queue is None:
                queue = buckets[key] = deque()
            queue.append(item)
        self._count += len(items)

    def oldest(self) -> float:
        """When the oldest pending chunk was queued (perf_counter)."""
        return min(q[0].enqueued for q in self._buckets.values() if q)

    def take(self) -> list[Pending]:
        """The next batch: the oldest chunk's bucket, then shorter buckets (the first chunk
        always goes, however long)."""
        live = {k: q for k, q in self._buckets.items() if q}
        primary = min(live, key=lambda k: live[k][0].enqueued)
        order = [primary]
        if not self.equal_lengths:
            order += sorted((k for k in live if k < primary), reverse=True)
        batch: list[Pending] = []
        seen: set[int] = set()
        longest = 0
        for key in order:
            longest = self._take_from(live[key], batch, seen, longest)
        return batch

    def _take_from(self, queue: deque[Pending], batch: list[Pending], seen: set[int],
                   longest: int) -> int:  # fmt: skip
        """Move chunks of one bucket into the batch; the batch's longest chunk after."""
        deferred: list[Pending] = []
        size, fits = self.policy.max_batch_size, self._fits
        while queue and len(batch) < size:
            item = queue.popleft()
            self._count -= 1
            if item.future.done() or item.resolve_closed():  # cancelled, or session gone
                self._inflight.leave()
                continue
            key = id(item.session)
            repeat = key in seen  # never two chunks of one session in a batch
            if repeat or not fits(len(batch), longest, item.steps):
                deferred.append(item)
                self._count += 1
                if not repeat:
                    break  # over the size cap: the rest of this bucket is no shorter
                continue
            seen.add(key)
            batch.append(item)
            if item.steps > longest:
                longest = item.steps
        queue.extendleft(reversed(deferred))
        return longest

    def _fits(self, rows: int, longest: int, steps: int) -> bool:
        """Whether one more chunk keeps the batch within max_batch_row_steps (B x Tmax)."""
        return rows == 0 or (rows + 1) * max(longest, steps) <= self.policy.max_batch_row_steps

    def fail_all(self) -> None:
        """Answer every queued chunk now (the batcher is closing)."""
        for queue in self._buckets.values():
            while queue:
                item = queue.popleft()
                self._count -= 1
                self._inflight.leave()
                if not item.resolve_closed() and not item.future.done():
                    item.future.set_exception(RuntimeError("the batcher was closed"))
