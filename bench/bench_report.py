"""The report of ``make bench`` (bench/bench.py): markdown tables with the targets, the plots, and
its place in bench/README.md. Reads only the JSON payload bench.py writes, so a report can be
rebuilt from ``bench/results/bench.json``:

    .venv/bin/python bench/bench_report.py bench/results/bench.json
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import constraint_bench
import reuse_bench
import serving_tracing_overhead
from engine_bench import README
from engine_bench import update_readme as _update_between

FORMATS = ("float32", "float16", "int8")
LLAMA_TYPE = {"float32": "f32", "float16": "f16", "int8": "q8_0"}
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"
README_HEADING_ANCHOR = "performance-in-one-run-make-bench"
SUMMARY_ROW_KEY = "(`bench/bench.py`)"

# The targets of issue 12, goal 5: reported, never asserted.
DETERMINISM_MIN = {1: 0.90, 32: 0.90}  # deterministic / fast tokens/s, every format
HF_MIN = {1: 1.5, 32: 2.0}  # ours float32 (default mode) / HF generate float32
LLAMA_MIN = {  # ours (default mode) / llama.cpp, format for format
    "float32": {1: 0.8, 8: 0.8, 32: 1.0, 64: 1.0},
    "float16": dict.fromkeys((1, 8, 32, 64, 128), 1.0),
    "int8": dict.fromkeys((1, 8, 32, 64, 128), 1.0),
}
OVERHEAD_MAX_MS_BATCH1 = 3.0
OVERHEAD_MAX_SHARE_BATCH32 = 0.10
GRPC_MIN = {32: 0.90}  # gRPC / in-process engine

TARGETS_DOC = {
    "determinism": "deterministic / fast >= 0.90 at concurrency 1 and 32, each format",
    "hf": "ours float32 / HF generate float32 >= 1.5 at 1, >= 2 at 32",
    "llama": "ours float32 >= llama f32 at 32 and 64, >= 0.8x at 1 and 8; float16 >= f16 and int8 >= q8_0 at every concurrency (generated tokens/s over the whole run)",
    "step_overhead": "step wall time - forward and LM head < 3 ms at batch 1, < 10% of the step at batch 32",
    "grpc": "gRPC streaming >= 0.90 of the in-process engine at concurrency 32",
    "prefix_reuse": f"mean time to first token of 32 requests sharing a 512-token prefix, prefix cache off / on "
    f">= {reuse_bench.TTFT_MIN_RATIO:.0f}, cold and warm",
    "n_completions": f"wall time of 8 separate requests / one with n=8 >= {reuse_bench.N_MIN_RATIO} (clearly above 1)",
    "constraints": f"tokens/s of 32 requests constrained by one JSON schema / the same requests unconstrained "
    f"generating as many tokens >= {constraint_bench.THROUGHPUT_MIN_RATIO}",
    "tracing": f"gRPC streaming tokens/s at concurrency 32 with tracing on (100% sampled) / off >= "
    f"{serving_tracing_overhead.TARGET_RATIO} (lower bound of the median pair ratio's bootstrap 95% CI)",
}


def _f(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if value is None else format(value, spec) + suffix


def _get(d: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else "met" if ok else "MISSED"


def targets(p: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(target, measured, threshold, verdict) rows."""
    rows: list[tuple[str, str, str, str]] = []
    ratios = p["ratios"]
    for w in FORMATS:
        for c, need in DETERMINISM_MIN.items():
            r = _get(ratios, f"determinism/{w}", str(c))
            rows.append((f"determinism cost, {w}, concurrency {c} (deterministic / fast)", _f(r, ".2f", "x"),
                         f">= {need:.2f}x", _verdict(None if r is None else r >= need)))  # fmt: skip
    for c, need in HF_MIN.items():
        r = _get(ratios, "ours_over_hf/float32", str(c))
        rows.append((f"ours float32 / HF generate, concurrency {c}", _f(r, ".2f", "x"), f">= {need:.1f}x",
                     _verdict(None if r is None else r >= need)))  # fmt: skip
    for w, by_c in LLAMA_MIN.items():
        for c, need in by_c.items():
            if str(c) not in p["throughput"].get(f"ours/{w}", {}):
                continue
            r = _get(ratios, f"ours_over_llama/{w}", str(c))
            rows.append((f"ours {w} / llama.cpp {LLAMA_TYPE[w]}, concurrency {c}", _f(r, ".2f", "x"),
                         f">= {need:.1f}x", _verdict(None if r is None else r >= need)))  # fmt: skip
    for w in FORMATS:
        one = _get(p["step_overhead"], f"ours/{w}", "1", "overhead_ms")
        rows.append((f"step overhead, {w}, batch 1", _f(one, ".2f", " ms"), f"< {OVERHEAD_MAX_MS_BATCH1:.0f} ms",
                     _verdict(None if one is None else one < OVERHEAD_MAX_MS_BATCH1)))  # fmt: skip
        share = _get(p["step_overhead"], f"ours/{w}", "32", "overhead_share")
        rows.append((f"step overhead, {w}, batch 32 (share of the step)", _f(None if share is None else share * 100, ".1f", "%"),
                     f"< {OVERHEAD_MAX_SHARE_BATCH32:.0%}", _verdict(None if share is None else share < OVERHEAD_MAX_SHARE_BATCH32)))  # fmt: skip
    for c, need in GRPC_MIN.items():
        for w in FORMATS:
            r = _get(ratios, f"grpc_over_engine/{w}", str(c))
            if r is not None:
                rows.append((f"gRPC / in-process engine, {w}, concurrency {c}", _f(r * 100, ".0f", "%"), f">= {need:.0%}",
                             _verdict(r >= need)))  # fmt: skip
    if p.get("reuse"):
        rows += reuse_bench.targets(p["reuse"])
    if p.get("constraints"):
        rows += constraint_bench.targets(p["constraints"])
    if p.get("tracing"):
        rows += serving_tracing_overhead.targets(p["tracing"])
    return rows


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "|:---" + "|---:" * (len(header) - 1) + "|"
    return "\n".join(["| " + " | ".join(header) + " |", align, *("| " + " | ".join(r) + " |" for r in rows)])


