"""The gRPC server around one engine: TextGeneration, grpc.health.v1.Health and reflection.

Lifecycle: ``start()`` listens at once with health NOT_SERVING (so probes answer while the model
loads); ``attach(engine)`` after the engine's warm-up pass flips health to SERVING; ``drain()``
flips it back to NOT_SERVING, refuses new RPCs with UNAVAILABLE, lets running ones finish within
the grace period, then stops the server (cancelling whatever is left).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from gpt2_client.proto import generation_pb2, generation_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gpt2_service.api.gate import ServingGate
from gpt2_service.api.servicer import TextGenerationServicer
from gpt2_service.engine import Engine

log = logging.getLogger(__name__)

T = TypeVar("T")

TEXT_GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["TextGeneration"].full_name
OVERALL_HEALTH = ""


def _opt(default: T, help: str) -> T:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServerConfig:
    """The server's own settings (the engine's are in EngineConfig); flags are made from these."""

    host: str = _opt("0.0.0.0", "address to listen on ([::] for IPv6 too)")
    port: int = _opt(50051, "port to listen on (0 = pick a free one)")
    grace_period: float = _opt(30.0, "seconds running requests get to finish after SIGTERM/SIGINT")
    max_message_bytes: int = _opt(16 * 1024 * 1024, "largest gRPC message received or sent, in bytes")
    max_batch_requests: int = _opt(64, "most requests in one GenerateBatch call")
    reflection: bool = _opt(True, "serve gRPC server reflection (for grpcurl and other generic clients)")
    log_format: str = _opt("text", "log format: text or json (one JSON object per line)")
    log_level: str = _opt("info", "log level: debug, info, warning or error")


@dataclass(frozen=True)
class ExtraService:
    """Another service on the same server (e.g. Introspection): how to add it, and its name for
    health and reflection."""

    name: str
    add_to_server: Callable[[grpc.aio.Server], None]


class GenerationServer:
    def __init__(
        self,
        config: ServerConfig,
        interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
        extra_services: Sequence[ExtraService] = (),
    ) -> None:
        self.config = config
        self.gate = ServingGate()
        self.servicer = TextGenerationServicer(self.gate, config.max_batch_requests)
        self.health: Any = health.aio.HealthServicer()  # type: ignore[attr-defined]  # untyped in grpc-stubs
        self.services = [TEXT_GENERATION_SERVICE, *(s.name for s in extra_services)]
        options = [
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
        ]
        self.server = grpc.aio.server(interceptors=list(interceptors), options=options)
        generation_pb2_grpc.add_TextGenerationServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for service in extra_services:
            service.add_to_server(self.server)
        if config.reflection:
            names = [*self.services, health.SERVICE_NAME, reflection.SERVICE_NAME]
            reflection.enable_server_reflection(names, self.server)
        self.port: int | None = None

    async def start(self) -> int:
        """Listen (health NOT_SERVING until ``attach``); returns the bound port."""
        for name in (OVERALL_HEALTH, *self.services):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.config.host}:{self.config.port}"
        port = self.server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        await self.server.start()
        self.port = port
        return port

    async def attach(self, engine: Engine) -> None:
        """The engine is started (its warm-up forward pass has run): serve."""
        self.gate.open(engine)
        for name in (OVERALL_HEALTH, *self.services):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("SERVING %s on port %s", ", ".join(self.services), self.port)

    async def drain(self, grace_period: float, force: asyncio.Event | None = None) -> None:
        """Stop serving: NOT_SERVING at once, new RPCs UNAVAILABLE, running ones get up to
        ``grace_period`` seconds (or until ``force`` is set), then the server stops."""
        await self.health.enter_graceful_shutdown()
        self.gate.close()
        log.info("draining: %d RPCs in flight, grace period %.1fs", self.gate.num_active, grace_period)
        waiters: list[asyncio.Task[Any]] = [asyncio.create_task(self.gate.wait_idle())]
        if force is not None:
            waiters.append(asyncio.create_task(force.wait()))
        try:
            await asyncio.wait(waiters, timeout=grace_period, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if self.gate.num_active:
            log.warning("grace period over: cancelling %d RPCs still in flight", self.gate.num_active)
        # Idle: a moment for the last statuses to go out (long-lived health watches would hold a
        # longer grace). Not idle: the grace is spent, gRPC cancels what is left.
        await self.server.stop(0.0 if self.gate.num_active else 0.5)

    async def stop(self) -> None:
        """Stop at once (no drain), e.g. when the model could not be loaded."""
        await self.server.stop(0)
