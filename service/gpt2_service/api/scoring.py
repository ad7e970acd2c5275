"""Score's conversions: a ``gpt2.v1.ScoreRequest`` into the engine's scored ``GenerationRequest``
(its ids: ``<|endoftext|>`` if ``add_bos``, the context, the input), and the finished request
into a ``ScoreResponse``.

The input and the context are tokenized apart, so the input's tokens are the ones it has on its
own. The first scored token is the input's first, unless nothing precedes it (no context, no
``add_bos``): it then has no prediction and the input's second is the first scored. The whole
sequence must fit the context window; a Score is never truncated (reason PROMPT_TOO_LONG).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from gpt2_client.proto import generation_pb2 as pb

from gpt2_service.api import convert
from gpt2_service.core.request import (
    GenerationRequest,
    Priority,
    RequestLimits,
    ScoreSpec,
    Truncation,
    find_violations,
    scan_token_ids,
    token_id_violation,
)
from gpt2_service.core.sequence import Finished
from gpt2_service.engine.frontend import LONG_PROMPT
from gpt2_service.errors import FieldViolation, InvalidRequestError, Violations
from gpt2_service.model.tokenizer import GPT2Tokenizer


def is_large(msg: pb.ScoreRequest) -> bool:
    """Whether converting ``msg`` may take long enough to matter on the event loop (O(1) to ask)."""
    sizes = (len(msg.text), len(msg.token_ids.ids), len(msg.context_text), len(msg.context_token_ids.ids))
    return sum(sizes) > LONG_PROMPT


class _Reader:
    """The token ids of the request's parts, each checked against the window before it is
    tokenized or converted: a part that cannot fit is refused at O(1) cost."""

    def __init__(self, tokenizer: GPT2Tokenizer, limits: RequestLimits, bad: Violations) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.bad = bad
        self.too_long: list[FieldViolation] = []

    def ids(self, msg: pb.ScoreRequest, which: str | None) -> tuple[str, list[int] | None]:
        """(the field ``which`` of a oneof, its ids); ("", []) when none is set; None for ids
        when the field is already reported (too long, or a bad id)."""
        if which is None:
            return "", []
        window = self.limits.context_window
        if which.endswith("token_ids"):
            ids: Sequence[int] = getattr(msg, which).ids
            if len(ids) > window:
                self._refuse(which, str(len(ids)))
                return which, None
            scan = scan_token_ids(ids, self.limits.vocab_size)
            if scan.first_bad is not None:
                index, value = scan.first_bad
                self.bad.add(*token_id_violation(f"{which}.ids[{index}]", value, self.limits.vocab_size))
                return which, None
            return which, scan.kept.tolist()
        text: str = getattr(msg, which)
        at_least = self.tokenizer.min_num_tokens(text)
        if at_least > window:
            self._refuse(which, f"at least {at_least}")
            return which, None
        return which, self.tokenizer.encode(text)

    def _refuse(self, field: str, num_tokens: str) -> None:
        self.too_long.append(
            FieldViolation(
                field, f"is {num_tokens} tokens; the context window is {self.limits.context_window} (never truncated)"
            )
        )


def to_engine_score(
    msg: pb.ScoreRequest,
    request_id: str,
    deadline: float | None,
    limits: RequestLimits,
    tokenizer: GPT2Tokenizer,
    tenant: str = "",
    call_id: str = "",
) -> GenerationRequest:
    """The validated engine request of ``msg``. Raises InvalidRequestError naming the bad fields,
    or with reason PROMPT_TOO_LONG when the sequence cannot fit the window. Run it on a worker
    thread when ``is_large(msg)`` (it tokenizes)."""
    bad = Violations()
    convert.check_request_id(bad, msg.request_id)
    priority = convert.PRIORITY_FROM_PROTO.get(msg.priority)
    bad.check(priority is not None, "priority", f"unknown Priority value {msg.priority}")
    reader = _Reader(tokenizer, limits, bad)
    input_field, input_ids = reader.ids(msg, msg.WhichOneof("input"))
    _, context_ids = reader.ids(msg, msg.WhichOneof("context"))
    bos = [tokenizer.eos_token_id] if msg.add_bos else []
    prefix = len(bos) + len(context_ids or ())
    if not input_field:
        bad.add("text", "the text to score is required: set text or token_ids")
    elif input_ids is None:
        pass  # already reported
    elif not input_ids:
        bad.add(input_field, "is empty: nothing to score")
    elif len(input_ids) == 1 and not prefix:
        bad.add(
            input_field,
            "is one token with nothing before it: its first token has no prediction, so nothing is "
            "scored; set add_bos or a context",
        )
    ids = bos + (context_ids or []) + (input_ids or [])
    if not reader.too_long and len(ids) > limits.context_window:
        reader.too_long.append(
            FieldViolation(
                input_field,
                f"<|endoftext|>, context and input are {len(ids)} tokens; the context window is "
                f"{limits.context_window} (never truncated)",
            )
        )
    request = GenerationRequest(
        request_id=request_id,
        prompt_token_ids=tuple(ids),
        truncation=Truncation.REJECT,
        top_logprobs=msg.top_logprobs,
        deadline=deadline,
        priority=priority or Priority.DEFAULT,
        tenant=tenant,
        call_id=call_id,
        score=ScoreSpec(first=max(prefix, 1)),
    )
    for v in find_violations(request, limits):
        if v.field != "score.first":  # the input's own checks above say what is wrong with it
            bad.add(v.field, v.description)
    bad.raise_if_any()
    if reader.too_long:
        raise InvalidRequestError(reader.too_long, reason="PROMPT_TOO_LONG")
    return request


def to_engine_scores(
    request: pb.ScoreBatchRequest,
    deadline: float | None,
    limits: RequestLimits,
    tokenizer: GPT2Tokenizer,
    tenant: str = "",
    call_id: str = "",
) -> list[GenerationRequest]:
    """Every item of a ScoreBatch, converted and validated; they share ``call_id``."""
    return convert.to_engine_items(
        request.requests,
        lambda item: to_engine_score(item, convert.request_id_of(item), deadline, limits, tokenizer, tenant, call_id),
    )


def to_score_response(request_id: str, finished: Finished) -> pb.ScoreResponse:
    total = math.fsum(t.logprob for t in finished.scored)
    mean_nll = -total / len(finished.scored)
    return pb.ScoreResponse(
        request_id=request_id,
        tokens=[convert.to_scored_token(t) for t in finished.scored],
        total_logprob=total,
        mean_nll=mean_nll,
        perplexity=math.exp(mean_nll) if mean_nll < 700 else math.inf,
        usage=convert.usage(finished),
        timing=convert.timing(finished),
    )
