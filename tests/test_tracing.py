"""OpenTelemetry tracing (issue 16), with the SDK's in-memory exporter: a call's spans continue
the caller's trace, in parent/child order, with their attributes; a cancelled stream ends
CANCELLED; a refused request's span says why; no prompt text unless --trace-text; log lines and
metric exemplars carry the trace id."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from collections.abc import Iterator

import grpc
import pytest
from gpt2_client.proto import generation_pb2 as pb
from gpt2_service.api.logs import JsonFormatter, RequestIdFilter
from gpt2_service.metrics import Metrics
from gpt2_service.model.weights import LoadedModel
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

from tests.api_helpers import API_SERVER_CONFIG, greedy, long_request, serve, stub_for, wait_for_slots_free
from tests.engine_helpers import WAIT_S

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),)
PROMPT = "The secret prompt says"


@pytest.fixture
def exporter() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    provider = TracerProvider()
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    yield provider, memory
    provider.shutdown()


async def spans_when(memory: InMemorySpanExporter, count: int) -> list[ReadableSpan]:
    """The finished spans once there are ``count`` RPC spans (they end in the call's done callback)."""
    for _ in range(int(WAIT_S / 0.01)):
        spans = list(memory.get_finished_spans())
        if sum(s.kind is SpanKind.SERVER for s in spans) >= count:
            return spans
        await asyncio.sleep(0.01)
    raise AssertionError(f"fewer than {count} RPC spans: {[s.name for s in memory.get_finished_spans()]}")


def by_name(spans: list[ReadableSpan]) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans}


