"""An OTLP/gRPC trace sink in its own process, for measuring what tracing costs the server: it
takes every export and counts the spans, so the server pays its whole export path (the SDK's
batch processor, protobuf encoding, the gRPC call) and the receiving end costs it nothing.

    python -m bench.otlp_sink          # prints {"port": N}; on SIGTERM {"spans": N}

Needs the `tracing` extra (opentelemetry-proto comes with its exporter).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from concurrent import futures
from types import TracebackType
from typing import Any


def serve() -> int:
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    counted = {"spans": 0}
    lock = threading.Lock()

    class Counter(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:
            spans = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
            with lock:
                counted["spans"] += spans
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Counter(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(json.dumps({"port": port}), flush=True)
    stop.wait()
    server.stop(1).wait()
    with lock:
        print(json.dumps(counted), flush=True)
    return 0


class Sink:
    """`python -m bench.otlp_sink` as a subprocess: `endpoint` while open, `spans` after."""

    def __init__(self) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "bench.otlp_sink"], stdout=subprocess.PIPE, text=True
        )
        assert self.popen.stdout is not None
        self.port = int(json.loads(self.popen.stdout.readline())["port"])
        self.spans = -1

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.popen.terminate()
        out, _ = self.popen.communicate(timeout=30)
        lines = out.strip().splitlines()
        self.spans = int(json.loads(lines[-1])["spans"]) if lines else -1


if __name__ == "__main__":
    sys.exit(serve())
