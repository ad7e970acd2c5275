"""Constrained generation (issue 15): every output of a regex, a JSON schema or a choice matches
it, over hundreds of seeded random-weight generations; constraints compose with the rest of a
request; bad constraints are INVALID_ARGUMENT with the library's message."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import AsyncIterator

import grpc
import jsonschema
import pytest
from gpt2_client.proto import generation_pb2 as pb
from gpt2_service.config import EngineConfig
from gpt2_service.core.request import ConstraintSpec, FinishReason, GenerationRequest, Overflow, StoppingCriteria
from gpt2_service.core.sequence import Finished, GenerationOutput
from gpt2_service.engine.frontend import Engine
from gpt2_service.model.weights import LoadedModel

from tests.api_helpers import rich_error, serve, stub_for, wait_for_slots_free
from tests.engine_helpers import request, run

DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
NUMBER = r"-?(0|[1-9][0-9]{0,8})(\.[0-9]{1,4})?"
CHOICES = ("positive", "negative", "neutral", "mixed", "unknown")
SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "age", "tags", "address"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "additionalProperties": False,
            "required": ["city", "zip"],
            "properties": {
                "city": {"type": "string", "pattern": "^[A-Z][a-z]{0,8}$"},
                "zip": {"type": "integer", "minimum": 10000, "maximum": 99999},
            },
        },
    },
}
RUNS = 200


def constrained(
    spec: ConstraintSpec, seed: int, max_new_tokens: int = 200, **sampling: float | int
) -> GenerationRequest:
    req = request([464, 1332, 318], max_new_tokens=max_new_tokens, temperature=1.0, seed=seed, **sampling)
    return dataclasses.replace(req, constraint=spec, stopping=dataclasses.replace(req.stopping, ignore_eos=False))


@pytest.fixture
async def wide(tiny: LoadedModel) -> AsyncIterator[Engine]:
    engine = Engine(
        tiny,
        EngineConfig(
            model="random:tiny", max_batch_size=32, max_queue_size=512, max_queued_per_tenant=512, max_prefill_tokens=64
        ),
    )
    await engine.start()
    yield engine
    await engine.shutdown()


async def outputs_of(engine: Engine, spec: ConstraintSpec, runs: int = RUNS, **sampling: float | int) -> list[Finished]:
    results = await asyncio.gather(*(run(engine, constrained(spec, seed, **sampling)) for seed in range(runs)))
    return [finished for _, finished in results]


@pytest.mark.parametrize("pattern", [DATE, NUMBER])
async def test_every_output_matches_the_regex(wide: Engine, pattern: str) -> None:
    finished = await outputs_of(wide, ConstraintSpec("regex", pattern))
    assert {f.reason for f in finished} == {FinishReason.CONSTRAINT_COMPLETE}
    assert all(re.fullmatch(pattern, f.text) for f in finished), [
        f.text for f in finished if not re.fullmatch(pattern, f.text)
    ]
    assert len({f.text for f in finished}) > RUNS // 2  # sampled, not one answer


async def test_every_output_is_valid_json_under_the_schema(wide: Engine) -> None:
    finished = await outputs_of(wide, ConstraintSpec("json_schema", json.dumps(SCHEMA)))
    assert {f.reason for f in finished} == {FinishReason.CONSTRAINT_COMPLETE}
    for f in finished:
        jsonschema.validate(json.loads(f.text), SCHEMA)
    assert any("role" in json.loads(f.text) for f in finished) and any(json.loads(f.text)["tags"] for f in finished)
    assert wide.constraints.compilations == 1  # compiled once, copied per request


async def test_every_output_is_one_of_the_choices(wide: Engine) -> None:
    finished = await outputs_of(wide, ConstraintSpec("choice", options=CHOICES), top_k=40, top_p=0.9)
    assert {f.reason for f in finished} == {FinishReason.CONSTRAINT_COMPLETE}
    assert {f.text for f in finished} == set(CHOICES)  # each of the five, and nothing else


async def test_a_grammar_constrains_too(engine: Engine) -> None:
    grammar = 'start: greeting " " name\ngreeting: "hello" | "hi"\nname: /[A-Z][a-z]{1,6}/'
    finished = await outputs_of(engine, ConstraintSpec("grammar", grammar), runs=20)
    assert all(re.fullmatch(r"(hello|hi) [A-Z][a-z]{1,6}", f.text) for f in finished)


async def test_logprobs_are_those_of_the_masked_distribution(engine: Engine) -> None:
    req = dataclasses.replace(constrained(ConstraintSpec("choice", options=("yes", "no")), 3), top_logprobs=5)
    outputs, finished = await run(engine, req)
    first = outputs[0].tokens[0]
    allowed = [t for t in first.top_logprobs if t.logprob > float("-inf")]
    assert all("yes".startswith(t.text) or "no".startswith(t.text) for t in allowed), allowed  # "y", "ye", "n", ...
    assert sum(2.718281828459045**t.logprob for t in first.top_logprobs) == pytest.approx(1.0, abs=1e-5)
    assert finished.text in ("yes", "no")


async def test_constraints_compose_with_stops_penalties_and_min_new_tokens(engine: Engine) -> None:
    letters = ConstraintSpec("regex", r"[a-c]{8}")
    stopped_req = constrained(letters, 1)
    stopped_req = dataclasses.replace(stopped_req, stopping=dataclasses.replace(stopped_req.stopping, stop=("c",)))
    _, stopped = await run(engine, stopped_req)
    assert stopped.reason is FinishReason.STOP_SEQUENCE and re.fullmatch(r"[ab]*", stopped.text)
    _, penalised = await run(engine, constrained(letters, 2, repetition_penalty=1.3, frequency_penalty=0.5))
    assert penalised.reason is FinishReason.CONSTRAINT_COMPLETE and re.fullmatch(r"[a-c]{8}", penalised.text)
    early = constrained(ConstraintSpec("choice", options=("ok",)), 4)
    early = dataclasses.replace(early, stopping=dataclasses.replace(early.stopping, min_new_tokens=5))
    _, done = await run(engine, early)  # the constraint cannot go on: it ends the generation all the same
    assert (done.reason, done.text) == (FinishReason.CONSTRAINT_COMPLETE, "ok")


async def test_an_unsatisfiable_constraint_ends_with_constraint_unsatisfied(engine: Engine) -> None:
    _, finished = await run(engine, constrained(ConstraintSpec("regex", r"[0-9]{60}"), 5, max_new_tokens=10))
    assert finished.reason is FinishReason.CONSTRAINT_UNSATISFIED
    assert re.fullmatch(r"[0-9]+", finished.text) and len(finished.token_ids) == 10  # a beginning of a match
    banned_all = dataclasses.replace(
        constrained(ConstraintSpec("choice", options=("yes",)), 6),
    )
    banned_all = dataclasses.replace(
        banned_all,
        sampling=dataclasses.replace(banned_all.sampling, banned_token_ids=tuple(engine.tokenizer.encode("yes")[:1])),
    )
    _, dead = await run(engine, banned_all)
    assert (dead.reason, dead.text) == (FinishReason.CONSTRAINT_UNSATISFIED, "")


async def test_the_constraint_survives_a_context_shift(tiny: LoadedModel) -> None:
    engine = Engine(tiny, EngineConfig(model="random:tiny", max_batch_size=4, context_window=64, max_prefill_tokens=32))
    await engine.start()
    try:
        req = constrained(ConstraintSpec("regex", r"(ab|cd){100}"), 7, max_new_tokens=300)
        req = dataclasses.replace(req, overflow=Overflow.SHIFT)
        _, finished = await run(engine, req)
    finally:
        await engine.shutdown()
    assert finished.usage.context_shifts >= 1
    assert finished.reason is FinishReason.CONSTRAINT_COMPLETE and re.fullmatch(r"(ab|cd){100}", finished.text)


async def test_constrained_tokens_are_bitwise_the_same_alone_or_in_a_mixed_batch(engine: Engine) -> None:
    spec = ConstraintSpec("json_schema", json.dumps(SCHEMA))
    alone, _ = await run(engine, constrained(spec, 9))
    others = [request([50256] * i, max_new_tokens=30, temperature=1.0, seed=i) for i in range(1, 6)]
    together = await asyncio.gather(run(engine, constrained(spec, 9)), *(run(engine, o) for o in others))

    def numbers(outputs: list[GenerationOutput]) -> list[tuple[int, float]]:
        return [(t.id, t.logprob) for o in outputs for t in o.tokens]

    assert numbers(together[0][0]) == numbers(alone)


@pytest.mark.parametrize(
    ("constraint", "field", "message"),
    [
        (pb.Constraint(regex="(ab"), "constraint.regex", "unclosed group"),
        (pb.Constraint(json_schema="{not json"), "constraint.json_schema", "key must be a string"),
        (pb.Constraint(json_schema='{"type": "objectx"}'), "constraint.json_schema", "objectx"),
        (pb.Constraint(grammar="start: foo"), "constraint.grammar", "foo"),
        (pb.Constraint(choice=pb.ChoiceList(options=["a", "a"])), "constraint.choice.options", "distinct"),
        (pb.Constraint(regex="x" * 4097), "constraint.regex", "4096"),
    ],
)
async def test_a_bad_constraint_is_invalid_argument_with_the_librarys_message(
    tiny: LoadedModel, constraint: pb.Constraint, field: str, message: str
) -> None:
    async with serve(tiny) as served, stub_for(served) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Generate(pb.GenerateRequest(prompt="Hi", constraint=constraint))
        assert served.engine.accepting  # and the server goes on
        await wait_for_slots_free(served.engine)
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    details = rich_error(error.value)
    assert details.fields == [field]
    assert message in error.value.details() or message in str(error.value.trailing_metadata())


async def test_a_stream_of_a_constrained_generation_adds_up_and_ends_complete(tiny: LoadedModel) -> None:
    message = pb.GenerateRequest(
        prompt="Answer:",
        sampling=pb.SamplingParams(seed=3),
        stopping=pb.StoppingCriteria(max_new_tokens=100),
        constraint=pb.Constraint(json_schema=json.dumps(SCHEMA)),
    )
    async with serve(tiny) as served, stub_for(served) as stub:
        unary = await stub.Generate(message)
        streamed = [m async for m in stub.GenerateStream(message)]
    assert unary.finish_reason == pb.CONSTRAINT_COMPLETE
    jsonschema.validate(json.loads(unary.text), SCHEMA)
    assert "".join(m.text for m in streamed) == unary.text and streamed[-1].finish_reason == pb.CONSTRAINT_COMPLETE


def test_stopping_defaults_leave_constraints_off() -> None:
    assert StoppingCriteria().bad_words == ()
