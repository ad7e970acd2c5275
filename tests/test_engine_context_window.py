"""The context window: truncated prompts, context shifts, and CONTEXT_WINDOW stops."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from gpt2_service.config import EngineConfig
from gpt2_service.core.request import FinishReason, Overflow, Truncation
from gpt2_service.engine.events import FinishEvent, StepEvent
from gpt2_service.engine.frontend import Engine
from gpt2_service.errors import InvalidRequestError
from gpt2_service.model.weights import LoadedModel

from tests.engine_helpers import request, run


async def test_a_3000_token_prompt_is_truncated_from_the_left_and_reported(engine: Engine) -> None:
    prompt = [(i * 7) % 50000 for i in range(3000)]
    _, finished = await run(engine, request(prompt, max_new_tokens=3, temperature=0.0))
    assert finished.usage.truncated_prompt_tokens == 3000 - 1021  # room left for the 3 new tokens
    assert finished.usage.prompt_tokens == 1021
    assert finished.usage.context_shifts == 0
    assert finished.usage.completion_tokens == 3


async def test_a_too_long_prompt_is_rejected_under_reject(engine: Engine) -> None:
    req = dataclasses.replace(request(list(range(1100)), max_new_tokens=3), truncation=Truncation.REJECT)
    with pytest.raises(InvalidRequestError) as info:
        await run(engine, req)
    assert [v.field for v in info.value.violations] == ["prompt_token_ids"]
    assert engine.stats.num_waiting == 0


async def test_300_tokens_after_a_1000_token_prompt_complete_with_a_context_shift(engine: Engine) -> None:
    prompt = [(i * 13) % 50000 for i in range(1000)]
    _, finished = await run(engine, request(prompt, max_new_tokens=300, temperature=0.8, seed=1))
    assert finished.reason is FinishReason.LENGTH
    assert finished.usage.completion_tokens == 300
    assert finished.usage.context_shifts >= 1


async def test_stop_mode_ends_with_context_window(engine: Engine) -> None:
    prompt = list(range(1000))
    req = dataclasses.replace(request(prompt, max_new_tokens=300, temperature=0.0), overflow=Overflow.STOP)
    _, finished = await run(engine, req)
    assert finished.reason is FinishReason.CONTEXT_WINDOW
    assert finished.usage.completion_tokens == 1024 - 1000 + 1  # the last token comes from position 1023
    assert finished.usage.context_shifts == 0


async def test_after_a_shift_each_token_is_the_greedy_choice_given_only_the_kept_window(
    tiny: LoadedModel, hf_tiny: transformers.GPT2LMHeadModel
) -> None:
    """Reference: recompute the model on exactly the tokens the shifted window keeps."""
    window, keep = 48, 32
    engine = Engine(tiny, EngineConfig(max_batch_size=2, context_window=window, context_shift_keep=keep))
    await engine.start()
    try:
        prompt = list(range(700, 740))
        _, finished = await run(engine, request(prompt, max_new_tokens=60, temperature=0.0))
    finally:
        await engine.shutdown()
    tokens, start = list(prompt), 0
    for token in finished.token_ids:
        with torch.no_grad():
            expected = int(hf_tiny(torch.tensor([tokens[start:]])).logits[0, -1].argmax())
        assert token == expected
        tokens.append(token)
        if len(tokens) - start > window:
            start = len(tokens) - keep
    assert finished.usage.context_shifts == 3


async def test_observers_get_each_shift_once_in_immutable_events(tiny: LoadedModel) -> None:
    steps: list[StepEvent] = []
    finishes: list[FinishEvent] = []
    engine = Engine(tiny, EngineConfig(max_batch_size=2, context_window=32, context_shift_keep=24))
    engine.add_step_observer(steps.append)
    engine.add_finish_observer(finishes.append)
    await engine.start()
    try:
        _, finished = await run(engine, request([5, 6, 7], max_new_tokens=60, temperature=0.0, request_id="s"))
    finally:
        await engine.shutdown()
    sampled = [token for step in steps for token in step.sampled]
    assert finished.usage.context_shifts == sum(token.shifted for token in sampled) >= 2
    assert len(sampled) == 60 and [token.first_token for token in sampled].count(True) == 1
    assert [(f.request_id, f.finished, f.error) for f in finishes] == [("s", finished, None)]
    assert [seq_id for step in steps for seq_id in step.released] == [finishes[0].seq_id]
    with pytest.raises(dataclasses.FrozenInstanceError):
        steps[0].sampled[0].shifted = True  # type: ignore[misc]
