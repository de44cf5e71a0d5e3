"""Engines over the tiny repository, loaded, for the unit tests (no network)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from service.engine.core import Engine
from service.engine.model.worker import ModelWorker, WorkerFactory
from service.engine.schedule.batcher import ComputeLanes, InflightCounter
from service.engine.schedule.classify import ClassifyLane
from service.engine.session.sessions import SessionStore
from service.engine.types import BatchPolicy, ClassifyPolicy, EngineMetrics, RuntimeOptions
from service.metrics import engine_metrics
from service.tritonconfig import TritonConfigReader

CPU_ONLY = RuntimeOptions(providers=("CPUExecutionProvider",), model_configs=TritonConfigReader())


def load_engine(
    repo: Path, max_sessions: int = 100, idle_timeout_s: float = 60.0,
    clock: Callable[[], float] = time.monotonic, metrics: EngineMetrics | None = None,
    **kwargs: Any,
) -> Engine:  # fmt: skip
    """An engine that has loaded and warmed every version of `repo`, recording into `metrics`
    (default: the process's Prometheus instruments, as the server's does)."""
    recorded = engine_metrics() if metrics is None else metrics
    store = SessionStore(max_sessions=max_sessions, idle_timeout_s=idle_timeout_s, clock=clock,
                         metrics=recorded)  # fmt: skip
    kwargs.setdefault("compute_threads", 1)
    engine = Engine(store, runtime=CPU_ONLY, repository=repo, metrics=recorded, **kwargs)
    asyncio.run(engine.load_models())
    return engine


def load_worker(path: Path, options: RuntimeOptions = CPU_ONLY) -> ModelWorker:
    """One model version loaded and warmed on its own (no engine around it)."""
    recorded = engine_metrics()
    inflight = InflightCounter(recorded)
    lanes = ComputeLanes(ThreadPoolExecutor(1), inflight)
    classify = ClassifyLane(ThreadPoolExecutor(1), inflight, ClassifyPolicy(), recorded)
    return WorkerFactory(options, BatchPolicy(), lanes, classify, 1, 10, recorded).load(path)
