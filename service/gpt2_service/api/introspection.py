"""The gpt2.v1.Introspection servicer: convert the request, run the Inspector, convert back.

A model RPC's plan (validation, tokenization: work that grows with the input) runs on a worker
thread, so a hostile input is refused without touching the engine; its forward pass and its
response (tensors encoded, bounded by the response budget) are then one job on the engine thread,
run in pieces between generation steps (``engine.run_pieces``: the embedding, each block, the
head, then the response), so it never races a forward pass, a Generate arriving meanwhile waits
for one piece rather than the whole pass, the response's Python work does not compete with the
engine for the GIL from another thread, and its time counts against ``introspection_share``.
At most ``max_model_rpcs`` of them are in flight per server; beyond it a call is refused at once
with RESOURCE_EXHAUSTED (reason ``TOO_MANY_MODEL_RPCS``). Tokenize and Detokenize need no model:
they run on a worker thread, never hold up the engine and are not limited. Errors, the serving
gate and request ids are TextGeneration's (``rpc_scope``). Not here: the numbers themselves
(gpt2_service.introspection.inspector) and the Tensor byte layout (gpt2_client.tensors).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, TypeVar, cast

from gpt2_client.proto import introspection_pb2 as pb
from gpt2_client.proto import introspection_pb2_grpc
from gpt2_client.tensors import DTYPE_FROM_PROTO, ITEM_BYTES, TensorDtype, encode_tensor

from gpt2_service.api.gate import ServingGate
from gpt2_service.api.logs import new_request_id
from gpt2_service.api.servicer import Context, rpc_scope
from gpt2_service.config import ServerConfig
from gpt2_service.core.pieces import Pieces
from gpt2_service.engine.frontend import Engine
from gpt2_service.errors import EngineOverloadedError, FieldViolation, InvalidRequestError
from gpt2_service.introspection.inspector import (
    TRACE_OPTIONS,
    AttentionResult,
    Candidate,
    EmbedResult,
    GenerationStep,
    GenerationTraceOptions,
    HiddenStatesResult,
    Inspector,
    Plan,
    PredictNextResult,
    ResponseBudget,
    SamplingOptions,
    StageTrace,
    TokenInfo,
    TokenizeResult,
    TraceResult,
)

T = TypeVar("T")
R = TypeVar("R")

INTROSPECTION_SERVICE = pb.DESCRIPTOR.services_by_name["Introspection"].full_name
# Room left in a gRPC message for what the Inspector's size estimate leaves out (message framing).
FRAMING_BYTES = 64 * 1024
DEFAULT_MAX_RESPONSE_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_MODEL_RPCS = 2
TOO_MANY_MODEL_RPCS = "TOO_MANY_MODEL_RPCS"  # the ErrorInfo reason of a model RPC beyond the limit
RETRY_AFTER_SECONDS = 0.1  # what a refused model RPC is told to wait before the servicer has timed any

# Request fields passed to the Inspector only when set, so that its defaults apply.
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "seed", "num_samples", "num_candidates")
GENERATION_TRACE_FIELDS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "seed", "max_new_tokens",
                           "num_candidates")  # fmt: skip


class IntrospectionServicer(introspection_pb2_grpc.IntrospectionServicer):
    """Answers through the engine the gate lets in; ``max_response_bytes`` bounds every answer,
    ``max_model_rpcs`` the model RPCs in flight."""

    def __init__(
        self,
        gate: ServingGate,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_model_rpcs: int = DEFAULT_MAX_MODEL_RPCS,
    ) -> None:
        if max_model_rpcs < 1:
            raise ValueError(f"max_model_rpcs must be at least 1, not {max_model_rpcs}")
        self._gate = gate
        self._budget = response_budget(max_response_bytes)
        self._inspector: tuple[Engine, Inspector] | None = None
        self._max_model_rpcs = max_model_rpcs
        self._model_rpcs = 0  # in flight; only the event loop touches it
        self._model_rpc_seconds = RETRY_AFTER_SECONDS  # a moving average: the RetryInfo of a refused call

    @asynccontextmanager
    async def _call(self, rpc: str, context: Context) -> AsyncIterator[tuple[Engine, Inspector]]:
        async with rpc_scope(self._gate, rpc, context, new_request_id()) as engine:
            if self._inspector is None or self._inspector[0] is not engine:
                keep = engine.scheduler.config.context_shift_keep  # a generation trace shifts as generation does
                self._inspector = (engine, Inspector(engine.loaded, self._budget, engine.context_window, keep))
            try:
                yield self._inspector
            except InvalidRequestError as exc:
                raise _with_proto_paths(exc) from None

    async def Tokenize(self, request: pb.TokenizeRequest, context: Context) -> pb.TokenizeResponse:
        async with self._call("Tokenize", context) as (_, inspector):
            result = await asyncio.to_thread(lambda: inspector.tokenize(*_input(request)))
            return to_tokenize_response(result)
        raise AssertionError("unreachable: _call aborts on every error")

    async def Detokenize(self, request: pb.DetokenizeRequest, context: Context) -> pb.DetokenizeResponse:
        async with self._call("Detokenize", context) as (_, inspector):
            return pb.DetokenizeResponse(text=await asyncio.to_thread(inspector.detokenize, request.token_ids.ids))
        raise AssertionError("unreachable: _call aborts on every error")

    @asynccontextmanager
    async def _model_slot(self) -> AsyncIterator[None]:
        """One of the ``max_model_rpcs`` places, or RESOURCE_EXHAUSTED at once."""
        if self._model_rpcs >= self._max_model_rpcs:
            raise EngineOverloadedError(
                f"{self._model_rpcs} Introspection model RPCs in flight, the most this server runs "
                "(--max-model-rpcs); retry later",
                reason=TOO_MANY_MODEL_RPCS,
                retry_after=round(self._model_rpc_seconds, 3),
            )
        self._model_rpcs += 1
        started = time.monotonic()
        try:
            yield
        finally:
            self._model_rpcs -= 1
            self._model_rpc_seconds += 0.2 * (time.monotonic() - started - self._model_rpc_seconds)

    async def _model_rpc(
        self,
        rpc: str,
        context: Context,
        plan: Callable[[Inspector], Plan[T]],
        respond: Callable[[T, TensorDtype], R],
        dtype: int = 0,
    ) -> R:
        """A model RPC, unless ``max_model_rpcs`` are in flight: ``plan`` (validation,
        tokenization: work that grows with the input, so a hostile input is refused without
        touching the engine) on a worker thread, then the forward pass and ``respond`` (the
        response, with its tensors as ``dtype``) as one engine job, a model stage (and then the
        response) per piece, between generation steps."""
        async with self._call(rpc, context) as (engine, inspector):
            tensors = tensor_dtype(dtype)  # an unknown value is refused before any work
            async with self._model_slot():
                run = await asyncio.to_thread(plan, inspector)
                return await engine.run_pieces(_then_respond(run(), respond, tensors))
        raise AssertionError("unreachable: _call aborts on every error")

    async def Embed(self, request: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
        return await self._model_rpc(
            "Embed", context, lambda i: i.plan_embed(*_input(request)), to_embed_response, request.dtype
        )

    async def Attention(self, request: pb.AttentionRequest, context: Context) -> pb.AttentionResponse:
        def plan(i: Inspector) -> Plan[AttentionResult]:
            return i.plan_attention(*_input(request), request.layers, request.heads, request.include_scores)

        return await self._model_rpc("Attention", context, plan, to_attention_response, request.dtype)

    async def HiddenStates(self, request: pb.HiddenStatesRequest, context: Context) -> pb.HiddenStatesResponse:
        def plan(i: Inspector) -> Plan[HiddenStatesResult]:
            layers, last_only, vectors = request.layers, request.last_token_only, request.include_vectors
            return i.plan_hidden_states(*_input(request), layers, last_only, vectors)

        return await self._model_rpc("HiddenStates", context, plan, to_hidden_states_response, request.dtype)

    async def PredictNext(self, request: pb.PredictNextRequest, context: Context) -> pb.PredictNextResponse:
        options = SamplingOptions(**_set_fields(request, SAMPLING_FIELDS))
        return await self._model_rpc(
            "PredictNext",
            context,
            lambda i: i.plan_predict_next(*_input(request), options),
            lambda result, _: to_predict_next_response(result),
        )

    async def Trace(self, request: pb.TraceRequest, context: Context) -> pb.TraceResponse:
        options = replace(TRACE_OPTIONS, **_set_fields(request, SAMPLING_FIELDS))
        return await self._model_rpc(
            "Trace",
            context,
            lambda i: i.plan_trace(*_input(request), options),
            lambda result, _: to_trace_response(result),
        )

    async def TraceGeneration(
        self, request: pb.TraceGenerationRequest, context: Context
    ) -> AsyncIterator[pb.GenerationStep]:
        """A model RPC that streams: one place among ``max_model_rpcs`` for the whole stream, the
        plan on a worker thread, then each step (its forward pass a model stage per piece, then
        its message) as one engine job; the next step's job is posted once its message is sent."""
        options = GenerationTraceOptions(**_set_fields(request, GENERATION_TRACE_FIELDS),
                                         stop=tuple(request.stop), ignore_eos=request.ignore_eos)  # fmt: skip
        async with self._call("TraceGeneration", context) as (engine, inspector), self._model_slot():
            plan = await asyncio.to_thread(inspector.plan_generation_trace, *_input(request), options)
            trace = plan()
            while not trace.finished:
                yield await engine.run_pieces(_then_respond(trace.step(), _to_generation_step, TensorDtype.FLOAT32))


