"""Generate's ``n`` (choices) and ``echo`` (the prompt's scored tokens) through Client /
AsyncClient (generate, stream) and ``gpt2-client generate --n / --echo``, against a live server;
and the conversion of the new fields (Choice, prompt_tokens, choice_index,
Usage.cached_prompt_tokens, EngineLimits.max_choices) from protobuf."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest
from gpt2_client import AsyncClient, Choice, Client, FinishReason, Generation, ScoredToken, StreamChunk
from gpt2_client.proto import common_pb2
from gpt2_client.proto import generation_pb2 as pb
from gpt2_client.results import chunk_from_proto, generation_from_proto, model_info_from_proto
from gpt2_service.model.weights import LoadedModel

from tests.api_helpers import API_ENGINE_CONFIG, serve
from tests.test_client_cli import _cli

PROMPT = "The cat sat on the mat, and the dog sat on the log."
SEED = 1234
SAMPLED: dict[str, Any] = {"max_new_tokens": 8, "temperature": 1.0, "top_k": 50, "ignore_eos": True, "seed": SEED}


def _by_choice(chunks: list[StreamChunk]) -> dict[int, tuple[str, tuple[int, ...], list[StreamChunk]]]:
    """Each choice's concatenated text, its token ids, and its finished chunks."""
    texts: dict[int, str] = {}
    ids: dict[int, tuple[int, ...]] = {}
    ends: dict[int, list[StreamChunk]] = {}
    for chunk in chunks:
        texts[chunk.choice_index] = texts.get(chunk.choice_index, "") + chunk.text
        ids[chunk.choice_index] = ids.get(chunk.choice_index, ()) + tuple(t.id for t in chunk.tokens)
        if chunk.finished:
            ends.setdefault(chunk.choice_index, []).append(chunk)
    return {i: (texts[i], ids[i], ends.get(i, [])) for i in sorted(texts)}


def _check_choices(result: Generation, n: int) -> None:
    """n choices, indices 0..n-1, seeds SEED + i, choice 0 = the top-level fields, usage = all."""
    assert [c.index for c in result.choices] == list(range(n))
    assert [c.seed for c in result.choices] == [SEED + i for i in range(n)]
    assert all(isinstance(c, Choice) and len(c.tokens) == SAMPLED["max_new_tokens"] for c in result.choices)
    assert all(c.finish_reason is FinishReason.LENGTH and c.stop_sequence is None for c in result.choices)
    first = result.choices[0]
    assert (first.text, first.token_ids, first.tokens) == (result.text, result.token_ids, result.tokens)
    assert (first.seed, first.finish_reason) == (result.seed, result.finish_reason)
    assert result.usage.completion_tokens == n * SAMPLED["max_new_tokens"]
    assert len({c.token_ids for c in result.choices}) == n  # different seeds sample different tokens


# -- the library ----------------------------------------------------------------------------------


async def test_generate_n_gives_choices_with_consecutive_seeds_each_as_its_own_request(tiny: LoadedModel) -> None:
    async with serve(tiny) as served:
        with Client(served.target, timeout=30) as client:
            three = await asyncio.to_thread(lambda: client.generate(PROMPT, n=3, **SAMPLED))
            alone = [
                await asyncio.to_thread(lambda i=i: client.generate(PROMPT, **{**SAMPLED, "seed": SEED + i}))
                for i in range(3)
            ]
            info = await asyncio.to_thread(client.model_info)
    _check_choices(three, 3)
    assert three.prompt_tokens == ()  # no echo
    assert info.limits.max_choices == API_ENGINE_CONFIG.max_choices
    for choice, single in zip(three.choices, alone, strict=True):
        # with n=1 there is one choice, built from the top-level fields
        assert single.choices == (
            Choice(0, single.text, single.tokens, single.finish_reason, single.stop_sequence, single.seed),
        )
        assert (choice.text, choice.token_ids, choice.seed) == (single.text, single.token_ids, single.seed)


async def test_async_generate_n_equals_the_sync_one(tiny: LoadedModel) -> None:
    async with serve(tiny) as served:
        with Client(served.target, timeout=30) as client:
            sync = await asyncio.to_thread(lambda: client.generate(PROMPT, n=3, **SAMPLED))
        async with AsyncClient(served.target, timeout=30) as aclient:
            unary = await aclient.generate(PROMPT, n=3, **SAMPLED)
            info = await aclient.model_info()
    _check_choices(unary, 3)
    assert [(c.text, c.token_ids, c.seed) for c in unary.choices] == [
        (c.text, c.token_ids, c.seed) for c in sync.choices
    ]
    assert info.limits.max_choices == API_ENGINE_CONFIG.max_choices


