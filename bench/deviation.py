"""How far the reduced weight formats move the model from float32, on one set of weights.

- next-token distributions: one forward pass (no KV-cache) over a fixed set of prompts in float32
  and in each format (``kernel_mode``), every position's logits compared: the largest absolute
  logit difference and the mean KL(float32 || format) of the softmax distributions;
- greedy agreement: greedy generation through an engine in each format (default, deterministic
  mode) from a few of those prompts; per prompt, the index of the first token that differs from
  float32's (the length when none does) and the fraction of tokens generated before it.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

import torch
from engine_driver import run_batch
from gpt2_service.config import EngineConfig
from gpt2_service.engine.frontend import Engine
from gpt2_service.model.kernels import WEIGHT_FORMATS, KernelMode, kernel_mode
from gpt2_service.model.weights import LoadedModel

NUM_PROMPTS, PROMPT_TOKENS = 32, 32
GREEDY_PROMPTS, GREEDY_TOKENS = 8, 64


def fixed_prompts(
    vocab_size: int, count: int = NUM_PROMPTS, length: int = PROMPT_TOKENS, seed: int = 1234
) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (count, length), generator=gen).tolist()


@torch.inference_mode()
def _log_probs(loaded: LoadedModel, weights: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model = loaded.model
    model.prepare_weights(weights)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with kernel_mode(KernelMode(weights)):
        logits = model.logits(model(ids, positions))  # (B, T, V)
    return logits, torch.log_softmax(logits.double(), dim=-1)


async def _greedy(loaded: LoadedModel, weights: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    engine = Engine(
        loaded,
        EngineConfig(
            weights=weights,
            max_batch_size=len(prompts),
            context_window=len(prompts[0]) + new_tokens,
            stage_timing=False,
        ),
    )
    await engine.start()
    try:
        return (await run_batch(engine, prompts, new_tokens)).token_ids
    finally:
        await engine.shutdown()


def first_divergence(reference: list[int], other: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(reference, other, strict=True)) if a != b), len(reference))


def measure(loaded: LoadedModel, loop: asyncio.AbstractEventLoop | None = None) -> dict[str, Any]:
    """Every reduced format against float32 on ``loaded``'s weights (call it with no engine busy)."""
    prompts = fixed_prompts(loaded.model.config.vocab_size)
    ids = torch.tensor(prompts)
    ref_logits, ref_logp = _log_probs(loaded, "float32", ids)
    run = loop.run_until_complete if loop is not None else asyncio.run
    greedy_prompts = prompts[:GREEDY_PROMPTS]
    ref_tokens = run(_greedy(loaded, "float32", greedy_prompts, GREEDY_TOKENS))
    out: dict[str, Any] = {
        "prompts": NUM_PROMPTS,
        "prompt_tokens": PROMPT_TOKENS,
        "greedy_prompts": GREEDY_PROMPTS,
        "greedy_tokens": GREEDY_TOKENS,
        "formats": {},
    }
    for weights in WEIGHT_FORMATS:
        if weights == "float32":
            continue
        logits, logp = _log_probs(loaded, weights, ids)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # (B, T)
        tokens = run(_greedy(loaded, weights, greedy_prompts, GREEDY_TOKENS))
        divergence = [first_divergence(a, b) for a, b in zip(ref_tokens, tokens, strict=True)]
        out["formats"][weights] = {
            "max_abs_logit_diff": float((logits - ref_logits).abs().max()),
            "mean_kl": float(kl.mean()),
            "max_kl": float(kl.max()),
            "top1_agreement": float((logits.argmax(-1) == ref_logits.argmax(-1)).double().mean()),
            "first_divergence": divergence,
            "mean_first_divergence": statistics.mean(divergence),
            "greedy_agreement": statistics.mean(d / GREEDY_TOKENS for d in divergence),
        }
    return out
