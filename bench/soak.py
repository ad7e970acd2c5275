"""Soak test (not a test of the suite): does the server's memory stay flat under hours of traffic?

Starts ``gpt2-serve`` (``random:gpt2`` by default) as a subprocess on free ports, and drives it
with mixed traffic from ``--concurrency`` threads of the project's Python client for ``--minutes``:
unary Generate, GenerateStream read to the end, streams cancelled after a few tokens, requests
whose short deadline expires, GenerateBatch, Introspection RPCs on short prompts (Tokenize,
Detokenize, PredictNext, Trace, HiddenStates, Embed, Attention), streams read slowly, and calls
on fresh connections; prompt lengths, max_new_tokens and sampling vary, seeded. A thread samples
the server's resident set size (RSS, from /proc) every ``--interval`` seconds and scrapes its
``/metrics`` as Prometheus would.

Measured: the least-squares slope of RSS (MB = 10^6 bytes, per minute) over the samples after
``--warmup-minutes``, and RSS after ``--idle-seconds`` of idleness once traffic stops. The script
exits 1 when the slope is >= ``--max-slope`` MB/minute (or the server died), 0 otherwise. It
writes ``bench/results/soak.json`` (samples, settings, machine, slope, request counts) and
``bench/results/soak.png`` (RSS vs minutes, warm-up shaded, fitted line).

The server runs with ``--memory-settings shipped`` by default: the environment deploy/Dockerfile
sets (smaller oneDNN / ideep primitive caches; without them every new matrix shape adds a cached
primitive, hundreds of MB over a few thousand requests). ``--memory-settings none`` runs it with
every library's defaults for comparison; other names try allocators (``jemalloc``, ``arena2``, ...).

    make soak                                                     # 30 minutes
    make soak SOAK_ARGS="--minutes 8 --warmup-minutes 3"
    .venv/bin/python bench/soak.py --memory-settings none --output /tmp/soak-none.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import re
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from gpt2_client import Client, GPT2Error
from serve_process import ServeProcess

RESULTS_DIR = Path(__file__).resolve().parent / "results"

DOCKERFILE = Path(__file__).resolve().parents[1] / "deploy" / "Dockerfile"
# The memory settings deploy/Dockerfile gives the server (read from it, so the two cannot drift).
SHIPPED_KEYS = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY", "MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_")
CACHES = {"LRU_CACHE_CAPACITY": "128", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128"}
JEMALLOC = {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}


def shipped_settings() -> dict[str, str]:
    """The runtime stage's ENV values of ``SHIPPED_KEYS`` in deploy/Dockerfile."""
    runtime = DOCKERFILE.read_text().split(" AS runtime", 1)[-1]
    return {key: value for key, value in re.findall(r"\b(\w+)=(\S+)", runtime) if key in SHIPPED_KEYS}


