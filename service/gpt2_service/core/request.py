"""What a caller asks the engine for: frozen value types and their validation.

This module knows nothing of protobuf or torch; the API layer converts into these types and the
engine validates them before anything is enqueued.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from gpt2_service.errors import Violations

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_TOP_LOGPROBS = 20
MAX_SEED = 2**64 - 1
MAX_ABS_PRESENCE_FREQUENCY_PENALTY = 2.0
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_ABS_LOGIT_BIAS = 100.0
MAX_TOKEN_ID_SET = 4096  # allowed_token_ids, banned_token_ids
MAX_BAD_WORDS = 64
MAX_BAD_WORD_CHARS = 256
MAX_CONSTRAINT_CHARS = {"regex": 4096, "json_schema": 65536, "grammar": 65536}
MAX_CHOICES = 256  # options of a choice constraint
MAX_CHOICE_CHARS = 256


class Truncation(enum.Enum):
    """What to do with a prompt longer than the context window."""

    TRUNCATE_LEFT = "truncate_left"  # drop the earliest tokens (default); the count is reported
    REJECT = "reject"  # refuse the request with INVALID_ARGUMENT


class Overflow(enum.Enum):
    """What to do when a generation fills the context window."""

    SHIFT = "shift"  # forget the earliest tokens, re-encode the rest, continue (default)
    STOP = "stop"  # finish with FinishReason.CONTEXT_WINDOW


class Priority(enum.IntEnum):
    """A request's class: a waiting request of a higher class is admitted first and may preempt
    running ones of a lower class. Lower value = higher class."""

    INTERACTIVE = 0
    DEFAULT = 1
    BATCH = 2


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_new_tokens reached
    EOS = "eos"  # the model produced <|endoftext|>
    STOP_SEQUENCE = "stop_sequence"  # one of the stop strings appeared in the text
    STOP_TOKEN = "stop_token"  # one of the stop token ids was produced
    CONTEXT_WINDOW = "context_window"  # the window is full and overflow is STOP
    CONSTRAINT_COMPLETE = "constraint_complete"  # the output matches the constraint; nothing can follow
    CONSTRAINT_UNSATISFIED = "constraint_unsatisfied"  # it had to end before the output matched


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. Defaults leave the model's distribution untouched."""

    temperature: float = 1.0  # 0 = greedy (argmax); the filters below then make no difference
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus: smallest set with cumulative probability >= top_p; 1 = off
    min_p: float = 0.0  # drop tokens with p < min_p * p(top token); 0 = off
    typical_p: float = 1.0  # locally typical sampling mass; 1 = off
    repetition_penalty: float = 1.0  # Hugging Face semantics, over prompt + output; 1 = off
    presence_penalty: float = 0.0  # OpenAI semantics, over output tokens; 0 = off
    frequency_penalty: float = 0.0  # OpenAI semantics, over output tokens; 0 = off
    seed: int | None = None  # None: the engine picks one and reports it
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added before anything else
    allowed_token_ids: tuple[int, ...] = ()  # only these may be generated; () = all
    banned_token_ids: tuple[int, ...] = ()  # never generated

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True)
class StoppingCriteria:
    """When a generation ends. ``max_new_tokens=None`` takes the engine's default."""

    max_new_tokens: int | None = None
    min_new_tokens: int = 0  # EOS and stop token ids are masked, stop strings not checked, before this
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_in_output: bool = False
    bad_words: tuple[str, ...] = ()  # strings whose token sequences are never completed


@dataclass(frozen=True)
class ConstraintSpec:
    """What the output must match: ``kind`` is "regex", "json_schema", "choice" (``options``) or
    "grammar" (``text``). Compiled by engine/constraints.py."""

    kind: str
    text: str = ""
    options: tuple[str, ...] = ()

    @property
    def field(self) -> str:
        return f"constraint.{self.kind}"


@dataclass(frozen=True)
class ScoreSpec:
    """Score the prompt instead of generating: the log-probability of each prompt token from
    index ``first`` (>= 1: token 0 has no prediction) on, given the tokens before it. The prompt
    is read in prefill chunks like any other; nothing is generated."""

    first: int