def _concurrency(p: dict[str, Any]) -> list[int]:
    return [int(c) for c in p["workload"]["concurrency"]]


def throughput_table(p: dict[str, Any]) -> str:
    thr = p["throughput"]
    cols: list[tuple[str, str]] = []
    for w in FORMATS:
        cols += [(f"ours/{w}", f"{w}"), (f"fast/{w}", f"{w} fast")]
    cols.append(("hf/float32", "HF float32"))
    cols += [(f"llama/{w}", f"llama.cpp {LLAMA_TYPE[w]}") for w in FORMATS if f"llama/{w}" in thr]
    rows = [[str(c)] + [_f(_get(thr, key, str(c), "median")) for key, _ in cols] for c in _concurrency(p)]
    return _table(["concurrency", *(label for _, label in cols)], rows)


def ratio_table(p: dict[str, Any]) -> str:
    ratios = p["ratios"]
    cols = [(f"determinism/{w}", f"deterministic / fast, {w}") for w in FORMATS]
    cols.append(("ours_over_hf/float32", "float32 / HF"))
    cols += [
        (f"ours_over_llama/{w}", f"{w} / llama {LLAMA_TYPE[w]}") for w in FORMATS if f"llama/{w}" in p["throughput"]
    ]
    rows = [[str(c)] + [_f(_get(ratios, key, str(c)), ".2f", "x") for key, _ in cols] for c in _concurrency(p)]
    return _table(["concurrency", *(label for _, label in cols)], rows)


