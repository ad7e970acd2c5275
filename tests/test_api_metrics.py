"""Prometheus metrics of a real ``gpt2-serve`` process after a known workload over gRPC: the RPC,
rejection and cancellation counters equal the workload exactly, histograms count each finished
generation, gauges return to idle, the model's info metric is there, health checks are not
counted, and ``promtool check metrics`` finds nothing on the live scrape.

The workload runs once per module, on a server with one batch place and one queue place, so a
long stream holds the batch, a short one waits, and the next request finds the queue full. The
outcomes it does not reach (a deadline too short to start, one passing during generation,
draining, the server stopping, a missing token) are counted on an in-process server.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from gpt2_client.proto import common_pb2, generation_pb2_grpc
from gpt2_client.proto import generation_pb2 as pb
from gpt2_service.api import convert
from gpt2_service.metrics import REJECT_REASONS
from gpt2_service.model.weights import LoadedModel

from tests.api_helpers import (
    API_SERVER_CONFIG,
    CountedMetrics,
    first_message,
    greedy,
    long_request,
    rich_error,
    serve,
    stub_for,
)
from tests.process_helpers import Labels, Samples, ServeProcess, parse_exposition, poll, serve_process

UNARY = [(3, 4), (5, 6), (1, 2)]  # (prompt tokens, new tokens), each a Generate
STREAMED = [(2, 5), (4, 3)]  # each a GenerateStream, read to the end
QUEUED = (3, 4)  # a GenerateStream that waits behind the blocker, then finishes
NUM_INVALID = 3  # two Generate, one GenerateStream
COMPLETED = [*UNARY, *STREAMED, QUEUED]
MAX_NEW_TOKENS_LIMIT = 512


def _request(prompt_tokens: int, new_tokens: int, **sampling: float) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt_token_ids=common_pb2.TokenIds(ids=[(7 * i) % 1000 + 1 for i in range(prompt_tokens)]),
        sampling=pb.SamplingParams(**{"temperature": 0.0, **sampling}),  # type: ignore[arg-type]
        stopping=pb.StoppingCriteria(max_new_tokens=new_tokens, ignore_eos=True),
    )


def _invalid(call: Callable[[], object]) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Scrape:
    text: str
    samples: Samples

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def series(self, name: str) -> dict[Labels, float]:
        return {labels: value for (sample, labels), value in self.samples.items() if sample == name}


def _workload(server: ServeProcess) -> None:
    assert server.channel is not None
    stub = generation_pb2_grpc.TextGenerationStub(server.channel)
    for prompt_tokens, new_tokens in UNARY:
        assert stub.Generate(_request(prompt_tokens, new_tokens), timeout=30).usage.completion_tokens == new_tokens
    for prompt_tokens, new_tokens in STREAMED:
        assert list(stub.GenerateStream(_request(prompt_tokens, new_tokens), timeout=30))[-1].finish_reason == pb.LENGTH

    _invalid(lambda: stub.Generate(_request(1, 1, temperature=-1.0), timeout=30))
    _invalid(lambda: stub.Generate(_request(1, MAX_NEW_TOKENS_LIMIT + 1), timeout=30))
    _invalid(lambda: next(stub.GenerateStream(_request(1, 1, top_p=2.0), timeout=30)))

    blocker = stub.GenerateStream(_request(2, MAX_NEW_TOKENS_LIMIT))  # holds the batch place until cancelled
    next(blocker)
    queued = stub.GenerateStream(_request(*QUEUED), timeout=60)  # holds the only queue place
    poll(lambda: server.samples()[("gpt2_sequences_waiting", frozenset())] == 1, what="one waiting sequence")
    with pytest.raises(grpc.RpcError) as full:
        stub.Generate(_request(1, 1), timeout=30)
    assert full.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    blocker.cancel()
    assert list(queued)[-1].finish_reason == pb.LENGTH
    stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)


NUM_RPCS = len(UNARY) + len(STREAMED) + NUM_INVALID + 1 + 1 + 1 + 1  # + blocker, queued, full, GetModelInfo


def _settled(samples: Samples) -> bool:
    """Every RPC accounted for (a call's counters move when it has ended) and the engine idle."""
    num_rpcs = sum(value for (name, _), value in samples.items() if name == "gpt2_requests_total")
    return (
        num_rpcs == NUM_RPCS
        and samples[("gpt2_sequences_running", frozenset())] == 0
        and samples[("gpt2_sequences_waiting", frozenset())] == 0
    )


@pytest.fixture(scope="module")
def scrape() -> Iterator[Scrape]:
    flags = ("--max-batch-size", "1", "--max-queue-size", "1", "--max-new-tokens-limit", str(MAX_NEW_TOKENS_LIMIT))
    with serve_process(*flags) as server:
        _workload(server)
        poll(lambda: _settled(server.samples()), what="all RPCs counted and the engine idle")
        text = server.scrape()
    yield Scrape(text, parse_exposition(text))  # (the server is killed: test_api_lifecycle tests SIGTERM)


def test_requests_are_counted_by_rpc_and_final_code(scrape: Scrape) -> None:
    by_rpc_and_code = {
        (dict(labels)["rpc"], dict(labels)["code"]): value
        for labels, value in scrape.series("gpt2_requests_total").items()
    }
    assert by_rpc_and_code == {
        ("Generate", "OK"): len(UNARY),
        ("GenerateStream", "OK"): len(STREAMED) + 1,
        ("Generate", "INVALID_ARGUMENT"): 2,
        ("GenerateStream", "INVALID_ARGUMENT"): 1,
        ("Generate", "RESOURCE_EXHAUSTED"): 1,
        ("GenerateStream", "CANCELLED"): 1,
        ("GetModelInfo", "OK"): 1,
    }  # and no health checks: they are not counted


def test_rejections_and_cancellations_equal_the_workload(scrape: Scrape) -> None:
    assert scrape.value("gpt2_requests_rejected_total", reason="invalid") == NUM_INVALID
    assert scrape.value("gpt2_requests_rejected_total", reason="queue_full") == 1
    assert scrape.value("gpt2_requests_rejected_total", reason="deadline") == 0
    assert scrape.value("gpt2_requests_rejected_total", reason="unauthenticated") == 0
    assert scrape.value("gpt2_requests_cancelled_total") == 1


def test_every_completed_generation_is_in_the_histograms(scrape: Scrape) -> None:
    assert scrape.value("gpt2_requests_finished_total", reason="length") == len(COMPLETED)
    assert scrape.series("gpt2_requests_failed_total") == {}
    for name in (
        "gpt2_request_queue_time_seconds",
        "gpt2_time_to_first_token_seconds",
        "gpt2_e2e_request_latency_seconds",
        "gpt2_request_prompt_tokens",
        "gpt2_request_generation_tokens",
    ):
        assert scrape.value(f"{name}_count") == len(COMPLETED), name
    assert scrape.value("gpt2_request_prompt_tokens_sum") == sum(p for p, _ in COMPLETED)
    assert scrape.value("gpt2_request_generation_tokens_sum") == sum(n for _, n in COMPLETED)
    assert scrape.value("gpt2_time_per_output_token_seconds_count") == sum(1 for _, n in COMPLETED if n > 1)
    # the cancelled blocker's tokens count as generated too
    assert scrape.value("gpt2_generation_tokens_total") > sum(n for _, n in COMPLETED)


def test_one_batch_place_means_every_decode_step_has_one_sequence(scrape: Scrape) -> None:
    steps = scrape.value("gpt2_step_batch_size_count")
    assert steps > 0
    assert scrape.value("gpt2_step_batch_size_bucket", le="1.0") == steps
    assert scrape.value("gpt2_step_duration_seconds_count", phase="decode") == steps


def test_gauges_return_to_idle(scrape: Scrape) -> None:
    assert scrape.value("gpt2_sequences_running") == 0
    assert scrape.value("gpt2_sequences_waiting") == 0
    assert scrape.value("gpt2_kv_cache_usage_ratio") == 0
    assert scrape.value("gpt2_kv_cache_used_bytes") == 0
    assert scrape.value("gpt2_kv_cache_slots_free") == scrape.value("gpt2_kv_cache_slots") == 1


def test_model_info_names_the_served_model(scrape: Scrape) -> None:
    [labels] = scrape.series("gpt2_model_info")
    info = dict(labels)
    assert info.pop("version")
    assert info == {
        "name": "random:tiny",
        "source": "random (seed 0)",
        "random_weights": "true",
        "dtype": "float32",
        "weights": "float32",
        "batch_invariant": "true",
        "device": "cpu",
    }


def test_promtool_check_metrics_is_clean_on_the_live_scrape(scrape: Scrape) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found (Debian package 'prometheus'; .ci/run installs it)")
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=scrape.text.encode(), capture_output=True, timeout=60
    )
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, b"", b"")


