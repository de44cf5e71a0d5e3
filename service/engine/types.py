"""What crosses the engine's edge: options, results, lifecycle states, the metrics it is given
(`EngineMetrics`) and the tracer (`EngineTracer`). No gRPC here, no Prometheus and no
OpenTelemetry: the composition root builds the real instruments (service/metrics.py
`engine_metrics()`) and, with --trace-otlp-endpoint, the real tracer (service/tracing_otel.py).

Results own their arrays (copies, never views into a batch's outputs), so a session that keeps
its last result keeps only its own rows alive.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np

from lstmserve.contract import KIND_LOG_PROBS, KIND_PROBS

if TYPE_CHECKING:
    from service.engine.byo.tritonconfig import ConfigReader
    from service.engine.session.sessions import Session
    from service.engine.text.textstream import HeldChange


MAX_SEQ = 2**63  # the largest sequence number (uint64 on the wire)
UNKNOWN_MODEL = "<unknown>"  # the model label of what names no served model


@dataclass(frozen=True)
class DecisionRule:
    """When a session's answer is decided early (opt-in, per session): at the first step where
    the top label's probability is at least `probability` and beats the second label's by at
    least `margin` (0: that condition is off), for `steps` consecutive steps with the same top
    label. `end_when_decided`: the session ends there (service/engine/session/decisions.py)."""

    probability: float = 0.0
    margin: float = 0.0
    steps: int = 1
    end_when_decided: bool = False

    def problem(self) -> str | None:
        """What makes the rule unusable (a sentence naming the field), or None."""
        for name in ("probability", "margin"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:  # NaN fails too
                return f"{name} = {value} is not in [0, 1]"
        if self.probability <= 0.0 and self.margin <= 0.0:
            return "set probability or margin (both are 0: the rule would hold at once)"
        if not 1 <= self.steps <= MAX_DECISION_STEPS:
            return f"steps = {self.steps} is not in [1, {MAX_DECISION_STEPS}]"
        return None


MAX_DECISION_STEPS = 1_000_000


@dataclass(frozen=True)
class StreamOptions:
    """Per-session reply options."""

    every_step: bool = False
    top_k: int = 1
    decide: DecisionRule | None = None  # an early decision rule, if the session has one
    # Whether a chunk's per-step probabilities are needed (replies or the rule): read per
    # chunk, so set once here.
    step_rows: bool = field(init=False, repr=False, compare=False, default=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "step_rows", self.every_step or self.decide is not None)


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a session's decision rule first held: the top label (index), its probability
    and the step (counted as total_steps counts)."""

    label: int
    probability: float
    step: int


def probabilities(values: np.ndarray, kind: str) -> np.ndarray:
    """A model's class outputs (..., C) of `kind` (lstmserve.contract OUTPUT_KINDS) as
    probabilities: the same array for probabilities, exp of log-probabilities, softmax of
    logits."""
    if kind == KIND_PROBS or not values.size:
        return values
    if kind == KIND_LOG_PROBS:
        return np.exp(values, dtype=np.float32)
    z = values - values.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32, copy=False)


@dataclass(slots=True)  # built per chunk: slots, not frozen (3x the cost)
class StepResult:
    """The outcome of one chunk (or one whole Classify sequence); owns its arrays.

    `values` are the model's class outputs as it computed them (what the Triton protocol
    returns), `kind` what they are; `probs` the probabilities (what the native protocol
    returns: the same array for a model whose outputs are probabilities)."""

    values: np.ndarray  # (C,) after the last step
    step_values: np.ndarray | None  # (T, C) after every step, if asked for
    steps: int  # T: steps beyond what the previous reply covered (and kept)
    total_steps: int  # steps since open / reset, after this chunk (what the reply covers)
    kind: str = KIND_PROBS
    # Steps of the previous reply taken back: streamed text whose held tail this chunk changed
    # (service/engine/text/textstream.py); the reply covers total_steps - steps + this of them.
    rewound_steps: int = 0
    decision: Decision | None = None  # the session's rule first held in this reply

    @property
    def probs(self) -> np.ndarray:
        """(C,) probabilities after the last step ((0,) before a session's first step)."""
        return probabilities(self.values, self.kind)

    @property
    def step_probs(self) -> np.ndarray | None:
        """(T, C) probabilities after every step, if asked for."""
        steps = self.step_values
        return None if steps is None else probabilities(steps, self.kind)


