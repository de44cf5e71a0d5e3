"""The server configuration: one frozen dataclass, built in main() from flags and LSTM_SERVE_*."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.errors import ConfigError

if TYPE_CHECKING:
    from service.engine.continuity.snapshots import SnapshotKeys
    from service.engine.continuity.store_urls import StoreOptions
    from service.engine.types import BatchPolicy, ClassifyPolicy

ENV_PREFIX = "LSTM_SERVE_"

# Short provider names accepted by --providers, and the onnxruntime names they stand for.
PROVIDER_ALIASES = {
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
MODEL_CONTROL_MODES = ("none", "poll", "explicit")
SECRET_FLAGS = frozenset({"snapshot_key", "session_store_password"})
STORE_MODES = ("strict", "best-effort")


def redacted_url(url: str) -> str:
    """A store URL safe to print: its password (if any) replaced by ***."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:" if parts.username else ":"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}***@{host}"))


def provider_name(name: str) -> str:
    """'cuda' -> 'CUDAExecutionProvider'; full onnxruntime names pass through."""
    return PROVIDER_ALIASES.get(name.strip().lower(), name.strip())


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs to start; validated on construction."""

    model_repository: Path = Path("models")
    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    providers: tuple[str, ...] = ()
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    compute_threads: int = 4
    batching: bool = True
    max_batch_size: int = 256
    max_queue_delay_us: int = 1000
    max_concurrent_batches: int = 1
    inline_max_steps: int = 4
    session_idle_timeout_s: float = 600.0
    max_sessions: int = 10_000
    max_chunk_steps: int = 4096
    max_classify_sequences: int = 256
    max_multi_entries: int = 4096
    max_sequence_steps: int = 16_384
    max_request_row_steps: int = 1_048_576
    max_batch_row_steps: int = 16_384
    classify_threads: int = 1
    classify_slice_row_steps: int = 16_384
    read_ahead_bytes: int = 4 << 20
    read_ahead_total_bytes: int = 256 << 20
    http2_stream_window_bytes: int = 1 << 20
    max_bytes_elements: int = 65_536
    http_max_body_bytes: int = 64 << 20
    http_max_inflate_ratio: int = 200
    http_body_timeout_s: float = 60.0
    http_idle_timeout_s: float = 15.0
    max_sessions_per_principal: int = 0
    session_opens_per_s: float = 0.0
    snapshot_max_age_s: float = 86_400.0
    expired_ids_remembered: int = 10_000
    initial_slab_capacity: int = 64
    drain_grace_s: float = 10.0
    model_control: str = "none"
    repository_poll_s: float = 15.0
    load_models: tuple[str, ...] = ()
    # Shared HMAC keys for portable session snapshots: "ID:BASE64[,ID:BASE64...]", the first
    # signs. Secret: never printed (repr=False, hidden in --help).
    snapshot_key: str = field(default="", repr=False)
    session_store: str = "memory"
    # How chunks wait for the store (strict: acknowledged only once stored), its deadline, and
    # its credentials (a password file or LSTM_SERVE_SESSION_STORE_PASSWORD; never printed).
    session_store_mode: str = "strict"
    session_store_timeout_s: float = 1.0
    session_store_min_replicas: int = -1  # -1: 1 with Sentinel in strict mode, else 0
    session_store_password_file: str = ""
    session_store_password: str = field(default="", repr=False)
    session_store_tls_ca: str = ""
    session_store_tls_cert: str = ""
    session_store_tls_key: str = ""
    # Who may call (service/security/): TLS files, bearer tokens, the surface exposed.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    auth_tokens: str = ""
    principal_from_cert: bool = False
    reflection: bool = True
    metrics_host: str = ""
    health_port: int = -1
    native_front_dir: str = ""
    native_front: bool = False
    native_front_bin: str = "lstm-serve-front"
    log_json: bool = False
    log_level: str = "INFO"
    # OpenTelemetry tracing (the `tracing` extra): off while no endpoint is set.
    trace_otlp_endpoint: str = ""
    trace_sample_ratio: float = 1.0
    trace_service_name: str = "lstm-serve"

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_repository", Path(self.model_repository))
        object.__setattr__(self, "providers", tuple(provider_name(p) for p in self.providers))
        object.__setattr__(self, "log_level", self.log_level.upper())
        self._check_ports()
        self._check_limits()
        check_security(self)
        check_tracing(self)
        if self.native_front and not self.native_front_bin.strip():
            raise ConfigError("--native-front-bin is empty: name the native front's binary")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level {self.log_level!r} is not one of {LOG_LEVELS}")

    def _check_ports(self) -> None:
        if not 0 <= self.grpc_port <= 65535:
            raise ConfigError(f"grpc_port {self.grpc_port} is not in 0..65535")
        if not -1 <= self.http_port <= 65535:
            raise ConfigError(f"http_port {self.http_port} is not in -1..65535 (-1 = off)")
        if not -1 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port {self.metrics_port} is not in -1..65535 (-1 = off)")
        if not -1 <= self.health_port <= 65535:
            raise ConfigError(f"health_port {self.health_port} is not in -1..65535 (-1 = off)")

    @property
    def auth_enabled(self) -> bool:
        """Whether callers must authenticate (bearer tokens and/or client certificates)."""
        return bool(self.auth_tokens) or self.principal_from_cert

    def _check_limits(self) -> None:
        positive = (
            "compute_threads",
            "max_batch_size",
            "max_concurrent_batches",
            "max_sessions",
            "max_chunk_steps",
            "max_classify_sequences",
            "max_multi_entries",
            "max_sequence_steps",
            "max_request_row_steps",
            "max_batch_row_steps",
            "classify_threads",
            "read_ahead_bytes",
            "read_ahead_total_bytes",
            "http2_stream_window_bytes",
            "max_bytes_elements",
            "http_max_body_bytes",
            "http_max_inflate_ratio",
            "expired_ids_remembered",
            "initial_slab_capacity",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_concurrent_batches > self.compute_threads:
            raise ConfigError(
                f"max_concurrent_batches {self.max_concurrent_batches} exceeds compute_threads "
                f"{self.compute_threads}"
            )
        zero_ok = ("intra_op_threads", "inter_op_threads",
                   "max_queue_delay_us", "inline_max_steps",
                   "classify_slice_row_steps", "max_sessions_per_principal",
                   "session_opens_per_s")  # fmt: skip
        for name in zero_ok:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.session_idle_timeout_s <= 0:
            raise ConfigError(
                f"session_idle_timeout_s must be > 0, got {self.session_idle_timeout_s}"
            )
        if self.model_control not in MODEL_CONTROL_MODES:
            raise ConfigError(
                f"model_control {self.model_control!r} is not one of {MODEL_CONTROL_MODES}"
            )
        if self.snapshot_max_age_s <= 0:
            raise ConfigError(f"snapshot_max_age_s must be > 0, got {self.snapshot_max_age_s}")
        if self.repository_poll_s <= 0:
            raise ConfigError(f"repository_poll_s must be > 0, got {self.repository_poll_s}")
        if self.drain_grace_s < 0:
            raise ConfigError(f"drain_grace_s must be >= 0, got {self.drain_grace_s}")
        check_session_store(self)
        check_http_timeouts(self)

    @property
    def snapshot_keys(self) -> SnapshotKeys | None:
        """The parsed snapshot keys, or None when snapshots are not configured."""
        from service.engine.continuity.snapshots import SnapshotKeys

        return SnapshotKeys.parse(self.snapshot_key) if self.snapshot_key else None

    @property
    def batch_policy(self) -> BatchPolicy:
        """The batcher's settings; batching off = batches of one, compute_threads at a time."""
        from service.engine.types import BatchPolicy

        if not self.batching:
            return BatchPolicy(max_batch_size=1, max_queue_delay_s=0.0,
                               max_concurrent=self.compute_threads)  # fmt: skip
        return BatchPolicy(
            max_batch_size=self.max_batch_size,
            max_queue_delay_s=self.max_queue_delay_us / 1e6,
            max_concurrent=self.max_concurrent_batches,
            inline_max_steps=self.inline_max_steps,
            max_batch_row_steps=self.max_batch_row_steps,
        )

    @property
    def classify_policy(self) -> ClassifyPolicy:
        """The Classify lane's settings."""
        from service.engine.types import ClassifyPolicy

        return ClassifyPolicy(
            threads=self.classify_threads,
            slice_row_steps=self.classify_slice_row_steps,
            max_request_row_steps=self.max_request_row_steps,
        )

    @property
    def eviction_interval_s(self) -> float:
        """How often idle sessions are swept: a quarter of the idle timeout, within [0.05, 10] s."""
        return max(0.05, min(self.session_idle_timeout_s / 4, 10.0))


