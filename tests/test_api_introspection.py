"""gpt2.v1.Introspection over real gRPC (random:tiny): tokens, tensors on the wire, attention,
the LM head, limits and errors, health and reflection, and introspection running next to live
streams without changing what they generate."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import pytest
from gpt2_client.proto import common_pb2, introspection_pb2_grpc
from gpt2_client.proto import generation_pb2 as gen_pb
from gpt2_client.proto import introspection_pb2 as pb
from gpt2_client.tensors import decode_tensor
from gpt2_service.api.introspection import INTROSPECTION_SERVICE
from gpt2_service.config import ServerConfig
from gpt2_service.introspection.inspector import RESPONSE_TOO_LARGE, Candidate, Inspector
from gpt2_service.model.weights import LoadedModel
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.api_helpers import API_SERVER_CONFIG, Served, first_message, greedy, rich_error, serve

CAT = "cat sat on the"
CAT_IDS = [9246, 3332, 319, 262]
SIXTY_FOUR_TOKENS = " ".join(["word"] * 64)  # "word" and " word" are one token each


@pytest.fixture
async def served(tiny: LoadedModel) -> AsyncIterator[Served]:
    # room for the five model RPCs that some tests run at once beside generation
    async with serve(tiny, server_config=dataclasses.replace(API_SERVER_CONFIG, max_model_rpcs=5)) as s:
        yield s


@pytest.fixture
async def stub(served: Served) -> AsyncIterator[introspection_pb2_grpc.IntrospectionAsyncStub]:
    async with served.channel() as channel:
        yield introspection_pb2_grpc.IntrospectionStub(channel)


if TYPE_CHECKING:
    Stub = introspection_pb2_grpc.IntrospectionAsyncStub  # in the .pyi only


# -- tokens --------------------------------------------------------------------------------------


async def test_tokenize_cat_sat_on_the_gives_gpt2_ids_and_offsets(stub: Stub) -> None:
    response = await stub.Tokenize(pb.TokenizeRequest(text=CAT))
    assert [t.id for t in response.tokens] == CAT_IDS
    assert [(t.text, t.start, t.end) for t in response.tokens] == [
        ("cat", 0, 3), (" sat", 3, 7), (" on", 7, 10), (" the", 10, 14),
    ]  # fmt: skip
    assert not any(t.partial or t.data for t in response.tokens)


async def test_a_piece_of_a_character_carries_its_raw_bytes(stub: Stub) -> None:
    response = await stub.Tokenize(pb.TokenizeRequest(text="日"))
    assert [t.partial for t in response.tokens] == [True, True]
    assert b"".join(t.data for t in response.tokens) == "日".encode()
    assert all((t.start, t.end) == (0, 1) for t in response.tokens)


async def test_tokenize_token_ids_indexes_their_decoded_text(stub: Stub) -> None:
    response = await stub.Tokenize(pb.TokenizeRequest(token_ids=common_pb2.TokenIds(ids=CAT_IDS)))
    assert response.text == CAT and [t.id for t in response.tokens] == CAT_IDS


async def test_detokenize_inverts_tokenize(stub: Stub) -> None:
    response = await stub.Detokenize(pb.DetokenizeRequest(token_ids=common_pb2.TokenIds(ids=CAT_IDS)))
    assert response.text == CAT


# -- tensors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [pb.TENSOR_DTYPE_FLOAT16, pb.TENSOR_DTYPE_BFLOAT16], ids=["float16", "bfloat16"])
async def test_half_precision_tensors_halve_the_bytes_and_keep_the_values(stub: Stub, dtype: int) -> None:
    full = await stub.Embed(pb.EmbedRequest(text=CAT))
    half = await stub.Embed(pb.EmbedRequest(text=CAT, dtype=dtype))  # type: ignore[arg-type]
    assert full.input_embeddings.dtype == pb.TENSOR_DTYPE_FLOAT32 and half.input_embeddings.dtype == dtype
    assert len(half.input_embeddings.data) * 2 == len(full.input_embeddings.data)
    tolerance = 2.0**-8 if dtype == pb.TENSOR_DTYPE_BFLOAT16 else 2.0**-11
    for name in ("token_embeddings", "position_embeddings", "input_embeddings", "cosine_similarity"):
        expected, got = decode_tensor(getattr(full, name)), decode_tensor(getattr(half, name))
        np.testing.assert_allclose(got, expected, rtol=tolerance, atol=1e-7, err_msg=name)


async def test_embed_matches_the_inspector(stub: Stub, tiny: LoadedModel) -> None:
    response = await stub.Embed(pb.EmbedRequest(text="bank is near the river bank"))
    expected = Inspector(tiny).embed("bank is near the river bank")
    for name in ("token_embeddings", "position_embeddings", "input_embeddings", "cosine_similarity"):
        got = decode_tensor(getattr(response, name))
        np.testing.assert_allclose(got, getattr(expected, name), rtol=1e-5, atol=1e-7, err_msg=name)


# -- attention, hidden states --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layers", "heads", "shape"),
    [([], [], (2, 2)), ([1], [], (1, 2)), ([], [1], (2, 1)), ([1, 0, 1], [0], (2, 1))],
    ids=["all", "one-layer", "one-head", "duplicates"],
)
async def test_attention_shape_follows_the_chosen_layers_and_heads(
    stub: Stub, layers: list[int], heads: list[int], shape: tuple[int, int]
) -> None:
    response = await stub.Attention(pb.AttentionRequest(text=CAT, layers=layers, heads=heads))
    weights = decode_tensor(response.weights)
    assert weights.shape == (*shape, 4, 4)
    assert list(response.layers) == sorted(set(layers or [0, 1])) and len(response.heads) == shape[1]


async def test_attention_is_causal_and_rows_sum_to_one(stub: Stub) -> None:
    response = await stub.Attention(pb.AttentionRequest(text=SIXTY_FOUR_TOKENS, include_scores=True))
    weights, scores = decode_tensor(response.weights), decode_tensor(response.scores)
    above = np.triu(np.ones((64, 64), dtype=bool), k=1)
    assert (weights[..., above] == 0).all() and np.isneginf(scores[..., above]).all()
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=1e-5)


async def test_scores_are_left_out_unless_asked_for(stub: Stub) -> None:
    response = await stub.Attention(pb.AttentionRequest(text=CAT))
    assert not response.HasField("scores")


async def test_hidden_states_norms_always_vectors_on_request(stub: Stub) -> None:
    norms_only = await stub.HiddenStates(pb.HiddenStatesRequest(text=CAT))
    assert decode_tensor(norms_only.norms).shape == (3, 4) and not norms_only.HasField("vectors")
    last = await stub.HiddenStates(pb.HiddenStatesRequest(text=CAT, last_token_only=True, include_vectors=True))
    vectors = decode_tensor(last.vectors)
    assert vectors.shape == (3, 1, 64) and list(last.positions) == [3]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), decode_tensor(last.norms), rtol=1e-5)


# -- the LM head, trace --------------------------------------------------------------------------


async def test_predict_next_equals_the_inspector(stub: Stub, tiny: LoadedModel) -> None:
    response = await stub.PredictNext(
        pb.PredictNextRequest(text=CAT, temperature=0.7, top_k=50, seed=3, num_samples=4, num_candidates=5)
    )
    expected = Inspector(tiny).predict_next(CAT, temperature=0.7, top_k=50, seed=3, num_samples=4, num_candidates=5)

    # Ids and texts exactly; numbers to float32 rounding (the engine thread may use fewer
    # intra-op threads than this one, which changes the order of a reduction's sums).
    def same(got: Sequence[pb.Candidate], want: Sequence[Candidate]) -> None:
        assert [(c.id, c.text) for c in got] == [(c.id, c.text) for c in want]
        for g, w in zip(got, want, strict=True):
            numbers = (g.logit, g.probability, g.sampled_probability)
            assert numbers == pytest.approx((w.logit, w.probability, w.sampled_probability), rel=1e-5, abs=1e-9)

    same(response.candidates, expected.candidates)
    same([response.greedy_token], [expected.greedy_token])
    same(response.sampled_tokens, expected.sampled_tokens)
    assert response.seed == 3 and response.entropy == pytest.approx(expected.entropy, rel=1e-5)
    assert response.sampled_entropy == pytest.approx(expected.sampled_entropy, rel=1e-5)


async def test_predict_next_defaults_are_the_inspector_s(stub: Stub) -> None:
    response = await stub.PredictNext(pb.PredictNextRequest(text=CAT))
    assert len(response.candidates) == 10 and len(response.sampled_tokens) == 1 and response.seed > 0


async def test_trace_lists_every_stage_with_the_prediction(stub: Stub) -> None:
    response = await stub.Trace(pb.TraceRequest(text=CAT, seed=1, temperature=0))
    names = [s.name for s in response.stages]
    assert names == [
        "tokenizer", "embedding", "block.0.attention", "block.0.mlp", "block.1.attention", "block.1.mlp",
        "final_layer_norm", "lm_head", "sampling",
    ]  # fmt: skip
    by_name = {s.name: s for s in response.stages}
    assert by_name["block.1.mlp"].layer == 1 and not by_name["embedding"].HasField("layer")
    assert list(by_name["embedding"].output_shape) == [4, 64] and list(by_name["lm_head"].output_shape) == [50257]
    assert not by_name["tokenizer"].HasField("output_stats") and by_name["lm_head"].HasField("output_stats")
    assert response.prediction.sampled_tokens[0].id == response.prediction.greedy_token.id  # temperature 0


# -- limits and errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (pb.AttentionRequest(text=CAT, layers=[2]), ["layers"]),
        (pb.AttentionRequest(text=CAT, heads=[0, 5]), ["heads"]),
        (pb.AttentionRequest(text=CAT, layers=[9], heads=[9]), ["layers", "heads"]),
        (pb.HiddenStatesRequest(text=CAT, layers=[3]), ["layers"]),
        (pb.EmbedRequest(token_ids=common_pb2.TokenIds(ids=[1, 60000])), ["token_ids.ids"]),
        (pb.EmbedRequest(text=""), ["text"]),
        (pb.EmbedRequest(), ["text"]),
        (pb.EmbedRequest(text=CAT, dtype=7), ["dtype"]),  # type: ignore[arg-type]
        (pb.PredictNextRequest(text=CAT, top_p=0, num_samples=5000), ["top_p", "num_samples"]),
        (pb.PredictNextRequest(text=" x" * 129), ["text"]),
    ],
    ids=["layer", "head", "both", "hidden-layer", "token-id", "empty", "no-input", "dtype", "sampling", "too-long"],
)
async def test_bad_fields_are_invalid_argument_naming_them(served: Served, request_: object, fields: list[str]) -> None:
    rpc = {"AttentionRequest": "Attention", "HiddenStatesRequest": "HiddenStates", "EmbedRequest": "Embed",
           "PredictNextRequest": "PredictNext"}[type(request_).__name__]  # fmt: skip
    async with served.channel() as channel:
        stub = introspection_pb2_grpc.IntrospectionStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await getattr(stub, rpc)(request_)
    error = rich_error(caught.value)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT and error.domain == "gpt2.v1" and error.request_id
    assert error.fields == fields


@pytest.fixture
async def small_limit(tiny: LoadedModel) -> AsyncIterator[Stub]:
    config = dataclasses.replace(API_SERVER_CONFIG, max_introspection_bytes=20_000)
    async with serve(tiny, server_config=config) as served, served.channel() as channel:
        yield introspection_pb2_grpc.IntrospectionStub(channel)


@pytest.mark.parametrize(
    ("request_", "rpc", "fields"),
    [
        (pb.AttentionRequest(text=SIXTY_FOUR_TOKENS), "Attention", ["layers", "heads", "text"]),
        (pb.AttentionRequest(text=SIXTY_FOUR_TOKENS, layers=[0], heads=[0], include_scores=True), "Attention",
         ["include_scores", "text"]),
        (pb.HiddenStatesRequest(text=SIXTY_FOUR_TOKENS, include_vectors=True), "HiddenStates",
         ["include_vectors", "layers", "last_token_only", "text"]),
    ],
    ids=["attention", "scores", "hidden"],
)  # fmt: skip
async def test_an_oversized_response_names_the_options_to_narrow(
    small_limit: Stub, request_: object, rpc: str, fields: list[str]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(small_limit, rpc)(request_)
    error = rich_error(caught.value)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT and error.reason == RESPONSE_TOO_LARGE
    assert error.fields == fields and "over the limit of 19.5 KiB" in error.message


async def test_a_narrowed_request_fits_under_the_limit(small_limit: Stub) -> None:
    response = await small_limit.Attention(pb.AttentionRequest(text=SIXTY_FOUR_TOKENS, layers=[1], heads=[0]))
    assert decode_tensor(response.weights).shape == (1, 1, 64, 64)


def test_the_limit_never_exceeds_the_message_size() -> None:
    from gpt2_service.api.introspection import FRAMING_BYTES, max_response_bytes

    config = ServerConfig(max_message_bytes=4 * 2**20, max_introspection_bytes=64 * 2**20)
    assert max_response_bytes(config) == 4 * 2**20 - FRAMING_BYTES


# -- lifecycle: gate, health, reflection ---------------------------------------------------------


async def test_unavailable_while_loading_and_while_draining(tiny: LoadedModel) -> None:
    async with serve(tiny, attach=False) as served, served.channel() as channel:
        stub = introspection_pb2_grpc.IntrospectionStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as loading:
            await stub.Tokenize(pb.TokenizeRequest(text=CAT))
        await served.server.attach(served.engine)
        await stub.Tokenize(pb.TokenizeRequest(text=CAT))
        served.server.gate.close()
        with pytest.raises(grpc.aio.AioRpcError) as draining:
            await stub.Attention(pb.AttentionRequest(text=CAT))
    assert rich_error(loading.value).reason == "NOT_READY" and rich_error(draining.value).reason == "DRAINING"
    assert loading.value.code() is draining.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_health_reports_introspection_serving_once_attached(tiny: LoadedModel) -> None:
    async with serve(tiny, attach=False) as served, served.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="gpt2.v1.Introspection")
        before = (await health.Check(request)).status
        await served.server.attach(served.engine)
        after = (await health.Check(request)).status
    assert INTROSPECTION_SERVICE == "gpt2.v1.Introspection"
    assert before == health_pb2.HealthCheckResponse.NOT_SERVING and after == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_and_describes_introspection(served: Served) -> None:
    async with served.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="gpt2.v1.Introspection")]  # fmt: skip
        responses = [r async for r in stub.ServerReflectionInfo(iter(requests))]
    assert "gpt2.v1.Introspection" in {s.name for s in responses[0].list_services_response.service}
    assert responses[1].file_descriptor_response.file_descriptor_proto, "no descriptor for gpt2.v1.Introspection"


# -- next to live streams ------------------------------------------------------------------------


def _stream_requests() -> list[gen_pb.GenerateRequest]:
    """Eight streams: four greedy, four seeded samples, of different prompts."""
    requests = [greedy(f"Stream {i} says", max_new_tokens=24) for i in range(4)]
    for i in range(4):
        request = greedy(f"Sampled {i}:", max_new_tokens=24)
        request.sampling.CopyFrom(gen_pb.SamplingParams(temperature=0.9, top_k=40, seed=100 + i))
        requests.append(request)
    return requests


async def _generate_all(served: Served, introspect: bool) -> tuple[list[list[tuple[int, float]]], int]:
    """(token id, log-probability) of the eight streams' tokens, and how many introspection calls
    finished while they ran.
    Every stream is decoding (first message read) before introspection starts, so both runs
    batch the same sequences at every step."""
    async with served.channel() as channel:
        from gpt2_client.proto import generation_pb2_grpc

        generation = generation_pb2_grpc.TextGenerationStub(channel)
        inspect: Stub = introspection_pb2_grpc.IntrospectionStub(channel)
        calls = [generation.GenerateStream(r) for r in _stream_requests()]
        firsts = [await call.read() for call in calls]
        done = asyncio.Event()
        num_calls = 0

        async def introspection_loop() -> None:
            nonlocal num_calls
            jobs: list[Callable[[], Awaitable[object]]] = [
                lambda: inspect.Attention(pb.AttentionRequest(text=SIXTY_FOUR_TOKENS)),
                lambda: inspect.PredictNext(pb.PredictNextRequest(text=CAT, seed=1, num_samples=8)),
                lambda: inspect.HiddenStates(pb.HiddenStatesRequest(text=CAT, include_vectors=True)),
                lambda: inspect.Trace(pb.TraceRequest(text=CAT)),
                lambda: inspect.Embed(pb.EmbedRequest(text=SIXTY_FOUR_TOKENS, dtype=pb.TENSOR_DTYPE_BFLOAT16)),
            ]
            while not done.is_set():
                await asyncio.gather(*(job() for job in jobs))  # several at once: they queue on the engine
                num_calls += len(jobs)

        async def rest(call: Any, first: Any) -> list[tuple[int, float]]:
            tokens = [(t.id, t.logprob) for t in first.tokens]
            while (message := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]  # untyped in grpc-stubs
                tokens += [(t.id, t.logprob) for t in message.tokens]
            return tokens

        prober = asyncio.create_task(introspection_loop()) if introspect else None
        outputs = await asyncio.gather(*(rest(c, f) for c, f in zip(calls, firsts, strict=True)))
        done.set()
        if prober is not None:
            await prober
    return outputs, num_calls


async def test_streams_are_unchanged_by_concurrent_introspection(served: Served) -> None:
    alone, _ = await _generate_all(served, introspect=False)
    beside, num_calls = await _generate_all(served, introspect=True)
    assert all(len(ids) == 24 for ids in alone)
    assert beside == alone
    assert num_calls >= 5, f"only {num_calls} introspection calls overlapped the streams"


async def test_seeded_streams_are_bitwise_the_same_alone_and_beside_streams_and_introspection(
    served: Served,
) -> None:
    """Determinism by default: each stream run on its own, with nothing else on the server, gives
    the tokens and log-probabilities it gives in a batch of eight while introspection runs."""
    from gpt2_client.proto import generation_pb2_grpc

    assert served.engine.batch_invariant
    async with served.channel() as channel:
        generation = generation_pb2_grpc.TextGenerationStub(channel)
        alone = [
            [(t.id, t.logprob) for m in [m async for m in generation.GenerateStream(r)] for t in m.tokens]
            for r in _stream_requests()
        ]
    together, num_calls = await _generate_all(served, introspect=True)
    assert together == alone
    assert num_calls >= 5, f"only {num_calls} introspection calls overlapped the streams"


async def test_one_introspection_pass_at_most_between_two_engine_steps(served: Served) -> None:
    async with served.channel() as channel:
        from gpt2_client.proto import generation_pb2_grpc

        call = generation_pb2_grpc.TextGenerationStub(channel).GenerateStream(greedy(max_new_tokens=400))
        await first_message(call)
        engine = served.engine
        steps = await asyncio.gather(*(engine.run_exclusive(lambda: engine.stats.num_steps) for _ in range(6)))
        call.cancel()
    assert len(set(steps)) == len(steps), f"jobs ran back to back between steps: {steps}"
