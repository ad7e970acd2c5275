"""Introspection shares the engine with generation (issue 13, item 4): jobs take at most their
share of the engine thread while generation has work, model RPCs beyond ``max_model_rpcs`` are
refused at once, and a small Generate keeps its pace beside 1024-token Trace calls. The full
measurement against a ``gpt2-serve`` process is bench/contention_introspection.py."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import statistics
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from google.rpc import error_details_pb2
from gpt2_client.proto import generation_pb2_grpc, introspection_pb2_grpc
from gpt2_client.proto import introspection_pb2 as pb
from gpt2_service.config import ServerConfig
from gpt2_service.core.pieces import Pieces, advance
from gpt2_service.core.request import GenerationRequest, SamplingParams, StoppingCriteria
from gpt2_service.engine.frontend import Engine
from gpt2_service.engine.loop import EngineLoop
from gpt2_service.introspection.inspector import TRACE_OPTIONS, Inspector
from gpt2_service.metrics import REJECT_REASONS, Metrics
from gpt2_service.model.weights import LoadedModel
from grpc_status import rpc_status

from tests.api_helpers import API_ENGINE_CONFIG, API_SERVER_CONFIG, Served, greedy, rich_error, serve
from tests.engine_helpers import WAIT_S

JOB_S = 0.02  # what each fake job takes on the engine thread


async def until(condition: Callable[[], bool], what: str) -> None:
    """Await ``condition``, checked every 10 ms, at most WAIT_S (the engine sees nothing to signal:
    it is held by a job, or has no generation work)."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {WAIT_S:.0f}s")
        await asyncio.sleep(0.01)


def _sleeping_jobs(engine: Engine, count: int) -> list[asyncio.Future[tuple[int, float, float]]]:
    """``count`` jobs posted at once, each sleeping JOB_S: (its index, start, end)."""

    def job(index: int) -> tuple[int, float, float]:
        start = time.perf_counter()
        time.sleep(JOB_S)
        return index, start, time.perf_counter()

    return [asyncio.ensure_future(engine.run_exclusive(lambda i=i: job(i))) for i in range(count)]


async def test_jobs_take_at_most_their_share_while_generation_runs(tiny: LoadedModel) -> None:
    engine = Engine(tiny, dataclasses.replace(API_ENGINE_CONFIG, introspection_share=0.25))
    await engine.start()
    try:
        stream = await engine.submit(_long_generation(engine))
        await anext(aiter(stream))  # generating
        runs = await asyncio.wait_for(asyncio.gather(*_sleeping_jobs(engine, 5)), WAIT_S)
        assert engine.scheduler.running, "the stream was generating all along"
        stream.close()
    finally:
        await engine.shutdown()
    assert [index for index, _, _ in runs] == list(range(5)), "jobs run in the order they were posted"
    # after a job of t seconds, at least t * (1 - 0.25) / 0.25 = 3t seconds of steps
    gaps = [start - end_before for (_, _, end_before), (_, start, _) in itertools.pairwise(runs)]
    took = [end - start for _, start, end in runs]
    for gap, job_s in zip(gaps, took, strict=False):
        assert gap >= 3 * job_s * 0.95, f"a job {job_s:.3f}s long was followed by only {gap:.3f}s of steps: {gaps}"


async def test_jobs_run_back_to_back_without_generation(tiny: LoadedModel) -> None:
    engine = Engine(tiny, dataclasses.replace(API_ENGINE_CONFIG, introspection_share=0.1))
    await engine.start()
    try:
        started = time.perf_counter()
        runs = await asyncio.wait_for(asyncio.gather(*_sleeping_jobs(engine, 5)), WAIT_S)
        elapsed = time.perf_counter() - started
    finally:
        await engine.shutdown()
    assert [index for index, _, _ in runs] == list(range(5))
    assert elapsed < 5 * JOB_S + 1.0, f"five idle-engine jobs of {JOB_S}s took {elapsed:.2f}s: they waited"


def _long_generation(engine: Engine) -> GenerationRequest:
    return GenerationRequest(
        request_id="long",
        prompt_token_ids=list(range(1000, 1016)),
        sampling=SamplingParams(temperature=0.0),
        stopping=StoppingCriteria(max_new_tokens=400, ignore_eos=True),
    )


async def test_generation_steps_run_between_the_pieces_of_a_job(tiny: LoadedModel) -> None:
    engine = Engine(tiny, dataclasses.replace(API_ENGINE_CONFIG, introspection_share=1.0))
    await engine.start()

    def counting(pieces: int) -> Pieces[list[int]]:  # the engine's step count at each piece
        seen = []
        for _ in range(pieces):
            seen.append(engine.stats.num_steps)
            yield
        return seen

    try:
        stream = await engine.submit(_long_generation(engine))
        await anext(aiter(stream))
        seen = await asyncio.wait_for(engine.run_pieces(counting(5)), WAIT_S)
        stream.close()
    finally:
        await engine.shutdown()
    assert all(b > a for a, b in itertools.pairwise(seen)), f"no step between two pieces: {seen}"


