"""Prefix reuse and n completions (issue 14), measured in-process on ``random:gpt2``.

A. Prefix reuse: N requests (32; --quick 8) submitted at once through ``Engine.submit``, each
   prompt the same 512 random token ids followed by 16 distinct random ones, greedy, 8 new tokens,
   EOS ignored; ``max_batch_size`` and ``kv_cache_slots`` 32, the default ``max_prefill_tokens``
   (256) and deterministic mode (``batch_invariant=True``). Two engines: the default
   (``prefix_cache=True``) and ``prefix_cache=False``. Time to first token of each request (the
   engine's ``Finished.timing``: arrival to first token; the wall time from the first submit to
   the first output on the event loop is in the JSON too): mean, p50, p90, and the ratio off / on
   (the issue's target: at least 5x). Two variants: "cold" (an engine that has seen nothing), and
   "warm" (one request with the same prefix and another suffix has finished first, so the prefix
   sits in a free KV-cache slot). The tokens of every request must be bitwise the same with and
   without the cache, cold and warm.
B. n completions: one request with ``n=8`` (a 500-token random prompt, temperature 1, seed 1234,
   16 new tokens, EOS ignored) vs 8 separate requests with seeds 1234..1241 submitted at once, on
   the default engine (prefix cache on: the separate requests reuse the prompt's first whole
   prefill chunk, 256 tokens, from the first of them) and, for reference, 8 separate requests with
   the prefix cache off. Wall time from the first submit to the last token, and the ratio
   separate / n; TTFT of each choice. Choice i's tokens must equal the separate request with seed
   1234 + i.

Every run starts a fresh engine and shuts it down after (so the cold runs find nothing cached,
and only one engine's threads run at a time). Systems alternate in rounds after a warm-up round
(8 requests; --quick: two systems, 2 requests), the order rotating each round, the pairs to
compare back to back; times are medians over rounds, ratios medians of per-round ratios. A token
mismatch is logged as an error, written to the JSON (``mismatches``) and makes the script exit 1.

    .venv/bin/python bench/reuse_bench.py              # 4 rounds of 32 requests, ~6 minutes on 2 cores
    .venv/bin/python bench/reuse_bench.py --quick      # 1 round of 8 requests, about half a minute
    .venv/bin/python bench/reuse_bench.py --rounds 5

Writes ``bench/results/reuse.json`` (``reuse-quick.json``) and prints a markdown table; a full run
with the default output also puts the table in bench/README.md. ``make bench`` (bench/bench.py)
runs the same measurement as one of its phases.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import standalone
from gpt2_service.config import EngineConfig
from gpt2_service.core.request import GenerationRequest, SamplingParams, StoppingCriteria
from gpt2_service.core.sequence import Finished
from gpt2_service.engine.frontend import Engine
from gpt2_service.engine.stream import GenerationStream
from gpt2_service.model.weights import LoadedModel
from standalone import dated_report, table, yes

MODEL = "random:gpt2"
PREFIX_TOKENS = 512
SUFFIX_TOKENS = 16
REUSE_NEW_TOKENS = 8
N_CHOICES = 8
N_PROMPT_TOKENS = 500
N_NEW_TOKENS = 16
SEED = 1234
SLOTS = 32
RUN_TIMEOUT_S = 600.0  # a run that takes longer is a hang: fail loudly
TTFT_MIN_RATIO = 5.0  # the issue's target: TTFT without reuse / with it
N_MIN_RATIO = 1.2  # "clearly above 1": wall time of 8 separate requests / one with n=8
RESULTS = Path(__file__).resolve().parent / "results"
README_START, README_END = "<!-- reuse-bench:start -->", "<!-- reuse-bench:end -->"

REUSE_KEYS = ("cold/on", "cold/off", "warm/on", "warm/off")
N_KEYS = ("n", "separate", "separate/off")
LABELS = {
    "cold/on": "cold, prefix cache on",
    "cold/off": "cold, prefix cache off",
    "warm/on": "warm, prefix cache on",
    "warm/off": "warm, prefix cache off",
    "n": f"one request, n={N_CHOICES}",
    "separate": f"{N_CHOICES} separate requests (prefix cache on)",
    "separate/off": f"{N_CHOICES} separate requests (prefix cache off)",
}
# the pairs compared, each run back to back in a round
GROUPS = (("cold/on", "cold/off"), ("warm/on", "warm/off"), ("n", "separate", "separate/off"))

log = logging.getLogger("reuse_bench")


@dataclass(frozen=True)
class ReusePlan:
    requests: int  # concurrent requests of part A
    rounds: int
    warm_up_requests: int  # part A's requests in the warm-up round
    warm_up: tuple[str, ...]  # the systems of the warm-up round
    quick: bool


def make_plan(quick: bool, rounds: int | None = None, requests: int | None = None) -> ReusePlan:
    """Full: every system warmed up with 8 requests, then 4 rounds of 32 requests (~6 minutes on 2
    cores); quick: two systems warmed up with 2 requests, then 1 round of 8 (about half a minute)."""
    requests = requests or (8 if quick else SLOTS)
    warm_up = ("cold/on", "n") if quick else (*REUSE_KEYS, *N_KEYS)
    return ReusePlan(requests, rounds or (1 if quick else 4), min(2 if quick else 8, requests), warm_up, quick)


@dataclass
class Run:
    """One run of one system: per request (per choice, for n), in submission (choice) order."""

    seconds: float  # first submit -> last token
    ttft: list[float]  # the engine's Finished.timing: arrival -> first token
    ttft_wall: list[float]  # first submit -> the first output on the event loop
    cached: list[int]  # Finished.usage.cached_prompt_tokens
    seeds: list[int]
    tokens: list[list[int]] = field(repr=False)
    prefix_hits: int = 0  # engine.stats, this run's requests only
    prefix_reused_tokens: int = 0
    steps: int = 0  # engine steps of this run: the same work takes as many on a busier machine
    cpu_seconds: float = 0.0  # the process's CPU time during the run (on a VM, time the host
    # takes the vCPU away may be counted in it)


# -- the runs --------------------------------------------------------------------------------------


def _request(rid: str, prompt: list[int], new_tokens: int, sampling: SamplingParams, n: int = 1) -> GenerationRequest:
    return GenerationRequest(
        request_id=rid,
        prompt_token_ids=tuple(prompt),
        sampling=sampling,
        stopping=StoppingCriteria(max_new_tokens=new_tokens, ignore_eos=True),
        n=n,
    )


async def _read(
    stream: GenerationStream, start: float
) -> tuple[dict[int, list[int]], dict[int, Finished], dict[int, float]]:
    """A stream's tokens, how each choice finished, and when its first output arrived."""
    tokens: dict[int, list[int]] = {}
    ends: dict[int, Finished] = {}
    first: dict[int, float] = {}
    try:
        async for out in stream:
            if out.tokens and out.index not in first:
                first[out.index] = time.perf_counter() - start
            tokens.setdefault(out.index, []).extend(t.id for t in out.tokens)
            if out.finished is not None:
                ends[out.index] = out.finished
    finally:
        stream.close()
    return tokens, ends, first


