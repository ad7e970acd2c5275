"""Deadline-aware admission: when would a new request get its first token?

The engine thread calls ``observe`` after every step with the step's wall time and whether it
prefilled, and ``publish`` with the scheduler's state; the event loop calls ``first_token_in``
for each new request that has a deadline and refuses it at once when the estimate is past the
deadline (RESOURCE_EXHAUSTED, reason ``DEADLINE_UNMEETABLE``, RetryInfo = the shortfall).

The estimate, in seconds, for a request of class ``p`` with ``n`` prompt tokens:

    wait for a place  +  prefill  +  one step

- *Places.* ``ahead`` = requests waiting in higher classes, its own tenant's waiting in class
  ``p`` (other tenants' take turns with it: not counted), plus this one; requests that cannot be
  admitted before it (paused, or of a call at its share) are not counted. With ``free``
  batch places, ``need = ahead - free`` places must open first. Some open at once, by
  preemption (core/fairness.py): ``room`` = the paused running sequences, and with preemption on
  also those of lower classes, those its tenant could take from richer tenants of its class
  (each one's places beyond its own tenant's plus one), and the places other calls hold beyond
  their share. The rest, ``need - room``, open as running sequences finish: the ``n``-th earliest
  to finish frees the ``n``-th place, running sequences assumed to run to ``max_new_tokens`` (an
  upper bound: EOS and stop strings end them sooner), one token per decode step; a place needed
  after every running sequence has finished once waits for its new occupant too (the longest
  ``max_new_tokens`` waiting). The wait is those tokens times the decode step time. ``room``
  is counted generously (each preemption is assumed possible), so that the estimate errs
  towards admitting: a wrong refusal turns away a request that would have been served.
- *Prefill.* The prompt tokens of those ahead plus ``n``, ``max_prefill_tokens`` per step, at the
  time of a step that prefills.
- Step times are exponentially weighted moving averages (weight ``ALPHA`` for the newest step) of
  decode-only steps and of steps with prefill. Before the engine has timed a step, it estimates
  nothing and refuses nothing.

"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from gpt2_service.core.request import GenerationRequest, Priority
from gpt2_service.core.sequence import Sequence

ALPHA = 0.2
NUM_CLASSES = len(Priority)


@dataclass(frozen=True)
class Load:
    """The scheduler's state as admission needs it, published after every step."""

    num_running: int = 0
    remaining: tuple[int, ...] = ()  # tokens left to max_new_tokens of each running sequence, ascending
    running_by_class: tuple[int, ...] = (0,) * NUM_CLASSES
    # admissible waiting requests and their uncomputed prompt tokens, by class and tenant
    waiting: Mapping[tuple[Priority, str], int] = field(default_factory=dict)
    waiting_tokens: Mapping[tuple[Priority, str], int] = field(default_factory=dict)
    waiting_max_new: int = 0  # the longest max_new_tokens waiting
    num_paused: int = 0  # running sequences whose reader lags: any newcomer takes their place
    held: Mapping[tuple[Priority, str], int] = field(default_factory=dict)  # running, by class and tenant
    over_share: Mapping[str, int] = field(default_factory=dict)  # places a call holds beyond its share


def load_of(running: Iterable[Sequence], waiting: Iterable[Sequence], call_cap: int) -> Load:
    running = list(running)
    run_by = [0] * NUM_CLASSES
    for seq in running:
        run_by[seq.request.priority] += 1
    per_call = Counter(s.call_id for s in running)
    waiting_max_new = 0
    wait_by: Counter[tuple[Priority, str]] = Counter()
    tokens_by: Counter[tuple[Priority, str]] = Counter()
    for seq in waiting:
        waiting_max_new = max(waiting_max_new, seq.max_new_tokens - seq.num_output)
        if seq.paused or per_call[seq.call_id] >= call_cap:
            continue
        key = (seq.request.priority, seq.tenant)
        wait_by[key] += 1
        tokens_by[key] += seq.num_uncomputed
    return Load(
        num_running=len(running),
        remaining=tuple(sorted(max(s.max_new_tokens - s.num_output, 0) for s in running)),
        running_by_class=tuple(run_by),
        waiting=wait_by,
        waiting_tokens=tokens_by,
        waiting_max_new=waiting_max_new,
        num_paused=sum(s.paused for s in running),
        held=Counter((s.request.priority, s.tenant) for s in running),
        over_share={c: n - call_cap for c, n in per_call.items() if n > call_cap},
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

    def first_token_in(
        self, priority: Priority, prompt_tokens: int, tenant: str = "", call_id: str = ""
    ) -> float | None:
        """Estimated seconds until a request submitted now gets its first token; None before
        any step was timed."""
        decode = self.decode_step if self.decode_step is not None else self.prefill_step
        prefill = self.prefill_step if self.prefill_step is not None else self.decode_step
        if decode is None or prefill is None:
            return None
        load = self.load
        ahead = self._ahead(load.waiting, priority, tenant) + 1
        need = ahead - (self.max_batch_size - load.num_running) - self._room(load, priority, tenant, call_id)
        wait = decode * _nth_finish(load.remaining, need, load.waiting_max_new) if need > 0 else 0.0
        tokens = self._ahead(load.waiting_tokens, priority, tenant) + prompt_tokens
        return wait + prefill * math.ceil(tokens / self.max_prefill_tokens) + decode

    @staticmethod
    def _ahead(by_class_tenant: Mapping[tuple[Priority, str], int], priority: Priority, tenant: str) -> int:
        """What is admitted before a newcomer: higher classes, and its own tenant's in its class."""
        return sum(n for (p, t), n in by_class_tenant.items() if p < priority or (p == priority and t == tenant))

    def _room(self, load: Load, priority: Priority, tenant: str, call_id: str) -> int:
        """Places a newcomer could take by preemption (see the module docstring)."""
        room = load.num_paused
        if self.preemption:
            mine = load.held.get((priority, tenant), 0)
            room += sum(load.running_by_class[priority + 1 :])
            room += sum(max(n - mine - 1, 0) for (p, t), n in load.held.items() if p == priority and t != tenant)
            room += sum(n for c, n in load.over_share.items() if c != call_id)
        return room


def shortfall(
    estimator: FirstTokenEstimator, request: GenerationRequest, prompt_tokens: int, seconds_left: float
) -> float | None:
    """Seconds by which the estimated first token of ``request`` would miss a deadline
    ``seconds_left`` away; None when it would make it (or when nothing is known yet)."""
    estimate = estimator.first_token_in(request.priority, prompt_tokens, request.tenant, request.call_id)
    if estimate is None or estimate <= seconds_left:
        return None
    return estimate - seconds_left


def _nth_finish(remaining: tuple[int, ...], n: int, later: int) -> int:
    """Decode steps until the ``n``-th place opens: running sequences finish in order of their
    remaining tokens, and each freed place is taken by a waiting request that runs ``later``
    tokens before it frees the place again."""
    if not remaining:
        return 0
    rounds, index = divmod(n - 1, len(remaining))
    return remaining[index] + rounds * later


def _ewma(average: float | None, value: float) -> float:
    return value if average is None else (1 - ALPHA) * average + ALPHA * value
