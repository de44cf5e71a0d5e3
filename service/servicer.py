"""The LstmServe gRPC front: protobuf <-> the session layer's messages (codec), nothing more.

Every error leaves through `_fail` (service/status.py). Stream and StreamMulti are driven by
the protocol-neutral conversations of service/protocol/. The handlers are registered here
(`add_to_server`) with deserializers that never raise: bytes that do not parse reach the
handler as a `codec.Malformed` and are answered INVALID_ARGUMENT like any other bad input.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import MethodDescriptor

from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from service import codec, metrics
from service.config import ServerConfig
from service.engine.core import Engine
from service.errors import (
    InvalidInput,
    LstmServeError,
    MalformedRequest,
    ModelNotFound,
    ProtocolError,
)
from service.protocol.columns import ColumnsConversation
from service.protocol.multi import MultiConversation
from service.protocol.session import SessionLayer
from service.protocol.stream import StreamConversation
from service.status import status_code, status_message
from service.tracing import LSTM_SERVE_SERVICE, grpc_parent, grpc_span

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["LstmServe"]

T = TypeVar("T")
A = TypeVar("A")
B = TypeVar("B")
Unary = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


async def _translated(
    requests: AsyncIterator[A | codec.Malformed], translate: Callable[[A], B]
) -> AsyncIterator[B]:
    """The stream's messages translated; a malformed one ends the stream (INVALID_ARGUMENT)."""
    async for request in requests:
        if isinstance(request, codec.Malformed):
            raise request.error()
        yield translate(request)