async def submit_all(engine: Engine, requests: list[GenerationRequest]) -> Run:
    """Submit every request at once, read every stream to its end."""
    hits, reused, steps = engine.stats.prefix_hits, engine.stats.prefix_reused_tokens, engine.stats.num_steps
    cpu = time.process_time()
    start = time.perf_counter()
    streams = [await engine.submit(r) for r in requests]
    try:
        results = await asyncio.wait_for(asyncio.gather(*(_read(s, start) for s in streams)), RUN_TIMEOUT_S)
    except TimeoutError:
        raise RuntimeError(
            f"{len(requests)} requests ({requests[0].request_id}, ...) not finished after {RUN_TIMEOUT_S:.0f} s: "
            f"a hang? engine stats {engine.stats}"
        ) from None
    seconds = time.perf_counter() - start
    run = Run(seconds, [], [], [], [], [], cpu_seconds=time.process_time() - cpu)
    for request, (tokens, ends, first) in zip(requests, results, strict=True):
        if sorted(ends) != list(range(request.n)):
            raise RuntimeError(f"{request.request_id}: choices {sorted(ends)} finished, expected {request.n}")
        for i in range(request.n):
            end = ends[i]
            if list(end.token_ids) != tokens[i]:
                raise RuntimeError(f"{request.request_id} choice {i}: streamed tokens differ from Finished.token_ids")
            run.ttft.append(end.timing.time_to_first_token_seconds)
            run.ttft_wall.append(first[i])
            run.cached.append(end.usage.cached_prompt_tokens)
            run.seeds.append(end.seed)
            run.tokens.append(tokens[i])
    run.prefix_hits = engine.stats.prefix_hits - hits
    run.prefix_reused_tokens = engine.stats.prefix_reused_tokens - reused
    run.steps = engine.stats.num_steps - steps
    return run


