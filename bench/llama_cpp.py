"""llama.cpp's ``llama-batched-bench`` on the same GPT-2 weights, in GGUF (bench/build_llama_cpp.sh).

Where the build is looked for (``find``), first found wins:
- ``--llama-cpp-dir DIR`` or env ``LLAMA_CPP_DIR``: ``DIR/build/bin/llama-batched-bench`` and
  ``DIR/gguf/*-f32.gguf``, ``*-f16.gguf``, ``*-q8_0.gguf`` (the layout build_llama_cpp.sh writes);
- ``llama-batched-bench`` on PATH and the GGUF files in env ``LLAMA_GGUF_DIR``.
When a directory holds several models, ``gpt2-random-*`` (random:gpt2, the weights our engine is
benchmarked on) is preferred.

One run is ``llama-batched-bench -m MODEL -c CTX -b 2048 -ub 512 -npp P -ntg N -npl 1,8,...
-t CORES``: for each B, B sequences of P random prompt tokens are prefilled in one batch, then N
tokens are generated for each. Its markdown table (PP, TG, B, N_KV, T_PP s, S_PP t/s, T_TG s,
S_TG t/s, T s, S t/s) is parsed by ``parse``. ``S t/s`` counts prompt and generated tokens over
the whole run; our engine's tokens/s counts generated tokens over the whole run (prefill
included in the time), so the comparable number is ``gen_tokens_per_s`` = B * TG / T s.

    .venv/bin/python bench/llama_cpp.py            # parse the built-in sample (a self-check)
    .venv/bin/python bench/llama_cpp.py OUTPUT     # parse a captured llama-batched-bench output
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

BINARY = "llama-batched-bench"
# our weight format -> llama.cpp's GGUF type
FORMATS = {"float32": "f32", "float16": "f16", "int8": "q8_0"}
PREFERRED_STEM = "gpt2-random"

COLUMNS = ("PP", "TG", "B", "N_KV", "T_PP s", "S_PP t/s", "T_TG s", "S_TG t/s", "T s", "S t/s")

# Captured from this llama.cpp (llama-cpp-python 0.3.36's vendored tree, build 0c1e570) on
# gpt2-random-f32.gguf with -npp 16 -ntg 8 -npl 1,2 -t 2, on a busy 2-core VM.
SAMPLE = """
llama_batched_bench: n_kv_max = 512, n_batch = 2048, n_ubatch = 512, flash_attn = -1, is_pp_shared = 0, is_tg_separate = 0, n_gpu_layers = -1, n_threads = 2, n_threads_batch = 2

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|    16 |      8 |    1 |     24 |    0.799 |    20.02 |    1.645 |     4.86 |    2.444 |     9.82 |
|    16 |      8 |    2 |     48 |    0.183 |   175.08 |    0.670 |    23.89 |    0.853 |    56.30 |
"""


@dataclass(frozen=True)
class Row:
    """One line of llama-batched-bench's table: B sequences, PP prompt and TG generated tokens each."""

    pp: int
    tg: int
    batch: int
    n_kv: int
    t_pp_s: float
    s_pp: float  # prompt tokens / T_PP
    t_tg_s: float
    s_tg: float  # generated tokens / T_TG (decode only)
    t_s: float  # T_PP + T_TG
    s: float  # (prompt + generated tokens) / T

    @property
    def gen_tokens_per_s(self) -> float:
        """Generated tokens over the whole run, prefill included: what our engine's tokens/s is."""
        return self.batch * self.tg / self.t_s


def parse(output: str) -> list[Row]:
    """The rows of llama-batched-bench's markdown table (or of its --output-format jsonl lines)."""
    rows: list[Row] = []
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            d = json.loads(line)
            rows.append(
                Row(
                    d["pp"],
                    d["tg"],
                    d["pl"],
                    d["n_kv"],
                    d["t_pp"],
                    d["speed_pp"],
                    d["t_tg"],
                    d["speed_tg"],
                    d["t"],
                    d["speed"],
                )
            )
            continue
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(COLUMNS):
            continue
        try:
            pp, tg, b, n_kv = (int(c) for c in cells[:4])
            floats = [float(c) for c in cells[4:]]
        except ValueError:  # the header and the separator
            continue
        rows.append(Row(pp, tg, b, n_kv, *floats))
    return rows


