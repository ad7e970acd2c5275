"""Serving benchmark with metrics on vs off (not a test): gRPC streaming throughput at concurrency 32.

One engine and one gRPC server serve both configurations, so the only difference between "on" and
"off" is the metrics themselves:
- the engine recorder (``EngineRecorder.on_step`` / ``on_finish``) records, or returns at once;
- the RPC interceptor counts each RPC into ``gpt2_requests_total`` (and rejections,
  cancellations), or does not;
- a ``/metrics`` HTTP endpoint is started for the round and scraped every second, or does not
  exist. The scraper is a separate process, as Prometheus is: its HTTP client's CPU time and GIL
  are not the server's (it still shares the machine's cores). It runs for the whole benchmark and
  scrapes only while a control file names an endpoint.
The switch is bench-local: subclasses of ``EngineRecorder`` and ``Metrics`` whose observer methods
forward to the real ones only while switched on. The recorder is attached once, so the engine's
observer lists are the same in both configurations; "off" therefore still builds one
``StepEvent`` per step and makes one call per step, per finished request and per RPC that
returns at once: about 4 us per step that takes a few hundred milliseconds (timed with timeit),
below 0.01%, whereas production "off" (``--metrics-port -1``) attaches no observers at all. The
counters read back at the end must equal what the "on" rounds generated and nothing more; the
JSON's ``switch_check`` says whether they do.

Each round is one configuration serving ``--concurrency`` streaming requests started at once
(prompt 16 tokens, ``--new-tokens`` new tokens, greedy, EOS ignored) through the same channel.
Rounds come in pairs, in ABBA order (on,off, off,on, on,off, ...), so that a linear drift of the
machine's speed cancels; ``--warmup`` pairs come first and are not counted. Per round: tokens/s
(completion tokens / wall time from the first request to the last token, as in serving_bench.py)
and process CPU seconds (``time.process_time``, all threads) per generated token. Reported: the
median of the per-pair ratios on/off of tokens/s with a seeded bootstrap 95% confidence interval,
their mean, and the same for CPU per token (a second view: other tenants of a shared machine take
wall time but not this process's CPU time, though they still slow it through shared caches and
memory, so it is noisy too). Target: on/off >= 0.97; the verdict is "met" when the interval's
lower bound is >= 0.97, "not met" when its upper bound is < 0.97, and "inconclusive" otherwise
(always with fewer than 10 pairs). Writes ``bench/results/serving_metrics_overhead.json``.

    .venv/bin/python bench/serving_metrics_overhead.py                  # ~7 minutes on 2 CPU cores
    .venv/bin/python bench/serving_metrics_overhead.py --model random:tiny --rounds 2 --new-tokens 8
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.metadata
import json
import logging
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import torch
from gpt2_client.proto import generation_pb2_grpc
from gpt2_service.api.server import GenerationServer
from gpt2_service.config import EngineConfig, ServerConfig
from gpt2_service.engine.frontend import Engine
from gpt2_service.metrics import EngineRecorder, Metrics
from gpt2_service.model.weights import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_bench import RequestTrace, grpc_request, run_level

if TYPE_CHECKING:
    from gpt2_service.engine.events import FinishEvent, StepEvent

TARGET_RATIO = 0.97
MIN_PAIRS_FOR_VERDICT = 10
PROMPT_TOKENS = 16
BOOTSTRAP_RESAMPLES = 10_000
REQUESTS_OK = ("gpt2_requests_total", {"rpc": "GenerateStream", "code": "OK"})
RESULTS = Path(__file__).resolve().parent / "results" / "serving_metrics_overhead.json"

log = logging.getLogger("serving_metrics_overhead")

# The scraper process: every ``interval`` seconds, GET the URL the control file names (if any).
SCRAPER = """
import sys, time, urllib.request
control, interval = sys.argv[1], float(sys.argv[2])
while True:
    time.sleep(interval)
    with open(control) as f:
        url = f.read().strip()
    if url:
        with urllib.request.urlopen(url, timeout=10) as response:
            response.read()
        print("scraped", flush=True)
