"""Conversions between gpt2.v1 protobuf messages and the engine's value types.

Also the checks only the API layer can make (enum values outside the proto's range, a
too-long request_id, an empty or oversized batch, a deadline too short to meet); they raise the
engine's ``InvalidRequestError`` / ``DeadlineExceededError`` so the one error table applies.
Field paths are protobuf paths: ``sampling.top_p``, ``prompt_token_ids.ids[3]``,
``requests[2].stopping.stop[0]``.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TypeVar

from gpt2_client.proto import common_pb2
from gpt2_client.proto import generation_pb2 as pb

from gpt2_service.api.logs import new_request_id
from gpt2_service.core.request import (
    MAX_BAD_WORDS,
    MAX_CHOICES,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TOKEN_ID_SET,
    MAX_TOP_LOGPROBS,
    ConstraintSpec,
    FinishReason,
    GenerationRequest,
    Overflow,
    Priority,
    RequestLimits,
    SamplingParams,
    StoppingCriteria,
    Truncation,
    check_count,
    find_violations,
    scan_token_ids,
    token_id_violation,
)
from gpt2_service.core.sequence import Finished, GenerationOutput, ScoredToken, TokenInfo
from gpt2_service.engine.frontend import LONG_PROMPT, Engine
from gpt2_service.errors import DeadlineExceededError, FieldViolation, InvalidRequestError, Violations

M = TypeVar("M")
MAX_REQUEST_ID_CHARS = 128
# Request ids go into every log line and the ErrorInfo of errors: printable ASCII, no spaces, so
# that no id can forge a log line, carry terminal escapes, or grow a trailer.
_SAFE_REQUEST_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_REQUEST_ID_CHARS}}}")
# A call with less time left than this cannot get through the queue and one engine step; it is
# refused up front instead of taking a batch place it would give up at once.
MIN_TIME_REMAINING_SECONDS = 0.01

TRUNCATION_FROM_PROTO = {
    pb.TRUNCATION_UNSPECIFIED: Truncation.TRUNCATE_LEFT,
    pb.TRUNCATE_LEFT: Truncation.TRUNCATE_LEFT,
    pb.REJECT: Truncation.REJECT,
}
PRIORITY_FROM_PROTO = {
    pb.PRIORITY_UNSPECIFIED: Priority.DEFAULT,
    pb.PRIORITY_INTERACTIVE: Priority.INTERACTIVE,
    pb.PRIORITY_DEFAULT: Priority.DEFAULT,
    pb.PRIORITY_BATCH: Priority.BATCH,
}
OVERFLOW_FROM_PROTO = {
    pb.OVERFLOW_UNSPECIFIED: Overflow.SHIFT,
    pb.SHIFT: Overflow.SHIFT,
    pb.STOP: Overflow.STOP,
}
FINISH_REASON_TO_PROTO = {
    FinishReason.LENGTH: pb.LENGTH,
    FinishReason.EOS: pb.EOS,
    FinishReason.STOP_SEQUENCE: pb.STOP_SEQUENCE,
    FinishReason.STOP_TOKEN: pb.STOP_TOKEN,
    FinishReason.CONTEXT_WINDOW: pb.CONTEXT_WINDOW,
    FinishReason.CONSTRAINT_COMPLETE: pb.CONSTRAINT_COMPLETE,
    FinishReason.CONSTRAINT_UNSATISFIED: pb.CONSTRAINT_UNSATISFIED,
}

_ENGINE_TOKEN_ID_PATH = re.compile(r"(^|\.)prompt_token_ids\[")


def proto_field_path(engine_path: str, prefix: str = "") -> str:
    """The engine names ``prompt_token_ids[i]``; in the proto the ids sit in a TokenIds message."""
    return prefix + _ENGINE_TOKEN_ID_PATH.sub(r"\1prompt_token_ids.ids[", engine_path)


def with_prefix(error: InvalidRequestError, prefix: str) -> InvalidRequestError:
    """The same error with every field path as a proto path under ``prefix`` (e.g. ``requests[3].``)."""
    return error.with_fields(lambda path: proto_field_path(path, prefix))


def is_safe_request_id(request_id: str) -> bool:
    return _SAFE_REQUEST_ID.fullmatch(request_id) is not None


def check_request_id(bad: Violations, request_id: str) -> None:
    bad.check(
        not request_id or is_safe_request_id(request_id),
        "request_id",
        f"must be 1 to {MAX_REQUEST_ID_CHARS} printable ASCII characters without spaces "
        f"(got {len(request_id)} characters)",
    )


def request_id_of(msg: pb.GenerateRequest | pb.ScoreRequest) -> str:
    """The caller's request_id, or a new one when it is empty or unsafe to log (such a request
    is refused, and the refusal is logged under the new id)."""
    return msg.request_id if is_safe_request_id(msg.request_id) else new_request_id()


def deadline_from_time_remaining(remaining: float | None, now: float | None = None) -> float | None:
    """A time.monotonic() deadline from gRPC's time_remaining(); refuses one too short to meet."""
    if remaining is None:
        return None
    if remaining < MIN_TIME_REMAINING_SECONDS:
        raise DeadlineExceededError(
            f"the call's deadline leaves {max(remaining, 0.0) * 1000:.1f} ms; "
            f"at least {MIN_TIME_REMAINING_SECONDS * 1000:.0f} ms are needed to start a generation"
        )
    return (time.monotonic() if now is None else now) + remaining