def check_security(self: ServerConfig) -> None:
    """The TLS and caller flags agree."""
    if bool(self.tls_cert) != bool(self.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together: give both PEM files")
    if self.tls_client_ca and not self.tls_cert:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key (mTLS is TLS)")
    if self.principal_from_cert and not self.tls_client_ca:
        raise ConfigError(
            "--principal-from-cert needs --tls-client-ca: only a verified client "
            "certificate can name the caller"
        )


def check_tracing(self: ServerConfig) -> None:
    """The tracing flags: a ratio in [0, 1]; an endpoint URL with its scheme (plaintext or
    TLS is never guessed)."""
    ratio = self.trace_sample_ratio
    if not 0.0 <= ratio <= 1.0:  # NaN fails too
        raise ConfigError(f"--trace-sample-ratio {ratio} is not in [0, 1]")
    endpoint = self.trace_otlp_endpoint
    if endpoint and not endpoint.startswith(("http://", "https://")):
        raise ConfigError(
            f"--trace-otlp-endpoint {endpoint[:128]!r} needs its scheme: http://HOST:4317 "
            "(plaintext) or https://HOST:4317 (TLS)"
        )
    if endpoint and not self.trace_service_name.strip():
        raise ConfigError("--trace-service-name is empty: name the service in its traces")


def check_http_timeouts(self: ServerConfig) -> None:
    for name in ("http_body_timeout_s", "http_idle_timeout_s"):
        if getattr(self, name) <= 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")


def check_session_store(self: ServerConfig) -> None:
    """The store flags agree: a known URL form, a mode, TLS files with a TLS URL, a key."""
    if self.snapshot_key:
        self.snapshot_keys  # noqa: B018 - parses and validates the keys
    store = self.session_store
    if self.session_store_mode not in STORE_MODES:
        raise ConfigError(
            f"session_store_mode {self.session_store_mode!r} is not one of {STORE_MODES}"
        )
    if not 0 < self.session_store_timeout_s <= 60:
        raise ConfigError(
            f"session_store_timeout_s must be in (0, 60], got {self.session_store_timeout_s}"
        )
    if self.session_store_min_replicas < -1:
        raise ConfigError(
            f"session_store_min_replicas must be >= -1, got {self.session_store_min_replicas}"
        )
    if store == "memory":
        return
    from service.engine.continuity.store_urls import parse_store_url

    try:
        target = parse_store_url(store)
    except ValueError as exc:
        raise ConfigError(
            f"session_store {redacted_url(store)[:128]!r} is neither 'memory' nor a store "
            f"URL (redis://, rediss://, unix://, redis+sentinel://, redis+cluster://): {exc}"
        ) from None
    tls_files = (self.session_store_tls_ca, self.session_store_tls_cert)
    if any(tls_files) and not target.tls:
        raise ConfigError("--session-store-tls-* need a TLS store URL (rediss://...)")
    if bool(self.session_store_tls_cert) != bool(self.session_store_tls_key):
        raise ConfigError("--session-store-tls-cert and --session-store-tls-key go together")
    if not self.snapshot_key:
        raise ConfigError(
            "--session-store redis://... needs --snapshot-key (LSTM_SERVE_SNAPSHOT_KEY): "
            "replicas verify the session records they read with the shared key"
        )


def session_store_min_replicas(self: ServerConfig) -> int:
    """How many replicas each save waits for (the -1 default resolved)."""
    if self.session_store_min_replicas >= 0:
        return self.session_store_min_replicas
    sentinel = self.session_store.split("://")[0].endswith("+sentinel")
    return 1 if sentinel and self.session_store_mode == "strict" else 0


def session_store_options(self: ServerConfig) -> StoreOptions:
    """The store's deadline, password (the file's first line, else the variable / flag,
    else the URL's) and TLS files."""
    from service.engine.continuity.store_urls import StoreOptions

    password = self.session_store_password or None
    if self.session_store_password_file:
        try:
            text = Path(self.session_store_password_file).read_text()
        except OSError as exc:
            raise ConfigError(
                f"--session-store-password-file {self.session_store_password_file!r}: "
                f"{exc.strerror or exc}"
            ) from None
        password = text.splitlines()[0].strip() if text.strip() else None
    return StoreOptions(
        timeout_s=self.session_store_timeout_s, password=password,
        tls_ca=self.session_store_tls_ca, tls_cert=self.session_store_tls_cert,
        tls_key=self.session_store_tls_key,
    )  # fmt: skip


# flag name -> (help, type); the defaults come from ServerConfig, env overrides defaults.
FLAGS: dict[str, tuple[str, Any]] = {
    "model_repository": ("model repository: NAME/VERSION/model.onnx", Path),
    "host": ("address the gRPC server binds", str),
    "http_port": (
        "HTTP/REST port of the Open Inference Protocol (KServe v2, /v2/...); 0 picks a free "
        "port, -1 disables",
        int,
    ),
    "grpc_port": ("gRPC port; 0 picks a free port (logged)", int),
    "metrics_port": ("Prometheus /metrics HTTP port; 0 picks a free port, -1 disables", int),
    "providers": ("ordered execution providers, e.g. cuda,cpu (default: cuda if available)", str),
    "intra_op_threads": ("onnxruntime intra-op threads per model (0 = onnxruntime default)", int),
    "inter_op_threads": ("onnxruntime inter-op threads per model (0 = onnxruntime default)", int),
    "compute_threads": ("worker threads running onnxruntime calls", int),
    "batching": ("batch the chunks of many sessions into one model run (off = one per run)", bool),
    "max_batch_size": ("most chunks (one per session) in one batched model run", int),
    "max_queue_delay_us": (
        "while a batch of the model runs, a further batch starts once its oldest chunk has "
        "waited this many microseconds (or it is full); an idle model starts one at once",
        int,
    ),
    "inline_max_steps": (
        "an idle model runs a batch of at most this many (rows x steps) on the event loop "
        "thread, saving two thread hand-offs; 0 = never",
        int,
    ),
    "max_concurrent_batches": ("batched runs of one model version at once (<= threads)", int),
    "session_idle_timeout_s": ("seconds a session may stay untouched before it is freed", float),
    "max_sessions": ("most sessions held at once; more -> RESOURCE_EXHAUSTED", int),
    "max_chunk_steps": ("most steps in one streamed chunk", int),
    "max_classify_sequences": ("most sequences in one Classify request", int),
    "max_multi_entries": ("most entries (session messages) in one StreamMulti message", int),
    "max_sequence_steps": ("most steps in one Classify sequence", int),
    "max_request_row_steps": (
        "budget of one Classify request or StreamMulti message: most steps summed over its "
        "sequences or chunks; more -> RESOURCE_EXHAUSTED before any work (the default, ~10 s "
        "of one core for an LSTM 256, fits a 2 GiB pod)",
        int,
    ),
    "max_batch_row_steps": (
        "most rows x steps in one batched streaming run (bounds the run's memory)",
        int,
    ),
    "read_ahead_bytes": (
        "most request bytes one stream reads ahead of processing; beyond it the server stops "
        "reading and gRPC flow control holds the client back (one message always fits)",
        int,
    ),
    "read_ahead_total_bytes": (
        "most request bytes read ahead over all streams, and held by HTTP infer requests at "
        "once (more wait their turn)",
        int,
    ),
    "max_sessions_per_principal": (
        "most sessions one principal (caller) holds on this replica; more -> RESOURCE_EXHAUSTED "
        "for that principal only; 0 = only --max-sessions (without auth, every caller is one "
        "principal)",
        int,
    ),
    "session_opens_per_s": (
        "most session opens per second per principal (bursts of as many); 0 = no limit",
        float,
    ),
    "snapshot_max_age_s": (
        "a snapshot older than this is refused at restore (FAILED_PRECONDITION)",
        float,
    ),
    "http2_stream_window_bytes": (
        "HTTP/2 receive window of each gRPC stream, fixed (no BDP probing): what the transport "
        "takes in before the service reads it (2 unread streams of 4 MB messages: +49-66 MiB RSS "
        "at 1 MiB, +73-390 MiB with gRPC's growing window; docs/OPERATIONS.md); larger helps "
        "big messages over long round trips",
        int,
    ),
    "max_bytes_elements": (
        "most BYTES (string) elements in one KServe v2 / Triton infer request, all its inputs "
        "together, HTTP and gRPC; judged from the shapes before any element is read (more -> "
        "400 / INVALID_ARGUMENT)",
        int,
    ),
    "http_max_body_bytes": (
        "largest HTTP request body, counted after decompression (Triton's "
        "--http-max-input-size); a larger Content-Length is refused with 413 before reading",
        int,
    ),
    "http_max_inflate_ratio": (
        "a gzip / deflate HTTP body may inflate to at most this many times its compressed "
        "bytes (plus 1 MiB); more -> 413 as soon as it does",
        int,
    ),
    "http_body_timeout_s": (
        "seconds an HTTP request body may take to arrive after its headers; later -> 408 and "
        "the partial body is dropped",
        float,
    ),
    "http_idle_timeout_s": (
        "seconds an HTTP connection may go without a complete request's headers (from its "
        "opening or its last reply) before it is closed: idle keep-alive connections and "
        "headers sent byte by byte alike",
        float,
    ),
    "classify_threads": ("threads of the Classify lane (streaming never waits behind it)", int),
    "classify_slice_row_steps": (
        "Classify runs in time slices of at most this many rows x steps (bounded memory; a "
        "cancelled or expired call stops after the slice in progress); 0 = one run",
        int,
    ),
    "expired_ids_remembered": ("how many expired session ids are remembered (for NOT_FOUND)", int),
    "initial_slab_capacity": ("state slab rows allocated per model version at first use", int),
    "drain_grace_s": ("seconds SIGTERM waits for in-flight work before stopping", float),
    "model_control": (
        "none: load the repository once at start (any failure fails the start); poll: also "
        "re-scan it every --repository-poll-s (new versions load, removed ones drain, failures "
        "are reported and never take served versions down); explicit: load only what "
        "--load-models names and the LoadModel / UnloadModel RPCs ask for. SIGHUP re-scans",
        str,
    ),
    "repository_poll_s": ("seconds between repository scans with --model-control poll", float),
    "load_models": ("with --model-control explicit: models to load at start (comma list)", str),
    "snapshot_key": (
        "shared HMAC keys for session snapshots, ID:BASE64[,ID:BASE64...] (the first signs, all "
        "verify); needed for snapshots and the redis session store; never printed",
        str,
    ),
    "session_store": (
        "where session state lives: 'memory' (this process), or a Redis written through on "
        "every chunk, so any replica can resume any session by id: redis://HOST:PORT/DB, "
        "rediss:// (TLS), unix:///PATH, redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER[/DB] "
        "(follows failovers), redis+cluster://HOST:PORT[,HOST:PORT...] (docs/OPERATIONS.md)",
        str,
    ),
    "session_store_mode": (
        "strict (the default: a chunk is acknowledged only once its state is in the store; if "
        "the store does not answer within --session-store-timeout-s the chunk is refused "
        "in-band UNAVAILABLE, unchanged, and the client retries, so a pod kill never loses an "
        "acknowledged chunk) or best-effort (a failed save is logged and the chunk still "
        "acknowledged: a pod killed during a store outage loses its sessions' chunks since "
        "their last stored one)",
        str,
    ),
    "session_store_timeout_s": (
        "deadline of one session store operation (connect, retries and reply); also the "
        "longest a chunk waits for its save",
        float,
    ),
    "session_store_min_replicas": (
        "a save counts once this many Redis replicas have it too (WAIT), so a master failover "
        "cannot lose an acknowledged chunk; -1 = 1 with redis+sentinel:// in strict mode, else "
        "0 (not with redis+cluster://)",
        int,
    ),
    "session_store_password_file": (
        "file whose first line is the session store's password (a Kubernetes Secret); beats "
        "LSTM_SERVE_SESSION_STORE_PASSWORD and a password in the URL; never printed",
        str,
    ),
    "session_store_password": (
        "the session store's password (prefer the file or the variable); never printed",
        str,
    ),
    "session_store_tls_ca": ("PEM CA file verifying a rediss:// store's certificate", str),
    "session_store_tls_cert": ("PEM client certificate for a rediss:// store (mTLS)", str),
    "session_store_tls_key": ("PEM key of --session-store-tls-cert", str),
    "tls_cert": (
        "PEM certificate chain: serve TLS on the gRPC and HTTP ports (re-read when the file "
        "changes; new connections get the new certificate)",
        str,
    ),
    "tls_key": ("PEM private key of --tls-cert (unencrypted; re-read when it changes)", str),
    "tls_client_ca": (
        "PEM CA certificates: require client certificates signed by them (mTLS)",
        str,
    ),
    "auth_tokens": (
        "file of 'principal:token' lines: every call but health needs 'authorization: Bearer "
        "TOKEN' (re-read when it changes; the tokens are never logged)",
        str,
    ),
    "principal_from_cert": (
        "with --tls-client-ca: a call without a bearer token is the principal named by its "
        "verified client certificate's subject CN",
        bool,
    ),
    "reflection": ("serve gRPC server reflection (off in the Kubernetes manifests)", bool),
    "metrics_host": ("address the /metrics endpoint binds (default: --host)", str),
    "health_port": (
        "a plaintext port serving only gRPC health (grpc.health.v1, no token), for Kubernetes "
        "probes when the gRPC port needs TLS or client certificates; -1 = off",
        int,
    ),
    "trace_otlp_endpoint": (
        "send OpenTelemetry traces to this OTLP/gRPC endpoint, http://HOST:4317 (plaintext) or "
        "https://HOST:4317 (TLS); empty = tracing off. Needs the tracing extra: pip install "
        "'lstm-serve[tracing]' (docs/OPERATIONS.md, \"Tracing\")",
        str,
    ),
    "trace_sample_ratio": (
        "share of requests traced when the caller sends no sampled traceparent (0..1); a "
        "caller's traceparent decides for its own requests (parent-based)",
        float,
    ),
    "trace_service_name": ("service.name of the traces (OTEL_RESOURCE_ATTRIBUTES adds more)", str),
    "native_front_dir": (
        "also serve on Unix sockets in this directory (made private) for the native front "
        "(native/, `make native`), which then owns the public gRPC port; empty = off (with "
        "--native-front: a private temporary directory)",
        str,
    ),
    "native_front": (
        "run the native front (native/, C++) on the gRPC port (--host, --grpc-port, the same "
        "TLS files) and supervise it (restarted if it dies, stopped after the drain); this "
        "server then serves gRPC on the Unix sockets of --native-front-dir only "
        "(docs/NATIVE_FRONT.md)",
        bool,
    ),
    "native_front_bin": (
        "the native front's binary for --native-front: a path, or a name looked up on PATH "
        "(the default, then the checkout's native/build/lstm-serve-front)",
        str,
    ),
    "log_json": ("log one JSON object per line", bool),
    "log_level": ("DEBUG, INFO, WARNING or ERROR", str),
}


def _env_value(environ: Mapping[str, str], name: str) -> str | None:
    return environ.get(ENV_PREFIX + name.upper())


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The lstm-serve argument parser; LSTM_SERVE_<FLAG> environment variables set defaults."""
    environ = os.environ if environ is None else environ
    defaults = {f.name: f.default for f in fields(ServerConfig)}
    parser = argparse.ArgumentParser(
        prog="lstm-serve",
        description="Serve recurrent sequence classifiers (ONNX) over gRPC.",
        epilog=f"Every flag can also be set as {ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}GRPC_PORT).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for name, (help_text, kind) in FLAGS.items():
        flag = "--" + name.replace("_", "-")
        env = _env_value(environ, name)
        default = defaults[name]
        if name in ("providers", "load_models"):
            default = ",".join(default)
        if kind is bool:
            truthy = default if env is None else env.strip().lower() in ("1", "true", "yes", "on")
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=truthy,
                                help=f"{help_text} [{ENV_PREFIX}{name.upper()}]")  # fmt: skip
            continue
        if name in SECRET_FLAGS:  # no default shown: it would print the secret
            parser.add_argument(flag, type=str, default=argparse.SUPPRESS,
                                help=f"{help_text} [{ENV_PREFIX}{name.upper()}]")  # fmt: skip
            continue
        parser.add_argument(flag, type=str, default=env if env is not None else str(default),
                            help=f"{help_text} [{ENV_PREFIX}{name.upper()}]")  # fmt: skip
    return parser


def config_from_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ServerConfig:
    """Parse flags (and LSTM_SERVE_* defaults) into a validated ServerConfig."""
    environ = os.environ if environ is None else environ
    args = build_parser(environ).parse_args(argv)
    values: dict[str, Any] = {}
    for name, (_help, kind) in FLAGS.items():
        raw = getattr(args, name, None)
        if raw is None:  # a secret flag not given: its variable, else the default
            raw = _env_value(environ, name) or ""
        try:
            if name in ("providers", "load_models"):
                values[name] = tuple(p.strip() for p in raw.split(",") if p.strip())
            elif kind is bool:
                values[name] = bool(raw)
            else:
                values[name] = kind(raw)
        except ValueError as exc:
            raise ConfigError(f"--{name.replace('_', '-')} {raw!r}: {exc}") from exc
    return ServerConfig(**values)
