"""``client.inspect``: the gpt2.v1.Introspection calls, returning frozen dataclasses of numpy arrays.

    with Client("localhost:50051") as client:
        client.inspect.tokenize("cat sat on the").token_ids          # [9246, 3332, 319, 262]
        sims = client.inspect.embed("bank is near the river bank").cosine_similarity  # (6, 6)
        weights = client.inspect.attention("cat sat on the", layers=[0]).weights     # (1, 12, 4, 4)
        for c in client.inspect.predict_next("cat sat on the", top_k=5).candidates:
            print(repr(c.text), c.probability)

``AsyncInspect`` (``async_client.inspect``) is the asyncio twin. Every input is text or token ids;
tensors arrive as float32 arrays whatever ``dtype`` they travelled as (float16 and bfloat16 halve
the bytes on the wire). Failed calls raise ``GPT2Error`` subclasses, as the rest of the client.
Needs numpy, not torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, TypeVar, Unpack

import grpc
import grpc.aio

from gpt2_client.errors import error_from_rpc
from gpt2_client.params import Prompt
from gpt2_client.proto import common_pb2, introspection_pb2_grpc
from gpt2_client.proto import introspection_pb2 as pb
from gpt2_client.tensors import DTYPE_TO_PROTO, FloatArray, TensorDtype, decode_tensor

M = TypeVar("M")
R = TypeVar("R")
DtypeLike = TensorDtype | str  # "float32", "float16" or "bfloat16"
Timeout = Callable[[float | None], float | None]


# -- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputToken:
    """One token of the input: its id, its text on its own (U+FFFD where it holds part of a
    character), the raw bytes it stands for, and its char offsets [start, end) into the text."""

    id: int
    text: str
    data: bytes
    start: int
    end: int

    @property
    def partial(self) -> bool:
        """True when the piece's bytes are not valid UTF-8 on their own."""
        try:
            self.data.decode("utf-8")
        except UnicodeDecodeError:
            return True
        return False


@dataclass(frozen=True)
class TokenizeResult:
    text: str  # the text the offsets index into (the input, or the decoded token ids)
    tokens: tuple[InputToken, ...]

    @property
    def token_ids(self) -> list[int]:
        return [t.id for t in self.tokens]


@dataclass(frozen=True, eq=False)
class EmbedResult:
    tokens: tuple[InputToken, ...]
    token_embeddings: FloatArray  # [seq, d_model], rows of wte
    position_embeddings: FloatArray  # [seq, d_model], rows 0..seq-1 of wpe
    input_embeddings: FloatArray  # [seq, d_model], their sum: what block 0 reads
    cosine_similarity: FloatArray  # [seq, seq] of the input embeddings


@dataclass(frozen=True, eq=False)
class AttentionResult:
    tokens: tuple[InputToken, ...]
    layers: tuple[int, ...]  # block of each entry of axis 0
    heads: tuple[int, ...]  # head of each entry of axis 1
    weights: FloatArray  # [layers, heads, seq, seq]; row = query, column = key; causal
    scores: FloatArray | None  # same shape, before softmax (-inf above the diagonal); if asked for


@dataclass(frozen=True, eq=False)
class HiddenStatesResult:
    tokens: tuple[InputToken, ...]
    layers: tuple[int, ...]  # 0 = embeddings, i = after block i, n_layer = after the final LayerNorm
    positions: tuple[int, ...]  # token position of each entry of axis 1
    norms: FloatArray  # [layers, positions]
    vectors: FloatArray | None  # [layers, positions, d_model] if asked for


@dataclass(frozen=True)
class Candidate:
    id: int
    text: str
    logit: float  # raw LM-head output
    probability: float  # softmax of the raw logits
    sampled_probability: float  # after temperature and the filters


@dataclass(frozen=True)
class PredictNextResult:
    tokens: tuple[InputToken, ...]
    candidates: tuple[Candidate, ...]  # most probable first
    greedy_token: Candidate
    sampled_tokens: tuple[Candidate, ...]  # in draw order
    seed: int  # the seed of the draws (the server's choice when none was given)
    entropy: float  # of the raw next-token distribution, in nats