# -- requests ------------------------------------------------------------------------------------


def is_large(msg: pb.GenerateRequest) -> bool:
    """Whether converting ``msg`` may take long enough to matter on the event loop (O(1) to ask)."""
    # the engine's own bound: above it, a prompt is also tokenized on a worker thread
    return len(msg.prompt) > LONG_PROMPT or len(msg.prompt_token_ids.ids) > LONG_PROMPT


def to_engine_request(
    msg: pb.GenerateRequest,
    request_id: str,
    deadline: float | None,
    limits: RequestLimits,
    tenant: str = "",
    call_id: str = "",
) -> GenerationRequest:
    """The validated engine request of ``msg``, for ``tenant`` (who is served) and ``call_id``
    (the call it came with). Raises InvalidRequestError naming the bad fields
    (what only the proto can get wrong, then the engine's own rules), at most
    ``MAX_REPORTED_VIOLATIONS`` of them. Costs O(1) plus the size of the prompt: lists over their
    count limit are never converted. Run it on a worker thread when ``is_large(msg)``."""
    bad = Violations()
    check_request_id(bad, msg.request_id)
    truncation = TRUNCATION_FROM_PROTO.get(msg.truncation)
    bad.check(truncation is not None, "truncation", f"unknown Truncation value {msg.truncation}")
    overflow = OVERFLOW_FROM_PROTO.get(msg.overflow)
    bad.check(overflow is not None, "overflow", f"unknown Overflow value {msg.overflow}")
    priority = PRIORITY_FROM_PROTO.get(msg.priority)
    bad.check(priority is not None, "priority", f"unknown Priority value {msg.priority}")
    which = msg.WhichOneof("input")
    prompt_ids: tuple[int, ...] | None = None
    num_dropped = 0
    if which == "prompt_token_ids":
        # Only the window's worth is converted; the ids before it are checked and counted (the
        # engine truncates them, or refuses the prompt under REJECT).
        scan = scan_token_ids(msg.prompt_token_ids.ids, limits.vocab_size, keep=limits.context_window)
        if scan.first_bad is not None:
            index, value = scan.first_bad
            bad.add(*token_id_violation(f"prompt_token_ids.ids[{index}]", value, limits.vocab_size))
        prompt_ids, num_dropped = tuple(scan.kept.tolist()), scan.num_dropped
    request = GenerationRequest(
        request_id=request_id,
        prompt=msg.prompt if which != "prompt_token_ids" else None,
        prompt_token_ids=prompt_ids,
        num_dropped_prompt_ids=num_dropped,
        sampling=to_sampling_params(msg.sampling, bad),
        stopping=to_stopping_criteria(msg.stopping, bad),
        truncation=truncation or Truncation.TRUNCATE_LEFT,
        overflow=overflow or Overflow.SHIFT,
        top_logprobs=msg.top_logprobs,
        deadline=deadline,
        priority=priority or Priority.DEFAULT,
        tenant=tenant,
        call_id=call_id,
        echo=msg.echo,
        n=max(msg.n, 1),
        constraint=to_constraint(msg.constraint) if msg.HasField("constraint") else None,
    )
    for v in find_violations(request, limits):
        bad.add(proto_field_path(v.field), v.description)
    bad.raise_if_any()
    return request