def grpc_table(p: dict[str, Any]) -> str:
    rows = []
    for c in _concurrency(p):
        for w in FORMATS:
            lat = _get(p["latency"], f"grpc/{w}", str(c))
            if lat is None:
                continue
            g = _get(p["ratios"], f"grpc_over_engine/{w}", str(c))
            rows.append([
                str(c), w, _f(lat["tokens_per_s"]), _f(None if g is None else g * 100, ".0f", "%"),
                f"{lat['ttft_p50_ms']:.0f} / {lat['ttft_p99_ms']:.0f}", f"{lat['itl_p50_ms']:.1f} / {lat['itl_p99_ms']:.1f}",
            ])  # fmt: skip
    header = ["concurrency", "weights", "gRPC tok/s", "of in-process", "TTFT p50 / p99 ms", "inter-token p50 / p99 ms"]
    return _table(header, rows, "|---:|:---|---:|---:|---:|---:|")


def ceilings_table(p: dict[str, Any]) -> str:
    ce, roof = p["ceilings"], p["roofline"]
    rows = []
    for w in FORMATS:
        lin = ce["linear"][w]
        r = roof[w]
        rows.append([
            w,
            f"{r['weight_bytes'] / 1e6:.0f}",
            " / ".join(_f(_get(lin, "1", m, "gflops")) for m in ("deterministic", "fast")),
            " / ".join(_f(_get(lin, "32", m, "gflops")) for m in ("deterministic", "fast")),
            _f(r["bandwidth_bound_tokens_per_s"]),
            _f(_pct(_get(r, "ours", "batch1_fraction_of_bandwidth_bound")), ".0f", "%"),
            _f(_get(r, "ours", "batch32_gflops")),
            _f(_pct(_get(r, "ours", "batch32_fraction_of_sgemm")), ".0f", "%"),
            _f(_pct(_get(r, "ours", "batch32_fraction_of_linear_ceiling")), ".0f", "%"),
        ])  # fmt: skip
    header = [
        "weights", "weight MB read per token", "linear GFLOP/s, 1 row (det. / fast)", "linear GFLOP/s, 32 rows (det. / fast)",
        "bandwidth bound, batch 1 (tok/s)", "batch 1: ours / bound", "batch 32: ours GFLOP/s", "of sgemm", "of the linear ceiling",
    ]  # fmt: skip
    return _table(header, rows)


def _pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def overhead_table(p: dict[str, Any]) -> str:
    rows = []
    for key, label in [(f"{k}/{w}", f"{w}{' fast' if k == 'fast' else ''}") for w in FORMATS for k in ("ours", "fast")]:
        one, many = _get(p["step_overhead"], key, "1"), _get(p["step_overhead"], key, "32")
        if one is None and many is None:
            continue
        cell: Callable[[dict[str, Any] | None, str], str] = lambda d, k: _f(None if d is None else d[k], ".2f")  # noqa: E731
        rows.append([
            label, cell(one, "step_ms"), cell(one, "forward_ms"), cell(one, "overhead_ms"),
            cell(many, "step_ms"), cell(many, "forward_ms"), cell(many, "overhead_ms"),
            _f(None if many is None else many["overhead_share"] * 100, ".1f", "%"),
        ])  # fmt: skip
    header = [
        "weights", "batch 1 step ms", "forward ms", "overhead ms",
        "batch 32 step ms", "forward ms", "overhead ms", "overhead share",
    ]  # fmt: skip
    return _table(header, rows)


def deviation_table(p: dict[str, Any]) -> str:
    rows = []
    for weights_name, dev in p["deviation"].items():
        for w, d in dev["formats"].items():
            rows.append([
                f"`{weights_name}`", w, f"{d['max_abs_logit_diff']:.3g}", f"{d['mean_kl']:.2e}",
                f"{d['top1_agreement'] * 100:.1f}%", f"{d['greedy_agreement'] * 100:.0f}%",
                f"{d['mean_first_divergence']:.1f} ({', '.join(map(str, d['first_divergence']))})",
            ])  # fmt: skip
    header = [
        "weights", "format", "max abs logit diff", "mean KL(float32 ‖ format)", "top-1 agreement",
        "greedy: tokens before the first divergence", "first divergence, mean (per prompt)",
    ]  # fmt: skip
    return _table(header, rows, "|:---|:---|---:|---:|---:|---:|:---|")


