"""The gpt2.v1.TextGeneration servicer: convert the request, call the engine, convert back.

Every RPC runs inside ``_call``: it sets the request id for logging, enters the serving gate
(UNAVAILABLE while loading or draining) and turns errors into statuses through api/status.py.
Cancellation (client gone, deadline passed) cancels the handler's task (CancelledError is not an
Exception, so ``_call`` lets it through) and ends the RPC; the RPC's done callback then closes
the engine stream, which aborts the request; its slot is freed at the next engine step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NoReturn, TypeAlias

import grpc
from gpt2_client.proto import common_pb2, generation_pb2_grpc
from gpt2_client.proto import generation_pb2 as pb

from gpt2_service.api import convert
from gpt2_service.api.gate import ServingGate
from gpt2_service.api.logs import new_request_id, request_id_var
from gpt2_service.api.status import internal_status, status_code_for, status_for_error
from gpt2_service.engine import Engine, GenerationStream
from gpt2_service.errors import EngineError, InvalidRequestError
from gpt2_service.sequence import Finished, GenerationOutput

log = logging.getLogger(__name__)

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

# Expected outcomes are logged quietly; INTERNAL is logged with its traceback.
_LOG_LEVEL_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: logging.INFO,
    grpc.StatusCode.DEADLINE_EXCEEDED: logging.INFO,
    grpc.StatusCode.UNAVAILABLE: logging.INFO,
    grpc.StatusCode.RESOURCE_EXHAUSTED: logging.WARNING,
}


async def _abort(context: Context, status: grpc.Status) -> NoReturn:
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("context.abort returned")  # it always raises


def _log_finished(rpc: str, request_id: str, finished: Finished) -> None:
    log.info(
        "%s finished: reason=%s prompt_tokens=%d completion_tokens=%d ttft=%.3fs total=%.3fs",
        rpc, finished.reason.name, finished.usage.prompt_tokens, finished.usage.completion_tokens,
        finished.timing.time_to_first_token_seconds, finished.timing.total_seconds,
        extra={"request_id": request_id},
    )  # fmt: skip


class TextGenerationServicer(generation_pb2_grpc.TextGenerationServicer):
    def __init__(self, gate: ServingGate, max_batch_requests: int) -> None:
        self._gate = gate
        self._max_batch_requests = max_batch_requests

    @asynccontextmanager
    async def _call(self, rpc: str, context: Context, request_id: str) -> AsyncIterator[Engine]:
        token = request_id_var.set(request_id)
        try:
            async with self._gate.enter() as engine:
                yield engine
        except EngineError as exc:
            if isinstance(exc, InvalidRequestError):
                exc = convert.with_prefix(exc, "")  # the engine's field paths, as proto paths
            code = status_code_for(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.error("%s failed: %s", rpc, exc, exc_info=exc)
            else:
                log.log(_LOG_LEVEL_BY_CODE.get(code, logging.INFO), "%s: %s %s", rpc, code.name, exc)
            await _abort(context, status_for_error(exc, request_id))
        except asyncio.CancelledError:
            log.info("%s cancelled (client gone, deadline passed, or server stopping)", rpc)
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("%s failed", rpc)
            await _abort(context, internal_status(request_id))
        finally:
            request_id_var.reset(token)

    async def _submit(
        self, engine: Engine, request: pb.GenerateRequest, request_id: str, context: Context
    ) -> GenerationStream:
        deadline = convert.deadline_from_time_remaining(context.time_remaining())
        stream = await engine.submit(convert.to_engine_request(request, request_id, deadline, engine.limits))
        _close_when_done(context, stream)
        return stream

    async def Generate(self, request: pb.GenerateRequest, context: Context) -> pb.GenerateResponse:
        request_id = convert.request_id_of(request)
        async with self._call("Generate", context, request_id) as engine:
            stream = await self._submit(engine, request, request_id, context)
            outputs, finished = await stream.collect()
            _log_finished("Generate", request_id, finished)
            return convert.to_response(request_id, outputs, finished)
        raise AssertionError("unreachable: _call aborts on every error")

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        request_id = convert.request_id_of(request)
        async with self._call("GenerateStream", context, request_id) as engine:
            stream = await self._submit(engine, request, request_id, context)
            try:
                async for response in convert.to_stream_responses(request_id, _logged(request_id, stream)):
                    yield response
            finally:
                stream.close()

    async def GenerateBatch(self, request: pb.GenerateBatchRequest, context: Context) -> pb.GenerateBatchResponse:
        batch_id = new_request_id()
        async with self._call("GenerateBatch", context, batch_id) as engine:
            convert.check_batch_size(len(request.requests), self._max_batch_requests)  # before any work
            deadline = convert.deadline_from_time_remaining(context.time_remaining())
            items = convert.to_engine_batch(request, deadline, engine.limits)
            streams: list[GenerationStream] = []
            try:
                for i, item in enumerate(items):
                    try:
                        streams.append(await engine.submit(item))
                        _close_when_done(context, streams[-1])
                    except InvalidRequestError as exc:  # e.g. a prompt too long under REJECT
                        raise convert.with_prefix(exc, f"requests[{i}].") from None
                # Every item is already running on the engine; reading them in order just waits.
                results = [await stream.collect() for stream in streams]
            finally:
                for stream in streams:
                    stream.close()
            for item, (_, finished) in zip(items, results, strict=True):
                _log_finished("GenerateBatch", item.request_id, finished)
            return pb.GenerateBatchResponse(
                responses=[
                    convert.to_response(item.request_id, outputs, finished)
                    for item, (outputs, finished) in zip(items, results, strict=True)
                ]
            )
        raise AssertionError("unreachable: _call aborts on every error")

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Context) -> common_pb2.ModelInfo:
        async with self._call("GetModelInfo", context, new_request_id()) as engine:
            return convert.to_model_info(engine, self._max_batch_requests)
        raise AssertionError("unreachable: _call aborts on every error")


def _close_when_done(context: Context, stream: GenerationStream) -> None:
    """Abort the engine request when the RPC ends, however it ends (a cancelled handler's
    generator may be finalised late, so its ``finally`` is not enough)."""
    context.add_done_callback(lambda _context: stream.close())  # type: ignore[arg-type]  # stubs want a class


async def _logged(request_id: str, stream: GenerationStream) -> AsyncIterator[GenerationOutput]:
    async for out in stream:
        if out.finished is not None:
            _log_finished("GenerateStream", request_id, out.finished)
        yield out