def to_sampling_params(s: pb.SamplingParams, bad: Violations) -> SamplingParams:
    """The sampling parameters of ``s``; a list or map over its count limit is reported to
    ``bad`` (from its length, O(1)) and left unconverted."""
    d = SamplingParams()
    bias_fits = check_count(bad, "sampling.logit_bias", len(s.logit_bias), MAX_LOGIT_BIAS_ENTRIES, "entries")
    allowed_fits = check_count(
        bad, "sampling.allowed_token_ids", len(s.allowed_token_ids), MAX_TOKEN_ID_SET, "token ids"
    )
    banned_fits = check_count(bad, "sampling.banned_token_ids", len(s.banned_token_ids), MAX_TOKEN_ID_SET, "token ids")
    return SamplingParams(
        logit_bias=tuple(sorted(s.logit_bias.items())) if bias_fits else (),
        allowed_token_ids=tuple(s.allowed_token_ids) if allowed_fits else (),
        banned_token_ids=tuple(s.banned_token_ids) if banned_fits else (),
        temperature=s.temperature if s.HasField("temperature") else d.temperature,
        top_k=s.top_k if s.HasField("top_k") else d.top_k,
        top_p=s.top_p if s.HasField("top_p") else d.top_p,
        min_p=s.min_p if s.HasField("min_p") else d.min_p,
        typical_p=s.typical_p if s.HasField("typical_p") else d.typical_p,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else d.repetition_penalty,
        presence_penalty=s.presence_penalty if s.HasField("presence_penalty") else d.presence_penalty,
        frequency_penalty=s.frequency_penalty if s.HasField("frequency_penalty") else d.frequency_penalty,
        seed=s.seed if s.HasField("seed") else d.seed,
    )


def to_stopping_criteria(s: pb.StoppingCriteria, bad: Violations) -> StoppingCriteria:
    """The stopping criteria of ``s``; a list over its count limit is reported to ``bad`` (from
    its length, O(1)) and left unconverted."""
    stop_fits = check_count(bad, "stopping.stop", len(s.stop), MAX_STOP_STRINGS, "stop strings")
    ids_fit = check_count(bad, "stopping.stop_token_ids", len(s.stop_token_ids), MAX_STOP_TOKEN_IDS, "stop token ids")
    words_fit = check_count(bad, "stopping.bad_words", len(s.bad_words), MAX_BAD_WORDS, "bad words")
    return StoppingCriteria(
        max_new_tokens=s.max_new_tokens if s.HasField("max_new_tokens") else None,
        min_new_tokens=s.min_new_tokens,
        stop=tuple(s.stop) if stop_fits else (),
        stop_token_ids=tuple(s.stop_token_ids) if ids_fit else (),
        ignore_eos=s.ignore_eos,
        include_stop_in_output=s.include_stop_in_output,
        bad_words=tuple(s.bad_words) if words_fit else (),
    )


def to_constraint(c: pb.Constraint) -> ConstraintSpec | None:
    """The constraint of ``c``; None when no kind is set. Sizes are checked by the engine's
    validation before anything compiles it (a choice's options are converted only up to their
    limit plus one, so that an oversized list costs O(1))."""
    kind = c.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "choice":
        return ConstraintSpec("choice", options=tuple(itertools.islice(c.choice.options, MAX_CHOICES + 1)))
    return ConstraintSpec(kind, text=getattr(c, kind))