def llama_table(p: dict[str, Any]) -> str:
    rows = []
    for w, rounds in p["llama_cpp"]["rows"].items():
        by_batch: dict[int, list[dict[str, Any]]] = {}
        for rnd in rounds:
            for r in rnd:
                by_batch.setdefault(r["batch"], []).append(r)
        for b, runs in sorted(by_batch.items()):
            med: Callable[[str], float] = lambda k: statistics.median(r[k] for r in runs)  # noqa: B023, E731
            rows.append([LLAMA_TYPE[w], str(b), f"{med('gen_tokens_per_s'):.1f}", f"{med('s'):.1f}", f"{med('s_tg'):.1f}",
                         f"{med('s_pp'):.1f}", str(len(runs))])  # fmt: skip
    header = ["GGUF", "B", "generated tok/s over T (compared)", "S t/s (prompt + generated)", "S_TG t/s (decode only)",
              "S_PP t/s", "runs"]  # fmt: skip
    return _table(header, rows, "|:---|---:|---:|---:|---:|---:|---:|")


def markdown(p: dict[str, Any]) -> str:
    from machine import lscpu_flag_summary, short_description

    w, m = p["workload"], p["machine"]
    rounds = ", ".join(f"{r} at {c}" for c, r in w["rounds"].items())
    llama = p["llama_cpp"]
    extra = "; ".join(
        f"{LLAMA_TYPE[w]} run with `{' '.join(a)}` (it crashed without)"
        for w, a in llama.get("extra_args", {}).items()
        if a
    )
    llama_line = (
        f"llama.cpp: `{llama['binary']}` ({llama['version']}), GGUF {', '.join(Path(v).name for v in llama['models'].values())}, "
        f"`-t {m['cores']}`{'; ' + extra if extra else ''}; compared on generated tokens / total time T, prefill included, "
        "as ours (its S t/s also counts the prompt tokens)."
        if llama["found"]
        else f"llama.cpp: not run ({llama['where']})."
    )
    targets_rows = [list(r) for r in targets(p)]
    met = sum(r[3] == "met" for r in targets_rows)
    known = sum(r[3] != "n/a" for r in targets_rows)
    parts = [
        f"Run of {p['date']}{' (quick mode)' if w['quick'] else ''}, {p['seconds'] / 60:.1f} minutes: "
        f"{short_description(m)}; {lscpu_flag_summary(m['flags'])}. `{w['model']}`, prompt {w['prompt_tokens']} "
        f"random token ids, {w['new_tokens']} new tokens, greedy, EOS ignored, all requests submitted at once; "
        f"tokens/s = generated tokens / (first submit to last token), prefill included; rounds: {rounds} "
        f"(medians over rounds; ratios are medians of per-round ratios). Ours = the engine in its default, "
        f'deterministic mode; "fast" = `batch_invariant=False`. {llama_line}',
        f"**Targets: {met} of {known} met.**",
        _table(["target", "measured", "target", "verdict"], targets_rows, "|:---|---:|---:|:---|"),
        "**Throughput** (tokens/s):",
        throughput_table(p),
        "**Ratios** (medians of per-round ratios):",
        ratio_table(p),
        "**gRPC streaming** (`TextGeneration.GenerateStream`, a server in the same process on each format's default engine):",
        grpc_table(p),
        f"**Ceilings** measured in this run: memory read {p['ceilings']['memory_read_gb_per_s']:.1f} GB/s (summing 1 GiB "
        f"of float32), fp32 sgemm {p['ceilings']['sgemm_gflops']:.0f} GFLOP/s (n = {p['ceilings']['sgemm_n']}); linear "
        "GFLOP/s = one model's worth of linear layers and the LM head through the engine's kernels. The bandwidth bound at "
        "batch 1 is read bandwidth / weight bytes; batch 32 GFLOP/s counts the matrix products of prompt and generated tokens.",
        ceilings_table(p),
        "**Per-step overhead** (median over decode steps; step = wall time between two step events, forward = the "
        "runner's stage timer: embedding, attention, MLP, final layer norm, LM head; overhead = step - forward, so "
        "sampling, scheduling and handing the outputs to the event loop):",
        overhead_table(p),
        "**Weight formats vs float32** (next-token distributions at every position of 32 random 32-token prompts; greedy "
        "agreement over 64 tokens from 8 of them, through the engine):",
        deviation_table(p),
    ]
    if llama["found"] and llama["rows"]:
        parts += ["**llama.cpp** (`llama-batched-bench`, median over rounds):", llama_table(p)]
    if p.get("reuse"):
        parts += [
            "**Prefix reuse and n completions** ([reuse_bench.py](reuse_bench.py); targets in the table above):",
            reuse_bench.report(p["reuse"], with_targets=False),
        ]
    if p.get("constraints"):
        parts += [
            "**Constrained generation** ([constraint_bench.py](constraint_bench.py); target in the table above):",
            constraint_bench.report(p["constraints"], with_targets=False),
        ]
    if p.get("tracing"):
        parts += [
            "**Tracing overhead** ([serving_tracing_overhead.py](serving_tracing_overhead.py); target in the table "
            "above):",
            serving_tracing_overhead.report(p["tracing"], with_targets=False),
        ]
    notes = [
        f"HF generate's tokens differ from ours at concurrency {c}"
        for c, same in p["same_tokens_as_hf"].items()
        if not same
    ]
    notes += [f"llama.cpp: {e}" for e in llama["errors"]]
    if notes:
        parts.append("\n".join(f"- {n}" for n in notes))
    return "\n\n".join(parts)


