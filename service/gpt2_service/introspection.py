"""Introspection: what the model computes for one input, stage by stage, as plain value types.

Every number comes from one forward pass of the serving model (``GPT2.forward`` with a
``Capture``), never from a second implementation; results are frozen dataclasses of numpy arrays
and Python values, with no torch tensors or protobuf. The methods do torch work and are not
thread-safe with generation: run them on the engine thread, between steps::

    result = await engine.run_exclusive(lambda: inspector.attention(text="cat sat on the"))
"""

from __future__ import annotations

import functools
import math
import secrets
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeAlias, TypeVar

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor

from gpt2_service.errors import FieldViolation, InvalidRequestError, Violations
from gpt2_service.model import Capture, StageTimer
from gpt2_service.request import first_bad_token_id
from gpt2_service.sampler import FilterParams, apply_filters
from gpt2_service.weights import LoadedModel

FloatArray = npt.NDArray[np.float32]
R = TypeVar("R")
# The model half of a request: validation and tokenization are done when a plan is made (on any
# thread); calling it runs the forward pass (on the engine thread, between steps).
Plan: TypeAlias = Callable[[], R]

DEFAULT_MAX_RESPONSE_BYTES = 32 * 1024 * 1024
MAX_NUM_SAMPLES = 1024
MAX_INDEX_LIST = 1024  # entries of a layers / heads list (duplicates are allowed, and ignored)
MAX_SEED = 2**64 - 1
RESPONSE_TOO_LARGE = "RESPONSE_TOO_LARGE"

_FLOAT_BYTES = 4  # every array in a result is float32
_TOKEN_OVERHEAD_BYTES = 24  # id, offsets and framing of one token or candidate record
_STAGE_BYTES = 128  # one stage of a trace: name, shapes, time, statistics


# -- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenInfo:
    """One token of the input, with where it came from."""

    id: int
    text: str  # the piece decoded on its own; U+FFFD where it holds part of a character
    data: bytes  # the raw bytes the piece stands for (differs from ``text`` when ``partial``)
    start: int  # char offsets into the input text (or, for token_ids input, the decoded text);
    end: int  # a piece holding part of a character spans that whole character

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

    def with_seed(self) -> SamplingOptions:
        """These options with a seed: the request's, or one chosen now (and reported)."""
        return self if self.seed is not None else replace(self, seed=secrets.randbits(63))


TRACE_OPTIONS = SamplingOptions(num_candidates=5)  # a trace shows fewer candidates by default


# -- the inspector ------------------------------------------------------------------------------