async def test_echo_returns_the_prompts_tokens_but_the_first_as_score_does(tiny: LoadedModel) -> None:
    greedy = {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True}
    async with serve(tiny) as served:
        with Client(served.target, timeout=30) as client:
            ids = await asyncio.to_thread(lambda: client.inspect.tokenize(PROMPT).token_ids)
            echoed = await asyncio.to_thread(lambda: client.generate(PROMPT, echo=True, top_logprobs=2, **greedy))
            plain = await asyncio.to_thread(lambda: client.generate(PROMPT, **greedy))
            scored = await asyncio.to_thread(lambda: client.score(PROMPT, top_logprobs=2))
            both = await asyncio.to_thread(lambda: client.generate(PROMPT, n=2, echo=True, **SAMPLED))
        async with AsyncClient(served.target, timeout=30) as aclient:
            async_echoed = await aclient.generate(PROMPT, echo=True, top_logprobs=2, **greedy)
    assert len(ids) > 10
    assert all(isinstance(t, ScoredToken) for t in echoed.prompt_tokens)
    assert [t.id for t in echoed.prompt_tokens] == ids[1:]
    assert [(t.id, t.text, t.rank) for t in echoed.prompt_tokens] == [(t.id, t.text, t.rank) for t in scored.tokens]
    assert [t.logprob for t in echoed.prompt_tokens] == pytest.approx([t.logprob for t in scored.tokens], abs=1e-5)
    assert all(len(t.top_logprobs) == 2 for t in echoed.prompt_tokens)
    assert plain.prompt_tokens == ()
    assert echoed.token_ids == plain.token_ids  # echo never changes the completion
    assert [t.id for t in async_echoed.prompt_tokens] == ids[1:] and async_echoed.token_ids == plain.token_ids
    assert [t.id for t in both.prompt_tokens] == ids[1:] and len(both.choices) == 2  # once, not per choice


async def test_stream_n_tags_chunks_with_their_choice_and_adds_up_to_the_unary_choices(tiny: LoadedModel) -> None:
    async with serve(tiny) as served:
        with Client(served.target, timeout=30) as client:
            unary = await asyncio.to_thread(lambda: client.generate(PROMPT, n=3, echo=True, **SAMPLED))
            chunks = await asyncio.to_thread(lambda: list(client.stream(PROMPT, n=3, echo=True, **SAMPLED)))
            single = await asyncio.to_thread(lambda: list(client.stream(PROMPT, **SAMPLED)))
        async with AsyncClient(served.target, timeout=30) as aclient:
            async_chunks = [chunk async for chunk in aclient.stream(PROMPT, n=3, echo=True, **SAMPLED)]
    for stream in (chunks, async_chunks):
        choices = _by_choice(stream)
        assert sorted(choices) == [0, 1, 2]
        for choice in unary.choices:
            text, token_ids, ends = choices[choice.index]
            assert (text, token_ids) == (choice.text, choice.token_ids)
            assert (
                len(ends) == 1
                and ends[0] is stream[max(i for i, c in enumerate(stream) if c.choice_index == choice.index)]
            )
            last = ends[0]
            assert (last.seed, last.finish_reason) == (choice.seed, choice.finish_reason)
            assert last.usage is not None and last.usage.completion_tokens == len(choice.tokens)  # that choice alone
        echoes = [c for c in stream if c.prompt_tokens]
        assert len(echoes) == 1 and echoes[0].choice_index == 0
        assert echoes[0] is next(c for c in stream if c.choice_index == 0)  # choice 0's first chunk
        assert echoes[0].prompt_tokens == unary.prompt_tokens
    assert {c.choice_index for c in single} == {0} and all(not c.prompt_tokens for c in single)
    assert "".join(c.text for c in single) == unary.text and single[-1].seed == SEED


# -- the command line -----------------------------------------------------------------------------