def summary_cell(p: dict[str, Any]) -> str:
    ratios = p["ratios"]
    bits = []
    hf1, hf32 = _get(ratios, "ours_over_hf/float32", "1"), _get(ratios, "ours_over_hf/float32", "32")
    if hf1 is not None:
        bits.append(f"float32 {hf1:.2f}x HF `generate` at 1, {_f(hf32, '.2f')}x at 32")
    det: list[float | None] = [_get(ratios, f"determinism/{w}", "32") for w in FORMATS]
    costs = [f"{(1 - d) * 100:.0f}%" for d in det if d is not None]
    if len(costs) == len(det):
        bits.append("determinism costs " + ", ".join(costs) + " (float32, float16, int8) at 32")
    if p["llama_cpp"]["found"]:
        l32 = [_get(ratios, f"ours_over_llama/{w}", "32") for w in FORMATS]
        bits.append("vs llama.cpp at 32: " + ", ".join(f"{_f(x, '.2f')}x" for x in l32))
    reuse = p.get("reuse")
    if reuse:
        cold, n = _get(reuse, "ratios", "cold_ttft_mean_off_over_on"), _get(reuse, "ratios", "separate_over_n_seconds")
        bits.append(f"prefix reuse: TTFT {_f(cold, '.1f')}x shorter; n=8 {_f(n, '.2f')}x faster than 8 requests")
    constraints = p.get("constraints")
    if constraints:
        ratio = _get(constraints, "ratios", "constrained_over_unconstrained")
        bits.append(f"JSON-schema constrained {_f(ratio, '.2f')}x unconstrained tokens/s")
    tracing = p.get("tracing")
    if tracing:
        ratio = _get(tracing, "tokens_per_s", "median_pair_ratio")
        bits.append(f"tracing on (100% sampled) {_f(ratio, '.3f')}x off over gRPC at 32")
    rows = targets(p)
    met = sum(r[3] == "met" for r in rows)
    known = sum(r[3] != "n/a" for r in rows)
    return "; ".join([*bits, f"targets: {met} of {known} met"])


