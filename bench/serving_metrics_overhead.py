"""Serving benchmark with metrics on vs off (not a test): gRPC streaming throughput at concurrency 32.

Two servers in one process, each with its own engine on the same weights: one counting into a
``Metrics`` (engine recorder, RPC interceptor, ``/metrics`` scraped every second), one without.
Rounds alternate between them; the report is the ratio of median tokens/s (target >= 0.97).

    .venv/bin/python bench/serving_metrics_overhead.py [--rounds 4] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import urllib.request
from pathlib import Path

import grpc
from gpt2_client.proto import generation_pb2_grpc
from gpt2_service.api.server import GenerationServer, ServerConfig
from gpt2_service.config import EngineConfig
from gpt2_service.engine import Engine
from gpt2_service.metrics import Metrics
from gpt2_service.weights import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_bench import grpc_request, run_level

CONCURRENCY = 32
RESULTS = Path(__file__).resolve().parent / "results" / "serving_metrics_overhead.json"


async def bench(args: argparse.Namespace) -> dict[str, object]:
    loaded = load_model(args.model)
    config = EngineConfig(model=args.model, max_batch_size=CONCURRENCY, stage_timing=False)
    metrics = Metrics()
    metrics.set_model_info(loaded, dtype="float32", device="cpu")
    http_server, _ = metrics.start_http_server("127.0.0.1", 0)
    metrics_port = http_server.server_address[1]
    systems: dict[str, tuple[Engine, GenerationServer]] = {}
    ports: dict[str, int] = {}
    for name, m in (("off", None), ("on", metrics)):
        engine = Engine(loaded, config)
        if m is not None:
            m.attach(engine)
        await engine.start()
        server = GenerationServer(ServerConfig(host="127.0.0.1", port=0, reflection=False), metrics=m)
        port = await server.start()
        await server.attach(engine)
        systems[name], ports[name] = (engine, server), port

    async def scrape_forever() -> None:
        while True:
            await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{metrics_port}/metrics")
            await asyncio.sleep(1.0)

    scraper = asyncio.create_task(scrape_forever())
    tokens_per_s: dict[str, list[float]] = {"off": [], "on": []}
    try:
        channels = {n: grpc.aio.insecure_channel(f"127.0.0.1:{ports[n]}") for n in ("off", "on")}
        stubs = {n: generation_pb2_grpc.TextGenerationStub(c) for n, c in channels.items()}
        for n in ("off", "on"):  # warm-up
            await run_level(lambda p, k, i, n=n: grpc_request(stubs[n], p, k, i), CONCURRENCY, 16, 4)
        for r in range(args.rounds):
            for n in ("off", "on") if r % 2 == 0 else ("on", "off"):
                result = await run_level(
                    lambda p, k, i, n=n: grpc_request(stubs[n], p, k, i), CONCURRENCY, 16, args.new_tokens
                )
                tokens_per_s[n].append(result.tokens_per_s)
                logging.info("round %d metrics %s: %.1f tokens/s", r, n, result.tokens_per_s)
        for c in channels.values():
            await c.close()
    finally:
        scraper.cancel()
        for name in ("off", "on"):
            engine, server = systems[name]
            await server.stop()
            await engine.shutdown()
        http_server.shutdown()
    medians = {n: statistics.median(v) for n, v in tokens_per_s.items()}
    return {
        "model": args.model,
        "concurrency": CONCURRENCY,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "tokens_per_s": tokens_per_s,
        "median_tokens_per_s": medians,
        "ratio_on_off": medians["on"] / medians["off"],
        "target_ratio": 0.97,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:gpt2")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("gpt2_service").setLevel(logging.ERROR)
    report = asyncio.run(bench(args))
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("median_tokens_per_s", "ratio_on_off")}))


if __name__ == "__main__":
    main()
