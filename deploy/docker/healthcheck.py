"""Docker HEALTHCHECK: exit 0 when lstm-serve answers grpc.health.v1 SERVING, else 1.

Kubernetes does not need this (it probes gRPC health natively); `docker run` and compose do.
The port comes from LSTM_SERVE_HEALTH_PORT (the plaintext health port, needed once the gRPC
port serves TLS) if set, else LSTM_SERVE_GRPC_PORT, like the server's own flags (default 8001).
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout_s: float = 2.0) -> bool:
    """True when the server at `address` reports `service` SERVING."""
    try:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.RpcError as exc:
        print(f"unhealthy: {exc.code().name}", file=sys.stderr)
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str]) -> int:
    health_port = os.environ.get("LSTM_SERVE_HEALTH_PORT", "-1")  # plaintext health (TLS on)
    default = health_port if health_port.strip() not in ("", "-1") else None
    port = argv[1] if len(argv) > 1 else default or os.environ.get("LSTM_SERVE_GRPC_PORT", "8001")
    return 0 if check(f"127.0.0.1:{port}") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
