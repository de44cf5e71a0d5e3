"""The transport ceiling: a bare gRPC bidi echo server (bytes in, a reply of a requested size out).

    python -m bench.echo --port 50123

A stream's metadata `reply-size` sets the size of every reply, so the benchmark sends and receives
messages of exactly the sizes lstm-serve would, with no protobuf work and no model on the server.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import grpc

METHOD = "/bench.Echo/Stream"


async def _echo(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    size = int(dict(context.invocation_metadata()).get("reply-size", "16"))
    reply = b"\x00" * size
    async for _ in requests:
        yield reply


async def serve(host: str, port: int) -> None:
    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(_echo)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Echo", {"Stream": handler}),)
    )
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))
