"""Module-level Prometheus metrics. Labels are low-cardinality: rpc, model, version, code, stage.

Never a session id. Requests naming an unknown model are counted under model="<unknown>".
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

UNKNOWN_MODEL = "<unknown>"

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

REQUESTS = Counter(
    "lstm_serve_requests_total",
    "RPCs (and streamed chunks, rpc='Stream.chunk') by outcome status code.",
    ["rpc", "model", "code"],
)
CHUNK_SECONDS = Histogram(
    "lstm_serve_chunk_seconds",
    "Per-chunk latency by stage: queue (waiting for the session/worker), compute (model run), "
    "total.",
    ["model", "stage"],
    buckets=LATENCY_BUCKETS,
)
STEPS = Counter(
    "lstm_serve_steps_total", "Sequence steps processed by the models.", ["model", "rpc"]
)
INFLIGHT_RUNS = Gauge("lstm_serve_inflight_runs", "Model runs in progress (chunks and Classify).")
ACTIVE_SESSIONS = Gauge(
    "lstm_serve_active_sessions", "Streaming sessions held.", ["model", "version"]
)
SESSION_EVENTS = Counter(
    "lstm_serve_session_events_total",
    "Session lifecycle events: opened, resumed, ended, expired, rejected.",
    ["model", "event"],
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
READY = Gauge("lstm_serve_ready", "1 when every model is loaded and warmed and not draining.")


def start_metrics_server(port: int, host: str = "0.0.0.0") -> tuple[object, int]:
    """Serve /metrics over HTTP on its own thread; returns (server, bound port). Port 0 = any."""
    server, _thread = start_http_server(port, addr=host)
    return server, int(server.server_port)