"""


class ProcessScraper:
    """A scraper in its own process, pointed at an endpoint (``scrape``) or at nothing (``None``)."""

    def __init__(self, interval: float) -> None:
        self._control = Path(tempfile.mkstemp(prefix="scrape-target-")[1])
        self._control.write_text("")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", SCRAPER, str(self._control), str(interval)], stdout=subprocess.PIPE, text=True
        )
        self.num_scrapes = 0
        self._reader = threading.Thread(target=self._count, daemon=True)
        self._reader.start()

    def _count(self) -> None:
        assert self._proc.stdout is not None
        for _ in self._proc.stdout:
            self.num_scrapes += 1

    def scrape(self, url: str | None) -> None:
        self._control.write_text(url or "")

    def close(self) -> None:
        self._proc.terminate()
        self._proc.wait()
        self._control.unlink(missing_ok=True)


# -- the switch ----------------------------------------------------------------------------------


class SwitchableRecorder(EngineRecorder):
    """The engine recorder, recording only while ``enabled`` (attached once, for the whole run)."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled = False

    def on_step(self, step: StepEvent) -> None:
        if self.enabled:
            super().on_step(step)

    def on_finish(self, event: FinishEvent) -> None:
        if self.enabled:
            super().on_finish(event)


class SwitchableMetrics(Metrics):
    """``Metrics`` whose engine recorder and RPC counters count only while switched on."""

    def __init__(self) -> None:
        super().__init__()
        self.registry.unregister(self.recorder)
        self.switchable = SwitchableRecorder()
        self.recorder = self.switchable
        self.registry.register(self.recorder)
        self.enabled = False

    def switch(self, on: bool) -> None:
        self.enabled = self.switchable.enabled = on

    def observe_rpc(self, rpc: str, code: str) -> None:
        if self.enabled:
            super().observe_rpc(rpc, code)

    def observe_rejected(self, reason: str) -> None:
        if self.enabled:
            super().observe_rejected(reason)

    def observe_cancelled(self) -> None:
        if self.enabled:
            super().observe_cancelled()

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


# -- the rounds ----------------------------------------------------------------------------------


@dataclass
class Round:
    pair: int  # -1, -2, ...: warm-up
    config: str  # "on" or "off"
    tokens_per_s: float
    seconds: float
    num_tokens: int
    cpu_seconds: float
    num_scrapes: int

    @property
    def cpu_ms_per_token(self) -> float:
        return self.cpu_seconds / self.num_tokens * 1000


def abba(pair: int) -> tuple[str, str]:
    return ("on", "off") if pair % 2 == 0 else ("off", "on")


async def one_round(
    pair: int,
    config: str,
    metrics: SwitchableMetrics,
    server: GenerationServer,
    stub: generation_pb2_grpc.TextGenerationAsyncStub,
    scraper: ProcessScraper,
    args: argparse.Namespace,
) -> Round:
    async def request(prompt: list[int], new_tokens: int, index: int) -> RequestTrace:
        return await grpc_request(stub, prompt, new_tokens, index)

    gc.collect()  # outside the measured span, the same for both
    on = config == "on"
    metrics.switch(on)
    ok_before = metrics.sample(*REQUESTS_OK)
    num_scrapes = 0
    cpu_start = time.process_time()
    if on:
        http_server, http_thread = metrics.start_http_server("127.0.0.1", 0)
        scrapes_before = scraper.num_scrapes
        scraper.scrape(f"http://127.0.0.1:{http_server.server_port}/metrics")
        result = await run_level(request, args.concurrency, PROMPT_TOKENS, args.new_tokens)
        scraper.scrape(None)
        num_scrapes = scraper.num_scrapes - scrapes_before
        await asyncio.to_thread(http_server.shutdown)
        http_server.server_close()
        http_thread.join()
    else:
        result = await run_level(request, args.concurrency, PROMPT_TOKENS, args.new_tokens)
    # The clients have every token (the engine records a step before it publishes it), but the
    # server-side ends of the RPCs, where the interceptor counts, may lag a little: let them land.
    await server.gate.wait_idle()
    await asyncio.sleep(0.05)
    deadline = time.monotonic() + 2.0
    while on and metrics.sample(*REQUESTS_OK) < ok_before + args.concurrency and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    cpu_seconds = time.process_time() - cpu_start
    metrics.switch(False)
    assert result.num_tokens == args.concurrency * args.new_tokens
    return Round(pair, config, result.tokens_per_s, result.seconds, result.num_tokens, cpu_seconds, num_scrapes)


