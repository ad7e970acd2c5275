"""The gpt2.v1.TextGeneration servicer: convert the request, call the engine, convert back.

Every RPC runs inside ``_call``: it sets the request id for logging, enters the serving gate
(UNAVAILABLE while loading or draining) and turns errors into statuses through api/status.py.
What an RPC learns (request id, prompt, tokens, finish reason, why it was refused) goes to its
``CallRecord`` (api/accounting.py), which counts it and logs its one access line at its end.
Cancellation (client gone, deadline passed) cancels the handler's task (CancelledError is not an
Exception, so ``_call`` lets it through) and ends the RPC; the RPC's done callback then closes
the engine stream, which aborts the request; its slot is freed at the next engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, NoReturn, TypeAlias

import grpc
from gpt2_client.proto import common_pb2, generation_pb2_grpc
from gpt2_client.proto import generation_pb2 as pb

from gpt2_service.api import convert, scoring
from gpt2_service.api.accounting import CallRecord, FinishedRequest, Prompt, current_call
from gpt2_service.api.gate import ServingGate
from gpt2_service.api.logs import new_request_id, request_id_var
from gpt2_service.api.status import internal_status, status_code_for, status_for_error
from gpt2_service.core.request import GenerationRequest
from gpt2_service.core.sequence import Finished, GenerationOutput
from gpt2_service.engine.frontend import Engine, GenerationStream
from gpt2_service.errors import DeadlineExceededError, EngineError, EngineOverloadedError, InvalidRequestError, clip

log = logging.getLogger(__name__)

MAX_LOGGED_PROMPT_CHARS = 2048
MAX_LOGGED_PROMPT_IDS = 512
# EngineOverloadedError.reason -> the metrics' rejection reason
OVERLOAD_REASONS = {
    "QUEUE_FULL": "queue_full",
    "TENANT_QUEUE_FULL": "tenant_queue_full",
    "DEADLINE_UNMEETABLE": "deadline_unmeetable",
    "TOO_MANY_MODEL_RPCS": "model_rpcs",
}

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


async def _abort(context: Context, status: grpc.Status) -> NoReturn:
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("context.abort returned")  # it always raises


def _rejection(error: EngineError, call: CallRecord) -> str | None:
    """Why a request was refused before any generation (a ``metrics.REJECT_REASONS`` value), or
    None when ``error`` came later or is no refusal."""
    if isinstance(error, InvalidRequestError):
        return "invalid"
    if isinstance(error, EngineOverloadedError) and not call.accepted:
        return OVERLOAD_REASONS.get(error.reason, "queue_full")
    if isinstance(error, DeadlineExceededError) and not call.accepted:
        return "deadline"  # too little time left to start: the engine never saw it
    return None


def tenant_of(call: CallRecord, context: Context) -> str:
    """Who is served: the authenticated identity, else the peer's address without its port
    (``ipv4:10.0.0.7``; one per client host, not per connection)."""
    if call.tenant is not None:
        return call.tenant
    peer: str = context.peer() or ""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        address = address.rpartition(":")[0] or address
    return f"{kind}:{address}" if address else kind


def _prompt_of(request: pb.GenerateRequest) -> Prompt:
    """The prompt as the access log shows it (with --log-prompts): clipped, so a line stays short."""
    if request.WhichOneof("input") == "prompt_token_ids":
        return list(itertools.islice(request.prompt_token_ids.ids, MAX_LOGGED_PROMPT_IDS))
    return clip(request.prompt, MAX_LOGGED_PROMPT_CHARS)


def _score_prompt_of(request: pb.ScoreRequest) -> Prompt:
    """The scored input as the access log shows it (with --log-prompts), clipped."""
    if request.WhichOneof("input") == "token_ids":
        return list(itertools.islice(request.token_ids.ids, MAX_LOGGED_PROMPT_IDS))
    return clip(request.text, MAX_LOGGED_PROMPT_CHARS)


@asynccontextmanager
async def rpc_scope(gate: ServingGate, rpc: str, context: Context, request_id: str) -> AsyncIterator[Engine]:
    """The frame of every RPC of every gpt2.v1 service: the request id for logging, a place in
    the serving gate (UNAVAILABLE while loading or draining), and errors as statuses. Expected
    failures are logged by the call's access line; faults here, with their traceback."""
    call = current_call()
    call.request_id = request_id
    token = request_id_var.set(request_id)
    try:
        async with gate.enter() as engine:
            yield engine
    except EngineError as exc:
        if isinstance(exc, InvalidRequestError):
            exc = convert.with_prefix(exc, "")  # the engine's field paths, as proto paths
        if status_code_for(exc) is grpc.StatusCode.INTERNAL:
            log.error("%s failed: %s", rpc, exc, exc_info=exc)
        call.rejected = _rejection(exc, call)
        await _abort(context, status_for_error(exc, request_id))
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except Exception:
        log.exception("%s failed", rpc)
        await _abort(context, internal_status(request_id))
    finally:
        # a streaming handler's generator cut short is finalised in another context
        with contextlib.suppress(ValueError):
            request_id_var.reset(token)


