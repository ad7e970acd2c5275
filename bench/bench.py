"""``make bench``: every performance number of the service, measured side by side in one run.

On ``random:gpt2`` (one copy of the weights in one process), greedy, prompt 16 random token ids,
64 new tokens, EOS ignored, every request submitted at once; at concurrency 1, 8, 32, 64, 128:

1. our engine in-process (``Engine.submit``), each weight format (float32, float16, int8) in the
   default deterministic mode (``batch_invariant=True``) and the fast one (``False``); the cost
   of determinism is their ratio;
2. Hugging Face ``generate`` in float32 on the same weights (bench/hf_reference.py);
3. gRPC streaming (``TextGeneration.GenerateStream``) to a server in this process on each
   format's default engine: throughput, time to first token and inter-token latency (p50, p99);
4. llama.cpp's ``llama-batched-bench`` on the same weights in GGUF f32 / f16 / q8_0, when a build
   is found (bench/llama_cpp.py; ``LLAMA_CPP_DIR``, bench/build_llama_cpp.sh);
5. the machine's ceilings, measured in the run: memory read bandwidth, fp32 sgemm GFLOP/s, and
   each format's linear-layer GFLOP/s at 1 and 32 rows (bench/machine.py); throughput at batch 1
   as a fraction of the bandwidth bound, at 32 of the matmul ceiling;
6. per-step overhead at batch 1 and 32: an engine step's wall time (between two step events)
   less the forward pass and LM head the runner's stage timer measured in it;
7. each reduced format's deviation from float32 (bench/deviation.py), on random:gpt2 and on
   ``--checkpoint DIR``;
8. prefix reuse and n completions (bench/reuse_bench.py): time to first token of 32 requests
   sharing a 512-token prefix with the prefix cache on and off (cold, and with the prefix left in
   a free slot by an earlier request), and one request with n=8 vs 8 separate requests; the tokens
   must be the same either way (a mismatch makes the run exit 1). ``--no-reuse`` skips it.
9. constrained generation (bench/constraint_bench.py): tokens/s of 32 requests constrained by one
   JSON schema vs the same requests unconstrained generating as many tokens, time to first token
   with a new schema vs a cached one, the masks' per-step cost; every constrained output must
   complete and be valid under the schema (a failure makes the run exit 1). ``--no-constraints``
   skips it.
10. tracing overhead (bench/serving_tracing_overhead.py): gRPC streaming tokens/s at concurrency
    32 with OpenTelemetry tracing on (every call sampled, spans counted and dropped by the
    exporter) vs off, one engine behind two servers, ABBA pairs of rounds; the median pair ratio
    with a bootstrap 95% CI, CPU per token, spans per request (other than 5 per stream, or not
    continuing the caller's traceparent: the run exits 1). ``--no-tracing`` skips it.

Systems alternate in rounds (the order rotates each round) after a warm-up; throughputs are
medians over rounds, ratios medians of per-round ratios (a pair shares the machine's speed of the
moment). Only one system runs at a time. Writes ``bench/results/bench.json`` (``bench-quick.json``),
``throughput.png`` and ``latency.png`` (``-quick`` with --quick), prints a markdown report and,
on a full run, puts it in bench/README.md.

    make bench                            # full run, ~40 minutes on 2 cores
    make bench BENCH_ARGS=--quick         # concurrency 1, 8, 32, fewer rounds and tokens, about 5 minutes
    LLAMA_CPP_DIR=/work/llama make bench  # with llama.cpp (bench/build_llama_cpp.sh builds it)
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_report
import constraint_bench
import deviation
import grpc
import llama_cpp
import machine
import reuse_bench
import serving_tracing_overhead
from engine_bench import SystemResult, _quiet_transformers, paired_ratio
from engine_driver import run_batch
from gpt2_client.proto import generation_pb2_grpc
from gpt2_service.api.server import GenerationServer
from gpt2_service.config import EngineConfig, ServerConfig
from gpt2_service.engine.events import StepEvent
from gpt2_service.engine.frontend import Engine
from gpt2_service.engine.threads import ENGINE_THREADS, confine_torch_to_the_engine
from gpt2_service.model.kernels import WEIGHT_FORMATS
from gpt2_service.model.weights import LoadedModel, load_model
from hf_reference import hf_greedy, to_hf
from serving_bench import LevelResult, grpc_request, summarise

MODEL = "random:gpt2"
PROMPT_TOKENS = 16
OVERHEAD_BATCHES = (1, 32)
RESULTS = Path(__file__).resolve().parent / "results"

log = logging.getLogger("bench")
T = TypeVar("T")


@dataclass(frozen=True)
class Plan:
    concurrency: list[int]
    new_tokens: int
    rounds: dict[int, int]  # concurrency -> rounds
    hf_concurrency: list[int]
    quick: bool

    @property
    def max_rounds(self) -> int:
        return max(self.rounds.values())

    def due(self, round_index: int) -> list[int]:
        return [b for b in self.concurrency if round_index < self.rounds[b]]


def make_plan(args: argparse.Namespace) -> Plan:
    concurrency = args.concurrency or ([1, 8, 32] if args.quick else [1, 8, 32, 64, 128])
    new_tokens = args.new_tokens or (32 if args.quick else 64)
    if args.rounds:
        rounds = dict.fromkeys(concurrency, args.rounds)
    elif args.quick:  # batch 1 takes seconds and is the noisiest
        rounds = {b: 2 if b == 1 else 1 for b in concurrency}
    else:  # ~30 minutes on 2 cores: most rounds where a round is short and targets are set
        rounds = {b: 5 if b == 1 else 3 if b <= 32 else 1 for b in concurrency}
    hf = [b for b in concurrency if not (args.quick and b >= 128)]
    return Plan(concurrency, new_tokens, rounds, hf, args.quick)


# -- the systems -----------------------------------------------------------------------------------


async def in_fresh_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a new thread with the engine's thread count, which ends after: its OpenMP team
    goes with it (see ``Bench.start``)."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def target() -> None:
        torch.set_num_threads(ENGINE_THREADS)
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    thread = threading.Thread(target=target, name="bench-torch")
    thread.start()
    try:
        return await asyncio.wrap_future(future)
    finally:
        thread.join()


class StepRecorder:
    """Step events of an engine with their arrival times, only while a list is set."""

    def __init__(self) -> None:
        self.current: list[tuple[float, StepEvent]] | None = None

    def __call__(self, event: StepEvent) -> None:  # on the engine thread
        if self.current is not None:
            self.current.append((time.perf_counter(), event))


def step_times(records: list[tuple[float, StepEvent]], batch: int) -> list[tuple[float, float]]:
    """(wall, forward) seconds of each step that decoded ``batch`` sequences and nothing else: wall
    from the previous step's event to its own (schedule, forward, sampling, bookkeeping, handing
    outputs to the event loop); forward is its stage timer's sum, sampling left out."""
    out = []
    for (t0, _), (t1, event) in itertools.pairwise(records):
        if event.num_prefill_seqs == 0 and event.num_decode == batch and event.times.stages:
            out.append((t1 - t0, sum(s for name, s in event.times.stages if name != "sampling")))
    return out


