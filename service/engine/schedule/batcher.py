"""Cross-session sequence batching: pending chunks of many sessions -> one model run.

One `SequenceBatcher` per model version (its ModelWorker's). Sessions submit one chunk at a time
(their lock keeps at most one pending chunk per session, so a batch never holds two chunks of one
session and each session's chunks run in its own order). A batch gathers the sessions' states
from the version's state store into (B, S, H) on the event loop thread, pads the chunks to
(B, Tmax) with `lengths`, runs once, and scatters the new states back on the loop thread, where
each session's chunk is applied (state row, seq, steps, result, held text: `Session.apply`)
atomically or not at all. Every pending chunk is resolved: a chunk whose waiter was cancelled is
dropped (its session untouched); a chunk whose session was closed meanwhile (replaced by a newer
copy, expired, its version retired) is answered with the close reason and not applied; a failed
run fails its chunks.

A batch of at most `inline_max_steps` B x Tmax steps on an otherwise idle model runs inline on the
event loop thread (two thread hand-offs cost more than one small step); larger ones run on the
executor.

When a batch starts (the dispatch rule):
  * nothing of this model is running: at once, with whatever is pending (a lone client waits for
    no one);
  * otherwise, while fewer than `max_concurrent` batches run: as soon as `max_batch_size` chunks
    are pending or the oldest has waited `max_queue_delay_s`;
  * when a batch finishes, the next one starts at once with what piled up meanwhile, so under load
    batches fill by themselves.

Which chunks form the next batch (length buckets, the size caps) is
service/engine/schedule/pending.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.engine.compute.runtime import ModelRuntime, RunOutput
from service.engine.compute.state import StateStore
from service.engine.schedule.pending import Answer, Pending, PendingChunks, bucket_of
from service.engine.session.sessions import Session
from service.engine.text.textstream import HeldChange
from service.engine.types import (
    NO_METRICS,
    NO_TRACER,
    BatchPolicy,
    ChunkWork,
    EngineMetrics,
    EngineTracer,
    Observed,
    StepResult,
    TraceSpan,
)

__all__ = ["ComputeLanes", "InflightCounter", "SequenceBatcher", "bucket_of", "pad_chunks"]

log = logging.getLogger(__name__)

STAGES = ("queue", "compute", "total")
# A run of at least this many B x Tmax steps gives its onnxruntime arena growth back afterwards
# (docs/OPERATIONS.md, "Memory"): big runs are rare and costly anyway, small ones stay fast.
SHRINK_ROW_STEPS = 8192  # per-chunk latency stages, as for Classify
# A batch's gathered states go into a buffer of a finished run when one is big enough (a new
# array per batch cost the loop thread a page fault per 4 KB: ~1 MB a batch for the bench
# model); buffers up to this size are kept, at most one per batch that may run at once.
SPARE_STATE_BYTES = 8 << 20


class InflightCounter:
    """Work accepted and not finished (queued chunks, running batches, Classify runs).

    The `lstm_serve_inflight_runs` gauge reads every live counter when scraped (the metrics'
    tracker holds it), so the per-chunk path does no metric work for it.
    """

    def __init__(self, metrics: EngineMetrics = NO_METRICS) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()
        metrics.inflight.track(self)

    def enter(self, n: int = 1) -> None:
        self.count += n
        self._idle.clear()

    def leave(self, n: int = 1) -> None:
        self.count -= n
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


@dataclass(frozen=True)
class ComputeLanes:
    """Where model runs happen: the worker threads and the count of work in progress; the
    tracer their batches report to."""

    executor: Executor
    inflight: InflightCounter
    tracer: EngineTracer = NO_TRACER


def _fail(batch: list[Pending], exc: BaseException) -> None:
    """Answer every chunk of `batch` not answered yet with `exc`."""
    for item in batch:
        if not item.future.done():
            item.future.set_exception(exc)


def pad_chunks(chunks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Chunks of (T_b,) or (T_b, F) -> zero-padded (B, Tmax[, F]) and lengths (B,) int64."""
    first = chunks[0]
    if len(chunks) == 1:  # a lone chunk: a (1, T[, F]) view, nothing to pad
        return first[np.newaxis], np.array([first.shape[0]], dtype=np.int64)
    steps = [c.shape[0] for c in chunks]
    batch = np.zeros((len(chunks), max(steps), *first.shape[1:]), dtype=first.dtype)
    for b, chunk in enumerate(chunks):
        batch[b, : chunk.shape[0]] = chunk  # (B, Tmax) or (B, Tmax, F)
    return batch, np.array(steps, dtype=np.int64)  # lengths (B,)


