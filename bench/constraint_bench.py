"""Constrained generation (issue 15), measured in-process on ``random:gpt2``.

A. Throughput: N requests (32; --quick 16) submitted at once through ``Engine.submit``, each a
   prompt of 16 random token ids, temperature 1 with seed 1500 + i, ``max_batch_size`` and
   ``kv_cache_slots`` 32, deterministic mode (``batch_invariant=True``). "constrained": every
   request constrained by the same JSON schema (``SCHEMA``: a nested object, an array of objects,
   enums, integers with minimum and maximum, a boolean, required and optional fields, every string
   bounded by a pattern or maxLength), ``max_new_tokens`` 256, which no output can reach (the
   longest JSON the schema admits, ``LONGEST``, has 233 characters and a token has at least one):
   every output must finish with CONSTRAINT_COMPLETE and be valid JSON under the schema
   (jsonschema). "unconstrained": the same requests without the constraint, EOS ignored, each
   generating exactly as many tokens as the constrained one with its seed did (seeded outputs do
   not depend on the batch, so every constrained run gives the same counts: checked), so both do
   the same forward passes at the same batch sizes and only the constraint differs. Throughput =
   generated tokens of the whole batch / (first submit to last token); the target: constrained /
   unconstrained >= 0.85. The schema is compiled before the clock starts (part B measures that).
B. Time to first token of a request with a schema the engine has never compiled vs the same
   request again (the compiled constraint is cached by its text), and without a constraint: 5
   schemas (``SCHEMA`` with its ``name`` property renamed, a new name in every round), each
   request alone on an idle engine, 1 new token (--quick: 2 schemas). TTFT = the engine's arrival to first token (the
   compilation happens after arrival); the wall time from the submit to the first output is in
   the JSON too. New and cached of a schema run back to back, new first (a schema is cached only
   once compiled); the compilation alone (``Constraints.matcher`` of as many more new schemas)
   is timed too. Also: how many compilations a burst of 8 concurrent requests with one new schema
   causes.
C. Per-step cost of the masks: the engine's step events during part A (decode-only steps with all
   N requests in the batch): step wall time, forward pass, and the runner's "sampling" stage,
   which includes waiting for the masks' worker, the masked fill and advancing the matchers; and,
   off the engine, the same outputs replayed through fresh matchers: computing N rows' masks
   (the worker's share of a step) and advancing N matchers, per step.

Every run starts a fresh engine and shuts it down after (only one engine's threads run at a
time). Systems (constrained, unconstrained, part B) alternate in rounds after a warm-up (a
constrained run, which also gives the token counts, an unconstrained one, one schema of part B;
--quick: the constrained run only), the order rotating each round; times are medians over rounds,
the throughput ratio the median of per-round ratios (``engine_bench.paired_ratio``); the ratio of
each system's fastest run is reported too (noise only slows runs down). An output
that does not complete or is not valid under the schema, an unconstrained request that does not
generate its count, or a compilation where none was expected is logged as an error, written to
the JSON (``problems``) and makes the script exit 1.

    .venv/bin/python bench/constraint_bench.py              # 6 rounds of 32 requests, ~4 minutes on 2 idle cores
    .venv/bin/python bench/constraint_bench.py --quick      # 1 round of 16 requests, about half a minute
    .venv/bin/python bench/constraint_bench.py --rounds 8    # more rounds on a noisy machine

Writes ``bench/results/constraints.json`` (``constraints-quick.json``) and prints a markdown
table; a full run with the default output also puts the table in bench/README.md. ``make bench``
(bench/bench.py) runs the same measurement as one of its phases.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import standalone
from engine_bench import SystemResult, paired_ratio
from gpt2_service.config import EngineConfig
from gpt2_service.core.request import (
    ConstraintSpec,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    StoppingCriteria,
)
from gpt2_service.core.sequence import Finished
from gpt2_service.engine.constraints import Constraints, Masks, advance
from gpt2_service.engine.events import StepEvent
from gpt2_service.engine.frontend import Engine
from gpt2_service.engine.stream import GenerationStream
from gpt2_service.model.weights import LoadedModel
from standalone import dated_report, table, yes

MODEL = "random:gpt2"
SLOTS = 32
PROMPT_TOKENS = 16
MAX_NEW_TOKENS = 256  # more than the longest output the schema admits (LONGEST): every output completes
SEED = 1500
N_SCHEMAS = 5  # new schemas of part B per round
BURST = 8  # concurrent requests with one new schema
RUN_TIMEOUT_S = 600.0  # a run that takes longer is a hang: fail loudly
THROUGHPUT_MIN_RATIO = 0.85  # the issue's target: constrained / unconstrained tokens/s
RESULTS = Path(__file__).resolve().parent / "results"
README_START, README_END = "<!-- constraint-bench:start -->", "<!-- constraint-bench:end -->"

SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["id", "customer", "status", "items"],
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 99999},
        "customer": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "city"],
            "properties": {
                "name": {"type": "string", "pattern": "^[A-Z][a-z]+$", "maxLength": 10},
                "city": {"type": "string", "pattern": "^[A-Z][a-z]{1,11}$"},
                "vip": {"type": "boolean"},
            },
        },
        "status": {"enum": ["pending", "paid", "shipped", "cancelled"]},
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["sku", "qty"],
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                },
            },
        },
        "priority": {"type": "integer", "minimum": 0, "maximum": 5},
        "note": {"type": "string", "maxLength": 16, "pattern": "^[a-z ]*$"},
    },
}
# The longest output the schema admits (every property, each at its longest; no whitespace: the
# engine compiles JSON schemas without flexible whitespace). Its ASCII characters bound the tokens.
LONGEST: dict[str, Any] = {
    "id": 99999,
    "customer": {"name": "Abcdefghij", "city": "Abcdefghijkl", "vip": False},
    "status": "cancelled",
    "items": [{"sku": "ABC-1234", "qty": 99}] * 3,
    "priority": 5,
    "note": "abcdefghijklmnop",
}

SYSTEMS = ("constrained", "unconstrained")
LABELS = {
    "constrained": "constrained (JSON schema)",
    "unconstrained": "unconstrained, same token counts",
}
TTFT_KEYS = ("new", "cached", "none")
TTFT_LABELS = {
    "new": "new schema (compiled at arrival)",
    "cached": "same schema again (cached)",
    "none": "no constraint",
}

log = logging.getLogger("constraint_bench")


def schema_text(name: str = "name") -> str:
    """``SCHEMA`` as the request carries it, its customer's ``name`` property renamed (a new text:
    a new compilation)."""
    schema = json.loads(json.dumps(SCHEMA))
    customer = schema["properties"]["customer"]
    customer["properties"] = {(name if k == "name" else k): v for k, v in customer["properties"].items()}
    customer["required"] = [name if k == "name" else k for k in customer["required"]]
    return json.dumps(schema)


def longest_chars() -> int:
    jsonschema.validate(LONGEST, SCHEMA)
    return len(json.dumps(LONGEST, separators=(",", ":")))


@dataclass(frozen=True)
class ConstraintPlan:
    requests: int  # concurrent requests of part A
    rounds: int
    schemas: int  # new schemas of part B per round
    warm_up: tuple[str, ...]  # the systems of the warm-up round ("constrained" always first)
    quick: bool


def make_plan(
    quick: bool, rounds: int | None = None, requests: int | None = None, schemas: int | None = None
) -> ConstraintPlan:
    """Full: a warm-up of each system, then 6 rounds of 32 requests and 5 new schemas (~4 minutes
    on 2 cores); quick: a constrained warm-up run, then 1 round of 16 requests and 2 schemas
    (about half a minute)."""
    return ConstraintPlan(
        requests=requests or (16 if quick else SLOTS),
        rounds=rounds or (1 if quick else 6),
        schemas=schemas or (2 if quick else N_SCHEMAS),
        warm_up=("constrained",) if quick else ("constrained", "unconstrained", "ttft"),
        quick=quick,
    )


# -- the runs --------------------------------------------------------------------------------------


@dataclass
class Run:
    """One run of part A (or one request of part B): per request, in submission order."""

    seconds: float  # first submit -> last token
    lengths: list[int]
    reasons: list[str]
    texts: list[str] = field(repr=False)
    ttft: list[float]  # the engine's Finished.timing: arrival -> first token
    ttft_wall: list[float]  # first submit -> the first output on the event loop
    tokens: list[list[int]] = field(repr=False)
    steps: int = 0  # engine steps of this run
    full_steps: list[tuple[float, float, float]] = field(default_factory=list, repr=False)
    # (wall, forward, sampling stage) seconds of each decode-only step with every request in it
    compilations: int = 0  # engine.constraints.compilations during the run
    cpu_seconds: float = 0.0  # the process's CPU time during the run

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.seconds


class StepRecorder:
    """The engine's step events with their arrival times (on the engine thread)."""

    def __init__(self) -> None:
        self.events: list[tuple[float, StepEvent]] = []

    def __call__(self, event: StepEvent) -> None:
        self.events.append((time.perf_counter(), event))

    def full_steps(self, batch: int) -> list[tuple[float, float, float]]:
        """(wall, forward, sampling) of each decode-only step of ``batch`` sequences: wall from the
        previous step's event to its own; forward = the stage timer's sum without "sampling" (the
        runner's time from the logits to the tokens: the masks' wait, the sampler, the matchers)."""
        out = []
        for (t0, _), (t1, event) in zip(self.events, self.events[1:], strict=False):
            if event.num_prefill_seqs == 0 and event.num_decode == batch and event.times.stages:
                stages = dict(event.times.stages)
                sampling = stages.pop("sampling", 0.0)
                out.append((t1 - t0, sum(stages.values()), sampling))
        return out