@dataclass(frozen=True)
class Build:
    binary: Path
    models: dict[str, Path]  # our weight format -> GGUF file
    version: str

    def describe(self) -> dict[str, object]:
        return {
            "binary": str(self.binary),
            "version": self.version,
            "models": {k: str(v) for k, v in self.models.items()},
        }


def _pick(directory: Path, gguf_type: str) -> Path | None:
    candidates = sorted(directory.glob(f"*-{gguf_type}.gguf"))
    preferred = [p for p in candidates if p.name == f"{PREFERRED_STEM}-{gguf_type}.gguf"]
    chosen = preferred or candidates
    return chosen[0] if chosen else None


def find(llama_cpp_dir: str | None = None) -> tuple[Build | None, str]:
    """The build to use, or None and why there is none."""
    root = llama_cpp_dir or os.environ.get("LLAMA_CPP_DIR")
    if root:
        binary: Path | None = Path(root) / "build" / "bin" / BINARY
        gguf_dir = Path(root) / "gguf"
        where = f"LLAMA_CPP_DIR={root}"
    else:
        found = shutil.which(BINARY)
        binary = Path(found) if found else None
        gguf_dir = Path(os.environ.get("LLAMA_GGUF_DIR", ""))
        where = f"{BINARY} on PATH and LLAMA_GGUF_DIR"
        if binary is None:
            return (
                None,
                f"no llama.cpp: set LLAMA_CPP_DIR (bench/build_llama_cpp.sh builds one) or put {BINARY} on PATH",
            )
        if not os.environ.get("LLAMA_GGUF_DIR"):
            return None, f"{BINARY} is on PATH ({binary}) but LLAMA_GGUF_DIR is not set"
    if binary is None or not os.access(binary, os.X_OK):
        return None, f"{where}: no executable {binary}"
    models = {fmt: p for fmt, t in FORMATS.items() if (p := _pick(gguf_dir, t)) is not None}
    if not models:
        return None, f"{where}: no *-f32/-f16/-q8_0.gguf in {gguf_dir}"
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
        version = (
            " ".join((out.stdout + out.stderr).split("version:", 1)[-1].split()[:5])
            if "version:" in (out.stdout + out.stderr)
            else "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        version = "unknown"
    return Build(binary, models, version), where


# Retried with these when a model crashes llama-batched-bench as it is (as q8_0 with the CPU
# backend's weight repacking did on an AMX machine with this build).
FALLBACK_ARGS = ["--no-repack"]


def run(
    build: Build,
    weights: str,
    prompt_tokens: int,
    new_tokens: int,
    batches: list[int],
    threads: int,
    timeout: float,
    extra_args: list[str] | None = None,
) -> list[Row]:
    """One llama-batched-bench process over ``batches``; raises RuntimeError with its stderr's tail on failure."""
    context = max(batches) * (prompt_tokens + new_tokens)
    cmd = [
        str(build.binary),
        "-m", str(build.models[weights]),
        "-c", str(context),
        "-b", "2048",
        "-ub", "512",
        "-npp", str(prompt_tokens),
        "-ntg", str(new_tokens),
        "-npl", ",".join(map(str, batches)),
        "-t", str(threads),
        *(extra_args or []),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    rows = parse(proc.stdout) or parse(proc.stderr)  # the table goes to stdout; older builds log it to stderr
    if proc.returncode != 0 or not rows:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-8:])
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode} with {len(rows)} rows:\n{tail}")
    return rows


def main() -> None:
    text = Path(sys.argv[1]).read_text() if len(sys.argv) > 1 else SAMPLE
    rows = parse(text)
    for row in rows:
        print(json.dumps({**asdict(row), "gen_tokens_per_s": round(row.gen_tokens_per_s, 2)}))
    if len(sys.argv) == 1:  # the self-check on the sample
        assert [(r.pp, r.tg, r.batch) for r in rows] == [(16, 8, 1), (16, 8, 2)], rows
        assert rows[1].s == 56.30 and rows[1].s_tg == 23.89 and rows[1].t_s == 0.853
        assert abs(rows[1].gen_tokens_per_s - 2 * 8 / 0.853) < 1e-9
        print("sample parsed: ok")


if __name__ == "__main__":
    main()
