"""ModelWorker: one loaded model version and everything it owns.

Its onnxruntime session, its state store (a row per session), its sequence batcher, its
Classify lane and its lifecycle (`loading -> ready -> draining -> retired`). Nothing else
holds a version's resources, so retiring a worker frees all of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from lstmserve.contract import ModelDescription
from service.engine.byo.generic import GenericRuntime
from service.engine.byo.tritonconfig import CONFIG_FILE, ConfigReader, TritonModel
from service.engine.compute.runtime import CPU, CUDA, ModelRuntime
from service.engine.compute.state import HostStateSlab, StateStore
from service.engine.schedule.batcher import ComputeLanes, SequenceBatcher
from service.engine.schedule.classify import ClassifyLane
from service.engine.schedule.pending import Answer
from service.engine.session.sessions import Session
from service.engine.text.subwords import with_tokenizer_file
from service.engine.text.textstream import HeldChange
from service.engine.types import (
    NO_METRICS,
    BatchPolicy,
    ChunkWork,
    EngineMetrics,
    ModelState,
    RuntimeOptions,
    StepResult,
)
from service.errors import ConfigError, Unavailable

log = logging.getLogger(__name__)


class ModelWorker:
    """One served model version: runtime + state + batcher + Classify lane + lifecycle."""

    def __init__(self, name: str, version: int, runtime: ModelRuntime, path: Path,
                 load_seconds: float, state: StateStore, policy: BatchPolicy,
                 lanes: ComputeLanes, classify: ClassifyLane,
                 metrics: EngineMetrics = NO_METRICS) -> None:  # fmt: skip
        self.name = name
        self.version = version
        self.runtime = runtime
        self.path = path
        self.load_seconds = load_seconds
        self.state = state
        self.lifecycle = ModelState.READY
        self.batcher = SequenceBatcher(name, runtime, state, policy, lanes, metrics, version)
        self._classify = classify
        # The parsed config.pbtxt of a user's own model (None for ours): the Triton front
        # answers ModelConfig from it.
        self.triton_config: Any = None
        self.idle_timeout_s: float | None = None  # the model's own, else the server's
        if isinstance(runtime, GenericRuntime):
            self.triton_config = runtime.triton.config
            self.idle_timeout_s = runtime.triton.idle_timeout_s
        self.on_drained: Callable[[ModelWorker], None] | None = None
        label = str(version)
        self._m_sessions = metrics.active_sessions.labels(name, label)
        self._m_allocated = metrics.state_bytes.labels(name, label, "allocated")
        self._m_used = metrics.state_bytes.labels(name, label, "used")
        self._update_gauges()

    @property
    def description(self) -> ModelDescription:
        return self.runtime.description

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def sessions(self) -> int:
        """Sessions held on this version now."""
        return self.state.used

    # -- rows of state (sessions) --------------------------------------------------------------

    def allocate_row(self) -> int:
        """A zeroed state row for a session; Unavailable once retired."""
        if self.lifecycle is ModelState.RETIRED:
            raise Unavailable(f"model {self.key} was unloaded: open a session on another version")
        row = self.state.allocate()
        self._update_gauges()
        return row

    def release_row(self, row: int) -> None:
        if self.lifecycle is ModelState.RETIRED:
            return  # the store is already freed
        self.state.release(row)
        self._update_gauges()
        if self.lifecycle is ModelState.DRAINING and self.sessions == 0 and self.on_drained:
            self.on_drained(self)

    def submit(
        self, session: Session, seq: int, chunk: np.ndarray, change: HeldChange | None = None
    ) -> asyncio.Future[StepResult]:
        """Queue one chunk of a session of this version (its lock held by the caller); `change`:
        streamed text's change to the held text, applied with its result (None: not text)."""
        return self.batcher.submit(session, seq, chunk, change)

    def submit_all(self, items: list[tuple[Answer, ChunkWork]]) -> None:
        """`submit` for each of chunks of distinct sessions submitted together, each answered
        through its `Answer` (a future, or its group's Waiter)."""
        self.batcher.submit_all(items)

    # -- lifecycle -----------------------------------------------------------------------------

    def drain(self) -> None:
        """No new sessions or Classify; the sessions held go on until they end or idle out."""
        if self.lifecycle is ModelState.READY:
            self.lifecycle = ModelState.DRAINING

    def serve_again(self) -> None:
        """A draining version asked for again (its folder is back, or LoadModel): new sessions
        and Classify again; the sessions it held went on all along."""
        if self.lifecycle is ModelState.DRAINING:
            self.lifecycle = ModelState.READY

    def retire(self) -> None:
        """Free everything (every session of this version must be closed already)."""
        if self.lifecycle is ModelState.RETIRED:
            return
        self.batcher.fail_queued()
        self.lifecycle = ModelState.RETIRED
        self.state.close()
        for gauge in (self._m_sessions, self._m_allocated, self._m_used):
            gauge.set(0)

    def _update_gauges(self) -> None:
        self._m_sessions.set(self.state.used)
        self._m_allocated.set(self.state.allocated_bytes)
        self._m_used.set(self.state.used_bytes)

    # -- the Classify lane ---------------------------------------------------------------------

    async def classify(self, sequences: list[np.ndarray], with_steps: bool) -> list[StepResult]:
        """Whole sequences from zero states, on the Classify lane
        (service/engine/schedule/classify.py)."""
        return await self._classify.run(self.runtime, self.name, sequences, with_steps,
                                        self.version)  # fmt: skip