async def _read(stream: GenerationStream, start: float) -> tuple[list[int], Finished | None, float | None]:
    tokens: list[int] = []
    finished: Finished | None = None
    first: float | None = None
    try:
        async for out in stream:
            if out.tokens and first is None:
                first = time.perf_counter() - start
            tokens.extend(t.id for t in out.tokens)
            if out.finished is not None:
                finished = out.finished
    finally:
        stream.close()
    return tokens, finished, first


async def submit_all(
    engine: Engine,
    requests: list[GenerationRequest],
    recorder: StepRecorder | None = None,
    concurrently: bool = False,
) -> Run:
    """Submit every request at once (one after another, as a client's loop would; ``concurrently``:
    all ``submit`` calls in flight together), read every stream to its end. ``recorder``: an
    observer of this engine's steps, to be read for this run."""
    if recorder is not None:
        recorder.events.clear()
    steps, compilations = engine.stats.num_steps, engine.constraints.compilations
    cpu = time.process_time()
    start = time.perf_counter()
    if concurrently:
        streams = list(await asyncio.gather(*(engine.submit(r) for r in requests)))
    else:
        streams = [await engine.submit(r) for r in requests]
    try:
        results = await asyncio.wait_for(asyncio.gather(*(_read(s, start) for s in streams)), RUN_TIMEOUT_S)
    except TimeoutError:
        raise RuntimeError(
            f"{len(requests)} requests ({requests[0].request_id}, ...) not finished after {RUN_TIMEOUT_S:.0f} s: "
            f"a hang? engine stats {engine.stats}"
        ) from None
    seconds = time.perf_counter() - start
    run = Run(seconds, [], [], [], [], [], [], cpu_seconds=time.process_time() - cpu)
    for request, (tokens, end, first) in zip(requests, results, strict=True):
        if end is None or first is None:
            raise RuntimeError(f"{request.request_id}: the stream ended without finishing or without a token")
        if list(end.token_ids) != tokens:
            raise RuntimeError(f"{request.request_id}: streamed tokens differ from Finished.token_ids")
        run.lengths.append(len(tokens))
        run.reasons.append(end.reason.value)
        run.texts.append(end.text)
        run.ttft.append(end.timing.time_to_first_token_seconds)
        run.ttft_wall.append(first)
        run.tokens.append(tokens)
    run.steps = engine.stats.num_steps - steps
    run.compilations = engine.constraints.compilations - compilations
    if recorder is not None:
        run.full_steps = recorder.full_steps(len(requests))
    return run


