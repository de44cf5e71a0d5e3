"""Chunks of many sessions applied together (one StreamMulti round), so they share batches.

Each entry behaves as `Engine.apply_chunk` on its own; an entry's error is returned in its
place, not raised. Free session locks are all taken in one loop turn (never waited for while
holding others, so two messages naming the same sessions cannot deadlock); a session busy
elsewhere gets its own `apply_chunk`, which waits its turn. Results are written through to the
shared store before the locks are released.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from service.engine.types import MAX_SEQ, ChunkOutcome, ChunkWork, StepResult
from service.errors import LstmServeError

if TYPE_CHECKING:
    from service.engine.continuity import Checkpoint
    from service.engine.core import Engine
    from service.engine.sessions import Session

Outcome = ChunkOutcome | LstmServeError


async def apply_together(engine: Engine, work: list[ChunkWork]) -> list[Outcome]:
    """Apply one chunk per distinct session; outcomes in the order of `work`."""
    if len({id(w.session) for w in work}) != len(work):
        raise ValueError("apply_chunks takes at most one chunk per session")
    outcomes: list[Outcome | None] = [None] * len(work)
    waiting: dict[int, asyncio.Future[StepResult]] = {}
    busy: dict[int, asyncio.Task[ChunkOutcome]] = {}
    before: dict[int, Checkpoint | None] = {}  # strict mode: what a refused save rolls back to
    locked: list[Session] = []
    try:
        for i, item in enumerate(work):
            session = item.session
            alone = session.lock.locked() or not len(item.chunk)
            alone = alone or session.id in engine.continuity.unsure  # settled by apply_chunk
            if not 1 <= item.seq <= MAX_SEQ or alone:
                # busy elsewhere, text that all waits (no model run), or unsure: on its own
                busy[i] = asyncio.ensure_future(
                    engine.apply_chunk(session, item.seq, item.chunk, item.held, item.attached)
                )
                continue
            await session.lock.acquire()  # free: taken without suspending
            locked.append(session)
            outcomes[i] = _submit_locked(item, waiting, i, engine, before)
        if waiting or busy:
            await asyncio.wait([*waiting.values(), *busy.values()])
        applied = _collect(work, waiting, outcomes)
        await _persist(engine, work, applied, outcomes, before)
    finally:
        for future in [*waiting.values(), *busy.values()]:
            future.cancel()  # no-op when done; a cancelled caller drops its chunks
        for session in locked:
            session.lock.release()
    for i, task in busy.items():
        exc = task.exception()
        if exc is not None and not isinstance(exc, LstmServeError):
            raise exc
        outcomes[i] = exc if isinstance(exc, LstmServeError) else task.result()
    return [o for o in outcomes if o is not None]


def _submit_locked(
    item: ChunkWork, waiting: dict[int, asyncio.Future[StepResult]], index: int, engine: Engine,
    before: dict[int, Checkpoint | None],
) -> Outcome | None:  # fmt: skip
    """Duplicate / dead-session checks, else submit; the session's lock is held."""
    session = item.session
    try:
        if (resend := session.admit(item.seq, item.attached)) is not None:
            return resend
        if item.held is not None:
            session.check_held(item.held)
    except LstmServeError as exc:
        return exc
    before[index] = engine.continuity.checkpoint(session)
    waiting[index] = session.model.submit(session, item.seq, item.chunk)
    return None


def _collect(
    work: list[ChunkWork], waiting: dict[int, asyncio.Future[StepResult]],
    outcomes: list[Outcome | None],
) -> list[int]:  # fmt: skip
    """Each submitted entry's outcome; the indices that were applied."""
    applied = []
    for i, future in waiting.items():
        exc = future.exception()
        if isinstance(exc, LstmServeError):  # its session was closed meanwhile
            outcomes[i] = exc
        elif exc is not None:
            raise exc
        else:
            result = future.result()
            session, held = work[i].session, work[i].held
            if held is not None:
                session.held = held.after
            outcomes[i] = ChunkOutcome(
                work[i].seq, result, False, result.total_steps, len(session.held.text)
            )
            applied.append(i)
    return applied


async def _persist(
    engine: Engine, work: list[ChunkWork], applied: list[int], outcomes: list[Outcome | None],
    before: dict[int, Checkpoint | None],
) -> None:  # fmt: skip
    """Touch and write through the applied entries' sessions (their locks still held)."""
    for i in applied:
        engine.store.touch(work[i].session)
    if not applied or engine.continuity.backend is None:
        return
    saved = await asyncio.gather(
        *(engine.continuity.persist(work[i].session, before=before.get(i)) for i in applied),
        return_exceptions=True,
    )
    for i, error in zip(applied, saved, strict=True):
        if isinstance(error, LstmServeError):
            outcomes[i] = error  # a stale copy: this entry's session moved
        elif isinstance(error, BaseException):
            raise error
