"""The engine records into the metrics it is given (EngineMetrics), never into a global: an
engine given a recorder leaves the process's Prometheus instruments alone."""

from __future__ import annotations

import asyncio
from dataclasses import fields
from pathlib import Path

import numpy as np
from prometheus_client import REGISTRY

from service.engine.schedule.batcher import InflightCounter
from service.engine.types import NO_METRICS, UNKNOWN_MODEL, Counts, EngineMetrics, StreamOptions
from service.metrics import engine_metrics
from tests.unit.engines import load_engine

Call = tuple[str, tuple[str, ...], str, object]  # (field, labels, method, value)


class Recorder:
    """Every instrument at once, remembering each call."""

    def __init__(self, calls: list[Call], family: str, values: tuple[str, ...] = ()) -> None:
        self.calls, self.family, self.values = calls, family, values

    def labels(self, *values: str) -> Recorder:
        return Recorder(self.calls, self.family, values)

    def _record(self, method: str, value: object) -> None:
        self.calls.append((self.family, self.values, method, value))

    def inc(self, amount: float = 1, /) -> None:
        self._record("inc", amount)

    def set(self, value: float, /) -> None:
        self._record("set", value)

    def observe(self, value: float, /) -> None:
        self._record("observe", value)

    def observe_many(self, values: object, /) -> None:
        self._record("observe_many", len(values))  # type: ignore[arg-type]

    def track(self, counter: Counts, /) -> None:
        self._record("track", counter)


def recording() -> tuple[EngineMetrics, list[Call]]:
    calls: list[Call] = []
    given = EngineMetrics(**{f.name: Recorder(calls, f.name) for f in fields(EngineMetrics)})
    return given, calls


def _steps_total() -> float:
    labels = {"model": "tiny-gru", "rpc": "Stream"}
    return REGISTRY.get_sample_value("lstm_serve_steps_total", labels) or 0.0


def test_an_engine_records_into_the_metrics_it_is_given_and_nowhere_else(
    tiny_repo: Path,
) -> None:
    before = _steps_total()
    given, calls = recording()
    engine = load_engine(tiny_repo, metrics=given)

    async def main() -> None:
        session = await engine.open_session("tiny-gru", 0, StreamOptions())
        await engine.apply_chunk(session, 1, np.array([1, 2, 3], dtype=np.int64))
        resumed = await engine.resume_session(session.id, None)
        await engine.end(resumed)

    try:
        asyncio.run(main())
    finally:
        engine.close()
    seen = {(family, values, method) for family, values, method, _ in calls}
    assert {
        ("session_events", ("tiny-gru", "opened"), "inc"),
        ("session_events", ("tiny-gru", "resumed"), "inc"),
        ("session_events", ("tiny-gru", "ended"), "inc"),
        ("steps", ("tiny-gru", "Stream"), "inc"),
        ("chunk_seconds", ("tiny-gru", "total"), "observe_many"),
        ("batch_size", ("tiny-gru",), "observe"),
        ("active_sessions", ("tiny-gru", "1"), "set"),
        ("state_bytes", ("tiny-gru", "1", "used"), "set"),
        ("model_state", ("tiny-gru", "1"), "set"),
        ("model_info", ("tiny-gru", "1", "CPUExecutionProvider", "false"), "set"),
    } <= seen
    assert ("steps", ("tiny-gru", "Stream"), "inc", 3) in calls
    assert [c for c in calls if c[0] == "inflight"], "the engine's counter is tracked"
    assert _steps_total() == before, "an engine given metrics records into no global"


def test_the_real_metrics_fill_every_instrument_and_sum_every_tracked_counter() -> None:
    real = engine_metrics()
    assert all(getattr(real, f.name) is not getattr(NO_METRICS, f.name)
               for f in fields(EngineMetrics))  # fmt: skip
    read = lambda: REGISTRY.get_sample_value("lstm_serve_inflight_runs")  # noqa: E731
    before = read()
    counted, untracked = InflightCounter(real), InflightCounter()
    counted.enter(3)
    untracked.enter(5)  # built without metrics: not counted
    assert read() == before + 3
    counted.leave(3)
    assert read() == before


def test_the_unknown_model_label_is_defined_once() -> None:
    from service import metrics

    assert metrics.UNKNOWN_MODEL is UNKNOWN_MODEL == "<unknown>"