@dataclass(frozen=True)
class TensorStats:
    mean: float
    std: float
    l2_norm: float
    min: float
    max: float


@dataclass(frozen=True)
class Stage:
    """One stage of the forward pass; shapes leave out the batch axis."""

    name: str  # tokenizer, embedding, block.<i>.attention, block.<i>.mlp, final_layer_norm, lm_head, sampling
    layer: int | None
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    seconds: float
    output_stats: TensorStats | None  # None where the output is token ids


@dataclass(frozen=True)
class TraceResult:
    tokens: tuple[InputToken, ...]
    stages: tuple[Stage, ...]  # in dataflow order
    prediction: PredictNextResult
    seconds: float


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


# -- responses -----------------------------------------------------------------------------------


def _tokens(messages: Sequence[pb.InputToken]) -> tuple[InputToken, ...]:
    return tuple(
        InputToken(t.id, t.text, t.data if t.partial else t.text.encode("utf-8"), t.start, t.end) for t in messages
    )


def _optional_tensor(message: Any, name: str) -> FloatArray | None:
    return decode_tensor(getattr(message, name)) if message.HasField(name) else None


def tokenize_from_proto(m: pb.TokenizeResponse) -> TokenizeResult:
    return TokenizeResult(m.text, _tokens(m.tokens))


def detokenize_from_proto(m: pb.DetokenizeResponse) -> str:
    return m.text


def embed_from_proto(m: pb.EmbedResponse) -> EmbedResult:
    return EmbedResult(
        tokens=_tokens(m.tokens),
        token_embeddings=decode_tensor(m.token_embeddings),
        position_embeddings=decode_tensor(m.position_embeddings),
        input_embeddings=decode_tensor(m.input_embeddings),
        cosine_similarity=decode_tensor(m.cosine_similarity),
    )


def attention_from_proto(m: pb.AttentionResponse) -> AttentionResult:
    return AttentionResult(
        tokens=_tokens(m.tokens),
        layers=tuple(m.layers),
        heads=tuple(m.heads),
        weights=decode_tensor(m.weights),
        scores=_optional_tensor(m, "scores"),
    )


def hidden_states_from_proto(m: pb.HiddenStatesResponse) -> HiddenStatesResult:
    return HiddenStatesResult(
        tokens=_tokens(m.tokens),
        layers=tuple(m.layers),
        positions=tuple(m.positions),
        norms=decode_tensor(m.norms),
        vectors=_optional_tensor(m, "vectors"),
    )


def _candidate(c: pb.Candidate) -> Candidate:
    return Candidate(c.id, c.text, c.logit, c.probability, c.sampled_probability)


def predict_next_from_proto(m: pb.PredictNextResponse) -> PredictNextResult:
    return PredictNextResult(
        tokens=_tokens(m.tokens),
        candidates=tuple(_candidate(c) for c in m.candidates),
        greedy_token=_candidate(m.greedy_token),
        sampled_tokens=tuple(_candidate(c) for c in m.sampled_tokens),
        seed=m.seed,
        entropy=m.entropy,
    )


def _stage(s: pb.Stage) -> Stage:
    stats = s.output_stats
    return Stage(
        name=s.name,
        layer=s.layer if s.HasField("layer") else None,
        input_shape=tuple(s.input_shape),
        output_shape=tuple(s.output_shape),
        seconds=s.seconds,
        output_stats=(
            TensorStats(stats.mean, stats.std, stats.l2_norm, stats.min, stats.max)
            if s.HasField("output_stats")
            else None
        ),
    )


def trace_from_proto(m: pb.TraceResponse) -> TraceResult:
    return TraceResult(
        tokens=_tokens(m.tokens),
        stages=tuple(_stage(s) for s in m.stages),
        prediction=predict_next_from_proto(m.prediction),
        seconds=m.seconds,
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