class TextGenerationServicer(generation_pb2_grpc.TextGenerationServicer):
    def __init__(self, gate: ServingGate, max_batch_requests: int) -> None:
        self._gate = gate
        self._max_batch_requests = max_batch_requests

    def _call(self, rpc: str, context: Context, request_id: str) -> AbstractAsyncContextManager[Engine]:
        return rpc_scope(self._gate, rpc, context, request_id)

    async def _submit(
        self, engine: Engine, request: pb.GenerateRequest, call: CallRecord, context: Context, streamed: bool = False
    ) -> GenerationStream:
        def to_engine(deadline: float | None) -> GenerationRequest:
            return convert.to_engine_request(request, call.request_id, deadline, engine.limits, call.tenant or "")

        return await self._submit_as(engine, to_engine, convert.is_large(request), call, context, streamed)

    async def _submit_as(
        self,
        engine: Engine,
        to_engine: Callable[[float | None], GenerationRequest],
        large: bool,
        call: CallRecord,
        context: Context,
        streamed: bool = False,
    ) -> GenerationStream:
        """The call's one engine request, made by ``to_engine(deadline)`` (on a worker thread
        when ``large``) once the queue has room, submitted, and aborted when the RPC ends."""
        deadline = convert.deadline_from_time_remaining(context.time_remaining())
        engine.check_admission()  # a full queue refuses before any conversion
        call.tenant = tenant_of(call, context)
        engine_request = await asyncio.to_thread(to_engine, deadline) if large else to_engine(deadline)
        call.request = engine_request = call.traced(engine_request)
        stream = await engine.submit(engine_request, validated=True, backpressure=streamed)
        _close_when_done(context, stream)
        call.accepted, call.prompt_tokens = True, stream.prompt_tokens
        call.sequences.append(stream.sequence)
        return stream

    async def _run_batch(
        self,
        engine: Engine,
        num_requests: int,
        to_engine: Callable[[float | None], list[GenerationRequest]],
        large: bool,
        call: CallRecord,
        context: Context,
    ) -> tuple[list[GenerationRequest], list[tuple[list[GenerationOutput], Finished]]]:
        """A batch call's items, made by ``to_engine(deadline)`` (on a worker thread when
        ``large``) once its size and the queue allow, and their results in order (``_run_all``)."""
        convert.check_batch_size(num_requests, self._max_batch_requests)  # before any work
        deadline = convert.deadline_from_time_remaining(context.time_remaining())
        engine.check_admission()
        call.tenant = tenant_of(call, context)
        items = await asyncio.to_thread(to_engine, deadline) if large else to_engine(deadline)
        return items, await _run_all(engine, items, call, context)

    async def Generate(self, request: pb.GenerateRequest, context: Context) -> pb.GenerateResponse:
        call = current_call()
        call.prompt = _prompt_of(request)
        async with self._call("Generate", context, convert.request_id_of(request)) as engine:
            stream = await self._submit(engine, request, call, context)
            outputs, call.finished = await stream.collect()
            return convert.to_response(call.request_id, outputs, call.finished)
        raise AssertionError("unreachable: _call aborts on every error")

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        call = current_call()
        call.prompt = _prompt_of(request)
        async with self._call("GenerateStream", context, convert.request_id_of(request)) as engine:
            # backpressure: a reader that lags pauses the generation; one idle past
            # --stream-idle-timeout gets RESOURCE_EXHAUSTED (STREAM_STALLED) after what was sent
            stream = await self._submit(engine, request, call, context, streamed=True)
            try:
                async for response in convert.to_stream_responses(call.request_id, _recorded(call, stream)):
                    yield response
            finally:
                stream.close()

    async def GenerateBatch(self, request: pb.GenerateBatchRequest, context: Context) -> pb.GenerateBatchResponse:
        call = current_call()
        async with self._call("GenerateBatch", context, new_request_id()) as engine:  # the batch's own id

            def to_engine(deadline: float | None) -> list[GenerationRequest]:
                return convert.to_engine_batch(request, deadline, engine.limits, call.tenant or "", call.request_id)

            large = any(convert.is_large(item) for item in request.requests)
            items, results = await self._run_batch(engine, len(request.requests), to_engine, large, call, context)
            call.items = [
                FinishedRequest(item.request_id, _prompt_of(message), finished)
                for item, message, (_, finished) in zip(items, request.requests, results, strict=True)
            ]
            return pb.GenerateBatchResponse(
                responses=[
                    convert.to_response(item.request_id, outputs, finished)
                    for item, (outputs, finished) in zip(items, results, strict=True)
                ]
            )
        raise AssertionError("unreachable: _call aborts on every error")

    async def Score(self, request: pb.ScoreRequest, context: Context) -> pb.ScoreResponse:
        call = current_call()
        call.prompt = _score_prompt_of(request)
        async with self._call("Score", context, convert.request_id_of(request)) as engine:

            def to_engine(deadline: float | None) -> GenerationRequest:
                args = (call.request_id, deadline, engine.limits, engine.tokenizer, call.tenant or "")
                return scoring.to_engine_score(request, *args)

            stream = await self._submit_as(engine, to_engine, scoring.is_large(request), call, context)
            _, call.finished = await stream.collect()
            return scoring.to_score_response(call.request_id, call.finished)
        raise AssertionError("unreachable: _call aborts on every error")

    async def ScoreBatch(self, request: pb.ScoreBatchRequest, context: Context) -> pb.ScoreBatchResponse:
        call = current_call()
        async with self._call("ScoreBatch", context, new_request_id()) as engine:  # the batch's own id

            def to_engine(deadline: float | None) -> list[GenerationRequest]:
                args = (deadline, engine.limits, engine.tokenizer, call.tenant or "", call.request_id)
                return scoring.to_engine_scores(request, *args)

            large = any(scoring.is_large(item) for item in request.requests)
            items, results = await self._run_batch(engine, len(request.requests), to_engine, large, call, context)
            call.items = [
                FinishedRequest(item.request_id, _score_prompt_of(message), finished)
                for item, message, (_, finished) in zip(items, request.requests, results, strict=True)
            ]
            return pb.ScoreBatchResponse(
                responses=[
                    scoring.to_score_response(item.request_id, finished)
                    for item, (_, finished) in zip(items, results, strict=True)
                ]
            )
        raise AssertionError("unreachable: _call aborts on every error")

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Context) -> common_pb2.ModelInfo:
        async with self._call("GetModelInfo", context, new_request_id()) as engine:
            return convert.to_model_info(engine, self._max_batch_requests)
        raise AssertionError("unreachable: _call aborts on every error")