class Inspector:
    """Answers introspection questions about one input with the serving model.

    Validation raises ``InvalidRequestError`` naming the bad fields (``text``, ``token_ids``,
    ``layers``, ``heads``, ``temperature``, ...) before any model work; a result that would be
    larger than ``max_response_bytes`` is refused up front with reason ``RESPONSE_TOO_LARGE`` and
    a violation for each option that would shrink it. Model inputs are limited to
    ``context_window`` tokens (default: the model's ``n_positions``).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        context_window: int | None = None,
    ) -> None:
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        config = loaded.model.config
        self.n_layer = config.n_layer
        self.n_head = config.n_head
        self.d_model = config.n_embd
        self.vocab_size = min(self.tokenizer.vocab_size, config.vocab_size)
        self.context_window = min(context_window or config.n_positions, config.n_positions)
        self.max_response_bytes = max_response_bytes
        self._device = next(loaded.model.parameters()).device

    # -- tokenizer --------------------------------------------------------------------------------

    def tokenize(self, text: str | None = None, token_ids: Sequence[int] | None = None) -> TokenizeResult:
        """The pieces of ``text`` (or of ``token_ids``) with ids, bytes and char offsets.

        Empty input gives no tokens. Not limited to the context window (no model work is done);
        only the response size limits it.
        """
        # Each token costs at least _TOKEN_OVERHEAD_BYTES, each character at least 2 bytes: a
        # lower bound that refuses a hopeless input before it is tokenized.
        lower_bound = 2 * len(text) if text is not None else _TOKEN_OVERHEAD_BYTES * len(token_ids or ())
        self._check_size(lower_bound, _narrowing(text))
        result = self._resolve(text, token_ids, for_model=False)
        self._check_size(_tokens_bytes(result.tokens), _narrowing(text))
        return result

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """The text of ``token_ids``, special tokens included; the inverse of ``tokenize``."""
        self._check_size(len(token_ids), _narrowing(None))  # a token is at least one byte
        ids = self._checked_ids(token_ids)
        self._check_size(sum(len(self.tokenizer.token_bytes[i]) for i in ids), _narrowing(None))
        return self.tokenizer.decode(ids, skip_special=False)

    # -- model stages -----------------------------------------------------------------------------

    def embed(self, text: str | None = None, token_ids: Sequence[int] | None = None) -> EmbedResult:
        """Token, position and input embeddings ([seq, d_model] each) and the input embeddings'
        cosine-similarity matrix [seq, seq]."""
        return self.plan_embed(text, token_ids)()

    def plan_embed(self, text: str | None = None, token_ids: Sequence[int] | None = None) -> Plan[EmbedResult]:
        tokens = self._resolve(text, token_ids).tokens
        seq = len(tokens)
        self._check_size(
            _tokens_bytes(tokens) + _FLOAT_BYTES * (3 * seq * self.d_model + seq * seq),
            _narrowing(text),
        )
        return functools.partial(self._embed, tokens)

    @torch.inference_mode()
    def _embed(self, tokens: tuple[TokenInfo, ...]) -> EmbedResult:
        capture = Capture(embeddings=True, hidden_states=True)
        self._forward(tokens, capture)
        assert capture.token_embeddings is not None and capture.position_embeddings is not None
        summed = capture.hidden[0][0].float()  # (T, d): the tensor block 0 reads
        unit = F.normalize(summed, dim=-1)
        return EmbedResult(
            tokens=tokens,
            token_embeddings=_to_numpy(capture.token_embeddings[0]),
            position_embeddings=_to_numpy(capture.position_embeddings[0]),
            input_embeddings=_to_numpy(summed),
            cosine_similarity=_to_numpy(unit @ unit.T),
        )

    def attention(
        self,
        text: str | None = None,
        token_ids: Sequence[int] | None = None,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        include_scores: bool = False,
    ) -> AttentionResult:
        """Attention weights [layers, heads, seq, seq] of the chosen blocks and heads (None or
        empty = all, returned in ascending order), and optionally the pre-softmax scores."""
        return self.plan_attention(text, token_ids, layers, heads, include_scores)()

    def plan_attention(
        self,
        text: str | None = None,
        token_ids: Sequence[int] | None = None,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        include_scores: bool = False,
    ) -> Plan[AttentionResult]:
        violations = self._index_violations("layers", layers, self.n_layer, "layers")
        violations += self._index_violations("heads", heads, self.n_head, "heads per layer")
        tokens = self._resolve(text, token_ids, violations).tokens
        layer_list = _selection(layers, self.n_layer)
        head_list = _selection(heads, self.n_head)
        seq = len(tokens)
        per_matrix = _FLOAT_BYTES * seq * seq * (2 if include_scores else 1)
        narrow = _narrowing(
            text,
            ("layers", "ask for fewer layers", len(layer_list) > 1),
            ("heads", "ask for fewer heads", len(head_list) > 1),
            ("include_scores", "leave include_scores off (it doubles the size)", include_scores),
        )
        self._check_size(_tokens_bytes(tokens) + per_matrix * len(layer_list) * len(head_list), narrow)
        return functools.partial(self._attention, tokens, layer_list, head_list, include_scores)

    @torch.inference_mode()
    def _attention(
        self, tokens: tuple[TokenInfo, ...], layer_list: list[int], head_list: list[int], include_scores: bool
    ) -> AttentionResult:
        capture = Capture(layers=frozenset(layer_list), attention_weights=True, attention_scores=include_scores)
        self._forward(tokens, capture)
        head_index = None if len(head_list) == self.n_head else torch.tensor(head_list, device=self._device)

        def gather(per_layer: dict[int, Tensor]) -> FloatArray:
            stacked = torch.stack([per_layer[layer][0] for layer in layer_list])  # (L, nh, T, T)
            return _to_numpy(stacked if head_index is None else stacked.index_select(1, head_index))

        return AttentionResult(
            tokens=tokens,
            layers=tuple(layer_list),
            heads=tuple(head_list),
            weights=gather(capture.attn),
            scores=gather(capture.scores) if include_scores else None,
        )

    def hidden_states(
        self,
        text: str | None = None,
        token_ids: Sequence[int] | None = None,
        layers: Sequence[int] | None = None,
        last_token_only: bool = False,
        include_vectors: bool = False,
    ) -> HiddenStatesResult:
        """Hidden states indexed like Hugging Face's ``output_hidden_states`` (0 = embeddings,
        i = after block i, n_layer = after the final LayerNorm; None or empty = all): their L2
        norms always, the vectors when ``include_vectors``."""
        return self.plan_hidden_states(text, token_ids, layers, last_token_only, include_vectors)()

    def plan_hidden_states(
        self,
        text: str | None = None,
        token_ids: Sequence[int] | None = None,
        layers: Sequence[int] | None = None,
        last_token_only: bool = False,
        include_vectors: bool = False,
    ) -> Plan[HiddenStatesResult]:
        num_states = self.n_layer + 1
        violations = self._index_violations("layers", layers, num_states, "hidden states (0 = embeddings)")
        tokens = self._resolve(text, token_ids, violations).tokens
        layer_list = _selection(layers, num_states)
        seq = len(tokens)
        positions = (seq - 1,) if last_token_only else tuple(range(seq))
        per_state = _FLOAT_BYTES * len(positions) * (1 + (self.d_model if include_vectors else 0))
        narrow = _narrowing(
            text,
            ("include_vectors", "leave include_vectors off (norms only)", include_vectors),
            ("layers", "ask for fewer layers", len(layer_list) > 1),
            ("last_token_only", "set last_token_only", not last_token_only),
        )
        self._check_size(_tokens_bytes(tokens) + per_state * len(layer_list), narrow)
        return functools.partial(self._hidden_states, tokens, layer_list, positions, include_vectors)

    @torch.inference_mode()
    def _hidden_states(
        self, tokens: tuple[TokenInfo, ...], layer_list: list[int], positions: tuple[int, ...], include_vectors: bool
    ) -> HiddenStatesResult:
        capture = Capture(hidden_states=True)
        self._forward(tokens, capture)
        start = positions[0]
        states = torch.stack([capture.hidden[i][0, start:] for i in layer_list]).float()  # (L, P, d)
        return HiddenStatesResult(
            tokens=tokens,
            layers=tuple(layer_list),
            positions=positions,
            norms=_to_numpy(torch.linalg.vector_norm(states, dim=-1)),
            vectors=_to_numpy(states) if include_vectors else None,
        )

    def predict_next(
        self,
        text: str | None = None,
        token_ids: Sequence[int] | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        typical_p: float = 1.0,
        seed: int | None = None,
        num_samples: int = 1,
        num_candidates: int = 10,
    ) -> PredictNextResult:
        """The LM head on the last position: the ``num_candidates`` most probable next tokens with
        raw and filtered probabilities, the greedy token, ``num_samples`` draws and the entropy.

        Filters are the sampler's own (temperature 0 = greedy: every draw is the greedy token).
        Draws use a CPU ``torch.Generator`` seeded with ``seed`` and one uniform per draw, as the
        engine's sampler does, so the first draw is the token a generation with the same prompt,
        parameters and seed starts with.
        """
        options = SamplingOptions(temperature, top_k, top_p, min_p, typical_p, seed, num_samples, num_candidates)
        return self.plan_predict_next(text, token_ids, options)()

    def plan_predict_next(
        self, text: str | None, token_ids: Sequence[int] | None, options: SamplingOptions = SamplingOptions()
    ) -> Plan[PredictNextResult]:
        tokens = self._resolve(text, token_ids, self._sampling_violations(options)).tokens
        options = options.with_seed()
        self._check_size(_tokens_bytes(tokens) + _prediction_bytes(options), _prediction_narrowing(text, options))
        return functools.partial(self._predict_next, tokens, options)

    @torch.inference_mode()
    def _predict_next(self, tokens: tuple[TokenInfo, ...], options: SamplingOptions) -> PredictNextResult:
        hidden = self._forward(tokens, None)
        return self._predict(tokens, self.model.logits(hidden[0, -1:]), options)

    def trace(
        self,
        text: str | None = None,
        token_ids: Sequence[int] | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        typical_p: float = 1.0,
        seed: int | None = None,
        num_samples: int = 1,
        num_candidates: int = 5,
    ) -> TraceResult:
        """The dataflow of one forward pass: tokenizer, embedding, each block's attention and MLP
        (the residual stream after each), final LayerNorm, LM head (last position) and sampling,
        each with shapes, time and statistics of its output; plus the prediction."""
        options = SamplingOptions(temperature, top_k, top_p, min_p, typical_p, seed, num_samples, num_candidates)
        return self.plan_trace(text, token_ids, options)()

    def plan_trace(
        self, text: str | None, token_ids: Sequence[int] | None, options: SamplingOptions = TRACE_OPTIONS
    ) -> Plan[TraceResult]:
        started = time.perf_counter()
        tokens = self._resolve(text, token_ids, self._sampling_violations(options)).tokens
        tokenizer_seconds = time.perf_counter() - started
        options = options.with_seed()
        num_stages = 2 * self.n_layer + 5
        self._check_size(
            _tokens_bytes(tokens) + _prediction_bytes(options) + _STAGE_BYTES * num_stages,
            _prediction_narrowing(text, options),
        )
        input_shape = (len(text),) if text is not None else (len(tokens),)
        return functools.partial(self._trace, tokens, options, input_shape, tokenizer_seconds)

    @torch.inference_mode()
    def _trace(
        self,
        tokens: tuple[TokenInfo, ...],
        options: SamplingOptions,
        input_shape: tuple[int, ...],
        tokenizer_seconds: float,
    ) -> TraceResult:
        """The trace's forward pass; its time counts the tokenizer's (done when it was planned)."""
        started = time.perf_counter() - tokenizer_seconds
        num_samples = options.num_samples
        timer = _StageLog(self._sync)
        capture = Capture(stage_outputs=True)
        hidden = self._forward(tokens, capture, timer)
        logits = self.model.logits(hidden[0, -1:], timer)  # (1, V)
        sampling_started = time.perf_counter()
        prediction = self._predict(tokens, logits, options)
        sampling_seconds = time.perf_counter() - sampling_started

        stages = [StageTrace("tokenizer", None, input_shape, (len(tokens),), tokenizer_seconds, None)]
        times = timer.by_stage()
        for name, stage_in, stage_out in capture.stages:
            kind = name.rsplit(".", 1)[-1]
            layer = int(name.split(".")[1]) if name.startswith("block.") else None
            seconds = times[kind].popleft() if times[kind] else 0.0
            stages.append(
                StageTrace(
                    name, layer, tuple(stage_in.shape[1:]), tuple(stage_out.shape[1:]), seconds, _stats(stage_out)
                )
            )
        lm_seconds = times["lm_head"].popleft() if times["lm_head"] else 0.0
        stages.append(StageTrace("lm_head", None, (self.d_model,), (logits.shape[-1],), lm_seconds, _stats(logits)))
        stages.append(StageTrace("sampling", None, (logits.shape[-1],), (max(num_samples, 1),), sampling_seconds, None))
        return TraceResult(tokens, tuple(stages), prediction, time.perf_counter() - started)

    # -- helpers ----------------------------------------------------------------------------------

    def _forward(self, tokens: Sequence[TokenInfo], capture: Capture | None, timer: StageTimer | None = None) -> Tensor:
        """One forward pass over the whole input, plain causal attention, no KV-cache. (1, T, d)."""
        ids = torch.tensor([[t.id for t in tokens]], dtype=torch.long, device=self._device)
        positions = torch.arange(len(tokens), device=self._device)[None]
        hidden: Tensor = self.model(ids, positions, capture=capture, timer=timer)
        return hidden

    def _predict(self, tokens: tuple[TokenInfo, ...], logits: Tensor, o: SamplingOptions) -> PredictNextResult:
        """Candidates, greedy token, draws and entropy from the last position's (1, V) logits."""
        assert o.seed is not None, "options.with_seed() picks the seed before the model runs"
        logits = logits.float()
        log_probs = logits.log_softmax(dim=-1)
        probs = log_probs.exp()
        greedy = int(logits.argmax(dim=-1))
        if o.temperature == 0:
            sampled = torch.zeros_like(probs)
            sampled[0, greedy] = 1.0
            drawn = [greedy] * o.num_samples
        else:
            filters = FilterParams(
                temperature=torch.tensor([o.temperature], device=logits.device),
                top_k=torch.tensor([o.top_k], dtype=torch.long, device=logits.device),
                top_p=torch.tensor([o.top_p], device=logits.device),
                min_p=torch.tensor([o.min_p], device=logits.device),
                typical_p=torch.tensor([o.typical_p], device=logits.device),
            )
            sampled = apply_filters(logits, filters).softmax(dim=-1)
            drawn = _draw(sampled[0], o.seed, o.num_samples)

        top_ids: list[int] = probs[0].topk(min(o.num_candidates, logits.shape[-1])).indices.tolist()
        wanted = sorted({*top_ids, greedy, *drawn})
        index = torch.tensor(wanted, device=logits.device)
        columns = torch.stack([logits[0], probs[0], sampled[0]]).index_select(1, index).T.tolist()
        values = dict(zip(wanted, columns, strict=True))  # id -> [logit, probability, sampled_probability]

        def candidate(token_id: int) -> Candidate:
            logit, probability, sampled_probability = values[token_id]
            return Candidate(token_id, self._piece_text(token_id), logit, probability, sampled_probability)

        return PredictNextResult(
            tokens=tokens,
            candidates=tuple(candidate(i) for i in top_ids),
            greedy_token=candidate(greedy),
            sampled_tokens=tuple(candidate(i) for i in drawn),
            seed=o.seed,
            entropy=float(torch.special.entr(probs[0]).sum()),
        )

    def _resolve(
        self,
        text: str | None,
        token_ids: Sequence[int] | None,
        violations: list[FieldViolation] | None = None,
        for_model: bool = True,
    ) -> TokenizeResult:
        """The input as tokens, after checking it; raises with ``violations`` plus any of its own.
        For the model, an input that cannot fit the context window is refused from its length
        alone (ids counted, text bounded below by ``min_num_tokens``), before any tokenization."""
        bad = Violations()
        for v in violations or ():
            bad.add(v.field, v.description)
        result: TokenizeResult | None = None
        field = _input_field(text)
        if text is not None and token_ids is not None:
            bad.add("text", "give either text or token_ids, not both")
        elif text is None and token_ids is None:
            bad.add("text", "give text or token_ids")
        elif for_model and (text is None or self.tokenizer.min_num_tokens(text) > self.context_window):
            num_tokens = self.tokenizer.min_num_tokens(text) if text is not None else len(token_ids or ())
            at_least = "at least " if text is not None else ""
            bad.check(
                num_tokens <= self.context_window,
                field,
                f"is {at_least}{num_tokens} tokens, longer than the context window of {self.context_window}",
            )
        if len(bad) == len(violations or ()):  # the input itself passed the cheap checks
            try:
                result = self._tokens_of(text, token_ids)
            except InvalidRequestError as exc:
                bad.extend(exc)
        if result is not None and for_model:
            bad.check(bool(result.tokens), field, "is empty; give at least one token")
            bad.check(
                len(result.tokens) <= self.context_window,
                field,
                f"is {len(result.tokens)} tokens, longer than the context window of {self.context_window}",
            )
        bad.raise_if_any()
        assert result is not None
        return result

    def _tokens_of(self, text: str | None, token_ids: Sequence[int] | None) -> TokenizeResult:
        if token_ids is not None:
            return self._from_ids(self._checked_ids(token_ids))
        assert text is not None
        pieces = self.tokenizer.encode_pieces(text)
        return TokenizeResult(text, tuple(TokenInfo(p.id, p.text, p.data, p.start, p.end) for p in pieces))

    def _checked_ids(self, token_ids: Sequence[int]) -> list[int]:
        """``token_ids`` as a list, or InvalidRequestError naming the first id outside the vocabulary."""
        ids = list(token_ids)
        i = first_bad_token_id(ids, self.vocab_size)
        if i is not None:
            raise InvalidRequestError(
                [FieldViolation("token_ids", f"token_ids[{i}] = {ids[i]} is not a token id in [0, {self.vocab_size})")]
            )
        return ids

    def _from_ids(self, token_ids: Sequence[int]) -> TokenizeResult:
        """Pieces of ``token_ids`` with char offsets into their decoded text (as ``decode`` gives it)."""
        data = [self.tokenizer.token_bytes[i] for i in token_ids]
        text, char_of_byte = _decode_with_char_map(b"".join(data))
        tokens: list[TokenInfo] = []
        byte_pos = 0
        for token_id, piece in zip(token_ids, data, strict=True):
            if piece:
                start, end = char_of_byte[byte_pos], char_of_byte[byte_pos + len(piece) - 1] + 1
            else:
                start = end = char_of_byte[byte_pos] if byte_pos < len(char_of_byte) else len(text)
            tokens.append(TokenInfo(token_id, self.tokenizer.id_to_text(token_id), piece, start, end))
            byte_pos += len(piece)
        return TokenizeResult(text, tuple(tokens))

    @staticmethod
    def _index_violations(field: str, values: Sequence[int] | None, limit: int, what: str) -> list[FieldViolation]:
        values = values or ()
        if len(values) > MAX_INDEX_LIST:  # counted before it is read
            return [FieldViolation(field, f"at most {MAX_INDEX_LIST} entries, got {len(values)}")]
        bad = [v for v in values if not 0 <= v < limit]
        if not bad:
            return []
        shown = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        return [
            FieldViolation(field, f"{shown} out of range: this model has {limit} {what}, numbered 0 to {limit - 1}")
        ]

    def _sampling_violations(self, o: SamplingOptions) -> list[FieldViolation]:
        bad: list[FieldViolation] = []

        def check(ok: bool, name: str, why: str) -> None:
            if not ok:
                bad.append(FieldViolation(name, why))

        check(
            math.isfinite(o.temperature) and o.temperature >= 0,
            "temperature",
            f"must be a finite number >= 0 (0 = greedy), got {o.temperature}",
        )
        check(o.top_k >= 0, "top_k", f"must be >= 0 (0 disables it), got {o.top_k}")
        check(math.isfinite(o.top_p) and 0 < o.top_p <= 1, "top_p", f"must be in (0, 1], got {o.top_p}")
        check(math.isfinite(o.min_p) and 0 <= o.min_p <= 1, "min_p", f"must be in [0, 1], got {o.min_p}")
        check(math.isfinite(o.typical_p) and 0 < o.typical_p <= 1, "typical_p", f"must be in (0, 1], got {o.typical_p}")
        check(o.seed is None or 0 <= o.seed <= MAX_SEED, "seed", f"must be in [0, 2^64-1], got {o.seed}")
        check(
            0 <= o.num_samples <= MAX_NUM_SAMPLES,
            "num_samples",
            f"must be in [0, {MAX_NUM_SAMPLES}], got {o.num_samples}",
        )
        check(
            1 <= o.num_candidates <= self.vocab_size,
            "num_candidates",
            f"must be in [1, {self.vocab_size}], got {o.num_candidates}",
        )
        return bad

    def _check_size(self, num_bytes: int, narrow: list[tuple[str, str]]) -> None:
        """RESPONSE_TOO_LARGE when ``num_bytes`` (an estimate or a lower bound) is over the limit."""
        if num_bytes <= self.max_response_bytes:
            return
        size = (
            f"the response would be about {_human_bytes(num_bytes)}, over the limit of "
            f"{_human_bytes(self.max_response_bytes)}"
        )
        raise InvalidRequestError(
            [FieldViolation(f, f"{size}: {how}") for f, how in narrow],
            reason=RESPONSE_TOO_LARGE,
        )

    def _piece_text(self, token_id: int) -> str:
        return self.tokenizer.id_to_text(token_id) if token_id < self.tokenizer.vocab_size else ""

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)


