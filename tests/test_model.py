"""Our GPT-2 against Hugging Face's GPT2LMHeadModel on the same weights."""

from __future__ import annotations

import pytest
import torch
import transformers
from gpt2_service.weights import LoadedModel

TOLERANCE = 1e-4


def our_logits(tiny: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    return tiny.model.logits(tiny.model(ids, positions))


@pytest.mark.parametrize("length", [1, 7, 64, 300])
def test_logits_match_hugging_face(tiny: LoadedModel, hf_tiny: transformers.GPT2LMHeadModel, length: int) -> None:
    ids = torch.randint(0, 50257, (1, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        expected = hf_tiny(ids).logits
    assert (our_logits(tiny, ids) - expected).abs().max() <= TOLERANCE


def test_logits_match_hugging_face_for_a_batch_of_mixed_lengths(
    tiny: LoadedModel, hf_tiny: transformers.GPT2LMHeadModel
) -> None:
    lengths = [3, 17, 40, 9]
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 50257, (n,), generator=gen) for n in lengths]
    batch = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, : len(p)] = p  # right padding: causal attention never looks at it
    ours = our_logits(tiny, batch)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            expected = hf_tiny(p[None]).logits[0]
        assert (ours[i, : len(p)] - expected).abs().max() <= TOLERANCE


def test_parameter_counts_add_up(tiny: LoadedModel) -> None:
    counts = tiny.model.parameter_counts()
    assert counts["total"] == sum(p.numel() for p in tiny.model.parameters())
    assert counts["lm_head"] == counts["token_embedding"] == 50257 * 64


def test_gpt2_small_has_the_paper_s_parameter_count() -> None:
    from gpt2_service.model import GPT2
    from gpt2_service.weights import RANDOM_SIZES

    model = GPT2(RANDOM_SIZES["gpt2"])
    assert model.parameter_counts()["total"] == 124_439_808  # Hugging Face's count for "gpt2"
