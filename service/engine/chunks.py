"""One chunk's way through the engine, alone (`apply_chunk`) or with chunks of other sessions
(`apply_chunks`, so they share batches): the same three steps either way.

Prepare, under the session's lock: a resend gets the duplicate's outcome (the last result
replayed), a gap, another stream's attachment or text decoded against held text that changed
since is refused, and (strict mode) a checkpoint is taken. Submit: the chunk goes to its
version's batcher, which applies it to the session after the run (`Session.apply`: state row,
seq, steps, result and held text together; streamed text's held tail runs after the settled
steps as a probe whose state is not kept, so the reply answers all the text sent). Finish:
the session is touched and written through to the shared store before its lock is released
(strict mode: a refused save rolls it back to its checkpoint).

A mixin of the Engine (service/engine/core.py), which provides the store and the continuity.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING

import numpy as np

from service.engine.continuity.continuity import settle
from service.engine.schedule.pending import Answer, Waiter, WaiterGroup
from service.engine.types import MAX_SEQ, ChunkOutcome, ChunkWork, StepResult
from service.errors import InvalidInput, LstmServeError

if TYPE_CHECKING:
    from service.engine.continuity.continuity import SessionContinuity
    from service.engine.model.worker import ModelWorker
    from service.engine.session.sessions import Checkpoint, Session, SessionStore
    from service.engine.text.textstream import HeldChange
    from service.engine.types import EngineTracer

Outcome = ChunkOutcome | LstmServeError


class ChunkApply:
    """apply_chunk, apply_chunks and their steps: prepare, submit, finish."""

    store: SessionStore
    continuity: SessionContinuity
    tracer: EngineTracer

    async def apply_chunk(
        self, session: Session, seq: int, chunk: np.ndarray, held: HeldChange | None = None,
        attached: object | None = None,
    ) -> ChunkOutcome:  # fmt: skip
        """Apply a validated chunk once, in order (seq = last applied + 1; a resend is skipped),
        for the stream owning `attached` (None: a caller that does not attach). A text chunk
        carries its change to the session's held text (`held`); all of it may be held (`chunk`
        has no step): the seq advances without a model run."""
        check_seq(seq, "chunk")
        async with session.lock:
            if self.continuity.unsure and session.id in self.continuity.unsure:
                await settle(self.continuity, session)  # strict: a refused save that landed
            work = ChunkWork(session, seq, chunk, held, attached)
            if (resend := self._admit(work)) is not None:
                return resend
            before = self.continuity.checkpoint(session)  # strict mode only, else None
            answer: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
            self._submit(work, answer)
            outcome = self._finish(work, await answer)
            if self.continuity.backend is not None:  # no coroutine on the hot path without one
                with self.tracer.span("store save", {"lstmserve.store.sessions": 1}):
                    await self._write_through(work, before)
            if outcome.result.decision is not None:  # type: ignore[union-attr]
                await self._end_if_decided(session, outcome)
            return outcome

    async def apply_chunks(self, work: list[ChunkWork]) -> list[Outcome]:
        """Chunks of distinct sessions, each applied as `apply_chunk` applies it but submitted
        together, so they share batches; outcomes in the order of `work`, an entry's error in
        its place. Free session locks are all taken in one loop turn (never waited for while
        holding others, so two calls naming the same sessions cannot deadlock); a session busy
        elsewhere or unsure (strict mode: settled first), or a seq out of range, goes through
        its own `apply_chunk`, which waits its turn. Results are written through to the shared
        store before the locks are released."""
        if len({id(w.session) for w in work}) != len(work):
            raise ValueError("apply_chunks takes at most one chunk per session")
        outcomes: list[Outcome | None] = [None] * len(work)
        group = WaiterGroup()  # one future for the submitted chunks, none per chunk
        waiting: dict[int, Waiter] = {}
        runs: dict[ModelWorker, list[tuple[Answer, ChunkWork]]] = {}  # by version, to submit
        before: dict[int, Checkpoint | None] = {}  # strict mode: what a refused save restores
        alone: dict[int, asyncio.Future[ChunkOutcome]] = {}
        locked: list[Session] = []
        unsure = self.continuity.unsure
        try:
            for i, w in enumerate(work):
                session = w.session
                if session.lock.locked() or session.id in unsure or not 1 <= w.seq <= MAX_SEQ:
                    alone[i] = asyncio.ensure_future(
                        self.apply_chunk(session, w.seq, w.chunk, w.held, w.attached)
                    )
                    continue
                await session.lock.acquire()  # free: taken without suspending
                locked.append(session)
                try:
                    outcomes[i] = self._admit(w)  # a resend's outcome, or None
                except LstmServeError as exc:
                    outcomes[i] = exc
                if outcomes[i] is None:
                    before[i] = self.continuity.checkpoint(session)
                    waiting[i] = waiter = group.waiter()
                    if _runs(w):  # queued below, each version's chunks at once
                        runs.setdefault(session.model, []).append((waiter, w))
                    else:
                        self._submit(w, waiter)
            for model, items in runs.items():
                model.submit_all(items)
            if alone:
                await asyncio.wait([group.all_done(), *alone.values()])
            elif waiting:
                await group.all_done()
            await self._finish_all(work, waiting, before, outcomes)
        finally:
            for future in [*waiting.values(), *alone.values()]:
                future.cancel()  # no-op when done; a cancelled caller drops its chunks
            for session in locked:
                session.lock.release()
        for i, task in alone.items():
            exc = task.exception()
            if exc is not None and not isinstance(exc, LstmServeError):
                raise exc
            outcomes[i] = exc if isinstance(exc, LstmServeError) else task.result()
        return [o for o in outcomes if o is not None]

    # -- the steps: prepare (then the checkpoint), submit, finish (then write through) -------

    def _admit(self, work: ChunkWork) -> ChunkOutcome | None:
        """`_prepare`, in an admission span when traced."""
        if not self.tracer.enabled:
            return self._prepare(work)
        with self.tracer.span("admission", {"lstmserve.admission": "chunk"}):
            return self._prepare(work)

    @staticmethod
    def _prepare(work: ChunkWork) -> ChunkOutcome | None:
        """Under the session's lock: a resend's outcome, or None: the chunk may be applied;
        the close reason, AttachedElsewhere, SequenceGap or (text decoded against held text
        that changed since) SessionMoved otherwise."""
        session = work.session
        if (resend := session.admit(work.seq, work.attached)) is not None:
            return resend
        if work.held is not None:
            session.check_held(work.held)
        return None

    @staticmethod
    def _submit(work: ChunkWork, answer: Answer) -> None:
        """The chunk to its version's batcher, which runs its settled steps and (streamed text)
        the held text's tail after them as a probe, then applies it (`Session.apply`: state
        row, seq, steps, result and held text together) and sets `answer` (a future, or the
        waiter of chunks submitted together); nothing to run (no step settled, nothing held)
        is applied at once."""
        session = work.session
        if _runs(work):
            session.model.submit_all([(answer, work)])
        else:
            answer.set_result(session.apply(work.seq, work.held))

    def _finish(self, work: ChunkWork, result: StepResult) -> ChunkOutcome:
        """An applied chunk's outcome; its session is touched (idle expiry)."""
        session = work.session
        self.store.touch(session)
        return ChunkOutcome(work.seq, result, False, result.total_steps, len(session.held.text))

    def _write_through(self, work: ChunkWork, before: Checkpoint | None) -> Awaitable[None]:
        """Save the applied chunk's session to the shared store (strict mode: restored to
        `before` and Unavailable if the store did not take it)."""
        return self.continuity.persist(work.session, before=before)

    async def _finish_all(
        self, work: list[ChunkWork], waiting: dict[int, Waiter],
        before: dict[int, Checkpoint | None], outcomes: list[Outcome | None],
    ) -> None:  # fmt: skip
        """Each submitted entry finished and written through (locks held); a closed
        session's error or a refused save in its place."""
        applied = []
        for i, waiter in waiting.items():
            exc = waiter.exception()
            if exc is None:
                outcomes[i] = self._finish(work[i], waiter.result())
                applied.append(i)
            elif isinstance(exc, LstmServeError):  # its session was closed meanwhile
                outcomes[i] = exc
            else:
                raise exc
        if applied and self.continuity.backend is not None:
            with self.tracer.span("store save", {"lstmserve.store.sessions": len(applied)}):
                saved = await asyncio.gather(
                    *(self._write_through(work[i], before[i]) for i in applied),
                    return_exceptions=True,
                )
            for i, error in zip(applied, saved, strict=True):
                if isinstance(error, LstmServeError):
                    outcomes[i] = error  # a stale copy (this entry's session moved), Unavailable
                elif isinstance(error, BaseException):
                    raise error
        for i in [i for i in applied if work[i].session.decision is not None]:
            outcome = outcomes[i]
            if isinstance(outcome, ChunkOutcome) and outcome.result.decision is not None:  # type: ignore[union-attr]
                await self._end_if_decided(work[i].session, outcome)

    async def _end_if_decided(self, session: Session, outcome: ChunkOutcome) -> None:
        """A session whose rule says end when decided is ended with the reply that decided it
        (its lock held): freed here and in the shared store."""
        rule = session.options.decide
        if rule is None or not rule.end_when_decided or session.ended:
            return
        await self.continuity.end(session)
        outcome.ended = True


def _runs(work: ChunkWork) -> bool:
    """Whether the chunk has anything to run: steps it settles, or (streamed text) a held
    tail to probe; else it is applied at once."""
    change = work.held
    return bool(len(work.chunk)) or (change is not None and bool(change.after.tail))


def check_seq(seq: int, what: str) -> None:
    if not 1 <= seq <= MAX_SEQ:
        raise InvalidInput(f"{what}.seq = {seq}: sequence numbers run from 1 to 2^63")
