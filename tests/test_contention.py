"""The engine under contention: priorities and preemption, tenants, one call's share, slow readers,
and deadline-aware admission, on a real tiny engine (the policy alone: test_fairness.py)."""

from __future__ import annotations

import asyncio
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