class Workload:
    """The prompts, from one seeded generator, and the requests of both parts."""

    def __init__(self, vocab_size: int, requests: int) -> None:
        gen = torch.Generator().manual_seed(15)
        self.prompts = torch.randint(0, vocab_size, (max(requests, SLOTS), PROMPT_TOKENS), generator=gen).tolist()
        self.lengths: list[int] | None = None  # the constrained outputs' token counts, from the first run
        self.spec = ConstraintSpec("json_schema", schema_text())

    def _request(self, rid: str, i: int, stopping: StoppingCriteria, spec: ConstraintSpec | None) -> GenerationRequest:
        return GenerationRequest(
            request_id=rid,
            prompt_token_ids=tuple(self.prompts[i]),
            sampling=SamplingParams(temperature=1.0, seed=SEED + i),
            stopping=stopping,
            constraint=spec,
        )

    def constrained(self, count: int) -> list[GenerationRequest]:
        stopping = StoppingCriteria(max_new_tokens=MAX_NEW_TOKENS)
        return [self._request(f"json-{i}", i, stopping, self.spec) for i in range(count)]

    def unconstrained(self, count: int) -> list[GenerationRequest]:
        assert self.lengths is not None and len(self.lengths) >= count, "a constrained run comes first"
        return [
            self._request(f"free-{i}", i, StoppingCriteria(max_new_tokens=self.lengths[i], ignore_eos=True), None)
            for i in range(count)
        ]

    def single(self, rid: str, spec: ConstraintSpec | None) -> GenerationRequest:
        return self._request(rid, 0, StoppingCriteria(max_new_tokens=1), spec)