class _StageLog(StageTimer):
    """A StageTimer that also keeps every stage's time in call order: the model reports each
    block's attention as "attention" and its MLP as "mlp", so the order tells the blocks apart.
    ``sync`` waits for the device, so that times mean something on an accelerator."""

    def __init__(self, sync: Callable[[], None]) -> None:
        super().__init__()
        self.events: list[tuple[str, float]] = []
        self._sync = sync
        self._name = ""
        self._started = 0.0

    def start(self, stage: str) -> None:
        self._sync()
        self._name, self._started = stage, time.perf_counter()
        super().start(stage)

    def stop(self) -> None:
        self._sync()
        elapsed = time.perf_counter() - self._started
        super().stop()
        self.events.append((self._name, elapsed))

    def by_stage(self) -> defaultdict[str, deque[float]]:
        times: defaultdict[str, deque[float]] = defaultdict(deque)
        for name, seconds in self.events:
            times[name].append(seconds)
        return times


# -- pure helpers --------------------------------------------------------------------------------


def _input_field(text: str | None) -> str:
    return "text" if text is not None else "token_ids"


def _selection(values: Sequence[int] | None, limit: int) -> list[int]:
    """Sorted, without duplicates; None or empty means all of 0..limit-1."""
    return sorted(set(values)) if values else list(range(limit))


