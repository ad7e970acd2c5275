"""OpenTelemetry tracing of the gpt2.v1 RPCs (``--trace``; off by default, and then nothing here
runs).

With it on, every RPC of the gpt2 services is a SERVER span, a child of the caller's span when the
call carries W3C ``traceparent``/``tracestate`` metadata. The span starts with the RPC's handler
and ends when grpc is done with the call (RpcAccounting's done callback: api/accounting.py), with
the call's final status code, so a call cut short by its client ends CANCELLED. Under it, for a
generation, a Score and each item of a batch, spans drawn from the timestamps the engine keeps on
each sequence anyway (admission, prefill chunks, first token, context shifts, finish), so the
engine thread does no tracing work at all:

- ``queue``: arrival -> admitted to the running batch;
- ``prefill``: admitted -> first token (its chunk count, prompt tokens computed and reused);
- ``decode``: first token -> last, with events ``first_token``, ``context_shift``, ``finish``;
- ``response``: the engine's last output -> the end of the call (the response, or the stream's
  last writes).

Attributes follow the OpenTelemetry GenAI and RPC semantic conventions where they apply
(``gen_ai.request.*``, ``gen_ai.usage.*``, ``gen_ai.response.finish_reasons``, ``rpc.*``) plus
``gpt2.*`` ones (request id, tenant, refusal reason, prefill chunks, prefix-cache hits). Prompt
and output text never appear, unless ``--trace-text``.

The SDK is configured by the standard variables: ``OTEL_SERVICE_NAME`` (default ``gpt2-serve``),
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``/``_ARG`` (default parent-based always-on),
``OTEL_EXPORTER_OTLP_ENDPOINT`` and the other ``OTEL_EXPORTER_OTLP_*`` (OTLP over gRPC), and
``OTEL_TRACES_EXPORTER`` (``otlp``, ``console`` or ``none``).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from gpt2_service import __version__
from gpt2_service.api.logs import trace_ids_var
from gpt2_service.core.request import GenerationRequest
from gpt2_service.core.sequence import Sequence as EngineSequence

if TYPE_CHECKING:
    from gpt2_service.api.accounting import CallRecord
    from gpt2_service.api.handlers import Context

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 2048  # of a prompt or an output in an attribute (--trace-text)


def tracer_provider_from_env() -> TracerProvider:
    """A tracer provider as the standard ``OTEL_*`` variables configure it (see the module)."""
    attributes = {"service.version": __version__}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = "gpt2-serve"
    provider = TracerProvider(resource=Resource.create(attributes))  # sampler: OTEL_TRACES_SAMPLER
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    exporter: SpanExporter | None = None
    if kind == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()  # OTEL_EXPORTER_OTLP_ENDPOINT, _HEADERS, _CERTIFICATE, ...
    elif kind == "console":
        exporter = ConsoleSpanExporter()
    elif kind != "none":
        raise ValueError(f"OTEL_TRACES_EXPORTER={kind!r}: this server exports otlp, console or none")
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class RpcTracing:
    """Starts and ends the spans of the gpt2.v1 RPCs (see the module docstring)."""

    def __init__(self, provider: trace.TracerProvider, include_text: bool = False) -> None:
        self.tracer = provider.get_tracer("gpt2_service", __version__)
        self.include_text = include_text
        self.model = ""  # the served model's name, once an engine is attached

    # -- the RPC's start, in its task -------------------------------------------------------------

    def start(self, method: str, context: Context) -> Span:
        """The RPC's span, made current for the RPC's task (its logs carry its ids)."""
        metadata = {key.lower(): value for key, value in (context.invocation_metadata() or ())}
        parent = propagate.extract({k: v for k, v in metadata.items() if isinstance(v, str)})
        service, _, name = method.lstrip("/").partition("/")
        attributes: dict[str, Any] = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        kind, _, address = (context.peer() or "").partition(":")
        if kind in ("ipv4", "ipv6"):
            host, _, port = address.rpartition(":")
            attributes["network.peer.address"] = host.strip("[]")
            if port.isdigit():
                attributes["network.peer.port"] = int(port)
        span = self.tracer.start_span(method.lstrip("/"), context=parent, kind=SpanKind.SERVER, attributes=attributes)
        otel_context.attach(trace.set_span_in_context(span))
        span_context = span.get_span_context()
        if span_context.is_valid:
            trace_ids_var.set((format(span_context.trace_id, "032x"), format(span_context.span_id, "016x")))
        return span

    @staticmethod
    def trace_id(call: CallRecord) -> str:
        """The call's trace id when it is sampled (recorded), for the engine's metric exemplars."""
        span = call.span
        if span is None or not span.is_recording():
            return ""
        return format(span.get_span_context().trace_id, "032x")

    # -- the end of the call, in its done callback ----------------------------------------------

    def finish(self, call: CallRecord, code: grpc.StatusCode, error: str | None) -> None:
        span: Span | None = call.span
        if span is None or not span.is_recording():
            return
        end = time.monotonic()
        clock = _Clock()
        failed = code is not grpc.StatusCode.OK
        status = Status(StatusCode.ERROR, f"{code.name}: {error}" if error else code.name) if failed else None
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        span.set_attribute("gpt2.request_id", call.request_id)
        if call.tenant:
            span.set_attribute("gpt2.tenant", call.tenant)
        if call.rejected is not None:
            span.set_attribute("gpt2.rejected", call.rejected)
        if call.request is not None:
            span.set_attributes(self._request_attributes(call.request, call.rpc))
        finished = call.finished
        if finished is not None:
            span.set_attributes(
                {
                    "gen_ai.response.id": call.request_id,
                    "gen_ai.response.finish_reasons": [finished.reason.value],
                    "gen_ai.usage.input_tokens": finished.usage.prompt_tokens,
                    "gen_ai.usage.output_tokens": finished.usage.completion_tokens,
                    "gpt2.seed": str(finished.seed),  # a uint64 does not fit an int attribute
                }
            )
            if self.include_text:
                span.set_attribute("gpt2.completion", finished.text[:MAX_TEXT_CHARS])
        if self.include_text and isinstance(call.prompt, str):
            span.set_attribute("gpt2.prompt", call.prompt[:MAX_TEXT_CHARS])
        parent = trace.set_span_in_context(span)
        for index, seq in enumerate(call.sequences):
            prefix = f"item[{index}] " if len(call.sequences) > 1 else ""
            self._engine_spans(seq, prefix, parent, clock, end, status)
        if status is not None:
            span.set_status(status)
        span.end(end_time=clock.ns(end))

    def _request_attributes(self, request: GenerationRequest, rpc: str) -> dict[str, Any]:
        if request.score is not None:
            return {"gpt2.operation": "score", "gen_ai.request.model": self.model}
        s, stopping = request.sampling, request.stopping
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "text_completion",
            "gen_ai.provider.name": "gpt2-serve",
            "gen_ai.request.model": self.model,
            "gen_ai.request.temperature": s.temperature,
            "gen_ai.request.top_p": s.top_p,
            "gen_ai.request.top_k": s.top_k,
            "gen_ai.request.choice.count": request.n,
            "gpt2.priority": request.priority.name.lower(),
        }
        if stopping.max_new_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = stopping.max_new_tokens
        if s.seed is not None:
            attributes["gen_ai.request.seed"] = str(s.seed)
        if request.constraint is not None:
            attributes["gpt2.constraint"] = request.constraint.kind
        return attributes

    def _engine_spans(
        self,
        seq: EngineSequence,
        prefix: str,
        parent: otel_context.Context,
        clock: _Clock,
        end: float,
        status: Status | None,
    ) -> None:
        """queue, prefill, decode and response, from the sequence's own timestamps (what the engine
        reached before the call ended: a call cut short has the spans it got to)."""
        arrival, admitted, first = seq.arrival_time, seq.admitted_time, seq.first_token_time
        done = seq.finished_time
        phases: list[tuple[str, float, float | None, dict[str, Any]]] = [("queue", arrival, admitted, {})]
        if admitted is not None:
            phases.append(
                (
                    "prefill",
                    admitted,
                    first,
                    {
                        "gpt2.prefill.chunks": seq.prefill_chunks,
                        "gpt2.prefill.tokens": len(seq.prompt_ids) - seq.cached_prompt_tokens,
                        "gpt2.prefix_cache.hit_tokens": seq.cached_prompt_tokens,
                    },
                )
            )
        if first is not None and seq.request.score is None:
            phases.append(("decode", first, done, {"gen_ai.usage.output_tokens": seq.num_output}))
        if done is not None:
            phases.append(("response", done, end, {}))
        for name, start, stop, attributes in phases:
            child = self.tracer.start_span(
                prefix + name, context=parent, start_time=clock.ns(start), attributes=attributes
            )
            if name == "decode":
                child.add_event("first_token", timestamp=clock.ns(start))
                for shifted in seq.shift_times:
                    child.add_event("context_shift", timestamp=clock.ns(shifted))
                if done is not None and seq.finish_reason is not None:
                    child.add_event("finish", {"finish_reason": seq.finish_reason}, timestamp=clock.ns(done))
            if stop is None and status is not None:  # it was going on when the call ended
                child.set_status(status)
            child.end(end_time=clock.ns(stop if stop is not None else end))


class _Clock:
    """Monotonic seconds (the engine's clock) as wall-clock nanoseconds (the spans')."""

    def __init__(self) -> None:
        self.offset_ns = time.time_ns() - time.monotonic_ns()

    def ns(self, monotonic_seconds: float) -> int:
        return int(monotonic_seconds * 1e9) + self.offset_ns