@dataclass(slots=True)  # built per chunk: slots, not frozen (3x the cost)
class ChunkOutcome:
    """A chunk applied (result set) or recognised as a resend (duplicate, not applied)."""

    seq: int
    result: StepResult | None
    duplicate: bool
    total_steps: int
    held_characters: int = 0  # streamed text held back after it (service/engine/text/textstream.py)
    ended: bool = False  # its decision ended the session (DecisionRule.end_when_decided)


@dataclass(slots=True)  # built per chunk: slots, not frozen (3x the cost)
class ChunkWork:
    """One validated chunk for one session (a multi-session message carries many)."""

    session: Session
    seq: int
    chunk: np.ndarray  # (T,) or (T, F): the steps it settles; (0,) when all of a text chunk is held
    held: HeldChange | None = None  # a text chunk's change to the held text (and its tail)
    attached: object | None = None  # the token of the stream sending it (Session.admit)


@dataclass(frozen=True)
class BatchPolicy:
    """How chunks are grouped into model runs."""

    max_batch_size: int = 256
    max_queue_delay_s: float = 0.002
    max_concurrent: int = 1  # batches of one model version running at once
    inline_max_steps: int = 0  # an idle model runs batches of <= this many B x Tmax steps inline
    max_batch_row_steps: int = 16_384  # most B x Tmax steps in one run (bounds its memory)


@dataclass(frozen=True)
class ClassifyPolicy:
    """The Classify lane: its own threads, work in slices, a budget per request."""

    threads: int = 1
    slice_row_steps: int = 16_384  # most B x T steps per model run (0 = the whole request)
    max_request_row_steps: int = 1_048_576  # most steps (summed over sequences) per request


@dataclass(frozen=True)
class RuntimeOptions:
    """How every model version's onnxruntime session is built."""

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    # How a model folder's config.pbtxt is read (service/tritonconfig.py, given by the
    # composition root); None: a model with a config.pbtxt cannot be loaded.
    model_configs: ConfigReader | None = None


class ModelState(StrEnum):
    """A model version's lifecycle: loading -> ready -> draining -> retired; or unavailable."""

    LOADING = "LOADING"
    READY = "READY"  # serves new sessions and Classify
    DRAINING = "DRAINING"  # removed: no new sessions, its sessions go on until they end
    RETIRED = "RETIRED"  # no sessions left; its memory is freed
    UNAVAILABLE = "UNAVAILABLE"  # failed to load (the reason is kept)


@dataclass(frozen=True)
class VersionStatus:
    """One version of the repository as model control sees it (ListModels, RepositoryIndex)."""

    name: str
    version: int
    state: ModelState
    reason: str = ""
    path: Path | None = None


# -- the metrics the engine records into ----------------------------------------------------

S_co = TypeVar("S_co", covariant=True)


class Counted(Protocol):
    """A counter (one label set): prometheus_client's Counter."""

    def inc(self, amount: float = 1, /) -> None: ...


class Gauged(Protocol):
    """A gauge (one label set): prometheus_client's Gauge."""

    def set(self, value: float, /) -> None: ...


class Observed(Protocol):
    """A histogram (one label set): prometheus_client's Histogram."""

    def observe(self, value: float, /) -> None: ...


class BulkObserved(Observed, Protocol):
    """A histogram fed a batch at a time (service/metrics.py BulkHistogram)."""

    def observe_many(self, values: Sequence[float] | np.ndarray, /) -> None: ...


class Labelled(Protocol[S_co]):
    """A labelled family: `.labels(*values)` names one series; bind it once, not per chunk."""

    def labels(self, *values: str) -> S_co: ...


