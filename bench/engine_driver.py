"""Drive an ``Engine`` from a plain script: submit a batch of token prompts at once, wait for all.

Used by the engine benchmark and the exactness check; it only uses the engine's public API.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from gpt2_service.core.request import GenerationRequest, SamplingParams, StoppingCriteria
from gpt2_service.core.sequence import Finished, TokenInfo
from gpt2_service.engine.frontend import Engine

GREEDY = SamplingParams(temperature=0.0)


@dataclass(frozen=True)
class BatchRun:
    tokens: list[list[TokenInfo]]  # per prompt, in submission order
    finished: list[Finished]
    seconds: float  # first submit -> last token

    @property
    def token_ids(self) -> list[list[int]]:
        return [[t.id for t in row] for row in self.tokens]

    @property
    def num_tokens(self) -> int:
        return sum(len(row) for row in self.tokens)


async def run_batch(
    engine: Engine,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: SamplingParams | list[SamplingParams] = GREEDY,
    top_logprobs: int = 0,
) -> BatchRun:
    """Submit every prompt at once (ignore_eos, exactly ``max_new_tokens`` each) and collect all."""
    params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
    start = time.perf_counter()
    streams = [
        await engine.submit(
            GenerationRequest(
                request_id=f"bench-{i}",
                prompt_token_ids=tuple(prompt),
                sampling=p,
                stopping=StoppingCriteria(max_new_tokens=max_new_tokens, ignore_eos=True),
                top_logprobs=top_logprobs,
            )
        )
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True))
    ]
    results = await asyncio.gather(*(s.collect() for s in streams))
    seconds = time.perf_counter() - start
    tokens = [[t for out in outputs for t in out.tokens] for outputs, _ in results]
    return BatchRun(tokens, [finished for _, finished in results], seconds)