def engine_config(slots: int = SLOTS) -> EngineConfig:
    return EngineConfig(
        model=MODEL,
        max_batch_size=slots,
        kv_cache_slots=slots,
        max_queue_size=256,
        context_window=PROMPT_TOKENS + MAX_NEW_TOKENS,
    )


async def with_engine(loaded: LoadedModel, body: Callable[[Engine], Awaitable[Any]]) -> Any:
    """``body`` on a fresh engine, shut down after; its KV cache is freed before the next starts."""
    engine = Engine(loaded, engine_config())
    await engine.start()
    try:
        return await body(engine)
    finally:
        await engine.shutdown()
        del engine
        gc.collect()


@dataclass
class TtftRound:
    """Part B of one round: per schema, one request of each kind."""

    runs: dict[str, list[Run]] = field(default_factory=lambda: {key: [] for key in TTFT_KEYS})
    compile_s: list[float] = field(default_factory=list)  # Constraints.matcher of a new schema, alone
    burst_compilations: int = 0  # BURST concurrent requests with one new schema


class Bench:
    def __init__(self, loaded: LoadedModel, plan: ConstraintPlan) -> None:
        self.loaded = loaded
        self.plan = plan
        self.work = Workload(loaded.model.config.vocab_size, plan.requests)

    async def throughput(self, key: str, count: int) -> Run:
        async def body(engine: Engine) -> Run:
            recorder = StepRecorder()
            engine.add_step_observer(recorder)
            if key == "constrained":
                await asyncio.to_thread(engine.constraints.matcher, self.work.spec)  # compiled off the clock
                run = await submit_all(engine, self.work.constrained(count), recorder)
                if self.work.lengths is None:
                    self.work.lengths = list(run.lengths)
                return run
            return await submit_all(engine, self.work.unconstrained(count), recorder)

        result: Run = await with_engine(self.loaded, body)
        return result

    async def ttft(self, tag: str, schemas: int) -> TtftRound:
        """Each schema new, then cached, and the request without a constraint (first for odd
        schemas, last for even ones), one request at a time on an idle engine."""

        async def body(engine: Engine) -> TtftRound:
            out = TtftRound()
            for i in range(schemas):
                spec = ConstraintSpec("json_schema", schema_text(f"name_{tag}_{i}"))
                order = ["none", "new", "cached"] if i % 2 else ["new", "cached", "none"]
                for key in order:
                    request = self.work.single(f"ttft-{tag}-{i}-{key}", None if key == "none" else spec)
                    out.runs[key].append(await submit_all(engine, [request]))
            for _ in range(schemas):
                alone = ConstraintSpec("json_schema", schema_text(f"name_{tag}_alone_{len(out.compile_s)}"))
                start = time.perf_counter()
                engine.constraints.matcher(alone)  # the engine is idle: nothing else runs meanwhile
                out.compile_s.append(time.perf_counter() - start)
            burst_spec = ConstraintSpec("json_schema", schema_text(f"name_{tag}_burst"))
            burst = [self.work.single(f"burst-{tag}-{i}", burst_spec) for i in range(BURST)]
            out.burst_compilations = (await submit_all(engine, burst, concurrently=True)).compilations
            return out

        result: TtftRound = await with_engine(self.loaded, body)
        return result


def round_order(rnd: int) -> list[str]:
    keys = [*SYSTEMS, "ttft"]
    shift = rnd % len(keys)
    return keys[shift:] + keys[:shift]


