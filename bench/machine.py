"""The machine a benchmark ran on, and its ceilings measured in the same run.

- ``describe()``: CPU model (lscpu), cores, the vector/matrix flags that matter to the kernels
  (avx2, avx512*, amx*), torch's CPU capability and versions.
- ``ceilings(model)``: memory read bandwidth (summing a 1 GiB float32 tensor, best of a few),
  fp32 matmul GFLOP/s (a large sgemm, best of a few), and the GFLOP/s of one model's worth of
  linear layers (GPT-2 small's shapes, the model's own weights) in each weight format at 1 and 32
  rows, through the kernels the engine uses (``kernel_mode``).
- ``weight_bytes`` / ``flops_per_request``: what one token reads, what one request computes.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from gpt2_service.model.gpt2 import GPT2, Conv1D
from gpt2_service.model.kernels import WEIGHT_FORMATS, KernelMode, kernel_mode

GIB = 1 << 30


def describe() -> dict[str, Any]:
    """CPU model, cores and flags (lscpu, else /proc/cpuinfo), torch and Python versions."""
    info: dict[str, str] = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    flags = set(info.get("Flags", "").split())
    model = info.get("Model name", "")
    if not flags or not model:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "flags" and not flags:
                    flags = set(value.split())
                elif key.strip() == "model name" and not model:
                    model = value.strip()
        except OSError:
            pass
    import transformers

    return {
        "cpu": model or platform.processor() or "unknown CPU",
        "vendor": info.get("Vendor ID", ""),
        "architecture": platform.machine(),
        "cores": os.cpu_count(),
        "threads_per_core": info.get("Thread(s) per core", ""),
        "hypervisor": info.get("Hypervisor vendor", ""),
        "flags": {
            "avx2": "avx2" in flags,
            "avx512": sorted(f for f in flags if f.startswith("avx512")),
            "amx": sorted(f for f in flags if f.startswith("amx")),
        },
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def short_description(machine: dict[str, Any]) -> str:
    flags = machine["flags"]
    extras = [name for name, on in (("AVX2", flags["avx2"]), ("AVX-512", flags["avx512"]), ("AMX", flags["amx"])) if on]
    return f"{machine['cpu']}, {machine['cores']} cores ({', '.join(extras) or 'no AVX2'}), torch {machine['torch']}"


# -- what a token reads, what a request computes --------------------------------------------------


def _linear_params(model: GPT2) -> tuple[int, int]:
    """Weights of the transformer's linear layers, and of the (tied) LM head."""
    body = sum(m.weight.numel() for m in model.modules() if isinstance(m, Conv1D))
    return body, model.transformer.wte.weight.numel()


def weight_bytes(model: GPT2, weights: str) -> int:
    """Bytes of weights one decode step reads: every float32 parameter, or in a reduced format the
    linear layers and the LM head at its element size. One copy: a format keeps two (the general
    kernel's and the few-row loops', ``packed_bytes`` counts both), and a step reads one."""
    if weights == "float32":
        return sum(p.numel() * p.element_size() for p in model.parameters())
    return sum(_linear_params(model)) * {"float16": 2, "int8": 1}[weights]


def flops_per_request(model: GPT2, prompt_tokens: int, new_tokens: int) -> int:
    """Matrix-product FLOPs of one greedy request: the body runs on the prompt and on every
    generated token but the last, the LM head once per generated token (attention's own FLOPs,
    under 2% at these lengths, left out)."""
    body, head = _linear_params(model)
    return 2 * (body * (prompt_tokens + new_tokens - 1) + head * new_tokens)


# -- ceilings --------------------------------------------------------------------------------------


def _best(fn: Callable[[], object], repeats: int, min_seconds: float = 0.0) -> float:
    """Best wall time of ``fn`` over ``repeats`` runs (after one warm-up), each run repeated
    until it lasts ``min_seconds``."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        n, start = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        best = min(best, elapsed / n)
    return best


def memory_bandwidth(repeats: int = 5, nbytes: int = GIB) -> float:
    """Read bandwidth in GB/s: the best time to sum ``nbytes`` of float32."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    seconds = _best(x.sum, repeats)
    return nbytes / seconds / 1e9


def sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """fp32 GFLOP/s of an n x n x n matrix product (torch.mm), best of ``repeats``."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    out = torch.empty(n, n)
    seconds = _best(lambda: torch.mm(a, b, out=out), repeats)
    return 2 * n**3 / seconds / 1e9


@torch.inference_mode()
def linear_gflops(model: GPT2, weights: str, rows: int, batch_invariant: bool, repeats: int = 5) -> dict[str, float]:
    """One model's worth of linear layers (every Conv1D, then the LM head) on ``rows`` rows in
    ``weights``, with the engine's kernels: GFLOP/s, and the weight bytes streamed per second."""
    model.prepare_weights(weights)
    d = model.config.n_embd
    gen = torch.Generator().manual_seed(0)
    inputs = {
        d: torch.randn(rows, d, generator=gen),
        model.config.d_ff: torch.randn(rows, model.config.d_ff, generator=gen),
    }
    layers = [(m, inputs[m.weight.shape[0]]) for m in model.modules() if isinstance(m, Conv1D)]
    head_in = inputs[d]

    def run() -> None:
        for module, x in layers:
            module(x)
        model.logits(head_in)

    with kernel_mode(KernelMode(weights, batch_invariant)):
        seconds = _best(run, repeats, min_seconds=0.05)
    body, head = _linear_params(model)
    return {
        "gflops": 2 * rows * (body + head) / seconds / 1e9,
        "weight_gb_per_s": weight_bytes(model, weights) / seconds / 1e9,
        "ms": seconds * 1e3,
    }


def ceilings(model: GPT2, rows: tuple[int, ...] = (1, 32), repeats: int = 5) -> dict[str, Any]:
    """Bandwidth, sgemm and per-format linear ceilings, measured now (run it with the engines idle)."""
    result: dict[str, Any] = {
        "memory_read_gb_per_s": memory_bandwidth(repeats),
        "sgemm_gflops": sgemm_gflops(repeats=repeats),
        "sgemm_n": 2048,
        "linear": {},
    }
    for weights in WEIGHT_FORMATS:
        result["linear"][weights] = {
            str(r): {
                mode: linear_gflops(model, weights, r, batch_invariant=mode == "deterministic", repeats=repeats)
                for mode in ("deterministic", "fast")
            }
            for r in rows
        }
    return result


def lscpu_flag_summary(flags: dict[str, Any]) -> str:
    avx512 = ",".join(re.sub("^avx512_?", "", f) for f in flags["avx512"]) or "none"
    amx = ",".join(flags["amx"]) or "none"
    return f"avx2 {'yes' if flags['avx2'] else 'no'}; avx512: {avx512}; amx: {amx}"
