"""Module-level Prometheus metrics. Labels are low-cardinality: rpc, model, version, code, stage.

Never a session id. Requests naming an unknown model are counted under model="<unknown>".
"""

from __future__ import annotations

import bisect
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import numpy as np
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

from service.engine.session.quotas import PrincipalQuota
from service.engine.types import UNKNOWN_MODEL as UNKNOWN_MODEL  # defined once, engine side
from service.engine.types import Counts, EngineMetrics
from service.errors import ConfigError

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

# The front a request came through: the native lstmserve.v1 API, or the Open Inference
# Protocol (KServe v2, Triton's extensions) over gRPC or HTTP/REST.
PROTOCOL_NATIVE = "native"
PROTOCOL_KSERVE_GRPC = "kserve-grpc"
PROTOCOL_KSERVE_HTTP = "kserve-http"

REQUESTS_COUNTER = Counter(
    "lstm_serve_requests_total",
    "RPCs (and streamed chunks, rpc='Stream.chunk') by outcome status code, per front protocol "
    "(native, kserve-grpc, kserve-http).",
    ["rpc", "model", "code", "protocol"],
)


class _RequestCounter:
    """REQUESTS.labels(rpc, model, code[, protocol]): protocol defaults to the native API."""

    def labels(self, rpc: str, model: str, code: str, protocol: str = PROTOCOL_NATIVE) -> Counter:
        return REQUESTS_COUNTER.labels(rpc, model, code, protocol)


REQUESTS = _RequestCounter()


@lru_cache(maxsize=4096)
def requests(rpc: str, model: str, code: str, protocol: str = PROTOCOL_NATIVE) -> Counter:
    """REQUESTS.labels(...), cached: the per-chunk path counts every chunk."""
    return REQUESTS_COUNTER.labels(rpc, model, code, protocol)


@lru_cache(maxsize=4096)
def chunk_requests(rpc: str, model: str, code: str) -> Counter:
    """The counter of one RPC's streamed chunks (rpc="<rpc>.chunk"), named once, not per chunk."""
    return REQUESTS_COUNTER.labels(f"{rpc}.chunk", model, code, PROTOCOL_NATIVE)


FEW_VALUES = 16  # observe_many below this many values: bisect each, no numpy


class HistogramSeries:
    """One label set of a BulkHistogram: counts per bucket and the sum, under a lock."""

    __slots__ = ("_bounds", "_counts", "_lock", "_sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self._bounds, value)  # the first bound >= value (le semantics)
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def observe_many(self, values: Sequence[float] | np.ndarray) -> None:
        """Many values at once: one lock, and for many values one bucket search over an array
        (for a few, numpy's call overhead costs more than bisect)."""
        n = len(values)
        if n <= FEW_VALUES:
            bounds = self._bounds
            found = values.tolist() if isinstance(values, np.ndarray) else values
            with self._lock:
                for v in found:
                    self._counts[bisect.bisect_left(bounds, v)] += 1
                self._sum += sum(found)
            return
        array = np.asarray(values, dtype=np.float64)
        counts = np.bincount(np.searchsorted(self._bounds, array, side="left"),
                             minlength=len(self._bounds) + 1).tolist()  # fmt: skip
        total = float(array.sum())
        with self._lock:
            mine = self._counts
            for i, c in enumerate(counts):
                mine[i] += c
            self._sum += total

    def read(self) -> tuple[list[int], float]:
        """(cumulative counts per bound then +Inf, sum)."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for c in counts:
            running += c
            cumulative.append(running)
        return cumulative, total


class BulkHistogram:
    """A labelled Prometheus histogram that the per-chunk path feeds a batch at a time.

    Exposed exactly as prometheus_client's Histogram of the same name, labels and buckets
    (`_bucket{le=...}`, `_count`, `_sum`), through a collector: a batch of B chunks costs one
    bucket search over an array, not B observe() calls with a lock each.
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 buckets: Sequence[float],
                 registry: CollectorRegistry | None = REGISTRY) -> None:  # fmt: skip
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.bounds = tuple(float(b) for b in buckets)
        self._series: dict[tuple[str, ...], HistogramSeries] = {}
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> HistogramSeries:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        series = self._series.get(values)
        if series is None:
            with self._lock:
                series = self._series.setdefault(values, HistogramSeries(self.bounds))
        return series

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        with self._lock:
            series = list(self._series.items())
        for values, one in series:
            cumulative, total = one.read()
            family.add_metric(list(values), list(zip(les, cumulative, strict=True)), total)
        yield family


