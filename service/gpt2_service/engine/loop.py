"""The engine thread: the one thread that owns the scheduler and the model runner.

It loops ``schedule -> execute -> update_from_output``, and between two steps applies the messages
of its inbox: ``Add`` a sequence, ``Abort`` one, ``Pause`` or ``Resume`` one (its stream's reader
lags, or caught up), queue a ``Job`` (introspection, warm-up), ``Stop``. It also feeds the
deadline estimator (core/estimate.py) each step's time and the scheduler's load.
After each step it records the step's statistics, tells the observers (``StepEvent``, then a
``FinishEvent`` per request that ended) and hands the step's outputs to ``Outbox.deliver``, once
per step, even when there are none, so that whoever waits on the engine's state re-checks it.

Jobs share the thread with generation by time. A job is work in pieces (core/pieces.py: an
introspection pass is one piece per model stage); jobs run in arrival order, a piece at a time.
While the scheduler has work, a piece that took ``t`` seconds is followed by at least one step,
and by at least ``t * (1 - job_share) / job_share`` seconds of steps, before the next piece: jobs
take at most ``job_share`` of the thread's busy time and running streams keep their pace; a
request arriving while a job runs waits for one piece, not for the whole job. With no generation
work, pieces run back to back (warm-up is never delayed); every job runs to its end eventually.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gpt2_service.core.estimate import FirstTokenEstimator, load_of
from gpt2_service.core.pieces import Pieces, advance
from gpt2_service.core.scheduler import Scheduler, StepPlan, StepResult
from gpt2_service.core.sequence import Finished, Sequence
from gpt2_service.engine.events import (
    Delivery,
    EngineStats,
    FinishEvent,
    FinishObserver,
    PhaseTimes,
    SampledSequence,
    StepEvent,
    StepObserver,
)
from gpt2_service.engine.runner import ModelRunner, StepTimes
from gpt2_service.errors import EngineDeadError, EngineError

log = logging.getLogger("gpt2_service.engine.frontend")  # the engine's one logger, whichever module writes


# -- the inbox -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Add:
    """A new sequence for the waiting queue; the engine thread owns it from now on."""

    seq: Sequence


@dataclass(frozen=True)
class Abort:
    """Drop a sequence at the next step; unknown or finished ids are ignored."""

    seq_id: int


@dataclass(frozen=True)
class Pause:
    """Stop scheduling a sequence until ``Resume`` (its stream's reader lags)."""

    seq_id: int


@dataclass(frozen=True)
class Resume:
    seq_id: int


@dataclass(frozen=True)
class Job:
    """Run ``pieces`` between steps, a piece at a time, and pass its result, or what it raised,
    to ``done``."""

    pieces: Pieces[Any]
    done: Callable[[Any, BaseException | None], None]


@dataclass(frozen=True)
class Stop:
    """Leave the loop; whatever is still in the scheduler stays there."""


Message = Add | Abort | Pause | Resume | Job | Stop


class Outbox(Protocol):
    """Where the engine thread sends what the event loop must see (called on the engine thread)."""

    def deliver(self, items: Delivery) -> None: ...

    def fail_all(self, error: EngineError) -> None: ...


# -- the loop --------------------------------------------------------------------------------------


class EngineLoop:
    """The engine thread and what only it touches: the scheduler, the runner, the statistics."""

    def __init__(
        self,
        scheduler: Scheduler,
        runner: ModelRunner,
        stats: EngineStats,
        outbox: Outbox,
        on_left_queue: Callable[[list[Sequence]], None],
        job_share: float = 1.0,
        estimator: FirstTokenEstimator | None = None,
    ) -> None:
        """``job_share``: the largest share, in (0, 1], of the thread's busy time that jobs take
        while the scheduler has work (1: one piece of a job between every two steps)."""
        if not 0.0 < job_share <= 1.0:
            raise ValueError(f"the jobs' share of the engine thread must be in (0, 1], not {job_share}")
        self.scheduler = scheduler
        self.runner = runner
        self.stats = stats
        self.dead: BaseException | None = None  # what killed the thread
        self._outbox = outbox
        self._on_left_queue = on_left_queue  # the sequences that left the waiting queue in a step, for good
        self._estimator = estimator  # fed each step's time and load, for deadline-aware admission
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._jobs: deque[Job] = deque()  # FIFO, taken off the inbox, waiting for their turn
        self._steps_per_job_second = (1.0 - job_share) / job_share
        # seconds of steps to run (at least one) before the next piece, while generation has work
        self._steps_owed = 0.0
        self._step_observers: list[StepObserver] = []
        self._finish_observers: list[FinishObserver] = []
        self._thread: threading.Thread | None = None

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gpt2-engine", daemon=True)
        self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def post(self, message: Message) -> None:
        """Thread-safe: applied by the engine thread before its next step."""
        self._inbox.put(message)

    def add_step_observer(self, observer: StepObserver) -> None:
        self._step_observers.append(observer)

    def add_finish_observer(self, observer: FinishObserver) -> None:
        self._finish_observers.append(observer)

    # -- on the engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                if not self._drain_inbox(block=not (self.scheduler.has_work or self._jobs)):
                    while self._jobs:  # posted before Stop: they run, as they always have
                        self._run_piece()
                    return
                if self._jobs and (self._steps_owed < 0.0 or not self.scheduler.has_work):
                    self._run_piece()
                elif self.scheduler.has_work:
                    started = time.perf_counter()
                    self._step()
                    self._steps_owed -= time.perf_counter() - started
        except BaseException as exc:  # a bug in the engine itself: fail everyone, loudly
            log.exception("engine thread failed")
            self.dead = exc
            self._outbox.fail_all(EngineDeadError("engine failed"))

    def _drain_inbox(self, block: bool) -> bool:
        """Apply inbox messages (jobs join their queue); False when asked to stop."""
        while True:
            try:
                message = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                if block:
                    continue
                return True
            block = False
            match message:
                case Add(seq):
                    self.scheduler.add(seq)
                case Abort(seq_id):
                    self.scheduler.abort(seq_id)
                case Pause(seq_id):
                    self.scheduler.pause(seq_id)
                    self._paused_changed()
                case Resume(seq_id):
                    self.scheduler.resume(seq_id)
                    self._paused_changed()
                case Job():
                    self._jobs.append(message)
                case Stop():
                    return False

    def _run_piece(self) -> None:
        """Run the next piece of the oldest job (and settle the job if that was its last), and owe
        generation its share of the time it took."""
        job = self._jobs[0]
        started = time.perf_counter()
        try:
            finished = self.runner.run(lambda: advance(job.pieces))
        except BaseException as exc:
            self._jobs.popleft()
            job.done(None, exc)
        else:
            if finished is not None:
                self._jobs.popleft()
                job.done(finished.result, None)
        self._steps_owed = (time.perf_counter() - started) * self._steps_per_job_second

    def _paused_changed(self) -> None:
        """Paused sequences take no steps: count them now, and let waiters re-check."""
        self.stats.num_paused = self.scheduler.num_paused
        self._outbox.deliver([])

    def _step(self) -> None:
        plan, early = self.scheduler.schedule()
        if early.left_queue:
            self._on_left_queue(early.left_queue)
        result: StepResult
        if plan.is_empty:
            result = StepResult()
        else:
            start = time.perf_counter()
            try:
                sampled = self.runner.execute(plan)
            except Exception:
                ids = [c.seq.request_id for c in plan.prefill] + [s.request_id for s in plan.decode]
                log.exception("forward pass failed; failing requests %s", ids)
                result = self.scheduler.fail(plan, EngineError("internal error in the forward pass"))
            else:
                result = self.scheduler.update_from_output(plan, sampled, self.runner.last_scored)
                if self._estimator is not None:
                    self._estimator.observe(time.perf_counter() - start, prefilled=bool(plan.prefill))
        if self._estimator is not None:
            scheduler = self.scheduler
            self._estimator.publish(load_of(scheduler.running, scheduler.waiting, scheduler.config.call_cap))
        self._record_step(plan, early, result)  # before delivering: whoever sees an output sees this step's stats
        items = self._finish(early) + self._finish(result)
        self._outbox.deliver(items)

    def _record_step(self, plan: StepPlan, early: StepResult, result: StepResult) -> None:
        s = self.stats
        s.num_steps += 1
        s.num_running = len(self.scheduler.running)
        s.num_waiting = len(self.scheduler.waiting)
        s.kv_cache_slots_used = self.scheduler.slots.num_used
        s.num_paused = self.scheduler.num_paused
        prefix, cache = self.scheduler.prefix_stats, self.scheduler.prefix
        s.prefix_lookups, s.prefix_hits, s.prefix_reused_tokens = prefix.lookups, prefix.hits, prefix.reused_tokens
        s.prefix_cached_tokens = cache.occupancy * cache.block_tokens if cache is not None else 0
        for _, reason in early.preempted:
            s.num_preempted[reason] = s.num_preempted.get(reason, 0) + 1
        if plan.decode:
            s.num_decode_steps += 1
            s.max_decode_batch_size = max(s.max_decode_batch_size, len(plan.decode))
            if len(plan.decode) > 1:
                s.num_shared_decode_steps += 1
        if not self._step_observers:
            return
        # a failed forward pass leaves the runner's times of the step before, as it always has
        times = self.runner.last_times if not plan.is_empty else StepTimes()
        event = StepEvent(
            num_decode=len(plan.decode),
            num_prefill_seqs=len(plan.prefill),
            times=PhaseTimes(times.prefill, times.decode, times.sampling, tuple(times.stages.items())),
            sampled=tuple(_sampled(seq, seq.seq_id in result.shifted) for seq, _ in result.outputs),
            released=tuple(seq.seq_id for seq in early.released + result.released),
        )
        for observer in self._step_observers:
            try:
                observer(event)
            except Exception:
                log.exception("step observer failed")

    def _finish(self, result: StepResult) -> Delivery:
        """Count and announce the requests that ended, free their runner state; the items to deliver."""
        items: Delivery = []
        for seq, output in result.outputs:
            items.append((seq.seq_id, output))
            if output.finished is not None:
                self.stats.num_finished += 1
                self._notify_finish(seq, output.finished, None)
        for seq, error in result.failed:
            items.append((seq.seq_id, error))
            self._notify_finish(seq, None, error)
        for seq in result.released:
            self.runner.release(seq.seq_id)
        return items

    def _notify_finish(self, seq: Sequence, finished: Finished | None, error: BaseException | None) -> None:
        if not self._finish_observers:
            return
        event = FinishEvent(seq.seq_id, seq.request_id, finished, error, seq.request.trace_id)
        for observer in self._finish_observers:
            try:
                observer(event)
            except Exception:
                log.exception("finish observer failed")


def _sampled(seq: Sequence, shifted: bool) -> SampledSequence:
    return SampledSequence(
        seq_id=seq.seq_id,
        first_token=seq.num_output == 1,
        prompt_tokens=len(seq.prompt_ids),
        truncated_prompt_tokens=seq.truncated_prompt_tokens,
        shifted=shifted,
        trace_id=seq.request.trace_id,
    )
