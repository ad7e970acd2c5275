"""Quick exactness check of the engine against Hugging Face on the same weights (not a test).

Run before and after a performance change: ``.venv/bin/python bench/check_exactness.py``.
Checks: full-forward logits, greedy tokens and per-step log-probabilities of batched engine runs
(cached decode), a seeded request alone vs in a batch, and the attention ``Capture``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_driver import GREEDY, run_batch
from gpt2_service.config import EngineConfig
from gpt2_service.core.request import SamplingParams
from gpt2_service.engine.frontend import Engine
from gpt2_service.model.gpt2 import AttentionLayout, Capture
from gpt2_service.model.kv_cache import KVCache
from gpt2_service.model.weights import LoadedModel, load_model
from hf_reference import to_hf

TOLERANCE = 1e-4
NEW_TOKENS = 40
PROMPT_LENGTHS = [16, 5, 30, 16, 1, 16]


def _prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


@torch.inference_mode()
def check_logits(loaded: LoadedModel, hf: torch.nn.Module) -> float:
    ids = torch.tensor(_prompts(loaded.model.config.vocab_size, [24, 24, 24], seed=1))
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    ours = loaded.model.logits(loaded.model(ids, positions))
    return float((ours - hf(ids).logits).abs().max())


@torch.inference_mode()
def check_capture(loaded: LoadedModel, hf: torch.nn.Module) -> float:
    ids = torch.tensor(_prompts(loaded.model.config.vocab_size, [12], seed=2))
    capture = Capture(attention_weights=True, hidden_states=True)
    loaded.model(ids, torch.arange(ids.shape[1])[None], capture=capture)
    hf.config._attn_implementation = "eager"  # SDPA does not return attention weights
    try:
        ref = hf(ids, output_attentions=True, output_hidden_states=True)
    finally:
        hf.config._attn_implementation = "sdpa"
    diffs = [float((capture.attn[i] - a).abs().max()) for i, a in enumerate(ref.attentions)]
    diffs += [float((h - r).abs().max()) for h, r in zip(capture.hidden, ref.hidden_states, strict=True)]
    assert len(capture.attn) == len(ref.attentions)
    return max(diffs)


@torch.inference_mode()
def check_cache_paths(loaded: LoadedModel) -> float:
    """Prefill + one decode through the KV-cache, slots out of order (gather, scatter and
    slice-copy paths), against a full forward of the same tokens; max |logit diff|."""
    model, c = loaded.model, loaded.model.config
    ids = torch.tensor(_prompts(c.vocab_size, [9, 9], seed=4))  # (2, 9): 8 prompt tokens, then one decode
    full = model.logits(model(ids, torch.arange(9).expand(2, 9)))[:, -1]
    diffs = []
    for aligned in (True, False):
        cache = KVCache(c.n_layer, 4, c.n_head, 16, c.head_dim)
        slots = torch.tensor([3, 1])
        positions = torch.arange(8).expand(2, 8)
        model(ids[:, :8], positions, _layout(slots, positions, aligned), cache)
        positions = torch.full((2, 1), 8)
        hidden = model(ids[:, 8:], positions, _layout(slots, positions, aligned), cache)
        diffs.append(float((model.logits(hidden[:, 0]) - full).abs().max()))
    return max(diffs)


def _layout(slots: torch.Tensor, positions: torch.Tensor, aligned: bool) -> AttentionLayout:
    """Every row at the same positions; ``aligned`` lets the model take its slice-copy, mask-free path."""
    B, T = positions.shape
    num_keys = int(positions.max()) + 1
    mask = (torch.arange(num_keys)[None, None, :] <= positions[:, :, None])[:, None]
    return AttentionLayout(
        slots=slots,
        slot_range=None,
        valid=None,
        write_slots=slots[:, None].expand(B, T).reshape(-1),
        write_positions=positions.reshape(-1),
        num_keys=num_keys,
        mask=None if aligned else mask,
        write_span=(num_keys - T, num_keys) if aligned else None,
    )


@torch.inference_mode()
def hf_greedy_with_logprobs(hf: torch.nn.Module, prompt: list[int]) -> tuple[list[int], list[float]]:
    ids = torch.tensor([prompt])
    out = hf.generate(  # type: ignore[operator]
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = [float(step.float().log_softmax(-1)[0, t]) for step, t in zip(out.logits, tokens, strict=True)]
    return tokens, logprobs


async def check_engine(
    loaded: LoadedModel, references: list[tuple[list[int], list[float]]], stage_timing: bool, max_prefill_tokens: int
) -> tuple[bool, float, bool]:
    """Greedy tokens equal HF's (batched: mixed lengths, equal lengths; alone), the largest logprob
    difference, and whether a seeded request gets the same tokens alone and in a batch."""
    config = EngineConfig(
        max_batch_size=8, context_window=128, max_prefill_tokens=max_prefill_tokens, stage_timing=stage_timing
    )
    engine = Engine(loaded, config)
    await engine.start()
    try:
        prompts = _prompts(loaded.model.config.vocab_size, PROMPT_LENGTHS, seed=3)
        same_tokens, max_diff = True, 0.0
        equal_lengths = [i for i, n in enumerate(PROMPT_LENGTHS) if n == PROMPT_LENGTHS[0]]
        for group in (list(range(len(prompts))), equal_lengths, [0]):  # mixed, aligned, alone
            run = await run_batch(engine, [prompts[i] for i in group], NEW_TOKENS)
            for i, row in zip(group, run.tokens, strict=True):
                ref_tokens, ref_logprobs = references[i]
                same_tokens &= [t.id for t in row] == ref_tokens
                max_diff = max(max_diff, *(abs(t.logprob - r) for t, r in zip(row, ref_logprobs, strict=True)))

        seeded = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=7)
        alone = await run_batch(engine, prompts[:1], NEW_TOKENS, seeded)
        # the same request second to last, among greedy and other sampled rows of other lengths
        others = [GREEDY] + [SamplingParams(temperature=1.2, top_p=0.9, seed=i) for i in range(len(prompts) - 2)]
        together = await run_batch(
            engine, [*prompts[1:-1], prompts[0], prompts[-1]], NEW_TOKENS, [*others[:-1], seeded, others[-1]]
        )
        seeded_same = alone.token_ids[0] == together.token_ids[-2]
        return same_tokens, max_diff, seeded_same
    finally:
        await engine.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["random:tiny", "random:gpt2"])
    args = parser.parse_args()
    ok = True
    for spec in args.models:
        loaded = load_model(spec)
        hf = to_hf(loaded.model)
        logits_diff = check_logits(loaded, hf)
        capture_diff = check_capture(loaded, hf)
        print(f"{spec}: logits max|diff| {logits_diff:.2e}; capture max|diff| {capture_diff:.2e}")
        ok &= logits_diff <= TOLERANCE and capture_diff <= TOLERANCE
        prompts = _prompts(loaded.model.config.vocab_size, PROMPT_LENGTHS, seed=3)
        references = [hf_greedy_with_logprobs(hf, p) for p in prompts]
        cache_diff = check_cache_paths(loaded)
        print(f"  KV-cache paths vs full forward: max|diff| {cache_diff:.2e}")
        ok &= cache_diff <= TOLERANCE
        # the small prefill budget splits prompts into chunks that start past position 0
        for stage_timing, budget in ((False, 256), (True, 24)):
            same, lp_diff, seeded_same = asyncio.run(check_engine(loaded, references, stage_timing, budget))
            print(
                f"  engine (stage_timing={stage_timing}, max_prefill_tokens={budget}): greedy == HF generate: {same}; "
                f"logprob max|diff| {lp_diff:.2e}; seeded alone == in batch: {seeded_same}"
            )
            ok &= same and lp_diff <= TOLERANCE and seeded_same
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
