"""Engine benchmark (not a test): our engine vs Hugging Face on the same random-weight GPT-2 small.

In one run and one process: tokens/s of greedy generation (prompt 16 tokens, 64 new tokens,
EOS ignored) at batch 1, 8, 32 and 64 for
- ours: every request submitted at once through the engine API (``Engine.submit``), with the
  default kernels and in batch-invariant mode (``EngineConfig.batch_invariant``);
- HF generate: ``GPT2LMHeadModel.generate`` on a static batch of the same size, at torch's
  default thread count (our engine's too);
- HF generate_batch: Hugging Face's continuous batching;
and the decode step time at context ~20 vs ~900 (the KV-cache keeps it nearly flat).

Measurements alternate between systems, after a warm-up. Ours and HF generate (the targets) take
the median of a few repetitions, since the machine is noisy; the other columns run once each,
which keeps the full run near 15 minutes. Prints a markdown table, writes
``bench/results/engine.json`` and ``engine.png``, and (full runs) the table in ``bench/README.md``.
``make bench`` runs bench/bench.py, which measures these systems and more side by side; this
script stays for HF continuous batching and the decode step vs context length.

    .venv/bin/python bench/engine_bench.py          # full run (~15 minutes on 2 CPU cores)
    .venv/bin/python bench/engine_bench.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_driver import GREEDY, run_batch
from gpt2_service.config import EngineConfig
from gpt2_service.core.request import GenerationRequest, StoppingCriteria
from gpt2_service.engine.events import StepEvent
from gpt2_service.engine.frontend import Engine
from gpt2_service.model.weights import load_model
from hf_reference import hf_greedy, to_hf

MODEL = "random:gpt2"
PROMPT_TOKENS = 16
NEW_TOKENS = 64
SHORT_CONTEXT = 20
LONG_CONTEXT = 900
CONTEXT_NEW_TOKENS = 24  # decode steps timed per context length, once every sequence decodes
TARGETS = {1: 1.2, 32: 1.5}  # batch -> minimum ours / HF static
TARGET_SYSTEMS = ("ours", "hf_static")  # measured most; see planned_runs
BENCH_DIR = Path(__file__).resolve().parent
README = BENCH_DIR / "README.md"
README_START, README_END = "<!-- engine-bench:start -->", "<!-- engine-bench:end -->"

log = logging.getLogger("engine_bench")


@dataclass
class SystemResult:
    """Tokens/s of one system at one batch size: every repetition and their median."""

    tokens_per_s: list[float] = field(default_factory=list)
    same_tokens_as_ours: bool | None = None
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.tokens_per_s) if self.tokens_per_s else None


@dataclass
class ContextResult:
    """Decode steps with every sequence at about ``context`` tokens."""

    context: int
    batch_size: int
    step_ms: float  # median wall time between two tokens of a stream, all streams decoding
    runner_step_ms: float  # median forward + LM head + sampling time of those steps (ModelRunner)
    tokens_per_s: float  # batch_size / step


# -- the systems -----------------------------------------------------------------------------


class Systems:
    """Our engine, HF static generate and HF continuous batching, on one set of weights."""

    def __init__(self, max_batch_size: int) -> None:
        loaded = load_model(MODEL)
        self.vocab_size = loaded.model.config.vocab_size
        self.hf = to_hf(loaded.model)
        self.engine = Engine(loaded, EngineConfig(max_batch_size=max_batch_size))
        self.invariant_engine = Engine(loaded, EngineConfig(max_batch_size=max_batch_size, batch_invariant=True))
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.engine.start())
        self.loop.run_until_complete(self.invariant_engine.start())
        self.step_stats: list[StepEvent] = []
        self.engine.add_step_observer(self.step_stats.append)
        self.cb_error = _continuous_batching_unavailable()
        self.max_batch_size = max_batch_size
        # torch's thread count is per thread: HF runs on this thread (and generate_batch on a new
        # one, which inherits the last value set anywhere), our engine on its own thread.
        self.default_threads = torch.get_num_threads()
        self.engine_threads = self.engine.runner.num_threads

    def labels(self) -> dict[str, str]:
        """Table labels of the systems, with their torch thread counts."""
        return {
            "ours": f"ours ({self.engine_threads}t)",
            "ours_invariant": f"ours batch-invariant ({self.engine_threads}t)",
            "hf_static": f"HF generate ({self.default_threads}t)",
            "hf_continuous": f"HF generate_batch ({self.default_threads}t)",
        }

    def runners(self) -> dict[str, Callable[[list[list[int]]], tuple[float, list[list[int]]]]]:
        """The systems to compare, by name."""
        return {
            "ours": self.ours,
            "ours_invariant": self.ours_invariant,
            "hf_static": self.hf_static,
            "hf_continuous": self.hf_continuous,
        }

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.shutdown())
        self.loop.run_until_complete(self.invariant_engine.shutdown())
        self.loop.close()

    def ours(self, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
        run = self.loop.run_until_complete(run_batch(self.engine, prompts, NEW_TOKENS))
        return run.num_tokens / run.seconds, run.token_ids

    def ours_invariant(self, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
        run = self.loop.run_until_complete(run_batch(self.invariant_engine, prompts, NEW_TOKENS))
        return run.num_tokens / run.seconds, run.token_ids

    def hf_static(self, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
        torch.set_num_threads(self.default_threads)
        start = time.perf_counter()
        tokens = hf_greedy(self.hf, prompts, NEW_TOKENS)
        return sum(map(len, tokens)) / (time.perf_counter() - start), tokens

    def hf_continuous(self, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        generation = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=-1, pad_token_id=0)
        batching = ContinuousBatchingConfig(  # sized for this workload (auto-sizing assumes a GPU)
            page_size=128,
            num_blocks=2 * self.max_batch_size,
            max_batch_tokens=max(512, PROMPT_TOKENS * len(prompts)),
            max_requests_per_batch=self.max_batch_size,
        )
        torch.set_num_threads(self.default_threads)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.hf.generate_batch(
                prompts, generation_config=generation, continuous_batching_config=batching, warmup=False
            )
        seconds = time.perf_counter() - start
        tokens = [list(out[f"req_{i}"].generated_tokens) for i in range(len(prompts))]
        return sum(map(len, tokens)) / seconds, tokens

    def decode_steps(self, context: int, batch_size: int, gen: torch.Generator) -> tuple[list[float], list[float]]:
        """Decode steps of ``batch_size`` sequences with ``context``-token prompts, once all of them
        decode: the gaps between two tokens of a stream, and the runner's time of those steps."""
        prompts = [torch.randint(0, self.vocab_size, (context,), generator=gen).tolist() for _ in range(batch_size)]
        # chunked prefill admits the prompts over several steps: generate past the last of them
        prefill_steps = math.ceil(batch_size * context / self.engine.config.max_prefill_tokens)
        self.step_stats.clear()
        arrivals = self.loop.run_until_complete(
            _token_arrivals(self.engine, prompts, CONTEXT_NEW_TOKENS + prefill_steps)
        )
        all_decoding = max(times[0] for times in arrivals)  # after it, every stream is past its prefill
        gaps = [b - a for times in arrivals for a, b in itertools.pairwise(times) if a >= all_decoding]
        runner = [
            s.times.decode + s.times.sampling
            for s in self.step_stats
            if s.num_prefill_seqs == 0 and s.num_decode == batch_size
        ]
        return gaps, runner