def _narrowing(text: str | None, *options: tuple[str, str, bool]) -> list[tuple[str, str]]:
    """(field, advice) for each option that would shrink the response, and the input last."""
    useful = [(field, advice) for field, advice, applies in options if applies]
    return [*useful, (_input_field(text), "send a shorter input")]


def _prediction_narrowing(text: str | None, o: SamplingOptions) -> list[tuple[str, str]]:
    return _narrowing(
        text,
        ("num_candidates", "ask for fewer candidates", o.num_candidates > 1),
        ("num_samples", "ask for fewer samples", o.num_samples > 0),
    )


def _prediction_bytes(o: SamplingOptions) -> int:
    per_candidate = _TOKEN_OVERHEAD_BYTES + 3 * _FLOAT_BYTES + 16  # + a typical piece's text
    return per_candidate * (o.num_candidates + o.num_samples + 1)


def _tokens_bytes(tokens: Sequence[TokenInfo]) -> int:
    return sum(_TOKEN_OVERHEAD_BYTES + 2 * len(t.data) for t in tokens)


def _human_bytes(num_bytes: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= size:
            return f"{num_bytes / size:.1f} {unit}"
    return f"{num_bytes} bytes"


def _to_numpy(t: Tensor) -> FloatArray:
    """A read-only float32 array on the host."""
    array: FloatArray = np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())
    array.flags.writeable = False
    return array


