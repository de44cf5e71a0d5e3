"""The Classify lane: whole sequences, on threads of their own, in slices of bounded size.

Streaming chunks never wait behind Classify (their batches run on the compute threads; Classify
on this lane's). A request runs as a series of model runs over time slices of at most
`slice_row_steps` B x T steps, each slice continuing from the state the last one left (the
models are exact when chunked, which the project checks everywhere): a run's memory stays
bounded whatever the request's size, and a cancelled call (client gone, deadline passed) stops
after the slice in progress. A request's budget of steps is checked before any run.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor

import numpy as np

from service.engine.compute.runtime import ModelRuntime, RunOutput
from service.engine.schedule.batcher import InflightCounter
from service.engine.types import (
    NO_METRICS,
    NO_TRACER,
    ClassifyPolicy,
    EngineMetrics,
    EngineTracer,
    StepResult,
)
from service.errors import BudgetExceeded


class ClassifyLane:
    """Runs Classify requests of every model version, slice by slice."""

    def __init__(self, executor: Executor, inflight: InflightCounter, policy: ClassifyPolicy,
                 metrics: EngineMetrics = NO_METRICS,
                 tracer: EngineTracer = NO_TRACER) -> None:  # fmt: skip
        self.executor = executor
        self.tracer = tracer
        self.inflight = inflight
        self.policy = policy
        self._m_chunk = metrics.chunk_seconds
        self._m_steps = metrics.steps

    def check_budget(self, lengths: np.ndarray) -> None:
        """BudgetExceeded when the request's steps exceed --max-request-row-steps."""
        total, budget = int(lengths.sum()), self.policy.max_request_row_steps
        if total > budget:
            raise BudgetExceeded(
                f"the request has {total} steps in all, more than the budget of {budget} "
                "(--max-request-row-steps): send fewer or shorter sequences per request"
            )

    async def run(self, runtime: ModelRuntime, name: str, sequences: list[np.ndarray],
                  with_steps: bool, version: int = 0) -> list[StepResult]:  # fmt: skip
        """Every sequence from a zero state; results own their arrays. Traced: one batch span
        (the request's own batch: its child), slices included."""
        lengths = np.array([s.shape[0] for s in sequences], dtype=np.int64)  # (B,)
        self.check_budget(lengths)
        if not self.tracer.enabled:
            return await self._run_all(runtime, name, sequences, lengths, with_steps)
        attributes = {
            "lstmserve.model.name": name, "lstmserve.model.version": version,
            "lstmserve.batch.size": len(sequences), "lstmserve.batch.steps": int(lengths.sum()),
            "lstmserve.batch.max_steps": int(lengths.max()),
        }  # fmt: skip
        with self.tracer.span("batch", attributes):
            return await self._run_all(runtime, name, sequences, lengths, with_steps)

    async def _run_all(self, runtime: ModelRuntime, name: str, sequences: list[np.ndarray],
                       lengths: np.ndarray, with_steps: bool) -> list[StepResult]:  # fmt: skip
        desc = runtime.description
        inputs = _padded(sequences, lengths)  # (B, T) or (B, T, F)
        batch_size, longest = inputs.shape[:2]
        state = np.zeros((batch_size, desc.state_rows, desc.hidden_size), np.float32)  # (B, S, H)
        probs = np.zeros((batch_size, desc.num_classes), np.float32)  # (B, C)
        steps = None
        if with_steps:
            steps = np.zeros((batch_size, longest, desc.num_classes), np.float32)  # (B, T, C)
        queued = time.perf_counter()
        computing = 0.0
        start = 0
        while start < longest:
            active = np.flatnonzero(lengths > start)  # rows not finished yet
            width = self._slice_steps(len(active), longest)
            stop = min(longest, start + width)
            seg = np.minimum(lengths[active] - start, stop - start)  # (A,) >= 1
            out, seconds = await self._run(runtime, inputs[active, start:stop], seg, state[active])
            computing += seconds
            state[active] = out.state_out
            done = lengths[active] <= stop
            probs[active[done]] = out.probs[done]
            if steps is not None:
                steps[active, start:stop] = out.step_probs
            start = stop
        self._observe(name, queued, computing, int(lengths.sum()))
        kind = desc.output_kind  # probs and steps hold the model's outputs as computed
        return [_result(probs, steps, b, int(lengths[b]), kind) for b in range(batch_size)]

    def _slice_steps(self, rows: int, longest: int) -> int:
        limit = self.policy.slice_row_steps
        return longest if limit <= 0 else max(1, limit // rows)

    async def _run(self, runtime: ModelRuntime, inputs: np.ndarray, lengths: np.ndarray,
                   state: np.ndarray) -> tuple[RunOutput, float]:  # fmt: skip
        """One slice on the lane's threads. Not shielded: a cancelled caller submits no further
        slice; the one in progress still counts as in flight until its thread is done."""
        self.inflight.enter()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.executor, _timed, runtime, inputs, lengths, state)
        future.add_done_callback(lambda _: self.inflight.leave())
        return await future

    def _observe(self, name: str, queued: float, computing: float, steps: int) -> None:
        total = time.perf_counter() - queued
        chunk = self._m_chunk
        chunk.labels(name, "queue").observe(max(0.0, total - computing))
        chunk.labels(name, "compute").observe(computing)
        chunk.labels(name, "total").observe(total)
        self._m_steps.labels(name, "Classify").inc(steps)


def _padded(sequences: list[np.ndarray], lengths: np.ndarray) -> np.ndarray:
    first = sequences[0]
    inputs = np.zeros((len(sequences), int(lengths.max()), *first.shape[1:]), first.dtype)
    for b, seq in enumerate(sequences):
        inputs[b, : seq.shape[0]] = seq
    return inputs


def _result(values: np.ndarray, steps: np.ndarray | None, row: int, length: int,
            kind: str) -> StepResult:  # fmt: skip
    every = steps[row, :length].copy() if steps is not None else None  # (T, C)
    return StepResult(values[row].copy(), every, length, length, kind)


def _timed(runtime: ModelRuntime, inputs: np.ndarray, lengths: np.ndarray,
           state: np.ndarray) -> tuple[RunOutput, float]:  # fmt: skip
    started = time.perf_counter()
    out = runtime.run(np.ascontiguousarray(inputs), lengths, np.ascontiguousarray(state), True)
    return out, time.perf_counter() - started
