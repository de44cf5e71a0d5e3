"""create_server(config) -> (server, port): gRPC service, health, reflection, metrics, drain."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from service import metrics
from service.config import ServerConfig
from service.errors import ConfigError
from service.engine.continuity import SessionContinuity
from service.engine.core import Engine
from service.engine.redis_backend import RedisSessionBackend
from service.engine.registry import ModelRegistry, RuntimeOptions
from service.engine.runtime import resolve_providers
from service.engine.sessions import SessionStore
from service.servicer import LstmServeServicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LstmServe"].full_name
HEALTH_SERVICES = ("", SERVICE_NAME)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class LstmServer:
    """A running lstm-serve: gRPC server, engine, health, metrics endpoint, background tasks."""

    def __init__(self, config: ServerConfig, server: grpc.aio.Server, engine: Engine) -> None:
        self.config = config
        self.grpc = server
        self.engine = engine
        self.health = health.aio.HealthServicer()
        self.metrics_port: int | None = None
        self._metrics_server: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loaded = asyncio.Event()
        self._stopped = asyncio.Event()
        self.load_error: BaseException | None = None
        self.servicer: LstmServeServicer | None = None

    async def start(self) -> None:
        """Listen (health NOT_SERVING), then load and warm every model in the background."""
        for service in HEALTH_SERVICES:
            await self.health.set(service, NOT_SERVING)
        metrics.READY.set(0)
        await self.grpc.start()
        if self.config.metrics_port >= 0:
            self._metrics_server, self.metrics_port = metrics.start_metrics_server(
                self.config.metrics_port, self.config.host
            )
        self._tasks.append(asyncio.create_task(self._load_models(), name="load-models"))
        interval = self.config.eviction_interval_s
        self._tasks.append(asyncio.create_task(self.engine.store.run_evictor(interval)))

    async def _load_models(self) -> None:
        try:
            options = RuntimeOptions(
                providers=resolve_providers(self.config.providers),
                intra_op_threads=self.config.intra_op_threads,
                inter_op_threads=self.config.inter_op_threads,
                debug_compute_delay_s=self.config.debug_compute_delay_ms / 1000,
            )
            started = time.perf_counter()
            await self._check_session_store()
            registry = await asyncio.to_thread(
                ModelRegistry.load, self.config.model_repository, options
            )
        except Exception as exc:
            self.load_error = exc
            event = "session store unreachable" if _is_store_error(exc) else "model loading failed"
            log.error(event, extra={"fields": {"error": str(exc)}})
            self._loaded.set()
            return
        self._record_models(registry, time.perf_counter() - started)
        self.engine.registry = registry
        if not self.engine.draining:
            for service in HEALTH_SERVICES:
                await self.health.set(service, SERVING)
            metrics.READY.set(1)
        self._loaded.set()

    async def _check_session_store(self) -> None:
        """Not ready until the shared session store (if any) answers."""
        backend = self.engine.continuity.backend
        if backend is None:
            return
        try:
            await backend.ping()
        except Exception as exc:
            raise SessionStoreUnreachable(
                f"session store {self.config.session_store!r} does not answer: {exc}"
            ) from exc

    def _record_models(self, registry: ModelRegistry, seconds: float) -> None:
        for model in registry.all():
            version = str(model.version)
            fallback = "true" if model.runtime.cpu_fallback else "false"
            metrics.MODEL_LOAD_SECONDS.labels(model.name, version).set(model.load_seconds)
            metrics.MODEL_INFO.labels(model.name, version, model.runtime.provider, fallback).set(1)
            log.info("model loaded", extra={"fields": {
                "model": model.name, "version": model.version, "provider": model.runtime.provider,
                "providers": list(model.runtime.providers),
                "cpu_fallback": list(model.runtime.cpu_fallback),
                "load_seconds": round(model.load_seconds, 4), "latest": model.latest,
            }})  # fmt: skip
        if not registry.all():
            log.warning("the model repository has no models", extra={"fields": {
                "model_repository": str(self.config.model_repository)}})  # fmt: skip
        log.info("ready", extra={"fields": {"models": len(registry.all()), "seconds": seconds}})

    async def wait_until_loaded(self, timeout_s: float | None = None) -> None:
        """Wait until loading finished; re-raises a loading failure."""
        await asyncio.wait_for(self._loaded.wait(), timeout_s)
        if self.load_error is not None:
            raise self.load_error

    async def shutdown(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new sessions, finish in-flight runs, stop within grace."""
        if self.engine.draining:
            await self._stopped.wait()
            return
        grace = self.config.drain_grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        log.info("draining", extra={"fields": {"inflight": self.engine.inflight, "grace_s": grace}})
        self.engine.draining = True
        metrics.READY.set(0)
        await self.health.enter_graceful_shutdown()
        self.engine.drain_started.set()
        if self.servicer is not None:
            self.servicer.begin_drain()
        drained = await self.engine.wait_idle(grace)
        await self.grpc.stop(max(0.0, deadline - time.monotonic()))
        await self.engine.continuity.close()
        self._close()
        log.info("stopped", extra={"fields": {"drained": drained}})
        self._stopped.set()

    def _close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        self.engine.close()

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()


class SessionStoreUnreachable(RuntimeError):
    """The shared session store did not answer at start-up."""


def _is_store_error(exc: BaseException) -> bool:
    return isinstance(exc, SessionStoreUnreachable)


def _continuity(config: ServerConfig, store: SessionStore) -> SessionContinuity:
    """Snapshots when a key is configured; write-through to Redis when the store says so."""
    backend = None
    if config.session_store != "memory":
        backend = RedisSessionBackend(config.session_store, config.session_idle_timeout_s)
    return SessionContinuity(store, keys=config.snapshot_keys, backend=backend)


def create_server(config: ServerConfig) -> tuple[LstmServer, int]:
    """Build (not start) the server and bind its gRPC port; call inside a running event loop."""
    store = SessionStore(
        max_sessions=config.max_sessions,
        idle_timeout_s=config.session_idle_timeout_s,
        expired_memory=config.expired_ids_remembered,
        initial_capacity=config.initial_slab_capacity,
    )
    engine = Engine(
        store,
        compute_threads=config.compute_threads,
        policy=config.batch_policy,
        continuity=_continuity(config, store),
    )
    # No SO_REUSEPORT: a second server on a busy port must fail, not share its connections.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    app = LstmServer(config, server, engine)
    app.servicer = LstmServeServicer(engine, config)
    pb_grpc.add_LstmServeServicer_to_server(app.servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(app.health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        server,
    )  # fmt: skip
    address = f"{config.host}:{config.grpc_port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:  # grpc raises on a failed bind
        port = 0
    if port == 0:
        raise ConfigError(
            f"cannot listen on {address} (--grpc-port): the address is in use or not available"
        )
    return app, port
