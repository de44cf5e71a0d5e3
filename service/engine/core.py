"""The engine: sessions in order, their chunks batched by their model version's worker; no gRPC.

A session's chunks go one at a time (its lock) to its ModelWorker (service/engine/chunks.py),
whose batcher runs the chunks of many sessions as one batch and applies each session's chunk
only after the run succeeded (service/engine/schedule/batcher.py). Every state change is
written through to the shared store (if any) while the session's lock is still held, so two
saves of one session never cross.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from service.engine.attach import SessionAttach
from service.engine.chunks import ChunkApply, check_seq
from service.engine.continuity.continuity import SessionContinuity, settle
from service.engine.model.registry import ModelRegistry
from service.engine.model.repository import ModelControl
from service.engine.model.worker import ModelWorker, WorkerFactory
from service.engine.schedule.batcher import ComputeLanes, InflightCounter
from service.engine.schedule.classify import ClassifyLane
from service.engine.session.sessions import Session, SessionStore
from service.engine.text.textstream import NOTHING_HELD, HeldChange
from service.engine.types import (
    NO_METRICS,
    NO_TRACER,
    BatchPolicy,
    ChunkOutcome,
    ChunkWork,
    ClassifyPolicy,
    EngineMetrics,
    EngineTracer,
    RuntimeOptions,
    StepResult,
)
from service.errors import Draining, Unavailable

__all__ = ["BatchPolicy", "ChunkOutcome", "ChunkWork", "Engine", "StepResult"]


def unanswered_tail(session: Session) -> np.ndarray | None:
    """The held text's tail, (T,) int64, if the session's last reply did not run it."""
    tail, last = session.held.tail, session.last_result
    if session.ended or not tail or (last is not None and last.total_steps == session.total_steps):
        return None
    return np.asarray(tail, dtype=np.int64)


class Engine(SessionAttach, ChunkApply):
    """Model versions (their workers), sessions and the threads that run onnxruntime.

    `metrics`: what the engine and every piece it builds record into; the store and a given
    continuity took theirs when they were built (service/server.py gives all the same ones).
    `tracer`: the spans of admission, queue waits, batches and store saves (NO_TRACER: off)."""

    def __init__(
        self,
        store: SessionStore,
        compute_threads: int = 4,
        policy: BatchPolicy | None = None,
        continuity: SessionContinuity | None = None,
        runtime: RuntimeOptions | None = None,
        repository: Path = Path("models"),
        model_control: str = "none",
        classify_policy: ClassifyPolicy | None = None,
        metrics: EngineMetrics = NO_METRICS,
        tracer: EngineTracer = NO_TRACER,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.tracer = tracer
        self.continuity = continuity or SessionContinuity(store, metrics=metrics)
        self.drain_started = asyncio.Event()
        self.draining = False
        self.loaded = False
        self.registry = ModelRegistry()
        self._executor = ThreadPoolExecutor(compute_threads, thread_name_prefix="lstm-run")
        self._inflight = InflightCounter(metrics)
        lane = classify_policy or ClassifyPolicy()
        self._classify_threads = ThreadPoolExecutor(lane.threads, "lstm-classify")
        self._classify_lane = ClassifyLane(self._classify_threads, self._inflight, lane, metrics,
                                           tracer)  # fmt: skip
        factory = WorkerFactory(
            runtime or RuntimeOptions(), policy or BatchPolicy(),
            ComputeLanes(self._executor, self._inflight, tracer), self._classify_lane,
            store.initial_capacity, store.max_sessions, metrics,
        )  # fmt: skip
        self.control = ModelControl(repository, self.registry, factory, store, model_control,
                                    metrics)  # fmt: skip

    async def load_models(self, strict: bool = True) -> None:
        """The start-up scan (explicit mode loads nothing here); then the engine takes work."""
        if self.control.mode != "explicit":
            await self.control.scan(strict=strict)
        self.loaded = True

    # -- admission ---------------------------------------------------------------------------

    def models(self) -> ModelRegistry:
        """The registry; Unavailable while models are still loading."""
        if not self.loaded:
            raise Unavailable("models are still loading; retry shortly")
        return self.registry

    def check_accepting(self) -> None:
        """New work (sessions, Classify) is refused while loading or draining."""
        if self.draining:
            raise Draining("the server is draining (shutting down); reconnect elsewhere")
        self.models()

    # -- sessions ----------------------------------------------------------------------------

    async def take_snapshot(
        self, session: Session, final: bool = False, attached: object | None = None
    ) -> bytes:
        """The session's signed snapshot, after every chunk already submitted for it."""
        async with session.lock:
            session.check_live()
            session.check_attached(attached)
            if self.continuity.unsure and session.id in self.continuity.unsure:
                with contextlib.suppress(Unavailable):  # a drain's snapshot: the store's if newer
                    await settle(self.continuity, session)
            blob = self.continuity.snapshot(session)
        self.metrics.snapshots.labels(session.model.name, "final" if final else "taken").inc()
        return blob

    async def reset(self, session: Session, seq: int, attached: object | None = None) -> bool:
        """Zero the state; returns True if `seq` was a resend and nothing was done."""
        check_seq(seq, "reset")
        async with session.lock:
            if session.admit(seq, attached, "reset") is not None:
                return True
            before = self.continuity.checkpoint(session)
            session.reset(seq)
            self.store.touch(session)
            await self.continuity.persist(session, before=before)
            return False

    async def end(
        self, session: Session, attached: object | None = None
    ) -> tuple[StepResult | None, int]:
        """Free the session once its chunk in progress (if any) is done. Its last reply answered
        all its text (the held tail ran as a probe), so nothing runs; only a session whose last
        reply did not (continued from an older server's snapshot) runs its held tail first.
        Returns the final result, if there is one, and the steps run for it."""
        async with session.lock:
            if not session.ended:
                session.check_attached(attached)
            try:
                tail = unanswered_tail(session)
                if tail is None:
                    return session.last_result, 0
                change = HeldChange(session.held, NOTHING_HELD, len(tail))
                final = await session.model.submit(session, session.last_seq, tail, change)
                return final, len(tail)
            finally:
                await self.continuity.end(session)

    # -- classify ----------------------------------------------------------------------------

    def classify_model(self, name: str, version: int) -> ModelWorker:
        """The READY version a Classify request runs on."""
        self.check_accepting()
        return self.models().get(name, version)

    async def classify(
        self, model: ModelWorker, sequences: list[np.ndarray], with_steps: bool
    ) -> list[StepResult]:
        """Classify whole sequences from zero states in one padded batch."""
        if self.tracer.enabled:
            with self.tracer.span("admission", {"lstmserve.admission": "classify"}):
                self.check_accepting()
                self._classify_lane.check_budget(np.array([len(s) for s in sequences]))
        else:
            self.check_accepting()
        return await model.classify(sequences, with_steps)

    # -- work in progress --------------------------------------------------------------------

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
        self.control.retire_all()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._classify_threads.shutdown(wait=False, cancel_futures=True)
