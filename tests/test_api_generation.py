"""TextGeneration end to end over a real socket: unary, streamed and batched results agree."""

from __future__ import annotations

import asyncio

import grpc
from gpt2_client.proto import common_pb2
from gpt2_client.proto import generation_pb2 as pb
from gpt2_service.model.weights import LoadedModel

from tests.api_helpers import greedy, serve, stub_for


def seeded(prompt: str, seed: int, max_new_tokens: int = 12, **sampling: float) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=prompt,
        sampling=pb.SamplingParams(seed=seed, **sampling),
        stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens, ignore_eos=True),
    )


async def test_stream_and_unary_agree_for_a_seeded_request(tiny: LoadedModel) -> None:
    request = seeded("The cat sat on the", seed=7, temperature=0.9, top_k=50)
    async with serve(tiny) as served, stub_for(served) as stub:
        unary = await stub.Generate(request)
        messages = [m async for m in stub.GenerateStream(request)]
    assert unary.usage.completion_tokens == 12
    assert "".join(m.text for m in messages) == unary.text
    assert [t.id for m in messages for t in m.tokens] == list(unary.token_ids)
    assert [t.id for t in unary.tokens] == list(unary.token_ids)
    last = messages[-1]
    assert last.finish_reason == unary.finish_reason == pb.LENGTH
    assert last.HasField("seed") and last.seed == unary.seed == 7
    assert last.usage == unary.usage
    assert last.timing.total_seconds > 0
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED and not m.HasField("seed") for m in messages[:-1])
    assert all(m.text for m in messages[:-1]), "every message but the last carries a text delta"


async def test_unseeded_request_reports_the_seed_that_reproduces_it(tiny: LoadedModel) -> None:
    request = pb.GenerateRequest(prompt="Hello", stopping=pb.StoppingCriteria(max_new_tokens=10, ignore_eos=True))
    async with serve(tiny) as served, stub_for(served) as stub:
        first = await stub.Generate(request)
        request.sampling.seed = first.seed
        again = await stub.Generate(request)
    assert list(again.token_ids) == list(first.token_ids)


async def test_request_id_is_echoed_or_generated(tiny: LoadedModel) -> None:
    async with serve(tiny) as served, stub_for(served) as stub:
        given = await stub.Generate(greedy(request_id="my-request-1"))
        generated = await stub.Generate(greedy())
        streamed = [m async for m in stub.GenerateStream(greedy(request_id="my-stream"))]
    assert given.request_id == "my-request-1"
    assert len(generated.request_id) == 32 and int(generated.request_id, 16) >= 0  # uuid4 hex
    assert {m.request_id for m in streamed} == {"my-stream"}


async def test_prompt_token_ids_give_the_same_result_as_the_text(tiny: LoadedModel) -> None:
    ids = tiny.tokenizer.encode("The cat sat on the")
    async with serve(tiny) as served, stub_for(served) as stub:
        from_text = await stub.Generate(greedy("The cat sat on the"))
        by_ids = greedy()
        by_ids.prompt_token_ids.CopyFrom(common_pb2.TokenIds(ids=ids))
        from_ids = await stub.Generate(by_ids)
    assert list(from_ids.token_ids) == list(from_text.token_ids)
    assert from_ids.usage.prompt_tokens == len(ids)


async def test_stop_string_ends_the_generation_and_is_cut(tiny: LoadedModel) -> None:
    async with serve(tiny) as served, stub_for(served) as stub:
        free = await stub.Generate(greedy(max_new_tokens=16))
        stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
        request = greedy(max_new_tokens=16)
        request.stopping.stop.append(stop)
        stopped = await stub.Generate(request)
        streamed = [m async for m in stub.GenerateStream(request)]
    assert stopped.finish_reason == pb.STOP_SEQUENCE
    assert stopped.stop_sequence == stop
    assert stopped.text == free.text[: free.text.index(stop)]
    assert "".join(m.text for m in streamed) == stopped.text
    assert streamed[-1].stop_sequence == stop


async def test_top_logprobs_are_returned_per_token(tiny: LoadedModel) -> None:
    async with serve(tiny) as served, stub_for(served) as stub:
        response = await stub.Generate(greedy(max_new_tokens=4, top_logprobs=3))
    assert all(len(t.top_logprobs) == 3 for t in response.tokens)
    # Greedy picks the most likely token, so it heads its own top list.
    assert all(t.top_logprobs[0].id == t.id for t in response.tokens)