def to_engine_batch(
    request: pb.GenerateBatchRequest,
    deadline: float | None,
    limits: RequestLimits,
    tenant: str = "",
    call_id: str = "",
) -> list[GenerationRequest]:
    """Every item, converted and validated (``to_engine_items``). The items share ``call_id``:
    together they hold at most the engine's call share of the batch."""
    return to_engine_items(
        request.requests, lambda item: to_engine_request(item, request_id_of(item), deadline, limits, tenant, call_id)
    )


def to_engine_items(messages: Iterable[M], to_engine: Callable[[M], GenerationRequest]) -> list[GenerationRequest]:
    """A batch call's items, each converted by ``to_engine``, so one answer names the bad fields
    of every item (as ``requests[i].<field>``, at most ``MAX_REPORTED_VIOLATIONS`` in all)."""
    items: list[GenerationRequest] = []
    errors: list[InvalidRequestError] = []
    for i, item in enumerate(messages):
        try:
            items.append(to_engine(item))
        except InvalidRequestError as exc:
            errors.append(with_prefix(exc, f"requests[{i}]."))
    if len(errors) == 1:
        raise errors[0]  # with its own reason (PROMPT_TOO_LONG, ...)
    bad = Violations()
    for error in errors:
        bad.extend(error)
    bad.raise_if_any()
    return items


def check_batch_size(num_requests: int, max_batch_requests: int) -> None:
    if not 1 <= num_requests <= max_batch_requests:
        raise InvalidRequestError(
            [FieldViolation("requests", f"must hold 1 to {max_batch_requests} requests, got {num_requests}")]
        )


# -- responses -----------------------------------------------------------------------------------


def to_token_info(token: TokenInfo) -> pb.TokenInfo:
    return pb.TokenInfo(
        id=token.id,
        text=token.text,
        logprob=token.logprob,
        top_logprobs=[pb.TopLogprob(id=t.id, text=t.text, logprob=t.logprob) for t in token.top_logprobs],
    )


def to_scored_token(t: ScoredToken) -> pb.ScoredToken:
    return pb.ScoredToken(
        id=t.id,
        text=t.text,
        logprob=t.logprob,
        rank=t.rank,
        top_logprobs=[pb.TopLogprob(id=a.id, text=a.text, logprob=a.logprob) for a in t.top_logprobs],
    )


def usage(finished: Finished, *others: Finished) -> pb.Usage:
    """The usage of ``finished``, with the completion tokens and context shifts of ``others``
    (the other choices of the same request, which share its prompt) added."""
    u = finished.usage
    return pb.Usage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens + sum(o.usage.completion_tokens for o in others),
        truncated_prompt_tokens=u.truncated_prompt_tokens,
        context_shifts=u.context_shifts + sum(o.usage.context_shifts for o in others),
        cached_prompt_tokens=u.cached_prompt_tokens,
    )


def timing(finished: Finished) -> pb.Timing:
    t = finished.timing
    return pb.Timing(
        queue_seconds=t.queue_seconds,
        time_to_first_token_seconds=t.time_to_first_token_seconds,
        total_seconds=t.total_seconds,
    )


