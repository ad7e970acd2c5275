"""Serving benchmark with OpenTelemetry tracing on vs off (issue 16; not a test): gRPC streaming
throughput at concurrency 32.

One started engine, two gRPC servers attached to it (two ``GenerationServer`` instances on two
ports), so the engine is the same for both configurations:
- "off": a server without a tracer provider, which is what ``gpt2-serve`` without ``--trace``
  builds: no tracing code runs at all;
- "on": a server given ``TracerProvider(sampler=ALWAYS_ON)`` (every call sampled, 100%) with a
  ``BatchSpanProcessor`` (the SDK's defaults, as ``--trace`` uses) feeding an exporter that counts
  the spans and discards them. The cost measured is the SDK's and ours (the spans made, their
  attributes, the processor's queue and worker thread), not a network's: no OTLP serialisation
  and no collector. Each "on" call carries a W3C ``traceparent`` (a fresh trace id per call, made
  before the round), as a caller in a traced mesh would send; the server's span continues it.
Both servers count into one ``Metrics`` attached to the engine (as ``gpt2-serve`` does by
default; no /metrics endpoint is served or scraped), so "on" also pays for the trace-id exemplars
of the latency histograms, which come with tracing.

Each round is one configuration serving ``--concurrency`` streaming requests started at once
(prompt 16 tokens, ``--new-tokens`` new tokens, greedy, EOS ignored; ``GenerateStream``) on its
own channel. Rounds come in pairs, in ABBA order (on,off, off,on, ...), so that a linear drift
of the machine's speed cancels; ``--warmup`` pairs come first and are not counted. Per round:
tokens/s (completion tokens / wall time from the first request to the last token, as in
serving_bench.py) and process CPU seconds (``time.process_time``, all threads) per generated
token, counted until every call of the round has ended on the server (its done callback, where
the spans are finished, has run) and, when on, the span processor has exported the round's spans
(``force_flush``), so a round pays for its own spans. Since the 32 calls of a round end together,
their spans are finished after the last token reached the client: tokens/s to the end of the
round's last call is reported too. Reported: the median of the per-pair on/off ratios of
tokens/s with a seeded bootstrap 95% confidence interval, their mean, and the same for CPU per
token (a second view: other tenants of a shared machine take wall time but not this process's
CPU time) and for tokens/s to the last call's end; spans exported per request (5 for a
GenerateStream: the RPC's SERVER span + queue, prefill, decode, response) and how many SERVER
spans continued the caller's trace. Target (issue 16): on/off >= 0.95 at concurrency 32; the
verdict is "met" when the interval's lower bound is >= 0.95, "not met" when its upper bound is
< 0.95, and "inconclusive" otherwise (always with fewer than 10 pairs). Writes
``bench/results/serving_tracing_overhead.json`` and prints a markdown table; ``make bench``
(bench/bench.py) runs the same measurement as one of its phases.

    .venv/bin/python bench/serving_tracing_overhead.py            # 28 pairs, ~2 minutes on 2 quiet cores
    .venv/bin/python bench/serving_tracing_overhead.py --quick    # 4 pairs of 8 tokens, ~15 seconds
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.metadata
import json
import logging
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
from gpt2_client.proto import common_pb2, generation_pb2_grpc
from gpt2_client.proto import generation_pb2 as pb
from gpt2_service.api.server import GenerationServer
from gpt2_service.config import EngineConfig, ServerConfig
from gpt2_service.engine.frontend import Engine
from gpt2_service.metrics import Metrics
from gpt2_service.model.weights import LoadedModel, load_model
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanKind

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_bench import RequestTrace, _spread, prompts, summarise
from serving_metrics_overhead import BOOTSTRAP_RESAMPLES, MIN_PAIRS_FOR_VERDICT, abba, paired_summary

MODEL = "random:gpt2"
TARGET_RATIO = 0.95  # issue 16: tokens/s with tracing on (100% sampled) / off, at concurrency 32
PROMPT_TOKENS = 16
SPANS_PER_STREAM = 5  # the RPC's SERVER span + queue, prefill, decode, response
REQUESTS_OK = ("gpt2_requests_total", {"rpc": "GenerateStream", "code": "OK"})
CALLS_END_TIMEOUT_S = 10.0
RESULTS = Path(__file__).resolve().parent / "results" / "serving_tracing_overhead.json"

log = logging.getLogger("serving_tracing_overhead")


@dataclass(frozen=True)
class Plan:
    pairs: int
    warmup: int  # pairs
    new_tokens: int
    concurrency: int = 32
    seed: int = 0  # of the bootstrap
    quick: bool = False


def make_plan(quick: bool, rounds: int | None = None) -> Plan:
    """Full: 2 warm-up pairs, 28 measured pairs of 16 new tokens (~2 minutes on 2 quiet cores);
    quick: 1 warm-up pair, 4 pairs of 8 tokens (~15 seconds; too few pairs for a verdict).
    ``rounds``: measured pairs, rounded up to whole ABBA blocks (even, at least 2)."""
    pairs = rounds or (4 if quick else 28)
    pairs = max(2, pairs + pairs % 2)
    return Plan(pairs=pairs, warmup=1 if quick else 2, new_tokens=8 if quick else 16, quick=quick)


# -- the "on" server's tracing ---------------------------------------------------------------------


class CountingExporter(SpanExporter):
    """Counts the spans it is given (by name; SERVER spans whose parent came from the caller's
    ``traceparent``) and drops them: no serialisation, no network."""

    def __init__(self) -> None:
        self.num_spans = 0
        self.names: Counter[str] = Counter()
        self.server_spans = 0
        self.server_spans_remote_parent = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            self.names[span.name] += 1
            if span.kind is SpanKind.SERVER:
                self.server_spans += 1
                if span.parent is not None and span.parent.is_remote:
                    self.server_spans_remote_parent += 1
        self.num_spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def traceparents(count: int, rng: random.Random) -> list[tuple[tuple[str, str], ...]]:
    """W3C trace context metadata for ``count`` calls, each a new trace, sampled."""
    return [(("traceparent", f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64):016x}-01"),) for _ in range(count)]


async def stream_request(
    stub: generation_pb2_grpc.TextGenerationAsyncStub,
    prompt: list[int],
    new_tokens: int,
    index: int,
    metadata: tuple[tuple[str, str], ...] | None,
) -> RequestTrace:
    """serving_bench.grpc_request, with call metadata."""
    request = pb.GenerateRequest(
        request_id=f"grpc-{index}",
        prompt_token_ids=common_pb2.TokenIds(ids=prompt),
        sampling=pb.SamplingParams(temperature=0.0),
        stopping=pb.StoppingCriteria(max_new_tokens=new_tokens, ignore_eos=True),
    )
    start = time.perf_counter()
    times: list[float] = []
    previous = start
    async for message in stub.GenerateStream(request, metadata=metadata):
        now = time.perf_counter()
        _spread(times, previous, now, len(message.tokens))
        previous = now
    assert len(times) == new_tokens, (len(times), new_tokens)
    return RequestTrace(start, times)


# -- the rounds ------------------------------------------------------------------------------------


@dataclass
class Round:
    pair: int  # -1, -2, ...: warm-up
    config: str  # "on" or "off"
    tokens_per_s: float  # first request -> last token at the client
    seconds: float
    num_tokens: int
    cpu_seconds: float  # until every call ended on the server (and, on, its spans were exported)
    seconds_to_end: float  # first request -> the round's last call ended on the server (spans exported)
    spans: int  # exported for this round

    @property
    def cpu_ms_per_token(self) -> float:
        return self.cpu_seconds / self.num_tokens * 1000

    @property
    def tokens_per_s_to_end(self) -> float:
        return self.num_tokens / self.seconds_to_end


@dataclass
class Side:
    server: GenerationServer
    stub: generation_pb2_grpc.TextGenerationAsyncStub
    provider: TracerProvider | None


async def one_round(pair: int, config: str, side: Side, metrics: Metrics, exporter: CountingExporter,
                    plan: Plan, rng: random.Random) -> Round:  # fmt: skip
    on = config == "on"
    batch = prompts(plan.concurrency, PROMPT_TOKENS)
    metadata: list[tuple[tuple[str, str], ...] | None] = (
        list(traceparents(plan.concurrency, rng)) if on else [None] * plan.concurrency
    )
    gc.collect()  # outside the measured span, the same for both
    ok_before = metrics.registry.get_sample_value(*REQUESTS_OK) or 0.0
    spans_before = exporter.num_spans
    cpu_start = time.process_time()
    start = time.perf_counter()
    traces = await asyncio.gather(
        *(stream_request(side.stub, p, plan.new_tokens, i, metadata[i]) for i, p in enumerate(batch))
    )
    result = summarise(list(traces))
    # Every call of the round ended on the server: its done callback (accounting; on: the spans
    # are finished there) has run, since it counts the call before tracing it in the same callback.
    deadline = time.monotonic() + CALLS_END_TIMEOUT_S
    while (metrics.registry.get_sample_value(*REQUESTS_OK) or 0.0) < ok_before + plan.concurrency:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{config} round: the calls did not all end within {CALLS_END_TIMEOUT_S}s")
        await asyncio.sleep(0.001)
    if side.provider is not None:  # the round pays for the export of its own spans
        await asyncio.to_thread(side.provider.force_flush)
    seconds_to_end = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    assert result.num_tokens == plan.concurrency * plan.new_tokens
    return Round(pair, config, result.tokens_per_s, result.seconds, result.num_tokens, cpu_seconds,
                 seconds_to_end, exporter.num_spans - spans_before)  # fmt: skip


# -- the statistics --------------------------------------------------------------------------------


def verdict(ci: tuple[float, float], num_pairs: int) -> str:
    if num_pairs < MIN_PAIRS_FOR_VERDICT:  # a bootstrap of a handful of values is no interval
        return f"inconclusive (fewer than {MIN_PAIRS_FOR_VERDICT} pairs)"
    if ci[0] >= TARGET_RATIO:
        return "met"
    if ci[1] < TARGET_RATIO:
        return "not met"
    return "inconclusive"


def summarise_rounds(rounds: list[Round], plan: Plan) -> dict[str, Any]:
    by_pair = {(r.pair, r.config): r for r in rounds if r.pair >= 0}
    on = [by_pair[p, "on"] for p in range(plan.pairs)]
    off = [by_pair[p, "off"] for p in range(plan.pairs)]
    throughput, ci = paired_summary([r.tokens_per_s for r in on], [r.tokens_per_s for r in off], plan.seed)
    cpu, _ = paired_summary([r.cpu_ms_per_token for r in on], [r.cpu_ms_per_token for r in off], plan.seed)
    to_end, _ = paired_summary([r.tokens_per_s_to_end for r in on], [r.tokens_per_s_to_end for r in off], plan.seed)
    return {
        "tokens_per_s": throughput,
        "cpu_ms_per_token": cpu,
        "tokens_per_s_to_last_call_end": to_end,
        "target": {"min_ratio_on_off": TARGET_RATIO, "verdict": verdict(ci, plan.pairs)},
    }


# -- the run ---------------------------------------------------------------------------------------


async def measure(loaded: LoadedModel, plan: Plan) -> dict[str, Any]:
    """Warm-up pairs, then ``plan.pairs`` ABBA pairs of on/off rounds; the summary."""
    started = time.perf_counter()
    config = EngineConfig(model=loaded.name, max_batch_size=plan.concurrency, stage_timing=False)
    metrics = Metrics()
    engine = Engine(loaded, config)
    metrics.attach(engine)
    exporter = CountingExporter()
    provider = TracerProvider(sampler=ALWAYS_ON)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    await engine.start()
    sides: dict[str, Side] = {}
    channels: list[grpc.aio.Channel] = []
    rounds: list[Round] = []
    rng = random.Random(plan.seed)
    try:
        for name, tracer_provider in (("on", provider), ("off", None)):
            server = GenerationServer(
                ServerConfig(host="127.0.0.1", port=0, reflection=False), metrics=metrics,
                tracer_provider=tracer_provider,
            )  # fmt: skip
            port = await server.start()
            await server.attach(engine)
            channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
            stub: generation_pb2_grpc.TextGenerationAsyncStub = generation_pb2_grpc.TextGenerationStub(channels[-1])
            sides[name] = Side(server, stub, tracer_provider)
        schedule = [(p, c) for p in range(-plan.warmup, plan.pairs) for c in abba(p)]  # ABBA throughout
        for pair, name in schedule:
            r = await one_round(pair, name, sides[name], metrics, exporter, plan, rng)
            rounds.append(r)
            log.info(
                "tracing %s %d %-3s: %6.1f tokens/s, %5.2f CPU ms/token, %4d spans",
                "warm-up" if pair < 0 else "pair", pair + plan.warmup + 1 if pair < 0 else pair + 1,
                name, r.tokens_per_s, r.cpu_ms_per_token, r.spans,
            )  # fmt: skip
    finally:
        for channel in channels:
            await channel.close(None)
        for side in sides.values():
            await side.server.stop()
        await engine.shutdown()
        provider.shutdown()
    on_rounds = [r for r in rounds if r.config == "on"]
    off_spans = sum(r.spans for r in rounds if r.config == "off")
    requests_on = len(on_rounds) * plan.concurrency
    spans_per_request = exporter.num_spans / requests_on if requests_on else 0.0
    return {
        "workload": {
            "model": loaded.name,
            "rpc": "GenerateStream",
            "concurrency": plan.concurrency,
            "prompt_tokens": PROMPT_TOKENS,
            "new_tokens": plan.new_tokens,
            "greedy": True,
            "ignore_eos": True,
            "pairs": plan.pairs,
            "warmup_pairs": plan.warmup,
            "quick": plan.quick,
            "order": "ABBA pairs (on,off, off,on, ...), warm-up pairs excluded",
            "on": "TracerProvider(sampler=ALWAYS_ON) + BatchSpanProcessor (SDK defaults) -> an exporter that "
            "counts and drops the spans; a W3C traceparent on every call",
            "off": "no tracer provider (no tracing code runs)",
            "metrics": "one Metrics attached to the engine, both servers counting into it; no /metrics endpoint",
        },
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": plan.seed, "interval": "percentile, 95%"},
        **summarise_rounds(rounds, plan),
        "spans": {
            "exported": exporter.num_spans,
            "requests_on": requests_on,
            "per_request": spans_per_request,
            "expected_per_request": SPANS_PER_STREAM,
            "by_name": dict(exporter.names),
            "server_spans": exporter.server_spans,
            "server_spans_continuing_traceparent": exporter.server_spans_remote_parent,
            "exported_during_off_rounds": off_spans,
            "ok": spans_per_request == SPANS_PER_STREAM
            and exporter.server_spans_remote_parent == exporter.server_spans == requests_on
            and off_spans == 0,
        },
        "round_log": [
            {**asdict(r), "cpu_ms_per_token": r.cpu_ms_per_token, "tokens_per_s_to_end": r.tokens_per_s_to_end}
            for r in rounds
        ],
        "versions": {
            "opentelemetry-sdk": importlib.metadata.version("opentelemetry-sdk"),
            "grpcio": importlib.metadata.version("grpcio"),
        },
        "seconds": round(time.perf_counter() - started, 1),
    }


# -- the report ------------------------------------------------------------------------------------


def _ci(s: dict[str, Any]) -> str:
    lo, hi = s["ci95"]
    return f"{s['median_pair_ratio']:.3f} [{lo:.3f}, {hi:.3f}]"


def targets(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(target, measured, threshold, verdict) rows, as bench_report.targets gives them."""
    w, tps = r["workload"], r["tokens_per_s"]
    return [
        (
            f"tracing on (100% sampled) / off, gRPC stream tokens/s at concurrency {w['concurrency']} "
            "(median pair ratio, 95% CI)",
            _ci(tps),
            f">= {r['target']['min_ratio_on_off']:.2f}",
            "MISSED" if r["target"]["verdict"] == "not met" else r["target"]["verdict"],
        )
    ]


