"""inference.GRPCInferenceService (KServe v2 gRPC, Triton's extensions) on our grpc.aio server.

A thin front of the Triton core (service/triton/core.py): messages are translated by
grpc_codec.py, errors leave as gRPC statuses (service/status.py). ModelStreamInfer takes many
interleaved sequences on one stream: requests run concurrently (those of one sequence in
order, so its replies come in order), and a request's error is answered in-band in
`error_message` while the stream stays open, as Triton does. Every method is registered with a
deserializer that never raises: malformed bytes are INVALID_ARGUMENT (in-band on the stream).
Shared memory, trace and log settings answer UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import MethodDescriptor
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service import codec, metrics
from service.errors import LstmServeError, MalformedRequest
from service.status import status_code, status_message
from service.tracing import NO_REQUEST_SPAN, TRITON_SERVICE, grpc_parent, grpc_span
from service.triton import grpc_codec
from service.triton.core import TritonCore
from service.triton.types import InferRequest, TritonError

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
PROTOCOL = metrics.PROTOCOL_KSERVE_GRPC
MAX_STREAM_INFLIGHT = 256  # requests of one ModelStreamInfer running at once (read-ahead bound)
UNSUPPORTED = {
    "SystemSharedMemoryStatus": "shared memory", "SystemSharedMemoryRegister": "shared memory",
    "SystemSharedMemoryUnregister": "shared memory", "CudaSharedMemoryStatus": "CUDA shared memory",
    "CudaSharedMemoryRegister": "CUDA shared memory",
    "CudaSharedMemoryUnregister": "CUDA shared memory",
    "TraceSetting": "trace settings", "LogSettings": "log settings",
}  # fmt: skip

T = TypeVar("T")
Context = grpc.aio.ServicerContext


class TritonGrpcFront(pb_grpc.GRPCInferenceServiceServicer):
    """The KServe v2 gRPC service over the Triton core."""

    def __init__(self, core: TritonCore) -> None:
        self.core = core
        self.tracing = core.tracing

    async def _unary(self, rpc: str, model: str, context: Context, work: Callable[[], T]) -> T:
        span = grpc_span(self.tracing, TRITON_SERVICE, rpc, context)
        try:
            with span.active():
                reply = work()
                if isinstance(reply, Awaitable):
                    reply = await reply
        except Exception as exc:
            span.fail(exc)
            await self._fail(rpc, model, context, exc)
            raise  # not reached: abort raises
        span.finish()
        metrics.requests(rpc, self.core.model_label(model), "OK", PROTOCOL).inc()
        return reply  # type: ignore[return-value]

    async def _fail(self, rpc: str, model: str, context: Context, exc: BaseException) -> None:
        code = _count_failure(self.core, rpc, model, exc)
        await context.abort(code, status_message(exc))

    # -- health and metadata -----------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> Any:
        def work() -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=self.core.live())

        return await self._unary("ServerLive", "", context, work)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> Any:
        def work() -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=self.core.ready())

        return await self._unary("ServerReady", "", context, work)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> Any:
        def work() -> pb.ServerMetadataResponse:
            meta = self.core.server_metadata()
            return pb.ServerMetadataResponse(
                name=meta.name, version=meta.version, extensions=list(meta.extensions)
            )

        return await self._unary("ServerMetadata", "", context, work)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> Any:
        ready = lambda: self.core.model_ready(request.name, request.version)  # noqa: E731
        return await self._unary("ModelReady", request.name, context,
                                 lambda: pb.ModelReadyResponse(ready=ready()))  # fmt: skip

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> Any:
        meta = lambda: self.core.model_metadata(request.name, request.version)  # noqa: E731
        return await self._unary("ModelMetadata", request.name, context,
                                 lambda: grpc_codec.model_metadata(meta()))  # fmt: skip

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> Any:
        config = lambda: self.core.model_config(request.name, request.version)  # noqa: E731
        return await self._unary("ModelConfig", request.name, context,
                                 lambda: pb.ModelConfigResponse(config=config()))  # fmt: skip

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> Any:
        stats = lambda: self.core.statistics(request.name, request.version)  # noqa: E731
        return await self._unary("ModelStatistics", request.name, context,
                                 lambda: grpc_codec.model_statistics(stats()))  # fmt: skip

    # -- the repository ----------------------------------------------------------------------

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> Any:
        def work() -> pb.RepositoryIndexResponse:
            reply = pb.RepositoryIndexResponse()
            for row in self.core.repository_index(request.ready):
                reply.models.add(name=row.name, version=row.version, state=row.state,
                                 reason=row.reason)  # fmt: skip
            return reply

        return await self._unary("RepositoryIndex", "", context, work)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> Any:
        async def work() -> pb.RepositoryModelLoadResponse:
            if len(request.parameters):
                raise TritonError(
                    "UNIMPLEMENTED",
                    "load parameters (a config override or model "
                    "files) are not supported: put the model in the repository",
                )
            await self.core.load(request.model_name)
            return pb.RepositoryModelLoadResponse()

        return await self._unary("RepositoryModelLoad", request.model_name, context, work)

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> Any:
        async def work() -> pb.RepositoryModelUnloadResponse:
            await self.core.unload(request.model_name)
            return pb.RepositoryModelUnloadResponse()

        return await self._unary("RepositoryModelUnload", request.model_name, context, work)

    # -- inference ---------------------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> Any:
        async def work() -> pb.ModelInferResponse:
            reply = await self.core.infer(await _decoded(self.core, request))
            with self.tracing.span("reply"):
                return grpc_codec.infer_response(reply)

        return await self._unary("ModelInfer", request.model_name, context, work)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        parent = grpc_parent(self.tracing, context)  # each request's span is its child
        stream = _InferStream(self, request_iterator, parent)
        try:
            async for reply in stream.replies():
                yield reply
        except LstmServeError as exc:  # the server drains: UNAVAILABLE, continue elsewhere
            await context.abort(status_code(exc), status_message(exc))


class _InferStream:
    """One ModelStreamInfer: requests run as they arrive, replies leave as they are done; read,
    bounded and drained by the session layer (service/protocol/concurrent.py)."""

    def __init__(self, front: TritonGrpcFront, requests: AsyncIterator[Any],
                 parent: object = None) -> None:  # fmt: skip
        self.core = core = front.core
        self.front = front
        self.parent = parent  # the call's trace context, when traced
        self.stream = core.stream(requests, _message_bytes, self._one, MAX_STREAM_INFLIGHT)

    def replies(self) -> AsyncIterator[pb.ModelStreamInferResponse]:
        return self.stream.replies()

    async def _one(self, msg: Any) -> pb.ModelStreamInferResponse:
        """One request, in its own span when traced (an in-band error ends it with its code)."""
        span = NO_REQUEST_SPAN
        if self.front.tracing.enabled:
            span = self.front.tracing.rpc(TRITON_SERVICE, "ModelStreamInfer", self.parent)
        model = msg.model_name if isinstance(msg, pb.ModelInferRequest) else ""
        try:
            if isinstance(msg, codec.Malformed):
                raise msg.error()
            with span.active():
                reply = await self.core.infer(await _decoded(self.core, msg))
                with self.front.tracing.span("reply"):
                    encoded = grpc_codec.infer_response(reply)
            result = pb.ModelStreamInferResponse(infer_response=encoded)
            metrics.requests("ModelStreamInfer", self.core.model_label(model), "OK",
                             PROTOCOL).inc()  # fmt: skip
        except asyncio.CancelledError as exc:
            span.fail(exc)
            raise
        except Exception as exc:
            span.fail(exc)
            _count_failure(self.core, "ModelStreamInfer", model, exc)
            result = pb.ModelStreamInferResponse(error_message=status_message(exc))
            if model:  # which request failed: its model and id, as Triton's clients read them
                result.infer_response.model_name = model
                result.infer_response.id = msg.id
            return result
        span.finish()
        return result


async def _decoded(core: TritonCore, msg: pb.ModelInferRequest) -> InferRequest:
    """The request's tensors decoded: on the loop when small, else on the decode pool."""
    limit = core.config.max_bytes_elements
    return await core.decode.run(msg.ByteSize(), grpc_codec.infer_request, msg, limit)


