"""Prometheus metrics of the service, in a registry of their own, served on their own HTTP port.

Engine-side series (per step and per finished request) are plain numbers updated on the engine
thread under one lock per event and turned into metric families only at scrape time, so the
decode loop pays a few additions per step; gauges read ``engine.stats`` at scrape time and cost
the loop nothing. API-side series (RPCs, rejections, cancellations) use prometheus_client's
thread-safe counters. This module is not the request log; that belongs to the gRPC layer.
"""

from __future__ import annotations

import itertools
import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Info, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gpt2_service import __version__
from gpt2_service.core.request import FinishReason

if TYPE_CHECKING:
    from gpt2_service.engine.events import EngineStats, FinishEvent, SampledSequence, StepEvent
    from gpt2_service.engine.frontend import Engine
    from gpt2_service.model.weights import LoadedModel


def _exponential(start: float, factor: float, count: int) -> tuple[float, ...]:
    return tuple(round(start * factor**i, 9) for i in range(count))


# Request latencies: 1 ms .. 65.5 s, doubling; resolves single-ms GPU tokens and slow CPU requests.
LATENCY_BUCKETS = _exponential(0.001, 2.0, 17)
# Step phases and forward stages: 50 us .. 13.1 s, doubling (a CPU embedding lookup takes tens of us).
STEP_BUCKETS = _exponential(0.00005, 2.0, 19)
# Tokens per request: 1 .. 4096, doubling (GPT-2's window is 1024; generations may shift past it).
TOKEN_BUCKETS = _exponential(1.0, 2.0, 13)
# Sequences decoded together in one step: 1 .. 512, doubling.
BATCH_BUCKETS = _exponential(1.0, 2.0, 10)

REJECT_REASONS = ("queue_full", "invalid", "malformed", "deadline", "unauthenticated")
PHASES = ("prefill", "decode", "lm_head_sampling")
STAGES = ("embedding", "attention", "mlp", "final_layer_norm", "lm_head", "sampling")


class _Histogram:
    """Bucket counts and a sum; ``observe(value, count)`` records ``count`` equal observations at
    once. Not thread-safe on its own: the recorder's lock guards it."""

    __slots__ = ("bounds", "counts", "les", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.les = [repr(float(b)) for b in bounds] + ["+Inf"]  # bounds stay below 1e6: no exponent form
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += count  # bucket i holds bounds[i-1] < v <= bounds[i]
        self.sum += value * count

    def copy(self) -> _Histogram:
        other = _Histogram.__new__(_Histogram)
        other.bounds, other.les, other.counts, other.sum = self.bounds, self.les, list(self.counts), self.sum
        return other

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count)`` pairs, cumulative, +Inf last."""
        return list(zip(self.les, map(float, itertools.accumulate(self.counts)), strict=True))


@dataclass
class _Series:
    """The engine-side numbers: counters, and histograms by label value."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    truncated_prompt_tokens: int = 0
    context_shifts: int = 0
    finished: dict[str, int] = field(default_factory=lambda: {reason.value: 0 for reason in FinishReason})
    failed: dict[str, int] = field(default_factory=dict)
    queue_time: _Histogram = field(default_factory=lambda: _Histogram(LATENCY_BUCKETS))
    ttft: _Histogram = field(default_factory=lambda: _Histogram(LATENCY_BUCKETS))
    itl: _Histogram = field(default_factory=lambda: _Histogram(LATENCY_BUCKETS))
    tpot: _Histogram = field(default_factory=lambda: _Histogram(LATENCY_BUCKETS))
    e2e: _Histogram = field(default_factory=lambda: _Histogram(LATENCY_BUCKETS))
    request_prompt_tokens: _Histogram = field(default_factory=lambda: _Histogram(TOKEN_BUCKETS))
    request_generation_tokens: _Histogram = field(default_factory=lambda: _Histogram(TOKEN_BUCKETS))
    batch_size: _Histogram = field(default_factory=lambda: _Histogram(BATCH_BUCKETS))
    phase_seconds: dict[str, _Histogram] = field(
        default_factory=lambda: {phase: _Histogram(STEP_BUCKETS) for phase in PHASES}
    )
    stage_seconds: dict[str, _Histogram] = field(default_factory=dict)

    def copy(self) -> _Series:
        """A snapshot, so that a scrape formats it without holding the engine thread's lock."""
        return replace(
            self,
            finished=dict(self.finished),
            failed=dict(self.failed),
            queue_time=self.queue_time.copy(),
            ttft=self.ttft.copy(),
            itl=self.itl.copy(),
            tpot=self.tpot.copy(),
            e2e=self.e2e.copy(),
            request_prompt_tokens=self.request_prompt_tokens.copy(),
            request_generation_tokens=self.request_generation_tokens.copy(),
            batch_size=self.batch_size.copy(),
            phase_seconds={k: h.copy() for k, h in self.phase_seconds.items()},
            stage_seconds={k: h.copy() for k, h in self.stage_seconds.items()},
        )