def run_with_probes(
    runtime: ModelRuntime, state: np.ndarray, chunks: list[np.ndarray],
    tails: list[np.ndarray | None], ids: list[str], steps: bool,
) -> RunOutput:  # fmt: skip
    """Two model calls: each row's settled steps from its state (B, S, H), this run's own copy,
    which then holds the settled states; then the probe rows' tails from those states (their
    states dropped). Per row: the probabilities after its last step (its probe's, if any), its
    settled steps' then its probe's per-step probabilities (B, Tmax, C), its settled state."""
    if len(chunks) == 1:
        return _run_one_with_probe(runtime, state, chunks[0], tails[0], ids, steps)
    settled = [b for b, chunk in enumerate(chunks) if chunk.shape[0]]
    probed = [b for b, tail in enumerate(tails) if tail is not None]
    runs = []
    for rows, parts in ((settled, chunks), (probed, tails)):
        if not rows:
            continue
        inputs, lengths = pad_chunks([parts[b] for b in rows])  # type: ignore[misc]
        whole = len(rows) == len(chunks)
        out = runtime.run(inputs, lengths, state if whole else state[rows],
                          inputs.shape[0] * inputs.shape[1] >= SHRINK_ROW_STEPS,
                          [ids[b] for b in rows], steps)  # fmt: skip
        if parts is chunks:
            state[rows] = out.state_out  # the settled states, for the probes and the commit
        runs.append((rows, parts, out))
    probs = np.empty((len(chunks), runs[0][2].probs.shape[1]), dtype=np.float32)  # (B, C)
    for rows, _, out in runs:
        probs[rows] = out.probs  # the probe's after the settled run's
    if not steps:
        return RunOutput(None, probs, state)
    pairs = zip(chunks, tails, strict=True)
    width = max(c.shape[0] + (0 if t is None else len(t)) for c, t in pairs)
    every = np.zeros((len(chunks), width, probs.shape[1]), dtype=np.float32)  # (B, Tmax, C)
    for rows, parts, out in runs:
        assert out.step_probs is not None
        for i, b in enumerate(rows):
            start = 0 if parts is chunks else chunks[b].shape[0]
            n = parts[b].shape[0]  # type: ignore[union-attr]
            every[b, start : start + n] = out.step_probs[i, :n]
    return RunOutput(every, probs, state)


def _run_one_with_probe(
    runtime: ModelRuntime, state: np.ndarray, chunk: np.ndarray, tail: np.ndarray | None,
    ids: list[str], steps: bool,
) -> RunOutput:  # fmt: skip
    """`run_with_probes` for a batch of one row (a lone client's): no index lists."""
    first = None
    if n := chunk.shape[0]:
        lengths = np.array([n], dtype=np.int64)
        first = runtime.run(chunk[np.newaxis], lengths, state, n >= SHRINK_ROW_STEPS, ids, steps)
        state = first.state_out  # (1, S, H)
    if tail is None:
        assert first is not None
        return first
    lengths = np.array([tail.shape[0]], dtype=np.int64)
    probe = runtime.run(tail[np.newaxis], lengths, state, False, ids, steps)
    every = probe.step_probs
    if first is not None and every is not None and first.step_probs is not None:
        every = np.concatenate([first.step_probs, every], axis=1)  # (1, S + T', C)
    return RunOutput(every, probe.probs, state)


