"""Small helpers for engine tests: build requests, run them to the end, wait for the engine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from gpt2_service.engine import Engine
from gpt2_service.request import GenerationRequest, SamplingParams, StoppingCriteria
from gpt2_service.sequence import Finished, GenerationOutput


def request(
    prompt_ids: list[int] | None = None,
    prompt: str | None = None,
    max_new_tokens: int = 16,
    request_id: str = "r",
    top_logprobs: int = 0,
    **sampling: float | int | None,
) -> GenerationRequest:
    """A request that ignores EOS, so its length is exactly max_new_tokens."""
    return GenerationRequest(
        request_id=request_id,
        prompt=prompt,
        prompt_token_ids=tuple(prompt_ids) if prompt_ids is not None else None,
        sampling=SamplingParams(**sampling),  # type: ignore[arg-type]
        stopping=StoppingCriteria(max_new_tokens=max_new_tokens, ignore_eos=True),
        top_logprobs=top_logprobs,
    )


async def run(engine: Engine, req: GenerationRequest) -> tuple[list[GenerationOutput], Finished]:
    stream = await engine.submit(req)
    return await stream.collect()


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll the engine's state until ``condition`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)