def to_response(request_id: str, outputs: Iterable[GenerationOutput], finished: Finished) -> pb.GenerateResponse:
    """The response of a request's outputs; ``finished`` is choice 0's. With several choices
    (outputs of index > 0), each is a ``Choice`` too, and usage covers them all."""
    tokens: dict[int, list[pb.TokenInfo]] = {}
    ends: dict[int, Finished] = {}
    for out in outputs:
        tokens.setdefault(out.index, []).extend(to_token_info(t) for t in out.tokens)
        if out.finished is not None:
            ends[out.index] = out.finished
    others = [end for index, end in ends.items() if index != 0]
    response = pb.GenerateResponse(
        request_id=request_id,
        text=finished.text,
        token_ids=finished.token_ids,
        tokens=tokens.get(0, []),
        finish_reason=FINISH_REASON_TO_PROTO[finished.reason],
        stop_sequence=finished.stop_sequence or "",
        usage=usage(finished, *others),
        seed=finished.seed,
        timing=timing(finished),
        prompt_tokens=[to_scored_token(t) for t in finished.scored],
    )
    if others:
        response.choices.extend(
            pb.Choice(
                index=index,
                text=end.text,
                tokens=tokens.get(index, []),
                finish_reason=FINISH_REASON_TO_PROTO[end.reason],
                stop_sequence=end.stop_sequence or "",
                seed=end.seed,
            )
            for index, end in sorted(ends.items())
        )
    return response


def to_stream_response(
    request_id: str, tokens: Iterable[TokenInfo], text: str, finished: Finished | None, index: int = 0
) -> pb.GenerateStreamResponse:
    response = pb.GenerateStreamResponse(
        request_id=request_id, text=text, tokens=[to_token_info(t) for t in tokens], choice_index=index
    )
    if finished is not None:
        response.finish_reason = FINISH_REASON_TO_PROTO[finished.reason]
        response.stop_sequence = finished.stop_sequence or ""
        response.usage.CopyFrom(usage(finished))
        response.seed = finished.seed
        response.timing.CopyFrom(timing(finished))
    return response


async def to_stream_responses(
    request_id: str, outputs: AsyncIterator[GenerationOutput]
) -> AsyncIterator[pb.GenerateStreamResponse]:
    """One message per non-empty text delta of a choice. Tokens whose text is held back (part of
    a character or of a possible stop string) ride along with the choice's next message that has
    text, or its last. An echoed prompt's scores come with the first message of choice 0."""
    pending: dict[int, list[TokenInfo]] = {}
    prompt_scores: tuple[ScoredToken, ...] = ()
    async for out in outputs:
        tokens = pending.setdefault(out.index, [])
        tokens.extend(out.tokens)
        prompt_scores += out.prompt_scores
        if out.text or out.finished is not None or prompt_scores:
            response = to_stream_response(request_id, tokens, out.text, out.finished, out.index)
            response.prompt_tokens.extend(to_scored_token(t) for t in prompt_scores)
            yield response
            pending[out.index], prompt_scores = [], ()


def to_model_info(engine: Engine, max_batch_requests: int) -> common_pb2.ModelInfo:
    loaded, config = engine.loaded, engine.config
    model_config = loaded.model.config
    counts = loaded.model.parameter_counts()
    return common_pb2.ModelInfo(
        name=loaded.name,
        source=loaded.source,
        random_weights=loaded.random_weights,
        n_layer=model_config.n_layer,
        n_head=model_config.n_head,
        d_model=model_config.n_embd,
        d_ff=model_config.d_ff,
        vocab_size=engine.limits.vocab_size,
        context_window=engine.context_window,
        dtype=config.dtype,
        weights=config.weights,
        batch_invariant=engine.batch_invariant,
        device=str(engine.runner.device),
        parameter_counts=common_pb2.ParameterCounts(**counts),
        limits=common_pb2.EngineLimits(
            max_batch_size=config.max_batch_size,
            max_queue_size=config.max_queue_size,
            max_new_tokens_limit=config.max_new_tokens_limit,
            default_max_new_tokens=config.default_max_new_tokens,
            kv_cache_slots=engine.stats.kv_cache_slots,
            max_prefill_tokens=config.max_prefill_tokens,
            max_stop_strings=MAX_STOP_STRINGS,
            max_stop_string_chars=MAX_STOP_STRING_CHARS,
            max_stop_token_ids=MAX_STOP_TOKEN_IDS,
            max_top_logprobs=MAX_TOP_LOGPROBS,
            max_batch_requests=max_batch_requests,
            max_choices=config.max_choices,
        ),
        eos_token_id=engine.tokenizer.eos_token_id,
    )
