"""The gRPC server around one engine: TextGeneration, Introspection, grpc.health.v1.Health and
reflection.

Lifecycle: ``start()`` listens at once with health NOT_SERVING (so probes answer while the model
loads); ``attach(engine)`` after the engine's warm-up pass flips health to SERVING; ``drain()``
flips it back to NOT_SERVING, refuses new RPCs with UNAVAILABLE, lets running ones finish within
the grace period, then stops the server (cancelling whatever is left).

Security (api/auth.py): optional TLS or mutual TLS on the gRPC port, optional bearer tokens;
``--health-port`` adds a plaintext port that serves only the health service, for probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc
from gpt2_client.proto import generation_pb2, generation_pb2_grpc, introspection_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gpt2_service.api.accounting import RpcAccounting, note_rejected
from gpt2_service.api.auth import BearerTokenInterceptor, ClientCertificateInterceptor, load_security
from gpt2_service.api.gate import ServingGate
from gpt2_service.api.introspection import INTROSPECTION_SERVICE, IntrospectionServicer, max_response_bytes
from gpt2_service.api.servicer import TextGenerationServicer
from gpt2_service.config import ServerConfig
from gpt2_service.engine.frontend import Engine
from gpt2_service.metrics import Metrics

if TYPE_CHECKING:
    from gpt2_service.api.tracing import RpcTracing

log = logging.getLogger(__name__)

TEXT_GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["TextGeneration"].full_name
OVERALL_HEALTH = ""
CUT_STATUS_SECONDS = 0.5  # for the statuses of RPCs cut at the end of the grace period to go out


class GenerationServer:
    """The one place a server is assembled (``gpt2-serve`` and every test use it): TextGeneration
    and Introspection behind one serving gate, health, reflection, accounting and security."""

    def __init__(
        self,
        config: ServerConfig,
        interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
        metrics: Metrics | None = None,
        tracer_provider: Any = None,
    ) -> None:
        """``metrics``: where RPCs are counted (None: only logged). ``interceptors`` run after the
        one that counts and logs every RPC, so it sees the calls they refuse. ``tracer_provider``
        (an OpenTelemetry ``TracerProvider``): trace every RPC (api/tracing.py); None: no tracing,
        and no tracing code runs."""
        self.config = config
        self.tracing: RpcTracing | None = None
        if tracer_provider is not None:
            from gpt2_service.api.tracing import RpcTracing  # the OpenTelemetry SDK only when tracing

            self.tracing = RpcTracing(tracer_provider, include_text=config.trace_text)
        self.accounting = RpcAccounting(metrics, log_prompts=config.log_prompts, tracing=self.tracing)
        self.security = load_security(config.tls_cert, config.tls_key, config.tls_client_ca, config.auth_token_file)
        self.gate = ServingGate()
        self.servicer = TextGenerationServicer(self.gate, config.max_batch_requests)
        self.introspection = IntrospectionServicer(self.gate, max_response_bytes(config), config.max_model_rpcs)
        self.health: Any = health.aio.HealthServicer()  # type: ignore[attr-defined]  # untyped in grpc-stubs
        self.services = [TEXT_GENERATION_SERVICE, INTROSPECTION_SERVICE]
        options = [
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
            *_connection_age_options(config),
        ]
        interceptors = [self.accounting, *interceptors]
        on_refuse = functools.partial(note_rejected, "unauthenticated")
        if config.tls_require_client_eku:
            interceptors.append(ClientCertificateInterceptor(on_reject=on_refuse))
        if self.security.token_digests:  # innermost: the others still see the calls it rejects
            interceptors.append(BearerTokenInterceptor(self.security, on_reject=on_refuse))
        self.server = grpc.aio.server(interceptors=interceptors, options=options)
        generation_pb2_grpc.add_TextGenerationServicer_to_server(self.servicer, self.server)
        introspection_pb2_grpc.add_IntrospectionServicer_to_server(self.introspection, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if config.reflection:
            names = [*self.services, health.SERVICE_NAME, reflection.SERVICE_NAME]
            reflection.enable_server_reflection(names, self.server)
        # Plaintext, health only, same servicer (so the same statuses): for probes that cannot do (m)TLS.
        self.health_server: grpc.aio.Server | None = None
        if config.health_port:
            self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        self.port: int | None = None
        self.health_port: int | None = None

    async def start(self) -> int:
        """Listen (health NOT_SERVING until ``attach``); returns the bound port."""
        for name in (OVERALL_HEALTH, *self.services):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.config.host}:{self.config.port}"
        credentials = self.security.server_credentials()
        if credentials is not None:
            port = self.server.add_secure_port(address, credentials)
        else:
            port = self.server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        if self.health_server is not None:
            health_address = f"{self.config.host}:{self.config.health_port}"
            self.health_port = self.health_server.add_insecure_port(health_address)
            if self.health_port == 0:
                raise OSError(f"cannot listen on {health_address} (--health-port)")
            await self.health_server.start()
        await self.server.start()
        self.port = port
        self._log_security()
        return port

    def _log_security(self) -> None:
        transport = "plaintext"
        if self.security.tls:
            transport = "mutual TLS (client certificates required)" if self.security.client_ca else "TLS"
        auth = f"{len(self.security.token_digests)} bearer token(s)" if self.security.token_digests else "none"
        log.info("gRPC port %s: %s; auth: %s", self.port, transport, auth)
        if self.health_port is not None:
            log.info("health only, plaintext, on port %d", self.health_port)
        if self.security.token_digests and not self.security.tls:
            log.warning("bearer tokens over plaintext: anyone on the network path can read them (use --tls-cert)")

    async def attach(self, engine: Engine) -> None:
        """The engine is started (its warm-up forward pass has run): serve."""
        self.gate.open(engine)
        if self.tracing is not None:
            self.tracing.model = engine.loaded.name
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
            log.warning("grace period over: cutting %d RPCs still in flight", self.gate.num_active)
            self.gate.cut_active()  # each ends UNAVAILABLE with reason DRAINING
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.gate.wait_idle(), CUT_STATUS_SECONDS)
        # A moment for the last statuses to go out (long-lived health watches would hold a longer
        # grace); gRPC cancels whatever is still open after it.
        self.accounting.server_stopping()
        await self.server.stop(CUT_STATUS_SECONDS)
        if self.health_server is not None:
            await self.health_server.stop(0.5)

    async def stop(self) -> None:
        """Stop at once (no drain), e.g. when the model could not be loaded."""
        self.accounting.server_stopping()
        await self.server.stop(0)
        if self.health_server is not None:
            await self.health_server.stop(0)


def _connection_age_options(config: ServerConfig) -> list[tuple[str, int]]:
    """A max connection age makes clients reconnect, re-resolve the service name and spread
    over the replicas that exist now (see docs/deploy.md, load balancing)."""
    if config.max_connection_age <= 0:
        return []
    options = [("grpc.max_connection_age_ms", round(config.max_connection_age * 1000))]
    if config.max_connection_age_grace > 0:
        options.append(("grpc.max_connection_age_grace_ms", round(config.max_connection_age_grace * 1000)))
    return options
