"""A real server with TextGeneration and Introspection on 127.0.0.1:0, wired as gpt2-serve wires
them (one serving gate shared by both services)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gpt2_service.api.gate import ServingGate
from gpt2_service.api.introspection import introspection_service
from gpt2_service.api.server import GenerationServer, ServerConfig
from gpt2_service.engine import Engine
from gpt2_service.weights import LoadedModel

from tests.api_helpers import API_ENGINE_CONFIG, API_SERVER_CONFIG, Served


@asynccontextmanager
async def serve_introspection(
    loaded: LoadedModel, server_config: ServerConfig = API_SERVER_CONFIG, attach: bool = True
) -> AsyncIterator[Served]:
    """A started server and engine (attached unless ``attach=False``)."""
    gate = ServingGate()
    server = GenerationServer(server_config, extra_services=[introspection_service(gate, server_config)], gate=gate)
    port = await server.start()
    engine = Engine(loaded, API_ENGINE_CONFIG)
    await engine.start()
    try:
        if attach:
            await server.attach(engine)
        yield Served(server, engine, f"127.0.0.1:{port}")
    finally:
        await server.stop()
        await engine.shutdown()
