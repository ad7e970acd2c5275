"""RPC accounting, as the server's outermost interceptor: every RPC of the gpt2 services ends with
exactly one final status code, which is counted (``gpt2_requests_total``, and the rejected and
cancelled counters) and logged as the request's one access line. Health and reflection RPCs are
neither counted nor logged (probes every few seconds would drown the rest). Not the error table
(api/status.py), nor the metric definitions (metrics.py).

grpc.aio interceptors see the handler, not the outcome, so this one wraps the handler's
behaviour: it notes how the behaviour ended (returned: the context's code, else OK; aborted: the
abort's code; raised: UNKNOWN, as grpc answers then), and a done callback on the RPC, which grpc
runs once when the call is over, accounts for it. A behaviour that never ended was cut short: by
its deadline (DEADLINE_EXCEEDED), by the server stopping (UNAVAILABLE), or by the client
(CANCELLED). The servicer adds what only it knows (request id, tokens, finish reason, why a
request was rejected) to ``current_call()``; other interceptors placed after this one report a
rejection with ``note_rejected``.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from gpt2_service.api.logs import NO_REQUEST, log_fields, new_request_id
from gpt2_service.api.status import MALFORMED_REQUEST, rich_status
from gpt2_service.errors import MAX_DESCRIPTION_CHARS, clip
from gpt2_service.metrics import REJECT_REASONS, Metrics
from gpt2_service.sequence import Finished

log = logging.getLogger(__name__)

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"

# The gpt2.v1 services (TextGeneration, Introspection); not grpc.health.v1 nor reflection.
COUNTED_METHOD_PREFIXES = ("/gpt2.",)

# Expected outcomes are logged at INFO; a full queue at WARNING; faults at ERROR (the servicer
# logs their traceback separately).
_LOG_LEVEL_BY_CODE = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: logging.WARNING,
    grpc.StatusCode.INTERNAL: logging.ERROR,
    grpc.StatusCode.UNKNOWN: logging.ERROR,
    grpc.StatusCode.DATA_LOSS: logging.ERROR,
}

_CUT_SHORT_ERRORS = {
    grpc.StatusCode.CANCELLED: "cancelled by the client",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the call's deadline passed",
    grpc.StatusCode.UNAVAILABLE: "the server stopped before the call finished",
}

# A client whose deadline passes cancels the call (RST_STREAM) a little before the server's own
# copy of that deadline runs out: the server's clock started when the headers arrived. A call
# cut short this close to its deadline is counted as DEADLINE_EXCEEDED, not CANCELLED.
DEADLINE_SLACK_SECONDS = 0.25

Prompt: TypeAlias = "str | list[int] | None"

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]  # generic only in grpc-stubs
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor


@dataclass(frozen=True)
class FinishedRequest:
    """One request of a GenerateBatch call, finished."""

    request_id: str
    prompt: Prompt
    finished: Finished


@dataclass(eq=False)
class CallRecord:
    """What is known about one RPC, for its metrics and its access line. The servicer fills in
    what it learns; the accounting sets ``outcome`` and ``code``."""

    rpc: str  # the method's name, e.g. "Generate"
    started: float = field(default_factory=time.monotonic)
    request_id: str = NO_REQUEST
    prompt: Prompt = None  # logged only with --log-prompts
    accepted: bool = False  # the engine took the request (or one of the batch's)
    prompt_tokens: int | None = None  # after truncation; known once accepted
    completion_tokens: int | None = None  # so far (a stream counts them as they go)
    finished: Finished | None = None
    items: list[FinishedRequest] = field(default_factory=list)  # GenerateBatch, when it succeeded
    rejected: str | None = None  # one of metrics.REJECT_REASONS
    outcome: grpc.StatusCode | None = None  # how the behaviour ended; None: not (yet), cut short
    code: grpc.StatusCode | None = None  # the final code, once accounted for


_current_call: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar("current_call", default=None)


def current_call() -> CallRecord:
    """The record of the RPC being served (a detached one when no RpcAccounting runs, so the
    servicer need not check). Call it once per RPC and keep it."""
    call = _current_call.get()
    return call if call is not None else CallRecord(rpc="-")


def note_rejected(reason: str) -> None:
    """The RPC being served is refused before any generation, for ``reason`` (one of
    ``metrics.REJECT_REASONS``); ``gpt2_requests_rejected_total`` counts it when the call ends.
    Works in the handler and in the ``intercept_service`` of interceptors placed after
    RpcAccounting, e.g. authentication: ``note_rejected("unauthenticated")``."""
    if reason not in REJECT_REASONS:
        raise ValueError(f"unknown rejection reason {reason!r}; one of {', '.join(REJECT_REASONS)}")
    call = _current_call.get()
    if call is not None:
        call.rejected = reason


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _context_code(context: Context) -> grpc.StatusCode | None:
    code: grpc.StatusCode | None = context.code()  # None unless set_code or abort was called
    return code


def _outcome_of(exc: BaseException, context: Context) -> grpc.StatusCode | None:
    if isinstance(exc, grpc.aio.AbortError):
        return _context_code(context) or grpc.StatusCode.UNKNOWN
    if isinstance(exc, Exception):  # grpc answers UNKNOWN, unless the handler set a code first
        code = _context_code(context)
        return code if code not in (None, grpc.StatusCode.OK) else grpc.StatusCode.UNKNOWN
    return None  # CancelledError, GeneratorExit: cut short


class RpcAccounting(_ServerInterceptor):
    """Counts and logs every gpt2 RPC once, with its final status code. Put it first among the
    server's interceptors, so that it sees the calls the others refuse. ``metrics`` None: log only."""

    def __init__(self, metrics: Metrics | None = None, log_prompts: bool = False) -> None:
        self._metrics = metrics
        self._log_prompts = log_prompts
        self._stopping = False

    def server_stopping(self) -> None:
        """The server is stopping: calls cut short from now on end UNAVAILABLE, not CANCELLED."""
        self._stopping = True

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        method: str = handler_call_details.method
        if not method.startswith(COUNTED_METHOD_PREFIXES):
            return await continuation(handler_call_details)
        call = CallRecord(rpc=method.rpartition("/")[2])
        _current_call.set(call)  # the RPC's task: later interceptors and the handler see it
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: UNIMPLEMENTED, not counted (stubs say never None)
            return handler
        return self._wrap(handler, call)

    # -- the handler's behaviour ------------------------------------------------------------------

    def _wrap(self, handler: Handler, call: CallRecord) -> Handler:
        if handler.request_streaming:
            behaviour: Any = handler.stream_stream if handler.response_streaming else handler.stream_unary
        else:
            behaviour = handler.unary_stream if handler.response_streaming else handler.unary_unary
        if inspect.isasyncgenfunction(behaviour):
            wrapped: Any = self._wrap_generator(behaviour, call)
        elif inspect.iscoroutinefunction(behaviour):  # unary response, or a reader/writer stream
            wrapped = self._wrap_coroutine(behaviour, call)
        else:
            return handler  # a synchronous handler: none in this server
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        return make(
            wrapped,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _wrap_coroutine(
        self, behaviour: Callable[[Any, Context], Awaitable[Any]], call: CallRecord
    ) -> Callable[[Any, Context], Awaitable[Any]]:
        async def accounted(request: Any, context: Context) -> Any:
            self._begin(call, context)
            try:
                await _refuse_if_malformed(request, call, context)
                response = await behaviour(request, context)
            except BaseException as exc:
                call.outcome = _outcome_of(exc, context)
                raise
            call.outcome = _context_code(context) or grpc.StatusCode.OK
            return response

        return accounted

    def _wrap_generator(
        self, behaviour: Callable[[Any, Context], AsyncIterator[Any]], call: CallRecord
    ) -> Callable[[Any, Context], AsyncIterator[Any]]:
        async def accounted(request: Any, context: Context) -> AsyncIterator[Any]:
            self._begin(call, context)
            try:
                await _refuse_if_malformed(request, call, context)
                async with aclosing(behaviour(request, context)) as responses:  # type: ignore[type-var]
                    async for response in responses:
                        yield response
            except BaseException as exc:
                call.outcome = _outcome_of(exc, context)
                raise
            call.outcome = _context_code(context) or grpc.StatusCode.OK

        return accounted

    def _begin(self, call: CallRecord, context: Context) -> None:
        _current_call.set(call)
        context.add_done_callback(functools.partial(self._finish, call))  # type: ignore[arg-type]  # stubs want a class

    # -- the end of the call ----------------------------------------------------------------------

    def _cut_short_code(self, context: Context) -> grpc.StatusCode:
        if self._stopping:
            return grpc.StatusCode.UNAVAILABLE
        remaining: float | None = context.time_remaining()  # None: no deadline
        if remaining is not None and remaining <= DEADLINE_SLACK_SECONDS:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED

    def _finish(self, call: CallRecord, context: Context) -> None:
        if call.code is not None:
            return
        code = call.outcome if call.outcome is not None else self._cut_short_code(context)
        call.code = code
        error = (context.details() or None) if call.outcome is not None else _CUT_SHORT_ERRORS.get(code)
        if self._metrics is not None:
            self._metrics.observe_rpc(call.rpc, code.name)
            if call.rejected is not None:
                self._metrics.observe_rejected(call.rejected)
            if code is grpc.StatusCode.CANCELLED:
                self._metrics.observe_cancelled()
        self._log(call, code, None if code is grpc.StatusCode.OK else error)

    def _log(self, call: CallRecord, code: grpc.StatusCode, error: str | None) -> None:
        total_ms = _ms(time.monotonic() - call.started)
        for item in call.items:  # a batch: a line for each of its requests, then the call's
            fields = _finished_fields(item.finished, _ms(item.finished.timing.total_seconds))
            fields.update(rpc=call.rpc, code=grpc.StatusCode.OK.name, batch_id=call.request_id)
            if self._log_prompts:
                fields["prompt"] = item.prompt
            log_fields(log, logging.INFO, "batch item finished", _ordered(fields), request_id=item.request_id)
        if call.finished is not None:
            fields = _finished_fields(call.finished, total_ms)
        else:
            fields = {
                "prompt_tokens": call.prompt_tokens,
                "completion_tokens": call.completion_tokens,
                "finish_reason": None,
                "queue_ms": None,
                "ttft_ms": None,
                "total_ms": total_ms,
            }
        if call.items:
            fields["prompt_tokens"] = sum(i.finished.usage.prompt_tokens for i in call.items)
            fields["completion_tokens"] = sum(i.finished.usage.completion_tokens for i in call.items)
            fields["num_requests"] = len(call.items)
        fields.update(rpc=call.rpc, code=code.name, error=error)
        if call.rejected is not None:
            fields["rejected"] = call.rejected
        if self._log_prompts and call.prompt is not None:
            fields["prompt"] = call.prompt
        level = _LOG_LEVEL_BY_CODE.get(code, logging.INFO)
        log_fields(log, level, "request finished", _ordered(fields), request_id=call.request_id)


Guard: TypeAlias = "Callable[[Context], Awaitable[None]]"


def guarded(handler: Handler, guard: Guard) -> Handler:
    """``handler`` with ``guard(context)`` awaited before its behaviour runs; the guard refuses a
    call by aborting it. For checks that need the call's context (e.g. its peer certificate),
    which an interceptor's ``intercept_service`` does not get."""
    if handler.request_streaming:
        return handler  # no client-streaming RPC in this server
    if handler.response_streaming:
        inner_stream: Any = handler.unary_stream

        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            await guard(context)
            async for response in inner_stream(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )
    inner_unary: Any = handler.unary_unary

    async def unary(request: Any, context: Context) -> Any:
        await guard(context)
        return await inner_unary(request, context)

    return grpc.unary_unary_rpc_method_handler(
        unary, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


@dataclass(frozen=True)
class MalformedRequest:
    """Stands in for a request message that could not be decoded (corrupt wire bytes, invalid
    UTF-8 in a string field, nesting too deep), so the call is refused like any bad request
    instead of ending UNKNOWN with a traceback in the log."""

    error: str


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, or anything a decoder raises
            return MalformedRequest(clip(str(exc), MAX_DESCRIPTION_CHARS))

    return deserialize


async def _refuse_if_malformed(request: Any, call: CallRecord, context: Context) -> None:
    """INVALID_ARGUMENT with reason MALFORMED_REQUEST (under a new request id) for a message that
    could not be decoded; counted as rejected "malformed"."""
    if not isinstance(request, MalformedRequest):
        return
    call.request_id = new_request_id()
    call.rejected = "malformed"
    status = rich_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"the request message could not be decoded: {request.error}",
        MALFORMED_REQUEST,
        call.request_id,
    )
    await context.abort(status.code, status.details, status.trailing_metadata)


ACCESS_FIELDS = (
    "rpc",
    "code",
    "prompt_tokens",
    "completion_tokens",
    "finish_reason",
    "queue_ms",
    "ttft_ms",
    "total_ms",
    "error",
)


def _finished_fields(finished: Finished, total_ms: float) -> dict[str, object]:
    return {
        "prompt_tokens": finished.usage.prompt_tokens,
        "completion_tokens": finished.usage.completion_tokens,
        "finish_reason": finished.reason.value,
        "queue_ms": _ms(finished.timing.queue_seconds),
        "ttft_ms": _ms(finished.timing.time_to_first_token_seconds),
        "total_ms": total_ms,
    }


def _ordered(fields: dict[str, object]) -> dict[str, object]:
    """The access fields first, in a fixed order (each present, None when unknown), then the rest."""
    ordered: dict[str, object] = {key: fields.get(key) for key in ACCESS_FIELDS}
    ordered.update((key, value) for key, value in fields.items() if key not in ordered)
    return ordered
