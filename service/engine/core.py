"""The engine: sessions in order, cross-session batching of their chunks, Classify; no gRPC here.

A session's chunks go one at a time (its lock) to the model version's `SequenceBatcher`, which
runs the chunks of many sessions as one batch and commits each session's new state, seq and step
count only after the run succeeded (service/engine/batcher.py).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service import metrics
from service.engine.batcher import BatchPolicy, InflightCounter, SequenceBatcher, StepResult
from service.engine.continuity import SessionContinuity
from service.engine.registry import LoadedModel, ModelRegistry
from service.engine.runtime import RunOutput
from service.engine.sessions import Session, SessionStore, StreamOptions
from service.errors import (
    Draining,
    InvalidInput,
    LstmServeError,
    SessionExpired,
    SessionNotFound,
    Unavailable,
)

__all__ = ["BatchPolicy", "ChunkOutcome", "ChunkWork", "Engine", "StepResult"]


@dataclass(frozen=True)
class ChunkOutcome:
    """A chunk applied (result set) or recognised as a resend (duplicate, not applied)."""

    seq: int
    result: StepResult | None
    duplicate: bool
    total_steps: int


@dataclass(frozen=True)
class ChunkWork:
    """One validated chunk for one session (a multi-session message carries many)."""

    session: Session
    seq: int
    chunk: np.ndarray  # (T,) or (T, F)


class Engine:
    """Models, sessions and the thread pool that runs onnxruntime off the event loop."""

    def __init__(
        self,
        store: SessionStore,
        compute_threads: int = 4,
        policy: BatchPolicy | None = None,
        continuity: SessionContinuity | None = None,
    ) -> None:
        self.store = store
        self.continuity = continuity or SessionContinuity(store)
        self.drain_started = asyncio.Event()
        self.registry: ModelRegistry | None = None
        self.draining = False
        self.policy = policy or BatchPolicy()
        self._executor = ThreadPoolExecutor(compute_threads, thread_name_prefix="lstm-run")
        self._inflight = InflightCounter()
        self._batchers: dict[str, SequenceBatcher] = {}

    # -- admission ---------------------------------------------------------------------------

    def models(self) -> ModelRegistry:
        """The registry; Unavailable while models are still loading."""
        if self.registry is None:
            raise Unavailable("models are still loading; retry shortly")
        return self.registry

    def check_accepting(self) -> None:
        """New work (sessions, Classify) is refused while loading or draining."""
        if self.draining:
            raise Draining("the server is draining (shutting down); reconnect elsewhere")
        self.models()

    # -- sessions ----------------------------------------------------------------------------

    def open_session(self, name: str, version: int, options: StreamOptions) -> Session:
        """A new session (held here; written to a shared store by its first `persist`)."""
        self.check_accepting()
        model = self.models().get(name, version)
        return self.store.open(model, self._clamp(model, options))

    async def resume_session(self, session_id: str, options: StreamOptions | None) -> Session:
        self.check_accepting()
        session = await self.find_session(session_id)
        if options is not None:
            session.options = self._clamp(session.model, options)
        self.store.touch(session)
        metrics.SESSION_EVENTS.labels(session.model.name, "resumed").inc()
        return session

    async def find_session(self, session_id: str, local_first: bool = False) -> Session:
        """A session held here, or (with a shared store) continued from the store. With
        `local_first`, a copy held here is used without asking the store (per-chunk lookups)."""
        if local_first:
            return await self.continuity.find_local_first(self.models(), session_id)
        return await self.continuity.find(self.models(), session_id)

    async def restore_session(self, blob: bytes, options: StreamOptions | None) -> Session:
        """Continue a session from a snapshot made by any replica sharing the key."""
        self.check_accepting()
        registry = self.models()
        session = self.continuity.restore(registry, blob, options)
        if options is not None:
            session.options = self._clamp(session.model, options)
        self.store.touch(session)
        await self.continuity.persist(session, force=True)
        return session

    async def take_snapshot(self, session: Session, final: bool = False) -> bytes:
        """The session's signed snapshot, after every chunk already submitted for it."""
        async with session.lock:
            self._check_live(session)
            blob = self.continuity.snapshot(session)
        metrics.SNAPSHOTS.labels(session.model.name, "final" if final else "taken").inc()
        return blob

    async def apply_chunk(self, session: Session, seq: int, chunk: np.ndarray) -> ChunkOutcome:
        """Apply a validated chunk once, in order; a resend (seq <= last applied) is skipped."""
        if seq < 1:
            raise InvalidInput(f"chunk.seq = {seq}: sequence numbers start at 1")
        async with session.lock:
            self._check_live(session)
            if seq <= session.last_seq:
                return _duplicate(session, seq)
            result = await self.batcher(session.model).submit(session, seq, chunk)
            if self.continuity.backend is not None:  # no coroutine on the hot path without one
                await self.continuity.persist(session)
            return ChunkOutcome(seq, result, False, result.total_steps)

    async def apply_chunks(self, work: list[ChunkWork]) -> list[ChunkOutcome | LstmServeError]:
        """Chunks of distinct sessions, submitted together so they share batches.

        Each entry behaves as `apply_chunk` on its own; an entry's error is returned in its
        place, not raised. Free session locks are all taken in one loop turn (never waited for
        while holding others, so two messages naming the same sessions cannot deadlock); a
        session busy elsewhere gets its own `apply_chunk`, which waits its turn.
        """
        if len({id(w.session) for w in work}) != len(work):
            raise ValueError("apply_chunks takes at most one chunk per session")
        outcomes: list[ChunkOutcome | LstmServeError | None] = [None] * len(work)
        waiting: dict[int, asyncio.Future[StepResult]] = {}
        busy: dict[int, asyncio.Task[ChunkOutcome]] = {}
        locked: list[Session] = []
        try:
            for i, item in enumerate(work):
                if item.seq < 1 or item.session.lock.locked():
                    busy[i] = asyncio.ensure_future(
                        self.apply_chunk(item.session, item.seq, item.chunk)
                    )
                    continue
                await item.session.lock.acquire()  # free: taken without suspending
                locked.append(item.session)
                outcomes[i] = self._submit_locked(item, waiting, i)
            if waiting or busy:
                await asyncio.wait([*waiting.values(), *busy.values()])
        finally:
            for future in [*waiting.values(), *busy.values()]:
                future.cancel()  # no-op when done; a cancelled caller drops its chunks
            for session in locked:
                session.lock.release()
        for i, future in waiting.items():
            result = future.result()
            outcomes[i] = ChunkOutcome(work[i].seq, result, False, result.total_steps)
        if waiting and self.continuity.backend is not None:  # write-through, if any
            saved = await asyncio.gather(
                *(self.continuity.persist(work[i].session) for i in waiting),
                return_exceptions=True,
            )
            for i, error in zip(waiting, saved, strict=True):
                if isinstance(error, LstmServeError):
                    outcomes[i] = error  # a stale copy: this entry's session moved
                elif isinstance(error, BaseException):
                    raise error
        for i, task in busy.items():
            exc = task.exception()
            if exc is not None and not isinstance(exc, LstmServeError):
                raise exc
            outcomes[i] = exc if isinstance(exc, LstmServeError) else task.result()
        return [o for o in outcomes if o is not None]

    def _submit_locked(
        self, item: ChunkWork, waiting: dict[int, asyncio.Future[StepResult]], index: int
    ) -> ChunkOutcome | LstmServeError | None:
        """Duplicate / dead-session checks, else submit; the session's lock is held."""
        session = item.session
        try:
            self._check_live(session)
        except LstmServeError as exc:
            return exc
        if item.seq <= session.last_seq:
            return _duplicate(session, item.seq)
        waiting[index] = self.batcher(session.model).submit(session, item.seq, item.chunk)
        return None

    def batcher(self, model: LoadedModel) -> SequenceBatcher:
        """The model version's batcher, made at its first chunk."""
        batcher = self._batchers.get(model.key)
        if batcher is None:
            batcher = SequenceBatcher(
                model, self.policy, self._executor, self._inflight, self.store.touch
            )
            self._batchers[model.key] = batcher
        return batcher

    async def reset(self, session: Session, seq: int) -> bool:
        """Zero the state; returns True if `seq` was a resend and nothing was done."""
        if seq < 1:
            raise InvalidInput(f"reset.seq = {seq}: sequence numbers start at 1")
        async with session.lock:
            self._check_live(session)
            if seq <= session.last_seq:
                return True
            session.write_state(np.zeros_like(session.read_state()))
            session.total_steps = 0
            session.last_seq = seq
            session.last_result = None
            self.store.touch(session)
            await self.continuity.persist(session)
            return False

    async def end(self, session: Session) -> None:
        """Free the session once its chunk in progress (if any) is done."""
        async with session.lock:
            self.store.end(session)
        await self.continuity.forget(session.id)

    def _check_live(self, session: Session) -> None:
        if session.expired:
            raise SessionExpired(f"session {session.id} expired (idle timeout)")
        if session.ended:
            raise SessionNotFound(f"session {session.id} has ended")

    @staticmethod
    def _clamp(model: LoadedModel, options: StreamOptions) -> StreamOptions:
        top_k = min(max(options.top_k, 1), model.description.num_classes)
        return StreamOptions(every_step=options.every_step, top_k=top_k)

    # -- classify ----------------------------------------------------------------------------

    async def classify(
        self, model: LoadedModel, sequences: list[np.ndarray], with_steps: bool
    ) -> list[StepResult]:
        """Classify whole sequences from zero states in one padded batch."""
        self.check_accepting()
        desc = model.description
        lengths = np.array([s.shape[0] for s in sequences], dtype=np.int64)  # (B,)
        shape = (len(sequences), int(lengths.max()), *sequences[0].shape[1:])
        batch = np.zeros(shape, dtype=sequences[0].dtype)  # (B, T) or (B, T, F)
        for b, seq in enumerate(sequences):
            batch[b, : seq.shape[0]] = seq
        state = np.zeros((len(sequences), desc.state_rows, desc.hidden_size), np.float32)
        out = await self._run(model, batch, lengths, state, "Classify")
        return [
            StepResult(
                out.probs[b],
                out.step_probs[b, : lengths[b]] if with_steps else None,
                int(lengths[b]),
                int(lengths[b]),
            )
            for b in range(len(sequences))
        ]

    # -- running -----------------------------------------------------------------------------

    async def _run(
        self,
        model: LoadedModel,
        inputs: np.ndarray,
        lengths: np.ndarray,
        state: np.ndarray,
        rpc: str,
    ) -> RunOutput:
        """One model call on a worker thread, timed (queue / compute / total) and counted."""
        queued = time.perf_counter()
        loop = asyncio.get_running_loop()
        self._inflight.enter()
        future = loop.run_in_executor(self._executor, _timed_run, model, inputs, lengths, state)
        future.add_done_callback(lambda _: self._inflight.leave())  # when the thread is done
        # shield: a cancelled caller (client gone) does not hide a run still in progress from
        # wait_idle(); its result is simply dropped.
        started, out, finished = await asyncio.shield(future)
        name = model.name
        metrics.CHUNK_SECONDS.labels(name, "queue").observe(started - queued)
        metrics.CHUNK_SECONDS.labels(name, "compute").observe(finished - started)
        metrics.CHUNK_SECONDS.labels(name, "total").observe(time.perf_counter() - queued)
        metrics.STEPS.labels(name, rpc).inc(int(lengths.sum()))
        return out

    @property
    def inflight(self) -> int:
        """Chunks queued or running and Classify runs in progress."""
        return self._inflight.count

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no chunk is queued and no model run is in progress; False on timeout."""
        try:
            await asyncio.wait_for(self._inflight.wait_idle(), timeout_s)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _duplicate(session: Session, seq: int) -> ChunkOutcome:
    """A resend: not applied again; the last applied chunk's resend gets its original result."""
    result = session.last_result if seq == session.last_seq else None
    return ChunkOutcome(seq, result, True, session.total_steps)


def _timed_run(
    model: LoadedModel, inputs: np.ndarray, lengths: np.ndarray, state: np.ndarray
) -> tuple[float, RunOutput, float]:
    started = time.perf_counter()
    out = model.runtime.run(inputs, lengths, state)
    return started, out, time.perf_counter()