def report(r: dict[str, Any], with_targets: bool = True) -> str:
    """The per-pair table and the summary lines (no heading)."""
    w, tps, cpu, end, spans = (r[k] for k in ("workload", "tokens_per_s", "cpu_ms_per_token",
                                              "tokens_per_s_to_last_call_end", "spans"))  # fmt: skip
    lines = [
        "| pair | order | on tok/s | off tok/s | on/off | on CPU ms/tok | off CPU ms/tok | on/off | "
        "on/off to last call's end |",
        "|---:|:---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in range(len(tps["on"])):
        lines.append(
            f"| {p + 1} | {','.join(abba(p))} | {tps['on'][p]:.1f} | {tps['off'][p]:.1f} | "
            f"{tps['pair_ratios_on_off'][p]:.3f} | {cpu['on'][p]:.2f} | {cpu['off'][p]:.2f} | "
            f"{cpu['pair_ratios_on_off'][p]:.3f} | {end['pair_ratios_on_off'][p]:.3f} |"
        )
    summary = [
        f"`{w['model']}`, `GenerateStream`, concurrency {w['concurrency']}, prompt {w['prompt_tokens']} tokens, "
        f"{w['new_tokens']} new tokens, greedy, EOS ignored; {w['pairs']} ABBA pairs ({w['warmup_pairs']} warm-up "
        f"pairs excluded), one engine, two servers (on: `TracerProvider(sampler=ALWAYS_ON)` + `BatchSpanProcessor` "
        "into an exporter that counts and drops the spans, a `traceparent` on every call; off: no tracer provider); "
        f"{r['seconds'] / 60:.1f} minutes.",
        f"- tokens/s: median on {tps['median_on']:.1f}, off {tps['median_off']:.1f}; on/off per pair: median "
        f"{_ci(tps)} (95% CI), mean {tps['mean_pair_ratio']:.3f}",
        f"- CPU ms/token: median on {cpu['median_on']:.2f}, off {cpu['median_off']:.2f}; on/off per pair: median "
        f"{_ci(cpu)}, mean {cpu['mean_pair_ratio']:.3f}",
        f"- tokens/s to the end of the round's last call (spans finished and exported): on/off per pair: median "
        f"{_ci(end)}",
        f"- spans exported per request: {spans['per_request']:.2f} (expected {spans['expected_per_request']}: "
        f"{', '.join(f'{n} {c}' for n, c in sorted(spans['by_name'].items()))}); SERVER spans continuing the "
        f"caller's `traceparent`: {spans['server_spans_continuing_traceparent']} of {spans['server_spans']}"
        + ("" if spans["ok"] else " — **CHECK FAILED**"),
    ]
    if with_targets:
        summary.append(
            f"- target (issue 16: throughput on/off >= {TARGET_RATIO}, judged on the CI of the median pair ratio): "
            f"**{r['target']['verdict']}**"
        )
    return "\n".join(lines) + "\n\n" + summary[0] + "\n\n" + "\n".join(summary[1:])


def standalone_report(payload: dict[str, Any]) -> str:
    """The standalone run's report: its date and machine, then ``report``. Rebuilt from the JSON:

    .venv/bin/python -c 'import json, serving_tracing_overhead as t; print(t.standalone_report(json.load(open("results/serving_tracing_overhead.json"))))'
    """
    from machine import short_description

    return f"Run of {payload['date']}: {short_description(payload['machine'])}.\n\n{report(payload)}"


async def _standalone(model: str, plan: Plan) -> dict[str, Any]:
    import machine
    from gpt2_service.engine.threads import confine_torch_to_the_engine

    confine_torch_to_the_engine(asyncio.get_running_loop())  # as gpt2-serve does
    env = machine.describe()
    result = await measure(load_model(model), plan)
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": env, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 warm-up pair, 4 pairs of 8 new tokens")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--rounds", type=int, help="measured pairs (one on, one off round each); even (default 28)")
    parser.add_argument("--new-tokens", type=int, help="per request and round (default 16; quick: 8)")
    parser.add_argument("--warmup", type=int, help="pairs before the measured ones, not counted (default 2)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="of the bootstrap and the trace ids")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.rounds is not None and (args.rounds < 2 or args.rounds % 2):
        parser.error("--rounds must be even and >= 2 (whole ABBA blocks)")
    plan = make_plan(args.quick, args.rounds)
    overrides = {"concurrency": args.concurrency, "seed": args.seed}
    if args.new_tokens:
        overrides["new_tokens"] = args.new_tokens
    if args.warmup is not None:
        overrides["warmup"] = args.warmup
    plan = Plan(**{**asdict(plan), **overrides})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("gpt2_service").setLevel(logging.ERROR)  # the random-weights banner, per-RPC lines
    payload = asyncio.run(_standalone(args.model, plan))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print()
    print(standalone_report(payload))
    print(f"\nwrote {args.out} in {payload['seconds']:.0f}s")
    if not payload["spans"]["ok"]:
        sys.exit(f"span check failed: {payload['spans']}")


if __name__ == "__main__":
    main()
