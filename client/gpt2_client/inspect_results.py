"""The results of the gpt2.v1.Introspection calls (frozen dataclasses of numpy arrays) and their
conversion from the response messages. ``gpt2_client.inspect`` makes the calls."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gpt2_client.proto import introspection_pb2 as pb
from gpt2_client.tensors import FloatArray, decode_tensor

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
    sampled_entropy: float  # of the distribution the draws use (after temperature and filters); 0 when greedy


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


@dataclass(frozen=True)
class StepCandidate:
    """A candidate of a generation step: its probability after each stage of the sampler (each
    stage renormalised; 0 once a stage removed it; a stage not in use repeats the one before)."""

    id: int
    text: str
    logit: float  # raw LM-head output
    probability: float  # softmax of the raw logits
    after_temperature: float
    after_top_k: float
    after_top_p: float
    after_min_p: float
    after_typical_p: float  # the final distribution: what the draw uses
    rank: int  # in the raw distribution, 1 = most probable


@dataclass(frozen=True)
class ChosenToken:
    id: int
    text: str
    logit: float
    probability: float  # raw
    sampled_probability: float  # in the final distribution (after temperature and the filters)
    rank: int  # in the raw distribution, 1 = most probable


@dataclass(frozen=True)
class GenerationStep:
    """One step of the autoregressive loop (TraceGeneration): the context the model saw, the
    candidates, the token chosen and how, and the events."""

    step: int  # from 0
    context_length: int  # tokens the model saw
    candidates: tuple[StepCandidate, ...]  # most probable first (raw distribution)
    chosen: ChosenToken
    uniform: float | None  # the draw's uniform number; None at temperature 0 (greedy: no draw)
    draw_index: int | None  # its position in the seed's random stream (0 = first draw)
    seed: int
    text_so_far: str  # the generated text, this step's token included
    stop: str | None  # on the last step: "eos", "stop_sequence" or "length"
    shifted: bool  # the context outgrew the window: its earliest tokens were dropped before this step
    entropy: float  # of the raw distribution, in nats
    sampled_entropy: float  # of the final distribution (after temperature and every filter); 0 when greedy


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
        sampled_entropy=m.sampled_entropy,
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


def generation_step_from_proto(m: pb.GenerationStep) -> GenerationStep:
    c = m.chosen
    return GenerationStep(
        step=m.step,
        context_length=m.context_length,
        candidates=tuple(
            StepCandidate(
                x.id,
                x.text,
                x.logit,
                x.probability,
                x.after_temperature,
                x.after_top_k,
                x.after_top_p,
                x.after_min_p,
                x.after_typical_p,
                x.rank,
            )
            for x in m.candidates
        ),
        chosen=ChosenToken(c.id, c.text, c.logit, c.probability, c.sampled_probability, c.rank),
        uniform=m.uniform if m.HasField("uniform") else None,
        draw_index=m.draw_index if m.HasField("draw_index") else None,
        seed=m.seed,
        text_so_far=m.text_so_far,
        stop=m.stop or None,
        shifted=m.shifted,
        entropy=m.entropy,
        sampled_entropy=m.sampled_entropy,
    )
