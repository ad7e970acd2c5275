"""``client.inspect``: the gpt2.v1.Introspection calls, returning frozen dataclasses of numpy arrays
(``gpt2_client.inspect_results``, re-exported here).

    with Client("localhost:50051") as client:
        client.inspect.tokenize("cat sat on the").token_ids          # [9246, 3332, 319, 262]
        sims = client.inspect.embed("bank is near the river bank").cosine_similarity  # (6, 6)
        weights = client.inspect.attention("cat sat on the", layers=[0]).weights     # (1, 12, 4, 4)
        for c in client.inspect.predict_next("cat sat on the", top_k=5).candidates:
            print(repr(c.text), c.probability)
        for step in client.inspect.trace_generation("cat sat on the", top_k=5, seed=1):
            print(step.step, repr(step.chosen.text), step.uniform)

``AsyncInspect`` (``async_client.inspect``) is the asyncio twin. Every input is text or token ids;
tensors arrive as float32 arrays whatever ``dtype`` they travelled as (float16 and bfloat16 halve
the bytes on the wire). Failed calls raise ``GPT2Error`` subclasses, as the rest of the client.
Needs numpy, not torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypedDict, TypeVar, Unpack

import grpc
import grpc.aio

from gpt2_client.errors import error_from_rpc
from gpt2_client.inspect_results import (
    AttentionResult,
    Candidate,
    ChosenToken,
    EmbedResult,
    GenerationStep,
    HiddenStatesResult,
    InputToken,
    PredictNextResult,
    Stage,
    StepCandidate,
    TensorStats,
    TokenizeResult,
    TraceResult,
    attention_from_proto,
    detokenize_from_proto,
    embed_from_proto,
    generation_step_from_proto,
    hidden_states_from_proto,
    predict_next_from_proto,
    tokenize_from_proto,
    trace_from_proto,
)
from gpt2_client.params import Prompt
from gpt2_client.proto import common_pb2, introspection_pb2_grpc
from gpt2_client.proto import introspection_pb2 as pb
from gpt2_client.tensors import DTYPE_TO_PROTO, TensorDtype

__all__ = [
    "AsyncInspect",
    "AttentionResult",
    "Candidate",
    "ChosenToken",
    "EmbedResult",
    "GenerationStep",
    "GenerationTraceOptions",
    "HiddenStatesResult",
    "InputToken",
    "Inspect",
    "PredictNextResult",
    "PredictionOptions",
    "Stage",
    "StepCandidate",
    "TensorStats",
    "TokenizeResult",
    "TraceResult",
]

M = TypeVar("M")
R = TypeVar("R")
DtypeLike = TensorDtype | str  # "float32", "float16" or "bfloat16"
Timeout = Callable[[float | None], float | None]


# -- requests ------------------------------------------------------------------------------------


def _input(text: Prompt) -> dict[str, Any]:
    """The ``input`` oneof of a request: text, or token ids."""
    if isinstance(text, str):
        return {"text": text}
    return {"token_ids": common_pb2.TokenIds(ids=list(text))}


def _dtype(dtype: DtypeLike) -> pb.TensorDtype.ValueType:
    return DTYPE_TO_PROTO[TensorDtype(dtype)]


def _set(**values: Any) -> dict[str, Any]:
    """Only the options given (None = unset: the server's default)."""
    return {k: v for k, v in values.items() if v is not None}


class PredictionOptions(TypedDict, total=False):
    """The sampling options of PredictNext and Trace (None or absent = the server's default)."""

    temperature: float | None
    top_k: int | None
    top_p: float | None
    min_p: float | None
    typical_p: float | None
    seed: int | None
    num_samples: int | None
    num_candidates: int | None


class GenerationTraceOptions(TypedDict, total=False):
    """The options of TraceGeneration (None or absent = the server's default)."""

    temperature: float | None
    top_k: int | None
    top_p: float | None
    min_p: float | None
    typical_p: float | None
    seed: int | None
    max_new_tokens: int | None
    num_candidates: int | None
    stop: Sequence[str] | None
    ignore_eos: bool | None


def generation_trace_request(text: Prompt, options: GenerationTraceOptions) -> pb.TraceGenerationRequest:
    values = _set(**options)
    if "stop" in values:
        values["stop"] = list(values["stop"])
    return pb.TraceGenerationRequest(**_input(text), **values)


def tokenize_request(text: Prompt) -> pb.TokenizeRequest:
    return pb.TokenizeRequest(**_input(text))


def embed_request(text: Prompt, dtype: DtypeLike) -> pb.EmbedRequest:
    return pb.EmbedRequest(**_input(text), dtype=_dtype(dtype))


def attention_request(
    text: Prompt, layers: Sequence[int] | None, heads: Sequence[int] | None, include_scores: bool, dtype: DtypeLike
) -> pb.AttentionRequest:
    return pb.AttentionRequest(
        **_input(text), layers=layers or [], heads=heads or [], include_scores=include_scores, dtype=_dtype(dtype)
    )


def hidden_states_request(
    text: Prompt, layers: Sequence[int] | None, last_token_only: bool, include_vectors: bool, dtype: DtypeLike
) -> pb.HiddenStatesRequest:
    return pb.HiddenStatesRequest(
        **_input(text),
        layers=layers or [],
        last_token_only=last_token_only,
        include_vectors=include_vectors,
        dtype=_dtype(dtype),
    )


# -- the calls -----------------------------------------------------------------------------------


class Inspect:
    """The Introspection calls of a ``Client`` (``client.inspect``); same channel, same default
    timeout. ``text`` is always text or a list of token ids; options left None take the server's
    defaults (documented in introspection.proto)."""

    def __init__(self, channel: grpc.Channel, timeout: Timeout) -> None:
        self._stub = introspection_pb2_grpc.IntrospectionStub(channel)
        self._timeout = timeout

    def _call(self, method: Any, request: Any, convert: Callable[[M], R], timeout: float | None) -> R:
        try:
            response: M = method(request, timeout=self._timeout(timeout))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return convert(response)

    def tokenize(self, text: Prompt, *, timeout: float | None = None) -> TokenizeResult:
        """The tokens of ``text`` (or of token ids): ids, piece texts, raw bytes, char offsets."""
        return self._call(self._stub.Tokenize, tokenize_request(text), tokenize_from_proto, timeout)

    def detokenize(self, token_ids: Sequence[int], *, timeout: float | None = None) -> str:
        """The text of ``token_ids`` (special tokens included)."""
        request = pb.DetokenizeRequest(token_ids=common_pb2.TokenIds(ids=list(token_ids)))
        return self._call(self._stub.Detokenize, request, detokenize_from_proto, timeout)

    def embed(self, text: Prompt, *, dtype: DtypeLike = "float32", timeout: float | None = None) -> EmbedResult:
        """Token, position and input embeddings [seq, d_model] and their cosine similarities."""
        return self._call(self._stub.Embed, embed_request(text, dtype), embed_from_proto, timeout)

    def attention(
        self,
        text: Prompt,
        *,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        include_scores: bool = False,
        dtype: DtypeLike = "float32",
        timeout: float | None = None,
    ) -> AttentionResult:
        """Attention weights [layers, heads, seq, seq] (None = every layer / head)."""
        request = attention_request(text, layers, heads, include_scores, dtype)
        return self._call(self._stub.Attention, request, attention_from_proto, timeout)

    def hidden_states(
        self,
        text: Prompt,
        *,
        layers: Sequence[int] | None = None,
        last_token_only: bool = False,
        include_vectors: bool = False,
        dtype: DtypeLike = "float32",
        timeout: float | None = None,
    ) -> HiddenStatesResult:
        """Hidden-state norms [layers, positions] (0 = embeddings ... n_layer = after ln_f), and
        the vectors when ``include_vectors``."""
        request = hidden_states_request(text, layers, last_token_only, include_vectors, dtype)
        return self._call(self._stub.HiddenStates, request, hidden_states_from_proto, timeout)

    def predict_next(
        self,
        text: Prompt,
        *,
        timeout: float | None = None,
        **options: Unpack[PredictionOptions],
    ) -> PredictNextResult:
        """The LM head on the last position: candidates, greedy token, seeded draws, entropy."""
        request = pb.PredictNextRequest(**_input(text), **_set(**options))
        return self._call(self._stub.PredictNext, request, predict_next_from_proto, timeout)

    def trace(
        self,
        text: Prompt,
        *,
        timeout: float | None = None,
        **options: Unpack[PredictionOptions],
    ) -> TraceResult:
        """The dataflow of one forward pass: every stage with shapes, time and statistics."""
        request = pb.TraceRequest(**_input(text), **_set(**options))
        return self._call(self._stub.Trace, request, trace_from_proto, timeout)

    def trace_generation(
        self,
        text: Prompt,
        *,
        timeout: float | None = None,
        **options: Unpack[GenerationTraceOptions],
    ) -> list[GenerationStep]:
        """The autoregressive loop step by step: for each generated token, the context length,
        the candidates before and after temperature and each filter, the token drawn, the
        uniform number that drew it and its place in the seed's stream, and stop/shift events.
        ``timeout`` bounds the whole stream."""
        try:
            stream = self._stub.TraceGeneration(generation_trace_request(text, options), timeout=self._timeout(timeout))
            return [generation_step_from_proto(m) for m in stream]
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None


class AsyncInspect:
    """The asyncio twin of ``Inspect`` (``async_client.inspect``): the same methods, as coroutines."""

    def __init__(self, channel: grpc.aio.Channel, timeout: Timeout) -> None:
        self._stub: Any = introspection_pb2_grpc.IntrospectionStub(channel)  # typed as the sync stub
        self._timeout = timeout

    async def _call(self, method: Any, request: Any, convert: Callable[[M], R], timeout: float | None) -> R:
        try:
            response: M = await method(request, timeout=self._timeout(timeout))
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        return convert(response)

    async def tokenize(self, text: Prompt, *, timeout: float | None = None) -> TokenizeResult:
        return await self._call(self._stub.Tokenize, tokenize_request(text), tokenize_from_proto, timeout)

    async def detokenize(self, token_ids: Sequence[int], *, timeout: float | None = None) -> str:
        request = pb.DetokenizeRequest(token_ids=common_pb2.TokenIds(ids=list(token_ids)))
        return await self._call(self._stub.Detokenize, request, detokenize_from_proto, timeout)

    async def embed(self, text: Prompt, *, dtype: DtypeLike = "float32", timeout: float | None = None) -> EmbedResult:
        return await self._call(self._stub.Embed, embed_request(text, dtype), embed_from_proto, timeout)

    async def attention(
        self,
        text: Prompt,
        *,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        include_scores: bool = False,
        dtype: DtypeLike = "float32",
        timeout: float | None = None,
    ) -> AttentionResult:
        request = attention_request(text, layers, heads, include_scores, dtype)
        return await self._call(self._stub.Attention, request, attention_from_proto, timeout)

    async def hidden_states(
        self,
        text: Prompt,
        *,
        layers: Sequence[int] | None = None,
        last_token_only: bool = False,
        include_vectors: bool = False,
        dtype: DtypeLike = "float32",
        timeout: float | None = None,
    ) -> HiddenStatesResult:
        request = hidden_states_request(text, layers, last_token_only, include_vectors, dtype)
        return await self._call(self._stub.HiddenStates, request, hidden_states_from_proto, timeout)

    async def predict_next(
        self,
        text: Prompt,
        *,
        timeout: float | None = None,
        **options: Unpack[PredictionOptions],
    ) -> PredictNextResult:
        request = pb.PredictNextRequest(**_input(text), **_set(**options))
        return await self._call(self._stub.PredictNext, request, predict_next_from_proto, timeout)

    async def trace(
        self,
        text: Prompt,
        *,
        timeout: float | None = None,
        **options: Unpack[PredictionOptions],
    ) -> TraceResult:
        request = pb.TraceRequest(**_input(text), **_set(**options))
        return await self._call(self._stub.Trace, request, trace_from_proto, timeout)

    async def trace_generation(
        self,
        text: Prompt,
        *,
        timeout: float | None = None,
        **options: Unpack[GenerationTraceOptions],
    ) -> list[GenerationStep]:
        try:
            stream = self._stub.TraceGeneration(generation_trace_request(text, options), timeout=self._timeout(timeout))
            return [generation_step_from_proto(m) async for m in stream]
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
