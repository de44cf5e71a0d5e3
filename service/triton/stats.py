"""Per-version inference statistics (the statistics extension), counted by the Triton core.

inference_count counts inferences (a batch of N sequences is N), execution_count counts
requests run (our batcher may run chunks of many requests together; those runs are in
lstm_serve_batch_size), success / fail the requests and their total time in nanoseconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from service.triton.types import Duration, ModelStats


@dataclass
class _Counters:
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0


class InferStatistics:
    """Counters by (model, version); loop thread only."""

    def __init__(self) -> None:
        self._by_version: dict[tuple[str, int], _Counters] = {}

    def success(self, model: str, version: int, inferences: int, started_ns: int) -> None:
        c = self._by_version.setdefault((model, version), _Counters())
        c.last_inference_ms = time.time_ns() // 1_000_000
        c.inference_count += inferences
        c.execution_count += 1
        c.success_count += 1
        c.success_ns += time.perf_counter_ns() - started_ns

    def failure(self, model: str, version: int, started_ns: int) -> None:
        c = self._by_version.setdefault((model, version), _Counters())
        c.fail_count += 1
        c.fail_ns += time.perf_counter_ns() - started_ns

    def get(self, model: str, version: int) -> ModelStats:
        c = self._by_version.get((model, version), _Counters())
        return ModelStats(
            name=model, version=str(version), last_inference=c.last_inference_ms,
            inference_count=c.inference_count, execution_count=c.execution_count,
            success=Duration(c.success_count, c.success_ns),
            fail=Duration(c.fail_count, c.fail_ns),
        )  # fmt: skip
