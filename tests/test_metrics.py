"""Prometheus metrics after a known workload on the tiny engine: exact counters, histogram counts,
idle gauges, the info metric, a clean ``promtool check metrics``, and the /metrics HTTP server;
the contention series (preemptions, paused and stalled streams, queued requests per tenant, with a
bounded tenant label) after a preemption, a lagging reader, an idle reader and a queue of tenants.

The workload runs once per module through the engine API and calls ``observe_*`` exactly where the
gRPC layer will (an InvalidRequestError is an invalid rejection, an EngineOverloadedError a full
queue, closing a stream a cancellation).
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from gpt2_service.config import EngineConfig
from gpt2_service.core.fairness import PREEMPTION_REASONS
from gpt2_service.core.request import GenerationRequest, Priority, Truncation
from gpt2_service.core.sequence import Finished
from gpt2_service.engine.events import PhaseTimes, StepEvent
from gpt2_service.engine.frontend import Engine, GenerationStream
from gpt2_service.errors import EngineOverloadedError, InvalidRequestError
from gpt2_service.metrics import REJECT_REASONS, STAGES, Metrics
from gpt2_service.metrics.series import MAX_TENANT_LABELS, tenant_label_values
from gpt2_service.model.weights import LoadedModel
from prometheus_client.parser import text_string_to_metric_families

from tests.engine_helpers import WAIT_S, request, run

CONTEXT_WINDOW = 64  # small, so that truncation and context shifts happen in a short workload
UNARY = [(3, 5), (70, 4), (10, 60), (1, 1)]  # (prompt tokens, new tokens); 70 is truncated to 60
BLOCKERS = [(2, 150), (2, 150)]  # fill the batch (and shift their windows several times)
QUEUED = [(4, 6)] * 4  # fill the queue; the first is cancelled while it waits
NUM_INVALID = 3
DOCS = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"

Labels = frozenset[tuple[str, str]]


@dataclass(frozen=True)
class Scrape:
    text: str
    samples: dict[tuple[str, Labels], float]
    types: dict[str, str]  # family name -> type
    finished: list[Finished]
    num_decode_steps: int

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(labels)[label] for sample, labels in self.samples if sample == name and label in dict(labels)}


def _prompt(n: int) -> list[int]:
    return [(7 * i) % 1000 + 1 for i in range(n)]


def _request(prompt_tokens: int, new_tokens: int) -> GenerationRequest:
    return request(_prompt(prompt_tokens), max_new_tokens=new_tokens, temperature=0.0)


async def _workload(loaded: LoadedModel, metrics: Metrics) -> tuple[list[Finished], int]:
    config = EngineConfig(max_batch_size=2, max_queue_size=4, max_prefill_tokens=64, context_window=CONTEXT_WINDOW)
    engine = Engine(loaded, config)
    metrics.attach(engine)
    await engine.start()
    try:
        finished = [f for _, f in await asyncio.gather(*(run(engine, _request(*pn)) for pn in UNARY))]
        for _ in UNARY:
            metrics.observe_rpc("Generate", "OK")

        invalid = [
            request([1], temperature=-1.0),
            request([1], top_p=2.0),
            dataclasses.replace(_request(CONTEXT_WINDOW + 1, 1), truncation=Truncation.REJECT),
        ]
        assert len(invalid) == NUM_INVALID
        for bad in invalid:
            with pytest.raises(InvalidRequestError):
                await engine.submit(bad)
            metrics.observe_rejected("invalid")
            metrics.observe_rpc("Generate", "INVALID_ARGUMENT")

        blockers = [await engine.submit(_request(*pn)) for pn in BLOCKERS]
        await engine.wait_for(lambda: engine.stats.num_running == len(BLOCKERS), WAIT_S)
        queued = [await engine.submit(_request(*pn)) for pn in QUEUED]
        with pytest.raises(EngineOverloadedError):
            await engine.submit(_request(1, 1))
        metrics.observe_rejected("queue_full")
        metrics.observe_rpc("GenerateStream", "RESOURCE_EXHAUSTED")
        queued[0].close()  # still waiting: it never gets a token
        metrics.observe_cancelled()
        metrics.observe_rpc("GenerateStream", "CANCELLED")

        async def stream(s: GenerationStream) -> Finished:
            outputs = [out async for out in s]
            finished = outputs[-1].finished
            assert finished is not None
            metrics.observe_rpc("GenerateStream", "OK")
            return finished

        finished += [f for _, f in await asyncio.gather(*(b.collect() for b in blockers))]
        finished += await asyncio.gather(*(stream(q) for q in queued[1:]))
        for _ in BLOCKERS:
            metrics.observe_rpc("Generate", "OK")
        return finished, engine.stats.num_decode_steps
    finally:
        await engine.shutdown()


@pytest.fixture(scope="module")
def scrape(tiny: LoadedModel) -> Scrape:
    metrics = Metrics()
    metrics.set_model_info(tiny, "float32", "cpu", "int8", True)
    finished, num_decode_steps = asyncio.run(_workload(tiny, metrics))
    text = metrics.exposition().decode()
    samples: dict[tuple[str, Labels], float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(text, samples, types, finished, num_decode_steps)


# The expected totals, from the workload's own numbers.
COMPLETED = UNARY + BLOCKERS + QUEUED[1:]
N = len(COMPLETED)


def _kept(prompt: int, new: int) -> int:
    """A prompt over the window keeps room for its new tokens, at least half the window."""
    return prompt if prompt <= CONTEXT_WINDOW else max(CONTEXT_WINDOW - new, CONTEXT_WINDOW // 2)


PROMPT_TOKENS = sum(_kept(p, n) for p, n in COMPLETED)
TRUNCATED_TOKENS = sum(p - _kept(p, n) for p, n in COMPLETED)
GENERATED_TOKENS = sum(n for _, n in COMPLETED)


def test_request_counters_equal_the_workload(scrape: Scrape) -> None:
    assert scrape.value("gpt2_requests_total", rpc="Generate", code="OK") == len(UNARY) + len(BLOCKERS)
    assert scrape.value("gpt2_requests_total", rpc="GenerateStream", code="OK") == len(QUEUED) - 1
    assert scrape.value("gpt2_requests_total", rpc="Generate", code="INVALID_ARGUMENT") == NUM_INVALID
    assert scrape.value("gpt2_requests_total", rpc="GenerateStream", code="RESOURCE_EXHAUSTED") == 1
    assert scrape.value("gpt2_requests_total", rpc="GenerateStream", code="CANCELLED") == 1
    assert scrape.value("gpt2_requests_rejected_total", reason="invalid") == NUM_INVALID
    assert scrape.value("gpt2_requests_rejected_total", reason="queue_full") == 1
    assert scrape.value("gpt2_requests_rejected_total", reason="deadline") == 0
    assert scrape.value("gpt2_requests_cancelled_total") == 1
    assert scrape.value("gpt2_requests_finished_total", reason="length") == N
    assert scrape.value("gpt2_requests_finished_total", reason="eos") == 0
    assert scrape.label_values("gpt2_requests_failed_total", "reason") == set()


def test_token_counters_equal_the_workload(scrape: Scrape) -> None:
    shifts = sum(f.usage.context_shifts for f in scrape.finished)
    assert shifts >= 3  # the 60-token generation and both blockers overflow the 64-token window
    assert scrape.value("gpt2_prompt_tokens_total") == PROMPT_TOKENS
    assert scrape.value("gpt2_generation_tokens_total") == GENERATED_TOKENS
    assert scrape.value("gpt2_truncated_prompt_tokens_total") == TRUNCATED_TOKENS == 10
    assert scrape.value("gpt2_context_shifts_total") == shifts


def test_per_request_histograms_count_every_finished_request(scrape: Scrape) -> None:
    for name in (
        "gpt2_request_queue_time_seconds",
        "gpt2_time_to_first_token_seconds",
        "gpt2_e2e_request_latency_seconds",
        "gpt2_request_prompt_tokens",
        "gpt2_request_generation_tokens",
    ):
        assert scrape.value(f"{name}_count") == N, name
    assert scrape.value("gpt2_time_per_output_token_seconds_count") == sum(1 for _, n in COMPLETED if n > 1)
    assert scrape.value("gpt2_request_prompt_tokens_sum") == PROMPT_TOKENS
    assert scrape.value("gpt2_request_generation_tokens_sum") == GENERATED_TOKENS
    ttft = sum(f.timing.time_to_first_token_seconds for f in scrape.finished)
    assert scrape.value("gpt2_time_to_first_token_seconds_sum") == pytest.approx(ttft)


def test_inter_token_latency_counts_every_gap_including_across_context_shifts(scrape: Scrape) -> None:
    assert scrape.value("gpt2_inter_token_latency_seconds_count") == GENERATED_TOKENS - N
    decode_seconds = sum(f.timing.total_seconds - f.timing.time_to_first_token_seconds for f in scrape.finished)
    assert scrape.value("gpt2_inter_token_latency_seconds_sum") == pytest.approx(decode_seconds, rel=0.05, abs=0.05)


def test_step_histograms_count_every_engine_step(scrape: Scrape) -> None:
    shifts = scrape.value("gpt2_context_shifts_total")
    # every token but a request's first and the first after each shift comes from a decode step
    assert scrape.value("gpt2_step_batch_size_count") == scrape.num_decode_steps
    assert scrape.value("gpt2_step_batch_size_sum") == GENERATED_TOKENS - N - shifts
    assert scrape.value("gpt2_step_duration_seconds_count", phase="decode") == scrape.num_decode_steps
    assert scrape.value("gpt2_step_duration_seconds_count", phase="prefill") >= N
    assert scrape.label_values("gpt2_step_stage_seconds_count", "stage") == set(STAGES)
    for stage in STAGES:
        assert scrape.value("gpt2_step_stage_seconds_count", stage=stage) >= scrape.num_decode_steps


def test_gauges_return_to_idle_after_the_workload(scrape: Scrape) -> None:
    assert scrape.value("gpt2_sequences_running") == 0
    assert scrape.value("gpt2_sequences_waiting") == 0
    assert scrape.value("gpt2_kv_cache_usage_ratio") == 0
    assert scrape.value("gpt2_kv_cache_used_bytes") == 0
    assert scrape.value("gpt2_kv_cache_slots_free") == scrape.value("gpt2_kv_cache_slots") == 2
    assert scrape.value("gpt2_kv_cache_bytes") > 0
    assert scrape.value("gpt2_paused_sequences") == 0
    assert scrape.label_values("gpt2_tenant_queued_requests", "tenant") == set()


def test_contention_series_exist_from_the_start_at_zero(scrape: Scrape) -> None:
    # one tenant and one priority class: nothing preempted, no reader lagged
    assert scrape.label_values("gpt2_preemptions_total", "reason") == set(PREEMPTION_REASONS)
    for reason in PREEMPTION_REASONS:
        assert scrape.value("gpt2_preemptions_total", reason=reason) == 0
    assert scrape.value("gpt2_streams_stalled_total") == 0
    assert scrape.label_values("gpt2_requests_rejected_total", "reason") == set(REJECT_REASONS)
    for reason in ("tenant_queue_full", "deadline_unmeetable", "model_rpcs"):
        assert scrape.value("gpt2_requests_rejected_total", reason=reason) == 0


def test_model_info_names_the_random_weights(scrape: Scrape) -> None:
    [(name, labels)] = [key for key in scrape.samples if key[0] == "gpt2_model_info"]
    assert dict(labels) == {
        "name": "random:tiny",
        "source": "random (seed 0)",
        "random_weights": "true",
        "dtype": "float32",
        "weights": "int8",
        "batch_invariant": "true",
        "device": "cpu",
        "version": "0.1.0",
    }
    assert scrape.samples[(name, labels)] == 1


def test_every_histogram_is_cumulative_and_ends_at_its_count(scrape: Scrape) -> None:
    histograms = [name for name, kind in scrape.types.items() if kind == "histogram"]
    assert len(histograms) == 10
    for name in histograms:
        series: dict[Labels, list[tuple[float, float]]] = {}
        for (sample, labels), value in scrape.samples.items():
            if sample == f"{name}_bucket":
                le = dict(labels)["le"]
                rest = frozenset((k, v) for k, v in labels if k != "le")
                series.setdefault(rest, []).append((float(le), value))
        for rest, buckets in series.items():
            counts = [count for _, count in sorted(buckets)]
            assert counts == sorted(counts), (name, rest)
            assert counts[-1] == scrape.samples[(f"{name}_count", rest)], (name, rest)


def test_every_family_is_documented(scrape: Scrape) -> None:
    documented = DOCS.read_text()
    families = {name for name in scrape.types if not name.endswith("_created")}
    assert len(families) == 35  # 14 counters, 10 histograms, 10 gauges, 1 info
    for name in families:
        exposed = f"{name}_total" if scrape.types[name] == "counter" else name
        assert f"`{exposed}`" in documented, exposed


def test_promtool_check_metrics_is_clean(scrape: Scrape) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found (Debian package 'prometheus'; .ci/run installs it)")
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=scrape.text.encode(), capture_output=True, timeout=60
    )
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, b"", b"")


def test_a_value_on_a_bucket_bound_counts_in_that_bucket() -> None:
    metrics = Metrics()
    metrics.recorder.on_step(StepEvent(num_decode=2, num_prefill_seqs=0, times=PhaseTimes(decode=0.004)))
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    batch = {s.labels["le"]: s.value for s in families["gpt2_step_batch_size"].samples if s.name.endswith("_bucket")}
    assert (batch["1.0"], batch["2.0"], batch["+Inf"]) == (0, 1, 1)
    decode = {
        s.labels["le"]: s.value
        for s in families["gpt2_step_duration_seconds"].samples
        if s.name.endswith("_bucket") and s.labels["phase"] == "decode"
    }
    assert (decode["0.0032"], decode["0.0064"]) == (0, 1)


def test_the_http_server_serves_the_exposition_on_its_own_port() -> None:
    metrics = Metrics()
    metrics.observe_cancelled()
    server, thread = metrics.start_http_server("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as response:
            body = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert "gpt2_requests_cancelled_total 1.0" in body


# ---- contention ---------------------------------------------------------------------------------


def _samples(metrics: Metrics) -> dict[tuple[str, Labels], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for sample in family.samples
    }


def _preemptions(samples: dict[tuple[str, Labels], float]) -> dict[str, float]:
    return {dict(labels)["reason"]: v for (name, labels), v in samples.items() if name == "gpt2_preemptions_total"}


def _queued(samples: dict[tuple[str, Labels], float]) -> dict[str, float]:
    return {dict(labels)["tenant"]: v for (name, labels), v in samples.items() if name == "gpt2_tenant_queued_requests"}


CONTENTION_CONFIG = EngineConfig(max_batch_size=2, max_prefill_tokens=16)


async def _started(loaded: LoadedModel, metrics: Metrics, **config: float | bool) -> Engine:
    engine = Engine(loaded, dataclasses.replace(CONTENTION_CONFIG, **config))  # type: ignore[arg-type]
    metrics.attach(engine)
    await engine.start()
    return engine


async def test_a_preemption_for_a_higher_priority_is_counted_by_reason(tiny: LoadedModel) -> None:
    metrics = Metrics()
    engine = await _started(tiny, metrics)
    try:
        batch = await engine.submit(dataclasses.replace(_request(5, 40), priority=Priority.BATCH))
        other = await engine.submit(_request(5, 60))
        await engine.wait_for(lambda: engine.stats.num_running == 2, WAIT_S)
        urgent = dataclasses.replace(_request(5, 10), request_id="urgent", priority=Priority.INTERACTIVE)
        await (await engine.submit(urgent)).collect()  # it took the BATCH request's place
        await asyncio.gather(batch.collect(), other.collect())
    finally:
        await engine.shutdown()
    assert _preemptions(_samples(metrics)) == dict.fromkeys(PREEMPTION_REASONS, 0) | {"priority": 1}


async def test_a_lagging_reader_shows_as_a_paused_sequence_until_it_reads(tiny: LoadedModel) -> None:
    metrics = Metrics()
    engine = await _started(tiny, metrics, stream_buffer_tokens=8, stream_idle_timeout=0)
    try:
        stream = await engine.submit(_request(5, 40), backpressure=True)
        await engine.wait_for(lambda: engine.stats.num_paused == 1, WAIT_S)
        paused = _samples(metrics)
        await stream.collect()  # reading resumes it
        resumed = _samples(metrics)
    finally:
        await engine.shutdown()
    assert paused[("gpt2_paused_sequences", frozenset())] == 1
    assert resumed[("gpt2_paused_sequences", frozenset())] == 0
    assert resumed[("gpt2_streams_stalled_total", frozenset())] == 0


async def test_a_stream_left_unread_is_counted_as_stalled(tiny: LoadedModel) -> None:
    metrics = Metrics()
    engine = await _started(tiny, metrics, stream_buffer_tokens=4, stream_idle_timeout=0.2)
    try:
        stream = await engine.submit(_request(5, 500), backpressure=True)
        await engine.wait_for(lambda: engine.stats.num_stalled == 1, WAIT_S)
        stream.close()
    finally:
        await engine.shutdown()
    assert _samples(metrics)[("gpt2_streams_stalled_total", frozenset())] == 1


async def test_queued_requests_per_tenant_keep_at_most_16_tenant_values(tiny: LoadedModel) -> None:
    metrics = Metrics()
    engine = await _started(tiny, metrics, max_batch_size=1, max_queue_size=64, preemption=False)
    try:
        running = await engine.submit(_request(5, 500))
        await engine.wait_for(lambda: engine.stats.num_running == 1, WAIT_S)
        # 20 tenants wait: t00..t14 with 2 requests each, t15..t19 and the anonymous one with 1
        counts = {f"t{i:02}": 2 if i < 15 else 1 for i in range(20)} | {"": 1}
        waiting = [
            await engine.submit(dataclasses.replace(_request(3, 2), request_id=f"{tenant}-{n}", tenant=tenant))
            for tenant, count in counts.items()
            for n in range(count)
        ]
        assert engine.queued_by_tenant() == counts
        queued = _queued(_samples(metrics))
        running.close()
        for stream in waiting:
            stream.close()
        await engine.wait_for(lambda: not engine.queued_by_tenant(), WAIT_S)
        drained = _queued(_samples(metrics))
    finally:
        await engine.shutdown()
    assert len(queued) == MAX_TENANT_LABELS
    assert queued == dict.fromkeys((f"t{i:02}" for i in range(15)), 2) | {"other": 6}  # t15..t19 and anonymous
    assert drained == {}


def test_the_tenant_label_is_bounded_and_sums_the_rest_as_other() -> None:
    assert tenant_label_values({}) == {}
    assert tenant_label_values({"": 3, "ipv4:10.0.0.7": 1}) == {"anonymous": 3, "ipv4:10.0.0.7": 1}
    sixteen = {f"ipv4:10.0.0.{i}": i + 1 for i in range(16)}
    assert tenant_label_values(sixteen) == sixteen  # they fit: all by name, no "other"
    many = {f"ipv4:10.0.0.{i}": i + 1 for i in range(1000)}
    values = tenant_label_values(many)
    assert len(values) == MAX_TENANT_LABELS
    assert values == {f"ipv4:10.0.0.{i}": i + 1 for i in range(985, 1000)} | {"other": sum(range(1, 986))}
    assert sum(values.values()) == sum(many.values())
    # ties by name; a tenant named "other" or "anonymous" adds to that value instead of repeating it
    tied = dict.fromkeys("abcdefghijklmnopq", 1) | {"other": 5, "anonymous": 1, "": 2}
    values = tenant_label_values(tied)
    assert values == dict.fromkeys("abcdefghijkl", 1) | {"other": 5 + 5, "anonymous": 2 + 1}
    assert sum(values.values()) == sum(tied.values())
