"""The image's HEALTHCHECK (for ``docker run``; Kubernetes uses its native gRPC probes instead).

Asks ``grpc.health.v1.Health/Check`` for the whole server ("") over plaintext on
``GPT2_SERVE_HEALTH_PORT`` when that is set and non-zero (the plaintext health port the TLS setup
uses), else on ``GPT2_SERVE_PORT`` (default 50051). Exit status 0 only for SERVING.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    port = int(os.environ.get("GPT2_SERVE_HEALTH_PORT") or 0) or int(os.environ.get("GPT2_SERVE_PORT") or 50051)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
        except grpc.RpcError as exc:
            print(f"health check on port {port} failed: {exc.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    raise SystemExit(main())
