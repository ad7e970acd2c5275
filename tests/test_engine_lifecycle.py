"""Cancellation, the bounded queue, deadlines and failures: nothing is lost or leaked."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time

import pytest
from gpt2_service.config import EngineConfig
from gpt2_service.engine.frontend import Engine
from gpt2_service.errors import DeadlineExceededError, EngineOverloadedError, EngineUnavailableError
from gpt2_service.model.weights import LoadedModel

from tests.engine_helpers import WAIT_S, request, run


async def test_100_requests_with_random_cancels_leave_every_slot_free(tiny: LoadedModel) -> None:
    engine = Engine(tiny, EngineConfig(max_batch_size=8, max_queue_size=100, max_queued_per_tenant=100))
    await engine.start()
    try:
        await _submit_100_and_cancel_30(engine)
    finally:
        await engine.shutdown()


async def _submit_100_and_cancel_30(engine: Engine) -> None:
    rng = random.Random(0)
    lengths = {i: rng.randint(1, 12) for i in range(100)}

    async def consume(i: int) -> int:
        _, finished = await run(engine, request([i + 1, i + 2], max_new_tokens=lengths[i], temperature=0.0))
        return finished.usage.completion_tokens

    async def steps_later(count: int) -> None:
        """Once the engine has made ``count`` more steps, or has run and finished everything."""
        target = engine.stats.num_steps + count
        await engine.wait_for(
            lambda: engine.stats.num_steps >= target or (engine.stats.num_steps > 0 and engine.num_in_flight == 0),
            WAIT_S,
        )

    tasks = {i: asyncio.ensure_future(consume(i)) for i in range(100)}
    cancelled = set(rng.sample(range(100), 30))
    for n, i in enumerate(sorted(cancelled)):
        if n % 3:  # the others at once: some before they are even submitted
            await steps_later(2)
        tasks[i].cancel()
    results = await asyncio.gather(*tasks.values(), return_exceptions=True)
    for i, result in zip(tasks, results, strict=True):
        if i in cancelled and isinstance(result, asyncio.CancelledError):
            continue
        assert result == lengths[i]
    await engine.wait_for(lambda: engine.stats.kv_cache_slots_used == 0 and engine.stats.num_running == 0, WAIT_S)
    assert engine.stats.kv_cache_slots_free == engine.stats.kv_cache_slots
    assert engine.num_in_flight == 0
    assert engine.stats.num_waiting == 0


async def test_closing_a_stream_aborts_its_request_and_frees_the_slot(engine: Engine) -> None:
    stream = await engine.submit(request([1, 2, 3], max_new_tokens=500, temperature=0.0))
    await anext(stream)
    assert engine.stats.kv_cache_slots_used == 1
    stream.close()
    await engine.wait_for(lambda: engine.stats.kv_cache_slots_used == 0, WAIT_S)
    assert engine.stats.num_aborted == 1


async def test_a_full_queue_raises_overloaded_at_once_without_tokenizing(tiny: LoadedModel) -> None:
    engine = Engine(tiny, EngineConfig(max_batch_size=1, max_queue_size=2))
    await engine.start()
    calls: list[str] = []
    original = tiny.tokenizer.encode
    try:
        streams = [await engine.submit(request([1], max_new_tokens=400))]
        await engine.wait_for(lambda: engine.stats.num_running == 1, WAIT_S)
        streams += [await engine.submit(request([1], max_new_tokens=400)) for _ in range(2)]  # queue: 2/2
        tiny.tokenizer.encode = lambda text: calls.append(text) or original(text)  # type: ignore[method-assign]
        started = time.monotonic()
        with pytest.raises(EngineOverloadedError):
            await engine.submit(request(prompt="this is never tokenized"))
        assert time.monotonic() - started < 0.05
        assert calls == []
        for s in streams:
            s.close()
    finally:
        tiny.tokenizer.encode = original  # type: ignore[method-assign]
        await engine.shutdown()


async def test_an_expired_deadline_fails_the_request_and_frees_its_slot(engine: Engine) -> None:
    req = dataclasses.replace(request([1, 2], max_new_tokens=1000), deadline=time.monotonic() + 0.2)
    with pytest.raises(DeadlineExceededError):
        await run(engine, req)
    await engine.wait_for(lambda: engine.stats.kv_cache_slots_used == 0, WAIT_S)


async def test_a_request_whose_deadline_passed_while_waiting_is_never_admitted(engine: Engine) -> None:
    req = dataclasses.replace(request([1, 2], max_new_tokens=5), deadline=time.monotonic() - 1)
    with pytest.raises(DeadlineExceededError):
        await run(engine, req)
    assert engine.stats.num_steps == 0 or engine.stats.kv_cache_slots_used == 0


async def test_a_failing_forward_pass_fails_its_requests_and_the_engine_goes_on(engine: Engine) -> None:
    original = engine.runner.execute

    def broken(plan):  # type: ignore[no-untyped-def]
        engine.runner.execute = original  # type: ignore[method-assign]
        raise RuntimeError("simulated fault")

    engine.runner.execute = broken  # type: ignore[method-assign]
    with pytest.raises(Exception, match="internal error"):
        await run(engine, request([1, 2], max_new_tokens=5))
    assert engine.stats.kv_cache_slots_used == 0
    _, finished = await run(engine, request([1, 2], max_new_tokens=5))
    assert finished.usage.completion_tokens == 5


async def test_a_draining_engine_refuses_new_requests(engine: Engine) -> None:
    engine.stop_accepting()
    with pytest.raises(EngineUnavailableError):
        await engine.submit(request([1]))


async def test_wait_for_wakes_after_the_steps_that_make_it_true_and_times_out_otherwise(engine: Engine) -> None:
    stream = await engine.submit(request([1, 2, 3], max_new_tokens=500, temperature=0.0))
    target = engine.stats.num_steps + 3
    await engine.wait_for(lambda: engine.stats.num_steps >= target, WAIT_S)
    stream.close()
    await engine.wait_for(lambda: engine.stats.kv_cache_slots_used == 0 and engine.num_in_flight == 0, WAIT_S)
    with pytest.raises(TimeoutError):
        await engine.wait_for(lambda: engine.stats.num_steps > target + 10_000, timeout=0.05)


async def test_shutdown_gives_the_kv_cache_memory_back_at_once(tiny: LoadedModel) -> None:
    """A stopped engine frees its KV-cache without waiting for the garbage collector to break
    the reference cycles it is part of (a benchmark that starts an engine per run once grew by
    the cache's size with every run until it ran out of memory)."""
    engine = Engine(tiny, EngineConfig(max_batch_size=4, context_window=64))
    await engine.start()
    await run(engine, request([1, 2, 3], max_new_tokens=4))
    assert engine.cache.nbytes == engine.stats.kv_cache_bytes > 0
    await engine.shutdown()
    assert engine.cache.nbytes == 0
    with pytest.raises(EngineUnavailableError):
        await engine.submit(request([1]))