@dataclass
class Sample:
    tokens_per_s: float
    level: LevelResult | None = None  # gRPC: the latencies
    tokens: list[list[int]] | None = None


@dataclass
class System:
    key: str  # e.g. "ours/float32", "fast/int8", "hf/float32", "grpc/float16"
    kind: str  # ours | fast | hf | grpc
    weights: str
    label: str
    run: Callable[[list[list[int]], int], Awaitable[Sample]]
    concurrency: list[int]
    recorder: StepRecorder | None = None


@dataclass
class Results:
    throughput: dict[str, dict[int, SystemResult]] = field(default_factory=dict)
    levels: dict[str, dict[int, list[LevelResult]]] = field(default_factory=dict)
    steps: dict[str, dict[int, list[tuple[float, float]]]] = field(default_factory=dict)
    same_tokens_hf: dict[int, bool] = field(default_factory=dict)
    llama_rows: dict[str, list[list[dict[str, Any]]]] = field(default_factory=dict)  # format -> per round


class Bench:
    def __init__(self, plan: Plan, loaded: LoadedModel) -> None:
        self.plan = plan
        self.loaded = loaded
        gen = torch.Generator().manual_seed(0)
        vocab = loaded.model.config.vocab_size
        self.prompts = torch.randint(0, vocab, (max(plan.concurrency), PROMPT_TOKENS), generator=gen).tolist()
        self.systems: list[System] = []
        self.hf: Any = None
        self._tokens: dict[tuple[str, int], list[list[int]]] = {}  # float32 ours and HF, to compare
        self.llama_args: dict[str, list[str]] = {}  # format -> extra llama-batched-bench arguments

    async def start(self, with_hf: bool) -> None:
        """The systems. Each run of ours (in-process or over gRPC) starts its own engine and stops
        it after, so that its thread is the only one whose torch kernels run: a server's engine
        thread is (gpt2_service/engine/threads.py), and an idle engine's OpenMP team would slow
        the others down. HF runs on a fresh thread of its own for the same reason."""
        for weights in WEIGHT_FORMATS:
            for kind in ("ours", "fast"):
                recorder = StepRecorder()
                mode = "deterministic" if kind == "ours" else "fast"
                self.systems.append(
                    System(f"{kind}/{weights}", kind, weights, f"ours {weights} ({mode})",
                           self._ours(self._config(weights, kind == "ours"), recorder), self.plan.concurrency, recorder)
                )  # fmt: skip
        if with_hf:
            self.hf = to_hf(self.loaded.model)
            self.systems.append(
                System("hf/float32", "hf", "float32", "HF generate float32", self._hf, self.plan.hf_concurrency)
            )
        for weights in WEIGHT_FORMATS:
            self.systems.append(
                System(f"grpc/{weights}", "grpc", weights, f"gRPC {weights}", self._grpc(self._config(weights, True)),
                       self.plan.concurrency)
            )  # fmt: skip

    def _config(self, weights: str, batch_invariant: bool) -> EngineConfig:
        top = max(self.plan.concurrency)
        return EngineConfig(
            model=MODEL,
            weights=weights,
            batch_invariant=batch_invariant,
            max_batch_size=top,
            kv_cache_slots=top,
            max_queue_size=max(256, 2 * top),
            max_queued_per_tenant=max(64, 2 * top),  # every request comes from one tenant, all at once
            context_window=PROMPT_TOKENS + self.plan.new_tokens,
        )

    async def close(self) -> None:
        pass

    def _ours(
        self, config: EngineConfig, recorder: StepRecorder
    ) -> Callable[[list[list[int]], int], Awaitable[Sample]]:
        async def run(prompts: list[list[int]], new_tokens: int) -> Sample:
            engine = Engine(self.loaded, config)
            await engine.start()
            engine.add_step_observer(recorder)
            try:
                batch = await run_batch(engine, prompts, new_tokens)
            finally:
                await engine.shutdown()
            assert batch.num_tokens == len(prompts) * new_tokens, batch.num_tokens
            return Sample(batch.num_tokens / batch.seconds, tokens=batch.token_ids)

        return run

    async def _hf(self, prompts: list[list[int]], new_tokens: int) -> Sample:
        start = time.perf_counter()
        tokens = await in_fresh_thread(lambda: hf_greedy(self.hf, prompts, new_tokens))
        return Sample(sum(map(len, tokens)) / (time.perf_counter() - start), tokens=tokens)

    def _grpc(self, config: EngineConfig) -> Callable[[list[list[int]], int], Awaitable[Sample]]:
        async def run(prompts: list[list[int]], new_tokens: int) -> Sample:
            engine = Engine(self.loaded, config)
            await engine.start()
            server = GenerationServer(ServerConfig(host="127.0.0.1", port=0, reflection=False))
            try:
                port = await server.start()
                await server.attach(engine)
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    stub = generation_pb2_grpc.TextGenerationStub(channel)
                    traces = await asyncio.gather(
                        *(grpc_request(stub, p, new_tokens, i) for i, p in enumerate(prompts))
                    )
            finally:
                await server.stop()
                await engine.shutdown()
            level = summarise(list(traces))
            return Sample(level.tokens_per_s, level=level)

        return run

    async def warm_up(self) -> None:
        """Each system once at the largest concurrency, a few tokens: allocator growth, connections."""
        for system in self.systems:
            top = max(system.concurrency)
            await system.run(self.prompts[:top], 4)
            log.info("warm-up %-16s done", system.key)

    async def measure(self, results: Results, llama: llama_cpp.Build | None, llama_errors: list[str]) -> None:
        plan = self.plan
        for system in self.systems:
            results.throughput[system.key] = {b: SystemResult() for b in system.concurrency}
        for rnd in range(plan.max_rounds):
            due = plan.due(rnd)
            if llama is not None and rnd % 2 == 1:
                self._llama_round(llama, due, rnd, results, llama_errors)
            for b in due:
                systems = [s for s in self.systems if b in s.concurrency]
                shift = rnd % len(systems)
                for system in systems[shift:] + systems[:shift]:
                    await self._one(system, b, rnd, results)
            if llama is not None and rnd % 2 == 0:
                self._llama_round(llama, due, rnd, results, llama_errors)

    async def _one(self, system: System, b: int, rnd: int, results: Results) -> None:
        recording = system.recorder is not None and b in OVERHEAD_BATCHES
        if recording:
            assert system.recorder is not None
            system.recorder.current = []
        try:
            sample = await system.run(self.prompts[:b], self.plan.new_tokens)
        finally:
            records = system.recorder.current if system.recorder is not None else None
            if system.recorder is not None:
                system.recorder.current = None
        results.throughput[system.key][b].tokens_per_s.append(sample.tokens_per_s)
        if recording and records:
            results.steps.setdefault(system.key, {}).setdefault(b, []).extend(step_times(records, b))
        if sample.level is not None:
            results.levels.setdefault(system.key, {}).setdefault(b, []).append(sample.level)
        if system.key in ("ours/float32", "hf/float32") and sample.tokens is not None:
            self._tokens[system.key, b] = sample.tokens
            if ("ours/float32", b) in self._tokens and ("hf/float32", b) in self._tokens:
                results.same_tokens_hf[b] = self._tokens["ours/float32", b] == self._tokens["hf/float32", b]
        log.info("round %d c=%-3d %-13s %8.1f tok/s", rnd + 1, b, system.key, sample.tokens_per_s)

    def _llama_round(
        self, build: llama_cpp.Build, batches: list[int], rnd: int, results: Results, errors: list[str]
    ) -> None:
        for weights, extra in self.llama_args.items():
            key = f"llama/{weights}"
            try:
                rows = llama_cpp.run(
                    build, weights, PROMPT_TOKENS, self.plan.new_tokens, batches, os.cpu_count() or 1, 1800, extra
                )
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                errors.append(f"{key} round {rnd + 1}: {exc}")
                log.warning("%s failed: %s", key, exc)
                continue
            by_batch = {r.batch: r for r in rows}
            table = results.throughput.setdefault(key, {b: SystemResult() for b in self.plan.concurrency})
            for b in batches:
                if b in by_batch:
                    table[b].tokens_per_s.append(by_batch[b].gen_tokens_per_s)
            results.llama_rows.setdefault(weights, []).append(
                [{**asdict(r), "gen_tokens_per_s": r.gen_tokens_per_s} for r in rows]
            )
            log.info("round %d %-13s %s", rnd + 1, key, " ".join(f"c={r.batch}:{r.gen_tokens_per_s:.1f}" for r in rows))


