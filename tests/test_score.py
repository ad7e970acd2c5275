"""Score (issue 14, part 1): the log-probability of every token of a text, through the engine's
scheduler as prefill work; checked against Hugging Face's GPT2LMHeadModel loss on the same
weights, on random weights and on a saved checkpoint."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from pathlib import Path

import grpc
import pytest
import torch
import transformers
from gpt2_client.proto import common_pb2, generation_pb2_grpc
from gpt2_client.proto import generation_pb2 as pb
from gpt2_service.config import EngineConfig
from gpt2_service.core.detokenizer import IncrementalDetokenizer
from gpt2_service.core.request import GenerationRequest, SamplingParams, ScoreSpec, StoppingCriteria, Truncation
from gpt2_service.core.scheduler import Scheduler, SchedulerConfig
from gpt2_service.core.sequence import Sequence
from gpt2_service.engine.frontend import MAX_SCORE_TOKEN_COST, Engine, score_token_cost
from gpt2_service.model.weights import LoadedModel, load_model

from tests.api_helpers import API_ENGINE_CONFIG, Served, rich_error, serve
from tests.conftest import to_hf
from tests.engine_helpers import WAIT_S

TEXT = "The cat sat on the mat, and then it looked at the dog across the room for a long while."


def hf_nll(hf: transformers.GPT2LMHeadModel, ids: list[int], first: int) -> tuple[float, torch.Tensor]:
    """Hugging Face's summed NLL of ids[first:] given what precedes each, and its log-probs (T-1, V)."""
    labels = torch.tensor([ids])
    labels[0, :first] = -100
    with torch.no_grad():
        out = hf(torch.tensor([ids]), labels=labels)
    num_scored = len(ids) - first
    return float(out.loss) * num_scored, out.logits[0, :-1].float().log_softmax(-1)


async def score(served: Served, **fields: object) -> pb.ScoreResponse:
    async with served.channel() as channel:
        return await generation_pb2_grpc.TextGenerationStub(channel).Score(pb.ScoreRequest(**fields))  # type: ignore[arg-type]


def check_against_hf(response: pb.ScoreResponse, hf: transformers.GPT2LMHeadModel, ids: list[int], first: int) -> None:
    expected, log_probs = hf_nll(hf, ids, first)
    assert [t.id for t in response.tokens] == ids[first:]
    assert math.isclose(-response.total_logprob, expected, rel_tol=1e-4), (response.total_logprob, expected)
    assert math.isclose(response.mean_nll, expected / (len(ids) - first), rel_tol=1e-4)
    assert math.isclose(response.perplexity, math.exp(response.mean_nll), rel_tol=1e-12)
    assert math.isclose(response.total_logprob, math.fsum(t.logprob for t in response.tokens), rel_tol=1e-12)
    for position, token in zip(range(first, len(ids)), response.tokens, strict=True):
        row = log_probs[position - 1]
        assert token.logprob == pytest.approx(float(row[token.id]), abs=1e-4)
        surely_above = 1 + int((row > row[token.id] + 1e-5).sum())  # rounding may order near-ties
        maybe_above = 1 + int((row > row[token.id] - 1e-5).sum())  # either way (random weights: many)
        assert surely_above <= token.rank <= maybe_above, (token.rank, surely_above, maybe_above)


async def test_score_equals_hugging_face_loss_on_random_weights(tiny: LoadedModel) -> None:
    hf = to_hf(tiny.model)
    ids = tiny.tokenizer.encode(TEXT)
    bos = tiny.tokenizer.eos_token_id
    context = tiny.tokenizer.encode("A story:")
    # chunks of 16 prompt tokens: every score spans several prefill chunks
    config = dataclasses.replace(API_ENGINE_CONFIG, max_prefill_tokens=16)
    async with serve(tiny, engine_config=config) as served:
        plain = await score(served, text=TEXT, top_logprobs=3)
        with_bos = await score(served, text=TEXT, add_bos=True)
        with_context = await score(served, text=TEXT, context_text="A story:")
        by_ids = await score(
            served, token_ids=common_pb2.TokenIds(ids=ids), context_token_ids=common_pb2.TokenIds(ids=context)
        )
    check_against_hf(plain, hf, ids, 1)  # the first token has no prediction
    check_against_hf(with_bos, hf, [bos, *ids], 1)
    check_against_hf(with_context, hf, [*context, *ids], len(context))
    assert list(by_ids.tokens) == list(with_context.tokens)
    assert plain.usage.prompt_tokens == len(ids) and plain.usage.completion_tokens == 0
    assert with_bos.usage.prompt_tokens == len(ids) + 1
    for token in plain.tokens:
        assert [t.logprob for t in token.top_logprobs] == sorted((t.logprob for t in token.top_logprobs), reverse=True)
        assert len(token.top_logprobs) == 3 and token.top_logprobs[0].logprob >= token.logprob