# The server's memory settings by name (--memory-settings); "none" is every library's default.
MEMORY_SETTINGS: dict[str, dict[str, str]] = {
    "shipped": shipped_settings(),
    "none": {},
    "arena2": {"MALLOC_ARENA_MAX": "2"},
    "trim": {"MALLOC_TRIM_THRESHOLD_": str(128 * 1024), "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)},
    "jemalloc": JEMALLOC,
    "tcmalloc": {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"},
    "caps128": CACHES,
    "caps128-arena2": {**CACHES, "MALLOC_ARENA_MAX": "2"},
}

WORDS = [
    "the", "cat", "sat", "on", "a", "mat", "while", "rain", "fell", "over", "quiet", "hills", "and",
    "old", "roads", "led", "far", "into", "bright", "cities", "where", "people", "spoke", "of",
    "ships", "machines", "music", "rivers", "winter", "gardens", "time", "\n", ",", ".",
]  # fmt: skip


# -- the traffic -------------------------------------------------------------------------------


def prompt(rng: random.Random, low: int = 1, high: int = 120) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def sampling(rng: random.Random) -> dict[str, Any]:
    """Varied sampling: greedy or seeded sampling with filters, penalties, stops, logprobs."""
    params: dict[str, Any] = {"max_new_tokens": rng.randint(4, 32), "seed": rng.randrange(2**31)}
    params["temperature"] = rng.choice([0.0, 0.7, 1.0, 1.3])
    if rng.random() < 0.5:
        params["top_k"] = rng.choice([5, 40, 200])
    if rng.random() < 0.3:
        params["top_p"] = rng.choice([0.8, 0.95])
    if rng.random() < 0.2:
        params["repetition_penalty"] = 1.2
    if rng.random() < 0.2:
        params["stop"] = [rng.choice(WORDS)]
    if rng.random() < 0.3:
        params["top_logprobs"] = rng.randint(1, 5)
    return params


def do_generate(client: Client, rng: random.Random) -> None:
    client.generate(prompt(rng), **sampling(rng))


def do_stream(client: Client, rng: random.Random) -> None:
    for _ in client.stream(prompt(rng), **sampling(rng)):
        pass


def do_stream_cancel(client: Client, rng: random.Random) -> None:
    """Leave a stream after a few chunks: the client cancels the call."""
    chunks = client.stream(prompt(rng), **{**sampling(rng), "max_new_tokens": 48, "ignore_eos": True})
    for index, _ in enumerate(chunks):
        if index >= rng.randint(1, 4):
            break
    chunks.close()  # type: ignore[attr-defined]  # a generator: closing it cancels the call


def do_deadline(client: Client, rng: random.Random) -> None:
    """A deadline that expires mid-generation (DEADLINE_EXCEEDED is the expected outcome)."""
    params = {**sampling(rng), "max_new_tokens": 48, "ignore_eos": True}
    if rng.random() < 0.5:
        client.generate(prompt(rng), timeout=rng.uniform(0.05, 0.6), **params)
    else:
        for _ in client.stream(prompt(rng), timeout=rng.uniform(0.05, 0.6), **params):
            pass


def do_batch(client: Client, rng: random.Random) -> None:
    items = [{"prompt": prompt(rng, 1, 40), **sampling(rng)} for _ in range(rng.randint(2, 4))]
    client.generate_batch(items, max_new_tokens=rng.randint(4, 16))  # type: ignore[arg-type]


def do_introspect(client: Client, rng: random.Random) -> None:
    text = prompt(rng, 1, 24)
    inspect = client.inspect
    ids = inspect.tokenize(text).token_ids
    inspect.detokenize(ids)
    call = rng.choice(["predict_next", "trace", "hidden_states", "embed", "attention"])
    if call == "predict_next":
        inspect.predict_next(text, top_k=rng.choice([5, 20]), temperature=0.8, num_samples=4, seed=1)
    elif call == "trace":
        inspect.trace(text)
    elif call == "hidden_states":
        inspect.hidden_states(text, include_vectors=rng.random() < 0.5, last_token_only=rng.random() < 0.5)
    elif call == "embed":
        inspect.embed(text, dtype=rng.choice(["float32", "bfloat16"]))
    else:
        inspect.attention(text, layers=[0], include_scores=rng.random() < 0.3)


def do_slow_stream(client: Client, rng: random.Random) -> None:
    """A reader slower than the engine: the server buffers what it has not sent."""
    for _ in client.stream(prompt(rng), **{**sampling(rng), "max_new_tokens": rng.randint(8, 16)}):
        time.sleep(rng.uniform(0.2, 0.5))


def do_fresh_connection(client: Client, rng: random.Random) -> None:
    """A call on a new connection, closed after it (connection set-up and tear-down)."""
    with Client(client.config.grpc_target, timeout=30) as fresh:
        fresh.model_info()
        fresh.generate(prompt(rng, 1, 8), max_new_tokens=4)


ACTIONS = {  # name: (function, weight)
    "generate": (do_generate, 4),
    "stream": (do_stream, 4),
    "stream_cancel": (do_stream_cancel, 2),
    "deadline": (do_deadline, 2),
    "batch": (do_batch, 2),
    "introspect": (do_introspect, 3),
    "slow_stream": (do_slow_stream, 1),
    "fresh_connection": (do_fresh_connection, 1),
}


@dataclass
class Tally:
    """Outcomes per action: ``{action: {"OK" | error class: count}}``."""

    counts: dict[str, collections.Counter[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, action: str, outcome: str) -> None:
        with self.lock:
            self.counts.setdefault(action, collections.Counter())[outcome] += 1

    def total(self) -> int:
        with self.lock:
            return sum(sum(c.values()) for c in self.counts.values())

    def as_dict(self) -> dict[str, dict[str, int]]:
        with self.lock:
            return {action: dict(counter) for action, counter in sorted(self.counts.items())}


def worker(address: str, seed: int, stop_at: float, tally: Tally) -> None:
    rng = random.Random(seed)
    names = list(ACTIONS)
    weights = [ACTIONS[name][1] for name in names]
    with Client(address, timeout=60) as client:
        while time.monotonic() < stop_at:
            name = rng.choices(names, weights)[0]
            try:
                ACTIONS[name][0](client, rng)
                tally.add(name, "OK")
            except GPT2Error as error:
                tally.add(name, type(error).__name__)


# -- sampling RSS --------------------------------------------------------------------------------


@dataclass
class Sample:
    minutes: float
    rss_mb: float
    requests: int
    phase: str  # "load" or "idle"


class RssSampler:
    """A thread that scrapes ``/metrics`` (as Prometheus would) and records the server's RSS every
    ``interval`` seconds, under the current ``phase`` ("load", then "idle")."""

    def __init__(self, server: ServeProcess, metrics_url: str, interval: float, tally: Tally) -> None:
        self.server, self.metrics_url, self.interval, self.tally = server, metrics_url, interval, tally
        self.samples: list[Sample] = []
        self.phase = "load"
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> Sample:
        minutes = (time.monotonic() - self._start) / 60
        sample = Sample(minutes, self.server.rss_mb(), self.tally.total(), self.phase)
        self.samples.append(sample)
        print(f"  {sample.minutes:6.2f} min  RSS {sample.rss_mb:8.1f} MB  {sample.requests} requests", flush=True)
        return sample

    def _run(self) -> None:
        while True:
            try:
                with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
                    response.read()
            except OSError:
                pass
            self.sample()
            if self._stop.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# -- results -------------------------------------------------------------------------------------


def slope_mb_per_minute(samples: list[Sample], warmup_minutes: float) -> tuple[float, float]:
    """Least-squares slope and intercept of RSS over the load samples after the warm-up."""
    points = [(s.minutes, s.rss_mb) for s in samples if s.phase == "load" and s.minutes >= warmup_minutes]
    if len(points) < 2:
        return float("nan"), float("nan")
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    slope = sxy / sxx
    return slope, mean_y - slope * mean_x


def growth_per_1000_requests(samples: list[Sample], warmup_minutes: float) -> float:
    """The same fit against requests served instead of minutes (a busy machine serves fewer)."""
    points = [s for s in samples if s.phase == "load" and s.minutes >= warmup_minutes]
    as_minutes = [Sample(s.requests / 1000, s.rss_mb, s.requests, s.phase) for s in points]
    return slope_mb_per_minute(as_minutes, 0.0)[0]


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "platform": platform.platform(),
        "libc": " ".join(platform.libc_ver()),
        "python": platform.python_version(),
        "torch": metadata.version("torch"),
        "grpcio": metadata.version("grpcio"),
    }


def plot(samples: list[Sample], result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    load = [s for s in samples if s.phase == "load"]
    idle = [s for s in samples if s.phase == "idle"]
    ax.axvspan(0, result["settings"]["warmup_minutes"], color="0.9", label="warm-up")
    ax.plot([s.minutes for s in load], [s.rss_mb for s in load], ".-", label="RSS under load")
    if idle:
        ax.plot([s.minutes for s in idle], [s.rss_mb for s in idle], "o", color="tab:green", label="RSS idle")
    slope, intercept = result["slope_mb_per_minute"], result["intercept_mb"]
    if slope == slope:  # not NaN
        xs = [result["settings"]["warmup_minutes"], load[-1].minutes]
        ax.plot(xs, [intercept + slope * x for x in xs], "--", color="tab:red", label=f"fit: {slope:+.2f} MB/min")
    ax.set_xlabel("minutes")
    ax.set_ylabel("server RSS (MB)")
    ax.set_title(
        f"gpt2-serve soak: {result['settings']['model']}, memory settings {result['settings']['memory_settings']}"
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the run -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="minutes of traffic")
    parser.add_argument("--warmup-minutes", type=float, default=5.0, help="minutes left out of the slope")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads")
    parser.add_argument("--max-slope", type=float, default=1.0, help="fail when the slope is >= this (MB/minute)")
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="idle time before the last RSS sample")
    parser.add_argument("--model", default="random:gpt2")
    parser.add_argument("--memory-settings", choices=list(MEMORY_SETTINGS), default="shipped",
                        help="the server's memory environment (shipped = deploy/Dockerfile's; none = defaults)")  # fmt: skip
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="more server environment")
    parser.add_argument("--server-arg", action="append", default=[], help="one more gpt2-serve argument (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-log", type=Path, help="write the server's log here")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "soak.json", help="JSON; the plot goes beside it")
    return parser.parse_args(argv)


