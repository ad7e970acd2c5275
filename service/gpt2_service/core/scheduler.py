"""Continuous batching: which sequences run this step, and what their results mean.

One engine step is ``schedule() -> runner.execute(plan) -> update_from_output(plan, sampled)``.
The scheduler reasons in ids and counts and never touches tensors (it imports neither torch nor
protobuf), so its tests fake the runner's output and need no model.

Policy, each in a small helper below:
- admission: waiting requests join the running batch while there is a batch place and a
  KV-cache slot, in the order core/fairness.py sets (priority classes, then tenants max-min
  fairly, one call at most ``call_cap`` places while others wait); when the batch is full, a
  waiting request may preempt a running one (fairness.choose_victim): the victim's slot is
  freed and it waits again; readmitted, it recomputes its window as it first computed it
  (``prefill_end``: its prompt in prefill chunks, its output replayed one decode step per token,
  nothing sampled), so its next token is bitwise the same. Expired deadlines are never admitted;
- a paused sequence (its reader lags: ``pause``) is not scheduled until ``resume``;
- prefill is chunked: at most ``max_prefill_tokens`` prompt tokens per step across newcomers,
  higher classes first and tenants taking turns, so a long prompt delays running streams by at
  most one chunk per step (with
  ``fixed_prefill_chunks``, chunks end at multiples of it, whatever the batch);
- every running sequence with exactly one uncomputed token decodes in the same step;
- a Score request (``request.score``) is a prompt read in prefill chunks and never sampled: each
  chunk's scored tokens come back from the runner, and it finishes when its prompt is read; its
  tokens cost ``score_token_cost`` each of the prefill budget (their rows also go through the
  LM head). An echoed prompt (``request.echo``) is scored the same way the first time it is read,
  at the same cost, in the chunks a plain prompt would have (so echo never changes the tokens);
- n completions: choice 0 is queued and admitted like any request; its other choices (``forks``)
  are admitted with it where there are places (those that do not fit wait as requests of their
  own and read the prompt themselves), compute nothing until the chunk that completes choice 0's
  prompt, and in that step get its keys and values (``PrefillChunk.forks``: the runner copies
  them) and sample their first token from its last position. Preempting or releasing choice 0
  first leaves its waiting forks to read the prompt themselves;
- prefix reuse (``prefix_block_tokens`` > 0; core/prefix_cache.py): at admission, a request's
  prompt is matched against the whole prompt blocks that KV-cache slots hold (free slots keep
  theirs until given away, least recently used first). A match in a free slot takes that slot;
  one in a running sequence's slot is copied (``StepPlan.copies``); one that a running sequence
  is still computing is waited for (``Sequence.awaits``: admitted, it computes nothing until that
  prefix is there, then copies it). The reused length leaves the prompt's last token to compute
  (its position is sampled) and, with ``fixed_prefill_chunks``, is a whole number of chunks, so
  every remaining chunk is the one the request would have computed anyway: results are bitwise
  those without reuse. Score requests and echoed prompts (their rows are scored) reuse nothing;
  Score requests feed nothing (their chunks are sized apart). A context shift empties its slot's
  blocks;
- a finished, aborted or expired sequence frees its slot in the step it is seen.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gpt2_service.core.fairness import Waiting, choose_victim
from gpt2_service.core.prefix_cache import PrefixCache
from gpt2_service.core.request import FinishReason, Overflow
from gpt2_service.core.sequence import (
    Finished,
    GenerationOutput,
    ScoredToken,
    Sequence,
    SequenceStatus,
    Timing,
    TokenInfo,
    TopLogprob,
)
from gpt2_service.core.slots import SlotAllocator
from gpt2_service.errors import DeadlineExceededError, EngineError


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int
    num_slots: int
    context_window: int
    max_prefill_tokens: int
    context_shift_keep: int
    eos_token_id: int
    # batch-invariant mode: prompts are cut at multiples of max_prefill_tokens and a chunk that does
    # not fit this step's budget waits whole, so chunk boundaries never depend on the batch
    fixed_prefill_chunks: bool = False
    call_cap: int = 1 << 30  # most running sequences of one call while requests of other calls wait
    preemption: bool = True  # may a waiting request take a running one's place (see fairness.py)
    # what a scored prompt token costs of the prefill budget: its block work plus the LM head on
    # its row (the engine sets it from the model's shape), so that a Score's step takes about as
    # long as a prompt's
    score_token_cost: float = 1.0
    prefix_block_tokens: int = 0  # prefix reuse in blocks of this many prompt tokens; 0 = off
    prefix_across_tenants: bool = True  # may a tenant's request reuse another tenant's prefix


@dataclass(frozen=True)
class PrefillChunk:
    seq: Sequence
    start: int  # first cache position written
    num_tokens: int
    samples: bool  # this chunk completes the window: sample the next token from its last position
    # choices waiting for this prompt: the runner copies the window's keys and values into their
    # slots, and samples each from the same last position
    forks: tuple[Sequence, ...] = ()

    @property
    def token_ids(self) -> list[int]:
        first = self.seq.window_start + self.start
        return self.seq.tokens[first : first + self.num_tokens]


@dataclass(frozen=True)
class StepPlan:
    prefill: list[PrefillChunk]
    decode: list[Sequence]  # each computes its next uncomputed token, sorted by slot
    # decodes that recompute a token already sampled (a preempted sequence replaying its output
    # as it first computed it, so its next token is bitwise the same): nothing is sampled for them
    replay: frozenset[int] = frozenset()
    # reused prefixes: (source slot, target slot, positions) keys and values to copy before the
    # forward pass
    copies: tuple[tuple[int, int, int], ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.prefill and not self.decode and not self.copies

    @property
    def sampled(self) -> list[Sequence]:
        """The sequences that get a token this step, in the runner's row order: completed prompts
        (each with its forks), then decodes that are not replays."""
        completed = [s for c in self.prefill if c.samples for s in (c.seq, *c.forks)]
        return completed + [s for s in self.decode if s.seq_id not in self.replay]


@dataclass
class PrefixStats:
    """Prefix reuse so far: admissions that looked for a prefix, those that reused one, and the
    prompt tokens reused."""

    lookups: int = 0
    hits: int = 0
    reused_tokens: int = 0


@dataclass(frozen=True)
class ScoredPosition:
    """The runner's answer for one scored prompt token: its log-probability and rank, and the
    most likely tokens at its position."""

    token_id: int
    logprob: float
    rank: int
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class SampledToken:
    """The runner's answer for one sequence: the chosen token and its log-probabilities."""

    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...] = ()
    complete: bool = False  # with this token the output matches its constraint, and nothing can follow
    dead: bool = False  # no token could continue its constraint: none was chosen (token_id means nothing)


