"""The LstmServe RPCs: validate, convert (codec), call the engine, convert back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import grpc

from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from service import codec, metrics
from service.config import ServerConfig
from service.engine.core import Engine
from service.engine.sessions import Session
from service.errors import InvalidInput, LstmServeError, ProtocolError
from service.status import status_code, status_message

log = logging.getLogger(__name__)

T = TypeVar("T")


class LstmServeServicer(pb_grpc.LstmServeServicer):
    """gRPC front of the engine. Every error leaves through `_fail` (service/status.py)."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config

    def _label(self, name: str) -> str:
        """The model metric label: the name if it is served, else a fixed placeholder."""
        registry = self.engine.registry
        return name if registry is not None and name in registry else metrics.UNKNOWN_MODEL

    async def _unary(
        self, rpc: str, model: str, context: grpc.aio.ServicerContext, work: Awaitable[T]
    ) -> T:
        try:
            reply = await work
        except Exception as exc:
            await self._fail(rpc, model, context, exc)
            raise  # not reached: abort raises
        metrics.REQUESTS.labels(rpc, self._label(model), "OK").inc()
        return reply

    async def _fail(
        self, rpc: str, model: str, context: grpc.aio.ServicerContext, exc: BaseException
    ) -> None:
        code = status_code(exc)
        metrics.REQUESTS.labels(rpc, self._label(model), code.name).inc()
        if not isinstance(exc, LstmServeError):
            log.exception("unexpected error in %s", rpc, exc_info=exc)
        await context.abort(code, status_message(exc))

    # -- unary -------------------------------------------------------------------------------

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return await self._unary("ListModels", "", context, self._list_models())

    async def _list_models(self) -> pb.ListModelsResponse:
        models = self.engine.models().all()
        return pb.ListModelsResponse(models=[codec.model_info(m) for m in models])

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        return await self._unary("GetModel", request.name, context, self._get_model(request))

    async def _get_model(self, request: pb.GetModelRequest) -> pb.ModelInfo:
        return codec.model_info(self.engine.models().get(request.name, request.version))

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        return await self._unary("Classify", request.model, context, self._classify(request))

    async def _classify(self, request: pb.ClassifyRequest) -> pb.ClassifyResponse:
        self.engine.check_accepting()
        model = self.engine.models().get(request.model, request.version)
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
        return pb.ClassifyResponse(
            model=desc.name,
            version=desc.version,
            results=[codec.encode_sequence_result(r, desc, request.top_k) for r in results],
        )

    # -- stream ------------------------------------------------------------------------------

    async def Stream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        session: Session | None = None
        model = ""
        try:
            async for request in request_iterator:
                if session is None:
                    session, reply = self._attach(request)
                    model = session.model.name
                    yield reply
                    continue
                reply = await self._handle(session, request)
                yield reply
                if reply.WhichOneof("kind") == "ended":
                    break
        except asyncio.CancelledError:
            metrics.REQUESTS.labels("Stream", self._label(model), "CANCELLED").inc()
            raise
        except Exception as exc:
            await self._fail("Stream", model, context, exc)
            return
        metrics.REQUESTS.labels("Stream", self._label(model), "OK").inc()

    def _attach(self, request: pb.StreamRequest) -> tuple[Session, pb.StreamResponse]:
        """Open or resume the stream's session from its first message."""
        kind = request.WhichOneof("kind")
        if kind == "open":
            opts = codec.decode_options(request.open.options)
            session = self.engine.open_session(request.open.model, request.open.version, opts)
            resumed = False
        elif kind == "resume":
            msg = request.resume
            opts = codec.decode_options(msg.options) if msg.HasField("options") else None
            session = self.engine.resume_session(msg.session_id, opts)
            resumed = True
        else:
            raise ProtocolError(f"the first Stream message must be open or resume, not {kind}")
        opened = codec.session_opened(session, resumed, self.config.session_idle_timeout_s)
        return session, pb.StreamResponse(session_id=session.id, opened=opened)

    async def _handle(self, session: Session, request: pb.StreamRequest) -> pb.StreamResponse:
        kind = request.WhichOneof("kind")
        if kind == "chunk":
            return pb.StreamResponse(
                session_id=session.id, chunk=await self._chunk(session, request.chunk)
            )
        if kind == "reset":
            duplicate = await self.engine.reset(session, request.reset.seq)
            done = pb.ResetDone(seq=request.reset.seq, duplicate=duplicate)
            return pb.StreamResponse(session_id=session.id, reset=done)
        if kind == "end":
            await self.engine.end(session)
            ended = pb.SessionEnded(
                total_steps=session.total_steps, last_applied_seq=session.last_seq
            )
            return pb.StreamResponse(session_id=session.id, ended=ended)
        raise ProtocolError(f"a Stream already attached to a session cannot take {kind}")

    async def _chunk(self, session: Session, chunk: pb.Chunk) -> pb.ChunkResult:
        """Apply one chunk; a bad chunk is answered in-band and leaves the session unchanged."""
        desc = session.model.description
        try:
            steps = codec.decode_input(
                chunk.input, desc, self.config.max_chunk_steps, "chunk.input"
            )
            outcome = await self.engine.apply_chunk(session, chunk.seq, steps)
        except InvalidInput as exc:
            metrics.REQUESTS.labels("Stream.chunk", desc.name, status_code(exc).name).inc()
            return codec.encode_chunk_error(chunk.seq, exc, session)
        metrics.REQUESTS.labels("Stream.chunk", desc.name, "OK").inc()
        return codec.encode_chunk_result(outcome, session)