def runs_inline(policy: BatchPolicy, running: int, batch: list[Pending]) -> bool:
    """Run on the loop thread (the batch being the one running): a tiny batch on an idle model
    costs less than two thread hops."""
    limit = policy.inline_max_steps
    if limit <= 0 or running != 1:
        return False
    return len(batch) * max(item.steps for item in batch) <= limit


def trace_batch(tracer: EngineTracer, named: dict[str, Any],
                batch: list[Pending]) -> TraceSpan | None:  # fmt: skip
    """A batch's span, linked to the sampled requests it serves (each gets its queue wait
    span); None when none of its chunks is traced."""
    traced = [(item.trace, item.enqueued) for item in batch if item.trace is not None]
    if not traced:
        return None
    return tracer.batch(named | {
        "lstmserve.batch.size": len(batch),
        "lstmserve.batch.steps": sum(item.steps for item in batch),
        "lstmserve.batch.max_steps": max(item.steps for item in batch),
    }, traced)  # fmt: skip


class SpareStates:
    """Finished runs' state buffers for later batches to gather into (a new array per batch
    cost the loop thread a page fault per 4 KB: ~1 MB a batch for the bench model): at most
    `most` kept (one per batch that may run at once), each at most SPARE_STATE_BYTES."""

    def __init__(self, state: StateStore, most: int) -> None:
        self.state = state
        self.most = most
        self.buffers: list[np.ndarray] = []

    def gather(self, rows: list[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """The rows' states (B, S, H), the run's own copy: in a spare buffer big enough, or a
        new array; and the buffer to keep after the run (None: too big to keep, or one row)."""
        if len(rows) == 1:
            return self.state.gather(rows), None
        spare = self.buffers.pop() if self.buffers else None
        if spare is not None and spare.shape[0] >= len(rows):
            return self.state.gather(rows, spare[: len(rows)]), spare
        state = self.state.gather(rows)
        keep = state.base is None and state.nbytes <= SPARE_STATE_BYTES
        return state, state if keep else None

    def keep(self, buffer: np.ndarray) -> None:
        """A finished run's buffer, for a later batch (while fewer than `most` are kept)."""
        if len(self.buffers) < self.most:
            self.buffers.append(buffer)


class SequenceBatcher:
    """Pending chunks of one model version's sessions -> batched runs on the executor."""

    def __init__(
        self,
        name: str,
        runtime: ModelRuntime,
        state: StateStore,
        policy: BatchPolicy,
        lanes: ComputeLanes,
        metrics: EngineMetrics = NO_METRICS,
        version: int = 0,
    ) -> None:
        self.runtime = runtime
        self.state = state
        self.policy = policy
        self._executor = lanes.executor
        self._inflight = lanes.inflight
        self._queue = PendingChunks(policy, lanes.inflight, runtime.equal_lengths)
        self._running = 0
        self._scheduled = False
        self._spare = SpareStates(state, policy.max_concurrent)
        self._timer: asyncio.TimerHandle | None = None
        self._m_size = metrics.batch_size.labels(name)
        self._m_queue = metrics.batch_queue_seconds.labels(name)
        self._m_compute = metrics.batch_compute_seconds.labels(name)
        self._m_steps = metrics.steps.labels(name, "Stream")
        self._m_chunk = {s: metrics.chunk_seconds.labels(name, s) for s in STAGES}
        self._tracer = lanes.tracer
        self._traced = {"lstmserve.model.name": name, "lstmserve.model.version": version}

    @property
    def pending(self) -> int:
        return len(self._queue)

    def submit(
        self, session: Session, seq: int, chunk: np.ndarray, change: HeldChange | None = None
    ) -> asyncio.Future[StepResult]:
        """Queue one validated chunk of a session that has no other chunk pending: the steps
        it settles and (`change`: streamed text's change to the held text, applied with its
        result; None: not text) the held text's tail, run after them as a probe; >= 1 step."""
        future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        self._enqueue([Pending(session, seq, chunk, future, change)])
        return future

    def submit_all(self, items: list[tuple[Answer, ChunkWork]]) -> None:
        """`submit` for each chunk of `items` (of distinct sessions, each validated, its
        session's lock held, >= 1 step to run), in their order, queued at once, each answered
        through its `Answer`: a future, or the Waiter of a chunk submitted with others (its
        group's one future wakes their caller: no future per chunk)."""
        self._enqueue([Pending(w.session, w.seq, w.chunk, answer, w.held) for answer, w in items])

    def _enqueue(self, items: list[Pending]) -> None:
        for item in items:
            if item.steps < 1:
                raise ValueError("a chunk needs at least one step (lengths 0 would zero the state)")
        if self._tracer.enabled:  # the request's span, carried into the batch by the chunk
            for item in items:
                item.trace = self._tracer.current()
        self._queue.add_all(items)
        self._inflight.enter(len(items))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)  # this turn's chunks join it

    def fail_queued(self) -> None:
        """Answer every queued chunk now (its session was closed: the version is retiring)."""
        self._queue.fail_all()

    # -- forming batches ---------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Start every batch the dispatch rule allows now; arm a timer for the next one. A bug
        here fails the queued chunks (logged) rather than leaving them unanswered."""
        self._scheduled = False
        try:
            self._start_due()
        except Exception:
            log.exception("batch dispatch failed; failing the queued chunks")
            self._queue.fail_all()

    def _start_due(self) -> None:
        while self._queue and self._running < self.policy.max_concurrent:
            wait = self._wait_before_next()
            if wait > 0:
                self._arm_timer(wait)
                return
            batch = self._queue.take()
            if batch:
                self._start_or_fail(batch)

    def _wait_before_next(self) -> float:
        """Seconds until the next batch may start (0 = now)."""
        policy = self.policy
        if self._running == 0 or len(self._queue) >= policy.max_batch_size:
            return 0.0
        return self._queue.oldest() + policy.max_queue_delay_s - time.perf_counter()

    def _arm_timer(self, wait: float) -> None:
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(wait, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    # -- running -----------------------------------------------------------------------------

    def _start_or_fail(self, batch: list[Pending]) -> None:
        """Start a batch taken from the queue; a bug starting it fails its chunks (logged)."""
        running = self._running
        try:
            self._start(batch)
        except Exception as exc:
            log.exception("starting a batch of %d chunks failed", len(batch))
            self._running = running
            self._inflight.leave(len(batch))
            _fail(batch, exc)

    def _start(self, batch: list[Pending]) -> None:
        self._running += 1
        started = time.perf_counter()
        waited = [started - item.enqueued for item in batch]
        self._m_chunk["queue"].observe_many(waited)  # one lock for the whole batch
        self._m_queue.observe(max(waited))  # the oldest
        self._m_size.observe(len(batch))
        # Gathered here, on the loop thread: the run holds its own copy, so a session closed
        # while its batch runs can free its row at once.
        state, buffer = self._spare.gather([item.session.row for item in batch])  # (B, S, H)
        chunks = [item.chunk for item in batch]
        ids = [item.session.id for item in batch]
        steps = any(item.session.options.step_rows for item in batch)  # fetched if needed
        held = any(item.tail is not None for item in batch)  # streamed text held: probes
        tails = [item.tail for item in batch] if held else None
        span = trace_batch(self._tracer, self._traced, batch) if self._tracer.enabled else None
        loop = asyncio.get_running_loop()
        if runs_inline(self.policy, self._running, batch):
            done: asyncio.Future[tuple[RunOutput, float]] = loop.create_future()
            try:
                done.set_result(
                    _run(self.runtime, self._m_compute, state, chunks, ids, steps, tails)
                )
            except Exception as exc:
                done.set_exception(exc)
            self._finish(batch, done, False, span, buffer)  # the caller's _dispatch goes on
            return
        future = loop.run_in_executor(self._executor, _run, self.runtime, self._m_compute, state,
                                      chunks, ids, steps, tails)  # fmt: skip
        future.add_done_callback(lambda f: self._finish(batch, f, span=span, buffer=buffer))

    def _finish(
        self,
        batch: list[Pending],
        future: asyncio.Future[tuple[RunOutput, float]],
        dispatch: bool = True, span: TraceSpan | None = None,
        buffer: np.ndarray | None = None,
    ) -> None:  # fmt: skip
        """On the loop thread: commit every row whose waiter still wants it, wake the waiters;
        the run's state `buffer` is kept for a later batch (not after a cancelled run: its
        thread may still hold it)."""
        self._running -= 1
        try:
            if future.cancelled():
                raise RuntimeError("the batch run was cancelled (server shutting down)")
            out, seconds = future.result()
        except BaseException as exc:  # a failed run fails its chunks, never the batcher
            _fail(batch, exc)
        else:
            try:
                self._commit(batch, out, seconds)
            except Exception as exc:  # a bug: the chunks not answered yet get the error
                log.exception("committing a batch of %d chunks failed", len(batch))
                _fail(batch, exc)
        finally:
            if span is not None:
                span.end(None if future.cancelled() else future.exception())
            if buffer is not None and not future.cancelled():  # a cancelled run's thread
                self._spare.keep(buffer)  # may still hold it
            self._inflight.leave(len(batch))
            if dispatch:
                self._dispatch()

    def _commit(self, batch: list[Pending], out: RunOutput, seconds: float) -> None:
        """Scatter the kept rows' states, then apply each kept session's chunk (Session.apply:
        seq, steps, result and held text at once); answer the rest."""
        keep = [b for b, item in enumerate(batch)
                if not item.future.done() and not item.resolve_closed()]  # fmt: skip
        if keep:
            rows = [batch[b].session.row for b in keep]
            every_row = len(keep) == len(batch)  # then no copy of the kept rows
            self.state.scatter(rows, out.state_out if every_row else out.state_out[keep])
        steps = _apply_kept(batch, keep, out)
        now = time.perf_counter()
        self._m_chunk["total"].observe_many([now - batch[b].enqueued for b in keep])
        self._m_chunk["compute"].observe(seconds)  # once per model run, as for Classify
        self._m_steps.inc(steps)


def _run(
    runtime: ModelRuntime, timed: Observed, state: np.ndarray, chunks: list[np.ndarray],
    ids: list[str], steps: bool, tails: list[np.ndarray | None] | None = None,
) -> tuple[RunOutput, float]:  # fmt: skip
    """On a worker thread: pad chunks, one model call (two with probes); (out, seconds), the
    seconds observed in `timed`."""
    started = time.perf_counter()
    if tails is not None:
        out = run_with_probes(runtime, state, chunks, tails, ids, steps)
    else:
        inputs, lengths = pad_chunks(chunks)  # (B, Tmax[, F]), (B,)
        shrink = inputs.shape[0] * inputs.shape[1] >= SHRINK_ROW_STEPS  # a large run
        out = runtime.run(inputs, lengths, state, shrink, ids, steps)
    seconds = time.perf_counter() - started
    timed.observe(seconds)
    return out, seconds


def _apply_kept(batch: list[Pending], keep: list[int], out: RunOutput) -> int:
    """Apply each kept chunk's run to its session (Session.apply: seq, steps, result and held
    text at once) and answer it; the steps applied."""
    probs, step_probs = out.probs, out.step_probs
    steps = 0
    for b in keep:
        item = batch[b]
        session = item.session
        rows = None
        if step_probs is not None and session.options.step_rows:
            rows = step_probs[b, : item.steps]
        item.future.set_result(session.apply(item.seq, item.change, item.settled, probs[b], rows))
        steps += item.steps
    return steps