async def test_a_request_arriving_during_a_job_waits_for_a_piece_not_the_job(tiny: LoadedModel) -> None:
    engine = Engine(tiny, dataclasses.replace(API_ENGINE_CONFIG, introspection_share=0.25))
    await engine.start()
    first_piece = threading.Event()

    def slow(pieces: int) -> Pieces[list[int]]:
        seen = []
        for _ in range(pieces):
            seen.append(engine.stats.num_steps)
            first_piece.set()
            time.sleep(JOB_S)
            yield
        return seen

    try:
        job = asyncio.ensure_future(engine.run_pieces(slow(10)))
        await asyncio.to_thread(first_piece.wait, WAIT_S)
        stream = await engine.submit(_long_generation(engine))  # arrives while piece 0 or 1 runs
        seen = await asyncio.wait_for(job, WAIT_S)
        stream.close()
    finally:
        await engine.shutdown()
    assert seen[3] > seen[0], f"the request took no step until the job's end: {seen}"


async def test_a_failing_piece_fails_its_job_only(tiny: LoadedModel) -> None:
    engine = Engine(tiny, API_ENGINE_CONFIG)
    await engine.start()

    def failing() -> Pieces[int]:
        yield
        raise RuntimeError("piece 2 failed")

    try:
        with pytest.raises(RuntimeError, match="piece 2 failed"):
            await asyncio.wait_for(engine.run_pieces(failing()), WAIT_S)
        assert await asyncio.wait_for(engine.run_exclusive(lambda: 7), WAIT_S) == 7
    finally:
        await engine.shutdown()


async def test_a_trace_in_pieces_is_the_trace_and_times_only_itself(tiny: LoadedModel) -> None:
    inspector = Inspector(tiny)
    whole = inspector.trace(token_ids=list(range(1000, 1064)))
    pieces = inspector.plan_trace(
        None, list(range(1000, 1064)), dataclasses.replace(TRACE_OPTIONS, seed=whole.prediction.seed)
    )()
    away = 0.0
    while (finished := advance(pieces)) is None:
        time.sleep(JOB_S)  # the engine at other work between two pieces
        away += JOB_S
    traced = finished.result
    assert [s.name for s in traced.stages] == [s.name for s in whole.stages]
    assert [(s.output_stats, s.output_shape) for s in traced.stages] == [
        (s.output_stats, s.output_shape) for s in whole.stages
    ]
    assert traced.prediction == whole.prediction
    assert away >= 3 * JOB_S, "the trace has a piece per model stage"
    assert traced.seconds < away, f"{traced.seconds:.3f}s counts the {away:.3f}s spent between pieces"


def test_the_share_must_be_a_fraction(tiny: LoadedModel) -> None:
    for share in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="share"):
            Engine(tiny, dataclasses.replace(API_ENGINE_CONFIG, introspection_share=share))
    assert EngineLoop.__init__.__doc__ and "job_share" in EngineLoop.__init__.__doc__


# -- the model-RPC limit ---------------------------------------------------------------------------


@pytest.fixture
async def one_model_rpc(tiny: LoadedModel) -> AsyncIterator[tuple[Served, Metrics]]:
    metrics = Metrics()
    config = dataclasses.replace(API_SERVER_CONFIG, max_model_rpcs=1)
    async with serve(tiny, server_config=config, metrics=metrics) as served:
        yield served, metrics