class Workload:
    """The prompts of both parts, from one seeded generator."""

    def __init__(self, vocab_size: int, requests: int) -> None:
        gen = torch.Generator().manual_seed(14)

        def ids(n: int) -> list[int]:
            return torch.randint(0, vocab_size, (n,), generator=gen).tolist()

        self.prefix = ids(PREFIX_TOKENS)
        self.suffixes = [ids(SUFFIX_TOKENS) for _ in range(max(requests, SLOTS))]
        self.warm_suffix = ids(SUFFIX_TOKENS)
        self.n_prompt = ids(N_PROMPT_TOKENS)

    def reuse_requests(self, count: int) -> list[GenerationRequest]:
        greedy = SamplingParams(temperature=0.0)
        return [_request(f"reuse-{i}", self.prefix + self.suffixes[i], REUSE_NEW_TOKENS, greedy) for i in range(count)]

    def warm_request(self) -> GenerationRequest:
        return _request("reuse-warm", self.prefix + self.warm_suffix, 1, SamplingParams(temperature=0.0))

    def n_request(self, n: int) -> GenerationRequest:
        return _request("choices", self.n_prompt, N_NEW_TOKENS, SamplingParams(temperature=1.0, seed=SEED), n)

    def separate_requests(self, n: int) -> list[GenerationRequest]:
        return [
            _request(f"separate-{i}", self.n_prompt, N_NEW_TOKENS, SamplingParams(temperature=1.0, seed=SEED + i))
            for i in range(n)
        ]


def engine_config(prefix_cache: bool, slots: int = SLOTS) -> EngineConfig:
    return EngineConfig(
        model=MODEL, max_batch_size=slots, kv_cache_slots=slots, max_queue_size=256, prefix_cache=prefix_cache
    )


async def with_engine(loaded: LoadedModel, config: EngineConfig, body: Callable[[Engine], Awaitable[Run]]) -> Run:
    """``body`` on a fresh engine, shut down after; its KV cache is freed before the next starts."""
    engine = Engine(loaded, config)
    await engine.start()
    try:
        return await body(engine)
    finally:
        await engine.shutdown()
        del engine
        gc.collect()


System = Callable[[int], Awaitable[Run]]  # requests of part A (n ignores it) -> a run


def systems(loaded: LoadedModel, work: Workload) -> dict[str, System]:
    def reuse(prefix_cache: bool, warm: bool) -> System:
        async def run(count: int) -> Run:
            async def body(engine: Engine) -> Run:
                if warm:
                    await submit_all(engine, [work.warm_request()])
                return await submit_all(engine, work.reuse_requests(count))

            return await with_engine(loaded, engine_config(prefix_cache), body)

        return run

    def choices(kind: str) -> System:
        async def run(_: int) -> Run:
            requests = [work.n_request(N_CHOICES)] if kind == "n" else work.separate_requests(N_CHOICES)
            config = engine_config(kind != "separate/off", N_CHOICES)
            return await with_engine(loaded, config, lambda engine: submit_all(engine, requests))

        return run

    return {
        "cold/on": reuse(True, False),
        "cold/off": reuse(False, False),
        "warm/on": reuse(True, True),
        "warm/off": reuse(False, True),
        **{key: choices(key) for key in N_KEYS},
    }


def round_order(rnd: int) -> list[str]:
    """The groups rotated by the round, and each group's systems too: who goes first changes."""
    shift = rnd % len(GROUPS)
    order: list[str] = []
    for group in GROUPS[shift:] + GROUPS[:shift]:
        k = rnd % len(group)
        order += group[k:] + group[:k]
    return order


async def measure(loaded: LoadedModel, plan: ReusePlan) -> dict[str, Any]:
    """Warm-up, then ``plan.rounds`` rounds of every system; the summary (``summarise``)."""
    started = time.perf_counter()
    work = Workload(loaded.model.config.vocab_size, plan.requests)
    runs_of = systems(loaded, work)
    for key in plan.warm_up:  # allocator growth, oneDNN primitives of these shapes
        await runs_of[key](plan.warm_up_requests)
        log.info("reuse warm-up %-12s done", key)
    runs: dict[str, list[Run]] = {key: [] for key in runs_of}
    for rnd in range(plan.rounds):
        for key in round_order(rnd):
            run = await runs_of[key](plan.requests)
            runs[key].append(run)
            log.info(
                "reuse round %d %-12s %6.2f s (CPU %6.2f s, %3d steps), TTFT mean %6.3f s, cached %d",
                rnd + 1, key, run.seconds, run.cpu_seconds, run.steps, statistics.fmean(run.ttft), sum(run.cached),
            )  # fmt: skip
    return summarise(plan, runs, time.perf_counter() - started)