def _to_generation_step(step: GenerationStep, _: TensorDtype) -> pb.GenerationStep:
    return to_generation_step(step)


def _then_respond(pieces: Pieces[T], respond: Callable[[T, TensorDtype], R], tensors: TensorDtype) -> Pieces[R]:
    """The pass, then its response as a piece of its own."""
    result = yield from pieces
    yield
    return respond(result, tensors)


def response_budget(max_bytes: int) -> ResponseBudget:
    """What an answer costs in these messages, for the Inspector's estimate (before any model work)."""
    return ResponseBudget(
        max_bytes=max_bytes,
        token_bytes=24,  # id, offsets and framing of one InputToken or Candidate
        float_bytes=ITEM_BYTES[TensorDtype.FLOAT32],  # the widest dtype a request can ask for
        piece_bytes=16,  # a typical Candidate's text
        stage_bytes=128,  # one Stage: name, shapes, seconds, TensorStats
    )


def max_response_bytes(config: ServerConfig) -> int:
    """--max-introspection-bytes, capped so that a response always fits in one gRPC message."""
    return max(1, min(config.max_introspection_bytes, config.max_message_bytes - FRAMING_BYTES))


# -- requests ------------------------------------------------------------------------------------


def _input(request: Any) -> tuple[str | None, Sequence[int] | None]:
    """(text, token_ids) of a request's ``input`` oneof; both None when neither is set. The ids
    stay the message's container (the Inspector counts them before it converts them)."""
    which = request.WhichOneof("input")
    if which == "text":
        return request.text, None
    if which == "token_ids":
        return None, request.token_ids.ids
    return None, None