async def measure(loaded: LoadedModel, plan: ConstraintPlan) -> dict[str, Any]:
    """Warm-up, then ``plan.rounds`` rounds of every system; the summary (``summarise``)."""
    started = time.perf_counter()
    longest = longest_chars()
    if longest > MAX_NEW_TOKENS:
        raise AssertionError(f"the schema admits {longest} characters > max_new_tokens {MAX_NEW_TOKENS}")
    bench = Bench(loaded, plan)
    runs: dict[str, list[Run]] = {key: [] for key in SYSTEMS}
    warm: dict[str, Run] = {}
    for key in plan.warm_up:  # allocator growth, oneDNN primitives, the constrained token counts
        if key == "ttft":
            await bench.ttft("warm", 1)
        else:
            warm[key] = await bench.throughput(key, plan.requests)
        log.info("constraints warm-up %-13s done", key)
    ttft: list[TtftRound] = []
    for rnd in range(plan.rounds):
        for key in round_order(rnd):
            if key == "ttft":
                t = await bench.ttft(f"r{rnd + 1}", plan.schemas)
                ttft.append(t)
                log.info(
                    "constraints round %d TTFT median new %.1f ms, cached %.1f ms, none %.1f ms; compile %.1f ms; "
                    "burst of %d: %d compilations",
                    rnd + 1, *(1e3 * statistics.median(r.ttft[0] for r in t.runs[k]) for k in TTFT_KEYS),
                    1e3 * statistics.median(t.compile_s), BURST, t.burst_compilations,
                )  # fmt: skip
                continue
            run = await bench.throughput(key, plan.requests)
            runs[key].append(run)
            log.info(
                "constraints round %d %-13s %6.2f s, %5d tokens, %7.1f tok/s (CPU %6.2f s, %3d steps)",
                rnd + 1, key, run.seconds, run.num_tokens, run.tokens_per_s, run.cpu_seconds, run.steps,
            )  # fmt: skip
    replay = replay_masks(loaded, bench.work.spec, runs["constrained"][-1].tokens)
    return summarise(plan, runs, warm, ttft, replay, longest, time.perf_counter() - started)


def replay_masks(loaded: LoadedModel, spec: ConstraintSpec, outputs: list[list[int]]) -> dict[str, Any]:
    """Part A's constrained outputs through fresh matchers, off the engine: per step, the masks of
    the rows still generating (the worker's share: llguidance, then unpacking to bools) and
    advancing their matchers (on the engine thread in the engine)."""
    constraints = Constraints(loaded.tokenizer)
    masks = Masks(loaded.model.config.vocab_size)
    try:
        matchers = [constraints.matcher(spec) for _ in outputs]
        fill: list[float] = []
        unpack: list[float] = []
        advancing: list[float] = []
        full = len(outputs)
        for t in range(max(map(len, outputs))):
            rows = [i for i, out in enumerate(outputs) if t < len(out)]
            start = time.perf_counter()
            future = masks.start([matchers[i] for i in rows])
            future.result()
            filled = time.perf_counter()
            allowed = masks.result(future)
            unpacked = time.perf_counter()
            for row, i in enumerate(rows):
                if not bool(allowed[row, outputs[i][t]]):
                    raise RuntimeError(f"replay: token {outputs[i][t]} of output {i} at {t} is outside its mask")
                advance(matchers[i], outputs[i][t])
            done = time.perf_counter()
            if len(rows) == full:
                fill.append(filled - start)
                unpack.append(unpacked - filled)
                advancing.append(done - unpacked)
    finally:
        masks.close()
    med = statistics.median
    return {
        "rows": len(outputs),
        "steps": len(fill),
        "masks_ms": med(fill) * 1e3 if fill else None,
        "unpack_ms": med(unpack) * 1e3 if unpack else None,
        "advance_ms": med(advancing) * 1e3 if advancing else None,
    }


# -- the summary -----------------------------------------------------------------------------------


def check_outputs(
    runs: dict[str, list[Run]], warm: dict[str, Run], ttft: list[TtftRound], lengths: list[int]
) -> tuple[dict[str, Any], list[str]]:
    """Completion and validity of every constrained output, the unconstrained counts, the
    compilations; a line per problem."""
    problems: list[str] = []
    constrained = [*([warm["constrained"]] if "constrained" in warm else []), *runs["constrained"]]
    outputs = [(n, r, i) for n, r in enumerate(constrained) for i in range(len(r.texts))]
    complete = sum(r.reasons[i] == FinishReason.CONSTRAINT_COMPLETE.value for _, r, i in outputs)
    valid = 0
    for n, r, i in outputs:  # run n = 0: the warm-up's
        try:
            jsonschema.validate(json.loads(r.texts[i]), SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError) as exc:
            problems.append(f"constrained run {n}, output {i} is not valid: {r.texts[i]!r}: "
                            f"{str(exc).splitlines()[0]}")  # fmt: skip
        if r.reasons[i] != FinishReason.CONSTRAINT_COMPLETE.value:
            problems.append(f"constrained run {n}, output {i} finished with {r.reasons[i]}: {r.texts[i]!r}")
    same_counts = all(r.lengths == lengths for r in constrained)
    if not same_counts:
        problems.append("the constrained outputs' token counts differ between runs (seeded outputs should not)")
    unconstrained = [*([warm["unconstrained"]] if "unconstrained" in warm else []), *runs["unconstrained"]]
    exact = all(r.lengths == lengths[: len(r.lengths)] for r in unconstrained)
    if not exact:
        problems.append("an unconstrained request did not generate its constrained twin's token count")
    new = [r.compilations for t in ttft for r in t.runs["new"]]
    cached = [r.compilations for t in ttft for r in t.runs["cached"]]
    none = [r.compilations for t in ttft for r in t.runs["none"]]
    compiled_once = all(c == 1 for c in new) and not any(cached) and not any(none)
    if not compiled_once:
        problems.append(f"compilations per request: new {new}, cached {cached}, none {none} (expected 1, 0, 0)")
    for line in problems:
        log.error("PROBLEM: %s", line)
    checks = {
        "outputs": len(outputs),
        "constraint_complete": complete,
        "valid_json": valid,
        "same_counts_every_run": same_counts,
        "unconstrained_exact_counts": exact,
        "compiled_once_per_new_schema": compiled_once,
    }
    return checks, problems


