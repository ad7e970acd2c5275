"""The engine's metrics: step and finish events recorded on the engine thread (a few additions
per step, under one lock) and exported as Prometheus families at scrape time."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from gpt2_service.metrics.series import STEP_BUCKETS, Histogram, Series, engine_gauges, families

if TYPE_CHECKING:
    from gpt2_service.engine.events import FinishEvent, SampledSequence, StepEvent
    from gpt2_service.engine.frontend import Engine


class EngineRecorder(Collector):
    """Everything the engine thread records, exported at scrape time.

    Inter-token latency counts every gap exactly, without a per-sequence timestamp: the scheduler
    decodes every running sequence whose window is computed in every step, so a sequence that got
    a token in this step and had one before got that one in the previous token-producing step;
    the one exception is a sequence re-encoding its window after a context shift (its token's
    ``shifted``), whose gap is measured from the step it shifted in. Context shifts are counted
    here from the same flag.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series = Series()
        self._engine: Engine | None = None
        self._last_token_time: float | None = None
        self._shifted_at: dict[int, float] = {}  # seq id -> when it shifted, until its window is re-encoded

    def attach(self, engine: Engine) -> None:
        self._engine = engine
        engine.add_step_observer(self.on_step)
        engine.add_finish_observer(self.on_finish)

    # -- the engine thread -----------------------------------------------------------------------

    def on_step(self, step: StepEvent) -> None:
        now = time.monotonic()
        times = step.times
        s = self._series
        with self._lock:
            if step.num_decode:
                s.batch_size.observe(step.num_decode)
            if times.prefill:
                s.phase_seconds["prefill"].observe(times.prefill)
            if times.decode:
                s.phase_seconds["decode"].observe(times.decode)
            if times.sampling:
                s.phase_seconds["lm_head_sampling"].observe(times.sampling)
            for stage, seconds in times.stages:
                histogram = s.stage_seconds.get(stage)
                if histogram is None:
                    histogram = s.stage_seconds[stage] = Histogram(STEP_BUCKETS)
                histogram.observe(seconds)
            if step.sampled:
                self._count_tokens(step, now)
            for seq_id in step.released:  # gone before re-encoding its window (e.g. aborted)
                self._shifted_at.pop(seq_id, None)

    def _count_tokens(self, step: StepEvent, now: float) -> None:
        s = self._series
        sampled = step.sampled
        s.generation_tokens += len(sampled)
        # the usual step has decodes only, each one step after its previous token
        decodes_only = len(sampled) == step.num_decode
        num_step_gaps = len(sampled) if decodes_only else self._count_prefilled(sampled, now)
        for token in sampled:
            if token.shifted:
                s.context_shifts += 1
                self._shifted_at[token.seq_id] = now
        if num_step_gaps and self._last_token_time is not None:
            trace_id = next((t.trace_id for t in sampled if t.trace_id), "")  # one traced token's
            s.itl.observe(now - self._last_token_time, num_step_gaps, trace_id)
        self._last_token_time = now

    def _count_prefilled(self, sampled: tuple[SampledSequence, ...], now: float) -> int:
        """Account first tokens and tokens after a re-encoded window; return the other tokens,
        whose gap is one step."""
        s = self._series
        num_step_gaps = 0
        for token in sampled:
            resumed = self._shifted_at.pop(token.seq_id, None)
            if resumed is not None:
                s.itl.observe(now - resumed, 1, token.trace_id)
            elif token.first_token:  # the prompt is in
                s.prompt_tokens += token.prompt_tokens
                s.truncated_prompt_tokens += token.truncated_prompt_tokens
            else:
                num_step_gaps += 1
        return num_step_gaps

    def on_finish(self, event: FinishEvent) -> None:
        s = self._series
        finished = event.finished
        with self._lock:
            if finished is None:
                reason = str(getattr(event.error, "reason", type(event.error).__name__)).lower()
                s.failed[reason] = s.failed.get(reason, 0) + 1
                return
            s.finished[finished.reason.value] += 1
            timing, usage = finished.timing, finished.usage
            s.queue_time.observe(timing.queue_seconds)
            s.ttft.observe(timing.time_to_first_token_seconds, 1, event.trace_id)
            s.e2e.observe(timing.total_seconds, 1, event.trace_id)
            s.request_prompt_tokens.observe(usage.prompt_tokens)
            s.request_generation_tokens.observe(usage.completion_tokens)
            if usage.completion_tokens > 1:
                decode_seconds = timing.total_seconds - timing.time_to_first_token_seconds
                s.tpot.observe(decode_seconds / (usage.completion_tokens - 1))

    # -- scrape time -----------------------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        return list(families(Series()))

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            series = self._series.copy()
        yield from families(series)
        if self._engine is not None:
            yield from engine_gauges(self._engine.stats, self._engine.queued_by_tenant())
