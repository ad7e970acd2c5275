"""The client passes the caller's OpenTelemetry trace context on every call (W3C ``traceparent``),
sync and asyncio, unary and streaming, beside the bearer token; and nothing without a span or
without OpenTelemetry.

The server is a tiny in-process gRPC server whose generic handlers record each call's metadata;
spans come from a local SDK ``TracerProvider`` (the global one is left alone), and the global
propagator is OpenTelemetry's default (W3C trace context and baggage).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from gpt2_client import AsyncClient, Client
from gpt2_client import channel as client_channel
from gpt2_client.proto import generation_pb2 as pb
from gpt2_client.proto import introspection_pb2 as ipb
from grpc_health.v1 import health_pb2
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

TLS = Path(__file__).parent / "data" / "tls"
TOKEN = "s3cret-token"
TRACER = TracerProvider().get_tracer("tests.test_client_tracing")  # a local provider: not the global one


@dataclass
class Recorder:
    """What each call brought: (method name, its invocation metadata)."""

    calls: list[tuple[str, dict[str, list[str]]]] = field(default_factory=list)

    def record(self, method: str, context: grpc.ServicerContext) -> None:
        metadata: dict[str, list[str]] = {}
        for key, value in context.invocation_metadata():
            metadata.setdefault(key, []).append(str(value))
        self.calls.append((method, metadata))

    def handlers(self) -> list[grpc.GenericRpcHandler]:  # type: ignore[type-arg]
        def generate(request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
            self.record("Generate", context)
            return pb.GenerateResponse(text=" hi", finish_reason=pb.LENGTH)

        def generate_stream(
            request: pb.GenerateRequest, context: grpc.ServicerContext
        ) -> Iterator[pb.GenerateStreamResponse]:
            self.record("GenerateStream", context)
            yield pb.GenerateStreamResponse(text=" hi")
            yield pb.GenerateStreamResponse(text="!", finish_reason=pb.LENGTH)

        def detokenize(request: ipb.DetokenizeRequest, context: grpc.ServicerContext) -> ipb.DetokenizeResponse:
            self.record("Detokenize", context)
            return ipb.DetokenizeResponse(text="hi")

        def check(request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext) -> Any:
            self.record("Check", context)
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

        def unary(fn: Any, request: Any, response: Any) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
            return grpc.unary_unary_rpc_method_handler(fn, request.FromString, response.SerializeToString)

        return [
            grpc.method_handlers_generic_handler(
                "gpt2.v1.TextGeneration",
                {
                    "Generate": unary(generate, pb.GenerateRequest, pb.GenerateResponse),
                    "GenerateStream": grpc.unary_stream_rpc_method_handler(
                        generate_stream, pb.GenerateRequest.FromString, pb.GenerateStreamResponse.SerializeToString
                    ),
                },
            ),
            grpc.method_handlers_generic_handler(
                "gpt2.v1.Introspection",
                {"Detokenize": unary(detokenize, ipb.DetokenizeRequest, ipb.DetokenizeResponse)},
            ),
            grpc.method_handlers_generic_handler(
                "grpc.health.v1.Health",
                {"Check": unary(check, health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse)},
            ),
        ]


@dataclass
class Served:
    target: str
    recorder: Recorder
    connection: dict[str, Any]  # the client's keyword arguments (TLS, token)


SECURITY = ["plaintext", "plaintext-token", "tls-token"]


@pytest.fixture(params=SECURITY)
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    """A recording server: plaintext (with or without a token), or TLS with a token (sent there as
    call credentials rather than by the interceptor)."""
    recorder = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=recorder.handlers())
    connection: dict[str, Any] = {"timeout": 10}
    if request.param == "tls-token":
        credentials = grpc.ssl_server_credentials(
            [((TLS / "server.key").read_bytes(), (TLS / "server.pem").read_bytes())]
        )
        target = f"localhost:{server.add_secure_port('127.0.0.1:0', credentials)}"
        connection["tls_ca"] = TLS / "ca.pem"
    else:
        target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    if request.param.endswith("-token"):
        connection["token"] = TOKEN
    server.start()
    try:
        yield Served(target, recorder, connection)
    finally:
        server.stop(0)


def traceparent_of(span: trace.Span) -> str:
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def sync_calls(client: Client) -> None:
    """A unary call, a stream, an introspection call and a health check."""
    assert client.generate("Hi", max_new_tokens=2).text == " hi"
    assert "".join(chunk.text for chunk in client.stream("Hi", max_new_tokens=2)) == " hi!"
    assert client.inspect.detokenize([1]) == "hi"
    client.health()


async def async_calls(client: AsyncClient) -> None:
    assert (await client.generate("Hi", max_new_tokens=2)).text == " hi"
    assert "".join([chunk.text async for chunk in client.stream("Hi", max_new_tokens=2)]) == " hi!"
    assert await client.inspect.detokenize([1]) == "hi"
    await client.health()


CALLED = ["Generate", "GenerateStream", "Detokenize", "Check"]


def check_calls(served: Served, traceparent: str | None) -> None:
    """Every call carried ``traceparent`` once (none when None) and the token when one is set."""
    assert [method for method, _ in served.recorder.calls] == CALLED
    token = served.connection.get("token")
    for method, metadata in served.recorder.calls:
        assert metadata.get("traceparent") == ([traceparent] if traceparent else None), method
        assert metadata.get("authorization") == ([f"Bearer {token}"] if token else None), method


def test_sync_client_calls_carry_the_callers_trace_context(served: Served) -> None:
    with Client(served.target, **served.connection) as client, TRACER.start_as_current_span("caller") as span:
        sync_calls(client)
    assert span.get_span_context().trace_flags.sampled
    check_calls(served, traceparent_of(span))


async def test_async_client_calls_carry_the_callers_trace_context(served: Served) -> None:
    async with AsyncClient(served.target, **served.connection) as client:
        with TRACER.start_as_current_span("caller") as span:
            await async_calls(client)
    check_calls(served, traceparent_of(span))


def test_the_innermost_span_is_the_parent(served: Served) -> None:
    with Client(served.target, **served.connection) as client, TRACER.start_as_current_span("outer") as outer:
        with TRACER.start_as_current_span("inner") as inner:
            client.generate("Hi")
        client.generate("Hi")
    (_, first), (_, second) = served.recorder.calls
    assert first["traceparent"] == [traceparent_of(inner)]
    assert second["traceparent"] == [traceparent_of(outer)]
    assert inner.get_span_context().trace_id == outer.get_span_context().trace_id


def test_a_span_made_current_with_use_span_is_passed_on(served: Served) -> None:
    span = TRACER.start_span("caller")
    with Client(served.target, **served.connection) as client, trace.use_span(span, end_on_exit=True):
        sync_calls(client)
    check_calls(served, traceparent_of(span))


def test_no_trace_context_without_an_active_span(served: Served) -> None:
    assert not trace.get_current_span().get_span_context().is_valid
    with Client(served.target, **served.connection) as client:
        sync_calls(client)
    check_calls(served, None)


async def test_async_no_trace_context_without_an_active_span(served: Served) -> None:
    async with AsyncClient(served.target, **served.connection) as client:
        await async_calls(client)
    check_calls(served, None)


@pytest.fixture
def no_opentelemetry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """OpenTelemetry's API as if not installed (``import opentelemetry.propagate`` fails)."""
    monkeypatch.setitem(sys.modules, "opentelemetry.propagate", None)
    client_channel._tracing_available.cache_clear()
    yield
    client_channel._tracing_available.cache_clear()


@pytest.mark.usefixtures("no_opentelemetry")
async def test_without_opentelemetry_calls_go_out_as_before(served: Served) -> None:
    """No tracing interceptor then: the client never imports OpenTelemetry (it would fail), and
    the token still goes along."""
    assert not client_channel._tracing_available()
    with TRACER.start_as_current_span("caller"):
        async with AsyncClient(served.target, **served.connection) as client:
            await async_calls(client)
        with Client(served.target, **served.connection) as sync_client:
            sync_calls(sync_client)
    calls = served.recorder.calls
    served.recorder.calls = calls[:4]
    check_calls(served, None)
    served.recorder.calls = calls[4:]
    check_calls(served, None)


def test_trace_context_already_in_the_metadata_is_kept() -> None:
    """E.g. set by OpenTelemetry's gRPC instrumentation, whose client span is then the parent."""
    with TRACER.start_as_current_span("caller") as span:
        added = dict(client_channel._trace_context(None))
        assert added == {"traceparent": traceparent_of(span)}
        assert client_channel._trace_context((("traceparent", "00-theirs"),)) == ()