def _stats(t: Tensor) -> TensorStats:
    x = t.detach().float()
    return TensorStats(
        mean=float(x.mean()),
        std=float(x.std(correction=0)),
        l2_norm=float(torch.linalg.vector_norm(x)),
        min=float(x.min()),
        max=float(x.max()),
    )


def _draw(probs: Tensor, seed: int, num_samples: int) -> list[int]:
    """``num_samples`` inverse-CDF draws from ``probs`` (V,), one uniform each from a CPU generator
    seeded with ``seed``: the same numbers, in the same order, as the engine's sampler takes."""
    if num_samples == 0:
        return []
    generator = torch.Generator().manual_seed(seed)
    uniforms = torch.cat([torch.rand(1, generator=generator) for _ in range(num_samples)]).to(probs.device)
    cdf = probs.cumsum(dim=-1)
    drawn = torch.searchsorted(cdf, uniforms * cdf[-1], right=True)
    last_possible = probs.shape[-1] - 1 - int((probs > 0).flip(-1).int().argmax())
    return [last_possible if i >= probs.shape[-1] else i for i in drawn.tolist()]


def _utf8_length(lead: int) -> int:
    """Bytes of the character a lead byte starts; 0 if it cannot start one."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def _decode_with_char_map(data: bytes) -> tuple[str, list[int]]:
    """``data.decode("utf-8", errors="replace")`` and, for every byte, the index of its char.

    Like Python's decoder, each maximal ill-formed subpart (Unicode's recommended practice)
    becomes one U+FFFD.
    """
    chars: list[str] = []
    char_of_byte: list[int] = []
    pos = 0
    while pos < len(data):
        length = _utf8_length(data[pos])
        char = _decode_one(data[pos : pos + length]) if length else None
        if char is None:
            length = _maximal_subpart(data, pos, max(length, 1))
            char = "\ufffd"
        char_of_byte.extend([len(chars)] * length)
        chars.append(char)
        pos += length
    return "".join(chars), char_of_byte


def _decode_one(data: bytes) -> str | None:
    """The one character ``data`` encodes, or None if it is not exactly one valid character."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if len(text) == 1 else None


# Lead bytes whose second byte has a narrower range than 80..BF (Unicode Table 3-7): this rules
# out overlong forms, surrogates and code points above U+10FFFF.
_SECOND_BYTE_RANGE = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


def _maximal_subpart(data: bytes, pos: int, length: int) -> int:
    """Bytes in the maximal ill-formed subpart at ``pos``: the lead byte and the continuation
    bytes that still fit a character of ``length`` bytes (at least 1)."""
    n = 1
    while n < length and pos + n < len(data):
        lo, hi = _SECOND_BYTE_RANGE.get(data[pos], (0x80, 0xBF)) if n == 1 else (0x80, 0xBF)
        if not lo <= data[pos + n] <= hi:
            break
        n += 1
    return n
