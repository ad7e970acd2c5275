"""Generation through the engine (KV-cache, batching, chunked prefill) against Hugging Face."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
import torch
import transformers
from gpt2_service.config import EngineConfig
from gpt2_service.engine.frontend import Engine
from gpt2_service.model.weights import LoadedModel, load_model

from tests.conftest import hf_greedy
from tests.engine_helpers import request, run

PROMPTS = [[9246, 3332, 319, 262], list(range(1000, 1013)), [50256], list(range(20000, 20090, 3))]


async def test_greedy_40_tokens_equal_hugging_face_generate(
    engine: Engine, hf_tiny: transformers.GPT2LMHeadModel
) -> None:
    for prompt in PROMPTS:
        _, finished = await run(engine, request(prompt, max_new_tokens=40, temperature=0.0))
        assert list(finished.token_ids) == hf_greedy(hf_tiny, prompt, 40)


async def test_greedy_from_a_saved_checkpoint_directory_equals_hugging_face(tmp_path: Path) -> None:
    torch.manual_seed(7)
    config = transformers.GPT2Config(n_embd=48, n_layer=3, n_head=4, n_positions=256)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert not loaded.random_weights and loaded.source == str(tmp_path)
    engine = Engine(loaded, EngineConfig(max_batch_size=4))
    await engine.start()
    try:
        for prompt in PROMPTS[:2]:
            _, finished = await run(engine, request(prompt, max_new_tokens=40, temperature=0.0))
            assert list(finished.token_ids) == hf_greedy(hf, prompt, 40)
    finally:
        await engine.shutdown()


async def test_cached_decode_logprobs_equal_full_recomputation_in_a_mixed_batch(
    engine: Engine, hf_tiny: transformers.GPT2LMHeadModel
) -> None:
    """Every step's top-20 log-probabilities, computed with the KV-cache while sharing the
    batch with sequences of other lengths (and prefilled in chunks), equal a full recompute."""
    prompts = [list(range(500, 500 + n)) for n in (5, 70, 130, 12)]  # 70 and 130 span chunks of 64
    results = await asyncio.gather(
        *(run(engine, request(p, max_new_tokens=12, temperature=0.0, top_logprobs=20)) for p in prompts)
    )
    for prompt, (outputs, finished) in zip(prompts, results, strict=True):
        tokens = [t for out in outputs for t in out.tokens]
        context = list(prompt)
        for info in tokens:
            with torch.no_grad():
                expected = hf_tiny(torch.tensor([context])).logits[0, -1].log_softmax(-1)
            top = torch.tensor([lp.logprob for lp in info.top_logprobs])
            top_ids = [lp.id for lp in info.top_logprobs]
            assert (top - expected[top_ids]).abs().max() <= 1e-4
            assert top_ids[0] == int(expected.argmax())
            assert math.isclose(info.logprob, float(expected[info.id]), abs_tol=1e-4)
            context.append(info.id)
        assert len(tokens) == finished.usage.completion_tokens == 12


@pytest.mark.parametrize("max_prefill_tokens", [7, 512])
async def test_chunked_prefill_gives_the_same_tokens(
    tiny: LoadedModel, hf_tiny: transformers.GPT2LMHeadModel, max_prefill_tokens: int
) -> None:
    engine = Engine(tiny, EngineConfig(max_batch_size=2, max_prefill_tokens=max_prefill_tokens))
    await engine.start()
    try:
        prompt = list(range(3000, 3100))
        _, finished = await run(engine, request(prompt, max_new_tokens=10, temperature=0.0))
        assert list(finished.token_ids) == hf_greedy(hf_tiny, prompt, 10)
    finally:
        await engine.shutdown()