def _message_bytes(msg: Any) -> int:
    return msg.size if isinstance(msg, codec.Malformed) else msg.ByteSize()


def _count_failure(core: TritonCore, rpc: str, model: str, exc: BaseException) -> grpc.StatusCode:
    code = status_code(exc)
    metrics.requests(rpc, core.model_label(model), code.name, PROTOCOL).inc()
    if isinstance(exc, MalformedRequest):  # one line, no traceback: a client's problem
        log.warning("malformed request", extra={"fields": {"rpc": rpc, "error": str(exc)}})
    elif not isinstance(exc, LstmServeError):
        log.exception("unexpected error in %s", rpc, exc_info=exc)
    return code


# -- registration ------------------------------------------------------------------------------


def add_to_server(front: TritonGrpcFront, server: grpc.aio.Server) -> None:
    """Register inference.GRPCInferenceService on `server`, every method parsing leniently."""
    handlers = {method.name: _handler(front, method) for method in SERVICE.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name,
                                                                          handlers),))  # fmt: skip
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


def _handler(front: TritonGrpcFront, method: MethodDescriptor) -> grpc.RpcMethodHandler:
    parse = codec.lenient_parser(getattr(pb, method.input_type.name))
    serialize = getattr(pb, method.output_type.name).SerializeToString
    if method.client_streaming and method.server_streaming:
        return grpc.stream_stream_rpc_method_handler(
            front.ModelStreamInfer, request_deserializer=parse, response_serializer=serialize
        )
    if method.name in UNSUPPORTED:
        behaviour = _unsupported(front, method.name)
    else:
        behaviour = _guarded(front, method.name, getattr(front, method.name))
    return grpc.unary_unary_rpc_method_handler(
        behaviour, request_deserializer=parse, response_serializer=serialize
    )


def _guarded(front: TritonGrpcFront, rpc: str, behaviour: Callable[..., Any]) -> Any:
    async def handle(request: Any, context: Context) -> Any:
        if isinstance(request, codec.Malformed):
            await front._fail(rpc, "", context, request.error())
        return await behaviour(request, context)

    return handle


def _unsupported(front: TritonGrpcFront, rpc: str) -> Any:
    what = UNSUPPORTED[rpc]

    async def handle(request: Any, context: Context) -> Any:
        error = TritonError(
            "UNIMPLEMENTED",
            f"{rpc} is not supported by lstm-serve (no {what}: "
            "send tensors in the request; logs and metrics are on the server)",
        )
        await front._fail(rpc, "", context, error)

    return handle
