"""What the client returns: frozen dataclasses and enums, converted from the gpt2.v1 messages.

Callers never see protobuf: ``Generation`` (a whole completion, or ``n`` of them as ``Choice``s),
``StreamChunk`` (one streamed text delta; the last one of each choice says how it finished),
``ScoreResult`` (the log-probability of each token of a text), ``ModelInfo``, ``HealthStatus``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gpt2_client.proto import common_pb2
from gpt2_client.proto import generation_pb2 as pb


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_new_tokens reached
    EOS = "eos"  # the model produced <|endoftext|>
    STOP_SEQUENCE = "stop_sequence"  # a stop string appeared (see stop_sequence)
    STOP_TOKEN = "stop_token"  # one of stop_token_ids was produced
    CONTEXT_WINDOW = "context_window"  # the window filled up and overflow is "stop"
    CONSTRAINT_COMPLETE = "constraint_complete"  # the output matches the constraint and nothing can follow
    # It had to end (max_new_tokens, the window, no token could go on) before the output matched the
    # constraint: the text is the beginning of a match, not a match.
    CONSTRAINT_UNSATISFIED = "constraint_unsatisfied"


class HealthStatus(enum.Enum):
    UNKNOWN = "unknown"
    SERVING = "serving"
    NOT_SERVING = "not_serving"  # loading, draining, or broken
    SERVICE_UNKNOWN = "service_unknown"  # the server does not know the service asked about


_FINISH_REASONS = {
    pb.LENGTH: FinishReason.LENGTH,
    pb.EOS: FinishReason.EOS,
    pb.STOP_SEQUENCE: FinishReason.STOP_SEQUENCE,
    pb.STOP_TOKEN: FinishReason.STOP_TOKEN,
    pb.CONTEXT_WINDOW: FinishReason.CONTEXT_WINDOW,
    pb.CONSTRAINT_COMPLETE: FinishReason.CONSTRAINT_COMPLETE,
    pb.CONSTRAINT_UNSATISFIED: FinishReason.CONSTRAINT_UNSATISFIED,
}


@dataclass(frozen=True)
class TopLogprob:
    id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class Token:
    """One generated token: its id, its text on its own (U+FFFD for part of a character), its
    log-probability, and the most likely alternatives if ``top_logprobs`` was asked for."""

    id: int
    text: str
    logprob: float
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # after truncation
    completion_tokens: int
    truncated_prompt_tokens: int
    context_shifts: int
    cached_prompt_tokens: int = 0  # part of prompt_tokens: keys and values reused from the prefix cache


@dataclass(frozen=True)
class Timing:
    queue_seconds: float
    time_to_first_token_seconds: float
    total_seconds: float


@dataclass(frozen=True)
class ScoredToken:
    """One scored input token: its id, its text on its own (U+FFFD for part of a character), the
    natural log of the probability the model gave it from the tokens before it, its rank in that
    distribution (1 = the most likely; 1 + the number of tokens strictly more likely), and the
    most likely tokens at its position if ``top_logprobs`` was asked for."""

    id: int
    text: str
    logprob: float
    rank: int
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Choice:
    """One of the ``n`` completions of a request: its index (0 to n-1), its text (without the
    prompt), its tokens, how it ended, and its seed (the request's seed + index; pass it back as
    ``seed=`` with n=1 to reproduce this choice alone)."""

    index: int
    text: str
    tokens: tuple[Token, ...]
    finish_reason: FinishReason
    stop_sequence: str | None  # the stop string that matched, if finish_reason is STOP_SEQUENCE
    seed: int

    @property
    def token_ids(self) -> tuple[int, ...]:
        return tuple(t.id for t in self.tokens)


@dataclass(frozen=True)
class Generation:
    """A whole completion (``text`` excludes the prompt).

    ``choices``: every completion of the request, in index order, always at least one: with
    ``n`` > 1 the server's, with n = 1 one built from the fields above, so that callers can
    iterate uniformly. The fields above (text, tokens, finish_reason, seed, timing) describe
    choice 0; ``usage`` covers every choice (the prompt once, the completion tokens of all).
    ``prompt_tokens``: with ``echo=True``, the prompt's tokens but the first (nothing precedes
    it), each with its log-probability and rank as ``score`` gives them; empty otherwise."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    tokens: tuple[Token, ...]
    finish_reason: FinishReason
    stop_sequence: str | None  # the stop string that matched, if finish_reason is STOP_SEQUENCE
    usage: Usage
    seed: int  # pass it back as seed= to reproduce a sampled completion
    timing: Timing
    choices: tuple[Choice, ...] = ()
    prompt_tokens: tuple[ScoredToken, ...] = ()


