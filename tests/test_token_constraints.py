"""logit_bias, allowed/banned token ids and bad words (issue 15): the tokens they exclude are never
generated, the reported log-probabilities are those of the distribution they leave, and bad
values are INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math

import grpc
import pytest
from gpt2_client.proto import generation_pb2 as pb
from gpt2_service.core.request import GenerationRequest, SamplingParams, StoppingCriteria
from gpt2_service.engine.frontend import Engine
from gpt2_service.model.weights import LoadedModel

from tests.api_helpers import rich_error, serve, stub_for
from tests.engine_helpers import request, run

PROMPT = [464, 3797, 3332, 319, 262]


def with_sampling(req: GenerationRequest, **changes: object) -> GenerationRequest:
    return dataclasses.replace(req, sampling=dataclasses.replace(req.sampling, **changes))  # type: ignore[arg-type]


async def tokens_of(engine: Engine, req: GenerationRequest) -> list[int]:
    _, finished = await run(engine, req)
    return list(finished.token_ids)


async def test_logit_bias_forces_and_bans_tokens(engine: Engine) -> None:
    greedy = request(PROMPT, max_new_tokens=8, temperature=0.0)
    plain = await tokens_of(engine, greedy)
    forced_outputs, forced = await run(engine, with_sampling(greedy, logit_bias=((1000, 100.0),)))
    assert list(forced.token_ids) == [1000] * 8
    assert all(t.logprob > -1e-3 for o in forced_outputs for t in o.tokens)  # the biased distribution
    banned = await tokens_of(engine, with_sampling(greedy, logit_bias=((plain[0], -100.0),)))
    assert banned[0] != plain[0] and plain[0] not in banned


async def test_allowed_and_banned_ids_hold_at_every_step_and_logprobs_are_those_left(engine: Engine) -> None:
    allowed = (11, 13, 262, 290, 1000)
    req = with_sampling(
        request(PROMPT, max_new_tokens=24, top_logprobs=5, temperature=1.0, seed=3), allowed_token_ids=allowed
    )
    outputs, finished = await run(engine, req)
    assert set(finished.token_ids) <= set(allowed) and len(set(finished.token_ids)) > 1
    for token in (t for o in outputs for t in o.tokens):
        assert {a.id for a in token.top_logprobs} == set(allowed)  # the others have probability 0
        assert math.fsum(math.exp(a.logprob) for a in token.top_logprobs) == pytest.approx(1.0, abs=1e-5)
    greedy = request(PROMPT, max_new_tokens=12, temperature=0.0)
    plain = await tokens_of(engine, greedy)
    banned = await tokens_of(engine, with_sampling(greedy, banned_token_ids=tuple(set(plain))))
    assert not set(banned) & set(plain)


async def test_a_bad_word_is_never_completed(engine: Engine, tiny: LoadedModel) -> None:
    greedy = request(PROMPT, max_new_tokens=16, temperature=0.0)
    plain = await tokens_of(engine, greedy)
    word = tiny.tokenizer.decode(plain[3:5])  # two tokens the model produces
    req = dataclasses.replace(greedy, stopping=dataclasses.replace(greedy.stopping, bad_words=(word,)))
    out = await tokens_of(engine, req)
    assert out[:4] == plain[:4] and out[4] != plain[4]
    pairs = set(itertools.pairwise(out))
    assert tuple(plain[3:5]) not in pairs


async def test_constrained_rows_are_bitwise_the_same_alone_or_batched(engine: Engine) -> None:
    req = with_sampling(
        request(PROMPT, max_new_tokens=16, temperature=0.9, top_k=50, seed=11),
        logit_bias=((13, 5.0), (262, -3.0)),
        banned_token_ids=(11, 290),
    )
    alone, _ = await run(engine, req)
    others = [request(PROMPT[:i], max_new_tokens=20, temperature=1.0, seed=i) for i in range(1, 5)]
    together = await asyncio.gather(run(engine, req), *(run(engine, o) for o in others))
    assert [(t.id, t.logprob) for o in together[0][0] for t in o.tokens] == [
        (t.id, t.logprob) for o in alone for t in o.tokens
    ]


@pytest.mark.parametrize(
    ("sampling", "stopping", "field"),
    [
        (pb.SamplingParams(logit_bias={5: 101.0}), None, "sampling.logit_bias[5]"),
        (pb.SamplingParams(logit_bias={60000: 1.0}), None, "sampling.logit_bias"),
        (pb.SamplingParams(allowed_token_ids=[3, 50257]), None, "sampling.allowed_token_ids[1]"),
        (pb.SamplingParams(banned_token_ids=list(range(4097))), None, "sampling.banned_token_ids"),
        (pb.SamplingParams(allowed_token_ids=[3, 4], banned_token_ids=[4, 3]), None, "sampling.banned_token_ids"),
        (None, pb.StoppingCriteria(bad_words=["x"] * 65), "stopping.bad_words"),
        (None, pb.StoppingCriteria(bad_words=["ok", ""]), "stopping.bad_words[1]"),
    ],
)
async def test_bad_values_name_their_field(
    tiny: LoadedModel, sampling: pb.SamplingParams | None, stopping: pb.StoppingCriteria | None, field: str
) -> None:
    message = pb.GenerateRequest(prompt="Hi", sampling=sampling, stopping=stopping)
    async with serve(tiny) as served, stub_for(served) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Generate(message)
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert rich_error(error.value).fields == [field]


def test_the_engine_types_default_to_no_constraint() -> None:
    assert SamplingParams().logit_bias == () and StoppingCriteria().bad_words == ()