@dataclass(frozen=True)
class GenerationRequest:
    """One generation as the engine sees it. Exactly one of prompt / prompt_token_ids is set."""

    request_id: str
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingCriteria = field(default_factory=StoppingCriteria)
    truncation: Truncation = Truncation.TRUNCATE_LEFT
    overflow: Overflow = Overflow.SHIFT
    top_logprobs: int = 0
    deadline: float | None = None  # time.monotonic() instant; None = no deadline
    # Prompt ids that came before ``prompt_token_ids`` and were already cut off (TRUNCATE_LEFT) by
    # the API layer, which never converts more ids than the window holds; counted as truncated.
    num_dropped_prompt_ids: int = 0
    priority: Priority = Priority.DEFAULT
    tenant: str = ""  # who is served: the authenticated identity, else the peer; "" = anonymous
    call_id: str = ""  # the call it came with (a GenerateBatch's items share one); "" = its own
    trace_id: str = ""  # the trace of the call it came with (32 hex digits), for metric exemplars; "" = none
    score: ScoreSpec | None = None  # a Score request: prompt_token_ids scored, nothing generated
    constraint: ConstraintSpec | None = None  # what the output must match
    echo: bool = False  # also score the prompt (from its second token), once, as a Score would
    n: int = 1  # completions: the prompt is read once, then n sequences sample from it (seeds seed + i)


@dataclass(frozen=True)
class RequestLimits:
    """The engine-side limits that validation checks against."""

    vocab_size: int
    max_new_tokens_limit: int
    context_window: int = 1024
    max_choices: int = 16  # the most completions (``n``) of one request


def _finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))


def first_bad_token_id(token_ids: Sequence[int], vocab_size: int) -> int | None:
    """The index of the first id outside [0, vocab_size), or None. min/max run at C speed, so a
    long valid list costs little; only a bad one is walked to find the index."""
    if not token_ids or (min(token_ids) >= 0 and max(token_ids) < vocab_size):
        return None
    return next(i for i, token_id in enumerate(token_ids) if not 0 <= token_id < vocab_size)


def check_count(bad: Violations, field: str, count: int, limit: int, what: str) -> bool:
    """One violation when ``count`` is over ``limit``; True when it is not (the elements may be
    checked one by one then, at bounded cost)."""
    bad.check(count <= limit, field, f"at most {limit} {what}, got {count}")
    return count <= limit


def check_strings(bad: Violations, field: str, strings: Sequence[str], limit: int, max_chars: int, what: str) -> bool:
    """At most ``limit`` strings, each 1 to ``max_chars`` characters (``field[i]`` names a bad
    one); True when the count is within the limit."""
    if not check_count(bad, field, len(strings), limit, what):
        return False
    for i, text in enumerate(strings):
        bad.check(0 < len(text) <= max_chars, f"{field}[{i}]", f"must be 1 to {max_chars} characters, got {len(text)}")
    return True


def token_id_violation(field: str, token_id: int, vocab_size: int) -> tuple[str, str]:
    return field, f"must be a token id in [0, {vocab_size}), got {token_id}"


def check_sampling(bad: Violations, s: SamplingParams, prefix: str) -> None:
    """The sampling parameters' rules, each broken one added to ``bad`` as ``prefix`` + its field
    (``sampling.top_p`` in a GenerationRequest, ``top_p`` in an introspection request)."""
    check = bad.check
    check(
        _finite(s.temperature) and s.temperature >= 0,
        f"{prefix}temperature",
        f"must be a finite number >= 0, got {s.temperature}",
    )
    check(s.top_k >= 0, f"{prefix}top_k", f"must be >= 0 (0 disables it), got {s.top_k}")
    check(_finite(s.top_p) and 0 < s.top_p <= 1, f"{prefix}top_p", f"must be in (0, 1], got {s.top_p}")
    check(_finite(s.min_p) and 0 <= s.min_p <= 1, f"{prefix}min_p", f"must be in [0, 1], got {s.min_p}")
    check(_finite(s.typical_p) and 0 < s.typical_p <= 1, f"{prefix}typical_p", f"must be in (0, 1], got {s.typical_p}")
    check(
        _finite(s.repetition_penalty) and s.repetition_penalty > 0,
        f"{prefix}repetition_penalty",
        f"must be a finite number > 0 (1 disables it), got {s.repetition_penalty}",
    )
    for name, value in (("presence_penalty", s.presence_penalty), ("frequency_penalty", s.frequency_penalty)):
        check(
            _finite(value) and abs(value) <= MAX_ABS_PRESENCE_FREQUENCY_PENALTY,
            f"{prefix}{name}",
            f"must be in [-2, 2], got {value}",
        )
    if s.seed is not None:
        check(0 <= s.seed <= MAX_SEED, f"{prefix}seed", f"must be in [0, 2^64-1], got {s.seed}")


