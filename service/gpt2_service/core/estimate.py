"""Deadline-aware admission: when would a new request get its first token?

The engine thread calls ``observe`` after every step with the step's wall time and whether it
prefilled, and ``publish`` with the scheduler's state; the event loop calls ``first_token_in``
for each new request that has a deadline and refuses it at once when the estimate is past the
deadline (RESOURCE_EXHAUSTED, reason ``DEADLINE_UNMEETABLE``, RetryInfo = the shortfall).

The estimate, in seconds, for a request of class ``p`` with ``n`` prompt tokens:

    wait for a place  +  prefill  +  one step

- *Places.* ``ahead`` = requests waiting in classes ``p`` and higher, plus this one. With ``free``
  batch places, ``need = ahead - free`` places must open first. None when ``need <= 0``, or when
  preemption is on and at least ``need`` running sequences are of a lower class. Otherwise the
  ``need``-th earliest running sequence to finish frees it: running sequences are assumed to run
  to ``max_new_tokens`` (an upper bound: EOS and stop strings end them sooner), one token per
  decode step, so the wait is its remaining tokens times the decode step time.
- *Prefill.* The prompt tokens waiting ahead plus ``n``, ``max_prefill_tokens`` per step, at the
  time of a step that prefills.
- Step times are exponentially weighted moving averages (weight ``ALPHA`` for the newest step) of
  decode-only steps and of steps with prefill. Before the engine has timed a step, it estimates
  nothing and refuses nothing.

Tenants' fair shares are ignored (FIFO within a class is assumed), so a tenant with little work
waiting is estimated conservatively.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from gpt2_service.core.request import Priority
from gpt2_service.core.sequence import Sequence

ALPHA = 0.2
NUM_CLASSES = len(Priority)


@dataclass(frozen=True)
class Load:
    """The scheduler's state as admission needs it, published after every step."""

    num_running: int = 0
    remaining: tuple[int, ...] = ()  # tokens left to max_new_tokens of each running sequence, ascending
    running_by_class: tuple[int, ...] = (0,) * NUM_CLASSES
    waiting_by_class: tuple[int, ...] = (0,) * NUM_CLASSES
    waiting_tokens_by_class: tuple[int, ...] = (0,) * NUM_CLASSES  # uncomputed prompt tokens


def load_of(running: Iterable[Sequence], waiting: Iterable[Sequence]) -> Load:
    running = list(running)
    run_by, wait_by, tokens_by = [0] * NUM_CLASSES, [0] * NUM_CLASSES, [0] * NUM_CLASSES
    for seq in running:
        run_by[seq.request.priority] += 1
    for seq in waiting:
        wait_by[seq.request.priority] += 1
        tokens_by[seq.request.priority] += seq.num_uncomputed
    return Load(
        num_running=len(running),
        remaining=tuple(sorted(max(s.max_new_tokens - s.num_output, 0) for s in running)),
        running_by_class=tuple(run_by),
        waiting_by_class=tuple(wait_by),
        waiting_tokens_by_class=tuple(tokens_by),
    )


class FirstTokenEstimator:
    """Step-time averages and the latest ``Load``; written by the engine thread, read by the
    event loop (each attribute is replaced whole, so a reader sees a consistent value of each)."""

    def __init__(self, max_batch_size: int, max_prefill_tokens: int, preemption: bool) -> None:
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.preemption = preemption
        self.decode_step: float | None = None  # seconds, EWMA
        self.prefill_step: float | None = None
        self.load = Load()

    # -- the engine thread -------------------------------------------------------------------------

    def observe(self, seconds: float, prefilled: bool) -> None:
        if prefilled:
            self.prefill_step = _ewma(self.prefill_step, seconds)
        else:
            self.decode_step = _ewma(self.decode_step, seconds)

    def publish(self, load: Load) -> None:
        self.load = load

    # -- the event loop ----------------------------------------------------------------------------

    def first_token_in(self, priority: Priority, prompt_tokens: int) -> float | None:
        """Estimated seconds until a request submitted now gets its first token; None before
        any step was timed."""
        decode = self.decode_step if self.decode_step is not None else self.prefill_step
        prefill = self.prefill_step if self.prefill_step is not None else self.decode_step
        if decode is None or prefill is None:
            return None
        load = self.load
        ahead = sum(load.waiting_by_class[: priority + 1]) + 1
        need = ahead - (self.max_batch_size - load.num_running)
        wait = 0.0
        if need > 0 and not (self.preemption and sum(load.running_by_class[priority + 1 :]) >= need):
            wait = decode * _nth_finish(load.remaining, need)
        tokens = sum(load.waiting_tokens_by_class[: priority + 1]) + prompt_tokens
        return wait + prefill * math.ceil(tokens / self.max_prefill_tokens) + decode


def shortfall(
    estimator: FirstTokenEstimator, priority: Priority, prompt_tokens: int, seconds_left: float
) -> float | None:
    """Seconds by which the estimated first token would miss a deadline ``seconds_left`` away;
    None when it would make it (or when nothing is known yet)."""
    estimate = estimator.first_token_in(priority, prompt_tokens)
    if estimate is None or estimate <= seconds_left:
        return None
    return estimate - seconds_left


def _nth_finish(remaining: tuple[int, ...], n: int) -> int:
    """Decode steps until the ``n``-th place opens, running sequences finishing in order of their
    remaining tokens and each freed place taken by the next waiting request in turn."""
    if not remaining:
        return 0
    rounds, index = divmod(n - 1, len(remaining))
    return rounds * remaining[-1] + remaining[index]


def _ewma(average: float | None, value: float) -> float:
    return value if average is None else (1 - ALPHA) * average + ALPHA * value