async def test_a_generate_continues_the_callers_trace_with_its_engine_spans(
    tiny: LoadedModel, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, memory = exporter
    async with serve(tiny, tracer_provider=provider) as served, stub_for(served) as stub:
        response = await stub.Generate(greedy(PROMPT, max_new_tokens=6), metadata=TRACEPARENT)
        spans = by_name(await spans_when(memory, 1))
    rpc = spans["gpt2.v1.TextGeneration/Generate"]
    assert rpc.kind is SpanKind.SERVER
    assert format(rpc.context.trace_id, "032x") == TRACE_ID
    assert rpc.parent is not None and format(rpc.parent.span_id, "016x") == PARENT_ID
    attributes = dict(rpc.attributes or {})
    assert attributes["rpc.system"] == "grpc" and attributes["rpc.method"] == "Generate"
    assert attributes["rpc.grpc.status_code"] == 0
    assert attributes["gpt2.request_id"] == response.request_id
    assert attributes["gen_ai.request.model"] == "random:tiny"
    assert attributes["gen_ai.request.temperature"] == 0.0 and attributes["gen_ai.request.max_tokens"] == 6
    assert attributes["gen_ai.usage.output_tokens"] == 6
    assert attributes["gen_ai.usage.input_tokens"] == response.usage.prompt_tokens
    assert list(attributes["gen_ai.response.finish_reasons"]) == ["length"]
    assert rpc.status.status_code is StatusCode.UNSET
    children = [spans[name] for name in ("queue", "prefill", "decode", "response")]
    for child in children:
        assert child.parent is not None and child.parent.span_id == rpc.context.span_id
        assert child.context.trace_id == rpc.context.trace_id
    for before, after in itertools.pairwise(children):  # one after the other, within the RPC
        assert before.end_time == after.start_time
    assert rpc.start_time <= children[0].start_time and children[-1].end_time == rpc.end_time
    prefill = dict(spans["prefill"].attributes or {})
    assert prefill["gpt2.prefill.chunks"] == 1 and prefill["gpt2.prefill.tokens"] == response.usage.prompt_tokens
    decode = spans["decode"]
    assert [e.name for e in decode.events] == ["first_token", "finish"]
    assert dict(decode.events[-1].attributes or {})["finish_reason"] == "length"
    values = [str(v) for s in spans.values() for v in dict(s.attributes or {}).values()]
    assert not any("secret" in v for v in values)  # no prompt text by default


async def test_a_cancelled_stream_ends_its_spans_cancelled(
    tiny: LoadedModel, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, memory = exporter
    async with serve(tiny, tracer_provider=provider) as served, stub_for(served) as stub:
        call = stub.GenerateStream(long_request(), metadata=TRACEPARENT)
        await call.read()
        call.cancel()
        spans = by_name(await spans_when(memory, 1))
        await wait_for_slots_free(served.engine)
    rpc = spans["gpt2.v1.TextGeneration/GenerateStream"]
    assert rpc.status.status_code is StatusCode.ERROR and (rpc.status.description or "").startswith("CANCELLED")
    assert dict(rpc.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    decode = spans["decode"]  # it was generating when the client left
    assert decode.status.status_code is StatusCode.ERROR and decode.end_time == rpc.end_time
    assert "response" not in spans and spans["prefill"].status.status_code is StatusCode.UNSET


async def test_a_refused_request_has_an_rpc_span_with_the_reason(
    tiny: LoadedModel, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, memory = exporter
    async with serve(tiny, tracer_provider=provider) as served, stub_for(served) as stub:
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Generate(
                pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(temperature=-1.0)), metadata=TRACEPARENT
            )
        (rpc,) = await spans_when(memory, 1)
    assert rpc.status.status_code is StatusCode.ERROR
    assert (rpc.status.description or "").startswith("INVALID_ARGUMENT: sampling.temperature")
    assert dict(rpc.attributes or {})["gpt2.rejected"] == "invalid"
    assert format(rpc.context.trace_id, "032x") == TRACE_ID  # no engine spans: it never got there


async def test_trace_text_puts_the_prompt_and_output_in_the_span(
    tiny: LoadedModel, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, memory = exporter
    config = dataclasses.replace(API_SERVER_CONFIG, trace_text=True)
    async with serve(tiny, server_config=config, tracer_provider=provider) as served, stub_for(served) as stub:
        response = await stub.Generate(greedy(PROMPT, max_new_tokens=3))
        spans = by_name(await spans_when(memory, 1))
    attributes = dict(spans["gpt2.v1.TextGeneration/Generate"].attributes or {})
    assert attributes["gpt2.prompt"] == PROMPT and attributes["gpt2.completion"] == response.text
    assert spans["gpt2.v1.TextGeneration/Generate"].parent is None  # no traceparent: a new trace


async def test_log_lines_and_exemplars_carry_the_trace_id(
    tiny: LoadedModel, exporter: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, memory = exporter
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    keep.addFilter(RequestIdFilter())
    access = logging.getLogger("gpt2_service.api.access")
    access.addHandler(keep)
    level = access.level
    access.setLevel(logging.INFO)
    metrics = Metrics()
    try:
        async with serve(tiny, metrics=metrics, tracer_provider=provider) as served, stub_for(served) as stub:
            await stub.Generate(greedy(max_new_tokens=4), metadata=TRACEPARENT)
            (rpc, *_) = [s for s in await spans_when(memory, 1) if s.kind is SpanKind.SERVER]
            for _ in range(int(WAIT_S / 0.01)):  # the access line is logged when grpc is done with the call
                if records:
                    break
                await asyncio.sleep(0.01)
    finally:
        access.removeHandler(keep)
        access.setLevel(level)
    line = JsonFormatter().format(records[-1])
    assert f'"trace_id": "{TRACE_ID}"' in line and f'"span_id": "{format(rpc.context.span_id, "016x")}"' in line
    exposition = openmetrics(metrics.registry).decode()
    for family in (
        "gpt2_time_to_first_token_seconds",
        "gpt2_e2e_request_latency_seconds",
        "gpt2_inter_token_latency_seconds",
    ):
        lines = [line for line in exposition.splitlines() if line.startswith(f"{family}_bucket") and "# {" in line]
        assert any(f'trace_id="{TRACE_ID}"' in line for line in lines), family


async def test_without_a_tracer_nothing_is_traced(tiny: LoadedModel) -> None:
    async with serve(tiny) as served, stub_for(served) as stub:
        await stub.Generate(greedy(max_new_tokens=2), metadata=TRACEPARENT)
        assert served.server.tracing is None