async def _token_arrivals(engine: Engine, prompts: list[list[int]], new_tokens: int) -> list[list[float]]:
    """perf_counter() at each token's arrival on the event loop, per stream."""

    async def one(i: int, prompt: list[int]) -> list[float]:
        stream = await engine.submit(
            GenerationRequest(
                request_id=f"ctx-{i}",
                prompt_token_ids=tuple(prompt),
                sampling=GREEDY,
                stopping=StoppingCriteria(max_new_tokens=new_tokens, ignore_eos=True),
            )
        )
        return [time.perf_counter() async for _ in stream]

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


def _continuous_batching_unavailable() -> str | None:
    """Why HF continuous batching cannot run here, or None if it can."""
    from transformers import GPT2LMHeadModel

    if not hasattr(GPT2LMHeadModel, "generate_batch"):
        return "this transformers version has no generate_batch"
    return None


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """generate_batch logs warnings about psutil and EOS on every call; keep the table readable."""
    names = ["ContinuousBatchingLogger", "transformers"]
    levels = [logging.getLogger(n).level for n in names]
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for n, level in zip(names, levels, strict=True):
            logging.getLogger(n).setLevel(level)


# -- the run -----------------------------------------------------------------------------------


def planned_runs(name: str, batch_size: int, repeats: int) -> int:
    """Runs of one system at one batch size, to keep a full run near fifteen minutes: the target
    pair ``2 * repeats + 1`` times at batch 1 and 8 (seconds each, and the noisiest) and
    ``repeats + 2`` times from batch 32 up; the others once."""
    if name in TARGET_SYSTEMS:
        return 2 * repeats + 1 if batch_size <= 8 else repeats + 2
    return 1


