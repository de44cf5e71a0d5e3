"""The engine: sessions in order, the `step` seam, Classify batches; no gRPC here.

`Engine.step(session, chunk)` is the one function a cross-session batcher will replace: it reads
the session's state, runs the model on one chunk off the event loop, and writes the state back
only after the run succeeded.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service import metrics
from service.engine.registry import LoadedModel, ModelRegistry
from service.engine.runtime import RunOutput
from service.engine.sessions import Session, SessionStore, StreamOptions
from service.errors import Draining, InvalidInput, SessionExpired, SessionNotFound, Unavailable


@dataclass(frozen=True)
class StepResult:
    """The outcome of one chunk (or one whole Classify sequence)."""

    probs: np.ndarray  # (C,) after the last step
    step_probs: np.ndarray | None  # (T, C) after every step, if asked for
    steps: int  # T
    total_steps: int  # steps since open / reset, after this chunk


@dataclass(frozen=True)
class ChunkOutcome:
    """A chunk applied (result set) or recognised as a resend (duplicate, not applied)."""

    seq: int
    result: StepResult | None
    duplicate: bool
    total_steps: int


class Engine:
    """Models, sessions and the thread pool that runs onnxruntime off the event loop."""

    def __init__(self, store: SessionStore, compute_threads: int = 4) -> None:
        self.store = store
        self.registry: ModelRegistry | None = None
        self.draining = False
        self._executor = ThreadPoolExecutor(compute_threads, thread_name_prefix="lstm-run")
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

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
        self.check_accepting()
        model = self.models().get(name, version)
        return self.store.open(model, self._clamp(model, options))

    def resume_session(self, session_id: str, options: StreamOptions | None) -> Session:
        self.check_accepting()
        session = self.store.get(session_id)
        if options is not None:
            session.options = self._clamp(session.model, options)
        self.store.touch(session)
        metrics.SESSION_EVENTS.labels(session.model.name, "resumed").inc()
        return session

    async def apply_chunk(self, session: Session, seq: int, chunk: np.ndarray) -> ChunkOutcome:
        """Apply a validated chunk once, in order; a resend (seq <= last applied) is skipped."""
        if seq < 1:
            raise InvalidInput(f"chunk.seq = {seq}: sequence numbers start at 1")
        async with session.lock:
            self._check_live(session)
            if seq <= session.last_seq:
                return ChunkOutcome(seq, None, True, session.total_steps)
            result = await self.step(session, chunk)
            session.last_seq = seq
            self.store.touch(session)
            return ChunkOutcome(seq, result, False, result.total_steps)

    async def step(self, session: Session, chunk: np.ndarray) -> StepResult:
        """Run one chunk, (T,) tokens or (T, F) frames, from the session's state."""
        model = session.model
        steps = int(chunk.shape[0])
        state = session.read_state()[None]  # (1, S, H)
        lengths = np.array([steps], dtype=np.int64)  # (1,)
        out = await self._run(model, chunk[None], lengths, state, "Stream")
        session.write_state(out.state_out[0])
        session.total_steps += steps
        step_probs = out.step_probs[0] if session.options.every_step else None  # (T, C)
        return StepResult(out.probs[0], step_probs, steps, session.total_steps)

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
            self.store.touch(session)
            return False

    async def end(self, session: Session) -> None:
        """Free the session once its chunk in progress (if any) is done."""
        async with session.lock:
            self.store.end(session)

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
        self._enter()
        future = loop.run_in_executor(self._executor, _timed_run, model, inputs, lengths, state)
        future.add_done_callback(lambda _: self._leave())  # when the thread is done, not before
        # shield: a cancelled caller (client gone) does not hide a run still in progress from
        # wait_idle(); its state is simply not written back.
        started, out, finished = await asyncio.shield(future)
        name = model.name
        metrics.CHUNK_SECONDS.labels(name, "queue").observe(started - queued)
        metrics.CHUNK_SECONDS.labels(name, "compute").observe(finished - started)
        metrics.CHUNK_SECONDS.labels(name, "total").observe(time.perf_counter() - queued)
        metrics.STEPS.labels(name, rpc).inc(int(lengths.sum()))
        return out

    def _enter(self) -> None:
        self._inflight += 1
        self._idle.clear()
        metrics.INFLIGHT_RUNS.inc()

    def _leave(self) -> None:
        self._inflight -= 1
        metrics.INFLIGHT_RUNS.dec()
        if self._inflight == 0:
            self._idle.set()

    @property
    def inflight(self) -> int:
        return self._inflight

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no model run is in progress; False if `timeout_s` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _timed_run(
    model: LoadedModel, inputs: np.ndarray, lengths: np.ndarray, state: np.ndarray
) -> tuple[float, RunOutput, float]:
    started = time.perf_counter()
    out = model.runtime.run(inputs, lengths, state)
    return started, out, time.perf_counter()