def check_token_constraints(bad: Violations, s: SamplingParams, vocab_size: int) -> None:
    """logit_bias, allowed_token_ids and banned_token_ids: counts first, then their elements."""
    check = bad.check
    if check_count(bad, "sampling.logit_bias", len(s.logit_bias), MAX_LOGIT_BIAS_ENTRIES, "entries"):
        for token_id, bias in s.logit_bias:
            check(
                0 <= token_id < vocab_size,
                "sampling.logit_bias",
                f"keys must be token ids in [0, {vocab_size}), got {token_id}",
            )
            check(
                _finite(bias) and abs(bias) <= MAX_ABS_LOGIT_BIAS,
                f"sampling.logit_bias[{token_id}]",
                f"must be in [-100, 100], got {bias}",
            )
    for name, ids in (("allowed_token_ids", s.allowed_token_ids), ("banned_token_ids", s.banned_token_ids)):
        if check_count(bad, f"sampling.{name}", len(ids), MAX_TOKEN_ID_SET, "token ids"):
            first_bad = first_bad_token_id(ids, vocab_size)
            if first_bad is not None:
                bad.add(*token_id_violation(f"sampling.{name}[{first_bad}]", ids[first_bad], vocab_size))
    if s.allowed_token_ids and len(s.banned_token_ids) <= MAX_TOKEN_ID_SET:
        check(
            not set(s.allowed_token_ids) <= set(s.banned_token_ids),
            "sampling.banned_token_ids",
            "bans every one of allowed_token_ids: no token could be generated",
        )


def check_constraint(bad: Violations, c: ConstraintSpec) -> None:
    """The constraint's size (its compilation, which finds what else is wrong, comes later)."""
    check = bad.check
    if c.kind == "choice":
        field = "constraint.choice.options"
        if check_strings(bad, field, c.options, MAX_CHOICES, MAX_CHOICE_CHARS, "options"):
            check(bool(c.options), field, "must hold at least one option")
            check(len(set(c.options)) == len(c.options), field, "must be distinct")
        return
    limit = MAX_CONSTRAINT_CHARS.get(c.kind)
    if limit is None:
        bad.add("constraint", f"unknown constraint kind {c.kind!r}")
        return
    check(0 < len(c.text) <= limit, c.field, f"must be 1 to {limit} characters, got {len(c.text)}")


TOKEN_ID_CHUNK = 65536  # ids read per C call: a huge list never holds the GIL for long


@dataclass(frozen=True, eq=False)
class TokenIdScan:
    """What ``scan_token_ids`` found: the ids kept (int64), how many came before them, and the first
    id outside the vocabulary (its index and value), if any."""

    kept: npt.NDArray[np.int64]
    num_dropped: int
    first_bad: tuple[int, int] | None