async def test_score_equals_hugging_face_loss_from_a_saved_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(11)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=48, n_layer=3, n_head=4, n_positions=256)).eval()
    hf.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    ids = loaded.tokenizer.encode(TEXT * 3)
    async with serve(loaded, engine_config=EngineConfig(max_batch_size=4, max_prefill_tokens=32)) as served:
        response = await score(served, token_ids=common_pb2.TokenIds(ids=ids), add_bos=True)
    check_against_hf(response, hf, [loaded.tokenizer.eos_token_id, *ids], 1)


async def test_score_batch_items_equal_single_calls_and_free_their_slots(tiny: LoadedModel) -> None:
    requests = [
        pb.ScoreRequest(request_id=f"s{i}", text=text, add_bos=i % 2 == 0, top_logprobs=i)
        for i, text in enumerate([TEXT, "Hello world", "Numbers: 1, 2, 3, 4", TEXT[:40]])
    ]
    async with serve(tiny) as served, served.channel() as channel:
        stub = generation_pb2_grpc.TextGenerationStub(channel)
        batch = await stub.ScoreBatch(pb.ScoreBatchRequest(requests=requests))
        singles = [await stub.Score(r) for r in requests]
        engine = served.engine
        await engine.wait_for(lambda: not engine.scheduler.running, WAIT_S)
        assert engine.scheduler.slots.num_used == 0
    assert [r.request_id for r in batch.responses] == ["s0", "s1", "s2", "s3"]
    for in_batch, single in zip(batch.responses, singles, strict=True):
        assert list(in_batch.tokens) == list(single.tokens)  # bitwise: batch-invariant mode
        assert in_batch.total_logprob == single.total_logprob


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({}, "text", "INVALID_ARGUMENT"),
        ({"text": ""}, "text", "INVALID_ARGUMENT"),
        ({"text": "x"}, "text", "INVALID_ARGUMENT"),  # one token, nothing before it: nothing to score
        ({"text": TEXT, "top_logprobs": 21}, "top_logprobs", "INVALID_ARGUMENT"),
        ({"token_ids": common_pb2.TokenIds(ids=[1, 2, 3, 99999])}, "token_ids.ids[3]", "INVALID_ARGUMENT"),
        (
            {"text": TEXT, "context_token_ids": common_pb2.TokenIds(ids=[70000])},
            "context_token_ids.ids[0]",
            "INVALID_ARGUMENT",
        ),
        ({"token_ids": common_pb2.TokenIds(ids=list(range(129)))}, "token_ids", "PROMPT_TOO_LONG"),
        ({"text": "word " * 1000}, "text", "PROMPT_TOO_LONG"),
        ({"text": TEXT, "context_token_ids": common_pb2.TokenIds(ids=list(range(120)))}, "text", "PROMPT_TOO_LONG"),
        ({"text": TEXT, "priority": 17}, "priority", "INVALID_ARGUMENT"),
    ],
)
async def test_a_bad_score_request_names_its_field(
    tiny: LoadedModel, fields: dict[str, object], field: str, reason: str
) -> None:
    async with serve(tiny) as served:  # context window 128
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await score(served, **fields)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        details = rich_error(caught.value)
        assert details.fields == [field], details
        assert details.reason == reason
        assert served.engine.accepting, "the service stays up"