CHUNK_SECONDS = BulkHistogram(
    "lstm_serve_chunk_seconds",
    "Latency by stage: queue (per chunk or Classify request: waiting for its model run), "
    "compute (per model run), total (per chunk or request).",
    ["model", "stage"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
QUEUE_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
BATCH_SIZE = BulkHistogram(
    "lstm_serve_batch_size",
    "Streamed chunks (one per session) per batched model run.",
    ["model"],
    buckets=BATCH_SIZE_BUCKETS,
)
BATCH_QUEUE_SECONDS = BulkHistogram(
    "lstm_serve_batch_queue_seconds",
    "Per batch: seconds its oldest chunk waited between submission and the batch's start.",
    ["model"],
    buckets=QUEUE_BUCKETS,
)
BATCH_COMPUTE_SECONDS = BulkHistogram(
    "lstm_serve_batch_compute_seconds",
    "Per batch: seconds of gather, padding and the model run (on the worker thread).",
    ["model"],
    buckets=QUEUE_BUCKETS,
)
NATIVE_FRONT_LINKS = Gauge(
    "lstm_serve_native_front_links",
    "Native fronts (native/) connected to this server's ticks socket (--native-front-dir).",
)
NATIVE_TICK_MESSAGES = Histogram(
    "lstm_serve_native_front_tick_messages",
    "Per native-front tick: the client stream messages it carried (at most one per stream).",
    buckets=BATCH_SIZE_BUCKETS,
)
NATIVE_TICK_SECONDS = Histogram(
    "lstm_serve_native_front_tick_seconds",
    "Per native-front tick: seconds from its last byte read to its reply written.",
    buckets=QUEUE_BUCKETS,
)
NATIVE_TICK_PACKING = Counter(
    "lstm_serve_native_front_messages",
    "Client stream messages of native-front ticks, by how they travelled: packed as columns by "
    "input kind (packing = tokens, features, text) or as whole entries (entry).",
    ["packing"],
)
# Its children, made at import (at 0 from the start: rate() has data), looked up per tick.
NATIVE_PACKINGS = {
    p: NATIVE_TICK_PACKING.labels(p) for p in ("entry", "tokens", "features", "text")
}
STEPS = Counter(
    "lstm_serve_steps_total", "Sequence steps processed by the models.", ["model", "rpc"]
)
INFLIGHT_RUNS = Gauge(
    "lstm_serve_inflight_runs",
    "Work in progress: streamed chunks queued or running, and Classify runs.",
)
ACTIVE_SESSIONS = Gauge(
    "lstm_serve_active_sessions", "Streaming sessions held.", ["model", "version"]
)
SESSION_EVENTS = Counter(
    "lstm_serve_session_events_total",
    "Session lifecycle events: opened, resumed, restored (from a snapshot or the shared "
    "store), ended, expired, rejected.",
    ["model", "event"],
)
SNAPSHOTS = Counter(
    "lstm_serve_snapshots_total",
    "Session snapshots: taken (asked for), final (sent by a draining server), restored, refused.",
    ["model", "event"],
)
SESSION_STORE_OPS = Counter(
    "lstm_serve_session_store_operations_total",
    "Operations on the shared session store (redis): save, load, delete; by outcome.",
    ["op", "outcome"],
)
STORE_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SESSION_STORE_SECONDS = Histogram(
    "lstm_serve_session_store_seconds",
    "Latency of shared session store operations (save, load, end, ...), failures included.",
    ["op"],
    buckets=STORE_BUCKETS,
)
SESSION_STORE_UP = Gauge(
    "lstm_serve_session_store_up",
    "1 while the shared session store answers, 0 during an outage (strict: chunks refused); "
    "absent without a shared store.",
    registry=None,  # registered by the first set(): see ExportedOnceSet
)
STATE_BYTES = Gauge(
    "lstm_serve_state_memory_bytes",
    "Recurrent state memory: allocated (slab) and used (live sessions).",
    ["model", "version", "kind"],
)
MODEL_LOAD_SECONDS = Gauge(
    "lstm_serve_model_load_seconds", "Seconds to load and warm a model.", ["model", "version"]
)
MODEL_INFO = Gauge(
    "lstm_serve_model_info",
    "1 per loaded model version, labelled with the execution provider it runs on and whether "
    "some of its nodes fall back to the CPU.",
    ["model", "version", "provider", "cpu_fallback"],
)
MODEL_STATE = Gauge(
    "lstm_serve_model_state",
    "Per model version: 1 ready, 2 draining (removed; its sessions go on), 3 retired.",
    ["model", "version"],
)
MODEL_LOAD_FAILURES = Counter(
    "lstm_serve_model_load_failures_total",
    "Model versions that failed to load (the versions already served go on).",
    ["model"],
)
CALLER_REQUESTS = Counter(
    "lstm_serve_caller_requests_total",
    "Authenticated RPCs and HTTP requests by principal (from --auth-tokens, or a client "
    "certificate's CN, capped) and front protocol; health is not counted.",
    ["principal", "protocol"],
)
AUTH_FAILURES = Counter(
    "lstm_serve_auth_failures_total",
    "Requests refused as unauthenticated, by protocol and reason (missing, malformed, unknown, "
    "no_certificate, bad_certificate_name).",
    ["protocol", "reason"],
)
READY = Gauge(
    "lstm_serve_ready",
    "1 when ready: every model loaded and warmed, not draining and, with --native-front, the "
    "front up.",
)
MAX_SESSIONS = Gauge(
    "lstm_serve_max_sessions",
    "The sessions this replica may hold at once (--max-sessions).",
)
MAX_SESSIONS_PER_PRINCIPAL = Gauge(
    "lstm_serve_max_sessions_per_principal",
    "The sessions one principal may hold on this replica (--max-sessions-per-principal; 0 = "
    "no limit).",
)
TOP_PRINCIPAL_SESSIONS = Gauge(
    "lstm_serve_top_principal_sessions",
    "Sessions held on this replica by the principal that holds the most (which one: "
    "lstm_serve_caller_requests_total and the logs).",
)


class ExportedOnceSet:
    """A gauge scraped only once something sets it: lstm_serve_session_store_up is absent on
    a server without a shared store, not a 0 that an alert would read as an outage."""

    def __init__(self, gauge: Gauge, registry: CollectorRegistry = REGISTRY) -> None:
        self._gauge = gauge
        self._registry = registry
        self._registered = False
        self._lock = threading.Lock()

    def set(self, value: float, /) -> None:
        if not self._registered:
            with self._lock:
                if not self._registered:
                    self._registry.register(self._gauge)
                    self._registered = True
        self._gauge.set(value)


_STORE_UP = ExportedOnceSet(SESSION_STORE_UP)

# --native-front: the front process lstm-serve runs and supervises (service/native_supervisor.py).
NATIVE_FRONT_RESTARTS = Counter(
    "lstm_serve_native_front_restarts_total",
    "Times the supervised native front (--native-front) ended unasked and was started again.",
)
NATIVE_FRONT_UP_GAUGE = Gauge(
    "lstm_serve_native_front_up",
    "1 while the supervised native front (--native-front) serves the gRPC port, 0 while it is "
    "being restarted; absent without --native-front.",
    registry=None,  # registered by the first set(): see ExportedOnceSet
)
NATIVE_FRONT_UP = ExportedOnceSet(NATIVE_FRONT_UP_GAUGE)
# The supervised front's process, read from /proc/<pid>/ at each scrape (FrontProcessFigures):
# the front exports nothing itself. Defined here for their names and help; not registered.
NATIVE_FRONT_CPU = Counter(
    "lstm_serve_native_front_cpu_seconds",
    "User and system CPU seconds of the supervised native front's process (--native-front; "
    "starts again from 0 with each restart); absent while it is down and without --native-front.",
    registry=None,
)
NATIVE_FRONT_RESIDENT_MEMORY = Gauge(
    "lstm_serve_native_front_resident_memory_bytes",
    "Resident memory of the supervised native front's process (--native-front); absent while "
    "it is down and without --native-front.",
    registry=None,
)
NATIVE_FRONT_THREADS = Gauge(
    "lstm_serve_native_front_threads",
    "Threads of the supervised native front's process (--native-front); absent while it is "
    "down and without --native-front.",
    registry=None,
)
NATIVE_FRONT_OPEN_FDS = Gauge(
    "lstm_serve_native_front_open_fds",
    "Open file descriptors of the supervised native front's process (--native-front: client "
    "connections, its sockets to this server, its pipes); absent while it is down and without "
    "--native-front.",
    registry=None,
)
NATIVE_FRONT_STREAMS = Gauge(
    "lstm_serve_native_front_streams",
    "Client Stream and StreamMulti calls this server holds for native fronts (--native-front, "
    "or fronts started by hand on --native-front-dir): from a call's first message to its end.",
)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class ProcessId:
    """A process, told apart from a later one given the same pid by its start time (clock
    ticks after boot, /proc/<pid>/stat's 22nd field)."""

    pid: int
    start_ticks: int


@dataclass(frozen=True)
class ProcessFigures:
    cpu_seconds: float
    resident_bytes: int
    threads: int
    open_fds: int | None  # None: /proc/<pid>/fd not readable


def process_id(pid: int) -> ProcessId | None:
    """`pid` with its start time; None if it is gone."""
    stat = _stat(pid)
    return None if stat is None else ProcessId(pid, int(stat[19]))


def read_process(which: ProcessId) -> ProcessFigures | None:
    """The process's figures from /proc; None if it has ended (gone, a zombie, or its pid now
    another process's). Never raises for a process that dies meanwhile."""
    stat = _stat(which.pid)
    if stat is None or stat[0] == "Z" or int(stat[19]) != which.start_ticks:
        return None
    try:  # fields 14 and 15 (utime, stime), 20 (threads), 24 (rss, pages) of proc(5)
        cpu = (int(stat[11]) + int(stat[12])) / CLOCK_TICKS
        figures = ProcessFigures(cpu, int(stat[21]) * PAGE_BYTES, int(stat[17]), None)
    except (IndexError, ValueError):
        return None
    try:
        fds = len(os.listdir(f"/proc/{which.pid}/fd"))
    except OSError:
        return figures
    return ProcessFigures(figures.cpu_seconds, figures.resident_bytes, figures.threads, fds)


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name (the state first), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:  # gone (ENOENT, ESRCH), or no /proc
        return None
    fields = raw.rsplit(b")", 1)[-1].split()
    return [f.decode() for f in fields] if len(fields) > 21 else None


class FrontProcessFigures:
    """The supervised front's CPU, memory, threads and descriptors, read from /proc at each
    scrape (no thread polls them). Registered by the first track(): absent without
    --native-front; absent too while the tracked process is down."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self._registry = registry
        self._current: Callable[[], ProcessId | None] = lambda: None
        self._lock = threading.Lock()
        self._registered = False

    def track(self, current: Callable[[], ProcessId | None], /) -> None:
        """`current()` names the front's process while it runs (None while it is down); the
        last one tracked wins (one supervisor per process outside tests)."""
        self._current = current
        with self._lock:
            if not self._registered:
                self._registry.register(self)
                self._registered = True

    def describe(self) -> list[Metric]:
        return []  # nothing to check against other collectors' names at registration

    def collect(self) -> Iterator[Metric]:
        which = self._current()
        figures = read_process(which) if which is not None else None
        if figures is None:
            return
        yield CounterMetricFamily(
            NATIVE_FRONT_CPU._name, NATIVE_FRONT_CPU._documentation, figures.cpu_seconds
        )
        for gauge, value in ((NATIVE_FRONT_RESIDENT_MEMORY, figures.resident_bytes),
                             (NATIVE_FRONT_THREADS, figures.threads),
                             (NATIVE_FRONT_OPEN_FDS, figures.open_fds)):  # fmt: skip
            if value is not None:
                yield GaugeMetricFamily(gauge._name, gauge._documentation, value)


FRONT_PROCESS = FrontProcessFigures()


class HoldsStreams(Protocol):
    """What NativeStreamsHeld reads (service.native_front's TicksServer)."""

    def streams_held(self) -> int: ...


class NativeStreamsHeld:
    """lstm_serve_native_front_streams: the streams every live ticks server's links hold, read
    when scraped."""

    def __init__(self, gauge: Gauge) -> None:
        self._servers: weakref.WeakSet[HoldsStreams] = weakref.WeakSet()
        gauge.set_function(lambda: sum(s.streams_held() for s in list(self._servers)))

    def track(self, server: HoldsStreams, /) -> None:
        self._servers.add(server)


NATIVE_STREAMS_HELD = NativeStreamsHeld(NATIVE_FRONT_STREAMS)


class SessionLimits(Protocol):
    """What the limit gauges read from the session store (service.engine's SessionStore)."""

    max_sessions: int
    quota: PrincipalQuota


def track_session_limits(store: SessionLimits) -> None:
    """Export the store's limits and its fullest principal's sessions (read when scraped; the
    last store tracked wins, as there is one per process outside tests)."""
    MAX_SESSIONS.set(store.max_sessions)
    MAX_SESSIONS_PER_PRINCIPAL.set(store.quota.max_sessions)
    quota = weakref.ref(store.quota)
    TOP_PRINCIPAL_SESSIONS.set_function(lambda: _most_held(quota()))


def _most_held(quota: PrincipalQuota | None) -> float:
    """The most sessions one principal holds; 0 for none (or a store gone). Read from the
    scrape thread: PrincipalQuota has no public view of its counts, and list() copies them
    under the GIL in one step."""
    if quota is None:
        return 0.0
    return float(max(list(quota._held.values()), default=0))


class InflightRuns:
    """lstm_serve_inflight_runs: the sum of every live engine's InflightCounter, read when
    scraped, so the per-chunk path does no metric work for it."""

    def __init__(self, gauge: Gauge) -> None:
        self._counters: weakref.WeakSet[Counts] = weakref.WeakSet()
        gauge.set_function(lambda: sum(c.count for c in list(self._counters)))

    def track(self, counter: Counts, /) -> None:
        self._counters.add(counter)


_INFLIGHT = InflightRuns(INFLIGHT_RUNS)


def engine_metrics() -> EngineMetrics:
    """The instruments above that the engine records into (the composition root gives them to
    each engine piece it builds)."""
    return EngineMetrics(
        session_events=SESSION_EVENTS, snapshots=SNAPSHOTS, store_ops=SESSION_STORE_OPS,
        store_seconds=SESSION_STORE_SECONDS, store_up=_STORE_UP, state_bytes=STATE_BYTES,
        active_sessions=ACTIVE_SESSIONS, model_load_seconds=MODEL_LOAD_SECONDS,
        model_info=MODEL_INFO, model_state=MODEL_STATE, model_load_failures=MODEL_LOAD_FAILURES,
        steps=STEPS, chunk_seconds=CHUNK_SECONDS, batch_size=BATCH_SIZE,
        batch_queue_seconds=BATCH_QUEUE_SECONDS, batch_compute_seconds=BATCH_COMPUTE_SECONDS,
        inflight=_INFLIGHT,
    )  # fmt: skip


def start_metrics_server(port: int, host: str = "0.0.0.0") -> tuple[object, int]:
    """Serve /metrics on its own thread -> (server, bound port); port 0 = any. An address that
    cannot be bound is a ConfigError naming it and --metrics-port."""
    try:
        server, _thread = start_http_server(port, addr=host)
    except OSError as exc:  # busy port, unknown host, no permission
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        reason = exc.strerror or str(exc)
        raise ConfigError(f"cannot serve metrics on {address} (--metrics-port): {reason}") from exc
    return server, int(server.server_port)