def measure(systems: Systems, batch_sizes: list[int], repeats: int) -> dict[int, dict[str, SystemResult]]:
    gen = torch.Generator().manual_seed(0)
    all_prompts = [
        torch.randint(0, systems.vocab_size, (PROMPT_TOKENS,), generator=gen).tolist() for _ in range(max(batch_sizes))
    ]
    runners = systems.runners()
    results = {b: {n: SystemResult() for n in runners if planned_runs(n, b, repeats)} for b in batch_sizes}
    if systems.cb_error is not None:
        for b in batch_sizes:
            results[b]["hf_continuous"].error = systems.cb_error
        del runners["hf_continuous"]

    log.info("warm-up")
    for name, run in list(runners.items()):
        try:
            run(all_prompts[:2])
        except Exception as exc:  # report, never fake a number
            log.warning("%s cannot run here: %r", name, exc)
            for b in batch_sizes:
                results[b][name].error = repr(exc)
            del runners[name]

    names = list(runners)
    last_tokens: dict[tuple[int, str], list[list[int]]] = {}
    rounds = max(planned_runs(n, b, repeats) for n in names for b in batch_sizes)
    for rep in range(rounds):
        for b in batch_sizes:
            due = [n for n in names if rep < planned_runs(n, b, repeats)]
            shift = rep % len(due) if due else 0
            for name in due[shift:] + due[:shift]:  # rotate who goes first
                tps, last_tokens[b, name] = runners[name](all_prompts[:b])
                results[b][name].tokens_per_s.append(tps)
                log.info("round %d/%d batch %2d %-22s %7.1f tok/s", rep + 1, rounds, b, name, tps)
    for (b, name), tokens in last_tokens.items():
        if name != "ours":
            results[b][name].same_tokens_as_ours = tokens == last_tokens[b, "ours"]
    return results


def measure_contexts(systems: Systems, batch_sizes: list[int], repeats: int) -> list[ContextResult]:
    """Median decode step at a short and a long context, alternating the two, gaps pooled over runs."""
    gen = torch.Generator().manual_seed(1)
    gaps: dict[tuple[int, int], list[float]] = {}
    runner: dict[tuple[int, int], list[float]] = {}
    for _ in range(repeats):
        for b in batch_sizes:
            for context in (SHORT_CONTEXT, LONG_CONTEXT):
                g, r = systems.decode_steps(context, b, gen)
                gaps.setdefault((b, context), []).extend(g)
                runner.setdefault((b, context), []).extend(r)
    out: list[ContextResult] = []
    for (b, context), g in gaps.items():
        step = statistics.median(g)
        out.append(ContextResult(context, b, step * 1e3, statistics.median(runner[b, context]) * 1e3, b / step))
        log.info("context %4d batch %2d: decode step %.1f ms", context, b, step * 1e3)
    return out


