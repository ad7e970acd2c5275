"""Constrained generation: a request's ``constraint`` (a regex, a JSON schema, a choice among
strings, a grammar) as a token matcher, with llguidance (docs/constraints.md says why this
library, by measurement).

- ``Constraints.matcher(spec)`` compiles a constraint once (an LRU cache keyed by its text; a
  compiled one is copied per request in microseconds) and returns a fresh matcher. Compiling
  takes about a millisecond for a regex or a grammar and a few for a JSON schema; the engine
  does it off the event loop. What llguidance refuses is ``InvalidRequestError`` naming the field,
  with the library's message.
- ``Masks`` computes the next-token masks of a step's constrained rows on a worker thread while
  the engine thread runs the forward pass (llguidance releases the GIL and the worker touches no
  torch, so it adds no second OpenMP team: engine/threads.py), and hands them back as one
  ``(rows, vocab)`` bool tensor for the sampler's one masked fill.
- ``advance`` moves a matcher past the token drawn and says whether the output is complete (it
  matches and nothing but end-of-text can follow, or end-of-text was drawn where a match may end).

A matcher whose state admits no token (``is_error``) makes its row dead: the request ends with
CONSTRAINT_UNSATISFIED. Rows without a constraint pay nothing.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence

import llguidance
import numpy as np
import torch
from torch import Tensor

from gpt2_service.core.request import ConstraintSpec
from gpt2_service.errors import FieldViolation, InvalidRequestError
from gpt2_service.model.tokenizer import GPT2Tokenizer

CACHE_SIZE = 256  # compiled constraints kept, least recently used dropped first

Matcher = llguidance.LLMatcher

_token_indexes: weakref.WeakKeyDictionary[GPT2Tokenizer, llguidance.LLTokenizer] = weakref.WeakKeyDictionary()
_token_indexes_lock = threading.Lock()


def token_index(tokenizer: GPT2Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's index of ``tokenizer``'s vocabulary, built once per tokenizer (about 0.25 s
    for GPT-2) and shared: it is immutable, and an engine restarted over the same loaded model
    (a drain and restart, every test's fresh engine) need not build it again."""
    with _token_indexes_lock:
        index = _token_indexes.get(tokenizer)
        if index is None:
            index = llguidance.LLTokenizer(
                tokenizer.to_json(), n_vocab=tokenizer.vocab_size, eos_token=tokenizer.eos_token_id
            )
            _token_indexes[tokenizer] = index
        return index


class Constraints:
    """Compiles constraints into matchers for one tokenizer; thread-safe."""

    def __init__(self, tokenizer: GPT2Tokenizer, cache_size: int = CACHE_SIZE) -> None:
        self._tokenizer = tokenizer
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._llt: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[tuple[str, str], Matcher] = OrderedDict()
        self._compiling: dict[tuple[str, str], threading.Lock] = {}  # one compilation per new constraint
        self.compilations = 0  # cache misses, for tests and logs

    def prepare(self) -> None:
        """Fetch the vocabulary's token index (built once per tokenizer: token_index)."""
        with self._lock:
            if self._llt is None:
                self._llt = token_index(self._tokenizer)

    def is_cached(self, spec: ConstraintSpec) -> bool:
        with self._lock:
            return _key(spec) in self._compiled

    def matcher(self, spec: ConstraintSpec) -> Matcher:
        """A fresh matcher for ``spec``, compiled or from the cache. Requests that bring the same
        new constraint at once wait for one compilation."""
        key = _key(spec)
        template = self._cached(key)
        if template is None:
            with self._lock:
                compiling = self._compiling.setdefault(key, threading.Lock())
            with compiling:
                template = self._cached(key)
                if template is None:
                    try:
                        template = self._compile(spec)
                    except BaseException:
                        with self._lock:
                            self._compiling.pop(key, None)
                        raise
                    with self._lock:  # cached before the key's lock goes: nobody compiles it twice
                        self._compiled[key] = template
                        self._compiling.pop(key, None)
                        while len(self._compiled) > self._cache_size:
                            self._compiled.popitem(last=False)
                        self.compilations += 1
        return template.deep_copy()

    def _cached(self, key: tuple[str, str]) -> Matcher | None:
        with self._lock:
            template = self._compiled.get(key)
            if template is not None:
                self._compiled.move_to_end(key)
            return template

    def _compile(self, spec: ConstraintSpec) -> Matcher:
        self.prepare()
        assert self._llt is not None
        try:
            if spec.kind == "regex":
                grammar = Matcher.grammar_from_regex(spec.text)
            elif spec.kind == "json_schema":
                grammar = Matcher.grammar_from_json_schema(spec.text, defaults={"whitespace_flexible": False})
            elif spec.kind == "choice":
                grammar = llguidance.grammar_from("choice", json.dumps(list(spec.options)))
            else:
                grammar = llguidance.grammar_from("grammar", spec.text)
        except ValueError as exc:  # e.g. a schema that is not JSON
            raise _invalid(spec, str(exc)) from None
        template = Matcher(self._llt, grammar, log_level=0)
        if template.is_error():
            raise _invalid(spec, template.get_error())
        return template


def _key(spec: ConstraintSpec) -> tuple[str, str]:
    return spec.kind, json.dumps(spec.options) if spec.kind == "choice" else spec.text


def _invalid(spec: ConstraintSpec, message: str) -> InvalidRequestError:
    field = "constraint.choice.options" if spec.kind == "choice" else spec.field
    return InvalidRequestError([FieldViolation(field, f"not a valid constraint: {message.strip()}")])


class Masks:
    """The next-token masks of a step's constrained rows, computed on a worker thread."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32  # int32 words of one row's bitmask
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gpt2-masks")

    def start(self, matchers: Sequence[Matcher]) -> concurrent.futures.Future[np.ndarray]:
        """Begin computing the masks of ``matchers`` (each to be used by one thread at a time:
        the engine thread does not touch them until ``result``)."""
        return self._worker.submit(self._fill, list(matchers))

    def _fill(self, matchers: list[Matcher]) -> np.ndarray:  # on the worker: numpy and llguidance only
        bits = np.zeros((len(matchers), self.words), dtype=np.int32)
        row_bytes = self.words * 4
        for i, matcher in enumerate(matchers):
            matcher.unsafe_compute_mask_ptr(bits.ctypes.data + i * row_bytes, row_bytes)
        return bits

    def result(self, future: concurrent.futures.Future[np.ndarray]) -> Tensor:
        """The masks as a (rows, vocab) bool tensor: True where a token may come next."""
        bits = future.result()
        unpacked = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, : self.vocab_size]
        return torch.from_numpy(unpacked.view(np.bool_))

    def close(self) -> None:
        self._worker.shutdown(wait=False)


def is_dead(matcher: Matcher) -> bool:
    """No token can continue it (its state is an error)."""
    return bool(matcher.is_error())


def advance(matcher: Matcher, token_id: int) -> bool:
    """Move past the token drawn (one its mask allowed); whether the output is now complete."""
    if not matcher.consume_token(token_id):
        return False  # cannot happen for a masked draw; the next step's mask makes it dead
    return bool(matcher.is_stopped()) and not matcher.is_error()