def drive(address: str, args: argparse.Namespace, tally: Tally) -> None:
    """``args.concurrency`` client threads for ``args.minutes``."""
    stop_at = time.monotonic() + args.minutes * 60
    workers = [
        threading.Thread(target=worker, args=(address, args.seed * 1000 + i, stop_at, tally), daemon=True)
        for i in range(args.concurrency)
    ]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()


def run(args: argparse.Namespace) -> dict[str, Any]:
    env = {**MEMORY_SETTINGS[args.memory_settings], **dict(item.split("=", 1) for item in args.env)}
    server = ServeProcess(args.model, args.server_arg, env, args.server_log)
    tally = Tally()
    try:
        address, metrics_url = server.wait_listening()
        server.wait_serving(address)
        print(
            f"gpt2-serve pid {server.process.pid} on {address}, memory settings {args.memory_settings} {env}",
            flush=True,
        )
        sampler = RssSampler(server, metrics_url, args.interval, tally)
        drive(address, args, tally)
        sampler.phase = "idle"
        print(f"traffic stopped; idle for {args.idle_seconds:.0f} s", flush=True)
        time.sleep(args.idle_seconds)
        sampler.stop()
        sampler.sample()
        died = server.process.poll() is not None
    finally:
        exit_code = server.stop()
    return summarise(args, env, sampler.samples, tally, {"server_died": died, "server_exit_code": exit_code})


