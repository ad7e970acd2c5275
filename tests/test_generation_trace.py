"""TraceGeneration (random:tiny): each step is PredictNext on the context so far, the chosen
tokens are Generate's, the filters' stages zero what they remove, stop and shift events, input
errors with field paths, the model-RPC limit, and ``gpt2-client generate --trace`` (table, JSON, PNG)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from gpt2_client import Client, plots
from gpt2_client.cli import main
from gpt2_client.proto import common_pb2, generation_pb2_grpc, introspection_pb2_grpc
from gpt2_client.proto import generation_pb2 as gen_pb
from gpt2_client.proto import introspection_pb2 as pb
from gpt2_service.introspection.inspector import Inspector
from gpt2_service.model.weights import LoadedModel
from PIL import Image

from tests.api_helpers import API_ENGINE_CONFIG, API_SERVER_CONFIG, Served, rich_error, serve

CAT = "cat sat on the"
SEED = 11
SETTINGS = {
    "greedy": {"temperature": 0.0},
    "plain": {"temperature": 1.0},
    "top-k": {"temperature": 0.7, "top_k": 50},
    "filters": {"temperature": 1.3, "top_k": 200, "top_p": 0.9, "min_p": 0.01, "typical_p": 0.95},
}

if TYPE_CHECKING:
    Stub = introspection_pb2_grpc.IntrospectionAsyncStub  # in the .pyi only


@pytest.fixture
async def served(tiny: LoadedModel) -> AsyncIterator[Served]:
    async with serve(tiny) as s:
        yield s


@pytest.fixture
async def stub(served: Served) -> AsyncIterator[Stub]:
    async with served.channel() as channel:
        yield introspection_pb2_grpc.IntrospectionStub(channel)


async def _trace(stub: Stub, **fields: Any) -> list[pb.GenerationStep]:
    return [m async for m in stub.TraceGeneration(pb.TraceGenerationRequest(**fields))]


# -- each step is PredictNext ---------------------------------------------------------------------


@pytest.mark.parametrize("options", SETTINGS.values(), ids=SETTINGS.keys())
def test_each_step_is_predict_next_on_its_context_with_the_same_seed(
    tiny: LoadedModel, options: dict[str, Any]
) -> None:
    inspector = Inspector(tiny)
    steps = inspector.trace_generation(CAT, seed=SEED, max_new_tokens=6, ignore_eos=True, **options)
    assert [s.step for s in steps] == list(range(6)) and [s.stop for s in steps] == [None] * 5 + ["length"]
    context = inspector.tokenize(CAT).token_ids
    for step in steps:
        assert step.context_length == len(context) and step.seed == SEED and not step.shifted
        # step i's draw is the last of i + 1 draws of PredictNext on the same context and seed
        expected = inspector.predict_next(token_ids=context, seed=SEED, num_samples=step.step + 1, **options)
        assert [c.id for c in step.candidates] == [c.id for c in expected.candidates]
        for got, want in zip(step.candidates, expected.candidates, strict=True):
            assert got.logit == pytest.approx(want.logit, abs=1e-6)
            assert got.probability == pytest.approx(want.probability, abs=1e-6)
            assert got.after_typical_p == pytest.approx(want.sampled_probability, abs=1e-6)
        assert step.chosen.id == expected.sampled_tokens[-1].id
        assert step.entropy == pytest.approx(expected.entropy, abs=1e-6)
        assert step.sampled_entropy == pytest.approx(expected.sampled_entropy, abs=1e-5)
        if options["temperature"] == 0:
            assert step.chosen.id == expected.greedy_token.id and step.uniform is None and step.draw_index is None
        else:
            assert step.draw_index == step.step and step.uniform is not None and 0 <= step.uniform < 1
        context.append(step.chosen.id)
    assert steps[-1].text_so_far == tiny.tokenizer.decode([s.chosen.id for s in steps])


def test_top_k_leaves_k_tokens_and_each_stage_renormalises(tiny: LoadedModel) -> None:
    steps = Inspector(tiny).trace_generation(CAT, temperature=0.5, top_k=5, seed=3, max_new_tokens=3, num_candidates=10)
    for step in steps:
        candidates = step.candidates
        assert [c.rank for c in candidates] == list(range(1, 11))
        assert sum(c.after_top_k > 0 for c in candidates) == 5  # the top 5 of the raw distribution, no other
        assert all(c.after_top_k > 0 for c in candidates[:5])
        assert sum(c.after_top_k for c in candidates[:5]) == pytest.approx(1.0, abs=1e-5)
        assert sum(c.after_temperature for c in candidates) < 0.01  # before top-k: a nearly flat 50257-way softmax
        # stages not in use repeat the one before; the chosen token is one of the five
        assert all(c.after_top_p == c.after_min_p == c.after_typical_p == c.after_top_k for c in candidates)
        assert step.chosen.rank <= 5 and step.chosen.sampled_probability > 0


# -- what Generate does ---------------------------------------------------------------------------


def _generate_request(
    prompt: str, options: dict[str, Any], max_new_tokens: int, **stopping: Any
) -> gen_pb.GenerateRequest:
    return gen_pb.GenerateRequest(
        prompt=prompt,
        sampling=gen_pb.SamplingParams(seed=SEED, **options),
        stopping=gen_pb.StoppingCriteria(max_new_tokens=max_new_tokens, **stopping),
    )


@pytest.mark.parametrize("options", SETTINGS.values(), ids=SETTINGS.keys())
async def test_the_chosen_tokens_are_generates_tokens(served: Served, stub: Stub, options: dict[str, Any]) -> None:
    async with served.channel() as channel:
        generated = await generation_pb2_grpc.TextGenerationStub(channel).Generate(
            _generate_request(CAT, options, 12, ignore_eos=True)
        )
    steps = await _trace(stub, text=CAT, seed=SEED, max_new_tokens=12, ignore_eos=True, **options)
    assert [s.chosen.id for s in steps] == list(generated.token_ids)
    assert steps[-1].text_so_far == generated.text and steps[-1].stop == "length"


async def test_a_stop_string_ends_the_trace_as_it_ends_generate(served: Served, stub: Stub) -> None:
    free = await _trace(stub, text=CAT, temperature=0, max_new_tokens=6, ignore_eos=True)
    stop = free[2].chosen.text.strip() or free[2].chosen.text  # a string the third token completes
    steps = await _trace(stub, text=CAT, temperature=0, max_new_tokens=6, ignore_eos=True, stop=[stop])
    assert len(steps) <= 3 and steps[-1].stop == "stop_sequence"
    assert [s.stop for s in steps[:-1]] == [""] * (len(steps) - 1)
    async with served.channel() as channel:
        generated = await generation_pb2_grpc.TextGenerationStub(channel).Generate(
            _generate_request(CAT, {"temperature": 0.0}, 6, ignore_eos=True, stop=[stop])
        )
    assert generated.finish_reason == gen_pb.STOP_SEQUENCE
    assert [s.chosen.id for s in steps] == list(generated.token_ids)
    assert steps[-1].text_so_far == generated.text  # cut before the stop string


async def test_a_full_window_shifts_as_generate_does(served: Served, stub: Stub) -> None:
    window = API_ENGINE_CONFIG.context_window  # 128; the engine keeps its newest 96 on a shift
    assert window is not None
    prompt = " ".join(["word"] * (window - 1))  # "word" and " word" are one token each
    options = {"temperature": 0.8, "top_k": 40}
    steps = await _trace(stub, text=prompt, seed=SEED, max_new_tokens=5, ignore_eos=True, **options)
    assert [s.context_length for s in steps] == [window - 1, window, window * 3 // 4, window * 3 // 4 + 1, 98]
    assert [s.shifted for s in steps] == [False, False, True, False, False]
    async with served.channel() as channel:
        generated = await generation_pb2_grpc.TextGenerationStub(channel).Generate(
            _generate_request(prompt, options, 5, ignore_eos=True)
        )
    assert generated.usage.context_shifts == 1
    assert [s.chosen.id for s in steps] == list(generated.token_ids)


# -- errors and limits ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "paths"),
    [
        ({"text": CAT, "max_new_tokens": 0}, ["max_new_tokens"]),
        ({"text": CAT, "max_new_tokens": 65}, ["max_new_tokens"]),
        ({"text": CAT, "num_candidates": 51}, ["num_candidates"]),
        ({"text": CAT, "stop": ["a", "b", "c", "d", "e"]}, ["stop"]),
        ({"text": CAT, "stop": ["a", ""]}, ["stop[1]"]),
        ({"text": CAT, "top_p": 0.0, "temperature": -1.0}, ["temperature", "top_p"]),
        ({"token_ids": common_pb2.TokenIds(ids=[9246, 60000])}, ["token_ids.ids"]),
        ({"text": ""}, ["text"]),
        ({}, ["text"]),
    ],
    ids=["no-tokens", "too-many-tokens", "candidates", "stops", "empty-stop", "sampling", "id", "empty", "no-input"],
)  # fmt: skip
async def test_bad_input_is_invalid_argument_naming_the_field(
    stub: Stub, fields: dict[str, Any], paths: list[str]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _trace(stub, **fields)
    error = rich_error(caught.value)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(error.fields) == sorted(paths)


async def test_a_trace_holds_a_model_rpc_place_for_its_whole_stream(tiny: LoadedModel) -> None:
    config = dataclasses.replace(API_SERVER_CONFIG, max_model_rpcs=1)
    async with serve(tiny, server_config=config) as served, served.channel() as channel:
        stub: Stub = introspection_pb2_grpc.IntrospectionStub(channel)
        call = stub.TraceGeneration(pb.TraceGenerationRequest(text=CAT, max_new_tokens=64, ignore_eos=True))
        await call.read()  # the first step is out: the trace is running
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.PredictNext(pb.PredictNextRequest(text=CAT))
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert rich_error(caught.value).reason == "TOO_MANY_MODEL_RPCS"
        rest = []
        while (message := await call.read()) is not grpc.aio.EOF:
            rest.append(message)
        assert len(rest) == 63 and rest[-1].stop == "length"
        await stub.PredictNext(pb.PredictNextRequest(text=CAT))  # the place is free again


# -- the client and the command line --------------------------------------------------------------


async def test_the_client_returns_the_steps(served: Served, tiny: LoadedModel) -> None:
    with Client(served.target, timeout=30) as client:
        steps = await asyncio.to_thread(
            lambda: client.inspect.trace_generation(CAT, temperature=0.7, top_k=5, seed=SEED, max_new_tokens=3)
        )
    expected = Inspector(tiny).trace_generation(CAT, temperature=0.7, top_k=5, seed=SEED, max_new_tokens=3)
    assert [s.chosen.id for s in steps] == [s.chosen.id for s in expected]
    assert [s.uniform for s in steps] == pytest.approx([s.uniform for s in expected])
    assert steps[0].draw_index == 0 and steps[-1].stop == "length" and steps[0].stop is None


async def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    def run() -> int:
        try:
            main(list(argv))
        except SystemExit as exit_:
            return int(exit_.code or 0)
        return 0

    status = await asyncio.to_thread(run)
    out, err = capsys.readouterr()
    return status, out, err


async def test_generate_trace_prints_a_table_per_step(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = await _cli(capsys, "--target", served.target, "generate", CAT, "--trace", "--max-new-tokens",
                                  "3", "--temperature", "0.7", "--top-k", "5", "--seed", "1")  # fmt: skip
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("[random weights: an untrained model;") and "nearly flat (entropy " in lines[0]
    assert "T=0.7, top-k 5, top-p off, seed 1" in lines[1]
    for needle in ["step 0: context 4 tokens, entropy ", "nats raw,", "step 2: context 6 tokens", "p(T=0.7)", "p(top-k)", "raw p",
                   "(draw 0 of seed 1)", "(draw 2 of seed 1)", "[stop: length]", "text so far:"]:  # fmt: skip
        assert needle in out, f"{needle!r} missing from:\n{out}"
    assert "p(top-p)" not in out  # only the filters in use
    assert sum(line.startswith("  >") for line in lines) >= 1  # the chosen token marked (when a candidate)


async def test_generate_trace_json_and_flags_it_does_not_take(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = await _cli(capsys, "--target", served.target, "--json", "generate", CAT, "--trace",
                                  "--max-new-tokens", "2", "--temperature", "0")  # fmt: skip
    assert status == 0, err
    steps = json.loads(out)
    assert len(steps) == 2 and steps[0]["uniform"] is None and steps[1]["stop"] == "length"
    status, _, err = await _cli(capsys, "--target", served.target, "generate", CAT, "--trace", "--n", "2")
    assert status == 2 and "not --n" in err
    status, _, err = await _cli(capsys, "--target", served.target, "generate", CAT, "--png", "x.png")
    assert status == 2 and "--trace" in err


async def test_generate_trace_png_draws_the_steps_with_the_settings_in_the_title(
    served: Served, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    figures = []
    save = plots._save

    def keep(fig: Any, path: Any) -> Path:
        figures.append(fig)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    path = tmp_path / "steps.png"
    status, _, err = await _cli(capsys, "--target", served.target, "generate", CAT, "--trace", "--max-new-tokens", "4",
                                "--temperature", "0.7", "--top-k", "5", "--seed", "1", "--png", str(path))  # fmt: skip
    assert status == 0, err and f"[wrote {path}]" in err
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    (figure,) = figures
    (ax,) = [a for a in figure.axes if a.get_title()]
    title = ax.get_title()
    assert "T=0.7" in title and "top-k 5" in title and "top-p off" in title and "random weights" in title
    assert len(ax.get_yticklabels()) == 4 and ax.get_yticklabels()[0].get_text().startswith("0: ctx 4")
    assert len(ax.texts) == 4 * 5  # a token label in every cell
