"""gRPC method-handler plumbing shared by the interceptors: run a check before a behaviour, and
decode requests so that an undecodable message reaches the behaviour as a value, not an error."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc

from gpt2_service.errors import MAX_DESCRIPTION_CHARS, clip

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"

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


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, or anything a decoder raises
            return MalformedRequest(clip(str(exc), MAX_DESCRIPTION_CHARS))

    return deserialize