@dataclass
class StepResult:
    """What update_from_output produced: outputs to deliver and sequences that left the batch."""

    outputs: list[tuple[Sequence, GenerationOutput]] = field(default_factory=list)
    failed: list[tuple[Sequence, EngineError]] = field(default_factory=list)
    released: list[Sequence] = field(default_factory=list)  # their slots are free again
    preempted: list[tuple[Sequence, str]] = field(default_factory=list)  # back to waiting, and why
    left_queue: list[Sequence] = field(default_factory=list)  # left the waiting queue for the first time
    shifted: set[int] = field(default_factory=set)  # seq ids whose token this step shifted their window


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        token_text: Callable[[int], str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.slots = SlotAllocator(config.num_slots)
        self.waiting = Waiting()
        self.running: list[Sequence] = []
        self._token_text = token_text
        self._clock = clock
        self._aborted: set[int] = set()
        self.prefix: PrefixCache | None = None
        if config.prefix_block_tokens:
            self.prefix = PrefixCache(config.num_slots, config.prefix_block_tokens, config.prefix_across_tenants)
        self.prefix_stats = PrefixStats()
        self._copies: list[tuple[int, int, int]] = []  # this step's, for the plan

    # -- intake --------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, seq_id: int) -> None:
        """Drop the sequence at the next schedule(); unknown or finished ids are ignored."""
        self._aborted.add(seq_id)

    def pause(self, seq_id: int) -> None:
        """Stop scheduling the sequence (its reader lags) until ``resume``; it keeps its slot
        unless a waiting request needs the place. Unknown ids are ignored."""
        self._set_paused(seq_id, True)

    def resume(self, seq_id: int) -> None:
        self._set_paused(seq_id, False)

    def _set_paused(self, seq_id: int, paused: bool) -> None:
        waiting_forks = (f for s in self.waiting for f in s.forks)
        for seq in itertools.chain(self.running, self.waiting, waiting_forks):
            if seq.seq_id == seq_id:
                seq.paused = paused
                return

    @property
    def num_paused(self) -> int:
        return sum(s.paused for s in itertools.chain(self.running, self.waiting))

    @property
    def has_work(self) -> bool:
        """Something to do at the next step (paused sequences, and forks waiting for a prompt,
        alone are not)."""
        if self._aborted:
            return True
        return any(not s.paused and s.fork_of is None for s in itertools.chain(self.running, self.waiting))

    # -- step ----------------------------------------------------------------------------------

    def schedule(self) -> tuple[StepPlan, StepResult]:
        """Retire aborted and expired sequences, admit newcomers, and plan this step's work."""
        result = StepResult()
        self._drop_aborted(result)
        self._expire_deadlines(result)
        self._copies = []
        self._admit(result)
        self._resolve_awaits()
        decode = self._plan_decode()
        replay = frozenset(s.seq_id for s in decode if s.num_uncomputed > 1)
        prefill = self._plan_prefill()
        return StepPlan(prefill=prefill, decode=decode, replay=replay, copies=tuple(self._copies)), result

    def update_from_output(
        self,
        plan: StepPlan,
        sampled: dict[int, SampledToken],
        scored: dict[int, list[ScoredPosition]] | None = None,
    ) -> StepResult:
        """Advance every planned sequence by what the runner computed, sampled and scored."""
        result = StepResult()
        now = self._clock()
        for chunk in plan.prefill:
            scores = chunk.seq.scores_prompt  # (before its first token is appended)
            chunk.seq.num_computed += chunk.num_tokens
            if chunk.seq.num_output == 0:
                chunk.seq.prefill_chunks += 1  # the prompt's (not a shift's re-encoding)
            if scores:
                self._add_scores(chunk.seq, (scored or {}).get(chunk.seq.seq_id, []), now, result)
            for fork in chunk.forks:  # the runner copied the prompt's keys and values
                fork.num_computed = chunk.seq.num_computed
                fork.fork_of = None
            chunk.seq.forks = [f for f in chunk.seq.forks if f not in chunk.forks]
            self._record_prefix(chunk)
        for seq in plan.decode:
            seq.num_computed += 1
        for seq in plan.sampled:
            self._append_token(seq, sampled[seq.seq_id], now, result)
        return result

    def fail(self, plan: StepPlan, error: EngineError) -> StepResult:
        """The runner raised: fail and free every sequence of the plan."""
        result = StepResult()
        if self.prefix is not None:  # what the failed step was to write is not there: forget it
            for _, target, _ in plan.copies:
                self.prefix.truncate(target, 0)
        planned = [s for c in plan.prefill for s in (c.seq, *c.forks)] + plan.decode
        for seq in {id(s): s for s in planned}.values():
            self._release(seq, result)
            result.failed.append((seq, error))
        return result

    # -- policy helpers ------------------------------------------------------------------------

    def _drop_aborted(self, result: StepResult) -> None:
        if not self._aborted:
            return
        aborted, self._aborted = self._aborted, set()
        for seq in self.waiting.remove_where(lambda s: s.seq_id in aborted):
            self._leave_queue(seq, result)  # with its forks: a request's choices are aborted together
        for seq in [s for s in self.running if s.seq_id in aborted]:
            self._release(seq, result)

    def _expire_deadlines(self, result: StepResult) -> None:
        now = self._clock()

        def expired(seq: Sequence) -> bool:
            deadline = seq.request.deadline
            return deadline is not None and now >= deadline

        for seq in self.waiting.remove_where(expired):
            for left in self._leave_queue(seq, result):
                result.failed.append((left, DeadlineExceededError("deadline passed while waiting")))
        for seq in [s for s in self.running if expired(s)]:
            self._release(seq, result)
            result.failed.append((seq, DeadlineExceededError("deadline passed while generating")))

    def _admit(self, result: StepResult) -> None:
        cap = self.config.call_cap
        preemptions_left = self.config.max_batch_size  # each preemption is fairer; a bound all the same
        while self.waiting:
            seq = self.waiting.next_candidate(self.running, cap)
            if seq is None:
                return
            if len(self.running) >= self.config.max_batch_size or not self.slots.num_free:
                victim = choose_victim(seq, self.running, cap, self.config.preemption)
                if victim is None or not preemptions_left:
                    return
                preemptions_left -= 1
                self._preempt(*victim, result)
            self.waiting.take(seq)
            self._run(seq, result)
            self._admit_forks(seq, result)

    def _run(self, seq: Sequence, result: StepResult) -> None:
        first = seq.admitted_time is None
        if first:
            result.left_queue.append(seq)
        if self.prefix is None:
            seq.slot = self.slots.allocate()
        else:
            self._reuse_prefix(seq, first)
        seq.status = SequenceStatus.RUNNING
        seq.admitted_time = self._clock()
        self.running.append(seq)

    def _admit_forks(self, seq: Sequence, result: StepResult) -> None:
        """Admit the forks of a choice 0 just admitted where there are places (never by
        preemption); those that do not fit wait, first in their queue, as requests of their own."""
        left: list[Sequence] = []
        for fork in list(seq.forks):
            if len(self.running) < self.config.max_batch_size and self.slots.num_free:
                self._run(fork, result)
            else:
                seq.forks.remove(fork)
                fork.fork_of = None
                left.append(fork)
        for fork in reversed(left):
            self.waiting.appendleft(fork)

    def _preempt(self, seq: Sequence, reason: str, result: StepResult) -> None:
        """Free the sequence's slot and put it back at the head of its queue. Readmitted, it
        recomputes its window: in batch-invariant mode as it first computed it (prompt chunks,
        then a replayed decode step per output token: ``StepPlan.replay``), else all in prefill
        chunks; either way its next token is sampled from the window's last position."""
        assert seq.slot is not None
        self._free(seq.slot)
        self.running.remove(seq)
        self._detach(seq)
        seq.awaits = None
        seq.slot = None
        seq.status = SequenceStatus.WAITING
        seq.num_computed = 0
        if not self.config.fixed_prefill_chunks:
            seq.prefill_end = seq.window_len  # recompute it all in prefill chunks: fast, not bitwise
        seq.num_preemptions += 1
        if seq.num_output == 0:
            seq.scored.clear()  # a Score (or echo) not read to its end recomputes its window, and scores it again
        self.waiting.appendleft(seq)
        result.preempted.append((seq, reason))

    def _leave_queue(self, seq: Sequence, result: StepResult) -> list[Sequence]:
        """An aborted or expired waiting sequence, and its forks (never admitted without it);
        counted as leaving the queue if they never ran. The sequences that left."""
        left = [seq, *seq.forks]
        for s in left:
            if s.admitted_time is None:
                result.left_queue.append(s)
            s.status = SequenceStatus.FINISHED
        seq.forks = []
        return left

    @staticmethod
    def _detach(seq: Sequence) -> None:
        """A sequence leaves the running batch: if it is a fork waiting for a prompt, it no longer
        waits; if it is a choice 0 whose forks wait, they read the prompt themselves."""
        if seq.fork_of is not None:
            seq.fork_of.forks.remove(seq)
            seq.fork_of = None
        for fork in seq.forks:
            fork.fork_of = None
        seq.forks = []

    def _prefill_order(self) -> list[Sequence]:
        """Running sequences with prompt to prefill: higher classes first, tenants taking turns
        (each tenant's first, then each one's second, ...), in admission order within a tenant."""
        turns: dict[str, int] = {}
        keyed: list[tuple[int, int, int, Sequence]] = []
        for seq in self.running:
            if seq.paused or seq.num_computed >= seq.prefill_end or seq.fork_of is not None or seq.awaits is not None:
                continue  # paused, a decode, or waiting for a prompt (a fork's) or a prefix (another's)
            turn = turns[seq.tenant] = turns.get(seq.tenant, -1) + 1
            keyed.append((seq.request.priority, turn, len(keyed), seq))
        return [seq for *_, seq in sorted(keyed, key=lambda k: k[:3])]

    def _plan_prefill(self) -> list[PrefillChunk]:
        budget = self.config.max_prefill_tokens
        chunks: list[PrefillChunk] = []
        for seq in self._prefill_order():
            if budget <= 0:
                break
            remaining = seq.prefill_end - seq.num_computed
            cost = self.config.score_token_cost if seq.scores_prompt else 1.0
            if self.config.fixed_prefill_chunks:
                # a Score's chunks are sized by their cost; an echoed prompt's are a plain prompt's
                size = self.config.max_prefill_tokens
                if seq.request.score is not None:
                    size = max(1, int(size / cost))
                n = min(remaining, size - seq.num_computed % size)
                if math.ceil(n * cost) > budget and chunks:
                    break  # first come, first served: later sequences wait too (a step's first chunk always runs)
            else:
                n = min(remaining, max(1, int(budget / cost)))
            samples = seq.num_computed + n == seq.window_len and seq.request.score is None
            forks = tuple(seq.forks) if samples else ()
            chunks.append(PrefillChunk(seq, seq.num_computed, n, samples=samples, forks=forks))
            budget -= math.ceil(n * cost)
        return chunks

    def _plan_decode(self) -> list[Sequence]:
        ready = [s for s in self.running if s.num_computed >= s.prefill_end and s.num_uncomputed and not s.paused]
        return sorted(ready, key=lambda s: s.slot if s.slot is not None else -1)

    def _add_scores(self, seq: Sequence, positions: list[ScoredPosition], now: float, result: StepResult) -> None:
        """A scored chunk was read: keep its tokens' scores. Once a Score's whole prompt is read,
        it finishes (nothing is generated) and frees its slot."""
        text = self._token_text
        seq.scored.extend(
            ScoredToken(
                p.token_id,
                text(p.token_id),
                p.logprob,
                p.rank,
                tuple(TopLogprob(i, text(i), lp) for i, lp in p.top_logprobs),
            )
            for p in positions
        )
        if seq.request.score is None or seq.num_computed < seq.window_len:
            return
        seq.first_token_time = now
        finished = self._finished(seq, FinishReason.LENGTH, None, now)
        self._release(seq, result)
        result.outputs.append((seq, GenerationOutput(seq.request_id, (), "", finished)))

    def _append_token(self, seq: Sequence, sampled: SampledToken, now: float, result: StepResult) -> None:
        if sampled.dead:  # nothing could follow: the output is the beginning of a match
            if seq.first_token_time is None:
                seq.first_token_time = now
            ended = self._finished(seq, FinishReason.CONSTRAINT_UNSATISFIED, None, now)
            self._release(seq, result)
            result.outputs.append(
                (seq, GenerationOutput(seq.request_id, (), seq.detokenizer.flush(), ended, seq.index))
            )
            return
        token_id = sampled.token_id
        seq.tokens.append(token_id)
        if seq.first_token_time is None:
            seq.first_token_time = now
        info = TokenInfo(
            id=token_id,
            text=self._token_text(token_id),
            logprob=sampled.logprob,
            top_logprobs=tuple(TopLogprob(i, self._token_text(i), lp) for i, lp in sampled.top_logprobs),
        )
        seq.token_infos.append(info)
        stopping = seq.request.stopping
        n = seq.num_output
        past_min = n >= stopping.min_new_tokens

        reason: FinishReason | None = None
        stop_sequence: str | None = None
        if token_id == self.config.eos_token_id and not stopping.ignore_eos and past_min:
            reason = FinishReason.EOS
            delta = ""
        elif token_id in stopping.stop_token_ids and past_min:
            reason = FinishReason.STOP_TOKEN
            delta = seq.detokenizer.add(token_id, check_stops=False).delta if stopping.include_stop_in_output else ""
        else:
            update = seq.detokenizer.add(token_id, check_stops=past_min)
            delta = update.delta
            if update.stop is not None:
                reason, stop_sequence = FinishReason.STOP_SEQUENCE, update.stop
        if reason is None and n >= seq.max_new_tokens:
            reason = FinishReason.LENGTH
        if sampled.complete and reason not in (FinishReason.STOP_SEQUENCE, FinishReason.STOP_TOKEN):
            reason = FinishReason.CONSTRAINT_COMPLETE  # (with EOS or not: EOS adds no text)
        if reason is None and seq.window_len > self.config.context_window:
            if seq.request.overflow is Overflow.STOP:
                reason = FinishReason.CONTEXT_WINDOW
            else:
                self._shift(seq, result)
        if reason in (FinishReason.LENGTH, FinishReason.CONTEXT_WINDOW) and seq.request.constraint is not None:
            reason = FinishReason.CONSTRAINT_UNSATISFIED  # it had to end before the output matched

        finished = None
        if reason is not None:
            if reason is not FinishReason.STOP_SEQUENCE:
                delta += seq.detokenizer.flush()
            finished = self._finished(seq, reason, stop_sequence, now)
            self._release(seq, result)
        prompt_scores = tuple(seq.scored) if n == 1 and seq.request.echo else ()
        output = GenerationOutput(seq.request_id, (info,), delta, finished, seq.index, prompt_scores)
        result.outputs.append((seq, output))

    # -- prefix reuse --------------------------------------------------------------------------

    def _reusable(self, seq: Sequence, num_tokens: int) -> int:
        """How much of a matched prefix of ``num_tokens`` tokens the sequence may reuse: not its
        prompt's last token, and with fixed chunks a whole number of chunks."""
        n = min(num_tokens, len(seq.prompt_ids) - 1, seq.prefill_end - 1)
        if self.config.fixed_prefill_chunks:
            n -= n % self.config.max_prefill_tokens
        return max(n, 0)

    @staticmethod
    def _may_reuse(seq: Sequence) -> bool:
        return (
            seq.request.score is None
            and not seq.scores_prompt
            and seq.fork_of is None
            and seq.window_start == 0
            and seq.num_computed == 0
            and not seq.paused
        )

    @staticmethod
    def _feeds(seq: Sequence) -> bool:
        """Its slot's prompt blocks may be reused: computed as any prompt's, from position 0."""
        return seq.request.score is None and seq.window_start == 0 and seq.fork_of is None

    def _reuse_prefix(self, seq: Sequence, first: bool) -> None:
        """Give an admitted sequence a slot, and the longest prefix of its prompt there is to
        reuse: held by a free slot (take it), by a running sequence (copy it), or being computed
        by one (wait for it)."""
        cache = self.prefix
        assert cache is not None
        free = self.slots.free_slots()
        if not self._may_reuse(seq):
            seq.slot = self.slots.allocate(cache.choose_free(free))
            cache.truncate(seq.slot, 0)  # (a fork's slot gets choice 0's prompt)
            return
        if seq.prompt_blocks is None:
            seq.prompt_blocks = cache.blocks(seq.prompt_ids)
        self.prefix_stats.lookups += 1
        match = cache.match(seq.prompt_blocks, seq.tenant)
        reuse = self._reusable(seq, match.num_blocks * cache.block_tokens)
        source, planned = self._computing(seq)
        if source is not None and self._reusable(seq, planned) > reuse:
            seq.slot = self.slots.allocate(cache.choose_free(free))
            cache.truncate(seq.slot, 0)
            seq.awaits = (source, self._reusable(seq, planned))
            return
        held_free = sorted(match.slots.intersection(free))
        if reuse and held_free:
            seq.slot = self.slots.allocate(held_free[0])
            cache.truncate(seq.slot, reuse // cache.block_tokens)
        else:
            seq.slot = self.slots.allocate(cache.choose_free(free))
            cache.truncate(seq.slot, 0)
            if reuse:
                self._copy_prefix(min(match.slots), seq, reuse)
        if reuse:
            self._reused(seq, reuse, first)

    def _computing(self, seq: Sequence) -> tuple[Sequence | None, int]:
        """The running sequence whose prompt shares the longest prefix (whole blocks) with this
        one's and has not computed all of it yet, and that prefix's length in tokens."""
        assert self.prefix is not None and seq.prompt_blocks is not None
        best: Sequence | None = None
        best_len = 0
        for other in self.running:
            # only one that computes (not one waiting in turn: waits never form a cycle)
            if other.prompt_blocks is None or not self._feeds(other) or other.paused or other.awaits is not None:
                continue
            if not self.config.prefix_across_tenants and other.tenant != seq.tenant:
                continue
            common = 0
            for mine, theirs in zip(seq.prompt_blocks, other.prompt_blocks, strict=False):
                if mine != theirs:
                    break
                common += 1
            tokens = common * self.prefix.block_tokens
            if tokens > best_len and other.num_computed < tokens:
                best, best_len = other, tokens
        return best, best_len

    def _resolve_awaits(self) -> None:
        """Sequences waiting for a prefix another computes: copy it once it is there; if that
        sequence left the batch or shifted, reuse what the cache holds instead."""
        cache = self.prefix
        for seq in self.running:
            if seq.awaits is None or seq.paused:
                continue
            source, tokens = seq.awaits
            if source in self.running and self._feeds(source) and not source.paused:
                if source.num_computed < tokens:
                    continue  # not there yet
                seq.awaits = None
                assert source.slot is not None
                self._copy_prefix(source.slot, seq, tokens)
                self._reused(seq, tokens, seq.num_preemptions == 0)
                continue
            seq.awaits = None
            assert cache is not None and seq.prompt_blocks is not None
            match = cache.match(seq.prompt_blocks, seq.tenant)
            reuse = self._reusable(seq, match.num_blocks * cache.block_tokens)
            if reuse:
                self._copy_prefix(min(match.slots), seq, reuse)
                self._reused(seq, reuse, seq.num_preemptions == 0)

    def _copy_prefix(self, source: int, seq: Sequence, tokens: int) -> None:
        assert self.prefix is not None and seq.slot is not None
        self._copies.append((source, seq.slot, tokens))
        self.prefix.copy(source, seq.slot, tokens // self.prefix.block_tokens)

    def _reused(self, seq: Sequence, tokens: int, first: bool) -> None:
        """The sequence starts with ``tokens`` of its prompt in its slot; ``first``: at its first
        admission (what its usage reports)."""
        seq.num_computed = tokens
        self.prefix_stats.hits += 1
        self.prefix_stats.reused_tokens += tokens
        if first:
            seq.cached_prompt_tokens = tokens

    def _record_prefix(self, chunk: PrefillChunk) -> None:
        """The prompt blocks a chunk completed are now held by its slot (and its forks')."""
        seq, cache = chunk.seq, self.prefix
        if cache is None or not self._feeds(seq) or seq.slot is None:
            return
        if seq.prompt_blocks is None:
            seq.prompt_blocks = cache.blocks(seq.prompt_ids)
        num_blocks = min(seq.num_computed, len(seq.prompt_ids)) // cache.block_tokens
        if num_blocks > cache.num_blocks(seq.slot):
            cache.extend(seq.slot, seq.prompt_blocks, num_blocks, seq.tenant)
        for fork in chunk.forks:
            assert fork.slot is not None
            cache.copy(seq.slot, fork.slot, num_blocks)

    def _free(self, slot: int) -> None:
        """The slot is free again; the prompt blocks it holds stay reusable until it is given away."""
        self.slots.free(slot)
        if self.prefix is not None:
            self.prefix.touch(slot)

    def _shift(self, seq: Sequence, result: StepResult) -> None:
        """Forget the earliest tokens: keep the newest, to be re-encoded at positions 0..k-1.
        The one place a context shift happens: counted in the sequence (its usage) and in the
        step's result (the engine's events, hence the metrics)."""
        keep = min(self.config.context_shift_keep, self.config.context_window)
        if self.prefix is not None and seq.slot is not None:
            self.prefix.truncate(seq.slot, 0)  # its positions are about to hold other tokens
        seq.window_start = len(seq.tokens) - keep
        seq.num_computed = 0
        seq.prefill_end = keep
        seq.context_shifts += 1
        seq.shift_times.append(self._clock())
        result.shifted.add(seq.seq_id)

    def _finished(self, seq: Sequence, reason: FinishReason, stop: str | None, now: float) -> Finished:
        admitted = seq.admitted_time if seq.admitted_time is not None else now
        first = seq.first_token_time if seq.first_token_time is not None else now
        seq.finished_time, seq.finish_reason = now, reason.value
        return Finished(
            reason=reason,
            stop_sequence=stop,
            text=seq.detokenizer.text,
            token_ids=tuple(seq.output_ids),
            usage=seq.usage(),
            seed=seq.seed,
            scored=tuple(seq.scored),
            prefill_chunks=seq.prefill_chunks,
            shift_seconds=tuple(t - seq.arrival_time for t in seq.shift_times),
            timing=Timing(
                queue_seconds=admitted - seq.arrival_time,
                time_to_first_token_seconds=first - seq.arrival_time,
                total_seconds=now - seq.arrival_time,
            ),
        )

    def _release(self, seq: Sequence, result: StepResult) -> None:
        if seq.status is SequenceStatus.RUNNING and seq.slot is not None:
            self._free(seq.slot)
            self.running.remove(seq)
            result.released.append(seq)
        seq.slot = None
        seq.status = SequenceStatus.FINISHED