# -- the statistics ------------------------------------------------------------------------------


def bootstrap_median_ci(values: list[float], seed: int, resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the median of ``values``."""
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    medians = np.median(data[rng.integers(0, len(data), size=(resamples, len(data)))], axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return float(low), float(high)


def verdict(ci: tuple[float, float], num_pairs: int) -> str:
    if num_pairs < MIN_PAIRS_FOR_VERDICT:  # a bootstrap of a handful of values is no interval
        return f"inconclusive (fewer than {MIN_PAIRS_FOR_VERDICT} pairs)"
    if ci[0] >= TARGET_RATIO:
        return "met"
    if ci[1] < TARGET_RATIO:
        return "not met"
    return "inconclusive"


def paired_summary(on: list[float], off: list[float], seed: int) -> tuple[dict[str, object], tuple[float, float]]:
    """One measure per round, on vs off: the values, their medians, and the per-pair ratios with
    their median, bootstrap 95% CI (also returned on its own) and mean."""
    ratios = [a / b for a, b in zip(on, off, strict=True)]
    ci = bootstrap_median_ci(ratios, seed)
    return {
        "on": on,
        "off": off,
        "median_on": statistics.median(on),
        "median_off": statistics.median(off),
        "pair_ratios_on_off": ratios,
        "median_pair_ratio": statistics.median(ratios),
        "ci95": list(ci),
        "mean_pair_ratio": statistics.fmean(ratios),
    }, ci


def summarise(rounds: list[Round], args: argparse.Namespace) -> dict[str, object]:
    by_pair = {(r.pair, r.config): r for r in rounds if r.pair >= 0}
    on = [by_pair[p, "on"] for p in range(args.rounds)]
    off = [by_pair[p, "off"] for p in range(args.rounds)]
    throughput, ci = paired_summary([r.tokens_per_s for r in on], [r.tokens_per_s for r in off], args.seed)
    cpu, _ = paired_summary([r.cpu_ms_per_token for r in on], [r.cpu_ms_per_token for r in off], args.seed)
    return {
        "tokens_per_s": throughput,
        "cpu_ms_per_token": cpu,
        "target": {"min_ratio_on_off": TARGET_RATIO, "verdict": verdict(ci, args.rounds)},
    }


# -- the run -------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> dict[str, object]:
    loaded = load_model(args.model)
    config = EngineConfig(model=args.model, max_batch_size=args.concurrency, stage_timing=False)
    metrics = SwitchableMetrics()
    metrics.set_model_info(loaded, dtype="float32", device="cpu", weights="float32", batch_invariant=True)
    engine = Engine(loaded, config)
    metrics.attach(engine)  # once: the switch decides whether it records
    await engine.start()
    server = GenerationServer(ServerConfig(host="127.0.0.1", port=0, reflection=False), metrics=metrics)
    port = await server.start()
    await server.attach(engine)
    rounds: list[Round] = []
    schedule = [(p, c) for p in range(-args.warmup, args.rounds) for c in abba(p)]  # ABBA throughout
    scraper = ProcessScraper(args.scrape_interval)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub: generation_pb2_grpc.TextGenerationAsyncStub = generation_pb2_grpc.TextGenerationStub(channel)
            for pair, name in schedule:
                r = await one_round(pair, name, metrics, server, stub, scraper, args)
                rounds.append(r)
                log.info(
                    "%s %d metrics %-3s: %6.1f tokens/s, %5.2f CPU ms/token, %d scrapes",
                    "warm-up" if pair < 0 else "pair",
                    pair + args.warmup + 1 if pair < 0 else pair + 1,
                    name,
                    r.tokens_per_s,
                    r.cpu_ms_per_token,
                    r.num_scrapes,
                )
    finally:
        scraper.close()
        await server.stop()
        await engine.shutdown()
    # The switch worked: the counters hold the "on" rounds (warm-up included) and nothing else.
    on_rounds = [r for r in rounds if r.config == "on"]
    recorded = {
        "generation_tokens": metrics.sample("gpt2_generation_tokens_total"),
        "requests_ok": metrics.sample(*REQUESTS_OK),
        "requests_finished": metrics.sample("gpt2_requests_finished_total", {"reason": "length"}),
    }
    expected = {
        "generation_tokens": float(sum(r.num_tokens for r in on_rounds)),
        "requests_ok": float(len(on_rounds) * args.concurrency),
        "requests_finished": float(len(on_rounds) * args.concurrency),
    }
    return {
        "model": args.model,
        "concurrency": args.concurrency,
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "warmup_rounds": args.warmup,
        "order": "ABBA pairs (on,off, off,on, ...), warm-up pairs excluded",
        "scrape_interval_s": args.scrape_interval,
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": args.seed, "interval": "percentile, 95%"},
        **summarise(rounds, args),
        "num_scrapes": sum(r.num_scrapes for r in rounds if r.pair >= 0),
        "switch_check": {"recorded": recorded, "expected_from_on_rounds": expected, "ok": recorded == expected},
        "round_log": [{**asdict(r), "cpu_ms_per_token": r.cpu_ms_per_token} for r in rounds],
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "prometheus_client": importlib.metadata.version("prometheus-client"),
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def table(report: dict[str, object]) -> str:
    tps, cpu, target, check = (report[k] for k in ("tokens_per_s", "cpu_ms_per_token", "target", "switch_check"))
    assert isinstance(tps, dict) and isinstance(cpu, dict) and isinstance(target, dict) and isinstance(check, dict)
    lines = [
        "| pair | order | on tok/s | off tok/s | on/off | on CPU ms/tok | off CPU ms/tok | on/off |",
        "|---:|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in range(len(tps["on"])):
        lines.append(
            f"| {p + 1} | {','.join(abba(p))} | {tps['on'][p]:.1f} | {tps['off'][p]:.1f} | "
            f"{tps['pair_ratios_on_off'][p]:.3f} | {cpu['on'][p]:.2f} | {cpu['off'][p]:.2f} | "
            f"{cpu['pair_ratios_on_off'][p]:.3f} |"
        )
    lo, hi = tps["ci95"]
    clo, chi = cpu["ci95"]
    lines += [
        "",
        f"{report['model']}, concurrency {report['concurrency']}, {report['new_tokens']} new tokens, "
        f"{report['rounds']} pairs ({report['warmup_rounds']} warm-up pairs excluded), "
        f"{report['num_scrapes']} scrapes",
        f"tokens/s: median on {tps['median_on']:.1f}, off {tps['median_off']:.1f}; "
        f"on/off per pair: median {tps['median_pair_ratio']:.4f}, 95% CI [{lo:.4f}, {hi:.4f}], "
        f"mean {tps['mean_pair_ratio']:.4f}",
        f"CPU ms/token: median on {cpu['median_on']:.2f}, off {cpu['median_off']:.2f}; "
        f"on/off per pair: median {cpu['median_pair_ratio']:.4f}, 95% CI [{clo:.4f}, {chi:.4f}], "
        f"mean {cpu['mean_pair_ratio']:.4f}",
        f"Target (throughput on/off >= {TARGET_RATIO}, judged on the CI of the median pair ratio): "
        f"{target['verdict']}.",
    ]
    if not check["ok"]:
        lines.append(f"WARNING: the metrics switch leaked (counters vs the on rounds): {check}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:gpt2")
    parser.add_argument("--rounds", type=int, default=28, help="measured pairs (one on, one off round each); even")
    parser.add_argument("--new-tokens", type=int, default=16, help="per request and round")
    parser.add_argument("--warmup", type=int, default=2, help="pairs before the measured ones, not counted")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--scrape-interval", type=float, default=1.0, help="seconds between scrapes while on")
    parser.add_argument("--seed", type=int, default=0, help="of the bootstrap")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.rounds < 2 or args.rounds % 2:
        parser.error("--rounds must be even and >= 2 (whole ABBA blocks)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("gpt2_service").setLevel(logging.ERROR)  # the random-weights banner, per-RPC lines
    report = asyncio.run(bench(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