async def _run_all(
    engine: Engine, items: list[GenerationRequest], call: CallRecord, context: Context
) -> list[tuple[list[GenerationOutput], Finished]]:
    """A batch call's items submitted one after another (all of them running on the engine
    before the first is read), then their results in order; every item is aborted if the call
    ends first."""
    streams: list[GenerationStream] = []
    try:
        for i, item in enumerate(items):
            try:
                streams.append(await engine.submit(call.traced(item), validated=True))
                _close_when_done(context, streams[-1])
                call.accepted = True
                call.sequences.append(streams[-1].sequence)
            except InvalidRequestError as exc:  # e.g. a prompt too long under REJECT
                raise convert.with_prefix(exc, f"requests[{i}].") from None
        return [await stream.collect() for stream in streams]
    finally:
        for stream in streams:
            stream.close()


def _close_when_done(context: Context, stream: GenerationStream) -> None:
    """Abort the engine request when the RPC ends, however it ends (a cancelled handler's
    generator may be finalised late, so its ``finally`` is not enough)."""
    context.add_done_callback(lambda _context: stream.close())  # type: ignore[arg-type]  # stubs want a class


async def _recorded(call: CallRecord, stream: GenerationStream) -> AsyncIterator[GenerationOutput]:
    async for out in stream:
        call.completion_tokens = (call.completion_tokens or 0) + len(out.tokens)
        if out.finished is not None:
            call.finished = out.finished
        yield out