async def test_a_model_rpc_beyond_the_limit_is_refused_at_once(one_model_rpc: tuple[Served, Metrics]) -> None:
    served, metrics = one_model_rpc
    release = threading.Event()
    blocker = asyncio.ensure_future(served.engine.run_exclusive(lambda: release.wait(WAIT_S)))
    try:
        async with served.channel() as channel:
            stub = introspection_pb2_grpc.IntrospectionStub(channel)
            slow = stub.PredictNext(pb.PredictNextRequest(text="The cat sat"))  # waits behind the blocker
            await until(lambda: served.server.introspection._model_rpcs == 1, "the first model RPC in flight")
            started = time.perf_counter()
            for call in (
                lambda: stub.Trace(pb.TraceRequest(text="The cat sat")),
                lambda: stub.Embed(pb.EmbedRequest(text="The cat sat")),
                lambda: stub.HiddenStates(pb.HiddenStatesRequest(text="The cat sat")),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call()
                error = rich_error(refused.value)
                assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert error.reason == "TOO_MANY_MODEL_RPCS"
                assert _retry_delay(refused.value) > 0
            assert time.perf_counter() - started < 5.0, "refused at once, not after the model RPC in flight"
            tokens = await stub.Tokenize(pb.TokenizeRequest(text="The cat sat"))  # no model: not limited
            assert [t.text for t in tokens.tokens] == ["The", " cat", " sat"]
            release.set()
            answer = await slow
            assert answer.candidates
            assert (await stub.Trace(pb.TraceRequest(text="The cat sat"))).stages  # the slot is free again
    finally:
        release.set()
        await blocker
    rejected = [
        metrics.registry.get_sample_value("gpt2_requests_rejected_total", {"reason": r}) for r in REJECT_REASONS
    ]
    assert sum(n or 0 for n in rejected) == 3, "the three refusals are counted as rejected"


def _retry_delay(error: grpc.aio.AioRpcError) -> float:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    raise AssertionError("no RetryInfo")


def test_the_limit_must_allow_one(tiny: LoadedModel) -> None:
    from gpt2_service.api.server import GenerationServer

    with pytest.raises(ValueError, match="max_model_rpcs"):
        GenerationServer(ServerConfig(max_model_rpcs=0))


# -- the bound: a small Generate beside 1024-token Trace calls --------------------------------------

BOUND_ENGINE = dataclasses.replace(
    API_ENGINE_CONFIG, context_window=1024, max_prefill_tokens=256, num_threads=1, introspection_share=0.25
)
SAMPLES = 15


async def _generate_p50(served: Served, samples: int) -> float:
    async with served.channel() as channel:
        stub = generation_pb2_grpc.TextGenerationStub(channel)
        await stub.Generate(greedy(max_new_tokens=8))
        latencies = []
        for _ in range(samples):
            started = time.perf_counter()
            await stub.Generate(greedy(max_new_tokens=8))
            latencies.append(time.perf_counter() - started)
    return statistics.median(latencies)


TRACE_CLIENTS = """
import random, sys, threading
import grpc
from gpt2_client.proto import common_pb2, introspection_pb2_grpc
from gpt2_client.proto import introspection_pb2 as pb

target, stop, counts, lock = sys.argv[1], threading.Event(), [0, 0], threading.Lock()

def loop(seed):  # Trace on 1024 tokens, again and again (a refused call retries after 50 ms)
    rng = random.Random(seed)
    request = pb.TraceRequest(token_ids=common_pb2.TokenIds(ids=[rng.randrange(50000) for _ in range(1024)]))
    with grpc.insecure_channel(target) as channel:
        stub = introspection_pb2_grpc.IntrospectionStub(channel)
        while not stop.is_set():
            try:
                stub.Trace(request, timeout=60)
                with lock:
                    counts[0] += 1
                    if counts[0] == 2:
                        print("running", flush=True)
            except grpc.RpcError as exc:
                if exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                with lock:
                    counts[1] += 1
                stop.wait(0.05)

threads = [threading.Thread(target=loop, args=(i,)) for i in range(4)]
for t in threads:
    t.start()
sys.stdin.read()  # until the test closes it
stop.set()
for t in threads:
    t.join()
print(counts[0], counts[1], flush=True)
"""


async def test_a_small_generate_keeps_its_pace_beside_four_1024_token_traces(tiny: LoadedModel) -> None:
    """Idle and loaded p50 in the same test, on the same server; the four Trace clients run in a
    process of their own, as callers do (the Generate client shares the server's event loop).

    The issue's bound is 2x. Here the ratio measured 1.53-1.60x over runs (2.2-2.6x while a
    model RPC was one job, not a piece per stage; 12-18x before the time share:
    bench/contention_introspection.py); 10 ms of slack absorbs a noisy machine's jitter."""
    async with serve(tiny, engine_config=BOUND_ENGINE) as served:
        idle = await _generate_p50(served, SAMPLES)
        clients = await asyncio.create_subprocess_exec(
            sys.executable, "-c", TRACE_CLIENTS, served.target,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert clients.stdin is not None and clients.stdout is not None
        try:
            running = await asyncio.wait_for(clients.stdout.readline(), 60)
            assert running == b"running\n", running  # the Traces are answered
            loaded = await _generate_p50(served, SAMPLES)
        finally:
            clients.stdin.close()
            out, _ = await asyncio.wait_for(clients.communicate(), 60)
    answered = int(out.split()[0])
    assert answered >= 4, f"only {answered} Trace calls answered"
    assert loaded <= 2 * idle + 0.01, f"p50 of a small Generate: {idle:.4f}s idle, {loaded:.4f}s beside Traces"
