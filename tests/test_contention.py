"""The engine under contention: priorities and preemption, tenants, one call's share, slow readers,
and deadline-aware admission, on a real tiny engine (the policy alone: test_fairness.py)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
from gpt2_service.config import EngineConfig
from gpt2_service.core.request import GenerationRequest, Priority, SamplingParams, StoppingCriteria
from gpt2_service.core.sequence import Finished, GenerationOutput
from gpt2_service.engine.frontend import Engine, GenerationStream
from gpt2_service.errors import EngineOverloadedError, StreamStalledError
from gpt2_service.model.weights import LoadedModel

from tests.engine_helpers import WAIT_S

CONFIG = EngineConfig(model="random:tiny", max_batch_size=2, max_prefill_tokens=16)


def req(
    rid: str,
    prompt: tuple[int, ...] = (1, 2, 3, 4, 5),
    max_new: int = 40,
    priority: Priority = Priority.DEFAULT,
    tenant: str = "",
    call_id: str = "",
    seed: int = 7,
    deadline: float | None = None,
) -> GenerationRequest:
    return GenerationRequest(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling=SamplingParams(temperature=0.9, top_k=50, seed=seed),
        stopping=StoppingCriteria(max_new_tokens=max_new, ignore_eos=True),
        top_logprobs=3,
        priority=priority,
        tenant=tenant,
        call_id=call_id,
        deadline=deadline,
    )


def tokens_of(outputs: list[GenerationOutput]) -> list[tuple[int, float, tuple[tuple[int, float], ...]]]:
    return [(t.id, t.logprob, tuple((a.id, a.logprob) for a in t.top_logprobs)) for o in outputs for t in o.tokens]


async def started(loaded: LoadedModel, config: EngineConfig = CONFIG) -> Engine:
    engine = Engine(loaded, config)
    await engine.start()
    return engine


async def until_tokens(engine: Engine, outputs: list[GenerationOutput], n: int) -> None:
    await engine.wait_for(lambda: sum(len(o.tokens) for o in outputs) >= n, WAIT_S)


async def read_into(stream: GenerationStream, outputs: list[GenerationOutput]) -> Finished:
    async for out in stream:
        outputs.append(out)
    assert outputs[-1].finished is not None
    return outputs[-1].finished


async def test_a_preempted_generation_gives_bitwise_the_same_tokens(tiny: LoadedModel) -> None:
    engine = await started(tiny)
    try:
        alone_outputs: list[GenerationOutput] = []
        await read_into(await engine.submit(req("batch", priority=Priority.BATCH)), alone_outputs)

        outputs: list[GenerationOutput] = []
        task = asyncio.ensure_future(read_into(await engine.submit(req("batch", priority=Priority.BATCH)), outputs))
        other = asyncio.ensure_future(read_into(await engine.submit(req("other", max_new=60)), []))
        await until_tokens(engine, outputs, 10)
        # the batch is full (2): an interactive request takes the BATCH request's place
        urgent = await engine.submit(req("urgent", priority=Priority.INTERACTIVE, max_new=20, seed=1))
        await urgent.collect()
        await asyncio.gather(task, other)
        assert engine.stats.num_preempted.get("priority") == 1
    finally:
        await engine.shutdown()
    assert tokens_of(outputs) == tokens_of(alone_outputs)
    assert "".join(o.text for o in outputs) == "".join(o.text for o in alone_outputs)


async def first_token_steps(engine: Engine, request: GenerationRequest) -> int:
    """Engine steps from submitting ``request`` to its first token."""
    before = engine.stats.num_steps
    stream = await engine.submit(request)
    await anext(stream)
    steps = engine.stats.num_steps - before
    stream.close()
    return steps


@pytest.mark.parametrize("preemption", [True, False])
async def test_a_tenants_first_token_is_not_stuck_behind_another_tenants_flood(
    tiny: LoadedModel, preemption: bool
) -> None:
    config = replace(CONFIG, max_batch_size=4, preemption=preemption)
    engine = await started(tiny, config)
    try:
        flood = [await engine.submit(req(f"f{i}", max_new=300, tenant="flood")) for i in range(12)]
        await engine.wait_for(lambda: engine.stats.num_running == 4, WAIT_S)
        steps = await first_token_steps(engine, req("probe", max_new=5, tenant="probe"))
        for stream in flood:
            stream.close()
    finally:
        await engine.shutdown()
    if preemption:
        # the bound: admitted at the next step (preempting the flood's newest), then its 5-token
        # prompt fits one prefill chunk: first token within 2 steps (3 with a step in flight)
        assert steps <= 3
        assert engine.stats.num_preempted.get("fairness", 0) >= 1
    else:
        assert steps > 50  # it waits for a flood sequence to finish


async def test_one_call_holds_at_most_its_share_while_another_waits(tiny: LoadedModel) -> None:
    config = replace(CONFIG, max_batch_size=4, max_call_share=0.5)
    engine = await started(tiny, config)
    try:
        big = [await engine.submit(req(f"b{i}", max_new=300, call_id="big")) for i in range(8)]
        await engine.wait_for(lambda: engine.stats.num_running == 4, WAIT_S)  # alone, it fills the batch
        steps = await first_token_steps(engine, req("small", max_new=5))
        assert steps <= 3
        assert engine.stats.num_preempted.get("call_share", 0) == 1  # 4 -> 3 places; 2 would be its share
        for stream in big:
            stream.close()
    finally:
        await engine.shutdown()


async def test_a_lagging_reader_pauses_its_sequence_and_resumes_it_bitwise(tiny: LoadedModel) -> None:
    config = replace(CONFIG, stream_buffer_tokens=8, stream_idle_timeout=0)
    engine = await started(tiny, config)
    try:
        expected: list[GenerationOutput] = []
        await read_into(await engine.submit(req("r", max_new=60)), expected)

        stream = await engine.submit(req("r", max_new=60), backpressure=True)
        await engine.wait_for(lambda: engine.stats.num_paused == 1, WAIT_S)
        # other work runs while it is paused: it generates no more
        held = stream._queue.qsize()
        await (await engine.submit(req("other", max_new=20))).collect()
        assert stream._queue.qsize() == held and 8 < held <= 10
        outputs: list[GenerationOutput] = []
        await read_into(stream, outputs)  # reading resumes it
        assert engine.stats.num_paused == 0
    finally:
        await engine.shutdown()
    assert tokens_of(outputs) == tokens_of(expected)


async def test_a_stream_unread_past_the_idle_limit_is_ended_and_its_slot_freed(tiny: LoadedModel) -> None:
    config = replace(CONFIG, stream_buffer_tokens=4, stream_idle_timeout=0.3)
    engine = await started(tiny, config)
    try:
        stream = await engine.submit(req("r", max_new=500), backpressure=True)
        await engine.wait_for(lambda: engine.stats.num_stalled == 1, WAIT_S)
        with pytest.raises(StreamStalledError, match=r"not read for 0\.3 s"):
            await anext(stream)
        await engine.wait_for(lambda: engine.stats.kv_cache_slots_used == 0, WAIT_S)
        assert engine.num_in_flight == 0
    finally:
        await engine.shutdown()


async def test_a_deadline_the_engine_cannot_meet_is_refused_at_once_with_a_retry_delay(tiny: LoadedModel) -> None:
    config = replace(CONFIG, max_batch_size=1, preemption=False)
    engine = await started(tiny, config)
    try:
        running = await engine.submit(req("long", max_new=400))
        await engine.wait_for(lambda: engine.stats.num_steps > 20, WAIT_S)  # step times are known
        loop_time = asyncio.get_running_loop().time
        with pytest.raises(EngineOverloadedError) as refused:
            await engine.submit(req("late", max_new=5, deadline=time.monotonic() + 0.05))
        assert refused.value.reason == "DEADLINE_UNMEETABLE"
        assert refused.value.retry_after is not None and refused.value.retry_after > 0.05
        assert loop_time  # refused without waiting: nothing was queued
        assert engine.queued_by_tenant() == {}
        ok = await engine.submit(req("patient", max_new=5, deadline=time.monotonic() + 600))
        running.close()
        await ok.collect()
    finally:
        await engine.shutdown()


@pytest.mark.parametrize(
    "flag",
    [
        {"max_call_share": 0.0},
        {"max_call_share": 1.5},
        {"max_queued_per_tenant": 0},
        {"stream_buffer_tokens": 0},
        {"stream_idle_timeout": -1.0},
        {"introspection_share": 0.0},
    ],
)
def test_bad_contention_flags_are_refused_naming_the_flag(tiny: LoadedModel, flag: dict[str, float]) -> None:
    (name,) = flag
    with pytest.raises(ValueError, match="--" + name.replace("_", "-")):
        Engine(tiny, replace(CONFIG, **flag))  # type: ignore[arg-type]


async def test_deadline_admission_counts_the_places_preemption_frees(tiny: LoadedModel) -> None:
    """A probe with a deadline, behind one call that fills the batch, or a flood of another
    tenant, or paused streams: it gets in by preemption, so it is not refused."""
    config = replace(CONFIG, max_batch_size=4, max_call_share=0.5, stream_buffer_tokens=4)
    engine = await started(tiny, config)
    try:
        big = [await engine.submit(req(f"b{i}", max_new=1000, call_id="big", tenant="t")) for i in range(8)]
        await engine.wait_for(lambda: engine.stats.num_steps > 20, WAIT_S)  # full, and step times known
        probe = await engine.submit(req("small", max_new=4, tenant="t", deadline=time.monotonic() + 2.0))
        await probe.collect()
        for stream in big:
            stream.close()
        flood = [await engine.submit(req(f"f{i}", max_new=1000, tenant="flood")) for i in range(8)]
        await engine.wait_for(lambda: engine.stats.num_running == 4, WAIT_S)
        probe = await engine.submit(req("other", max_new=4, tenant="other", deadline=time.monotonic() + 2.0))
        await probe.collect()
        for stream in flood:
            stream.close()
    finally:
        await engine.shutdown()
