"""The stock gRPC services (health, reflection) with request parsing that never raises.

gRPC's own deserializers turn hostile bytes into UNKNOWN with an ERROR traceback per call;
registered here with `codec.lenient_parser`, a request that does not parse is answered
INVALID_ARGUMENT with one WARNING line and counted, as for LstmServe (service/servicer.py).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from service import codec, metrics

log = logging.getLogger(__name__)

HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]


async def _refuse(rpc: str, malformed: codec.Malformed, context: grpc.aio.ServicerContext) -> None:
    error = malformed.error()
    metrics.REQUESTS.labels(rpc, metrics.UNKNOWN_MODEL, error.code).inc()
    log.warning("malformed request", extra={"fields": {"rpc": rpc, "error": str(error)}})
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))


def _unary(rpc: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, codec.Malformed):
            await _refuse(rpc, request, context)
        return await behaviour(request, context)

    return handle


def _unary_stream(rpc: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, codec.Malformed):
            await _refuse(rpc, request, context)
        replies = behaviour(request, context)
        if not hasattr(replies, "__aiter__"):  # health.aio's Watch writes with context.write
            await replies
            return
        async for reply in replies:
            yield reply

    return handle


def _stream_stream(rpc: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
    async def handle(
        requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async def checked() -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, codec.Malformed):
                    await _refuse(rpc, request, context)
                yield request

        async for reply in behaviour(checked(), context):
            yield reply

    return handle


def add_health(servicer: health.aio.HealthServicer, server: grpc.aio.Server) -> None:
    """grpc.health.v1.Health (Check, Watch) on `server`."""
    parse = codec.lenient_parser(health_pb2.HealthCheckRequest)
    reply = health_pb2.HealthCheckResponse.SerializeToString
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            _unary("Health.Check", servicer.Check), parse, reply
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            _unary_stream("Health.Watch", servicer.Watch), parse, reply
        ),
    }
    _register(server, HEALTH.full_name, handlers)


def add_reflection(service_names: tuple[str, ...], server: grpc.aio.Server) -> None:
    """grpc.reflection.v1alpha.ServerReflection for `service_names` on `server`."""
    servicer = reflection.aio.ReflectionServicer(service_names)
    handler = grpc.stream_stream_rpc_method_handler(
        _stream_stream("ServerReflectionInfo", servicer.ServerReflectionInfo),
        codec.lenient_parser(reflection_pb2.ServerReflectionRequest),
        reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    _register(server, REFLECTION.full_name, {"ServerReflectionInfo": handler})


def _register(server: grpc.aio.Server, service: str, handlers: dict[str, Any]) -> None:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)