async def test_cli_generate_n_and_echo(tiny: LoadedModel) -> None:
    flags = ["--max-new-tokens", "8", "--temperature", "1", "--top-k", "50", "--ignore-eos", "--seed", str(SEED)]
    async with serve(tiny) as served:
        with Client(served.target, timeout=30) as client:
            ids = await asyncio.to_thread(lambda: client.inspect.tokenize(PROMPT).token_ids)
            unary = await asyncio.to_thread(lambda: client.generate(PROMPT, n=2, echo=True, **SAMPLED))
        as_json = await _cli("generate", PROMPT, *flags, "--n", "2", "--echo", "--json", target=served.target)
        as_text = await _cli("generate", PROMPT, *flags, "--n", "2", "--echo", target=served.target)
        streamed = await _cli("generate", PROMPT, *flags, "--n", "2", "--echo", "--stream", target=served.target)
        echo_only = await _cli("generate", PROMPT, *flags, "--echo", "--stream", target=served.target)
        status, info, _ = await _cli("info", target=served.target)
    for status_, _, err in (as_json, as_text, streamed, echo_only):
        assert status_ == 0, err
    result = json.loads(as_json[1])
    assert [(c["index"], c["seed"], c["text"]) for c in result["choices"]] == [
        (c.index, c.seed, c.text) for c in unary.choices
    ]
    assert result["text"] == unary.choices[0].text and result["usage"]["completion_tokens"] == 16
    assert "cached_prompt_tokens" in result["usage"]
    assert [t["id"] for t in result["prompt_tokens"]] == ids[1:]
    assert all(t["rank"] >= 1 and t["logprob"] <= 0 for t in result["prompt_tokens"])

    out = as_text[1]
    header = f"--- prompt: {len(ids) - 1} tokens scored (the first is not), total logprob "
    assert out.startswith(header)
    rows = [line for line in out.splitlines() if re.match(r" +\d+  ['\"]", line)]
    assert [int(row.split()[0]) for row in rows] == list(range(1, len(ids)))  # positions of the scored tokens
    assert [row.split("  ")[-1] for row in rows] == [f"rank {t.rank}" for t in unary.prompt_tokens]
    assert [float(row.split()[-3]) for row in rows] == pytest.approx([t.logprob for t in unary.prompt_tokens], abs=1e-4)
    for choice in unary.choices:
        assert f"\n--- choice {choice.index} (seed {SEED + choice.index}, length) ---\n{choice.text}\n" in out
    assert "[2 choices: 16 tokens in " in as_text[2] and f"seed {SEED}" in as_text[2]
    assert streamed[1] == out  # a stream of several choices prints them as the unary call does
    assert "[2 choices: 16 tokens in " in streamed[2]

    echoed = echo_only[1]
    assert echoed.startswith(header) and f"\n--- completion ---\n{unary.choices[0].text}\n" in echoed
    assert echoed.endswith(f"--- completion ---\n{unary.choices[0].text}\n")
    assert "[LENGTH: 8 tokens" in echo_only[2]
    assert status == 0 and re.search(rf"\n  max_choices +{API_ENGINE_CONFIG.max_choices}\n", info + "\n")


# -- from protobuf --------------------------------------------------------------------------------


def test_the_new_fields_come_from_their_protobuf_fields() -> None:
    usage = pb.Usage(prompt_tokens=9, completion_tokens=4, cached_prompt_tokens=5)
    token = pb.TokenInfo(id=7, text="a", logprob=-1.5)
    scored = pb.ScoredToken(id=3, text="b", logprob=-2.5, rank=4)
    response = pb.GenerateResponse(
        request_id="r", text="a", token_ids=[7], tokens=[token], finish_reason=pb.LENGTH, usage=usage, seed=11,
        prompt_tokens=[scored],
        choices=[
            pb.Choice(index=0, text="a", tokens=[token], finish_reason=pb.LENGTH, seed=11),
            pb.Choice(index=1, text="c", tokens=[pb.TokenInfo(id=8, text="c")], finish_reason=pb.STOP_SEQUENCE,
                      stop_sequence="c", seed=12),
        ],
    )  # fmt: skip
    result = generation_from_proto(response)
    assert result.usage.cached_prompt_tokens == 5
    assert result.prompt_tokens == (ScoredToken(3, "b", -2.5, 4),)
    assert [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_sequence, c.seed) for c in result.choices] == [
        (0, "a", (7,), FinishReason.LENGTH, None, 11),
        (1, "c", (8,), FinishReason.STOP_SEQUENCE, "c", 12),
    ]
    del response.choices[:]
    assert [(c.index, c.text, c.seed) for c in generation_from_proto(response).choices] == [(0, "a", 11)]

    first = chunk_from_proto(
        pb.GenerateStreamResponse(request_id="r", text="x", choice_index=2, prompt_tokens=[scored])
    )
    assert (first.choice_index, first.prompt_tokens, first.finished) == (2, (ScoredToken(3, "b", -2.5, 4),), False)
    last = chunk_from_proto(
        pb.GenerateStreamResponse(request_id="r", finish_reason=pb.EOS, usage=usage, seed=5, choice_index=1)
    )
    assert last.choice_index == 1 and last.usage is not None and last.usage.cached_prompt_tokens == 5

    info = common_pb2.ModelInfo(name="m", limits=common_pb2.EngineLimits(max_choices=6))
    assert model_info_from_proto(info).limits.max_choices == 6
    info.limits.max_choices = 0  # a server from before n: one completion per request
    assert model_info_from_proto(info).limits.max_choices == 1
