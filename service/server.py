"""create_server(config) -> (server, port): gRPC service, health, reflection, metrics, drain."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from lstmserve.v1 import lstm_serve_pb2 as pb
from service import metrics, native_front, native_supervisor
from service.config import (
    PROVIDER_ALIASES,
    ServerConfig,
    redacted_url,
    session_store_min_replicas,
    session_store_options,
)
from service.engine.compute.runtime import resolve_providers
from service.engine.continuity.continuity import SessionContinuity
from service.engine.continuity.redis_backend import RedisSessionBackend
from service.engine.core import Engine
from service.engine.session.quotas import PrincipalQuota
from service.engine.session.sessions import SessionStore
from service.engine.types import EngineMetrics, RuntimeOptions
from service.errors import ConfigError
from service.lenient import HEALTH, REFLECTION, add_health, add_reflection
from service.protocol.sequences import SequenceIds, Sequences
from service.protocol.session import Limits, SessionLayer
from service.security import http as security_http
from service.security.auth import Authenticator, AuthInterceptor, build_authenticator
from service.security.tls import CertificateFiles, certificate_files
from service.servicer import LstmServeServicer, add_to_server
from service.tracing import EXTRA_MISSING, NO_TRACING, Tracing
from service.triton import grpc_front as triton_grpc
from service.triton.core import TritonCore
from service.triton.http_front import HttpFront
from service.tritonconfig import TritonConfigReader

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LstmServe"].full_name
HEALTH_SERVICES = ("", SERVICE_NAME, triton_grpc.SERVICE.full_name)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
STOP_STEP_S = 2.0  # each step of the stop after the grace (gRPC: the rest of the grace + this)
NATIVE_STOP_S = native_supervisor.STOP_TIMEOUT_S + STOP_STEP_S  # the ticks server, the front


class Readiness:
    """grpc.health.v1 and lstm_serve_ready: liveness ("") SERVING while some model version is
    ready and the server is not draining; readiness (the named services, and the Open Inference
    Protocol's through `front_not_ready`) also needs the supervised native front up."""

    def __init__(
        self, engine: Engine, front: Callable[[], native_supervisor.NativeFrontProcess | None]
    ) -> None:
        self.engine = engine
        self.servicer = health.aio.HealthServicer()
        self._front = front  # the supervised native front, if any (--native-front)
        self._state: tuple[bool, bool] | None = None  # (live: "", ready: the services)

    async def refresh(self) -> None:
        """SERVING while some version is READY and the server is not draining; the named
        services (readiness) also need the supervised native front up, "" (liveness) not."""
        serving = bool(self.engine.registry.ready()) and not self.engine.draining
        await self.set(serving, serving and not self.front_not_ready())

    async def set(self, serving: bool, ready: bool | None = None) -> None:
        """Health "" (liveness) SERVING or not with `serving`, the named services (readiness)
        with `ready` (default: the same); lstm_serve_ready follows `ready`."""
        state = (serving, serving if ready is None else ready)
        if state == self._state:
            return
        self._state = state
        for service in HEALTH_SERVICES:
            up = state[0] if service == "" else state[1]
            await self.servicer.set(service, SERVING if up else NOT_SERVING)
        metrics.READY.set(1 if state[1] else 0)

    def front_not_ready(self) -> str:
        """Why the supervised native front keeps this server from being ready ("" if it does
        not): it owns the gRPC port, which nobody serves while it is down."""
        native = self._front()
        if native is None or native.up:
            return ""
        return "the native front (--native-front) is down: it is being started again"

    async def drain(self) -> None:
        """NOT_SERVING for good: every service, and lstm_serve_ready 0."""
        self._state = (False, False)
        metrics.READY.set(0)
        await self.servicer.enter_graceful_shutdown()


class LstmServer:
    """A running lstm-serve: gRPC server, engine, health, metrics endpoint, background tasks."""

    def __init__(
        self, config: ServerConfig, server: grpc.aio.Server, engine: Engine, layer: SessionLayer,
        tls: CertificateFiles | None = None, http_middlewares: tuple[Any, ...] = (),
    ) -> None:  # fmt: skip
        self.config = config
        self.grpc = server
        self.engine = engine
        self.layer = layer
        self.tls = tls  # the certificate files both ports serve (None: plaintext)
        # The Open Inference Protocol (KServe v2 + Triton's extensions): one core, two fronts.
        self.triton = TritonCore(Sequences(layer, SequenceIds(engine.continuity.keys)), config)
        self.http = (
            HttpFront(self.triton, middlewares=http_middlewares,
                      ssl_context=security_http.ssl_context(tls))
            if config.http_port >= 0 else None
        )  # fmt: skip
        self.readiness = Readiness(engine, lambda: self.native)
        self.health = self.readiness.servicer
        self.metrics_port: int | None = None
        self.http_port: int | None = None  # the Open Inference Protocol's HTTP/REST front
        # --health-port: grpc.health.v1 alone, in plaintext, for probes that cannot do TLS.
        self.health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        # The native front's ticks (--native-front-dir, a Unix socket only: native_front.py)
        # and the front's process on the gRPC port, run here with --native-front.
        self.ticks_server: native_front.TicksServer | None = None
        self.native: native_supervisor.NativeFrontProcess | None = None
        self._metrics_server: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._front_health: set[asyncio.Task[None]] = set()
        self._loaded = asyncio.Event()
        self._stopped = asyncio.Event()
        self.load_error: BaseException | None = None
        self.shutdown_stage = ""  # the stop's step in progress (drain_deadline.py reports it)
        self.triton.readiness_gates.append(self.readiness.front_not_ready)

    async def start(self) -> None:
        """Listen (health NOT_SERVING), then load and warm the models in the background."""
        await self.readiness.set(False)
        await self.grpc.start()
        if self.health_server is not None:
            await self.health_server.start()
        if self.http is not None:
            self.http_port = await self.http.start(self.config.host, self.config.http_port)
        if self.config.metrics_port >= 0:
            self._metrics_server, self.metrics_port = metrics.start_metrics_server(
                self.config.metrics_port, self.config.metrics_host or self.config.host
            )
        await _start_native(self)  # last: the front connects to the servers started above
        self._spawn(self._load_models(), "load-models")
        self._spawn(self.engine.store.run_evictor(self.config.eviction_interval_s), "evictor")

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(asyncio.create_task(work, name=name))

    async def _load_models(self) -> None:
        started = time.perf_counter()
        try:
            await self._check_session_store()
            await self.engine.load_models(strict=self.config.model_control == "none")
            for name in self.config.load_models if self.config.model_control == "explicit" else ():
                await self.engine.control.load(name)
            self._check_not_empty()
        except Exception as exc:
            self.load_error = exc
            event = "session store unreachable" if _is_store_error(exc) else "model loading failed"
            log.error(event, extra={"fields": {"error": str(exc)}})
            self._loaded.set()
            return
        self.engine.control.subscribe(self._on_models_changed)
        if self.config.model_control == "poll":
            self._spawn(self.engine.control.run_poll(self.config.repository_poll_s), "poll")
        log.info("ready", extra={"fields": {
            "models": len(self.engine.registry.all()),
            "seconds": round(time.perf_counter() - started, 4),
            "model_control": self.config.model_control,
        }})  # fmt: skip
        await self.readiness.refresh()
        self._loaded.set()

    def _check_not_empty(self) -> None:
        """With none / poll, a repository that yields no model fails the start."""
        if self.config.model_control == "explicit" or self.engine.registry.all():
            return
        failed = self.engine.registry.failures()
        detail = f": {failed[0].reason}" if failed else " (expected NAME/VERSION/model.onnx)"
        raise ConfigError(
            f"model repository {str(self.config.model_repository)!r} holds no loadable "
            f"model{detail}"
        )

    async def rescan(self) -> None:
        """SIGHUP: scan the repository once, in any mode."""
        if not self._loaded.is_set() or self.load_error is not None or self.engine.draining:
            return
        log.info("re-scanning the model repository (SIGHUP)")
        try:
            await self.engine.control.scan()
        except ConfigError as exc:
            log.error("repository scan failed", extra={"fields": {"error": str(exc)}})

    def _on_models_changed(self) -> None:
        self._spawn(self.readiness.refresh(), "health")

    def _on_front_up(self, up: bool) -> None:
        """The supervised front went down or listens again: readiness follows, once the models
        are loaded (before that, the load's end sets it)."""
        if self._loaded.is_set() and self.load_error is None and not self.engine.draining:
            task = asyncio.create_task(self.readiness.refresh(), name="health")
            self._front_health.add(task)  # held until done (not one more per restart)
            task.add_done_callback(self._front_health.discard)

    async def _check_session_store(self) -> None:
        """Not ready until the shared session store (if any) answers."""
        backend = self.engine.continuity.backend
        if backend is None:
            return
        try:
            await backend.ping()
        except Exception as exc:
            raise SessionStoreUnreachable(
                f"session store {redacted_url(self.config.session_store)!r} does not answer: {exc}"
            ) from exc

    async def wait_until_loaded(self, timeout_s: float | None = None) -> None:
        """Wait until loading finished; re-raises a loading failure."""
        await asyncio.wait_for(self._loaded.wait(), timeout_s)
        if self.load_error is not None:
            raise self.load_error

    async def shutdown(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING first, then refuse new work, then final snapshots, then stop. Each
        step after the grace is bounded (STOP_STEP_S) and one that fails does not stop the rest."""
        if self.shutdown_stage or self.engine.draining:  # a second signal: the first one stops
            await self._stopped.wait()
            return
        self.shutdown_stage = "draining"
        grace = self.config.drain_grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        log.info("draining", extra={"fields": {"inflight": self.engine.inflight, "grace_s": grace}})
        drained = False
        try:
            await self.readiness.drain()
            self.engine.draining = True
            self.engine.drain_started.set()
            self.layer.begin_drain()
            drained = await self.engine.wait_idle(grace)
            left = max(0.0, deadline - time.monotonic())
            await self._stop_step("grpc stop", self.grpc.stop(left), left + STOP_STEP_S)
            if self.health_server is not None:
                await self._stop_step("health port stop", self.health_server.stop(0))
            if self.ticks_server is not None:
                await self._stop_step("native front stop", _stop_native(self), NATIVE_STOP_S)
            if self.http is not None:  # aiohttp would wait 60 s for a request still being read
                await self._stop_step("http stop", self.http.stop())
            await self._stop_step("session store close", self.engine.continuity.close())
            await self._stop_step("trace export", asyncio.to_thread(self.layer.tracing.shutdown))
        finally:
            self.shutdown_stage = "closing"
            self._close()
            self._loaded.set()  # a load the drain cut short: nobody waits for it any more
            log.info("stopped", extra={"fields": {"drained": drained}})
            self.shutdown_stage = "stopped"
            self._stopped.set()

    async def _stop_step(self, stage: str, step: Awaitable[None], limit_s: float = 0.0) -> None:
        """One step of the stop, given at most `limit_s` (STOP_STEP_S if 0); one that overruns
        or fails is logged and left behind."""
        self.shutdown_stage = stage
        try:
            await asyncio.wait_for(step, limit_s or STOP_STEP_S)
        except Exception as exc:  # TimeoutError included
            log.warning("stop step abandoned", extra={"fields": {
                "stage": stage, "error": repr(exc)[:300],
            }})  # fmt: skip

    def _close(self) -> None:
        for task in self._tasks:
            task.cancel()
        try:
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
                self._metrics_server.server_close()
            self.triton.decode.close()
            self.engine.close()
        except Exception as exc:  # the stop goes on: nothing is left to serve
            log.warning("stop step abandoned", extra={"fields": {
                "stage": "closing", "error": repr(exc)[:300],
            }})  # fmt: skip

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()


async def _start_native(app: LstmServer) -> None:
    """The native front's ticks server, then (--native-front) the front itself."""
    if app.ticks_server is not None:
        await app.ticks_server.start()
    if app.native is not None:
        await app.native.start()


async def _stop_native(app: LstmServer) -> None:
    """After the drain: the ticks server, then the front that its final snapshots went
    through (--native-front)."""
    assert app.ticks_server is not None
    await app.ticks_server.stop(0)
    if app.native is not None:
        await app.native.stop()


class SessionStoreUnreachable(RuntimeError):
    """The shared session store did not answer at start-up."""


def _is_store_error(exc: BaseException) -> bool:
    return isinstance(exc, SessionStoreUnreachable)


def _continuity(config: ServerConfig, store: SessionStore,
                recorded: EngineMetrics) -> SessionContinuity:  # fmt: skip
    """Snapshots when a key is configured; write-through to Redis when the store says so."""
    backend = None
    if config.session_store != "memory":
        backend = RedisSessionBackend(
            config.session_store, config.session_idle_timeout_s, session_store_options(config),
            redacted_url(config.session_store), session_store_min_replicas(config),
            metrics=recorded,
        )  # fmt: skip
    return SessionContinuity(store, keys=config.snapshot_keys, backend=backend,
                             max_age_s=config.snapshot_max_age_s,
                             mode=config.session_store_mode, metrics=recorded)  # fmt: skip


def build_tracing(config: ServerConfig) -> Tracing:
    """NO_TRACING without --trace-otlp-endpoint; else the OpenTelemetry tracing (ConfigError,
    one line naming the extra, when it is not installed)."""
    if not config.trace_otlp_endpoint:
        return NO_TRACING
    try:
        from service import tracing_otel
    except ImportError as exc:
        if exc.name is None or not exc.name.startswith("opentelemetry"):
            raise
        raise ConfigError(EXTRA_MISSING) from None
    return tracing_otel.OtelTracing.start(config)


def build_engine(config: ServerConfig, tracing: Tracing = NO_TRACING) -> Engine:
    """The engine a configuration describes (models not loaded yet), recording into the
    process's Prometheus instruments and tracing with `tracing`."""
    recorded = metrics.engine_metrics()  # every engine piece gets these
    store = SessionStore(
        max_sessions=config.max_sessions,
        idle_timeout_s=config.session_idle_timeout_s,
        expired_memory=config.expired_ids_remembered,
        initial_capacity=config.initial_slab_capacity,
        quota=PrincipalQuota(config.max_sessions_per_principal, config.session_opens_per_s),
        metrics=recorded,
    )
    metrics.track_session_limits(store)  # the limits, for alerts on how near they are
    runtime = RuntimeOptions(
        providers=resolve_providers(config.providers, PROVIDER_ALIASES),
        intra_op_threads=config.intra_op_threads,
        inter_op_threads=config.inter_op_threads,
        model_configs=TritonConfigReader(),
    )
    return Engine(
        store, compute_threads=config.compute_threads, policy=config.batch_policy,
        continuity=_continuity(config, store, recorded), runtime=runtime,
        repository=config.model_repository, model_control=config.model_control,
        classify_policy=config.classify_policy, metrics=recorded, tracer=tracing,
    )  # fmt: skip


def create_server(config: ServerConfig) -> tuple[LstmServer, int]:
    """Build (not start) the server and bind its gRPC port; call inside a running event loop."""
    tracing = build_tracing(config)  # NO_TRACING unless --trace-otlp-endpoint
    engine = build_engine(config, tracing)
    limits = Limits(
        max_chunk_steps=config.max_chunk_steps, max_multi_entries=config.max_multi_entries,
        max_request_row_steps=config.max_request_row_steps,
        read_ahead_bytes=config.read_ahead_bytes,
        read_ahead_total_bytes=config.read_ahead_total_bytes,
    )  # fmt: skip
    layer = SessionLayer(engine, limits, tracing)
    # No SO_REUSEPORT: a second server on a busy port must fail, not share its connections.
    # A fixed receive window per stream (no BDP probing, which grows it to several MB): what an
    # unread stream's transport holds stays bounded (docs/OPERATIONS.md, "Memory").
    tls = certificate_files(config.tls_cert, config.tls_key, config.tls_client_ca)
    auth = build_authenticator(config.auth_tokens, config.principal_from_cert)
    server = grpc.aio.server(options=[
        ("grpc.so_reuseport", 0), ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", config.http2_stream_window_bytes),
    ], interceptors=[AuthInterceptor(auth)] if auth else None)  # fmt: skip
    middlewares = (security_http.auth_middleware(auth),) if auth else ()
    app = LstmServer(config, server, engine, layer, tls, middlewares)
    add_to_server(LstmServeServicer(layer, config), server)  # malformed bytes: INVALID_ARGUMENT
    triton_grpc.add_to_server(triton_grpc.TritonGrpcFront(app.triton), server)  # KServe v2
    add_health(app.health, server)  # health and reflection also parse leniently
    if config.reflection:
        add_reflection((*HEALTH_SERVICES[1:], HEALTH.full_name, REFLECTION.full_name), server)
    if config.native_front:  # the front owns the gRPC port; this server, the sockets only
        port = config.grpc_port  # the front's own once it started (app.native.port)
        _supervise_native_front(app, server, auth)
    else:
        port = _bind(server, config.host, config.grpc_port, "--grpc-port",
                     tls.grpc_credentials() if tls is not None else None)  # fmt: skip
    if config.native_front_dir and not config.native_front:
        _bind_native_front(app, server, auth, config.native_front_dir)
    if config.health_port >= 0:
        app.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        add_health(app.health, app.health_server)  # the same statuses as on the gRPC port
        app.health_port = _bind(app.health_server, config.host, config.health_port,
                                "--health-port")  # fmt: skip
    return app, port


def _bind_native_front(app: LstmServer, server: grpc.aio.Server, auth: Authenticator | None,
                       path: str) -> Path:  # fmt: skip
    """The native front's two sockets: every public RPC (plaintext: local), and its ticks."""
    folder = native_front.private_dir(path)
    address = f"unix:{folder / native_front.PUBLIC_SOCKET}"
    if server.add_insecure_port(address) == 0:
        raise ConfigError(f"cannot listen on {address} (--native-front-dir)")
    app.ticks_server = native_front.build_ticks_server(
        app.layer, app.config.session_idle_timeout_s, auth, folder
    )
    return folder


def _supervise_native_front(app: LstmServer, server: grpc.aio.Server,
                            auth: Authenticator | None) -> None:  # fmt: skip
    """--native-front: the sockets (in a private temporary directory without
    --native-front-dir) and the front process that LstmServer.start() runs on the gRPC port."""
    config = app.config
    binary = native_supervisor.find_binary(config.native_front_bin)
    path, temporary = native_supervisor.socket_dir(config.native_front_dir)
    try:
        folder = _bind_native_front(app, server, auth, path)
    except ConfigError:
        if temporary:
            native_supervisor.remove_socket_dir(path)
        raise
    app.native = native_supervisor.NativeFrontProcess(native_supervisor.FrontOptions(
        binary=binary, host=config.host, port=config.grpc_port, folder=folder,
        tls_cert=config.tls_cert, tls_key=config.tls_key, tls_client_ca=config.tls_client_ca,
        remove_folder=temporary,
    ), on_up=app._on_front_up)  # fmt: skip


def _bind(
    server: grpc.aio.Server, host: str, port: int, flag: str,
    credentials: grpc.ServerCredentials | None = None,
) -> int:  # fmt: skip
    """Add the listening port (TLS with `credentials`); a failed bind is a ConfigError."""
    address = f"{host}:{port}"
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpc raises on a failed bind
        bound = 0
    if bound == 0:
        raise ConfigError(
            f"cannot listen on {address} ({flag}): the address is in use or not available"
        )
    return bound