def tensor_dtype(value: int) -> TensorDtype:
    """The dtype a request asks for (UNSPECIFIED = float32); an unknown value is invalid."""
    if value == pb.TENSOR_DTYPE_UNSPECIFIED:
        return TensorDtype.FLOAT32
    dtype = DTYPE_FROM_PROTO.get(cast("pb.TensorDtype.ValueType", value))
    if dtype is None:
        raise InvalidRequestError([FieldViolation("dtype", f"unknown TensorDtype value {value}")])
    return dtype


def _set_fields(request: Any, names: Iterable[str]) -> dict[str, Any]:
    """The optional fields the request sets, by name (unset ones keep the Inspector's defaults)."""
    return {name: getattr(request, name) for name in names if request.HasField(name)}


def _with_proto_paths(error: InvalidRequestError) -> InvalidRequestError:
    """The Inspector names the id list ``token_ids``; in the proto it is ``token_ids.ids``."""
    return error.with_fields(lambda path: "token_ids.ids" if path == "token_ids" else path)


# -- responses -----------------------------------------------------------------------------------


def to_input_tokens(tokens: Sequence[TokenInfo]) -> list[pb.InputToken]:
    return [
        pb.InputToken(
            id=t.id, text=t.text, data=t.data if t.partial else b"", partial=t.partial, start=t.start, end=t.end
        )
        for t in tokens
    ]