# -- outcomes the process workload does not reach, on an in-process server ------------------------


async def _counted(metrics: CountedMetrics, rpc: str, code: str) -> Samples:
    """The metrics, once the call ``(rpc, code)`` has been counted (it is when the call ends)."""
    key = ("gpt2_requests_total", frozenset({"rpc": rpc, "code": code}.items()))
    await metrics.rpcs.wait_for(lambda: parse_exposition(metrics.exposition().decode()).get(key) == 1)
    return parse_exposition(metrics.exposition().decode())


def _rejected(samples: Samples) -> dict[str, float]:
    return {
        dict(labels)["reason"]: v for (name, labels), v in samples.items() if name == "gpt2_requests_rejected_total"
    }


async def test_too_little_time_to_start_is_a_deadline_rejection(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(convert, "MIN_TIME_REMAINING_SECONDS", 3600.0)  # any deadline is too short
    metrics = CountedMetrics()
    async with serve(tiny, metrics=metrics) as served, stub_for(served) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(greedy(), timeout=30)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        samples = await _counted(metrics, "Generate", "DEADLINE_EXCEEDED")
    assert _rejected(samples) == dict.fromkeys(REJECT_REASONS, 0) | {"deadline": 1}


async def test_a_deadline_passing_during_generation_is_deadline_exceeded_not_a_rejection(tiny: LoadedModel) -> None:
    metrics = CountedMetrics()
    async with serve(tiny, metrics=metrics) as served, stub_for(served) as stub:
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Generate(long_request(), timeout=0.3)
        samples = await _counted(metrics, "Generate", "DEADLINE_EXCEEDED")
    assert _rejected(samples)["deadline"] == 0
    assert samples[("gpt2_requests_cancelled_total", frozenset())] == 0


async def test_calls_refused_while_draining_count_as_unavailable(tiny: LoadedModel) -> None:
    metrics = CountedMetrics()
    async with serve(tiny, metrics=metrics) as served, stub_for(served) as stub:
        served.server.gate.close()
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GenerateStream(greedy()).read()
        samples = await _counted(metrics, "GenerateStream", "UNAVAILABLE")
    assert sum(_rejected(samples).values()) == 0


async def test_calls_without_an_accepted_token_are_unauthenticated_rejections(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret-token\n")
    config = dataclasses.replace(API_SERVER_CONFIG, auth_token_file=str(tokens))
    metrics = CountedMetrics()
    async with serve(tiny, server_config=config, metrics=metrics) as served, stub_for(served) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(greedy())
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        samples = await _counted(metrics, "Generate", "UNAUTHENTICATED")
    assert _rejected(samples)["unauthenticated"] == 1


async def test_calls_cut_short_by_the_server_stopping_count_as_unavailable(tiny: LoadedModel) -> None:
    metrics = CountedMetrics()
    async with serve(tiny, metrics=metrics) as served, stub_for(served) as stub:
        call = stub.GenerateStream(long_request())
        await first_message(call)
        await served.server.drain(grace_period=0.05)  # too short for it: the server cancels it
        samples = await _counted(metrics, "GenerateStream", "UNAVAILABLE")
    assert samples[("gpt2_requests_cancelled_total", frozenset())] == 0


async def test_a_stream_cut_at_the_end_of_the_grace_period_gets_the_draining_reason(tiny: LoadedModel) -> None:
    async with serve(tiny) as served, stub_for(served) as stub:
        call = stub.GenerateStream(long_request())
        await first_message(call)
        await served.server.drain(grace_period=0.05)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while await call.read() is not grpc.aio.EOF:
                pass
    error = rich_error(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "DRAINING")
