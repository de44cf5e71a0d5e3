"""A test seam: model runs made slower from outside the engine, for tests that need a chunk in
flight (drain, failover, restore races, batching). The engine has no delay of its own.

A slow run must not run inline on the event loop (it would stall the server): whoever slows a
server also turns inlining off (`inline_max_steps` 0: ServerThread's `run_delay_s`,
tests/e2e/slow_serve.py)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.engine.model.worker import ModelWorker, WorkerFactory


def slowed(run: Callable[..., Any], delay_s: float) -> Callable[..., Any]:
    """`run`, sleeping `delay_s` before each call (as a slow model would compute)."""

    @functools.wraps(run)
    def slow_run(*args: Any, **kwargs: Any) -> Any:
        time.sleep(delay_s)
        return run(*args, **kwargs)

    return slow_run


def slow_loads(factory: WorkerFactory, delay_s: float) -> None:
    """Every version `factory` loads from now on runs its model `delay_s` slower (its warm-up
    excepted): one server's models, whatever else runs in the process."""
    load = factory.load

    def load_slow(path: Path) -> ModelWorker:
        worker = load(path)
        worker.runtime.run = slowed(worker.runtime.run, delay_s)  # type: ignore[method-assign]
        return worker

    factory.load = load_slow  # type: ignore[method-assign]
