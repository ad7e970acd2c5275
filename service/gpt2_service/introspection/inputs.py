"""Introspection's input checks: the text or token ids, the index lists and the sampling options,
and the input made into tokens. No model work and no size limits; any thread may run them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from gpt2_service.core.request import MAX_STOP_STRING_CHARS, check_sampling, check_strings, scan_token_ids
from gpt2_service.errors import FieldViolation, InvalidRequestError, Violations
from gpt2_service.introspection.results import GenerationTraceOptions, SamplingOptions, TokenizeResult
from gpt2_service.model.tokenizer import GPT2Tokenizer

MAX_NUM_SAMPLES = 1024
MAX_INDEX_LIST = 1024  # entries of a layers / heads list (duplicates are allowed, and ignored)
MAX_TRACE_NEW_TOKENS = 64  # TraceGeneration's steps
MAX_TRACE_CANDIDATES = 50  # TraceGeneration's candidates per step
MAX_TRACE_STOP_STRINGS = 4


class InputChecker:
    """Checks an introspection request, naming the bad fields (``text``, ``token_ids``,
    ``layers``, ``heads``, ``temperature``, ...), and tokenizes its input. Model inputs are
    limited to ``context_window`` tokens."""

    def __init__(self, tokenizer: GPT2Tokenizer, vocab_size: int, context_window: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.context_window = context_window

    def tokens(
        self,
        text: str | None,
        token_ids: Sequence[int] | None,
        bad: Violations | None = None,
        for_model: bool = True,
    ) -> TokenizeResult:
        """The input as tokens, after checking it; raises with ``bad`` (the other fields' violations)
        plus any of its own. For the model, an input that cannot fit the context window is refused
        from its length alone (ids counted, text bounded below by ``min_num_tokens``), before any
        tokenization."""
        bad = bad if bad is not None else Violations()
        num_other = len(bad)
        result: TokenizeResult | None = None
        field = input_field(text)
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
        if len(bad) == num_other:  # the input itself passed the cheap checks
            try:
                result = self._tokenize(text, token_ids)
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

    def checked_ids(self, token_ids: Sequence[int]) -> list[int]:
        """``token_ids`` as a list, or InvalidRequestError naming the first id outside the vocabulary."""
        return self.checked_array(token_ids).tolist()  # type: ignore[no-any-return]

    def checked_array(self, token_ids: Sequence[int]) -> npt.NDArray[np.int64]:
        """``token_ids`` as an int64 array (read a chunk at a time), or InvalidRequestError naming
        the first id outside the vocabulary."""
        scan = scan_token_ids(token_ids, self.vocab_size)
        if scan.first_bad is not None:
            i, value = scan.first_bad
            raise InvalidRequestError(
                [FieldViolation("token_ids", f"token_ids[{i}] = {value} is not a token id in [0, {self.vocab_size})")]
            )
        return scan.kept

    def sampling(self, o: SamplingOptions) -> Violations:
        """The options' violations: the sampler's rules (as for generation), then the draws' and
        the candidates' counts."""
        bad = Violations()
        check_sampling(bad, o.params, prefix="")
        bad.check(
            0 <= o.num_samples <= MAX_NUM_SAMPLES,
            "num_samples",
            f"must be in [0, {MAX_NUM_SAMPLES}], got {o.num_samples}",
        )
        bad.check(
            1 <= o.num_candidates <= self.vocab_size,
            "num_candidates",
            f"must be in [1, {self.vocab_size}], got {o.num_candidates}",
        )
        return bad

    def generation(self, o: GenerationTraceOptions) -> Violations:
        """TraceGeneration's violations: the sampler's rules, then the steps, candidates and stop
        strings."""
        bad = Violations()
        check_sampling(bad, o.params, prefix="")
        bad.check(
            1 <= o.max_new_tokens <= MAX_TRACE_NEW_TOKENS,
            "max_new_tokens",
            f"must be in [1, {MAX_TRACE_NEW_TOKENS}], got {o.max_new_tokens}",
        )
        bad.check(
            1 <= o.num_candidates <= min(MAX_TRACE_CANDIDATES, self.vocab_size),
            "num_candidates",
            f"must be in [1, {min(MAX_TRACE_CANDIDATES, self.vocab_size)}], got {o.num_candidates}",
        )
        check_strings(bad, "stop", o.stop, MAX_TRACE_STOP_STRINGS, MAX_STOP_STRING_CHARS, "stop strings")
        return bad

    @staticmethod
    def indices(bad: Violations, field: str, values: Sequence[int] | None, limit: int, what: str) -> None:
        """A violation in ``bad`` when a layers / heads list is too long or holds an index
        outside 0..limit-1."""
        values = values or ()
        if len(values) > MAX_INDEX_LIST:  # counted before it is read
            bad.add(field, f"at most {MAX_INDEX_LIST} entries, got {len(values)}")
            return
        wrong = [v for v in values if not 0 <= v < limit]
        if wrong:
            shown = ", ".join(map(str, wrong[:5])) + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
            bad.add(field, f"{shown} out of range: this model has {limit} {what}, numbered 0 to {limit - 1}")

    def _tokenize(self, text: str | None, token_ids: Sequence[int] | None) -> TokenizeResult:
        if token_ids is not None:
            decoded, pieces = self.tokenizer.decode_pieces(self.checked_ids(token_ids))
            return TokenizeResult(decoded, tuple(pieces))
        assert text is not None
        return TokenizeResult(text, tuple(self.tokenizer.encode_pieces(text)))


def input_field(text: str | None) -> str:
    """The field that holds the input: ``text``, or ``token_ids`` when there is no text."""
    return "text" if text is not None else "token_ids"