class Counts(Protocol):
    """Work in progress that a gauge reads when scraped (schedule/batcher.py InflightCounter)."""

    @property
    def count(self) -> int: ...


class Tracker(Protocol):
    """Sums the `count` of every live counter it tracks (lstm_serve_inflight_runs)."""

    def track(self, counter: Counts, /) -> None: ...


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    """The instruments the engine records into, given to each piece at construction (labels in
    the comments). `NO_METRICS`: an engine that records nothing (tests, tools)."""

    session_events: Labelled[Counted]  # model, event
    snapshots: Labelled[Counted]  # model, event
    store_ops: Labelled[Counted]  # op, outcome
    store_seconds: Labelled[Observed]  # op
    store_up: Gauged
    state_bytes: Labelled[Gauged]  # model, version, kind
    active_sessions: Labelled[Gauged]  # model, version
    model_load_seconds: Labelled[Gauged]  # model, version
    model_info: Labelled[Gauged]  # model, version, provider, cpu_fallback
    model_state: Labelled[Gauged]  # model, version
    model_load_failures: Labelled[Counted]  # model
    steps: Labelled[Counted]  # model, rpc
    chunk_seconds: Labelled[BulkObserved]  # model, stage
    batch_size: Labelled[BulkObserved]  # model
    batch_queue_seconds: Labelled[Observed]  # model
    batch_compute_seconds: Labelled[Observed]  # model
    inflight: Tracker


class _Nothing:
    """Every instrument at once, recording nothing."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<no metric>"

    def labels(self, *values: str) -> _Nothing:
        return self

    def inc(self, amount: float = 1, /) -> None:
        pass

    def set(self, value: float, /) -> None:
        pass

    def observe(self, value: float, /) -> None:
        pass

    def observe_many(self, values: Sequence[float] | np.ndarray, /) -> None:
        pass

    def track(self, counter: Counts, /) -> None:
        pass


_NOTHING = _Nothing()
NO_METRICS = EngineMetrics(**{f.name: _NOTHING for f in fields(EngineMetrics)})


# -- the tracer the engine opens spans with ----------------------------------------------------

TraceAttributes = Mapping[str, str | int | float | bool]


class TraceSpan(Protocol):
    """A span the engine ends itself (a batch's: it starts and ends in two loop callbacks)."""

    def end(self, error: BaseException | None = None) -> None: ...


class EngineTracer(Protocol):
    """The spans the engine opens (docs/OPERATIONS.md, "Tracing"), given to each piece at
    construction like EngineMetrics. `NO_TRACER`: tracing off; the engine checks `enabled`
    (one attribute) before any tracing work on the per-chunk path.

    `current()` is the span of the request being served (the caller's task, on the loop
    thread) if it is sampled, else None: a chunk carries it into its batch explicitly
    (`Pending.trace`), never through a context variable across threads."""

    @property
    def enabled(self) -> bool: ...

    def current(self) -> object | None: ...

    def span(self, name: str, attributes: TraceAttributes | None = None,
             ) -> AbstractContextManager[object]: ...  # fmt: skip

    def batch(self, attributes: TraceAttributes, chunks: Sequence[tuple[object, float]],
              ) -> TraceSpan: ...  # fmt: skip


class NoTracer:
    """Tracing off: nothing is recorded and nothing is allocated per call."""

    __slots__ = ()
    enabled = False

    def __repr__(self) -> str:
        return "<no tracer>"

    def current(self) -> None:
        return None

    def span(self, name: str, attributes: TraceAttributes | None = None,
             ) -> AbstractContextManager[object]:  # fmt: skip
        return _NO_SPAN_CONTEXT

    def batch(self, attributes: TraceAttributes, chunks: Sequence[tuple[object, float]],
              ) -> TraceSpan:  # fmt: skip
        return _NO_SPAN

    def end(self, error: BaseException | None = None) -> None:
        pass


_NO_SPAN_CONTEXT: AbstractContextManager[object] = nullcontext()
NO_TRACER = NoTracer()
_NO_SPAN: TraceSpan = NO_TRACER
