"""``gpt2-demo``: stream one generation from the engine to the terminal (no server needed)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from gpt2_service.config import EngineConfig
from gpt2_service.core.request import GenerationRequest, SamplingParams, StoppingCriteria
from gpt2_service.engine.frontend import Engine
from gpt2_service.model.weights import load_model


async def _demo(args: argparse.Namespace) -> None:
    loaded = load_model(args.model, allow_random_fallback=True)
    engine = Engine(loaded, EngineConfig(model=args.model, max_batch_size=1))
    await engine.start()
    request = GenerationRequest(
        request_id="demo",
        prompt=args.prompt,
        sampling=SamplingParams(temperature=args.temperature, top_k=args.top_k, seed=args.seed),
        stopping=StoppingCriteria(max_new_tokens=args.max_new_tokens),
    )
    print(args.prompt, end="", flush=True)
    async for out in engine.generate(request):
        print(out.text, end="", flush=True)
        if out.finished is not None:
            f = out.finished
            print(
                f"\n\n[{f.reason.name}: {f.usage.completion_tokens} tokens in {f.timing.total_seconds:.2f}s, "
                f"seed {f.seed}, model {loaded.name}{' (RANDOM WEIGHTS)' if loaded.random_weights else ''}]",
                file=sys.stderr,
            )
    await engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="cat sat on the")
    parser.add_argument("--model", default="random:gpt2")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(_demo(args))


if __name__ == "__main__":
    main()
