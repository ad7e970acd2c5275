"""Sharing the batch: who waits, who is admitted next, and who gives up a place for whom.

The policy, which the scheduler applies at every step:

- **Priority classes are strict.** A waiting request of a higher class (``Priority``) is admitted
  before any of a lower one.
- **Tenants share a class max-min fairly.** Within a class, the next request admitted is the
  oldest of the tenant that holds the fewest running sequences of that class (ties: the tenant
  admitted longest ago), so a tenant with one request waiting is not stuck behind another
  tenant's hundred. FIFO within a tenant.
- **One call holds at most ``call_cap`` places while others wait.** A request whose call (a
  GenerateBatch's items share one) already holds ``call_cap`` running sequences is passed over
  while a request of another call waits; alone, a call may fill the batch.
- **When the batch is full, a candidate may take a victim's place** (the victim is preempted:
  its slot is freed and its keys and values are recomputed when it is admitted again):
  a paused sequence (its reader lags) first; else, with preemption on, the newest sequence of the
  lowest class below the candidate's (``priority``); else the newest of the tenant that holds the
  most places of the candidate's class, if that is at least two more than the candidate's tenant
  holds (``fairness``); else the newest of another call over its cap (``call_share``).
  Each move makes the allocation strictly fairer, so two sequences never take each other's place
  back and forth.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator

from gpt2_service.core.request import Priority
from gpt2_service.core.sequence import Sequence

PREEMPTION_REASONS = ("paused", "priority", "fairness", "call_share")


class Waiting:
    """The waiting sequences: one FIFO per (priority class, tenant)."""

    def __init__(self) -> None:
        self._queues: dict[tuple[Priority, str], deque[Sequence]] = {}
        self._last_admitted: dict[str, int] = {}  # tenant -> admission stamp, for round robin
        self._stamp = 0
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[Sequence]:
        """Every waiting sequence, higher classes first."""
        for key in sorted(self._queues):
            yield from self._queues[key]

    def append(self, seq: Sequence) -> None:
        self._queue(seq).append(seq)
        self._len += 1

    def appendleft(self, seq: Sequence) -> None:
        """Back at the head of its tenant's queue (a preempted sequence: it came first)."""
        self._queue(seq).appendleft(seq)
        self._len += 1

    def remove_where(self, predicate: Callable[[Sequence], bool]) -> list[Sequence]:
        """Take out and return every waiting sequence for which ``predicate`` holds (asked once
        per sequence)."""
        removed: list[Sequence] = []
        for key, queue in list(self._queues.items()):
            kept: deque[Sequence] = deque()
            for seq in queue:
                (removed if predicate(seq) else kept).append(seq)
            if len(kept) == len(queue):
                continue
            if kept:
                self._queues[key] = kept
            else:
                del self._queues[key]
        self._len -= len(removed)
        return removed

    def take(self, seq: Sequence) -> None:
        """Remove ``seq``, which is waiting, because it is admitted."""
        key = (seq.request.priority, seq.tenant)
        queue = self._queues[key]
        queue.remove(seq)
        if not queue:
            del self._queues[key]
        self._len -= 1
        self._stamp += 1
        self._last_admitted[seq.tenant] = self._stamp

    def next_candidate(self, running: Iterable[Sequence], call_cap: int) -> Sequence | None:
        """The sequence to admit next (see the module docstring), or None if every waiting one
        is paused."""
        running = list(running)
        per_call = Counter(s.call_id for s in running)
        for priority in sorted({p for p, _ in self._queues}):
            tenants = [t for p, t in self._queues if p == priority]
            held = Counter(s.tenant for s in running if s.request.priority == priority)
            heads = [h for t in tenants if (h := self._head(priority, t, per_call, call_cap)) is not None]
            if not heads:
                # only calls at their cap wait in this class: nobody else waits for them to yield
                heads = [h for t in tenants if (h := self._head(priority, t, None, call_cap)) is not None]
            if heads:
                return min(heads, key=lambda s: (held[s.tenant], self._last_admitted.get(s.tenant, 0), s.seq_id))
        return None

    def _head(self, priority: Priority, tenant: str, per_call: Counter[str] | None, call_cap: int) -> Sequence | None:
        """The first sequence of a tenant's queue that is not paused (nor, given ``per_call``,
        of a call at its cap)."""
        for seq in self._queues[(priority, tenant)]:
            if seq.paused or (per_call is not None and per_call[seq.call_id] >= call_cap):
                continue
            return seq
        return None

    def _queue(self, seq: Sequence) -> deque[Sequence]:
        return self._queues.setdefault((seq.request.priority, seq.tenant), deque())


def choose_victim(
    candidate: Sequence, running: Iterable[Sequence], call_cap: int, preemption: bool
) -> tuple[Sequence, str] | None:
    """The running sequence whose place ``candidate`` takes when the batch is full, and why (one
    of ``PREEMPTION_REASONS``); None if none may be preempted for it."""
    running = list(running)
    paused = [s for s in running if s.paused]
    if paused:
        return _newest(paused), "paused"
    if not preemption:
        return None
    lower = [s for s in running if s.request.priority > candidate.request.priority]
    if lower:
        lowest = max(s.request.priority for s in lower)
        return _newest(s for s in lower if s.request.priority == lowest), "priority"
    same = [s for s in running if s.request.priority == candidate.request.priority]
    held = Counter(s.tenant for s in same)
    if held:
        richest, most = max(held.items(), key=lambda kv: (kv[1], kv[0]))
        if richest != candidate.tenant and most >= held[candidate.tenant] + 2:
            return _newest(s for s in same if s.tenant == richest), "fairness"
    per_call = Counter(s.call_id for s in running)
    if per_call[candidate.call_id] < call_cap:
        over = {s.call_id for s in same if per_call[s.call_id] > call_cap and s.call_id != candidate.call_id}
        if over:
            widest = max(over, key=lambda c: (per_call[c], c))
            return _newest(s for s in same if s.call_id == widest), "call_share"
    return None


def _newest(seqs: Iterable[Sequence]) -> Sequence:
    """The sequence admitted last: preempting it loses the least work."""
    return max(seqs, key=lambda s: (s.admitted_time or 0.0, s.seq_id))