def scan_token_ids(ids: Sequence[int], vocab_size: int, keep: int | None = None) -> TokenIdScan:
    """Check every id of ``ids`` against the vocabulary and keep the last ``keep`` (None: all), a
    chunk at a time into numpy: the GIL is free between chunks, and a list of millions never
    becomes millions of Python ints. Stops at the first bad id."""
    num_dropped = max(len(ids) - keep, 0) if keep is not None else 0
    it, kept, start = iter(ids), list[npt.NDArray[np.int64]](), 0
    while (chunk := np.fromiter(itertools.islice(it, TOKEN_ID_CHUNK), dtype=np.int64)).size:
        bad = np.flatnonzero((chunk < 0) | (chunk >= vocab_size))
        if bad.size:
            return TokenIdScan(np.empty(0, np.int64), 0, (start + int(bad[0]), int(chunk[bad[0]])))
        if start + chunk.size > num_dropped:
            kept.append(chunk[max(num_dropped - start, 0) :])
        start += chunk.size
    return TokenIdScan(np.concatenate(kept) if kept else np.empty(0, np.int64), num_dropped, None)


def find_violations(request: GenerationRequest, limits: RequestLimits) -> Violations:
    """The rules the request breaks (empty if it is valid), at most ``MAX_REPORTED_VIOLATIONS``
    of them reported. Counts are checked before elements: a list over its limit is one
    violation, whatever it holds, so the cost of rejecting does not grow with the request."""
    bad = Violations()
    check = bad.check

    check_sampling(bad, request.sampling, "sampling.")

    t = request.stopping
    if t.max_new_tokens is not None:
        check(
            1 <= t.max_new_tokens <= limits.max_new_tokens_limit,
            "stopping.max_new_tokens",
            f"must be in [1, {limits.max_new_tokens_limit}] (the server's limit), got {t.max_new_tokens}",
        )
    max_new = t.max_new_tokens if t.max_new_tokens is not None else limits.max_new_tokens_limit
    check(
        0 <= t.min_new_tokens <= max_new,
        "stopping.min_new_tokens",
        f"must be in [0, max_new_tokens={max_new}], got {t.min_new_tokens}",
    )
    check_strings(bad, "stopping.stop", t.stop, MAX_STOP_STRINGS, MAX_STOP_STRING_CHARS, "stop strings")
    if check_count(bad, "stopping.stop_token_ids", len(t.stop_token_ids), MAX_STOP_TOKEN_IDS, "stop token ids"):
        for i, token_id in enumerate(t.stop_token_ids):
            check(
                0 <= token_id < limits.vocab_size,
                f"stopping.stop_token_ids[{i}]",
                f"must be a token id in [0, {limits.vocab_size}), got {token_id}",
            )

    if request.prompt_token_ids is not None:
        check(request.prompt is None, "prompt", "give either prompt or prompt_token_ids, not both")
        first_bad = first_bad_token_id(request.prompt_token_ids, limits.vocab_size)
        if first_bad is not None:  # one is enough; a bad list can be long
            bad.add(
                *token_id_violation(
                    f"prompt_token_ids[{first_bad}]", request.prompt_token_ids[first_bad], limits.vocab_size
                )
            )
    check_token_constraints(bad, request.sampling, limits.vocab_size)
    check_strings(bad, "stopping.bad_words", t.bad_words, MAX_BAD_WORDS, MAX_BAD_WORD_CHARS, "bad words")
    if request.constraint is not None:
        check_constraint(bad, request.constraint)
    check(
        0 <= request.top_logprobs <= MAX_TOP_LOGPROBS,
        "top_logprobs",
        f"must be in [0, {MAX_TOP_LOGPROBS}], got {request.top_logprobs}",
    )
    check(
        1 <= request.n <= limits.max_choices,
        "n",
        f"must be in [1, {limits.max_choices}] (the server's limit; 0 means 1), got {request.n}",
    )
    if request.score is not None:
        num_ids = len(request.prompt_token_ids or ())
        check(
            1 <= request.score.first < num_ids,
            "score.first",
            f"must be in [1, {num_ids}) (the prompt's token ids, given as prompt_token_ids), got {request.score.first}",
        )
        check(request.truncation is Truncation.REJECT, "truncation", "a scored prompt is never truncated: REJECT")
    return bad


def validate(request: GenerationRequest, limits: RequestLimits) -> None:
    """Raise InvalidRequestError naming the bad fields; return if the request is valid."""
    find_violations(request, limits).raise_if_any()