def llama_warm_up(build: llama_cpp.Build, new_tokens: int, errors: list[str]) -> dict[str, list[str]]:
    """Run each GGUF once, off the clock (the page cache; and whether it runs at all): the extra
    arguments each format needs (``FALLBACK_ARGS`` where it crashed without them); a format that
    runs neither way is left out, with the reason in ``errors``."""
    extra: dict[str, list[str]] = {}
    for weights in build.models:
        failures = []
        for args in ([], llama_cpp.FALLBACK_ARGS):
            try:
                llama_cpp.run(build, weights, PROMPT_TOKENS, min(new_tokens, 8), [1], os.cpu_count() or 1, 600, args)
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                failures.append(f"{weights}{' with ' + ' '.join(args) if args else ''}: {str(exc).strip()}")
                log.warning("llama.cpp %s", failures[-1])
                continue
            extra[weights] = args
            break
        else:
            errors.extend(failures)
    return extra


# -- the run ---------------------------------------------------------------------------------------


def summarise_results(plan: Plan, results: Results, loaded: LoadedModel, ceilings: dict[str, Any]) -> dict[str, Any]:
    """Medians, paired ratios, latencies, overheads and ceilings fractions, as plain JSON values."""
    model = loaded.model
    thr: dict[str, dict[str, Any]] = {}
    for key, table in results.throughput.items():
        thr[key] = {str(b): {"runs": r.tokens_per_s, "median": r.median} for b, r in table.items() if r.tokens_per_s}

    def ratio(a: str, b: str) -> dict[str, float | None]:
        ta, tb = results.throughput.get(a, {}), results.throughput.get(b, {})
        return {str(c): paired_ratio(ta[c], tb[c]) for c in plan.concurrency if c in ta and c in tb}

    ratios: dict[str, dict[str, float | None]] = {}
    for w in WEIGHT_FORMATS:
        ratios[f"determinism/{w}"] = ratio(f"ours/{w}", f"fast/{w}")
        ratios[f"grpc_over_engine/{w}"] = ratio(f"grpc/{w}", f"ours/{w}")
        ratios[f"ours_over_llama/{w}"] = ratio(f"ours/{w}", f"llama/{w}")
        ratios[f"fast_over_llama/{w}"] = ratio(f"fast/{w}", f"llama/{w}")
    ratios["ours_over_hf/float32"] = ratio("ours/float32", "hf/float32")
    ratios["fast_over_hf/float32"] = ratio("fast/float32", "hf/float32")

    latency: dict[str, dict[str, Any]] = {}
    for key, levels in results.levels.items():
        latency[key] = {
            str(b): {
                name: statistics.median(getattr(level, name) for level in runs)
                for name in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")
            }
            for b, runs in levels.items()
        }

    overhead: dict[str, dict[str, Any]] = {}
    for key, by_batch in results.steps.items():
        overhead[key] = {}
        for b, steps in by_batch.items():
            if not steps:
                continue
            overhead[key][str(b)] = {
                "steps": len(steps),
                "step_ms": statistics.median(w for w, _ in steps) * 1e3,
                "forward_ms": statistics.median(f for _, f in steps) * 1e3,
                "overhead_ms": statistics.median(w - f for w, f in steps) * 1e3,
                "overhead_share": statistics.median((w - f) / w for w, f in steps),
            }

    bandwidth = ceilings["memory_read_gb_per_s"] * 1e9
    flops = machine.flops_per_request(model, PROMPT_TOKENS, plan.new_tokens)
    roofline: dict[str, dict[str, Any]] = {}
    for w in WEIGHT_FORMATS:
        nbytes = machine.weight_bytes(model, w)
        entry: dict[str, Any] = {"weight_bytes": nbytes, "bandwidth_bound_tokens_per_s": bandwidth / nbytes}
        for kind in ("ours", "fast"):
            one = thr.get(f"{kind}/{w}", {}).get("1", {}).get("median")
            many = thr.get(f"{kind}/{w}", {}).get("32", {}).get("median")
            mode = "deterministic" if kind == "ours" else "fast"
            gflops = many * flops / plan.new_tokens / 1e9 if many else None
            linear = ceilings["linear"][w].get("32", {}).get(mode, {}).get("gflops")
            entry[kind] = {
                "batch1_fraction_of_bandwidth_bound": one * nbytes / bandwidth if one else None,
                "batch32_gflops": gflops,
                "batch32_fraction_of_sgemm": gflops / ceilings["sgemm_gflops"] if gflops else None,
                "batch32_fraction_of_linear_ceiling": gflops / linear if gflops and linear else None,
            }
        roofline[w] = entry

    return {
        "throughput": thr,
        "ratios": ratios,
        "latency": latency,
        "step_overhead": overhead,
        "roofline": roofline,
        "flops_per_request": flops,
        "same_tokens_as_hf": {str(b): v for b, v in results.same_tokens_hf.items()},
    }


