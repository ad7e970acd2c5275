"""Introspection: what the model computes for one input, stage by stage, as plain value types.

The Inspector plans each question: it checks and tokenizes the input (introspection_inputs) and
refuses an answer over its budget (introspection_budget) on any thread, then hands back the
forward pass (introspection_passes), in pieces, to run on the engine thread between steps::

    plan = inspector.plan_attention(text="cat sat on the")  # validation and tokenization here
    result = await engine.run_pieces(plan())  # the forward pass there, a model stage at a time

Each question also has a one-call form (``inspector.attention(...)``) that does both at once.
Not here: the numbers themselves, the results' types (introspection_results) or protobuf.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import ParamSpec, TypeAlias, TypedDict, TypeVar, Unpack

from gpt2_service.core.pieces import Pieces, run_to_end
from gpt2_service.errors import Violations
from gpt2_service.introspection.budget import NO_LIMIT, RESPONSE_TOO_LARGE, ResponseBudget
from gpt2_service.introspection.generation import GenerationTrace
from gpt2_service.introspection.inputs import MAX_INDEX_LIST, MAX_NUM_SAMPLES, InputChecker, input_field
from gpt2_service.introspection.passes import ForwardPasses, Tokens
from gpt2_service.introspection.results import (
    PREDICT_NEXT_OPTIONS,
    TRACE_OPTIONS,
    AttentionResult,
    Candidate,
    EmbedResult,
    GenerationStep,
    GenerationTraceOptions,
    HiddenStatesResult,
    PredictNextResult,
    SamplingOptions,
    StageTrace,
    TensorStats,
    TokenInfo,
    TokenizeResult,
    TraceResult,
)
from gpt2_service.model.weights import LoadedModel

__all__ = [
    "MAX_INDEX_LIST",
    "MAX_NUM_SAMPLES",
    "PREDICT_NEXT_OPTIONS",
    "RESPONSE_TOO_LARGE",
    "TRACE_OPTIONS",
    "AttentionResult",
    "Candidate",
    "EmbedResult",
    "GenerationStep",
    "GenerationTrace",
    "GenerationTraceOptions",
    "HiddenStatesResult",
    "Inspector",
    "Plan",
    "PredictNextResult",
    "ResponseBudget",
    "SamplingOptions",
    "StageTrace",
    "TensorStats",
    "TokenInfo",
    "TokenizeResult",
    "TraceResult",
]

R = TypeVar("R")
P = ParamSpec("P")
# The model half of a request: validation and tokenization are done when a plan is made (on any
# thread); calling it gives the forward pass as work in pieces, one per model stage, to run on the
# engine thread between steps (``Engine.run_pieces``) or at once (``run_to_end``).
Plan: TypeAlias = Callable[[], Pieces[R]]


class SamplingArgs(TypedDict, total=False):
    """``predict_next``'s and ``trace``'s keyword options: the fields of SamplingOptions."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    typical_p: float
    seed: int | None
    num_samples: int
    num_candidates: int


