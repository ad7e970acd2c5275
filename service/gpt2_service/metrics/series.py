"""The engine-side series as plain numbers (histograms that cost an addition per observation) and
their Prometheus families, built only at scrape time; bucket layouts and label values."""

from __future__ import annotations

import itertools
import time
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Exemplar

from gpt2_service.core.fairness import PREEMPTION_REASONS
from gpt2_service.core.request import FinishReason

if TYPE_CHECKING:
    from gpt2_service.engine.events import EngineStats


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

REJECT_REASONS = (
    "queue_full",
    "invalid",
    "malformed",
    "deadline",
    "unauthenticated",
    "tenant_queue_full",
    "deadline_unmeetable",
    "model_rpcs",
)
PHASES = ("prefill", "decode", "lm_head_sampling")
STAGES = ("embedding", "attention", "mlp", "final_layer_norm", "lm_head", "sampling")
# Tenant label values of gpt2_tenant_queued_requests: at most this many, however many tenants wait.
MAX_TENANT_LABELS = 16
OTHER_TENANTS = "other"  # the tenants past the first MAX_TENANT_LABELS - 1, summed
ANONYMOUS_TENANT = "anonymous"  # the tenant with no name (in-process use)


class Histogram:
    """Bucket counts and a sum; ``observe(value, count)`` records ``count`` equal observations at
    once. With a ``trace_id``, the observation becomes its bucket's exemplar (the latest one per
    bucket), which the OpenMetrics exposition shows so that a dashboard can open that trace. Not
    thread-safe on its own: the recorder's lock guards it."""

    __slots__ = ("bounds", "counts", "exemplars", "les", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.les = [repr(float(b)) for b in bounds] + ["+Inf"]  # bounds stay below 1e6: no exponent form
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.exemplars: dict[int, Exemplar] = {}  # bucket -> its latest traced observation

    def observe(self, value: float, count: int = 1, trace_id: str = "") -> None:
        bucket = bisect_left(self.bounds, value)  # bucket i holds bounds[i-1] < v <= bounds[i]
        self.counts[bucket] += count
        self.sum += value * count
        if trace_id:
            self.exemplars[bucket] = Exemplar({"trace_id": trace_id}, value, time.time())

    def copy(self) -> Histogram:
        other = Histogram.__new__(Histogram)
        other.bounds, other.les, other.counts, other.sum = self.bounds, self.les, list(self.counts), self.sum
        other.exemplars = dict(self.exemplars)
        return other

    def cumulative(self) -> list[tuple[str, float] | tuple[str, float, Exemplar]]:
        """``(le, count)`` pairs, cumulative, +Inf last; ``(le, count, exemplar)`` for a bucket
        with an exemplar."""
        pairs = zip(self.les, map(float, itertools.accumulate(self.counts)), strict=True)
        return [(le, n, self.exemplars[i]) if i in self.exemplars else (le, n) for i, (le, n) in enumerate(pairs)]


@dataclass
class Series:
    """The engine-side numbers: counters, and histograms by label value."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    truncated_prompt_tokens: int = 0
    context_shifts: int = 0
    finished: dict[str, int] = field(default_factory=lambda: {reason.value: 0 for reason in FinishReason})
    failed: dict[str, int] = field(default_factory=dict)
    queue_time: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    ttft: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    tpot: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    request_prompt_tokens: Histogram = field(default_factory=lambda: Histogram(TOKEN_BUCKETS))
    request_generation_tokens: Histogram = field(default_factory=lambda: Histogram(TOKEN_BUCKETS))
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    phase_seconds: dict[str, Histogram] = field(
        default_factory=lambda: {phase: Histogram(STEP_BUCKETS) for phase in PHASES}
    )
    stage_seconds: dict[str, Histogram] = field(default_factory=dict)

    def copy(self) -> Series:
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


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, documentation, buckets=histogram.cumulative(), sum_value=histogram.sum)


def _labelled_histogram(
    name: str, documentation: str, label: str, histograms: dict[str, Histogram]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=[label])
    for value, histogram in histograms.items():
        family.add_metric([value], histogram.cumulative(), histogram.sum)
    return family


def families(s: Series) -> Iterator[Metric]:
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


def engine_gauges(stats: EngineStats, queued: dict[str, int]) -> Iterator[Metric]:
    """The engine's state, read at scrape time: its statistics, and ``queued`` (its waiting
    requests per tenant, ``Engine.queued_by_tenant()``)."""
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
    yield GaugeMetricFamily(
        "gpt2_paused_sequences",
        "Running sequences paused because their stream's reader lags (they take no steps until it reads).",
        value=float(stats.num_paused),
    )
    preempted = {reason: stats.num_preempted.get(reason, 0) for reason in PREEMPTION_REASONS}
    yield _labelled_counter(
        "gpt2_preemptions_total",
        "Running sequences preempted (their KV cache freed, recomputed when readmitted), by reason: "
        + ", ".join(PREEMPTION_REASONS)
        + ".",
        "reason",
        preempted,
    )
    for name, documentation, count in (
        (
            "gpt2_prefix_cache_lookups_total",
            "Admissions that looked for a reusable prompt prefix.",
            stats.prefix_lookups,
        ),
        ("gpt2_prefix_cache_hits_total", "Admissions that reused a prompt prefix.", stats.prefix_hits),
        (
            "gpt2_prefix_cache_reused_tokens_total",
            "Prompt tokens whose keys and values were reused from the KV cache instead of computed.",
            stats.prefix_reused_tokens,
        ),
    ):
        yield _counter(name, documentation, count)
    yield GaugeMetricFamily(
        "gpt2_prefix_cache_tokens",
        "Prompt tokens (whole blocks) that KV-cache slots hold for reuse, running and free slots together "
        "(a prefix held by two slots counts twice).",
        value=float(stats.prefix_cached_tokens),
    )
    yield _counter(
        "gpt2_streams_stalled_total",
        "Streams ended because their reader left them unread past --stream-idle-timeout.",
        stats.num_stalled,
    )
    family = GaugeMetricFamily(
        "gpt2_tenant_queued_requests",
        f"Requests waiting per tenant with any: at most {MAX_TENANT_LABELS} tenant values, those with the most "
        f'by name, the rest summed as "{OTHER_TENANTS}"; no name is "{ANONYMOUS_TENANT}".',
        labels=["tenant"],
    )
    for tenant, count in tenant_label_values(queued).items():
        family.add_metric([tenant], float(count))
    yield family


def tenant_label_values(queued: dict[str, int], limit: int = MAX_TENANT_LABELS) -> dict[str, int]:
    """``queued`` ({tenant: waiting requests}) with at most ``limit`` keys, so that the tenant label
    stays bounded however many tenants (peer addresses, when there is no token file) wait: all of
    them when they fit, otherwise the ``limit - 1`` with the most (ties by name) and the rest summed
    as ``OTHER_TENANTS``. The tenant with no name is ``ANONYMOUS_TENANT``; a tenant whose name is
    one of those two words is summed with it, so no label value appears twice."""
    ranked = sorted(((count, tenant) for tenant, count in queued.items() if count > 0), key=lambda ct: (-ct[0], ct[1]))
    named = ranked if len(ranked) <= limit else ranked[: limit - 1]
    values: dict[str, int] = {}
    for count, tenant in named:
        label = tenant or ANONYMOUS_TENANT
        values[label] = values.get(label, 0) + count
    if len(named) < len(ranked):
        values[OTHER_TENANTS] = values.get(OTHER_TENANTS, 0) + sum(count for count, _ in ranked[len(named) :])
    return values