# -- the report --------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def paired_ratio(ours: SystemResult, other: SystemResult) -> float | None:
    """Median over rounds of ours / other. The two run back to back within a round (the order
    rotates), so a pair shares the machine's speed of the moment; on a shared VM that speed drifts
    by 10-20% over minutes, which a ratio of the two medians would mix in."""
    pairs = [a / b for a, b in zip(ours.tokens_per_s, other.tokens_per_s, strict=False) if b]
    return statistics.median(pairs) if pairs else None


def throughput_table(results: dict[int, dict[str, SystemResult]], labels: dict[str, str]) -> str:
    names = [n for n in labels if any(n in row for row in results.values())]
    others = [n for n in names if n != "ours"]
    lines = [
        "| batch | "
        + " | ".join(f"{labels[n]} tok/s" for n in names)
        + " | "
        + " | ".join(f"ours / {labels[n]}" for n in others)
        + " | ours / HF generate, ratio of medians | target (ours / HF generate) |",
        "|---:" * (2 + len(names) + len(others)) + "|:---|",
    ]
    for b, row in results.items():
        cells = [_fmt(row[n].median) if n in row else "n/a" for n in names]
        cells += [_fmt(paired_ratio(row["ours"], row[n]), ".2f") + "x" if n in row else "n/a" for n in others]
        cells.append(_fmt(_ratio(row["ours"].median, row["hf_static"].median), ".2f") + "x")
        target = ""
        if b in TARGETS:
            met = (paired_ratio(row["ours"], row["hf_static"]) or 0.0) >= TARGETS[b]
            target = f">= {TARGETS[b]}x: {'met' if met else 'MISSED'}"
        lines.append(f"| {b} | " + " | ".join(cells) + f" | {target} |")
    return "\n".join(lines)