@dataclass(frozen=True)
class StreamChunk:
    """One streamed text delta and the tokens it covers. The last chunk of a stream has
    ``finish_reason`` (and usage, seed, timing) set; its text may be empty.

    With ``n`` > 1 the chunks of the choices interleave: ``choice_index`` says whose each is
    (0 with n = 1), and each choice has its own last chunk (with the usage of that choice alone).
    ``prompt_tokens``: with ``echo=True``, on choice 0's first chunk, the prompt's scored tokens
    (as ``Generation.prompt_tokens``); empty on every other chunk."""

    request_id: str
    text: str
    tokens: tuple[Token, ...]
    finish_reason: FinishReason | None = None
    stop_sequence: str | None = None
    usage: Usage | None = None
    seed: int | None = None
    timing: Timing | None = None
    choice_index: int = 0
    prompt_tokens: tuple[ScoredToken, ...] = ()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class ScoreResult:
    """A scored text. ``tokens``: every scored input token, in order; without a context or
    ``add_bos`` the first input token is not scored (nothing precedes it), so they start at the
    second. ``total_logprob`` is their sum, ``mean_nll`` = -total_logprob / len(tokens),
    ``perplexity`` = exp(mean_nll); ``usage.prompt_tokens`` counts every token the model read
    (<|endoftext|>, context, input)."""

    request_id: str
    tokens: tuple[ScoredToken, ...]
    total_logprob: float
    mean_nll: float
    perplexity: float
    usage: Usage
    timing: Timing


@dataclass(frozen=True)
class ParameterCounts:
    token_embedding: int
    position_embedding: int
    attention: int
    feed_forward: int
    layer_norm: int
    lm_head: int  # tied to the token embedding; not counted again in total
    total: int


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int
    max_queue_size: int
    max_new_tokens_limit: int
    default_max_new_tokens: int
    kv_cache_slots: int
    max_prefill_tokens: int
    max_stop_strings: int
    max_stop_string_chars: int
    max_stop_token_ids: int
    max_top_logprobs: int
    max_batch_requests: int
    max_choices: int = 1  # the largest n of a generate


@dataclass(frozen=True)
class ModelInfo:
    name: str
    source: str
    random_weights: bool  # True: untrained weights, meaningless text
    n_layer: int
    n_head: int
    d_model: int
    d_ff: int
    vocab_size: int
    context_window: int
    dtype: str
    device: str
    eos_token_id: int
    parameter_counts: ParameterCounts
    limits: EngineLimits
    weights: str = "float32"  # storage of the matrix products' weights: float32, float16 or int8
    batch_invariant: bool = False  # True: seeded results are bitwise independent of the batch


# -- from protobuf -------------------------------------------------------------------------------


def token_from_proto(t: pb.TokenInfo) -> Token:
    return Token(t.id, t.text, t.logprob, tuple(TopLogprob(x.id, x.text, x.logprob) for x in t.top_logprobs))


def _usage(u: pb.Usage) -> Usage:
    return Usage(
        u.prompt_tokens, u.completion_tokens, u.truncated_prompt_tokens, u.context_shifts, u.cached_prompt_tokens
    )


def _timing(t: pb.Timing) -> Timing:
    return Timing(t.queue_seconds, t.time_to_first_token_seconds, t.total_seconds)


def _choice(c: pb.Choice) -> Choice:
    return Choice(
        index=c.index,
        text=c.text,
        tokens=tuple(token_from_proto(t) for t in c.tokens),
        finish_reason=_FINISH_REASONS[c.finish_reason],
        stop_sequence=c.stop_sequence or None,
        seed=c.seed,
    )


