"""Shared fixtures: the tiny random-weight model, and Hugging Face's GPT-2 on the same weights."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import torch
import transformers
from gpt2_service.config import EngineConfig
from gpt2_service.engine.frontend import Engine
from gpt2_service.model.gpt2 import GPT2
from gpt2_service.model.weights import LoadedModel, load_model


def to_hf(model: GPT2) -> transformers.GPT2LMHeadModel:
    """Hugging Face's GPT2LMHeadModel (eager attention) holding exactly our model's weights."""
    c = model.config
    hf_config = transformers.GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.n_positions,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_inner=c.n_inner,
        layer_norm_epsilon=c.layer_norm_epsilon,
        activation_function="gelu_new",
    )
    hf_config._attn_implementation = "eager"
    hf = transformers.GPT2LMHeadModel(hf_config)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert all(k == "lm_head.weight" or k.endswith(".attn.bias") for k in missing), missing
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr(), "LM head must stay tied"
    return hf.eval()


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    return load_model("random:tiny")


@pytest.fixture(scope="session")
def hf_tiny(tiny: LoadedModel) -> transformers.GPT2LMHeadModel:
    return to_hf(tiny.model)


def hf_greedy(hf: transformers.GPT2LMHeadModel, prompt_ids: list[int], n: int) -> list[int]:
    """Hugging Face's greedy continuation, EOS ignored."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=50256,
        )
    return [int(t) for t in out[0, len(prompt_ids) :]]


@pytest.fixture
def engine_config() -> EngineConfig:
    return EngineConfig(model="random:tiny", max_batch_size=8, max_queue_size=64, max_prefill_tokens=64)


@pytest.fixture
async def engine(tiny: LoadedModel, engine_config: EngineConfig) -> AsyncIterator[Engine]:
    eng = Engine(tiny, engine_config)
    await eng.start()
    yield eng
    await eng.shutdown()
