"""Introspection's value types: the options of a prediction and the result of every question.

Frozen dataclasses of numpy arrays and Python values: no torch tensors, no protobuf, no model work.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from gpt2_service.core.request import SamplingParams
from gpt2_service.model.tokenizer import TokenPiece

FloatArray = npt.NDArray[np.float32]

# One token of the input, with its bytes and char offsets: the tokenizer's own pieces.
TokenInfo = TokenPiece


@dataclass(frozen=True)
class TokenizeResult:
    text: str  # the text the offsets index into
    tokens: tuple[TokenInfo, ...]

    @property
    def token_ids(self) -> list[int]:
        return [t.id for t in self.tokens]


@dataclass(frozen=True, eq=False)
class EmbedResult:
    tokens: tuple[TokenInfo, ...]
    token_embeddings: FloatArray  # [seq, d_model], rows of wte
    position_embeddings: FloatArray  # [seq, d_model], rows 0..seq-1 of wpe
    input_embeddings: FloatArray  # [seq, d_model], their sum: what block 0 reads
    cosine_similarity: FloatArray  # [seq, seq] of the input embeddings


@dataclass(frozen=True, eq=False)
class AttentionResult:
    tokens: tuple[TokenInfo, ...]
    layers: tuple[int, ...]  # block index of each entry of axis 0
    heads: tuple[int, ...]  # head index of each entry of axis 1
    weights: FloatArray  # [layers, heads, seq, seq]; row q = query q; zero above the diagonal
    scores: FloatArray | None  # same shape, q.k / sqrt(head_dim) before softmax; -inf above the diagonal


@dataclass(frozen=True, eq=False)
class HiddenStatesResult:
    tokens: tuple[TokenInfo, ...]
    layers: tuple[int, ...]  # Hugging Face indices: 0 = embeddings, i = after block i, n_layer = after ln_f
    positions: tuple[int, ...]  # token positions of axis 1 (only the last with last_token_only)
    norms: FloatArray  # [layers, positions], L2 norm of each state vector
    vectors: FloatArray | None  # [layers, positions, d_model] when asked for


@dataclass(frozen=True)
class Candidate:
    id: int
    text: str
    logit: float  # raw LM-head output
    probability: float  # softmax of the raw logits
    sampled_probability: float  # after temperature and the filters: what a draw uses


@dataclass(frozen=True)
class PredictNextResult:
    tokens: tuple[TokenInfo, ...]
    candidates: tuple[Candidate, ...]  # most probable first
    greedy_token: Candidate
    sampled_tokens: tuple[Candidate, ...]  # num_samples independent draws, in draw order
    seed: int  # the seed of the draws (chosen by the server when the request gave none)
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
class StageTrace:
    """One stage of the forward pass. Shapes leave out the batch axis."""

    name: str  # tokenizer, embedding, block.<i>.attention, block.<i>.mlp, final_layer_norm, lm_head, sampling
    layer: int | None  # the block, for block stages
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    seconds: float
    output_stats: TensorStats | None  # None where the output is token ids


@dataclass(frozen=True)
class TraceResult:
    tokens: tuple[TokenInfo, ...]
    stages: tuple[StageTrace, ...]  # in dataflow order
    prediction: PredictNextResult
    seconds: float  # wall time of the whole trace, stage bookkeeping included


@dataclass(frozen=True)
class SamplingOptions:
    """PredictNext's and Trace's options: the sampler's filters, the draws and the candidates."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    seed: int | None = None
    num_samples: int = 1
    num_candidates: int = 10

    @property
    def params(self) -> SamplingParams:
        """The filters and seed as the engine's sampler takes them (no penalties)."""
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.min_p, self.typical_p, seed=self.seed)

    def with_seed(self) -> SamplingOptions:
        """These options with a seed: the request's, or one chosen now (and reported)."""
        return self if self.seed is not None else replace(self, seed=secrets.randbits(63))


@dataclass(frozen=True)
class StepCandidate:
    """A candidate of a generation step, with its probability after each stage of the sampler
    (each stage renormalised; 0 once a stage removed it)."""

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
    sampled_probability: float  # in the final distribution
    rank: int  # in the raw distribution, 1 = most probable


@dataclass(frozen=True)
class GenerationStep:
    """One step of the autoregressive loop: a forward pass over the context, one token chosen."""

    step: int  # from 0
    context_length: int  # tokens the model saw
    candidates: tuple[StepCandidate, ...]  # most probable first (raw distribution)
    chosen: ChosenToken
    uniform: float | None  # the draw's uniform number; None at temperature 0 (no draw)
    draw_index: int | None  # its position in the seed's random stream; None at temperature 0
    seed: int
    text_so_far: str  # the generated text, this step's token included
    stop: str | None  # "eos", "stop_sequence" or "length" on the last step, else None
    shifted: bool  # the earliest tokens were dropped before this step (a context shift)
    entropy: float  # of the raw distribution, in nats
    sampled_entropy: float  # of the final distribution (after temperature and every filter); 0 when greedy


@dataclass(frozen=True)
class GenerationTraceOptions:
    """TraceGeneration's options: the sampler's filters and seed, and when to stop."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 8
    num_candidates: int = 10
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def params(self) -> SamplingParams:
        """The filters and seed as the engine's sampler takes them (no penalties)."""
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.min_p, self.typical_p, seed=self.seed)

    def with_seed(self) -> GenerationTraceOptions:
        """These options with a seed: the request's, or one chosen now (and reported)."""
        return self if self.seed is not None else replace(self, seed=secrets.randbits(63))


PREDICT_NEXT_OPTIONS = SamplingOptions()
TRACE_OPTIONS = SamplingOptions(num_candidates=5)  # a trace shows fewer candidates by default