def generation_from_proto(r: pb.GenerateResponse) -> Generation:
    tokens = tuple(token_from_proto(t) for t in r.tokens)
    finish_reason = _FINISH_REASONS[r.finish_reason]
    stop_sequence = r.stop_sequence or None
    choices = tuple(_choice(c) for c in r.choices) or (Choice(0, r.text, tokens, finish_reason, stop_sequence, r.seed),)
    return Generation(
        request_id=r.request_id,
        text=r.text,
        token_ids=tuple(r.token_ids),
        tokens=tokens,
        finish_reason=finish_reason,
        stop_sequence=stop_sequence,
        usage=_usage(r.usage),
        seed=r.seed,
        timing=_timing(r.timing),
        choices=choices,
        prompt_tokens=tuple(scored_token_from_proto(t) for t in r.prompt_tokens),
    )


def chunk_from_proto(r: pb.GenerateStreamResponse) -> StreamChunk:
    tokens = tuple(token_from_proto(t) for t in r.tokens)
    prompt_tokens = tuple(scored_token_from_proto(t) for t in r.prompt_tokens)
    if r.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
        return StreamChunk(r.request_id, r.text, tokens, choice_index=r.choice_index, prompt_tokens=prompt_tokens)
    return StreamChunk(
        request_id=r.request_id,
        text=r.text,
        tokens=tokens,
        finish_reason=_FINISH_REASONS[r.finish_reason],
        stop_sequence=r.stop_sequence or None,
        usage=_usage(r.usage),
        seed=r.seed if r.HasField("seed") else None,
        timing=_timing(r.timing),
        choice_index=r.choice_index,
        prompt_tokens=prompt_tokens,
    )


def scored_token_from_proto(t: pb.ScoredToken) -> ScoredToken:
    return ScoredToken(
        t.id, t.text, t.logprob, t.rank, tuple(TopLogprob(x.id, x.text, x.logprob) for x in t.top_logprobs)
    )


def score_result_from_proto(r: pb.ScoreResponse) -> ScoreResult:
    return ScoreResult(
        request_id=r.request_id,
        tokens=tuple(scored_token_from_proto(t) for t in r.tokens),
        total_logprob=r.total_logprob,
        mean_nll=r.mean_nll,
        perplexity=r.perplexity,
        usage=_usage(r.usage),
        timing=_timing(r.timing),
    )


def model_info_from_proto(m: common_pb2.ModelInfo) -> ModelInfo:
    c, lim = m.parameter_counts, m.limits
    return ModelInfo(
        name=m.name,
        source=m.source,
        random_weights=m.random_weights,
        n_layer=m.n_layer,
        n_head=m.n_head,
        d_model=m.d_model,
        d_ff=m.d_ff,
        vocab_size=m.vocab_size,
        context_window=m.context_window,
        dtype=m.dtype,
        device=m.device,
        eos_token_id=m.eos_token_id,
        parameter_counts=ParameterCounts(
            c.token_embedding, c.position_embedding, c.attention, c.feed_forward, c.layer_norm, c.lm_head, c.total
        ),
        limits=EngineLimits(
            max_batch_size=lim.max_batch_size,
            max_queue_size=lim.max_queue_size,
            max_new_tokens_limit=lim.max_new_tokens_limit,
            default_max_new_tokens=lim.default_max_new_tokens,
            kv_cache_slots=lim.kv_cache_slots,
            max_prefill_tokens=lim.max_prefill_tokens,
            max_stop_strings=lim.max_stop_strings,
            max_stop_string_chars=lim.max_stop_string_chars,
            max_stop_token_ids=lim.max_stop_token_ids,
            max_top_logprobs=lim.max_top_logprobs,
            max_batch_requests=lim.max_batch_requests,
            max_choices=lim.max_choices or 1,  # 0: a server from before n, which makes one completion
        ),
        weights=m.weights,
        batch_invariant=m.batch_invariant,
    )


def health_status_from_proto(value: int) -> HealthStatus:
    # grpc.health.v1.HealthCheckResponse.ServingStatus: UNKNOWN=0, SERVING=1, NOT_SERVING=2,
    # SERVICE_UNKNOWN=3 (only Watch sends the last one).
    return [HealthStatus.UNKNOWN, HealthStatus.SERVING, HealthStatus.NOT_SERVING, HealthStatus.SERVICE_UNKNOWN][value]
