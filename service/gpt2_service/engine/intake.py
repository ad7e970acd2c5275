"""Admission's bookkeeping and a request's way into the engine: the bound on the waiting queue,
and turning a validated request into a ``Sequence`` (tokenize, fit the context window, seed)."""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections.abc import Iterable

from gpt2_service.core.detokenizer import IncrementalDetokenizer
from gpt2_service.core.request import GenerationRequest, Truncation
from gpt2_service.core.sequence import Sequence
from gpt2_service.errors import EngineOverloadedError, FieldViolation, InvalidRequestError
from gpt2_service.model.tokenizer import GPT2Tokenizer


class QueueBound:
    """Requests reserved (being prepared) or waiting, not yet admitted: at most ``max_size`` in
    all and ``max_per_tenant`` of one tenant. Taken on the event loop, given back by the engine
    thread as sequences leave the queue for good (a preempted sequence waits again uncounted)."""

    def __init__(self, max_size: int, max_per_tenant: int | None = None) -> None:
        self.max_size = max_size
        self.max_per_tenant = max_per_tenant if max_per_tenant is not None else max_size
        self._lock = threading.Lock()
        self._num_queued = 0
        self._by_tenant: dict[str, int] = {}

    @property
    def full(self) -> bool:
        return self._num_queued >= self.max_size

    def overloaded(self) -> EngineOverloadedError:
        return EngineOverloadedError(f"the waiting queue is full ({self.max_size} requests); retry later")

    def queued_by_tenant(self) -> dict[str, int]:
        """Waiting requests per tenant with any (a copy)."""
        with self._lock:
            return dict(self._by_tenant)

    def reserve(self, tenant: str = "", count: int = 1) -> None:
        """Take ``count`` places (a request's n choices), or none and raise ``EngineOverloadedError``."""
        with self._lock:
            if self._num_queued + count > self.max_size:
                raise self.overloaded()
            if self._by_tenant.get(tenant, 0) + count > self.max_per_tenant:
                raise EngineOverloadedError(
                    f"this tenant already has {self.max_per_tenant} requests waiting "
                    "(--max-queued-per-tenant); retry later",
                    reason="TENANT_QUEUE_FULL",
                )
            self._num_queued += count
            self._by_tenant[tenant] = self._by_tenant.get(tenant, 0) + count

    def release(self, tenants: Iterable[str]) -> None:
        """Give back one place per entry of ``tenants``."""
        with self._lock:
            for tenant in tenants:
                self._num_queued -= 1
                left = self._by_tenant[tenant] - 1
                if left:
                    self._by_tenant[tenant] = left
                else:
                    del self._by_tenant[tenant]  # no entry per tenant ever seen: the map stays small


class SequenceFactory:
    """Builds the ``Sequence`` of a validated request (choice 0, with the others as its
    ``forks`` when ``request.n > 1``); thread-safe (long prompts are prepared off the event
    loop)."""

    def __init__(self, tokenizer: GPT2Tokenizer, context_window: int, default_max_new_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.context_window = context_window
        self.default_max_new_tokens = default_max_new_tokens
        self._seq_ids = itertools.count(1)

    def make(self, request: GenerationRequest) -> Sequence:
        reject = request.truncation is Truncation.REJECT
        if request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
            field_name = "prompt_token_ids"
        else:
            prompt = request.prompt or ""
            if reject and self.tokenizer.min_num_tokens(prompt) > self.context_window:
                # refused without tokenizing: it cannot fit whatever its tokens
                raise self._prompt_too_long("prompt", f"at least {self.tokenizer.min_num_tokens(prompt)}")
            ids = self.tokenizer.encode(prompt)
            field_name = "prompt"
        if not ids:
            ids = [self.tokenizer.eos_token_id]  # an empty prompt conditions on <|endoftext|>
        truncated = request.num_dropped_prompt_ids
        if truncated and reject:
            raise self._prompt_too_long(field_name, str(truncated + len(ids)))
        if truncated or len(ids) > self.context_window:
            if reject:
                raise self._prompt_too_long(field_name, str(len(ids)))
            keep = self._kept_prompt_tokens(request)
            truncated += len(ids) - keep
            ids = ids[-keep:]
        seed = request.sampling.seed if request.sampling.seed is not None else secrets.randbits(63)
        seq = self._sequence(request, ids, seed, truncated, time.monotonic())
        seq.bad_word_ids = self._bad_word_ids(request.stopping.bad_words)
        seq.forks = [  # choices 1..n-1: the same prompt, seeds seed + i
            self._sequence(request, list(ids), (seed + i) % 2**64, truncated, seq.arrival_time, seq, i)
            for i in range(1, request.n)
        ]
        for fork in seq.forks:
            fork.bad_word_ids = seq.bad_word_ids
        return seq

    def _bad_word_ids(self, words: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
        """Each bad word's tokens, as given and (unless it starts with a space) after a space."""
        variants = {v for word in words for v in (word, word if word.startswith(" ") else " " + word)}
        return tuple(sorted({ids for v in variants if (ids := tuple(self.tokenizer.encode(v)))}))

    def _sequence(
        self,
        request: GenerationRequest,
        ids: list[int],
        seed: int,
        truncated: int,
        arrival: float,
        fork_of: Sequence | None = None,
        index: int = 0,
    ) -> Sequence:
        stopping = request.stopping
        return Sequence(
            seq_id=next(self._seq_ids),
            request=request,
            prompt_ids=ids,
            seed=seed,
            max_new_tokens=0 if request.score else stopping.max_new_tokens or self.default_max_new_tokens,
            truncated_prompt_tokens=truncated,
            arrival_time=arrival,
            detokenizer=IncrementalDetokenizer(
                self.tokenizer.token_bytes,
                skip_ids=self.tokenizer.special_ids,
                stop=stopping.stop,
                include_stop_in_output=stopping.include_stop_in_output,
            ),
            index=index,
            group_id=fork_of.seq_id if fork_of is not None else 0,
            fork_of=fork_of,
        )

    def _kept_prompt_tokens(self, request: GenerationRequest) -> int:
        """How much of a prompt longer than the window is kept: enough to leave room for
        max_new_tokens, so that generation does not shift at once, but at least half the window."""
        max_new = request.stopping.max_new_tokens or self.default_max_new_tokens
        return max(self.context_window - max_new, self.context_window // 2)

    def _prompt_too_long(self, field_name: str, num_tokens: str) -> InvalidRequestError:
        return InvalidRequestError(
            [
                FieldViolation(
                    field_name,
                    f"prompt is {num_tokens} tokens; the context window is {self.context_window} "
                    "and truncation is REJECT",
                )
            ],
            reason="PROMPT_TOO_LONG",
        )
