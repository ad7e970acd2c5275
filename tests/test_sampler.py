"""The sampler's filters and penalties against Hugging Face's logits processors and the
definitions of the OpenAI penalties."""

from __future__ import annotations

import pytest
import torch
from gpt2_service.core.request import SamplingParams
from gpt2_service.engine.sampler import (
    FilterParams,
    RowState,
    Sampler,
    apply_filters,
    apply_penalties,
    draw,
    next_uniforms,
)
from transformers.generation import logits_process as hf

V = 1000


def logits(rows: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def filters(**kw: float) -> FilterParams:
    return FilterParams.from_params([SamplingParams(**kw)] * 4, torch.device("cpu"))  # type: ignore[arg-type]


def same_support_and_values(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = ~torch.isinf(theirs)
    assert torch.allclose(ours[finite], theirs[finite])


@pytest.mark.parametrize(
    ("params", "processor"),
    [
        (dict(top_k=1), hf.TopKLogitsWarper(1)),
        (dict(top_k=50), hf.TopKLogitsWarper(50)),
        (dict(top_p=0.3), hf.TopPLogitsWarper(0.3)),
        (dict(top_p=0.9), hf.TopPLogitsWarper(0.9)),
        (dict(min_p=0.1), hf.MinPLogitsWarper(0.1)),
        (dict(typical_p=0.5), hf.TypicalLogitsWarper(0.5)),
        (dict(typical_p=0.95), hf.TypicalLogitsWarper(0.95)),
        (dict(temperature=0.7), hf.TemperatureLogitsWarper(0.7)),
    ],
    ids=lambda x: str(x) if isinstance(x, dict) else "",
)
def test_filter_matches_hugging_face(params: dict[str, float], processor: hf.LogitsProcessor) -> None:
    x = logits()
    same_support_and_values(apply_filters(x, filters(**params)), processor(None, x.clone()))  # type: ignore[arg-type]


def test_filters_combine_in_hugging_face_order() -> None:
    x = logits()
    chain = hf.LogitsProcessorList(
        [hf.TemperatureLogitsWarper(0.8), hf.TopKLogitsWarper(100), hf.TopPLogitsWarper(0.9), hf.MinPLogitsWarper(0.02)]
    )
    ours = apply_filters(x, filters(temperature=0.8, top_k=100, top_p=0.9, min_p=0.02))
    same_support_and_values(ours, chain(None, x.clone()))  # type: ignore[arg-type]


def test_each_row_gets_its_own_filter() -> None:
    x = logits(3)
    params = [SamplingParams(top_k=5), SamplingParams(), SamplingParams(top_p=0.5)]
    ours = apply_filters(x, FilterParams.from_params(params, torch.device("cpu")))
    assert int((~torch.isinf(ours[0])).sum()) == 5
    assert torch.equal(ours[1], x[1])
    same_support_and_values(ours[2:], hf.TopPLogitsWarper(0.5)(None, x[2:].clone()))  # type: ignore[arg-type]


def test_repetition_penalty_matches_hugging_face() -> None:
    x = logits(1)
    seen = [3, 3, 17, 999, 0]
    row = RowState(SamplingParams(repetition_penalty=1.5), None, context_ids=seen)
    expected = hf.RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([seen]), x.clone())
    assert torch.allclose(apply_penalties(x.clone(), [row]), expected)


def test_presence_and_frequency_penalties_follow_their_definition() -> None:
    x = logits(1)
    out = [5, 5, 5, 9]
    row = RowState(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), None, output_ids=out)
    got = apply_penalties(x.clone(), [row])
    expected = x.clone()
    expected[0, 5] -= 3 * 0.25 + 0.5
    expected[0, 9] -= 1 * 0.25 + 0.5
    assert torch.allclose(got, expected)


def test_temperature_zero_is_greedy() -> None:
    x = logits(2)
    result = Sampler().sample(x, [RowState(SamplingParams(temperature=0.0), None)] * 2)
    assert result.token_ids == x.argmax(-1).tolist()