class LstmServeServicer(pb_grpc.LstmServeServicer):
    """gRPC front of the session layer and the engine."""

    def __init__(self, layer: SessionLayer, config: ServerConfig) -> None:
        self.layer = layer
        self.engine: Engine = layer.engine
        self.config = config

    def _label(self, name: str) -> str:
        """The model metric label: the name if it is served, else a fixed placeholder."""
        return name if name in self.engine.registry else metrics.UNKNOWN_MODEL

    async def _unary(
        self, rpc: str, model: str, context: grpc.aio.ServicerContext, work: Awaitable[T]
    ) -> T:
        span = grpc_span(self.layer.tracing, LSTM_SERVE_SERVICE, rpc, context)
        try:
            with span.active():
                reply = await work
        except Exception as exc:
            span.fail(exc)
            await self._fail(rpc, model, context, exc)
            raise  # not reached: abort raises
        span.finish()
        metrics.REQUESTS.labels(rpc, self._label(model), "OK").inc()
        return reply

    async def _fail(
        self, rpc: str, model: str, context: grpc.aio.ServicerContext, exc: BaseException
    ) -> None:
        code = status_code(exc)
        metrics.REQUESTS.labels(rpc, self._label(model), code.name).inc()
        if isinstance(exc, MalformedRequest):  # one line, no traceback: a client's problem
            log.warning("malformed request", extra={"fields": {"rpc": rpc, "error": str(exc)}})
        elif not isinstance(exc, LstmServeError):
            log.exception("unexpected error in %s", rpc, exc_info=exc)
        await context.abort(code, status_message(exc))

    def guarded(self, rpc: str, behaviour: Unary) -> Unary:
        """A unary method that answers a malformed request INVALID_ARGUMENT."""

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, codec.Malformed):
                await self._fail(rpc, "", context, request.error())
            return await behaviour(request, context)

        return handle

    # -- models ------------------------------------------------------------------------------

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return await self._unary("ListModels", "", context, self._list_models())

    async def _list_models(self) -> pb.ListModelsResponse:
        registry = self.engine.models()
        infos = [codec.model_info(w, registry.is_latest(w)) for w in registry.all()]
        infos += [codec.unavailable_info(s) for s in registry.failures()]
        infos.sort(key=lambda i: (i.name, i.version))
        return pb.ListModelsResponse(models=infos)

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        return await self._unary("GetModel", request.name, context, self._get_model(request))

    async def _get_model(self, request: pb.GetModelRequest) -> pb.ModelInfo:
        registry = self.engine.models()
        failed = registry.failure(request.name, request.version)
        if failed is not None and request.version:
            try:
                registry.find(request.name, request.version)
            except ModelNotFound:
                return codec.unavailable_info(failed)
        worker = registry.find(request.name, request.version)
        return codec.model_info(worker, registry.is_latest(worker))

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        return await self._unary("RepositoryIndex", "", context, self._index())

    async def _index(self) -> pb.RepositoryIndexResponse:
        rows = self.engine.control.index()
        return pb.RepositoryIndexResponse(models=[codec.repository_model(s) for s in rows])

    async def LoadModel(
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadModelResponse:
        return await self._unary("LoadModel", request.name, context, self._load(request.name))

    async def _load(self, name: str) -> pb.LoadModelResponse:
        _check_explicit(self.engine, "LoadModel")
        await self.engine.control.load(name)
        registry = self.engine.registry
        held = [w for w in registry.all() if w.name == name]
        return pb.LoadModelResponse(
            models=[codec.model_info(w, registry.is_latest(w)) for w in held]
        )

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadModelResponse:
        return await self._unary("UnloadModel", request.name, context, self._unload(request.name))

    async def _unload(self, name: str) -> pb.UnloadModelResponse:
        _check_explicit(self.engine, "UnloadModel")
        return pb.UnloadModelResponse(draining=await self.engine.control.unload(name))

    # -- classify ----------------------------------------------------------------------------

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        return await self._unary("Classify", request.model, context, self._classify(request))

    async def _classify(self, request: pb.ClassifyRequest) -> pb.ClassifyResponse:
        model = self.engine.classify_model(request.model, request.version)
        count, limit = len(request.sequences), self.config.max_classify_sequences
        if count == 0:
            raise InvalidInput("sequences is empty: send at least one sequence")
        if count > limit:
            raise InvalidInput(f"sequences has {count} entries, more than the maximum {limit}")
        desc = model.description
        arrays = [
            codec.decode_input(seq, desc, self.config.max_sequence_steps, f"sequences[{i}]")
            for i, seq in enumerate(request.sequences)
        ]
        results = await self.engine.classify(model, arrays, request.step_probabilities)
        with self.layer.tracing.span("reply"):
            encoded = [codec.encode_sequence_result(r, desc, request.top_k) for r in results]
            return pb.ClassifyResponse(model=model.name, version=model.version, results=encoded)

    # -- streams -----------------------------------------------------------------------------

    async def Stream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        requests = _translated(request_iterator, codec.stream_request)
        parent = grpc_parent(self.layer.tracing, context)  # each message's span is its child
        conversation = StreamConversation(self.layer, requests, "Stream", parent)
        idle = self.config.session_idle_timeout_s
        try:
            async with aclosing(conversation.replies()) as replies:
                async for reply in replies:
                    yield codec.stream_response(reply, idle)
        except asyncio.CancelledError:
            metrics.REQUESTS.labels("Stream", self._label(conversation.model), "CANCELLED").inc()
            raise
        except Exception as exc:
            await self._fail("Stream", conversation.model, context, exc)
            return
        metrics.REQUESTS.labels("Stream", self._label(conversation.model), "OK").inc()

    async def StreamMulti(
        self,
        request_iterator: AsyncIterator[pb.StreamMultiRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.StreamMultiResponse]:
        requests = _translated(request_iterator, _entries)
        parent = grpc_parent(self.layer.tracing, context)  # each message's span is its child
        conversation = MultiConversation(self.layer, requests, parent)
        idle = self.config.session_idle_timeout_s
        try:
            async with aclosing(conversation.replies()) as replies:
                async for reply in replies:
                    yield codec.multi_response(reply, idle)
        except asyncio.CancelledError:
            metrics.REQUESTS.labels("StreamMulti", metrics.UNKNOWN_MODEL, "CANCELLED").inc()
            raise
        except Exception as exc:
            await self._fail("StreamMulti", "", context, exc)
            return
        metrics.REQUESTS.labels("StreamMulti", metrics.UNKNOWN_MODEL, "OK").inc()

    async def StreamColumns(
        self, request_iterator: AsyncIterator[pb.ColumnsRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ColumnsResponse]:
        requests = _translated(request_iterator, codec.columns_request)
        parent = grpc_parent(self.layer.tracing, context)  # each message's span is its child
        conversation = ColumnsConversation(self.layer, requests, parent)
        try:
            async with aclosing(conversation.replies()) as replies:
                async for reply in replies:
                    yield codec.columns_response(reply)
        except asyncio.CancelledError:
            metrics.REQUESTS.labels("StreamColumns", metrics.UNKNOWN_MODEL, "CANCELLED").inc()
            raise
        except Exception as exc:
            await self._fail("StreamColumns", "", context, exc)
            return
        metrics.REQUESTS.labels("StreamColumns", metrics.UNKNOWN_MODEL, "OK").inc()


def _check_explicit(engine: Engine, rpc: str) -> None:
    mode = engine.control.mode
    if mode != "explicit":
        raise ProtocolError(
            f"{rpc} needs --model-control explicit (this server runs --model-control {mode})"
        )


def _entries(request: pb.StreamMultiRequest) -> list:
    return [codec.session_entry(e) for e in request.entries]


def add_to_server(servicer: LstmServeServicer, server: grpc.aio.Server) -> None:
    """Register LstmServe on `server`, every method with a deserializer that never raises."""
    handlers = method_handlers(servicer)
    generic = grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)
    server.add_generic_rpc_handlers((generic,))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


def method_handlers(servicer: LstmServeServicer) -> dict[str, grpc.RpcMethodHandler]:
    """One handler per method of the service descriptor, keyed by method name."""
    return {method.name: _handler(servicer, method) for method in SERVICE.methods}


def _handler(servicer: LstmServeServicer, method: MethodDescriptor) -> grpc.RpcMethodHandler:
    parse = codec.lenient_parser(getattr(pb, method.input_type.name))
    serialize = getattr(pb, method.output_type.name).SerializeToString
    behaviour = getattr(servicer, method.name)
    if method.client_streaming and method.server_streaming:
        return grpc.stream_stream_rpc_method_handler(
            behaviour, request_deserializer=parse, response_serializer=serialize
        )
    if not method.client_streaming and not method.server_streaming:
        return grpc.unary_unary_rpc_method_handler(
            servicer.guarded(method.name, behaviour),
            request_deserializer=parse,
            response_serializer=serialize,
        )
    raise TypeError(f"{method.full_name}: only unary and bidirectional methods are handled")