def update_readme(report: str, p: dict[str, Any], plots: Sequence[Path] = ()) -> None:
    """The report (and the plots) between the markers of bench/README.md, and the summary table's
    ``make bench`` row."""
    images = []
    for plot in plots:
        try:
            images.append(f"![{plot.stem}]({plot.resolve().relative_to(README.parent.resolve())})")
        except ValueError:  # outside bench/: not linked
            continue
    _update_between(report + ("\n\n" + "\n".join(images) if images else ""), README_START, README_END)
    text = README.read_text()
    date = p["date"].split(" ")[0]
    row = (
        f"| [performance in one run](#{README_HEADING_ANCHOR}) | `make bench` {SUMMARY_ROW_KEY} "
        f"| {summary_cell(p)} ({date}) |"
    )
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and SUMMARY_ROW_KEY in line:
            lines[i] = row
            break
    README.write_text("\n".join(lines) + "\n")


# -- plots ----------------------------------------------------------------------------------------

COLORS = {"float32": "tab:blue", "float16": "tab:orange", "int8": "tab:green"}


def plots(p: dict[str, Any], directory: Path, suffix: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")

    conc = _concurrency(p)
    thr = p["throughput"]
    title = f"{p['workload']['model']}: prompt {p['workload']['prompt_tokens']}, {p['workload']['new_tokens']} new tokens, greedy"

    fig, ax = plt.subplots(figsize=(9, 5.5))
    styles = [("ours", "-", "o", "ours {w}"), ("fast", "--", ".", "ours {w} fast"), ("grpc", ":", "s", "gRPC {w}"),
              ("llama", "-.", "^", "llama.cpp {t}")]  # fmt: skip
    for kind, line, marker, label in styles:
        for w in FORMATS:
            series = [(c, _get(thr, f"{kind}/{w}", str(c), "median")) for c in conc]
            xs = [c for c, v in series if v is not None]
            if xs:
                ax.plot(xs, [v for _, v in series if v is not None], line, marker=marker, color=COLORS[w],
                        label=label.format(w=w, t=LLAMA_TYPE[w]))  # fmt: skip
    hf = [(c, _get(thr, "hf/float32", str(c), "median")) for c in conc]
    if any(v is not None for _, v in hf):
        ax.plot([c for c, v in hf if v is not None], [v for _, v in hf if v is not None], "-", marker="x", color="black",
                label="HF generate float32")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(conc, [str(c) for c in conc])
    ax.set_xlabel("concurrency (requests submitted at once)")
    ax.set_ylabel("generated tokens/s (median over rounds)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    throughput = directory / f"throughput{suffix}.png"
    fig.savefig(throughput, dpi=110)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for w in FORMATS:
        lat = p["latency"].get(f"grpc/{w}", {})
        xs = [c for c in conc if str(c) in lat]
        for ax, metric in ((ax1, "ttft"), (ax2, "itl")):
            for q, line in (("p50", "-"), ("p99", "--")):
                ax.plot(xs, [lat[str(c)][f"{metric}_{q}_ms"] for c in xs], line, marker="o", color=COLORS[w],
                        label=f"{w} {q}")  # fmt: skip
    for ax, name in ((ax1, "time to first token"), (ax2, "inter-token latency")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.set_xlabel("concurrency (gRPC streams)")
        ax.set_ylabel("ms")
        ax.set_title(f"gRPC streaming: {name}")
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    latency = directory / f"latency{suffix}.png"
    fig.savefig(latency, dpi=110)
    plt.close(fig)
    return [throughput, latency]


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results" / "bench.json"
    payload = json.loads(path.read_text())
    print(markdown(payload))


if __name__ == "__main__":
    main()
