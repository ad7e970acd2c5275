"""One generation's mutable state, and the events it produces. The only mutable per-request state.

The sequence's tokens are ``prompt + output``. Its KV-cache window is ``tokens[window_start:]``,
of which the first ``num_computed`` are in the cache at positions 0..num_computed-1. A context
shift moves ``window_start`` forward and resets ``num_computed`` to 0 (the kept tokens are
re-encoded at positions 0..k-1, since GPT-2's positions are learned absolute embeddings).
Window positions below ``prefill_end`` are computed in prefill chunks, the others one per
decode step; a preempted sequence recomputes its window the same way.

A request for n completions is n sequences: the first reads the prompt, and the others (its
``forks``, each ``fork_of`` it) wait with a KV-cache slot but compute nothing until the step that
reads the prompt's last token; then the prompt's keys and values are copied into their slots and
each samples its first token from the same position (scheduler.py, runner.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from gpt2_service.core.detokenizer import IncrementalDetokenizer
from gpt2_service.core.request import FinishReason, GenerationRequest


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class TopLogprob:
    id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenInfo:
    id: int
    text: str  # the token on its own (U+FFFD where it holds part of a character)
    logprob: float  # under the model's raw distribution
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class ScoredToken:
    """A prompt token of a Score request and the log-probability the model gave it."""

    id: int
    text: str
    logprob: float  # natural log, from the tokens before it
    rank: int  # 1 = the most likely token
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # after truncation
    completion_tokens: int
    truncated_prompt_tokens: int
    context_shifts: int
    cached_prompt_tokens: int = 0  # prompt tokens whose keys and values were reused, not computed


@dataclass(frozen=True)
class Timing:
    queue_seconds: float  # arrival -> admitted to the running batch
    time_to_first_token_seconds: float  # arrival -> first token
    total_seconds: float  # arrival -> finished


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    stop_sequence: str | None
    text: str  # the whole output text
    token_ids: tuple[int, ...]
    usage: Usage
    seed: int
    timing: Timing
    scored: tuple[ScoredToken, ...] = ()  # a Score request's tokens
    prefill_chunks: int = 0  # prefill chunks its windows took (a trace's prefill span)
    shift_seconds: tuple[float, ...] = ()  # when each context shift happened, seconds after arrival


@dataclass(frozen=True)
class GenerationOutput:
    """What one engine step produced for one request: a token and its text delta, and, on the
    last output of a request, how it finished."""

    request_id: str
    tokens: tuple[TokenInfo, ...]
    text: str  # valid UTF-8 delta, never part of a stop string; may be empty
    finished: Finished | None = None
    index: int = 0  # the choice it belongs to (GenerationRequest.n > 1)
    prompt_scores: tuple[ScoredToken, ...] = ()  # an echoed prompt's tokens, on the first output


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: GenerationRequest
    prompt_ids: list[int]
    seed: int
    max_new_tokens: int
    truncated_prompt_tokens: int
    arrival_time: float
    detokenizer: IncrementalDetokenizer
    status: SequenceStatus = SequenceStatus.WAITING
    slot: int | None = None
    tokens: list[int] = field(default_factory=list)  # prompt + output
    window_start: int = 0
    num_computed: int = 0
    prefill_end: int = 0  # 0 = the whole prompt
    context_shifts: int = 0
    admitted_time: float | None = None
    first_token_time: float | None = None
    token_infos: list[TokenInfo] = field(default_factory=list)
    paused: bool = False  # its reader lags: it is not scheduled until resumed
    num_preemptions: int = 0  # times it lost its slot and was recomputed
    scored: list[ScoredToken] = field(default_factory=list)  # a Score's (or echoed prompt's) tokens so far
    index: int = 0  # its choice of the request's n (its seed is the request's + index)
    group_id: int = 0  # the seq id of choice 0; 0 = its own
    forks: list[Sequence] = field(default_factory=list)  # choices waiting for this one's prompt
    fork_of: Sequence | None = None  # the choice whose prompt this one waits for, until it forks
    cached_prompt_tokens: int = 0  # prompt tokens whose keys and values were reused, not computed
    prompt_blocks: list[tuple[int, ...]] | None = None  # its prompt's whole blocks, for prefix reuse
    # admitted to reuse a prefix another running sequence is computing: (that sequence, tokens)
    awaits: tuple[Sequence, int] | None = None
    bad_word_ids: tuple[tuple[int, ...], ...] = ()  # its bad words' token sequences
    prefill_chunks: int = 0  # chunks that read its prompt (counts and timestamps only: for traces)
    shift_times: list[float] = field(default_factory=list)  # clock time of each context shift
    finished_time: float | None = None  # clock time it finished (its last output)
    finish_reason: str | None = None  # FinishReason value, once finished
    matcher: Any = None  # its constraint's state (engine/constraints.py: an llguidance matcher), if any

    def excluded_ids(self) -> list[int]:
        """The tokens that would complete one of its bad words now."""
        tokens = self.tokens
        return [
            word[-1]
            for word in self.bad_word_ids
            if len(word) == 1
            or (len(tokens) >= len(word) - 1 and tokens[len(tokens) - len(word) + 1 :] == list(word[:-1]))
        ]

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.prompt_ids)
        if not self.prefill_end:
            self.prefill_end = self.window_len

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def tenant(self) -> str:
        return self.request.tenant

    @property
    def call_id(self) -> str:
        return self.request.call_id or f"seq-{self.group_id or self.seq_id}"

    @property
    def scores_prompt(self) -> bool:
        """Its prompt chunks are scored: a Score request's, or choice 0's echoed prompt the first
        time it is read (not after a context shift, nor when a preempted sequence recomputes it)."""
        if self.request.score is not None:
            return True
        return self.request.echo and self.index == 0 and self.num_output == 0 and self.window_start == 0

    @property
    def first_scored(self) -> int:
        """The index of the first prompt token scored (token 0 has no prediction)."""
        return self.request.score.first if self.request.score is not None else 1

    @property
    def num_output(self) -> int:
        return len(self.tokens) - len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[len(self.prompt_ids) :]

    @property
    def window_len(self) -> int:
        return len(self.tokens) - self.window_start

    @property
    def num_uncomputed(self) -> int:
        return self.window_len - self.num_computed

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=self.num_output,
            truncated_prompt_tokens=self.truncated_prompt_tokens,
            context_shifts=self.context_shifts,
            cached_prompt_tokens=self.cached_prompt_tokens,
        )
