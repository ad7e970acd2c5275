"""Serving benchmark (not a test): gRPC streaming vs the in-process engine, same engine, same run.

Load: ``concurrency`` requests started at once (prompt 16 tokens, 64 new tokens, greedy, EOS
ignored) on ``random:gpt2``, at concurrency 1, 8, 32 and 64. Each level is measured twice:
- engine: ``Engine.submit`` + iterating the stream, in this process;
- gRPC: ``TextGeneration.GenerateStream`` through a real socket to a server in this process on
  the same engine (so the difference is the API layer: servicer, protobuf, HTTP/2, and the load
  generator itself, which shares the event loop, the GIL and the CPU cores with the server; on a
  separate client machine gRPC would do a little better).
Reported per system: throughput (completion tokens / wall time from the first request to the
last token), time to first token and inter-token latency (p50, p99; a stream message holding k
tokens spreads its gap over them). Systems alternate and the median of the repetitions is kept.
Writes ``bench/results/serving.json`` (``serving-quick.json`` with ``--quick``) and prints a
markdown table.

    .venv/bin/python bench/serving_bench.py            # full run (a few minutes on 2 CPU cores)
    .venv/bin/python bench/serving_bench.py --quick    # fewer levels and tokens
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import torch
from gpt2_client.proto import common_pb2, generation_pb2_grpc
from gpt2_client.proto import generation_pb2 as pb
from gpt2_service.api.server import GenerationServer
from gpt2_service.config import EngineConfig, ServerConfig
from gpt2_service.core.request import GenerationRequest, SamplingParams, StoppingCriteria
from gpt2_service.engine.frontend import Engine
from gpt2_service.model.weights import load_model

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGET_CONCURRENCY, TARGET_RATIO = 32, 0.90  # gRPC throughput >= 90% of the engine's at 32

log = logging.getLogger("serving_bench")


@dataclass
class RequestTrace:
    """Client-side times of one request: start, and the arrival of each token."""

    start: float
    token_times: list[float]


@dataclass
class LevelResult:
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    seconds: float
    num_tokens: int


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def summarise(traces: list[RequestTrace]) -> LevelResult:
    first_start = min(t.start for t in traces)
    last_token = max(t.token_times[-1] for t in traces)
    num_tokens = sum(len(t.token_times) for t in traces)
    ttft = [(t.token_times[0] - t.start) * 1000 for t in traces]
    itl = [(b - a) * 1000 for t in traces for a, b in zip(t.token_times, t.token_times[1:], strict=False)]
    seconds = last_token - first_start
    return LevelResult(
        tokens_per_s=num_tokens / seconds,
        ttft_p50_ms=_percentile(ttft, 50),
        ttft_p99_ms=_percentile(ttft, 99),
        itl_p50_ms=_percentile(itl, 50),
        itl_p99_ms=_percentile(itl, 99),
        seconds=seconds,
        num_tokens=num_tokens,
    )


def _spread(times: list[float], previous: float, now: float, count: int) -> None:
    """``count`` tokens arrived together at ``now``: spread the gap since ``previous`` over them."""
    step = (now - previous) / count
    times.extend(previous + step * (i + 1) for i in range(count))


def prompts(concurrency: int, prompt_tokens: int) -> list[list[int]]:
    rng = random.Random(concurrency)
    return [[rng.randrange(50000) for _ in range(prompt_tokens)] for _ in range(concurrency)]


# -- the two systems -----------------------------------------------------------------------------


async def engine_request(engine: Engine, prompt: list[int], new_tokens: int, index: int) -> RequestTrace:
    start = time.perf_counter()
    stream = await engine.submit(
        GenerationRequest(
            request_id=f"engine-{index}",
            prompt_token_ids=tuple(prompt),
            sampling=SamplingParams(temperature=0.0),
            stopping=StoppingCriteria(max_new_tokens=new_tokens, ignore_eos=True),
        )
    )
    times: list[float] = []
    previous = start
    async for out in stream:
        now = time.perf_counter()
        _spread(times, previous, now, len(out.tokens))
        previous = now
    return RequestTrace(start, times)


async def grpc_request(
    stub: generation_pb2_grpc.TextGenerationAsyncStub, prompt: list[int], new_tokens: int, index: int
) -> RequestTrace:
    request = pb.GenerateRequest(
        request_id=f"grpc-{index}",
        prompt_token_ids=common_pb2.TokenIds(ids=prompt),
        sampling=pb.SamplingParams(temperature=0.0),
        stopping=pb.StoppingCriteria(max_new_tokens=new_tokens, ignore_eos=True),
    )
    start = time.perf_counter()
    times: list[float] = []
    previous = start
    async for message in stub.GenerateStream(request):
        now = time.perf_counter()
        _spread(times, previous, now, len(message.tokens))
        previous = now
    assert len(times) == new_tokens, (len(times), new_tokens)
    return RequestTrace(start, times)


async def run_level(
    one_request: Callable[[list[int], int, int], Awaitable[RequestTrace]],
    concurrency: int,
    prompt_tokens: int,
    new_tokens: int,
) -> LevelResult:
    traces = await asyncio.gather(
        *(one_request(p, new_tokens, i) for i, p in enumerate(prompts(concurrency, prompt_tokens)))
    )
    return summarise(list(traces))


def _median_result(results: list[LevelResult]) -> LevelResult:
    return sorted(results, key=lambda r: r.tokens_per_s)[len(results) // 2]


# -- the run -------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> dict[str, object]:
    levels = [1, 8, 32] if args.quick else [1, 8, 32, 64]
    new_tokens = 16 if args.quick else 64
    repetitions = 1 if args.quick else args.repetitions
    loaded = load_model(args.model)
    config = EngineConfig(
        model=args.model,
        max_batch_size=max(levels),
        max_queue_size=1024,
        max_queued_per_tenant=1024,
        stage_timing=False,
    )
    engine = Engine(loaded, config)
    await engine.start()
    server = GenerationServer(ServerConfig(host="127.0.0.1", port=0, reflection=False))
    port = await server.start()
    await server.attach(engine)
    rows: list[dict[str, object]] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub: generation_pb2_grpc.TextGenerationAsyncStub = generation_pb2_grpc.TextGenerationStub(channel)

            async def via_engine(prompt: list[int], n: int, i: int) -> RequestTrace:
                return await engine_request(engine, prompt, n, i)

            async def via_grpc(prompt: list[int], n: int, i: int) -> RequestTrace:
                return await grpc_request(stub, prompt, n, i)

            # Warm-up: the first runs pay for allocator growth and connection set-up.
            await run_level(via_engine, max(levels), args.prompt_tokens, 4)
            await run_level(via_grpc, max(levels), args.prompt_tokens, 4)
            for concurrency in levels:
                measured: dict[str, list[LevelResult]] = {"engine": [], "grpc": []}
                for repetition in range(repetitions):
                    order = [("engine", via_engine), ("grpc", via_grpc)]
                    for name, system in order if repetition % 2 == 0 else order[::-1]:
                        result = await run_level(system, concurrency, args.prompt_tokens, new_tokens)
                        measured[name].append(result)
                        log.info("concurrency %d %s: %.1f tokens/s", concurrency, name, result.tokens_per_s)
                engine_result, grpc_result = _median_result(measured["engine"]), _median_result(measured["grpc"])
                rows.append({
                    "concurrency": concurrency,
                    "engine": asdict(engine_result),
                    "grpc": asdict(grpc_result),
                    "grpc_over_engine": grpc_result.tokens_per_s / engine_result.tokens_per_s,
                    "repetitions": {k: [r.tokens_per_s for r in v] for k, v in measured.items()},
                })  # fmt: skip
    finally:
        await server.stop()
        await engine.shutdown()
    target_row = next((r for r in rows if r["concurrency"] == TARGET_CONCURRENCY), None)
    ratio = float(target_row["grpc_over_engine"]) if target_row else None  # type: ignore[arg-type]
    return {
        "model": args.model,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": new_tokens,
        "quick": args.quick,
        "repetitions": repetitions,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "results": rows,
        "target": {
            "concurrency": TARGET_CONCURRENCY,
            "min_grpc_over_engine": TARGET_RATIO,
            "grpc_over_engine": ratio,
            "met": ratio is not None and ratio >= TARGET_RATIO,
        },
    }


def markdown(report: dict[str, object]) -> str:
    lines = [
        "| concurrency | engine tok/s | gRPC tok/s | gRPC / engine | TTFT p50 / p99 ms (engine) "
        "| TTFT p50 / p99 ms (gRPC) | ITL p50 / p99 ms (engine) | ITL p50 / p99 ms (gRPC) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["results"]:  # type: ignore[attr-defined]
        e, g = row["engine"], row["grpc"]
        lines.append(
            f"| {row['concurrency']} | {e['tokens_per_s']:.1f} | {g['tokens_per_s']:.1f} | "
            f"{row['grpc_over_engine']:.1%} | {e['ttft_p50_ms']:.0f} / {e['ttft_p99_ms']:.0f} | "
            f"{g['ttft_p50_ms']:.0f} / {g['ttft_p99_ms']:.0f} | {e['itl_p50_ms']:.1f} / {e['itl_p99_ms']:.1f} | "
            f"{g['itl_p50_ms']:.1f} / {g['itl_p99_ms']:.1f} |"
        )
    target = report["target"]
    assert isinstance(target, dict)
    if target["grpc_over_engine"] is not None:
        verdict = "met" if target["met"] else "NOT met"
        lines.append(
            f"\nTarget (gRPC >= {target['min_grpc_over_engine']:.0%} of the engine at concurrency "
            f"{target['concurrency']}): {target['grpc_over_engine']:.1%}, {verdict}."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="concurrency 1, 8, 32; 16 new tokens; one repetition")
    parser.add_argument("--model", default="random:gpt2")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repetitions", type=int, default=3, help="per level and system (full runs)")
    parser.add_argument(
        "--output", type=Path, help="default: bench/results/serving.json (serving-quick.json with --quick)"
    )
    args = parser.parse_args()
    output: Path = args.output or RESULTS_DIR / ("serving-quick.json" if args.quick else "serving.json")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("gpt2_service", "gpt2_service.api"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # one log line per request would skew timing
    report = asyncio.run(bench(args))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