# -- the summary -----------------------------------------------------------------------------------


def _p(values: list[float], q: int) -> float:
    """The q-th percentile (linear interpolation between the closest ranks)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _paired(runs: dict[str, list[Run]], a: str, b: str, stat: Callable[[Run], float]) -> float | None:
    """Median over rounds of stat(a) / stat(b)."""
    pairs = [stat(x) / stat(y) for x, y in zip(runs[a], runs[b], strict=False) if stat(y)]
    return statistics.median(pairs) if pairs else None


def check_tokens(runs: dict[str, list[Run]]) -> tuple[dict[str, bool], list[str]]:
    """The equalities that must hold, and a line per mismatch."""
    mismatches: list[str] = []
    reference = runs["cold/off"][0].tokens

    def same(key: str, rnd: int, expected: list[list[int]], what: str) -> bool:
        got = runs[key][rnd].tokens
        bad = [i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e]
        if bad:
            mismatches.append(f"round {rnd + 1}: {key} differs from {what} in requests {bad}")
        return not bad

    def all_rounds(key: str, expected: Callable[[int], list[list[int]]], what: str) -> bool:
        return all([same(key, rnd, expected(rnd), what) for rnd in range(len(runs[key]))])

    checks = {
        "cold_on_equals_off": all_rounds("cold/on", lambda r: runs["cold/off"][r].tokens, "cold/off"),
        "warm_on_equals_off": all_rounds("warm/on", lambda r: runs["warm/off"][r].tokens, "warm/off"),
        "every_round_equal": all_rounds("cold/off", lambda _: reference, "cold/off round 1")
        and all_rounds("warm/off", lambda _: reference, "cold/off round 1"),
        "n_choices_equal_separate": all_rounds("n", lambda r: runs["separate"][r].tokens, "separate (seed + i)")
        and all_rounds("n", lambda r: runs["separate/off"][r].tokens, "separate/off (seed + i)"),
    }
    seeds = [SEED + i for i in range(N_CHOICES)]
    checks["n_seeds"] = all(run.seeds == seeds for key in N_KEYS for run in runs[key])
    if not checks["n_seeds"]:
        mismatches.append(f"the choices' / separate requests' seeds are not {seeds}")
    checks["choices_differ"] = len({tuple(t) for t in runs["n"][0].tokens}) > 1
    if not checks["choices_differ"]:
        mismatches.append("the n choices all produced the same tokens")
    for line in mismatches:
        log.error("MISMATCH: %s", line)
    return checks, mismatches


def summarise(plan: ReusePlan, runs: dict[str, list[Run]], seconds: float) -> dict[str, Any]:
    checks, mismatches = check_tokens(runs)
    med = statistics.median
    systems_out: dict[str, Any] = {}
    for key, rs in runs.items():
        systems_out[key] = {
            "label": LABELS[key],
            "seconds": med(r.seconds for r in rs),
            "ttft_mean_s": med(statistics.fmean(r.ttft) for r in rs),
            "ttft_p50_s": med(_p(r.ttft, 50) for r in rs),
            "ttft_p90_s": med(_p(r.ttft, 90) for r in rs),
            "ttft_max_s": med(max(r.ttft) for r in rs),
            "ttft_wall_mean_s": med(statistics.fmean(r.ttft_wall) for r in rs),
            "cached_prompt_tokens": med(sum(r.cached) for r in rs),
            "prefix_hits": med(r.prefix_hits for r in rs),
            "prefix_reused_tokens": med(r.prefix_reused_tokens for r in rs),
            "steps": med(r.steps for r in rs),
            "cpu_seconds": med(r.cpu_seconds for r in rs),
            "runs": [{k: v for k, v in asdict(r).items() if k != "tokens"} for r in rs],
        }

    def mean_ttft(r: Run) -> float:
        return statistics.fmean(r.ttft)

    def p50_ttft(r: Run) -> float:
        return _p(r.ttft, 50)

    def wall(r: Run) -> float:
        return r.seconds

    ratios = {
        "cold_ttft_mean_off_over_on": _paired(runs, "cold/off", "cold/on", mean_ttft),
        "cold_ttft_p50_off_over_on": _paired(runs, "cold/off", "cold/on", p50_ttft),
        "warm_ttft_mean_off_over_on": _paired(runs, "warm/off", "warm/on", mean_ttft),
        "warm_ttft_p50_off_over_on": _paired(runs, "warm/off", "warm/on", p50_ttft),
        "separate_over_n_seconds": _paired(runs, "separate", "n", wall),
        "separate_off_over_n_seconds": _paired(runs, "separate/off", "n", wall),
        "separate_over_n_ttft_mean": _paired(runs, "separate", "n", mean_ttft),
    }
    return {
        "workload": {
            "model": MODEL,
            "requests": plan.requests,
            "prefix_tokens": PREFIX_TOKENS,
            "suffix_tokens": SUFFIX_TOKENS,
            "reuse_new_tokens": REUSE_NEW_TOKENS,
            "n": N_CHOICES,
            "n_prompt_tokens": N_PROMPT_TOKENS,
            "n_new_tokens": N_NEW_TOKENS,
            "n_engine_slots": N_CHOICES,
            "seed": SEED,
            "engine": {k: v for k, v in asdict(engine_config(True)).items() if k != "prefix_cache"},
            "rounds": plan.rounds,
            "warm_up_requests": plan.warm_up_requests,
            "warm_up": list(plan.warm_up),
            "quick": plan.quick,
        },
        "systems": systems_out,
        "ratios": ratios,
        "expected_cached_prompt_tokens": {
            "cold/on": (plan.requests - 1) * PREFIX_TOKENS,  # all but the request that computes it
            "warm/on": plan.requests * PREFIX_TOKENS,
        },
        "checks": checks,
        "mismatches": mismatches,
        "targets": {
            "ttft_off_over_on_min": TTFT_MIN_RATIO,
            "separate_over_n_min": N_MIN_RATIO,
        },
        "seconds": round(seconds, 1),
    }


# -- the report ------------------------------------------------------------------------------------


def _f(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None else format(value, spec) + suffix


def _verdict(value: float | None, need: float) -> str:
    return "n/a" if value is None else "met" if value >= need else "MISSED"


def targets(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(target, measured, threshold, verdict) rows, as bench_report.targets gives them."""
    ratios, need, req = r["ratios"], r["targets"], r["workload"]["requests"]
    rows = []
    for variant in ("cold", "warm"):
        value = ratios[f"{variant}_ttft_mean_off_over_on"]
        rows.append((f"prefix reuse, {variant}, {req} requests: mean TTFT off / on", _f(value, ".1f", "x"),
                     f">= {need['ttft_off_over_on_min']:.0f}x", _verdict(value, need["ttft_off_over_on_min"])))  # fmt: skip
    value = ratios["separate_over_n_seconds"]
    rows.append((f"{N_CHOICES} separate requests / one with n={N_CHOICES} (wall time)", _f(value, ".2f", "x"),
                 f">= {need['separate_over_n_min']:.1f}x", _verdict(value, need["separate_over_n_min"])))  # fmt: skip
    return rows


