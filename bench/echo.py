"""The transport ceiling and the protocol floor: two bare gRPC bidi servers with no model.

    python -m bench.echo --port 50123              # echo: bytes in, a reply of a requested size out
    python -m bench.echo --port 50123 --protocol   # floor: lstmserve.v1 Stream, protobuf, no engine

Echo: a stream's metadata `reply-size` sets the size of every reply, so the benchmark sends and
receives messages of exactly the sizes lstm-serve would, with no protobuf work on the server.
Floor: `/lstmserve.v1.LstmServe/Stream` parsed into `StreamRequest`s and answered with a
`StreamResponse` built anew per message (no session, no model), so the load generator drives it
exactly as it drives lstm-serve: the protocol work lstm-serve cannot avoid, and nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import grpc

from lstmserve.v1 import lstm_serve_pb2 as pb

METHOD = "/bench.Echo/Stream"
FLOOR_SESSION_ID = "f" * 32  # the floor's one fixed session id (lstm-serve's are 32 hex chars)
FLOOR_PROBABILITIES = (0.1, 0.2, 0.3, 0.4)  # 4 labels, like the bench model


async def _echo(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    size = int(dict(context.invocation_metadata()).get("reply-size", "16"))
    reply = b"\x00" * size
    async for _ in requests:
        yield reply


def floor_reply(request: pb.StreamRequest, total_steps: int) -> pb.StreamResponse:
    """The reply to one request, built anew (what lstm-serve would send, without computing it)."""
    kind = request.WhichOneof("kind")
    if kind == "chunk":
        chunk = request.chunk
        result = pb.ChunkResult(
            seq=chunk.seq, steps=len(chunk.input.tokens.ids), total_steps=total_steps,
            probabilities=FLOOR_PROBABILITIES,
            top=[pb.LabelScore(label="class3", index=3, probability=FLOOR_PROBABILITIES[3])],
        )  # fmt: skip
        return pb.StreamResponse(session_id=FLOOR_SESSION_ID, chunk=result)
    if kind == "open":
        opened = pb.SessionOpened(
            session_id=FLOOR_SESSION_ID, model=request.open.model, version=1,
            labels=[f"class{i}" for i in range(len(FLOOR_PROBABILITIES))],
        )  # fmt: skip
        return pb.StreamResponse(session_id=FLOOR_SESSION_ID, opened=opened)
    if kind == "reset":
        done = pb.ResetDone(seq=request.reset.seq)
        return pb.StreamResponse(session_id=FLOOR_SESSION_ID, reset=done)
    if kind == "end":
        ended = pb.SessionEnded(total_steps=total_steps)
        return pb.StreamResponse(session_id=FLOOR_SESSION_ID, ended=ended)
    raise ValueError(f"the protocol floor serves open, chunk, reset and end, not {kind!r}")


async def _floor(
    requests: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
) -> AsyncIterator[pb.StreamResponse]:
    total_steps = 0
    async for request in requests:
        if request.HasField("chunk"):
            total_steps += len(request.chunk.input.tokens.ids)
        try:
            reply = floor_reply(request, total_steps)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, str(exc))
        yield reply
        if request.HasField("end"):
            return  # like lstm-serve: `ended`, then the stream closes


def _handlers(protocol: bool) -> grpc.GenericRpcHandler:
    if protocol:
        floor = grpc.stream_stream_rpc_method_handler(
            _floor,
            request_deserializer=pb.StreamRequest.FromString,
            response_serializer=pb.StreamResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler("lstmserve.v1.LstmServe", {"Stream": floor})
    echo = grpc.stream_stream_rpc_method_handler(_echo)
    return grpc.method_handlers_generic_handler("bench.Echo", {"Stream": echo})


async def serve(host: str, port: int, protocol: bool = False) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handlers(protocol),))
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--protocol", action="store_true",
        help="serve lstmserve.v1 Stream with protobuf replies (the protocol floor), not echo",
    )  # fmt: skip
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.protocol))