async def run(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    started = time.perf_counter()
    phases: dict[str, float] = {}

    def phase(name: str, since: float) -> float:
        now = time.perf_counter()
        phases[name] = round(now - since, 1)
        return now

    env = machine.describe()
    build, where = (None, "skipped (--no-llama)") if args.no_llama else llama_cpp.find(args.llama_cpp_dir)
    llama_errors: list[str] = []
    log.info("llama.cpp: %s", where if build is None else f"{build.binary} ({where})")
    confine_torch_to_the_engine(asyncio.get_running_loop())  # as gpt2-serve does
    loaded = load_model(MODEL)
    bench = Bench(plan, loaded)
    results = Results()
    reuse: dict[str, Any] | None = None
    constraints: dict[str, Any] | None = None
    tracing: dict[str, Any] | None = None
    t = time.perf_counter()
    await bench.start(with_hf=not args.no_hf)
    try:
        await bench.warm_up()
        if build is not None:
            bench.llama_args = llama_warm_up(build, plan.new_tokens, llama_errors)
        t = phase("start_and_warm_up", t)
        ceilings = await in_fresh_thread(lambda: machine.ceilings(loaded.model, repeats=3 if plan.quick else 5))
        t = phase("ceilings", t)
        await bench.measure(results, build, llama_errors)
        t = phase("rounds", t)
        if not args.no_reuse:  # its own engines, one at a time, none of the systems' running
            reuse = await reuse_bench.measure(loaded, reuse_bench.make_plan(plan.quick, args.rounds))
            t = phase("reuse", t)
        if not args.no_constraints:  # its own engines too, one at a time
            constraints = await constraint_bench.measure(loaded, constraint_bench.make_plan(plan.quick, args.rounds))
            t = phase("constraints", t)
        if not args.no_tracing:  # one engine of its own behind two servers (tracing on, off)
            tracing_plan = serving_tracing_overhead.make_plan(plan.quick, args.rounds)
            tracing = await serving_tracing_overhead.measure(loaded, tracing_plan)
            t = phase("tracing", t)
        if not plan.quick:  # the machine's speed drifts: keep the better of two measurements
            again = await in_fresh_thread(lambda: machine.ceilings(loaded.model, repeats=5))
            ceilings = _best_ceilings(ceilings, again)
            t = phase("ceilings_again", t)
    finally:
        await bench.close()
    dev: dict[str, Any] = {MODEL: await in_fresh_thread(lambda: deviation.measure(loaded))}
    if args.checkpoint:
        ckpt = load_model(str(args.checkpoint))
        dev[str(args.checkpoint)] = await in_fresh_thread(lambda: deviation.measure(ckpt))
    t = phase("deviation", t)

    summary = summarise_results(plan, results, loaded, ceilings)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": env,
        "workload": {
            "model": MODEL,
            "prompt_tokens": PROMPT_TOKENS,
            "new_tokens": plan.new_tokens,
            "greedy": True,
            "ignore_eos": True,
            "concurrency": plan.concurrency,
            "rounds": {str(b): r for b, r in plan.rounds.items()},
            "hf_concurrency": plan.hf_concurrency,
            "quick": plan.quick,
            "engine_threads": ENGINE_THREADS,
        },
        "llama_cpp": {
            "found": build is not None,
            "where": where,
            **(build.describe() if build is not None else {}),
            "command": "llama-batched-bench -m GGUF -c B*(P+N) -b 2048 -ub 512 -npp P -ntg N -npl ... -t CORES",
            "compared_metric": "gen_tokens_per_s = B * TG / T (generated tokens over the whole run, prefill included)",
            "extra_args": bench.llama_args,
            "rows": results.llama_rows,
            "errors": llama_errors,
        },
        "ceilings": ceilings,
        **summary,
        "deviation": dev,
        **({"reuse": reuse} if reuse is not None else {}),
        **({"constraints": constraints} if constraints is not None else {}),
        **({"tracing": tracing} if tracing is not None else {}),
        "targets": bench_report.TARGETS_DOC,
        "phases_s": phases,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _best_ceilings(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    out["memory_read_gb_per_s"] = max(a["memory_read_gb_per_s"], b["memory_read_gb_per_s"])
    out["sgemm_gflops"] = max(a["sgemm_gflops"], b["sgemm_gflops"])
    out["linear"] = {
        w: {
            r: {m: max(a["linear"][w][r][m], b["linear"][w][r][m], key=lambda x: x["gflops"]) for m in modes}
            for r, modes in rows.items()
        }
        for w, rows in a["linear"].items()
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="concurrency 1, 8, 32; 32 new tokens; 2 rounds at 1, 1 above; < 5 minutes"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", help="default 1 8 32 64 128 (quick: 1 8 32)")
    parser.add_argument("--new-tokens", type=int, help="default 64 (quick: 32)")
    parser.add_argument(
        "--rounds",
        type=int,
        help="rounds at every concurrency, of prefix reuse and n completions, and of constrained generation; "
        "pairs of tracing on/off, rounded up to even (default: 5 at 1, 3 at 8 and 32, 1 above, 4 of reuse, 6 of "
        "constraints, 28 tracing pairs; quick: 2 at 1, 1 above, 1 of reuse and of constraints, 4 tracing pairs)",
    )
    parser.add_argument("--checkpoint", type=Path, help="also measure the formats' deviation on this checkpoint")
    parser.add_argument("--llama-cpp-dir", help="llama.cpp build (default: env LLAMA_CPP_DIR; see bench/llama_cpp.py)")
    parser.add_argument("--no-llama", action="store_true", help="skip llama.cpp even when a build is found")
    parser.add_argument("--no-hf", action="store_true", help="skip Hugging Face generate")
    parser.add_argument(
        "--no-reuse", action="store_true", help="skip prefix reuse and n completions (bench/reuse_bench.py)"
    )
    parser.add_argument(
        "--no-constraints", action="store_true", help="skip constrained generation (bench/constraint_bench.py)"
    )
    parser.add_argument(
        "--no-tracing", action="store_true", help="skip the tracing overhead (bench/serving_tracing_overhead.py)"
    )
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/bench.json, bench-quick.json)")
    parser.add_argument(
        "--readme", action=argparse.BooleanOptionalAction, default=None,
        help="write the report into bench/README.md (default: on for full runs with the default output)",
    )  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("gpt2_service", "gpt2_service.api"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # a line per request would skew the timing
    plan = make_plan(args)
    suffix = "-quick" if plan.quick else ""
    out: Path = args.out or RESULTS / f"bench{suffix}.json"
    with _quiet_transformers():
        payload = asyncio.run(run(args, plan))
    report = bench_report.markdown(payload)
    print()
    print(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    plots = bench_report.plots(payload, out.parent, suffix)
    readme = args.readme if args.readme is not None else not plan.quick and args.out is None
    if readme:
        bench_report.update_readme(report, payload, plots)
    print(f"\nwrote {out}, {', '.join(str(p) for p in plots)}{' and bench/README.md' if readme else ''} "
          f"in {payload['seconds']:.0f}s")  # fmt: skip
    mismatches = payload.get("reuse", {}).get("mismatches")
    problems = payload.get("constraints", {}).get("problems")
    spans = payload.get("tracing", {}).get("spans", {"ok": True})
    if mismatches or problems or not spans["ok"]:
        sys.exit("; ".join(
            ([f"prefix reuse / n completions: token mismatches: {mismatches}"] if mismatches else [])
            + ([f"constrained generation problems: {problems}"] if problems else [])
            + ([f"tracing: span check failed: {spans}"] if not spans["ok"] else [])
        ))  # fmt: skip


if __name__ == "__main__":
    main()