def test_a_scored_token_costs_its_share_of_the_prefill_budget() -> None:
    """A Score's chunks are cut so that a step costs about what a prompt's step costs: a scored
    token counts ``score_token_cost`` prompt tokens, in both chunking modes."""
    for fixed in (False, True):
        config = SchedulerConfig(
            max_batch_size=4, num_slots=4, context_window=256, max_prefill_tokens=64, context_shift_keep=32,
            eos_token_id=0, fixed_prefill_chunks=fixed, score_token_cost=4.0,
        )  # fmt: skip
        scheduler = Scheduler(config, token_text=str)
        scheduled = _score_sequence(1, 200)
        scheduler.add(scheduled)
        sizes = []
        while scheduled.num_computed < 200:
            plan, _ = scheduler.schedule()
            assert all(not c.samples for c in plan.prefill), "a Score is never sampled"
            sizes.append(plan.prefill[0].num_tokens)
            scheduler.update_from_output(plan, {}, {})
        assert max(sizes) == 16 and sum(sizes) == 200, (fixed, sizes)
        assert not scheduler.running and scheduler.slots.num_used == 0, "read, finished, freed"


def test_score_token_cost_weighs_the_lm_head_by_the_model_shape(tiny: LoadedModel) -> None:
    c = tiny.model.config
    assert score_token_cost(c) == MAX_SCORE_TOKEN_COST < 1 + c.vocab_size / (12 * c.n_layer * c.n_embd)
    gpt2_small = dataclasses.replace(c, n_layer=12, n_embd=768, vocab_size=50257)
    assert 1.4 < score_token_cost(gpt2_small) < 1.5


def _score_sequence(seq_id: int, length: int) -> Sequence:
    request = GenerationRequest(
        request_id=f"r{seq_id}",
        prompt_token_ids=tuple(range(1, length + 1)),
        truncation=Truncation.REJECT,
        score=ScoreSpec(first=1),
    )
    return Sequence(
        seq_id=seq_id,
        request=request,
        prompt_ids=list(range(1, length + 1)),
        seed=0,
        max_new_tokens=0,
        truncated_prompt_tokens=0,
        arrival_time=0.0,
        detokenizer=IncrementalDetokenizer(lambda i: b"x"),
    )


async def test_a_long_score_shares_steps_with_a_running_stream(tiny: LoadedModel) -> None:
    """Prefill work like any prompt: while a long Score is read, the running stream decodes in
    every step (it gets a token per step), and the Score's result equals the one it gives alone."""
    config = dataclasses.replace(API_ENGINE_CONFIG, context_window=1024, max_prefill_tokens=64)
    engine = Engine(tiny, config)
    await engine.start()
    ids = [(i * 7919) % 50000 for i in range(300)]
    scored = GenerationRequest(
        request_id="score", prompt_token_ids=tuple(ids), truncation=Truncation.REJECT, score=ScoreSpec(first=1)
    )
    try:
        alone = await anext(aiter(await engine.submit(scored)))
        stream = await engine.submit(
            GenerationRequest(
                request_id="stream",
                prompt_token_ids=(1000, 1001),
                sampling=SamplingParams(temperature=0.0),
                stopping=StoppingCriteria(max_new_tokens=500, ignore_eos=True),
            )
        )
        tokens_at: list[int] = []  # the engine's step count at each token the stream got

        async def read() -> None:
            async for out in stream:
                tokens_at.extend(engine.stats.num_steps for _ in out.tokens)

        reader = asyncio.ensure_future(read())
        await engine.wait_for(lambda: bool(tokens_at), WAIT_S)
        steps_before = engine.stats.num_steps
        beside = await asyncio.wait_for(
            anext(aiter(await engine.submit(dataclasses.replace(scored, request_id="s2")))), WAIT_S
        )
        steps_after = engine.stats.num_steps
        await engine.wait_for(lambda: tokens_at[-1] >= steps_after, WAIT_S)
        stream.close()
        reader.cancel()
        steps = steps_after - steps_before
        tokens = sum(steps_before < at <= steps_after for at in tokens_at)
    finally:
        await engine.shutdown()
    assert alone.finished is not None and beside.finished is not None
    assert beside.finished.scored == alone.finished.scored
    assert len(alone.finished.scored) == 299
    assert steps >= 2 and tokens >= steps - 1, f"the stream decoded {tokens} tokens in {steps} steps of the Score"