def test_a_tiny_temperature_converges_to_greedy() -> None:
    x = logits(2)
    rows = [RowState(SamplingParams(temperature=1e-4), torch.Generator().manual_seed(i)) for i in range(2)]
    assert Sampler().sample(x, rows).token_ids == x.argmax(-1).tolist()


def test_draws_follow_the_filtered_distribution() -> None:
    x = torch.full((1, V), -10.0)
    x[0, :4] = torch.tensor([2.0, 1.0, 0.0, 5.0])
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(V)
    sampler = Sampler()
    for _ in range(2000):
        token = sampler.sample(x, [RowState(SamplingParams(top_k=3), gen)]).token_ids[0]
        counts[token] += 1
    assert counts[2] == 0 and counts[4:].sum() == 0  # outside the top 3
    probs = torch.tensor([2.0, 1.0, 5.0]).softmax(0)
    observed = counts[[0, 1, 3]] / 2000
    assert torch.allclose(observed, probs, atol=0.03)


def test_a_seeded_draw_does_not_depend_on_the_other_rows() -> None:
    x = logits(4)
    alone = Sampler().sample(x[2:3], [RowState(SamplingParams(), torch.Generator().manual_seed(9))]).token_ids
    rows = [RowState(SamplingParams(temperature=0.5, top_p=0.5), torch.Generator().manual_seed(i)) for i in range(4)]
    rows[2] = RowState(SamplingParams(), torch.Generator().manual_seed(9))
    assert Sampler().sample(x, rows).token_ids[2] == alone[0]


def test_many_draws_from_one_row_are_that_row_s_draws_one_at_a_time() -> None:
    # Introspection draws num_samples tokens from one distribution with one generator: each must be
    # the token the engine's one-row draw gives for the same uniform.
    probs = logits(1).softmax(dim=-1)
    uniforms = next_uniforms([torch.Generator().manual_seed(7)] * 50)  # its next 50 numbers, in order
    again = torch.Generator().manual_seed(7)
    assert uniforms.tolist() == [float(torch.rand(1, generator=again)) for _ in range(50)]
    one_at_a_time = [int(draw(probs, u.reshape(1, 1))) for u in uniforms]
    assert draw(probs, uniforms[None])[0].tolist() == one_at_a_time
    assert draw(probs, next_uniforms([])[None]).shape == (1, 0)


def test_a_draw_at_the_very_top_of_the_cdf_takes_the_last_possible_token() -> None:
    probs = torch.tensor([[0.25, 0.75, 0.0, 0.0]])
    assert draw(probs, torch.tensor([[0.0, 0.5, 1.0]])).tolist() == [[0, 1, 1]]


def test_one_row_filter_parameters_are_that_row_of_a_batch() -> None:
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, typical_p=0.8)
    one, batch = (
        FilterParams.of_row(params, torch.device("cpu")),
        FilterParams.from_params([params], torch.device("cpu")),
    )
    for name in ("temperature", "top_k", "top_p", "min_p", "typical_p"):
        assert getattr(one, name).shape == (1,) and torch.equal(getattr(one, name), getattr(batch, name))


def test_logprobs_are_those_of_the_raw_distribution_with_top_n() -> None:
    x = logits(2)
    result = Sampler().sample(x, [RowState(SamplingParams(temperature=0.0), None, top_logprobs=5)] * 2)
    raw = x.log_softmax(-1)
    for i in range(2):
        assert result.logprobs[i] == pytest.approx(float(raw[i].max()), abs=1e-6)
        values, ids = raw[i].topk(5)
        assert [t for t, _ in result.top_logprobs[i]] == ids.tolist()
        assert [lp for _, lp in result.top_logprobs[i]] == pytest.approx(values.tolist(), abs=1e-6)


def test_banned_ids_are_never_chosen() -> None:
    x = logits(1)
    best = int(x.argmax())
    result = Sampler().sample(x, [RowState(SamplingParams(temperature=0.0), None, banned_ids=(best,))])
    assert result.token_ids[0] != best
