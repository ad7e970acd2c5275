"""``AsyncClient``: the asyncio twin of ``Client`` (same arguments, same results, same errors).

Create it inside the event loop that uses it (gRPC's asyncio channels belong to one loop), and
close it with ``await client.close()`` or ``async with``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from functools import cached_property
from types import TracebackType
from typing import Any, Literal, Unpack

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpt2_client.channel import DEFAULT_TARGET, ChannelConfig, ConnectionOptions
from gpt2_client.errors import error_from_rpc
from gpt2_client.inspect import AsyncInspect
from gpt2_client.params import (
    BatchItem,
    GenerationParams,
    Prompt,
    ScoreItem,
    ScoreParams,
    build_batch,
    build_request,
    build_score_batch,
    build_score_request,
)
from gpt2_client.proto import generation_pb2 as pb
from gpt2_client.proto import generation_pb2_grpc
from gpt2_client.results import (
    Generation,
    HealthStatus,
    ModelInfo,
    ScoreResult,
    StreamChunk,
    chunk_from_proto,
    generation_from_proto,
    health_status_from_proto,
    model_info_from_proto,
    score_result_from_proto,
)


class AsyncClient:
    """See ``Client`` for the arguments; every call is a coroutine, ``stream`` an async iterator."""

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        **connection: Unpack[ConnectionOptions],
    ) -> None:
        self.config = ChannelConfig.connect(target, **connection)
        self.timeout = timeout
        self._channel = self.config.open_aio()
        self._stub: generation_pb2_grpc.TextGenerationAsyncStub = generation_pb2_grpc.TextGenerationStub(self._channel)
        self._health: Any = health_pb2_grpc.HealthStub(self._channel)  # grpc-stubs type only the sync flavour

    # -- lifecycle -----------------------------------------------------------------------------

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    # -- calls ---------------------------------------------------------------------------------

    async def generate(
        self, prompt: Prompt = "", *, timeout: float | None = None, **params: Unpack[GenerationParams]
    ) -> Generation:
        request = build_request(prompt, params)
        try:
            response = await self._stub.Generate(request, timeout=self._timeout(timeout))
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        return generation_from_proto(response)

    async def stream(
        self, prompt: Prompt = "", *, timeout: float | None = None, **params: Unpack[GenerationParams]
    ) -> AsyncIterator[StreamChunk]:
        """Leaving the ``async for`` early (or cancelling the task) cancels the generation. With
        ``n`` > 1 the chunks of the choices interleave, tagged with ``choice_index`` (see
        ``Client.stream``)."""
        request = build_request(prompt, params)
        call = self._stub.GenerateStream(request, timeout=self._timeout(timeout))
        try:
            async for response in call:
                yield chunk_from_proto(response)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()

    async def generate_batch(
        self,
        prompts: Sequence[Prompt | BatchItem],
        *,
        timeout: float | None = None,
        **params: Unpack[GenerationParams],
    ) -> list[Generation]:
        request = build_batch(prompts, params)
        try:
            response = await self._stub.GenerateBatch(request, timeout=self._timeout(timeout))
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        return [generation_from_proto(r) for r in response.responses]

    async def score(
        self,
        text: str | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        context: str | None = None,
        context_token_ids: Sequence[int] | None = None,
        add_bos: bool = False,
        top_logprobs: int = 0,
        priority: Literal["interactive", "default", "batch"] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> ScoreResult:
        request = build_score_request(
            {
                "text": text, "token_ids": token_ids, "context": context, "context_token_ids": context_token_ids,
                "add_bos": add_bos, "top_logprobs": top_logprobs, "priority": priority, "request_id": request_id,
            }
        )  # fmt: skip
        try:
            response = await self._stub.Score(request, timeout=self._timeout(timeout))
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        return score_result_from_proto(response)

    async def score_batch(
        self,
        items: Sequence[Prompt | ScoreItem],
        *,
        timeout: float | None = None,
        **params: Unpack[ScoreParams],
    ) -> list[ScoreResult]:
        request = build_score_batch(items, params)
        try:
            response = await self._stub.ScoreBatch(request, timeout=self._timeout(timeout))
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        return [score_result_from_proto(r) for r in response.responses]

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        try:
            response = await self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self._timeout(timeout))
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        return model_info_from_proto(response)

    @cached_property
    def inspect(self) -> AsyncInspect:
        """The Introspection calls (gpt2_client.inspect): tokens, embeddings, attention, hidden states, ..."""
        return AsyncInspect(self._channel, self._timeout)

    async def health(self, service: str = "", *, timeout: float | None = None) -> HealthStatus:
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response = await self._health.Check(request, timeout=self._timeout(timeout))
        except grpc.aio.AioRpcError as exc:
            error = error_from_rpc(exc)
            if error.code is grpc.StatusCode.NOT_FOUND:
                return HealthStatus.SERVICE_UNKNOWN
            raise error from None
        return health_status_from_proto(response.status)
