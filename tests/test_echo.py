"""Generate's ``echo`` (issue 14, part 1): the prompt's log-probabilities through the Score path,
computed once while the prompt is read; checked against Hugging Face and against Score."""

from __future__ import annotations

import dataclasses

import transformers
from gpt2_client.proto import common_pb2
from gpt2_client.proto import generation_pb2 as pb
from gpt2_service.model.weights import LoadedModel

from tests.api_helpers import API_ENGINE_CONFIG, greedy, serve, stub_for, wait_for_slots_free
from tests.conftest import to_hf
from tests.test_score import check_against_hf, score

TEXT = "The cat sat on the mat, and then it looked at the dog across the room for a long while."


def as_score(response: pb.GenerateResponse) -> pb.ScoreResponse:
    return pb.ScoreResponse(tokens=response.prompt_tokens, total_logprob=sum(t.logprob for t in response.prompt_tokens))


async def test_echo_scores_the_prompt_as_hugging_face_does_and_leaves_the_output_alone(tiny: LoadedModel) -> None:
    hf: transformers.GPT2LMHeadModel = to_hf(tiny.model)
    ids = tiny.tokenizer.encode(TEXT)
    config = dataclasses.replace(API_ENGINE_CONFIG, max_prefill_tokens=8)  # the prompt in several chunks
    async with serve(tiny, engine_config=config) as served, stub_for(served) as stub:
        echoed = await stub.Generate(greedy(TEXT, max_new_tokens=6, echo=True, top_logprobs=2))
        plain = await stub.Generate(greedy(TEXT, max_new_tokens=6))
        scored = await score(served, text=TEXT, top_logprobs=2)
        streamed = [m async for m in stub.GenerateStream(greedy(TEXT, max_new_tokens=6, echo=True, top_logprobs=2))]
        await wait_for_slots_free(served.engine)
    assert not plain.prompt_tokens
    assert list(echoed.token_ids) == list(plain.token_ids)  # echo never changes the tokens
    assert [t.logprob for t in echoed.tokens] == [t.logprob for t in plain.tokens]
    response = as_score(echoed)
    response.mean_nll = -response.total_logprob / len(ids[1:])
    response.perplexity = 2.718281828459045**response.mean_nll
    check_against_hf(response, hf, ids, 1)
    assert [(t.id, t.rank) for t in echoed.prompt_tokens] == [(t.id, t.rank) for t in scored.tokens]
    for mine, theirs in zip(echoed.prompt_tokens, scored.tokens, strict=True):
        assert abs(mine.logprob - theirs.logprob) < 1e-5
        assert [a.id for a in mine.top_logprobs] == [a.id for a in theirs.top_logprobs]
    assert list(streamed[0].prompt_tokens) == list(echoed.prompt_tokens)
    assert all(not m.prompt_tokens for m in streamed[1:])
    assert "".join(m.text for m in streamed) == echoed.text


async def test_echo_scores_the_prompt_once_through_a_context_shift(tiny: LoadedModel) -> None:
    """A 100-token prompt in a 128-token window, 60 new tokens: the window shifts, the prompt's
    scores stay those of its first reading."""
    ids = [(i * 31) % 3000 + 5 for i in range(100)]
    message = greedy(max_new_tokens=60, echo=True)
    message.prompt_token_ids.CopyFrom(common_pb2.TokenIds(ids=ids))
    async with serve(tiny) as served, stub_for(served) as stub:
        response = await stub.Generate(message)
        scored = await score(served, token_ids=common_pb2.TokenIds(ids=ids))
    assert response.usage.context_shifts >= 1
    assert [t.id for t in response.prompt_tokens] == ids[1:]
    assert [t.rank for t in response.prompt_tokens] == [t.rank for t in scored.tokens]


async def test_echo_of_a_truncated_prompt_scores_what_the_model_saw(tiny: LoadedModel) -> None:
    ids = [(i * 17) % 4000 + 3 for i in range(140)]  # over the 128-token window: cut from the left
    message = greedy(max_new_tokens=4, echo=True)
    message.prompt_token_ids.CopyFrom(common_pb2.TokenIds(ids=ids))
    async with serve(tiny) as served, stub_for(served) as stub:
        response = await stub.Generate(message)
    assert response.usage.truncated_prompt_tokens == 140 - (128 - 4)  # cut to leave room for 4 new tokens
    kept = ids[response.usage.truncated_prompt_tokens :]
    assert [t.id for t in response.prompt_tokens] == kept[1:]
