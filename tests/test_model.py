"""Our GPT-2 against Hugging Face's GPT2LMHeadModel on the same weights."""

from __future__ import annotations

import pytest
import torch
import transformers
from gpt2_service.model.gpt2 import Capture
from gpt2_service.model.kv_cache import AttentionLayout, KVCache
from gpt2_service.model.weights import LoadedModel

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
    from gpt2_service.model.gpt2 import GPT2
    from gpt2_service.model.weights import RANDOM_SIZES

    model = GPT2(RANDOM_SIZES["gpt2"])
    assert model.parameter_counts()["total"] == 124_439_808  # Hugging Face's count for "gpt2"


def cached_step(
    slots: list[int], starts: list[int], lengths: list[int], by_row: bool, one_query: bool = False
) -> tuple[torch.Tensor, AttentionLayout]:
    """Positions (B, T) and the layout of one step that writes lengths[b] tokens from starts[b]
    into slots[b], right-padded, as the runner builds them; ``one_query``: a step of one token per
    row attends by skinny.c's decode attention."""
    B, T = len(slots), max(lengths)
    positions = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b, (start, n) in enumerate(zip(starts, lengths, strict=True)):
        positions[b, :n] = torch.arange(start, start + n)
        positions[b, n:] = start + n - 1
        valid[b, :n] = True
    num_keys = int(positions.max()) + 1
    aligned = all(n == T for n in lengths) and all(s == starts[0] for s in starts)
    causal = aligned and (T == 1 or starts[0] == 0)  # the mask-free shapes: T == 1 or T == num_keys
    mask = None if causal or by_row else (torch.arange(num_keys)[None, None, :] <= positions[:, :, None])[:, None]
    slot_tensor = torch.tensor(slots)
    consecutive = slots == list(range(slots[0], slots[0] + B))
    return positions, AttentionLayout(
        slots=slot_tensor,
        slot_range=(slots[0], slots[0] + B) if consecutive else None,
        valid=None if all(n == T for n in lengths) else valid,
        write_slots=slot_tensor[:, None].expand(B, T)[valid],
        write_positions=positions[valid],
        num_keys=num_keys,
        mask=mask,
        write_span=(starts[0], starts[0] + T) if aligned else None,
        rows=tuple(zip(slots, starts, lengths, strict=True)) if by_row else None,
        one_query=one_query and T == 1,
    )


@pytest.mark.parametrize("mode", ["batched", "row-by-row", "one-query"])
@pytest.mark.parametrize("lengths", [[8, 8], [6, 9]], ids=["aligned", "padded"])
@pytest.mark.parametrize("slots", [[0, 1], [3, 1]], ids=["consecutive-slots", "scattered-slots"])
def test_attention_over_the_kv_cache_gives_the_full_forward_s_logits(
    tiny: LoadedModel, slots: list[int], lengths: list[int], mode: str
) -> None:
    """Two prefill chunks and two decodes through ``KVCache.update``, over each way of writing
    (slice copy, index copy, scatter) and reading (view, gather, one row at a time); and the
    decodes by skinny.c's attention (``KVCache.attend_one``)."""
    model, c = tiny.model, tiny.model.config
    by_row, one_query = mode == "row-by-row", mode == "one-query"
    if one_query and not KVCache(1, 1, 1, 1, 1).attends_one_query:
        pytest.skip("skinny.c is not built on this machine (no C compiler or CPU support)")
    gen = torch.Generator().manual_seed(sum(lengths))
    tokens = [torch.randint(0, c.vocab_size, (n + 2,), generator=gen) for n in lengths]
    cache = KVCache(c.n_layer, 4, c.n_head, 32, c.head_dim)
    half = [n // 2 for n in lengths]
    steps = [([0, 0], half), (half, [n - h for n, h in zip(lengths, half, strict=True)]), (lengths, [1, 1])]
    steps.append(([n + 1 for n in lengths], [1, 1]))
    for starts, counts in steps:
        positions, layout = cached_step(slots, starts, counts, by_row, one_query)
        ids = torch.zeros_like(positions)
        for b, (start, n) in enumerate(zip(starts, counts, strict=True)):
            ids[b, :n] = tokens[b][start : start + n]
        logits = model.logits(model(ids, positions, layout, cache))
        for b, (start, n) in enumerate(zip(starts, counts, strict=True)):
            seen = tokens[b][: start + n]
            full = model.logits(model(seen[None], torch.arange(start + n)[None]))[0, start:]
            assert (logits[b, :n] - full).abs().max() <= TOLERANCE, f"row {b}, positions {start}..{start + n - 1}"


def test_attention_weights_are_captured_only_for_the_whole_batch_at_once(tiny: LoadedModel) -> None:
    c = tiny.model.config
    positions, layout = cached_step([0, 1], [0, 0], [3, 5], by_row=True)
    cache = KVCache(c.n_layer, 2, c.n_head, 8, c.head_dim)
    with pytest.raises(ValueError, match="whole batch at once"):
        tiny.model(torch.zeros_like(positions), positions, layout, cache, capture=Capture(attention_weights=True))


def test_attention_weights_are_not_captured_by_the_one_query_path(tiny: LoadedModel) -> None:
    c = tiny.model.config
    positions, layout = cached_step([0, 1], [3, 5], [1, 1], by_row=False, one_query=True)
    assert layout.one_query
    cache = KVCache(c.n_layer, 2, c.n_head, 8, c.head_dim)
    with pytest.raises(ValueError, match="without one_query"):
        tiny.model(torch.zeros_like(positions), positions, layout, cache, capture=Capture(attention_weights=True))
