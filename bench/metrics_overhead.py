"""Metrics overhead benchmark (not a test): engine throughput with Prometheus metrics on vs off.

Two engines share one random-weight GPT-2 small: one bare, one with ``Metrics`` attached, its
``/metrics`` served on a local port and scraped every ``--scrape-interval`` seconds while it runs
(much more often than Prometheus would). Each run submits ``--concurrency`` requests at once
(prompt 16 tokens, 64 new tokens, greedy, EOS ignored); runs alternate off/on, on/off, ... after a
warm-up, and the ratio of median throughputs (on / off) is the result; the target is >= 0.97.
Writes ``bench/results/metrics_overhead.json``.

    .venv/bin/python bench/metrics_overhead.py                # ~17 minutes on 2 CPU cores
    .venv/bin/python bench/metrics_overhead.py --device cuda --rounds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_driver import run_batch
from gpt2_service.config import EngineConfig
from gpt2_service.engine.frontend import Engine
from gpt2_service.metrics import Metrics
from gpt2_service.model.weights import load_model

TARGET_RATIO = 0.97
BENCH_DIR = Path(__file__).resolve().parent


class Scraper:
    """GETs /metrics every ``interval`` seconds from its own thread until stopped."""

    def __init__(self, url: str, interval: float) -> None:
        self.url = url
        self.interval = interval
        self.num_scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with urllib.request.urlopen(self.url, timeout=10) as response:
                response.read()
            self.num_scrapes += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:gpt2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8, help="pairs of runs (one off, one on) after the warm-up")
    parser.add_argument("--scrape-interval", type=float, default=1.0, help="seconds between scrapes of /metrics")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "metrics_overhead.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("gpt2_service").setLevel(logging.ERROR)  # the random-weights banner
    asyncio.run(_measure(args))


async def _measure(args: argparse.Namespace) -> None:
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device, max_batch_size=args.concurrency)
    engines = {"off": Engine(loaded, config), "on": Engine(loaded, config)}
    metrics = Metrics()
    metrics.attach(engines["on"])
    metrics.set_model_info(loaded, args.dtype, args.device, "float32", True)
    server, server_thread = metrics.start_http_server("127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50257, (args.prompt_tokens,), generator=gen).tolist() for _ in range(args.concurrency)]
    tokens_per_s: dict[str, list[float]] = {"off": [], "on": []}
    num_scrapes = 0

    async def one_run(name: str) -> float:
        nonlocal num_scrapes
        if name == "on":
            with Scraper(url, args.scrape_interval) as scraper:
                run = await run_batch(engines[name], prompts, args.new_tokens)
            num_scrapes += scraper.num_scrapes
        else:
            run = await run_batch(engines[name], prompts, args.new_tokens)
        assert run.num_tokens == args.concurrency * args.new_tokens
        return run.num_tokens / run.seconds

    try:
        for engine in engines.values():
            await engine.start()
        for name in ("off", "on", "off", "on"):  # warm-up: allocator, caches, CPU frequency
            await one_run(name)
        for r in range(args.rounds):
            for name in ("off", "on") if r % 2 == 0 else ("on", "off"):
                tokens_per_s[name].append(await one_run(name))
            logging.info(
                "round %d/%d: off %.1f tok/s, on %.1f tok/s",
                r + 1,
                args.rounds,
                tokens_per_s["off"][-1],
                tokens_per_s["on"][-1],
            )
    finally:
        for engine in engines.values():
            await engine.shutdown()
        server.shutdown()
        server.server_close()
        server_thread.join()

    medians = {name: statistics.median(values) for name, values in tokens_per_s.items()}
    ratio = medians["on"] / medians["off"]
    paired = statistics.median(on / off for on, off in zip(tokens_per_s["on"], tokens_per_s["off"], strict=True))
    result = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "concurrency": args.concurrency,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "scrape_interval_s": args.scrape_interval,
        "num_scrapes": num_scrapes,
        "tokens_per_s": tokens_per_s,
        "median_tokens_per_s": medians,
        "ratio_on_off": ratio,
        "median_paired_ratio": paired,
        "target_ratio": TARGET_RATIO,
        "within_target": ratio >= TARGET_RATIO,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    print(
        f"\nmetrics off: {medians['off']:.1f} tok/s, on: {medians['on']:.1f} tok/s (median of {args.rounds}); "
        f"on/off = {ratio:.4f} (median paired ratio {paired:.4f}; target >= {TARGET_RATIO}); "
        f"{num_scrapes} scrapes"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