class WorkerFactory:
    """Builds ModelWorkers from model files: the settings every version shares."""

    def __init__(self, options: RuntimeOptions, policy: BatchPolicy, lanes: ComputeLanes,
                 classify: ClassifyLane, initial_capacity: int, max_sessions: int,
                 metrics: EngineMetrics = NO_METRICS) -> None:  # fmt: skip
        self.options = options
        self.policy = policy
        self.lanes = lanes
        self.classify = classify
        self.initial_capacity = initial_capacity
        self.max_sessions = max_sessions
        self.metrics = metrics

    def _configs(self) -> ConfigReader:
        if self.options.model_configs is None:
            raise ConfigError("a model with a config.pbtxt needs a config reader (this engine "
                              "was built without one: RuntimeOptions.model_configs)")  # fmt: skip
        return self.options.model_configs

    def load(self, path: Path) -> ModelWorker:
        """Load, check and warm `NAME/VERSION/model.onnx` (blocking: call off the loop).

        The folders name the model; a description that says otherwise is only a warning.
        """
        name, version = path.parent.parent.name, int(path.parent.name)
        started = time.perf_counter()
        opts = self.options
        triton = None
        if (path.parent.parent / CONFIG_FILE).is_file():
            triton = self._configs().load(path.parent.parent)
        try:
            runtime: ModelRuntime
            if triton is None:
                runtime = ModelRuntime(path, opts.providers, opts.intra_op_threads,
                                       opts.inter_op_threads)  # fmt: skip
            else:
                providers = triton_providers(triton, opts.providers)
                runtime = GenericRuntime(path, triton, providers, opts.intra_op_threads,
                                         opts.inter_op_threads)  # fmt: skip
            runtime.warm_up()
        except ConfigError:
            raise
        except Exception as exc:  # onnxruntime's own errors: a corrupt or unrunnable file
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"{path}: cannot load: {first_line[:300]}") from exc
        runtime.description = desc = with_tokenizer_file(runtime.description, path)
        if triton is not None:
            _log_inferred(desc)
        if (desc.name, desc.version) != (name, version):
            log.warning("model description names another model than its folder", extra={"fields": {
                "path": str(path), "folder": f"{name}/{version}",
                "description": f"{desc.name}/{desc.version}",
            }})  # fmt: skip
        state = HostStateSlab(desc.state_rows, desc.hidden_size, self.initial_capacity,
                              self.max_sessions)  # fmt: skip
        seconds = time.perf_counter() - started
        policy = triton_policy(triton, self.policy) if triton else self.policy
        return ModelWorker(name, version, runtime, path, seconds, state, policy, self.lanes,
                           self.classify, self.metrics)  # fmt: skip


def _log_inferred(desc: ModelDescription) -> None:
    """What a config.pbtxt model's outputs (and token ids) were taken to be, and why."""
    fields: dict[str, object] = {
        "model": desc.name, "version": desc.version, "output_kind": desc.output_kind,
        "rule": desc.output_kind_rule,
    }  # fmt: skip
    if desc.input_kind == "tokens":
        fields["vocab_size"] = desc.vocab_size
        fields["vocab_size_from"] = desc.architecture.get("vocab_size_from", "")
    log.info("model outputs read as %s", desc.output_kind, extra={"fields": fields})


def triton_providers(triton: TritonModel, server: tuple[str, ...]) -> tuple[str, ...]:
    """instance_group kind: KIND_CPU -> CPU, KIND_GPU -> CUDA (refused where there is none),
    KIND_AUTO (or none given) -> the server's --providers."""
    if triton.instance_kind == "KIND_CPU":
        return (CPU,)
    if triton.instance_kind == "KIND_GPU":
        if CUDA not in ort.get_available_providers():
            raise ConfigError(
                f"{triton.path}: instance_group kind KIND_GPU: the CUDA execution provider "
                "is not available here"
            )
        return (CUDA, CPU)
    return server


def triton_policy(triton: TritonModel, server: BatchPolicy) -> BatchPolicy:
    """sequence_batching's max_queue_delay_microseconds, oldest's preferred_batch_size and
    max_candidate_sequences, max_batch_size, and instance_group count (the batches of this
    model that run at once: one onnxruntime session serves them all), over the server's."""
    policy = server
    if triton.instances:
        policy = replace(policy, max_concurrent=triton.instances)
    if triton.queue_delay_s is not None:
        policy = replace(policy, max_queue_delay_s=triton.queue_delay_s)
    size = triton.batch_cap or policy.max_batch_size
    if triton.max_batch_size > 0:
        size = min(size, triton.max_batch_size)
    return replace(policy, max_batch_size=size)
