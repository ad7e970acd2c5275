"""Client channel options: round-robin balancing, the retry policy, TLS and mutual TLS."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from gpt2_client import AsyncClient, Client, HealthStatus, UnavailableError
from gpt2_client.channel import RETRIED_METHODS, ChannelConfig, multi_address_target
from gpt2_client.proto import generation_pb2, introspection_pb2  # noqa: F401  (register their services)
from gpt2_service.api.server import GenerationServer
from gpt2_service.model.weights import LoadedModel
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


def _service_config(config: ChannelConfig) -> dict[str, Any]:
    options = dict(config.channel_options())
    parsed: dict[str, Any] = json.loads(str(options["grpc.service_config"]))
    return parsed


@pytest.mark.parametrize(
    "target",
    [("127.0.0.1:1", "127.0.0.1:2"), "dns:///gpt2.ns.svc.cluster.local:50051", "ipv4:10.0.0.1:1,10.0.0.2:1"],
    ids=["address-list", "dns", "ipv4-target"],
)
def test_dns_and_multi_address_targets_balance_round_robin(target: str | tuple[str, ...]) -> None:
    assert _service_config(ChannelConfig(target=target))["loadBalancingConfig"] == [{"round_robin": {}}]


def test_a_single_host_port_keeps_grpc_default_policy_unless_asked() -> None:
    assert "loadBalancingConfig" not in _service_config(ChannelConfig(target="localhost:50051"))
    asked = ChannelConfig(target="localhost:50051", load_balancing="round_robin")
    assert _service_config(asked)["loadBalancingConfig"] == [{"round_robin": {}}]


def test_unary_methods_retry_on_unavailable_and_streams_do_not() -> None:
    (method_config,) = _service_config(ChannelConfig())["methodConfig"]
    names = {(n["service"], n.get("method")) for n in method_config["name"]}
    assert ("gpt2.v1.TextGeneration", "Generate") in names
    assert ("gpt2.v1.TextGeneration", "GenerateStream") not in names
    assert ("gpt2.v1.TextGeneration", None) not in names  # not the whole service: it has a stream
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert 3 <= method_config["retryPolicy"]["maxAttempts"] <= 5
    assert dict(ChannelConfig().channel_options())["grpc.enable_retries"] == 1
    assert "methodConfig" not in _service_config(ChannelConfig(max_attempts=1))


def test_every_retried_method_is_unary() -> None:
    """A retried server stream could be replayed after sending tokens; the list names none."""
    pool = descriptor_pool.Default()
    for name in RETRIED_METHODS:
        service = pool.FindServiceByName(name["service"])  # registered by the generated modules
        methods = [service.methods_by_name[name["method"]]] if "method" in name else list(service.methods)
        for method in methods:
            assert not (method.client_streaming or method.server_streaming), method.full_name


def test_a_service_config_in_options_replaces_the_default() -> None:
    mine = ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"pick_first": {}}]}))
    options = ChannelConfig(target="dns:///x:1", options=(mine,)).channel_options()
    assert [value for key, value in options if key == "grpc.service_config"] == [mine[1]]


@pytest.mark.parametrize(
    "kwargs",
    [{"tls_cert": b"pem"}, {"tls_key": b"pem"}, {"max_attempts": 0}, {"max_attempts": 6}, {"token": "two words"},
     {"token": ""}, {"token": "line\nbreak"}],
    ids=["cert-without-key", "key-without-cert", "no-attempts", "too-many-attempts", "token-with-space",
         "empty-token", "token-with-newline"],
)  # fmt: skip
def test_bad_channel_settings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ChannelConfig(**kwargs)


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


async def test_tls_with_a_private_ca() -> None:
    async with tls_health_server(require_client_cert=False) as target:
        with Client(target, tls_ca=(TLS / "ca.pem").read_bytes(), timeout=10) as client:
            assert await asyncio.to_thread(client.health) is HealthStatus.SERVING
        with Client(target, timeout=10) as plaintext, pytest.raises(UnavailableError):
            await asyncio.to_thread(plaintext.health)


async def test_mutual_tls_with_a_client_certificate() -> None:
    async with tls_health_server(require_client_cert=True) as target:
        async with AsyncClient(
            target,
            tls_ca=TLS / "ca.pem",  # a path or the PEM bytes
            tls_cert=TLS / "client.pem",
            tls_key=TLS / "client.key",
            timeout=10,
        ) as client:
            assert await client.health() is HealthStatus.SERVING
        async with AsyncClient(target, tls_ca=TLS / "ca.pem", timeout=10) as anonymous:
            with pytest.raises(UnavailableError):
                await anonymous.health()