def to_tokenize_response(result: TokenizeResult) -> pb.TokenizeResponse:
    return pb.TokenizeResponse(text=result.text, tokens=to_input_tokens(result.tokens))


def to_embed_response(result: EmbedResult, dtype: TensorDtype) -> pb.EmbedResponse:
    return pb.EmbedResponse(
        tokens=to_input_tokens(result.tokens),
        token_embeddings=encode_tensor(result.token_embeddings, dtype),
        position_embeddings=encode_tensor(result.position_embeddings, dtype),
        input_embeddings=encode_tensor(result.input_embeddings, dtype),
        cosine_similarity=encode_tensor(result.cosine_similarity, dtype),
    )


def to_attention_response(result: AttentionResult, dtype: TensorDtype) -> pb.AttentionResponse:
    return pb.AttentionResponse(
        tokens=to_input_tokens(result.tokens),
        layers=result.layers,
        heads=result.heads,
        weights=encode_tensor(result.weights, dtype),
        scores=encode_tensor(result.scores, dtype) if result.scores is not None else None,
    )


def to_hidden_states_response(result: HiddenStatesResult, dtype: TensorDtype) -> pb.HiddenStatesResponse:
    return pb.HiddenStatesResponse(
        tokens=to_input_tokens(result.tokens),
        layers=result.layers,
        positions=result.positions,
        norms=encode_tensor(result.norms, dtype),
        vectors=encode_tensor(result.vectors, dtype) if result.vectors is not None else None,
    )


def _candidate(c: Candidate) -> pb.Candidate:
    return pb.Candidate(
        id=c.id, text=c.text, logit=c.logit, probability=c.probability, sampled_probability=c.sampled_probability
    )


def to_predict_next_response(result: PredictNextResult) -> pb.PredictNextResponse:
    return pb.PredictNextResponse(
        tokens=to_input_tokens(result.tokens),
        candidates=[_candidate(c) for c in result.candidates],
        greedy_token=_candidate(result.greedy_token),
        sampled_tokens=[_candidate(c) for c in result.sampled_tokens],
        seed=result.seed,
        entropy=result.entropy,
        sampled_entropy=result.sampled_entropy,
    )


def _stage(stage: StageTrace) -> pb.Stage:
    stats = stage.output_stats
    return pb.Stage(
        name=stage.name,
        layer=stage.layer,
        input_shape=stage.input_shape,
        output_shape=stage.output_shape,
        seconds=stage.seconds,
        output_stats=(
            pb.TensorStats(mean=stats.mean, std=stats.std, l2_norm=stats.l2_norm, min=stats.min, max=stats.max)
            if stats is not None
            else None
        ),
    )


def to_trace_response(result: TraceResult) -> pb.TraceResponse:
    return pb.TraceResponse(
        tokens=to_input_tokens(result.tokens),
        stages=[_stage(s) for s in result.stages],
        prediction=to_predict_next_response(result.prediction),
        seconds=result.seconds,
    )


def to_generation_step(step: GenerationStep) -> pb.GenerationStep:
    chosen = step.chosen
    return pb.GenerationStep(
        step=step.step,
        context_length=step.context_length,
        candidates=[
            pb.StepCandidate(
                id=c.id,
                text=c.text,
                logit=c.logit,
                probability=c.probability,
                after_temperature=c.after_temperature,
                after_top_k=c.after_top_k,
                after_top_p=c.after_top_p,
                after_min_p=c.after_min_p,
                after_typical_p=c.after_typical_p,
                rank=c.rank,
            )
            for c in step.candidates
        ],
        chosen=pb.ChosenToken(
            id=chosen.id,
            text=chosen.text,
            logit=chosen.logit,
            probability=chosen.probability,
            sampled_probability=chosen.sampled_probability,
            rank=chosen.rank,
        ),
        uniform=step.uniform,
        draw_index=step.draw_index,
        seed=step.seed,
        text_so_far=step.text_so_far,
        stop=step.stop or "",
        shifted=step.shifted,
        entropy=step.entropy,
        sampled_entropy=step.sampled_entropy,
    )
