"""Small helpers for engine tests: build requests, run them to the end.

To wait for the engine to reach a state, await ``engine.wait_for(predicate, timeout=WAIT_S)``: the
engine re-checks it after every step it delivers, and on every submit and abort; nothing polls.
"""

from __future__ import annotations

from gpt2_service.core.request import GenerationRequest, SamplingParams, StoppingCriteria
from gpt2_service.core.sequence import Finished, GenerationOutput
from gpt2_service.engine.frontend import Engine

WAIT_S = 10.0  # how long a test awaits a state of the engine before it fails


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