class GenerationTraceArgs(TypedDict, total=False):
    """``trace_generation``'s keyword options: the fields of GenerationTraceOptions."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    typical_p: float
    seed: int | None
    max_new_tokens: int
    num_candidates: int
    stop: tuple[str, ...]
    ignore_eos: bool


def _now(plan: Callable[P, Plan[R]]) -> Callable[P, R]:
    """The one-call form of a ``plan_*`` method: plan, then run the forward pass at once."""

    @functools.wraps(plan)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return run_to_end(plan(*args, **kwargs)())

    return run


class Inspector:
    """Answers introspection questions about one input with the serving model.

    Validation raises ``InvalidRequestError`` naming the bad fields (``text``, ``token_ids``,
    ``layers``, ``heads``, ``temperature``, ...) before any model work; a result that would be
    larger than the ``budget`` allows is refused up front with reason ``RESPONSE_TOO_LARGE`` and
    a violation for each option that would shrink it (the API layer sets the budget; by default
    nothing is refused). Model inputs are limited to ``context_window`` tokens (default: the
    model's ``n_positions``).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        budget: ResponseBudget = NO_LIMIT,
        context_window: int | None = None,
        context_shift_keep: int | None = None,
    ) -> None:
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        config = loaded.model.config
        self.n_layer = config.n_layer
        self.n_head = config.n_head
        self.d_model = config.n_embd
        self.vocab_size = min(self.tokenizer.vocab_size, config.vocab_size)
        self.context_window = min(context_window or config.n_positions, config.n_positions)
        # what a generation trace keeps when its context outgrows the window (the engine's default)
        self.context_shift_keep = min(context_shift_keep or (self.context_window * 3) // 4, self.context_window)
        self.budget = budget
        self._inputs = InputChecker(self.tokenizer, self.vocab_size, self.context_window)
        self._passes = ForwardPasses(loaded)

    # -- tokenizer --------------------------------------------------------------------------------

    def tokenize(self, text: str | None = None, token_ids: Sequence[int] | None = None) -> TokenizeResult:
        """The pieces of ``text`` (or of ``token_ids``) with ids, bytes and char offsets.

        Empty input gives no tokens. Not limited to the context window (no model work is done);
        only the response size limits it.
        """
        # Each token costs at least a token record, each character at least 2 bytes: a lower
        # bound that refuses a hopeless input before it is tokenized.
        budget = self.budget
        lower_bound = 2 * len(text) if text is not None else budget.token_bytes * len(token_ids or ())
        budget.check(lower_bound, _narrowing(text))
        result = self._inputs.tokens(text, token_ids, for_model=False)
        budget.check(budget.tokens(result.tokens), _narrowing(text))
        return result

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """The text of ``token_ids``, special tokens included; the inverse of ``tokenize``."""
        self.budget.check(len(token_ids), _narrowing(None))  # a token is at least one byte
        ids = self._inputs.checked_array(token_ids)
        self.budget.check(self.tokenizer.num_bytes(ids), _narrowing(None))
        return self.tokenizer.decode(ids.tolist(), skip_special=False)

    # -- model stages: each a plan (checks, tokenization, size) and a forward pass ----------------

    def plan_embed(self, text: str | None = None, token_ids: Sequence[int] | None = None) -> Plan[EmbedResult]:
        """Token, position and input embeddings ([seq, d_model] each) and the input embeddings'
        cosine-similarity matrix [seq, seq]."""
        tokens = self._inputs.tokens(text, token_ids).tokens
        seq = len(tokens)
        self.budget.check(
            self.budget.tokens(tokens) + self.budget.floats(3 * seq * self.d_model + seq * seq), _narrowing(text)
        )
        return functools.partial(self._passes.embed, tokens)

    def plan_attention(
        self,
        text: str | None = None,
        token_ids: Sequence[int] | None = None,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        include_scores: bool = False,
    ) -> Plan[AttentionResult]:
        """Attention weights [layers, heads, seq, seq] of the chosen blocks and heads (None or
        empty = all, returned in ascending order), and optionally the pre-softmax scores."""
        bad = Violations()
        self._inputs.indices(bad, "layers", layers, self.n_layer, "layers")
        self._inputs.indices(bad, "heads", heads, self.n_head, "heads per layer")
        tokens = self._inputs.tokens(text, token_ids, bad).tokens
        layer_list = _selection(layers, self.n_layer)
        head_list = _selection(heads, self.n_head)
        seq = len(tokens)
        num_floats = seq * seq * (2 if include_scores else 1) * len(layer_list) * len(head_list)
        narrow = _narrowing(
            text,
            ("layers", "ask for fewer layers", len(layer_list) > 1),
            ("heads", "ask for fewer heads", len(head_list) > 1),
            ("include_scores", "leave include_scores off (it doubles the size)", include_scores),
        )
        self.budget.check(self.budget.tokens(tokens) + self.budget.floats(num_floats), narrow)
        return functools.partial(self._passes.attention, tokens, layer_list, head_list, include_scores)

    def plan_hidden_states(
        self,
        text: str | None = None,
        token_ids: Sequence[int] | None = None,
        layers: Sequence[int] | None = None,
        last_token_only: bool = False,
        include_vectors: bool = False,
    ) -> Plan[HiddenStatesResult]:
        """Hidden states indexed like Hugging Face's ``output_hidden_states`` (0 = embeddings,
        i = after block i, n_layer = after the final LayerNorm; None or empty = all): their L2
        norms always, the vectors when ``include_vectors``."""
        num_states = self.n_layer + 1
        bad = Violations()
        self._inputs.indices(bad, "layers", layers, num_states, "hidden states (0 = embeddings)")
        tokens = self._inputs.tokens(text, token_ids, bad).tokens
        layer_list = _selection(layers, num_states)
        seq = len(tokens)
        positions = (seq - 1,) if last_token_only else tuple(range(seq))
        num_floats = len(positions) * (1 + (self.d_model if include_vectors else 0)) * len(layer_list)
        narrow = _narrowing(
            text,
            ("include_vectors", "leave include_vectors off (norms only)", include_vectors),
            ("layers", "ask for fewer layers", len(layer_list) > 1),
            ("last_token_only", "set last_token_only", not last_token_only),
        )
        self.budget.check(self.budget.tokens(tokens) + self.budget.floats(num_floats), narrow)
        return functools.partial(self._passes.hidden_states, tokens, layer_list, positions, include_vectors)

    # One call, validation and forward pass together (tests, benches, a single thread).
    embed = _now(plan_embed)
    attention = _now(plan_attention)
    hidden_states = _now(plan_hidden_states)

    def predict_next(
        self, text: str | None = None, token_ids: Sequence[int] | None = None, **options: Unpack[SamplingArgs]
    ) -> PredictNextResult:
        """The LM head on the last position: the ``num_candidates`` most probable next tokens with
        raw and filtered probabilities, the greedy token, ``num_samples`` draws and the entropy.

        Filters are the sampler's own (temperature 0 = greedy: every draw is the greedy token).
        Draws use a CPU ``torch.Generator`` seeded with ``seed`` and one uniform per draw, as the
        engine's sampler does, so the first draw is the token a generation with the same prompt,
        parameters and seed starts with.
        """
        return run_to_end(self.plan_predict_next(text, token_ids, SamplingOptions(**options))())

    def plan_predict_next(
        self, text: str | None, token_ids: Sequence[int] | None, options: SamplingOptions = PREDICT_NEXT_OPTIONS
    ) -> Plan[PredictNextResult]:
        tokens, options, _ = self._plan_prediction(text, token_ids, options)
        return functools.partial(self._passes.predict_next, tokens, options)

    def trace(
        self, text: str | None = None, token_ids: Sequence[int] | None = None, **options: Unpack[SamplingArgs]
    ) -> TraceResult:
        """The dataflow of one forward pass: tokenizer, embedding, each block's attention and MLP
        (the residual stream after each), final LayerNorm, LM head (last position) and sampling,
        each with shapes, time and statistics of its output; plus the prediction (5 candidates
        unless ``num_candidates`` says otherwise)."""
        return run_to_end(self.plan_trace(text, token_ids, replace(TRACE_OPTIONS, **options))())

    def plan_trace(
        self, text: str | None, token_ids: Sequence[int] | None, options: SamplingOptions = TRACE_OPTIONS
    ) -> Plan[TraceResult]:
        num_stages = 2 * self.n_layer + 5  # tokenizer, embedding, 2 per block, ln_f, lm_head, sampling
        tokens, options, tokenizer_seconds = self._plan_prediction(text, token_ids, options, num_stages)
        input_shape = (len(text),) if text is not None else (len(tokens),)
        return functools.partial(self._passes.trace, tokens, options, input_shape, tokenizer_seconds)

    def trace_generation(
        self,
        text: str | None = None,
        token_ids: Sequence[int] | None = None,
        **options: Unpack[GenerationTraceArgs],
    ) -> list[GenerationStep]:
        """The autoregressive loop, step by step: every step of a generation of up to
        ``max_new_tokens`` tokens (PredictNext on the context so far, and the draw), until it
        stops. With the same prompt, filters and seed the chosen tokens are Generate's."""
        trace = self.plan_generation_trace(text, token_ids, GenerationTraceOptions(**options))()
        steps = [run_to_end(trace.step())]
        while not trace.finished:
            steps.append(run_to_end(trace.step()))
        return steps

    def plan_generation_trace(
        self, text: str | None, token_ids: Sequence[int] | None, options: GenerationTraceOptions
    ) -> Callable[[], GenerationTrace]:
        """The checks, tokenization and size of TraceGeneration; calling the plan starts a trace
        (no model work: that is in its steps)."""
        tokens = self._inputs.tokens(text, token_ids, self._inputs.generation(options)).tokens
        options = options.with_seed()
        b = self.budget
        # one step's message: the candidates and the chosen token (a logit and six probabilities
        # each), and the text so far
        per_candidate = b.token_bytes + b.floats(7) + b.piece_bytes
        step_bytes = (options.num_candidates + 1) * per_candidate + b.piece_bytes * options.max_new_tokens
        b.check(
            step_bytes, [("num_candidates", "ask for fewer candidates"), ("max_new_tokens", "ask for fewer tokens")]
        )
        ids = [t.id for t in tokens]
        window, keep = self.context_window, self.context_shift_keep
        return lambda: GenerationTrace(self._passes, self.tokenizer, ids, options, window, keep)

    def _plan_prediction(
        self, text: str | None, token_ids: Sequence[int] | None, options: SamplingOptions, num_stages: int = 0
    ) -> tuple[Tokens, SamplingOptions, float]:
        """A prediction's tokens (and the seconds their checks and tokenization took) and options
        with a seed, once its size, with ``num_stages`` trace stages, is within the budget."""
        started = time.perf_counter()
        tokens = self._inputs.tokens(text, token_ids, self._inputs.sampling(options)).tokens
        seconds = time.perf_counter() - started
        options = options.with_seed()
        b = self.budget
        num_candidates = options.num_candidates + options.num_samples + 1  # the greedy token too
        narrow = _narrowing(
            text,
            ("num_candidates", "ask for fewer candidates", options.num_candidates > 1),
            ("num_samples", "ask for fewer samples", options.num_samples > 0),
        )
        b.check(b.tokens(tokens) + b.candidates(num_candidates) + b.stages(num_stages), narrow)
        return tokens, options, seconds


def _selection(values: Sequence[int] | None, limit: int) -> list[int]:
    """Sorted, without duplicates; None or empty means all of 0..limit-1."""
    return sorted(set(values)) if values else list(range(limit))


def _narrowing(text: str | None, *options: tuple[str, str, bool]) -> list[tuple[str, str]]:
    """(field, advice) for each option that would shrink the response, and the input last."""
    useful = [(field, advice) for field, advice, applies in options if applies]
    return [*useful, (input_field(text), "send a shorter input")]
