"""n completions per request (issue 14, part 2): the prompt is read once, its keys and values are
copied into n slots, and each choice samples with seed + index; checked against separate
requests with those seeds, through the engine and the API."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest
from gpt2_client.proto import generation_pb2 as pb
from gpt2_service.config import EngineConfig
from gpt2_service.core.request import GenerationRequest
from gpt2_service.core.scheduler import PrefillChunk
from gpt2_service.core.sequence import Finished, GenerationOutput
from gpt2_service.engine.frontend import Engine
from gpt2_service.errors import EngineOverloadedError, InvalidRequestError
from gpt2_service.model.weights import LoadedModel

from tests.api_helpers import API_ENGINE_CONFIG, rich_error, serve, stub_for, wait_for_slots_free
from tests.engine_helpers import WAIT_S, request, run

PROMPT_IDS = [(i * 7919) % 5000 + 10 for i in range(150)]  # several prefill chunks of 64


def sampled(n: int = 1, seed: int = 1234, max_new_tokens: int = 12) -> GenerationRequest:
    base = request(PROMPT_IDS, max_new_tokens=max_new_tokens, temperature=1.0, top_k=50, seed=seed)
    return dataclasses.replace(base, n=n)


def by_choice(outputs: list[GenerationOutput]) -> dict[int, tuple[list[int], list[float], Finished]]:
    tokens: dict[int, list[int]] = {}
    logprobs: dict[int, list[float]] = {}
    ends: dict[int, Finished] = {}
    for out in outputs:
        tokens.setdefault(out.index, []).extend(t.id for t in out.tokens)
        logprobs.setdefault(out.index, []).extend(t.logprob for t in out.tokens)
        if out.finished is not None:
            ends[out.index] = out.finished
    return {i: (tokens[i], logprobs[i], ends[i]) for i in sorted(ends)}


def count_prefill_tokens(engine: Engine) -> list[int]:
    """Prompt tokens computed in prefill chunks, counted as the runner computes them."""
    counted = [0]
    prefill = engine.runner._prefill

    def counting(chunks: list[PrefillChunk], timer: object) -> object:
        counted[0] += sum(c.num_tokens for c in chunks)
        return prefill(chunks, timer)  # type: ignore[arg-type]

    engine.runner._prefill = counting  # type: ignore[method-assign,assignment]
    return counted


async def test_each_choice_equals_a_request_with_its_seed(engine: Engine) -> None:
    counted = count_prefill_tokens(engine)
    outputs, finished = await run(engine, sampled(n=4))
    assert counted[0] == len(PROMPT_IDS)  # the prompt was read once for 4 choices
    choices = by_choice(outputs)
    assert sorted(choices) == [0, 1, 2, 3]
    assert finished is choices[0][2]
    for index, (tokens, logprobs, end) in choices.items():
        assert end.seed == 1234 + index
        _, alone = await run(engine, sampled(seed=1234 + index))
        assert list(alone.token_ids) == tokens == list(end.token_ids)
        alone_outputs, _ = await run(engine, sampled(seed=1234 + index))
        assert [t.logprob for o in alone_outputs for t in o.tokens] == logprobs  # bitwise
    assert len({tuple(tokens) for tokens, _, _ in choices.values()}) > 1  # they sample independently
    await wait_for_slots_free(engine)


async def test_choices_that_do_not_fit_read_the_prompt_themselves(tiny: LoadedModel) -> None:
    """With 2 batch places, choice 0 takes one fork along; the other two wait and read the
    prompt themselves, with the same results."""
    config = EngineConfig(model="random:tiny", max_batch_size=2, max_queue_size=64, max_prefill_tokens=64)
    engine = Engine(tiny, config)
    await engine.start()
    try:
        counted = count_prefill_tokens(engine)
        outputs, _ = await run(engine, sampled(n=4))
        # choices 0 and 1 share one reading; 2 and 3 read it again, but for the two whole chunks of
        # 64 the prefix cache hands them
        assert counted[0] == len(PROMPT_IDS) + 2 * (len(PROMPT_IDS) - 128)
        for index, (tokens, _, _) in by_choice(outputs).items():
            _, alone = await run(engine, sampled(seed=1234 + index))
            assert list(alone.token_ids) == tokens
        await wait_for_slots_free(engine)
    finally:
        await engine.shutdown()


async def test_closing_the_stream_frees_every_choice(engine: Engine) -> None:
    stream = await engine.submit(dataclasses.replace(sampled(n=4, max_new_tokens=400)))
    async for out in stream:
        if out.index:  # a fork has a token: all four run
            break
    assert engine.stats.kv_cache_slots_used == 4
    stream.close()
    await wait_for_slots_free(engine)
    assert engine.stats.num_aborted == 4


async def test_queue_limits_count_every_choice(tiny: LoadedModel) -> None:
    config = EngineConfig(model="random:tiny", max_batch_size=4, max_queue_size=3, max_choices=8)
    engine = Engine(tiny, config)
    await engine.start()
    try:
        with pytest.raises(EngineOverloadedError):
            await engine.submit(sampled(n=4))
        with pytest.raises(InvalidRequestError) as error:
            await engine.submit(sampled(n=9))
        assert [v.field for v in error.value.violations] == ["n"]
        _, finished = await run(engine, sampled(n=3))  # 3 places: fits, and gives them back
        assert finished.reason.value == "length"
        assert engine.queued_by_tenant() == {}
    finally:
        await engine.shutdown()


async def test_generate_returns_every_choice_and_stream_tags_them(tiny: LoadedModel) -> None:
    message = pb.GenerateRequest(
        prompt="Once upon a time there was",
        n=3,
        sampling=pb.SamplingParams(temperature=1.0, seed=99),
        stopping=pb.StoppingCriteria(max_new_tokens=6, ignore_eos=True),
    )
    async with serve(tiny) as served, stub_for(served) as stub:
        unary = await stub.Generate(message)
        streamed = [m async for m in stub.GenerateStream(message)]
        one = pb.GenerateRequest()
        one.CopyFrom(message)
        one.n = 1
        single = await stub.Generate(one)
        await wait_for_slots_free(served.engine)
    assert [c.index for c in unary.choices] == [0, 1, 2]
    assert [c.seed for c in unary.choices] == [99, 100, 101]
    first = unary.choices[0]
    assert (unary.text, list(unary.tokens), unary.seed) == (first.text, list(first.tokens), first.seed)
    assert (single.text, list(single.token_ids)) == (unary.text, list(unary.token_ids))  # choice 0 = n=1
    assert not single.choices
    assert unary.usage.completion_tokens == 18 and unary.usage.prompt_tokens == single.usage.prompt_tokens
    for choice in unary.choices:
        mine = [m for m in streamed if m.choice_index == choice.index]
        assert "".join(m.text for m in mine) == choice.text
        assert [t.id for m in mine for t in m.tokens] == [t.id for t in choice.tokens]
        assert mine[-1].finish_reason == pb.LENGTH and mine[-1].seed == choice.seed
        assert mine[-1].usage.completion_tokens == 6


async def test_n_over_the_limit_is_invalid_argument(tiny: LoadedModel) -> None:
    config = dataclasses.replace(API_ENGINE_CONFIG, max_choices=4)
    async with serve(tiny, engine_config=config) as served, stub_for(served) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Generate(pb.GenerateRequest(prompt="Hi", n=5))
        info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert rich_error(error.value).fields == ["n"]
    assert info.limits.max_choices == 4


async def test_cancelled_stream_of_choices_frees_every_slot(tiny: LoadedModel) -> None:
    message = pb.GenerateRequest(prompt="Once", n=4, stopping=pb.StoppingCriteria(max_new_tokens=400, ignore_eos=True))
    async with serve(tiny) as served, stub_for(served) as stub:
        call = stub.GenerateStream(message)
        seen: set[int] = set()
        async for response in call:
            seen.add(response.choice_index)
            if len(seen) == 4:
                break
        call.cancel()
        await asyncio.wait_for(wait_for_slots_free(served.engine), WAIT_S)