async def test_batch_of_mixed_requests_equals_single_calls(tiny: LoadedModel) -> None:
    requests = [
        seeded("The cat sat on the", seed=1, temperature=0.8),
        greedy("Hello world", max_new_tokens=6),
        seeded("Once upon a time", seed=2, top_p=0.9, max_new_tokens=5),
        greedy("", max_new_tokens=7),
        seeded("A", seed=3, top_k=5, repetition_penalty=1.3, max_new_tokens=9),
        seeded("The cat sat on the", seed=4, min_p=0.1, typical_p=0.9),
        greedy("Numbers: 1, 2, 3,", max_new_tokens=10, top_logprobs=2),
        seeded("Hello world", seed=5, presence_penalty=0.5, frequency_penalty=0.5, max_new_tokens=3),
    ]
    for i, request in enumerate(requests):
        request.request_id = f"item-{i}"
    async with serve(tiny) as served, stub_for(served) as stub:
        batch = await stub.GenerateBatch(pb.GenerateBatchRequest(requests=requests))
        singles = [await stub.Generate(r) for r in requests]
    assert [r.request_id for r in batch.responses] == [f"item-{i}" for i in range(8)]
    # Batch invariance (the default): whatever shares their steps, every item gives bitwise what it
    # gives alone, seeded samples included.
    assert served.engine.batch_invariant
    for request, in_batch, single in zip(requests, batch.responses, singles, strict=True):
        if request.sampling.HasField("seed"):  # else the engine picks one (unused by greedy items)
            assert in_batch.seed == single.seed == request.sampling.seed
        assert in_batch.text == single.text, request.request_id
        assert list(in_batch.token_ids) == list(single.token_ids), request.request_id
        assert [t.logprob for t in in_batch.tokens] == [t.logprob for t in single.tokens], request.request_id
        assert list(in_batch.tokens) == list(single.tokens) and in_batch.finish_reason == single.finish_reason


async def test_sixteen_concurrent_streams_complete_and_share_decode_steps(tiny: LoadedModel) -> None:
    requests = [seeded(f"Request number {i} says", seed=100 + i, max_new_tokens=16) for i in range(16)]
    async with serve(tiny) as served, stub_for(served) as stub:

        async def stream_text(request: pb.GenerateRequest) -> tuple[str, list[int]]:
            messages = [m async for m in stub.GenerateStream(request)]
            assert messages[-1].finish_reason == pb.LENGTH
            return "".join(m.text for m in messages), [t.id for m in messages for t in m.tokens]

        streamed = await asyncio.gather(*(stream_text(r) for r in requests))
        stats = served.engine.stats
        # Typically all 16 decode together for all 16 steps; half leaves room for arrival jitter.
        assert stats.max_decode_batch_size >= 8
        assert stats.num_shared_decode_steps >= 8
        # Alone, each request gives the same tokens: sharing a batch does not change a seeded result.
        for request, (text, ids) in zip(requests[:4], streamed, strict=False):
            alone = await stub.Generate(request)
            assert (text, ids) == (alone.text, list(alone.token_ids))
    assert all(len(ids) == 16 for _, ids in streamed)


async def test_model_info_describes_the_served_model(tiny: LoadedModel) -> None:
    async with serve(tiny) as served, stub_for(served) as stub:
        info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.name == "random:tiny"
    assert info.random_weights
    assert (info.n_layer, info.n_head, info.d_model, info.d_ff) == (2, 2, 64, 256)
    assert info.vocab_size == 50257 and info.eos_token_id == 50256
    assert info.context_window == 128
    assert info.limits.max_batch_size == 16 and info.limits.max_new_tokens_limit == 512
    assert info.limits.max_batch_requests == 16
    counts = info.parameter_counts
    assert counts.lm_head == counts.token_embedding
    assert counts.total == sum(p.numel() for p in tiny.model.parameters())


async def test_rpcs_are_unavailable_until_the_engine_is_attached(tiny: LoadedModel) -> None:
    async with serve(tiny, attach=False) as served, stub_for(served) as stub:
        try:
            await stub.Generate(greedy())
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.UNAVAILABLE
        else:
            raise AssertionError("Generate succeeded before the engine was attached")
        await served.server.attach(served.engine)
        assert (await stub.Generate(greedy())).usage.completion_tokens == 8