def _step_stats(rs: list[Run]) -> dict[str, Any]:
    """Medians over rounds of each run's median full-batch step."""
    per_run = [r.full_steps for r in rs if r.full_steps]
    if not per_run:
        return {"steps": 0}
    med = statistics.median

    def of(k: int) -> float:
        return med(med(s[k] for s in steps) for steps in per_run) * 1e3

    return {"steps": med(len(s) for s in per_run), "step_ms": of(0), "forward_ms": of(1), "sampling_ms": of(2)}


def summarise(
    plan: ConstraintPlan,
    runs: dict[str, list[Run]],
    warm: dict[str, Run],
    ttft: list[TtftRound],
    replay: dict[str, Any],
    longest: int,
    seconds: float,
) -> dict[str, Any]:
    lengths = (warm.get("constrained") or runs["constrained"][0]).lengths
    checks, problems = check_outputs(runs, warm, ttft, lengths)
    med = statistics.median
    results = {key: SystemResult([r.tokens_per_s for r in rs]) for key, rs in runs.items()}
    systems_out: dict[str, Any] = {}
    for key, rs in runs.items():
        systems_out[key] = {
            "label": LABELS[key],
            "tokens_per_s": results[key].median,
            "best_tokens_per_s": max(results[key].tokens_per_s),  # the run the machine disturbed least
            "seconds": med(r.seconds for r in rs),
            "tokens": med(r.num_tokens for r in rs),
            "engine_steps": med(r.steps for r in rs),
            "cpu_seconds": med(r.cpu_seconds for r in rs),
            "full_batch_steps": _step_stats(rs),
            "runs": [
                {"seconds": r.seconds, "tokens_per_s": r.tokens_per_s, "tokens": r.num_tokens, "steps": r.steps,
                 "cpu_seconds": r.cpu_seconds}
                for r in rs
            ],
        }  # fmt: skip

    def ms(values: list[float]) -> float:
        return med(values) * 1e3

    ttft_out: dict[str, Any] = {}
    for key in TTFT_KEYS:
        per_round = [[r.ttft[0] for r in t.runs[key]] for t in ttft]
        per_round_wall = [[r.ttft_wall[0] for r in t.runs[key]] for t in ttft]
        ttft_out[key] = {
            "label": TTFT_LABELS[key],
            "ttft_ms": med(ms(v) for v in per_round),
            "ttft_wall_ms": med(ms(v) for v in per_round_wall),
            "per_round_ms": [[x * 1e3 for x in v] for v in per_round],
        }
    # per schema: new - cached, and cached - none (the matcher's copy and first mask), medians
    new_minus_cached = [
        (n.ttft[0] - c.ttft[0]) * 1e3 for t in ttft for n, c in zip(t.runs["new"], t.runs["cached"], strict=True)
    ]
    cached_minus_none = [
        (c.ttft[0] - x.ttft[0]) * 1e3 for t in ttft for c, x in zip(t.runs["cached"], t.runs["none"], strict=True)
    ]
    constrained_steps = systems_out["constrained"]["full_batch_steps"]
    free_steps = systems_out["unconstrained"]["full_batch_steps"]
    step_cost = {
        name: constrained_steps[name] - free_steps[name]
        for name in ("step_ms", "forward_ms", "sampling_ms")
        if name in constrained_steps and name in free_steps
    }
    return {
        "workload": {
            "model": MODEL,
            "requests": plan.requests,
            "prompt_tokens": PROMPT_TOKENS,
            "max_new_tokens": MAX_NEW_TOKENS,
            "longest_output_chars": longest,
            "sampling": f"temperature 1, seed {SEED} + i",
            "schema": SCHEMA,
            "constrained_lengths": lengths,
            "schemas_per_round": plan.schemas,
            "burst": BURST,
            "engine": asdict(engine_config()),
            "rounds": plan.rounds,
            "warm_up": list(plan.warm_up),
            "quick": plan.quick,
        },
        "systems": systems_out,
        "ratios": {
            "constrained_over_unconstrained": paired_ratio(results["constrained"], results["unconstrained"]),
            # noise only ever slows a run down: the best runs' ratio is a cross-check on a busy machine
            "best_constrained_over_unconstrained": max(results["constrained"].tokens_per_s)
            / max(results["unconstrained"].tokens_per_s),
        },
        "ttft": {
            **ttft_out,
            "new_minus_cached_ms": med(new_minus_cached),
            "cached_minus_none_ms": med(cached_minus_none),
            "compile_ms": med(ms(t.compile_s) for t in ttft),
            "burst_compilations": [t.burst_compilations for t in ttft],
        },
        "step_cost_ms": step_cost,
        "replay": replay,
        "checks": checks,
        "problems": problems,
        "targets": {"constrained_over_unconstrained_min": THROUGHPUT_MIN_RATIO},
        "seconds": round(seconds, 1),
    }