def _counter(name: str, documentation: str, value: int) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=float(value))


def _labelled_counter(name: str, documentation: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in values.items():
        family.add_metric([value], float(count))
    return family


def _histogram(name: str, documentation: str, histogram: _Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, documentation, buckets=histogram.cumulative(), sum_value=histogram.sum)


def _labelled_histogram(
    name: str, documentation: str, label: str, histograms: dict[str, _Histogram]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=[label])
    for value, histogram in histograms.items():
        family.add_metric([value], histogram.cumulative(), histogram.sum)
    return family


def _families(s: _Series) -> Iterator[Metric]:
    yield _counter(
        "gpt2_prompt_tokens_total",
        "Prompt tokens prefilled (after truncation), counted at each request's first token.",
        s.prompt_tokens,
    )
    yield _counter(
        "gpt2_generation_tokens_total",
        "Tokens generated, including those of requests cancelled later.",
        s.generation_tokens,
    )
    yield _counter(
        "gpt2_truncated_prompt_tokens_total",
        "Prompt tokens dropped from the left to fit the context window.",
        s.truncated_prompt_tokens,
    )
    yield _counter(
        "gpt2_context_shifts_total",
        "Context shifts: a generation filled the window, forgot its earliest tokens and re-encoded the rest.",
        s.context_shifts,
    )
    yield _labelled_counter(
        "gpt2_requests_finished_total", "Generations that finished, by finish reason.", "reason", s.finished
    )
    yield _labelled_counter(
        "gpt2_requests_failed_total",
        "Generations the engine failed after accepting them, by error reason.",
        "reason",
        s.failed,
    )
    yield _histogram(
        "gpt2_request_queue_time_seconds",
        "Arrival to admission into the running batch, per finished request.",
        s.queue_time,
    )
    yield _histogram(
        "gpt2_time_to_first_token_seconds", "Arrival to first generated token, per finished request.", s.ttft
    )
    yield _histogram(
        "gpt2_inter_token_latency_seconds", "Time between two consecutive tokens of a generation, every gap.", s.itl
    )
    yield _histogram(
        "gpt2_time_per_output_token_seconds",
        "Mean time per generated token after the first, per finished request with two or more tokens.",
        s.tpot,
    )
    yield _histogram("gpt2_e2e_request_latency_seconds", "Arrival to last token, per finished request.", s.e2e)
    yield _histogram(
        "gpt2_request_prompt_tokens", "Prompt tokens (after truncation) per finished request.", s.request_prompt_tokens
    )
    yield _histogram(
        "gpt2_request_generation_tokens", "Generated tokens per finished request.", s.request_generation_tokens
    )
    yield _histogram("gpt2_step_batch_size", "Sequences decoded together, per engine step that decodes.", s.batch_size)
    yield _labelled_histogram(
        "gpt2_step_duration_seconds",
        "Wall time of one engine step's phase: the prefill and decode forward passes, and the LM head plus sampling.",
        "phase",
        s.phase_seconds,
    )
    yield _labelled_histogram(
        "gpt2_step_stage_seconds",
        "Wall time per forward stage in one engine step, summed over layers (CPU only; off on accelerators).",
        "stage",
        s.stage_seconds,
    )


def _engine_gauges(stats: EngineStats) -> Iterator[Metric]:
    gauges = (
        ("gpt2_sequences_running", "Sequences in the running batch.", stats.num_running),
        ("gpt2_sequences_waiting", "Sequences waiting for a batch place and a KV-cache slot.", stats.num_waiting),
        ("gpt2_kv_cache_usage_ratio", "Fraction of KV-cache slots in use (0 to 1).", stats.kv_cache_usage),
        ("gpt2_kv_cache_bytes", "Bytes allocated for the KV cache.", stats.kv_cache_bytes),
        (
            "gpt2_kv_cache_used_bytes",
            "Bytes of the KV cache held by running sequences.",
            stats.kv_cache_slots_used * stats.kv_cache_bytes_per_slot,
        ),
        ("gpt2_kv_cache_slots", "KV-cache slots (one per running sequence).", stats.kv_cache_slots),
        ("gpt2_kv_cache_slots_free", "KV-cache slots free.", stats.kv_cache_slots_free),
    )
    for name, documentation, value in gauges:
        yield GaugeMetricFamily(name, documentation, value=float(value))


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
        self._series = _Series()
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
                    histogram = s.stage_seconds[stage] = _Histogram(STEP_BUCKETS)
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
            s.itl.observe(now - self._last_token_time, num_step_gaps)
        self._last_token_time = now

    def _count_prefilled(self, sampled: tuple[SampledSequence, ...], now: float) -> int:
        """Account first tokens and tokens after a re-encoded window; return the other tokens,
        whose gap is one step."""
        s = self._series
        num_step_gaps = 0
        for token in sampled:
            resumed = self._shifted_at.pop(token.seq_id, None)
            if resumed is not None:
                s.itl.observe(now - resumed)
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
            s.ttft.observe(timing.time_to_first_token_seconds)
            s.e2e.observe(timing.total_seconds)
            s.request_prompt_tokens.observe(usage.prompt_tokens)
            s.request_generation_tokens.observe(usage.completion_tokens)
            if usage.completion_tokens > 1:
                decode_seconds = timing.total_seconds - timing.time_to_first_token_seconds
                s.tpot.observe(decode_seconds / (usage.completion_tokens - 1))

    # -- scrape time -----------------------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        return list(_families(_Series()))

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            series = self._series.copy()
        yield from _families(series)
        if self._engine is not None:
            yield from _engine_gauges(self._engine.stats)


class Metrics:
    """The service's metrics. Engine-side series come from ``attach(engine)``; the gRPC layer
    reports each RPC's final status code, rejections and cancellations through ``observe_*``.
    Every method is thread-safe."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.recorder = EngineRecorder()
        self.registry.register(self.recorder)
        self._requests = Counter(
            "gpt2_requests_total",
            "RPCs handled, by method and final gRPC status code.",
            ["rpc", "code"],
            registry=self.registry,
        )
        self._rejected = Counter(
            "gpt2_requests_rejected_total",
            "Requests refused before generation: queue_full, invalid, deadline, unauthenticated.",
            ["reason"],
            registry=self.registry,
        )
        for reason in REJECT_REASONS:
            self._rejected.labels(reason)
        self._cancelled = Counter(
            "gpt2_requests_cancelled_total",
            "Requests the client cancelled before they finished.",
            registry=self.registry,
        )
        self._model = Info("gpt2_model", "The model being served.", registry=self.registry)

    def attach(self, engine: Engine) -> None:
        """Record the engine's steps and finished requests, and read its gauges at scrape time."""
        self.recorder.attach(engine)

    def set_model_info(self, loaded: LoadedModel, dtype: str, device: str) -> None:
        self._model.info(
            {
                "name": loaded.name,
                "source": loaded.source,
                "random_weights": "true" if loaded.random_weights else "false",
                "dtype": dtype,
                "device": device,
                "version": __version__,
            }
        )

    def observe_rpc(self, rpc: str, code: str) -> None:
        """One finished RPC and its final status code name, e.g. ``("Generate", "OK")``."""
        self._requests.labels(rpc, code).inc()

    def observe_rejected(self, reason: str) -> None:
        """A request refused before generation; ``reason`` is one of ``REJECT_REASONS``."""
        self._rejected.labels(reason).inc()

    def observe_cancelled(self) -> None:
        self._cancelled.inc()

    def start_http_server(self, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
        """Serve ``/metrics`` on ``host:port`` (port 0 picks one: ``server.server_port``) from a
        daemon thread. Stop with ``server.shutdown(); server.server_close()``."""
        return prometheus_client.start_http_server(port, addr=host, registry=self.registry)

    def exposition(self) -> bytes:
        """The text exposition format, as served at ``/metrics``."""
        return generate_latest(self.registry)
