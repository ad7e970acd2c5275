"""Every invalid request is refused with a violation naming each bad field; nothing is enqueued."""

from __future__ import annotations

import dataclasses

import pytest
from gpt2_service.core.request import (
    GenerationRequest,
    RequestLimits,
    SamplingParams,
    StoppingCriteria,
    find_violations,
)
from gpt2_service.engine.frontend import Engine
from gpt2_service.errors import (
    MAX_DESCRIPTION_CHARS,
    MAX_MESSAGE_CHARS,
    MAX_REPORTED_VIOLATIONS,
    InvalidRequestError,
    Violations,
)

LIMITS = RequestLimits(vocab_size=50257, max_new_tokens_limit=512)
BASE = GenerationRequest(request_id="r", prompt="hi")
NAN = float("nan")


def with_sampling(**kw: object) -> GenerationRequest:
    return dataclasses.replace(BASE, sampling=SamplingParams(**kw))  # type: ignore[arg-type]


def with_stopping(**kw: object) -> GenerationRequest:
    return dataclasses.replace(BASE, stopping=StoppingCriteria(**kw))  # type: ignore[arg-type]


CASES = {
    "sampling.temperature": [
        with_sampling(temperature=-0.1),
        with_sampling(temperature=NAN),
        with_sampling(temperature=float("inf")),
    ],
    "sampling.top_k": [with_sampling(top_k=-1)],
    "sampling.top_p": [with_sampling(top_p=0.0), with_sampling(top_p=1.01), with_sampling(top_p=NAN)],
    "sampling.min_p": [with_sampling(min_p=-0.1), with_sampling(min_p=1.5)],
    "sampling.typical_p": [with_sampling(typical_p=0.0), with_sampling(typical_p=2.0)],
    "sampling.repetition_penalty": [with_sampling(repetition_penalty=0.0), with_sampling(repetition_penalty=NAN)],
    "sampling.presence_penalty": [with_sampling(presence_penalty=2.5)],
    "sampling.frequency_penalty": [with_sampling(frequency_penalty=-3.0)],
    "sampling.seed": [with_sampling(seed=-1), with_sampling(seed=2**64)],
    "stopping.max_new_tokens": [with_stopping(max_new_tokens=0), with_stopping(max_new_tokens=513)],
    "stopping.min_new_tokens": [with_stopping(min_new_tokens=-1), with_stopping(max_new_tokens=5, min_new_tokens=6)],
    "stopping.stop": [with_stopping(stop=tuple(str(i) for i in range(17)))],
    "stopping.stop[1]": [with_stopping(stop=("ok", "x" * 257)), with_stopping(stop=("ok", ""))],
    "stopping.stop_token_ids[0]": [with_stopping(stop_token_ids=(50257,)), with_stopping(stop_token_ids=(-1,))],
    "prompt_token_ids[2]": [GenerationRequest(request_id="r", prompt_token_ids=(1, 2, 50257))],
    "top_logprobs": [dataclasses.replace(BASE, top_logprobs=21), dataclasses.replace(BASE, top_logprobs=-1)],
}


@pytest.mark.parametrize(
    ("field", "req"), [(f, r) for f, rs in CASES.items() for r in rs], ids=lambda x: x if isinstance(x, str) else ""
)
def test_each_bad_field_is_named(field: str, req: GenerationRequest) -> None:
    assert [v.field for v in find_violations(req, LIMITS)] == [field]


def test_every_bad_field_is_named_at_once() -> None:
    req = dataclasses.replace(
        BASE, sampling=SamplingParams(temperature=-1, top_p=2), stopping=StoppingCriteria(max_new_tokens=0)
    )
    fields = {v.field for v in find_violations(req, LIMITS)}
    assert fields == {"sampling.temperature", "sampling.top_p", "stopping.max_new_tokens"}


def test_a_valid_request_has_no_violations() -> None:
    req = dataclasses.replace(
        BASE,
        sampling=SamplingParams(
            temperature=0.7,
            top_k=40,
            top_p=0.9,
            min_p=0.05,
            typical_p=0.95,
            repetition_penalty=1.2,
            presence_penalty=-2,
            frequency_penalty=2,
            seed=2**64 - 1,
        ),
        stopping=StoppingCriteria(max_new_tokens=512, min_new_tokens=512, stop=("\n",) * 16, stop_token_ids=(0, 50256)),
        top_logprobs=20,
    )
    assert not find_violations(req, LIMITS)


async def test_the_engine_enqueues_nothing_for_an_invalid_request(engine: Engine) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await engine.submit(with_sampling(top_p=0.0, top_k=-2))
    assert {v.field for v in info.value.violations} == {"sampling.top_p", "sampling.top_k"}
    assert engine.num_in_flight == 0 and engine.stats.num_steps == 0


def test_a_list_over_its_limit_is_one_violation_whatever_it_holds() -> None:
    req = dataclasses.replace(BASE, stopping=StoppingCriteria(stop=("",) * 100_000, stop_token_ids=(-1,) * 100_000))
    violations = find_violations(req, LIMITS)
    assert [v.field for v in violations] == ["stopping.stop", "stopping.stop_token_ids"]
    assert len(violations) == 2


def test_at_most_eight_violations_are_reported_and_the_rest_counted() -> None:
    bad = Violations()
    for i in range(20):
        bad.add(f"field{i}", "x" * 10_000)
    with pytest.raises(InvalidRequestError) as caught:
        bad.raise_if_any()
    error = caught.value
    assert len(error.violations) == MAX_REPORTED_VIOLATIONS
    assert error.num_omitted == 12
    assert all(len(v.description) <= MAX_DESCRIPTION_CHARS for v in error.violations)
    assert len(str(error)) <= MAX_MESSAGE_CHARS
    assert str(error).endswith("(and 18 more)")