# -- the report ------------------------------------------------------------------------------------


def _f(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None else format(value, spec) + suffix


def targets(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(target, measured, threshold, verdict) rows, as bench_report.targets gives them."""
    value, need = r["ratios"]["constrained_over_unconstrained"], r["targets"]["constrained_over_unconstrained_min"]
    verdict = "n/a" if value is None else "met" if value >= need else "MISSED"
    label = f"JSON-schema constrained / unconstrained tokens/s, {r['workload']['requests']} requests"
    return [(label, _f(value, ".2f", "x"), f">= {need:.2f}x", verdict)]


def report(r: dict[str, Any], with_targets: bool = True) -> str:
    """The tables (no heading): throughput, per-step cost, TTFT, the targets (bench_report puts
    them in its own table), the checks."""
    w, s, t, checks = r["workload"], r["systems"], r["ttft"], r["checks"]
    ratio = r["ratios"]["constrained_over_unconstrained"]
    best = r["ratios"]["best_constrained_over_unconstrained"]
    rows = []
    for key in SYSTEMS:
        x = s[key]
        first = key == "constrained"
        rows.append([
            LABELS[key], _f(x["tokens_per_s"], ".1f"), _f(x["best_tokens_per_s"], ".1f"), _f(x["seconds"]),
            f"{x['tokens']:.0f}", f"{x['engine_steps']:.0f}", _f(ratio, ".2f", "x") if first else "",
            _f(best, ".2f", "x") if first else "",
        ])  # fmt: skip
    part_a = table(
        ["system", "tokens/s", "best run tokens/s", "submit to last token s", "tokens", "engine steps",
         "constrained / unconstrained", "best / best"],
        rows, "|:---|---:|---:|---:|---:|---:|---:|---:|",
    )  # fmt: skip
    lengths = w["constrained_lengths"]
    rows = []
    for key in SYSTEMS:
        st = s[key]["full_batch_steps"]
        rows.append([LABELS[key], f"{st['steps']:.0f}", _f(st.get("step_ms")), _f(st.get("forward_ms")),
                     _f(st.get("sampling_ms"))])  # fmt: skip
    cost = r["step_cost_ms"]
    rows.append(["difference", "", _f(cost.get("step_ms"), "+.2f"), _f(cost.get("forward_ms"), "+.2f"),
                 _f(cost.get("sampling_ms"), "+.2f")])  # fmt: skip
    part_c = table(
        ["system", "steps (per run)", "step ms", "forward ms", "sampling stage ms"], rows, "|:---|---:|---:|---:|---:|"
    )
    replay = r["replay"]
    rows = [[TTFT_LABELS[key], _f(t[key]["ttft_ms"], ".1f"), _f(t[key]["ttft_wall_ms"], ".1f")] for key in TTFT_KEYS]
    part_b = table(["request", "TTFT ms (median)", "submit to first output ms"], rows, "|:---|---:|---:|")
    burst = t["burst_compilations"]
    lines = [
        f"`{w['model']}`, deterministic mode, `max_batch_size` {w['engine']['max_batch_size']}, a fresh engine per "
        f"run; {w['rounds']} round(s) after a warm-up ({', '.join(w['warm_up'])}), order rotating; medians over "
        f"rounds, the ratio the median of per-round ratios; {w['sampling']}; {r['seconds'] / 60:.1f} minutes.",
        f"**Throughput**: {w['requests']} requests submitted at once, prompts of {w['prompt_tokens']} random token ids; "
        f"constrained: every request the same JSON schema (compiled before the clock), `max_new_tokens` "
        f"{w['max_new_tokens']} (the schema admits at most {w['longest_output_chars']} characters), "
        f"{min(lengths)}-{max(lengths)} tokens per output, mean {statistics.fmean(lengths):.1f}; unconstrained: EOS "
        "ignored, each request exactly its constrained twin's token count; tokens/s = generated tokens / (first "
        "submit to last token); the ratio is the median of per-round ratios, best / best the ratio of each "
        "system's fastest run (noise only slows runs down):",
        part_a,
        f"**Per-step cost of the masks** (decode-only steps with all {w['requests']} requests in the batch, median "
        "per run, then over rounds; step = wall time between two step events, forward = the stage timer without "
        "sampling; the sampling stage includes waiting for the masks' worker, the masked fill and advancing the "
        f"matchers). Off the engine, replaying the outputs: {replay['rows']} rows' masks "
        f"{_f(replay['masks_ms'])} ms per step on the worker (+ {_f(replay['unpack_ms'])} ms unpacking to bools), "
        f"advancing {replay['rows']} matchers {_f(replay['advance_ms'])} ms:",
        part_c,
        f"**Time to first token**: one request alone on an idle engine, {w['schemas_per_round']} schemas per round "
        "(the schema above, its `name` property renamed: a text the engine has never compiled), each new, then "
        "again (cached), and without a constraint; TTFT = the engine's arrival to first token, the compilation "
        "included:",
        part_b,
        f"New - cached: **{_f(t['new_minus_cached_ms'], '.1f')} ms** (median over schemas); cached - none: "
        f"{_f(t['cached_minus_none_ms'], '.1f')} ms; the compilation alone (`Constraints.matcher` of a new schema): "
        f"{_f(t['compile_ms'], '.1f')} ms. A burst of {w['burst']} concurrent requests with one new schema compiled it "
        f"{', '.join(map(str, burst))} time(s) (per round).",
        f"Checks: CONSTRAINT_COMPLETE {checks['constraint_complete']} of {checks['outputs']} constrained outputs "
        f"({100 * checks['constraint_complete'] / max(checks['outputs'], 1):.0f}%), valid JSON under the schema "
        f"{checks['valid_json']} of {checks['outputs']}; the same token counts every run: "
        f"{yes(checks['same_counts_every_run'])}; unconstrained requests generated exactly those counts: "
        f"{yes(checks['unconstrained_exact_counts'])}; each new schema compiled once, cached and unconstrained "
        f"requests none: {yes(checks['compiled_once_per_new_schema'])}.",
    ]
    if with_targets:
        target_rows = [list(row) for row in targets(r)]
        lines.insert(3, table(["target", "measured", "target", "verdict"], target_rows, "|:---|---:|---:|:---|"))
    if r["problems"]:
        lines.append("\n".join(f"- **PROBLEM**: {p}" for p in r["problems"]))
    return "\n\n".join(lines)


def standalone_report(payload: dict[str, Any]) -> str:
    """The standalone run's report: its date and machine, then ``report``. Rebuilt from the JSON:

    .venv/bin/python -c 'import json, constraint_bench as c; print(c.standalone_report(json.load(open("results/constraints.json"))))'
    """
    return dated_report(payload, report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round, 16 requests, 2 schemas, a shorter warm-up")
    parser.add_argument("--rounds", type=int, help="rounds after the warm-up (default 6; quick: 1)")
    parser.add_argument("--requests", type=int, help=f"concurrent requests of part A (default {SLOTS}; quick: 16)")
    parser.add_argument("--schemas", type=int, help=f"new schemas of part B per round (default {N_SCHEMAS}; quick: 2)")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/constraints.json, -quick.json)")
    parser.add_argument(
        "--readme", action=argparse.BooleanOptionalAction, default=None,
        help="put the table in bench/README.md (default: on for full runs with the default output)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.requests is not None and not 1 <= args.requests <= SLOTS:
        parser.error(f"--requests must be in [1, {SLOTS}]")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("gpt2_service").setLevel(logging.WARNING)
    plan = make_plan(args.quick, args.rounds, args.requests, args.schemas)
    payload = asyncio.run(standalone.run(MODEL, measure, plan))
    text = standalone_report(payload)
    print()
    print(text)
    out: Path = args.out or RESULTS / f"constraints{'-quick' if plan.quick else ''}.json"
    readme = args.readme if args.readme is not None else not plan.quick and args.out is None
    standalone.write(payload, text, out, readme, (README_START, README_END))
    if payload["problems"]:
        sys.exit(f"constrained generation problems: {payload['problems']}")


if __name__ == "__main__":
    main()