def report(r: dict[str, Any], with_targets: bool = True) -> str:
    """The tables (no heading): part A, part B, the targets (bench_report puts them in its own
    table), the checks."""
    w, s, ratios, checks = r["workload"], r["systems"], r["ratios"], r["checks"]
    expected = r["expected_cached_prompt_tokens"]
    rows = []
    for key in REUSE_KEYS:
        variant, cache = key.split("/")
        x = s[key]
        ratio = ratios[f"{variant}_ttft_mean_off_over_on"] if cache == "on" else None
        p50 = ratios[f"{variant}_ttft_p50_off_over_on"] if cache == "on" else None
        rows.append([
            variant, cache, _f(x["ttft_mean_s"]), _f(x["ttft_p50_s"]), _f(x["ttft_p90_s"]), _f(x["ttft_max_s"]),
            f"{x['cached_prompt_tokens']:.0f}" + (f" (of {expected[key]})" if key in expected else ""),
            _f(ratio, ".1f", "x") if cache == "on" else "", _f(p50, ".1f", "x") if cache == "on" else "",
            _f(x["seconds"]), f"{x['steps']:.0f}",
        ])  # fmt: skip
    part_a = table(
        ["variant", "prefix cache", "TTFT mean s", "p50 s", "p90 s", "max s", "cached prompt tokens (sum)",
         "off / on, mean", "off / on, p50", "all done s", "engine steps"],
        rows, "|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    )  # fmt: skip
    rows = []
    for key in N_KEYS:
        x = s[key]
        ratio = (
            None
            if key == "n"
            else ratios["separate_over_n_seconds" if key == "separate" else "separate_off_over_n_seconds"]
        )
        rows.append([
            LABELS[key], _f(x["seconds"]), _f(ratio, ".2f", "x") if key != "n" else "", _f(x["ttft_mean_s"]),
            _f(x["ttft_max_s"]), f"{x['cached_prompt_tokens']:.0f}", f"{x['steps']:.0f}",
        ])  # fmt: skip
    part_b = table(
        ["system", "wall s, submit to last token", "separate / n", "TTFT mean s", "TTFT max s",
         "cached prompt tokens (sum)", "engine steps"],
        rows, "|:---|---:|---:|---:|---:|---:|---:|",
    )  # fmt: skip
    target_rows = [list(t) for t in targets(r)]
    warm_up = (
        "every system" if len(w.get("warm_up", REUSE_KEYS + N_KEYS)) == len(LABELS) else " and ".join(w["warm_up"])
    )
    lines = [
        f"`{w['model']}`, deterministic mode, `max_batch_size` {w['engine']['max_batch_size']}, `max_prefill_tokens` "
        f"{w['engine']['max_prefill_tokens']}, a fresh engine per run; {w['rounds']} round(s) after a warm-up "
        f"({warm_up}, {w['warm_up_requests']} requests), order rotating; medians over rounds, ratios medians of "
        f"per-round ratios; {r['seconds'] / 60:.1f} minutes.",
        f"**Prefix reuse**: {w['requests']} requests submitted at once, each prompt the same {w['prefix_tokens']} random "
        f"token ids + {w['suffix_tokens']} distinct ones, greedy, {w['reuse_new_tokens']} new tokens, EOS ignored; TTFT = "
        "the engine's arrival to first token; warm = after one request with the same prefix finished (its slot free):",
        part_a,
        f"**n completions**: a {w['n_prompt_tokens']}-token random prompt, temperature 1, seed {w['seed']} (separate "
        f"requests: {w['seed']} + i), {w['n_new_tokens']} new tokens, EOS ignored, an engine of "
        f"{w.get('n_engine_slots', N_CHOICES)} slots:",
        part_b,
        "Checks: tokens bitwise equal with and without the prefix cache: cold "
        f"{yes(checks['cold_on_equals_off'])}, warm {yes(checks['warm_on_equals_off'])}; every round and variant the "
        f"same tokens: {yes(checks['every_round_equal'])}; choice i of n = the separate request with seed + i: "
        f"{yes(checks['n_choices_equal_separate'])} (seeds {yes(checks['n_seeds'])}, choices differ "
        f"{yes(checks['choices_differ'])}).",
    ]
    if with_targets:
        lines.insert(-1, table(["target", "measured", "target", "verdict"], target_rows, "|:---|---:|---:|:---|"))
    if r["mismatches"]:
        lines.append("\n".join(f"- **MISMATCH**: {m}" for m in r["mismatches"]))
    return "\n\n".join(lines)


def standalone_report(payload: dict[str, Any]) -> str:
    """The standalone run's report: its date and machine, then ``report``. Rebuilt from the JSON:

    .venv/bin/python -c 'import json, reuse_bench; print(reuse_bench.standalone_report(json.load(open("results/reuse.json"))))'
    """
    return dated_report(payload, report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round, 8 requests in part A, a shorter warm-up")
    parser.add_argument("--rounds", type=int, help="rounds after the warm-up (default 4; quick: 1)")
    parser.add_argument("--requests", type=int, help=f"concurrent requests of part A (default {SLOTS}; quick: 8)")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/reuse.json, reuse-quick.json)")
    parser.add_argument(
        "--readme", action=argparse.BooleanOptionalAction, default=None,
        help="put the table in bench/README.md (default: on for full runs with the default output)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.requests is not None and not 1 <= args.requests <= SLOTS:
        parser.error(f"--requests must be in [1, {SLOTS}]")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("gpt2_service").setLevel(logging.WARNING)
    plan = make_plan(args.quick, args.rounds, args.requests)
    payload = asyncio.run(standalone.run(MODEL, measure, plan))
    text = standalone_report(payload)
    print()
    print(text)
    out: Path = args.out or RESULTS / f"reuse{'-quick' if plan.quick else ''}.json"
    readme = args.readme if args.readme is not None else not plan.quick and args.out is None
    standalone.write(payload, text, out, readme, (README_START, README_END))
    if payload["mismatches"]:
        sys.exit(f"token mismatches: {payload['mismatches']}")


if __name__ == "__main__":
    main()