def context_table(contexts: list[ContextResult]) -> str:
    lines = [
        f"| batch | decode step @ ctx {SHORT_CONTEXT} (ms) | decode step @ ctx {LONG_CONTEXT} (ms) "
        f"| ratio (target <= 2) | tok/s @ ctx {LONG_CONTEXT} |",
        "|---:|---:|---:|---:|---:|",
    ]
    by_batch: dict[int, dict[int, ContextResult]] = {}
    for c in contexts:
        by_batch.setdefault(c.batch_size, {})[c.context] = c
    for b, row in by_batch.items():
        short, long = row[SHORT_CONTEXT], row[LONG_CONTEXT]
        lines.append(
            f"| {b} | {short.step_ms:.1f} | {long.step_ms:.1f} | {long.step_ms / short.step_ms:.2f} "
            f"| {long.tokens_per_s:.1f} |"
        )
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    import transformers

    return {
        "model": MODEL,
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": NEW_TOKENS,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {_cpu_name()}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_plot(
    path: Path, results: dict[int, dict[str, SystemResult]], labels: dict[str, str], contexts: list[ContextResult]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    batches = list(results)
    names = [n for n in labels if any(n in row for row in results.values())]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [(results[b][name].median if name in results[b] else None) or 0.0 for b in batches]
        offset = (i - (len(names) - 1) / 2) * width
        ax1.bar([x + offset for x in range(len(batches))], values, width, label=labels[name])
    ax1.set_xticks(range(len(batches)), [str(b) for b in batches])
    ax1.set_xlabel("batch size (requests submitted at once)")
    ax1.set_ylabel("tokens/s (median)")
    ax1.set_title(f"{MODEL}: prompt {PROMPT_TOKENS}, {NEW_TOKENS} new tokens, greedy")
    ax1.legend()
    by_batch: dict[int, dict[int, float]] = {}
    for c in contexts:
        by_batch.setdefault(c.batch_size, {})[c.context] = c.step_ms
    ctx_batches = list(by_batch)
    for i, context in enumerate((SHORT_CONTEXT, LONG_CONTEXT)):
        ax2.bar(
            [x + (i - 0.5) * 0.4 for x in range(len(ctx_batches))],
            [by_batch[b][context] for b in ctx_batches],
            0.4,
            label=f"context ~{context}",
        )
    ax2.set_xticks(range(len(ctx_batches)), [str(b) for b in ctx_batches])
    ax2.set_xlabel("decode batch size")
    ax2.set_ylabel("decode step (ms, median)")
    ax2.set_title("ours: decode step vs context length")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_readme(report: str, start: str = README_START, end: str = README_END) -> None:
    """Put ``report`` between the markers ``start`` and ``end`` of bench/README.md (appended if absent)."""
    block = f"{start}\n{report}\n{end}"
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    README.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="batch 1 and 8, --repeats 1 (three runs of the target pair), batch-1 contexts",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 1 8 32 64")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions per measurement (default 3)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default bench/results/engine.json; engine-quick.json with --quick)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("gpt2_service").setLevel(logging.ERROR)  # the random-weights banner

    batch_sizes = args.batch_sizes or ([1, 8] if args.quick else [1, 8, 32, 64])
    repeats = args.repeats or (1 if args.quick else 3)
    context_batches = [1] if args.quick else [1, 8]
    out = args.out or BENCH_DIR / "results" / ("engine-quick.json" if args.quick else "engine.json")

    started = time.perf_counter()
    with _quiet_transformers():
        systems = Systems(max_batch_size=max(batch_sizes))
        labels = systems.labels()
        try:
            results = measure(systems, batch_sizes, repeats)
            contexts = measure_contexts(systems, context_batches, min(repeats, 2))
        finally:
            systems.close()

    env = environment()
    report = (
        f"Engine benchmark: {MODEL} (random weights), prompt {PROMPT_TOKENS} tokens, {NEW_TOKENS} new tokens, "
        f"greedy, EOS ignored; tokens/s of the whole batch (prefill included), median of "
        f"{planned_runs('ours', 1, repeats)} runs (batch <= 8) or {planned_runs('ours', 32, repeats)} (batch >= 32) "
        "for ours and HF generate, one run for the others; ratios are medians of per-round ratios (each pair "
        "measured back to back), the ratio of the medians is shown too; "
        f"torch {env['torch']} on {env['machine']}; (Nt) = torch intra-op threads; {env['date']}.\n\n"
        + throughput_table(results, labels)
        + f"\n\nDecode step time with every sequence at context ~{SHORT_CONTEXT} vs ~{LONG_CONTEXT} "
        f"(ours; median wall time between two tokens of a stream):\n\n" + context_table(contexts)
    )
    notes = [f"{labels[name]}: {r.error}" for name, r in results[batch_sizes[0]].items() if r.error]
    notes += [
        f"batch {b}: {name} tokens differ from ours"
        for b, row in results.items()
        for name, r in row.items()
        if r.same_tokens_as_ours is False
    ]
    if notes:
        report += "\n\n" + "\n".join(f"- {n}" for n in notes)
    print()
    print(report)

    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "environment": env,
        "repeats": repeats,
        "throughput": {
            str(b): {name: {**asdict(r), "median": r.median} for name, r in row.items()} for b, row in results.items()
        },
        "labels": labels,
        "ratios": {  # median of per-round ratios (what the table and the targets use)
            str(b): {f"ours_over_{name}": paired_ratio(row["ours"], r) for name, r in row.items() if name != "ours"}
            for b, row in results.items()
        },
        "ratios_of_medians": {
            str(b): {
                f"ours_over_{name}": _ratio(row["ours"].median, r.median) for name, r in row.items() if name != "ours"
            }
            for b, row in results.items()
        },
        "targets": {f"batch_{b}_over_hf_static": t for b, t in TARGETS.items()},
        "decode_step_vs_context": [asdict(c) for c in contexts],
        "seconds": round(time.perf_counter() - started, 1),
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    plot = out.with_suffix(".png")
    write_plot(plot, results, labels, contexts)
    if not args.quick and args.out is None:
        update_readme(report)
    print(f"\nwrote {out} and {plot} in {payload['seconds']:.0f}s")


if __name__ == "__main__":
    main()
