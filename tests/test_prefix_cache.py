"""Automatic prefix reuse (issue 14, part 3): the index of prompt blocks, and the engine reusing
them with results bitwise those without reuse (deterministic mode), within 1e-5 otherwise."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from gpt2_client.proto import common_pb2
from gpt2_client.proto import generation_pb2 as pb
from gpt2_service.config import EngineConfig
from gpt2_service.core.prefix_cache import PrefixCache
from gpt2_service.core.request import GenerationRequest
from gpt2_service.core.sequence import GenerationOutput
from gpt2_service.engine.frontend import Engine
from gpt2_service.model.weights import LoadedModel

from tests.api_helpers import API_ENGINE_CONFIG, serve, stub_for, wait_for_slots_free
from tests.engine_helpers import request, run

CONFIG = EngineConfig(model="random:tiny", max_batch_size=8, max_queue_size=64, max_prefill_tokens=64)
SHARED = [(i * 7919) % 5000 + 10 for i in range(260)]


def prompt(tail: int, length: int = 40) -> list[int]:
    return SHARED + [(tail * 131 + j * 17) % 4000 + 20 for j in range(length)]


def sampled(ids: list[int], seed: int = 5, tenant: str = "") -> GenerationRequest:
    req = request(ids, max_new_tokens=10, temperature=0.8, top_k=40, seed=seed, top_logprobs=3)
    return dataclasses.replace(req, tenant=tenant)


@asynccontextmanager
async def started(tiny: LoadedModel, **changes: object) -> AsyncIterator[Engine]:
    engine = Engine(tiny, dataclasses.replace(CONFIG, **changes))  # type: ignore[arg-type]
    await engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown()


def numbers(outputs: list[GenerationOutput]) -> list[tuple[int, float, tuple[tuple[int, float], ...]]]:
    return [(t.id, t.logprob, tuple((a.id, a.logprob) for a in t.top_logprobs)) for o in outputs for t in o.tokens]


# -- the index ---------------------------------------------------------------------------------


def test_a_prefix_matches_the_slots_that_hold_all_its_blocks() -> None:
    cache = PrefixCache(num_slots=3, block_tokens=4)
    a, b = cache.blocks(list(range(10))), cache.blocks([*range(8), 99, 99, 99, 99])
    assert a == [(0, 1, 2, 3), (4, 5, 6, 7)]  # the partial last block is never reused
    cache.extend(0, a, 2, "")
    cache.extend(1, b, 1, "")
    assert cache.match(b, "") == cache.match(a, "")  # both: two blocks, in slot 0 only
    assert cache.match(a, "").num_blocks == 2 and cache.match(a, "").slots == {0}
    cache.extend(1, b, 3, "")
    assert cache.match(b, "").num_blocks == 3 and cache.match(b, "").slots == {1}
    assert cache.match(a[:1], "").slots == {0, 1}
    cache.truncate(0, 1)
    assert cache.match(a, "").num_blocks == 2 and cache.match(a, "").slots == {1}
    cache.copy(1, 2, 2)
    assert cache.match(b, "").slots == {1} and cache.match(a, "").slots == {1, 2}
    cache.truncate(1, 0)
    cache.truncate(2, 0)
    assert cache.match(a, "").slots == {0} and cache.occupancy == 1
    cache.truncate(0, 0)
    assert cache.match(a, "").num_blocks == 0 and not cache._ids  # nothing left behind


def test_tenants_share_prefixes_only_across_tenants() -> None:
    shared, apart = PrefixCache(2, 4, across_tenants=True), PrefixCache(2, 4, across_tenants=False)
    blocks = shared.blocks(list(range(8)))
    for cache in (shared, apart):
        cache.extend(0, blocks, 2, "alice")
    assert shared.match(blocks, "bob").num_blocks == 2
    assert apart.match(blocks, "bob").num_blocks == 0 and apart.match(blocks, "alice").num_blocks == 2


def test_free_slots_are_given_empty_ones_first_then_least_recently_used() -> None:
    cache = PrefixCache(4, 2)
    for slot in (2, 0, 3):
        cache.extend(slot, [(1, slot)], 1, "")
    assert cache.choose_free([0, 1, 2, 3]) == 1
    cache.touch(3)
    cache.touch(0)
    cache.touch(2)
    assert cache.choose_free([0, 2, 3]) == 3


# -- the engine ----------------------------------------------------------------------------------


async def test_reuse_is_bitwise_the_same_in_deterministic_mode(tiny: LoadedModel) -> None:
    async with started(tiny) as cached, started(tiny, prefix_cache=False) as plain:
        assert cached.batch_invariant
        await run(cached, sampled(prompt(1)))
        outputs, finished = await run(cached, sampled(prompt(2)))
        expected, alone = await run(plain, sampled(prompt(2)))
        assert finished.usage.cached_prompt_tokens == 256  # whole 64-token chunks, not the last token
        assert alone.usage.cached_prompt_tokens == 0
        assert numbers(outputs) == numbers(expected)
        stats = cached.stats
        assert (stats.prefix_lookups, stats.prefix_hits, stats.prefix_reused_tokens) == (2, 1, 256)
        # the second took the first's free slot, keeping its 16 shared blocks: 18 blocks held
        assert stats.prefix_cached_tokens == 300 // 16 * 16
        assert plain.stats.prefix_lookups == 0


async def test_reuse_is_within_1e_5_without_batch_invariance(tiny: LoadedModel) -> None:
    async with (
        started(tiny, batch_invariant=False) as cached,
        started(tiny, batch_invariant=False, prefix_cache=False) as plain,
    ):
        await run(cached, sampled(prompt(1)))
        outputs, finished = await run(cached, sampled(prompt(2)))
        expected, _ = await run(plain, sampled(prompt(2)))
    assert finished.usage.cached_prompt_tokens == 256  # 16 whole blocks of 16
    got, want = numbers(outputs), numbers(expected)
    assert [t for t, _, _ in got] == [t for t, _, _ in want]
    for (_, lp, top), (_, lp_want, top_want) in zip(got, want, strict=True):
        assert lp == pytest.approx(lp_want, abs=1e-5)
        assert [a for a, _ in top] == [a for a, _ in top_want]


async def test_concurrent_requests_wait_for_the_prefix_one_of_them_computes(tiny: LoadedModel) -> None:
    async with started(tiny) as cached, started(tiny, prefix_cache=False) as plain:
        results = await asyncio.gather(*(run(cached, sampled(prompt(i), seed=i)) for i in range(6)))
        reused = sorted(finished.usage.cached_prompt_tokens for _, finished in results)
        assert reused == [0] + [256] * 5  # the first computed it, the others waited for it
        assert cached.stats.prefix_hits == 5
        for i, (outputs, _) in enumerate(results):
            expected, _ = await run(plain, sampled(prompt(i), seed=i))
            assert numbers(outputs) == numbers(expected)
        await wait_for_slots_free(cached)


async def test_a_shifted_window_leaves_no_stale_prefix(tiny: LoadedModel) -> None:
    ids = SHARED[:100]
    async with (
        started(tiny, context_window=128) as cached,
        started(tiny, context_window=128, prefix_cache=False) as plain,
    ):
        shifting = dataclasses.replace(
            sampled(ids), stopping=dataclasses.replace(sampled(ids).stopping, max_new_tokens=60)
        )
        _, finished = await run(cached, shifting)
        assert finished.usage.context_shifts >= 1
        # the shifted sequence's slot was the only one to hold the prompt: nothing to reuse
        outputs, again = await run(cached, sampled(ids))
        expected, _ = await run(plain, sampled(ids))
    assert again.usage.cached_prompt_tokens == 0
    assert numbers(outputs) == numbers(expected)


async def test_tenants_reuse_each_others_prefix_unless_turned_off(tiny: LoadedModel) -> None:
    async with started(tiny) as shared, started(tiny, prefix_cache_across_tenants=False) as apart:
        for engine in (shared, apart):
            await run(engine, sampled(prompt(1), tenant="alice"))
        _, bob_shared = await run(shared, sampled(prompt(2), tenant="bob"))
        _, bob_apart = await run(apart, sampled(prompt(2), tenant="bob"))
        _, alice_apart = await run(apart, sampled(prompt(2), tenant="alice"))
    assert bob_shared.usage.cached_prompt_tokens == 256
    assert bob_apart.usage.cached_prompt_tokens == 0
    assert alice_apart.usage.cached_prompt_tokens == 256


async def test_usage_reports_cached_prompt_tokens_over_the_api(tiny: LoadedModel) -> None:
    message = pb.GenerateRequest(
        prompt_token_ids=common_pb2.TokenIds(ids=SHARED[:100]),
        sampling=pb.SamplingParams(temperature=0.0),
        stopping=pb.StoppingCriteria(max_new_tokens=3),
    )
    config = dataclasses.replace(API_ENGINE_CONFIG, max_prefill_tokens=32)
    async with serve(tiny, engine_config=config) as served, stub_for(served) as stub:
        first = await stub.Generate(message)
        second = await stub.Generate(message)
        streamed = [m async for m in stub.GenerateStream(message)]
    assert first.usage.cached_prompt_tokens == 0
    assert second.usage.cached_prompt_tokens == 96  # 6 blocks of 16, 3 chunks of 32
    assert streamed[-1].usage.cached_prompt_tokens == 96
    assert second.token_ids == first.token_ids


async def test_results_of_finished_requests_are_unaffected_by_what_reuses_their_slots(tiny: LoadedModel) -> None:
    """Free slots keep their prefixes, least recently used given away first: a third distinct
    prompt in a two-slot engine evicts the older prefix, not the newer."""
    async with started(tiny, max_batch_size=2) as engine:
        other = [(j * 37) % 3000 + 50 for j in range(300)]
        await run(engine, sampled(prompt(1)))
        await run(engine, sampled(other))
        await run(engine, sampled([7] * 300))  # takes the least recently used slot: prompt(1)'s
        _, reused_other = await run(engine, sampled(other[:280] + [9] * 10))
        _, reused_first = await run(engine, sampled(prompt(2)))
    assert reused_other.usage.cached_prompt_tokens == 256
    assert reused_first.usage.cached_prompt_tokens == 0


async def test_random_arrivals_of_shared_prefixes_give_the_results_of_no_reuse(tiny: LoadedModel) -> None:
    """24 requests over 3 prefixes of different lengths, some sharing only part of another's,
    arriving in random bursts into a 4-place batch (so some wait, some preempt nothing, slots get
    reused): every result is bitwise the one without the prefix cache."""
    rng = random.Random(14)
    stems = [SHARED[:200], SHARED[:140] + [11] * 90, [(j * 53) % 2000 + 30 for j in range(150)]]
    prompts = [rng.choice(stems) + [rng.randrange(30, 4000) for _ in range(rng.randrange(1, 40))] for _ in range(24)]
    requests = [sampled(p, seed=i) for i, p in enumerate(prompts)]
    async with started(tiny, max_batch_size=4, max_prefill_tokens=32) as cached:
        pending = []
        for req in requests:
            pending.append(asyncio.ensure_future(run(cached, req)))
            if rng.random() < 0.4:
                await asyncio.sleep(rng.random() * 0.02)
        results = await asyncio.gather(*pending)
        hits = cached.stats.prefix_hits
    async with started(tiny, max_batch_size=4, max_prefill_tokens=32, prefix_cache=False) as plain:
        expected = [await run(plain, req) for req in requests]
    assert hits >= 12
    assert sum(finished.usage.cached_prompt_tokens for _, finished in results) >= 12 * 128
    for (outputs, _), (want, _) in zip(results, expected, strict=True):
        assert numbers(outputs) == numbers(want)
