"""Client channel options: address lists balanced round-robin, TLS and mutual TLS."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from gpt2_client import AsyncClient, Client, HealthStatus, UnavailableError
from gpt2_client.channel import ChannelConfig, multi_address_target
from gpt2_service.api.server import GenerationServer
from gpt2_service.weights import LoadedModel
from grpc_health.v1 import health, health_pb2_grpc

from tests.api_helpers import API_SERVER_CONFIG, serve

TLS = Path(__file__).parent / "data" / "tls"


def test_address_list_becomes_a_static_target() -> None:
    assert multi_address_target(["10.0.0.1:50051", "10.0.0.2:50052"]) == "ipv4:10.0.0.1:50051,10.0.0.2:50052"
    assert multi_address_target(["[::1]:50051", "[fe80::1]:1"]) == "ipv6:[::1]:50051,[fe80::1]:1"


@pytest.mark.parametrize(
    "addresses",
    [["gpt2.svc:50051"], ["10.0.0.1:50051", "[::1]:50051"], ["10.0.0.1"], []],
    ids=["hostname", "mixed-families", "no-port", "empty"],
)
def test_bad_address_list_is_refused(addresses: list[str]) -> None:
    with pytest.raises(ValueError):
        multi_address_target(addresses)


def test_lists_balance_round_robin_and_single_targets_keep_grpc_default() -> None:
    def policy(config: ChannelConfig) -> object:
        options = dict(config.channel_options())
        raw = options.get("grpc.service_config")
        return json.loads(str(raw))["loadBalancingConfig"] if raw is not None else None

    assert policy(ChannelConfig(target=("127.0.0.1:1", "127.0.0.1:2"))) == [{"round_robin": {}}]
    assert policy(ChannelConfig(target="dns:///gpt2.svc:50051", load_balancing="round_robin")) == [{"round_robin": {}}]
    assert policy(ChannelConfig(target="localhost:50051")) is None


class CountingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self) -> None:
        self.calls = 0

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        if handler_call_details.method.endswith("/Generate"):
            self.calls += 1
        return await continuation(handler_call_details)


async def test_address_list_spreads_requests_over_servers(tiny: LoadedModel) -> None:
    async with serve(tiny) as first:
        counter = CountingInterceptor()
        second = GenerationServer(API_SERVER_CONFIG, interceptors=[counter])
        port = await second.start()
        await second.attach(first.engine)  # a second server on the same engine
        try:
            async with AsyncClient([first.target, f"127.0.0.1:{port}"], timeout=30) as client:
                await client.health()  # connected to both before counting
                for _ in range(8):
                    await client.generate("Hi", max_new_tokens=1)
        finally:
            await second.stop()
    assert 1 <= counter.calls <= 7, counter.calls  # both servers served some of the 8


@asynccontextmanager
async def tls_health_server(require_client_cert: bool) -> AsyncIterator[str]:
    """A server with only the health service, on TLS with the test certificates."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)  # type: ignore[attr-defined]
    credentials = grpc.ssl_server_credentials(
        [((TLS / "server.key").read_bytes(), (TLS / "server.pem").read_bytes())],
        root_certificates=(TLS / "ca.pem").read_bytes() if require_client_cert else None,
        require_client_auth=require_client_cert,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield f"localhost:{port}"
    finally:
        await server.stop(0)


async def test_tls_with_root_certificates() -> None:
    async with tls_health_server(require_client_cert=False) as target:
        with Client(target, root_certificates=(TLS / "ca.pem").read_bytes(), timeout=10) as client:
            assert await asyncio.to_thread(client.health) is HealthStatus.SERVING
        with Client(target, timeout=10) as plaintext, pytest.raises(UnavailableError):
            await asyncio.to_thread(plaintext.health)


async def test_mutual_tls_with_a_client_certificate() -> None:
    async with tls_health_server(require_client_cert=True) as target:
        async with AsyncClient(
            target,
            root_certificates=(TLS / "ca.pem").read_bytes(),
            private_key=(TLS / "client.key").read_bytes(),
            certificate_chain=(TLS / "client.pem").read_bytes(),
            timeout=10,
        ) as client:
            assert await client.health() is HealthStatus.SERVING
        async with AsyncClient(target, root_certificates=(TLS / "ca.pem").read_bytes(), timeout=10) as anonymous:
            with pytest.raises(UnavailableError):
                await anonymous.health()
