"""RPC accounting, as the server's outermost interceptor: every RPC of the gpt2 services ends with
exactly one final status code, which is counted (``gpt2_requests_total``, and the rejected and
cancelled counters) and logged as the request's one access line. Health and reflection RPCs are
neither counted nor logged (probes every few seconds would drown the rest). Not the error table
(api/status.py), nor the metric definitions (metrics/).

grpc.aio interceptors see the handler, not the outcome, so this one wraps the handler's
behaviour: it notes how the behaviour ended (returned: the context's code, else OK; aborted: the
abort's code; raised: UNKNOWN, as grpc answers then), and a done callback on the RPC, which grpc
runs once when the call is over, accounts for it. A behaviour that never ended was cut short: by
its deadline (DEADLINE_EXCEEDED), by the server stopping (UNAVAILABLE), or by the client
(CANCELLED). The line itself is api/access_log.py's. The servicer adds what only it knows (request id, tokens, finish reason, why a
request was rejected) to ``current_call()``; other interceptors placed after this one report a
rejection with ``note_rejected``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from gpt2_service.api.access_log import log_access
from gpt2_service.api.handlers import Context, Handler, MalformedRequest, tolerant
from gpt2_service.api.logs import NO_REQUEST, new_request_id
from gpt2_service.api.status import MALFORMED_REQUEST, rich_status
from gpt2_service.core.request import GenerationRequest
from gpt2_service.core.sequence import Finished, Sequence
from gpt2_service.metrics import REJECT_REASONS, Metrics

log = logging.getLogger(__name__)


# The gpt2.v1 services (TextGeneration, Introspection); not grpc.health.v1 nor reflection.
COUNTED_METHOD_PREFIXES = ("/gpt2.",)

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
    from gpt2_service.api.tracing import RpcTracing

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
    method: str = ""  # its full name, e.g. "/gpt2.v1.TextGeneration/Generate"
    started: float = field(default_factory=time.monotonic)
    request_id: str = NO_REQUEST
    prompt: Prompt = None  # logged only with --log-prompts
    accepted: bool = False  # the engine took the request (or one of the batch's)
    prompt_tokens: int | None = None  # after truncation; known once accepted
    completion_tokens: int | None = None  # so far (a stream counts them as they go)
    finished: Finished | None = None
    items: list[FinishedRequest] = field(default_factory=list)  # GenerateBatch, when it succeeded
    tenant: str | None = None  # the authenticated identity (--auth-token-file); None: the peer's
    rejected: str | None = None  # one of metrics.REJECT_REASONS
    outcome: grpc.StatusCode | None = None  # how the behaviour ended; None: not (yet), cut short
    code: grpc.StatusCode | None = None  # the final code, once accounted for
    # --trace only (api/tracing.py): the RPC's span, its engine request and its sequences
    span: Any = None
    request: GenerationRequest | None = None
    sequences: list[Sequence] = field(default_factory=list)

    def traced(self, request: GenerationRequest) -> GenerationRequest:
        """``request`` labelled with the call's trace id when the call is sampled (the engine's
        metrics put it on their latency exemplars); ``request`` itself otherwise."""
        if self.span is None or not self.span.is_recording():
            return request
        return dataclasses.replace(request, trace_id=format(self.span.get_span_context().trace_id, "032x"))

    @property
    def trace_ids(self) -> tuple[str, str] | None:
        """(trace id, span id) of its span when traced, for its log lines."""
        if self.span is None:
            return None
        ctx = self.span.get_span_context()
        return (format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")) if ctx.is_valid else None


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

    def __init__(
        self, metrics: Metrics | None = None, log_prompts: bool = False, tracing: RpcTracing | None = None
    ) -> None:
        self._metrics = metrics
        self._log_prompts = log_prompts
        self._tracing = tracing
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
        call = CallRecord(rpc=method.rpartition("/")[2], method=method)
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
            request_deserializer=tolerant(handler.request_deserializer),
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
        if self._tracing is not None:
            call.span = self._tracing.start(call.method, context)
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
        log_access(call, code, None if code is grpc.StatusCode.OK else error, self._log_prompts)
        if self._tracing is not None:
            self._tracing.finish(call, code, None if code is grpc.StatusCode.OK else error)


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