def summarise(
    args: argparse.Namespace, env: dict[str, str], samples: list[Sample], tally: Tally, server: dict[str, Any]
) -> dict[str, Any]:
    """Everything soak.json holds."""
    slope, intercept = slope_mb_per_minute(samples, args.warmup_minutes)
    load = [s for s in samples if s.phase == "load"]
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "settings": {
            "minutes": args.minutes,
            "warmup_minutes": args.warmup_minutes,
            "interval_s": args.interval,
            "concurrency": args.concurrency,
            "idle_seconds": args.idle_seconds,
            "model": args.model,
            "memory_settings": args.memory_settings,
            "server_env": env,
            "server_args": args.server_arg,
            "max_slope_mb_per_minute": args.max_slope,
            "seed": args.seed,
            "action_weights": {name: weight for name, (_, weight) in ACTIONS.items()},
        },
        "machine": machine(),
        "slope_mb_per_minute": slope,
        "intercept_mb": intercept,
        "mb_per_1000_requests": growth_per_1000_requests(samples, args.warmup_minutes),
        "rss_mb": {
            "first": load[0].rss_mb if load else None,
            "after_warmup": next((s.rss_mb for s in load if s.minutes >= args.warmup_minutes), None),
            "end_of_load": load[-1].rss_mb if load else None,
            "max": max((s.rss_mb for s in samples), default=None),
            "idle": samples[-1].rss_mb if samples and samples[-1].phase == "idle" else None,
        },
        "requests": tally.as_dict(),
        "requests_total": tally.total(),
        **server,
        "samples": [vars(s) for s in samples],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    plot([Sample(**s) for s in result["samples"]], result, args.output.with_suffix(".png"))
    slope, rss = result["slope_mb_per_minute"], result["rss_mb"]
    print(f"requests: {result['requests_total']} {result['requests']}")
    print(f"RSS: {rss['first']:.1f} MB at start, {rss['end_of_load']:.1f} MB at the end of load, "
          f"{rss['idle']:.1f} MB idle after {args.idle_seconds:.0f} s")  # fmt: skip
    print(f"slope after {args.warmup_minutes:g} min warm-up: {slope:+.3f} MB/minute (limit {args.max_slope:g}), "
          f"{result['mb_per_1000_requests']:+.2f} MB per 1000 requests")  # fmt: skip
    print(f"wrote {args.output} and {args.output.with_suffix('.png')}")
    failed = result["server_died"] or not slope < args.max_slope
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
