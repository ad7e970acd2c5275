"""Continuous batching: requests share steps, join and leave a running batch, and a request's
result does not depend on what else is in its batch (bit for bit: test_batch_invariance.py)."""

from __future__ import annotations

import asyncio

import pytest
from gpt2_service.config import EngineConfig
from gpt2_service.engine.frontend import Engine
from gpt2_service.model.weights import LoadedModel

from tests.engine_helpers import WAIT_S, request, run

MIXED = [
    dict(temperature=0.0),
    dict(temperature=0.9, seed=1),
    dict(temperature=1.3, top_k=20, seed=2),
    dict(temperature=0.7, top_p=0.8, seed=3),
    dict(temperature=1.0, min_p=0.05, seed=4),
    dict(temperature=1.0, typical_p=0.9, seed=5),
    dict(temperature=0.8, repetition_penalty=1.3, seed=6),
    dict(temperature=0.8, presence_penalty=0.5, frequency_penalty=0.5, seed=7),
]


async def test_a_batched_request_matches_its_run_alone_up_to_rounding(engine: Engine) -> None:
    """The default (fast) kernels choose their reduction order by row count, so a row's numbers
    in a batch can differ from alone in the last bits, and a draw that lands that close to a CDF
    boundary can go the other way (batch-invariant mode removes this: test_batch_invariance.py).
    What holds: the greedy request's tokens are the same, and every request's log-probabilities
    agree to 1e-5 for as long as its tokens do."""
    prompts = [list(range(100 * i + 1, 100 * i + 1 + 3 + 11 * i)) for i in range(8)]
    reqs = [request(p, max_new_tokens=20, request_id=str(i), **MIXED[i]) for i, p in enumerate(prompts)]
    alone = [await run(engine, r) for r in reqs]
    together = await asyncio.gather(*(run(engine, r) for r in reqs))
    assert engine.stats.max_decode_batch_size == 8
    assert together[0][1].token_ids == alone[0][1].token_ids  # MIXED[0] is greedy
    for (a_out, _), (t_out, _) in zip(alone, together, strict=True):
        a_tokens = [t for o in a_out for t in o.tokens]
        t_tokens = [t for o in t_out for t in o.tokens]
        for a, t in zip(a_tokens, t_tokens, strict=True):
            if a.id != t.id:
                break
            assert t.logprob == pytest.approx(a.logprob, abs=1e-5)


async def test_a_reused_slot_leaks_nothing(tiny: LoadedModel) -> None:
    engine = Engine(tiny, EngineConfig(max_batch_size=1))
    await engine.start()
    try:
        probe = request(list(range(10, 20)), max_new_tokens=8, temperature=0.0)
        first = (await run(engine, probe))[1].token_ids
        await run(engine, request(list(range(5000, 5300)), max_new_tokens=30, temperature=1.0, seed=3))
        assert (await run(engine, probe))[1].token_ids == first
    finally:
        await engine.shutdown()


async def test_staggered_arrivals_join_the_running_batch(engine: Engine) -> None:
    first = asyncio.ensure_future(run(engine, request([1, 2, 3], max_new_tokens=200, temperature=0.0)))
    await engine.wait_for(lambda: engine.stats.num_decode_steps >= 3, WAIT_S)
    steps_before = engine.stats.num_decode_steps
    second = await run(engine, request([4, 5, 6], max_new_tokens=5, temperature=0.0))
    assert not first.done(), "the newcomer must not wait for the running request to finish"
    assert second[1].usage.completion_tokens == 5
    assert engine.stats.num_shared_decode_steps >= 4
    assert engine.stats.num_decode_steps - steps_before < 20
    await first


async def test_an_early_finisher_frees_its_slot_for_a_waiting_request(tiny: LoadedModel) -> None:
    engine = Engine(tiny, EngineConfig(max_batch_size=2))
    await engine.start()
    try:
        finished_order: list[str] = []

        async def go(name: str, n: int) -> None:
            await run(engine, request([7, 8, 9], max_new_tokens=n, request_id=name, temperature=0.0))
            finished_order.append(name)

        long = asyncio.ensure_future(go("long", 150))
        short = asyncio.ensure_future(go("short", 3))
        await engine.wait_for(lambda: engine.stats.num_running == 2, WAIT_S)
        waiting = asyncio.ensure_future(go("waiting", 3))
        await asyncio.gather(long, short, waiting)
        assert finished_order == ["short", "waiting", "long"]
        assert engine.stats.kv_cache_slots_used == 0
    finally:
        await engine.shutdown()


async def test_seed_reported_for_an_unseeded_request_reproduces_its_output(engine: Engine) -> None:
    _, first = await run(engine, request([11, 12, 13], max_new_tokens=15, temperature=1.0))
    _, again = await run(engine, request([11, 12, 13], max_new_tokens=15, temperature=1.0, seed=first.seed))
    assert again.token_ids == first.token_ids


async def test_same_seed_same_tokens_and_different_seed_different_tokens(engine: Engine) -> None:
    a = (await run(engine, request([1, 2], max_new_tokens=30, temperature=1.0, seed=42)))[1].token_ids
    b = (await run(engine, request([1, 2], max_new_tokens=30, temperature=1.0, seed=42)))[1].token_ids
    c = (await run(engine, request([1, 2], max_new_tokens=30, temperature=1.0, seed=43)))[1].token_ids
    assert a == b
    assert a != c
